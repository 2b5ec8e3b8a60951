"""Outputs that are complete or absent (issue 28, sections 3 and 6): the export, the report files, `impact --json`,
`merge`'s folder; non-finite numbers in log.jsonl and report.json.

A kill is simulated by making the writer raise midway (monkeypatch), or with a subprocess that SIGKILLs
itself in the middle of writing the export.
"""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import laet_fast.cli as cli
from merge_models import save_pair
from train_fixtures import folder_digest, labelled_texts, model_dir, torch_kernels, write_csv  # noqa: F401 (fixtures)
from laet_fast import atomic, export_model
from laet_fast.scores import LayerScores
from laet_fast.train.report import TrainReport, finite_or_null
from laet_fast.train.trainer import Trainer

RUN = ["--method", "last", "--k", "1", "--max-steps", "2", "--batch-size", "4", "--max-length", "16",
       "--score-batches", "1", "--no-progress"]


def partials(folder):
    return sorted(name for name in os.listdir(folder) if atomic.PARTIAL in name)


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    texts, labels = labelled_texts(40, 5)
    return write_csv(tmp_path_factory.mktemp("data") / "data.csv", texts, labels)


class Killed(Exception):
    """Stands for the kill of a writer midway."""


# ---------------------------------------------------------------- the export
def test_an_export_cut_midway_leaves_no_model_folder(model_dir, data_csv, tmp_path, monkeypatch):
    import safetensors.torch

    def cut(*args, **kwargs):  # the heads are written after the weights, config and tokenizer
        raise Killed("killed while writing the heads")

    monkeypatch.setattr(safetensors.torch, "save_file", cut)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        cli.main(["train", "--model", model_dir, "--data", data_csv, *RUN, "--out", str(out)])
    assert not (out / "model").exists()  # not a folder a user could mistake for a model
    assert partials(out) == []


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM
    from laet_fast import apply_selection, export_model

    write = modeling_utils.safe_save_file

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # the weights are written; the rest of the export is not

    modeling_utils.safe_save_file = write_then_die
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    apply_selection(model, [1])
    export_model(model, sys.argv[2])
