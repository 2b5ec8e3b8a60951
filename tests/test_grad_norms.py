"""GradNormRecorder: per-block gradient norms, frozen blocks included, against float64 autograd.

The reference trains a float64 deep copy of the model with every parameter trainable and takes the
L2 norm of each block's true gradient. Most model-level tests run the kernels' PyTorch path
(LAET_FAST_BACKEND=torch) to stay quick; ``test_exact_through_triton_kernels`` runs the Triton
kernels through the interpreter. The kernels themselves are tested in tests/test_grad_norm_kernels.
"""
import contextlib
import copy
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

from laet_fast.measure import LiveBytes
from tiny_models import random_batch, tiny_model
from laet_fast.grad_norms import GENERIC_MAX_NUMEL, GradNormRecorder
from laet_fast.layers import LayerStack, find_layers

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox", "opt"]


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


def make_batch(model, seed, pad=True, batch=3, seq=11, side="right"):
    ids, mask = random_batch(model.config.vocab_size, batch=batch, seq=seq, pad=pad,
                             generator=torch.Generator().manual_seed(seed), side=side)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def reference_norms(model, batch, dtype=torch.float64) -> list[float]:
    """Per-block L2 norm of the true gradient, every parameter trainable, in float64 (``dtype``)."""
    ref = copy.deepcopy(model).to(dtype)
    for module in ref.modules():  # a plain model: no backward cut or other hooks copied along
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(**batch).loss.backward()
    return [math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in block.parameters()))
            for block in find_layers(ref)]


def freeze(model, trainable_blocks=()):
    """Freeze everything, then make the given blocks trainable; returns the stack."""
    for p in model.parameters():
        p.requires_grad_(False)
    stack = find_layers(model)
    for i in trainable_blocks:
        for p in stack[i].parameters():
            p.requires_grad_(True)
    return stack


def record(model, stack, batches):
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    try:
        for batch in batches:
            model(**batch).loss.backward()
    finally:
        recorder.detach()
    return recorder


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] + [
        len(p._backward_hooks or {}) for p in model.parameters()
    ]


@pytest.mark.parametrize("arch,pad,trainable", [
    *[(arch, side, pattern) for arch in ARCHS for pattern in [(1,), ()] for side in ("right", "left")],
    ("llama", False, (0, 2)),
    ("gpt2", False, (1,)),
], ids=lambda v: {(): "all_frozen", (1,): "mixed", (0, 2): "mixed2", False: "nopad"}.get(v, v)
    if not isinstance(v, str) else f"pad_{v}" if v in ("right", "left") else v)
