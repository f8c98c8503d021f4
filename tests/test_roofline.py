"""The design-versus-floor model of one MTA step (benchmarks/roofline.py)."""

from benchmarks import roofline


def test_committed_model_is_current():
    """benchmarks/results/roofline_model.csv (and the README table made from it) is what the
    model computes from the launchers' current tile sizes and choices."""
    assert roofline.read_csv(roofline.RESULTS) == [
        {k: str(v) for k, v in row.items()} for row in roofline.rows()
    ]


def test_design_facts():
    parts = {p.part: p for p in roofline.parts()}
    importance = parts["token importance (3 teacher layers)"]
    assert importance.design.flops == 2 * importance.floor.flops  # two passes over the scores
    saved = parts["structural loss forward + backward"]
    recompute = parts["structural loss, had the backward recomputed the Grams"]
    assert "saved error matrix" in saved.note  # the paper's shape takes the saved backward
    assert saved.design.flops < 0.5 * recompute.design.flops
    assert saved.design.bytes < 0.5 * recompute.design.bytes
    projection = parts["HRA projection forward + backward (ATen)"]
    assert projection.design.flops == max(p.design.flops for p in parts.values())
