"""Fused hidden-state statistics: Triton kernel (interpreter on CPU) against an independent float64 reference."""
import pytest
import torch

import laet_fast.kernels.hidden_stats as hs
from laet_fast.backend import TRITON_INTERPRET
from laet_fast.kernels.hidden_stats import (
    STAT_FIELDS,
    accumulate_hidden_stats,
    hidden_stats_metrics,
    hidden_stats_reference,
    new_stats_buffer,
)

EPS = 1e-8

# With TRITON_INTERPRET=1 (tests/conftest.py's default) CUDA tensors would go through the interpreter
# on host copies, so a GPU test would pass without running the compiled kernel.
NEEDS_COMPILED_CUDA_KERNELS = pytest.mark.skipif(
    not torch.cuda.is_available() or TRITON_INTERPRET,
    reason="needs CUDA and TRITON_INTERPRET=0 (else the interpreter runs instead of the compiled kernel)",
)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def expected_stats(h_in, h_out, mask=None, dtype=torch.float64):
    """The five sums written out independently: real rows are selected by indexing, math in ``dtype``."""
    real = torch.ones(h_in.shape[0], dtype=torch.bool) if mask is None else mask.to(torch.bool)
    a, b = h_in[real].to(dtype), h_out[real].to(dtype)
    if a.shape[0] == 0:
        return torch.zeros(5, dtype=torch.float64)
    a_norm = a.pow(2).sum(1).sqrt().clamp(min=EPS)
    b_norm = b.pow(2).sum(1).sqrt().clamp(min=EPS)
    cos = torch.einsum("th,th->t", a, b) / (a_norm * b_norm)
    rel = (b - a).pow(2).sum(1).sqrt() / a_norm
    return torch.stack([
        torch.tensor(float(a.shape[0]), dtype=dtype), (1 - cos).sum(), rel.sum(), b.pow(2).sum(), b.abs().max(),
    ]).to(torch.float64)


def expected_metrics(h_in, h_out, mask=None):
    real = torch.ones(h_in.shape[0], dtype=torch.bool) if mask is None else mask.to(torch.bool)
    a, b = h_in[real].double(), h_out[real].double()
    cos = (a * b).sum(1) / (a.norm(dim=1).clamp(min=EPS) * b.norm(dim=1).clamp(min=EPS))
    return {
        "block_influence": 1 - cos.mean(),
        "relative_change": ((b - a).norm(dim=1) / a.norm(dim=1).clamp(min=EPS)).mean(),
        "act_rms": b.pow(2).mean().sqrt(),
        "act_absmax": b.abs().max(),
    }


def assert_stats_close(got, h_in, h_out, mask=None):
    """fp32: tight tolerance. bf16/fp16: error vs float64 <= 2x PyTorch's own error in that dtype + small atol."""
    reference = expected_stats(h_in.double(), h_out.double(), mask)
    got = got.double()
    if h_in.dtype in LOW_PRECISION:
        torch_error = (expected_stats(h_in, h_out, mask, dtype=h_in.dtype) - reference).abs()
        allowed = 2 * torch_error + 1e-5 * reference.abs() + 1e-6
    else:
        allowed = 2e-5 * reference.abs() + 1e-6
    error = (got - reference).abs()
    bad = [f"{STAT_FIELDS[i]}: got {got[i]:.8g}, want {reference[i]:.8g} (allowed {allowed[i]:.3g})"
           for i in range(5) if not error[i] <= allowed[i]]
    assert not bad, "; ".join(bad)


def make_pair(tokens, hidden, dtype, seed):
    """A block input and an output that is a perturbed copy of it (cosines near, not at, 1)."""
    gen = torch.Generator().manual_seed(seed)
    h_in = torch.randn(tokens, hidden, generator=gen) * 2
    h_out = h_in + 0.3 * torch.randn(tokens, hidden, generator=gen) + 0.1
    return h_in.to(dtype), h_out.to(dtype)


