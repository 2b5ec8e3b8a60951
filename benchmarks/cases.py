"""Case builders shared by the benchmark suites (``test_bench_*``) and ``gpu_check.py``'s steps: one place for the
models, block shapes and implementation choices they measure, so the two harnesses measure the same things.
"""
from __future__ import annotations

import gc
import time

import torch

ON_CUDA = torch.cuda.is_available()
SEQ, BATCH = 1024, 1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def init_param(param: torch.Tensor, generator: torch.Generator) -> None:
    """Random weights of a plausible scale: ones for norm weights (1-D), N(0, 0.02) for matrices."""
    with torch.no_grad():
        if param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def materialize(module: torch.nn.Module, device, generator) -> None:
    """Replace the meta parameters directly owned by ``module`` and its children by random tensors on ``device``."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_meta:
                real = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                init_param(real, generator)
                setattr(sub, name, real)


def build_model(config, trained_layers=(), quantize=None, dtype=torch.bfloat16, device="cuda", seed=0):
    """A random-weight causal LM for ``config`` whose frozen blocks are quantized as they are created.

    The model is built on the meta device (no memory); then each block is materialised on ``device`` in
    ``dtype`` and, unless it is in ``trained_layers``, its linear layers are swapped for bitsandbytes
    ``quantize`` layers right away (``laet_fast.quantize.quantize_linears``), so at most one bf16 block
    exists beside the quantized model. Embeddings, final norm, LM head (tied when the config says so) and
    the rotary tables follow. No selection is applied: call ``laet_fast.apply_selection(model, layers,
    dtype=dtype)`` (without ``quantize_frozen``: the blocks already are) or set ``requires_grad`` yourself.
    With ``trained_layers=()`` every block is quantized (a QLoRA base).
    """
    from transformers import AutoModelForCausalLM

    from laet_fast.layers import find_layers
    from laet_fast.quantize import quantize_linears

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    for index, block in enumerate(find_layers(model)):
        materialize(block, device, generator)
        if quantize is not None and index not in trained_layers:
            quantize_linears(block, quantize, compute_dtype=dtype)
    materialize(model, device, generator)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    leftovers = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert not leftovers, f"still on the meta device: {leftovers[:5]}"
    return model.train()


def release():
    gc.collect()
    if ON_CUDA:
        torch.cuda.empty_cache()


def train_step(model, optimizer, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def steady_peak(model, optimizer, ids, baseline, warmup=2, steps=3):
    """Steady-state peak allocated bytes above ``baseline`` and seconds per step (CUDA only)."""
    for _ in range(warmup):
        train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return torch.cuda.max_memory_allocated() - baseline, seconds


def row_setup(kind, config, k, device, seq=SEQ, dtype=torch.bfloat16):
    """(model, optimizer, plan or None) for one row of the table."""
    import laet_fast
    from laet_fast.memory import plan_memory

    layers_total = config.num_hidden_layers
    trained = tuple(range(layers_total - k, layers_total)) if k else ()
    if kind in ("laet_nf4", "laet_bf16"):
        quantize = "nf4" if kind == "laet_nf4" else None
        model = build_model(config, trained, quantize=quantize, dtype=dtype, device=device)
        laet_fast.apply_selection(model, list(trained), dtype=dtype)
        optimizer = laet_fast.build_optimizer(model, "adamw8bit", lr=1e-4)
        plan = plan_memory(config, k, seq, BATCH, quantize_frozen=quantize,
                           optimizer="adamw8bit", dtype="bf16" if dtype == torch.bfloat16 else "fp32")
        return model, optimizer, plan
    if kind == "full_ft":
        model = build_model(config, dtype=dtype, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        return model, optimizer, None
    if kind in ("lora_r16", "qlora_r16"):
        from peft import LoraConfig, get_peft_model

        quantize = "nf4" if kind == "qlora_r16" else None
        model = build_model(config, (), quantize=quantize, dtype=dtype, device=device)
        for param in model.parameters():
            param.requires_grad_(False)
        if quantize:
            model.is_loaded_in_4bit = True  # lets PEFT pick its bitsandbytes LoRA layer, as after from_pretrained
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, optimizer, None
    raise ValueError(kind)


def llama_block_shapes(hidden, intermediate, heads, kv_heads, head_dim, **_):
    """Parameter shapes of one Llama decoder block (nn.Linear weights are [out, in])."""
    return [
        (heads * head_dim, hidden),  # q_proj
        (kv_heads * head_dim, hidden),  # k_proj
        (kv_heads * head_dim, hidden),  # v_proj
        (hidden, heads * head_dim),  # o_proj
        (intermediate, hidden),  # gate_proj
        (intermediate, hidden),  # up_proj
        (hidden, intermediate),  # down_proj
        (hidden,),  # input_layernorm
        (hidden,),  # post_attention_layernorm
    ]


def foreach_grouped_norms(tensors, index, out):
    """Grouped squared norms with torch's foreach kernels: what the Triton kernel replaces."""
    norms = torch._foreach_norm(tensors)
    out.index_add_(0, index, torch.stack(norms).float().square())


def per_tensor_item_norms(tensors, groups, out_list):
    """One norm and one host sync per tensor: the naive loop."""
    for t, g in zip(tensors, groups):
        out_list[g] += t.norm().item() ** 2


def frozen_linear_norm_fn(impl, x, dy, out):
    """The call a frozen-linear gradient-norm implementation makes, as a no-argument function."""
    from laet_fast.kernels.grad_norm import linear_grad_sq_norm

    if impl in ("tiled", "gram", "auto"):
        return lambda: linear_grad_sq_norm(x, dy, out, method=impl)
    if impl == "torch_path_auto":
        return lambda: linear_grad_sq_norm(x, dy, out)
    if impl == "materialise":
        return lambda: out.add_((dy.T @ x).float().square().sum())
    return lambda: dy.T @ x  # the weight-gradient matmul autograd would run


def hidden_stats_implementation(impl):
    """The hidden-statistics function an implementation name stands for."""
    from laet_fast.kernels.hidden_stats import accumulate_hidden_stats, accumulate_hidden_stats_reference

    if impl == "triton":
        return accumulate_hidden_stats
    if impl == "torch_eager":
        return accumulate_hidden_stats_reference
    return torch.compile(accumulate_hidden_stats_reference, dynamic=False)


def tiny_llama(seed: int = 0, dtype=torch.float32):
    """A randomly initialised 3-block Llama (hidden 72, vocabulary 211: sizes that are not powers of two), eager
    attention, in eval mode: a model to run a benchmark's code path on a CPU in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=72, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=211)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()
