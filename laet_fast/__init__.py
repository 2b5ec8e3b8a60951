"""laet_fast: fused kernels and tools for layer-selective fine-tuning on one consumer GPU.

Public names are imported lazily so that ``import laet_fast`` stays cheap (no transformers import).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys

__version__ = "0.1.0"


def _mount_source_kernels() -> None:
    """Make ``laet_fast.kernels`` importable from a source checkout or an editable install.

    The top-level ``kernels/`` folder (the Triton kernels, each beside its PyTorch reference) has no
    ``__init__.py`` on purpose: from the repository root it is then only a namespace portion, and
    Python's import system lets a regular package anywhere on ``sys.path`` win over it, so
    ``import kernels`` still gives Hugging Face's hub-kernel package that transformers needs. A wheel
    installs the folder as ``laet_fast/kernels/``; elsewhere it is registered here under that name.
    """
    name = f"{__name__}.kernels"
    if name in sys.modules:
        return
    folder = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "kernels"))
    if importlib.util.find_spec(name) is not None or not os.path.isdir(folder):
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    globals()["kernels"] = module


_mount_source_kernels()

# bitsandbytes 0.50, imported on a CPU with AVX512-BF16, logs a warning that it could not load an
# optional kernel from the `kernels` hub package (not a dependency; its own CPU code runs instead).
# Users read it as an error. Only that message of that logger is dropped; its other warnings pass.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNELS_NOTICE)


if _not_the_kernels_notice not in logging.getLogger(_BNB_CPU_LOGGER).filters:
    logging.getLogger(_BNB_CPU_LOGGER).addFilter(_not_the_kernels_notice)

_EXPORTS = {
    "find_layers": "laet_fast.layers",
    "LayerStack": "laet_fast.layers",
    "LayerProbe": "laet_fast.probe",
    "LayerScores": "laet_fast.scores",
    "Selection": "laet_fast.selection",
    "select_layers": "laet_fast.selection",
    "Reselector": "laet_fast.reselect",
    "GradNormRecorder": "laet_fast.grad_norms",
    "apply_selection": "laet_fast.apply",
    "export_model": "laet_fast.apply",
    "build_optimizer": "laet_fast.apply",
    "suspend_backward_cut": "laet_fast.apply",
    "plan_memory": "laet_fast.memory",
    "max_layers_for_budget": "laet_fast.memory",
    "plan_step_time": "laet_fast.cost",
    "fit_calibration": "laet_fast.cost",
    "StepTimeCalibration": "laet_fast.cost",
    "CostModel": "laet_fast.cost",
    "cost_aware_selection": "laet_fast.cost",
    "layer_impact": "laet_fast.merge",
    "restore": "laet_fast.merge",
    "slerp": "laet_fast.kernels.slerp",
    "layer_embeddings": "laet_fast.embed",
    "probe_layers": "laet_fast.embed",
    "BatchedProbe": "laet_fast.embed",
    "FusionClassifier": "laet_fast.embed",
    "encode_labels": "laet_fast.data",
    "read_examples": "laet_fast.data",
    "LaetCallback": "laet_fast.integrations.callback",
    "to_peft_config": "laet_fast.integrations.peft_bridge",
    "Trainer": "laet_fast.train",
    "TrainConfig": "laet_fast.train",
    "load_trained": "laet_fast.train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'laet_fast' has no attribute {name!r}")
