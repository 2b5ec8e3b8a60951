"""Triton kernels of laet_fast, each beside its plain PyTorch reference.

Installed as ``laet_fast.kernels``. This file imports nothing on purpose: from a source
checkout the folder is also reachable as a top-level ``kernels`` package, which
transformers and bitsandbytes probe for at import time, and that probe must stay cheap.
"""
