"""Per-layer gradient norm kernels (kernels/grad_norm.py) against float64 references.

Runs the Triton kernels through the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1),
and the PyTorch path with LAET_FAST_BACKEND=torch.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compile_without_gpu import RecordingKernel
from laet_fast.backend import TRITON_INTERPRET
from laet_fast.kernels import grad_norm
from laet_fast.kernels.grad_norm import (
    grouped_sq_norms,
    grouped_sq_norms_reference,
    linear_grad_sq_norm,
    linear_grad_sq_norm_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# With TRITON_INTERPRET=1 (tests/conftest.py's default) CUDA tensors would go through the interpreter
# on host copies, so a GPU test would pass without running the compiled kernel.
NEEDS_COMPILED_CUDA_KERNELS = pytest.mark.skipif(
    not torch.cuda.is_available() or TRITON_INTERPRET,
    reason="needs CUDA and TRITON_INTERPRET=0 (else the interpreter runs instead of the compiled kernel)",
)


def _independent_sq_norm(t: torch.Tensor) -> float:
    """Sum of squares in float64, computed elementwise here rather than by the module under test."""
    flat = t.detach().reshape(-1).double()
    return float((flat * flat).sum())


def _mixed_tensors(seed: int):
    """Odd-sized tensors of mixed dtypes, with their group ids, spread over 4 groups."""
    gen = torch.Generator().manual_seed(seed)
    specs = [
        ((1,), torch.float32, 0),
        ((37,), torch.bfloat16, 1),
        ((1000,), torch.float16, 2),
        ((72, 136), torch.bfloat16, 1),
        ((5000,), torch.float32, 3),
        ((3, 7, 11), torch.float16, 0),
        ((2048,), torch.bfloat16, 3),  # exactly one chunk of full blocks under the interpreter
        ((2049,), torch.bfloat16, 2),  # one element past a chunk boundary
        ((136, 72), torch.float32, 1),
    ]
    tensors = [(torch.randn(shape, generator=gen) * (i + 1)).to(dtype) for i, (shape, dtype, _) in enumerate(specs)]
    return tensors, [g for _, _, g in specs]


def _expected_groups(tensors, groups, num_groups):
    expected = [0.0] * num_groups
    for t, g in zip(tensors, groups):
        expected[g] += _independent_sq_norm(t)
    return torch.tensor(expected, dtype=torch.float64)


def _check_groups(result: torch.Tensor, expected: torch.Tensor, tensors, groups):
    # float32 accumulation of exactly representable squares: allow what a float32 torch reduction
    # of the same values would lose, twice over, plus a small relative slack.
    torch_fp32 = torch.zeros_like(expected)
    for t, g in zip(tensors, groups):
        torch_fp32[g] += float(t.float().pow(2).sum())
    tolerance = 2 * (torch_fp32 - expected).abs() + 1e-6 * expected.abs() + 1e-6
    error = (result.double() - expected).abs()
    assert torch.all(error <= tolerance), f"error {error.tolist()} > tolerance {tolerance.tolist()}"


def test_grouped_sq_norms_mixed_dtypes_and_accumulation():
    tensors, groups = _mixed_tensors(seed=1)
    start = torch.rand(4) + 0.5
    out = start.clone()
    grouped_sq_norms(tensors, groups, out)
    expected = _expected_groups(tensors, groups, 4)
    _check_groups(out - start, expected, tensors, groups)

    # A second call adds on top of the first.
    more, more_groups = _mixed_tensors(seed=2)
    grouped_sq_norms(more, more_groups, out)
    _check_groups(out - start, expected + _expected_groups(more, more_groups, 4), tensors + more, groups + more_groups)


def test_grouped_sq_norms_one_launch_per_dtype(monkeypatch):
    launches = []
    kernel = grad_norm._grouped_sq_norm_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(grad_norm, "_grouped_sq_norm_kernel", CountingKernel())
    tensors, groups = _mixed_tensors(seed=3)
    out = torch.zeros(4)
    grouped_sq_norms(tensors, groups, out)
    assert len(launches) == len({t.dtype for t in tensors}) == 3
    _check_groups(out, _expected_groups(tensors, groups, 4), tensors, groups)


def test_grouped_sq_norms_many_small_tensors_and_non_contiguous():
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)]
    tensors.append(torch.randn(40, 24, generator=gen).T)  # non-contiguous view
    tensors.append(torch.randn(64, 9, generator=gen)[:, ::2])  # strided view
    tensors.append(torch.empty(0))  # empty tensors are skipped
    groups = [i % 3 for i in range(len(tensors))]
    out = torch.zeros(3)
    grouped_sq_norms(tensors, groups, out)
    _check_groups(out, _expected_groups(tensors, groups, 3), tensors, groups)


def test_grouped_sq_norms_reference_matches_independent_sum():
    tensors, groups = _mixed_tensors(seed=5)
    reference = grouped_sq_norms_reference(tensors, groups, 4)
    assert reference.dtype == torch.float64 and reference.shape == (4,)
    torch.testing.assert_close(reference, _expected_groups(tensors, groups, 4), rtol=1e-12, atol=0)


def test_grouped_sq_norms_torch_backend_agrees(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    tensors, groups = _mixed_tensors(seed=6)
    start = torch.rand(4)
    out = start.clone()
    grouped_sq_norms(tensors, groups, out)
    _check_groups(out - start, _expected_groups(tensors, groups, 4), tensors, groups)


@pytest.mark.parametrize(
    "groups, out, message",
    [
        ([0, 5], torch.zeros(3), "outside"),
        ([0], torch.zeros(3), "group ids"),
        ([0, 1], torch.zeros(3, dtype=torch.float64), "float32"),
    ],
)
def test_grouped_sq_norms_rejects_bad_arguments(groups, out, message):
    with pytest.raises(ValueError, match=message):
        grouped_sq_norms([torch.randn(3), torch.randn(4)], groups, out)


# ---------------------------------------------------------------------------------------------
# linear_grad_sq_norm
# ---------------------------------------------------------------------------------------------


def _linear_inputs(shape_x, shape_dy, dtype, seed, padded_rows=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape_x, generator=gen).to(dtype)
    dy = (torch.randn(shape_dy, generator=gen) * 0.1).to(dtype)
    if padded_rows:
        # A masked loss gives padding tokens a zero output gradient.
        dy.reshape(-1, dy.shape[-1])[-padded_rows:] = 0
    return x, dy


def _independent_linear_reference(x, dy) -> float:
    x64 = x.reshape(-1, x.shape[-1]).double()
    dy64 = dy.reshape(-1, dy.shape[-1]).double()
    grad = torch.einsum("ti,to->io", x64, dy64)
    return float((grad * grad).sum())


def _check_linear(value: float, x, dy):
    """FlashAttention rule: error <= 2x PyTorch's own error in the input dtype + small slack."""
    expected = _independent_linear_reference(x, dy)
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
    torch_own = float((x2.T @ dy2).double().pow(2).sum())
    tolerance = 2 * abs(torch_own - expected) + 1e-5 * expected
    assert abs(value - expected) <= tolerance, f"{value} vs {expected} (torch's own {torch_own})"


