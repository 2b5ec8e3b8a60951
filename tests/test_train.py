"""The Trainer on tiny random models: a run end to end, heads and vote, the truncated forward, re-selection, NaN."""
import copy
import json
import math
import os

import pytest
import torch

from tiny_models import random_batch, tiny_model
from train_fixtures import CLASSES, labelled_texts, model_dir, save_model, torch_kernels  # noqa: F401 (fixtures)
from laet_fast.layers import find_layers
from laet_fast.loading import load_model_and_tokenizer
from laet_fast.train import TrainConfig, Trainer, load_trained
from laet_fast.data import TextData, encode_labels, split_examples
from laet_fast.train.batches import Batches
from laet_fast.train.heads import ProbeHead, TaskModel, vote
from laet_fast.train.trainer import TrainError


def load(model_dir):
    return load_model_and_tokenizer(model_dir, device="cpu")


def config(tmp_path, **kw):
    base = dict(method="last", k=2, max_steps=6, batch_size=8, lr=1e-3, out=str(tmp_path / "run"), progress=False)
    return TrainConfig(**{**base, **kw})


def read_log(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_classify_run_logs_reports_and_exports(model_dir, tmp_path):
    model, tok = load(model_dir)
    texts, labels = labelled_texts(60, 0)
    cfg = config(tmp_path, eval_every=3)
    report = Trainer(model, tok, cfg, (texts, labels)).fit()
    log = read_log(cfg.out)
    assert [e["step"] for e in log] == list(range(1, 7))
    assert all(math.isfinite(e["loss"]) and e["lr"] > 0 for e in log)
    assert "eval" in log[2] and "eval" in log[5] and "eval" not in log[0]
    assert report.selection == [2, 3] and report.head_layers == [3] and report.steps == 6
    assert set(report.metrics) == {"accuracy", "macro_f1", "loss"}
    assert report.metrics == log[-1]["eval"]
    assert report.trainable_params == sum(p.numel() for p in model.model.layers[2:].parameters()) + 2 * 72 + 2
    for name in ("report.txt", "report.json"):
        assert os.path.isfile(os.path.join(cfg.out, name))
    assert "trainable params" in open(os.path.join(cfg.out, "report.txt")).read()

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(report.export_dir)
    for a, b in zip(reloaded.model.layers[3].parameters(), model.model.layers[3].parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    predictor = load_trained(report.export_dir, device="cpu")
    assert predictor.classes == sorted(CLASSES) and predictor.head_layers == [3]
    # The eval split is the trainer's: the predictor's accuracy on it is the report's.
    _, held = split_examples(TextData(texts, *encode_labels(labels)), cfg.eval_fraction, cfg.seed)
    predicted = predictor.predict(held.texts)
    accuracy = sum(p == held.classes[y] for p, y in zip(predicted, held.labels)) / len(held)
    assert accuracy == pytest.approx(report.metrics["accuracy"], abs=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: learnt absolute positions, which left padding shifts
def test_forward_stops_at_the_highest_head_and_never_runs_the_lm_head(arch):
    model = tiny_model(arch, seed=0, **({"num_hidden_layers": 5} if arch == "llama" else {"n_layer": 5}))
    heads = {1: ProbeHead(72, 3), 2: ProbeHead(72, 3, (16,))}
    task_model = TaskModel(model, "classify", heads)
    ran = []
    for i, block in enumerate(find_layers(model)):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    model.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head"))
    ids, mask = random_batch(model.config.vocab_size, batch=3, seq=9, side="left")
    labels = torch.tensor([0, 2, 1])
    loss, logits = task_model(ids, mask, labels)
    assert ran == [0, 1, 2] and logits.shape == (2, 3, 3)
    # The loss is the sum of the heads' cross-entropies on the mean of each block's real tokens, each
    # left-padded row giving what it gives alone and unpadded (positions counted over real tokens).
    alone = [model(input_ids=ids[r, mask[r] == 1][None], output_hidden_states=True).hidden_states
             for r in range(ids.shape[0])]
    expected = 0
    for index, head in heads.items():
        pooled = torch.cat([hidden[index + 1].mean(1) for hidden in alone])
        expected = expected + torch.nn.functional.cross_entropy(head(pooled), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_vote_majority_then_mean_probability():
    # Row 0: heads vote 0, 0, 1 -> 0. Row 1: one vote each for 0 and 1; head 1 is sure of 1 -> 1.
    logits = torch.tensor([
        [[2.0, 0.0], [0.1, 0.0]],
        [[2.0, 0.0], [0.0, 5.0]],
        [[0.0, 1.0], [0.0, 0.0]],
    ]).log_softmax(-1)
    logits[2, 1] = torch.tensor([0.0, 0.0]).log_softmax(-1)  # head 2 undecided on row 1: argmax 0
    assert vote(logits[:2]).tolist() == [0, 1]
    assert vote(logits).tolist() == [0, 0]
    # Three classes, a 1-1-1 tie: the highest mean probability wins.
    three = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.2]]])
    assert vote(three).tolist() == [0]


