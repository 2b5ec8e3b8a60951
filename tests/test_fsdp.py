"""FSDP2 over a selection, 2 CPU processes (gloo, torchrun): the trained blocks are sharded, the NF4 frozen
blocks stay whole, and training matches one process on the global batch step by step."""
import math

import pytest
import torch

from test_distributed import close, torchrun
from tiny_models import tiny_model

pytest.importorskip("bitsandbytes")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


@pytest.mark.slow
def test_fsdp2_shards_the_trained_blocks_and_matches_one_process(tmp_path):
    import ddp_fsdp_worker

    ranks = torchrun("ddp_fsdp_worker.py", tmp_path)
    single = ddp_fsdp_worker.run_fsdp(0, 1)
    for run in ranks:
        assert close(run["losses"], single["losses"], rel=1e-5), (run["losses"], single["losses"])
        # The gathered trained weights after 5 steps: the same as one process's.
        assert math.isclose(run["trained_abs_sum"], single["trained_abs_sum"], rel_tol=1e-6)
        assert math.isclose(run["trained_sum"], single["trained_sum"], rel_tol=1e-5, abs_tol=1e-4)
        # Trained blocks are DTensor shards (half of each on a rank, Adam's state too); frozen blocks stay NF4, whole.
        for index in ddp_fsdp_worker.TRAINED:
            assert run["param_types"][str(index)] == ["DTensor"]
        assert run["frozen_modes"] == {"0": ["nf4"], "2": ["nf4"]}
        assert "Params4bit" in run["param_types"]["0"]
        assert run["full_numel"] == single["full_numel"] and run["local_numel"] * 2 == run["full_numel"]
        assert run["state_numel"] * 2 == single["state_numel"]
        # Sharding the NF4 blocks too fails at the first forward: why only the trained blocks are sharded.
        assert run["naive_error"] is not None and "quant_state is required" in run["naive_error"]
    assert ranks[0]["trained_sum"] == ranks[1]["trained_sum"]


def test_refusals_name_the_fix():
    from laet_fast import Selection
    from laet_fast.apply import apply_selection
    from laet_fast.integrations import fully_shard_selection

    model = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="apply_selection"):
        fully_shard_selection(model)
    apply_selection(model, [1], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"selection \[2\] is not the one applied"):
        fully_shard_selection(model, Selection(layers=(2,), num_layers=3))
    with pytest.raises(NotImplementedError, match="ignored_params"):
        fully_shard_selection(model, ignored_params=set())


@pytest.mark.slow
def test_deepspeed_zero_trains_a_selection_with_nf4_frozen_blocks(tmp_path):
    """ZeRO-1 and ZeRO-3 (2 CPU processes): both train; ZeRO-3 partitions the NF4 weights too and still runs them,
    as it gathers a partition back into the same Params4bit, which keeps its quant_state."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    from test_distributed import HERE

    runs = {}
    for stage in (1, 3):
        env = {**os.environ, "LAET_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               os.path.join(HERE, "ddp_deepspeed_worker.py"), str(tmp_path), str(stage)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        runs[stage] = [json.load(open(tmp_path / f"rank{r}_stage{stage}.json")) for r in range(2)]
    for rank in range(2):
        zero1, zero3 = runs[1][rank], runs[3][rank]
        assert close(zero1["losses"], zero3["losses"], rel=1e-6), (zero1["losses"], zero3["losses"])
        assert zero1["losses"][-1] < zero1["losses"][0]
        assert zero3["frozen"]["type"] == "Params4bit" and zero3["frozen"]["zero"]
        assert zero3["frozen"]["local_numel"] == 0 < zero3["frozen"]["numel"]  # partitioned, released after use
        assert zero3["trained"]["local_numel"] == 0 < zero3["trained"]["numel"]
        assert zero1["frozen"]["local_numel"] == zero1["frozen"]["numel"]  # ZeRO-1 partitions optimizer state only
