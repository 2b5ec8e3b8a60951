"""``laet_fast.train.checkpoints`` on its own: the manifest, every kind of damage, the fall-back to an older
checkpoint, which folders count as checkpoints, and the run-identity check. No training: small tensors are
saved directly (the runs that resume through ``laet-fast train`` are in test_train_resume.py)."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from laet_fast.train import checkpoints


def tensors_of(step):
    generator = torch.Generator().manual_seed(step)
    return {"trained": {"w": torch.randn(64, 32, generator=generator)},
            "rng": {"torch": torch.arange(50, dtype=torch.uint8)}}


def save(run, step, keep=5):
    meta = {"position": 40, "fingerprint": {"model": "tiny"}, "optimizer": {"groups": [{"lr": 0.001}]}}
    return checkpoints.save(str(run), step, tensors_of(step), {**meta, "step": step}, keep)


def folder_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_the_manifest_holds_every_files_size_and_sha256_and_is_written_last(tmp_path, monkeypatch):
    real_write, order = checkpoints._write_file, []

    def write_file(path, write):
        order.append(os.path.basename(path))
        real_write(path, write)

    monkeypatch.setattr(checkpoints, "_write_file", write_file)
    folder = save(tmp_path, 4)
    assert order[-1] == checkpoints.MANIFEST
    assert sorted(order[:-1]) == ["meta.json", "rng.safetensors", "trained.safetensors"]
    files = folder_bytes(folder)
    manifest = json.loads(files.pop(checkpoints.MANIFEST))
    assert manifest["files"] == {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                 for name, data in files.items()}
    tensors, meta = checkpoints.load(folder)
    assert torch.equal(tensors["trained"]["w"], tensors_of(4)["trained"]["w"])
    assert meta["step"] == 4 and meta["position"] == 40 and meta["optimizer"]["groups"][0]["lr"] == 0.001


def flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def cut(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def replace_text(old, new):
    def edit(path):
        text = open(path).read()
        assert text.count(old) == 1
        open(path, "w").write(text.replace(old, new))
    return edit


def add_file(path):
    open(path, "w").write("x")


def forge_step(path):
    """meta.json says step 7 in the folder of step 2, with a manifest recomputed to match it."""
    replace_text('"step": 2', '"step": 7')(path)
    folder = os.path.dirname(path)
    manifest = json.load(open(os.path.join(folder, checkpoints.MANIFEST)))
    data = open(path, "rb").read()
    manifest["files"]["meta.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(manifest, open(os.path.join(folder, checkpoints.MANIFEST), "w"))


DAMAGE = {
    "flipped byte": ("trained.safetensors", flip, "does not match its sha256 in the manifest"),
    "cut weights": ("trained.safetensors", cut, "bytes, {size} when it was saved"),
    "cut meta.json": ("meta.json", cut, "bytes, {size} when it was saved"),
    "edited position": ("meta.json", replace_text('"position": 40', '"position": 36'), "does not match its sha256"),
    "edited lr": ("meta.json", replace_text('"lr": 0.001', '"lr": 0.5'), "bytes, {size} when it was saved"),
    "missing file": ("rng.safetensors", os.remove, "is missing"),
    "missing manifest": ("manifest.json", os.remove, "is missing, so the checkpoint cannot be verified"),
    "cut manifest": ("manifest.json", cut, "cannot be read"),
    "added file": ("notes.txt", add_file, "is not in the checkpoint's manifest"),
    "step of another folder": ("meta.json", forge_step, "records step 7, but its folder is step-00000002"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_kind_of_damage_is_one_line_naming_the_file(tmp_path, damage):
    name, harm, what = DAMAGE[damage]
    folder = save(tmp_path, 2)
    path = os.path.join(folder, name)
    size = os.path.getsize(path) if os.path.exists(path) else None
    harm(path)
    with pytest.raises(checkpoints.Damaged) as caught:
        checkpoints.load(folder)
    message = str(caught.value)
    assert message.startswith(path + " ") and what.format(size=size) in message and "\n" not in message, message


def test_newest_goes_back_to_the_newest_checkpoint_that_verifies_and_deletes_nothing(tmp_path):
    for step in (4, 8, 12):
        save(tmp_path, step)
    root = tmp_path / "checkpoints"
    flip(str(root / "step-00000012" / "trained.safetensors"))
    os.remove(root / "step-00000008" / "meta.json")
    before = {name: folder_bytes(root / name) for name in os.listdir(root)}
    said = []
    path, tensors, meta = checkpoints.newest(str(tmp_path), said.append)
    assert path == str(root / "step-00000004") and meta["step"] == 4
    assert torch.equal(tensors["trained"]["w"], tensors_of(4)["trained"]["w"])
    assert said == [
        f"checkpoint step-00000012 is damaged: {root / 'step-00000012' / 'trained.safetensors'} does not match its "
        f"sha256 in the manifest (changed since it was saved).",
        f"checkpoint step-00000008 is damaged: {root / 'step-00000008' / 'meta.json'} is missing.",
        f"resuming from {root / 'step-00000004'}, the newest checkpoint that verifies (nothing was deleted).",
    ]
    assert {name: folder_bytes(root / name) for name in os.listdir(root)} == before


def test_newest_without_a_checkpoint_that_verifies(tmp_path):
    said = []
    assert checkpoints.newest(str(tmp_path), said.append) is None and said == []  # a run with no checkpoint
    save(tmp_path, 4)
    cut(str(tmp_path / "checkpoints" / "step-00000004" / "rng.safetensors"))
    with pytest.raises(checkpoints.Damaged, match=r"^none of the 1 checkpoints in .* verifies \(each is named above; "
                                                  r"nothing was deleted\); start the run again in another out folder"):
        checkpoints.newest(str(tmp_path), said.append)
    assert len(said) == 1 and said[0].startswith("checkpoint step-00000004 is damaged: ")


def test_a_half_written_folder_never_counts_as_a_checkpoint(tmp_path, monkeypatch):
    """A save of step 8 stopped just before its rename: step-00000008.tmp holds every file and its manifest (it
    verifies), yet it is no checkpoint; step 4 is the newest."""
    save(tmp_path, 4)

    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoints.os, "rename", killed)
    with pytest.raises(RuntimeError, match="killed"):
        save(tmp_path, 8)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-00000004", "step-00000008.tmp"]
    assert os.path.isfile(root / "step-00000008.tmp" / checkpoints.MANIFEST)
    assert checkpoints.complete(str(tmp_path)) == [str(root / "step-00000004")]
    said = []
    assert checkpoints.newest(str(tmp_path), said.append)[0] == str(root / "step-00000004") and said == []


def test_a_save_over_a_damaged_checkpoint_sets_it_aside(tmp_path):
    save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    for n in (1, 2):
        flip(str(root / "step-00000004" / "trained.safetensors"))
        damaged = folder_bytes(root / "step-00000004")
        save(tmp_path, 4)
        aside = root / ("step-00000004.damaged" if n == 1 else "step-00000004.damaged-2")
        assert folder_bytes(aside) == damaged
        assert checkpoints.verify(str(root / "step-00000004"))["step"] == 4
    assert checkpoints.complete(str(tmp_path)) == [str(root / "step-00000004")]


@pytest.mark.parametrize("saved, current, named", [
    ({"lr": 0.001, "world_size": None}, {"lr": 0.001}, "world_size: checkpoint null, this run (absent)"),
    ({"lr": 0.001}, {"lr": 0.001, "world_size": 2}, "world_size: checkpoint (absent), this run 2"),
    ({"lr": 0.001, "seed": 0}, {"lr": 0.001}, "seed: checkpoint 0, this run (absent)"),
])
def test_a_key_that_one_side_lacks_is_another_run(saved, current, named):
    with pytest.raises(ValueError, match="it is from another run") as caught:
        checkpoints.check_same_run(saved, current, "CKPT")
    assert named in str(caught.value)
    checkpoints.check_same_run(dict(saved), dict(saved), "CKPT")  # the same keys and values: the same run


def test_the_finished_mark_verifies_like_a_checkpoint(tmp_path):
    assert checkpoints.finished(str(tmp_path)) is None
    checkpoints.mark_finished(str(tmp_path), 12, {"model": "tiny"})
    path, meta = checkpoints.finished(str(tmp_path))
    assert path == str(tmp_path / "checkpoints" / "finished") and meta["step"] == 12
    assert checkpoints.complete(str(tmp_path)) == []  # it is no checkpoint to resume from
    replace_text('"step": 12', '"step": 99')(os.path.join(path, "meta.json"))
    with pytest.raises(checkpoints.Damaged, match="meta.json does not match its sha256"):
        checkpoints.finished(str(tmp_path))
    shutil.rmtree(path)
    assert checkpoints.finished(str(tmp_path)) is None


def test_a_checkpoint_from_before_a_key_was_added_resumes_with_the_value_that_reproduces_it():
    older = {"lr": 0.001}  # written before packing existed: no packing
    checkpoints.check_same_run(older, {"lr": 0.001, "packing": False}, "CKPT")
    with pytest.raises(ValueError, match="packing: checkpoint false, this run true"):
        checkpoints.check_same_run(older, {"lr": 0.001, "packing": True}, "CKPT")


def test_the_loss_chunk_is_no_part_of_a_runs_identity():
    from laet_fast.train.config import RESUMABLE_CHANGES

    assert "loss_chunk" in RESUMABLE_CHANGES  # a checkpoint from before it existed resumes with the default
