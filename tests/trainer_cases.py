"""Tiny transformers.Trainer runs with LaetCallback, shared by tests/test_callback.py and the torchrun worker."""
import torch

from tiny_models import tiny_model

SEQ = 10


class TokenRows(torch.utils.data.Dataset):
    """Random token rows, right-padded to SEQ (a different length per row), with causal-LM labels."""

    def __init__(self, rows=16, seed=0, pad=True):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 211, (rows, SEQ), generator=gen)
        self.mask = torch.ones(rows, SEQ, dtype=torch.long)
        if pad:
            for row in range(rows):
                self.mask[row, SEQ - row % 4:] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids, mask = self.ids[i], self.mask[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class ClassRows(TokenRows):
    """The same token rows, each with one class label (0, 1 or 2, from its first token): a classification dataset."""

    def __getitem__(self, i):
        ids, mask = self.ids[i], self.mask[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids[0] % 3}


def training_args(out_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                  train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_trainer_ddp(rank, world, out_dir):
    """The same LaetCallback run on ``world`` ranks (2 rows each) as one process with 2 * world rows."""
    from transformers import Trainer

    from laet_fast.integrations import LaetCallback

    model = tiny_model("llama", seed=3).train()
    callback = LaetCallback(method="grad_norm", k=1, quantize_frozen="nf4", score_batches=2)
    trainer = Trainer(model=model, args=training_args(out_dir, per_device_train_batch_size=2 * 2 // world,
                                                      ddp_find_unused_parameters=False),
                      train_dataset=TokenRows(pad=False), callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    wrapped = trainer.model_wrapped
    bucket = trainer_bytes = None
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        bucket = wrapped._get_ddp_logging_data()["total_parameter_size_bytes"]
        trainer_bytes = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    return dict(losses=losses, selection=list(callback.selection.layers), bucket_bytes=bucket,
                trainable_bytes=trainer_bytes, scores=dict(callback.scores))


def run_trainer_laet_ddp(rank, world, out_dir):
    """LaetCallback(method='laet') on a classification model: ``world`` ranks with 4 // world rows per batch,
    or one process with 4; returns the selection and the probe scores."""
    from transformers import Trainer

    from laet_fast.integrations import LaetCallback

    model = tiny_model("llama", head="seqcls", seed=6, num_hidden_layers=4).train()
    callback = LaetCallback(method="laet", score_batches=4)
    trainer = Trainer(model=model, args=training_args(out_dir, max_steps=1, per_device_train_batch_size=4 // world,
                                                      ddp_find_unused_parameters=False),
                      train_dataset=ClassRows(rows=32, seed=3, pad=False), callbacks=[callback])
    trainer.train()
    return dict(selection=list(callback.selection.layers), scores=dict(callback.scores))
