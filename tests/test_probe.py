"""LayerProbe against an independent float64 reference built from output_hidden_states."""
import importlib.util
import math

import pytest
import torch

from tiny_models import PAD_SIDES, random_batch, tiny_model
from laet_fast import LayerProbe, LayerScores, find_layers

ARCHS = ["llama", "qwen2", "gemma", "gpt2", "gpt_neox", "opt", "falcon", "bert"]
METRICS = ("block_influence", "relative_change", "act_rms", "act_absmax")


def block_io(model, ids, mask):
    """(inputs, outputs) of every block, float64, [batch, seq, hidden] each.

    The inputs and all outputs but the last come from ``output_hidden_states`` (entry i is what
    enters block i); the last block's output, which models pass through a final norm before
    reporting it, is taken with a plain forward hook and checked against nothing else.
    """
    stack = find_layers(model)
    last = {}

    def keep(module, args, output):
        last["out"] = (output if isinstance(output, torch.Tensor) else output[0]).detach().clone()

    handle = stack[len(stack) - 1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            kwargs = {} if mask is None else {"attention_mask": mask}
            hidden = model(input_ids=ids, output_hidden_states=True, **kwargs).hidden_states
    finally:
        handle.remove()
    assert len(hidden) == len(stack) + 1
    inputs = [h.double() for h in hidden[:-1]]
    outputs = [h.double() for h in hidden[1:-1]] + [last["out"].double()]
    return inputs, outputs


def reference_metrics(io_passes, masks):
    """Float64 metrics of each block over several passes: lists of (inputs, outputs) and masks.

    Returns (metrics, number of real tokens)."""
    real = torch.cat([
        (torch.ones(p[0][0].shape[:2]) if m is None else m).reshape(-1) != 0 for p, m in zip(io_passes, masks)
    ])
    out = {m: [] for m in METRICS}
    for layer in range(len(io_passes[0][0])):
        a = torch.cat([p[0][layer].reshape(-1, p[0][layer].shape[-1]) for p in io_passes])[real]
        b = torch.cat([p[1][layer].reshape(-1, p[1][layer].shape[-1]) for p in io_passes])[real]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        out["block_influence"].append(1.0 - cos.mean().item())
        out["relative_change"].append(((b - a).norm(dim=-1) / a.norm(dim=-1)).mean().item())
        out["act_rms"].append(b.pow(2).mean().sqrt().item())
        out["act_absmax"].append(b.abs().max().item())
    return out, int(real.sum())


def assert_scores_close(scores, expected, rtol=1e-5, atol=1e-6):
    for metric in METRICS:
        got = torch.tensor(scores[metric], dtype=torch.float64)
        want = torch.tensor(expected[metric], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{metric}: {m}")


@pytest.mark.parametrize("side", PAD_SIDES)
@pytest.mark.parametrize("arch", ARCHS)
def test_probe_matches_reference_with_padding(arch, side):
    model = tiny_model(arch, seed=0)
    gen = torch.Generator().manual_seed(1)
    ids, mask = random_batch(model.config.vocab_size, batch=3, seq=13, generator=gen, side=side)
    expected, tokens = reference_metrics([block_io(model, ids, mask)], [mask])

    with LayerProbe(model) as probe, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    scores = probe.scores()

    assert isinstance(scores, LayerScores)
    assert scores.names == find_layers(model).names
    assert scores.num_tokens == tokens == int(mask.sum())
    assert_scores_close(scores, expected)
    # The padding really is left out: counting it changes the answer.
    everything, _ = reference_metrics([block_io(model, ids, mask)], [torch.ones_like(mask)])
    assert not math.isclose(everything["block_influence"][0], expected["block_influence"][0], rel_tol=1e-4)


def test_accumulates_over_passes_weighted_by_tokens():
    model = tiny_model("llama", seed=2)
    gen = torch.Generator().manual_seed(3)
    first = random_batch(model.config.vocab_size, batch=3, seq=9, generator=gen, side="left")
    second = random_batch(model.config.vocab_size, batch=2, seq=17, generator=gen)
    expected, tokens = reference_metrics(
        [block_io(model, *first), block_io(model, *second)], [first[1], second[1]]
    )
    with LayerProbe(model) as probe, torch.no_grad():
        model(input_ids=first[0], attention_mask=first[1])
        model(input_ids=second[0], attention_mask=second[1])
    scores = probe.scores()
    assert scores.num_tokens == tokens
    assert_scores_close(scores, expected)


def test_no_mask_counts_every_token_and_positional_mask_is_found():
    model = tiny_model("gpt2", seed=4)
    gen = torch.Generator().manual_seed(5)
    ids, mask = random_batch(model.config.vocab_size, batch=2, seq=10, generator=gen)
    expected, _ = reference_metrics([block_io(model, ids, None)], [None])
    with LayerProbe(model) as probe, torch.no_grad():
        model(input_ids=ids)
    assert probe.scores().num_tokens == ids.numel()
    assert_scores_close(probe.scores(), expected)

    # Llama takes attention_mask as its second positional parameter (GPT-2 does not).
    model = tiny_model("llama", seed=4)
    expected, tokens = reference_metrics([block_io(model, ids, mask)], [mask])
    with LayerProbe(model) as probe, torch.no_grad():
        model(ids, mask)
    assert probe.scores().num_tokens == tokens
    assert_scores_close(probe.scores(), expected)


def test_reset_and_no_pass_gives_nan():
    model = tiny_model("qwen2", seed=6)
    gen = torch.Generator().manual_seed(7)
    first = random_batch(model.config.vocab_size, batch=2, seq=8, generator=gen)
    second = random_batch(model.config.vocab_size, batch=3, seq=11, generator=gen)
    probe = LayerProbe(model)
    untouched = probe.scores()
    assert untouched.num_tokens == 0 and all(math.isnan(v) for m in METRICS for v in untouched[m])
    with probe, torch.no_grad():
        model(input_ids=first[0], attention_mask=first[1])
        probe.reset()
        model(input_ids=second[0], attention_mask=second[1])
    expected, tokens = reference_metrics([block_io(model, *second)], [second[1]])
    assert probe.scores().num_tokens == tokens
    assert_scores_close(probe.scores(), expected)


def _hook_counts(model):
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._forward_hooks_with_kwargs))
        for m in model.modules()
    ]


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_hooks_removed_and_outputs_bit_identical(arch):
    model = tiny_model(arch, seed=8)
    gen = torch.Generator().manual_seed(9)
    ids, mask = random_batch(model.config.vocab_size, batch=2, seq=9, generator=gen)
    before_hooks = _hook_counts(model)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with LayerProbe(model):
            during = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert _hook_counts(model) == before_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in find_layers(model))

    # Also when the forward pass raises inside the context.
    with pytest.raises(RuntimeError, match="boom"):
        with LayerProbe(model):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before_hooks


