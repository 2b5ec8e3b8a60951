"""DeepSpeed ZeRO over a selection with NF4 frozen blocks (tests/test_fsdp.py): one rank under torchrun.

``torchrun ... ddp_deepspeed_worker.py OUT STAGE``: block 1 of the tiny llama trained, blocks 0 and 2 in NF4,
``apply_selection`` before ``deepspeed.initialize``; writes rank<N>_stage<STAGE>.json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ddp_cases  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def info(param):
    """Whether ZeRO holds ``param`` and how many of its elements this rank holds now."""
    return {"type": type(param).__name__, "zero": hasattr(param, "ds_id"), "local_numel": param.numel(),
            "numel": getattr(param, "ds_numel", param.numel())}


def main(out_dir, stage):
    dist.init_process_group("gloo")
    import deepspeed

    # On the CPU DeepSpeed compiles a shared-memory all-reduce op at its first initialize (minutes on a
    # small machine); without it, its torch backend all-reduces through the gloo group.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from laet_fast.apply import apply_selection
    from laet_fast.layers import find_layers

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model("llama", seed=1).train()
    apply_selection(model, [1], quantize_frozen="nf4", dtype=torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": ddp_cases.ROWS // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2),
                                      model_parameters=trainable, config=config)
    losses = []
    for batch in ddp_cases.train_batches():
        loss = engine(**ddp_cases.shard(batch, rank, world)).loss
        engine.backward(loss)
        engine.step()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    stack = find_layers(model)
    result = {"losses": losses, "trained": info(stack[1].self_attn.q_proj.weight),
              "frozen": info(stack[0].self_attn.q_proj.weight)}
    with open(os.path.join(out_dir, f"rank{rank}_stage{stage}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
