"""`laet-fast train` and `laet-fast predict` on bad input: one clear line on stderr, exit code 2, nothing saved lost.

In process (``laet_fast.cli.main``) on a tiny random llama saved as a folder (train_fixtures).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from train_fixtures import (CLASSES, folder_digest, labelled_texts, model_dir, save_model,  # noqa: F401 (fixtures)
                            torch_kernels, write_csv)
from test_train_resume import WRAPPER, kill, wait_for
from laet_fast.cli import main
from laet_fast.train import checkpoints

RUN = ["--method", "last", "--k", "2", "--max-steps", "6", "--batch-size", "4", "--max-length", "16",
       "--lr", "1e-3", "--score-batches", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    texts, labels = labelled_texts(60, 21)
    return write_csv(tmp_path_factory.mktemp("data") / "data.csv", texts, labels)


def train(model_dir, data, out, *extra):
    return main(["train", "--model", model_dir, "--data", str(data), *RUN, *extra, "--out", str(out)])


def error_line(capsys, command="train"):
    """The one line on stderr, which must be laet-fast's error."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"laet-fast {command}: error: "), lines
    return lines[0]


def write_rows(path, header, rows):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(",".join(header) + "\n")
        for row in rows:
            handle.write(",".join(row) + "\n")
    return str(path)


# ---------------------------------------------------------------- bad data
def test_no_label_column(model_dir, tmp_path, capsys):
    texts, _ = labelled_texts(20, 1)
    data = write_rows(tmp_path / "d.csv", ["text", "stars"], [(t, "1") for t in texts])
    assert train(model_dir, data, tmp_path / "run") == 2
    line = error_line(capsys)
    assert "no label column 'label'" in line and "'stars'" in line and "--label-column" in line
    assert not (tmp_path / "run").exists()


def test_a_text_without_its_label(model_dir, tmp_path, capsys):
    texts, labels = labelled_texts(20, 2)
    labels[4] = ""
    assert train(model_dir, write_csv(tmp_path / "d.csv", texts, labels), tmp_path / "run") == 2
    assert "row 5: a text without a label in 'label'" in error_line(capsys)


def test_one_class_only(model_dir, tmp_path, capsys):
    texts, _ = labelled_texts(20, 3)
    assert train(model_dir, write_csv(tmp_path / "d.csv", texts, ["high"] * 20), tmp_path / "run") == 2
    assert "every label is 'high': classification needs at least two classes" in error_line(capsys)


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_empty_dataset(model_dir, tmp_path, capsys, task):
    data = write_rows(tmp_path / "d.csv", ["text", "label"], [])
    assert train(model_dir, data, tmp_path / "run", "--task", task) == 2
    assert "no texts" in error_line(capsys)


def test_missing_data_file_and_model(model_dir, tmp_path, capsys):
    assert train(model_dir, tmp_path / "absent.csv", tmp_path / "run") == 2
    assert "absent.csv does not exist" in error_line(capsys)
    assert train(str(tmp_path / "no-model"), write_csv(tmp_path / "d.csv", *labelled_texts(20, 4)),
                 tmp_path / "run") == 2
    assert "no-model" in error_line(capsys)


def test_long_texts_are_truncated_and_counted(model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    texts, labels = labelled_texts(40, 5)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    long = sum(n > 7 for n in lengths)
    assert 0 < long < len(texts)
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--data", write_csv(tmp_path / "d.csv", texts, labels), *RUN,
            "--max-length", "7", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"note: {long} of {len(texts)} texts are longer than max_length=7 tokens and were truncated." in err
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(1, 7))


def test_text_labels_are_mapped_not_refused(model_dir, tmp_path, capsys):
    """Labels like "low"/"high" (or "3"/"10") become ids; the mapping is saved with the export."""
    from laet_fast.train import load_trained

    texts, labels = labelled_texts(40, 6)
    names = {"low": "not spam", "high": "spam"}
    out = tmp_path / "run"
    assert train(model_dir, write_csv(tmp_path / "d.csv", texts, [names[y] for y in labels]), out) == 0
    report = json.load(open(out / "report.json"))
    assert report["classes"] == ["not spam", "spam"]
    predictor = load_trained(str(out / "model"), device="cpu")
    assert predictor.classes == ["not spam", "spam"] and set(predictor.predict(texts[:5])) <= set(names.values())
    # Numbers written as text keep their numeric order.
    out = tmp_path / "numeric"
    assert train(model_dir, write_csv(tmp_path / "n.csv", texts, ["10" if y == "high" else "3" for y in labels]),
                 out) == 0
    assert json.load(open(out / "report.json"))["classes"] == ["3", "10"]


