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
    (["--model", "llama-3.2-1b", "--k", "2", "--quantize", "nf3"], "invalid choice: 'nf3'"),
    (["--model", "llama-3.2-1b", "--k", "2", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--model", "llama-3.2-1b", "--k", "2", "--attn", "flash"], "invalid choice: 'flash'"),
    (["--model", "llama-3.2-1b", "--budget-gb", "inf"], "finite positive"),
    (["--model", "llama-3.2-1b", "--budget-gb", "nan"], "finite positive"),
    (["--model", "llama-3.2-1b", "--layers", "3,x"], "comma-separated block indices"),
    (["--model", "llama-3.2-1b", "--layers", "3,16"], "out of range"),
    (["--model", "llama-3.2-1b", "--layers", "3", "--k", "2"], "not allowed with argument"),
    (["--model", "llama-3.2-1b", "--k", "2", "--optimizer", "lion"], "optimizer"),
    (["--model", "llama-3.2-1b", "--k", "2", "--seq-len", "0"], "seq_len"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("laet-fast plan: error:") and message in err and "\n" not in err


def test_help_lists_choices_and_every_option_has_help(capsys):
    assert cli.main(["plan", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for choices in ("{nf4,fp4,int8,none}", "{adamw,adamw8bit}", "{bf16,fp16,fp32}", "{sdpa,eager}"):
        assert choices in out
    assert "tokens per sequence" in out and "sequences per optimizer step" in out
    assert cli.main(["plan", "--model", "smollm2-135m", "--k", "1", "--quantize", "NF4", "--dtype", "BF16"]) == 0


def test_k_that_does_not_fit_is_still_answered(capsys):
    """--budget-gb 12 --k 8 on a model where nothing fits used to print "0" and drop the answer for k=8."""
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--budget-gb", "12", "--k", "8"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(shape_config("llama-3.1-8b"), 8, 1024)
    assert "How many layers fit in 12 GiB: 0" in out
    assert f"--k 8 does NOT fit in 12 GiB ({plan.total / GIB:.2f} GiB)." in out


def test_arbitrary_block_set(capsys):
    config = shape_config("llama-3.2-1b")
    assert cli.main(["plan", "--model", "llama-3.2-1b", "--layers", "3,7,12", "--budget-gb", "12", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = plan_memory(config, [3, 7, 12], 1024)
    assert data["plan"]["layers"] == [3, 7, 12] and data["plan"]["total"] == plan.total
    assert data["fits"] is (plan.total <= 12 * GIB)
    assert cli.main(["plan", "--model", "llama-3.2-1b", "--layers", "12,3,7"]) == 0
    assert "train 3 of 16 blocks [3, 7, 12]" in capsys.readouterr().out


def test_gguf_header_names_the_file(capsys):
    from laet_fast.loading import demo_model_path

    try:
        path = demo_model_path()
    except ValueError as err:
        pytest.skip(str(err))
    assert cli.main(["plan", "--model", path, "--k", "2", "--seq-len", "64"]) == 0
    assert capsys.readouterr().out.startswith(f"Memory plan for {path}: train 2 of 30 blocks")


def test_built_in_shape_imports_neither_torch_nor_transformers(tmp_path):
    import subprocess
    import sys

    script = ("import sys, io, contextlib; from laet_fast import cli\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    assert cli.main(['plan', '--model', 'llama-3.1-8b', '--budget-gb', '12']) == 0\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)  # not the repository root, whose kernels/ would shadow Hugging Face's
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_names_and_train_help_import_neither_torch_nor_transformers(tmp_path):
    """laet_fast.names is where every method, task, optimizer and quantization name is defined, torch-free."""
    import subprocess
    import sys

    script = ("import sys, io, contextlib; from laet_fast import cli, names\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    try:\n"
              "        cli.main(['train', '--help'])\n"
              "    except SystemExit:\n"
              "        pass\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_version(capsys):
    import laet_fast

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"laet-fast {laet_fast.__version__}"


def test_loss_chunk_plans_the_chunked_lm_head_loss(capsys):
    argv = ["plan", "--model", "llama-3.1-8b", "--k", "4", "--quantize", "nf4", "--optimizer", "adamw8bit", "--json"]
    assert cli.main([*argv, "--loss-chunk", "256"]) == 0
    chunked = json.loads(capsys.readouterr().out)["plan"]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["plan"]
    config = shape_config("llama-3.1-8b")
    expected = plan_memory(config, 4, 1024, quantize_frozen="nf4", optimizer="adamw8bit", loss_chunk=256)
    assert chunked["total"] == expected.total < plain["total"]
    # The README's figures: logits 1.71 -> 0.33 GiB, total 11.68 -> 10.84 GiB.
    assert (round(plain["logits"] / GIB, 2), round(chunked["logits"] / GIB, 2)) == (1.71, 0.33)
    assert (round(plain["total"] / GIB, 2), round(chunked["total"] / GIB, 2)) == (11.68, 10.84)
    assert cli.main([*argv, "--loss-chunk", "-1"]) == 2
