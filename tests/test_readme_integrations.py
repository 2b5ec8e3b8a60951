"""The README's Integrations examples run as written: the Trainer with LaetCallback, the PEFT bridge, and the
torchrun script with 2 CPU processes (gloo).

Their code fences are ``py``, not ``python``, so that tests/test_readme.py (which runs every ``python`` block
in one namespace, in order) does not run them as well; each is run here on its own.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Integrations"
NEXT = "## Layer probes and embedding fusion"


def section() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + len(SECTION))]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(), flags=re.S)


def example(marker: str) -> str:
    (found,) = [b for b in blocks("py") if marker in b]
    return found


def torchrun_line() -> str:
    (line,) = [line for b in blocks("bash") for line in b.splitlines() if line.startswith("torchrun ")]
    return line


def test_section_is_in_place_with_three_examples():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert text.index(SECTION) < text.index(NEXT)
    assert not re.search(r"^## ", text[text.index(SECTION) + 3:text.index(NEXT)], flags=re.M)
    assert "```python" not in section()
    trainer, peft_block, script = example("eval_strategy"), example("to_peft_config"), example("# laet_ddp.py")
    assert script.startswith("# laet_ddp.py") and "laet_ddp.py" in torchrun_line()
    for block in (trainer, peft_block, script):
        compile(block, README, "exec")


@pytest.fixture
def demo(monkeypatch, tmp_path):
    pytest.importorskip("gguf", reason="the demo model needs gguf: pip install -e '.[demo]'")
    from laet_fast.loading import demo_data_path, demo_model_path

    try:
        demo_model_path(), demo_data_path()
    except Exception as err:  # the demo packages are an install step of the README, not a dependency
        pytest.skip(str(err))
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")  # the kernels have their own tests
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_trainer_with_callback_example(demo, capsys):
    import torch

    from laet_fast.layers import find_layers

    namespace: dict = {}
    exec(compile(example("eval_strategy"), README, "exec"), namespace)
    out = capsys.readouterr().out
    callback, trainer, model = namespace["callback"], namespace["trainer"], namespace["model"]
    assert len(callback.selection) == 4 and "Selection(layers=" in out
    grad = callback.scores["grad_norm"]
    assert set(callback.selection.layers) == set(sorted(range(30), key=lambda i: -grad[i])[:4])
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2
    trained = {i for i, b in enumerate(find_layers(model)) if any(p.requires_grad for p in b.parameters())}
    assert trained == set(callback.selection.layers)
    state = trainer.optimizer.optimizer.state
    assert {id(p) for p in state} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(torch.isfinite(torch.tensor(h["eval_loss"])) for h in trainer.state.log_history if "eval_loss" in h)


@pytest.mark.slow
def test_peft_example(demo, capsys):
    namespace: dict = {}
    exec(compile(example("to_peft_config"), README, "exec"), namespace)
    out = capsys.readouterr().out
    chosen = namespace["selection"].layers
    assert f"{list(chosen)} layers" in out and "trainable params" in out
    adapted = {int(re.search(r"\.layers\.(\d+)\.", name).group(1)) for name, module
               in namespace["peft_model"].named_modules() if name.endswith("lora_A")}
    assert adapted == set(chosen) and len(chosen) == 4


@pytest.mark.slow
def test_torchrun_example_with_two_cpu_processes(demo):
    with open(demo / "laet_ddp.py", "w", encoding="utf-8") as f:
        f.write(example("# laet_ddp.py"))
    args = shlex.split(torchrun_line())
    assert args[0] == "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args[1:]], cwd=demo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    match = re.search(r"Selection\(layers=\[(\d+), (\d+)\] of 30.*?\[([^\]]*)\]\s*$", done.stdout, flags=re.M)
    assert match, done.stdout[-3000:]
    losses = [float(x) for x in match.group(3).split(",")]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
