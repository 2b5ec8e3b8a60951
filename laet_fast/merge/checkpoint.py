"""Read and write save_pretrained safetensors checkpoints one tensor at a time.

A checkpoint folder holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte range; optional ``__metadata__``) and the raw tensor bytes. Reading and writing it
directly, rather than through ``safetensors.safe_open`` / ``save_file``, is what lets a merge hold
one tensor at a time: ``save_file`` needs every tensor of a file in memory at once, and
``safe_open`` hands out memory-mapped tensors that no allocator accounts for, so the memory bound
of ``layer_impact`` and ``restore`` could not be measured. Here every tensor read is a fresh
``torch.empty`` filled with ``readinto``.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# A block's tensors are named "<stack>.<index>.<rest>", e.g. "model.layers.3.mlp.up_proj.weight".
_BLOCK_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<index>\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file (relative to the folder), dtype, shape and byte range."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing (the checkpoint's {INDEX_FILE} lists it).")
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: bad header ({err}).") from None
    return header, 8 + length


class Checkpoint:
    """The safetensors weights of a save_pretrained folder, read one tensor at a time.

    Attributes:
        folder: the folder.
        files: the weight files in order, e.g. ``["model.safetensors"]`` or the index's shards.
        tensors: name -> ``TensorInfo``, in file order then header order.
        metadata: file -> the file's ``__metadata__`` dict (e.g. ``{"format": "pt"}``).
        config: the parsed ``config.json`` ({} when absent).
    """

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} is not a folder; give a save_pretrained model folder.")
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map", {})
            self.files = list(dict.fromkeys(weight_map.values()))
        elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
            self.files = [SINGLE_FILE]
        else:
            raise ValueError(
                f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; save the model with "
                "model.save_pretrained(folder) (safetensors, the default) first."
            )
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for file in self.files:
            header, data_start = _read_header(os.path.join(folder, file))
            self.metadata[file] = header.pop("__metadata__", None) or {}
            for name, entry in header.items():
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name!r} in {file} has dtype {entry['dtype']}, "
                                     "which laet_fast cannot read.")
                start, end = entry["data_offsets"]
                self.tensors[name] = TensorInfo(file, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                                data_start + start, data_start + end)
        self.config = {}
        if os.path.isfile(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
                self.config = json.load(handle)

    def read(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor holding tensor ``name`` (its stored dtype and shape)."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            with open(os.path.join(self.folder, info.file), "rb") as handle:
                handle.seek(info.start)
                got = handle.readinto(out.reshape(-1).view(torch.uint8).numpy())
            if got != info.nbytes:
                raise ValueError(f"{info.file} in {self.folder} is truncated: tensor {name!r} is incomplete.")
        return out

    def blocks(self) -> tuple[str, dict[int, list[str]]]:
        """The block stack's dotted path and, per block index, the names of its tensors.

        The stack is the ``<path>.<index>.`` prefix shared by the most distinct indices
        (``model.layers`` for Llama, ``transformer.h`` for GPT-2).
        """
        stacks: dict[str, dict[int, list[str]]] = {}
        for name in self.tensors:
            match = _BLOCK_NAME.match(name)
            if match:
                stacks.setdefault(match["stack"], {}).setdefault(int(match["index"]), []).append(name)
        if not stacks:
            raise ValueError(f"no transformer blocks (tensors named '<path>.<index>.<...>') in {self.folder}.")
        stack = max(stacks, key=lambda path: len(stacks[path]))
        return stack, dict(sorted(stacks[stack].items()))


def check_compatible(base: Checkpoint, tuned: Checkpoint) -> None:
    """Refuse two checkpoints that differ in architecture, tensor names or shapes, naming the first difference."""
    for key in ("model_type", "architectures"):
        if key in base.config and key in tuned.config and base.config[key] != tuned.config[key]:
            raise ValueError(f"base and tuned are different architectures: {key} is {base.config[key]!r} "
                             f"in {base.folder} and {tuned.config[key]!r} in {tuned.folder}.")
    for name in sorted(set(base.tensors) | set(tuned.tensors)):
        if name not in tuned.tensors or name not in base.tensors:
            where, other = (base, tuned) if name in base.tensors else (tuned, base)
            raise ValueError(f"tensor {name!r} is in {where.folder} but not in {other.folder}: "
                             "base and tuned must be the same architecture.")
        if base.tensors[name].shape != tuned.tensors[name].shape:
            raise ValueError(f"tensor {name!r} has shape {list(base.tensors[name].shape)} in {base.folder} but "
                             f"{list(tuned.tensors[name].shape)} in {tuned.folder}: "
                             "base and tuned must have one shape.")


def check_finite(tensor: torch.Tensor, name: str, folder: str) -> None:
    """Refuse a floating tensor holding NaN or Inf, naming it."""
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {name!r} in {folder} has {bad} non-finite values (NaN or Inf); "
                         "fix or re-export that checkpoint before merging.")


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header is laid out up front from shapes and dtypes.

    ``entries`` is the ordered list of (name, dtype, shape) that will be written; ``write`` must
    then be called once per entry, in that order, with a tensor of that dtype and shape.
    """

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._expected = []
        for name, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.nbytes = offset
        self._handle = open(path, "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(f"writer expected {expected}, got ({name!r}, {tensor.dtype}, {tuple(tensor.shape)}).")
        if tensor.numel():
            self._handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self._expected):
            raise ValueError(f"writer closed after {self._next} of {len(self._expected)} tensors.")
