"""`laet-fast train` under torchrun, 2 CPU processes (gloo): the run one process makes on the global batch.

Each rank reads its slice of every global batch (``--batch-size`` per rank); the log, checkpoints,
export and report are written once, by rank 0; LAET's probe features are gathered, so the blocks and
heads are those of one process; each step's loss is weighted so that the averaged gradient is the
global batch's, also when the ranks hold different numbers of tokens (``--task lm``).
"""
import json
import os
import subprocess
import sys

import pytest

from merge_models import random_texts
from train_fixtures import labelled_texts, save_model, write_csv
from laet_fast.cli import main

pytest.importorskip("bitsandbytes")
STEPS = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-train")
    texts, labels = labelled_texts(72, 11)
    lm = root / "lm.txt"
    lm.write_text("\n".join(random_texts(40, 5)), encoding="utf-8")
    return {"model": save_model(root / "model", layers=4), "classify": write_csv(root / "data.csv", texts, labels),
            "lm": str(lm), "root": root}


def train_args(files, data, out, batch_size, extra):
    return ["train", "--model", files["model"], "--data", files[data], "--batch-size", str(batch_size),
            "--max-length", "16", "--max-steps", str(STEPS), "--score-batches", "2", "--eval-every", "3",
            "--no-progress", "--out", str(out), *extra]


def torchrun(args):
    env = {**os.environ, "LAET_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "laet_fast",
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def log_of(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def assert_same_run(two, one):
    assert [e["step"] for e in two] == list(range(1, STEPS + 1))  # one line per step, written by rank 0 alone
    for a, b in zip(two, one, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        for key, value in b.get("eval", {}).items():
            assert a["eval"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("case", ["laet_nf4", "lm"])
def test_two_ranks_train_as_one_process_on_the_global_batch(files, case, monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    if case == "laet_nf4":  # probes on gathered features, NF4 frozen blocks, 2 micro-batches per step
        data, extra = "classify", ["--method", "laet", "--quantize-frozen", "nf4", "--grad-accum", "2"]
    else:  # ranks hold different numbers of tokens: the loss is weighted by them
        data, extra = "lm", ["--task", "lm", "--method", "last", "--k", "2", "--lr", "1e-3"]
    two, one = files["root"] / f"{case}-2", files["root"] / f"{case}-1"
    stdout = torchrun(train_args(files, data, two, 2, extra))
    assert stdout.count("laet_fast training report") == 1  # rank 0 prints it
    assert main(train_args(files, data, one, 4, extra)) == 0
    assert_same_run(log_of(two), log_of(one))
    reports = [json.load(open(os.path.join(out, "report.json"))) for out in (two, one)]
    assert reports[0]["selection"] == reports[1]["selection"] and reports[0]["head_layers"] == reports[1]["head_layers"]
    assert reports[0]["probe_baseline"] == reports[1]["probe_baseline"]  # the evaluation before step 1, sharded
    if case == "laet_nf4":  # the probes learnt from every training text, gathered from both ranks
        assert reports[0]["probe_spread"]["examples"] == reports[1]["probe_spread"]["examples"] == 57
        assert reports[0]["probe_spread"]["mean"] == pytest.approx(reports[1]["probe_spread"]["mean"], abs=1e-9)
    assert os.path.isfile(os.path.join(two, "model", "config.json"))
