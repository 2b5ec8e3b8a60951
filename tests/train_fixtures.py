"""A tiny llama with a word-level tokenizer saved as a folder, and labelled random-word texts, for the train tests."""
import csv
import hashlib
import os
import random

import pytest
from merge_models import WORDS, random_texts, save_tokenizer
from tiny_models import tiny_model

CLASSES = ("low", "high")


def labelled_texts(count, seed):
    """Random texts of the tokenizer's words.

    The label says whether the first word is in the vocabulary's upper half.
    """
    texts = random_texts(count, seed)
    labels = [CLASSES[WORDS.index(t.split()[0]) >= len(WORDS) // 2] for t in texts]
    return texts, labels


def folder_digest(path):
    """sha256 of every file under ``path`` (relative name + bytes): equal digests, an unchanged folder."""
    digest = hashlib.sha256()
    for base, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = os.path.join(base, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def save_model(folder, layers=4, seed=0, **overrides):
    """A tiny llama (random weights; ``overrides`` change its config) and its tokenizer in ``folder``; returns the
    folder as a string."""
    tiny_model("llama", seed=seed, num_hidden_layers=layers, **overrides).save_pretrained(str(folder))
    save_tokenizer(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """The kernels have their own tests; the PyTorch path keeps the training loops quick."""
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 4-block llama saved once per test module."""
    return save_model(tmp_path_factory.mktemp("tiny"), layers=4)


def write_csv(path, texts, labels, text_column="text", label_column="label"):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([text_column, label_column])
        writer.writerows(zip(texts, labels))
    return str(path)


def shuffled(items, seed):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
