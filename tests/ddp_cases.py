"""What one rank of the multi-process tests runs, and the single-process references it is compared with.

The same functions run under ``torchrun`` (tests/ddp_worker.py, one rank's shard of every global
batch) and in the test process (world 1, the whole global batch), so the only difference between
the two runs is the process group.
"""
import torch
import torch.distributed as dist

from tiny_models import random_batch, tiny_model

WORLD = 2
ROWS = 4  # global batch; each of the WORLD ranks gets ROWS // WORLD rows
SCORE_BATCHES = 2
TRAIN_STEPS = 5
RESELECT_EVERY = 2


def score_batches():
    """Global batches for scoring: padded, one right- and one left-padded, odd length."""
    gen = torch.Generator().manual_seed(7)
    batches = []
    for index in range(SCORE_BATCHES):
        ids, mask = random_batch(211, batch=ROWS, seq=11, generator=gen, side=("right", "left")[index % 2])
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    return batches


def train_batches():
    """Global batches for training: no padding, so the mean of the ranks' token-mean losses is the global one."""
    gen = torch.Generator().manual_seed(8)
    batches = []
    for _ in range(TRAIN_STEPS):
        ids = torch.randint(1, 211, (ROWS, 9), generator=gen)
        batches.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone()))
    return batches


def shard(batch, rank, world):
    rows = ROWS // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}



def mean_over_ranks(loss, world):
    """The step's loss averaged over the ``world`` ranks (each rank's loss is its shard's mean), as a float."""
    loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return loss.item()

def scored_model():
    from laet_fast.apply import apply_selection

    model = tiny_model("llama", seed=0).train()
    apply_selection(model, [2], quantize_frozen="nf4", dtype=torch.float32)
    return model


def run_scores(rank=0, world=1, micro_batches=None):
    """Probe scores (hidden statistics and gradient norms) over this rank's shards of the score batches.

    ``micro_batches`` (single process only): run every rank's shard as its own backward pass, the
    reference for the gradient norms of ``world`` ranks.
    """
    from laet_fast import LayerProbe

    model = scored_model()
    with LayerProbe(model, grad_norms=True) as probe:
        for batch in score_batches():
            parts = [shard(batch, r, micro_batches) for r in range(micro_batches)] if micro_batches else \
                [shard(batch, rank, world)]
            for part in parts:
                model(**part).loss.backward()
                model.zero_grad(set_to_none=True)
        return probe.scores()


def hidden_scores_on_global_batch():
    """The probe's forward statistics with every global batch in one forward pass (no gradients)."""
    from laet_fast import LayerProbe

    model = scored_model()
    with LayerProbe(model) as probe, torch.no_grad():
        for batch in score_batches():
            model(**batch)
    return probe.scores()


def run_training(rank=0, world=1):
    """DDP (world > 1) training of block 1 with blocks 0 and 2 frozen in NF4 (0 below the backward cut),
    re-selected every RESELECT_EVERY steps by block influence (all-reduced), without
    ``find_unused_parameters``. Returns per-step global losses, the selections, and checks."""
    from laet_fast import LayerProbe, Reselector
    from laet_fast.apply import apply_selection, build_optimizer
    from laet_fast.distributed import rebuild_ddp
    from laet_fast.layers import find_layers

    model = tiny_model("llama", seed=1).train()
    apply_selection(model, [1], quantize_frozen="nf4", dtype=torch.float32)
    stack = find_layers(model)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = build_optimizer(model, lr=1e-2)
    losses, bucket_bytes, trainable_bytes, selections = [], [], [], []
    left_weights = None
    with LayerProbe(model) as probe:
        reselector = Reselector(model, probe, every=RESELECT_EVERY, strategy="bottom", k=1, metric="block_influence",
                                optimizer=optimizer, apply_kwargs={"quantize_frozen": "nf4"})
        for step, batch in enumerate(train_batches()):
            loss = wrapped(**shard(batch, rank, world)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(mean_over_ranks(loss, world))
            before = reselector.selection.layers
            new = reselector.step()
            if new is not None and new.layers != before:
                left_weights = [p.detach().clone() for b in before for p in stack[b].parameters()]
                left_blocks = before
                if world > 1:
                    rebuild_ddp(wrapped)
            selections.append(list(reselector.selection.layers))
            if world > 1:
                bucket_bytes.append(wrapped._get_ddp_logging_data()["total_parameter_size_bytes"])
                trainable_bytes.append(sum(p.nbytes for p in model.parameters() if p.requires_grad))
    kept = None
    if left_weights is not None:
        now = [p for b in left_blocks for p in stack[b].parameters()]
        kept = all(torch.equal(a, b) for a, b in zip(left_weights, now))
    trainable = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    return dict(losses=losses, selections=selections, bucket_bytes=bucket_bytes, trainable_bytes=trainable_bytes,
                left_kept_weights=kept, trainable_sum=float(trainable.double().sum()),
                trainable_abs_sum=float(trainable.double().abs().sum()))
