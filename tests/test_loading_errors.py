"""What laet_fast.data and laet_fast.loading say about bad data files and bad model files: one line naming the
problem."""
import json
import sys

import pytest

from laet_fast.data import load_texts, read_examples
from laet_fast.loading import load_config, load_model_and_tokenizer, load_tokenizer


@pytest.mark.parametrize("value,kind", [(3, "a number"), (2.5, "a number"), (["a", "b"], "a list"),
                                        ({"a": 1}, "an object"), (True, "a boolean")])
def test_jsonl_text_that_is_not_a_string_names_the_row(tmp_path, value, kind):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(ValueError) as info:
        load_texts(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    # datasets gives mixed JSON types to pandas, which keeps them (the row is named) or refuses the file
    assert f"row 2: 'text' is {kind} " in message and "not a string" in message or "not valid JSON Lines" in message


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_with_a_byte_order_mark(tmp_path, suffix):
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(f"text{sep}label\nfirst one{sep}1\nsecond{sep}0\n".encode("utf-8-sig"))
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    data = read_examples(str(path))
    assert (data.texts, data.labels, data.classes) == (["first one", "second"], [1, 0], ["0", "1"])


def _demo_gguf():
    from laet_fast.loading import demo_model_path

    try:
        return demo_model_path()
    except ValueError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("size", [0, 4096, 5 * 2**20])
def test_truncated_gguf_is_one_line_naming_the_file(tmp_path, size):
    source = _demo_gguf()
    cut = tmp_path / f"cut{size}.gguf"
    with open(source, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size))
    for load in (load_config, load_tokenizer, load_model_and_tokenizer):
        with pytest.raises(ValueError) as info:
            load(str(cut))
        message = str(info.value)
        assert str(cut) in message and "\n" not in message
        assert ("empty" if size == 0 else "truncated or corrupt") in message


def test_gguf_without_the_gguf_package_says_so(tmp_path, monkeypatch):
    """A missing `gguf` package is named as such, with the install line, never as a corrupt file."""
    source = _demo_gguf()
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if it were not installed
    for load in (load_config, load_tokenizer, load_model_and_tokenizer):
        with pytest.raises(ValueError) as info:
            load(source)
        message = str(info.value)
        assert "needs the `gguf` package, which is not installed" in message and "pip install" in message
        assert "corrupt" not in message and "\n" not in message


def test_folder_without_tokenizer_lists_the_files_looked_for(tmp_path):
    from tiny_models import tiny_model

    tiny_model("llama", seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has no tokenizer \(looked for tokenizer\.json, tokenizer_config\.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="export_model\\(model, folder, tokenizer=tokenizer\\)"):
        load_model_and_tokenizer(str(tmp_path), device="cpu")


# ---------------------------------------------------------------- every reader of labelled files
def _via_read_examples(path, **kwargs):
    from laet_fast.data import read_examples

    data = read_examples(path, "classify", **kwargs)
    return data.texts, [str(data.classes[i]) for i in data.labels]


def _via_read_labeled(path, encoding="utf-8"):
    """The probe / fuse commands' reader, with their options."""
    import argparse

    from laet_fast.commands import UsageError
    from laet_fast.commands._labeled_data import read_labeled

    args = argparse.Namespace(data=path, text_column="text", label_column="label", limit=None, encoding=encoding)
    try:
        texts, labels = read_labeled(args)
    except UsageError as err:  # the commands' error, raised here as the library's
        raise ValueError(str(err)) from None
    return texts, [str(y) for y in labels]


READERS = {"read_examples": _via_read_examples, "read_labeled": _via_read_labeled}


@pytest.mark.parametrize("reader", READERS)
def test_a_directory_is_named_a_directory(tmp_path, reader):
    with pytest.raises(ValueError) as info:
        READERS[reader](str(tmp_path))
    assert str(info.value) == (f"data file {tmp_path} is a directory; give a file in it (.csv, .tsv, .json, .jsonl, "
                               f".parquet, .txt, optionally compressed).")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".csv.gz"])
def test_a_line_that_is_not_utf8_is_named_and_encoding_reads_it(tmp_path, reader, suffix):
    import gzip

    rows = [("fine", "1"), ("caf\u00e9 au lait", "0"), ("na\u00efve", "1")]
    if suffix == ".jsonl":
        lines = [json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in rows]
    else:
        sep = "\t" if suffix == ".tsv" else ","
        lines = [f"text{sep}label"] + [f"{t}{sep}{y}" for t, y in rows]
    raw = ("\n".join(lines) + "\n").encode("cp1252")
    path = tmp_path / f"d{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    first_bad = 2 if suffix == ".jsonl" else 3  # the header is line 1
    with pytest.raises(ValueError) as info:
        READERS[reader](str(path))
    message = str(info.value)
    assert f"line {first_bad} holds b'\\xe9', which is not valid utf-8" in message and str(path) in message
    assert "--encoding" in message and "convert the file to UTF-8" in message and "\n" not in message
    assert READERS[reader](str(path), encoding="cp1252") == ([t for t, _ in rows], [y for _, y in rows])


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("sep", [",", "\t"])
def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path, reader, sep):
    """An unquoted comma (tab) in a text is refused, never read as a cut text and a new class."""
    path = tmp_path / ("d.csv" if sep == "," else "d.tsv")
    path.write_text(f"text{sep}label\ngood film{sep}1\nbad one{sep}0\na wonderful{sep} moving film{sep}1\n",
                    encoding="utf-8")
    with pytest.raises(ValueError) as info:
        READERS[reader](str(path))
    message = str(info.value)
    assert message.startswith(f"data file {path}: line 4 has 3 fields but the header has 2; a text holding a ")
    assert "must be in double quotes" in message
    # Quoted, the same text is one field.
    path.write_text(f"text{sep}label\ngood film{sep}1\nbad one{sep}0\n\"a wonderful{sep} moving film\"{sep}1\n",
                    encoding="utf-8")
    assert READERS[reader](str(path)) == (["good film", "bad one", f"a wonderful{sep} moving film"], ["1", "0", "1"])
