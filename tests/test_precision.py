"""The operand-precision model (benchmarks/precision.py) and the kernels in each fp32 mode."""

import pytest
import torch
from helpers import rel_error

import mta_kernels as mk
from benchmarks import precision
from mta_kernels import reference as ref
from mta_kernels._switches import SWITCHES


def test_tf32_rounding_keeps_ten_mantissa_bits_ties_away():
    one = torch.tensor([1.0])
    ulp = 2.0**-10
    assert precision.round_tf32(one + ulp / 4).item() == 1.0
    assert precision.round_tf32(one + ulp / 2).item() == 1.0 + ulp  # a tie: away from zero
    assert precision.round_tf32(-(one + ulp / 2)).item() == -(1.0 + ulp)
    assert precision.round_tf32(one + 3 * ulp / 4).item() == 1.0 + ulp
    x = torch.randn(1000)
    assert (precision.round_tf32(x) - x).abs().le(x.abs() * 2.0**-11).all()


def test_tf32_truncation_drops_the_low_thirteen_bits():
    ulp = 2.0**-10
    assert precision.truncate_tf32(torch.tensor([1.0 + 0.99 * ulp])).item() == 1.0
    assert precision.truncate_tf32(torch.tensor([-(1.0 + 0.99 * ulp)])).item() == -1.0
    x = torch.randn(1000)
    assert (precision.truncate_tf32(x).abs() <= x.abs()).all()


def test_tf32x3_is_near_fp32_and_tf32_is_not():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 64, generator=gen)
    exact = a.double() @ b.double()
    errors = {mode: rel_error(precision.product(a, b, mode), exact) for mode in precision.MODES}
    assert errors["tf32x3"] < 3 * errors["ieee"] + 1e-7
    assert errors["tf32"] > 100 * errors["tf32x3"]
    assert errors["bf16"] > errors["tf32"]


def test_committed_model_is_current():
    """benchmarks/results/precision_model.csv is what the model computes (each figure within 25%:
    the fp32 sums' order may differ between CPUs), and it keeps the facts the policy rests on."""
    committed = precision.read_csv(precision.RESULTS)
    computed = precision.rows()
    assert [(r["part"], r["regime"], r["quantity"]) for r in committed] == [
        (r["part"], r["regime"], r["quantity"]) for r in computed
    ]
    for old, new in zip(committed, computed, strict=True):
        for mode in precision.MODES:
            if old[mode] == "—":
                assert new[mode] == "—"
            else:
                assert float(new[mode]) == pytest.approx(float(old[mode]), rel=0.25), (old, mode)
    late = {r["quantity"]: r for r in computed if r["regime"] == "teacher = student + 1e-2"}
    # the default (tf32x3) is as good as exact fp32 products, late in training too
    assert float(late["loss"]["tf32x3"]) < 2 * float(late["loss"]["ieee"]) + 1e-6
    # bf16 unit-norm rows lose the loss entirely late in training: not offered for fp32 units
    assert float(late["loss"]["bf16"]) > 0.3


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("regime", ["independent", "teacher = student + 1e-2"])
def test_structural_loss_error_matches_the_model_on_cuda(mode, regime, monkeypatch):
    """The kernels in each fp32 mode at the paper shape: the loss's error against float64 is
    within 4× the model's figure (plus 1e-6 for the order of the fp32 sums)."""
    model = {(r["regime"], r["quantity"]): r for r in precision.read_csv(precision.RESULTS)}[
        regime, "loss"
    ]
    shape = precision.PAPER
    gen = torch.Generator().manual_seed(0)
    student = precision.hidden_like(shape.K, shape.d_student, gen, shape.B)
    if regime == "independent":
        teacher = precision.hidden_like(shape.K, shape.d_teacher, gen, shape.B)
    else:
        embed = torch.linalg.qr(
            torch.randn(shape.d_teacher, shape.d_student, generator=gen, dtype=torch.float64)
        )[0]
        noise = torch.randn(shape.B, shape.K, shape.d_teacher, generator=gen, dtype=torch.float64)
        teacher = student @ embed.mT + 1e-2 * student.std() * noise
    p = torch.rand(shape.B, shape.K, generator=gen, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    mask = torch.ones(shape.B, shape.K, dtype=torch.bool)
    exact = ref.structural_loss(student, teacher, p, mask, "cosine", "none")
    monkeypatch.setattr(SWITCHES, "fp32_dot_precision", mode)
    got = mk.structural_loss(
        *(x.float().cuda() for x in (student, teacher, p)), mask.cuda(), "cosine", "none"
    )
    assert rel_error(got.cpu(), exact) <= 4 * float(model[mode]) + 1e-6
