"""The trained model as a standard transformers folder, the heads beside it, and a predictor that votes.

``OUT/model/`` is what ``save_pretrained`` writes (frozen blocks as loaded, tokenizer included),
so ``AutoModelForCausalLM.from_pretrained(OUT/model)`` reloads it. For ``classify`` the heads are in
``laet_heads.safetensors`` and ``laet_task.json`` (task, classes, head blocks and shapes, pooling,
max length) in the same folder; ``load_trained`` rebuilds the predictor from both.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from .heads import POOLING, ProbeHead, TaskModel, vote

TASK_FILE = "laet_task.json"
HEADS_FILE = "laet_heads.safetensors"


def export_trained(task_model: TaskModel, path: str, tokenizer, classes: Sequence[str] | None, config) -> str:
    """Write ``task_model`` to the folder ``path``: ``export_model`` (hooks off, frozen blocks as loaded),
    then the heads and the task file.

    Everything is written into a temporary folder beside ``path``, renamed to ``path`` when complete: a
    kill midway leaves no ``path``, or the earlier complete one.
    """
    from safetensors.torch import save_file

    from .. import atomic
    from ..apply import export_model

    with atomic.folder(path) as staging:
        export_model(task_model, staging, tokenizer=tokenizer)
        heads = {f"{i}.{name}": t.detach().cpu().contiguous() for i in task_model.head_layers
                 for name, t in task_model.classifier[str(i)].state_dict().items()}
        if heads:
            save_file(heads, os.path.join(staging, HEADS_FILE))
        task = {
            "format": "laet_fast.trained", "version": 1, "task": config.task, "method": config.method,
            "classes": list(classes) if classes else None, "pooling": POOLING, "max_length": config.max_length,
            "heads": {str(i): task_model.classifier[str(i)].spec() for i in task_model.head_layers},
        }
        with open(os.path.join(staging, TASK_FILE), "w", encoding="utf-8") as handle:
            json.dump(task, handle, indent=1)
    return path


class Predictor:
    """A trained model with its heads: ``predict(texts)`` gives each text's class by the heads' vote.

    Attributes:
        model, tokenizer: the reloaded transformers model and tokenizer.
        classes: the label of each class id; head_layers: the blocks carrying a head.
    """

    def __init__(self, task_model: TaskModel, tokenizer, classes, max_length: int):
        self.task_model, self.tokenizer, self.classes, self.max_length = task_model, tokenizer, classes, max_length
        self.model = task_model.model

    @property
    def head_layers(self) -> list[int]:
        return self.task_model.head_layers

    @torch.no_grad()
    def logits(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """float32 [heads, N, C]: each head's logits for each text."""
        if self.task_model.task != "classify":
            raise ValueError(f"this model was trained with task {self.task_model.task!r}; it has no classification "
                             f"heads to predict with.")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            out.append(self.task_model(enc["input_ids"], enc["attention_mask"])[1])
        return torch.cat(out, dim=1)

    def predict(self, texts: Sequence[str], batch_size: int = 16) -> list[str]:
        """The class label of each text: the heads' majority vote, ties broken by mean probability."""
        return [self.classes[i] for i in vote(self.logits(texts, batch_size)).tolist()]


def load_trained(path: str, device=None) -> Predictor:
    """The predictor of a run's export folder (``OUT/model``), on ``device`` (default: cuda if available).

    Raises:
        ValueError: the folder is not a laet_fast export.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ..loading import load_tokenizer, resolve_device

    task_path = os.path.join(path, TASK_FILE)
    if not os.path.isfile(task_path):
        raise ValueError(f"{path} is not a laet_fast training export (no {TASK_FILE}); pass the model/ folder of a "
                         f"`laet-fast train` run.")
    with open(task_path, encoding="utf-8") as handle:
        task = json.load(handle)
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    heads = {int(i): ProbeHead.from_spec(spec) for i, spec in task["heads"].items()}
    task_model = TaskModel(model, task["task"], heads)
    if heads:
        task_model.classifier.load_state_dict(load_file(os.path.join(path, HEADS_FILE)))
    task_model.to(device).eval()
    return Predictor(task_model, load_tokenizer(path), task["classes"], task["max_length"])
