"""Bridges from laet_fast's layer selections to other libraries: transformers' Trainer (LaetCallback) and PEFT.

``LaetCallback`` is imported lazily, so that importing this package does not import transformers.
"""


def __getattr__(name: str):
    if name == "LaetCallback":
        from .callback import LaetCallback

        return LaetCallback
    raise AttributeError(f"module 'laet_fast.integrations' has no attribute {name!r}")