def test_exact_fp32(torch_kernels, arch, pad, trainable):
    model = tiny_model(arch, seed=0)
    batch = make_batch(model, seed=1, pad=bool(pad), side=pad or "right")
    # Left padding leaves rows whose every key is masked; in float64, transformers' masks give those
    # rows NaN gradients (float32 does not), so the left-padded reference is float32 autograd.
    want = reference_norms(model, batch, torch.float32 if pad == "left" else torch.float64)
    stack = freeze(model, trainable)
    requires = [p.requires_grad for p in model.parameters()]
    recorder = record(model, stack, [batch])
    got = recorder.metrics()
    torch.testing.assert_close(torch.tensor(got["grad_norm"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norm_sq"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64) ** 2, rtol=2e-4, atol=0)
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch,trainable", [("llama", (1,)), ("gpt2", ())])
def test_exact_through_triton_kernels(arch, trainable):
    """The same check with the Triton kernels (interpreter on CPU), on two blocks."""
    model = tiny_model(arch, seed=2, **({"n_layer": 2} if arch == "gpt2" else {"num_hidden_layers": 2}))
    batch = make_batch(model, seed=3, batch=2, seq=7)
    want = reference_norms(model, batch)
    stack = freeze(model, trainable)
    got = record(model, stack, [batch]).metrics()["grad_norm"]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_frozen_blocks(torch_kernels, mode):
    """Frozen blocks quantized by apply_selection (bitsandbytes Linear4bit / Linear8bitLt): the norm is
    that of the gradient with respect to the dequantized weights the layer computes with."""
    pytest.importorskip("bitsandbytes")
    from laet_fast.apply import apply_selection
    from laet_fast.quantize import dequantize_linears, quant_mode

    model = tiny_model("llama", seed=31)
    batch = make_batch(model, seed=32)
    apply_selection(model, [1], quantize_frozen=mode, dtype=torch.float32)
    stack = find_layers(model)
    assert quant_mode(stack[0].mlp.down_proj) == mode
    ref = copy.deepcopy(model)
    for block in find_layers(ref):
        dequantize_linears(block, torch.float32)
    want = reference_norms(ref, batch)
    got = record(model, stack, [batch]).metrics()["grad_norm"]
    # Linear8bitLt runs its matmul on float16 copies of the inputs, so the int8 model is not the
    # float64 function of its dequantized weights to float32 accuracy; NF4 computes in float32.
    rtol = 1e-4 if mode == "nf4" else 5e-3
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=0)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bf16_within_flash_attention_bound(torch_kernels):
    """bf16: error vs float64 <= 2x plain bf16 autograd's own error + atol."""
    model = tiny_model("llama", dtype=torch.bfloat16, seed=4)
    batch = make_batch(model, seed=5)
    want = torch.tensor(reference_norms(model, batch), dtype=torch.float64)

    baseline = copy.deepcopy(model)
    for p in baseline.parameters():
        p.requires_grad_(True)
    baseline(**batch).loss.backward()
    plain = torch.tensor([math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in b.parameters()))
                          for b in find_layers(baseline)], dtype=torch.float64)

    stack = freeze(model, (2,))
    got = torch.tensor(record(model, stack, [batch]).metrics()["grad_norm"], dtype=torch.float64)
    err, plain_err = (got - want).abs(), (plain - want).abs()
    assert torch.all(err <= 2 * plain_err + 1e-5 * want), (err, plain_err, want)


