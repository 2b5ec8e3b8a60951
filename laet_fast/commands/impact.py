"""``laet-fast impact``: how much fine-tuning changed each block, and what restoring it alone would do."""
from __future__ import annotations

import sys

from laet_fast.atomic import write_file
from laet_fast.commands import UsageError
from laet_fast.commands._options import check_at_least_one, check_output, check_plot, one_line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "impact",
        help="per-block impact of fine-tuning: weight change, and optionally the effect of restoring each block",
        description=(
            "Compare a base and a tuned checkpoint block by block (only one block of each in memory): relative "
            "Frobenius change, cosine, SNR-weighted change and top singular-value drop of the block's matrices. "
            "With --general/--domain text files, also the perplexity change on general text and the loss change "
            "on domain text when each block alone is restored to the base weights."
        ),
    )
    parser.add_argument("--base", required=True, metavar="DIR", help="the base model's save_pretrained folder")
    parser.add_argument("--tuned", required=True, metavar="DIR", help="the fine-tuned model's save_pretrained folder")
    parser.add_argument("--general", metavar="FILE", default=None,
                        help="general text (.csv, .tsv, .json, .jsonl, .parquet or .txt)")
    parser.add_argument("--domain", metavar="FILE", default=None,
                        help="domain text (.csv, .tsv, .json, .jsonl, .parquet or .txt)")
    parser.add_argument("--text-column", default="text",
                        help="csv column / jsonl key holding the texts (default: text)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts read from each file (default: 64)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (default: 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N for the text scoring")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the scores to this JSON file")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="also plot the scores to this PNG file")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_at_least_one(max_texts=args.max_texts, max_length=args.max_length)
    check_output(args.json, "--json")
    check_plot(args.plot)

    from laet_fast.merge import layer_impact

    try:
        scores = layer_impact(args.base, args.tuned, general_data=args.general, domain_data=args.domain,
                              device=args.device, max_texts=args.max_texts, max_length=args.max_length,
                              text_column=args.text_column)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    print(scores.table())
    # Written beside their names and renamed when complete: a kill leaves no 0-byte file.
    if args.json is not None:
        write_file(args.json, scores.to_json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        write_file(args.plot, lambda path: scores.plot(path, title="Fine-tuning impact per block"))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
