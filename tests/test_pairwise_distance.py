"""Fused pairwise distances vs the reference."""

import pytest
import torch
from helpers import FUSED_DTYPES, check_against_reference

import mta_kernels as mk
from mta_kernels import reference as ref

SHAPES = [
    (2, 23, 29),
    (1, 3, 2),
    (2, 40, 70),
]  # (B, K, d); d = 1 makes every cosine gradient exactly 0

pytestmark = pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh


def make_units(batch: int, num_units: int, width: int, zero_row: bool = True):
    units = torch.randn(batch, num_units, width)
    if num_units > 5:
        units[0, 3] = units[0, 5]  # duplicate units: zero distance, finite gradient
        if zero_row:
            units[-1, 2] = 0.0
    mask = torch.rand(batch, num_units) > 0.2
    return units, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_reference(shape, dtype, metric, device, seed):
    # A valid all-zero unit has a 1e12-scale cosine gradient: not representable in fp16.
    units, mask = make_units(*shape, zero_row=dtype == torch.float32)
    check_against_reference(
        mk.pairwise_distance,
        ref.pairwise_distance,
        [units, mask, metric],
        grad_args=(0,),
        dtype=dtype,
        device=device,
        seed=seed,
        # 1 − cos of two nearly parallel random 2-d units is ~1e-4 and known to ~2e-7 in fp32
        forward_atol=1e-6 if metric == "cosine" else 0.0,
        # K = 3 with ~20% of units masked: two valid units, whose gradient is exactly 0
        backward_atol=1e-6,
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_without_mask_strided(metric, device, seed):
    units, _ = make_units(2, 17, 11)
    check_against_reference(
        mk.pairwise_distance,
        ref.pairwise_distance,
        [units, None, metric],
        grad_args=(0,),
        dtype=torch.float32,
        device=device,
        seed=seed,
        non_contiguous=True,
    )


def test_all_units_identical_euclidean(device):
    units = torch.ones(1, 4, 3, device=device, requires_grad=True)
    dist = mk.pairwise_distance(units, metric="euclidean")
    dist.sum().backward()
    assert torch.equal(dist.detach().cpu(), torch.zeros(1, 4, 4))
    assert torch.isfinite(units.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_bf16_cuda(metric, seed):
    units, mask = make_units(4, 300, 768, zero_row=False)
    check_against_reference(
        mk.pairwise_distance,
        ref.pairwise_distance,
        [units, mask, metric],
        grad_args=(0,),
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )
