"""Several processes, one choice: probe accumulators summed across ranks, and DDP kept to the trained set.

Under ``torchrun`` / ``accelerate launch`` every rank scores the layers on its own shard of the
batches. Left alone, ranks would choose different layers and train different blocks. So before
scores are formed the accumulators are all-reduced (every function here is a no-op without an
initialised process group of more than one rank):

* ``LayerProbe``'s hidden statistics are sums over tokens (and one max): summed across ranks they
  are exactly the statistics of the global batch (:func:`all_reduce_hidden_stats`);
* ``GradNormRecorder``'s per-pass squared norms: each rank's backward pass is one pass of its own
  micro-batch, so the summed totals are those of one process running every rank's micro-batch as
  its own backward pass (:func:`all_reduce_sum`); the norm of the averaged gradient would need the
  whole gradient of every frozen block, which the recorder never forms;
* a probe sweep's features (LAET): :func:`gather_rows` concatenates every rank's rows, so each rank
  trains the probes on the global set; :func:`broadcast_object` hands rank 0's choice to all.

Every rank must call these collectives (``LayerProbe.scores()`` included) in the same order.

DDP buckets every parameter that requires grad when it is built; frozen afterwards, a parameter
would still hold bucket memory, and the replaced weights of a quantized block would stay alive in
the reducer. :func:`rebuild_ddp` rebuilds the reducer over the parameters trainable now, as DDP
itself does when it is unpickled, so frozen parameters are outside its buckets, re-selection needs
no ``find_unused_parameters``, and the static graph (if set) is learnt again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) without a process group of several ranks."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where the default backend takes its tensors: the current GPU for NCCL, the CPU for gloo."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` (any shape, float32/float64) summed over ranks; a new tensor on ``values``' device."""
    if not is_distributed():
        return values
    buf = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device)


def all_reduce_hidden_stats(stats: torch.Tensor) -> torch.Tensor:
    """A ``[num_layers, len(STAT_FIELDS)]`` float32 statistics table summed over ranks (``absmax``: max).

    The result is the table of the global batch: every field is a sum over tokens but ``absmax``.
    """
    if not is_distributed():
        return stats
    from .kernels.hidden_stats import STAT_FIELDS

    absmax = STAT_FIELDS.index("absmax")
    summed = all_reduce_sum(stats)
    peak = stats[:, absmax].detach().to(_collective_device(), copy=True)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    summed[:, absmax] = peak.to(summed.device)
    return summed


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` ([n_rank, ...], n_rank may differ) concatenated in rank order, on every rank.

    For a probe sweep's pooled features ([N, L, H] float32) and labels ([N] int64), so that each rank
    trains its probes on the global set.
    """
    if not is_distributed():
        return rows
    device = _collective_device()
    count = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:rows.shape[0]] = rows.detach().to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(rows.device)


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (a Selection, a dict of scores...); ``obj`` unchanged alone."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rebuild_ddp(ddp: nn.parallel.DistributedDataParallel) -> nn.parallel.DistributedDataParallel:
    """Rebuild ``ddp``'s gradient buckets over the parameters that require grad now, in place.

    Call on every rank after ``apply_selection`` (a first selection or a re-selection), between
    optimizer steps, with the selection already applied the same way everywhere. The same steps as
    ``DistributedDataParallel.__setstate__`` (the reducer is built again; registered communication
    hooks are registered again on it). Parameters are not broadcast again: ranks that applied the
    same selection to the same weights hold the same parameters.

    Raises:
        ValueError: no parameter requires grad.
        NotImplementedError: DDP's mixed precision, its Python reducer or delayed all-reduce
            parameters, whose extra state this rebuild does not carry over.
    """
    if getattr(ddp, "mixed_precision", None) is not None or getattr(ddp, "_use_python_reducer", False) \
            or getattr(ddp, "_delay_all_reduce_params", None):
        raise NotImplementedError("rebuild_ddp: DDP's mixed_precision, python reducer and delayed all-reduce "
                                  "parameters are not supported; wrap the model after apply_selection instead.")
    if not any(p.requires_grad for p in ddp.module.parameters()):
        raise ValueError("rebuild_ddp: no parameter of the model requires grad; apply a non-empty selection.")
    ignore = ddp.parameters_to_ignore
    # The list DDP keeps of every parameter would keep the weights a quantized block replaced alive.
    ddp._module_parameters = [p for name, p in ddp.module.named_parameters() if name not in ignore]
    ddp._assign_modules_buffers()
    params, sparse = ddp._build_params_for_reducer()
    ddp._ddp_init_helper(params, sparse, ddp._build_debug_param_to_name_mapping(params), ddp.static_graph)
    if ddp.static_graph:
        ddp._static_graph_delay_allreduce_enqueued = False
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    hooks, ddp._comm_hooks = ddp._comm_hooks, []
    for hook, state in hooks:
        ddp.register_comm_hook(state, hook)
    return ddp