def test_lm_task_masks_padding(model_dir, tmp_path):
    model, tok = load(model_dir)
    texts, _ = labelled_texts(40, 1)
    cfg = config(tmp_path, task="lm", method="0,2", k=None, max_steps=3)
    report = Trainer(model, tok, cfg, texts).fit()
    assert report.selection == [0, 2] and report.head_layers == []
    assert set(report.metrics) == {"loss", "perplexity"}
    assert report.metrics["perplexity"] == pytest.approx(math.exp(report.metrics["loss"]))
    assert report.forward["lm_head_run"] and report.forward["blocks_run"] == 4


def test_batches_are_a_function_of_the_position(model_dir):
    _, tok = load(model_dir)
    texts, labels = labelled_texts(10, 2)
    data = TextData(texts, *encode_labels(labels))
    batches = Batches(data, tok, batch_size=4, max_length=6, seed=1)
    stream = [i for p in range(0, 20, 4) for i in batches.indices_at(p)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch its own order
    again = Batches(data, tok, batch_size=4, max_length=6, seed=1)
    assert again.indices_at(8) == batches.indices_at(8)
    assert batches.at(8)["input_ids"].shape[1] <= 6 and batches.truncated() > 0


def test_a_block_that_joins_on_reselection_trains_from_its_next_step(model_dir, tmp_path, monkeypatch):
    import laet_fast.methods as methods
    import laet_fast.reselect as reselect
    from laet_fast.selection import Selection

    # Choices that move the trained block: 3 (the first choice), then 1, then 0; the first call is
    # the Reselector checking its arguments.
    plan = iter([(3,), (1,), (0,), (0,)])
    monkeypatch.setattr(reselect, "select_layers", lambda scores, **kw: Selection(next(plan), 4, "top",
                                                                                  "block_influence", (0.0,) * 4))
    monkeypatch.setattr(methods, "choose_layers", lambda *a, **kw: Selection((3,), 4, "top"))
    model, tok = load(model_dir)
    texts, labels = labelled_texts(60, 3)
    snapshots = []

    def snapshot(module, args, output):  # at each training forward: blocks 0 and 1 as they are
        if module.training:
            snapshots.append([p.detach().clone() for p in model.model.layers[:2].parameters()])

    model.model.layers[3].register_forward_hook(snapshot)
    cfg = config(tmp_path, method="block_influence", k=1, max_steps=6, reselect_every=2)
    report = Trainer(model, tok, cfg, (texts, labels)).fit()
    log = read_log(cfg.out)
    assert log[1]["selection"] == [1] and log[3]["selection"] == [0]
    assert all("layer_scores" in log[i] for i in (1, 3))
    assert "layer_scores" not in log[5] and "selection" not in log[5]  # no re-selection after the last step
    block_1 = [torch.cat([p.flatten() for p in snap[9:]]) for snap in snapshots]
    block_0 = [torch.cat([p.flatten() for p in snap[:9]]) for snap in snapshots]
    # One snapshot per training step, at its forward pass. Block 1 joins after step 2: step 3's
    # update changes it (seen at forward 4); block 0 joins after step 4 and step 5 changes it.
    assert torch.equal(block_1[0], block_1[2]) and not torch.equal(block_1[2], block_1[3])
    assert torch.equal(block_0[0], block_0[4]) and not torch.equal(block_0[4], block_0[5])
    assert report.selection == [0]


def test_nan_steps_are_skipped_counted_and_stop_the_run(model_dir, tmp_path):
    model, tok = load(model_dir)
    texts, labels = labelled_texts(60, 4)
    calls = []

    def poison(module, args, output):
        if not module.training:
            return output  # the evaluation before step 1 (the probe baseline) is no training step
        calls.append(1)
        if len(calls) == 3 or len(calls) >= 7:  # one NaN step, later NaN for good
            return output * float("nan")
        return output

    cfg = config(tmp_path, max_steps=20, save_every=2, max_nan_steps=3)
    trainer = Trainer(model, tok, cfg, (texts, labels))
    handle = None
    original_choose = trainer.choose_blocks

    def choose_then_poison(*args):
        nonlocal handle
        result = original_choose(*args)
        handle = model.model.layers[3].register_forward_hook(poison)
        return result

    trainer.choose_blocks = choose_then_poison
    with pytest.raises(TrainError, match=r"3 non-finite losses in a row \(each step skipped, 4 in all\)"):
        trainer.fit()
    log = read_log(cfg.out)
    assert [e["step"] for e in log] == list(range(1, 10))
    assert log[2]["loss"] is None and log[2]["skipped"] and all(log[i]["loss"] is None for i in (6, 7, 8))
    assert all(math.isfinite(log[i]["loss"]) for i in (0, 1, 3, 4, 5))
    from laet_fast.train import checkpoints

    saved, meta = checkpoints.load(checkpoints.latest(cfg.out))
    assert meta["step"] == 8 and meta["skipped"] == 3  # skipped steps never changed the weights
    assert all(torch.isfinite(t).all() for group in saved.values() for t in group.values() if t.is_floating_point())


def test_quantized_frozen_blocks_and_gradient_checkpointing(model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tok = load(model_dir)
    texts, labels = labelled_texts(40, 5)
    cfg = config(tmp_path, quantize_frozen="nf4", gradient_checkpointing=True, max_steps=2, method="1", k=None)
    report = Trainer(model, tok, cfg, (texts, labels)).fit()
    assert report.quantize_frozen == "nf4" and report.selection == [1]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(report.export_dir)  # dequantized: plain nn.Linear
    assert type(reloaded.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_config_refusals():
    with pytest.raises(ValueError, match="which task='lm' has none of; choose another method"):
        TrainConfig(task="lm", method="laet")
    with pytest.raises(ValueError, match="multiple of reselect_every"):
        TrainConfig(reselect_every=3, save_every=4)
    with pytest.raises(ValueError, match="quantize_frozen"):
        TrainConfig(quantize_frozen="nf3")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="best")


def test_laet_heads_start_from_the_sweeps_probes_and_the_export_votes(model_dir, tmp_path, monkeypatch):
    import laet_fast.train.trainer as trainer_module

    converted = {}
    real = trainer_module.head_from_probe

    def recording(probes, index):
        head = real(probes, index)
        converted[index] = (probes.head(index), {k: v.clone() for k, v in head.state_dict().items()})
        return head

    monkeypatch.setattr(trainer_module, "head_from_probe", recording)
    model, tok = load(model_dir)
    texts, labels = labelled_texts(60, 1)
    cfg = config(tmp_path, method="laet", k=2, max_steps=3, eval_every=3)
    report = Trainer(model, tok, cfg, (texts, labels)).fit()
    assert report.head_layers == sorted(report.selection) and len(report.head_layers) == 2
    assert sorted(converted) == report.head_layers  # every head was made from its probe
    # Each head starts as the probe the sweep trained on that block: same logits on fresh features.
    x = torch.randn(5, model.config.hidden_size) * 3
    for index, (probe, state) in converted.items():
        head = ProbeHead(x.shape[1], len(CLASSES), (128, 64))
        head.load_state_dict(state)
        torch.testing.assert_close(head(x), probe(x).float(), rtol=1e-5, atol=1e-6)
    predictor = load_trained(report.export_dir, device="cpu")
    assert predictor.head_layers == report.head_layers
    assert set(predictor.predict(texts[:7])) <= set(CLASSES)


def pooled_block_outputs(model, texts, tok, blocks):
    """Each text alone (no padding): its blocks' outputs, mean over its tokens; {block: float32 [N, H]}."""
    outputs, pooled = {}, {i: [] for i in blocks}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda module, args, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in blocks]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, return_tensors="pt", truncation=True, max_length=64)["input_ids"]
                model(input_ids=ids)
                for i in blocks:
                    pooled[i].append(outputs[i].reshape(ids.shape[1], -1).float().mean(0))
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.stack(rows) for i, rows in pooled.items()}


