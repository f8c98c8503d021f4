"""Eager PyTorch references of every MTA op: the executable specification.

Each function is written straight from the equations of docs/design.md §2, favouring clarity over
speed (they build the T×T, K×T and K×K matrices the fused kernels avoid). They accept any floating
dtype, compute in float32 (or float64 when given float64, which the gradient checks use) and are
what the Triton kernels, ``torch.compile`` and the benchmarks are compared against.

NaN policy (shared with the kernels): inputs at masked-out positions (padding, tokens outside
every valid span, invalid units, ``token_mask = 0``) are replaced by 0 with ``torch.where`` before
any arithmetic, so whatever they hold (NaN, inf) changes neither the outputs nor the gradients,
which are 0 there. A NaN at a valid position reaches every output that depends on it.

Shapes: ``B`` batch, ``T`` tokens, ``K`` units (spans), ``d`` hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mta_kernels._validation import (
    DENOM_EPS,
    NORM_EPS,
    STD_EPS,
    check_hidden_alignment_args,
    check_pairwise_distance_args,
    check_span_pool_args,
    check_span_weights_args,
    check_structural_loss_args,
    check_token_importance_args,
)

__all__ = [
    "hidden_alignment_loss",
    "pairwise_distance",
    "reduce_loss",
    "span_membership",
    "span_pool",
    "span_weights",
    "structural_loss",
    "token_importance",
]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reduce_loss(per_example: Tensor, reduction: str) -> Tensor:
    """Batch reduction shared by all losses: ``mean`` over examples, ``sum``, or ``none`` ([B])."""
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def span_membership(spans: Tensor, span_mask: Tensor, num_tokens: int) -> Tensor:
    """``M[b, k, t]``: token ``t`` lies in the valid span ``k`` of example ``b``; [B, K, T] bool."""
    positions = torch.arange(num_tokens, device=spans.device)
    starts, ends = spans[..., 0:1], spans[..., 1:2]
    return (positions >= starts) & (positions < ends) & span_mask.bool().unsqueeze(-1)


def _zero_outside(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` with 0 where ``keep`` [B, T] (or [B, K]) is False, broadcast over trailing dims."""
    keep = keep.reshape(*keep.shape, *([1] * (x.dim() - keep.dim())))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def token_importance(
    hidden: Tensor,
    attention_mask: Tensor,
    *,
    std_eps: float | None = None,
    padding_rows: bool = False,
) -> Tensor:
    """Teacher token importance ``w`` (Eq. 5–7): [B, T] float32, no grad.

    ``Ĥ = H / (std(H) + ε)`` (Bessel-corrected, no centring; ``ε = std_eps``, 1e-8 if None),
    ``A = Ĥ Ĥᵀ / √d`` with the diagonal and padding columns at −∞, row softmax ``α``; rows without
    a valid column contribute 0, and so do padding rows unless ``padding_rows``.
    ``w_t = (1/N) Σ_s α_{s,t}`` with ``N`` the number of query rows (``Σ m``, or ``T`` with
    ``padding_rows``), ``w_t = 0`` on padding.
    """
    check_token_importance_args(hidden, attention_mask, std_eps)
    dtype = _compute_dtype(hidden)
    with torch.no_grad():
        mask = attention_mask.bool()
        queries = torch.ones_like(mask) if padding_rows else mask
        h = _zero_outside(hidden.to(dtype), queries)
        num_tokens, width = h.shape[1], h.shape[2]
        h_hat = h / (h.std(dim=-1, keepdim=True) + (STD_EPS if std_eps is None else std_eps))
        scores = h_hat @ h_hat.transpose(1, 2) / math.sqrt(width)
        eye = torch.eye(num_tokens, dtype=torch.bool, device=h.device)
        keep = ~eye.unsqueeze(0) & mask.unsqueeze(1)
        scores = scores.masked_fill(~keep, float("-inf"))
        # Rows that are no query, or have no valid column, contribute 0 (no softmax there).
        has_column = keep.any(dim=-1) & queries
        alpha = _zero_outside(torch.softmax(scores, dim=-1), has_column)
        n_rows = queries.sum(dim=-1, keepdim=True).to(dtype).clamp_min(1.0)
        return _zero_outside(alpha.sum(dim=1) / n_rows, mask)


def span_pool(
    hidden: Tensor, spans: Tensor, span_mask: Tensor, token_weights: Tensor | None = None
) -> Tensor:
    """Weighted span pooling (Eq. 8): [B, K, d] float32.

    ``U_k = Σ_{t∈[s_k,e_k)} w_t H_t / max(Σ_{t∈span} w_t, 1e-8)``, ``U_k = 0`` for invalid or empty
    spans; ``w = 1`` (a plain mean) when ``token_weights`` is None.
    """
    check_span_pool_args(hidden, spans, span_mask, token_weights)
    dtype = _compute_dtype(hidden, *([token_weights] if token_weights is not None else []))
    member = span_membership(spans, span_mask, hidden.shape[1])
    covered = member.any(dim=1)
    h = _zero_outside(hidden.to(dtype), covered)
    member = member.to(dtype)
    if token_weights is not None:
        member = member * _zero_outside(token_weights.to(dtype), covered).unsqueeze(1)
    total = member.sum(dim=-1, keepdim=True)
    return (member @ h) / total.clamp_min(DENOM_EPS)


def span_weights(token_weights: Tensor, spans: Tensor, span_mask: Tensor) -> Tensor:
    """Span weights (Eq. 9): [B, K] float32.

    ``p̃_k = Σ_{t∈span k} w_t``; ``p_k = v_k p̃_k / max(Σ_j v_j p̃_j, 1e-8)``.
    """
    check_span_weights_args(token_weights, spans, span_mask)
    dtype = _compute_dtype(token_weights)
    member = span_membership(spans, span_mask, token_weights.shape[1])
    weights = _zero_outside(token_weights.to(dtype), member.any(dim=1))
    raw = (member.to(dtype) * weights.unsqueeze(1)).sum(dim=-1)
    return _zero_outside(raw / raw.sum(dim=-1, keepdim=True).clamp_min(DENOM_EPS), span_mask)


def _euclidean_norms(diff: Tensor) -> Tensor:
    """``‖diff‖`` over the last dim with a zero (not NaN) gradient where ``diff == 0``."""
    squared = diff.pow(2).sum(dim=-1)
    zero = squared == 0  # not `squared > 0`, which would turn a NaN distance into 0
    return torch.where(zero, 0.0, squared.where(~zero, torch.ones_like(squared)).sqrt())


def pairwise_distance(
    units: Tensor, span_mask: Tensor | None = None, metric: str = "cosine"
) -> Tensor:
    """Normalized pairwise distances between units: [B, K, K] float32.

    ``cosine``: ``D_ij = 1 − ⟨Û_i, Û_j⟩`` with ``Û = U / max(‖U‖, 1e-12)``.
    ``euclidean``: ``D_ij = ‖U_i − U_j‖ / μ`` with ``μ`` the mean distance over valid ordered
    pairs ``i ≠ j`` (``D = 0`` when ``μ = 0``). Invalid rows/columns and the diagonal are 0.
    """
    check_pairwise_distance_args(units, span_mask, metric)
    dtype = _compute_dtype(units)
    batch, num_units = units.shape[0], units.shape[1]
    if span_mask is None:
        span_mask = torch.ones(batch, num_units, dtype=torch.bool, device=units.device)
    valid = span_mask.bool()
    u = _zero_outside(units.to(dtype), valid)
    eye = torch.eye(num_units, dtype=torch.bool, device=u.device)
    pair_mask = valid.unsqueeze(2) & valid.unsqueeze(1) & ~eye
    if metric == "cosine":
        u_hat = u / u.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        distance = _zero_outside(1.0 - u_hat @ u_hat.transpose(1, 2), pair_mask)
    else:
        distance = _zero_outside(_euclidean_norms(u.unsqueeze(2) - u.unsqueeze(1)), pair_mask)
        n_pairs = pair_mask.sum(dim=(1, 2), keepdim=True).to(dtype)
        mean = distance.sum(dim=(1, 2), keepdim=True) / n_pairs.clamp_min(1.0)
        distance = _zero_outside(distance / mean.where(mean != 0, torch.ones_like(mean)), pair_mask)
    return distance


def structural_loss(
    student_units: Tensor,
    teacher_units: Tensor,
    span_weights: Tensor,
    span_mask: Tensor,
    metric: str = "cosine",
    reduction: str = "mean",
) -> Tensor:
    """Dynamic Structural Alignment loss for one layer pair (Eq. 10–11), float32.

    Per example ``L = Σ_{i≠j, v_i v_j} p_i p_j (D^S_ij − D^T_ij)²`` over ordered pairs; 0 with fewer
    than two valid units. ``reduction``: ``mean`` over examples, ``sum``, or ``none`` ([B]).
    """
    check_structural_loss_args(
        student_units, teacher_units, span_weights, span_mask, metric, reduction
    )
    dtype = _compute_dtype(student_units, teacher_units, span_weights)
    d_student = pairwise_distance(student_units.to(dtype), span_mask, metric)
    d_teacher = pairwise_distance(teacher_units.to(dtype), span_mask, metric)
    p = _zero_outside(span_weights.to(dtype), span_mask.bool())
    pair_weight = p.unsqueeze(2) * p.unsqueeze(1)
    per_example = (pair_weight * (d_student - d_teacher).pow(2)).sum(dim=(1, 2))
    return reduce_loss(per_example, reduction)


def hidden_alignment_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    token_weights: Tensor,
    token_mask: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Hidden Representation Alignment loss for one layer pair (Eq. 13), float32.

    Per example ``L = Σ_t w_t c_t (1 − cos(H̃^S_t, H^T_t))`` on already projected student states,
    ``cos(x, y) = ⟨x, y⟩ / (max(‖x‖, 1e-8) max(‖y‖, 1e-8))``, ``c_t = [token_mask ≠ 0]``.
    """
    check_hidden_alignment_args(
        student_hidden, teacher_hidden, token_weights, token_mask, reduction
    )
    dtype = _compute_dtype(student_hidden, teacher_hidden, token_weights)
    keep = token_mask.bool()
    s = _zero_outside(student_hidden.to(dtype), keep)
    t = _zero_outside(teacher_hidden.to(dtype), keep)
    dot = (s * t).sum(dim=-1)
    s_norm = s.norm(dim=-1).clamp_min(STD_EPS)
    t_norm = t.norm(dim=-1).clamp_min(STD_EPS)
    cosine = dot / (s_norm * t_norm)
    weight = _zero_outside(token_weights.to(dtype), keep)
    per_example = (weight * (1.0 - cosine)).sum(dim=-1)
    return reduce_loss(per_example, reduction)
