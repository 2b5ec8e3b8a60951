import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from laet_fast import backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the tests run the compiled kernels")
def test_interpreter_runs_triton_on_cpu():
    assert backend.TRITON_INTERPRET, "tests/conftest.py must set TRITON_INTERPRET=1 before kernels are imported"
    assert backend.use_triton(torch.randn(3))


def test_force_reference(monkeypatch):
    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")
    assert not backend.use_triton(torch.randn(3))
    monkeypatch.setenv("LAET_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="LAET_FAST_BACKEND"):
        backend.use_triton(torch.randn(3))


def test_mixed_devices_refused():
    with pytest.raises(ValueError, match="several devices"):
        backend.use_triton(torch.randn(2), torch.empty(2, device="meta"))


def test_fallback_announced_once(monkeypatch, caplog):
    monkeypatch.setattr(backend, "TRITON_INTERPRET", False)
    monkeypatch.setattr(backend, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="laet_fast"):
        assert not backend.use_triton(torch.randn(2))
        assert not backend.use_triton(torch.randn(2))
    assert len([r for r in caplog.records if "PyTorch reference path" in r.message]) == 1


def test_no_interpreter_no_cuda_uses_reference_in_fresh_process():
    """Without TRITON_INTERPRET and CUDA a Triton launch would fail with '0 active drivers'; the
    library must compute the same numbers through its PyTorch path instead, and say so once."""
    script = textwrap.dedent(
        """
        import torch
        from laet_fast.kernels.hidden_stats import accumulate_hidden_stats, new_stats_buffer, hidden_stats_reference
        torch.manual_seed(0)
        h_in, h_out = torch.randn(37, 72), torch.randn(37, 72)
        mask = torch.rand(37) > 0.3
        acc = new_stats_buffer(1, "cpu")
        accumulate_hidden_stats(h_in, h_out, mask, acc[0])
        accumulate_hidden_stats(h_in, h_out, mask, acc[0])
        ref = hidden_stats_reference(h_in, h_out, mask)
        assert torch.allclose(acc[0, :4].double(), 2 * ref[:4], rtol=1e-5), (acc, ref)
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LAET_FAST_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
    assert result.stderr.count("PyTorch reference path") == 1, result.stderr
