"""Checkpoints of what training changes, written atomically; refused when they belong to another run.

A checkpoint is a folder ``RUN/checkpoints/step-00000040/`` holding safetensors files (trained
blocks and heads, optimizer state, RNG states) and ``meta.json`` (step, data position, optimizer
groups, scheduler state, the run's fingerprint). Nothing is pickled.

Writes are atomic: the folder is written under a temporary name, every file fsynced, then renamed
into place (a rename within one file system is atomic) and the parent fsynced. A crash mid-save
leaves a ``*.tmp`` folder that is never read, and the last complete checkpoint stays as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

FOLDER = "checkpoints"
META = "meta.json"
FORMAT = "laet_fast.train.checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, write) -> None:
    """``write(path)`` then fsync the file (one place to interrupt a save in tests)."""
    write(path)
    _fsync_path(path)


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def save(run_dir: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int) -> str:
    """Write checkpoint ``step`` of the run in ``run_dir`` and keep the last ``keep``; returns its folder.

    Args:
        tensors: file stem -> {name: tensor} (one safetensors file each).
        meta: JSON-serialisable state (strict JSON: no NaN).
    """
    from safetensors.torch import save_file

    root = os.path.join(run_dir, FOLDER)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for stem, group in tensors.items():
        _write_file(os.path.join(tmp, f"{stem}.safetensors"), lambda path, g=group: save_file(_plain(g), path))

    def write_meta(path):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "version": 1, **meta}, handle, indent=1, allow_nan=False)

    _write_file(os.path.join(tmp, META), write_meta)
    _fsync_path(tmp)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def complete(run_dir: str) -> list[str]:
    """The complete checkpoint folders of a run, oldest first (temporary folders of a cut save are ignored)."""
    root = os.path.join(run_dir, FOLDER)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, META)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint of the run, or None."""
    found = complete(run_dir)
    return found[-1] if found else None


def load(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(file stem -> tensors, meta) of a checkpoint folder; ValueError if it is not one."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, META), encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err}); remove it to resume from the one before.") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a laet_fast training checkpoint.")
    tensors = {name[: -len(".safetensors")]: load_file(os.path.join(path, name))
               for name in sorted(os.listdir(path)) if name.endswith(".safetensors")}
    return tensors, meta


def check_same_run(saved: dict, current: dict, path: str) -> None:
    """Refuse a checkpoint whose fingerprint differs from this run's, naming every difference."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {_short(saved.get(key))}, this run {_short(current.get(key))}")
    if diffs:
        raise ValueError(f"cannot resume from {path}, it is from another run ({'; '.join(diffs)}); resume with the "
                         f"same settings, or start a new run in another --out folder.")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
