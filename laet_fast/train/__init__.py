"""Training on the selected layers: methods, the thin Trainer, checkpoints, export and the report.

Names are imported lazily so that ``import laet_fast.train`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "METHODS": "laet_fast.methods",
    "RESELECTABLE": "laet_fast.methods",
    "score_layers": "laet_fast.methods",
    "choose_layers": "laet_fast.methods",
    "TrainConfig": "laet_fast.train.config",
    "Trainer": "laet_fast.train.trainer",
    "load_trained": "laet_fast.train.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'laet_fast.train' has no attribute {name!r}")
