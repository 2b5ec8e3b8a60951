"""``laet-fast plan``: predict training memory and how many blocks fit in a GPU budget.

A built-in shape is planned from its numbers alone (no torch / transformers import, so the answer is
instant); a model folder or .gguf file needs transformers to read its config.
"""
from __future__ import annotations

import json
import math
import os

from laet_fast.commands import UsageError
from laet_fast.memory import ATTENTION, MODEL_SHAPES
from laet_fast.names import OPTIMIZERS, QUANT_MODES

DTYPES = ("bf16", "fp16", "fp32")


def _block_list(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r}: give comma-separated block indices, e.g. --layers 3,7,12.") from None
    if not layers:
        raise UsageError("--layers is empty; give comma-separated block indices, e.g. --layers 3,7,12.")
    return layers


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict peak training memory and how many layers fit in a budget",
        description="Predict the peak GPU memory of layer-selective training (the last k blocks, or any set of "
                    "blocks, trained; the rest frozen) and answer how many blocks fit in a memory budget. Weights "
                    "are not loaded: the model's config is enough.",
    )
    parser.add_argument("--model", required=True,
                        help=f"a built-in shape ({', '.join(MODEL_SHAPES)}), a model folder with config.json, or a "
                             f".gguf file")
    parser.add_argument("--budget-gb", type=float, default=None, help="GPU memory budget in GiB (finite, > 0)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--k", type=int, default=None,
                       help="number of last blocks to train (default: the most that fit in --budget-gb)")
    which.add_argument("--layers", type=str, default=None, metavar="I,J,...",
                       help="train exactly these blocks, e.g. 3,7,12 (a selection need not be contiguous); the "
                            "backward pass stops at the lowest")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per optimizer step (default: 1)")
    parser.add_argument("--quantize", type=str.lower, default="none", choices=(*QUANT_MODES, "none"),
                        help="storage of the frozen blocks' linear weights (default: none)")
    parser.add_argument("--optimizer", type=str.lower, default="adamw", choices=OPTIMIZERS,
                        help="adamw (torch) or adamw8bit (bitsandbytes) (default: adamw)")
    parser.add_argument("--dtype", type=str.lower, default="bf16", choices=DTYPES,
                        help="training dtype (default: bf16)")
    parser.add_argument("--attn", type=str.lower, default="sdpa", choices=ATTENTION,
                        help="attention implementation (default: sdpa)")
    parser.add_argument("--loss-chunk", type=int, default=0, metavar="TOKENS",
                        help="the LM head's loss this many tokens at a time, as laet-fast train --task lm/sft does "
                             "(256 there); default 0: the full logits a plain transformers loop keeps")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.set_defaults(func=run)


def _config(model: str):
    """A config dict for a built-in shape (no transformers needed), else the file's or folder's config."""
    if model.lower() in MODEL_SHAPES:
        return {**MODEL_SHAPES[model.lower()], "model_type": "llama", "name_or_path": model.lower()}
    if not os.path.exists(model):
        raise UsageError(f"--model {model!r} is neither a built-in shape ({', '.join(MODEL_SHAPES)}) nor an "
                         f"existing folder or .gguf file.")
    from laet_fast.loading import load_config

    try:
        config = load_config(model)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read a model config from {model!r}: {error}") from error
    if os.path.isfile(model):
        config.name_or_path = model  # transformers names the folder; the plan names the file it read
    return config


def run(args) -> int:
    from laet_fast.memory import GIB, block_shape, max_layers_for_budget, plan_memory

    if args.budget_gb is None and args.k is None and args.layers is None:
        raise UsageError("give --budget-gb (how many blocks fit?) and/or --k / --layers (memory for training "
                         "those blocks).")
    if args.budget_gb is not None and not (math.isfinite(args.budget_gb) and args.budget_gb > 0):
        raise UsageError(f"--budget-gb must be a finite positive number of GiB, got {args.budget_gb}.")
    layers = _block_list(args.layers) if args.layers is not None else None
    config = _config(args.model)
    if args.loss_chunk < 0:
        raise UsageError(f"--loss-chunk must be >= 0 tokens (0: the plain loss), got {args.loss_chunk}.")
    options = dict(seq_len=args.seq_len, batch_size=args.batch_size, quantize_frozen=args.quantize,
                   optimizer=args.optimizer, dtype=args.dtype, attn_implementation=args.attn,
                   loss_chunk=args.loss_chunk)
    try:
        num_layers = block_shape(config).num_layers
        if args.k is not None and not 1 <= args.k <= num_layers:
            raise UsageError(f"--k {args.k} is out of range: the model has {num_layers} blocks (1..{num_layers}).")
        fit = None
        if args.budget_gb is not None:
            fit = max_layers_for_budget(config, args.budget_gb, **options)
        asked = layers if layers is not None else args.k
        plan = plan_memory(config, asked if asked is not None else max(fit, 1), **options)
        next_plan = plan_memory(config, fit + 1, **options) if fit is not None and fit < num_layers else None
    except ValueError as error:
        raise UsageError(str(error)) from error

    fits = None if asked is None or args.budget_gb is None else plan.total <= args.budget_gb * GIB
    if args.json:
        data = {"plan": plan.to_dict(), "budget_gb": args.budget_gb, "max_layers": fit, "fits": fits}
        print(json.dumps(data, indent=2))
        return 0
    print(plan)
    if fit is None:
        return 0
    budget = f"{args.budget_gb:g} GiB"
    if fit == 0:
        print(f"\nHow many layers fit in {budget}: 0. Even one trained block needs {next_plan.total / GIB:.2f} GiB "
              f"(frozen weights alone {next_plan.frozen_weights / GIB:.2f} GiB); shorten --seq-len, lower "
              f"--batch-size, use --quantize nf4 / --optimizer adamw8bit, or a bigger GPU.")
    else:
        answer = f"\nHow many layers fit in {budget}: {fit} of {num_layers} (train the last {fit})"
        if next_plan is not None:
            answer += f"; {fit + 1} would need {next_plan.total / GIB:.2f} GiB."
        else:
            answer += ": the whole block stack fits."
        print(answer)
    if fits is not None:
        what = f"--k {args.k}" if args.k is not None else f"--layers {args.layers}"
        print(f"{what} {'fits' if fits else 'does NOT fit'} in {budget} ({plan.total / GIB:.2f} GiB).")
    return 0
