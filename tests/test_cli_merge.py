"""`laet-fast impact` and `laet-fast merge` on tiny saved models, in-process."""
import os

import pytest
import torch
from safetensors.torch import load_file

import laet_fast.cli as cli
from laet_fast.merge import layer_impact, policy_t
from laet_fast.scores import LayerScores
from merge_models import random_texts, save_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), layers=4, seed=7)


def test_impact_prints_table_and_writes_json_and_plot(pair, tmp_path, capsys):
    out_json, out_png = str(tmp_path / "impact.json"), str(tmp_path / "impact.png")
    assert cli.main(["impact", "--base", pair[0], "--tuned", pair[1], "--json", out_json, "--plot", out_png]) == 0
    printed = capsys.readouterr().out
    assert "weight_rel_change" in printed and "model.layers.3" in printed
    saved = LayerScores.from_json(out_json)
    want = layer_impact(pair[0], pair[1])
    assert saved["weight_rel_change"] == pytest.approx(want["weight_rel_change"], rel=1e-12)
    assert os.path.getsize(out_png) > 1000


def test_impact_with_general_text(pair, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("\n".join(random_texts(4, seed=3)) + "\n")
    out_json = str(tmp_path / "impact.json")
    assert cli.main(["impact", "--base", pair[0], "--tuned", pair[1], "--general", str(general),
                     "--max-texts", "4", "--device", "cpu", "--json", out_json]) == 0
    saved = LayerScores.from_json(out_json)
    assert "general_ppl_delta" in saved and "domain_loss_delta" not in saved and saved.num_tokens > 0


def test_merge_with_explicit_t(pair, tmp_path, capsys):
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--t", "1=0, 3=1", "--out", out]) == 0
    assert "1=0, 3=1" in capsys.readouterr().out
    merged = load_file(os.path.join(out, "model.safetensors"))
    base = load_file(os.path.join(pair[0], "model.safetensors"))
    tuned = load_file(os.path.join(pair[1], "model.safetensors"))
    for name, tensor in merged.items():
        want = base[name] if name.startswith("model.layers.1.") else tuned[name]
        assert torch.equal(tensor, want), name


def test_merge_with_policy_and_scores(pair, tmp_path, capsys):
    scores_path = str(tmp_path / "scores.json")
    scores = LayerScores({"general_ppl_delta": [0.5, -2.0, -0.1, 0.3]}, [f"model.layers.{i}" for i in range(4)])
    scores.to_json(scores_path)
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--policy", "balanced",
                     "--scores", scores_path, "--out", out]) == 0
    assert capsys.readouterr().out.strip() == "blocks restored (t): 1=0.5, 2=0.5"
    out2 = str(tmp_path / "merged2")
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--policy", "aggressive", "--out", out2]) == 0
    want = policy_t(layer_impact(pair[0], pair[1]), "aggressive")
    assert capsys.readouterr().out.strip() == "blocks restored (t): " + ", ".join(f"{b}={w:g}" for b, w in want.items())


@pytest.mark.parametrize("argv,message", [
    (["--t", "3=0.5,x"], "write block=t pairs"),
    (["--t", "1=0.5,1=0.2"], "names block 1 twice"),
    (["--t", "1=1.5"], r"must be a number in \[0, 1\]"),
    (["--t", "9=0.5"], "blocks are the integers 0..3"),
    (["--t", "1=0.5", "--scores", "s.json"], "--scores only goes with --policy"),
])
def test_merge_bad_input_is_one_line(pair, tmp_path, capsys, argv, message):
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--out", out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("laet-fast merge: error:") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not os.path.exists(out)


def test_merge_refuses_to_overwrite_an_input(pair, capsys):
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--t", "0=0.5", "--out", pair[1]]) == 2
    assert "never overwrites its inputs" in capsys.readouterr().err


def test_merge_needs_policy_or_t(pair, tmp_path, capsys):
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--policy" in err and "--t" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_impact_bad_folder_is_one_line(pair, tmp_path, capsys):
    assert cli.main(["impact", "--base", pair[0], "--tuned", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--max-texts", "0"], "--max-texts must be at least 1, got 0"),
    (["--plot", "impact.xyz"], r"suffix \.xyz is not an image format"),
])
def test_impact_bad_option_is_one_line_before_any_work(pair, tmp_path, capsys, argv, message):
    argv = [a if a != "impact.xyz" else str(tmp_path / a) for a in argv]
    assert cli.main(["impact", "--base", pair[0], "--tuned", pair[1], *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the impact table was computed
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_merge_of_mismatched_or_non_finite_checkpoints_is_one_line_naming_the_tensor(pair, tmp_path, capsys):
    from tiny_models import tiny_model

    wide = tiny_model("llama", seed=0, num_hidden_layers=4, intermediate_size=140)
    wide.save_pretrained(str(tmp_path / "wide"))
    broken = tiny_model("llama", seed=0, num_hidden_layers=4)
    with torch.no_grad():
        broken.model.layers[3].self_attn.o_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(str(tmp_path / "broken"))
    capsys.readouterr()  # save_pretrained's progress bar
    for tuned, message in ((tmp_path / "wide", "'model.layers.0.mlp.down_proj.weight' has shape"),
                           (tmp_path / "broken", "'model.layers.3.self_attn.o_proj.weight' in .* non-finite")):
        out = str(tmp_path / "merged")
        assert cli.main(["merge", "--base", pair[0], "--tuned", str(tuned), "--t", "0=0.5", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("laet-fast merge: error:") and len(err.splitlines()) == 1
        assert __import__("re").search(message, err), err
        assert not os.path.exists(out)
