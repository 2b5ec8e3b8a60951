"""task='sft': labels token by token for each row format, truncation, packing, and the Trainer and CLI on it."""
import json
import math
import os
import random

import pytest
import torch
from train_fixtures import WORDS, model_dir, save_model, torch_kernels  # noqa: F401

from laet_fast.train.config import TrainConfig
from laet_fast.data import TextData, read_examples
from laet_fast.train.sft import IGNORE, SFTBatches, check_packing, tokenize_example, tokenize_rows

# A ChatML-like template: every token is a word of the vocabulary (the tokenizer splits on whitespace).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
SPECIAL = ["[PAD]", "[UNK]", "[EOS]", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]


def chat_tokenizer(template=CHAT_TEMPLATE, eos="<|im_end|>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos, pad_token="[PAD]",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = template
    return tokenizer


def words(rng, low=2, high=6):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def ids_of(tokenizer, text):
    return [tokenizer.convert_tokens_to_ids(token) for token in text.split()]


def test_chat_labels_learn_exactly_the_assistant_turns_and_their_end_of_turn():
    tok = chat_tokenizer()
    rng = random.Random(0)
    chat = [{"role": "system", "content": words(rng)}, {"role": "user", "content": words(rng)},
            {"role": "assistant", "content": words(rng)}, {"role": "user", "content": words(rng)},
            {"role": "assistant", "content": words(rng)}]
    ids, labels = tokenize_example(tok, {"messages": chat})
    expected_ids, expected_labels = [], []
    for turn in chat:  # built by hand from the template, turn by turn
        head = ids_of(tok, f"<|im_start|> {turn['role']}")
        body = ids_of(tok, turn["content"]) + ids_of(tok, "<|im_end|>")
        expected_ids += head + body
        expected_labels += [IGNORE] * len(head) + (body if turn["role"] == "assistant" else [IGNORE] * len(body))
    assert ids == expected_ids
    assert labels == expected_labels
    assert sum(label != IGNORE for label in labels) == sum(len(t["content"].split()) + 1 for t in chat[2::2])


def test_a_template_that_ends_turns_without_eos_gets_eos_after_the_last_answer():
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    tok = chat_tokenizer(template, eos="[EOS]")
    rng = random.Random(1)
    chat = [{"role": "user", "content": words(rng)}, {"role": "assistant", "content": words(rng)}]
    ids, labels = tokenize_example(tok, {"messages": chat})
    answer = ids_of(tok, chat[1]["content"])
    assert ids[-1] == tok.eos_token_id and labels[-len(answer) - 1:] == answer + [tok.eos_token_id]
    assert all(label == IGNORE for label in labels[:-len(answer) - 1])


def test_prompt_completion_learns_the_completion_and_eos():
    tok = chat_tokenizer(template=None, eos="[EOS]")
    rng = random.Random(2)
    prompt, completion = words(rng), words(rng)
    ids, labels = tokenize_example(tok, {"prompt": prompt, "completion": completion})
    assert ids == ids_of(tok, prompt) + ids_of(tok, completion) + [tok.eos_token_id]
    assert labels == [IGNORE] * len(prompt.split()) + ids_of(tok, completion) + [tok.eos_token_id]


def test_a_conversational_prompt_goes_through_the_template():
    tok = chat_tokenizer()
    rng = random.Random(3)
    prompt = [{"role": "system", "content": words(rng)}, {"role": "user", "content": words(rng)}]
    completion = words(rng)
    as_pair = tokenize_example(tok, {"prompt": prompt, "completion": completion})
    as_chat = tokenize_example(tok, {"messages": prompt + [{"role": "assistant", "content": completion}]})
    assert as_pair == as_chat


def test_alpaca_rows_are_a_user_turn_with_the_chat_template_and_alpacas_prompt_without():
    rng = random.Random(4)
    row = {"instruction": words(rng), "input": words(rng), "output": words(rng)}
    tok = chat_tokenizer()
    ids, labels = tokenize_example(tok, row)
    user = row["instruction"] + "\n\n" + row["input"]
    assert (ids, labels) == tokenize_example(tok, {"messages": [{"role": "user", "content": user},
                                                                {"role": "assistant", "content": row["output"]}]})
    plain = chat_tokenizer(template=None, eos="[EOS]")
    ids, labels = tokenize_example(plain, {**row, "input": ""})
    answer = ids_of(plain, row["output"]) + [plain.eos_token_id]
    assert labels[-len(answer):] == answer and all(label == IGNORE for label in labels[:-len(answer)])
    assert ids[:3] == plain(["Below is an"], add_special_tokens=False)["input_ids"][0]  # Alpaca's prompt


def test_padding_is_ignored_and_truncation_drops_examples_with_no_answer_left():
    tok = chat_tokenizer(template=None, eos="[EOS]")
    rows = [{"prompt": "w1 w2", "completion": "w3"}, {"prompt": "w1 w2 w3 w4 w5 w6", "completion": "w7 w8"},
            {"prompt": "w1", "completion": "w2 w3 w4 w5 w6 w7"}]
    batches = SFTBatches(TextData(rows), tok, batch_size=3, max_length=6)
    assert batches.units.dropped == 1 and batches.units.cut == 1 and len(batches) == 2
    batch = batches.encode([0, 1])
    w = lambda *names: [tok.convert_tokens_to_ids(n) for n in names]  # noqa: E731
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [w("w1", "w2", "w3", "[EOS]") + [pad, pad], w("w1", "w2", "w3", "w4", "w5",
                                                                                          "w6")]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE] + w("w3", "[EOS]") + [IGNORE] * 2,
                                        [IGNORE] + w("w2", "w3", "w4", "w5", "w6")]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    with pytest.raises(ValueError, match="cuts away every answer"):
        SFTBatches(TextData(rows[1:2]), tok, batch_size=1, max_length=5)


