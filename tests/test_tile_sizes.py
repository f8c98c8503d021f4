"""Every op with the GPU tile sizes (and their masks), not the interpreter's small tiles.

CI runs the kernels through the interpreter with 16–32 wide tiles to stay fast; this file runs
them once more with the tile sizes, warps and splits used on CUDA, at sizes that are not
multiples of them, so that the masks and loop bounds of those configurations are checked on CPU.
"""

import pytest
import torch
from helpers import check_against_reference, random_spans

import mta_kernels as mk
from mta_kernels import reference as ref
from mta_kernels._switches import SWITCHES

pytestmark = pytest.mark.kernels


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    monkeypatch.setattr(SWITCHES, "small_blocks", False)


def test_token_importance(device, seed):
    hidden = torch.randn(2, 150, 70)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 100:] = 0
    check_against_reference(
        mk.token_importance,
        ref.token_importance,
        [hidden, mask],
        grad_args=(),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


def test_span_pool_and_weights(device, seed):
    spans, mask = random_spans(2, 40, 140)
    args = [torch.randn(2, 140, 300), spans, mask, torch.rand(2, 140)]
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        args,
        grad_args=(0, 3),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )
    check_against_reference(
        mk.span_weights,
        ref.span_weights,
        [torch.rand(2, 140), spans, mask],
        grad_args=(0,),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance(metric, device, seed):
    units = torch.randn(2, 70, 80)
    check_against_reference(
        mk.pairwise_distance,
        ref.pairwise_distance,
        [units, torch.rand(2, 70) > 0.1, metric],
        grad_args=(0,),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.usefixtures("structural_design")
def test_structural_loss(metric, device, seed):
    student, teacher = torch.randn(2, 140, 70), torch.randn(2, 140, 90)
    weights = torch.rand(2, 140)
    check_against_reference(
        mk.structural_loss,
        ref.structural_loss,
        [
            student,
            teacher,
            weights / weights.sum(-1, keepdim=True),
            torch.rand(2, 140) > 0.1,
            metric,
            "none",
        ],
        grad_args=(0, 1, 2),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


def test_hidden_alignment(device, seed):
    check_against_reference(
        mk.hidden_alignment_loss,
        ref.hidden_alignment_loss,
        [
            torch.randn(2, 70, 300),
            torch.randn(2, 70, 300),
            torch.rand(2, 70),
            torch.rand(2, 70) > 0.3,
        ],
        grad_args=(0, 1, 2),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )
