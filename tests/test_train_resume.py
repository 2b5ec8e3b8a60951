"""Checkpoints and resume: a killed run resumes to the straight run's losses, cut saves, wrong checkpoints refused.

Runs go through ``laet-fast train`` on a tiny random llama saved as a folder (train_fixtures), fp32
on the CPU with one thread, so that a resumed run can be compared step by step with a run that was
never interrupted (to 1e-6 relative).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_fixtures import folder_digest, labelled_texts, save_model, write_csv
from laet_fast.cli import main
from laet_fast.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run the tests interrupt: 12 steps, a checkpoint every 4 (keep 2).
BASE = ["--max-steps", "12", "--batch-size", "4", "--max-length", "16",
        "--lr", "1e-3", "--save-every", "4", "--keep", "2", "--eval-every", "6", "--score-batches", "2",
        "--no-progress"]
VARIANTS = {
    "plain": ["--method", "last", "--k", "2"],
    # Re-selection every 2 steps by IR-Tuning's variance split of gradient norms: on this model and data the
    # selection moves from [0] to [1] at step 10 and back at 12, so the checkpoint at 12 holds a block
    # trained earlier and frozen since.
    "reselect": ["--method", "grad_norm", "--splits", "2", "--reselect-every", "2", "--lr", "2e-4",
                 "--max-steps", "16"],
    "nf4": ["--quantize-frozen", "nf4", "--method", "1,3"],
}

# Runs `laet-fast train` with every training batch slowed down (so that a test can kill it between two
# steps) and, with LAET_TEST_HANG_SAVE=N, hanging in save N after its first file is written.
WRAPPER = r"""
import os, sys, time
import laet_fast.train.batches as data
import laet_fast.train.checkpoints as checkpoints

delay = float(os.environ.get("LAET_TEST_DELAY", "0"))
real_at = data.Batches.at
data.Batches.at = lambda self, *where: (time.sleep(delay), real_at(self, *where))[1]
hang, saves, written = int(os.environ.get("LAET_TEST_HANG_SAVE", "0")), [], []
real_save, real_write = checkpoints.save, checkpoints._write_file

def save(*args, **kwargs):
    saves.append(1)
    return real_save(*args, **kwargs)

def write_file(path, write):
    real_write(path, write)
    if len(saves) == hang:
        open(os.environ["LAET_TEST_MARK"], "w").close()
        time.sleep(600)

checkpoints.save, checkpoints._write_file = save, write_file
from laet_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    texts, labels = labelled_texts(72, 11)
    return {"model": save_model(root / "model", layers=4), "data": write_csv(root / "data.csv", texts, labels),
            "root": root}


def args_of(files, out, extra=VARIANTS["plain"], resume=False):
    return ["train", "--model", files["model"], "--data", files["data"], *BASE, *extra, "--out", str(out)] + \
        (["--resume"] if resume else [])


def train_in_process(argv):
    """`laet-fast train` in this process, on one thread like the subprocesses; returns the exit code."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def read_log(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def assert_same_run(log, straight):
    """One entry per step, each step's loss (and lr, gradient norm, selection, eval) the straight run's."""
    assert [e["step"] for e in log] == [e["step"] for e in straight] == list(range(1, len(straight) + 1))
    for got, want in zip(log, straight):
        assert set(got) == set(want), got["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9, abs=0)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, abs=1e-9)
        assert got.get("selection") == want.get("selection") and got["tokens"] == want["tokens"]
        if "eval" in want:
            assert got["eval"] == pytest.approx(want["eval"], rel=1e-5, abs=1e-7)


def straight_run(files, variant, cache={}):
    """The log of the variant's uninterrupted run (once per variant and session)."""
    if variant not in cache:
        out = files["root"] / f"straight-{variant}"
        assert train_in_process(args_of(files, out, VARIANTS[variant])) == 0
        cache[variant] = read_log(out)
    return cache[variant]


