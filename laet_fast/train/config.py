"""TrainConfig: everything that defines a training run, as one dataclass (saved with every checkpoint)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..methods import PROBE_EXAMPLES, parse_method
from ..names import METHODS, NEEDS_K, OPTIMIZERS, PROBE_METHODS, QUANT_MODES, REPORT_TO, TASKS

# Tokens per chunk of the chunked LM-head loss (laet_fast.chunked_loss.DEFAULT_CHUNK, kept here torch-free).
LOSS_CHUNK = 256
SCHEDULES = ("linear", "cosine", "constant_with_warmup", "constant")
# Fields a resumed run may change without changing the run (where to write, how often to report).
# loss_chunk: the chunked loss computes the same loss and gradients as the plain one (to rounding).
RESUMABLE_CHANGES = ("out", "keep", "progress", "eval_every", "resume", "report_to", "loss_chunk")


@dataclass
class TrainConfig:
    """A training run.

    Attributes:
        task: ``"classify"`` (text + label, heads on pooled block outputs), ``"lm"`` (next-token loss on every
            token) or ``"sft"`` (chat, prompt/completion or Alpaca rows; the loss on the answers only:
            ``laet_fast.train.sft``).
        method: one of ``laet_fast.train.METHODS`` or an explicit list of blocks (``"3,7,12"``).
        k: number of blocks for methods that need one (``laet`` and ``grad_norm`` choose without it).
        splits: ``grad_norm``'s variance splits (IR-Tuning's ``split_num``).
        quantize_frozen: ``"nf4"``, ``"fp4"``, ``"int8"`` or None: storage of the frozen blocks.
        optimizer: ``"adamw"`` or ``"adamw8bit"``; ``lr``, ``weight_decay`` (matrices only).
        schedule, warmup_steps: ``transformers.get_scheduler``'s name and warmup (decay follows).
        max_steps / epochs: length of training (``max_steps`` wins when both are set).
        batch_size, grad_accum: sequences per forward pass, forward passes per optimizer step.
        max_length: tokens per text; longer texts are truncated (and counted in the log).
        packing: ``sft`` only: lay examples end to end in rows of ``max_length`` tokens, attention kept inside
            each example (refused for a model whose attention does not).
        loss_chunk: ``lm`` / ``sft``: the LM head and its cross-entropy run this many tokens at a time
            (``laet_fast.chunked_loss``), so that the ``[tokens, vocab]`` logits and their gradient never exist
            whole; 0 uses the model's own loss (as does a model whose logits are not its head's plain output).
        eval_every, save_every, keep: evaluate / checkpoint every N optimizer steps; keep the last ``keep``.
        eval_fraction: share of the data held out (seeded, stratified for ``classify``) when no eval data is given.
        score_batches: batches of training data the method scores on (methods other than ``laet`` / ``laet-cost``).
        probe_examples: training examples LAET's probes (``laet``, ``laet-cost``) learn from: the first this many
            of the seeded training stream, or all when there are fewer.
        budget_s, budget_gb: ``laet-cost`` only, at most one: the predicted seconds per step or GiB that cap its
            set (``laet_fast.cost.laet_cost_selection``). Seconds are predicted with ``cost.CPU_DEFAULT``, the
            calibration of the reference CPU, whatever the run's device.
        reselect_every: re-select every N steps (IR-Tuning); 0 keeps the first selection.
        gradient_checkpointing: non-reentrant checkpointing on the trained blocks.
        max_nan_steps: stop after this many NaN losses in a row (each NaN step is skipped).
        seed: seed of the split, the shuffling, the heads and ``random``.
        out: the run folder (log.jsonl, checkpoints/, model/, report.*).
        progress: show the progress bars; resume: continue from the newest checkpoint in ``out``.
        report_to: also log what ``log.jsonl`` holds (losses, evaluations, per-block scores, selections) to an
            experiment tracker through accelerate (``"tensorboard"``, ``"wandb"``, ``"mlflow"``...; the tracker's
            package must be installed); ``"none"``: ``log.jsonl`` only.
        head_hidden: hidden sizes of LAET's probe heads.

    The defaults of ``method``, ``lr``, ``batch_size``, ``epochs``, ``max_length``, ``score_batches`` and
    ``probe_examples`` are the accuracy table's regime and pick (``benchmarks/results/accuracy.json``,
    ``default``; ``tests/test_defaults_from_table.py`` holds them to it): LAET, one epoch in batches of 16 x 64
    tokens, at 1e-3. That rate is LAET's: for ``"all"`` and ``"grad_norm"`` the table chose 3e-4 (at 1e-3, full
    fine-tuning lost 9 points of test accuracy on Rotten Tomatoes and fell to the majority class on tweets).
    """

    task: str = "classify"
    method: str = "laet"
    k: int | None = None
    splits: int = 1
    quantize_frozen: str | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 64
    packing: bool = False
    loss_chunk: int = LOSS_CHUNK
    eval_every: int = 0
    save_every: int = 0
    keep: int = 2
    eval_fraction: float = 0.2
    score_batches: int = 4
    probe_examples: int = PROBE_EXAMPLES
    budget_s: float | None = None
    budget_gb: float | None = None
    reselect_every: int = 0
    gradient_checkpointing: bool = False
    max_nan_steps: int = 5
    seed: int = 0
    out: str = "laet-run"
    progress: bool = True
    resume: bool = False
    report_to: str = "none"
    head_hidden: tuple[int, ...] = field(default=(128, 64))

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {', '.join(TASKS)}.")
        method = parse_method(self.method)
        self.method = method if isinstance(method, str) else ",".join(map(str, method))
        if self.method in PROBE_METHODS and self.task != "classify":
            others = ", ".join(m for m in METHODS if m not in PROBE_METHODS)
            raise ValueError(f"method {self.method!r} trains probes on class labels, which task={self.task!r} has "
                             f"none of; choose another method ({others}), e.g. method='grad_norm'.")
        if self.k is None and self.method in NEEDS_K:
            raise ValueError(f"method {self.method!r} needs k, the number of blocks to train.")
        if self.packing and self.task != "sft":
            raise ValueError(f"packing lays sft examples end to end; task={self.task!r} does not pack; turn packing "
                             f"off (packing).")
        budgets = [name for name in ("budget_s", "budget_gb") if getattr(self, name) is not None]
        if budgets and self.method != "laet-cost":
            raise ValueError(f"{budgets[0]} caps the blocks of method 'laet-cost' only; drop it, or use "
                             f"method='laet-cost'.")
        if len(budgets) > 1:
            raise ValueError("give one of budget_s and budget_gb, not both.")
        for name in budgets:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r} must be a finite number > 0.")
        self.quantize_frozen = _quantize_name(self.quantize_frozen)
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to={self.report_to!r}: choose one of {', '.join(REPORT_TO)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        for name in ("batch_size", "grad_accum", "max_length", "max_nan_steps", "keep", "score_batches", "splits",
                     "probe_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        for name in ("eval_every", "save_every", "reselect_every", "warmup_steps", "loss_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0 (0 turns it off).")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps={self.max_steps!r} must be an integer >= 1.")
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs!r} must be > 0.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction!r} must be between 0 and 1.")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k={self.k!r} must be an integer >= 1.")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0.")
        if self.reselect_every and self.save_every and self.save_every % self.reselect_every:
            # A checkpoint between two re-selections would have to hold the probe's half-filled
            # scoring window; at a re-selection the window is empty, so resume is exact.
            raise ValueError(f"save_every={self.save_every} must be a multiple of reselect_every="
                             f"{self.reselect_every}, so that checkpoints fall on re-selections.")
        self.head_hidden = tuple(int(h) for h in self.head_hidden)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["head_hidden"] = list(self.head_hidden)
        return data

    @classmethod
    def defaults(cls) -> dict:
        """The default of each field, without building (and checking) a config."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _quantize_name(mode) -> str | None:
    """laet_fast.quantize.mode_name's rule, without importing torch: None/"none" or a mode in any casing."""
    name = None if mode is None else str(mode).strip().lower()
    if name in (None, "none"):
        return None
    if name not in QUANT_MODES:
        raise ValueError(f"quantize_frozen={mode!r}: choose none or one of {', '.join(QUANT_MODES)}.")
    return name
