"""laet_fast.quantize: swapping linear layers for bitsandbytes ones and back, on the CPU backend."""
import sys
import warnings

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")

from laet_fast.quantize import (dequantize_linears, quant_mode, quant_modes,  # noqa: E402
                                quant_state_tensors, quantize_linears, require_bitsandbytes)

warnings.filterwarnings("ignore", message="MatMul8bitLt")

# Largest half-gap between neighbouring code values (in units of the block absmax), plus slack for the
# 8-bit double quantization of the absmax itself.
HALF_GAP = {"nf4": 0.16, "fp4": 0.17}


def _toy(dtype=torch.float32, seed=0):
    """A block-like module with odd sizes: nested Linear layers, one without bias, and a GPT-2 Conv1D."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    toy = nn.Module()
    toy.attn = nn.Module()
    toy.attn.q_proj = nn.Linear(72, 40, bias=False)
    toy.attn.c_attn = Conv1D(216, 72)  # weight (72, 216): y = x @ W + b
    nn.init.normal_(toy.attn.c_attn.bias, std=0.1)
    toy.mlp = nn.Sequential(nn.Linear(72, 136), nn.GELU(), nn.Linear(136, 72))
    toy.norm = nn.LayerNorm(72)
    return toy.to(dtype)


def _weights(toy):
    """(out, in) float64 weights of every linear layer, by name."""
    return {
        "attn.q_proj": toy.attn.q_proj.weight.double(),
        "attn.c_attn": toy.attn.c_attn.weight.double().t(),
        "mlp.0": toy.mlp[0].weight.double(),
        "mlp.2": toy.mlp[2].weight.double(),
    }


def _forward(toy, x):
    return {
        "attn.q_proj": toy.attn.q_proj(x),
        "attn.c_attn": toy.attn.c_attn(x),
        "mlp.0": toy.mlp[0](x),
        "mlp.2": toy.mlp[2](torch.nn.functional.gelu(toy.mlp[0](x))),
    }


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_and_restore(mode, dtype):
    toy = _toy(dtype)
    original = {k: w.clone() for k, w in _weights(toy).items()}
    assert quantize_linears(toy, mode, compute_dtype=dtype) == 4
    for layer in (toy.attn.q_proj, toy.attn.c_attn, toy.mlp[0], toy.mlp[2]):
        assert quant_mode(layer) == mode
        assert not layer.weight.requires_grad
        assert quant_state_tensors(layer)
    assert isinstance(toy.norm, nn.LayerNorm) and quant_modes(toy) == {mode}

    x = torch.randn(5, 72, dtype=dtype)
    quantized_out = {k: v.float() for k, v in _forward(toy, x).items()}

    assert dequantize_linears(toy, dtype) == 4
    assert quant_modes(toy) == set()
    from transformers.pytorch_utils import Conv1D

    assert type(toy.attn.c_attn) is Conv1D and toy.attn.c_attn.weight.shape == (72, 216)
    assert type(toy.mlp[0]) is nn.Linear and toy.attn.q_proj.bias is None
    restored = _weights(toy)
    for name, w in original.items():
        assert restored[name].dtype == torch.float64 and toy.mlp[0].weight.dtype == dtype
        err = (restored[name] - w).abs()
        if mode == "int8":  # one absmax scale per output row, 127 levels each side
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            # bitsandbytes rounds the weight to float16 before quantizing it, and a bfloat16 result is
            # rounded once more: allow those roundings too.
            rounding = w.abs() * (2**-10 if dtype == torch.float32 else 2**-8 + 2**-10)
            assert err.le(0.5 * scale * 1.001 + rounding).all(), name
        else:  # 64-element blocks of the flattened weight, each scaled by its absmax
            blocks = w.flatten()
            pad = (-blocks.numel()) % 64
            absmax = torch.nn.functional.pad(blocks, (0, pad)).view(-1, 64).abs().amax(dim=1)
            bound = HALF_GAP[mode] * absmax.repeat_interleave(64)[: blocks.numel()].view_as(w)
            bound = bound + (1e-2 if dtype == torch.bfloat16 else 1e-6) * w.abs().max()
            assert err.le(bound).all(), (name, (err - bound).max())
            assert err.max() > 0  # it really was quantized
    # The quantized layers computed with exactly these dequantized weights.
    dequant_out = {k: v.float() for k, v in _forward(toy, x).items()}
    atol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    if mode == "int8":  # bnb's int8 matmul also quantizes the activations (row-wise, 8 bit)
        atol = 0.05
    for name in dequant_out:
        torch.testing.assert_close(quantized_out[name], dequant_out[name], atol=atol, rtol=2e-2)


def test_quantized_block_close_to_original():
    toy = _toy()
    x = torch.randn(7, 72)
    expected = toy.mlp(toy.norm(x))
    quantize_linears(toy, "nf4", compute_dtype=torch.float32)
    got = toy.mlp(toy.norm(x))
    rel = (got - expected).norm() / expected.norm()
    assert 0 < rel < 0.15


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="nf4, fp4, int8"):
        quantize_linears(_toy(), "int4", compute_dtype=torch.float32)


@pytest.mark.parametrize("spelling,count,mode", [("NF4", 4, "nf4"), ("Int8", 4, "int8"), ("none", 0, None),
                                                 ("None", 0, None), (None, 0, None)])
def test_mode_spellings(spelling, count, mode):
    """The command line's spellings (upper case, "none") are accepted here as in apply_selection."""
    from laet_fast.quantize import quant_modes

    toy = _toy()
    assert quantize_linears(toy, spelling, compute_dtype=torch.float32) == count
    assert quant_modes(toy) == ({mode} if mode else set())


def test_missing_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantize_linears(_toy(), "nf4", compute_dtype=torch.float32)


def test_broken_bitsandbytes(monkeypatch):
    broken = type(sys)("bitsandbytes")  # imports, but has no nn / functional (e.g. a failed native library)
    monkeypatch.setitem(sys.modules, "bitsandbytes", broken)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        require_bitsandbytes()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_falcon_frozen_blocks_train_above_quantized_ones(mode):
    """Falcon adds to a layer's output in place; with int8 layers that output used to be a view of
    bitsandbytes' autograd Function, which autograd refuses once a trained block sits below."""
    from tiny_models import random_batch, tiny_model
    from laet_fast import apply_selection

    model = tiny_model("falcon", seed=5)
    apply_selection(model, [0], quantize_frozen=mode)
    ids, mask = random_batch(model.config.vocab_size)
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = [p.grad for p in model.transformer.h[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
