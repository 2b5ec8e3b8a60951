"""``laet-fast score``: score every transformer block of a model on a few batches of text."""
from __future__ import annotations

import inspect
import math
import os
import sys

from laet_fast.commands import UsageError
from laet_fast.commands._options import (add_device_arguments, add_model_and_data_arguments, check_at_least_one,
                                         check_output, check_plot, load_model, one_line)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score every transformer block on a few batches of text",
        description=(
            "Run the model over a few batches of text with a LayerProbe and print, per transformer block, "
            "block_influence (1 - mean cosine between the block's input and output), relative_change, "
            "act_rms and act_absmax (and with --grad-norms, grad_norm: the per-block gradient norm of the "
            "language-modelling loss, which the default grad_norm selection needs). Without --model/--data "
            "the demo model (SmolLM2-135M) and the demo data (Rotten Tomatoes review sentences) are used."
        ),
    )
    add_model_and_data_arguments(
        parser, model_help="save_pretrained folder or .gguf file (default: the demo SmolLM2-135M)",
        data_help=".csv, .tsv, .json, .jsonl, .parquet or .txt (one text per line), compressed too, or a hub "
                  "dataset name (default: the demo Rotten Tomatoes sentences)")
    parser.add_argument("--batches", type=int, default=8, help="number of batches to run (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per batch (default: 8)")
    parser.add_argument("--max-length", type=int, default=64,
                        help="tokens per text, longer ones are truncated (default: 64; at most the model's "
                             "max_position_embeddings)")
    parser.add_argument("--grad-norms", action="store_true",
                        help="also score per-block gradient norms of the next-token loss (a backward pass per "
                             "batch; no weight gradient is stored)")
    parser.add_argument("--layers", metavar="PATH", default=None,
                        help="dotted path of the block list (e.g. model.layers), when not found automatically")
    add_device_arguments(parser)
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write the scores to this JSON file, with what was scored (model, data, batches, "
                             "max length, version, date)")
    parser.add_argument("--plot", metavar="OUT.png", default=None,
                        help="also plot the scores to this file; its suffix sets the format "
                             "(.png, .jpg, .pdf, .svg...)")
    parser.set_defaults(func=run)


def _metadata(args, device, batches: int, max_length: int, texts: int) -> dict:
    """What was scored, for the JSON file: enough to tell two score files apart and to redo one."""
    from datetime import datetime, timezone

    from laet_fast import __version__
    from laet_fast.loading import demo_data_path, demo_model_path

    return {
        "model": os.path.abspath(args.model) if args.model else demo_model_path(),
        "data": os.path.abspath(args.data) if args.data else demo_data_path(),
        "text_column": args.text_column if args.data else "text",
        "texts": texts, "batches": batches, "batch_size": args.batch_size, "max_length": max_length,
        "grad_norms": bool(args.grad_norms), "dtype": args.dtype, "device": str(device),
        "laet_fast_version": __version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run(args) -> int:
    check_at_least_one(batches=args.batches, batch_size=args.batch_size, max_length=args.max_length)
    check_output(args.json, "--json")
    check_plot(args.plot)

    # Heavy imports only once the arguments are known to be sane.
    import torch
    from tqdm.auto import tqdm

    from laet_fast.data import load_texts
    from laet_fast.loading import iter_batches
    from laet_fast.probe import LayerProbe

    try:
        texts = load_texts(args.data, column=args.text_column, limit=args.batches * args.batch_size,
                           encoding=args.encoding)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    model, tokenizer, device = load_model(args.model, args)

    try:
        probe = LayerProbe(model, layers=args.layers, grad_norms=args.grad_norms)
    except ValueError as err:
        raise UsageError(one_line(err)) from None

    max_length = args.max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        print(f"note: --max-length {max_length} is more than the model's {positions} positions; using "
              f"{positions}.", file=sys.stderr)
        max_length = positions
    num_batches = math.ceil(len(texts) / args.batch_size)
    if num_batches < args.batches:
        print(f"note: the data holds {len(texts)} texts, so {num_batches} of the {args.batches} batches asked "
              f"were run.", file=sys.stderr)
    # Scoring needs no KV cache; without gradient norms not the logits of every position either (a
    # [batch, seq, vocab] tensor): skip them when the model's forward lets us say so.
    accepted = inspect.signature(model.forward).parameters
    wanted = (("use_cache", False),) + (() if args.grad_norms else (("logits_to_keep", 1),))
    extra = {key: value for key, value in wanted if key in accepted}
    model.requires_grad_(False)  # gradient norms are measured without storing any weight gradient
    batches = iter_batches(tokenizer, texts, args.batch_size, max_length, device=device)
    with probe, torch.set_grad_enabled(args.grad_norms):
        for batch in tqdm(batches, total=num_batches, desc="scoring", unit="batch", file=sys.stderr):
            if args.grad_norms:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                model(**batch, labels=labels, **extra).loss.backward()
            else:
                model(**batch, **extra)
    scores = probe.scores()
    scores.metadata.update(_metadata(args, device, num_batches, max_length, len(texts)))

    print(scores.table())
    if args.json is not None:
        scores.to_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        scores.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