""")


def test_an_export_killed_midway_leaves_the_previous_one_and_the_next_export_removes_its_partial(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    export = str(tmp_path / "export")
    export_model(AutoModelForCausalLM.from_pretrained(model_dir), export)
    before = folder_digest(export)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, model_dir, export], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert folder_digest(export) == before  # the previous complete export, untouched
    assert len(partials(tmp_path)) == 1  # the killed export's hidden folder
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)
    export_model(model, export)
    assert partials(tmp_path) == []
    assert folder_digest(export) != before
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


# ---------------------------------------------------------------- the report
def small_report(out, metrics):
    return TrainReport(
        model="tiny", task="classify", method="last", selection=[3], num_layers=4, head_layers=[3],
        trainable_params=10, total_params=100, quantize_frozen=None, peak_memory=2**20, memory_kind="peak RSS",
        planned_memory=None, forward={"blocks_run": 4, "lm_head_run": False, "saved_share": 0.1}, steps=2,
        skipped_steps=0, time_per_step=0.5, scoring_time=1.0, training_time=1.0, metrics=metrics,
        export_dir=str(out / "model"))


def test_a_report_plot_cut_midway_leaves_the_previous_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    scores = LayerScores({"last": [0.0, 1.0, 2.0, 3.0]}, [f"model.layers.{i}" for i in range(4)])
    report = small_report(tmp_path, {"accuracy": 0.5})
    report.write(str(tmp_path), scores)
    before = (tmp_path / "report.png").read_bytes()
    assert before.startswith(b"\x89PNG")

    def cut(self, path, **kwargs):  # a SIGTERM mid-write, as far as the file is concerned
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise Killed("killed while plotting")

    monkeypatch.setattr(LayerScores, "plot", cut)
    with pytest.raises(Killed):
        report.write(str(tmp_path), scores)
    assert (tmp_path / "report.png").read_bytes() == before
    assert partials(tmp_path) == []


def test_a_report_json_cut_midway_leaves_no_file(tmp_path, monkeypatch):
    def cut(self):
        raise Killed("killed while writing report.json")

    report = small_report(tmp_path, {"accuracy": 0.5})
    monkeypatch.setattr(TrainReport, "to_dict", cut)
    with pytest.raises(Killed):
        report.write(str(tmp_path))
    assert (tmp_path / "report.txt").is_file()  # written before
    assert not (tmp_path / "report.json").exists() and partials(tmp_path) == []


def test_non_finite_numbers_become_null_and_are_named():
    entry = {"step": 3, "loss": 1.5, "eval": {"loss": math.nan}, "layer_scores": {"grad_norm": [0.1, math.inf]}}
    line, names = finite_or_null(entry)
    assert line == {"step": 3, "loss": 1.5, "eval": {"loss": None}, "layer_scores": {"grad_norm": [0.1, None]}}
    assert names == ["eval.loss", "layer_scores.grad_norm[1]"]
    assert finite_or_null(-math.inf) == (None, ["value"])


def strict_json(text):
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_evaluation_is_logged_as_null_and_the_report_says_why(model_dir, data_csv, tmp_path,
                                                                          monkeypatch, capsys):
    real = Trainer.evaluate

    def diverged(self, *args, **kwargs):
        metrics = real(self, *args, **kwargs)
        return {**metrics, "loss": math.nan, "macro_f1": math.inf}

    monkeypatch.setattr(Trainer, "evaluate", diverged)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", model_dir, "--data", data_csv, *RUN, "--eval-every", "1",
                     "--out", str(out)]) == 0
    lines = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["eval"]["loss"] is None and line["eval"]["macro_f1"] is None
        assert isinstance(line["eval"]["accuracy"], float)
        assert line["note"] == "non-finite eval.macro_f1, eval.loss written as null"
    report = strict_json((out / "report.json").read_text())
    assert report["metrics"]["loss"] is None and report["metrics"]["macro_f1"] is None
    why = "the final evaluation's macro_f1, loss are not finite (NaN or inf; null in report.json)"
    assert any(note.startswith(why) for note in report["notes"])
    assert why in (out / "report.txt").read_text() and why in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()


# ---------------------------------------------------------------- impact and merge
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), layers=4, seed=7)


def test_impact_json_cut_midway_leaves_no_partial_file(pair, tmp_path, monkeypatch):
    out = tmp_path / "impact.json"
    out.write_text('{"earlier": 1}\n')

    def cut(self, path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write('{"metrics": ')
        raise Killed("killed while writing the JSON")

    monkeypatch.setattr(LayerScores, "to_json", cut)
    with pytest.raises(Killed):
        cli.main(["impact", "--base", pair[0], "--tuned", pair[1], "--json", str(out)])
    assert out.read_text() == '{"earlier": 1}\n'
    assert partials(tmp_path) == []


def test_merge_removes_partial_folders_of_killed_runs_and_its_own_on_failure(pair, tmp_path, monkeypatch):
    from laet_fast.merge import checkpoint

    out = tmp_path / "merged"
    killed = tmp_path / ".merged.partial-k1ll3d"  # what a merge killed earlier leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 4096)
    other = tmp_path / ".other.partial-keep"  # another output's: not this merge's to remove
    other.mkdir()
    write = checkpoint.SafetensorsWriter.write
    calls = []

    def cut(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise Killed("killed while writing the merged weights")
        write(self, name, tensor)

    monkeypatch.setattr(checkpoint.SafetensorsWriter, "write", cut)
    with pytest.raises(Killed):
        cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--t", "1=0.5", "--out", str(out)])
    assert not out.exists() and partials(tmp_path) == [".other.partial-keep"]
    killed.mkdir()
    monkeypatch.setattr(checkpoint.SafetensorsWriter, "write", write)
    assert cli.main(["merge", "--base", pair[0], "--tuned", pair[1], "--t", "1=0.5", "--out", str(out)]) == 0
    assert partials(tmp_path) == [".other.partial-keep"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# ---------------------------------------------------------------- the helper itself
def test_write_file_keeps_the_suffix_and_the_previous_file_on_failure(tmp_path):
    target = tmp_path / "scores.png"
    seen = []
    atomic.write_file(str(target), lambda path: (seen.append(path), open(path, "wb").write(b"one")))
    assert seen[0].endswith(".png") and os.path.dirname(seen[0]) == str(tmp_path)
    assert target.read_bytes() == b"one"

    def fail(path):
        open(path, "wb").write(b"tw")
        raise Killed("midway")

    with pytest.raises(Killed):
        atomic.write_file(str(target), fail)
    assert target.read_bytes() == b"one" and partials(tmp_path) == []


def test_folder_refuses_an_existing_file(tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        with atomic.folder(str(target)):
            pass
    assert target.read_text() == "a file"


def test_a_partial_of_a_write_still_under_way_is_left_alone(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that has ended: a dead writer
    ended.wait()
    dead = tmp_path / f".out.partial-{ended.pid}-x1"
    live = tmp_path / f".out.partial-{os.getpid()}-x2"  # this process: a write under way
    unnamed = tmp_path / ".out.partial-x3"  # no process id: left by a killed write
    for folder in (dead, live, unnamed):
        folder.mkdir()
    with atomic.folder(str(tmp_path / "out")) as staging:
        assert os.path.basename(staging).startswith(f".out.partial-{os.getpid()}-")
        open(os.path.join(staging, "a.txt"), "w").write("a")
    assert partials(tmp_path) == [live.name]
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
