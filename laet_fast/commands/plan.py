"""``laet-fast plan``: predict training memory and how many blocks fit in a GPU budget."""
from __future__ import annotations

import json
import os

from laet_fast.cli import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict peak training memory and how many layers fit in a budget",
        description="Predict the peak GPU memory of layer-selective training (the last k blocks trained, the rest "
                    "frozen) and answer how many blocks fit in a memory budget. Weights are not loaded: the "
                    "model's config is enough.",
    )
    parser.add_argument("--model", required=True,
                        help="a built-in shape (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, smollm2-135m), a model "
                             "folder with config.json, or a .gguf file")
    parser.add_argument("--budget-gb", type=float, default=None, help="GPU memory budget in GiB")
    parser.add_argument("--k", type=int, default=None,
                        help="number of last blocks to train (default: the most that fit in --budget-gb)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--quantize", default="none", help="frozen blocks' storage: nf4, fp4, int8 or none")
    parser.add_argument("--optimizer", default="adamw", help="adamw or adamw8bit")
    parser.add_argument("--dtype", default="bf16", help="training dtype: bf16, fp16 or fp32")
    parser.add_argument("--attn", default="sdpa", help="attention implementation: sdpa or eager")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.set_defaults(func=run)


def _config(model: str):
    from laet_fast.memory import MODEL_SHAPES, shape_config

    if model.lower() in MODEL_SHAPES:
        return shape_config(model)
    if not os.path.exists(model):
        raise UsageError(f"--model {model!r} is neither a built-in shape ({', '.join(MODEL_SHAPES)}) nor an "
                         f"existing folder or .gguf file.")
    from laet_fast.loading import load_config

    try:
        return load_config(model)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read a model config from {model!r}: {error}") from error


def run(args) -> int:
    from laet_fast.memory import GIB, block_shape, max_layers_for_budget, plan_memory

    if args.budget_gb is None and args.k is None:
        raise UsageError("give --budget-gb (how many blocks fit?) and/or --k (memory for training the last k blocks).")
    if args.budget_gb is not None and not args.budget_gb > 0:
        raise UsageError(f"--budget-gb must be positive, got {args.budget_gb}.")
    config = _config(args.model)
    options = dict(seq_len=args.seq_len, batch_size=args.batch_size, quantize_frozen=args.quantize.lower(),
                   optimizer=args.optimizer.lower(), dtype=args.dtype, attn_implementation=args.attn.lower())
    try:
        num_layers = block_shape(config).num_layers
        if args.k is not None and not 1 <= args.k <= num_layers:
            raise UsageError(f"--k {args.k} is out of range: the model has {num_layers} blocks (1..{num_layers}).")
        fit = None
        if args.budget_gb is not None:
            fit = max_layers_for_budget(config, args.budget_gb, **options)
        k = args.k if args.k is not None else max(fit, 1)
        plan = plan_memory(config, k, **options)
        plans = {k: plan}
        if fit is not None and fit < num_layers:
            plans[fit + 1] = plan_memory(config, fit + 1, **options)
    except ValueError as error:
        raise UsageError(str(error)) from error

    if args.json:
        data = {"plan": plan.to_dict(), "budget_gb": args.budget_gb, "max_layers": fit}
        print(json.dumps(data, indent=2))
        return 0
    print(plan)
    if fit is None:
        return 0
    budget = f"{args.budget_gb:g} GiB"
    if fit == 0:
        print(f"\nHow many layers fit in {budget}: 0. Even one trained block needs {plans[1].total / GIB:.2f} GiB "
              f"(frozen weights alone {plans[1].frozen_weights / GIB:.2f} GiB); shorten --seq-len, lower "
              f"--batch-size, use --quantize nf4 / --optimizer adamw8bit, or a bigger GPU.")
        return 0
    answer = f"\nHow many layers fit in {budget}: {fit} of {num_layers} (train the last {fit})"
    if fit < num_layers:
        answer += f"; {fit + 1} would need {plans[fit + 1].total / GIB:.2f} GiB."
    else:
        answer += ": the whole block stack fits."
    print(answer)
    if args.k is not None:
        verdict = "fits" if plan.total <= args.budget_gb * GIB else "does NOT fit"
        print(f"--k {args.k} {verdict} in {budget} ({plan.total / GIB:.2f} GiB).")
    return 0
