"""bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" notice is silenced, and
only that one: the same logger's other warnings still reach the user."""
import logging
import subprocess
import sys

import laet_fast  # noqa: F401  (installs the filter)

NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
          "`pip install kernels` and the kernels >= 0.11.1")


def test_only_that_message_is_dropped(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(NOTICE, "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("bitsandbytes").warning(NOTICE, "elsewhere")  # another logger: not ours to hide
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["some other bitsandbytes warning", NOTICE % "elsewhere"]


def test_import_prints_nothing_about_kernels_community():
    """On a CPU with AVX512-BF16 bitsandbytes logs the notice at import; anywhere, nothing is printed."""
    script = "import laet_fast, bitsandbytes, laet_fast.quantize; laet_fast.quantize.require_bitsandbytes()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr
