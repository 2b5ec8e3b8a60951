"""Write a merged checkpoint: chosen blocks pulled back toward the base model by SLERP (SPEAR-MM).

A block with a ``t`` gets every floating tensor SLERPed between base (t=0) and tuned (t=1) with
``laet_fast.kernels.slerp.slerp``; every other tensor is the tuned model's. The output is a
standard transformers folder (the tuned model's config, tokenizer and other files, its weights
sharded as the tuned checkpoint was), written tensor by tensor into a temporary folder that is
renamed to ``out`` only once complete.

Named policies rank the candidate blocks by impact, then SLERP the top ``fraction`` of all blocks
(rounded up; fewer when fewer are candidates) with one ``t`` and leave the rest tuned:

* with ``general_ppl_delta`` in the scores, the candidates are the blocks whose restoration alone
  lowers general perplexity, most negative first (the general-critical ones); otherwise the
  blocks that changed, by ``weight_rel_change``, most changed first. A block that did not change
  or whose restoration does not help is never picked;
* ``conservative``: the top half of the blocks, t = 0.25 (strong pull toward base);
* ``balanced``: the top third, t = 0.5;
* ``aggressive``: the top fifth, t = 0.75 (keeps the most domain change).
"""
from __future__ import annotations

import json
import math
import os
import shutil

from laet_fast import atomic
from laet_fast.merge.checkpoint import INDEX_FILE, Checkpoint, SafetensorsWriter, check_compatible, check_finite
from laet_fast.scores import LayerScores

POLICIES = {"conservative": (1 / 2, 0.25), "balanced": (1 / 3, 0.5), "aggressive": (1 / 5, 0.75)}


def policy_t(scores: LayerScores, policy: str) -> dict[int, float]:
    """``{block index: t}`` of a named policy (module docstring) from ``layer_impact`` scores."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)} or give t={{block: t}}.")
    fraction, t = POLICIES[policy]
    if "general_ppl_delta" in scores:
        delta = scores["general_ppl_delta"]
        order = sorted((i for i in range(scores.num_layers) if delta[i] < 0), key=lambda i: delta[i])
    elif "weight_rel_change" in scores:
        change = scores["weight_rel_change"]
        order = sorted((i for i in range(scores.num_layers) if change[i] > 0), key=lambda i: -change[i])
    else:
        raise ValueError("policies need layer_impact scores (weight_rel_change or general_ppl_delta).")
    return {index: t for index in sorted(order[:math.ceil(fraction * scores.num_layers)])}


def _check_t(t: dict, num_blocks: int) -> dict[int, float]:
    checked = {}
    for block, value in t.items():
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < num_blocks:
            raise ValueError(f"t names block {block!r}; blocks are the integers 0..{num_blocks - 1}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"t for block {block} is {value!r}; it must be a number in [0, 1] (0 = base, 1 = tuned).")
        checked[block] = float(value)
    return checked


def _check_out(out: str, inputs: tuple[str, ...]) -> None:
    target = os.path.realpath(out)
    for folder in inputs:
        if target == os.path.realpath(folder):
            raise ValueError(f"out {out} is one of the input folders; a merge never overwrites its inputs.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"out {out} exists and is not an empty folder; give a new folder.")


def _is_weight_file(name: str) -> bool:
    """The tuned folder's weight files, which the merge writes anew instead of copying."""
    return (name.endswith(".safetensors") or name == INDEX_FILE
            or (name.startswith("pytorch_model") and name.endswith(".bin")))


def restore(base: str, tuned: str, *, out: str, policy: str | None = None, t: dict[int, float] | None = None,
            scores: LayerScores | None = None) -> dict[int, float]:
    """Write ``out``: the tuned model with chosen blocks SLERPed toward the base model.

    Args:
        base, tuned: save_pretrained folders (safetensors, single or sharded) of one architecture.
        out: a new (or empty) folder, not an input.
        policy: "conservative", "balanced" or "aggressive" (module docstring), derived from
            ``scores`` or, when None, from the weight metrics of ``layer_impact(base, tuned)``.
        t: instead of a policy, ``{block index: t}`` with t in [0, 1] (0 = base block, 1 = tuned).
        scores: ``layer_impact`` scores for the policy (e.g. with general_ppl_delta).

    Returns the ``{block index: t}`` applied. Merged tensors keep the tuned checkpoint's dtype;
    memory holds one tensor of each model (plus the result) at a time.

    Raises:
        ValueError: neither or both of policy and t; t outside [0, 1] or a block out of range;
        checkpoints of different architectures or shapes (first differing tensor named);
        non-finite weights (tensor named); ``out`` is an input or a non-empty folder.
    """
    from laet_fast.kernels.slerp import slerp

    if (policy is None) == (t is None):
        raise ValueError("give exactly one of policy= (conservative, balanced, aggressive) and t={block: t}.")
    _check_out(out, (base, tuned))
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    check_compatible(base_ckpt, tuned_ckpt)
    stack, blocks = tuned_ckpt.blocks()
    if policy is not None:
        if scores is None:
            from laet_fast.merge.impact import layer_impact

            scores = layer_impact(base, tuned)
        if scores.num_layers != len(blocks):
            raise ValueError(f"scores have {scores.num_layers} layers but the checkpoints {len(blocks)} blocks.")
        t = policy_t(scores, policy)
    t = _check_t(t, len(blocks))
    block_of = {name: index for index, names in blocks.items() for name in names}

    # Written into a temporary folder beside `out`, renamed when complete; one left by an earlier killed merge
    # into the same `out` is removed first, and this one is removed if the merge fails.
    with atomic.folder(out) as staging:
        for file in tuned_ckpt.files:
            names = [name for name, info in tuned_ckpt.tensors.items() if info.file == file]
            writer = SafetensorsWriter(os.path.join(staging, file),
                                       [(n, tuned_ckpt.tensors[n].dtype, tuned_ckpt.tensors[n].shape) for n in names],
                                       metadata=tuned_ckpt.metadata[file])
            for name in names:
                tensor = tuned_ckpt.read(name)
                check_finite(tensor, name, tuned)
                weight = t.get(block_of.get(name))
                if weight is not None and tensor.dtype.is_floating_point:
                    base_tensor = base_ckpt.read(name)
                    check_finite(base_tensor, name, base)
                    tensor = slerp(base_tensor, tensor, weight, out_dtype=tensor.dtype)
                    del base_tensor
                writer.write(name, tensor)
                del tensor
            writer.close()
        if len(tuned_ckpt.files) > 1:
            weight_map = {name: info.file for name, info in tuned_ckpt.tensors.items()}
            total = sum(info.nbytes for info in tuned_ckpt.tensors.values())
            with open(os.path.join(staging, INDEX_FILE), "w", encoding="utf-8") as handle:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
        for name in os.listdir(tuned):
            if os.path.isfile(os.path.join(tuned, name)) and not _is_weight_file(name):
                shutil.copy2(os.path.join(tuned, name), os.path.join(staging, name))
    return t
