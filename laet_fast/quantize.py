"""Swap the linear layers of a module for bitsandbytes 4-bit / 8-bit ones, and back.

A flat ``named_children`` walk in the style of gpt-fast: every ``nn.Linear`` (and GPT-2's ``Conv1D``,
which is a linear layer with a transposed weight) is replaced in place by

* ``bnb.nn.Linear4bit`` for ``"nf4"`` / ``"fp4"``: weights in 4 bits with blockwise absmax scales
  (double-quantized), matmuls in ``compute_dtype``;
* ``bnb.nn.Linear8bitLt`` for ``"int8"``: weights in int8 with one scale per output row
  (``has_fp16_weights=False``, i.e. inference only).

Quantization happens on the device the weight already lives on (bitsandbytes quantizes when a
``Params4bit`` / ``Int8Params`` is moved to a device; its CPU backend works in 0.50).
``dequantize_linears`` is the inverse: it rebuilds the original layer class from the quantized weight.

bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place, on CPUs with AVX512-BF16, at its first
eval-mode forward whose input needs no grad, into a layout of its own: not plain NF4/FP4, and its
matmul passes no gradient back. Frozen blocks are dequantized on re-selection and export, and carry
gradients for gradient-norm scoring, so :func:`keep_plain_layout` turns that repacking off.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn

from .layers import is_conv1d, is_linear_like
from .names import QUANT_MODES as MODES

_INSTALL_HINT = "Install it with `pip install bitsandbytes` (version 0.47 or newer; on the CPU, AdamW8bit needs 0.50)."

# Name of the attribute on a quantized layer that remembers the class it replaced (Conv1D, FalconLinear...).
_SOURCE_CLASS = "_laet_source_class"


def mode_name(mode: str | None) -> str | None:
    """The canonical quantization mode: ``"nf4"``, ``"fp4"``, ``"int8"`` or None, from any casing;
    ``"none"`` (the command line's spelling) is None. ValueError for anything else."""
    if mode is None:
        return None
    name = str(mode).strip().lower()
    if name == "none":
        return None
    if name not in MODES:
        raise ValueError(f"Unknown quantization {mode!r}; choose None ('none') or one of {', '.join(MODES)}.")
    return name


def require_bitsandbytes():
    """Import bitsandbytes or raise an ImportError that says how to install it."""
    try:
        import bitsandbytes as bnb

        bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.functional.dequantize_4bit  # noqa: B018
    except Exception as error:  # a missing package and a broken install (no native library) look alike to users
        raise ImportError(f"Quantization needs bitsandbytes, which could not be imported ({error}). "
                          f"{_INSTALL_HINT}") from error
    return bnb


def quant_mode(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes linear layer, None for anything else."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # never imported, so no module can be one of its layers
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return getattr(module.weight, "quant_type", None) or module.quant_type
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def quant_modes(module: nn.Module) -> set[str]:
    """The quantization modes present among the submodules of ``module`` (empty set if none)."""
    return {mode for mode in map(quant_mode, module.modules()) if mode is not None}


def quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a bitsandbytes layer holds besides its parameters and buffers (scales, code tables)."""
    mode = quant_mode(module)
    if mode is None:
        return []
    if mode == "int8":
        return [t for t in (module.weight.SCB, module.state.SCB) if t is not None]
    state = module.weight.quant_state
    if state is None:
        return []
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if t is not None]


def keep_plain_layout(module: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer under ``module`` in the plain layout, on every CPU, in place.

    Turns off the eval-mode AVX512-BF16 repacking (``support_avx512bf16_for_cpu``) and undoes it,
    with bitsandbytes' own inverse, where it already happened (the absmax scales it rounded to bf16
    stay rounded). No-op on other layers and when bitsandbytes was never imported.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for layer in module.modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state)


@functools.cache
def _linear8bit_class():
    bnb = require_bitsandbytes()

    class Linear8bitLtOwnOutput(bnb.nn.Linear8bitLt):
        """``Linear8bitLt`` whose output is never a view.

        bitsandbytes' int8 matmul returns a view of its result, and autograd refuses an in-place
        update of a custom Function's view output, which models do to layer outputs (Falcon's
        ``mlp_output += attention_output``). The copy is made only when the result is a view.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return out.clone() if out._is_view() else out

    return Linear8bitLtOwnOutput


def _quantized_linear(layer: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    bnb = require_bitsandbytes()
    weight = layer.weight.detach()
    if is_conv1d(layer):
        weight = weight.t()
    out_features, in_features = weight.shape
    device = weight.device
    has_bias = layer.bias is not None
    if mode == "int8":
        quantized = _linear8bit_class()(in_features, out_features, bias=has_bias, has_fp16_weights=False,
                                         device="meta")
        quantized.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        quantized = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=compute_dtype,
                                      quant_type=mode, device="meta")
        quantized.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type=mode)
    if has_bias:
        quantized.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    quantized = quantized.to(device)  # moving the weight to its device is what quantizes it
    keep_plain_layout(quantized)
    setattr(quantized, _SOURCE_CLASS, type(layer))
    quantized.train(layer.training)
    return quantized


