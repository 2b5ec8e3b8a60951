"""Compile Triton kernels for real GPUs on a machine without one, and record kernel launches.

Triton's compiler and the ``ptxas`` it ships need no GPU, but the interpreter the suite runs under
(``TRITON_INTERPRET=1``, set by conftest.py) turns every kernel into Python, so compiles run in a
subprocess without it.
"""
import inspect
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without_interpreter(argv: list[str], cache_dir, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``argv`` in the repository root without ``TRITON_INTERPRET`` and with Triton's cache in
    ``cache_dir``; stdout and stderr captured as text.

    Skips on a Triton whose ``ASTSource`` lacks the ``constexprs`` argument (older than 3.3).
    """
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ASTSource predates the `constexprs` argument the compile scripts use")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_compile_script(script: str, cache_dir) -> dict[str, str]:
    """Run ``script`` (which prints ``name value`` lines about the PTX it built) without the interpreter.

    Returns the printed pairs.
    """
    done = run_without_interpreter([sys.executable, "-c", script], cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split() for line in done.stdout.splitlines() if line.count(" ") == 1)


class RecordingKernel:
    """Stands in for a @triton.jit kernel: records each launch's grid, arguments and options."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))
