"""Two CPU processes (gloo, torchrun): every rank picks the layers one process picks on the global batch,
and DDP training with a backward cut, NF4 frozen blocks and a re-selection matches one process step by step."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ddp_cases
from laet_fast import select_layers

HERE = os.path.dirname(os.path.abspath(__file__))
pytest.importorskip("bitsandbytes")


def torchrun(script, out_dir, nproc=ddp_cases.WORLD, timeout=240):
    """Run ``script out_dir`` on ``nproc`` CPU processes; each writes rank<N>.json into ``out_dir``."""
    env = {**os.environ, "LAET_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(HERE, script), str(out_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(nproc)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun("ddp_worker.py", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


def close(a, b, rel=1e-5, abs_=1e-7):
    return all(math.isclose(x, y, rel_tol=rel, abs_tol=abs_) for x, y in zip(a, b, strict=True))


def test_every_rank_scores_the_global_batch(ranks):
    from laet_fast import LayerScores

    scores = [LayerScores.from_dict(r["scores"]) for r in ranks]
    hidden = ddp_cases.hidden_scores_on_global_batch()
    grads = ddp_cases.run_scores(micro_batches=ddp_cases.WORLD)
    for s in scores:
        assert s.num_tokens == hidden.num_tokens
        for metric in ("block_influence", "relative_change", "act_rms", "act_absmax"):
            assert close(s[metric], hidden[metric]), metric
        for metric in ("grad_norm", "grad_norm_sq"):
            assert close(s[metric], grads[metric], rel=1e-4), metric
    # Both ranks choose the same layers, and those of one process on the global batch.
    for metric, kwargs in (("block_influence", dict(strategy="top", k=1)), ("grad_norm", dict(strategy="top", k=2)),
                           ("act_rms", dict(strategy="bottom", k=2))):
        chosen = {select_layers(s, metric=metric, **kwargs).layers for s in scores}
        assert chosen == {select_layers(hidden if metric != "grad_norm" else grads, metric=metric, **kwargs).layers}


def test_ddp_training_matches_one_process(ranks):
    runs = [r["training"] for r in ranks]
    single = ddp_cases.run_training()
    # The re-selection moved training to another block, the same on every rank and in one process.
    assert runs[0]["selections"] == runs[1]["selections"] == single["selections"]
    assert runs[0]["selections"][0] != runs[0]["selections"][-1]
    assert runs[0]["left_kept_weights"] and single["left_kept_weights"]
    for run in runs:
        assert close(run["losses"], single["losses"], rel=1e-5), (run["losses"], single["losses"])
        # Only trainable parameters sit in DDP's buckets, after the re-selection too.
        assert run["bucket_bytes"] == run["trainable_bytes"]
    assert runs[0]["trainable_sum"] == runs[1]["trainable_sum"]  # ranks stayed in sync
    assert math.isclose(runs[0]["trainable_abs_sum"], single["trainable_abs_sum"], rel_tol=1e-5)


def test_callback_in_a_ddp_trainer_matches_one_process(ranks, tmp_path):
    import trainer_cases

    runs = [r["trainer"] for r in ranks]
    single = trainer_cases.run_trainer_ddp(0, 1, tmp_path)
    assert runs[0]["selection"] == runs[1]["selection"] == single["selection"]
    for run in runs:
        assert close(run["losses"], single["losses"], rel=1e-5), (run["losses"], single["losses"])
        assert run["bucket_bytes"] == run["trainable_bytes"]  # frozen parameters outside DDP's buckets


def test_collectives_are_no_ops_alone():
    from laet_fast import distributed

    x = torch.randn(3, 5)
    assert not distributed.is_distributed()
    assert distributed.all_reduce_sum(x) is x and distributed.all_reduce_hidden_stats(x) is x
    assert distributed.gather_rows(x) is x and distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_laet_callback_in_a_ddp_trainer_probes_the_global_batch(ranks, tmp_path):
    import trainer_cases

    runs = [r["laet"] for r in ranks]
    single = trainer_cases.run_trainer_laet_ddp(0, 1, tmp_path)
    # Each rank pooled its half of every batch; gathered per batch in rank order, the probes saw the global rows.
    assert runs[0]["selection"] == runs[1]["selection"] == single["selection"]
    for run in runs:
        assert run["scores"]["probe_acc"] == single["scores"]["probe_acc"]
        assert close(run["scores"]["probe_loss"], single["scores"]["probe_loss"], rel=1e-3)
