"""Predict the peak GPU memory of one layer-selective training step, term by term.

The model is a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM...) trained as
``laet_fast.apply_selection`` leaves it: the selected blocks trainable in the training dtype, every
other block frozen (its linear weights optionally quantized by bitsandbytes), embeddings, final norm
and LM head frozen unless named in ``train_extra``, and the backward pass cut below the lowest
trained block. One step is ``out = model(ids, labels=ids, use_cache=False); out.loss.backward();
opt.step(); opt.zero_grad(set_to_none=True)`` and the plan describes the steady state (second and
later steps, when the optimizer state already exists).

Memory is counted in bytes of live tensors, which is what ``torch.cuda.max_memory_allocated``
measures. The terms and where they coexist:

* weights (frozen + trained) and optimizer state live for the whole step;
* activations (tensors autograd saves for backward) and logits peak together at the start of the
  backward pass, when the loss gradient is materialised;
* gradients fill up during backward, after the activations above them were released, and meet the
  optimizer's temporaries in ``step()``.

So ``peak_allocated = weights + optimizer_state + max(activations + logits, backward working set,
gradients + step temporaries)``; ``total`` adds a stated overhead for the CUDA context and the caching
allocator's slack, which ``max_memory_allocated`` does not see but a GPU budget must.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from laet_fast.names import OPTIMIZERS, QUANT_MODES
from laet_fast.selection import Selection

GIB = 1024**3

ATTENTION = ("sdpa", "eager")
_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32"}

# bitsandbytes storage constants (0.45 - 0.50), the defaults of Linear4bit / Linear8bitLt / AdamW8bit.
NF4_BLOCKSIZE = 64  # elements per absmax scale of a 4-bit weight
NF4_NESTED_BLOCKSIZE = 256  # absmax scales per second-level fp32 scale (double quantization)
NF4_CODE_BYTES = 16 * 4  # the 16-entry fp32 NF4/FP4 code table each quantized weight keeps
NF4_OFFSET_BYTES = 4  # fp32 mean subtracted from the absmax before double quantization
DYNAMIC_MAP_BYTES = 256 * 4  # bitsandbytes' 8-bit dynamic code table (fp32)
ADAM8_BLOCKSIZE = 256  # elements per absmax of an 8-bit optimizer state
ADAM8_MIN_SIZE = 4096  # AdamW8bit keeps fp32 states for parameters with fewer elements (min_8bit_size)

# Model types whose blocks are exactly the Llama block modelled here (bias layout read from the config).
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "smollm", "smollm3", "granite", "olmo", "internlm2", "yi")

# Public shapes of a few models (random weights are enough for memory planning). Fields are LlamaConfig's.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0),
}


def shape_config(name: str):
    """A ``transformers.LlamaConfig`` with the real dimensions of a built-in model shape (see ``MODEL_SHAPES``)."""
    key = name.lower()
    if key not in MODEL_SHAPES:
        raise ValueError(f"Unknown model shape {name!r}; built-in shapes: {', '.join(MODEL_SHAPES)}.")
    from transformers import LlamaConfig

    config = LlamaConfig(**MODEL_SHAPES[key])
    config.name_or_path = key
    return config


@dataclass(frozen=True)
class BlockShape:
    """The dimensions of a Llama-style decoder read from a config (see :func:`block_shape`)."""

    hidden: int
    intermediate: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int, bool]]:
        """(out_features, in_features, has_bias) of the 7 linear layers of one block."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return [(q, h, self.qkv_bias), (kv, h, self.qkv_bias), (kv, h, self.qkv_bias), (h, q, self.o_bias),
                (i, h, self.mlp_bias), (i, h, self.mlp_bias), (h, i, self.mlp_bias)]

    def block_param_sizes(self) -> list[int]:
        """Element counts of every parameter tensor of one block (weights, biases, the two norms)."""
        sizes = []
        for out_f, in_f, bias in self.linears():
            sizes.append(out_f * in_f)
            if bias:
                sizes.append(out_f)
        return sizes + [self.hidden, self.hidden]