def make_mask(tokens, kind, seed):
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "bool":
        mask = torch.rand(tokens, generator=gen) > 0.35
        mask[0] = True
        return mask
    # An attention mask as HF hands it over: int64, two padded sequences flattened, padded on the
    # right ("int") or on the left ("int_left").
    mask = torch.ones(tokens, dtype=torch.long)
    if kind == "int_left":
        mask[:4] = 0
        mask[tokens // 2: tokens // 2 + 3] = 0
    else:
        mask[tokens // 2 - 3: tokens // 2] = 0
        mask[-5:] = 0
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hidden", [72, 200, 576])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int", "int_left"])
def test_kernel_matches_float64_reference(dtype, hidden, mask_kind):
    h_in, h_out = make_pair(37, hidden, dtype, seed=hidden)
    mask = make_mask(37, mask_kind, seed=hidden)
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, mask, acc)
    assert_stats_close(acc, h_in, h_out, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_reference_matches_float64_reference(dtype):
    h_in, h_out = make_pair(23, 200, dtype, seed=3)
    mask = make_mask(23, "bool", seed=3)
    got = hidden_stats_reference(h_in, h_out, mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected_stats(h_in.double(), h_out.double(), mask), rtol=1e-12, atol=1e-12)


def test_metrics_match_float64_definitions():
    h_in, h_out = make_pair(37, 576, torch.float32, seed=7)
    mask = make_mask(37, "int", seed=7)
    acc = new_stats_buffer(2, "cpu")
    accumulate_hidden_stats(h_in, h_out, mask, acc[1])
    metrics = hidden_stats_metrics(acc, hidden_size=576)
    for name, want in expected_metrics(h_in, h_out, mask).items():
        assert metrics[name].shape == (2,)
        assert torch.isnan(metrics[name][0]), f"{name} of a layer with no tokens must be NaN"
        torch.testing.assert_close(metrics[name][1].double(), want, rtol=2e-5, atol=1e-6, msg=name)


def test_accumulates_across_calls_weighted_by_tokens():
    batches = [make_pair(t, 200, torch.bfloat16, seed=t) for t in (37, 5, 64)]
    masks = [make_mask(37, "bool", seed=1), None, make_mask(64, "int", seed=2)]
    buf = new_stats_buffer(3, "cpu")
    for (h_in, h_out), mask in zip(batches, masks):
        accumulate_hidden_stats(h_in, h_out, mask, buf[1])
    assert torch.equal(buf[0], torch.zeros(5)) and torch.equal(buf[2], torch.zeros(5)), "other layers touched"
    h_in = torch.cat([b[0] for b in batches])
    h_out = torch.cat([b[1] for b in batches])
    mask = torch.cat([torch.ones(t, dtype=torch.bool) if m is None else m.bool()
                      for m, t in zip(masks, (37, 5, 64))])
    assert_stats_close(buf[1], h_in, h_out, mask)
    # The metric of the whole is the token-weighted mean of the batches, not the mean of batch means.
    want = expected_metrics(h_in, h_out, mask)["block_influence"]
    torch.testing.assert_close(hidden_stats_metrics(buf[1], 200)["block_influence"].double(), want,
                               rtol=1e-3, atol=1e-5)


def test_block_influence_keeps_its_digits_over_a_million_tokens(monkeypatch):
    """1 - sum(cos) / tokens cancels once the float32 sum of cosines is large; the accumulator holds
    sum(1 - cos) instead. 1.6M tokens in 100 adds of 16k tokens (what scoring on CPU does), block
    influence ~0.002 (the range ShortGPT ranks): the old accumulator was off by ~1e-5 relative, this
    one by ~1e-7. The kernel's own field is checked against float64 by every test above; on a GPU
    its adds are smaller (16 tokens per atomic), where the old error reached 1e-2."""
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    gen = torch.Generator().manual_seed(51)
    calls, tokens, hidden = 100, 16384, 16
    h_in = torch.randn(calls, tokens, hidden, generator=gen) * 3
    h_out = h_in + 0.2 * torch.randn(calls, tokens, hidden, generator=gen) + 0.05
    want = expected_metrics(h_in.reshape(-1, hidden), h_out.reshape(-1, hidden))
    assert 0.001 < want["block_influence"] < 0.005
    acc = new_stats_buffer(1, "cpu")[0]
    for a, b in zip(h_in, h_out):
        accumulate_hidden_stats(a, b, None, acc)
    got = hidden_stats_metrics(acc, hidden)
    torch.testing.assert_close(got["block_influence"].double(), want["block_influence"], rtol=1e-6, atol=0)
    # The other sums have terms of the size of their mean: no cancellation, float32 is enough.
    for name in ("relative_change", "act_rms"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=0, msg=name)


def test_all_masked_and_empty_batches_add_nothing():
    h_in, h_out = make_pair(37, 72, torch.float16, seed=11)
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, torch.zeros(37, dtype=torch.bool), acc)
    accumulate_hidden_stats(h_in[:0], h_out[:0], None, acc)
    assert torch.equal(acc, torch.zeros(5))
    for name, value in hidden_stats_metrics(acc, 72).items():
        assert torch.isnan(value), f"{name} with zero tokens must be NaN, got {value}"


@pytest.mark.parametrize("side", ["int", "int_left"])
def test_padding_values_are_never_read(side):
    h_in, h_out = make_pair(37, 200, torch.float32, seed=5)
    mask = make_mask(37, side, seed=5)
    h_out[mask == 0] = float("nan")
    h_in[mask == 0] = float("inf")
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, mask, acc)
    assert torch.isfinite(acc).all()
    assert_stats_close(acc, h_in, h_out, mask)


@pytest.mark.parametrize("nan_token", [2, 20, 36])  # first, middle and last token tile
def test_nan_in_a_real_token_makes_absmax_nan_like_the_reference(nan_token):
    """Max reductions and the float atomic_max drop NaN; the kernel must still report it in absmax."""
    h_in, h_out = make_pair(37, 200, torch.float32, seed=41)
    h_out[nan_token, 17] = float("nan")
    h_out[(nan_token + 7) % 37, 3] = 1e3  # a large finite value in another tile, maxed in around the NaN
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, None, acc)
    assert torch.isnan(hidden_stats_reference(h_in, h_out)[4])
    assert torch.isnan(acc[4]) and torch.isnan(acc[3]) and acc[0] == 37
    # A later clean batch must not max the NaN away.
    accumulate_hidden_stats(*make_pair(37, 200, torch.float32, seed=43), None, acc)
    assert torch.isnan(acc[4])
    assert torch.isnan(hidden_stats_metrics(acc, 200)["act_absmax"])


def test_strided_rows_of_a_wider_tensor():
    gen = torch.Generator().manual_seed(9)
    wide_in = torch.randn(37, 3 * 200 + 7, generator=gen).to(torch.bfloat16)
    wide_out = torch.randn(37, 200 + 13, generator=gen).to(torch.bfloat16)
    h_in, h_out = wide_in[:, 200:400], wide_out[:, 5:205]
    assert not h_in.is_contiguous() and h_in.stride(0) != h_out.stride(0)
    mask = make_mask(37, "bool", seed=9)
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, mask, acc)
    assert_stats_close(acc, h_in, h_out, mask)


def test_small_change_has_no_cancellation():
    """rel ~ 1e-4: ||a||^2 + ||b||^2 - 2ab would lose every digit in float32; the difference keeps them."""
    gen = torch.Generator().manual_seed(13)
    h_in = torch.randn(37, 576, generator=gen) * 2
    h_out = h_in + 1e-4 * torch.randn(37, 576, generator=gen)
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, None, acc)
    want = expected_stats(h_in.double(), h_out.double())
    torch.testing.assert_close(acc[2].double(), want[2], rtol=1e-4, atol=0)


def test_zero_rows_use_the_eps_clamp():
    h_in, h_out = make_pair(37, 72, torch.float32, seed=17)
    h_in[3] = 0
    h_out[8] = 0
    acc = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, None, acc)
    assert torch.isfinite(acc).all()
    assert_stats_close(acc, h_in, h_out)


def test_reference_path_gives_the_same_answer(monkeypatch):
    h_in, h_out = make_pair(37, 576, torch.bfloat16, seed=19)
    mask = make_mask(37, "int", seed=19)
    # A non-empty starting state: sums must be added to, absmax max-ed (100 beats the data's max).
    start = torch.tensor([3.0, 2.5, 1.0, 40.0, 100.0])
    by_kernel = start.clone()
    accumulate_hidden_stats(h_in, h_out, mask, by_kernel)
    monkeypatch.setattr(hs, "_hidden_stats_kernel", None)  # launching it would raise
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    by_reference = start.clone()
    accumulate_hidden_stats(h_in, h_out, mask, by_reference)
    torch.testing.assert_close(by_reference, by_kernel, rtol=1e-5, atol=1e-5)
    assert by_reference[4] == 100.0
    from_zero = new_stats_buffer(1, "cpu")[0]
    accumulate_hidden_stats(h_in, h_out, mask, from_zero)
    assert_stats_close(from_zero, h_in, h_out, mask)


