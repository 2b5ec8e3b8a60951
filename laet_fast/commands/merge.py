"""``laet-fast merge``: write the tuned model with chosen blocks SLERPed back toward the base model."""
from __future__ import annotations

import sys

from laet_fast.commands import UsageError
from laet_fast.commands._options import one_line

POLICY_CHOICES = ("conservative", "balanced", "aggressive")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="restore chosen blocks toward the base model by SLERP and write a merged model folder",
        description=(
            "SLERP every tensor of the chosen blocks between base (t=0) and tuned (t=1); every other tensor is "
            "the tuned model's. The output is a transformers folder with the tuned config and tokenizer, written "
            "tensor by tensor. Policies: conservative (top half of the blocks by impact, t=0.25), balanced (top "
            "third, t=0.5), aggressive (top fifth, t=0.75); impact is the weight change, or the general "
            "perplexity change from --scores written by `laet-fast impact --general ... --json` (then only blocks "
            "whose restoration lowers it are picked)."
        ),
    )
    parser.add_argument("--base", required=True, metavar="DIR", help="the base model's save_pretrained folder")
    parser.add_argument("--tuned", required=True, metavar="DIR", help="the fine-tuned model's save_pretrained folder")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--policy", choices=POLICY_CHOICES, help="a named policy derived from the blocks' impact")
    choice.add_argument("--t", metavar="B=T,...", help="explicit block weights, e.g. 3=0.5,7=0.2 (0 = base, 1 = tuned)")
    parser.add_argument("--scores", metavar="JSON", default=None,
                        help="impact scores from `laet-fast impact --json` for --policy (default: weight change)")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the merged model")
    parser.set_defaults(func=run)


def parse_t(text: str) -> dict[int, float]:
    """``"3=0.5,7=0.2"`` -> ``{3: 0.5, 7: 0.2}``; range checks are left to ``restore``."""
    t = {}
    for item in text.split(","):
        block, sep, value = item.strip().partition("=")
        try:
            if not sep:
                raise ValueError
            index, weight = int(block), float(value)
        except ValueError:
            raise UsageError(f"--t {text!r}: write block=t pairs separated by commas, e.g. 3=0.5,7=0.2.") from None
        if index in t:
            raise UsageError(f"--t {text!r} names block {index} twice.")
        t[index] = weight
    return t


def run(args) -> int:
    t = parse_t(args.t) if args.t is not None else None
    if args.scores is not None and args.policy is None:
        raise UsageError("--scores only goes with --policy.")

    from laet_fast.merge import restore
    from laet_fast.scores import LayerScores

    try:
        scores = LayerScores.from_json(args.scores) if args.scores is not None else None
        applied = restore(args.base, args.tuned, out=args.out, policy=args.policy, t=t, scores=scores)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    summary = ", ".join(f"{block}={weight:g}" for block, weight in applied.items()) or "none (a copy of tuned)"
    print(f"blocks restored (t): {summary}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