LINEAR_SHAPES = [(37, 72, 136), (5, 200, 96), (300, 24, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["tiled", "gram"])
@pytest.mark.parametrize("tokens, d_in, d_out", LINEAR_SHAPES)
def test_linear_grad_sq_norm_methods(tokens, d_in, d_out, method, dtype):
    if method == "gram" and tokens == 300 and dtype != torch.float32:
        pytest.skip("gram over 300 tokens is slow in the interpreter; float32 covers this shape")
    x, dy = _linear_inputs((tokens, d_in), (tokens, d_out), dtype, seed=tokens + d_in, padded_rows=3)
    start = 0.25
    out = torch.full((1,), start)
    linear_grad_sq_norm(x, dy, out, method=method)
    _check_linear(float(out) - start, x, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape_x, shape_dy",
    [((2, 9, 72), (2, 9, 136)), ((3, 50, 24), (3, 50, 40))],  # auto -> gram, auto -> tiled
)
def test_linear_grad_sq_norm_auto_with_batch_dims_into_buffer_slot(shape_x, shape_dy, dtype):
    x, dy = _linear_inputs(shape_x, shape_dy, dtype, seed=7, padded_rows=4)
    buffer = torch.rand(3)
    before = buffer.clone()
    linear_grad_sq_norm(x, dy, buffer[1:2])
    _check_linear(float(buffer[1] - before[1]), x, dy)
    assert torch.equal(buffer[0::2], before[0::2])


def test_linear_grad_sq_norm_auto_choice():
    assert grad_norm._choose_method("auto", 256, 4096, 4096) == "gram"
    assert grad_norm._choose_method("auto", 8192, 4096, 4096) == "tiled"
    # Llama-8B's k/v projection: few tokens favour Gram, past ~800 the tiled kernel wins.
    assert grad_norm._choose_method("auto", 512, 4096, 1024) == "gram"
    assert grad_norm._choose_method("auto", 1024, 4096, 1024) == "tiled"
    # 16 tokens make one Gram program, which would run on one SM of 132 (not so on a 1-SM device).
    assert grad_norm._choose_method("auto", 16, 4096, 4096) == "tiled"
    assert grad_norm._choose_method("auto", 16, 4096, 4096, sm_count=1) == "gram"
    costs = grad_norm.method_costs(512, 4096, 1024)
    assert costs["tiled_cost"] == 2.0 * 512 * 4096 * 1024 / costs["tiled_occupancy"]
    assert {"gram_relative_throughput", "gram_occupancy", "sm_count", "choice"} <= set(costs)
    with pytest.raises(ValueError, match="method"):
        grad_norm._choose_method("svd", 8, 4, 4)


def test_linear_grad_sq_norm_mixed_input_dtypes():
    x, _ = _linear_inputs((37, 72), (37, 1), torch.float32, seed=8)
    _, dy = _linear_inputs((37, 1), (37, 136), torch.bfloat16, seed=9)
    out = torch.zeros(1)
    linear_grad_sq_norm(x, dy, out, method="tiled")
    expected = _independent_linear_reference(x, dy)
    assert abs(float(out) - expected) <= 1e-5 * expected


def test_linear_grad_sq_norm_reference_is_float64():
    x, dy = _linear_inputs((2, 19, 24), (2, 19, 40), torch.bfloat16, seed=10)
    reference = linear_grad_sq_norm_reference(x, dy)
    assert reference.dtype == torch.float64 and reference.dim() == 0
    assert abs(float(reference) - _independent_linear_reference(x, dy)) <= 1e-10 * float(reference)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensors that aten ops return: floating-point ones by element count, and
    raw byte buffers (the interpreter stages kernel arguments through untyped storage copies)."""

    def __init__(self):
        super().__init__()
        self.largest_float = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                if value.is_floating_point():
                    self.largest_float = max(self.largest_float, value.numel())
                else:
                    self.largest_bytes = max(self.largest_bytes, value.numel() * value.element_size())
        return result


# Shapes where tokens < in and tokens < out, so an [in, out] tensor is larger than any copy of x or dy.
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("method, tokens, d_in, d_out", [("tiled", 40, 64, 64), ("gram", 37, 72, 136)])
def test_linear_grad_sq_norm_never_allocates_weight_sized_tensor(monkeypatch, backend, method, tokens, d_in, d_out):
    if backend == "torch":
        monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    x, dy = _linear_inputs((tokens, d_in), (tokens, d_out), torch.bfloat16, seed=11)
    out = torch.zeros(1)
    with _LargestAllocation() as tracker:
        linear_grad_sq_norm(x, dy, out, method=method)
    assert 0 < tracker.largest_float < d_in * d_out
    assert tracker.largest_bytes <= max(x.nbytes, dy.nbytes)
    _check_linear(float(out), x, dy)


@pytest.mark.parametrize("method", ["tiled", "gram"])
@pytest.mark.parametrize("tokens, d_in, d_out", LINEAR_SHAPES)
def test_linear_grad_sq_norm_torch_backend_agrees(monkeypatch, tokens, d_in, d_out, method):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    x, dy = _linear_inputs((tokens, d_in), (tokens, d_out), torch.bfloat16, seed=12, padded_rows=2)
    out = torch.full((1,), 1.5)
    linear_grad_sq_norm(x, dy, out, method=method)
    _check_linear(float(out) - 1.5, x, dy)


def test_linear_grad_sq_norm_rejects_bad_arguments():
    x, dy = torch.randn(4, 8), torch.randn(5, 6)
    with pytest.raises(ValueError, match="leading dims"):
        linear_grad_sq_norm(x, dy, torch.zeros(1))
    with pytest.raises(ValueError, match="one-element float32"):
        linear_grad_sq_norm(x, torch.randn(4, 6), torch.zeros(2))
    with pytest.raises(TypeError, match="float64"):
        linear_grad_sq_norm(x.double(), torch.randn(4, 6), torch.zeros(1))
    with pytest.raises(ValueError, match="x, dy and out on one device"):
        linear_grad_sq_norm(x, torch.randn(4, 6), torch.zeros(1, device="meta"))


@pytest.mark.gpu
@NEEDS_COMPILED_CUDA_KERNELS
@pytest.mark.parametrize("method", ["tiled", "gram"])
def test_linear_grad_sq_norm_cuda_memory_and_accuracy(method):
    d_in, d_out, tokens = 1024, 2048, 512
    x, dy = _linear_inputs((tokens, d_in), (tokens, d_out), torch.bfloat16, seed=13)
    x, dy = x.cuda(), dy.cuda()
    out = torch.zeros(1, device="cuda")
    linear_grad_sq_norm(x, dy, out, method=method)  # autotunes outside the measured call
    out.zero_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_grad_sq_norm(x, dy, out, method=method)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < d_in * d_out * 4
    _check_linear(float(out), x.cpu(), dy.cpu())


@pytest.mark.gpu
@NEEDS_COMPILED_CUDA_KERNELS
def test_grouped_sq_norms_cuda():
    tensors, groups = _mixed_tensors(seed=14)
    tensors = [t.cuda() for t in tensors]
    out = torch.zeros(4, device="cuda")
    grouped_sq_norms(tensors, groups, out)
    _check_groups(out.cpu(), _expected_groups(tensors, groups, 4), [t.cpu() for t in tensors], groups)


@pytest.mark.gpu
@NEEDS_COMPILED_CUDA_KERNELS
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_launch_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current device; the launchers must make the tensors' device current."""
    tensors, groups = _mixed_tensors(seed=15)
    x, dy = _linear_inputs((37, 72), (37, 136), torch.bfloat16, seed=16)
    with torch.cuda.device(0):
        out = torch.zeros(4, device="cuda:1")
        grouped_sq_norms([t.to("cuda:1") for t in tensors], groups, out)
        linear_out = torch.zeros(1, device="cuda:1")
        linear_grad_sq_norm(x.to("cuda:1"), dy.to("cuda:1"), linear_out, method="tiled")
    _check_groups(out.cpu(), _expected_groups(tensors, groups, 4), tensors, groups)
    _check_linear(float(linear_out), x, dy)


# Compiles the GPU kernels for sm_90 in a subprocess without the interpreter (Triton's compiler and
# ptxas need no GPU), so that CI without a GPU still catches kernels that do not lower, and checks
# the code the compiler makes: 16-byte vector loads in the multi-tensor kernel, tensor-core MMAs
# for bf16 X^T dY and Gram tiles.
_COMPILE_SCRIPT = r"""
import re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from laet_fast.kernels import grad_norm as g

target = GPUTarget("cuda", 90, 32)


def ptx(fn, signature, constexprs, **options):
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=target, options=options).asm["ptx"]


grouped = ptx(
    g._grouped_sq_norm_kernel,
    {"tensor_table_ptr": "*i64", "chunk_table_ptr": "*i64", "out_ptr": "*fp32", "num_tensors": "i32",
     "DTYPE": "constexpr", "PTR_ALIGN": "constexpr", "BLOCK": "constexpr", "BLOCKS_PER_CHUNK": "constexpr"},
    {"DTYPE": tl.bfloat16, "PTR_ALIGN": 16, "BLOCK": 4096, "BLOCKS_PER_CHUNK": 16},
    num_warps=8,
)
print("grouped_vector_loads", "ld.global.v4" in grouped)
operands = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "out_ptr": "*fp32", "T": "i32", "IN": "i32", "OUT": "i32",
            "stride_xt": "i32", "stride_xi": "constexpr", "stride_dyt": "i32",
            "stride_dyo": "constexpr"}

def launch_options(config):
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return meta, {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}


# The configuration the shape rule gives for a 4096x4096 bf16 layer, and the small-tile one.
for name, config in (("tiled_tensor_cores", g.tiled_config(4096, 4096, True)),
                     ("tiled_small_tensor_cores", g.tiled_config(576, 192, True))):
    meta, options = launch_options(config)
    tiled = ptx(
        g._xt_dy_sq_norm_tiled_kernel,
        {**operands, **{k: "constexpr" for k in ("BLOCK_T", "BLOCK_IN", "BLOCK_OUT", "GROUP_IN", "DOT_DTYPE", "IEEE")}},
        {"stride_xi": 1, "stride_dyo": 1, **meta, "DOT_DTYPE": tl.bfloat16, "IEEE": False}, **options,
    )
    print(name, "wgmma" in tiled or "mma.sync" in tiled)
for name, config in (("gram_tensor_cores", g.gram_config(4096, True)),
                     ("gram_small_tensor_cores", g.gram_config(64, True))):
    meta, options = launch_options(config)
    gram = ptx(
        g._gram_sq_norm_kernel,
        {**operands, **{k: "constexpr" for k in ("BLOCK_T", "BLOCK_K", "DOT_DTYPE", "IEEE")}},
        {"stride_xi": 1, "stride_dyo": 1, **meta, "DOT_DTYPE": tl.bfloat16, "IEEE": False}, **options,
    )
    print(name, "wgmma" in gram or "mma.sync" in gram)
"""


@pytest.mark.slow
def test_gpu_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    from compile_without_gpu import run_compile_script

    assert run_compile_script(_COMPILE_SCRIPT, tmp_path) == {
        "grouped_vector_loads": "True", "tiled_tensor_cores": "True", "tiled_small_tensor_cores": "True",
        "gram_tensor_cores": "True", "gram_small_tensor_cores": "True"}


@pytest.mark.slow
def test_grouped_sq_norms_torch_path_is_not_biased_on_a_large_weight(monkeypatch):
    """The PyTorch path on a 4096x14336 float32 gradient (an 8B model's MLP): float32 without cascade
    summation (torch._foreach_norm on CPU) was 9e-3 low; a float32 cascade sum is within ~1e-7."""
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    big = torch.randn(4096, 14336, generator=torch.Generator().manual_seed(17))
    small = torch.randn(576, 1536, generator=torch.Generator().manual_seed(18)).bfloat16()
    out = torch.zeros(2)
    grouped_sq_norms([big, small], [1, 0], out)
    want = torch.tensor([_independent_sq_norm(small), _independent_sq_norm(big)], dtype=torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_tiled_path_peak_is_an_eighth_of_the_weight_gradient(monkeypatch, dtype):
    """The PyTorch "tiled" path forms X^T dY in column chunks; chunk + its square stay below 0.25x a
    float32 [in, out] gradient (it was 1.00x with two chunks), beyond float32 copies of bf16 inputs."""
    from laet_fast.measure import LiveBytes

    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    tokens, d_in, d_out = 300, 576, 1536
    x, dy = _linear_inputs((tokens, d_in), (tokens, d_out), dtype, seed=19)
    out = torch.zeros(1)
    with LiveBytes() as tracker:
        linear_grad_sq_norm(x, dy, out, method="tiled")
    input_copies = 0 if dtype == torch.float32 else tokens * d_in * 4 + tokens * (d_out // 16) * 4
    assert tracker.peak - input_copies <= 0.25 * d_in * d_out * 4, (tracker.peak, input_copies)
    _check_linear(float(out), x, dy)


@pytest.mark.parametrize("method", ["tiled", "gram"])
@pytest.mark.parametrize("x_dtype, dy_dtype, dot, ieee", [
    (torch.float32, torch.float32, "fp32", True),
    (torch.float16, torch.float16, "fp16", False),
    (torch.float32, torch.bfloat16, "fp32", True),
])
def test_launch_precision_mode_per_dtype(monkeypatch, method, x_dtype, dy_dtype, dot, ieee):
    """float32 operands must take IEEE tl.dot (not TF32, 10 bits of mantissa); half operands the
    tensor cores. Also: every launch carries its tile sizes (a shape rule, no autotuner)."""
    import triton.language as tl

    stub = RecordingKernel()
    name = "_xt_dy_sq_norm_tiled_kernel" if method == "tiled" else "_gram_sq_norm_kernel"
    monkeypatch.setattr(grad_norm, name, stub)
    x, _ = _linear_inputs((37, 72), (37, 1), x_dtype, seed=20)
    _, dy = _linear_inputs((37, 1), (37, 136), dy_dtype, seed=21)
    linear_grad_sq_norm(x, dy, torch.zeros(1), method=method)
    assert len(stub.launches) == 1
    _, args, kwargs = stub.launches[0]
    assert kwargs["IEEE"] is ieee
    assert kwargs["DOT_DTYPE"] == {"fp32": tl.float32, "fp16": tl.float16}[dot]
    assert "num_warps" in kwargs and ("BLOCK_IN" in kwargs if method == "tiled" else "BLOCK_K" in kwargs)


def test_grouped_tables_are_moved_to_outs_device(monkeypatch):
    """The kernel reads its tables on out's device: left in (pinned) host memory they would be read
    through the host. Checked on CPU with out on the meta device and the kernel stubbed."""
    stub = RecordingKernel()
    monkeypatch.setattr(grad_norm, "_grouped_sq_norm_kernel", stub)
    monkeypatch.setattr(grad_norm, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(grad_norm, "TRITON_INTERPRET", False)
    tensors = [torch.empty(5000, device="meta"), torch.empty(3, 7, device="meta", dtype=torch.bfloat16)]
    grouped_sq_norms(tensors, [1, 0], torch.zeros(2, device="meta"))
    assert len(stub.launches) == 2
    for _, args, _ in stub.launches:
        tables = [a for a in args if isinstance(a, torch.Tensor)]
        assert len(tables) == 3 and all(t.device.type == "meta" for t in tables), [t.device for t in tables]


@pytest.mark.gpu
@NEEDS_COMPILED_CUDA_KERNELS
def test_grouped_tables_are_on_the_gpu(monkeypatch):
    real = grad_norm._grouped_sq_norm_kernel
    seen = []

    class Checking:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.extend(a.device for a in args if isinstance(a, torch.Tensor))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(grad_norm, "_grouped_sq_norm_kernel", Checking())
    tensors, groups = _mixed_tensors(seed=22)
    out = torch.zeros(4, device="cuda")
    grouped_sq_norms([t.cuda() for t in tensors], groups, out)
    assert seen and all(d == out.device for d in seen), seen
    _check_groups(out.cpu(), _expected_groups(tensors, groups, 4), tensors, groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_sq_norm_one_tensor(dtype):
    t = torch.randn(300, 77, generator=torch.Generator().manual_seed(23)).to(dtype)
    out = torch.full((1,), 0.5)
    grad_norm.accumulate_sq_norm(t, out)
    assert abs(float(out) - 0.5 - _independent_sq_norm(t)) <= 1e-6 * _independent_sq_norm(t)
    with pytest.raises(ValueError, match="one-element float32"):
        grad_norm.accumulate_sq_norm(t, torch.zeros(2))
