"""laet-fast train --config FILE / --print-config: a run's options in a YAML or JSON file."""
import json

import yaml

from laet_fast.cli import main


def printed(capsys, *argv):
    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_round_trips_through_config(tmp_path, capsys):
    options = printed(capsys, "--task", "lm", "--method", "last", "--k", "2", "--max-length", "48", "--packing")
    assert options["task"] == "lm" and options["k"] == 2 and options["max_length"] == 48 and options["packing"] is True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(options))
    assert printed(capsys, "--config", str(path)) == options


def test_the_command_line_overrides_the_file_and_dashed_names_are_accepted(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max-length: 16\nlr: 0.001\nmethod: grad_norm\n")
    options = printed(capsys, "--config", str(path), "--max-length", "20")
    assert options["max_length"] == 20 and options["lr"] == 0.001 and options["method"] == "grad_norm"
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"batch_size": 3, "seed": 7}))
    options = printed(capsys, "--config", str(json_path))
    assert options["batch_size"] == 3 and options["seed"] == 7


def test_unknown_names_and_bad_files_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max_lenght: 16\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'max_lenght'; did you mean 'max_length'?" in err and len(err.strip().splitlines()) == 1
    path.write_text("- a list\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_group_of_exclusive_options_takes_the_command_lines_member(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 100\n")
    options = printed(capsys, "--config", str(path), "--epochs", "3")
    assert options["epochs"] == 3 and options["max_steps"] is None  # --epochs replaces the file's max_steps
    path.write_text("max_steps: 100\nepochs: 2\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "sets max_steps and epochs; give one of them" in capsys.readouterr().err


def test_an_on_off_option_in_the_file_must_be_true_or_false(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text('packing: "false"\n')
    assert main(["train", "--config", str(path)]) == 2
    assert "'packing' is on or off: write true or false, not 'false'" in capsys.readouterr().err
    path.write_text("packing: false\n")
    assert printed(capsys, "--config", str(path))["packing"] is False
