"""The 8B memory claim measured on a CPU: a model of Llama-3.1-8B's shape with random weights, built block by block
straight into NF4 frozen blocks and bf16 trained blocks (the whole model never exists in bf16), real training
steps at 1 x 1024 tokens for ``lm`` (with the chunked LM-head loss and without) and for ``classify``, and the
peak of live tensors (``laet_fast.measure.measure_cpu_peak``) against ``plan_memory``, part by part: the
forward and backward pass, then the optimizer step.

What a GPU adds on top of these tensors (the CUDA context, the caching allocator's rounding, cuBLAS
workspaces) is ``plan_memory``'s ``overhead`` term; a CPU cannot measure it.

    python benchmarks/memory_cpu.py                         # Llama-3.1-8B: about 20 GB of RAM, tens of minutes
    python benchmarks/memory_cpu.py --shape smollm2-135m    # the same check in a minute

Writes ``results/memory_cpu_<shape>.json``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import write_result  # noqa: E402

GIB = 2**30


def build(shape: str, trained: list[int], seed: int = 0):
    """The model of ``shape`` in bf16, blocks made one at a time: frozen ones quantized to NF4 as soon as made."""
    from transformers import AutoModelForCausalLM

    from laet_fast.memory import shape_config
    from laet_fast.quantize import quantize_linears

    config = shape_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # on meta: no memory yet
    gen = torch.Generator().manual_seed(seed)

    def materialize(module):
        module.to_empty(device="cpu")
        for name, tensor in module.named_parameters(recurse=True):
            with torch.no_grad():
                if name.endswith("norm.weight") or tensor.dim() == 1:
                    tensor.fill_(1.0)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=torch.float32).mul_(0.02))

    for index, block in enumerate(model.model.layers):
        materialize(block)
        if index not in trained:
            quantize_linears(block, "nf4", torch.bfloat16)
            gc.collect()
    materialize(model.model.embed_tokens)
    materialize(model.model.norm)
    if not config.tie_word_embeddings:
        materialize(model.lm_head)
    else:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers, made on the CPU
    return model.eval(), config


def forward_backward(task_model, batch: dict) -> None:
    loss = task_model(**batch)[0]  # as the Trainer does: the logits are not kept (the plan has them freed)
    loss.backward()


def one_step(task_model, optimizer, batch: dict) -> None:
    forward_backward(task_model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(shape: str, task: str, k: int, seq_len: int, optimizer_name: str, loss_chunk: int) -> dict:
    from laet_fast.apply import apply_selection, build_optimizer
    from laet_fast.measure import measure_cpu_peak
    from laet_fast.memory import plan_memory
    from laet_fast.train.heads import ProbeHead, TaskModel

    started = time.perf_counter()
    from laet_fast.memory import shape_config

    layers = shape_config(shape).num_hidden_layers
    trained = list(range(layers - k, layers))
    model, config = build(shape, trained)
    heads = {layers - 1: ProbeHead(config.hidden_size, 2, ())} if task == "classify" else None
    task_model = TaskModel(model, task, heads, loss_chunk=loss_chunk if task == "lm" else 0)
    # bf16, as on a GPU (on a CPU apply_selection would default to fp32)
    apply_selection(task_model, trained, quantize_frozen="nf4", layers=task_model.layers_path, dtype=torch.bfloat16)
    task_model.train()
    optimizer = build_optimizer(task_model, optimizer_name, lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.tensor([1]) if task == "classify" else ids
    built = time.perf_counter() - started
    one_step(task_model, optimizer, batch)  # the optimizer state exists from the first step on
    gc.collect()
    resident = sum(t.untyped_storage().nbytes() for t in _tensors(task_model, optimizer))
    t0 = time.perf_counter()
    # The step in its two phases: forward + backward (activations, logits, gradients: what the plan models), then
    # the optimizer step over the gradients it left (on a CPU, bitsandbytes' 8-bit AdamW works through fp32
    # temporaries that its fused GPU kernel does not make).
    peak_backward = measure_cpu_peak(lambda: forward_backward(task_model, batch))
    gradients = sum(p.grad.untyped_storage().nbytes() for p in task_model.parameters() if p.grad is not None)
    peak_optimizer = measure_cpu_peak(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    peak_above = max(peak_backward, gradients + peak_optimizer)
    step_s = time.perf_counter() - t0
    plan = plan_memory(config, trained, seq_len=seq_len, batch_size=1, quantize_frozen="nf4",
                       optimizer=optimizer_name, dtype="bf16", keep_logits=False,
                       loss_chunk=loss_chunk if task == "lm" else 0, lm_head=task == "lm")
    measured = resident + peak_above
    return {"task": task, "k": k, "seq_len": seq_len, "optimizer": optimizer_name,
            "loss_chunk": loss_chunk if task == "lm" else 0,
            "measured_peak_gib": measured / GIB, "measured_resident_gib": resident / GIB,
            "measured_step_peak_above_resident_gib": peak_above / GIB,
            "measured_forward_backward_peak_gib": (resident + peak_backward) / GIB,
            "measured_gradients_gib": gradients / GIB,
            "measured_optimizer_step_peak_gib": (resident + gradients + peak_optimizer) / GIB,
            "measured_optimizer_step_temporaries_gib": peak_optimizer / GIB,
            "planned_peak_allocated_gib": plan.peak_allocated / GIB, "planned_total_gib": plan.total / GIB,
            "planned_overhead_gib": plan.overhead / GIB, "planned_peak_phase": plan.peak_phase,
            "planned_terms_gib": {term: getattr(plan, term) / GIB for term in plan.TERMS},
            "plan_error": plan.peak_allocated / measured - 1.0,
            "plan_error_forward_backward": plan.peak_allocated / (resident + peak_backward) - 1.0,
            "build_s": built, "step_s": step_s}


def _tensors(task_model, optimizer):
    """The model's and the optimizer's tensors, each storage once."""
    from laet_fast.quantize import quant_state_tensors

    seen, out = set(), []
    candidates = list(task_model.parameters()) + list(task_model.buffers())
    for module in task_model.modules():
        candidates += quant_state_tensors(module)
    for state in optimizer.state.values():
        candidates += [v for v in state.values() if torch.is_tensor(v)]
    for tensor in candidates:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def _setting(run: dict) -> tuple:
    return tuple(run.get(key) for key in ("task", "k", "seq_len", "optimizer", "loss_chunk"))


def _saved_runs(shape: str) -> list[dict]:
    from bench_utils import read_result

    return (read_result(f"memory_cpu_{shape}") or {}).get("runs", [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--optimizer", default="adamw8bit")
    parser.add_argument("--loss-chunks", default="256,0",
                        help="lm runs once per chunk size (0: the plain loss, full logits)")
    parser.add_argument("--tasks", default="lm,classify")
    args = parser.parse_args(argv)
    runs = []
    for task in args.tasks.split(","):
        for loss_chunk in ([int(c) for c in args.loss_chunks.split(",")] if task == "lm" else [0]):
            runs.append(measure(args.shape, task, args.k, args.seq_len, args.optimizer, loss_chunk))
            print(runs[-1], flush=True)
            gc.collect()
    # The runs of an earlier invocation with other settings stay in the file (one run per setting).
    runs = [run for run in _saved_runs(args.shape) if _setting(run) not in {_setting(r) for r in runs}] + runs
    path = write_result(f"memory_cpu_{args.shape}", {"shape": args.shape, "runs": runs,
                                                      "threads": torch.get_num_threads()})
    print(path)


if __name__ == "__main__":
    main()
