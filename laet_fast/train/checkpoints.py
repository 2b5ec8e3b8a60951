"""Checkpoints of what training changes: written atomically, verified when read, refused when of another run.

A checkpoint is a folder ``RUN/checkpoints/step-00000040/`` holding safetensors files (trained
blocks and heads, optimizer state, RNG states), ``meta.json`` (step, data position, optimizer
groups, scheduler state, the run's fingerprint) and, written last, ``manifest.json``: the size and
sha256 of every other file. Nothing is pickled, and every number a resume reads is in a digested file.

Writes are atomic: the folder is written under a temporary name, every file fsynced, then renamed
into place (a rename within one file system is atomic) and the parent fsynced. A crash mid-save
leaves a ``*.tmp`` folder that is never read, and the last complete checkpoint stays as it was.
Reads verify: a flipped byte, a cut or missing file, an edited ``meta.json``, a file the manifest
does not list, or a step that is not the folder's make the checkpoint ``Damaged``, and ``newest``
goes back to the newest one that verifies. A resume deletes nothing: a later save of the same step
sets the damaged folder aside as ``step-N.damaged``. Only ``keep`` prunes, the oldest step folders
first, as it always does.

A finished run writes ``RUN/checkpoints/finished/`` the same way (its step and fingerprint, no
tensors), so that a resume of a finished run can say so instead of training again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil

import torch

from ..atomic import fsync_path

FOLDER = "checkpoints"
# The errors of a write that found no room: the disk is full, or the user's quota on it is.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
META = "meta.json"
MANIFEST = "manifest.json"
FINISHED = "finished"
FORMAT = "laet_fast.train.checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Damaged(ValueError):
    """A checkpoint that does not verify; the message names the file and what is wrong with it."""


class NoSpace(RuntimeError):
    """A save that ran out of disk space; the message names the folder and the space it needs."""


def _write_file(path: str, write) -> None:
    """``write(path)`` then fsync the file (one place to interrupt a save in tests)."""
    write(path)
    fsync_path(path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _file_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in chunks (hashlib.file_digest is Python 3.11+; we claim 3.10)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def _size_text(size: int) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more ("1.5 MiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def no_space(what: str, path: str, needed: int) -> NoSpace:
    """The one-line error of a write of ``what`` to ``path`` that filled the disk, with about ``needed`` bytes."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return NoSpace(f"no space left to write {what} {path}: it needs about {_size_text(needed)}, "
                   f"{_size_text(free)} are free; free some space there and resume with resume=True (the earlier "
                   f"checkpoints are intact).")