def accuracy_and_macro_f1(pred, gold, classes):
    f1 = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        wrong = sum((p == c) != (g == c) for p, g in zip(pred, gold))
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold), sum(f1) / classes


def test_laet_probes_learn_from_probe_examples_of_the_seeded_training_stream(model_dir, tmp_path):
    from laet_fast.embed import layer_embeddings, probe_layers

    model, tok = load(model_dir)
    texts, labels = labelled_texts(60, 2)
    cfg = config(tmp_path, method="laet", k=None, max_steps=1, probe_examples=21)
    trainer = Trainer(model, tok, cfg, (texts, labels))
    reference = copy.deepcopy(model)
    report = trainer.fit()
    # Independent: the first 21 texts of the epoch-0 permutation (seeded by cfg.seed), embedded in one batch.
    train = trainer.train_data
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()[:21]
    enc = tok([train.texts[i] for i in order], padding=True, return_tensors="pt")
    emb = layer_embeddings(reference, [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}],
                           progress=False)
    want = probe_layers(emb, torch.tensor([train.labels[i] for i in order]), folds=5, seed=cfg.seed)
    assert trainer.scores.metadata["examples"] == 21 and trainer.scores.metadata["folds"] == 5
    assert trainer.scores["probe_loss"] == pytest.approx(want["probe_loss"], rel=1e-3)
    spread = report.probe_spread
    assert spread["folds"] == 5 and spread["examples"] == 21
    assert spread["mean"] == pytest.approx(want["probe_acc"]) and spread["std"] == pytest.approx(want["probe_acc_std"])
    line = next(line for line in report.text().splitlines() if line.startswith("  probe accuracy"))
    first = f"0 {want['probe_acc'][0]:.3f}±{want['probe_acc_std'][0]:.3f}"
    assert f"mean±std over 5 folds of 21 examples: {first}" in line
    assert line.endswith("; too wide to separate the blocks") == spread["too_wide"]
    assert any(note.startswith("the probes' spread is too wide") for note in report.notes) == spread["too_wide"]
    # Fewer training texts than probe_examples: all of them.
    everything = Trainer(*load(model_dir), config(tmp_path / "all", method="laet", k=None, max_steps=1),
                         (texts, labels))
    everything.fit()
    assert everything.scores.metadata["examples"] == len(everything.train_data) == 48


