"""On CUDA: the fused ops' peak extra memory grows like B·T·d (or B·K·d), never T² or K².

Each op runs at two sizes 4× apart; a linear footprint grows ~4×, a quadratic one ~16×. The
bound (< 6×) leaves room for allocator rounding and the O((K/BLOCK)²) partial sums.
"""

import pytest
import torch

import mta_kernels as mk

pytestmark = pytest.mark.cuda


def peak_extra_mb(fn, *tensors) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*tensors)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def growth(make, fn, small: int, large: int) -> float:
    return peak_extra_mb(fn, *make(large)) / max(peak_extra_mb(fn, *make(small)), 1e-3)


def test_token_importance_memory_is_linear_in_tokens():
    def make(num_tokens):
        return (
            torch.randn(2, num_tokens, 256, device="cuda", dtype=torch.bfloat16),
            torch.ones(2, num_tokens, dtype=torch.long, device="cuda"),
        )

    assert growth(make, mk.token_importance, 2048, 8192) < 6


def test_structural_loss_memory_is_linear_in_units():
    def make(num_units):
        student = torch.randn(2, num_units, 256, device="cuda", requires_grad=True)
        teacher = torch.randn(2, num_units, 512, device="cuda")
        weights = torch.full((2, num_units), 1.0 / num_units, device="cuda")
        mask = torch.ones(2, num_units, dtype=torch.bool, device="cuda")
        return student, teacher, weights, mask

    def forward_backward(student, teacher, weights, mask):
        mk.structural_loss(student, teacher, weights, mask).backward()

    assert growth(make, forward_backward, 1024, 4096) < 6


def test_span_pool_memory_is_linear_in_tokens():
    def make(num_tokens):
        hidden = torch.randn(2, num_tokens, 512, device="cuda", requires_grad=True)
        starts = torch.arange(0, num_tokens, 2, device="cuda")
        spans = torch.stack([starts, starts + 2], -1).expand(2, -1, -1).contiguous()
        mask = torch.ones(spans.shape[:2], dtype=torch.bool, device="cuda")
        return hidden, spans, mask, torch.rand(2, num_tokens, device="cuda")

    def forward_backward(hidden, spans, mask, weights):
        mk.span_pool(hidden, spans, mask, weights).sum().backward()

    assert growth(make, forward_backward, 2048, 8192) < 6