def _write_folder(final: str, tensors: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` into ``final`` atomically, the manifest last; an existing ``final`` is set
    aside, not deleted (it is there when a resume went past it as damaged)."""
    from safetensors.torch import save_file

    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    meta_text = json.dumps({"format": FORMAT, "version": 1, **meta}, indent=1, allow_nan=False)
    try:
        os.makedirs(tmp)
        for stem, group in tensors.items():
            _write_file(os.path.join(tmp, f"{stem}.safetensors"), lambda path, g=group: save_file(_plain(g), path))
        _write_file(os.path.join(tmp, META), lambda path: _write_text(path, meta_text))
        files = {}
        for name in sorted(os.listdir(tmp)):
            size, digest = _file_digest(os.path.join(tmp, name))
            files[name] = {"bytes": size, "sha256": digest}
        manifest_text = json.dumps({"format": FORMAT, "files": files}, indent=1)
        _write_file(os.path.join(tmp, MANIFEST), lambda path: _write_text(path, manifest_text))
        fsync_path(tmp)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for group in tensors.values() for t in group.values())
        # meta.json, and a few KiB for the safetensors headers and the manifest.
        needed += len(meta_text.encode("utf-8")) + 4096
        raise no_space("the checkpoint", final, needed) from None
    if os.path.isdir(final):
        _set_aside(final)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(final))


def _set_aside(path: str) -> None:
    """Rename ``path`` to ``path.damaged`` (``path.damaged-2``, ... when taken): never delete what a resume skipped."""
    target, n = path + ".damaged", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged-{n}"
    os.rename(path, target)


def save(run_dir: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int) -> str:
    """Write checkpoint ``step`` of the run in ``run_dir`` and keep the last ``keep``; returns its folder.

    Args:
        tensors: file stem -> {name: tensor} (one safetensors file each).
        meta: JSON-serialisable state (strict JSON: no NaN).

    Raises:
        NoSpace: the disk filled up; the temporary folder is removed and the earlier checkpoints are intact.
    """
    root = os.path.join(run_dir, FOLDER)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    _write_folder(final, tensors, {**meta, "step": step})
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def complete(run_dir: str) -> list[str]:
    """The checkpoint folders of a run that a save renamed into place, oldest first (temporary folders of a cut
    save are ignored). They may still be damaged: ``load`` verifies."""
    root = os.path.join(run_dir, FOLDER)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest(run_dir: str) -> str | None:
    """The newest checkpoint folder of the run (not verified), or None."""
    found = complete(run_dir)
    return found[-1] if found else None


def verify(path: str) -> dict:
    """The meta data of the checkpoint folder ``path`` once every file matches its manifest; ``Damaged`` if not."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise Damaged(f"{manifest_path} is missing, so the checkpoint cannot be verified (removed since, or written "
                      f"by a laet_fast that wrote no manifest)")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            listed = json.load(handle)["files"]
        listed = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise Damaged(f"{manifest_path} cannot be read ({type(err).__name__}: {err})") from None
    unlisted = sorted(set(os.listdir(path)) - set(listed) - {MANIFEST})
    if unlisted:
        raise Damaged(f"{os.path.join(path, unlisted[0])} is not in the checkpoint's manifest (added since it was "
                      f"saved)")
    for name, (size, digest) in listed.items():
        file = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise Damaged(f"{file} is missing")
        try:
            got_size, got_digest = _file_digest(file)
        except OSError as err:
            raise Damaged(f"{file} cannot be read ({err.strerror or err})") from None
        if got_size != size:
            raise Damaged(f"{file} has {got_size} bytes, {size} when it was saved (cut or changed since)")
        if got_digest != digest:
            raise Damaged(f"{file} does not match its sha256 in the manifest (changed since it was saved)")
    if META not in listed:
        raise Damaged(f"{manifest_path} lists no {META}")
    with open(os.path.join(path, META), encoding="utf-8") as handle:
        meta = json.load(handle)  # its bytes are the ones saved, and they were strict JSON
    if meta.get("format") != FORMAT:
        raise Damaged(f"{os.path.join(path, META)} is not the meta data of a laet_fast training checkpoint")
    match = _STEP_DIR.match(os.path.basename(path))
    if match and meta.get("step") != int(match.group(1)):
        raise Damaged(f"{os.path.join(path, META)} records step {meta.get('step')}, but its folder is "
                      f"{os.path.basename(path)}")
    return meta


def load(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(file stem -> tensors, meta) of a checkpoint folder, once verified; ``Damaged`` if it does not verify."""
    from safetensors.torch import load_file

    meta = verify(path)
    tensors = {name[: -len(".safetensors")]: load_file(os.path.join(path, name))
               for name in sorted(os.listdir(path)) if name.endswith(".safetensors")}
    return tensors, meta


def newest(run_dir: str, say) -> tuple[str, dict[str, dict[str, torch.Tensor]], dict] | None:
    """(folder, tensors, meta) of the newest checkpoint of the run that verifies, None when the run has none.

    ``say(line)`` is told, in one line each, what is wrong with every newer checkpoint that does not verify,
    and which one the run goes back to. Nothing is deleted.

    Raises:
        Damaged: the run has checkpoints, and none verifies.
    """
    found = complete(run_dir)
    for n, path in enumerate(reversed(found)):
        try:
            tensors, meta = load(path)
        except Damaged as err:
            say(f"checkpoint {os.path.basename(path)} is damaged: {err}.")
            continue
        if n:
            say(f"resuming from {path}, the newest checkpoint that verifies (nothing was deleted).")
        return path, tensors, meta
    if found:
        raise Damaged(f"none of the {len(found)} checkpoints in {os.path.join(run_dir, FOLDER)} verifies (each is "
                      f"named above; nothing was deleted); start the run again in another out folder.")
    return None


def mark_finished(run_dir: str, step: int, fingerprint: dict) -> None:
    """Write ``RUN/checkpoints/finished/``: the run's export and report hold ``step`` steps."""
    root = os.path.join(run_dir, FOLDER)
    os.makedirs(root, exist_ok=True)
    _write_folder(os.path.join(root, FINISHED), {}, {"step": step, "fingerprint": fingerprint})


def finished(run_dir: str) -> tuple[str, dict] | None:
    """(folder, meta) of the run's finished mark, None when the run never finished; ``Damaged`` if it does not
    verify."""
    path = os.path.join(run_dir, FOLDER, FINISHED)
    return (path, verify(path)) if os.path.isdir(path) else None


# Fingerprint keys added after checkpoints were first written, with the value that gives what a run made before
# them did: an older checkpoint lacking one resumes when this run sets that value (and is refused, saying so,
# when it does not).
ADDED_KEYS = {"packing": False}


def check_same_run(saved: dict, current: dict, path: str) -> None:
    """Refuse a checkpoint whose fingerprint differs from this run's, naming every difference (a key that one
    side lacks is a difference, but for :data:`ADDED_KEYS`)."""
    saved = {**{key: value for key, value in ADDED_KEYS.items() if key in current}, **saved}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, _ABSENT) != current.get(key, _ABSENT):
            diffs.append(f"{key}: checkpoint {_short(saved.get(key, _ABSENT))}, this run "
                         f"{_short(current.get(key, _ABSENT))}")
    if diffs:
        raise ValueError(f"cannot resume from {path}, it is from another run ({'; '.join(diffs)}); resume with the "
                         f"same settings, or start a new run in another out folder.")


_ABSENT = object()


def _short(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
