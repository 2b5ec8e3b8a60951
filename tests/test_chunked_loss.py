"""laet_fast.chunked_loss: the chunked LM-head cross-entropy equals the plain one, loss and gradients, to 2x
PyTorch's own error against a float64 reference."""
import pytest
import torch

from laet_fast.chunked_loss import chunked_loss, reference_loss


def _case(dtype, n=37, h=24, v=101, seed=0, bias=True, ignored=0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * 2
    weight = torch.randn(v, h, generator=gen) / h**0.5
    b = torch.randn(v, generator=gen) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = -100
    return hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), labels


def _grads(fn, hidden, weight, bias, labels):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None)
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_match_the_plain_path(dtype, atol, chunk, bias):
    hidden, weight, b, labels = _case(dtype, bias=bias, seed=chunk)
    exact = _grads(reference_loss, hidden.double(), weight.double(), None if b is None else b.double(), labels)
    plain = _grads(reference_loss, hidden, weight, b, labels)
    ours = _grads(lambda *a: chunked_loss(*a, chunk_size=chunk), hidden, weight, b, labels)
    for name, e, p, o in zip(("loss", "hidden", "weight", "bias"), exact, plain, ours):
        torch_error = (p - e).abs().max().item()
        assert (o - e).abs().max().item() <= 2 * torch_error + atol, name


def test_a_frozen_head_gets_no_gradient_and_the_hidden_gradient_is_still_right():
    hidden, weight, _, labels = _case(torch.float32, bias=False)
    h = hidden.clone().requires_grad_(True)
    chunked_loss(h, weight, labels, chunk_size=5).backward()
    ref = hidden.clone().requires_grad_(True)
    reference_loss(ref, weight, labels).backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_under_autocast_the_head_runs_in_the_autocast_dtype_as_the_plain_path_does():
    """fp32 weights under bf16 autocast (a GPU run's mixed precision): the plain path's head matmul is bf16, and so
    is ours; the gradient to the fp32 hidden states is fp32. (It ran the head in fp32: right, but slower.)"""
    hidden, weight, _, labels = _case(torch.float32, bias=False)
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = chunked_loss(h, weight, labels, chunk_size=8)
        plain = reference_loss(hidden, weight, labels)
    mixed.backward()
    as_bf16 = chunked_loss(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=8)
    assert mixed.item() == as_bf16.item()
    assert abs(mixed.item() - plain.item()) <= 1e-3 * abs(plain.item())
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


def test_no_gradient_is_computed_under_no_grad(monkeypatch):
    """Evaluation of a run that trains the head: the loss alone, no [V, H] gradient built and thrown away."""
    hidden, weight, _, labels = _case(torch.float32, bias=False)
    weight.requires_grad_(True)
    made = []
    real_zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        made.append(args)
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", counting_zeros)
    with torch.no_grad():
        loss = chunked_loss(hidden, weight, labels, chunk_size=8)
    assert [shape for shape in made if tuple(shape[0]) == tuple(weight.shape)] == []
    monkeypatch.setattr(torch, "zeros", real_zeros)
    assert loss.item() == pytest.approx(reference_loss(hidden, weight, labels).item(), rel=1e-6)


def test_no_counted_token_is_nan_as_in_the_plain_path():
    hidden, weight, _, labels = _case(torch.float32, bias=False)
    labels[:] = -100
    assert torch.isnan(chunked_loss(hidden, weight, labels)) and torch.isnan(reference_loss(hidden, weight, labels))


def test_shapes_are_checked():
    hidden, weight, _, labels = _case(torch.float32, bias=False)
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        chunked_loss(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(hidden, weight, labels, chunk_size=0)


def test_the_config_default_is_the_modules():
    from laet_fast.chunked_loss import DEFAULT_CHUNK
    from laet_fast.train.config import LOSS_CHUNK

    assert LOSS_CHUNK == DEFAULT_CHUNK


def _tiny(tmp_path):
    from train_fixtures import save_model

    from laet_fast.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(save_model(tmp_path / "m", layers=3, vocab_size=211), dtype="float32",
                                    device="cpu")[0]


@pytest.mark.parametrize("packed", [False, True])
def test_task_model_chunked_loss_and_gradients_equal_the_models_own(tmp_path, packed):
    from laet_fast.train.heads import TaskModel

    model = _tiny(tmp_path)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100  # a prompt, as sft masks it
    extra = {"position_ids": torch.tensor([list(range(5)) + list(range(6))] * 3)} if packed else {}
    results = []
    for chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        loss, _ = TaskModel(model, "sft", loss_chunk=chunk)(ids, mask, labels, **extra)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (plain, plain_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == our_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(our_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_whose_logits_are_not_the_heads_keeps_its_own_loss(tmp_path, monkeypatch, capsys):
    from laet_fast.chunked_loss import agrees_with_model

    model = _tiny(tmp_path)
    assert agrees_with_model(model)
    forward = model.forward

    def soft_capped(*args, **kwargs):  # as Gemma 2's final_logit_softcapping changes the loss
        out = forward(*args, **kwargs)
        out.loss = out.loss * 1.01
        return out

    monkeypatch.setattr(model, "forward", soft_capped)
    assert not agrees_with_model(model)
