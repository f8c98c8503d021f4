"""Weighted span pooling (Eq. 8) and span weights (Eq. 9) on CSR-like token ranges.

Forward: one program per (span, d-block) sums its own token range — no K×T membership matrix.
Backward: one program per (token block, d-block) gathers the gradients of the spans covering its
tokens. Spans are sorted by start once (:class:`SpanIndex`, with two prefix counts per token), so
a block of tokens ``[t0, t1)`` only visits the sorted spans ``[k_lo[t0], k_hi[t1 − 1])`` that can
reach it (``k_hi[t]``: spans starting at or before ``t``; ``k_lo[t]``: spans whose running maximum
end is at or before ``t``, which end before the block). Each output element is written by exactly
one program: the backward is deterministic, without atomics, and correct for overlapping spans.

A :class:`SpanIndex` built once (:func:`span_index`, validated there, e.g. on the CPU where a batch
is collated) can be passed to :func:`span_pool` and :func:`span_weights` in place of ``spans`` and
``span_mask``: neither then rebuilds it, and neither reads a value back from the device.
"""

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mta_kernels import reference
from mta_kernels._common import (
    block_size,
    contiguous,
    empty_output,
    floor_at,
    on_input_device,
    small_blocks,
    use_triton,
)
from mta_kernels._switches import assume_valid_spans
from mta_kernels._validation import (
    DENOM_EPS,
    check_span_pool_args,
    check_span_weights_args,
    check_spans,
)


def _gather_block_t() -> int:
    """Token-block height of the backward gather (any height reads the same span index)."""
    return 16 if small_blocks() else 32


def gather_block_d(width: int) -> int:
    """Width of the backward gather's d-blocks: 64 keeps its [32, d-block] accumulator, the
    loaded values and the covered-token flags in registers on sm_90 (128 spills with Triton
    3.6)."""
    return block_size(width, 64, floor=1)