def test_the_first_token_of_every_example_is_never_a_label():
    tok = chat_tokenizer(template=None, eos="[EOS]")
    units = tokenize_rows(tok, [{"prompt": "", "completion": "w1 w2"}], max_length=8)
    assert units.labels[0][0] == IGNORE and units.labels[0][1:] == ids_of(tok, "w2") + [tok.eos_token_id]


def test_packed_rows_restart_positions_and_give_the_same_loss_as_the_examples_apart(tmp_path):
    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.train.heads import TaskModel

    model, _ = load_model_and_tokenizer(save_model(tmp_path / "m", layers=2), dtype="float32", device="cpu")
    tok = chat_tokenizer(template=None, eos="[EOS]")
    rng = random.Random(5)
    rows = [{"prompt": words(rng), "completion": words(rng)} for _ in range(7)]
    packed = SFTBatches(TextData(rows), tok, batch_size=8, max_length=24, packing=True)
    apart = SFTBatches(TextData(rows), tok, batch_size=8, max_length=24)
    assert len(packed) < len(apart)
    for i in range(len(packed)):
        starts = [j for j, p in enumerate(packed.units.positions[i]) if p == 0]
        assert len(starts) >= 1 and starts[0] == 0
    task_model = TaskModel(model, "sft").eval()
    check_packing(model)
    with torch.no_grad():
        p = packed.encode(range(len(packed)))
        p_loss, _ = task_model(**p)
        a = apart.encode(range(len(apart)))
        a_loss, _ = task_model(**a)
    # Both are means over the same learned tokens; a leak across examples would move the packed one.
    assert (p["labels"] != IGNORE).sum() == (a["labels"] != IGNORE).sum()
    torch.testing.assert_close(p_loss, a_loss, rtol=1e-5, atol=1e-6)


