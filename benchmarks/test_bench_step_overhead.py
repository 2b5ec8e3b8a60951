"""Training-step overhead of scoring every layer (LayerProbe with gradient norms) during training.

Model: Llama-3.2-1B shaped (16 blocks, hidden 2048, intermediate 8192, 32 heads, 8 kv heads, vocab
128256, tied embeddings), random weights, bf16, 2 trainable blocks (7 and 15, applied with
``apply_selection``), AdamW. One step = forward + backward + ``optimizer.step()`` + ``zero_grad``.

Modes:

* ``off_cut``: no probe; the backward pass stops at the lowest trained block (what training costs).
* ``off_full``: no probe; the backward pass runs through all 16 blocks (input made to require grad,
  cut suspended) but nothing is scored. Scoring a frozen block needs the gradient that reaches it,
  so this is the like-for-like baseline of the goal.
* ``probe``: ``LayerProbe(model, grad_norms=True)`` attached: hidden-state statistics of every block
  in the forward, gradient norms of all 16 blocks (14 frozen) in the backward.
* ``all_trainable``: how IR-Tuning scores without laet_fast: every block trainable for the step,
  real weight gradients of all blocks (and their memory), per-block norms with
  ``torch._foreach_norm``, then the gradients of unselected blocks dropped before the optimizer.

Goal on GPU: ``probe`` within 5% of ``off_full``; the overheads against ``off_cut`` and
``all_trainable`` are reported too. Expectation from the flop count: an exact norm of a frozen
layer's weight gradient needs ``X^T dY`` (or the Gram form), as many flops as that layer's
weight-gradient matmul, so each frozen block costs about 3 matmul units per step instead of 2
(forward, dX); the goal test is therefore marked xfail (non-strict) and the JSON records the number.
On a CPU a tiny Llama runs through the PyTorch reference kernels (a smoke run, not a measurement),
and the 1B case is skipped. On a GPU the suite writes ``benchmarks/results/step_overhead.json``.

    python -m pytest benchmarks/test_bench_step_overhead.py -q
"""
import contextlib

import pytest
import torch

from bench_utils import write_result

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=128)
CONFIG = LLAMA_1B if ON_CUDA else TINY
BATCH, SEQ = (4, 512) if ON_CUDA else (2, 16)
TRAINED = (7, 15) if ON_CUDA else (1, 3)
ROUNDS = 10 if ON_CUDA else 2
MODES = ["off_cut", "off_full", "probe", "all_trainable"]
GOAL = 0.05


@pytest.fixture(autouse=True)
def reference_kernels_on_cpu(monkeypatch):
    # On a CPU the interpreter (set by tests/conftest.py when run together) would time Python, not work.
    if not ON_CUDA:
        monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def setup():
    import transformers

    if not ON_CUDA:
        # Several test processes share small CPU machines; one thread keeps the smoke run steady.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)

    from laet_fast.apply import apply_selection

    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16 if ON_CUDA else torch.float32)
    model.train()
    apply_selection(model, list(TRAINED), dtype=torch.bfloat16 if ON_CUDA else torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=generator).to(DEVICE)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    yield model, optimizer, batch
    if not ON_CUDA:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results():
    rows = {}
    yield rows
    if ON_CUDA and {"off_full", "probe"} <= set(rows):
        summary = {f"overhead_vs_{base}": rows["probe"]["step_ms"] / rows[base]["step_ms"] - 1
                   for base in ("off_cut", "off_full", "all_trainable") if base in rows}
        summary["goal"] = f"probe step within {GOAL:.0%} of off_full"
        write_result("step_overhead", {"model": "Llama-3.2-1B shaped, random bf16", "config": CONFIG,
                                        "batch": BATCH, "seq": SEQ, "trained_blocks": list(TRAINED),
                                        "rows": rows, **summary})


@contextlib.contextmanager
def _mode(model, mode):
    from laet_fast.apply import suspend_backward_cut
    from laet_fast.probe import LayerProbe

    if mode in ("off_cut", "all_trainable"):
        yield
    elif mode == "off_full":
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        with suspend_backward_cut(model):
            yield
        hook.remove()
    else:
        with LayerProbe(model, grad_norms=True) as probe:
            yield
        scores = probe.scores()
        grad_norms = scores["grad_norm"]
        assert len(grad_norms) == CONFIG["num_hidden_layers"]
        assert all(v > 0 for v in grad_norms), grad_norms  # every block scored, frozen ones included


def _step(model, optimizer, batch):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ON_CUDA:
        torch.cuda.synchronize()


def _step_all_trainable(model, optimizer, batch, blocks):
    """IR-Tuning without laet_fast: train every block for one backward, norm, keep the selected grads."""
    from laet_fast.apply import suspend_backward_cut

    frozen = [p for i, block in enumerate(blocks) if i not in TRAINED for p in block.parameters()]
    for param in frozen:
        param.requires_grad_(True)
    with suspend_backward_cut(model):
        model(**batch).loss.backward()
    norms = torch.stack([torch.stack(torch._foreach_norm([p.grad for p in block.parameters()])).square().sum()
                         for block in blocks]).sqrt()
    for param in frozen:
        param.grad = None
        param.requires_grad_(False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ON_CUDA:
        torch.cuda.synchronize()
    return norms


@pytest.mark.parametrize("mode", MODES)
def test_step_overhead(benchmark, setup, results, mode):
    model, optimizer, batch = setup
    with _mode(model, mode):
        benchmark.group = f"train step, {'Llama-3.2-1B shape' if ON_CUDA else 'tiny llama (CPU smoke)'}"
        if ON_CUDA:
            torch.cuda.reset_peak_memory_stats()
        if mode == "all_trainable":
            from laet_fast.layers import find_layers

            step, args = _step_all_trainable, (model, optimizer, batch, find_layers(model).blocks)
        else:
            step, args = _step, (model, optimizer, batch)
        benchmark.pedantic(step, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=1 if ON_CUDA else 0)
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        row = {"step_ms": benchmark.stats.stats.median * 1e3}
        if ON_CUDA:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results[mode] = row
        benchmark.extra_info.update(row)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="the 5% goal is measured on a GPU with the 1B shape")
@pytest.mark.xfail(strict=False, reason="exact frozen-layer norms cost one weight-gradient-sized matmul per "
                                        "layer (see the module docstring); the JSON records the overhead")
def test_overhead_goal(results):
    if not {"off_full", "probe"} <= set(results):
        pytest.skip("the timed cases did not run (e.g. --benchmark-disable)")
    overhead = results["probe"]["step_ms"] / results["off_full"]["step_ms"] - 1
    print(f"probe overhead vs the same backward without scoring: {overhead:.1%} (goal < {GOAL:.0%})")
    assert overhead < GOAL
