"""LaetCallback in real transformers Trainers: only the chosen blocks train, the optimizer holds only
them, evaluation runs in between, NF4 frozen blocks, re-selection (none after the last step, no log line
lost, the methods laet_fast.Trainer re-selects), gradient norms of the loss the Trainer trains on, TRL's
SFTTrainer."""
import copy
import math

import pytest
import torch

from laet_fast.integrations import LaetCallback
from laet_fast.layers import find_layers
from tiny_models import tiny_model
from train_fixtures import labelled_texts, model_dir  # noqa: F401 (fixture)
from trainer_cases import SEQ, ClassRows, TokenRows, snapshot, training_args

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")


class Snapshots(transformers.TrainerCallback):
    """The parameters after every optimizer step (after LaetCallback's re-selection at that step)."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = snapshot(model)


class Reported(transformers.TrainerCallback):
    """What a ``report_to`` backend receives: the logs of every ``on_log``."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


PROMPT = 4


class PromptRows(TokenRows):
    """Token rows whose first PROMPT tokens are a prompt: labels -100 there, as under a completion-only loss."""

    def __getitem__(self, i):
        row = super().__getitem__(i)
        row["labels"][:PROMPT] = -100
        return row


def reference_grad_norms(model, batches):
    """Per block, the mean over ``batches`` of the L2 norm of the gradient of the model's own loss on the batch
    as given, by plain autograd on a copy with every parameter trainable (sums in float64)."""
    model = copy.deepcopy(model).requires_grad_(True)
    per_batch = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        per_batch.append([math.sqrt(sum(p.grad.double().square().sum().item() for p in block.parameters()))
                          for block in find_layers(model)])
    return [sum(norms) / len(norms) for norms in zip(*per_batch)]


def collate(data, rows):
    return transformers.default_data_collator([data[i] for i in rows])


def block_of(name, path):
    prefix = path + "."
    return int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else None


def optimizer_state_numel(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() for state in inner.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_only_the_selected_blocks_train_with_evaluation_between(tmp_path, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    model = tiny_model("llama", seed=0).train()
    path = find_layers(model).path
    before = snapshot(model)
    callback = LaetCallback(method="block_influence", k=1, quantize_frozen=quantize, score_batches=3)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, eval_strategy="steps", eval_steps=2),
                                   train_dataset=TokenRows(), eval_dataset=TokenRows(rows=4, seed=1),
                                   callbacks=[callback])
    trainer.train()
    (chosen,) = callback.selection.layers
    assert callback.scores is not None and len(callback.scores["block_influence"]) == 3
    assert chosen == max(range(3), key=lambda i: callback.scores["block_influence"][i])
    after = dict(model.named_parameters())
    for name, old in before.items():
        block = block_of(name, path)
        if block == chosen:
            assert not torch.equal(after[name], old), name
        elif block is None:  # embeddings, final norm, LM head
            assert torch.equal(after[name], old), name
    for i, block in enumerate(find_layers(model)):
        if i != chosen:
            assert not any(p.requires_grad for p in block.parameters())
            if quantize:
                from laet_fast.quantize import quant_modes

                assert quant_modes(block) == {"nf4"}
    if not quantize:
        for name, old in before.items():
            if block_of(name, path) not in (None, chosen):
                assert torch.equal(after[name], old), name
    # The optimizer holds state for the trainable parameters only: Adam's two moments each.
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert optimizer_state_numel(trainer.optimizer) == 2 * sum(p.numel() for p in trainable)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    history = trainer.state.log_history
    assert sum("eval_loss" in h for h in history) == 2  # evaluation ran (eval mode, no_grad) between steps
    assert sum("loss" in h for h in history) == 4
    logged = next(h for h in history if "laet/num_selected" in h)
    assert logged[f"laet/selected/layer_{chosen}"] == 1.0 and logged["laet/num_selected"] == 1.0
    assert logged["laet/block_influence/layer_0"] == pytest.approx(callback.scores["block_influence"][0])