def test_data_naming_a_directory_says_so(model_dir, tmp_path, capsys):
    assert train(model_dir, tmp_path, tmp_path / "run") == 2
    assert f"data file {tmp_path} is a directory" in error_line(capsys)
    assert main(["predict", "--model-dir", model_dir, "--data", str(tmp_path)]) == 2
    assert f"data file {tmp_path} is a directory" in error_line(capsys, "predict")


def test_a_file_that_is_not_utf8_names_the_line_and_trains_with_encoding(model_dir, tmp_path, capsys):
    texts, labels = labelled_texts(40, 7)
    texts[9] += " caf\u00e9"
    data = tmp_path / "d.csv"
    data.write_bytes(open(write_csv(tmp_path / "u.csv", texts, labels), encoding="utf-8").read().encode("cp1252"))
    assert train(model_dir, data, tmp_path / "run") == 2
    line = error_line(capsys)
    assert "line 11 holds b'\\xe9', which is not valid utf-8" in line and "--encoding" in line
    assert not (tmp_path / "run").exists()
    assert train(model_dir, data, tmp_path / "run", "--encoding", "cp1252") == 0
    assert json.load(open(tmp_path / "run" / "report.json"))["classes"] == sorted(CLASSES)


def test_an_unquoted_comma_is_an_error_never_a_new_class(model_dir, tmp_path, capsys):
    texts, labels = labelled_texts(40, 8)
    rows = [(t, y) for t, y in zip(texts, labels)]
    rows[5] = ("a wonderful", " moving film", labels[5])  # the row a spreadsheet writes without quotes
    data = write_rows(tmp_path / "d.csv", ["text", "label"], rows)
    assert train(model_dir, data, tmp_path / "run") == 2
    assert "line 7 has 3 fields but the header has 2" in error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- runs already saved
def test_out_holding_another_run_is_refused_and_untouched(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(model_dir, data_csv, out, "--save-every", "2") == 0
    capsys.readouterr()
    before = folder_digest(out)
    for extra in ([], ["--lr", "5e-4"]):
        assert train(model_dir, data_csv, out, *extra) == 2
        line = error_line(capsys)
        assert f"--out {out} holds another run" in line and "--resume" in line
    assert folder_digest(out) == before
    # A folder with only checkpoints (its log lost) is a run too.
    os.remove(out / "log.jsonl")
    before = folder_digest(out)
    assert train(model_dir, data_csv, out) == 2
    error_line(capsys)
    assert folder_digest(out) == before


def test_cuda_out_of_memory_names_the_plan_and_what_to_lower(model_dir, data_csv, tmp_path, capsys, monkeypatch):
    """An OutOfMemoryError in step 6 (forward, backward or optimizer step) stops the run with one line holding the
    planner's estimate and the knobs; the checkpoint of step 4 stays."""
    from laet_fast.memory import plan_memory
    from laet_fast.selection import Selection
    from laet_fast.train.heads import TaskModel

    real_forward, calls = TaskModel.forward, []

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():  # a training step (scoring and eval run without grad)
            calls.append(1)
            if len(calls) == 6:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(TaskModel, "forward", forward)
    out = tmp_path / "run"
    assert train(model_dir, data_csv, out, "--save-every", "4", "--max-steps", "8") == 2
    line = error_line(capsys)
    from transformers import AutoConfig

    plan = plan_memory(AutoConfig.from_pretrained(model_dir), Selection((2, 3), 4), seq_len=16, batch_size=4,
                       optimizer="adamw", dtype="fp32", keep_logits=False, lm_head=False)
    assert "out of memory at step 6" in line and f"{plan.peak_allocated / 2**30:.3f} GiB" in line
    for knob in ("(--batch-size)", "(--max-length)", "(--k)", "--quantize-frozen nf4", "--optimizer adamw8bit"):
        assert knob in line
    assert checkpoints.latest(str(out)).endswith("step-00000004")
    assert [json.loads(log_line)["step"] for log_line in open(out / "log.jsonl")] == [1, 2, 3, 4, 5]


def test_out_of_memory_in_the_optimizer_step_is_caught_too(model_dir, data_csv, tmp_path, capsys, monkeypatch):
    calls = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert train(model_dir, data_csv, tmp_path / "run") == 2
    assert "out of memory at step 3" in error_line(capsys)


def test_nan_weights_never_reach_a_checkpoint(model_dir, data_csv, tmp_path, capsys, monkeypatch):
    """A trained weight turned NaN after step 5: its steps are skipped, the save at step 8 is refused, and the
    checkpoint of step 4 holds finite weights."""
    from laet_fast.train.heads import TaskModel

    real_forward, calls = TaskModel.forward, []

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():  # a training step (scoring and eval run without grad)
            calls.append(1)
            if len(calls) == 6:
                with torch.no_grad():
                    self.stack[3].mlp.down_proj.weight.view(-1)[0] = float("nan")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(TaskModel, "forward", forward)
    out = tmp_path / "run"
    assert train(model_dir, data_csv, out, "--save-every", "4", "--max-steps", "12") == 2
    line = error_line(capsys)
    assert "not saving step 8" in line and "non-finite" in line and "the last checkpoint is kept" in line
    assert [os.path.basename(p) for p in checkpoints.complete(str(out))] == ["step-00000004"]
    tensors, meta = checkpoints.load(checkpoints.latest(str(out)))
    assert all(torch.isfinite(t).all() for t in tensors["trained"].values() if t.is_floating_point())
    log = [json.loads(log_line) for log_line in open(out / "log.jsonl")]
    assert [e["loss"] is None for e in log] == [False] * 5 + [True] * 3
    assert all(math.isfinite(e["loss"]) for e in log[:5])


# ---------------------------------------------------------------- checks before the model loads
@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""
    import laet_fast.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(laet_fast.loading, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize("extra, expected", [
    (["--method", "last", "--k", "99"], "--k 99 is more than the model's 4 blocks; choose --k from 1 to 4."),
    (["--method", "laet", "--k", "5"], "--k 5 is more than the model's 4 blocks; choose --k from 1 to 4."),
    (["--method", "3,99"], "--method 3,99: the model has 4 blocks, numbered 0 to 3; 99 is not one of them."),
    (["--method", "all", "--k", "2"], "--method all trains all 4 blocks of the model; drop --k 2"),
    (["--method", "laet", "--reselect-every", "2"], "reselect_every needs a method that can choose again while "
                                                    "training (grad_norm, block_influence, relative_change, random), "
                                                    "not 'laet'."),
    # the config's errors name its fields; the command says them as its options
    (["--method", "laet", "--budget-gb", "1"], "budget_gb caps the blocks of method 'laet-cost' only; drop it, or "
                                               "use --method laet-cost."),
    (["--method", "laet-cost", "--budget-s", "0"], "--budget-s 0.0 must be a finite number > 0."),
    (["--method", "laet-cost", "--task", "lm"], "method 'laet-cost' trains probes on class labels, which --task lm "
                                                "has none of"),
    (["--probe-examples", "0"], "--probe-examples 0 must be an integer >= 1."),
])
def test_what_the_config_refuses_is_refused_before_the_model_loads(model_dir, data_csv, tmp_path, capsys, no_model_load,
                                                            extra, expected):
    out = tmp_path / "run"
    assert train(model_dir, data_csv, out, *extra) == 2
    assert expected in error_line(capsys)
    assert not out.exists()  # an early refusal leaves no empty run folder


def test_laet_cost_prints_its_choice_and_the_probe_baseline(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(model_dir, data_csv, out, "--method", "laet-cost", "--k", "2", "--probe-examples", "30") == 0
    printed = capsys.readouterr().out
    report = json.load(open(out / "report.json"))
    assert report["method"] == "laet-cost" and 1 <= len(report["selection"]) <= 2
    best = report["probe_baseline"]["best_probe"]
    assert best["block"] == min(report["selection"])  # the cut is the best probe's block
    assert f"  before training    best frozen probe (block {best['block']}) accuracy {best['accuracy']:.4f}" in printed
    assert report["probe_spread"]["examples"] == 30 and "  probe accuracy     per block" in printed
    assert open(out / "report.txt").read().strip() == printed.strip()
    # A budget that not even the best probe's block fits: one line, exit 2.
    assert train(model_dir, data_csv, tmp_path / "tight", "--method", "laet-cost", "--budget-s", "1e-12") == 2
    assert "No layer set fits --budget-s 1e-12: the cheapest, block [" in error_line(capsys)


def test_out_naming_a_file_is_refused_before_the_model_loads(model_dir, data_csv, tmp_path, capsys, no_model_load):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    assert train(model_dir, data_csv, out) == 2
    assert f"--out {out} is a file; give a folder for the run" in error_line(capsys)
    assert out.read_text() == "mine\n"


def test_quantize_frozen_without_bitsandbytes_is_refused_before_the_model_loads(model_dir, data_csv, tmp_path, capsys,
                                                                                no_model_load, monkeypatch):
    import laet_fast.quantize

    def missing():
        raise ImportError("Quantization needs bitsandbytes, which could not be imported (No module named "
                          "'bitsandbytes'). Install it with `pip install bitsandbytes`.")

    monkeypatch.setattr(laet_fast.quantize, "require_bitsandbytes", missing)
    assert train(model_dir, data_csv, tmp_path / "run", "--quantize-frozen", "nf4") == 2
    assert "--quantize-frozen nf4: Quantization needs bitsandbytes" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_refusal_after_the_lock_leaves_no_run_folder(model_dir, tmp_path, capsys):
    """The run folder is made when the lock is taken; a model that cannot be loaded leaves none behind."""
    data = write_csv(tmp_path / "d.csv", *labelled_texts(20, 4))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "no-model"), "--data", data, "--method", "grad_norm",
                 "--out", str(out)]) == 2
    assert "no-model" in error_line(capsys)
    assert not out.exists()


