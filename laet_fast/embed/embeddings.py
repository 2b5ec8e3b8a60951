"""``LayerEmbeddings``: a float32 ``[N, L, H]`` tensor that knows which examples, in which order, it holds."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def fingerprint_texts(texts: Sequence[str]) -> str:
    """A SHA-256 digest of the texts in order (each length-prefixed, so no two lists share one)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"{len(texts)}:{digest.hexdigest()}"


class LayerEmbeddings(torch.Tensor):
    """The output of ``layer_embeddings``: a float32 tensor ``[N, L, H]`` with what it was made from.

    Attributes:
        fingerprint: ``fingerprint_texts`` of the texts, in order; None when the input was pre-tokenized
            batches (their example identity is unknown).
        layers: the block index of each of the L columns.
        names: the dotted path of each of those blocks.
        pooling: ``"mean"``, ``"last"`` or ``"first"``.

    Any operation on it (indexing, arithmetic, ``.to``) returns a plain tensor: a slice or a shuffle
    is a different set of examples, so it must not carry the fingerprint along. That is how fusion
    across models refuses embeddings of different examples or orders by construction.
    """

    fingerprint: str | None
    layers: tuple[int, ...]
    # A class value, so that `obj.names = ...` sets this attribute: before torch 2.13, Tensor.names is the
    # named-tensor setter, which refuses dotted block paths.
    names: tuple[str, ...] = ()
    pooling: str

    @staticmethod
    def __new__(cls, data: torch.Tensor, *, fingerprint: str | None, layers: Sequence[int], names: Sequence[str],
                pooling: str):
        if data.dim() != 3 or data.shape[1] != len(layers):
            raise ValueError(f"LayerEmbeddings need data [N, L, H] with L = {len(layers)} layers; "
                             f"got {tuple(data.shape)}.")
        obj = data.as_subclass(cls)
        obj.fingerprint = fingerprint
        obj.layers = tuple(int(i) for i in layers)
        obj.names = tuple(str(n) for n in names)
        obj.pooling = str(pooling)
        return obj

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def subset(self, rows) -> "LayerEmbeddings":
        """The examples at ``rows`` (indices, in that order), fingerprinted as "these rows of those examples":
        the same rows of every model's embeddings of one text list share a fingerprint, nothing else does."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        data = self.as_subclass(torch.Tensor)[rows]
        if self.fingerprint is None:
            fingerprint = None
        else:
            digest = hashlib.sha256(rows.numpy().astype("<i8").tobytes()).hexdigest()
            fingerprint = f"{len(rows)}:{digest}<-{self.fingerprint}"
        return LayerEmbeddings(data, fingerprint=fingerprint, layers=self.layers, names=self.names,
                               pooling=self.pooling)

    def __repr__(self) -> str:
        n, num_layers, hidden = self.shape
        return (f"LayerEmbeddings(N={n}, layers={list(self.layers)}, hidden={hidden}, pooling={self.pooling!r}, "
                f"fingerprint={self.fingerprint!r})")

    def __reduce_ex__(self, protocol):
        raise TypeError("LayerEmbeddings are not pickled; save them with numpy.save(path, emb.numpy()) or "
                        "layer_embeddings(..., out='file.npy').")
