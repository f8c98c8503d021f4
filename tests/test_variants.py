"""The paper-to-release ladder of benchmarks/variants.py (its ends are checked against MTALoss
when it runs)."""

import itertools

import pytest

from benchmarks import variants


def test_committed_ladder_is_current():
    """benchmarks/results/variants_cpu.csv (and the README table made from it) is what the ladder
    computes now: same steps, values within 1e-4 (fp32 sums may differ between CPUs)."""
    committed = variants.read_csv(variants.RESULTS)
    computed = variants.rows()
    assert [r["step"] for r in committed] == [r["step"] for r in computed]
    for old, new in zip(committed, computed, strict=True):
        assert (old["equations"], old["released"]) == (new["equations"], new["released"])
        for column in ("L_DSA", "L_HRA", "loss"):
            assert float(new[column]) == pytest.approx(float(old[column]), rel=1e-4), old["step"]


def test_each_difference_is_measured_on_the_term_it_changes():
    rows = {r["step"]: r for r in variants.rows()}
    order = [step for step, *_ in variants.STEPS]
    for before, after in itertools.pairwise(order):
        changed = [c for c in ("L_DSA", "L_HRA") if rows[before][c] != rows[after][c]]
        assert changed, f"{after} changes nothing on this batch"
    # the i<j reproductions: exactly half the paper's DSA
    assert float(rows["pairs_i_lt_j"]["L_DSA"]) == pytest.approx(
        float(rows["paper"]["L_DSA"]) / 2, rel=1e-5
    )