def _read(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def block_shape(config: Any) -> BlockShape:
    """Read a Llama-style decoder's dimensions from a transformers config (or a config.json dict).

    Raises:
        ValueError: the config lacks a field the plan needs (it is not a Llama/Mistral/Qwen2-style decoder).
    """
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in needed if not isinstance(_read(config, key), int)]
    model_type = str(_read(config, "model_type", "") or "")
    if missing:
        raise ValueError(
            f"Cannot plan memory for this config (model_type={model_type or 'unknown'!r}): it has no integer "
            f"{', '.join(missing)}. plan_memory models Llama/Mistral/Qwen2-style decoders; pass such a config "
            f"or one of the built-in shapes ({', '.join(MODEL_SHAPES)})."
        )
    hidden, heads = _read(config, "hidden_size"), _read(config, "num_attention_heads")
    head_dim = _read(config, "head_dim") or hidden // heads
    kv_heads = _read(config, "num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}.")
    attention_bias = bool(_read(config, "attention_bias", False))
    qkv_bias = attention_bias or model_type == "qwen2"  # Qwen2 always has q/k/v biases and no o_proj bias
    return BlockShape(
        hidden=hidden, intermediate=_read(config, "intermediate_size"), num_layers=_read(config, "num_hidden_layers"),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=_read(config, "vocab_size"),
        tied=bool(_read(config, "tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=attention_bias,
        mlp_bias=bool(_read(config, "mlp_bias", False)), model_type=model_type or "llama",
        name=str(_read(config, "name_or_path", "") or _read(config, "_name_or_path", "") or model_type or "model"),
    )


def dtype_label(dtype: Any) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for a training dtype given by name or as a torch.dtype."""
    key = dtype.lower() if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"Unsupported training dtype {dtype!r}; use 'bf16', 'fp16' or 'fp32'.")
    return _DTYPE_NAMES[key]


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a training dtype (see :func:`dtype_label`)."""
    return 4 if dtype_label(dtype) == "fp32" else 2


def quantized_weight_bytes(numel: int, out_features: int, mode: str | None, dtype_size: int) -> int:
    """Bytes of one frozen linear weight (bias excluded) stored as ``mode``.

    ``nf4``/``fp4`` (``bnb.nn.Linear4bit``, double quantization as bitsandbytes does by default): packed
    4-bit values, one uint8 absmax per 64 elements, one fp32 second-level absmax per 256 of those, the
    fp32 offset, the 16-entry fp32 code table and the 256-entry fp32 code table of the absmax (each
    quantized weight holds its own copy). ``int8`` (``Linear8bitLt``): one byte per element plus an fp32 scale per
    output row. None: the training dtype.
    """
    if mode is None:
        return numel * dtype_size
    if mode == "int8":
        return numel + 4 * out_features
    if mode in ("nf4", "fp4"):
        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        nested = math.ceil(blocks / NF4_NESTED_BLOCKSIZE)
        return (numel + 1) // 2 + blocks + 4 * nested + NF4_OFFSET_BYTES + NF4_CODE_BYTES + DYNAMIC_MAP_BYTES
    raise ValueError(f"Unknown quantization {mode!r}; choose None, 'none' or one of {', '.join(QUANT_MODES)}.")


def optimizer_state_bytes(sizes: Sequence[int], optimizer: str, dtype_size: int) -> int:
    """Bytes of optimizer state for trained parameters with element counts ``sizes``.

    ``adamw`` is ``torch.optim.AdamW``: ``exp_avg`` and ``exp_avg_sq`` in the parameter dtype (so 2 x 2
    bytes for bf16 parameters, not fp32) plus a 4-byte fp32 ``step`` per tensor (on the host on CUDA
    unless ``capturable``/``fused``; counted anyway, it is a few hundred bytes). ``adamw8bit`` is
    ``bnb.optim.AdamW8bit``: two uint8 states with an fp32 absmax per 256 elements, except tensors
    under 4096 elements, which get two fp32 states; plus the two shared 256-entry fp32 code tables.
    """
    if optimizer == "adamw":
        return sum(2 * n * dtype_size + 4 for n in sizes)
    if optimizer == "adamw8bit":
        total, eight_bit = 0, False
        for n in sizes:
            if n < ADAM8_MIN_SIZE:
                total += 2 * 4 * n
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / ADAM8_BLOCKSIZE)
                eight_bit = True
        return total + (2 * DYNAMIC_MAP_BYTES if eight_bit else 0)
    raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")


def block_activation_bytes(shape: BlockShape, tokens: int, batch: int, seq: int, dtype_size: int, *,
                           trained: bool, input_requires_grad: bool, attn: str = "sdpa",
                           quantize: str | None = None) -> int:
    """Bytes one decoder block saves for backward (HF's Llama block: RMSNorm, RoPE, attention, SwiGLU MLP).

    With ``s = tokens``, ``b`` the dtype size, ``h``/``I`` hidden/intermediate, ``qd``/``kvd`` the query and
    key/value widths (the RoPE cos/sin, shared by all blocks, are counted once by the caller):

    * each RMSNorm saves its input upcast to fp32 and the fp32 ``rsqrt`` (``4 s (h + 1)``, for the input
      gradient: only when its input requires grad) and, if its weight trains, the normalised value (``b s h``);
    * trained linears save their input: ``b s h`` twice (q/k/v share the first norm's output, gate/up the
      second's), ``b s qd`` for o_proj, ``b s I`` for down_proj (frozen int8 linears save it too:
      bitsandbytes' MatMul8bitLt keeps its input whenever any gradient is needed);
    * SwiGLU saves SiLU's input, SiLU's output and the up projection: ``3 b s I``;
    * attention, ``sdpa`` (flash/efficient kernels): query ``b s qd``, key and value ``2 b s kvd``
      (GQA without repeat_kv, as transformers calls SDPA without a padding mask), output ``b s qd``
      (the same storage o_proj saves, so o_proj adds nothing) and the fp32 log-sum-exp ``4 B heads S``;
      ``eager``: query, repeated key and value ``3 b s qd``, the fp32 softmax ``4 B heads S^2`` and its
      cast to the dtype ``b B heads S^2`` (the same tensor when the dtype is fp32).
    """
    h, inter, qd, kvd = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    b = dtype_size
    saved_linear_input = trained or quantize == "int8"
    total = 0
    # Two RMSNorms.
    if input_requires_grad:
        total += 4 * tokens * (h + 1)  # input_layernorm's fp32 input and its fp32 rsqrt
    total += 4 * tokens * (h + 1)  # post_attention_layernorm's: the residual stream always requires grad here
    if trained:
        total += 2 * b * tokens * h  # normalised values for the two norm-weight gradients
    if saved_linear_input:
        total += 2 * b * tokens * h  # input of q/k/v and of gate/up
        total += b * tokens * inter  # input of down_proj
    total += 3 * b * tokens * inter  # SiLU input, SiLU output, up output
    if attn == "sdpa":
        total += 2 * b * tokens * qd + 2 * b * tokens * kvd + 4 * batch * shape.heads * seq
    elif attn == "eager":
        probs = batch * shape.heads * seq * seq
        total += 3 * b * tokens * qd + 4 * probs + (b * probs if b != 4 else 0)
        if saved_linear_input:
            total += b * tokens * qd  # o_proj's input: a contiguous copy of the attention output
    else:
        raise ValueError(f"Unknown attention implementation {attn!r}; choose one of {', '.join(ATTENTION)}.")
    return total


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training step, in bytes per term (see the module docstring).

    Attributes:
        frozen_weights: frozen parameters, quantized block linears included with their scales.
        trained_weights: trained parameters (training dtype).
        gradients: their ``.grad`` (same dtype and size).
        optimizer_state: optimizer state tensors.
        activations: tensors saved for backward by the blocks from the lowest trained one up (plus the
            final norm and the shared RoPE tables).
        logits: the loss's memory at the start of backward: the dtype logits kept in the model output,
            the fp32 log-softmax saved by cross-entropy, its gradient and the logits' fp32 gradient
            (``batch * seq * vocab * (b + 12)`` bytes).
        step_temporaries: the largest transient of the phases after the loss (backward working set of
            a block, or ``torch.optim.AdamW``'s foreach temporaries: one copy of the trained parameters).
        peak_allocated: the predicted ``torch.cuda.max_memory_allocated`` of a steady-state step.
        peak_phase: ``"loss"`` (activations + logits), ``"backward"`` or ``"optimizer step"``.
        phases: bytes above weights + optimizer state at each of those three moments.
        overhead: CUDA context plus caching-allocator slack, not seen by ``max_memory_allocated``.
        total: ``peak_allocated + overhead``: what the GPU must have free.
    """

    frozen_weights: int
    trained_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    step_temporaries: int
    peak_allocated: int
    peak_phase: str
    phases: dict[str, int]
    overhead: int
    total: int
    model: str = ""
    layers: tuple[int, ...] = ()
    num_layers: int = 0
    seq_len: int = 0
    batch_size: int = 0
    dtype: str = "bf16"
    quantize_frozen: str | None = None
    optimizer: str = "adamw"
    attn_implementation: str = "sdpa"
    train_extra: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    TERMS = ("frozen_weights", "trained_weights", "gradients", "optimizer_state", "activations", "logits",
             "step_temporaries")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["train_extra"] = list(self.train_extra)
        data["gib"] = {key: data[key] / GIB for key in (*self.TERMS, "peak_allocated", "overhead", "total")}
        return data

    def __str__(self) -> str:
        trained = _ranges(self.layers) if self.layers else "none"
        extra = f" + {', '.join(self.train_extra)}" if self.train_extra else ""
        lines = [
            f"Memory plan for {self.model or 'model'}: train {len(self.layers)} of {self.num_layers} blocks "
            f"[{trained}]{extra}",
            f"  seq {self.seq_len} x batch {self.batch_size}, {self.dtype}, frozen blocks "
            f"{self.quantize_frozen or 'not quantized'}, {self.optimizer}, {self.attn_implementation} attention",
            f"  {'term':<28}{'GiB':>9}",
        ]
        labels = {"frozen_weights": "frozen weights", "trained_weights": "trained weights",
                  "gradients": "gradients", "optimizer_state": "optimizer state", "activations": "activations",
                  "logits": "logits + loss", "step_temporaries": "backward/step temporaries"}
        for key in self.TERMS:
            lines.append(f"  {labels[key]:<28}{getattr(self, key) / GIB:>9.3f}")
        lines += [
            f"  {'peak allocated':<28}{self.peak_allocated / GIB:>9.3f}   (at the {self.peak_phase})",
            f"  {'overhead':<28}{self.overhead / GIB:>9.3f}   (CUDA context + allocator slack)",
            f"  {'total':<28}{self.total / GIB:>9.3f}",
            "  peak = weights + optimizer state + max(activations + logits, gradients + temporaries):",
            "  gradients fill up only after the activations above them are freed.",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _ranges(layers: Sequence[int]) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


_EXTRA_NAMES = {"embed_tokens": "embeddings", "embeddings": "embeddings", "wte": "embeddings",
                "norm": "final_norm", "final_norm": "final_norm", "final_layernorm": "final_norm",
                "ln_f": "final_norm", "lm_head": "lm_head"}


def extra_parts(train_extra: Sequence[str]) -> set[str]:
    parts = set()
    for name in train_extra:
        key = _EXTRA_NAMES.get(str(name).rsplit(".", 1)[-1])
        if key is None:
            raise ValueError(f"train_extra entry {name!r} is not one the planner knows; use embed_tokens, norm "
                             f"or lm_head (dotted paths like 'model.norm' are fine).")
        parts.add(key)
    return parts


def layers_of(selection_or_k: Any, num_layers: int) -> tuple[int, ...]:
    if isinstance(selection_or_k, Selection):
        selection_or_k.check_model(num_layers)
        return selection_or_k.layers
    if isinstance(selection_or_k, bool):
        raise TypeError("selection_or_k must be a Selection, a list of block indices or an int k, not a bool.")
    if isinstance(selection_or_k, int):
        if not 0 <= selection_or_k <= num_layers:
            raise ValueError(f"k={selection_or_k} is out of range: the model has {num_layers} blocks, so choose "
                             f"0 <= k <= {num_layers}.")
        return tuple(range(num_layers - selection_or_k, num_layers))
    if isinstance(selection_or_k, (Sequence, set, frozenset)) and not isinstance(selection_or_k, str):
        return Selection(layers=tuple(selection_or_k), num_layers=num_layers).layers
    raise TypeError(f"selection_or_k must be a Selection, a list of block indices or an int k, "
                    f"not {type(selection_or_k).__name__}.")


def plan_memory(
    config: Any,
    selection_or_k: Selection | Sequence[int] | int,
    seq_len: int,
    batch_size: int = 1,
    quantize_frozen: str | None = None,
    optimizer: str = "adamw",
    dtype: Any = "bf16",
    train_extra: Sequence[str] = (),
    attn_implementation: str = "sdpa",
    keep_logits: bool = True,
    loss_chunk: int = 0,
    lm_head: bool = True,
    cuda_context_gb: float = 0.5,
    allocator_slack: float = 0.05,
) -> MemoryPlan:
    """Predict the peak memory of one training step of a Llama-style decoder under a layer selection.

    Args:
        config: a transformers config (Llama, Mistral, Qwen2 and alike, or a config.json dict), or
            ``shape_config(name)`` for a built-in shape.
        selection_or_k: a ``Selection``, a list of block indices, or an int ``k`` for the last ``k``
            blocks (the backward pass then stops at block ``num_layers - k``). ``k = 0`` plans a frozen
            model (forward and loss only).
        seq_len, batch_size: tokens per sequence and sequences per step (no padding mask: SDPA takes its
            causal flash path).
        quantize_frozen: None/"none", "nf4", "fp4" or "int8": storage of the frozen blocks' linear weights
            (norms stay in ``dtype``; embeddings and LM head are never quantized).
        optimizer: "adamw" (``torch.optim.AdamW``, foreach on CUDA) or "adamw8bit" (``bnb.optim.AdamW8bit``).
        dtype: the dtype of the whole model during training ("bf16", "fp16", "fp32" or a torch dtype).
        train_extra: further trained parts: "embed_tokens", "norm", "lm_head" (dotted paths accepted;
            all blocks plus all three is full fine-tuning).
        attn_implementation: "sdpa" (default of transformers) or "eager".
        keep_logits: the caller keeps the model output (and so the ``dtype`` logits) alive during backward,
            as ``out = model(...); out.loss.backward()`` does.
        loss_chunk: the LM head and its loss run this many tokens at a time (``laet_fast.chunked_loss``, as
            ``TrainConfig.loss_chunk`` does for ``lm`` / ``sft``): one chunk's logits and their gradient at a
            time, plus the hidden states' gradient, computed in the forward pass; 0: the plain loss.
        lm_head: the LM head and its loss run (``lm``, ``sft``). False: a classification run
            (``laet_fast.Trainer``'s ``classify``), whose heads read pooled block outputs and whose forward
            pass never reaches the LM head, so there are no logits (the blocks above the highest head, which
            do not run either, are still counted: an upper bound there).
        cuda_context_gb, allocator_slack: the overhead term: a fixed CUDA context size (GiB) plus this
            fraction of the allocated peak for the caching allocator's fragmentation.

    Returns:
        A :class:`MemoryPlan` with bytes per term, ``peak_allocated``, ``overhead`` and ``total``.

    The KV cache is not counted: train with ``use_cache=False`` (transformers otherwise keeps every
    layer's keys and values until the output is dropped).
    """
    shape = block_shape(config)
    b = dtype_bytes(dtype)
    dtype_name = dtype_label(dtype)
    quantize = None if quantize_frozen is None or str(quantize_frozen).strip().lower() == "none" \
        else str(quantize_frozen).strip().lower()
    if quantize is not None and quantize not in QUANT_MODES:
        raise ValueError(f"Unknown quantization {quantize_frozen!r}; choose None, 'none' or one of "
                         f"{', '.join(QUANT_MODES)}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if attn_implementation not in ATTENTION:
        raise ValueError(f"Unknown attention implementation {attn_implementation!r}; choose one of "
                         f"{', '.join(ATTENTION)}.")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    layers = layers_of(selection_or_k, shape.num_layers)
    extra = extra_parts(train_extra)
    trained_set = set(layers)
    tokens = batch_size * seq_len
    h, vocab = shape.hidden, shape.vocab
    notes = []
    if shape.model_type not in _LLAMA_LIKE:
        notes.append(f"model_type {shape.model_type!r} is planned as a Llama-style block; check the numbers.")

    # Weights and the trained parameter list.
    block_sizes = shape.block_param_sizes()
    frozen = trained = 0
    trained_sizes: list[int] = []
    for index in range(shape.num_layers):
        if index in trained_set:
            trained += b * sum(block_sizes)
            trained_sizes += block_sizes
            continue
        for out_f, in_f, bias in shape.linears():
            frozen += quantized_weight_bytes(out_f * in_f, out_f, quantize, b) + (b * out_f if bias else 0)
        frozen += 2 * b * h
    head_parts = [("embeddings", vocab * h), ("final_norm", h)]
    if not shape.tied:
        head_parts.append(("lm_head", vocab * h))
    trained_parts = {part for part, _ in head_parts
                     if part in extra or (shape.tied and part == "embeddings" and "lm_head" in extra)}
    for part, size in head_parts:
        if part in trained_parts:
            trained += b * size
            trained_sizes.append(size)
        else:
            frozen += b * size
    gradients = trained
    optimizer_state = optimizer_state_bytes(trained_sizes, optimizer, b) if trained_sizes else 0

    # Activations: from the lowest point the gradient reaches up to the final norm.
    lowest = -1 if "embeddings" in trained_parts else (min(layers) if layers else shape.num_layers)
    activations = 0
    per_block = []
    for index in range(max(lowest, 0), shape.num_layers):
        is_trained = index in trained_set
        size = block_activation_bytes(
            shape, tokens, batch_size, seq_len, b, trained=is_trained,
            input_requires_grad=index > lowest, attn=attn_implementation,
            quantize=None if is_trained else quantize)
        per_block.append(size)
        activations += size
    any_grad = bool(layers) or bool(extra)
    head_trained = "lm_head" in trained_parts or (shape.tied and "embeddings" in trained_parts)
    if any_grad:
        if lowest < shape.num_layers:  # the final norm's input carries a gradient
            activations += 4 * tokens * (h + 1)
            if "final_norm" in extra:
                activations += b * tokens * h
        elif "final_norm" in extra:
            activations += b * tokens * h  # only the norm weight trains: its normalised input
        if head_trained:
            activations += b * tokens * h  # the LM head's input
        if lowest < shape.num_layers:
            activations += 2 * b * seq_len * shape.head_dim  # RoPE cos and sin (positions shared by the batch)
        activations += 8 * tokens + 4  # the loss's int64 shifted labels and its fp32 total weight
        if "embeddings" in trained_parts:
            activations += 8 * tokens  # the token ids, for the embedding's gradient

    # Logits: dtype logits (kept by the caller), fp32 log-softmax saved by cross-entropy; at the first
    # backward node also the gradient of the log-softmax and the logits' fp32 gradient.
    upcast = 4 if b != 4 else 0  # logits.float() is a copy unless the logits already are fp32
    held = b * tokens * vocab if keep_logits and lm_head and not loss_chunk else 0  # chunked: none to keep
    if not lm_head:
        logits = 0  # the heads' [batch, classes] logits and pooled features are negligible
    elif loss_chunk and any_grad:
        # One chunk's dtype logits, their fp32 copy and their fp32 gradient; the final hidden states, their
        # shifted copy and its gradient (made in the forward pass).
        logits = min(loss_chunk, tokens) * vocab * (b + upcast + 4) + 3 * b * tokens * h
    elif any_grad:
        logits = held + 12 * tokens * vocab
    else:
        logits = b * tokens * vocab + upcast * tokens * vocab + 4 * tokens * vocab

    # Backward: block by block from the top, gradients accumulate while the tensors saved below stay.
    inter = shape.intermediate
    # The head's gradients (a tied embedding's included) exist before the blocks' backward starts.
    early = {"final_norm"} | ({"lm_head", "embeddings"} if shape.tied else {"lm_head"})
    grads_so_far = sum(b * size for part, size in head_parts if part in early and part in trained_parts)
    remaining = sum(per_block) + (2 * b * seq_len * shape.head_dim if per_block else 0)
    backward = grads_so_far + 2 * b * tokens * h
    mlp_grads = b * 3 * h * inter
    for index, saved in reversed(list(zip(range(max(lowest, 0), shape.num_layers), per_block))):
        is_trained = index in trained_set
        keeps_inputs = is_trained or quantize == "int8"
        # SwiGLU's product backward: all the block's saved tensors are alive, plus the output gradient,
        # down_proj's input gradient, the two product gradients and (trained) down_proj's weight gradient.
        down_grad = b * h * inter if is_trained else 0
        backward = max(backward, grads_so_far + down_grad + remaining + b * tokens * (h + 3 * inter))
        # post_attention_layernorm's backward: the MLP's tensors are released, its weight gradients exist;
        # the residual and norm-output gradients plus about four fp32 temporaries of the RMSNorm backward.
        mlp_saved = 3 * b * tokens * inter + (b * tokens * (h + inter) if keeps_inputs else 0)
        grads_so_far += mlp_grads if is_trained else 0
        backward = max(backward, grads_so_far + remaining - mlp_saved + 2 * b * tokens * h + 16 * tokens * h)
        grads_so_far += b * sum(block_sizes) - mlp_grads if is_trained else 0
        remaining -= saved
        # input_layernorm's backward, the block's last: all its weight gradients exist.
        if index > lowest:
            norm_saved = 4 * tokens * (h + 1) + (b * tokens * h if is_trained else 0)
            backward = max(backward, grads_so_far + remaining + norm_saved + 2 * b * tokens * h + 16 * tokens * h)
    end = gradients + 2 * b * tokens * h
    if "embeddings" in trained_parts and shape.tied:
        end += 2 * b * vocab * h  # the embedding's dense gradient (and its cast) before it joins the head's
    backward = max(backward, end) + held
    foreach = trained if optimizer == "adamw" else 0  # torch.optim.AdamW (foreach): sqrt(exp_avg_sq) copies
    step = gradients + foreach + held
    step_temporaries = max(backward - gradients - held, foreach, 0)

    weights = frozen + trained
    phases = {"loss": activations + logits, "backward": backward, "optimizer step": step}
    phase = max(phases, key=phases.get)
    peak = weights + optimizer_state + phases[phase]
    overhead = int(cuda_context_gb * GIB + allocator_slack * peak)
    return MemoryPlan(
        frozen_weights=frozen, trained_weights=trained, gradients=gradients, optimizer_state=optimizer_state,
        activations=activations, logits=logits, step_temporaries=step_temporaries, peak_allocated=peak,
        peak_phase=phase, phases=phases, overhead=overhead, total=peak + overhead, model=shape.name,
        layers=tuple(layers), num_layers=shape.num_layers, seq_len=seq_len, batch_size=batch_size, dtype=dtype_name,
        quantize_frozen=quantize, optimizer=optimizer, attn_implementation=attn_implementation,
        train_extra=tuple(sorted(extra)), notes=notes,
    )


def max_layers_for_budget(
    config: Any,
    budget_gb: float,
    seq_len: int = 1024,
    batch_size: int = 1,
    quantize_frozen: str | None = None,
    optimizer: str = "adamw",
    dtype: Any = "bf16",
    **plan_kwargs: Any,
) -> int:
    """The largest ``k`` such that training the last ``k`` blocks fits in ``budget_gb`` GiB.

    The plan's ``total`` (allocated peak plus the CUDA-context/allocator overhead) is compared with the
    budget. Memory grows with ``k`` (each extra trained block adds weights in the training dtype,
    gradients, optimizer state and activations, more than its frozen copy saves), so the answer is the
    last ``k`` that fits. It is ``0`` when not even one trained block fits, which includes the case
    where the frozen model with the loss over ``seq_len * batch_size`` tokens alone exceeds the budget:
    then lower ``seq_len``/``batch_size``, quantize the frozen blocks, or use a bigger GPU.
    ``plan_kwargs`` go to :func:`plan_memory` (``attn_implementation``, ``cuda_context_gb``...).
    """
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not budget_gb > 0:
        raise ValueError(f"budget_gb must be a positive number of GiB, got {budget_gb!r}.")
    shape = block_shape(config)
    budget = budget_gb * GIB

    def fits(k: int) -> bool:
        plan = plan_memory(config, k, seq_len, batch_size, quantize_frozen=quantize_frozen, optimizer=optimizer,
                           dtype=dtype, **plan_kwargs)
        return plan.total <= budget

    low, high = 0, shape.num_layers  # invariant: fits(low) or low == 0; answer in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