def _forbid_host_reads(monkeypatch):
    def host_read(*args, **kwargs):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)


def test_launcher_launches_once_without_host_reads(monkeypatch):
    launches = []

    class RecordingKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    h_in, h_out = make_pair(37, 576, torch.bfloat16, seed=23)
    mask = make_mask(37, "bool", seed=23)
    acc = new_stats_buffer(2, "cpu")
    monkeypatch.setattr(hs, "_hidden_stats_kernel", RecordingKernel())
    _forbid_host_reads(monkeypatch)
    accumulate_hidden_stats(h_in, h_out, mask, acc[1])
    monkeypatch.undo()
    assert len(launches) == 1
    grid, args, kwargs = launches[0]
    assert len(grid) == 1 and 1 <= grid[0] <= 37
    assert kwargs["HAS_MASK"] and args[3].data_ptr() == acc[1].data_ptr()


def test_reference_path_does_no_host_reads(monkeypatch):
    h_in, h_out = make_pair(37, 72, torch.float16, seed=29)
    mask = make_mask(37, "int", seed=29)
    acc = new_stats_buffer(1, "cpu")[0]
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    _forbid_host_reads(monkeypatch)
    accumulate_hidden_stats(h_in, h_out, mask, acc)
    hidden_stats_metrics(acc, 72)
    monkeypatch.undo()
    assert_stats_close(acc, h_in, h_out, mask)


@pytest.mark.parametrize("bad", ["float_mask", "shape", "dtype", "acc_dtype", "last_dim_stride", "mask_len"])
def test_bad_inputs_are_refused_clearly(bad):
    h_in, h_out = make_pair(8, 72, torch.float32, seed=31)
    mask, acc = None, new_stats_buffer(1, "cpu")[0]
    if bad == "float_mask":
        mask = torch.zeros(8)
    elif bad == "shape":
        h_out = h_out[:, :64]
    elif bad == "dtype":
        h_out = h_out.half()
    elif bad == "acc_dtype":
        acc = acc.double()
    elif bad == "last_dim_stride":
        h_in, h_out = h_in.t().contiguous().t(), h_out.t().contiguous().t()
    elif bad == "mask_len":
        mask = torch.ones(9, dtype=torch.bool)
    with pytest.raises(ValueError, match="hidden|mask|accumulator"):
        accumulate_hidden_stats(h_in, h_out, mask, acc)


@pytest.mark.gpu
@NEEDS_COMPILED_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_kernel_matches_float64_reference(dtype):
    h_in, h_out = make_pair(3001, 4096 + 96, dtype, seed=37)
    mask = make_mask(3001, "int", seed=37)
    acc = new_stats_buffer(4, "cuda")
    for _ in range(2):
        accumulate_hidden_stats(h_in.cuda(), h_out.cuda(), mask.cuda(), acc[2])
    h_in2, h_out2, mask2 = torch.cat([h_in, h_in]), torch.cat([h_out, h_out]), torch.cat([mask, mask])
    assert_stats_close(acc[2].cpu(), h_in2, h_out2, mask2)


# Compiles the kernel for sm_90 in a subprocess without the interpreter (Triton's compiler and ptxas
# need no GPU), so that CI without a GPU catches a kernel that does not lower, and checks that the
# rows are read with 16-byte vector loads.
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from laet_fast.kernels import hidden_stats as hs

signature = {"h_in_ptr": "*bf16", "h_out_ptr": "*bf16", "mask_ptr": "*i64", "acc_ptr": "*fp32", "n_tokens": "i32",
             "hidden": "i32", "stride_in": "i32", "stride_out": "i32", "stride_mask": "constexpr",
             "HAS_MASK": "constexpr", "EPS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"}
aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "stride_mask"
           and signature[name] != "constexpr"}
constexprs = {"stride_mask": 1, "HAS_MASK": True, "EPS": hs.NORM_EPS, "BLOCK_T": 16, "BLOCK_H": 256}
source = ASTSource(fn=hs._hidden_stats_kernel, signature=signature, constexprs=constexprs, attrs=aligned)
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": hs.GPU_NUM_WARPS}).asm["ptx"]
print("vector_loads", "ld.global.v4" in ptx)
print("atomics", "atom.global" in ptx or "red.global" in ptx)
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    from compile_without_gpu import run_compile_script

    assert run_compile_script(_COMPILE_SCRIPT, tmp_path) == {"vector_loads": "True", "atomics": "True"}
