"""Every Python example in README.md runs as written (in a fresh interpreter)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path):
    if "from_pretrained(" in code:
        pytest.skip("loads a tokenizer from the Hugging Face hub (no network here)")
    if "extract_units" in code or "cached_units" in code:
        pytest.importorskip("spacy")
    # As a user runs them: CPU tensors take the eager reference (the kernel tests cover the
    # interpreter), which keeps the training example fast.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
