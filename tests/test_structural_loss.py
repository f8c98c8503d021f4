"""Fused structural (DSA) loss vs the reference."""

import pytest
import torch
from helpers import FUSED_DTYPES, check_against_reference, rel_error

import mta_kernels as mk
from mta_kernels import reference as ref
from mta_kernels._switches import SWITCHES
from mta_kernels.structural_loss import structural_design

SHAPES = [(3, 37, 19, 26), (2, 2, 3, 5), (1, 45, 70, 20)]  # (B, K, d_S, d_T)

pytestmark = pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh


def make_inputs(batch: int, num_units: int, width_s: int, width_t: int):
    student = torch.randn(batch, num_units, width_s)
    teacher = torch.randn(batch, num_units, width_t)
    if num_units > 5:
        student[0, 3], teacher[0, 3] = student[0, 5], teacher[0, 5]  # duplicate units
    mask = torch.rand(batch, num_units) > 0.2
    if batch > 2:
        mask[2] = False
        mask[2, 0] = True  # < 2 valid units: zero loss, zero gradient
    weights = torch.rand(batch, num_units)
    return student, teacher, weights / weights.sum(-1, keepdim=True), mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.usefixtures("structural_design")
def test_matches_reference(shape, dtype, metric, device, seed):
    student, teacher, weights, mask = make_inputs(*shape)
    check_against_reference(
        mk.structural_loss,
        ref.structural_loss,
        [student, teacher, weights, mask, metric, "none"],
        grad_args=(0, 1, 2),
        dtype=dtype,
        device=device,
        seed=seed,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.usefixtures("structural_design")
def test_student_only_grad_and_reductions(reduction, metric, device, seed):
    # The usual call: only the student requires grad; the teacher side gets nothing.
    student, teacher, weights, mask = make_inputs(2, 19, 12, 24)
    check_against_reference(
        mk.structural_loss,
        ref.structural_loss,
        [student, teacher, weights, mask, metric, reduction],
        grad_args=(0,),
        dtype=torch.float32,
        device=device,
        seed=seed,
        non_contiguous=True,
    )


def test_identical_geometry_is_zero(device):
    student = torch.randn(2, 9, 6, device=device)
    weights = torch.full((2, 9), 1 / 9, device=device)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    for metric in ("cosine", "euclidean"):
        loss = mk.structural_loss(student, 2.5 * student, weights, mask, metric)
        assert loss.abs().item() < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_bf16_cuda_paper_shape(metric, seed):
    student, teacher, weights, mask = make_inputs(8, 300, 768, 1600)
    check_against_reference(
        mk.structural_loss,
        ref.structural_loss,
        [student, teacher, weights, mask, metric, "none"],
        grad_args=(0,),
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.usefixtures("structural_design")
def test_nearly_equal_geometry(metric, device, seed):
    """Teacher = student + 1e-2 noise, the regime late in training: the loss only sees the
    differences D_S − D_T ≈ 1e-2 of distances ≈ 1, so a relative rounding ε of the distances is
    ≈ 100ε of the loss. Bound 2e-4 on the loss and the gradients against float64 (fp32 rows,
    exact or tf32x3 dots: ε ≈ 1e-7 per distance; measured ≤ 5e-5 on the interpreter)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 40, 24, generator=gen)
    teacher = student + 1e-2 * torch.randn(2, 40, 24, generator=gen)
    weights = torch.rand(2, 40, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    mask = torch.rand(2, 40, generator=gen) > 0.1
    rows = student.to(device).requires_grad_()
    loss = mk.structural_loss(rows, teacher.to(device), weights.to(device), mask.to(device), metric)
    (grad,) = torch.autograd.grad(loss, rows)
    exact_rows = student.double().requires_grad_()
    exact = ref.structural_loss(exact_rows, teacher.double(), weights.double(), mask, metric)
    (exact_grad,) = torch.autograd.grad(exact, exact_rows)
    assert exact.item() < 1e-4  # the regime: a loss of order (1e-2)^2
    assert rel_error(loss, exact) < 2e-4, f"seed={seed}"
    assert rel_error(grad, exact_grad) < 2e-4, f"seed={seed}"


@pytest.mark.parametrize("grad_args", [(2,), (1,), (1, 2)], ids=["p", "teacher", "teacher_p"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.usefixtures("structural_design")
def test_other_gradient_subsets(grad_args, metric, device, seed):
    """Gradients of ``p`` alone, of the teacher alone, and of both."""
    student, teacher, weights, mask = make_inputs(3, 37, 19, 26)
    check_against_reference(
        mk.structural_loss,
        ref.structural_loss,
        [student, teacher, weights, mask, metric, "none"],
        grad_args=grad_args,
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


@pytest.mark.usefixtures("structural_design")
def test_fewer_than_two_units_is_exactly_zero(device):
    """No pair, no loss: exactly 0 and a zero gradient on every design (the moments form's
    terms would otherwise cancel only to rounding, possibly below 0)."""
    student = torch.randn(3, 6, 5, device=device, requires_grad=True)
    teacher = torch.randn(3, 6, 7, device=device)
    mask = torch.zeros(3, 6, dtype=torch.bool, device=device)
    mask[1, 2] = True
    loss = mk.structural_loss(
        student, teacher, torch.rand(3, 6, device=device), mask, "cosine", "none"
    )
    assert torch.equal(loss, torch.zeros(3, device=device))
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_unknown_design_is_refused(monkeypatch):
    monkeypatch.setattr(SWITCHES, "structural_design", "tiles")
    with pytest.raises(ValueError, match="structural_design must be 'auto' or one of"):
        structural_design("cosine", 300, 768, 1600)


def test_design_is_chosen_by_shape():
    """The error matrix is saved while it is no larger than the inputs (cosine: K ≤ d_S + d_T;
    euclidean saves three K×K matrices: 3K ≤ d_S + d_T); the cosine moments form takes over when
    K·(d_S + d_T) > 2·(d_S² + d_S·d_T + d_T²) (K > 3700 at the paper's widths)."""
    assert SWITCHES.structural_design == "auto"
    assert structural_design("cosine", 300, 768, 1600) == "saved"
    assert structural_design("cosine", 2400, 768, 1600) == "recompute"
    assert structural_design("cosine", 3800, 768, 1600) == "moments"
    assert structural_design("euclidean", 300, 768, 1600) == "saved"
    assert structural_design("euclidean", 800, 768, 1600) == "recompute"
    assert structural_design("euclidean", 30000, 768, 1600) == "recompute"
    assert structural_design("cosine", 40, 8, 8) == "moments"
