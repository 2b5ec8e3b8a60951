"""LaetCallback in real transformers Trainers: only the chosen blocks train, the optimizer holds only
them, evaluation runs in between, NF4 frozen blocks, re-selection, TRL's SFTTrainer."""
import pytest
import torch

from laet_fast.integrations import LaetCallback
from laet_fast.layers import find_layers
from tiny_models import tiny_model
from trainer_cases import TokenRows, snapshot, training_args

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


def test_reselection_joins_and_leaves(tmp_path):
    model = tiny_model("llama", seed=1).train()
    path = find_layers(model).path
    callback = LaetCallback(method="random", k=1, reselect_every=2, score_batches=1)
    snaps = Snapshots()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=6),
                                   train_dataset=TokenRows(), callbacks=[callback, snaps])
    trainer.train()
    # seed 0 draws block 1, the re-draws at steps 2, 4, 6 (seeds 1, 2, 3) block 0.
    assert [(step, sel.layers) for step, sel in callback.history] == [(0, (1,)), (2, (0,)), (4, (0,)), (6, (0,))]

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
    assert sum("laet/num_selected" in h for h in trainer.state.log_history) == 4


def test_scored_reselection_by_gradient_norms(tmp_path):
    model = tiny_model("llama", seed=2).train()
    callback = LaetCallback(method="grad_norm", k=1, reselect_every=2, score_batches=2)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=4),
                                   train_dataset=TokenRows(), callbacks=[callback])
    trainer.train()
    assert [step for step, _ in callback.history] == [0, 2, 4]
    for _, selection in callback.history[1:]:  # every block scored fresh, frozen ones included
        assert selection.metric == "grad_norm" and all(v > 0 for v in selection.scores)
    trained = tuple(i for i, b in enumerate(find_layers(model)) if all(p.requires_grad for p in b.parameters()))
    assert trained == callback.selection.layers


def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(211)}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t1")),
                                                     pad_token="t0", eos_token="t2")
    rows = TokenRows(rows=8, pad=False)
    data = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows.ids]})
    model = tiny_model("llama", seed=4).train()
    before = snapshot(model)
    callback = LaetCallback(method="last", k=1)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                           report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[callback])
    trainer.train()
    assert callback.selection.layers == (2,)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.2.") for n in changed)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="reselect_every"):
        LaetCallback(method="last", k=1, reselect_every=2)
    with pytest.raises(ValueError, match="reselect_every"):
        LaetCallback(method="grad_norm", reselect_every=0)
    with pytest.raises(ValueError, match="score_batches"):
        LaetCallback(score_batches=0)
    with pytest.raises(ValueError, match="unknown method"):
        LaetCallback(method="lisa")
    with pytest.raises(ValueError, match="quantization"):
        LaetCallback(quantize_frozen="nf3")


def test_laet_chooses_by_probes_and_trains_the_model_head(tmp_path):
    import copy

    from laet_fast import select_layers
    from laet_fast.embed import layer_embeddings, probe_layers
    from trainer_cases import ClassRows

    model = tiny_model("llama", head="seqcls", seed=6, num_hidden_layers=4).train()
    reference = copy.deepcopy(model).eval()
    path = find_layers(model).path
    before = snapshot(model)
    data = ClassRows(rows=24, seed=3)
    callback = LaetCallback(method="laet", score_batches=4)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=4,
                                                                   eval_strategy="steps", eval_steps=2),
                                   train_dataset=data, eval_dataset=ClassRows(rows=4, seed=4), callbacks=[callback])
    trainer.train()
    # Independent reference: the first 16 rows (sequential sampler) pooled in one pass, probed with the same seed.
    rows = [data[i] for i in range(16)]
    emb = layer_embeddings(reference, [{"input_ids": torch.stack([r["input_ids"] for r in rows]),
                                        "attention_mask": torch.stack([r["attention_mask"] for r in rows])}],
                           progress=False)
    want = probe_layers(emb, torch.stack([r["labels"] for r in rows]), seed=0)
    assert callback.scores["probe_loss"] == pytest.approx(want["probe_loss"], rel=1e-3)
    assert callback.scores["probe_acc"] == want["probe_acc"]
    chosen = set(callback.selection.layers)
    assert callback.selection.layers == select_layers(want, strategy="laet").layers and chosen
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


def test_laet_refuses_token_labels(tmp_path):
    model = tiny_model("llama", seed=0).train()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenRows(),
                                   callbacks=[LaetCallback(method="laet")])
    with pytest.raises(ValueError, match="one class label per row.*classification dataset"):
        trainer.train()