def test_method_all_trains_every_block_and_nothing_else(tmp_path):
    """``"all"`` (the accuracy table's full fine-tuning; LaetCallback's default while the table picks it,
    tests/test_defaults_from_table.py): every block trains, the embeddings, final norm and LM head stay frozen,
    and the optimizer holds every block and nothing else."""
    model = tiny_model("llama", seed=0).train()
    path = find_layers(model).path
    before = snapshot(model)
    callback = LaetCallback(method="all")
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenRows(),
                                   callbacks=[callback])
    trainer.train()
    assert callback.selection.layers == tuple(range(len(find_layers(model))))
    after = dict(model.named_parameters())
    for name, old in before.items():
        assert torch.equal(after[name], old) == (block_of(name, path) is None), name
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}


def test_reselection_joins_and_leaves(tmp_path):
    model = tiny_model("llama", seed=1).train()
    path = find_layers(model).path
    callback = LaetCallback(method="random", k=1, reselect_every=2, score_batches=1)
    snaps = Snapshots()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=6),
                                   train_dataset=TokenRows(), callbacks=[callback, snaps])
    trainer.train()
    # seed 0 draws block 1, the re-draws at steps 2 and 4 (seeds 1, 2) block 0; none after the last step, 6.
    assert [(step, sel.layers) for step, sel in callback.history] == [(0, (1,)), (2, (0,)), (4, (0,))]

    def block(step, index):
        return {n: v for n, v in snaps.steps[step].items() if block_of(n, path) == index}

    for step in (3, 4, 5, 6):  # block 1 left at step 2: its weights stay what training left
        assert all(torch.equal(v, block(2, 1)[n]) for n, v in block(step, 1).items())
    assert all(not torch.equal(v, block(1, 1)[n]) for n, v in block(2, 1).items())
    # Block 0 joined at step 2: unchanged until then, updated from step 3 on.
    assert all(torch.equal(v, block(1, 0)[n]) for n, v in block(2, 0).items())
    assert all(not torch.equal(v, block(2, 0)[n]) for n, v in block(3, 0).items())
    inner = trainer.optimizer.optimizer
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in inner.state} == trainable
    assert all(inner.state[p]["step"].item() == 4 for p in model.parameters() if p.requires_grad)
    assert sum("laet/num_selected" in h for h in trainer.state.log_history) == 3


def test_scored_reselection_by_gradient_norms(tmp_path):
    model = tiny_model("llama", seed=2).train()
    callback = LaetCallback(method="grad_norm", k=1, reselect_every=2, score_batches=2)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=4),
                                   train_dataset=TokenRows(), callbacks=[callback])
    trainer.train()
    assert [step for step, _ in callback.history] == [0, 2]  # none after the last step, 4
    for _, selection in callback.history[1:]:  # every block scored fresh, frozen ones included
        assert selection.metric == "grad_norm" and all(v > 0 for v in selection.scores)
    trained = tuple(i for i, b in enumerate(find_layers(model)) if all(p.requires_grad for p in b.parameters()))
    assert trained == callback.selection.layers


@pytest.mark.parametrize("head, rows", [("seqcls", ClassRows), ("causal", PromptRows)])
def test_grad_norm_scores_the_loss_the_trainer_trains_on(tmp_path, head, rows):
    # A classification model's own loss on its one label per row; a completion-only loss's labels (-100 on the
    # prompt), never every token.
    model = tiny_model("llama", head=head, seed=7).train()
    reference = copy.deepcopy(model)
    data = rows(rows=8, seed=5)
    callback = LaetCallback(method="grad_norm", k=1, score_batches=2)
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    batches = [collate(data, range(0, 4)), collate(data, range(4, 8))]  # the sequential sampler's first two
    want = reference_grad_norms(reference, batches)
    assert callback.scores["grad_norm"] == pytest.approx(want, rel=1e-4)
    if head == "causal":  # the prompt's tokens would change the scores
        every_token = reference_grad_norms(reference, [collate(TokenRows(rows=8, seed=5), b) for b in
                                                       (range(0, 4), range(4, 8))])
        assert every_token != pytest.approx(want, rel=1e-2)


def test_reselection_loses_no_log_line_and_skips_the_last_step(tmp_path):
    model = tiny_model("llama", seed=2).train()
    callback = LaetCallback(method="grad_norm", k=1, reselect_every=2, score_batches=1)
    reported = Reported()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=6, logging_steps=1),
                                   train_dataset=TokenRows(), callbacks=[reported, callback])
    trainer.train()
    history = trainer.state.log_history
    # Every step's own loss line, in the history and in what a report_to backend receives.
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert sum("loss" in logs for logs in reported.logs) == 6
    # The callback's lines too: the first selection and the re-selections at steps 2 and 4, none after step 6,
    # which no step follows.
    assert [step for step, _ in callback.history] == [0, 2, 4]
    assert [h["step"] for h in history if "laet/num_selected" in h] == [0, 2, 4]
    assert sum("laet/num_selected" in logs for logs in reported.logs) == 3


