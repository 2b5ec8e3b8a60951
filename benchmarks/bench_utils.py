"""Shared helpers for the pytest-benchmark suites in benchmarks/.

Import them from a benchmark file with ``from bench_utils import bandwidth_gbps, write_result``
(pytest puts this folder on ``sys.path`` when it collects the suite).

Bandwidth convention: ``bandwidth_gbps`` is bytes actually moved (read + written) per second in
GB/s (1e9 bytes). ``copy_bandwidth_gbps`` measures ``dst.copy_(src)`` and counts both the read and
the write, so a kernel's GB/s divided by it is its fraction of what the memory system delivers.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_VERSIONED = ("torch", "triton", "transformers", "bitsandbytes")


def _version(distribution: str) -> str | None:
    # Package metadata, not an import: transformers and bitsandbytes take seconds to import.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info() -> dict:
    """Device name, library versions (None when absent) and the UTC date of the run."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    info = {"device": device, "cuda": torch.version.cuda}
    info.update({f"{name}_version": _version(name) for name in _VERSIONED})
    info["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


def bandwidth_gbps(bytes_moved: int | float, seconds: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes per second)."""
    return bytes_moved / seconds / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second) in GB/s.

    Copies a ``nbytes`` byte tensor ``repeats`` times after a warm-up and times it with CUDA events
    on a GPU (wall clock on a CPU). Use a tensor far larger than the last-level cache (the default
    1 GiB is).
    """
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - begin
    return bandwidth_gbps(2 * nbytes * repeats, seconds)


def read_result(name: str) -> dict | None:
    """The committed ``benchmarks/results/<name>.json`` as a dict; None when there is no such file."""
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_result(name: str, payload: dict) -> str:
    """Write ``benchmarks/results/<name>.json`` (``payload`` merged over ``device_info()``); returns the path.

    Written whole or not at all (``laet_fast.atomic``): a run cut mid-write leaves the previous file, never half
    of one that a resumed run or a merge would then read.
    """
    from laet_fast.atomic import write_text

    path = os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_text(path, json.dumps({**device_info(), **payload}, indent=2, sort_keys=True) + "\n")
