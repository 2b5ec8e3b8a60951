"""``laet-fast probe``: a probe per layer on pooled embeddings; accuracy, F1, and the layers LAET keeps."""
from __future__ import annotations

import sys

from laet_fast.commands import UsageError
from laet_fast.commands._embedding_options import add_embedding_arguments, check_embedding_arguments, embed
from laet_fast.commands._labeled_data import read_labeled
from laet_fast.commands._options import check_output, check_plot, one_line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="probe every layer's pooled embedding for a labelled task",
        description=(
            "Embed labelled texts with every block of the model (pooled per text), train a small classifier "
            "per layer (all at once), and print per layer the held-out accuracy and weighted F1 (with --folds, "
            "their mean and std over folds), and the layers LAET keeps: those no other layer beats on both "
            "by at least --margin standard deviations across layers."
        ),
    )
    add_embedding_arguments(parser, "save_pretrained folder or .gguf file (default: the demo SmolLM2-135M)")
    parser.add_argument("--probe", default="mlp", choices=("mlp", "linear"),
                        help="mlp (H->128->64->C, LAET's default) or linear")
    parser.add_argument("--folds", type=int, default=None, help="k-fold cross-validation instead of one split")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out share per class (default: 0.2)")
    parser.add_argument("--margin", type=float, default=0.5, help="LAET's margin in stds (default: 0.5)")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="write the scores, LAET's choice and the label -> id mapping to this JSON file")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="plot the scores against depth to this file")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_embedding_arguments(args)
    if args.model and len(args.model) > 1:
        raise UsageError("probe takes one --model; use laet-fast fuse to combine models.")
    if args.folds is not None and args.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {args.folds}.")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}.")
    if args.margin < 0:
        raise UsageError(f"--margin must be >= 0, got {args.margin}.")
    check_output(args.json, "--json")
    check_plot(args.plot)

    from laet_fast.embed import probe_layers
    from laet_fast.selection import select_layers

    texts, labels = read_labeled(args)
    model_path = args.model[0] if args.model else None
    emb = embed(model_path, texts, args)
    try:
        scores = probe_layers(emb, labels, probe=args.probe, folds=args.folds, val_fraction=args.val_fraction,
                              seed=args.seed, epochs=args.epochs, progress=True)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    selection = select_layers(scores, strategy="laet", margin=args.margin)
    classes = scores.metadata["classes"]
    scores.metadata.update({"model": model_path or "demo SmolLM2-135M", "data": args.data or "demo Rotten Tomatoes",
                            "label_ids": {str(c): i for i, c in enumerate(classes)},
                            "laet_selection": selection.to_dict()})
    print(scores.table())
    print(f"labels: {', '.join(f'{c!r} -> {i}' for i, c in enumerate(classes))}")
    print(f"LAET keeps layers {list(selection.layers)} (margin {args.margin})")
    if args.json is not None:
        scores.to_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        scores.plot(args.plot, selection=selection)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