def test_trainer_and_callback_reselect_by_one_definition(model_dir, tmp_path):
    import json

    from laet_fast import select_layers
    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.train import METHODS, RESELECTABLE, TrainConfig, Trainer

    def run(method):
        model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")
        cfg = TrainConfig(method=method, k=1, max_steps=5, batch_size=4, reselect_every=2, out=str(tmp_path / method),
                          progress=False, seed=3)
        return Trainer(model, tokenizer, cfg, labelled_texts(24, 0)).fit(), cfg

    assert set(RESELECTABLE) < set(METHODS)
    for method in METHODS:
        if method in RESELECTABLE:
            LaetCallback(method=method, k=1, reselect_every=2)
        else:
            with pytest.raises(ValueError, match="reselect_every needs a method that can choose again"):
                LaetCallback(method=method, k=1, reselect_every=2)
    with pytest.raises(ValueError, match="reselect_every needs a method that can choose again"):
        run("last")
    # random re-selects in laet_fast.Trainer as in the callback: the n-th re-selection draws with seed + n
    # (at steps 2 and 4 of 5; none after the last step).
    report, cfg = run("random")
    draws = [select_layers(None, strategy="random", k=1, num_layers=4, seed=3 + n).layers for n in range(3)]
    assert len(set(draws)) > 1
    with open(tmp_path / "random" / "log.jsonl", encoding="utf-8") as handle:
        log = [json.loads(line) for line in handle]
    in_force = [draws[0]]
    for entry in log:
        in_force.append(tuple(entry.get("selection", in_force[-1])))
    assert in_force[2] == draws[1] and in_force[4] == draws[2] and tuple(report.selection) == draws[2]


