"""The reporting of the toy ablation (benchmarks/ablation.py): the committed runs are complete,
each method is shown at its best learning rate, and the README table is made from the CSV."""

import csv

import pytest

from benchmarks import ablation


def _write(path, perplexities):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ablation.COLUMNS)
        writer.writeheader()
        for (method, lr, seed), ppl in perplexities.items():
            writer.writerow(
                {
                    "method": method,
                    "learning_rate": lr,
                    "seed": seed,
                    "perplexity": ppl,
                    "machine": "test",
                    "commit": "abc",
                    "date": "2026-12-02T00:00:00Z",
                }
            )


def test_summary_picks_each_methods_best_learning_rate(tmp_path):
    runs = {}
    for i, method in enumerate(ablation.METHODS):
        for seed in ablation.SEEDS:
            runs[method, "0.001", str(seed)] = 100 + i + seed  # KD better at 0.001 ...
            runs[method, "0.003", str(seed)] = 100 + i + seed + (5 if i == 0 else -5)
    path = tmp_path / "runs.csv"
    _write(path, runs)
    table = ablation.summary(path)
    best = {r["method"]: r["learning_rate"] for r in table if r["best"]}
    assert best["KD"] == "0.001" and best["KD+DSA"] == "0.003"
    kd = next(r for r in table if r["method"] == "KD" and r["best"])
    assert kd["mean"] == pytest.approx(101.0) and kd["std"] == pytest.approx(1.0)
    text = ablation.markdown_table(path)
    assert "| KD | 0.001 | 101.00 ± 1.00 |" in text
    png = tmp_path / "plot.png"
    ablation.plot(path, png)
    assert png.stat().st_size > 1000


def test_committed_runs_are_complete():
    """Every method × learning rate × seed, once, with a finite perplexity."""
    rows = list(csv.DictReader(ablation.RESULTS.open()))
    keys = [(r["method"], float(r["learning_rate"]), int(r["seed"])) for r in rows]
    expected = [
        (m, lr, s)
        for lr in ablation.LEARNING_RATES
        for s in ablation.SEEDS
        for m in ablation.METHODS
    ]
    assert sorted(keys) == sorted(expected)
    assert all(1.0 < float(r["perplexity"]) < 1e4 for r in rows)