def test_packing_is_refused_for_a_model_that_lets_examples_attend_to_each_other(tmp_path, monkeypatch):
    from laet_fast.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(save_model(tmp_path / "m", layers=2), dtype="float32", device="cpu")
    forward = model.forward

    def no_packing(*args, position_ids=None, **kwargs):  # an attention that ignores the packed positions
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", no_packing)
    with pytest.raises(ValueError, match=r"turn packing off \(packing\)"):
        check_packing(model)


def test_laet_and_packing_outside_sft_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="choose another method .*e.g. method='grad_norm'"):
        TrainConfig(task="sft", method="laet")
    with pytest.raises(ValueError, match=r"turn packing off \(packing\)"):
        TrainConfig(task="lm", method="last", k=1, packing=True)


def _rows(count, seed):
    rng = random.Random(seed)
    return [{"prompt": words(rng), "completion": words(rng)} for _ in range(count)]


@pytest.mark.parametrize("packing", [False, True])
def test_the_trainer_trains_sft_and_scores_grad_norm_on_the_completion_only_loss(model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                                 packing):
    from datasets import Dataset

    import laet_fast.methods as methods
    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.train.trainer import Trainer

    seen = {}
    score_layers = methods.score_layers

    def spy(model, batches, method, **kwargs):
        seen.update(batches=batches, own_loss=kwargs.get("own_loss"))
        return score_layers(model, batches, method, **kwargs)

    monkeypatch.setattr(methods, "score_layers", spy)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    cfg = TrainConfig(task="sft", method="grad_norm", max_steps=2, batch_size=4, max_length=32, packing=packing,
                      score_batches=1, out=str(tmp_path / "run"), progress=False)
    trainer = Trainer(model, tokenizer, cfg, Dataset.from_list(_rows(24, 0)), _rows(6, 1))
    report = trainer.fit()
    assert trainer.loss_chunk == cfg.loss_chunk > 0  # the chunked LM-head loss, checked against the model's own
    assert seen["own_loss"] is True
    batch = seen["batches"][0]
    assert "position_ids" not in batch  # scored example by example
    learned = batch["labels"] != IGNORE
    assert torch.equal(batch["labels"][learned], batch["input_ids"][learned])
    assert not learned[:, :2].any()  # every prompt has 2 words or more: never learned
    assert report.steps == 2 and math.isfinite(report.metrics["loss"]) and report.metrics["perplexity"] > 1
    log = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    assert all(math.isfinite(entry["loss"]) for entry in log)


def test_sft_rows_are_read_from_jsonl_and_parquet_and_a_bad_row_is_named(tmp_path):
    from datasets import Dataset

    rows = _rows(5, 2)
    with open(tmp_path / "d.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert read_examples(str(tmp_path / "d.jsonl"), "sft").texts == rows
    assert read_examples(str(tmp_path / "d.parquet"), "sft").texts == rows
    with open(tmp_path / "bad.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows[:2] + [{"question": "w1"}])
    with pytest.raises(ValueError, match="row 3: an sft example needs"):
        read_examples(str(tmp_path / "bad.jsonl"), "sft")
    (tmp_path / "d.xml").write_text("")
    with pytest.raises(ValueError, match="unknown format"):
        read_examples(str(tmp_path / "d.xml"), "sft")


def test_cli_trains_sft_from_a_jsonl_file(model_dir, tmp_path, capsys):  # noqa: F811
    from laet_fast.cli import main

    data = tmp_path / "chat.jsonl"
    with open(data, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in _rows(20, 3))
    out = tmp_path / "run"
    code = main(["train", "--model", model_dir, "--data", str(data), "--task", "sft", "--method", "last", "--k", "1",
                 "--max-steps", "1", "--batch-size", "4", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert os.path.isfile(out / "report.json")
    import yaml

    ran_with = yaml.safe_load((out / "config.yaml").read_text())  # the run folder says how it was run
    assert ran_with["task"] == "sft" and ran_with["data"] == str(data) and ran_with["k"] == 1
    code = main(["train", "--model", model_dir, "--data", str(data), "--task", "sft", "--max-steps", "1",
                 "--out", str(tmp_path / "r2")])
    assert code == 2 and "choose another method" in capsys.readouterr().err


def test_a_template_that_renders_nothing_for_the_answers_is_refused_in_one_line():
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|> {{ m['role'] }} "
                "{{ m['content'] }} <|im_end|> {% endif %}{% endfor %}")  # drops the assistant's turns
    tok = chat_tokenizer(template)
    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    with pytest.raises(ValueError, match="renders no tokens for this chat's assistant turns"):
        tokenize_example(tok, {"messages": chat})


def test_a_template_that_refuses_a_chat_is_one_line_naming_the_fix():
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}{{ m['content'] }} {% endfor %}")
    chat = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"},
            {"role": "assistant", "content": "w3"}]
    with pytest.raises(ValueError, match="System role not supported; fold a system message into the first user"):
        tokenize_example(chat_tokenizer(template), {"messages": chat})


def test_packing_is_refused_for_a_model_without_position_ids(tmp_path, monkeypatch):
    from laet_fast.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(save_model(tmp_path / "m", layers=2), dtype="float32", device="cpu")
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids=None, **kwargs: forward(input_ids=input_ids))
    with pytest.raises(ValueError, match="takes no position_ids, so packed examples cannot be kept apart"):
        check_packing(model)


