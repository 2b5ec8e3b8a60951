"""The LM head and its cross-entropy, a chunk of tokens at a time: the ``[tokens, vocab]`` logits never exist whole.

A causal LM's loss is ``mean_t CE(h_t W^T + b, y_t)`` over the tokens whose label is not ``ignore_index``. Done
plainly, the logits of every token (and their gradient, as large) are alive at once: 1024 tokens x a 128k
vocabulary x fp32 is 0.5 GiB, twice over with the gradient. Here the forward pass runs ``chunk_size`` tokens at a
time and, since the loss is a scalar, also computes each chunk's gradients right away (as Liger's fused linear
cross-entropy does):

    p = softmax(h W^T + b)                 per chunk, fp32
    dL/dlogits = (p - onehot(y)) / n       on counted tokens (n of them), 0 elsewhere
    dL/dh = dL/dlogits W                   [chunk, H], in h's dtype
    dL/dW += dL/dlogits^T h,  dL/db += sum_t dL/dlogits     only when W (b) requires a gradient

so that at most one chunk's logits and their gradient are alive; backward only scales the stored gradients by
the incoming one (under ``no_grad`` none are computed). The matmul runs in the dtype the plain path's would (the
autocast dtype under autocast, else the inputs') and the softmax in fp32, as ``transformers`` computes its loss
(logits upcast to fp32), so the result matches the plain path to low-precision rounding.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Tokens per chunk: 256 x a 128k vocabulary x fp32 is 128 MiB for the logits, as much for their gradient.
DEFAULT_CHUNK = 256


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The plain path: full logits, fp32 cross-entropy, mean over counted tokens (``[N, H]``, ``[V, H]``, ``[N]``)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, with_grads):
        # The head's matmul runs in the dtype the plain path's would: autocast's where it is on (a bf16 matmul
        # of fp32 weights on a GPU), else the hidden states'. Autocast itself is off inside, so that each
        # matmul's dtype is the one written here.
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden.dtype)
        with torch.autocast(device_type, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index,
                                                       with_grads, compute_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, with_grads, compute_dtype):
        head_weight, head_bias = weight, bias
        weight = weight.detach().to(compute_dtype)
        bias = None if bias is None else bias.detach().to(compute_dtype)
        counted = labels != ignore_index
        n = int(counted.sum())
        # Under no_grad (evaluation) nothing will call backward: no gradient is computed, whatever requires one.
        grad_hidden = torch.zeros_like(hidden) if with_grads and hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if with_grads and head_weight.requires_grad else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if with_grads and head_bias is not None and head_bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y, keep = (t[start:start + chunk_size] for t in (hidden, labels, counted))
            h = h.to(compute_dtype)
            logits = h @ weight.T
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            lse = logits.logsumexp(-1)
            target = y.clamp_min(0)
            picked = logits.gather(1, target[:, None])[:, 0]
            total += ((lse - picked) * keep).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            grad_logits = (logits - lse[:, None]).exp_()  # softmax, in place of the logits
            grad_logits[torch.arange(len(y), device=y.device), target] -= 1.0
            grad_logits *= keep[:, None] / max(n, 1)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = (grad_logits.to(compute_dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.grads = (grad_hidden,
                     None if grad_weight is None else grad_weight.to(head_weight.dtype),
                     None if grad_bias is None else grad_bias.to(head_bias.dtype))
        # No counted token: 0/0, as torch's mean cross-entropy gives (NaN), never a silent 0.
        return total / n if n else total * float("nan")

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None, None, None


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                 chunk_size: int = DEFAULT_CHUNK, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[N, H]`` (fp32, bf16 or fp16): the final hidden states of the tokens that predict ``labels``
            (for a causal LM: positions ``:-1``, labels shifted by one).
        weight: ``[V, H]`` the LM head's weight, same dtype; its gradient is computed only if it requires one.
        labels: int64 ``[N]``; ``ignore_index`` tokens are not counted.
        bias: ``[V]`` or None.

    Returns:
        The fp32 scalar loss (NaN when no token is counted, as the plain path gives), differentiable with
        respect to ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_loss: hidden [N, H], weight [V, H] and labels [N], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, ignore_index,
                                            torch.is_grad_enabled())


def lm_loss(model, hidden_states: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A causal LM's next-token loss from its final hidden states ``[B, T, H]`` and ``labels`` int64 ``[B, T]``
    (position t predicts ``labels[:, t + 1]``, as ``transformers`` shifts them), through its output embedding,
    chunk by chunk."""
    head = model.get_output_embeddings()
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    return chunked_loss(hidden, head.weight, labels[:, 1:].reshape(-1), getattr(head, "bias", None),
                        chunk_size=chunk_size, ignore_index=ignore_index)


@torch.no_grad()
def agrees_with_model(model, chunk_size: int = DEFAULT_CHUNK) -> bool:
    """Whether :func:`lm_loss` on the trunk's hidden states gives ``model``'s own loss, on a short random batch.

    A model whose logits are not ``hidden @ W^T + b`` (soft-capped, scaled, a head that is not a linear layer)
    disagrees, and then keeps its own loss.
    """
    head = model.get_output_embeddings()
    trunk = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or trunk is None or trunk is model:
        return False
    device = head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
        hidden = trunk(input_ids=ids, use_cache=False).last_hidden_state
        ours = lm_loss(model, hidden, ids, chunk_size)
    finally:
        model.train(was_training)
    return bool(torch.isfinite(own)) and abs(float(ours) - float(own)) <= 1e-3 * max(1.0, abs(float(own)))
