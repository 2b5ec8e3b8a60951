"""The README's Python examples run as written, in order, on the real demo model and data."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf", reason="the demo model needs gguf: pip install -e '.[demo]'")
    from laet_fast.loading import demo_data_path, demo_model_path

    try:
        demo_model_path(), demo_data_path()
    except Exception as err:  # the demo packages are an install step of the README, not a dependency
        pytest.skip(str(err))
    # The interpreter would run the kernels on 30 full-size blocks in Python; the kernels have their
    # own tests, and this one checks the documented workflow.
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():
        exec(compile(block, README, "exec"), namespace)
    out = capsys.readouterr().out
    assert "model.layers.29" in out and "grad_norm" in out
    assert "strategy='cost_aware'" in out and (tmp_path / "tradeoff.png").exists()
    assert (tmp_path / "smollm2-laet" / "config.json").exists()
    reselector = namespace["reselector"]
    assert len(reselector.history) >= 2 and all(len(sel) == 4 for _, sel in reselector.history[1:])

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2-laet")
    assert len(reloaded.model.layers) == 30
    # The export is a complete model: it can be scored again (it had no tokenizer before).
    from laet_fast import cli

    assert (tmp_path / "smollm2-laet" / "tokenizer_config.json").exists()
    assert cli.main(["score", "--model", str(tmp_path / "smollm2-laet"), "--batches", "1", "--batch-size", "2",
                     "--max-length", "16", "--device", "cpu"]) == 0
    assert "model.layers.29" in capsys.readouterr().out
