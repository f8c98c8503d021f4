"""Tests of benchmarks/bench_spans.py: the embedded corpus, and a tiny run (5 examples) end to end.

The run takes a few seconds (spaCy load, two tokenizers trained on the corpus, 5 examples parsed
three times); the numbers it writes are only checked for sanity, not for speed.
"""

from __future__ import annotations

import csv
import math
from datetime import datetime

import pytest

from benchmarks import bench_spans
from mta.spans import collate_unit_spans

METRICS = (
    "load_average",
    "extract_units",
    "words_per_example",
    "phrases_per_example",
    "cache_read",
    "cache_bytes_per_example",
    "prepare_n1",
    "prepare_n2",
    "unit_pool_p1",
    "unit_pool_p2",
    "pad_unit_spans",
    "collate_unit_spans_1tok",
    "collate_unit_spans_2tok",
)
N_EXAMPLES = 5


def test_corpus_is_deterministic_and_dolly_sized():
    passages = bench_spans.corpus_passages()
    assert passages == bench_spans.corpus_passages()
    assert len(passages) >= 100  # enough for the default --examples
    sizes = [len(p.split()) for p in passages]
    limit = bench_spans.WORDS_PER_EXAMPLE + bench_spans.MAX_SENTENCE_WORDS
    assert all(bench_spans.WORDS_PER_EXAMPLE <= s < limit for s in sizes)
    assert sum(sizes) / len(sizes) < 1.2 * bench_spans.WORDS_PER_EXAMPLE
    assert not any("\n" in p or "***" in p for p in passages)  # prose only, no headings
    chosen = bench_spans.select_examples(passages, N_EXAMPLES)
    assert len(set(chosen)) == N_EXAMPLES and chosen[0] == passages[0]


@pytest.mark.parametrize("n", [0, -1, 10**6])
def test_select_examples_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="examples must be in"):
        bench_spans.select_examples(["a b c"] * 3, n)


@pytest.mark.parametrize("flag", ["--examples", "--repeats", "--reps", "--prepare-examples"])
def test_cli_rejects_non_positive_counts(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_spans.main([flag, "0"])
    assert exc.value.code == 2
    assert f"{flag} must be a positive int" in capsys.readouterr().err


def test_tiny_run_writes_sane_csv_and_markdown(tmp_path, capsys, monkeypatch):
    pytest.importorskip("spacy")
    collated_with = []  # per timed collation call: whether it was given teacher offsets

    def recording_collate(units, student_offsets, teacher_offsets=None):
        collated_with.append(teacher_offsets is not None)
        return collate_unit_spans(units, student_offsets, teacher_offsets)

    monkeypatch.setattr(bench_spans, "collate_unit_spans", recording_collate)
    out = tmp_path / "spans.csv"
    args = ["--examples", str(N_EXAMPLES), "--repeats", "3", "--reps", "50", "--out", str(out)]
    args += ["--prepare-examples", str(N_EXAMPLES)]
    assert bench_spans.main(args) == 0
    printed = capsys.readouterr().out

    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench_spans.COLUMNS
        rows = {r["metric"]: r for r in reader}
    assert tuple(rows) == METRICS
    for metric, row in rows.items():
        value = float(row["value"])
        assert math.isfinite(value), metric
        assert value > 0 or (metric == "load_average" and value == 0), (metric, value)
        assert all(row[c] for c in ("examples", "detail", "machine", "commit", "date")), metric
        datetime.fromisoformat(row["date"].replace("Z", "+00:00"))
    assert {int(r["examples"]) for r in rows.values()} == {N_EXAMPLES}  # one batch of all 5
    assert {rows[m]["unit"] for m in METRICS[-3:]} == {"ms"}
    # ~100-word passages: about as many spaCy words, a third as many phrases (README: 101 / 35).
    assert 80 <= float(rows["words_per_example"]["value"]) <= 200
    assert 15 <= float(rows["phrases_per_example"]["value"]) <= 80
    # Reading the cache is far cheaper than parsing (two orders of magnitude, so the 5x margin
    # survives a loaded machine). The two collation timings are too close to order reliably, so
    # the test checks what each one timed: the student's tokenizer alone, then both.
    assert float(rows["cache_read"]["value"]) > 5 * float(rows["extract_units"]["value"])
    half = len(collated_with) // 2
    assert half and collated_with == [False] * half + [True] * half
    assert "WordPiece" not in rows["collate_unit_spans_1tok"]["detail"]
    assert "WordPiece" in rows["collate_unit_spans_2tok"]["detail"]

    assert bench_spans.main(["--markdown", str(out)]) == 0
    table = capsys.readouterr().out
    assert table == printed  # the run prints the table of the CSV it wrote
    body = [line for line in table.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in body] == list(METRICS)
    assert rows["extract_units"]["machine"] in table
    assert "needs 61.5 examples/s; `unit_pool_p1` gives" in table  # 16 examples per 0.26 s
