"""``laet-fast plan`` end to end through ``laet_fast.cli.main``."""
import json

import pytest

from laet_fast import cli
from laet_fast.memory import GIB, max_layers_for_budget, plan_memory, shape_config


def test_budget_answer_matches_the_library(capsys):
    argv = ["plan", "--model", "llama-3.1-8b", "--budget-gb", "12", "--quantize", "nf4", "--optimizer", "adamw8bit"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    config = shape_config("llama-3.1-8b")
    k = max_layers_for_budget(config, 12, seq_len=1024, quantize_frozen="nf4", optimizer="adamw8bit")
    assert 0 < k < 32
    assert f"How many layers fit in 12 GiB: {k} of 32 (train the last {k})" in out
    plan = plan_memory(config, k, 1024, quantize_frozen="nf4", optimizer="adamw8bit")
    assert f"{plan.total / GIB:.3f}" in out and "frozen weights" in out and "optimizer state" in out
    assert f"{k + 1} would need" in out


def test_explicit_k_with_budget(capsys):
    argv = ["plan", "--model", "llama-3.2-3b", "--budget-gb", "8", "--k", "4", "--quantize", "nf4",
            "--optimizer", "adamw8bit", "--seq-len", "512", "--batch-size", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "train 4 of 28 blocks [24-27]" in out and "seq 512 x batch 2" in out
    assert "--k 4 fits in 8 GiB" in out


def test_k_only_and_json(capsys):
    assert cli.main(["plan", "--model", "smollm2-135m", "--k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["layers"] == [27, 28, 29] and data["max_layers"] is None
    assert data["plan"]["total"] == plan_memory(shape_config("smollm2-135m"), 3, 1024).total


def test_nothing_fits(capsys):
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--budget-gb", "4"]) == 0
    out = capsys.readouterr().out
    assert "How many layers fit in 4 GiB: 0" in out and "--quantize nf4" in out


def test_model_folder(tmp_path, capsys):
    from transformers import LlamaConfig

    from tiny_models import TINY_CONFIGS

    LlamaConfig(**TINY_CONFIGS["llama"][1]).save_pretrained(tmp_path)
    assert cli.main(["plan", "--model", str(tmp_path), "--budget-gb", "1", "--seq-len", "64"]) == 0
    assert "How many layers fit in 1 GiB: 3 of 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-9b", "--budget-gb", "12"], "built-in shape"),
    (["--model", "llama-3.2-1b"], "--budget-gb"),
    (["--model", "llama-3.2-1b", "--k", "17"], "out of range"),
    (["--model", "llama-3.2-1b", "--budget-gb", "-3"], "positive"),
    (["--model", "llama-3.2-1b", "--k", "2", "--quantize", "nf3"], "quantization"),
    (["--model", "llama-3.2-1b", "--k", "2", "--optimizer", "lion"], "optimizer"),
    (["--model", "llama-3.2-1b", "--k", "2", "--seq-len", "0"], "seq_len"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("laet-fast plan: error:") and message in err and "\n" not in err
