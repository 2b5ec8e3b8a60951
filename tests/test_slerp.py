"""SLERP kernel (interpreter on CPU) and its reference against mergekit's rule written out in float64."""
import math

import pytest
import torch

import laet_fast.kernels.slerp as sl
from laet_fast.backend import TRITON_INTERPRET
from laet_fast.kernels.slerp import slerp, slerp_reference

NEEDS_COMPILED_CUDA_KERNELS = pytest.mark.skipif(
    not torch.cuda.is_available() or TRITON_INTERPRET,
    reason="needs CUDA and TRITON_INTERPRET=0 (else the interpreter runs instead of the compiled kernel)",
)
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Sizes: one element, fewer elements than a tile, several tiles on few programs, and more tiles
# than the interpreter's 16 programs, so that programs loop and the partials of many are summed.
SHAPES = [(1,), (7,), (3, 5, 67), (37, 129), (211, 83)]


def mergekit_slerp(a, b, t):
    """mergekit's slerp, branch by branch, in float64 with Python's math for the angle."""
    x, y = a.double(), b.double()
    norm_x, norm_y = float(x.norm()), float(y.norm())
    unit_x = x / norm_x if norm_x > 1e-8 else x
    unit_y = y / norm_y if norm_y > 1e-8 else y
    dot = float((unit_x * unit_y).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * x + t * y
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta) * x + math.sin(t * theta) / math.sin(theta) * y


