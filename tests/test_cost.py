"""The step-time model against counted work (FlopCounterMode, bitsandbytes' dequantizations, trainable
parameters) and the cost-aware choice against brute force."""
import collections
import itertools
import math
import random
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tiny_models import tiny_config, tiny_model
from laet_fast.cost import (
    CPU_DEFAULT,
    PARTS,
    CostModel,
    StepTimeCalibration,
    cost_aware_selection,
    fit_calibration,
    laet_cost_selection,
    plan_step_time,
)
from laet_fast.selection import Selection, laet_keep, select_layers

# (arch, trained blocks, train_extra): a cut at every depth, sets with gaps, nothing, a trained head.
CASES = [("llama", [2], ()), ("llama", [0], ()), ("llama", [0, 2], ()), ("llama", [1], ("lm_head",)),
         ("llama", [], ("lm_head",)), ("llama", [1, 2], ("model.embed_tokens",)),
         ("gpt2", [2], ()), ("gpt2", [0, 2], ()), ("gpt2", [1], ()), ("gpt2", [], ())]


def _prepared(arch, layers, extra, quantize=None, **overrides):
    model = tiny_model(arch, seed=0, **overrides).train()
    model.config._attn_implementation = "eager"  # SDPA's CPU kernel has no FLOP formula in FlopCounterMode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty selection's warning
        from laet_fast.apply import apply_selection

        apply_selection(model, layers, train_extra=extra, quantize_frozen=quantize)
    return model


@pytest.mark.parametrize("arch,layers,extra", CASES)
def test_flops_equal_flop_counter(arch, layers, extra):
    model = _prepared(arch, layers, extra)
    batch, seq = random.Random(len(CASES)).choice([(2, 9), (3, 7)])
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, labels=ids, use_cache=False)
        forward = counter.get_total_flops()
        if out.loss.requires_grad:
            out.loss.backward()
    plan = plan_step_time(model.config, layers, seq, batch, train_extra=[e.rsplit(".", 1)[-1] for e in extra])
    assert plan.work["forward"] == forward
    assert plan.flops == counter.get_total_flops()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.work["optimizer"] == trainable


def test_backward_input_and_weight_split():
    """A frozen block above the cut costs input gradients only; training it adds its weight gradients."""
    config = tiny_config("llama", num_hidden_layers=5)
    low, both = (plan_step_time(config, layers, 13, 2) for layers in ([1, 4], [1, 3, 4]))
    assert low.work["backward_input"] == both.work["backward_input"]
    assert both.work["backward_weight"] - low.work["backward_weight"] == both.work["backward_weight"] / 3
    deeper = plan_step_time(config, [0, 3, 4], 13, 2)
    attention = 4 * 2 * config.num_attention_heads * 13 * 13 * (config.hidden_size // config.num_attention_heads)
    # One more block in the backward pass: its linears once, its attention twice (dQ, dK, dV, dP).
    assert deeper.work["backward_input"] - both.work["backward_input"] == deeper.block_flops + attention


class _DequantCounter(TorchDispatchMode):
    """Elements of 4-bit weights that bitsandbytes' ops expand (dequantize_4bit, or gemm_4bit's fused one)."""

    def __init__(self):
        super().__init__()
        self.elements = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith("bitsandbytes.dequantize_4bit"):
            self.elements["dequant"] += out.numel()
        elif name.startswith("bitsandbytes.gemm_4bit"):
            self.elements["dequant"] += math.prod(args[2])  # shapeB of the 4-bit weight
        return out


def test_dequant_elements_equal_bitsandbytes_ops():
    pytest.importorskip("bitsandbytes")
    small = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4, vocab_size=300)
    model = _prepared("llama", [1, 2], (), quantize="nf4", **small)
    ids = torch.randint(0, 300, (2, 9))
    with _DequantCounter() as counter:
        model(ids, labels=ids, use_cache=False).loss.backward()
    plan = plan_step_time(model.config, [1, 2], 9, 2, quantize_frozen="nf4")
    assert counter.elements["dequant"] == plan.work["dequant"] > 0
    assert plan_step_time(model.config, [1, 2], 9, 2).work["dequant"] == 0


