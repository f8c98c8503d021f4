"""Every kernel variant the CUDA launchers use compiles for sm_90, without register spills.

Runs ``python -m benchmarks.compile_check`` in a fresh interpreter (the kernels must be compiled
by the real Triton compiler, not the interpreter this test session uses). Needs only Triton's
NVIDIA backend and its bundled ``ptxas``, no GPU.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Not marked `kernels`: benchmarks/gpu_check.sh runs that marker on the GPU, where this
# CPU-side compile check would only spend device time.


def test_all_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--arch", "90"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 failing variant(s)" in result.stdout
    # the variants are the JIT's own: recorded from the launchers, integer arguments specialized
    launched = int(re.search(r"(\d+) launched variants", result.stdout).group(1))
    assert launched >= 40, result.stdout[-4000:]
    assert "(÷16: T,D)" in result.stdout
