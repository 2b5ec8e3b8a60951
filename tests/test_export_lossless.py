"""After ``--quantize-frozen nf4`` the export holds the frozen blocks as loaded, bit for bit (issue 28, section 2).

The source is a tiny llama saved with save_pretrained (float32 and bfloat16); the export is compared
with it tensor by tensor. Where the source cannot be read again, one warning and laet_export.json say so.
"""
import json
import os
import re
import warnings

import pytest
import torch

from merge_models import save_tokenizer
from tiny_models import tiny_model
from train_fixtures import labelled_texts, torch_kernels, write_csv  # noqa: F401 (fixture)
from trainer_cases import TokenRows, training_args
from laet_fast import apply_selection, export_model
from laet_fast.cli import main
from laet_fast.merge.checkpoint import Checkpoint

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

STACK = "model.layers."


def save_source(folder, dtype):
    tiny_model("llama", seed=0, num_hidden_layers=4, dtype=dtype).save_pretrained(str(folder))
    save_tokenizer(folder)
    return str(folder)


def block_of(name):
    return int(name[len(STACK):].split(".", 1)[0]) if name.startswith(STACK) else None


def assert_frozen_as_loaded(source, export, trained_blocks):
    """Every tensor of the export outside the trained blocks is the source's, as loaded in float32: bit for bit."""
    stored, exported = Checkpoint(source), Checkpoint(export)
    assert set(exported.tensors) == set(stored.tensors)
    frozen_linears = 0
    for name in stored.tensors:
        block = block_of(name)
        want, got = stored.read(name), exported.read(name)
        if block in trained_blocks:
            continue
        assert got.dtype == torch.float32, name  # the training dtype on the CPU, which the model was loaded in
        assert torch.equal(got, want.to(torch.float32)), name  # an exact widening for a bfloat16 source
        assert torch.equal(got.to(want.dtype), want), name
        frozen_linears += block is not None and name.endswith("proj.weight")
    assert frozen_linears == 7 * (4 - len(trained_blocks))  # every quantized layer was compared
    for name in stored.tensors:  # the trained blocks carry what training changed
        if block_of(name) in trained_blocks and name.endswith("proj.weight"):
            assert not torch.equal(exported.read(name), stored.read(name).float()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_train_with_nf4_frozen_blocks_exports_them_as_loaded(tmp_path, dtype):
    source = save_source(tmp_path / "source", dtype)
    texts, labels = labelled_texts(40, 3)
    data = write_csv(tmp_path / "data.csv", texts, labels)
    out = tmp_path / "run"
    assert main(["train", "--model", source, "--data", data, "--method", "last", "--k", "1", "--quantize-frozen",
                 "nf4", "--max-steps", "3", "--batch-size", "4", "--max-length", "16", "--lr", "1e-2",
                 "--score-batches", "1", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantize_frozen"] == "nf4" and report["selection"] == [3]
    assert_frozen_as_loaded(source, str(out / "model"), {3})
    recorded = json.loads((out / "model" / "laet_export.json").read_text())["frozen_blocks"]
    assert recorded["weights"] == "as loaded" and recorded["restored_layers"] == 21
    assert recorded["source"] == source


def test_callback_then_export_model_exports_the_frozen_blocks_as_loaded(tmp_path):
    from laet_fast.integrations import LaetCallback
    from laet_fast.loading import load_tokenizer

    source = save_source(tmp_path / "source", torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).train()
    callback = LaetCallback(method="last", k=1, quantize_frozen="nf4", score_batches=1)
    transformers.Trainer(model=model, args=training_args(tmp_path / "trainer", max_steps=2),
                         train_dataset=TokenRows(), callbacks=[callback]).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(model, str(tmp_path / "export"), tokenizer=load_tokenizer(source))
    assert not [w for w in caught if "nf4-rounded" in str(w.message)]  # the source was read again
    assert_frozen_as_loaded(source, str(tmp_path / "export"), {3})


def test_an_in_memory_model_warns_once_and_records_the_rounded_blocks(tmp_path):
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    apply_selection(model, [3], quantize_frozen="nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(model, str(tmp_path / "export"))
    rounded = [str(w.message) for w in caught if "nf4-rounded" in str(w.message)]
    assert len(rounded) == 1, rounded
    assert "21 linear layers" in rounded[0] and "in-memory model" in rounded[0] and "source=" in rounded[0]
    recorded = json.loads((tmp_path / "export" / "laet_export.json").read_text())["frozen_blocks"]
    assert recorded["weights"] == "dequantized" and recorded["source"] is None
    assert len(recorded["dequantized_layers"]) == 21 and "in-memory model" in recorded["reason"]


def other_values(source):  # another model: the same names and shapes, other values
    tiny_model("llama", seed=1, num_hidden_layers=4).save_pretrained(source)


def one_tensor_cut(source):  # one weight of another shape
    from safetensors.torch import load_file, save_file

    path = os.path.join(source, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:36].clone()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change,why,dequantized", [
    (other_values, r"the weight in .* differs from the one loaded", 21),
    (one_tensor_cut, r".*source holds no tensor model\.layers\.0\.self_attn\.q_proj\.weight of shape \[72, 72\]", 1),
], ids=["values", "shape"])
def test_a_source_changed_since_loading_is_not_taken_for_the_weights_as_loaded(tmp_path, change, why, dequantized):
    source = save_source(tmp_path / "source", torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    apply_selection(model, [3], quantize_frozen="nf4")
    change(source)
    with pytest.warns(UserWarning, match=f"{dequantized} linear layers of the frozen blocks hold nf4-rounded weights, "
                                         f"not the weights as loaded: {why}"):
        export_model(model, str(tmp_path / "export"))
    recorded = json.loads((tmp_path / "export" / "laet_export.json").read_text())["frozen_blocks"]
    assert recorded["weights"] == "dequantized" and len(recorded["dequantized_layers"]) == dequantized
    assert recorded["restored_layers"] == 21 - dequantized
    stored, exported = Checkpoint(source), Checkpoint(str(tmp_path / "export"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert exported.read(name).shape == (72, 72) and not torch.equal(exported.read(name)[:36], stored.read(name))


def test_a_source_cut_since_loading_leaves_the_export_dequantized_and_says_why(tmp_path):
    """Training is never lost to a source that cannot be read any more: the export is written, dequantized."""
    source = save_source(tmp_path / "source", torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    apply_selection(model, [3], quantize_frozen="nf4")
    path = os.path.join(source, "model.safetensors")
    with open(path, "rb") as handle:  # a new, cut file in its place (the loaded model may still map the old one)
        half = handle.read(os.path.getsize(path) // 2)
    with open(path + ".cut", "wb") as handle:
        handle.write(half)
    os.replace(path + ".cut", path)
    with pytest.warns(UserWarning, match=r"\d+ linear layers of the frozen blocks hold nf4-rounded weights, not the "
                                         r"weights as loaded: its source .* cannot be read \(ValueError: .*truncated"):
        export_model(model, str(tmp_path / "export"))
    recorded = json.loads((tmp_path / "export" / "laet_export.json").read_text())["frozen_blocks"]
    # The layers read before the cut are as loaded; the one it cuts and every later one stay dequantized.
    assert recorded["weights"] == "dequantized" and len(recorded["dequantized_layers"]) >= 1
    assert recorded["restored_layers"] + len(recorded["dequantized_layers"]) == 21


def test_a_base_model_source_is_read_through_its_prefix(tmp_path):
    """A model with a head loaded from a base model's folder: the source names lack the ``model.`` prefix."""
    source = str(tmp_path / "source")
    tiny_model("llama", head="base", seed=0, num_hidden_layers=4).save_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    apply_selection(model, [3], quantize_frozen="nf4")
    export_model(model)
    stored = Checkpoint(source)
    for i in range(3):
        name = f"layers.{i}.mlp.down_proj.weight"
        assert torch.equal(model.model.layers[i].mlp.down_proj.weight, stored.read(name)), name


def test_export_into_an_existing_file_raises_naming_it(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    with pytest.raises(ValueError, match=re.escape(f"export_model: {target} is an existing file; give a folder path")):
        export_model(model, str(target))
    assert target.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_export_into_a_folder_that_is_not_an_earlier_export_raises(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    with pytest.raises(ValueError, match=f"{re.escape(str(target))} holds files but no laet_export.json"):
        export_model(model, str(target))
    assert os.listdir(target) == ["notes.txt"]
    with pytest.warns(UserWarning, match="no tokenizer given"):
        export_model(model, str(tmp_path / "export"))
        export_model(model, str(tmp_path / "export"))  # an earlier export is replaced
    assert sorted(os.listdir(tmp_path)) == ["export", "mine"]


def test_the_source_of_a_gguf_folder_is_its_one_gguf_file(tmp_path):
    """transformers records a GGUF model's folder, not its file: the folder's one .gguf file is the source."""
    from laet_fast.frozen_source import find_source

    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    model.name_or_path = str(tmp_path)
    assert find_source(model) == (str(tmp_path / "model.Q4_1.gguf"), "")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    assert find_source(model) == (None, f"its source folder {tmp_path} holds 2 .gguf files")
    assert find_source(model, str(tmp_path / "other.gguf")) == (str(tmp_path / "other.gguf"), "")
    model.name_or_path = ""
    assert find_source(model) == (None, "the model was not loaded from a path (an in-memory model)")
