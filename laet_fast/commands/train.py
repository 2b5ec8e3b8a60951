"""``laet-fast train``: fine-tune only the right blocks of a model, and print the report.

Without options it runs the demo: SmolLM2-135M-Instruct classifying Rotten Tomatoes sentences as
fresh or rotten (a fixed seeded subset, sized to finish in a few minutes on 2 CPU cores), LAET method.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys

from laet_fast.commands import UsageError
from laet_fast.commands._config_file import add_config_arguments, config_text, with_config_file
from laet_fast.commands._options import (add_encoding_argument, check_at_least_one, model_blocks, one_line,
                                         transformers_bars_off)

# The demo run: a seeded subset of the corpus, short texts, one pass over the training part. 2,500 sentences
# (2,000 to train, 500 to evaluate) is the accuracy table's scale, where fine-tuning learns and LAET's probes
# separate the blocks; at 400 one evaluation sentence was 1.25 points and the probes could not tell blocks apart.
DEMO_SUBSET = 2500
DEMO_K = 3
# The options a run folder was made with, as a file --config reads.
CONFIG_FILE = "config.yaml"
_PARSER = None  # this command's parser (register), which --config parses the command line again with


def register(subparsers) -> None:
    from laet_fast.names import OPTIMIZERS, REPORT_TO, TASKS
    from laet_fast.train.config import SCHEDULES, TrainConfig
    from laet_fast.names import METHODS

    d = TrainConfig.defaults()
    parser = subparsers.add_parser(
        "train",
        help="fine-tune only the selected blocks (LAET heads, IR-Tuning, baselines) and report",
        description=(
            "Score the blocks on the training data, choose which to train (--method), freeze (and optionally "
            "quantize) the rest, train, evaluate, checkpoint and export a transformers folder, then print the "
            "report (also OUT/report.txt, .json, .png). Without --model/--data: the demo, SmolLM2-135M-Instruct "
            f"on {DEMO_SUBSET} Rotten Tomatoes sentences (fresh/rotten), method laet."
        ),
    )
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="save_pretrained folder or .gguf file (default: the demo SmolLM2-135M-Instruct)")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help=".csv, .tsv, .json, .jsonl or .parquet (text and label) for classify, also .txt for lm; "
                             "rows of messages, prompt/completion or instruction/input/output for sft; compressed "
                             "too, or a hub dataset name (default: the demo Rotten Tomatoes sentences, fresh/rotten)")
    parser.add_argument("--eval-data", metavar="FILE", default=None,
                        help="evaluation file (default: a hub dataset's validation, else test, split, whole; else a "
                             "seeded, stratified 20%% of --data)")
    parser.add_argument("--text-column", default="text", help="column / key of the texts (default: text)")
    parser.add_argument("--label-column", default="label",
                        help="column / key of the labels, any values (default: label)")
    add_encoding_argument(parser)
    parser.add_argument("--subset", type=int, default=None,
                        help=f"use a seeded random sample of this many texts (default: all; the demo: {DEMO_SUBSET})")
    parser.add_argument("--task", choices=TASKS, default=d["task"],
                        help="classify (default); lm (next-token loss on every token); sft (chat messages, "
                             "prompt/completion or instruction/input/output rows: the loss on the answers only)")
    parser.add_argument("--loss-chunk", type=int, default=d["loss_chunk"],
                        help=f"lm, sft: the LM head's loss this many tokens at a time, so the full logits never "
                             f"exist; 0: the model's own loss (default: {d['loss_chunk']})")
    parser.add_argument("--packing", action="store_true",
                        help="sft: pack examples into full rows of --max-length tokens, attention kept per example")
    parser.add_argument("--method", default=d["method"],
                        help=f"{', '.join(METHODS)}, or blocks as 3,7,12 (default: {d['method']})")
    parser.add_argument("--k", type=int, default=None,
                        help=f"blocks to train (needed by block_influence, relative_change, last, random; the demo: "
                             f"{DEMO_K})")
    parser.add_argument("--splits", type=int, default=d["splits"], help="grad_norm's variance splits (default: 1)")
    parser.add_argument("--quantize-frozen", default="none", choices=("none", "nf4", "fp4", "int8"),
                        help="storage of the frozen blocks (default: none)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"], help="default: adamw")
    parser.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                        help="learning-rate schedule (default: linear)")
    parser.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="default: 0")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training data (default: 1)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"default: {d['batch_size']}")
    parser.add_argument("--grad-accum", type=int, default=d["grad_accum"],
                        help="batches per optimizer step (default: 1)")
    parser.add_argument("--max-length", type=int, default=d["max_length"],
                        help=f"tokens per text, longer ones are truncated (default: {d['max_length']})")
    parser.add_argument("--lr", type=float, default=d["lr"],
                        help=f"default: {d['lr']}, LAET's rate in the accuracy table; it chose 3e-4 for --method "
                             f"all and grad_norm")
    parser.add_argument("--score-batches", type=int, default=d["score_batches"],
                        help=f"training batches methods other than laet, laet-cost score on (default: "
                             f"{d['score_batches']})")
    parser.add_argument("--probe-examples", type=int, default=d["probe_examples"],
                        help=f"training texts LAET's probes (laet, laet-cost) learn from to choose the blocks; all "
                             f"when there are fewer (default: {d['probe_examples']})")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-gb", type=float, default=None,
                        help="laet-cost: the most GiB of predicted training memory (plan_memory) the blocks may take")
    budget.add_argument("--budget-s", type=float, default=None,
                        help="laet-cost: the most predicted seconds per step the blocks may take (laet_fast.cost's "
                             "reference CPU calibration, cost.CPU_DEFAULT: seconds on that machine, not this device)")
    parser.add_argument("--reselect-every", type=int, default=0, help="re-select every N steps (default: never)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, on the blocks")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="evaluate every N steps, and at the end (default: end)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: never)")
    parser.add_argument("--keep", type=int, default=d["keep"], help=f"checkpoints kept (default: {d['keep']})")
    parser.add_argument("--seed", type=int, default=d["seed"], help="default: 0")
    parser.add_argument("--layers", metavar="PATH", default=None, help="dotted path of the block list, if not found")
    parser.add_argument("--out", default=d["out"], help=f"run folder (default: {d['out']})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report-to", choices=REPORT_TO, default=d["report_to"],
                        help="also log losses, evaluations, per-block scores and selections to this experiment "
                             "tracker (through accelerate; its package must be installed) (default: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads torch computes with (default: torch's own, one per core unless "
                             "OMP_NUM_THREADS says otherwise); on a CPU shared with other jobs, 1 can be faster")
    add_config_arguments(parser)
    parser.set_defaults(func=run)
    global _PARSER
    _PARSER = parser


def run(args) -> int:
    args = with_config_file(_PARSER, args, "train")
    if args.print_config:
        print(config_text(_PARSER, args), end="")
        return 0
    if args.threads is not None:
        check_at_least_one(threads=args.threads)
    with _torch_threads(args.threads):
        if not args.no_progress:
            return _run(args)
        # --no-progress silences transformers' bars too (loading, writing shards): stderr keeps our lines only.
        with transformers_bars_off():
            return _run(args)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's CPU thread count set to ``threads`` (None: left as it is) inside the block, restored after."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(args) -> int:
    from laet_fast.methods import check_reselectable
    from laet_fast.names import NEEDS_K
    from laet_fast.train.config import TrainConfig

    demo_data = args.data is None
    k = args.k if args.k is not None or args.model is not None or not demo_data else DEMO_K
    if k is None and args.method in NEEDS_K:
        raise UsageError(f"--method {args.method} needs --k, the number of blocks to train.")
    try:
        config = TrainConfig(
            task=args.task, method=args.method, k=k, splits=args.splits, quantize_frozen=args.quantize_frozen,
            optimizer=args.optimizer, lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
            max_steps=args.max_steps, epochs=args.epochs or 1.0, batch_size=args.batch_size, packing=args.packing,
            loss_chunk=args.loss_chunk,
            grad_accum=args.grad_accum, max_length=args.max_length, eval_every=args.eval_every,
            save_every=args.save_every, keep=args.keep, score_batches=args.score_batches,
            probe_examples=args.probe_examples, budget_gb=args.budget_gb, budget_s=args.budget_s,
            reselect_every=args.reselect_every, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
            out=args.out, progress=not args.no_progress, resume=args.resume, report_to=args.report_to,
        )
        if config.reselect_every:
            check_reselectable(config.method)
    except ValueError as err:
        raise UsageError(as_flags(one_line(err))) from None
    if args.subset is not None and args.subset < 2:
        raise UsageError(f"--subset must be at least 2, got {args.subset}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder for the run (it is created when missing).")
    _check_blocks(args, config)
    if config.quantize_frozen is not None:  # a broken bitsandbytes install fails here, not after the scoring
        from laet_fast.quantize import require_bitsandbytes

        try:
            require_bitsandbytes()
        except ImportError as err:
            raise UsageError(f"--quantize-frozen {config.quantize_frozen}: {one_line(err)}") from None

    from laet_fast.distributed import rank_and_world
    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.data import read_examples, read_splits
    from laet_fast.train.trainer import run_exists

    subset = args.subset if args.subset is not None else (DEMO_SUBSET if demo_data else None)
    try:
        if args.eval_data is None:  # a hub dataset brings its own splits: its validation (else test) split evaluates
            splits = read_splits(args.data, args.task, args.text_column, args.label_column, subset=subset,
                                 seed=args.seed, encoding=args.encoding)
            train, evaluation = splits["train"], splits.get("eval")
        else:
            train = read_examples(args.data, args.task, args.text_column, args.label_column, subset=subset,
                                  seed=args.seed, encoding=args.encoding)
            evaluation = read_examples(args.eval_data, args.task, args.text_column, args.label_column,
                                       classes=train.classes, encoding=args.encoding)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    # Rank 0 alone writes the run folder (under torchrun / accelerate launch), so it alone holds its lock. The
    # lock comes first: a run that holds it is named as such, whether or not it has logged a step yet.
    with _run_folder_lock(args.out) if _launch_rank() == 0 else contextlib.nullcontext():
        if not args.resume and run_exists(args.out):
            raise UsageError(f"--out {args.out} holds another run (log.jsonl or checkpoints); resume it with "
                             f"--resume, or choose another --out folder.")
        try:
            model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
        except ValueError as err:
            raise UsageError(one_line(err)) from None
        except OSError as err:
            raise UsageError(f"cannot load the model from {args.model}: {one_line(err)}") from None
        try:
            report = _fit(args, config, model, tokenizer, train, evaluation)
        except KeyboardInterrupt:
            raise _how_to_resume(args) from None
    # None: the run had finished, as _fit said. Under torchrun / accelerate launch, rank 0 prints the report.
    if report is None or rank_and_world()[0] != 0:
        return 0
    print(report.text())
    print(f"wrote {args.out}/report.txt, report.json" + (", report.png" if os.path.isfile(
        os.path.join(args.out, "report.png")) else "") + f", log.jsonl and the model in {report.export_dir}",
          file=sys.stderr)
    return 0


def _launch_rank() -> int:
    """This process's rank as torchrun and accelerate launch give it (``RANK``; 0 alone). The process group is
    joined later, in ``Trainer.fit``, so ``rank_and_world`` would say 0 on every rank here."""
    return int(os.environ.get("RANK", "0"))


def _fit(args, config, model, tokenizer, train, evaluation):
    """Train the loaded model; the run's report, or None when the run had finished already (as it says)."""
    from laet_fast.train.trainer import RunComplete, TrainError, Trainer

    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_length > positions:
        print(f"note: --max-length {config.max_length} is more than the model's {positions} positions; using "
              f"{positions}.", file=sys.stderr)
        config.max_length = positions
    name = os.path.abspath(args.model) if args.model else "SmolLM2-135M-Instruct (demo)"
    try:
        trainer = Trainer(model, tokenizer, config, train, evaluation, model_name=name, layers=args.layers)
        trainer.run_files[CONFIG_FILE] = config_text(_PARSER, args)
        return trainer.fit()
    except RunComplete as done:
        from laet_fast.distributed import rank_and_world

        if rank_and_world()[0] == 0:
            print(f"laet-fast train: {done}", file=sys.stderr)
        return None
    except (ValueError, TrainError, OSError) as err:  # OSError: a file of the run that cannot be read or written
        raise UsageError(as_flags(one_line(err))) from None


# ``field=value`` as a word of its own: not inside a path (``runs/lr=1e-4/model``) or another word
_FIELD_VALUE = re.compile(r"(?<![\w/.\-=])([a-z_]+)=('[^']*'|[^\s,;:)/]+)(?![/\w])")


def as_flags(message: str) -> str:
    """A library error in the command line's words: ``TrainConfig``'s ``field=value`` as ``--field value`` (a true
    switch as ``--field``), ``(field)`` as ``(--field)``, and "another out folder" as "another --out folder"."""
    from dataclasses import fields

    from laet_fast.train.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in names:
            return match.group(0)
        option = "--" + name.replace("_", "-")
        return option if value == "True" else f"{option} {shlex.quote(value.strip(chr(39)))}"

    message = _FIELD_VALUE.sub(flag, message)
    for name in names:
        message = message.replace(f"({name})", f"(--{name.replace('_', '-')})")
    return message.replace("another out folder", "another --out folder")


def _how_to_resume(args) -> KeyboardInterrupt:
    """The interrupt of a run, saying the command that continues it (printed by ``laet_fast.cli.main``)."""
    from laet_fast.train.checkpoints import latest

    command = "laet-fast " + shlex.join(args.argv + ([] if args.resume else ["--resume"]))
    checkpoint = latest(args.out)
    if checkpoint is None:
        return KeyboardInterrupt(f"no checkpoint was saved (--save-every), so this starts the run again: {command}")
    return KeyboardInterrupt(f"continue the run from its checkpoint {os.path.basename(checkpoint)} with: {command}")


@contextlib.contextmanager
def _run_folder_lock(out: str):
    """Hold ``out``'s run lock (creating the folder) inside the block; UsageError when another run holds it."""
    from laet_fast.train.lock import RunLock, RunLocked

    lock = RunLock(out)
    try:
        lock.acquire()
    except RunLocked as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"cannot create the run folder --out {out}: {err.strerror}.") from None
    try:
        yield
    finally:
        lock.release()


def _check_blocks(args, config) -> None:
    """Refuse --k or --method blocks the model does not have, from its config alone (before it is loaded).

    Skipped with --layers (the block list it names may be another than the config's count) and for the demo's
    own --k, which fits the demo model."""
    from laet_fast.methods import parse_method

    blocks = parse_method(config.method)
    explicit = not isinstance(blocks, str)
    if args.layers is not None or not (args.k is not None or explicit):
        return
    count = model_blocks(args.model)
    if count is None:
        return
    if explicit:
        outside = [i for i in blocks if not 0 <= i < count]
        if outside:
            raise UsageError(f"--method {args.method}: the model has {count} blocks, numbered 0 to {count - 1}; "
                             f"{', '.join(map(str, outside))} is not one of them.")
    elif config.method == "all" and config.k != count:
        raise UsageError(f"--method all trains all {count} blocks of the model; drop --k {config.k}, or use "
                         f"--method last --k {config.k}.")
    elif config.k > count:
        raise UsageError(f"--k {config.k} is more than the model's {count} blocks; choose --k from 1 to {count}.")
