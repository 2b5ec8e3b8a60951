"""``laet-fast fuse``: one head over chosen layers of one or several models, against single layers."""
from __future__ import annotations

import json
import os
import sys

from laet_fast.commands import UsageError
from laet_fast.commands._embedding_options import (FUSION_CHOICES, add_embedding_arguments, check_embedding_arguments,
                                                   embed)
from laet_fast.commands._labeled_data import read_labeled
from laet_fast.commands._options import check_output, model_blocks, one_line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fuse",
        help="train a fused head over layers of one or several models",
        description=(
            "Embed labelled texts with every block of each --model, split them (seeded, stratified) into train "
            "and test, train a fusion head over the chosen layers on train, and print its test accuracy next to "
            "each model's last layer and best single layer (chosen on a validation split of train)."
        ),
    )
    add_embedding_arguments(parser, "save_pretrained folder or .gguf file; repeat for several models "
                                    "(default: the demo SmolLM2-135M)")
    parser.add_argument("--layers", default="auto",
                        help="auto (top-k layers by probe accuracy, k chosen on validation) or MODEL:LAYER pairs, "
                             "e.g. 0:5,0:11,1:3 (model = position of its --model)")
    parser.add_argument("--fusion", default="concat", choices=FUSION_CHOICES, help="how the layers are combined")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="test share per class (default: 0.2)")
    parser.add_argument("--save", metavar="DIR", default=None, help="save the trained fusion (safetensors + JSON)")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="write the accuracies, chosen layers and label -> id mapping to this JSON file")
    parser.set_defaults(func=run)


def _parse_layers(text: str):
    if text == "auto":
        return "auto"
    pairs = []
    for item in text.split(","):
        model, sep, layer = item.strip().partition(":")
        if not sep or not model.isdigit() or not layer.isdigit():
            raise UsageError(f"--layers {text!r}: use auto or MODEL:LAYER pairs such as 0:5,1:3.")
        pairs.append((int(model), int(layer)))
    return pairs


def _check_layers(pairs, models: list) -> None:
    """Refuse MODEL:LAYER pairs naming a model not given or a block it lacks, from the configs alone (before any
    model is loaded or any text embedded)."""
    for model, _ in pairs:
        if model >= len(models):
            raise UsageError(f"--layers: model {model} is out of range; {len(models)} --model given, numbered 0 to "
                             f"{len(models) - 1}.")
    blocks = {model: model_blocks(models[model]) for model in sorted({model for model, _ in pairs})}
    for model, layer in pairs:
        if blocks[model] is not None and layer >= blocks[model]:
            raise UsageError(f"--layers: layer {model}:{layer} is out of range; model {model} has {blocks[model]} "
                             f"blocks, numbered 0 to {blocks[model] - 1}.")


def run(args) -> int:
    check_embedding_arguments(args)
    layers = _parse_layers(args.layers)
    models = args.model or [None]
    if layers != "auto":
        _check_layers(layers, models)
    if not 0 < args.test_fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}.")
    check_output(args.json, "--json")
    if args.save is not None and os.path.isfile(args.save):
        raise UsageError(f"--save {args.save} is a file; give a folder.")

    from laet_fast.data import encode_labels, stratified_split
    from laet_fast.embed import FusionClassifier, probe_layers

    texts, labels = read_labeled(args)
    try:
        ids, classes = encode_labels(labels)
        train, test = stratified_split(ids, args.test_fraction, args.seed)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    embs = [embed(path, texts, args) for path in models]
    train_parts = [e.subset(train) for e in embs]
    test_parts = [e.subset(test) for e in embs]
    train_labels = [labels[i] for i in train]
    test_labels = [labels[i] for i in test]
    head = dict(epochs=args.epochs, seed=args.seed)

    def single_layer_accuracy(m: int, layer: int) -> float:
        """Test accuracy of the same kind of head over one layer of model m."""
        single = FusionClassifier([(0, layer)], **head).fit(train_parts[m], train_labels)
        return single.score(test_parts[m], test_labels)

    try:
        fusion = FusionClassifier(layers, args.fusion, **head).fit(train_parts, train_labels)
        fused = fusion.score(test_parts, test_labels)
        rows = []
        for m, emb in enumerate(train_parts):
            best = max(enumerate(probe_layers(emb, train_labels, seed=args.seed, epochs=args.epochs)["probe_acc"]),
                       key=lambda item: item[1])[0]
            rows.append({"model": models[m] or "demo SmolLM2-135M", "last_layer": emb.shape[1] - 1,
                         "last_layer_acc": single_layer_accuracy(m, emb.shape[1] - 1), "best_layer": best,
                         "best_layer_acc": single_layer_accuracy(m, best)})
    except ValueError as err:
        raise UsageError(one_line(err)) from None

    def name(m):
        return os.path.basename(str(models[m]).rstrip("/")) if models[m] else "demo"

    print(f"fusion ({args.fusion}) of {', '.join(f'{name(m)}:{layer}' for m, layer in fusion.layers_)}: "
          f"test accuracy {fused:.4f} on {len(test)} examples")
    for m, row in enumerate(rows):
        print(f"{name(m)}: last layer {row['last_layer']}: {row['last_layer_acc']:.4f}; best single layer "
              f"{row['best_layer']} (chosen on validation): {row['best_layer_acc']:.4f}")
    print(f"labels: {', '.join(f'{c!r} -> {i}' for i, c in enumerate(classes))}")
    if args.save is not None:
        fusion.save(args.save)
        print(f"wrote {args.save}", file=sys.stderr)
    if args.json is not None:
        record = {"fusion": args.fusion, "layers": [list(p) for p in fusion.layers_], "test_accuracy": fused,
                  "train": len(train), "test": len(test), "models": rows, "seed": args.seed,
                  "label_ids": {str(c): i for i, c in enumerate(classes)}, "search": fusion.search_}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
