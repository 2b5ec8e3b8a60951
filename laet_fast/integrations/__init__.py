"""Bridges from laet_fast's layer selections to other libraries: transformers' Trainer (LaetCallback), PEFT
(``peft_bridge.to_peft_config``) and FSDP2 (``fully_shard_selection``).

``LaetCallback`` and ``fully_shard_selection`` are imported lazily, so that importing this package imports
neither transformers nor torch.distributed.fsdp.
"""


def __getattr__(name: str):
    if name == "LaetCallback":
        from .callback import LaetCallback

        return LaetCallback
    if name == "fully_shard_selection":
        from .fsdp import fully_shard_selection

        return fully_shard_selection
    raise AttributeError(f"module 'laet_fast.integrations' has no attribute {name!r}")
