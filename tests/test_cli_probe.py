"""`laet-fast probe` and `laet-fast fuse` on tiny saved models and string-labelled files."""
import json

import pytest
import torch

from merge_models import WORDS, save_tokenizer
from tiny_models import tiny_model

from laet_fast import cli
from laet_fast.embed import FusionClassifier


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny matrices: one thread is faster than two on a shared CPU, where idle-spinning threads wait. The
    pooling kernel has its own tests; here the interpreter would only time Python, so the torch path runs."""
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folders = []
    for arch in ("llama", "bert"):
        folder = tmp_path_factory.mktemp(f"tiny_{arch}")
        save_tokenizer(folder)
        tiny_model(arch, head="base", seed=0).save_pretrained(str(folder))
        folders.append(str(folder))
    return folders


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random word strings; the label says whether the first word is among the first half of the vocabulary."""
    import random

    rng = random.Random(0)
    rows = ["text,sentiment"]
    for _ in range(60):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        rows.append(f"{' '.join(words)},{'up' if WORDS.index(words[0]) < 30 else 'down'}")
    path = tmp_path_factory.mktemp("data") / "labelled.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def common(model, data):
    return ["--model", model, "--data", data, "--label-column", "sentiment", "--epochs", "3", "--device", "cpu",
            "--batch-size", "16"]


def test_probe_prints_each_layer_and_laet_choice_and_saves_the_label_mapping(models, data, tmp_path, capsys):
    out_json, out_png = tmp_path / "scores.json", tmp_path / "scores.png"
    assert cli.main(["probe", *common(models[0], data), "--json", str(out_json), "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "probe_acc" in out and "layers.2" in out and "LAET keeps layers" in out
    assert "'down' -> 0" in out and "'up' -> 1" in out
    record = json.loads(out_json.read_text())
    assert record["metadata"]["label_ids"] == {"down": 0, "up": 1}
    assert record["metadata"]["laet_selection"]["strategy"] == "laet"
    assert len(record["metrics"]["probe_f1"]) == 3 and out_png.stat().st_size > 0


def test_probe_with_folds_reports_std(models, data, capsys):
    assert cli.main(["probe", *common(models[1], data), "--folds", "3", "--probe", "linear"]) == 0
    assert "probe_acc_std" in capsys.readouterr().out


def test_fuse_two_models_prints_fusion_next_to_single_layers(models, data, tmp_path, capsys):
    out_json, saved = tmp_path / "fuse.json", tmp_path / "fusion"
    argv = ["fuse", *common(models[0], data), "--model", models[1], "--layers", "0:2,1:1", "--json", str(out_json),
            "--save", str(saved)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "fusion (concat) of" in out and "best single layer" in out and "last layer 2" in out
    record = json.loads(out_json.read_text())
    assert record["layers"] == [[0, 2], [1, 1]] and record["label_ids"] == {"down": 0, "up": 1}
    assert FusionClassifier.load(str(saved)).classes_ == ["down", "up"]


@pytest.mark.parametrize("argv, message", [
    (["probe", "--data", "missing.csv"], "does not exist"),
    (["probe", "--label-column", "nope"], "no label column 'nope'"),
    (["probe", "--pooling", "max"], "invalid choice"),
    (["probe", "--probe", "svm"], "invalid choice"),
    (["probe", "--folds", "1"], "--folds must be at least 2"),
    (["probe", "--limit", "0"], "--limit must be at least 1"),
    (["fuse", "--layers", "0-3"], "MODEL:LAYER pairs"),
    (["fuse", "--layers", "0:9"], "out of range"),
    (["fuse", "--fusion", "sum"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(models, data, argv, message, capsys):
    command, *rest = argv
    full = [command, *common(models[0], data), *rest] if "--data" not in rest else [command, "--model", models[0],
                                                                                  *rest]
    assert cli.main(full) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress bars, then the error
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and message in errors[0]


@pytest.mark.parametrize("layers, message", [
    ("0:1,0:99", "--layers: layer 0:99 is out of range; model 0 has 3 blocks, numbered 0 to 2."),
    ("0:1,1:3", "--layers: layer 1:3 is out of range; model 1 has 2 blocks, numbered 0 to 1."),
    ("0:1,2:0", "--layers: model 2 is out of range; 2 --model given, numbered 0 to 1."),
])
def test_fuse_layers_a_model_lacks_are_refused_before_any_embedding(models, data, tmp_path, capsys, monkeypatch,
                                                                     layers, message):
    import laet_fast.embed
    import laet_fast.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or texts embedded before --layers was checked")

    monkeypatch.setattr(laet_fast.loading, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(laet_fast.embed, "layer_embeddings", refuse)
    shallow = tmp_path / "shallow"
    save_tokenizer(shallow)
    tiny_model("llama", head="base", seed=1, num_hidden_layers=2).save_pretrained(str(shallow))
    capsys.readouterr()
    assert cli.main(["fuse", *common(models[0], data), "--model", str(shallow), "--layers", layers]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"laet-fast fuse: error: {message}"]


def test_single_class_data_exits_2(models, tmp_path, capsys):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"{w} {w},same\n" for w in WORDS[:10]))
    assert cli.main(["probe", "--model", models[0], "--data", str(path)]) == 2
    assert "at least two classes" in capsys.readouterr().err


def test_parser_choices_are_the_librarys():
    from laet_fast.commands._embedding_options import FUSION_CHOICES, POOLING_CHOICES
    from laet_fast.embed import FUSIONS
    from laet_fast.kernels.pooling import POOLING_MODES

    assert POOLING_CHOICES == POOLING_MODES and FUSION_CHOICES == FUSIONS
