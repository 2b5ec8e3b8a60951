"""The README's main job, `laet-fast train` on its defaults (the real demo), run as written but on fewer texts.

The demo takes 2,500 sentences (the accuracy table's scale: minutes on a 2-core CPU); the suite runs the same
command on 400 of them (``--subset 400``: 320 to train, in 20 steps of the default batch of 16), so that it checks
the command, not the accuracy.
"""
import json
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def main_job_arguments():
    """The arguments after `laet-fast` in the README's first bash block (the quick start's main job)."""
    with open(README, encoding="utf-8") as handle:
        block = re.search(r"```bash\n(.*?)\n```", handle.read(), re.S).group(1)
    return block.rsplit("&& laet-fast ", 1)[1].split()


@pytest.mark.slow
def test_readme_main_job_trains_and_reports(tmp_path):
    args = main_job_arguments()
    assert args[0] == "train"
    out = tmp_path / "run"
    # As a user runs it: without the TRITON_INTERPRET=1 that conftest sets for the kernel tests (under the
    # interpreter the sweep's pooling kernel takes minutes; without it, CPU runs take the PyTorch path).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-m", "laet_fast", *args, "--subset", "400", "--out", str(out)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "laet_fast training report" in done.stdout and "method laet" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["head_layers"] == sorted(report["selection"]) and report["steps"] == 20
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    with open(out / "log.jsonl", encoding="utf-8") as handle:
        assert [json.loads(line)["step"] for line in handle] == list(range(1, 21))
    assert (out / "model" / "config.json").is_file()
