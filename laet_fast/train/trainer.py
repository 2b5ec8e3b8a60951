"""The thin Trainer: score, select, apply, then a plain PyTorch loop on the selected blocks.

``accelerate.Accelerator`` places the model, runs bf16 autocast on CUDA (fp32 on CPU) and the
backward pass; ``transformers.get_scheduler`` gives warmup then decay. Everything else is here, in
the order a step runs: batches by position (``batches.Batches``), the task loss (``heads.TaskModel``),
a NaN check, the optimizer step, re-selection, evaluation, one ``log.jsonl`` line, a checkpoint.

Under ``torchrun`` or ``accelerate launch`` the same loop runs on every rank, with DDP from accelerate:
``batch_size`` is per rank and rank ``r`` reads the ``r``-th slice of each global batch; the choice of
blocks is made on the global scoring batches (hidden statistics all-reduced, LAET's features
gathered) and handed out by rank 0; each step's loss is weighted so that the averaged gradient is
that of the global batch; evaluation is sharded and reduced. Rank 0 alone writes the log,
checkpoints, export and report, so a run folder looks the same at any world size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpoints, export
from .. import apply
from ..apply import ApplyReport
from ..atomic import write_text
from ..scores import LayerScores
from ..selection import Selection
from ..distributed import all_reduce_sum, broadcast_object, gather_rows, is_distributed, rank_and_world, rebuild_ddp
from .config import RESUMABLE_CHANGES, TrainConfig
from ..data import TextData, read_splits, split_examples, to_text_data
from ..data.labels import label_key
from ..data.examples import is_dataset, is_dataset_dict
from .batches import Batches
from .heads import ProbeHead, TaskModel, head_from_probe, vote
from ..methods import PROBE_METHODS, choose_blocks, gather_batch_rows, reselector_for
from .report import GIB, TrainReport, plan_for_run, finite_or_null

LOG = "log.jsonl"
MAX_GRAD_NORM = 1.0


class TrainError(RuntimeError):
    """Training cannot go on (repeated NaN losses, out of memory); the message says what to change."""


class RunComplete(Exception):
    """``fit()`` resuming a run that has finished: nothing to train; the message says where its report is."""


@contextmanager
def _no_space_is_one_line(what: str, path: str, model: "nn.Module | None"):
    """Turn a full disk while writing ``what`` (an export of ``model``, or a small file) into a ``TrainError``."""
    try:
        yield
    except OSError as err:
        if err.errno not in checkpoints.DISK_FULL:
            raise
        needed = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 2**20
        raise TrainError(str(checkpoints.no_space(what, path, needed))) from None


def as_text_data(data, task: str, classes=None) -> TextData:
    """A ``TextData`` from a TextData, a ``datasets.Dataset`` (its ``text`` and ``label`` columns; for ``sft`` its
    rows), ``(texts, labels)``, ``{"text": ..., "label": ...}``, a list of texts, or for ``sft`` a list of rows;
    read by ``laet_fast.data.to_text_data``, so the rules are the files' (blank texts skipped, one label rule)."""
    if isinstance(data, TextData):
        if task != "classify" or data.labels is None:
            return data
        classes = classes or data.classes
        data = {"text": data.texts, "label": [data.classes[i] for i in data.labels]}
    if task == "sft" or is_dataset(data):
        return to_text_data(data if task != "sft" or is_dataset(data) else list(data or []), task,
                            classes=classes, name="the dataset")
    if isinstance(data, tuple) and len(data) == 2:
        data = {"text": data[0], "label": data[1]}
    elif not isinstance(data, dict):
        data = {"text": data}
    columns = {name: list(values) for name, values in data.items() if values is not None}
    if not columns.get("text"):
        raise ValueError("the dataset is empty; give at least one text.")
    if task == "classify" and "label" not in columns:
        raise ValueError("task 'classify' needs a label per text, and the data has none; give labels "
                         "(label_column=, --label-column) or use task 'lm'.")
    if "label" in columns and len(columns["label"]) != len(columns["text"]):
        raise ValueError(f"{len(columns['text'])} texts but {len(columns['label'])} labels; give one label per text.")
    return to_text_data(columns, task, classes=classes, name="the dataset")


def run_exists(out: str) -> bool:
    return os.path.isfile(os.path.join(out, LOG)) or bool(checkpoints.complete(out))


def _digest(data: TextData) -> str:
    hasher = hashlib.sha256()
    for i, text in enumerate(data.texts):
        text = text if isinstance(text, str) else json.dumps(text, sort_keys=True, ensure_ascii=False)  # sft rows
        hasher.update(text.encode("utf-8") + b"\0" + (b"" if data.labels is None else str(data.labels[i]).encode()))
    return hasher.hexdigest()[:16]


def _weights_digest(model, samples: int = 4096) -> str:
    """A digest of the model's weights as loaded: every tensor's name, shape and a strided sample of its values
    (another model of the same shape, saved in the same folder, differs here)."""
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)].to("cpu", torch.float32)
        hasher.update(f"{name}{tuple(tensor.shape)}".encode() + sample.numpy().tobytes())
    return hasher.hexdigest()[:16]


@dataclass
class RunState:
    """What a run carries from one step to the next. A checkpoint saves its step, position, counts of non-finite
    steps, selection and blocks ever trained (with the weights, the optimizer, the scheduler and the random
    states), and a resumed run starts from them; the last evaluation and the step times are this process's."""

    step: int = 0  # optimizer steps taken, skipped ones included
    position: int = 0  # training-stream items consumed (``Batches.at``), every rank's
    nan_run: int = 0  # non-finite steps in a row
    skipped: int = 0  # non-finite steps in all
    selection: Selection | None = None  # the blocks training now
    ever_trained: set = field(default_factory=set)  # every block trained so far (re-selection moves the set)
    metrics: dict = field(default_factory=dict)  # the last evaluation
    step_times: list = field(default_factory=list)  # wall seconds of each step of this process


@dataclass
class RunSetup:
    """What ``Trainer.setup`` builds for the loop: the accelerator, the batches, the model made to train the chosen
    blocks (``task_model``; ``module`` is it as the accelerator wrapped it), the optimizer and the scheduler."""

    accelerator: Accelerator
    trackers: list
    cuda: bool
    train_batches: Batches
    eval_batches: Batches
    task_model: TaskModel
    module: nn.Module
    optimizer: torch.optim.Optimizer
    accel_optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    reselector: object
    probe: object
    apply_report: ApplyReport
    bar: object
    trainable: list
    scoring_time: float  # seconds from the start to the blocks chosen (or the checkpoint read)
    started: float  # perf_counter when the blocks were chosen (or read from the checkpoint): training time from here
    step_began: float = 0.0  # perf_counter when the current step began

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())


class Trainer:
    """Fine-tune only the selected blocks of ``model`` (see ``TrainConfig``); ``fit()`` returns a ``TrainReport``.

    Args:
        model: a transformers causal LM (or base model, for ``classify``), unchanged until ``fit()``.
        tokenizer: its tokenizer (with a pad token).
        config: the run.
        train_data: ``classify``: ``(texts, labels)`` (labels of any type, mapped to ids), a dict with
            ``text`` and ``label``, or a ``TextData``; ``lm``: a list of texts; ``sft``: a list of example rows
            (``laet_fast.train.sft``). A ``datasets.Dataset`` works for every task (its ``text`` and ``label``
            columns, a ``ClassLabel`` label by name; for ``sft`` its rows), and a ``DatasetDict`` brings its
            ``train`` split and, without ``eval_data``, its ``validation`` (else ``test``) split.
        eval_data: the same; None holds out ``config.eval_fraction`` of ``train_data`` (seeded,
            stratified by label).
        model_name: names the model in the fingerprint and report (default: its config's name).
        layers: dotted path of the block list when it is not found automatically.

    ``run_files`` (name -> text, empty by default) are written into ``config.out`` once ``fit()`` has accepted the
    run (the command line puts its effective options there as ``config.yaml``).
    """

    def __init__(self, model, tokenizer, config: TrainConfig, train_data, eval_data=None, *,
                 model_name: str | None = None, layers: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if is_dataset_dict(train_data):  # its own splits: train, and validation (else test) for evaluation
            splits = read_splits(train_data, config.task)
            data = splits["train"]
            eval_data = splits.get("eval") if eval_data is None else eval_data
        else:
            data = as_text_data(train_data, config.task)
        if eval_data is None:
            self.train_data, self.eval_data = split_examples(data, config.eval_fraction, config.seed)
        else:
            self.train_data = data
            self.eval_data = as_text_data(eval_data, config.task, classes=data.classes)
        # A run's classes are named by their text (the label rule's keys): what the export's JSON, the predictor's
        # answers and the fingerprint hold, whether the labels came as the strings of a CSV or the numbers of JSON.
        for split in (self.train_data, self.eval_data):
            if split.classes is not None:
                split.classes = [label_key(c) for c in split.classes]
        self.classes = self.train_data.classes
        self.model_name = model_name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
        self.layers = layers
        self.scores = None
        self.state = RunState()  # fit(): the run's step, stream position, selection...
        self.log_path = os.path.join(config.out, LOG)
        self.probe_baseline = None  # fit(): the evaluation before any training step (_probe_baseline)
        self._weights = None
        self._batches = None  # (settings, the training split's batches): see batches()
        self.loss_chunk = 0  # fit(): the chunk of the LM-head loss in use (0: the model's own loss)
        # name -> text, written into the run folder once the run is accepted (the command line's options)
        self.run_files: dict[str, str] = {}
        # accelerate GeneralTracker instances to log to, besides config.report_to's (Python API)
        self.trackers: list = []

    # ------------------------------------------------------------------ set-up
    def fingerprint(self) -> dict:
        """What makes two runs the same run; a checkpoint from a run with another fingerprint is refused."""
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in RESUMABLE_CHANGES}
        mc = self.model.config
        if self._weights is None:
            self._weights = _weights_digest(self.model)
        # A global batch is batch_size rows per rank: another world size is another run.
        world = {"world_size": torch.distributed.get_world_size()} if is_distributed() else {}
        return {
            "model": self.model_name,
            "model_weights": self._weights,
            "model_shape": [mc.model_type, getattr(mc, "num_hidden_layers", None), getattr(mc, "hidden_size", None),
                            getattr(mc, "vocab_size", None)],
            "classes": self.classes,
            "train_data": _digest(self.train_data),
            "eval_data": _digest(self.eval_data),
            **world,
            **cfg,
        }

    def batches(self, data: TextData) -> Batches:
        """``data``'s batches: of texts, or for ``sft`` of tokenized examples (packed as the config says). The
        training split's are made once (an sft split is tokenized once) and kept for the settings they were
        made with."""
        cfg = self.config
        key = (id(data), cfg.task, cfg.batch_size, cfg.max_length, cfg.seed, cfg.packing)
        if self._batches is not None and self._batches[0] == key:
            return self._batches[1]
        if cfg.task != "sft":
            made = Batches(data, self.tokenizer, cfg.batch_size, cfg.max_length, cfg.seed)
        else:
            from .sft import SFTBatches

            made = SFTBatches(data, self.tokenizer, cfg.batch_size, cfg.max_length, cfg.seed, packing=cfg.packing)
        if data is self.train_data:
            self._batches = (key, made)
        return made

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        # what an epoch counts: examples, or for sft the examples kept (or packed rows) once tokenized
        units = len(self.batches(self.train_data)) if cfg.task == "sft" else len(self.train_data)
        global_batch = cfg.batch_size * cfg.grad_accum * rank_and_world()[1]
        return max(1, math.ceil(cfg.epochs * units / global_batch))

    def choose_blocks(self, batches: Batches, device):
        """Score the blocks, choose, and build the heads: ``(selection, heads)`` (``fit`` calls it once).

        LAET's methods (``PROBE_METHODS``) train their probes on the pooled features of the first
        ``probe_examples`` texts of the seeded training stream (all of them when there are fewer); the other
        methods score on the first ``score_batches`` (global) training batches. Under several processes each
        rank scores its slices and the scores are formed from every rank's (see ``laet_fast.distributed``);
        rank 0's scores, selection and heads are handed to every rank.
        """
        cfg = self.config
        rank, world = rank_and_world()
        num_layers = len(TaskModel(self.model, "lm", layers=self.layers).stack)
        probes_choose = cfg.method in PROBE_METHODS
        global_batch = cfg.batch_size * world
        probe_examples = min(cfg.probe_examples, len(self.train_data))
        count = math.ceil(probe_examples / global_batch) if probes_choose else cfg.score_batches
        if cfg.packing:  # scored example by example: a packed batch's model call would need its own mask
            batches = batches.unpacked()
        score_data = [{k: v.to(device) for k, v in batches.at(i * global_batch, rank, world).items()}
                      for i in range(count)]
        labels = torch.cat([b["labels"] for b in score_data]) if cfg.task == "classify" else None
        extra = {"hidden": cfg.head_hidden, "probe_examples": probe_examples} if probes_choose else {}
        select_kwargs = {"splits": cfg.splits} if cfg.method == "grad_norm" and cfg.k is None else {}
        if cfg.method == "laet-cost":
            select_kwargs = {"cost_model": self._cost_model(), "budget_s": cfg.budget_s, "budget_gb": cfg.budget_gb}
        # sft's grad_norm: the gradient of the completion-only loss the run trains on (own_loss)
        selection, self.scores, probes = choose_blocks(
            self.model, score_data, cfg.method, k=cfg.k, labels=labels, layers=self.layers, seed=cfg.seed,
            own_loss=cfg.task == "sft", progress=cfg.progress and rank == 0, keep_probes=True,
            select_kwargs=select_kwargs, **extra)
        heads = {}
        if cfg.task == "classify":
            if probes is not None:
                heads = {i: head_from_probe(probes, i) for i in selection.layers}
            else:
                heads = {num_layers - 1: self._last_block_head(score_data, num_layers - 1)}
        self.scores, selection, heads = broadcast_object((self.scores, selection, heads))
        return selection, heads

    def _trackers(self) -> list:
        """What accelerate logs to: ``self.trackers`` and ``config.report_to``'s tracker, which must be installed."""
        chosen = list(self.trackers)
        name = self.config.report_to
        if name != "none":
            from accelerate.tracking import get_available_trackers

            if name not in {str(t) for t in get_available_trackers()}:
                package = {"comet_ml": "comet-ml"}.get(name, name)
                raise ValueError(f"report_to={name!r} logs through the {package} package, which is not installed: "
                                 f"pip install {package}.")
            chosen.append(name)
        return chosen

    def _chunked_loss_check(self, main: bool) -> int:
        """The chunk the LM-head loss runs in: ``loss_chunk`` for ``lm`` / ``sft`` when the chunked loss gives the
        model's own loss on a short random batch (``chunked_loss.agrees_with_model``), else 0 (said once)."""
        cfg = self.config
        if cfg.task == "classify" or not cfg.loss_chunk:
            return 0
        from ..chunked_loss import agrees_with_model

        if agrees_with_model(self.model, cfg.loss_chunk):
            return cfg.loss_chunk
        if main:
            print(f"note: {type(self.model).__name__}'s logits are not its LM head's plain output (or it has no "
                  f"separate head); its own loss is used, with the full logits (loss_chunk off).", file=sys.stderr)
        return 0

    def _cost_model(self):
        """The run's step (batch, length, frozen storage, optimizer, dtype) as ``laet_fast.cost`` costs it."""
        from ..cost import CostModel
        from ..memory import dtype_label

        cfg = self.config
        dtype = dtype_label(next(self.model.parameters()).dtype)
        return CostModel(self.model.config, seq_len=cfg.max_length, batch_size=cfg.batch_size,
                         quantize_frozen=cfg.quantize_frozen, dtype=dtype, optimizer=cfg.optimizer)

    def _last_block_head(self, score_data, index: int) -> ProbeHead:
        """A linear head on the last block, standardized by the scoring batches' pooled features."""
        probe_model = TaskModel(self.model, "classify", {index: torch.nn.Identity()}, layers=self.layers)
        with torch.no_grad():
            feats = torch.cat([probe_model(b["input_ids"], b["attention_mask"])[1][0] for b in score_data])
        if is_distributed():  # standardize by the global scoring batches, as one process would
            feats, _ = gather_batch_rows(feats, torch.cat([b["labels"] for b in score_data]), score_data)
        torch.manual_seed(self.config.seed)
        return ProbeHead(feats.shape[-1], len(self.classes), (), feats.mean(0), feats.std(0).clamp_min(1e-6))

    # ------------------------------------------------------------------ the run
    def fit(self):
        """Train; returns a ``TrainReport`` (also written as OUT/report.txt, .json and .png).

        Raises:
            ValueError: bad input (another run in ``out`` without resume, a checkpoint of another run, checkpoints
                none of which verifies, a finished run in ``out`` that this shorter run would replace).
            TrainError: training had to stop (NaN losses in a row, out of memory, a full disk); checkpoints are kept.
            RunComplete: ``resume`` on a run that has finished; nothing was trained or written.
        """
        run = self.setup()
        try:
            with open(self.log_path, "a", encoding="utf-8") if run.main else nullcontext() as log:
                while self.state.step < run.total_steps:
                    entry = self.train_step(run)
                    self.after_step(run, entry, log)
        finally:
            run.bar.close()
        return self.finish(run)

    def setup(self) -> "RunSetup":
        """Everything before the first step: the accelerator (and the process group), the run folder, the
        batches, the blocks (chosen, or the checkpoint's), the model made to train them, the optimizer, the
        scheduler and ``self.state`` (fresh, or the checkpoint's)."""
        cfg = self.config
        cuda = torch.cuda.is_available()
        # Under torchrun / accelerate launch this joins the process group (DDP, one rank per process). Told
        # that there is no accelerator, accelerate takes gloo for several CPU processes (else it ignores them).
        on_cpu = not (torch.accelerator.is_available() if hasattr(torch, "accelerator") else cuda)
        trackers = self._trackers()
        accelerator = Accelerator(mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
                                  cpu=on_cpu, log_with=trackers or None, project_dir=cfg.out)
        device, main = accelerator.device, accelerator.is_main_process
        if not cfg.resume and run_exists(cfg.out):
            raise ValueError(f"out={cfg.out!r} holds another run (log.jsonl or checkpoints); resume it with "
                             f"resume=True, or choose another out folder.")
        accelerator.wait_for_everyone()  # every rank has looked at the run folder before rank 0 writes there
        if main:
            os.makedirs(cfg.out, exist_ok=True)
        self.fingerprint()  # the weights' digest, taken before training changes them
        self._check_finished(main)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model.to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        train_batches, eval_batches = self.batches(self.train_data), self.batches(self.eval_data)
        self._say_what_was_cut(train_batches, eval_batches, main)
        self.loss_chunk = self._chunked_loss_check(main)
        if cfg.packing:
            from .sft import check_packing

            check_packing(self.model)

        t_start = time.perf_counter()
        saved, saved_tensors = self.load_checkpoint(main)
        if saved is not None:
            selection = Selection.from_dict(saved["selection"])
            heads = {int(i): ProbeHead.from_spec(spec) for i, spec in saved["heads"].items()}
            if saved.get("scores"):
                self.scores = LayerScores.from_dict(saved["scores"])
        else:
            selection, heads = self.choose_blocks(train_batches, device)
        t_scored = time.perf_counter()

        task_model = TaskModel(self.model, cfg.task, heads, layers=self.layers, loss_chunk=self.loss_chunk).to(device)
        apply_kwargs = {"quantize_frozen": cfg.quantize_frozen, "layers": task_model.layers_path}
        if saved is not None and set(saved["ever_trained"]) - set(selection.layers):
            # Blocks trained earlier and frozen since hold trained weights: mark them trained first so that
            # quantize_frozen never rounds them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply.apply_selection(task_model, saved["ever_trained"], **apply_kwargs)
        apply_report = apply.apply_selection(task_model, selection, **apply_kwargs)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = apply.build_optimizer(task_model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total_steps = self._total_steps()
        scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=total_steps)
        self.state = RunState(selection=selection, ever_trained=set(selection.layers))
        if saved is not None:
            self._restore(task_model, optimizer, scheduler, saved_tensors, saved)
            self.state = RunState(step=saved["step"], position=saved["position"], nan_run=saved["nan_run"],
                                  skipped=saved["skipped"], selection=selection,
                                  ever_trained=set(selection.layers) | set(saved["ever_trained"]))
        if main:
            self._truncate_log(self.state.step)
            for name, text in self.run_files.items():  # the run is accepted: a refused one writes nothing
                write_text(os.path.join(cfg.out, name), text)
        if trackers:
            accelerator.init_trackers("laet_fast", config=tracker_scalars(cfg.to_dict(), keep_text=True))
            if saved is None:  # the first choice, at step 0: the scores it was made from and the blocks
                first = {"selection": list(selection.layers)}
                if self.scores is not None:
                    first["layer_scores"] = self.scores.to_dict()["metrics"]
                accelerator.log(tracker_scalars(first, num_layers=selection.num_layers), step=0)

        reselector, probe = self._reselector(task_model, optimizer)
        if reselector is not None:
            reselector.steps = self.state.step
        # The scheduler stays ours: accelerate's would step world-size times per optimizer step (it assumes each
        # rank's loader is the 1/world shard of one epoch), while total_steps already counts global steps.
        module, accel_optimizer = accelerator.prepare(task_model, optimizer)
        if saved is not None:
            self.probe_baseline = saved.get("probe_baseline")
        elif cfg.task == "classify":
            self.probe_baseline = self._probe_baseline(task_model, eval_batches, device, accelerator)
        module.train()
        bar = tqdm(total=total_steps, initial=self.state.step, desc="training", unit="step", file=sys.stderr,
                   disable=not (cfg.progress and main))
        return RunSetup(accelerator=accelerator, trackers=trackers, cuda=cuda, train_batches=train_batches,
                        eval_batches=eval_batches, task_model=task_model, module=module, optimizer=optimizer,
                        accel_optimizer=accel_optimizer, scheduler=scheduler, total_steps=total_steps,
                        reselector=reselector, probe=probe, apply_report=apply_report, bar=bar,
                        trainable=[p for p in task_model.parameters() if p.requires_grad],
                        scoring_time=t_scored - t_start, started=t_scored)

    def train_step(self, run: "RunSetup") -> dict:
        """One optimizer step over ``grad_accum`` micro-batches (every rank's slice of the global batch); returns
        its log entry (step, lr, loss or why it was skipped, gradient norm, tokens)."""
        cfg, state, accelerator = self.config, self.state, run.accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        run.step_began = time.perf_counter()
        losses, tokens = [], 0
        micro_batches = [run.train_batches.at(state.position + micro * cfg.batch_size * world, rank, world)
                         for micro in range(cfg.grad_accum)]
        state.position += cfg.grad_accum * cfg.batch_size * world
        # The step's loss is the mean over all its loss units (rows, tokens, answer tokens), so each micro-batch
        # weighs by its share of them: sft's micro-batches hold unequal numbers of answer tokens.
        step_units = self._global_units(micro_batches, world)
        for micro, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # DDP all-reduces the gradients once per optimizer step, at the last micro-batch.
            last = micro == cfg.grad_accum - 1
            try:
                with nullcontext() if last else accelerator.no_sync(run.module):
                    with accelerator.autocast():
                        # the loss alone: the model's logits (plain lm loss) would stay alive through the backward
                        # and the optimizer step, 0.24 GiB at 8B x 1024 tokens in bf16
                        loss = run.module(**self._loss_inputs(batch))[0]
                    global_loss, global_units, batch_tokens = self._across_ranks(loss.detach(), batch, world)
                    if _finite(global_loss):  # the same on every rank: all skip, or none does
                        accelerator.backward(loss * (world * self._loss_units(batch) / step_units))
            except torch.OutOfMemoryError:
                raise TrainError(self._oom_message(state.step, state.selection)) from None
            losses.append((global_loss, global_units))
            tokens += batch_tokens
        loss_value = sum(value * units for value, units in losses) / step_units
        grad_norm = (torch.nn.utils.clip_grad_norm_(run.trainable, MAX_GRAD_NORM) if math.isfinite(loss_value)
                     else None)
        entry = {"step": state.step + 1, "lr": run.scheduler.get_last_lr()[0]}
        if grad_norm is None or not _finite(grad_norm):
            run.accel_optimizer.zero_grad(set_to_none=True)
            state.nan_run, state.skipped = state.nan_run + 1, state.skipped + 1
            entry.update(loss=None, skipped="non-finite loss or gradient")
        else:
            try:
                run.accel_optimizer.step()
            except torch.OutOfMemoryError:
                raise TrainError(self._oom_message(state.step, state.selection)) from None
            run.scheduler.step()
            run.accel_optimizer.zero_grad(set_to_none=True)
            state.nan_run = 0
            entry.update(loss=loss_value, grad_norm=float(grad_norm))
        state.step += 1
        entry["tokens"] = tokens
        return entry

    def after_step(self, run: "RunSetup", entry: dict, log) -> None:
        """What follows a step: re-selection, evaluation, the log line (and the trackers), the progress bar, the
        stop after too many non-finite steps, and the checkpoint."""
        cfg, state = self.config, self.state
        if run.reselector is not None and state.step < run.total_steps:  # a choice after the last step never trains
            self._reselect(run, entry)
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == run.total_steps:
            # The unwrapped model: DDP's forward would sync buffers, a collective, in every pass.
            state.metrics = self.evaluate(run.task_model, run.eval_batches, run.accelerator.device, run.accelerator,
                                          run.probe)
            entry["eval"] = state.metrics
        state.step_times.append(time.perf_counter() - run.step_began)
        if log is not None:
            line, non_finite = finite_or_null(entry)
            if non_finite:
                line["note"] = f"non-finite {', '.join(non_finite)} written as null"
            log.write(json.dumps(line, allow_nan=False) + "\n")
            log.flush()
        if run.trackers:
            run.accelerator.log(tracker_scalars(entry, num_layers=state.selection.num_layers), step=state.step)
        run.bar.update(1)
        run.bar.set_postfix(loss="nan" if entry["loss"] is None else f"{entry['loss']:.4f}",
                            tok_s=f"{entry['tokens'] / state.step_times[-1]:.0f}", mem=_memory_text(run.cuda))
        if state.nan_run >= cfg.max_nan_steps:
            run.bar.close()
            raise TrainError(f"training stopped at step {state.step}: {state.nan_run} non-finite losses in a row "
                             f"(each step skipped, {state.skipped} in all); the last checkpoint holds the last good "
                             f"weights. Lower the learning rate (lr), or check the data.")
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < run.total_steps:
            self.save_checkpoint(run)

    def _reselect(self, run: "RunSetup", entry: dict) -> None:
        """The re-selector's turn: a new choice (every ``reselect_every`` steps) moves the trained set."""
        state = self.state
        made = run.reselector.step()
        if made is None:
            return
        if made.metric is not None:  # random draws without scores
            entry["layer_scores"] = {made.metric: list(made.scores)}  # NaN: null, with a note
        if made.layers != state.selection.layers:
            entry["selection"] = list(made.layers)
            state.ever_trained |= set(made.layers)
            run.trainable = [p for p in run.task_model.parameters() if p.requires_grad]
            if isinstance(run.module, nn.parallel.DistributedDataParallel):
                rebuild_ddp(run.module)  # DDP's buckets hold the blocks trained now, only
        state.selection = made

    def finish(self, run: "RunSetup") -> TrainReport:
        """After the last step: the export (rank 0), the report, and the mark that says the run is complete."""
        cfg, state, main = self.config, self.state, run.accelerator.is_main_process
        run.bar.close()
        if run.probe is not None:
            run.probe.detach()
        training_time = time.perf_counter() - run.started
        peak = (torch.cuda.max_memory_allocated() if run.cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        export_dir = os.path.join(cfg.out, "model")
        # laet_fast's hooks off, frozen blocks read again from the source as loaded
        if main:
            with _no_space_is_one_line("the run's model", export_dir, run.task_model):
                export.export_trained(run.task_model, export_dir, self.tokenizer, self.classes, cfg)
        else:
            apply.export_model(run.task_model)
        result = TrainReport.build(
            cfg, state, model_name=self.model_name, classes=self.classes, scores=self.scores,
            probe_baseline=self.probe_baseline, planned=plan_for_run(self.model, cfg, state.selection, self.loss_chunk),
            task_model=run.task_model, apply_report=run.apply_report, steps=run.total_steps, peak=peak, cuda=run.cuda,
            scoring_time=run.scoring_time, training_time=training_time, export_dir=export_dir)
        if main:
            with _no_space_is_one_line("the report", os.path.join(cfg.out, "report.json"), None):
                result.write(cfg.out, self.scores)
            try:
                checkpoints.mark_finished(cfg.out, state.step, self.fingerprint())  # last: the outputs are complete
            except checkpoints.NoSpace as err:
                raise TrainError(str(err)) from None
        if run.trackers:
            run.accelerator.end_training()
        run.accelerator.wait_for_everyone()  # the run folder is complete when fit() returns, on every rank
        return result

    def _say_what_was_cut(self, train_batches: Batches, eval_batches: Batches, main: bool) -> None:
        """Notes on stderr: texts cut to ``max_length``, and sft examples it left nothing to learn in."""
        if not main:
            return
        cfg = self.config
        total = len(self.train_data) + len(self.eval_data)
        truncated = train_batches.truncated() + eval_batches.truncated()
        if truncated:
            what = "examples" if cfg.task == "sft" else "texts"
            print(f"note: {truncated} of {total} {what} are longer than max_length={cfg.max_length} tokens and were "
                  f"truncated.", file=sys.stderr)
        dropped = (train_batches.units.dropped + eval_batches.units.dropped) if cfg.task == "sft" else 0
        if dropped:
            print(f"note: {dropped} of {total} examples were left out: max_length={cfg.max_length} cut away all of "
                  f"their answer.", file=sys.stderr)

    def _across_ranks(self, loss: torch.Tensor, batch: dict, world: int) -> tuple[float, int, int]:
        """(the global micro-batch's loss, its loss units, its real tokens) for one micro-batch.

        Each rank's ``loss`` is a mean over its own loss units (rows for ``classify``, predicted tokens for
        ``lm``, answer tokens for ``sft``); the global loss is their mean over every rank's units. Scaled by
        ``world * units / step units`` before DDP averages the gradients, each rank's loss gives the gradient of
        the mean over the global step, as one process computes it, even when ranks hold different numbers of
        tokens. One all-reduce of three numbers; alone, nothing is reduced.
        """
        units = self._loss_units(batch)
        tokens = int(batch["attention_mask"].sum())
        if world == 1:
            return float(loss), units, tokens
        totals = all_reduce_sum(torch.tensor([float(loss) * units, units, tokens], dtype=torch.float64))
        global_units = int(totals[1])
        return float(totals[0]) / max(global_units, 1), global_units, int(totals[2])

    def _global_units(self, micro_batches: list[dict], world: int) -> int:
        """The loss units of a whole step: every micro-batch of every rank (at least 1, so that a step without
        any is a NaN loss the step skips, never a division by zero)."""
        units = sum(self._loss_units(batch) for batch in micro_batches)
        if world > 1:
            units = int(all_reduce_sum(torch.tensor([units], dtype=torch.float64))[0])
        return max(units, 1)

    def _loss_units(self, batch: dict) -> int:
        """What the batch's loss is a mean over: rows (``classify``), predicted tokens (``lm``), learned answer
        tokens (``sft``; the model's loss predicts ``labels[:, 1:]``)."""
        if self.config.task == "classify":
            return int(batch["attention_mask"].shape[0])
        if self.config.task == "sft":
            return int((batch["labels"][:, 1:] != -100).sum())
        return int(batch["attention_mask"][:, 1:].sum())

    def _loss_inputs(self, batch: dict) -> dict:
        if self.config.task == "lm":
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        return batch

    def _reselector(self, task_model, optimizer):
        cfg = self.config
        if not cfg.reselect_every:
            return None, None
        select_kwargs = {"seed": cfg.seed} if cfg.k is not None else {"splits": cfg.splits}
        reselector, probe = reselector_for(task_model, cfg.method, cfg.reselect_every, k=cfg.k, optimizer=optimizer,
                                           apply_kwargs={"quantize_frozen": cfg.quantize_frozen},
                                           layers=task_model.layers_path, **select_kwargs)
        return reselector, probe.attach()

    @torch.no_grad()
    def evaluate(self, module, batches: Batches, device, accelerator=None, probe=None,
                 head: int | None = None) -> dict:
        """``classify``: accuracy and macro-F1 of the heads' vote, loss (sum of the heads' mean cross-entropies);
        ``lm``: loss per real token and perplexity. ``head`` (a block carrying a head): also ``"head"``, the
        accuracy and macro-F1 of that block's head alone.

        Under several processes each rank evaluates every ``world``-th batch of ``module`` (the unwrapped
        model) and the sums and predictions are combined, so every rank returns the metrics of the whole set.
        """
        rank, world = rank_and_world()
        was_training = module.training
        module.eval()
        if probe is not None:
            probe.detach()  # evaluation passes are no part of the re-selection window
        total_loss, count, preds, golds, head_preds = 0.0, 0, [], [], []
        shown = self.config.progress and rank == 0
        try:
            for batch in tqdm(batches.in_order(rank, world), desc="evaluating", unit="batch", file=sys.stderr,
                              total=math.ceil(len(batches) / (batches.batch_size * world)), disable=not shown,
                              leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                with accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False):
                    loss, logits = module(**self._loss_inputs(batch))
                if self.config.task != "classify":
                    n = self._loss_units(batch)
                    total_loss, count = total_loss + float(loss) * n, count + n
                else:
                    n = int(batch["labels"].numel())
                    total_loss, count = total_loss + float(loss) * n, count + n
                    preds.append(vote(logits).cpu())
                    golds.append(batch["labels"].cpu())
                    if head is not None:
                        head_preds.append(logits[module.head_layers.index(head)].argmax(-1).cpu())
        finally:
            module.train(was_training)
            if probe is not None:
                probe.attach()
        if world > 1:

            total_loss, count = all_reduce_sum(torch.tensor([total_loss, count], dtype=torch.float64)).tolist()
            if self.config.task == "classify":
                empty = torch.zeros(0, dtype=torch.long)  # a rank with no evaluation batch still takes part
                preds, golds = [gather_rows(torch.cat(preds or [empty]))], [gather_rows(torch.cat(golds or [empty]))]
                if head is not None:
                    head_preds = [gather_rows(torch.cat(head_preds or [empty]))]
        mean_loss = total_loss / max(count, 1)
        if self.config.task != "classify":
            return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 700.0))}
        gold = torch.cat(golds)

        def scored(pred):
            return {"accuracy": int((pred == gold).sum()) / len(gold),
                    "macro_f1": macro_f1(pred, gold, len(self.classes))}

        metrics = {**scored(torch.cat(preds)), "loss": mean_loss}
        if head is not None:
            metrics["head"] = scored(torch.cat(head_preds))
        return metrics

    def _probe_baseline(self, task_model, eval_batches: Batches, device, accelerator) -> dict:
        """The evaluation split's accuracy and macro-F1 before any training step: the heads are then exactly the
        frozen probes LAET trained to choose the blocks (for the other methods, the last-block head as it was
        initialised). ``best_probe``: the head of the block whose probe scored best; ``probe_vote``: the heads'
        vote (``heads.vote``)."""
        heads = task_model.head_layers
        if self.config.method not in PROBE_METHODS:
            metrics = self.evaluate(task_model, eval_batches, device, accelerator)
            return {"last_block_head": {"block": heads[-1], "accuracy": metrics["accuracy"],
                                        "macro_f1": metrics["macro_f1"]}}
        acc = [float(v) for v in self.scores["probe_acc"]]
        best = max(heads, key=lambda i: (acc[i], -i))  # LAET always keeps the best probe's block
        metrics = self.evaluate(task_model, eval_batches, device, accelerator, head=best)
        return {"best_probe": {"block": best, **metrics["head"]},
                "probe_vote": {"blocks": heads, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}}

    # ------------------------------------------------------------------ checkpoints
    def _check_finished(self, main: bool) -> None:
        """Refuse to replace a finished run's export and report by a shorter run's; under ``resume``, stop
        (``RunComplete``) when the run has finished. A damaged finished mark is said, and the run goes on."""
        cfg = self.config
        try:
            found = checkpoints.finished(cfg.out)
        except checkpoints.Damaged as err:
            if main:
                _say(f"the mark that the run finished is damaged: {err}; going on as if it had not finished.")
            return
        if found is None:
            return
        path, meta = found
        total = self._total_steps()
        if meta["step"] > total:
            raise ValueError(f"out={cfg.out!r} holds a finished run of {meta['step']} steps, and this run of {total} "
                             f"steps would replace its model and report; choose another out folder.")
        if cfg.resume:
            checkpoints.check_same_run(meta["fingerprint"], self.fingerprint(), path)
            raise RunComplete(f"the run in {cfg.out} is complete ({meta['step']} steps; its report is "
                              f"{os.path.join(cfg.out, 'report.txt')}); nothing to resume.")

    def load_checkpoint(self, main: bool) -> tuple[dict | None, dict | None]:
        """``(meta, tensors)`` of the newest checkpoint that verifies, when resuming (``(None, None)`` otherwise);
        a checkpoint of another run is refused (``checkpoints.check_same_run``)."""
        if not self.config.resume:
            return None, None
        found = checkpoints.newest(self.config.out, _say if main else lambda line: None)
        if found is None:
            return None, None
        path, tensors, meta = found
        checkpoints.check_same_run(meta["fingerprint"], self.fingerprint(), path)
        return meta, tensors

    def save_checkpoint(self, run: "RunSetup") -> None:
        """A checkpoint of the run state (``self.state``), the trained blocks and heads, the optimizer, the
        scheduler and the random states: what a resumed run needs to take the same steps as one never cut."""
        state, task_model, optimizer = self.state, run.task_model, run.optimizer
        prefixes = tuple(f"{task_model.layers_path}.{i}." for i in sorted(state.ever_trained)) + ("classifier.",)
        trained = {name: t for name, t in task_model.state_dict().items() if name.startswith(prefixes)}
        bad = [name for name, t in trained.items() if t.is_floating_point() and not _finite(t)]
        if bad:
            raise TrainError(f"not saving step {state.step}: {bad[0]} holds non-finite values; the last checkpoint is "
                             f"kept.")
        if rank_and_world()[0] != 0:
            return  # the ranks hold the same weights and optimizer state; rank 0 writes them
        names = {id(p): n for n, p in task_model.named_parameters()}
        opt_tensors, opt_extra = {}, {}
        for param, values in optimizer.state.items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    opt_tensors[f"{names[id(param)]}/{key}"] = value
                else:
                    opt_extra.setdefault(names[id(param)], {})[key] = value
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                  for g in optimizer.param_groups]
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        meta = {
            "step": state.step, "position": state.position, "nan_run": state.nan_run, "skipped": state.skipped,
            "fingerprint": self.fingerprint(), "selection": state.selection.to_dict(),
            "ever_trained": sorted(state.ever_trained),
            "heads": {str(i): task_model.classifier[str(i)].spec() for i in task_model.head_layers},
            "optimizer": {"groups": groups, "extra": opt_extra}, "scheduler": run.scheduler.state_dict(),
            "python_rng": _json_rng(random.getstate()),
            "scores": None if self.scores is None else _strict(self.scores.to_dict()),
            "probe_baseline": _strict(self.probe_baseline),
        }
        try:
            checkpoints.save(self.config.out, state.step, {"trained": trained, "optimizer": opt_tensors, "rng": rng},
                             meta, self.config.keep)
        except checkpoints.NoSpace as err:
            raise TrainError(str(err)) from None

    def _restore(self, task_model, optimizer, scheduler, tensors, meta):
        missing, unexpected = task_model.load_state_dict(tensors["trained"], strict=False)
        if unexpected:
            raise ValueError(f"checkpoint tensors {unexpected[:3]} do not fit the model; it is from another run.")
        params = dict(task_model.named_parameters())
        saved_groups = meta["optimizer"]["groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise ValueError("the checkpoint's optimizer groups do not fit this run; it is from another run.")
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["params"] = [params[n] for n in saved["params"]]
        optimizer.state.clear()
        for key, value in tensors["optimizer"].items():
            name, field = key.rsplit("/", 1)
            optimizer.state.setdefault(params[name], {})[field] = value.to(params[name].device)
        for name, extra in meta["optimizer"]["extra"].items():
            optimizer.state.setdefault(params[name], {}).update(extra)
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng"]["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors["rng"][f"cuda{i}"] for i in range(torch.cuda.device_count())
                                          if f"cuda{i}" in tensors["rng"]])
        random.setstate(_python_rng(meta["python_rng"]))

    def _truncate_log(self, step: int) -> None:
        """Keep the log lines of steps up to ``step`` (a run cut after its last checkpoint wrote more)."""
        kept = []
        if os.path.isfile(self.log_path):
            with open(self.log_path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut by the crash
                    if entry.get("step", 0) > step:
                        break
                    kept.append(line if line.endswith("\n") else line + "\n")
        write_text(self.log_path, "".join(kept))

    def _oom_message(self, step: int, selection) -> str:
        cfg = self.config
        planned = plan_for_run(self.model, cfg, selection, self.loss_chunk)
        estimate = ("the planner cannot model this architecture" if planned is None else
                    f"the planner predicts {planned / GIB:.3f} GiB peak allocated for it")
        if torch.cuda.is_available():
            estimate += f" (the GPU has {torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB)"
        return (f"CUDA out of memory at step {step + 1} (batch {cfg.batch_size} x {cfg.max_length} tokens, "
                f"{len(selection)} trained blocks, frozen blocks {cfg.quantize_frozen or 'not quantized'}); "
                f"{estimate}. "
                f"Lower the batch (batch_size) or the length (max_length), train fewer blocks (k), or use "
                f"quantize_frozen=nf4 and optimizer=adamw8bit; the last checkpoint is kept.")


def tracker_scalars(entry: dict, num_layers: int | None = None, keep_text: bool = False) -> dict:
    """A ``log.jsonl`` entry as the flat ``{name: number}`` a tracker takes: nested dicts joined by ``/``, a list of
    numbers one value per index (per-block scores: ``layer_scores/grad_norm/3``), a selection as its size, its
    lowest block and a 0/1 per block; None and non-finite values are left out (``keep_text``: strings, and lists
    as text, are kept, for a run's configuration)."""
    flat: dict = {}

    def put(name: str, value) -> None:
        if isinstance(value, bool):
            flat[name] = int(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                flat[name] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                put(f"{name}/{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            if name.split("/")[-1] == "selection" and num_layers is not None:
                chosen = set(value)
                flat[f"{name}/count"], flat[f"{name}/lowest"] = len(chosen), min(chosen, default=-1)
                for block in range(num_layers):
                    flat[f"{name}/block_{block}"] = int(block in chosen)
            elif keep_text:
                flat[name] = json.dumps(value)
            else:
                for index, item in enumerate(value):
                    put(f"{name}/{index}", item)
        elif isinstance(value, str) and keep_text:
            flat[name] = value

    put("", entry)
    return flat


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class absent from both counts as 0)."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


def _memory_text(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.memory_allocated() / 2**30:.2f}GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GiB"


def _json_rng(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng(data):
    version, internal, gauss = data
    return version, tuple(internal), gauss


def _strict(value):
    """NaN/inf -> None in nested JSON data."""
    return finite_or_null(value)[0]
