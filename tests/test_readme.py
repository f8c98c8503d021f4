"""README.md is executed and current.

* Every Python block runs as written, in a fresh interpreter, from an empty folder. A block that
  loads from the Hugging Face hub says so on its first line (``# Needs the Hugging Face hub: gpt2,
  ...``); the test runs it with each named id replaced by a local stand-in saved the way a hub
  tokenizer is (``save_pretrained``), so the same loading code runs without a network.
* No other block reaches for the hub.
* Every generated section is what its command prints from the committed results
  (:mod:`benchmarks.readme_sections`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_spans, readme_sections

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
HUB_LINE = re.compile(r"^# Needs the Hugging Face hub: ([\w./, -]+?)(?: \(|$)")
FROM_HUB = re.compile(r"""from_pretrained\(\s*["']([^"']+)["']""")

# Local stand-ins for the hub ids the README names: tokenizers of the same kind, trained offline.
STAND_INS = {"gpt2": "byte_bpe", "bert-base-uncased": "wordpiece"}


def _hub_ids(code: str) -> list[str]:
    match = HUB_LINE.match(code)
    return [name.strip() for name in match.group(1).split(",")] if match else []


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    corpus = bench_spans.corpus_passages()[:200]
    folders = {}
    for name, kind in STAND_INS.items():
        folder = tmp_path_factory.mktemp(name.replace("/", "_"))
        bench_spans.train_tokenizer(kind, corpus).save_pretrained(folder)
        folders[name] = folder
    return folders


def test_blocks_name_every_hub_id_they_load():
    for i, code in enumerate(BLOCKS):
        loaded = set(FROM_HUB.findall(code))
        assert loaded <= set(_hub_ids(code)), f"block{i} loads {loaded} without saying so"
        assert set(_hub_ids(code)) <= set(STAND_INS), f"block{i}: no stand-in for its hub ids"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, stand_ins):
    # blocks that parse with spaCy: directly, or through MTADistillationTrainer's UnitPool
    if any(name in code for name in ("extract_units", "cached_units", "MTADistillationTrainer")):
        pytest.importorskip("spacy")
    for name in _hub_ids(code):
        code = re.sub(
            rf"""from_pretrained\(\s*["']{re.escape(name)}["']""",
            f"from_pretrained({str(stand_ins[name])!r}",
            code,
        )
    # As a user runs them: CPU tensors take the eager reference (the kernel tests cover the
    # interpreter), which keeps the training example fast.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"  # a block that still reached for the hub would fail at once
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_generated_sections_are_current():
    found = readme_sections.sections(TEXT)
    commands = [s.command for s in found]
    assert any("bench_spans --markdown" in c for c in commands)
    assert any("demo --table" in c for c in commands)
    for section in found:
        assert section.body == section.expected, (
            f"stale README section of `{section.command}`; run "
            "`python -m benchmarks.readme_sections --write`"
        )