def make_pair(shape, dtype, seed, cos=0.8):
    """Two random tensors whose cosine is about ``cos``, with an offset so neither is centered."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen) + 0.2
    noise = torch.randn(shape, generator=gen)
    b = cos * a + math.sqrt(max(0.0, 1 - cos * cos)) * noise * a.norm() / noise.norm()
    return a.to(dtype), (1.7 * b).to(dtype)


def assert_close_to_mergekit(got, a, b, t):
    want = mergekit_slerp(a, b, t)
    error = (got.double() - want).abs().max()
    if got.dtype in LOW_PRECISION:
        # Against float64: at most 2x PyTorch's own error in that dtype, plus a small atol.
        torch_error = (slerp_reference(a, b, t, compute_dtype=got.dtype).double() - want).abs().max()
        allowed = 2 * torch_error + 1e-3 * want.abs().max()
    else:
        allowed = 2e-6 * want.abs().max() + 1e-7
    assert error <= allowed, f"max error {error:.3g} > allowed {allowed:.3g}"


def test_sizes_run_several_tiles_per_program_and_several_programs():
    block, programs, _ = sl._launch_config(211 * 83, torch.device("cpu"))
    assert programs == sl.INTERPRET_MAX_PROGRAMS and 211 * 83 > 3 * block * programs


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t", [0.3, 0.77])
def test_float32_matches_mergekit(shape, t):
    a, b = make_pair(shape, torch.float32, seed=sum(shape))
    assert_close_to_mergekit(slerp(a, b, t), a, b, t)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(5, 67), (211, 83)], ids=str)
def test_low_precision_matches_mergekit(dtype, shape):
    a, b = make_pair(shape, dtype, seed=3)
    got = slerp(a, b, 0.45)
    assert got.dtype == dtype
    assert_close_to_mergekit(got, a, b, 0.45)


@pytest.mark.parametrize("cos", [-0.6, 0.0, 0.99, 0.9994])
def test_angles_on_the_slerp_branch(cos):
    a, b = make_pair((37, 129), torch.float32, seed=5, cos=cos)
    assert_close_to_mergekit(slerp(a, b, 0.6), a, b, 0.6)


@pytest.mark.parametrize("scale", [2.5, -0.4])
def test_colinear_tensors_take_the_linear_branch(scale):
    a, _ = make_pair((37, 129), torch.float32, seed=6)
    b = scale * a
    got = slerp(a, b, 0.3)
    assert_close_to_mergekit(got, a, b, 0.3)
    torch.testing.assert_close(got, 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-6)


def test_zero_and_tiny_tensors_are_not_normalized():
    _, b = make_pair((37, 129), torch.float32, seed=7)
    zero = torch.zeros_like(b)
    # dot = 0 so theta = pi/2: the zero tensor's weight is dropped, b is scaled by sin(t * pi/2).
    torch.testing.assert_close(slerp(zero, b, 0.3), math.sin(0.3 * math.pi / 2) * b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(slerp(b, zero, 0.3), math.cos(0.3 * math.pi / 2) * b, rtol=1e-6, atol=1e-7)
    assert torch.equal(slerp(zero, zero, 0.5), zero)
    tiny = torch.full((7,), 1e-10)  # norm below eps: left unnormalized, so nearly orthogonal to anything
    other = torch.linspace(-1, 1.5, 7)
    assert_close_to_mergekit(slerp(tiny, other, 0.4), tiny, other, 0.4)
    assert_close_to_mergekit(slerp(other, tiny, 0.4), other, tiny, 0.4)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_endpoints_are_exact(dtype):
    a, b = make_pair((211, 83), dtype, seed=8)
    assert torch.equal(slerp(a, b, 0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    colinear = (a.float() * 3).to(dtype)
    assert torch.equal(slerp(a, colinear, 0.0), a)
    assert torch.equal(slerp(a, colinear, 1), colinear)


def test_mixed_dtypes_and_out_dtype():
    a, b = make_pair((37, 129), torch.float32, seed=9)
    b16 = b.to(torch.bfloat16)
    got = slerp(a.to(torch.bfloat16), b, 0.5, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert_close_to_mergekit(got, a.to(torch.bfloat16), b, 0.5)
    assert torch.equal(slerp(a, b16, 1.0, out_dtype=torch.bfloat16), b16)


def test_non_contiguous_inputs_and_deterministic_result():
    a, b = make_pair((129, 37), torch.float32, seed=10)
    got = slerp(a.T, b.T, 0.35)
    assert got.shape == (37, 129)
    assert_close_to_mergekit(got, a.T, b.T, 0.35)
    assert torch.equal(slerp(a, b, 0.35), slerp(a, b, 0.35))


def test_reference_float32_path_matches_mergekit():
    a, b = make_pair((37, 129), torch.float16, seed=11)
    assert_close_to_mergekit(slerp_reference(a, b, 0.25, compute_dtype=torch.float32), a, b, 0.25)
    assert_close_to_mergekit(slerp_reference(a.double(), b.double(), 0.25), a.double(), b.double(), 0.25)


def test_non_finite_inputs_give_non_finite_results():
    a, b = make_pair((5, 67), torch.float32, seed=12)
    a[2, 3] = float("nan")
    assert torch.isnan(slerp(a, b, 0.5)).all()


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_t_outside_unit_interval_is_refused(t):
    a, b = make_pair((7,), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"number in \[0, 1\]"):
        slerp(a, b, t)


def test_bad_tensors_are_refused():
    a = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"one shape; got \(4, 5\) and \(5, 4\)"):
        slerp(a, torch.randn(5, 4), 0.5)
    with pytest.raises(ValueError, match="floating"):
        slerp(a.long(), a.long(), 0.5)


@pytest.mark.gpu
@NEEDS_COMPILED_CUDA_KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_compiled_kernel_on_cuda(dtype):
    a, b = make_pair((4099, 1031), dtype, seed=13)
    got = slerp(a.cuda(), b.cuda(), 0.4).cpu()
    assert_close_to_mergekit(got, a, b, 0.4)
    assert torch.equal(slerp(a.cuda(), b.cuda(), 0.0).cpu(), a)


# Compiles both passes for sm_90 in a subprocess without the interpreter (Triton's compiler and
# ptxas need no GPU), so that CI without a GPU catches a kernel that does not lower, and checks
# that both passes read with 16-byte vector loads and the write pass stores with them.
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from laet_fast.kernels import slerp as sl

target, options = GPUTarget("cuda", 90, 32), {"num_warps": sl.GPU_NUM_WARPS}
reduce_sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "partial_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
write_sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "s0": "fp32", "s1": "fp32",
             "BLOCK": "constexpr"}
for name, kernel, signature in (("reduce", sl._slerp_reduce_kernel, reduce_sig),
                                ("write", sl._slerp_write_kernel, write_sig)):
    # Triton specializes pointers and sizes divisible by 16 (weight matrices' sizes are), as here.
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature) if signature[arg][0] in "*i"}
    source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK": sl.GPU_BLOCK}, attrs=aligned)
    ptx = triton.compile(source, target=target, options=options).asm["ptx"]
    print(name + "_vector_loads", "ld.global.v4" in ptx)
    if name == "write":
        print("write_vector_stores", "st.global.v4" in ptx)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    from compile_without_gpu import run_compile_script

    assert run_compile_script(_COMPILE_SCRIPT, tmp_path) == {
        "reduce_vector_loads": "True", "write_vector_loads": "True", "write_vector_stores": "True"}
