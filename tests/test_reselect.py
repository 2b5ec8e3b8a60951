"""Reselector: re-selection during training on a tiny Llama, optimizer kept in step, weights kept."""
import math

import pytest
import torch

from tiny_models import random_batch, tiny_model
from laet_fast import LayerProbe
from laet_fast.apply import apply_selection
from laet_fast.layers import find_layers
from laet_fast.reselect import Reselector


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    # The kernels have their own tests; the PyTorch path keeps these training loops quick.
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


def make_batch(model, seed):
    ids, mask = random_batch(model.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


class ScriptedProbe:
    """Hands out prepared scores, one set per scoring window; counts resets."""

    def __init__(self, windows):
        self.windows = list(windows)
        self.resets = 0

    def scores(self):
        return {"grad_norm": self.windows[self.resets]}

    def reset(self):
        self.resets += 1


def make_optimizer(model):
    """AdamW with weight decay on matrices only (two groups), like most training scripts."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ], lr=1e-2)


def block_params(stack, index):
    return [p for _, p in stack[index].named_parameters()]


def optimizer_ids(optimizer):
    return [{id(p) for p in group["params"]} for group in optimizer.param_groups]


def test_reselection_moves_training_and_optimizer_state():
    model = tiny_model("llama", seed=0).train()
    apply_selection(model, [0], dtype=torch.float32)
    stack = find_layers(model)
    optimizer = make_optimizer(model)
    probe = ScriptedProbe([[0.1, 5.0, 0.2], [0.1, 0.2, 5.0]])
    reselector = Reselector(model, probe, every=2, strategy="top", k=1, optimizer=optimizer)
    assert reselector.selection.layers == (0,)

    snapshots = {}
    for step in range(1, 6):
        model(**make_batch(model, seed=step)).loss.backward()
        optimizer.step()
        if step == 2:
            snapshots = {id(p): p.detach().clone() for p in block_params(stack, 0)}
            state_before = {id(p) for p in optimizer.state}
        new = reselector.step()
        if step % 2:
            assert new is None
        optimizer.zero_grad(set_to_none=True)
        if step == 2:
            assert new.layers == (1,) and reselector.selection is new and probe.resets == 1
            assert all(not p.requires_grad and p.grad is None for p in block_params(stack, 0))
            assert all(p.requires_grad for p in block_params(stack, 1))
            groups = optimizer_ids(optimizer)
            assert not any(id(p) in g for p in block_params(stack, 0) for g in groups)
            assert not any(p in optimizer.state for p in block_params(stack, 0))
            assert all(id(p) in state_before for p in optimizer.state)
            # Joining parameters: empty state, in the group of the same layer of the old block.
            for name, param in stack[1].named_parameters():
                assert param not in optimizer.state
                assert id(param) in groups[0 if param.dim() >= 2 else 1], name
        if step == 3:
            assert all(optimizer.state[p]["step"].item() == 1 for p in block_params(stack, 1))

    # The deselected block keeps exactly what training left (no decay, no momentum after leaving).
    for param in block_params(stack, 0):
        assert torch.equal(param, snapshots[id(param)])
    assert reselector.selection.layers == (2,)
    assert [s.layers for _, s in reselector.history] == [(0,), (1,), (2,)]
    assert [step for step, _ in reselector.history] == [0, 2, 4]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*optimizer_ids(optimizer)) == trainable
    assert "layers=[2]" in repr(reselector)


def test_real_probe_scores_every_layer_fresh_each_window():
    from laet_fast.probe import LayerProbe

    model = tiny_model("llama", seed=1).train()
    apply_selection(model, [2], dtype=torch.float32)
    optimizer = make_optimizer(model)
    with LayerProbe(model, grad_norms=True) as probe:
        reselector = Reselector(model, probe, every=2, strategy="top", k=1, optimizer=optimizer)
        for step in range(1, 5):
            model(**make_batch(model, seed=10 + step)).loss.backward()
            optimizer.step()
            reselector.step()
            optimizer.zero_grad()
        with pytest.warns(UserWarning, match="no backward pass"):  # reset after the last re-selection
            assert probe.scores().history["grad_norm"] == []
    windows = [s.scores for _, s in reselector.history[1:]]
    assert len(windows) == 2
    for scores in windows:  # frozen blocks below the trained one are measured too
        assert len(scores) == 3 and all(math.isfinite(v) and v > 0 for v in scores)
    assert windows[0] != windows[1]
    trained = tuple(i for i, b in enumerate(find_layers(model)) if all(p.requires_grad for p in b.parameters()))
    assert trained == reselector.selection.layers
    assert set().union(*optimizer_ids(optimizer)) == {id(p) for p in model.parameters() if p.requires_grad}


def test_unchanged_selection_and_non_finite_windows():
    model = tiny_model("llama", seed=2)
    apply_selection(model, [1], dtype=torch.float32)
    probe = ScriptedProbe([[0.0, 3.0, 0.1], [math.nan] * 3])
    reselector = Reselector(model, probe, every=1, strategy="top", k=1)
    before = [p for p in model.parameters() if p.requires_grad]
    assert reselector.step().layers == (1,)
    assert [p for p in model.parameters() if p.requires_grad] == before
    with pytest.warns(UserWarning, match=r"keeping layers \[1\]"):
        assert reselector.step() is None
    assert reselector.selection.layers == (1,) and probe.resets == 2


def test_arguments_checked():
    model = tiny_model("llama", seed=3)
    with pytest.raises(ValueError, match="every=0"):
        Reselector(model, ScriptedProbe([]), every=0)
    with pytest.raises(ValueError, match="Unknown strategy 'best'"):
        Reselector(model, ScriptedProbe([]), every=1, strategy="best")

    class NoGradProbe(ScriptedProbe):
        grad_norms = False

    with pytest.raises(ValueError, match=r"grad_norms=True"):
        Reselector(model, NoGradProbe([]), every=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="top"), r"needs k="),
    (dict(strategy="top", k=9), r"k=9 is out of range"),
    (dict(strategy="top", k=1.5), r"must be an integer"),
    (dict(metric="loss"), r"metric='loss' is not one a LayerProbe gives"),
    (dict(metric="grad_norm_sq", probe_grad_norms=False), r"grad_norms=True"),
    (dict(kk=3), r"unexpected keyword argument 'kk'"),
    (dict(low=0.9, high=0.2), r"low <= high"),
    (dict(apply_kwargs={"quantize_frozen": "int4"}), r"Unknown quantization 'int4'"),
])
def test_bad_choice_found_at_construction(kwargs, match):
    """Before, these were only found at the first re-selection, mid-training."""
    model = tiny_model("llama", seed=3)
    grad_norms = kwargs.pop("probe_grad_norms", True)
    with LayerProbe(model, grad_norms=grad_norms) as probe:
        with pytest.raises(ValueError, match=match):
            Reselector(model, probe, every=1, **kwargs)
        Reselector(model, probe, every=1, metric="block_influence", strategy="top", k=2)  # fine


def test_trainer_callback_steps_and_adopts_the_optimizer():
    model = tiny_model("llama", seed=4)
    apply_selection(model, [0], dtype=torch.float32)
    optimizer = make_optimizer(model)

    class Wrapped:  # the shape of accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            self.optimizer = inner

    reselector = Reselector(model, ScriptedProbe([[0.0, 0.1, 2.0]]), every=2, strategy="top", k=1)
    callback = reselector.as_trainer_callback()
    callback.on_step_end(None, None, None, optimizer=Wrapped(optimizer))
    assert reselector.optimizer is optimizer and reselector.selection.layers == (0,)
    callback.on_step_end(None, None, None, optimizer=Wrapped(optimizer))
    assert reselector.selection.layers == (2,)
    stack = find_layers(model)
    assert all(id(p) in set().union(*optimizer_ids(optimizer)) for p in block_params(stack, 2))


def test_first_reselection_keeps_the_training_dtype():
    """A model trained without apply_selection: the first re-selection must not cast the trained
    weights to apply_selection's default dtype (bfloat16 on CUDA, float32 on CPU)."""
    model = tiny_model("llama", seed=5, dtype=torch.bfloat16).train()
    model.requires_grad_(False)
    stack = find_layers(model)
    stack[0].requires_grad_(True)
    optimizer = make_optimizer(model)
    reselector = Reselector(model, ScriptedProbe([[0.1, 5.0, 0.2]]), every=1, strategy="top", k=1,
                            optimizer=optimizer)
    model(**make_batch(model, seed=6)).loss.backward()
    optimizer.step()
    trained = {id(p): p.detach().clone() for p in block_params(stack, 0)}
    assert reselector.step().layers == (1,)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for param in block_params(stack, 0):
        assert torch.equal(param, trained[id(param)])
    optimizer.zero_grad()
    model(**make_batch(model, seed=7)).loss.backward()
    optimizer.step()


def test_parameters_left_out_of_the_optimizer_stay_out():
    """A module trained from the start but kept out of this optimizer (its own optimizer) is not added."""
    model = tiny_model("llama", seed=8).train()
    apply_selection(model, [0], train_extra=["model.norm"], dtype=torch.float32)
    stack = find_layers(model)
    optimizer = torch.optim.AdamW(block_params(stack, 0), lr=1e-2)
    reselector = Reselector(model, ScriptedProbe([[0.1, 5.0, 0.2]]), every=1, strategy="top", k=1,
                            optimizer=optimizer)
    assert reselector.step().layers == (1,)
    assert model.model.norm.weight.requires_grad
    assert set().union(*optimizer_ids(optimizer)) == {id(p) for p in block_params(stack, 1)}


def test_blocks_trained_before_the_first_apply_are_never_quantized():
    """Trained without apply_selection, then re-selected with quantize_frozen: the block trained so far
    must keep its exact weights, not be rounded to 4 bits."""
    pytest.importorskip("bitsandbytes")
    model = tiny_model("llama", seed=9).train()
    model.requires_grad_(False)
    stack = find_layers(model)
    stack[0].requires_grad_(True)
    optimizer = make_optimizer(model)
    reselector = Reselector(model, ScriptedProbe([[0.1, 5.0, 0.2]]), every=1, strategy="top", k=1,
                            optimizer=optimizer, apply_kwargs={"quantize_frozen": "nf4"})
    model(**make_batch(model, seed=10)).loss.backward()
    optimizer.step()
    trained = {name: p.detach().clone() for name, p in stack[0].named_parameters()}
    assert reselector.step().layers == (1,)
    assert dict(stack[0].named_parameters()).keys() == trained.keys()
    for name, param in stack[0].named_parameters():
        assert torch.equal(param, trained[name]), name
    assert type(stack[2].mlp.down_proj).__name__ == "Linear4bit"  # never trained: quantized
