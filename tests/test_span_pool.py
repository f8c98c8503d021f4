"""Fused span pooling and span weights vs the reference."""

import contextlib

import pytest
import torch
from helpers import FUSED_DTYPES, check_against_reference, random_spans, word_spans

import mta_kernels as mk
from mta_kernels import reference as ref

SHAPES = [(3, 41, 37, 9), (2, 7, 1, 5), (1, 70, 130, 24)]  # (B, T, d, K)

pytestmark = pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_span_pool_matches_reference(shape, dtype, weighted, device, seed):
    batch, num_tokens, width, num_spans = shape
    spans, mask = random_spans(batch, num_spans, num_tokens)
    hidden = torch.randn(batch, num_tokens, width)
    weights = torch.rand(batch, num_tokens) if weighted else None
    grad_args = (0, 3) if weighted else (0,)
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        [hidden, spans, mask, weights],
        grad_args=grad_args,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def test_span_pool_word_units_strided_int32(device, seed):
    spans, mask = word_spans(2, 33)
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        [torch.randn(2, 33, 20), spans.int(), mask, torch.rand(2, 33)],
        grad_args=(0, 3),
        dtype=torch.float32,
        device=device,
        seed=seed,
        non_contiguous=True,
    )


def test_span_pool_hidden_only_needs_grad(device, seed):
    spans, mask = random_spans(2, 6, 12)
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        [torch.randn(2, 12, 8), spans, mask, torch.rand(2, 12)],
        grad_args=(0,),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


def test_span_pool_weights_only_need_grad(device, seed):
    spans, mask = random_spans(2, 6, 12)
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        [torch.randn(2, 12, 8), spans, mask, torch.rand(2, 12)],
        grad_args=(3,),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


def test_span_pool_heavily_overlapping_spans(device, seed):
    # Every span contains token 10: the backward gathers many spans per token block.
    starts = torch.arange(0, 11).view(1, 11)
    spans = torch.stack([starts, starts + 20], dim=-1).clamp_max(40)
    mask = torch.ones(1, 11, dtype=torch.bool)
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        [torch.randn(1, 40, 9), spans, mask, torch.rand(1, 40)],
        grad_args=(0, 3),
        dtype=torch.float32,
        device=device,
        seed=seed,
    )


def test_span_pool_empty_batch_and_units(device):
    hidden = torch.randn(2, 5, 4, device=device)
    spans = torch.zeros(2, 0, 2, dtype=torch.long, device=device)
    out = mk.span_pool(hidden, spans, torch.zeros(2, 0, dtype=torch.bool, device=device))
    assert out.shape == (2, 0, 4)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_span_weights_matches_reference(dtype, device, seed):
    spans, mask = random_spans(3, 11, 25)
    check_against_reference(
        mk.span_weights,
        ref.span_weights,
        [torch.rand(3, 25), spans, mask],
        grad_args=(0,),
        dtype=dtype,
        device=device,
        seed=seed,
    )


def test_span_weights_all_invalid_is_zero(device):
    spans = torch.tensor([[[0, 2], [2, 4]]], device=device)
    got = mk.span_weights(
        torch.rand(1, 4, device=device), spans, torch.zeros(1, 2, dtype=torch.bool, device=device)
    )
    assert torch.equal(got.cpu(), torch.zeros(1, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("weighted", [False, True])
def test_span_pool_bf16_cuda(weighted, seed):
    spans, mask = word_spans(4, 512)
    weights = torch.rand(4, 512) if weighted else None
    check_against_reference(
        mk.span_pool,
        ref.span_pool,
        [torch.randn(4, 512, 768), spans, mask, weights],
        grad_args=(0, 3) if weighted else (0,),
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )


def test_a_span_index_serves_every_span_op(device, seed):
    """One SpanIndex in place of (spans, span_mask): the same values and gradients as building
    it inside each op, on the fused path and on the reference."""
    spans, mask = random_spans(3, 9, 20)
    hidden = torch.randn(3, 20, 12, device=device, requires_grad=True)
    weights = torch.rand(3, 20, device=device, requires_grad=True)
    index = mk.span_index(spans.to(device), mask.to(device), 20)
    for path in (contextlib.nullcontext, mk.prefer_reference):
        with path():
            outs = []
            for args in ((spans.to(device), mask.to(device)), (index,)):
                pooled = mk.span_pool(hidden, *args, token_weights=weights)
                p = mk.span_weights(weights, *args)
                grads = torch.autograd.grad(pooled.sum() + (p * p).sum(), (hidden, weights))
                outs.append((pooled, p, *grads))
            for a, b in zip(*outs, strict=True):
                assert torch.equal(a, b), f"seed={seed}"


def test_span_index_argument_errors():
    spans, mask = random_spans(2, 4, 10)
    index = mk.span_index(spans, mask, 10)
    with pytest.raises(ValueError, match="span_mask must be None when spans is a SpanIndex"):
        mk.span_pool(torch.randn(2, 10, 3), index, mask)
    with pytest.raises(
        ValueError, match=r"built for \[B, T\] = \[2, 10\], the input has \[2, 11\]"
    ):
        mk.span_pool(torch.randn(2, 11, 3), index)
    with pytest.raises(TypeError, match="span_mask is required when spans is a tensor"):
        mk.span_weights(torch.rand(2, 10), spans)
    with pytest.raises(ValueError, match="is outside"):
        mk.span_index(spans + 20, mask | True, 10)


@pytest.mark.parametrize("block", [1, 3, 16, 32, 64])
def test_span_index_candidates_hold_every_span_of_any_token_block(block, seed):
    """For any block of tokens [t0, t1), the sorted spans outside [k_lo[t0], k_hi[t1 - 1]) do
    not touch it: any gather tile height can read one index."""
    num_tokens = 45
    spans, mask = random_spans(3, 17, num_tokens, torch.Generator().manual_seed(seed))
    index = mk.span_index(spans, mask, num_tokens)
    assert index.k_lo.shape == index.k_hi.shape == (3, num_tokens)
    assert index.k_lo.dtype == index.k_hi.dtype == torch.int32
    for b in range(3):
        for t0 in range(0, num_tokens, block):
            t1 = min(t0 + block, num_tokens)
            lo, hi = int(index.k_lo[b, t0]), int(index.k_hi[b, t1 - 1])
            for j in range(17):
                start, end = int(index.sorted_starts[b, j]), int(index.sorted_ends[b, j])
                if start < t1 and end > t0:  # non-empty overlap with the block
                    assert lo <= j < hi, f"seed={seed} b={b} block=[{t0}, {t1}) span {j}"
