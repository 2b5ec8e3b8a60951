"""The end-of-run report: what was trained, what it cost, what it reached; as text, JSON and PNG."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from ..methods import PROBE_METHODS, probe_spread

GIB = 2**30


@dataclass
class TrainReport:
    """What a run trained and measured.

    Attributes:
        selection: the blocks trained at the end (``num_layers`` in all); ``head_layers`` carry heads.
        trainable_params / total_params: after ``apply_selection`` (heads included in trainable).
        peak_memory: bytes; ``memory_kind`` says which measure (CUDA ``max_memory_allocated`` or the
            process's peak RSS on CPU); ``planned_memory``: ``plan_memory``'s ``peak_allocated`` for
            the same selection, batch and length (None when it cannot model the architecture).
        forward: how much of the model the forward pass runs (``classify`` stops at the highest head).
        time_per_step: mean seconds per optimizer step; ``scoring_time`` and ``training_time`` in seconds.
        cpu_threads: torch's CPU thread count during the run (``--threads``); None on CUDA.
        metrics: the final evaluation.
        probe_baseline: ``classify``: the evaluation split's ``accuracy`` and ``macro_f1`` before any training step:
            LAET's methods: ``best_probe`` (the frozen probe of highest cross-validated accuracy, its ``block``)
            and ``probe_vote`` (the vote of the frozen probes on the trained ``blocks``); other methods:
            ``last_block_head`` (untrained). None for ``lm``.
        probe_spread: LAET's methods: the probes' per-block accuracy across folds (``methods.probe_spread``:
            ``mean``, ``std``, ``folds``, ``examples``, and whether it is ``too_wide`` to separate the blocks).
    """

    model: str
    task: str
    method: str
    selection: list[int]
    num_layers: int
    head_layers: list[int]
    trainable_params: int
    total_params: int
    quantize_frozen: str | None
    peak_memory: int
    memory_kind: str
    planned_memory: int | None
    forward: dict
    steps: int
    skipped_steps: int
    time_per_step: float
    scoring_time: float
    training_time: float
    metrics: dict
    export_dir: str
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    cpu_threads: int | None = None
    probe_baseline: dict | None = None
    probe_spread: dict | None = None

    @classmethod
    def build(cls, cfg, state, *, model_name: str, classes, scores, probe_baseline, planned: int | None, task_model,
              apply_report, steps: int, peak: int, cuda: bool, scoring_time: float, training_time: float,
              export_dir: str) -> "TrainReport":
        """The report of a run from its config and final ``RunState`` (selection, skipped steps, last evaluation,
        step times), what the run was (model, classes, LAET's scores and probe baseline, the plan's peak) and what
        it measured."""
        selection, metrics, step_times, skipped = state.selection, state.metrics, state.step_times, state.skipped
        notes = []
        if not cuda:
            notes.append("peak memory on CPU is the whole process's peak RSS (Python, libraries, model loading "
                         "included); the plan counts training tensors only")
        top = max(task_model.head_layers, default=None) if cfg.task == "classify" else None
        if planned is not None and top is not None and top < len(task_model.stack) - 1:
            notes.append(f"the plan counts the forward pass of every block; classify stops at the highest head "
                         f"(block {top}), so the blocks above it cost nothing")
        spread = None
        if cfg.method in PROBE_METHODS:
            margin = {"margin": selection.params["margin"]} if "margin" in selection.params else {}  # top-k: none
            spread = probe_spread(scores, **margin)
            if spread is not None and spread["too_wide"]:
                notes.append(f"the probes' spread is too wide to separate the blocks: a block's mean probe accuracy "
                             f"is uncertain by {spread['uncertainty']:.4f} (median std over {spread['folds']} folds / "
                             f"sqrt({spread['folds']})), as much as LAET's gap between kept and dropped blocks "
                             f"({spread['gap']:.4f}); more examples (probe_examples, --probe-examples) narrow it")
        _, non_finite = finite_or_null(metrics)
        if non_finite:
            notes.append(f"the final evaluation's {', '.join(non_finite)} {'is' if len(non_finite) == 1 else 'are'} "
                         f"not finite (NaN or inf; null in report.json): the model's outputs overflowed or the "
                         f"weights diverged. Lower the learning rate (lr, --lr), or check the data")
        return cls(
            model=model_name, task=cfg.task, method=cfg.method, selection=list(selection.layers),
            num_layers=selection.num_layers, head_layers=task_model.head_layers,
            trainable_params=apply_report.trainable_params, total_params=apply_report.total_params,
            quantize_frozen=cfg.quantize_frozen, peak_memory=int(peak),
            memory_kind="CUDA max_memory_allocated" if cuda else "peak RSS of the process",
            planned_memory=planned, forward=_forward_share(task_model), steps=steps, skipped_steps=skipped,
            time_per_step=sum(step_times) / max(len(step_times), 1), scoring_time=scoring_time,
            training_time=training_time, metrics=metrics, export_dir=export_dir, classes=classes, notes=notes,
            cpu_threads=None if cuda else torch.get_num_threads(), probe_baseline=probe_baseline,
            probe_spread=spread,
        )

    def text(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        fwd = self.forward
        lines = [
            f"laet_fast training report: {self.model}, task {self.task}, method {self.method}",
            f"  trained blocks     {self.selection} of {self.num_layers}"
            + (f"; heads on {self.head_layers}" if self.head_layers else ""),
            f"  trainable params   {self.trainable_params:,} ({share:.2f}% of {self.total_params:,})",
            f"  frozen blocks      {self.quantize_frozen or 'not quantized'}",
            f"  forward pass       blocks 0..{fwd['blocks_run'] - 1} of {self.num_layers}"
            + ("" if fwd["lm_head_run"] else ", LM head never run")
            + f": {100 * fwd['saved_share']:.1f}% of the forward matmul weights skipped",
            f"  peak memory        {self.peak_memory / GIB:.3f} GiB ({self.memory_kind})"
            + (f"; planner: {self.planned_memory / GIB:.3f} GiB" if self.planned_memory is not None else ""),
            f"  time               {self.time_per_step:.3f} s/step over {self.steps} steps"
            + (f" on {self.cpu_threads} CPU threads" if self.cpu_threads else "")
            + (f" ({self.skipped_steps} skipped)" if self.skipped_steps else "")
            + f"; scoring {self.scoring_time:.1f} s, training {self.training_time:.1f} s",
            "  final metrics      " + ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()),
            *self._probe_lines(),
            f"  model              {self.export_dir}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _probe_lines(self) -> list[str]:
        """The probe baseline and spread lines of ``text()``."""
        lines = []
        baseline = self.probe_baseline or {}

        def scored(entry):
            return f"accuracy {entry['accuracy']:.4f}, macro_f1 {entry['macro_f1']:.4f}"

        if "best_probe" in baseline:
            best, voted = baseline["best_probe"], baseline["probe_vote"]
            lines.append(f"  before training    best frozen probe (block {best['block']}) {scored(best)}; probe vote "
                         f"(blocks {voted['blocks']}) {scored(voted)}")
        elif "last_block_head" in baseline:
            head = baseline["last_block_head"]
            lines.append(f"  before training    last-block head (block {head['block']}, untrained) {scored(head)}")
        spread = self.probe_spread
        if spread is not None:
            per_block = ", ".join(f"{i} {mean:.3f}±{std:.3f}"
                                  for i, (mean, std) in enumerate(zip(spread["mean"], spread["std"])))
            lines.append(f"  probe accuracy     per block, mean±std over {spread['folds']} folds of "
                         f"{spread['examples']} examples: {per_block}"
                         + ("; too wide to separate the blocks" if spread["too_wide"] else ""))
        return lines

    def __str__(self) -> str:
        return self.text()

    def to_dict(self) -> dict:
        """The report as strict JSON data: a non-finite number is None (``notes`` says which)."""
        return finite_or_null(asdict(self))[0]

    def write(self, out: str, scores=None) -> None:
        """OUT/report.txt, OUT/report.json and, with matplotlib and layer scores, OUT/report.png (the scores
        with the trained blocks marked). Each file is written beside its name and renamed when complete, so
        a kill leaves the previous file or none, never a partial one."""
        from ..atomic import write_file, write_text

        write_text(os.path.join(out, "report.txt"), self.text() + "\n")
        write_text(os.path.join(out, "report.json"), json.dumps(self.to_dict(), indent=1, allow_nan=False))
        if scores is not None and len(scores):
            title = f"{os.path.basename(self.model)}: method {self.method}, trained blocks {self.selection} (red)"
            try:
                write_file(os.path.join(out, "report.png"),
                           lambda path: scores.plot(path, selection=self.selection, title=title))
            except ImportError:
                pass


def finite_or_null(value, name: str = "") -> tuple[object, list[str]]:
    """(``value`` with every NaN / inf float in its nested dicts and lists replaced by None, the dotted names of
    the values replaced), e.g. ``({"loss": None}, ["loss"])``: strict JSON data, and what to say about it."""
    if isinstance(value, float):
        return (value, []) if math.isfinite(value) else (None, [name or "value"])
    if isinstance(value, dict):
        items = [(key, finite_or_null(item, f"{name}.{key}" if name else str(key))) for key, item in value.items()]
        return {key: item for key, (item, _) in items}, [n for _, (_, names) in items for n in names]
    if isinstance(value, (list, tuple)):
        items = [finite_or_null(item, f"{name}[{i}]") for i, item in enumerate(value)]
        return [item for item, _ in items], [n for _, names in items for n in names]
    return value, []


def plan_for_run(model, cfg, selection, loss_chunk: int) -> int | None:
    """The plan's peak allocated bytes for a run of ``cfg`` training ``selection`` of ``model`` (None when the planner
    does not know the model's shape)."""
    from ..memory import dtype_label, plan_memory

    dtype = next(model.parameters()).dtype
    try:
        plan = plan_memory(model.config, selection, seq_len=cfg.max_length, batch_size=cfg.batch_size,
                           quantize_frozen=cfg.quantize_frozen, optimizer=cfg.optimizer, dtype=dtype_label(dtype),
                           keep_logits=cfg.task != "classify" and not loss_chunk,
                           loss_chunk=loss_chunk, lm_head=cfg.task != "classify")
    except ValueError:
        return None
    return plan.peak_allocated


def _forward_share(task_model) -> dict:
    """The blocks and LM head the forward pass runs, and the share of the forward's matmul weights it skips."""
    from ..apply import logical_numel

    blocks = [sum(logical_numel(p) for p in block.parameters()) for block in task_model.stack]
    head = task_model.model.get_output_embeddings()
    head_numel = head.weight.numel() if head is not None else 0
    run = task_model.top_block + 1
    lm_head_run = task_model.task != "classify"
    full = sum(blocks) + head_numel
    used = sum(blocks[:run]) + (head_numel if lm_head_run else 0)
    return {"blocks_run": run, "lm_head_run": lm_head_run, "saved_share": 1.0 - used / max(full, 1)}