def word_tokenizer():
    """A tokenizer of the tiny models' 211 ids (the datasets below are pre-tokenized; TRL wants one)."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(211)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t1")),
                                                pad_token="t0", eos_token="t2")


def sft_config(tmp_path, **overrides):
    trl = pytest.importorskip("trl")
    kwargs = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                  report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    return trl.SFTConfig(**{**kwargs, **overrides})


def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = TokenRows(rows=8, pad=False)
    data = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows.ids]})
    model = tiny_model("llama", seed=4).train()
    before = snapshot(model)
    callback = LaetCallback(method="last", k=1)
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=data,
                             processing_class=word_tokenizer(), callbacks=[callback])
    trainer.train()
    assert callback.selection.layers == (2,)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.2.") for n in changed)


def test_sft_completion_only_loss_is_scored_on_the_completion(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = TokenRows(rows=8, pad=False)
    data = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows.ids],
                                       "completion_mask": [[0] * PROMPT + [1] * (SEQ - PROMPT)] * 8})
    model = tiny_model("llama", seed=5).train()
    reference = copy.deepcopy(model)
    callback = LaetCallback(method="grad_norm", k=1, score_batches=2, reselect_every=1)
    reported = Reported()
    # SFTConfig's default bf16 autocast would round the scoring forward, which the float32 reference does not.
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path, completion_only_loss=True, bf16=False,
                                                          train_sampling_strategy="sequential"),
                             train_dataset=data, processing_class=word_tokenizer(), callbacks=[reported, callback])
    trainer.train()
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in (range(0, 2), range(2, 4))]
    for batch in batches:  # the labels TRL trains on: the completion only
        assert (batch["labels"][:, :PROMPT] == -100).all() and (batch["labels"][:, PROMPT:] >= 0).all()
    assert callback.scores["grad_norm"] == pytest.approx(reference_grad_norms(reference, batches), rel=1e-4)
    # Both steps' lines keep TRL's own metrics (the re-selection at step 1 logs beside them, not through TRL's log).
    lines = [logs for logs in reported.logs if "loss" in logs]
    assert len(lines) == 2 and all("mean_token_accuracy" in logs for logs in lines)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="reselect_every"):
        LaetCallback(method="last", k=1, reselect_every=2)
    with pytest.raises(ValueError, match="reselect_every"):
        LaetCallback(method="grad_norm", reselect_every=0)
    with pytest.raises(ValueError, match="score_batches"):
        LaetCallback(score_batches=0)
    with pytest.raises(ValueError, match="probe_examples=0: train the probes on an integer number >= 1"):
        LaetCallback(method="laet", probe_examples=0)
    with pytest.raises(ValueError, match="unknown method"):
        LaetCallback(method="lisa")
    with pytest.raises(ValueError, match="quantization"):
        LaetCallback(quantize_frozen="nf3")


@pytest.mark.parametrize("method", ["laet", "laet-cost"])
def test_laet_chooses_by_probes_and_trains_the_model_head(tmp_path, method):
    import copy

    from laet_fast import select_layers
    from laet_fast.cost import CostModel, laet_cost_selection
    from laet_fast.embed import layer_embeddings, probe_layers
    from trainer_cases import ClassRows

    model = tiny_model("llama", head="seqcls", seed=6, num_hidden_layers=4).train()
    reference = copy.deepcopy(model).eval()
    path = find_layers(model).path
    before = snapshot(model)
    data = ClassRows(rows=24, seed=3)
    callback = LaetCallback(method=method, probe_examples=14)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=4,
                                                                   eval_strategy="steps", eval_steps=2),
                                   train_dataset=data, eval_dataset=ClassRows(rows=4, seed=4), callbacks=[callback])
    trainer.train()
    # Independent reference: the first 14 rows (sequential sampler) pooled in one pass, probed with the same seed
    # on 2 folds (the rarest class of those rows has 2).
    rows = [data[i] for i in range(14)]
    labels = torch.stack([r["labels"] for r in rows])
    assert int(torch.bincount(labels).min()) == 2
    emb = layer_embeddings(reference, [{"input_ids": torch.stack([r["input_ids"] for r in rows]),
                                        "attention_mask": torch.stack([r["attention_mask"] for r in rows])}],
                           progress=False)
    want = probe_layers(emb, labels, seed=0, folds=2)
    assert callback.scores["probe_loss"] == pytest.approx(want["probe_loss"], rel=1e-3)
    assert callback.scores["probe_acc"] == want["probe_acc"]
    assert callback.scores["probe_acc_std"] == pytest.approx(want["probe_acc_std"], rel=1e-6)
    chosen = set(callback.selection.layers)
    if method == "laet":
        assert callback.selection.layers == select_layers(want, strategy="laet").layers and chosen
    else:  # costed at the first batch's shape: 4 rows of SEQ tokens, fp32
        cost = CostModel(model.config, seq_len=SEQ, batch_size=4, dtype="fp32")
        assert callback.selection.layers == laet_cost_selection(want["probe_acc"], want["probe_f1"], cost)[0].layers
        assert chosen and chosen <= set(select_layers(want, strategy="laet").layers)
    after = dict(model.named_parameters())
    for name, old in before.items():
        block = block_of(name, path)
        changed = not torch.equal(after[name], old)
        if block is None:  # the score head trains, embeddings and final norm stay
            assert changed == name.startswith("score."), name
        else:
            assert changed == (block in chosen), name
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2
    logged = next(h for h in trainer.state.log_history if "laet/num_selected" in h)
    assert logged["laet/probe_acc/layer_0"] == pytest.approx(want["probe_acc"][0])


def test_grad_norm_without_labels_says_so(tmp_path):
    class Unlabelled(TokenRows):
        def __getitem__(self, i):
            return {key: value for key, value in super().__getitem__(i).items() if key != "labels"}

    model = tiny_model("llama", seed=0).train()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=Unlabelled(),
                                   callbacks=[LaetCallback(method="grad_norm", k=1)])
    with pytest.raises(ValueError, match="computed none on a batch of attention_mask, input_ids; give the batches "
                                         "the labels it trains on"):
        trainer.train()


def test_laet_refuses_token_labels(tmp_path):
    model = tiny_model("llama", seed=0).train()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenRows(),
                                   callbacks=[LaetCallback(method="laet")])
    with pytest.raises(ValueError, match="one class label per row.*classification dataset"):
        trainer.train()
