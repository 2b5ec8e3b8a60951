"""The three row formats of instruction and chat data (``task="sft"``), told apart by their fields:
``messages``, ``prompt``/``completion`` and Alpaca's ``instruction``/``input``/``output``
(``laet_fast.train.sft`` tokenizes them)."""
from __future__ import annotations


def row_format(row) -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"alpaca"``; ValueError naming the fields otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"an sft example is a dict (messages, prompt/completion or instruction/output), got "
                         f"{type(row).__name__}.")
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise ValueError(f"an sft example needs 'messages', 'prompt' and 'completion', or 'instruction' and 'output'; "
                     f"this one has {', '.join(map(repr, row)) or 'no fields'}.")


def without_nulls(row: dict) -> dict:
    """The row without the None fields that a ``datasets`` table gives every row for the other rows' columns
    (a file mixing the formats, or a row lacking a field), so that each row's format is its own."""
    return {key: value for key, value in row.items() if value is not None}