def test_bf16_model():
    """Statistics of a bf16 model vs float64 maths on the very same bf16 hidden states.

    FlashAttention's rule: the error is at most twice that of the same maths done in PyTorch in
    bf16, plus a small atol; the kernel upcasts to float32, so it is also checked much tighter.
    """
    model = tiny_model("llama", dtype=torch.bfloat16, seed=10)
    gen = torch.Generator().manual_seed(11)
    ids, mask = random_batch(model.config.vocab_size, batch=3, seq=12, generator=gen)
    io = block_io(model, ids, mask)
    expected, _ = reference_metrics([io], [mask])
    torch_bf16, _ = reference_metrics([([x.bfloat16().float() for x in io[0]], [x.bfloat16() for x in io[1]])], [mask])
    with LayerProbe(model) as probe, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    scores = probe.scores()
    for metric in METRICS:
        got = torch.tensor(scores[metric], dtype=torch.float64)
        want = torch.tensor(expected[metric], dtype=torch.float64)
        low = torch.tensor(torch_bf16[metric], dtype=torch.float64)
        assert ((got - want).abs() <= 2 * (low - want).abs() + 1e-5).all(), metric
    assert_scores_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_sequence_classification_head_and_explicit_layers():
    model = tiny_model("llama", head="seqcls", seed=12)
    gen = torch.Generator().manual_seed(13)
    ids, mask = random_batch(model.config.vocab_size, batch=3, seq=10, generator=gen)
    expected, tokens = reference_metrics([block_io(model, ids, mask)], [mask])
    with LayerProbe(model, layers="model.layers") as probe, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert probe.scores().names == [f"model.layers.{i}" for i in range(3)]
    assert probe.scores().num_tokens == tokens
    assert_scores_close(probe.scores(), expected)
    with pytest.raises(ValueError, match="does not name"):
        LayerProbe(model, layers="model.nothing")