def _dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes layer, in the dtype it was quantized from (float32 for int8)."""
    bnb = require_bitsandbytes()
    if quant_mode(layer) == "int8":
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scales)
    keep_plain_layout(layer)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _dequantized_linear(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    weight = _dequantized_weight(layer)
    dtype = dtype or (layer.bias.dtype if layer.bias is not None else weight.dtype)
    source = getattr(layer, _SOURCE_CLASS, nn.Linear)
    out_features, in_features = weight.shape
    with torch.device("meta"):
        if source.__name__ == "Conv1D":
            restored = source(out_features, in_features)
            weight = weight.t()
        else:
            restored = source(in_features, out_features, bias=layer.bias is not None)
    restored.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if layer.bias is not None:
        restored.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    restored.train(layer.training)
    return restored


def quantize_linears(module: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` / ``Conv1D`` under ``module`` by a frozen bitsandbytes layer, in place.

    Args:
        module: any module (here: one transformer block); its linear weights are float tensors on any device.
        mode: ``"nf4"``, ``"fp4"`` (``Linear4bit``, matmuls in ``compute_dtype``) or ``"int8"`` (``Linear8bitLt``),
            in any casing; None or ``"none"`` replaces nothing.
        compute_dtype: dtype of the 4-bit layers' matmuls and outputs (the model's training dtype).

    Returns:
        How many layers were replaced.
    """
    mode = mode_name(mode)
    if mode is None:
        return 0
    require_bitsandbytes()
    count = 0
    for name, child in module.named_children():
        if quant_mode(child) is not None:  # bitsandbytes layers subclass nn.Linear: leave them as they are
            continue
        if is_linear_like(child):
            setattr(module, name, _quantized_linear(child, mode, compute_dtype))
            count += 1
        else:
            count += quantize_linears(child, mode, compute_dtype)
    return count


def dequantize_linears(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every bitsandbytes linear layer under ``module`` by the layer class it came from, in place.

    The weights are ``bnb.functional.dequantize_4bit`` / int8 row-scale dequantized (the quantization
    error stays); ``dtype`` is the dtype of the restored weights (default: the bias dtype, else the
    dtype the weight was quantized from). Layers bitsandbytes quantized on load (not through
    :func:`quantize_linears`) come back as ``nn.Linear``. Returns how many layers were replaced.
    """
    count = 0
    for name, child in module.named_children():
        if quant_mode(child) is not None:
            setattr(module, name, _dequantized_linear(child, dtype))
            count += 1
        else:
            count += dequantize_linears(child, dtype)
    return count


def dequantize_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The layer class a bitsandbytes layer came from, holding its dequantized weight (``dequantize_linears``,
    for one layer; ``layer`` is left as it is)."""
    return _dequantized_linear(layer, dtype)


def quantized_by_laet_fast(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes layer made by :func:`quantize_linears` (not one quantized on load)."""
    return quant_mode(layer) is not None and hasattr(layer, _SOURCE_CLASS)


def same_quantization(layer: nn.Module, plain: nn.Module) -> bool:
    """Whether quantizing the plain layer ``plain`` as :func:`quantize_linears` did gives ``layer``'s weight exactly.

    ``plain`` is the layer class ``layer`` came from; it is quantized on ``layer``'s device with
    ``layer``'s mode and compute dtype, and both are compared dequantized, bit for bit.
    """
    mode = quant_mode(layer)
    compute_dtype = getattr(layer, "compute_dtype", None) or torch.float32
    requantized = _quantized_linear(plain, mode, compute_dtype)
    return torch.equal(_dequantized_weight(requantized), _dequantized_weight(layer))