def test_grad_accum_weighs_micro_batches_by_their_answer_tokens(model_dir, tmp_path):  # noqa: F811
    """Two micro-batches of 2 are one batch of 4: the same loss and gradient, though their answers differ in
    length (weighing the micro-batches equally gave another loss and gradient)."""
    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.train.trainer import Trainer

    rng = random.Random(5)
    rows = [{"prompt": words(rng), "completion": words(rng, 1, 12 if i % 2 else 2)} for i in range(8)]

    def first_step(batch_size, grad_accum):
        model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
        out = tmp_path / f"run{batch_size}"
        cfg = TrainConfig(task="sft", method="last", k=2, max_steps=1, batch_size=batch_size, grad_accum=grad_accum,
                          max_length=48, out=str(out), progress=False, seed=3)
        Trainer(model, tokenizer, cfg, rows, rows[:2]).fit()
        entry = next(e for e in map(json.loads, open(out / "log.jsonl")) if e.get("step") == 1 and "loss" in e)
        return entry["loss"], entry["grad_norm"]

    whole, accumulated = first_step(4, 1), first_step(2, 2)
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_an_epoch_counts_the_examples_kept_and_each_split_is_tokenized_once(model_dir, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """Examples whose answers max_length cuts away are not in the epoch; scoring, the step count and training
    share one tokenization of the training split (a packed run tokenized it three times)."""
    import laet_fast.train.sft as sft
    from laet_fast.loading import load_model_and_tokenizer
    from laet_fast.train.trainer import Trainer

    rng = random.Random(2)
    rows = [{"prompt": words(rng, 30 if i < 4 else 2, 31 if i < 4 else 4), "completion": words(rng)}
            for i in range(12)]
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    calls = []
    real = sft.tokenize_rows
    monkeypatch.setattr(sft, "tokenize_rows", lambda tok, data, *a, **k: (calls.append(len(data)), real(tok, data, *a,
                                                                                                         **k))[1])
    cfg = TrainConfig(task="sft", method="grad_norm", k=1, epochs=1, batch_size=2, max_length=16, packing=False,
                      score_batches=1, out=str(tmp_path / "run"), progress=False)
    trainer = Trainer(model, tokenizer, cfg, rows, rows[4:6])
    assert trainer._total_steps() == 4  # 8 of 12 examples kept, 2 a step
    report = trainer.fit()
    assert report.steps == 4 and calls == [12, 2]
    calls.clear()
    packed = TrainConfig(**{**cfg.to_dict(), "packing": True, "out": str(tmp_path / "packed")})
    Trainer(model, tokenizer, packed, rows, rows[4:6]).fit()
    assert calls == [12, 2]
