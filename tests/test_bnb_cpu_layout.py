"""bitsandbytes' AVX512-BF16 CPU repacking must never touch the 4-bit layers laet_fast creates.

bitsandbytes 0.50's ``Linear4bit.forward`` on CPU, in eval mode with an input that needs no grad,
rewrites ``weight.data`` in place into a layout for its AVX512-BF16 kernel when the CPU has that
extension. That layout is not plain NF4 (dequantizing it gives garbage) and its matmul passes no
gradient. These tests make bitsandbytes believe the CPU has AVX512-BF16, whatever CPU runs them, so
that the repacking path is taken (or would be) everywhere; without the fix they fail on any CPU.

Layer sizes are multiples of 64: bitsandbytes repacks only those cleanly (others crash in eval).
"""
import pytest
import torch

from tiny_models import random_batch, tiny_model

from laet_fast import LayerProbe, apply_selection, export_model, find_layers

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 97


@pytest.fixture(autouse=True)
def cpu_claims_avx512_bf16(monkeypatch):
    """Layers built from here on believe the CPU has AVX512-BF16 (bitsandbytes reads it in ``__init__``)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def _model(seed=0):
    return tiny_model("llama", seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)


def _batch(seed=0):
    return random_batch(VOCAB, generator=torch.Generator().manual_seed(seed))


def _eval_forward(model):
    model.eval()
    ids, mask = _batch(1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def _weights(block):
    return {name: m.weight.detach().clone() for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def _nf4_bound(weight):
    """NF4's worst rounding error for a weight: half the widest gap of the code (0.28 at its low end,
    between -1 and -0.696) times the block absmax, whose double quantization adds a little; 0.16 x the
    largest magnitude covers both for a block of 64."""
    return 0.16 * weight.abs().max().item()


def test_eval_forward_then_export_gives_the_nf4_weights():
    model = _model()
    original = _weights(find_layers(model)[0])
    apply_selection(model, [2], quantize_frozen="nf4")
    layer = find_layers(model)[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    _eval_forward(model)
    export_model(model)
    exported = _weights(find_layers(model)[0])
    assert exported.keys() == original.keys()
    for name, weight in original.items():
        error = (exported[name] - weight).abs().max().item()
        assert 0 < error <= _nf4_bound(weight), (name, error)


def test_eval_forward_then_reselect_starts_from_the_nf4_weights():
    model = _model()
    apply_selection(model, [2], quantize_frozen="nf4")
    reference = _model()  # same seed: a second copy never evaluated, dequantized the same way
    apply_selection(reference, [2], quantize_frozen="nf4")
    _eval_forward(model)
    apply_selection(model, [0, 2])
    apply_selection(reference, [0, 2])
    got, expected = _weights(find_layers(model)[0]), _weights(find_layers(reference)[0])
    for name, weight in expected.items():
        assert torch.equal(got[name], weight), name


def _grad_norm_step(model):
    model.train()
    ids, mask = _batch(2)
    with LayerProbe(model, grad_norms=True) as probe:
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    return probe.scores()["grad_norm"]


def test_eval_forward_then_grad_norm_step_matches_the_run_without_eval():
    evaluated, reference = _model(), _model()
    for model in (evaluated, reference):
        model.requires_grad_(False)
        apply_selection(model, [2], quantize_frozen="nf4")
    _eval_forward(evaluated)
    got, expected = _grad_norm_step(evaluated), _grad_norm_step(reference)
    assert torch.isfinite(torch.as_tensor(expected)).all() and min(expected) > 0
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), rtol=1e-5, atol=0)


def test_a_layer_already_repacked_is_restored_before_dequantizing():
    """4-bit layers a model came with (not made by laet_fast) may have been repacked before laet_fast saw them."""
    from laet_fast.quantize import dequantize_linears

    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.02
    holder = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4"))
    holder[0].weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    holder = holder.to("cpu")
    plain = bnb.functional.dequantize_4bit(holder[0].weight.data, holder[0].weight.quant_state).clone()
    packed = bnb.functional._convert_weight_packed_for_cpu(holder[0].weight.data, holder[0].weight.quant_state)
    holder[0].weight.data, holder[0].weight.quant_state = packed
    dequantize_linears(holder)
    restored = holder[0].weight.detach()
    # What remains is the rounding of the absmax scales: to bf16 by the repacking (2**-9 relative), then
    # to 8 bits again by the inverse's double quantization (about 2**-8): well under 2**-6.
    torch.testing.assert_close(restored, plain, rtol=2**-6, atol=0)
    assert (restored - weight).abs().max() <= _nf4_bound(weight)


def test_eval_forward_with_out_features_not_a_multiple_of_32():
    """The repacking asserts ``out_features % 32 == 0``: the tiny models' 72-wide layers crashed in eval."""
    model = tiny_model("llama", seed=0)
    apply_selection(model, [1], quantize_frozen="nf4")
    _eval_forward(model)
