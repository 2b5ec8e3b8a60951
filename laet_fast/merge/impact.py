"""How much fine-tuning changed each transformer block, and what restoring it alone would do (SPEAR-MM).

Weight metrics come from two checkpoints streamed block by block: only one block of each model
is in memory at a time. For a block with matrices W_b (base) and W_t (tuned), every floating
tensor of two or more dims (reshaped to ``[shape[0], -1]``; norms and biases are left out):

* ``weight_rel_change``  sqrt(sum ||W_t - W_b||^2) / sqrt(sum ||W_b||^2)   (Frobenius, over the block)
* ``weight_cosine``      sum <W_b, W_t> / (sqrt(sum ||W_b||^2) * sqrt(sum ||W_t||^2))
* ``weight_snr_change``  sqrt(sum ||W_t - W_b||^2 / std(W_b)^2 / sum numel): the change of each
  matrix measured in units of the spread of its base weights (SPEAR-MM's signal-to-noise-weighted
  change), as an RMS over the block's elements
* ``sv_drop``            1 - sum top-r sigma(W_t) / sum top-r sigma(W_b): the relative drop of the
  top-r singular values (r = 8); exact ``torch.linalg.svdvals`` up to 1024 on the short side,
  else a seeded randomized subspace iteration shared by both models

With text files, the tuned model is loaded once and each block is restored to its base weights
alone (then put back): ``general_ppl_delta`` is the change of perplexity on ``general_data``
(negative: restoring this block recovers general ability) and ``domain_loss_delta`` the change of
mean token loss on ``domain_data`` (positive: restoring it costs domain skill). That mode holds the
tuned model plus one block of each model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from laet_fast.merge.checkpoint import Checkpoint, check_compatible, check_finite
from laet_fast.scores import LayerScores

WEIGHT_METRICS = ("weight_rel_change", "weight_cosine", "weight_snr_change", "sv_drop")
SV_RANK = 8
EXACT_SVD_MAX_DIM = 1024
# Randomized top singular values: (rank + OVERSAMPLE) probe vectors, POWER_ITERATIONS rounds.
OVERSAMPLE = 8
POWER_ITERATIONS = 4
STD_EPS = 1e-12


def top_singular_values(w: torch.Tensor, rank: int = SV_RANK, seed: int = 0) -> torch.Tensor:
    """The ``rank`` largest singular values of a float32 matrix ``w`` ``[m, n]``, descending.

    Exact (``torch.linalg.svdvals``) when ``min(m, n) <= EXACT_SVD_MAX_DIM``; otherwise a
    randomized subspace iteration whose Gaussian probe is drawn from ``seed``, so the base and
    the tuned matrix are probed alike and their approximation errors largely cancel in ``sv_drop``.
    """
    rank = min(rank, *w.shape)
    if min(w.shape) <= EXACT_SVD_MAX_DIM:
        return torch.linalg.svdvals(w)[:rank]
    generator = torch.Generator(device=w.device).manual_seed(seed)
    probe = torch.randn(w.shape[1], rank + OVERSAMPLE, generator=generator, device=w.device, dtype=w.dtype)
    basis = torch.linalg.qr(w @ probe).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.T @ basis).Q).Q
    return torch.linalg.svdvals(basis.T @ w)[:rank]


def block_weight_change(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int = SV_RANK,
                        device=None) -> dict[str, float]:
    """The four weight metrics of one block (module docstring) from its tensors, name -> tensor.

    ``base`` and ``tuned`` hold the same names and shapes, any float dtypes; math is float32 on
    ``device`` (default: where the tensors are), sums in Python float64. A block without matrices
    gets NaN.
    """
    base_sq = tuned_sq = diff_sq = dot = snr_sq = numel = sv_base = sv_tuned = 0.0
    for index, name in enumerate(sorted(base)):
        if base[name].dim() < 2 or not base[name].dtype.is_floating_point:
            continue
        wb = base[name].to(device=device, dtype=torch.float32).reshape(base[name].shape[0], -1)
        wt = tuned[name].to(device=device, dtype=torch.float32).reshape(wb.shape)
        change = float(torch.linalg.vector_norm(wt - wb)) ** 2
        base_sq += float(torch.linalg.vector_norm(wb)) ** 2
        tuned_sq += float(torch.linalg.vector_norm(wt)) ** 2
        diff_sq += change
        dot += float(torch.dot(wb.reshape(-1), wt.reshape(-1)))
        snr_sq += change / max(float(wb.std(correction=0)), STD_EPS) ** 2
        numel += wb.numel()
        sv_base += float(top_singular_values(wb, rank, seed=index).sum())
        sv_tuned += float(top_singular_values(wt, rank, seed=index).sum())
    if numel == 0:
        return {metric: float("nan") for metric in WEIGHT_METRICS}
    return {
        "weight_rel_change": math.sqrt(diff_sq / base_sq) if base_sq else float("inf"),
        "weight_cosine": dot / math.sqrt(base_sq * tuned_sq) if base_sq and tuned_sq else float("nan"),
        "weight_snr_change": math.sqrt(snr_sq / numel),
        "sv_drop": 1.0 - sv_tuned / sv_base if sv_base else float("nan"),
    }


def _read_block(checkpoint: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in names:
        tensors[name] = checkpoint.read(name)
        check_finite(tensors[name], name, checkpoint.folder)
    return tensors


@torch.no_grad()
def mean_token_nll(model, batches: list[dict]) -> tuple[float, int]:
    """Mean next-token negative log-likelihood (nats) over the real tokens of ``batches``, and their count.

    ``batches``: dicts with ``input_ids`` and ``attention_mask`` ``[batch, seq]`` (padding either side).
    """
    total, count = 0.0, 0
    for batch in batches:
        logits = model(**batch).logits[:, :-1].float()
        # Token t+1 counts when t is real too: under left padding the first real token follows a pad,
        # a prediction from no text that the same row right-padded (or alone) never makes.
        real = batch["attention_mask"].bool()
        targets = batch["input_ids"][:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
        total += float(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("the texts give no token to predict (each needs at least two tokens).")
    return total / count, count


def _restore_deltas(base: Checkpoint, tuned_folder: str, stack: str, blocks: dict[int, list[str]], data: dict,
                    *, device, max_texts: int, batch_size: int, max_length: int, text_column: str):
    """Per block, the change of each data file's score when that block alone is restored to base."""
    from laet_fast.data import load_texts
    from laet_fast.loading import iter_batches, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tuned_folder, device=device)
    device = next(model.parameters()).device
    batches = {key: list(iter_batches(tokenizer, load_texts(path, column=text_column, limit=max_texts),
                                      batch_size, max_length, device=device)) for key, path in data.items()}
    score = {  # general text: perplexity; domain text: mean token loss
        "general_data": lambda nll: math.exp(nll),
        "domain_data": lambda nll: nll,
    }
    tuned_nll, tokens = {}, 0
    for key in batches:
        tuned_nll[key], count = mean_token_nll(model, batches[key])
        tokens += count
    deltas = {key: [] for key in batches}
    for index, names in blocks.items():
        prefix = f"{stack}.{index}."
        try:
            module = model.get_submodule(f"{stack}.{index}")
        except AttributeError:
            raise ValueError(f"the model loaded from {tuned_folder} has no module {stack}.{index}, although its "
                             "checkpoint names one; save it with save_pretrained of its own class.") from None
        kept = {key: value.detach().clone() for key, value in module.state_dict().items()}
        restored = {name[len(prefix):]: tensor for name, tensor in _read_block(base, names).items()}
        unexpected = module.load_state_dict(restored, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"block {stack}.{index} of the loaded model has no {unexpected[0]!r}.")
        for key in batches:
            nll, _ = mean_token_nll(model, batches[key])
            deltas[key].append(score[key](nll) - score[key](tuned_nll[key]))
        module.load_state_dict(kept)
    names = {"general_data": "general_ppl_delta", "domain_data": "domain_loss_delta"}
    return {names[key]: values for key, values in deltas.items()}, tokens