def _selections(n, count, seed):
    """``count`` different non-empty block sets of ``n``, with random cuts and sizes."""
    rng, picks = random.Random(seed), set()
    while len(picks) < count:
        cut = rng.randrange(n)
        picks.add(tuple(sorted({cut, *rng.sample(range(cut, n), rng.randint(0, n - cut))})))
    return sorted(picks)


def test_fit_recovers_the_rates_it_can_separate():
    config = tiny_config("llama", num_hidden_layers=8)
    truth = StepTimeCalibration(rates={"forward": 3e9, "backward_input": 1.1e9, "backward_weight": 2.3e9,
                                       "dequant": 5e8, "optimizer": 7e7})
    plans = [plan_step_time(config, layers, 17, 3) for layers in _selections(8, 10, seed=1)]
    times = [plan_step_time(config, p.layers, 17, 3, calibration=truth).total_s for p in plans]
    base = StepTimeCalibration(rates={**truth.rates, "forward": 1.0, "backward_input": 1.0, "backward_weight": 1.0})
    fitted = fit_calibration(plans, times, base=base)
    # At one shape the optimizer's elements follow the weight gradients: it keeps the base rate.
    assert fitted.fitted == ("forward", "backward_input", "backward_weight")
    for part in PARTS:
        assert fitted.rates[part] == pytest.approx(truth.rates[part], rel=1e-9)
    # Noisy times: the predictions stay within the noise.
    rng = random.Random(2)
    noisy = [t * (1 + rng.uniform(-0.03, 0.03)) for t in times]
    refit = fit_calibration(plans, noisy, base=base)
    for plan, t in zip(plans, times):
        assert plan_step_time(config, plan.layers, 17, 3, calibration=refit).total_s == pytest.approx(t, rel=0.06)


