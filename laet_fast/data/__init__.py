"""Every input the toolkit reads, in one place.

- ``tables``: a local file (.csv/.tsv/.json/.jsonl/.parquet/.txt, compressed too), a ``datasets.Dataset`` or
  ``DatasetDict``, a hub dataset name, or the demo data, as a ``datasets`` table (``datasets.load_dataset``
  parses every file).
- ``examples``: a table's texts (and labels, or sft rows) as a ``TextData``, checked row by row.
- ``labels``: the one rule that turns label values into class ids.
- ``splits``: the one seeded stratified split (and k folds).

``probe``, ``fuse``, ``train``, ``predict``, ``score``, the ``Trainer`` and the embedding probes all read and split
through here, so one file gives the same classes and the same held-out examples under every command.
"""
from .examples import TextData, load_texts, read_examples, read_splits, split_examples, to_text_data
from .labels import encode_labels
from .splits import stratified_folds, stratified_split
from .tables import DEMO_LABEL_COLUMN, DEMO_TEXT_COLUMN, FORMATS, read_table

__all__ = [
    "DEMO_LABEL_COLUMN", "DEMO_TEXT_COLUMN", "FORMATS", "TextData", "encode_labels", "load_texts", "read_examples",
    "read_splits", "read_table", "split_examples", "stratified_folds", "stratified_split", "to_text_data",
]