def test_a_second_run_into_the_same_out_is_refused_naming_the_process(model_dir, data_csv, tmp_path, capsys,
                                                                      monkeypatch):
    """A real `laet-fast train` process holds --out (slowed down): a second run, fresh or --resume, is refused
    before loading the model, naming that process. Once it is killed, the lock file it left blocks nothing."""
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--data", data_csv, *RUN, "--save-every", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LAET_FAST_BACKEND": "torch",
           "LAET_TEST_DELAY": "0.3"}
    first = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = out / ".lock"
    wait_for(first, lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), "its lock")
    import laet_fast.loading

    real_load = laet_fast.loading.load_model_and_tokenizer
    with monkeypatch.context() as patch:
        patch.setattr(laet_fast.loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
        for extra in ([], ["--resume"]):
            assert main([*argv, *extra]) == 2
            line = error_line(capsys)
            assert f"--out {out} is in use: process {first.pid} is running there" in line, line
            assert "choose another --out folder" in line
    assert laet_fast.loading.load_model_and_tokenizer is real_load
    wait_for(first, lambda: checkpoints.latest(str(out)) is not None, "its first checkpoint")
    kill(first)
    assert lock.is_file()  # left by the killed run, its lock gone with the process
    assert main([*argv, "--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(1, 7))
    assert not lock.exists()


@pytest.mark.parametrize("save_every, interrupted_at, says", [
    ("2", 5, "continue the run from its checkpoint step-00000004 with: "),
    ("0", 3, "no checkpoint was saved (--save-every), so this starts the run again: "),
])
def test_an_interrupted_run_says_the_command_that_resumes_it(model_dir, data_csv, tmp_path, capsys, monkeypatch,
                                                             save_every, interrupted_at, says):
    """Ctrl-C in a training step: the one line gives the exact command, and that command completes the run."""
    import shlex

    from laet_fast.train.heads import TaskModel

    real_forward, calls = TaskModel.forward, []

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():  # a training step (scoring and eval run without grad)
            calls.append(1)
            if len(calls) == interrupted_at:
                raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(TaskModel, "forward", forward)
        assert train(model_dir, data_csv, out, "--save-every", save_every) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"laet-fast train: interrupted; {says}laet-fast train "), lines
    command = shlex.split(lines[0].split(says, 1)[1])
    assert command[0] == "laet-fast" and command[-1] == "--resume"
    assert main(command[1:]) == 0
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("method, bar", [("laet", "layer embeddings: "), ("grad_norm", "scoring (grad_norm): 100%")])
def test_the_scoring_sweep_shows_progress(model_dir, data_csv, tmp_path, capsys, method, bar):
    """A bar over the scoring sweep (before the training bar), none with --no-progress."""
    argv = ["train", "--model", model_dir, "--data", data_csv, "--method", method, *RUN[4:]]
    assert main([a for a in argv if a != "--no-progress"] + ["--out", str(tmp_path / "shown")]) == 0
    err = capsys.readouterr().err
    assert bar in err and "training:" in err and err.index(bar) < err.index("training:")
    assert main(argv + ["--out", str(tmp_path / "quiet")]) == 0
    err = capsys.readouterr().err
    assert bar.split(":")[0] not in err and "training:" not in err


def test_threads_sets_torchs_thread_count_for_the_run(model_dir, data_csv, tmp_path, capsys, monkeypatch):
    from laet_fast.train.trainer import Trainer

    real_fit, seen = Trainer.fit, []

    def fit(self):
        seen.append(torch.get_num_threads())
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    assert train(model_dir, data_csv, tmp_path / "run", "--threads", str(wanted)) == 0
    assert seen == [wanted] and torch.get_num_threads() == before
    with open(tmp_path / "run" / "report.json", encoding="utf-8") as handle:
        assert json.load(handle)["cpu_threads"] == wanted
    assert f"s/step over 6 steps on {wanted} CPU threads" in (tmp_path / "run" / "report.txt").read_text()
    capsys.readouterr()
    assert train(model_dir, data_csv, tmp_path / "other", "--threads", "0") == 2
    assert "--threads must be at least 1, got 0." in error_line(capsys)


# ---------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def trained(model_dir, data_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train(model_dir, data_csv, out) == 0
    return str(out / "model")


def test_predict_prints_labels_and_accuracy(trained, tmp_path, capsys):
    texts, labels = labelled_texts(12, 30)
    assert main(["predict", "--model-dir", trained, "--data", write_csv(tmp_path / "p.csv", texts, labels)]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t", 1) for line in captured.out.strip().splitlines()]
    assert [t for _, t in rows] == texts and {p for p, _ in rows} <= set(CLASSES)
    correct = sum(p == y for (p, _), y in zip(rows, labels))
    assert f"accuracy {correct / 12:.4f} ({correct} of 12)" in captured.err


@pytest.mark.parametrize("case", ["no model dir", "not an export", "no data", "empty data", "unknown label",
                                  "batch size"])
def test_predict_bad_input(trained, model_dir, tmp_path, capsys, case):
    texts, labels = labelled_texts(6, 31)
    data = write_csv(tmp_path / "p.csv", texts, labels)
    argv = {
        "no model dir": ["--model-dir", str(tmp_path / "none"), "--data", data],
        "not an export": ["--model-dir", model_dir, "--data", data],
        "no data": ["--model-dir", trained, "--data", str(tmp_path / "none.csv")],
        "empty data": ["--model-dir", trained, "--data", write_rows(tmp_path / "e.csv", ["text", "label"], [])],
        "unknown label": ["--model-dir", trained, "--data", write_csv(tmp_path / "u.csv", texts, ["medium"] * 6)],
        "batch size": ["--model-dir", trained, "--data", data, "--batch-size", "0"],
    }[case]
    expected = {
        "no model dir": "is not a folder", "not an export": "is not a laet_fast training export",
        "no data": "does not exist", "empty data": "no texts", "unknown label": "not among the trained classes",
        "batch size": "--batch-size must be at least 1",
    }[case]
    before = folder_digest(trained)
    assert main(["predict", *argv]) == 2
    assert expected in error_line(capsys, "predict")
    assert folder_digest(trained) == before


def test_library_errors_are_said_as_options_but_paths_are_left_alone():
    from laet_fast.commands.train import as_flags

    assert as_flags("out='/tmp/my run' holds another run; resume it with resume=True, or choose another out "
                    "folder.") == "--out '/tmp/my run' holds another run; resume it with --resume, or choose another " \
                                  "--out folder."
    assert as_flags("batch_size=0 must be an integer >= 1.") == "--batch-size 0 must be an integer >= 1."
    assert as_flags("Lower the learning rate (lr).") == "Lower the learning rate (--lr)."
    path = "No space left on device: 'runs/lr=1e-4/model'"
    assert as_flags(path) == path