def test_fit_rejects_mismatched_input():
    config = tiny_config("llama")
    plans = [plan_step_time(config, [2], 9, 1)]
    with pytest.raises(ValueError, match="one measured time per plan"):
        fit_calibration(plans, [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_calibration(plans, [0.0])
    with pytest.raises(ValueError, match="positive rate"):
        StepTimeCalibration(rates={"forward": 1.0})


def _brute_force(values, cost_model, cost, budget):
    best = None
    for r in range(1, len(values) + 1):
        for layers in itertools.combinations(range(len(values)), r):
            c = cost_model.time(layers).total_s if cost == "s" else cost_model.memory(layers).total / 2**30
            if c <= budget:
                key = (sum(values[i] for i in layers), -c)
                if best is None or key > best[0]:
                    best = (key, layers)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budgeted_choice_equals_brute_force(seed):
    rng = random.Random(seed)
    n = 7
    config = tiny_config("llama", num_hidden_layers=n, hidden_size=96, intermediate_size=200)
    model = CostModel(config, seq_len=rng.choice([33, 64]), batch_size=2, dtype="fp32")
    values = [rng.uniform(-0.2, 1.0) for _ in range(n)]
    times = sorted(model.time(layers).total_s for layers in ([n - 1], [0], list(range(n))))
    for budget in (times[0] * 1.01, (times[0] + times[1]) / 2, times[1], (times[1] + times[2]) / 2, times[2]):
        selection, curve = cost_aware_selection(values, model, metric="m", budget_s=budget)
        (importance, _), layers = _brute_force(values, model, "s", budget)
        assert selection.layers == layers
        assert selection.params["importance"] == pytest.approx(importance)
        assert selection.params["predicted_s"] <= budget
    gib = sorted(model.memory(layers).total / 2**30 for layers in ([n - 1], list(range(n))))
    for budget in (gib[0] * 1.0001, (gib[0] + gib[1]) / 2, gib[1]):
        selection, _ = cost_aware_selection(values, model, budget_gb=budget)
        (importance, _), layers = _brute_force(values, model, "gb", budget)
        assert selection.params["importance"] == pytest.approx(importance)
        assert selection.params["predicted_gb"] <= budget


def test_tradeoff_equals_brute_force():
    rng = random.Random(5)
    config = tiny_config("gpt2", n_layer=6)
    model = CostModel(config, seq_len=40, batch_size=2)
    values = [rng.uniform(0, 1) for _ in range(6)]
    full = model.time(range(6)).total_s
    for tradeoff in (0.0, 1.0 / full, 5.0 / full, 1e3 / full):
        selection, _ = cost_aware_selection(values, model, tradeoff=tradeoff)
        best = max((layers for r in range(1, 7) for layers in itertools.combinations(range(6), r)),
                   key=lambda ls: (sum(values[i] for i in ls) - tradeoff * model.time(ls).total_s,
                                   -model.time(ls).total_s))
        assert selection.layers == best
    assert cost_aware_selection(values, model, tradeoff=0.0)[0].layers == tuple(range(6))


def test_cost_aware_selection_and_its_curve(tmp_path):
    config = tiny_config("llama", num_hidden_layers=6)
    model = CostModel(config, seq_len=32, batch_size=2)
    scores = {"grad_norm": [0.9, 0.1, 0.2, 0.3, 0.8, 0.7]}
    budget = model.time([4, 5]).total_s
    selection, _ = cost_aware_selection(scores, model, metric="grad_norm", budget_s=budget)
    assert isinstance(selection, Selection) and selection.strategy == "cost_aware"
    assert selection.layers == (4, 5)  # block 0 scores highest, but moving the cut there costs too much
    assert Selection.from_dict(selection.to_dict()) == selection
    _, curve = cost_aware_selection(scores["grad_norm"], model, metric="grad_norm", budget_s=budget)
    frontier = curve.frontier()
    assert [p.seconds for p in frontier] == sorted(p.seconds for p in frontier)
    assert all(a.importance < b.importance for a, b in zip(frontier, frontier[1:]))
    assert curve.chosen in frontier
    data = curve.to_dict()
    assert data["chosen"]["layers"] == [4, 5] and len(data["points"]) == 6 * 7 // 2
    path = curve.plot(str(tmp_path / "curve.png"))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cost_aware_errors():
    config = tiny_config("llama")
    model = CostModel(config, seq_len=16)
    scores = [0.1, 0.5, 0.2]
    with pytest.raises(ValueError, match="exactly one of budget_s=, budget_gb= or tradeoff="):
        cost_aware_selection(scores, model)
    with pytest.raises(ValueError, match="exactly one"):
        cost_aware_selection(scores, model, budget_s=1.0, tradeoff=1.0)
    with pytest.raises(ValueError, match="needs cost_model="):
        cost_aware_selection(scores, None, budget_s=1.0)
    with pytest.raises(ValueError, match="budget_s=-1.0 must be a positive number"):
        cost_aware_selection(scores, model, budget_s=-1.0)
    with pytest.raises(ValueError, match="No layer set fits budget_s=1e-12"):
        cost_aware_selection(scores, model, budget_s=1e-12)
    with pytest.raises(ValueError, match="name the metric"):
        cost_aware_selection({"grad_norm": scores}, model, budget_s=1.0)
    with pytest.raises(ValueError, match="cover 3 layers but the model has 5"):
        cost_aware_selection(scores, CostModel(tiny_config("llama", num_hidden_layers=5), seq_len=16), budget_s=1.0)
    # select_layers chooses by scores alone and names the function that weighs cost
    with pytest.raises(ValueError, match="weighs cost too: call laet_fast.cost.cost_aware_selection"):
        select_layers(scores, strategy="cost_aware")


def _laet_cost_brute_force(acc, kept, cost_model, k=None, budget_s=None):
    """Every subset of LAET's kept blocks whose lowest is the best probe's block, at most k of them, within
    budget_s: the most accurate in sum, then the cheapest."""
    best = max(kept, key=lambda i: acc[i])
    above = [i for i in kept if i > best]
    candidates = []
    for r in range(len(above) + 1):
        for extra in itertools.combinations(above, r):
            layers = (best, *extra)
            seconds = cost_model.time(layers).total_s
            if (k is None or len(layers) <= k) and (budget_s is None or seconds <= budget_s):
                candidates.append(((sum(acc[i] for i in layers), -seconds), layers))
    return max(candidates)[1] if candidates else None


@pytest.mark.parametrize("acc", [
    [0.50, 0.90, 0.55, 0.86, 0.88, 0.52],  # the best probe's block is LAET's lowest kept block
    [0.50, 0.86, 0.55, 0.90, 0.88, 0.52],  # ... or above another kept block, which laet-cost then leaves out
    [0.70, 0.72, 0.71, 0.69, 0.90, 0.73],
])
def test_laet_cost_is_the_cheapest_kept_set_holding_the_best_probe(acc):
    n = len(acc)
    config = tiny_config("llama", num_hidden_layers=n, hidden_size=96, intermediate_size=200)
    model = CostModel(config, seq_len=32, batch_size=2, dtype="fp32")
    f1 = [a - 0.01 for a in acc]
    kept = laet_keep(acc, f1)
    selection, _ = laet_cost_selection(acc, f1, model)
    assert selection.layers == _laet_cost_brute_force(acc, kept, model) and selection.strategy == "laet_cost"
    assert set(selection.layers) <= set(kept) and selection.lowest == max(kept, key=lambda i: acc[i])
    assert selection.params["kept"] == kept and selection.params["best"] == selection.lowest
    # Never costlier than LAET's own choice (the backward pass stops at the best block, not below it).
    assert model.time(selection.layers).total_s <= model.time(kept).total_s
    for k in range(1, len(selection) + 1):
        assert laet_cost_selection(acc, f1, model, k=k)[0].layers == _laet_cost_brute_force(acc, kept, model, k=k)
    times = sorted({model.time(layers).total_s for layers in [selection.layers[:1], selection.layers]})
    for budget in (times[0], (times[0] + times[-1]) / 2, times[-1]):
        chosen, _ = laet_cost_selection(acc, f1, model, budget_s=budget)
        assert chosen.layers == _laet_cost_brute_force(acc, kept, model, budget_s=budget)
        assert chosen.params["predicted_s"] <= budget
    gib = model.memory(selection.layers[:1]).total / 2**30
    assert laet_cost_selection(acc, f1, model, budget_gb=gib)[0].layers == selection.layers[:1]


def test_laet_cost_errors():
    model = CostModel(tiny_config("llama"), seq_len=16)
    acc = f1 = [0.5, 0.9, 0.6]
    with pytest.raises(ValueError, match="needs cost_model="):
        laet_cost_selection(acc, f1)
    with pytest.raises(ValueError, match="weighs cost too: call laet_fast.cost.laet_cost_selection"):
        select_layers({"probe_acc": acc, "probe_f1": f1}, strategy="laet_cost")
    with pytest.raises(ValueError, match="one of budget_s and budget_gb, not both"):
        laet_cost_selection(acc, f1, model, budget_s=1.0, budget_gb=1.0)
    with pytest.raises(ValueError, match=r"No layer set fits budget_s=1e-12: the cheapest, block \[1\]"):
        laet_cost_selection(acc, f1, model, budget_s=1e-12)


def test_calibration_round_trips(tmp_path):
    path = tmp_path / "cal.json"
    import json

    path.write_text(json.dumps({"calibration": CPU_DEFAULT.to_dict()}))
    assert StepTimeCalibration.from_json(str(path)) == CPU_DEFAULT
    plan = plan_step_time(tiny_config("llama"), 2, 8)
    assert "backward_weight" in str(plan) and plan.to_dict()["layers"] == [1, 2]