def start(files, out, extra, env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LAET_FAST_BACKEND": "torch",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), **env_extra}
    return subprocess.Popen([sys.executable, "-c", WRAPPER, *args_of(files, out, extra)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, ready, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def logged_steps(out):
    try:
        with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as handle:
            return sum(1 for line in handle if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def sigkill_between_steps(files, variant):
    """Kill the run with SIGKILL two steps after its first checkpoint (step 4); then resume it."""
    out = files["root"] / f"killed-{variant}"
    proc = start(files, out, VARIANTS[variant], {"LAET_TEST_DELAY": "0.15"})
    wait_for(proc, lambda: checkpoints.latest(str(out)) is not None and logged_steps(out) >= 6,
             "a checkpoint and two more steps")
    kill(proc)
    saved = checkpoints.latest(str(out))
    assert saved.endswith("step-00000004")
    assert 6 <= logged_steps(out) < 10  # the log ran past the checkpoint: resume must drop those lines
    assert train_in_process(args_of(files, out, VARIANTS[variant], resume=True)) == 0
    return out


def test_sigkilled_run_resumes_to_the_straight_runs_losses(files):
    out = sigkill_between_steps(files, "plain")
    assert_same_run(read_log(out), straight_run(files, "plain"))
    assert json.load(open(out / "report.json"))["steps"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["reselect", "nf4"])
def test_sigkilled_run_resumes_exactly_with_reselection_and_nf4(files, variant):
    if variant == "nf4":
        pytest.importorskip("bitsandbytes")
    out = sigkill_between_steps(files, variant)
    straight = straight_run(files, variant)
    if variant == "reselect":
        assert [(e["step"], e["selection"]) for e in straight if "selection" in e][:2] == [(10, [1]), (12, [0])]
    assert_same_run(read_log(out), straight)


def crash_at(step, argv, monkeypatch, scoring_batches=2):
    """Run ``laet-fast train argv`` in this process until an exception in the batch stream at ``step``."""
    import laet_fast.train.batches as data

    real_at, calls = data.Batches.at, []

    def crashing(self, position, *shard):
        calls.append(position)
        if len(calls) == scoring_batches + step:  # the scoring batches, then the crashing step's batch
            raise RuntimeError("crash")
        return real_at(self, position, *shard)

    monkeypatch.setattr(data.Batches, "at", crashing)
    with pytest.raises(RuntimeError, match="crash"):
        train_in_process(argv)
    monkeypatch.setattr(data.Batches, "at", real_at)


@pytest.mark.parametrize("variant", ["plain", "reselect", "nf4"])
def test_resume_after_a_crash_in_process(files, variant, monkeypatch):
    """A run that dies at step 7 (14 for re-selection: an exception in the batch stream) resumes from the last
    checkpoint, step 4 (12), to the straight run."""
    if variant == "nf4":
        pytest.importorskip("bitsandbytes")
    out = files["root"] / f"crashed-{variant}"
    crash, saved = (14, 12) if variant == "reselect" else (7, 4)
    crash_at(crash, args_of(files, out, VARIANTS[variant]), monkeypatch)
    assert logged_steps(out) == crash - 1 and checkpoints.latest(str(out)).endswith(f"step-{saved:08d}")
    if variant == "reselect":
        meta = checkpoints.load(checkpoints.latest(str(out)))[1]
        assert meta["selection"]["layers"] == [0] and meta["ever_trained"] == [0, 1]
    assert train_in_process(args_of(files, out, VARIANTS[variant], resume=True)) == 0
    assert_same_run(read_log(out), straight_run(files, variant))


def test_resume_restores_the_random_state(files, monkeypatch):
    """With dropout in attention every training step draws random numbers: a resume that did not restore the
    checkpoint's RNG state would draw others after step 4, and its losses would not be the straight run's."""
    model = save_model(files["root"] / "dropout-model", layers=4, attention_dropout=0.3)

    def argv(out):
        return args_of({**files, "model": model}, out)

    straight_out, out = files["root"] / "straight-dropout", files["root"] / "crashed-dropout"
    assert train_in_process(argv(straight_out)) == 0
    straight = read_log(straight_out)
    crash_at(7, argv(out), monkeypatch)
    assert checkpoints.latest(str(out)).endswith("step-00000004")
    assert train_in_process(argv(out) + ["--resume"]) == 0
    assert_same_run(read_log(out), straight)


def test_a_save_cut_half_way_leaves_the_last_checkpoint_intact(files, monkeypatch, capsys):
    out = files["root"] / "cut-save"
    real_write, written = checkpoints._write_file, []

    def failing(path, write):
        if "step-00000008.tmp" in path and written:
            raise OSError("disk gone")
        real_write(path, write)
        if "step-00000008.tmp" in path:
            written.append(path)

    monkeypatch.setattr(checkpoints, "_write_file", failing)
    good = {}
    real_save = checkpoints.save

    def save(run_dir, step, *args, **kwargs):
        if step == 8:  # what the last good checkpoint holds, byte for byte, before the cut save
            good["digest"] = folder_digest(checkpoints.latest(run_dir))
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save", save)
    assert train_in_process(args_of(files, out)) == 2  # one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == "laet-fast train: error: disk gone"
    monkeypatch.setattr(checkpoints, "save", real_save)
    monkeypatch.setattr(checkpoints, "_write_file", real_write)
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-00000004", "step-00000008.tmp"] and len(written) == 1
    assert checkpoints.latest(str(out)) == str(root / "step-00000004")
    assert folder_digest(root / "step-00000004") == good["digest"]
    assert train_in_process(args_of(files, out, resume=True)) == 0
    assert_same_run(read_log(out), straight_run(files, "plain"))
    assert not (root / "step-00000008.tmp").exists()  # the resumed run wrote step 8 again, cleanly


@pytest.mark.slow
def test_sigkill_inside_a_save(files):
    """SIGKILL while save 2 (step 8) hangs after its first file: step 4 is intact and resume starts there."""
    out = files["root"] / "killed-in-save"
    mark = files["root"] / "in-save"
    proc = start(files, out, VARIANTS["plain"], {"LAET_TEST_HANG_SAVE": "2", "LAET_TEST_MARK": str(mark)})
    wait_for(proc, mark.exists, "the second save")
    before = folder_digest(out / "checkpoints" / "step-00000004")
    kill(proc)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000004", "step-00000008.tmp"]
    assert folder_digest(out / "checkpoints" / "step-00000004") == before
    assert checkpoints.latest(str(out)).endswith("step-00000004")
    assert train_in_process(args_of(files, out, resume=True)) == 0
    assert_same_run(read_log(out), straight_run(files, "plain"))


# ---------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def finished_run(files):
    """A finished run with checkpoints at steps 4 and 8 (its folder is copied by each test that resumes it)."""
    out = files["root"] / "finished"
    assert train_in_process(args_of(files, out)) == 0
    return out


@pytest.fixture(scope="module")
def saved_run(finished_run, files):
    """The finished run as if killed before it wrote its finished mark: a resume goes back to step 8."""
    out = files["root"] / "saved"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "checkpoints" / checkpoints.FINISHED)
    return out


def copy_run(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def forge(checkpoint, edit):
    """``edit(meta)`` in a checkpoint's meta.json, and its manifest recomputed (sha256 by hashlib), as one who
    knows the format could."""
    meta_path = os.path.join(checkpoint, checkpoints.META)
    meta = json.load(open(meta_path))
    edit(meta)
    json.dump(meta, open(meta_path, "w"))
    manifest_path = os.path.join(checkpoint, checkpoints.MANIFEST)
    manifest = json.load(open(manifest_path))
    data = open(meta_path, "rb").read()
    manifest["files"][checkpoints.META] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(manifest, open(manifest_path, "w"))


def other_model(files):
    folder = files["root"] / "other-model"
    if not folder.exists():
        save_model(folder, layers=4, seed=1)
    return str(folder)


@pytest.mark.parametrize("change, key", [
    (["--lr", "2e-3"], "lr"),
    (["--batch-size", "6"], "batch_size"),
    (["--k", "1"], "k"),
    (["--method", "0,1"], "method"),
    (["--seed", "1"], "seed"),
    (["--quantize-frozen", "int8"], "quantize_frozen"),
    (["--max-length", "12"], "max_length"),
])
def test_a_checkpoint_of_another_config_is_refused_naming_the_key(files, saved_run, tmp_path, capsys, change, key):
    out = copy_run(saved_run, tmp_path)
    before = folder_digest(out)
    assert train_in_process(args_of(files, out, VARIANTS["plain"] + change, resume=True)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume from" in err[0] and f"{key}: checkpoint " in err[0], err
    assert folder_digest(out) == before


def test_a_checkpoint_of_another_model_task_or_data_is_refused(files, saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path)
    before = folder_digest(out)
    # Another model at another path.
    argv = args_of(files, out, resume=True)
    argv[argv.index("--model") + 1] = other_model(files)
    assert train_in_process(argv) == 2
    assert "model: checkpoint" in capsys.readouterr().err
    # Another task.
    argv = args_of(files, out, VARIANTS["plain"] + ["--task", "lm"], resume=True)
    assert train_in_process(argv) == 2
    err = capsys.readouterr().err
    assert "task: checkpoint \"classify\", this run \"lm\"" in err and "classes: checkpoint" in err
    # Other data.
    texts, labels = labelled_texts(72, 12)
    argv = args_of(files, out, resume=True)
    argv[argv.index("--data") + 1] = write_csv(tmp_path / "other.csv", texts, labels)
    assert train_in_process(argv) == 2
    assert "train_data: checkpoint" in capsys.readouterr().err
    assert folder_digest(out) == before


def test_another_model_with_the_same_path_and_shape_is_refused(files, saved_run, tmp_path, capsys):
    """Other weights in the same folder (a model re-saved, or replaced): the weights' digest differs."""
    out = copy_run(saved_run, tmp_path)
    model_dir = tmp_path / "model"
    shutil.copytree(files["model"], model_dir)
    argv = args_of({**files, "model": str(model_dir)}, out, resume=True)
    # The copied model under a new path would differ by name; give the checkpoint this path's name.
    for path in checkpoints.complete(str(out)):
        forge(path, lambda meta: meta["fingerprint"].update(model=os.path.abspath(model_dir)))
    shutil.rmtree(model_dir)
    save_model(model_dir, layers=4, seed=5)
    assert train_in_process(argv) == 2
    err = capsys.readouterr().err
    assert "model_weights: checkpoint" in err and "model: checkpoint" not in err


def test_resumable_changes_are_accepted(files, saved_run, tmp_path):
    """Where to write, how often to evaluate and how many checkpoints to keep may change on resume."""
    out = copy_run(saved_run, tmp_path)
    assert train_in_process(args_of(files, out, VARIANTS["plain"] + ["--eval-every", "3", "--keep", "3"],
                                    resume=True)) == 0
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(1, 13))
    assert "eval" in log[8] and "eval" not in log[2]  # steps after the checkpoint evaluate every 3


def test_the_probe_baseline_survives_resume(files, finished_run, saved_run, tmp_path):
    """The evaluation before step 1 is saved with each checkpoint; a resumed run reports the saved numbers (here
    forged into the checkpoint it resumes from), for it cannot measure them again from trained heads."""
    finished = json.load(open(finished_run / "report.json"))["probe_baseline"]
    head = finished["last_block_head"]
    assert head["block"] == 3 and 0 <= head["accuracy"] <= 1 and 0 <= head["macro_f1"] <= 1
    out = copy_run(saved_run, tmp_path)
    newest = checkpoints.latest(str(out))
    assert checkpoints.load(newest)[1]["probe_baseline"] == finished
    forged = {"last_block_head": {"block": 3, "accuracy": 0.125, "macro_f1": 0.25}}
    forge(newest, lambda meta: meta.update(probe_baseline=forged))
    assert train_in_process(args_of(files, out, resume=True)) == 0
    assert json.load(open(out / "report.json"))["probe_baseline"] == forged
    assert "last-block head (block 3, untrained) accuracy 0.1250, macro_f1 0.2500" in open(out / "report.txt").read()


# ---------------------------------------------------------------- damaged checkpoints
def flip_bytes(path, count=200):
    """Change ``count`` bytes in the middle of a file (its size stays)."""
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(255 - b for b in data[middle:middle + count])
    open(path, "wb").write(bytes(data))


def cut_in_half(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def edit_position(path):
    """meta.json's data position edited as text (32 -> 28: the file's size stays), the manifest left as saved."""
    text = open(path).read()
    position = json.loads(text)["position"]
    assert text.count(f'"position": {position},') == 1 and len(str(position)) == len(str(position - 4))
    open(path, "w").write(text.replace(f'"position": {position},', f'"position": {position - 4},'))


DAMAGE = {
    "flipped bytes": ("trained.safetensors", flip_bytes, "does not match its sha256"),
    "cut weights": ("trained.safetensors", cut_in_half, "bytes, "),
    "cut meta.json": ("meta.json", cut_in_half, "bytes, "),
    "edited position": ("meta.json", edit_position, "does not match its sha256"),
    "missing rng": ("rng.safetensors", os.remove, "is missing"),
    "missing manifest": ("manifest.json", os.remove, "is missing, so the checkpoint cannot be verified"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_one_before(files, saved_run, tmp_path, capsys,
                                                                               damage):
    name, harm, what = DAMAGE[damage]
    out = copy_run(saved_run, tmp_path)
    damaged = out / "checkpoints" / "step-00000008"
    harm(str(damaged / name))
    kept = folder_digest(damaged)
    assert train_in_process(args_of(files, out, resume=True)) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    target = str(damaged / (checkpoints.MANIFEST if name == "manifest.json" else name))
    assert err[0].startswith("checkpoint step-00000008 is damaged: " + target) and what in err[0], err
    assert err[1] == f"resuming from {out / 'checkpoints' / 'step-00000004'}, the newest checkpoint that verifies " \
                     f"(nothing was deleted).", err
    assert_same_run(read_log(out), straight_run(files, "plain"))
    # Nothing deleted: the damaged folder was set aside, byte for byte, when step 8 was saved again.
    assert folder_digest(out / "checkpoints" / "step-00000008.damaged") == kept
    assert checkpoints.verify(str(damaged))["step"] == 8


def test_a_step_that_is_not_the_folders_is_damage(files, saved_run, tmp_path, capsys):
    """meta.json of step-00000008 says step 13, with a manifest made to match: damaged, the run goes back to 4
    and ends at its 12 steps (it neither trains nothing nor writes a shorter export)."""
    out = copy_run(saved_run, tmp_path)
    forge(out / "checkpoints" / "step-00000008", lambda meta: meta.update(step=13))
    assert train_in_process(args_of(files, out, resume=True)) == 0
    err = capsys.readouterr().err
    assert f"{out / 'checkpoints' / 'step-00000008' / 'meta.json'} records step 13, but its folder is " \
           f"step-00000008" in err
    assert_same_run(read_log(out), straight_run(files, "plain"))
    assert json.load(open(out / "report.json"))["steps"] == 12


def test_no_checkpoint_that_verifies_is_one_line_and_exit_2(files, saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path)
    flip_bytes(str(out / "checkpoints" / "step-00000008" / "optimizer.safetensors"))
    edit_position(str(out / "checkpoints" / "step-00000004" / "meta.json"))
    before = folder_digest(out)
    assert train_in_process(args_of(files, out, resume=True)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 3, err
    assert err[0].startswith("checkpoint step-00000008 is damaged: ") and "optimizer.safetensors" in err[0]
    assert err[1].startswith("checkpoint step-00000004 is damaged: ") and "meta.json" in err[1]
    assert err[2] == (f"laet-fast train: error: none of the 2 checkpoints in {out / 'checkpoints'} verifies (each is "
                      f"named above; nothing was deleted); start the run again in another --out folder.")
    assert folder_digest(out) == before


# ---------------------------------------------------------------- finished runs
def test_resuming_a_finished_run_says_it_is_complete_and_writes_nothing(files, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = folder_digest(out)
    assert train_in_process(args_of(files, out, resume=True)) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"laet-fast train: the run in {out} is complete (12 steps; its report is {out / 'report.txt'}); "
                   f"nothing to resume."]
    assert folder_digest(out) == before


def test_a_damaged_finished_mark_is_said_and_the_run_resumes_from_its_checkpoints(files, finished_run, tmp_path,
                                                                                  capsys):
    out = copy_run(finished_run, tmp_path)
    mark = out / "checkpoints" / checkpoints.FINISHED
    flip_bytes(str(mark / "meta.json"), count=1)
    kept = folder_digest(mark)
    assert train_in_process(args_of(files, out, resume=True)) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0] == (f"the mark that the run finished is damaged: {mark / 'meta.json'} does not match its sha256 in "
                      f"the manifest (changed since it was saved); going on as if it had not finished."), err
    assert_same_run(read_log(out), straight_run(files, "plain"))  # steps 9 to 12 again, from step 8
    assert checkpoints.finished(str(out))[1]["step"] == 12
    assert folder_digest(out / "checkpoints" / "finished.damaged") == kept


def test_a_finished_run_is_never_replaced_by_a_shorter_one(files, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = folder_digest(out)
    argv = args_of(files, out, resume=True)
    argv[argv.index("--max-steps") + 1] = "8"
    assert train_in_process(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"laet-fast train: error: --out {out} holds a finished run of 12 steps, and this run of 8 steps "
                   f"would replace its model and report; choose another --out folder."]
    assert folder_digest(out) == before


# ---------------------------------------------------------------- a full disk
@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_during_a_save_is_one_line(files, tmp_path, capsys, monkeypatch, code):
    """The second file of the step-8 save hits ENOSPC: one line naming the folder and the bytes it needs (the
    tensors being written, and their meta data), step 4 intact, the .tmp folder removed."""
    import errno

    out = tmp_path / "run"
    real_write, real_save, sizes, good = checkpoints._write_file, checkpoints.save, {}, {}

    def full(path, write):
        if "step-00000008.tmp" in path and not path.endswith("trained.safetensors"):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real_write(path, write)

    def save(run_dir, step, tensors, meta, keep):
        if step == 8:
            good["digest"] = folder_digest(checkpoints.latest(run_dir))
            sizes["tensors"] = sum(t.numel() * t.element_size() for g in tensors.values() for t in g.values())
        return real_save(run_dir, step, tensors, meta, keep)

    monkeypatch.setattr(checkpoints, "_write_file", full)
    monkeypatch.setattr(checkpoints, "save", save)
    assert train_in_process(args_of(files, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    final = out / "checkpoints" / "step-00000008"
    assert len(err) == 1 and err[0].startswith(f"laet-fast train: error: no space left to write the checkpoint "
                                               f"{final}: it needs about "), err
    number, unit = err[0].split("it needs about ")[1].split(",")[0].split()
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    # The tensors and the meta data (tens of KiB here), within the one decimal printed.
    assert sizes["tensors"] - scale / 20 <= float(number) * scale <= sizes["tensors"] + 2**16 + scale / 20, err[0]
    assert "resume with --resume (the earlier checkpoints are intact)" in err[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000004"]
    assert folder_digest(out / "checkpoints" / "step-00000004") == good["digest"]


def test_a_full_disk_during_the_export_is_one_line_and_resume_finishes(files, tmp_path, capsys, monkeypatch):
    """The export hits ENOSPC: one line naming OUT/model and about the model's size, no OUT/model, the checkpoints
    intact; once there is room, --resume finishes the run from its newest checkpoint."""
    import errno

    import laet_fast.train.export as export

    out, real_export = tmp_path / "run", export.export_trained

    def full(task_model, folder, *args, **kwargs):
        full.bytes = sum(p.numel() * p.element_size() for p in task_model.parameters())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_trained", full)
    assert train_in_process(args_of(files, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"laet-fast train: error: no space left to write the run's model "
                                               f"{out / 'model'}: it needs about "), err
    number, unit = err[0].split("it needs about ")[1].split(",")[0].split()
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert abs(float(number) * scale - full.bytes) <= scale / 20, (err[0], full.bytes)
    assert not (out / "model").exists() and not (out / "report.json").exists()
    assert checkpoints.latest(str(out)) is not None
    monkeypatch.setattr(export, "export_trained", real_export)
    assert train_in_process(args_of(files, out, resume=True)) == 0
    assert (out / "model").is_dir() and (out / "report.json").is_file()
    assert_same_run(read_log(out), straight_run(files, "plain"))


def test_another_os_error_during_a_save_is_one_line(files, tmp_path, capsys, monkeypatch):
    """A write the system refuses for another reason (permissions, I/O) ends in one line, never a traceback."""
    import errno

    real_write = checkpoints._write_file

    def refused(path, write):
        if "step-00000008.tmp" in path:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        real_write(path, write)

    monkeypatch.setattr(checkpoints, "_write_file", refused)
    assert train_in_process(args_of(files, tmp_path / "run")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("laet-fast train: error: [Errno 13] Permission denied: "), err


def test_a_checkpoint_file_that_cannot_be_read_is_damage(files, tmp_path, capsys, monkeypatch):
    """An I/O error while verifying the newest checkpoint names the file; the run resumes from the one before."""
    out = tmp_path / "run"
    assert train_in_process(args_of(files, out)) == 0
    shutil.rmtree(out / "checkpoints" / "finished")  # as if killed after the step-8 save
    real_digest = checkpoints._file_digest

    def unreadable(path):
        if f"step-00000008{os.sep}trained.safetensors" in path:  # the saved one, not the next save's .tmp
            raise OSError(5, "Input/output error", path)
        return real_digest(path)

    monkeypatch.setattr(checkpoints, "_file_digest", unreadable)
    capsys.readouterr()
    assert train_in_process(args_of(files, out, resume=True)) == 0
    err = capsys.readouterr().err
    assert "step-00000008/trained.safetensors cannot be read (Input/output error)" in err
    assert "resuming from" in err and "step-00000004" in err