def test_two_passes_history_and_mean(torch_kernels):
    model = tiny_model("qwen2", seed=6)
    batches = [make_batch(model, seed=7), make_batch(model, seed=8)]
    want = [reference_norms(model, b) for b in batches]
    stack = freeze(model, (0,))
    recorder = record(model, stack, batches)
    history = recorder.history()
    assert len(history) == 2 and recorder.num_passes == 2
    torch.testing.assert_close(torch.tensor(history, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    metrics = recorder.metrics()
    expect_mean = [(a + b) / 2 for a, b in zip(*want)]
    expect_sq = [a * a + b * b for a, b in zip(*want)]
    torch.testing.assert_close(torch.tensor(metrics["grad_norm"]), torch.tensor(expect_mean), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(metrics["grad_norm_sq"]), torch.tensor(expect_sq), rtol=2e-4, atol=0)
    recorder.reset()
    assert recorder.history() == [] and recorder.num_passes == 0


@pytest.mark.parametrize("set_to_none", [False, None], ids=["zeroed", "accumulated"])
def test_gradient_accumulation_counts_the_increment(torch_kernels, set_to_none):
    """A pass's norm is that of its own gradient, whatever .grad held before it."""
    model = tiny_model("llama", seed=9)
    batches = [make_batch(model, seed=10), make_batch(model, seed=11)]
    want = [reference_norms(model, b) for b in batches]
    stack = freeze(model, (0, 2))
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    model(**batches[0]).loss.backward()
    if set_to_none is False:
        model.zero_grad(set_to_none=False)  # .grad holds zeros: the accumulation path
    model(**batches[1]).loss.backward()  # accumulated: .grad holds pass 1 + pass 2
    recorder.detach()
    torch.testing.assert_close(torch.tensor(recorder.history(), dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=0)


def test_selection_changes_between_passes(torch_kernels):
    """Blocks may become trainable or frozen between passes (re-selection): every pass stays exact."""
    model = tiny_model("gpt_neox", seed=12)
    batches = [make_batch(model, seed=13), make_batch(model, seed=14)]
    want = [reference_norms(model, b) for b in batches]
    stack = freeze(model, (2,))
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    model(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    freeze(model, (0,))
    model(**batches[1]).loss.backward()
    recorder.detach()
    torch.testing.assert_close(torch.tensor(recorder.history(), dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=0)


def test_hooks_removed_and_frozen_grads_untouched(torch_kernels):
    model = tiny_model("opt", seed=15)
    stack = freeze(model, (1,))
    before = hook_counts(model)
    batch = make_batch(model, seed=16)
    recorder = record(model, stack, [batch])
    assert hook_counts(model) == before
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(dict(model.named_parameters())[n].grad is None for n in frozen)
    # Detached: further passes are not recorded, and with everything frozen nothing can backward.
    model.zero_grad()
    model(**batch).loss.backward()
    assert recorder.num_passes == 1
    freeze(model)
    assert not model(**batch).loss.requires_grad


def test_all_frozen_leaves_every_grad_none(torch_kernels):
    model = tiny_model("llama", seed=17)
    stack = freeze(model)
    recorder = record(model, stack, [make_batch(model, seed=18)])
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(v > 0 and math.isfinite(v) for v in recorder.metrics()["grad_norm"])


def test_nan_marks_only_that_layer(torch_kernels):
    model = tiny_model("llama", seed=19)
    stack = freeze(model, (1, 2))
    poisoned = stack[1].mlp.down_proj.weight
    poisoned.register_hook(lambda g: torch.full_like(g, math.nan))
    batch = make_batch(model, seed=20)
    recorder = record(model, stack, [batch, batch])  # the step itself never fails
    with pytest.warns(UserWarning, match=r"layer 1 \(model\.layers\.1\).*not finite") as caught:
        norms = recorder.metrics()["grad_norm"]
    assert not any("layer 0" in str(w.message) or "layer 2" in str(w.message) for w in caught)
    assert math.isnan(norms[1]) and math.isfinite(norms[0]) and math.isfinite(norms[2])
    with pytest.warns(UserWarning, match="layer 1"):
        assert all(math.isnan(row[1]) for row in recorder.history())


def test_unreached_block_is_marked_not_zero(torch_kernels):
    """A backward cut below the trained block 2 (a detach) must not give blocks 0, 1 a silent zero."""
    model = tiny_model("llama", seed=21)
    stack = freeze(model, (2,))
    cut = stack[2].register_forward_pre_hook(lambda module, args: (args[0].detach(),) + tuple(args[1:]))
    recorder = record(model, stack, [make_batch(model, seed=22)])
    cut.remove()
    with pytest.warns(UserWarning) as caught:
        norms = recorder.metrics()["grad_norm"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("did not reach" in m for m in messages)
    assert "layer 0 " in messages[0] and "layer 1 " in messages[1]
    assert math.isnan(norms[0]) and math.isnan(norms[1]) and norms[2] > 0


def test_two_forwards_one_backward_is_marked_not_wrong(torch_kernels):
    """loss1 + loss2 then one backward: a frozen layer's gradient is X1^T dY1 + X2^T dY2, which the
    per-call terms cannot give; the frozen blocks are marked, the trainable one stays exact."""
    model = tiny_model("llama", seed=33)
    batches = [make_batch(model, seed=34), make_batch(model, seed=35)]
    stack = freeze(model, (1,))
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    (model(**batches[0]).loss + model(**batches[1]).loss).backward()
    recorder.detach()
    with pytest.warns(UserWarning) as caught:
        norms = recorder.metrics()["grad_norm"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("several forward passes in one backward" in m for m in messages)
    assert "layer 0 " in messages[0] and "layer 2 " in messages[1]
    assert math.isnan(norms[0]) and math.isnan(norms[2]) and math.isfinite(norms[1])
    # Exact again with one backward per forward, even after a forward that had no backward.
    recorder.reset()
    recorder.attach()
    model.zero_grad()
    model(**batches[1])
    model(**batches[0]).loss.backward()
    recorder.detach()
    torch.testing.assert_close(torch.tensor(recorder.metrics()["grad_norm"], dtype=torch.float64),
                               torch.tensor(reference_norms(model, batches[0]), dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_non_reentrant_gradient_checkpointing_is_exact(torch_kernels):
    model = tiny_model("llama", seed=36)
    batch = make_batch(model, seed=37)
    want = reference_norms(model, batch)
    stack = freeze(model, (1,))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # llama has no dropout: the same function as in eval
    got = record(model, stack, [batch]).metrics()["grad_norm"]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_reentrant_gradient_checkpointing_is_refused(torch_kernels):
    model = tiny_model("llama", seed=38)
    stack = freeze(model, (1,))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    with pytest.raises(ValueError, match="use_reentrant': False"):
        model(**make_batch(model, seed=39))
    recorder.detach()


def test_enters_suspend_backward_cut_when_available(torch_kernels, monkeypatch):
    events = []

    @contextlib.contextmanager
    def suspend_backward_cut(model):
        events.append(("enter", model))
        yield
        events.append(("exit", model))

    fake = types.ModuleType("laet_fast.apply")
    fake.suspend_backward_cut = suspend_backward_cut
    monkeypatch.setitem(sys.modules, "laet_fast.apply", fake)
    model = tiny_model("llama", seed=23)
    recorder = GradNormRecorder(model, freeze(model))
    recorder.attach()
    assert events == [("enter", model)]
    model(**make_batch(model, seed=23))  # re-entered at each forward, the old one left: one level held
    assert events == [("enter", model), ("enter", model), ("exit", model)]
    recorder.detach()
    assert events == [("enter", model), ("enter", model), ("exit", model), ("exit", model)]


def test_scores_blocks_below_an_applied_backward_cut(torch_kernels):
    """With laet_fast.apply's cut below the lowest trained block, frozen blocks below are still scored."""
    from laet_fast.apply import apply_selection

    model = tiny_model("llama", seed=29)
    batch = make_batch(model, seed=30)
    want = reference_norms(model, batch)
    apply_selection(model, [2], dtype=torch.float32)
    stack = find_layers(model)
    seen = []
    watch = stack[1].register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    got = record(model, stack, [batch]).metrics()["grad_norm"]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    model(**batch)  # detached: the cut is back, block 1 builds no graph
    watch.remove()
    assert seen == [True, False]


def test_no_backward_gives_nan_with_warning():
    model = tiny_model("llama", seed=24)
    recorder = GradNormRecorder(model, freeze(model))
    with pytest.warns(UserWarning, match="no backward pass"):
        assert all(math.isnan(v) for v in recorder.metrics()["grad_norm"])


class _ToyBlock(nn.Module):
    def __init__(self, extra: nn.Module):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.extra = extra

    def forward(self, x):
        out = self.extra(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.proj(out)


class _Toy(nn.Module):
    def __init__(self, extra: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([_ToyBlock(extra)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.square().sum()


class _Scale(nn.Module):
    def __init__(self, numel, tuple_out=False):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(numel))
        self.tuple_out = tuple_out

    def forward(self, x):
        y = x * self.scale[: x.shape[-1]]
        return (y, None) if self.tuple_out else y


@pytest.mark.parametrize("extra,match", [
    (_Scale(GENERIC_MAX_NUMEL + 1), "layers.0.extra.scale"),
    (_Scale(8, tuple_out=True), "layers.0.extra.scale"),
])
def test_uncovered_parameter_raises_naming_it(torch_kernels, extra, match):
    toy = _Toy(extra).requires_grad_(False)
    recorder = GradNormRecorder(toy, LayerStack("layers", toy.layers))
    recorder.attach()
    with pytest.raises(TypeError, match=match):
        toy(torch.randn(3, 8))
    recorder.detach()


def test_small_custom_module_is_exact(torch_kernels):
    """Any small parameterised module is scored exactly by recomputation."""
    toy = _Toy(_Scale(8)).requires_grad_(False)
    x = torch.randn(5, 8)
    ref = copy.deepcopy(toy).double().requires_grad_(True)
    ref(x.double()).backward()
    want = math.sqrt(sum(p.grad.pow(2).sum().item() for p in ref.parameters()))
    recorder = GradNormRecorder(toy, LayerStack("layers", toy.layers))
    recorder.attach()
    toy(x).backward()
    recorder.detach()
    assert recorder.metrics()["grad_norm"][0] == pytest.approx(want, rel=1e-5)


def _backward_peak(model, batch, with_recorder):
    stack = freeze(model)
    recorder = GradNormRecorder(model, stack)
    if with_recorder:
        recorder.attach()
    else:  # the same backward, through every block, without scoring
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    loss = model(**batch).loss
    with LiveBytes() as tracker:
        loss.backward()
    recorder.detach()
    return tracker.peak, recorder


def test_memory_stays_below_one_weight_gradient():
    """Extra memory during the backward pass (kernels, bias sums, norm recomputation) stays below
    one [in, out] weight gradient of the largest layer: no weight gradient is ever formed."""
    config = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    model = tiny_model("llama", seed=25, **config)
    batch = make_batch(model, seed=26, batch=2, seq=9)
    base, _ = _backward_peak(tiny_model("llama", seed=25, **config), batch, with_recorder=False)
    peak, recorder = _backward_peak(model, batch, with_recorder=True)
    largest = max(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear)
                  and m is not model.get_output_embeddings())
    assert recorder.num_passes == 1
    assert peak - base < largest, (peak, base, largest)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_gpu_below_one_weight_gradient():
    hidden, intermediate = 1024, 4096
    config = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1000)
    ids, mask = random_batch(1000, batch=2, seq=64, generator=torch.Generator().manual_seed(27))
    batch = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=ids.masked_fill(mask == 0, -100).cuda())
    peaks = []
    for with_recorder in (False, True):
        model = tiny_model("llama", seed=28, dtype=torch.bfloat16, **config).cuda()
        stack = freeze(model)
        recorder = GradNormRecorder(model, stack)
        if with_recorder:
            recorder.attach()
        else:
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        model(**batch).loss.backward()  # warm-up: the autotuner's benchmarking allocates scratch memory
        loss = model(**batch).loss
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        recorder.detach()
        if with_recorder:
            assert recorder.num_passes == 2 and all(v > 0 for v in recorder.metrics()["grad_norm"])
    largest = hidden * intermediate * 2  # one bf16 [in, out] weight gradient
    assert peaks[1] - peaks[0] < largest, peaks


def test_backward_that_raised_leaves_no_partial_sums(torch_kernels):
    """A backward pass that raises (out of memory, batch skipped) never runs its end callback; the next
    pass must be recorded on its own, not merged with the aborted one's partial sums or lost."""
    model = tiny_model("llama", seed=40)
    batches = [make_batch(model, seed=41), make_batch(model, seed=42)]
    want = reference_norms(model, batches[1])
    stack = freeze(model, (1,))

    def fail(grad):
        raise RuntimeError("simulated out of memory")

    trap = stack[0].mlp.down_proj.register_forward_hook(lambda module, args, out: out.register_hook(fail) and None)
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    with pytest.raises(RuntimeError, match="simulated"):
        model(**batches[0]).loss.backward()
    trap.remove()
    model.zero_grad(set_to_none=True)
    model(**batches[1]).loss.backward()
    recorder.detach()
    assert recorder.num_passes == 1
    torch.testing.assert_close(torch.tensor(recorder.metrics()["grad_norm"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=0)


def test_gradient_not_stored_in_grad_is_marked_not_zero(torch_kernels):
    """torch.autograd.grad leaves .grad empty: the trainable block must not get a silent zero."""
    model = tiny_model("llama", seed=43)
    batch = make_batch(model, seed=44)
    stack = freeze(model, (1,))
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    loss = model(**batch).loss
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    recorder.detach()
    with pytest.warns(UserWarning, match=r"layer 1 .*not stored in \.grad"):
        norms = recorder.metrics()["grad_norm"]
    assert math.isnan(norms[1]) and norms[2] > 0


class _InPlaceBlock(nn.Module):
    """Modifies the frozen projection's input in place after the projection ran."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        y = self.proj(h)
        h.mul_(2.0)
        return y + h


@pytest.mark.parametrize("trainable_norm", [False, True])
def test_input_modified_in_place_is_marked_not_wrong(torch_kernels, trainable_norm):
    """Had the layer been trainable, autograd would refuse the in-place change; the saved X is stale."""
    blocks = nn.ModuleList([_InPlaceBlock()]).requires_grad_(False)
    blocks[0].norm.requires_grad_(trainable_norm)
    recorder = GradNormRecorder(blocks, LayerStack("layers", blocks))

    def run(x):
        return blocks[0](x).square().sum()

    recorder.attach()
    x = torch.randn(5, 8, requires_grad=True)
    run(x).backward()
    recorder.detach()
    with pytest.warns(UserWarning, match="layers.0.proj was modified in place"):
        assert math.isnan(recorder.metrics()["grad_norm"][0])


class _FunctionalBlock(nn.Module):
    """Uses its projection's weight through F.linear: the projection's own forward never runs."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.linear(self.norm(x), self.proj.weight, self.proj.bias)


def test_weights_used_through_a_functional_call_are_reported(torch_kernels):
    blocks = nn.ModuleList([_FunctionalBlock()]).requires_grad_(False)
    recorder = GradNormRecorder(blocks, LayerStack("layers", blocks))
    recorder.attach()
    with pytest.warns(UserWarning, match=r"layers\.0\.proj \(Linear\) has frozen parameters but its forward did not"):
        blocks[0](torch.randn(5, 8)).square().sum().backward()
    recorder.detach()


def test_autocast_gives_the_kernel_one_compute_dtype(torch_kernels, monkeypatch):
    """Under autocast a float32 model's frozen linears get X in float32 and dY in bf16; the kernel
    would read both as float32 (the FMA path, 10-20x slower than tensor cores on Hopper). The recorder
    saves X in the autocast dtype, as the layer computed with it: the kernel sees one dtype."""
    from laet_fast.kernels import grad_norm

    seen = []
    real = grad_norm.linear_grad_sq_norm

    def spy(x, dy, out, method="auto"):
        seen.append(((x.dtype, dy.dtype), x.data_ptr()))
        real(x, dy, out, method)

    monkeypatch.setattr(grad_norm, "linear_grad_sq_norm", spy)
    model = tiny_model("llama", seed=45)
    batch = make_batch(model, seed=46)
    want = reference_norms(model, batch)
    stack = freeze(model, (1,))
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    recorder.detach()
    assert len(seen) == 2 * 7 and {dtypes for dtypes, _ in seen} == {(torch.bfloat16, torch.bfloat16)}, seen
    # q/k/v read one tensor, and so do gate/up: one bf16 copy each, not three and two.
    assert len({pointer for _, pointer in seen}) == 2 * 4
    # bf16 compute: the norms are those of a bf16 forward, a few percent from the float32 model's.
    torch.testing.assert_close(torch.tensor(recorder.metrics()["grad_norm"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=5e-2, atol=0)


def test_gradient_accumulation_builds_no_host_tables_per_parameter(torch_kernels, monkeypatch):
    """An accumulating pass used to launch grouped_sq_norms once per trainable parameter (host tables
    and pinned copies each: tens of ms of CPU per backward on an 8B model); now the only grouped
    launch of a pass is the one for parameters whose .grad was empty."""
    from laet_fast.kernels import grad_norm

    calls = []
    real = grad_norm.grouped_sq_norms
    monkeypatch.setattr(grad_norm, "grouped_sq_norms", lambda t, g, out: calls.append(len(t)) or real(t, g, out))
    model = tiny_model("llama", seed=47)
    batches = [make_batch(model, seed=48), make_batch(model, seed=49)]
    want = [reference_norms(model, b) for b in batches]
    stack = freeze(model, (0, 2))
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    model(**batches[0]).loss.backward()
    assert calls == [trainable]  # every .grad was empty: one grouped launch
    model(**batches[1]).loss.backward()  # accumulates into .grad
    recorder.detach()
    assert calls == [trainable], calls
    torch.testing.assert_close(torch.tensor(recorder.history(), dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=0)


def test_pass_after_an_invalid_pass_is_scored_fresh_without_reset(torch_kernels):
    """A pass that marked blocks invalid (two forwards, one backward) must not leak its marks, notes
    or partial sums into the next pass when reset() is not called in between."""
    model = tiny_model("llama", seed=50)
    batches = [make_batch(model, seed=51), make_batch(model, seed=52), make_batch(model, seed=53)]
    stack = freeze(model, (1,))
    recorder = GradNormRecorder(model, stack)
    recorder.attach()
    (model(**batches[0]).loss + model(**batches[1]).loss).backward()
    model.zero_grad(set_to_none=True)
    model(**batches[2]).loss.backward()
    recorder.detach()
    assert recorder.num_passes == 2
    with pytest.warns(UserWarning, match="several forward passes"):
        history = recorder.history()
    assert math.isnan(history[0][0]) and math.isnan(history[0][2])
    torch.testing.assert_close(torch.tensor(history[1], dtype=torch.float64),
                               torch.tensor(reference_norms(model, batches[2]), dtype=torch.float64),
                               rtol=1e-4, atol=0)


def _step_peak(model, batch, route):
    """Peak bytes allocated from the forward to the end of the backward (weights excluded):
    ``"plain"`` a frozen backward through every block, ``"probe"`` the same with the recorder."""
    stack = freeze(model)
    recorder = GradNormRecorder(model, stack)
    if route == "probe":
        recorder.attach()
    else:
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    with LiveBytes() as tracker:
        model(**batch).loss.backward()
    recorder.detach()
    return tracker.peak, recorder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_checkpointed_blocks_score_at_frozen_backward_memory(torch_kernels, dtype):
    """Over non-reentrant checkpointed blocks the recorder takes X from the checkpoint's recomputation
    in the backward pass instead of keeping it from the forward. Peak against a plain frozen backward
    on this 4-block model: 1.91x when X was kept from the forward, 1.11x now (what remains: the
    inputs of one block's frozen linears, held from the recomputation until their dY). Norms exact."""
    config = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
    peaks = {}
    for route in ("plain", "probe"):
        model = tiny_model("llama", seed=54, dtype=dtype, **config).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = make_batch(model, seed=55, batch=4, seq=24)
        peaks[route], recorder = _step_peak(model, batch, route)
    assert peaks["probe"] <= 1.2 * peaks["plain"], peaks
    want = reference_norms(tiny_model("llama", seed=54, dtype=dtype, **config), batch)
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(torch.tensor(recorder.metrics()["grad_norm"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=0)


def test_checkpointed_block_whose_inputs_never_come_is_marked_not_wrong(torch_kernels):
    """A block that says it is checkpointed but is not recomputed in the backward pass: its frozen
    layers' inputs never arrive, and the block is reported non-finite, naming the layer."""
    toy = _Toy(_Scale(8)).requires_grad_(False).train()
    toy.layers[0].gradient_checkpointing = True
    recorder = GradNormRecorder(toy, LayerStack("layers", toy.layers))
    recorder.attach()
    toy(torch.randn(5, 8, requires_grad=True)).backward()
    recorder.detach()
    with pytest.warns(UserWarning, match=r"did not recompute layers\.0\.(proj|extra)"):
        assert math.isnan(recorder.metrics()["grad_norm"][0])
