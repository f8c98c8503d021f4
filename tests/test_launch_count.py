"""benchmarks.launch_count: what the counter counts, and the committed counts of the MTA step.

The counts are exact (they do not depend on timing), so the committed CSV — the CPU run's, with
the interpreter's tile sizes — must equal what the code does now: a change that adds launches or
host synchronizations to the step shows up here and in the CSV's diff. The step's budget is 60
launches and 0 host synchronizations (docs/design.md §4), which the test holds.
"""

from __future__ import annotations

import pytest
import torch

import mta_kernels as mk
from benchmarks import launch_count as L


def test_counts_launches_views_and_syncs():
    x = torch.ones(4, 3)

    def fn():
        y = x.view(12) + 1  # a view (not counted), an add
        z = y.reshape(3, 4).t().contiguous()  # views, then one copy
        torch.tensor([1.0, 2.0])  # host data: a copy to the device
        return z.sum().item() + bool(z.any())  # sum, any, two reads to the host

    c = L.count(fn)
    assert dict(c.aten) == {"add": 1, "clone": 1, "sum": 1, "any": 1}
    assert dict(c.syncs) == {"item": 1, "__bool__": 1}
    assert sum(c.host_to_device.values()) == 1
    assert not c.triton


def test_counts_triton_launches_and_what_launchers_do(device):
    if device == "cpu" and not mk._switches.SWITCHES.interpreter:
        pytest.skip("no Triton path here")
    hidden = torch.randn(2, 8, 4, device=device)
    spans = torch.tensor([[[0, 3], [3, 8]]] * 2, device=device)
    mask = torch.ones(2, 2, dtype=torch.bool, device=device)
    with mk.assume_valid_spans():
        c = L.count(lambda: mk.span_pool(hidden, spans, mask))
    assert dict(c.triton) == {"_span_sum_kernel": 1}
    assert c.aten["sort"] == 1  # the span index is built inside the op
    assert not c.syncs


@pytest.mark.skipif(torch.cuda.is_available(), reason="the committed counts are the CPU run's")
def test_committed_counts_are_current(monkeypatch):
    # as `python -m benchmarks.launch_count` runs: without the suite's NaN-filled outputs
    monkeypatch.setattr(mk._switches.SWITCHES, "poison_outputs", False)
    fused, _ = rows = L.rows(torch.device("cpu"))
    assert rows == L.read_csv(L.RESULTS), (
        "the MTA step's launches changed: python -m benchmarks.launch_count "
        "--out benchmarks/results/launch_count.csv"
    )
    assert fused["path"] == "fused"
    assert fused["launches"] <= 60 and fused["host_syncs"] == 0, "over the step's budget"
