"""Supervised fine-tuning data (``task="sft"``): instruction and chat rows as token ids, the loss on the answers only.

Three row formats are accepted, told apart by their fields (``laet_fast.data.sft_rows.row_format``):

==================  ========================================================================================
``messages``        a chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
                    rendered with the tokenizer's chat template; every assistant turn is learned.
``prompt/completion``  ``{"prompt": str, "completion": str}``: the completion is learned. A prompt given as a
                    list of messages (and a completion as a string or one assistant message) is a chat.
``alpaca``          ``{"instruction": str, "input": str (may be empty or absent), "output": str}``: a user turn
                    (the instruction, then the input after a blank line) and the output as the answer;
                    through the chat template when the tokenizer has one, else Alpaca's own prompt.
==================  ========================================================================================

Labels are the token ids where the loss is taken and ``IGNORE`` (-100, what ``transformers`` losses skip)
everywhere else: the prompt, the template's own tokens around the turns, and padding. Every learned answer
ends with the end-of-sequence token: a plain completion gets ``tokenizer.eos_token`` appended; in a chat, the
template's end-of-turn token is learned with the turn (appended to the last answer when the template leaves it
out). An example cut by ``max_length`` before any learned token is dropped and counted, never trained on (its
loss would be 0/0).

With packing, examples are laid end to end in rows of ``max_length`` tokens (in stream order, a new row when
the next example does not fit) and ``position_ids`` restart at 0 for each example. Given position ids and no
attention mask, ``transformers`` (4.53 and later) keeps attention inside each example; :func:`check_packing`
verifies this on the model itself before training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import TextData
from ..data.sft_rows import row_format
from .batches import Batches

IGNORE = -100
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_part}### Response:\n")


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} dicts.")
    out = []
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"each message needs a role ({', '.join(ROLES)}) and a string content; got {turn!r}.")
        out.append({"role": turn["role"], "content": turn["content"]})
    if not any(turn["role"] == "assistant" for turn in out):
        raise ValueError("a chat example has no assistant turn, so nothing to learn; give at least one.")
    return out


def as_chat(row, fmt: str | None = None) -> list[dict] | None:
    """The row as a list of chat messages, or None for a plain-text prompt/completion (or alpaca) row. ``fmt`` is
    the row's ``row_format`` when the caller has it."""
    fmt = fmt or row_format(row)
    if fmt == "messages":
        return _check_messages(row["messages"])
    if fmt == "prompt_completion" and isinstance(row["prompt"], (list, tuple)):
        completion = row["completion"]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return _check_messages(list(row["prompt"]) + list(completion))
    return None


def _alpaca_user(row) -> str:
    extra = (row.get("input") or "").strip()
    return row["instruction"] + (f"\n\n{extra}" if extra else "")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as err:  # the template's own refusal (a system turn it lacks, turns out of order)
        raise ValueError(f"the tokenizer's chat template refused a chat: {err}; fold a system message into the first "
                         f"user turn, make the turns alternate, or give prompt/completion rows.") from None
    return _ids(tokenizer, text)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("task 'sft' ends every answer with the end-of-sequence token, and the tokenizer has none; "
                         "set tokenizer.eos_token.")
    return tokenizer.eos_token_id


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a chat rendered with the tokenizer's template; labels learn the assistant turns only.

    Each assistant turn's tokens are what rendering the chat up to and including that turn adds to rendering it
    up to the turn before with the generation prompt (``add_generation_prompt=True``): the answer and the
    template's end-of-turn tokens. This needs a template whose renderings extend one another token by token
    (ChatML, Llama 3 and most others); a template that does not is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat examples are rendered with the tokenizer's chat template, and this tokenizer has "
                         "none; set tokenizer.chat_template, or give prompt/completion rows.")
    ids = _chat_ids(tokenizer, messages)
    learned = [False] * len(ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = _chat_ids(tokenizer, messages[: i + 1])
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError("the tokenizer's chat template renders a chat differently once more turns follow, so "
                             "the assistant's tokens cannot be told apart; give prompt/completion rows instead.")
        learned[len(before): len(upto)] = [True] * (len(upto) - len(before))
    if not any(learned):
        raise ValueError("the tokenizer's chat template renders no tokens for this chat's assistant turns (empty "
                         "answers?), so there is nothing to learn; give each assistant turn some content.")
    eos = _eos_id(tokenizer)
    last = max(i for i, flag in enumerate(learned) if flag)
    if eos not in [ids[i] for i, flag in enumerate(learned) if flag]:
        ids.insert(last + 1, eos)  # the template ends turns without EOS: the last answer learns to stop
        learned.insert(last + 1, True)
    return ids, [t if flag else IGNORE for t, flag in zip(ids, learned)]


def tokenize_example(tokenizer, row) -> tuple[list[int], list[int]]:
    """(ids, labels) of one sft row (any of the three formats), before truncation."""
    fmt = row_format(row)
    chat = as_chat(row, fmt)
    if chat is None and fmt == "alpaca" and getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": _alpaca_user(row)}, {"role": "assistant", "content": row["output"]}]
    if chat is not None:
        return tokenize_chat(tokenizer, chat)
    if fmt == "alpaca":
        extra = (row.get("input") or "").strip()
        prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if extra
                                      else "", instruction=row["instruction"],
                                      input_part=f"### Input:\n{extra}\n\n" if extra else "")
        completion = row["output"]
    else:
        prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must both be strings (or the prompt a list of messages).")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # the model's BOS, where it has one
    answer = _ids(tokenizer, completion) + [_eos_id(tokenizer)]
    return prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer


@dataclass
class Tokenized:
    """The training units of an sft split: one example each, or several packed into one row.

    ``ids`` / ``labels`` / ``positions``: one int list per unit (positions restart at 0 for each packed example).
    ``dropped``: examples left out because ``max_length`` cut away all of their learned tokens; ``cut``:
    examples shortened by ``max_length`` that kept some.
    """

    ids: list[list[int]]
    labels: list[list[int]]
    positions: list[list[int]]
    dropped: int
    cut: int


def tokenize_rows(tokenizer, rows: Sequence[dict], max_length: int, packing: bool = False) -> Tokenized:
    """Tokenize, truncate to ``max_length``, drop examples with nothing left to learn, and pack if asked."""
    ids, labels, dropped, cut = [], [], 0, 0
    for row in rows:
        row_ids, row_labels = tokenize_example(tokenizer, row)
        longer = len(row_ids) > max_length
        # The loss at token t predicts labels[t] from the tokens before it, so token 0 is never learned.
        row_ids, row_labels = row_ids[:max_length], [IGNORE] + row_labels[1:max_length]
        if all(label == IGNORE for label in row_labels):
            dropped += 1
            continue
        cut += longer
        ids.append(row_ids)
        labels.append(row_labels)
    if not ids:
        raise ValueError(f"max_length={max_length} cuts away every answer ({dropped} examples); raise it (max_length).")
    examples = Tokenized(ids, labels, [list(range(len(row))) for row in ids], dropped, cut)
    return pack(examples, max_length) if packing else examples


def pack(examples: Tokenized, max_length: int) -> Tokenized:
    """Tokenized examples packed in order into rows of at most ``max_length`` tokens (positions kept per
    example)."""
    rows: list[list[list[int]]] = [[[], [], []]]
    for example in zip(examples.ids, examples.labels, examples.positions):
        if rows[-1][0] and len(rows[-1][0]) + len(example[0]) > max_length:
            rows.append([[], [], []])
        for column, values in zip(rows[-1], example):
            column.extend(values)
    return Tokenized([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], examples.dropped,
                     examples.cut)


class SFTBatches(Batches):
    """Batches of an sft split: {input_ids, attention_mask, labels: int64 [B, T]}, right-padded with the pad
    token (attention 0, label ``IGNORE``); with packing, also ``position_ids`` int64 [B, T] (restarting per
    example; the padding continues the last example's positions and is never attended to by a real token)."""

    def __init__(self, data: TextData, tokenizer, batch_size: int, max_length: int, seed: int = 0,
                 packing: bool = False, examples: Tokenized | None = None):
        super().__init__(data, tokenizer, batch_size, max_length, seed)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (often to its eos_token).")
        self.packing = packing
        # the examples tokenized one by one (given: shared with another view of the same split)
        self.examples = examples if examples is not None else tokenize_rows(tokenizer, data.texts, max_length)
        self.units = pack(self.examples, max_length) if packing else self.examples
        self.size = len(self.units.ids)

    def unpacked(self) -> "SFTBatches":
        """The same split example by example, sharing this one's tokens (scoring runs unpacked)."""
        if not self.packing:
            return self
        return SFTBatches(self.data, self.tokenizer, self.batch_size, self.max_length, self.seed,
                          examples=self.examples)

    def truncated(self) -> int:
        return self.units.cut

    def encode(self, indices: Sequence[int]) -> dict:
        units = self.units
        width = max(len(units.ids[i]) for i in indices)
        pad = self.tokenizer.pad_token_id
        batch = {"input_ids": torch.full((len(indices), width), pad, dtype=torch.long),
                 "attention_mask": torch.zeros((len(indices), width), dtype=torch.long),
                 "labels": torch.full((len(indices), width), IGNORE, dtype=torch.long)}
        if self.packing:
            batch["position_ids"] = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(units.ids[i])
            batch["input_ids"][row, :n] = torch.tensor(units.ids[i])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(units.labels[i])
            if self.packing:
                last = units.positions[i][-1]
                tail = list(range(last + 1, last + 1 + width - n))
                batch["position_ids"][row] = torch.tensor(units.positions[i] + tail)
        return batch


@torch.no_grad()
def check_packing(model) -> None:
    """Refuse packing when ``model`` lets packed examples attend to each other.

    Two short random sequences are run packed in one row (position ids restarting, no attention mask) and
    apart; their logits must agree, as they do when the attention keeps each example to itself.
    """
    from ..embed.extract import accepts_argument

    if not accepts_argument(model, "position_ids"):
        raise ValueError(f"this model ({type(model).__name__}) takes no position_ids, so packed examples cannot be "
                         f"kept apart; turn packing off (packing).")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen) for n in (5, 4))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        apart = [model(input_ids=x.to(device), use_cache=False).logits[0].float() for x in (first, second)]
        packed = model(input_ids=torch.cat([first, second], 1).to(device), use_cache=False,
                       position_ids=torch.tensor([list(range(5)) + list(range(4))], device=device)).logits[0].float()
    finally:
        model.train(was_training)
    apart = torch.cat(apart)
    # A leak moves the second example's logits by their own scale; low-precision matmuls of other shapes, by far less.
    if (packed - apart).abs().max() > 1e-2 * apart.abs().max() + 1e-3:
        raise ValueError(f"this model ({type(model).__name__}, attention {model.config._attn_implementation!r}) "
                         f"lets packed examples attend to each other; turn packing off (packing).")