def layer_impact(base: str, tuned: str, *, general_data: str | None = None, domain_data: str | None = None,
                 rank: int = SV_RANK, device=None, max_texts: int = 64, batch_size: int = 8, max_length: int = 64,
                 text_column: str = "text") -> LayerScores:
    """Per-block impact of fine-tuning ``base`` into ``tuned`` (metrics in the module docstring).

    Args:
        base, tuned: save_pretrained folders (safetensors, single file or sharded) of one architecture.
        general_data, domain_data: optional text files (as ``laet_fast.data.load_texts`` reads:
            .csv, .tsv, .json, .jsonl, .parquet, .txt): add ``general_ppl_delta`` / ``domain_loss_delta``.
        rank: how many top singular values ``sv_drop`` compares.
        device: where the math runs (default CPU for the weights; for the data: cuda if available).
        max_texts, batch_size, max_length, text_column: how much of each text file is scored.

    Returns:
        ``LayerScores`` with one row per block (names like ``model.layers.3``), ``num_tokens`` the
        tokens scored on the text files (0 without them).

    Raises:
        ValueError: the checkpoints differ in architecture or shapes (first differing tensor
        named), a block tensor is not finite (named), or a data file cannot be read.
    """
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    check_compatible(base_ckpt, tuned_ckpt)
    stack, blocks = base_ckpt.blocks()
    metrics = {metric: [] for metric in WEIGHT_METRICS}
    for names in blocks.values():
        base_block, tuned_block = _read_block(base_ckpt, names), _read_block(tuned_ckpt, names)
        for metric, value in block_weight_change(base_block, tuned_block, rank, device=device).items():
            metrics[metric].append(value)
        del base_block, tuned_block  # before the next block is read: one block of each model at a time
    tokens = 0
    data = {key: path for key, path in (("general_data", general_data), ("domain_data", domain_data)) if path}
    if data:
        # Scoring runs the whole tuned model: its tensors outside the blocks (embeddings, final norm, LM
        # head) are checked too, one at a time, so that a NaN is named instead of turning every delta NaN.
        in_blocks = {name for names in blocks.values() for name in names}
        for name in tuned_ckpt.tensors:
            if name not in in_blocks:
                check_finite(tuned_ckpt.read(name), name, tuned_ckpt.folder)
        deltas, tokens = _restore_deltas(base_ckpt, tuned, stack, blocks, data, device=device, max_texts=max_texts,
                                         batch_size=batch_size, max_length=max_length, text_column=text_column)
        metrics.update(deltas)
    return LayerScores(metrics, [f"{stack}.{index}" for index in blocks], num_tokens=tokens)
