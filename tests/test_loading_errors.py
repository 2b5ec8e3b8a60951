"""What laet_fast.loading says about bad data files and bad model files: one line naming the problem."""
import json
import os
import shutil
import sys

import pytest

from laet_fast.loading import load_config, load_model_and_tokenizer, load_texts, load_tokenizer


@pytest.mark.parametrize("value,kind", [(3, "number"), (2.5, "number"), (["a", "b"], "array"),
                                        ({"a": 1}, "object"), (True, "boolean")])
def test_jsonl_text_that_is_not_a_string_names_the_line(tmp_path, value, kind):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(ValueError, match=rf"line 3: 'text' is a JSON {kind} .*not a string"):
        load_texts(str(path))


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_with_a_byte_order_mark(tmp_path, suffix):
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(f"text{sep}label\nfirst one{sep}1\nsecond{sep}0\n".encode("utf-8-sig"))
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert load_texts(str(path), labels=True) == (["first one", "second"], [1, 0])


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
