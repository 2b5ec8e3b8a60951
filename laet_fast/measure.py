"""Memory measured without a GPU, for checking a memory plan (``laet_fast.memory.plan_memory``) on the CPU.

- ``measure_cpu_peak(fn)``: the peak of live CPU tensor memory while ``fn`` runs, from PyTorch's profiler (the
  CPU counterpart of ``torch.cuda.max_memory_allocated``).
- ``LiveBytes``: the peak bytes of the CPU storages created while it is active, from PyTorch's dispatcher.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def measure_cpu_peak(fn) -> int:
    """Run ``fn()`` and return the peak of live CPU tensor memory above the level at entry, in bytes.

    Read from the PyTorch profiler's allocation trace, and sampled at the end of every operator
    (nested ones included): the CPU counterpart of ``torch.cuda.max_memory_allocated`` for checking a
    plan without a GPU. Sampling at operator ends leaves out the scratch a CPU kernel allocates and
    frees inside one operator without making a tensor of it (oneDNN's reordered weights and fp32
    accumulators of a bf16 matmul), which depends on the CPU's vector extensions and thread count
    (about 5% of a small model's step on an AVX512-BF16 CPU, none with ``ONEDNN_MAX_CPU_ISA=AVX2``);
    the plan models tensors. Every tensor an operator returns, temporaries of composite operators
    included, is live at some operator's end and counted.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # (time, 0, bytes) for an allocation (> 0) or a free (< 0), (time, 1, 0) for an operator's end:
    # at equal times the allocations come first.
    timeline = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":
            timeline.append((event.start_ns(), 0, event.nbytes()))
        else:
            timeline.append((event.end_ns(), 1, 0))
    level = peak = 0
    for _, is_op_end, nbytes in sorted(timeline):
        level += nbytes
        if is_op_end:
            peak = max(peak, level)
    return peak


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created while active (each counted until it is freed).

    Views and in-place results alias an input's storage and count nothing. Only CPU storages are
    counted (on a GPU use ``torch.cuda.max_memory_allocated``).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or key in inputs or storage.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out
