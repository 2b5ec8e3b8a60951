"""Compile Triton kernels for sm_90 (H100) on a machine without a GPU, to inspect the PTX."""
import inspect
import os
import subprocess
import sys

import pytest


def run_compile_script(script: str, cache_dir) -> dict[str, str]:
    """Run ``script`` (which prints ``name value`` lines about the PTX it built) without the interpreter.

    Returns the printed pairs. Skips on a Triton whose ``ASTSource`` lacks the ``constexprs``
    argument the scripts use.
    """
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ASTSource predates the `constexprs` argument the compile script uses")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split() for line in done.stdout.splitlines() if line.count(" ") == 1)