@pytest.mark.parametrize("method", ["laet", "last"])
def test_the_probe_baseline_is_the_frozen_heads_on_the_evaluation_split(model_dir, tmp_path, monkeypatch, method):
    """Before step 1 the heads are the frozen probes (or the untrained last-block head): their accuracy and
    macro-F1 on the evaluation split, computed here from the heads as built, text by text."""
    from laet_fast.train import trainer as trainer_module

    built = {}
    real_choose = trainer_module.Trainer.choose_blocks

    def recording(self, batches, device):
        selection, heads = real_choose(self, batches, device)
        built.update({i: copy.deepcopy(head) for i, head in heads.items()})
        return selection, heads

    monkeypatch.setattr(trainer_module.Trainer, "choose_blocks", recording)
    model, tok = load(model_dir)
    texts, labels = labelled_texts(60, 3)
    k = 2 if method == "laet" else 1
    cfg = config(tmp_path, method=method, k=k, max_steps=2)
    trainer = Trainer(model, tok, cfg, (texts, labels))
    reference = copy.deepcopy(model)
    report = trainer.fit()
    held = trainer.eval_data
    pooled = pooled_block_outputs(reference, held.texts, tok, sorted(built))
    with torch.no_grad():
        probs = {i: built[i](pooled[i]).softmax(-1) for i in built}
    if method == "last":
        head = report.probe_baseline["last_block_head"]
        assert head["block"] == 3
        assert (head["accuracy"], head["macro_f1"]) == pytest.approx(
            accuracy_and_macro_f1(probs[3].argmax(-1).tolist(), held.labels, 2), abs=1e-9)
        return
    best = max(built, key=lambda i: trainer.scores["probe_acc"][i])
    baseline = report.probe_baseline
    assert baseline["best_probe"]["block"] == best and baseline["probe_vote"]["blocks"] == sorted(built)
    assert (baseline["best_probe"]["accuracy"], baseline["best_probe"]["macro_f1"]) == pytest.approx(
        accuracy_and_macro_f1(probs[best].argmax(-1).tolist(), held.labels, 2), abs=1e-9)
    # Two heads: agreed, their class; split, the class of the higher mean probability.
    first, second = (probs[i] for i in sorted(built))
    voted = [int(a.argmax()) if a.argmax() == b.argmax() else int((a + b).argmax()) for a, b in zip(first, second)]
    assert (baseline["probe_vote"]["accuracy"], baseline["probe_vote"]["macro_f1"]) == pytest.approx(
        accuracy_and_macro_f1(voted, held.labels, 2), abs=1e-9)
    assert f"best frozen probe (block {best}) accuracy {baseline['best_probe']['accuracy']:.4f}" in report.text()
    saved = json.load(open(os.path.join(cfg.out, "report.json")))
    assert saved["probe_baseline"] == baseline


@pytest.mark.parametrize("k", [1, 2])
def test_the_report_says_when_classify_stops_below_the_last_block(model_dir, tmp_path, k):
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    cfg = TrainConfig(method="laet", k=k, max_steps=1, batch_size=4, out=str(tmp_path / "run"), progress=False)
    report = Trainer(model, tokenizer, cfg, labelled_texts(24, 0), labelled_texts(8, 1)).fit()
    top = max(report.head_layers)
    said = [note for note in report.notes if "stops at the highest head" in note]
    assert said == ([f"the plan counts the forward pass of every block; classify stops at the highest head "
                     f"(block {top}), so the blocks above it cost nothing"] if top < 3 else [])


def test_the_config_refuses_a_method_that_needs_k_without_k():
    from laet_fast.names import NEEDS_K

    for method in NEEDS_K:
        with pytest.raises(ValueError, match=f"method '{method}' needs k"):
            TrainConfig(method=method)
        assert TrainConfig(method=method, k=2).k == 2
    assert TrainConfig(method="grad_norm").k is None  # the variance split sizes the set