@triton.jit
def _span_sum_kernel(
    h_ptr,  # [B, T, D] values to pool
    w_ptr,  # [B, T] token weights (unused without HAS_WEIGHTS)
    starts_ptr,
    ends_ptr,  # [B, K] int32 ranges, invalid spans empty
    out_ptr,  # [B, K, D] fp32
    wsum_ptr,  # [B, K] fp32 Σ_{t∈span} w_t (count without weights)
    T,
    K,
    D,
    eps,
    HAS_WEIGHTS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out_k = Σ_{t∈[s_k,e_k)} w_t H_t`` (divided by ``max(Σ w_t, eps)`` when NORMALIZE)."""
    span = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    batch = span // K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(starts_ptr + span)
    end = tl.load(ends_ptr + span)
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    weight_acc = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_span = offs_t < end
        rows = (batch * T + offs_t).to(tl.int64)
        h = tl.load(
            h_ptr + rows[:, None] * D + offs_d[None, :],
            mask=in_span[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + rows, mask=in_span, other=0.0).to(tl.float32)
        else:
            w = tl.where(in_span, 1.0, 0.0)
        acc += h * w[:, None]
        weight_acc += w
    total = tl.sum(weight_acc, axis=0)
    pooled = tl.sum(acc, axis=0)
    if NORMALIZE:
        pooled = pooled / floor_at(total, eps)
    tl.store(out_ptr + span * D + offs_d, pooled, mask=offs_d < D)
    if pid_d == 0:
        tl.store(wsum_ptr + span, total)


@triton.jit
def _span_weights_kernel(
    w_ptr,  # [B, T] token weights
    starts_ptr,
    ends_ptr,  # [B, K] int32 ranges, invalid spans empty
    valid_ptr,  # [B, K] bool
    out_ptr,  # [B, K] fp32 p (holds the raw sums between the two passes)
    total_ptr,  # [B] fp32 Z = Σ_k p̃_k
    T,
    K,
    eps,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per example: ``p̃_k = Σ_{t∈span k} w_t`` for blocks of spans (each span's
    tokens read once, ``BLOCK_L`` at a time), then ``p_k = v_k p̃_k / max(Z, eps)``."""
    batch = tl.program_id(0).to(tl.int64)
    total = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_range = offs_k < K
        start = tl.load(starts_ptr + batch * K + offs_k, mask=in_range, other=0)
        length = tl.load(ends_ptr + batch * K + offs_k, mask=in_range, other=0) - start
        raw = tl.zeros((BLOCK_K,), tl.float32)
        for l0 in range(0, tl.max(length, axis=0), BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            tokens = start[:, None] + offs_l[None, :]
            w = tl.load(
                w_ptr + batch * T + tokens, mask=offs_l[None, :] < length[:, None], other=0.0
            )
            raw += tl.sum(w.to(tl.float32), axis=1)
        tl.store(out_ptr + batch * K + offs_k, raw, mask=in_range)
        total += raw
    z = tl.sum(total, axis=0)
    tl.store(total_ptr + batch, z)
    denominator = floor_at(z, eps)  # a NaN total stays NaN: a NaN weight reaches every p
    tl.debug_barrier()  # the raw sums above were stored by other threads of this program
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_range = offs_k < K
        raw = tl.load(out_ptr + batch * K + offs_k, mask=in_range, other=0.0)
        valid = tl.load(valid_ptr + batch * K + offs_k, mask=in_range, other=0) != 0
        tl.store(
            out_ptr + batch * K + offs_k, tl.where(valid, raw / denominator, 0.0), mask=in_range
        )


@torch.library.custom_op("mta::span_weights", mutates_args=())
@on_input_device
def _span_weights(
    weights: Tensor, starts: Tensor, ends: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Launch :func:`_span_weights_kernel`: (p [B, K], Z [B]), fp32."""
    weights = contiguous(weights)
    batch, num_tokens = weights.shape
    num_spans = starts.shape[1]
    probs = empty_output(batch, num_spans, dtype=torch.float32, device=weights.device)
    total = empty_output(batch, dtype=torch.float32, device=weights.device)
    if batch == 0:
        return probs, total
    if num_spans == 0:
        return probs, total.zero_()
    _span_weights_kernel[(batch,)](
        weights,
        starts,
        ends,
        contiguous(valid),
        probs,
        total,
        num_tokens,
        num_spans,
        DENOM_EPS,
        BLOCK_K=block_size(num_spans, 64 if small_blocks() else 128),
        BLOCK_L=8,
    )
    return probs, total


@_span_weights.register_fake
def _(weights, starts, ends, valid):
    return (
        weights.new_empty(starts.shape, dtype=torch.float32),
        weights.new_empty(weights.shape[:1], dtype=torch.float32),
    )


@triton.jit
def _span_gather_kernel(
    g_ptr,  # [B, K, D] per-span gradients
    divisor_ptr,  # [B, K] fp32 s_k: g_k is divided by max(s_k, eps) (unused without HAS_DIVISOR)
    w_ptr,  # [B, T] token weights (unused without HAS_WEIGHTS)
    h_ptr,  # [B, T, D] forward values (unused without WITH_DOT)
    order_ptr,
    sorted_starts_ptr,
    sorted_ends_ptr,  # [B, K] int32, sorted by start
    k_lo_ptr,
    k_hi_ptr,  # [B, T] int32 prefix counts of the sorted spans (SpanIndex)
    out_ptr,  # [B, T, D] w_t Σ_{k∋t} g_k / max(s_k, eps)
    dot_ptr,  # [n_dblocks, B·T] fp32 partial ⟨Σ_{k∋t} g_k / max(s_k, eps), H_t⟩ (WITH_DOT)
    T,
    K,
    D,
    n_blocks,
    n_rows,
    eps,
    HAS_DIVISOR: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    WITH_DOT: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adjoint of :func:`_span_sum_kernel`: every token gathers the spans that contain it."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    batch = (pid_t // n_blocks).to(tl.int64)
    t0 = (pid_t % n_blocks) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # the spans that can reach [t0, t1): none of those before k_lo ends after t0, none from
    # k_hi on starts before t1
    k_lo = tl.load(k_lo_ptr + batch * T + t0)
    k_hi = tl.load(k_hi_ptr + batch * T + tl.minimum(t0 + BLOCK_T, T) - 1)
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    covered = offs_t < 0  # tokens inside some valid span
    for j in range(k_lo, k_hi):
        span = batch * K + tl.load(order_ptr + batch * K + j)
        start = tl.load(sorted_starts_ptr + batch * K + j)
        end = tl.load(sorted_ends_ptr + batch * K + j)
        g = tl.load(g_ptr + span * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        if HAS_DIVISOR:
            g = g / floor_at(tl.load(divisor_ptr + span), eps)
        member = (offs_t >= start) & (offs_t < end)
        acc += tl.where(member[:, None], g[None, :], 0.0)
        covered = covered | member
    rows = (batch * T + offs_t).to(tl.int64)
    covered = covered & (offs_t < T)
    # Values and weights of tokens outside every span are never read: whatever they hold (NaN
    # included) cannot reach a gradient, which is 0 there.
    tile_mask = covered[:, None] & (offs_d[None, :] < D)
    if WITH_DOT:
        h = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0).to(
            tl.float32
        )
        tl.store(
            dot_ptr + pid_d.to(tl.int64) * n_rows + rows, tl.sum(acc * h, axis=1), mask=offs_t < T
        )
    if WRITE_OUT:
        if HAS_WEIGHTS:
            acc = acc * tl.load(w_ptr + rows, mask=covered, other=0.0).to(tl.float32)[:, None]
        tile_mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
        tl.store(
            out_ptr + rows[:, None] * D + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=tile_mask,
        )


class SpanIndex(NamedTuple):
    """Spans prepared once for every op that reads them (:func:`span_index` builds it).

    ``valid`` [B, K] bool is the validated mask; the int32 [B, K] ranges ``starts``/``ends`` are
    the validated spans with invalid ones made empty at 0; ``order``/``sorted_*`` sort them by
    start; ``k_lo``/``k_hi`` [B, T] int32 count, per token ``t``, the sorted spans whose running
    maximum end is ``<= t`` and those whose start is ``<= t``: any block of tokens of the
    backward gather reads its candidate spans from them. Every field is a tensor, ``T`` is the
    size of ``k_lo`` and no size is a constant (such as the 2 of [B, K, 2] spans): a compiled
    step sees them as symbols, and one graph serves batches of any T and K.
    """

    valid: Tensor
    starts: Tensor
    ends: Tensor
    order: Tensor
    sorted_starts: Tensor
    sorted_ends: Tensor
    k_lo: Tensor
    k_hi: Tensor

    @property
    def num_tokens(self) -> int:
        """``T``, the tokens the spans index."""
        return self.k_lo.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SpanIndex":
        """The index on ``device`` (a copy per tensor; ``non_blocking`` from pinned memory)."""
        return SpanIndex(*(v.to(device, non_blocking=non_blocking) for v in self))

    def pin_memory(self) -> "SpanIndex":
        return SpanIndex(*(v.pin_memory() for v in self))


def span_index(spans: Tensor, span_mask: Tensor, num_tokens: int) -> SpanIndex:
    """Validate ``spans`` [B, K, 2] (int64/int32) and ``span_mask`` [B, K] (bool) against
    ``num_tokens`` and prepare them for the span ops (plain torch ops, on the spans' device).

    Raises:
        ValueError/TypeError: as the ops do for bad spans (the range check reads one flag back
            when the spans are on a GPU; none when they are on the CPU).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, torch.SymInt)):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if isinstance(num_tokens, int) and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    batch = spans.shape[0] if isinstance(spans, Tensor) else 0
    check_spans(spans, span_mask, batch, num_tokens)
    return _build_index(spans, span_mask, num_tokens)


def _build_index(spans: Tensor, span_mask: Tensor, num_tokens: int) -> SpanIndex:
    """:class:`SpanIndex` of checked spans. Ranges are clamped into ``[0, T]`` as well, so that
    spans left unchecked inside a compiled graph give a wrong value, never an illegal access."""
    valid = span_mask
    starts = torch.where(valid, spans[..., 0], 0).clamp(0, num_tokens).to(torch.int32)
    ends = torch.where(valid, spans[..., 1], 0).clamp(0, num_tokens).to(torch.int32)
    ends = torch.maximum(starts, ends)
    sorted_starts, order = torch.sort(starts, dim=-1, stable=True)
    sorted_ends = torch.gather(ends, -1, order)
    reach = torch.cummax(sorted_ends, dim=-1).values
    tokens = torch.arange(num_tokens, device=spans.device, dtype=torch.int32)
    tokens = tokens.expand(spans.shape[0], -1).contiguous()
    k_lo = torch.searchsorted(reach, tokens, right=True, out_int32=True)
    k_hi = torch.searchsorted(sorted_starts, tokens, right=True, out_int32=True)
    return SpanIndex(
        valid,
        starts.contiguous(),
        ends.contiguous(),
        order.to(torch.int32).contiguous(),
        sorted_starts.contiguous(),
        sorted_ends.contiguous(),
        k_lo,
        k_hi,
    )


def _spans_of(
    index: SpanIndex | None, spans: Tensor, span_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(spans, span_mask) for the reference ops (an index's ranges, invalid ones empty at 0)."""
    if index is None:
        return spans, span_mask
    return torch.stack([index.starts, index.ends], dim=-1), index.valid


def _checked(index: SpanIndex | None) -> contextlib.AbstractContextManager:
    """The reference skips the range check of spans an index was built (and checked) from."""
    return assume_valid_spans() if index is not None else contextlib.nullcontext()


def _unpack(
    spans: Tensor | SpanIndex, span_mask: Tensor | None, values: Tensor
) -> SpanIndex | None:
    """The index if the op was given one (checked against the [B, T] of ``values``), else None
    (after checking that the spans come with their mask). An index's ``spans`` tensor is left
    untouched: a compiled step that never reads it does not make its sizes part of the graph."""
    if not isinstance(spans, SpanIndex):
        if span_mask is None:
            raise TypeError("span_mask is required when spans is a tensor")
        return None
    if span_mask is not None:
        raise ValueError("span_mask must be None when spans is a SpanIndex (it holds its mask)")
    if isinstance(values, Tensor) and values.dim() >= 2:
        expected = (spans.valid.shape[0], spans.num_tokens)
        if tuple(values.shape[:2]) != expected:
            raise ValueError(
                f"the SpanIndex was built for [B, T] = {list(expected)}, the input has "
                f"{list(values.shape[:2])}"
            )
    return spans


@torch.library.custom_op("mta::span_sum", mutates_args=())
@on_input_device
def _span_sum(
    values: Tensor, starts: Tensor, ends: Tensor, weights: Tensor | None, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Launch :func:`_span_sum_kernel`: (pooled [B, K, D] fp32, weight sums [B, K] fp32)."""
    values = contiguous(values)
    batch, num_tokens, width = values.shape
    num_spans = starts.shape[1]
    out = empty_output(batch, num_spans, width, dtype=torch.float32, device=values.device)
    weight_sum = empty_output(batch, num_spans, dtype=torch.float32, device=values.device)
    if out.numel() == 0:
        return out.zero_(), weight_sum.zero_()
    block_d = block_size(width, 128 if small_blocks() else 256, floor=1)
    block_t = 16 if small_blocks() else 8
    _span_sum_kernel[(batch * num_spans, triton.cdiv(width, block_d))](
        values,
        weights if weights is not None else values,
        starts,
        ends,
        out,
        weight_sum,
        num_tokens,
        num_spans,
        width,
        DENOM_EPS,
        HAS_WEIGHTS=weights is not None,
        NORMALIZE=normalize,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out, weight_sum


@_span_sum.register_fake
def _(values, starts, ends, weights, normalize):
    shape = (values.shape[0], starts.shape[1])
    return (
        values.new_empty(*shape, values.shape[2], dtype=torch.float32),
        values.new_empty(shape, dtype=torch.float32),
    )


@torch.library.custom_op("mta::span_gather", mutates_args=())
@on_input_device
def _span_gather(
    grads: Tensor,
    order: Tensor,
    sorted_starts: Tensor,
    sorted_ends: Tensor,
    k_lo: Tensor,
    k_hi: Tensor,
    out_dtype: torch.dtype,
    divisor: Tensor | None,
    weights: Tensor | None,
    dot_with: Tensor | None,
    write_out: bool,
) -> tuple[Tensor, Tensor]:
    """Launch :func:`_span_gather_kernel`: ``w_t Σ_{k∋t} ĝ_k`` [B, T, D] with
    ``ĝ_k = g_k / max(divisor_k, 1e-8)`` (``g_k`` without a divisor; an empty tensor without
    ``write_out``) and, with ``dot_with`` = H, ``⟨Σ_{k∋t} ĝ_k, H_t⟩`` [B, T] fp32 (else an empty
    tensor)."""
    grads = contiguous(grads)
    batch, num_spans, width = grads.shape
    num_tokens = k_lo.shape[1]
    if write_out:
        out = empty_output(batch, num_tokens, width, dtype=out_dtype, device=grads.device)
    else:
        out = grads.new_empty(0, dtype=out_dtype)
    block_d = gather_block_d(width)
    n_dblocks = triton.cdiv(width, block_d)
    if dot_with is None:
        dots = grads.new_empty(0, dtype=torch.float32)
    else:
        dots = empty_output(n_dblocks, batch * num_tokens, dtype=torch.float32, device=grads.device)
    if batch * num_tokens * width == 0:
        return out.zero_(), dots.new_zeros(batch, num_tokens) if dot_with is not None else dots
    block_t = _gather_block_t()
    n_blocks = triton.cdiv(num_tokens, block_t)
    _span_gather_kernel[(batch * n_blocks, n_dblocks)](
        grads,
        divisor if divisor is not None else grads,
        weights if weights is not None else grads,
        dot_with if dot_with is not None else grads,
        order,
        sorted_starts,
        sorted_ends,
        k_lo,
        k_hi,
        out,
        dots if dot_with is not None else grads,
        num_tokens,
        num_spans,
        width,
        n_blocks,
        batch * num_tokens,
        DENOM_EPS,
        HAS_DIVISOR=divisor is not None,
        HAS_WEIGHTS=weights is not None,
        WITH_DOT=dot_with is not None,
        WRITE_OUT=write_out,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out, dots.sum(0).view(batch, num_tokens) if dot_with is not None else dots


@_span_gather.register_fake
def _(
    grads,
    order,
    sorted_starts,
    sorted_ends,
    k_lo,
    k_hi,
    out_dtype,
    divisor,
    weights,
    dot_with,
    write_out,
):
    batch, _, width = grads.shape
    num_tokens = k_lo.shape[1]
    out_shape = (batch, num_tokens, width) if write_out else (0,)
    out = grads.new_empty(out_shape, dtype=out_dtype)
    if dot_with is None:
        return out, grads.new_empty(0, dtype=torch.float32)
    return out, grads.new_empty(batch, num_tokens, dtype=torch.float32)


def _gather(
    grads: Tensor,
    index: SpanIndex,
    out_dtype: torch.dtype,
    divisor: Tensor | None = None,
    weights: Tensor | None = None,
    dot_with: Tensor | None = None,
    write_out: bool = True,
) -> tuple[Tensor, Tensor]:
    return _span_gather(
        grads,
        index.order,
        index.sorted_starts,
        index.sorted_ends,
        index.k_lo,
        index.k_hi,
        out_dtype,
        divisor,
        weights,
        dot_with,
        write_out,
    )


class SpanPoolFunction(torch.autograd.Function):
    """``U = span_pool(H, spans, mask, w)`` with hand-written backward for ``H`` and ``w``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, index: SpanIndex, token_weights: Tensor | None) -> Tensor:
        hidden = contiguous(hidden)
        weights = None if token_weights is None else contiguous(token_weights)
        pooled, weight_sum = _span_sum(hidden, index.starts, index.ends, weights, True)
        ctx.save_for_backward(hidden, weights, weight_sum, pooled)
        ctx.index = index
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: Tensor):
        hidden, weights, weight_sum, pooled = ctx.saved_tensors
        index = ctx.index
        need_hidden, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_pooled = contiguous(grad_pooled.float())
        grad_hidden, token_dots = _gather(
            grad_pooled,
            index,
            hidden.dtype,
            divisor=weight_sum,
            weights=weights,
            dot_with=hidden if need_weights else None,
            write_out=need_hidden,
        )
        grad_weights = None
        if need_weights:
            # dU_k/dw_t = (H_t − [Σw > eps] U_k) / max(Σw, eps) for t in span k.
            unclamped = (weight_sum > DENOM_EPS).float()
            centre = (grad_pooled * pooled).sum(-1) / weight_sum.clamp_min(DENOM_EPS) * unclamped
            centre_sum, _ = _gather(centre.unsqueeze(-1), index, torch.float32)
            grad_weights = (token_dots - centre_sum.squeeze(-1)).to(weights.dtype)
        return (grad_hidden if need_hidden else None), None, grad_weights


class SpanWeightsFunction(torch.autograd.Function):
    """``p = span_weights(w, spans, mask)`` with hand-written backward for ``w``."""

    @staticmethod
    def forward(ctx, token_weights: Tensor, index: SpanIndex) -> Tensor:
        weights = contiguous(token_weights)
        probs, total = _span_weights(weights, index.starts, index.ends, index.valid)
        ctx.save_for_backward(total.unsqueeze(-1), probs)
        ctx.index = index
        ctx.weights_dtype = weights.dtype
        return probs

    @staticmethod
    def backward(ctx, grad_probs: Tensor):
        total, probs = ctx.saved_tensors
        grad_probs = grad_probs.float()
        # p_k = r_k / max(Z, eps), Z = Σ r_j  =>
        # dL/dr_k = (g_k − [Z > eps] Σ_j g_j p_j) / max(Z, eps)
        coupled = (grad_probs * probs).sum(-1, keepdim=True) * (total > DENOM_EPS).float()
        grad_raw = (grad_probs - coupled) / total.clamp_min(DENOM_EPS)
        grad_weights, _ = _gather(grad_raw.unsqueeze(-1), ctx.index, ctx.weights_dtype)
        return grad_weights.squeeze(-1), None


def span_pool(
    hidden: Tensor,
    spans: Tensor | SpanIndex,
    span_mask: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Weighted mean of the hidden states of each span (Eq. 8): [B, K, d] float32.

    ``U_k = Σ_{t∈[s_k,e_k)} w_t H_t / max(Σ_{t∈span} w_t, 1e-8)``; ``U_k = 0`` for invalid or empty
    spans; a plain mean when ``token_weights`` is None.

    Args:
        hidden: [B, T, d] fp32/bf16/fp16, any strides.
        spans: [B, K, 2] int64/int32 half-open token ranges ``[start, end)`` within ``[0, T]``, or
            a :class:`SpanIndex` of them (then ``span_mask`` is None).
        span_mask: [B, K] bool, False for padding spans (their ranges are ignored).
        token_weights: optional [B, T] float weights (the teacher's token importance).

    Differentiable w.r.t. ``hidden`` and ``token_weights``; the backward is deterministic.

    Example::

        >>> h = torch.arange(12.0).view(1, 4, 3)
        >>> span_pool(h, torch.tensor([[[0, 2], [3, 4]]]), torch.tensor([[True, True]]))
        tensor([[[ 1.5000,  2.5000,  3.5000],
                 [ 9.0000, 10.0000, 11.0000]]])
    """
    index = _unpack(spans, span_mask, hidden)
    if not use_triton(hidden, token_weights):
        with _checked(index):
            return reference.span_pool(hidden, *_spans_of(index, spans, span_mask), token_weights)
    if index is None:
        check_span_pool_args(hidden, spans, span_mask, token_weights)
        index = _build_index(spans, span_mask, hidden.shape[1])
    else:
        check_span_pool_args(hidden, None, index.valid, token_weights)
    return SpanPoolFunction.apply(hidden, index, token_weights)


def span_weights(
    token_weights: Tensor, spans: Tensor | SpanIndex, span_mask: Tensor | None = None
) -> Tensor:
    """Normalized span weights (Eq. 9): [B, K] float32.

    ``p̃_k = Σ_{t∈span k} w_t`` and ``p_k = v_k p̃_k / max(Σ_j v_j p̃_j, 1e-8)``; each example's
    weights sum to 1 (or are all 0). Differentiable w.r.t. ``token_weights``. ``spans`` as in
    :func:`span_pool` (a tensor with ``span_mask``, or a :class:`SpanIndex`).

    Example::

        >>> w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
        >>> span_weights(w, torch.tensor([[[0, 2], [2, 3]]]), torch.tensor([[True, True]]))
        tensor([[0.5000, 0.5000]])
    """
    index = _unpack(spans, span_mask, token_weights)
    if not use_triton(token_weights):
        with _checked(index):
            return reference.span_weights(token_weights, *_spans_of(index, spans, span_mask))
    if index is None:
        check_span_weights_args(token_weights, spans, span_mask)
        index = _build_index(spans, span_mask, token_weights.shape[1])
    else:
        check_span_weights_args(token_weights, None, index.valid)
    return SpanWeightsFunction.apply(token_weights, index)