def test_mask_of_wrong_shape_is_refused():
    model = tiny_model("llama", seed=14)
    ids, _ = random_batch(model.config.vocab_size, batch=2, seq=8)
    bad = torch.ones(2, 1, 8, 8)
    with LayerProbe(model), torch.no_grad():
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 1, 8, 8\).*\[batch, seq\]"):
            model(input_ids=ids, attention_mask=bad)
    assert _hook_counts(model) == _hook_counts(tiny_model("llama"))


def test_probe_cannot_be_entered_twice():
    model = tiny_model("llama", seed=15)
    probe = LayerProbe(model)
    with probe:
        with pytest.raises(RuntimeError, match="already attached"):
            probe.__enter__()
    assert not probe.active


class ResidualBlock(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh())

    def forward(self, h):
        return h + self.mlp(h)


class CheckpointedStack(torch.nn.Module):
    """Blocks run through reentrant torch.utils.checkpoint around the block's ``__call__``: the
    backward pass re-runs them, hooks included (transformers 5 checkpoints ``forward`` only, and
    non-reentrant checkpointing in recent torch does not re-run module hooks)."""

    def __init__(self, hidden=24, depth=3, vocab=50):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for block in self.layers:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
        return h


@pytest.mark.parametrize("kind", ["transformers", "torch_checkpoint"])
def test_gradient_checkpointing_recompute_is_not_counted_twice(kind):
    gen = torch.Generator().manual_seed(17)
    if kind == "transformers":
        model = tiny_model("llama", seed=16).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask = random_batch(model.config.vocab_size, batch=2, seq=9, generator=gen)
        expected, tokens = reference_metrics([block_io(model, ids, mask)], [mask])

        def loss():
            return model(input_ids=ids, attention_mask=mask, labels=ids).loss
    else:
        torch.manual_seed(16)
        model = CheckpointedStack()
        ids, mask = random_batch(50, batch=2, seq=9, generator=gen)
        hidden = [model.embed(ids).detach()]
        with torch.no_grad():
            for block in model.layers:
                hidden.append(block(hidden[-1]))
        expected, tokens = reference_metrics([([h.double() for h in hidden[:-1]],
                                               [h.double() for h in hidden[1:]])], [mask])

        def loss():
            return model(ids, mask).pow(2).mean()

    with LayerProbe(model) as probe:
        loss().backward()
    assert probe.scores().num_tokens == tokens
    assert_scores_close(probe.scores(), expected)


HAS_GRAD_NORMS = importlib.util.find_spec("laet_fast.grad_norms") is not None


@pytest.mark.skipif(not HAS_GRAD_NORMS, reason="needs laet_fast/grad_norms.py (GradNormRecorder)")
@pytest.mark.parametrize("side", PAD_SIDES)
def test_grad_norms_are_merged_into_scores(side):
    model = tiny_model("llama", seed=18).train()
    gen = torch.Generator().manual_seed(19)
    ids, mask = random_batch(model.config.vocab_size, batch=2, seq=9, generator=gen, side=side)
    stack = find_layers(model)

    # Independent reference: per block, the L2 norm of the gradient of all its parameters.
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    want = [
        math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in block.parameters() if p.grad is not None))
        for block in stack
    ]
    model.zero_grad(set_to_none=True)

    before_hooks = _hook_counts(model)
    with LayerProbe(model, grad_norms=True) as probe:
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
    scores = probe.scores()
    assert _hook_counts(model) == before_hooks
    torch.testing.assert_close(torch.tensor(scores["grad_norm"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-7)
    history = scores.history["grad_norm"]
    assert len(history) == 2 and all(len(row) == len(stack) for row in history)
    torch.testing.assert_close(torch.tensor(history[1], dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    assert scores.num_tokens == 2 * int(mask.sum())

    probe.reset()
    with pytest.warns(UserWarning, match="no backward pass"):
        cleared = probe.scores()
    assert cleared.num_tokens == 0 and cleared.history["grad_norm"] == []
    assert all(math.isnan(v) for v in cleared["grad_norm"])


def test_first_pass_under_inference_mode_then_reset_and_reuse():
    """Scoring under torch.inference_mode() must leave a probe that can be reset and used again outside it."""
    model = tiny_model("llama", seed=12)
    ids, mask = random_batch(model.config.vocab_size, generator=torch.Generator().manual_seed(13))
    probe = LayerProbe(model)
    with probe, torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    first = probe.scores()["block_influence"]
    probe.reset()
    with probe, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert probe.scores()["block_influence"] == first
