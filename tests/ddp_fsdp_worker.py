"""FSDP2 over a selection (tests/test_fsdp.py): one rank under torchrun, or the single-process reference.

Run as ``torchrun ... ddp_fsdp_worker.py OUT``, each rank writes rank<N>.json; ``run_fsdp(0, 1)`` in the test
process trains the same model on the whole global batch without FSDP.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ddp_cases  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

TRAINED = (1, 3)


def run_fsdp(rank, world):
    """Blocks 1 and 3 of a 4-block llama trained (sharded with world > 1), blocks 0 and 2 frozen in NF4,
    ``ddp_cases.train_batches()`` split by rank. Returns per-step global losses and what was sharded."""
    from laet_fast.apply import apply_selection
    from laet_fast.layers import find_layers

    torch.manual_seed(0)
    model = tiny_model("llama", seed=5, num_hidden_layers=4).train()
    apply_selection(model, list(TRAINED), quantize_frozen="nf4", dtype=torch.float32)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from laet_fast.integrations import fully_shard_selection

        fully_shard_selection(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in ddp_cases.train_batches():
        loss = model(**ddp_cases.shard(batch, rank, world)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(ddp_cases.mean_over_ranks(loss, world))
    stack = find_layers(model)
    sharded, local, full = {}, 0, 0
    for index, block in enumerate(stack):
        kinds = {type(p).__name__ for p in block.parameters()}
        sharded[index] = sorted(kinds)
        for p in block.parameters():
            if p.requires_grad:
                local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                full += p.numel()
    trained = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                         for index in TRAINED for p in stack[index].parameters()])
    state_numel = sum(t.to_local().numel() if hasattr(t, "to_local") else t.numel()
                      for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    from laet_fast.quantize import quant_modes

    return dict(losses=losses, param_types=sharded, local_numel=local, full_numel=full, state_numel=state_numel,
                frozen_modes={i: sorted(quant_modes(stack[i])) for i in range(len(stack)) if i not in TRAINED},
                trained_abs_sum=float(trained.double().abs().sum()), trained_sum=float(trained.double().sum()))


def naive_error(world):
    """What sharding every block, NF4 ones included, does at the first forward.

    That is the finding this module works around.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from laet_fast.apply import apply_selection
    from laet_fast.layers import find_layers

    model = tiny_model("llama", seed=5, num_hidden_layers=4).train()
    apply_selection(model, list(TRAINED), quantize_frozen="nf4", dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for block in find_layers(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = ddp_cases.train_batches()[0]
    try:
        model(**batch).loss.backward()
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return None


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = run_fsdp(rank, world)
    result["naive_error"] = naive_error(world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
