"""Fused hidden alignment (HRA) loss vs the reference."""

import pytest
import torch
from helpers import FUSED_DTYPES, check_against_reference

import mta_kernels as mk
from mta_kernels import reference as ref

# (B, T, d); d = 1 would make cos = ±1 with an exactly-zero gradient (no relative error bound)
SHAPES = [(3, 37, 45), (1, 1, 3), (2, 20, 130)]

pytestmark = pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh


def make_inputs(batch: int, num_tokens: int, width: int, zero_rows: bool = True):
    student = torch.randn(batch, num_tokens, width)
    teacher = torch.randn(batch, num_tokens, width)
    if num_tokens > 3 and zero_rows:
        # Zero norm: the 1e-8 clamp is active (its 1e8-scale gradient overflows 16-bit dtypes).
        student[0, 2] = 0.0
        teacher[-1, 3] = 0.0
    return student, teacher, torch.rand(batch, num_tokens), torch.rand(batch, num_tokens) > 0.3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(shape, dtype, reduction, device, seed):
    student, teacher, weights, mask = make_inputs(*shape, zero_rows=dtype == torch.float32)
    check_against_reference(
        mk.hidden_alignment_loss,
        ref.hidden_alignment_loss,
        [student, teacher, weights, mask, reduction],
        grad_args=(0, 1, 2),
        dtype=dtype,
        device=device,
        seed=seed,
    )


def test_student_only_grad_strided(device, seed):
    student, teacher, weights, mask = make_inputs(2, 15, 33)
    check_against_reference(
        mk.hidden_alignment_loss,
        ref.hidden_alignment_loss,
        [student, teacher, weights, mask.int()],
        grad_args=(0,),
        dtype=torch.float32,
        device=device,
        seed=seed,
        non_contiguous=True,
    )


@pytest.mark.cuda
def test_bf16_cuda(seed):
    student, teacher, weights, mask = make_inputs(8, 512, 1600, zero_rows=False)
    check_against_reference(
        mk.hidden_alignment_loss,
        ref.hidden_alignment_loss,
        [student, teacher, weights, mask, "mean"],
        grad_args=(0,),
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )
