"""Masked pooling: Triton kernel (interpreter on CPU) against an independent float64 reference."""
import pytest
import torch

from tiny_models import one_thread  # noqa: F401 (a fixture)

from laet_fast.kernels.pooling import POOLING_MODES, masked_pool, masked_pool_reference


pytestmark = pytest.mark.usefixtures("one_thread")


LOW_PRECISION = (torch.bfloat16, torch.float16)


def expected_pool(hidden, mask, mode, dtype=torch.float64):
    """Written out row by row: the real tokens are picked by indexing, math in ``dtype``."""
    rows = []
    for b in range(hidden.shape[0]):
        real = torch.ones(hidden.shape[1], dtype=torch.bool) if mask is None else mask[b] != 0
        tokens = hidden[b][real].to(dtype)
        if tokens.shape[0] == 0:
            rows.append(torch.full((hidden.shape[2],), float("nan"), dtype=dtype))
        elif mode == "mean":
            rows.append(tokens.sum(0) / tokens.shape[0])
        else:
            rows.append(tokens[-1] if mode == "last" else tokens[0])
    return torch.stack(rows).to(torch.float64)


def make_mask(batch, seq, side, kind, seed):
    """Each row padded by a different random length on ``side``; row 0 unpadded."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        pad = int(torch.randint(0, seq, (1,), generator=gen))
        if side == "right":
            mask[row, seq - pad:] = 0
        else:
            mask[row, :pad] = 0
    return mask.bool() if kind == "bool" else mask.to(torch.int32 if kind == "int32" else torch.long)


def assert_pool_close(got, hidden, mask, mode):
    """fp32: tight. bf16/fp16: error vs float64 <= 2x PyTorch's own error in that dtype + small atol."""
    reference = expected_pool(hidden.double(), mask, mode)
    got = got.double()
    assert got.shape == reference.shape
    assert torch.equal(torch.isnan(got), torch.isnan(reference))
    finite = ~torch.isnan(reference)
    error = (got - reference).abs()[finite]
    if hidden.dtype in LOW_PRECISION:
        torch_error = (expected_pool(hidden, mask, mode, dtype=hidden.dtype) - reference).abs()[finite]
        allowed = 2 * torch_error + 1e-5 * reference.abs()[finite] + 1e-6
    else:
        allowed = 1e-5 * reference.abs()[finite] + 1e-6
    assert bool((error <= allowed).all()), f"max error {error.max():.3g}"


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["bool", "long", "int32"])
def test_pool_matches_float64_fp32(mode, side, kind):
    gen = torch.Generator().manual_seed(hash((mode, side, kind)) % 1000)
    hidden = torch.randn(5, 19, 45, generator=gen) * 3 + 0.5
    mask = make_mask(5, 19, side, kind, seed=len(mode) + len(side))
    assert_pool_close(masked_pool(hidden, mask, mode), hidden, mask, mode)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_low_precision(dtype, mode):
    gen = torch.Generator().manual_seed(7)
    hidden = (torch.randn(4, 37, 70, generator=gen) * 2 + 1).to(dtype)
    mask = make_mask(4, 37, "left", "long", seed=3)
    got = masked_pool(hidden, mask, mode)
    assert got.dtype == torch.float32
    assert_pool_close(got, hidden, mask, mode)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_without_mask_and_strided_input(mode):
    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(3, 13, 100, generator=gen)
    hidden = wide[:, :, 10:43]  # rows of a wider tensor: row strides differ from the hidden size
    assert_pool_close(masked_pool(hidden, None, mode), hidden, None, mode)
    transposed = torch.randn(3, 33, 13, generator=gen).transpose(1, 2)  # hidden dim not contiguous
    assert_pool_close(masked_pool(transposed, None, mode), transposed, None, mode)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_padding_values_never_leak_and_empty_rows_are_nan(mode):
    hidden = torch.randn(3, 9, 20)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2] = 0  # no real token at all
    hidden[1, 6:] = float("nan")
    hidden[2] = float("inf")
    got = masked_pool(hidden, mask, mode)
    assert torch.isfinite(got[:2]).all()
    assert torch.isnan(got[2]).all()
    assert_pool_close(got, hidden, mask, mode)


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_pool_backward_matches_autograd_of_float64(mode, side):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 15, 29, generator=gen, requires_grad=True)
    mask = make_mask(4, 15, side, "long", seed=9)
    mask[3] = 0  # an empty row: NaN output, zero gradient
    upstream = torch.randn(4, 29, generator=gen)
    upstream[3] = 0
    got = masked_pool(hidden, mask, mode)
    (torch.nan_to_num(got) * upstream).sum().backward()
    reference_input = hidden.detach().double().requires_grad_(True)
    expected = expected_pool(reference_input, mask, mode)
    (torch.nan_to_num(expected) * upstream.double()).sum().backward()
    assert hidden.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad.double(), reference_input.grad, rtol=1e-6, atol=1e-7)


def test_pool_backward_low_precision_keeps_dtype():
    hidden = torch.randn(2, 7, 12).to(torch.bfloat16).requires_grad_(True)
    masked_pool(hidden, None, "mean").sum().backward()
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), torch.full((2, 7, 12), 1 / 7), rtol=1e-2, atol=0)


def test_reference_matches_float64_definition():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 10, 8, generator=gen, dtype=torch.float64)
    mask = make_mask(4, 10, "left", "bool", seed=1)
    for mode in POOLING_MODES:
        got = masked_pool_reference(hidden, mask, mode, compute_dtype=torch.float64)
        torch.testing.assert_close(got, expected_pool(hidden, mask, mode), rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused():
    hidden = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        masked_pool(hidden, None, "max")
    with pytest.raises(ValueError, match="bool or integer"):
        masked_pool(hidden, torch.ones(2, 5), "mean")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        masked_pool(hidden, torch.ones(2, 4, dtype=torch.long), "mean")
    with pytest.raises(ValueError, match="floating hidden states"):
        masked_pool(torch.ones(2, 5, dtype=torch.long), None, "mean")
