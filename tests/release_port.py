"""An independent float re-statement of the loss the authors released (``wind123mountain/MTA``,
``distillm-master/span_utils.py``), for the ``variant="authors_code"`` tests.

It follows the release's own formulation rather than ``mta``'s: a list of (example, token, unit)
memberships built with ``nonzero``, per-example normalizations by ``scatter_add``, units with no
member dropped by renumbering, a [U, U] Gram matrix over all units of the batch masked to pairs of
one example, and HRA over memberships. Written from the equations of docs/design.md §8 (no code is
copied); it shares nothing with ``mta`` or ``mta_kernels``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_weights(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L]: ``(1/L) Σ_i softmax_j(ĥ_i·ĥ_j/√d)`` over all L query rows (padding rows included),
    keys ``j ≠ i`` with ``m_j = 1``, ``ĥ = h / (std_unbiased(h) + 1e-5)``; detached."""
    hidden = hidden.detach()
    batch, length, width = hidden.shape
    scaled = hidden / (hidden.std(dim=-1, keepdim=True) + 1e-5)
    scores = scaled @ scaled.transpose(1, 2) / math.sqrt(width)
    keys = attention_mask.bool().unsqueeze(1).expand(batch, length, length)
    diagonal = torch.eye(length, dtype=torch.bool, device=hidden.device)
    scores = scores.masked_fill(~keys | diagonal, float("-inf"))
    attention = torch.softmax(scores, dim=-1) * keys
    attention = attention / attention.sum(dim=-1, keepdim=True)
    return attention.mean(dim=1)


def layer_loss(
    student: Tensor,
    teacher: Tensor,
    attention_mask: Tensor,
    spans: Tensor,
    span_mask: Tensor,
    projector: nn.Linear,
) -> tuple[Tensor, Tensor]:
    """(DSA, HRA) of one layer pair, both scalars; 0 when the batch has no membership."""
    batch, length, _ = student.shape
    positions = torch.arange(length).view(1, length, 1)
    starts, ends = spans[..., 0].unsqueeze(1), spans[..., 1].unsqueeze(1)  # [B, 1, K]
    member = (
        (positions >= starts)
        & (positions < ends)
        & attention_mask.bool().unsqueeze(-1)
        & span_mask.bool().unsqueeze(1)
    )  # [B, L, K]
    found = member.nonzero()
    zero = student.sum() * 0.0
    if found.shape[0] == 0:
        return zero, zero
    example, token, unit = found.unbind(dim=1)
    _, unit_of = torch.unique(example * spans.shape[1] + unit, return_inverse=True)
    n_units = int(unit_of.max()) + 1

    def normalized(weights: Tensor) -> Tensor:
        per_member = weights[example, token]
        totals = torch.zeros(batch, dtype=per_member.dtype).scatter_add(0, example, per_member)
        return per_member / totals.clamp(min=1e-5)[example]

    teacher_w = normalized(token_weights(teacher, attention_mask))
    student_w = normalized(token_weights(student, attention_mask))
    unit_example = torch.zeros(n_units, dtype=torch.long).scatter(0, unit_of, example)

    def pooled(states: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        rows = states[example, token]
        total = torch.zeros(n_units, dtype=weights.dtype).index_add(0, unit_of, weights)
        summed = torch.zeros(n_units, rows.shape[1], dtype=rows.dtype).index_add(
            0, unit_of, weights.unsqueeze(1) * rows
        )
        return summed / total.clamp(min=1e-5).unsqueeze(1), total

    teacher_units, teacher_total = pooled(teacher.detach(), teacher_w)
    student_units, _ = pooled(student, student_w)
    s_hat, t_hat = F.normalize(student_units, dim=-1), F.normalize(teacher_units, dim=-1)
    pairs = (unit_example.unsqueeze(1) == unit_example.unsqueeze(0)) & ~torch.eye(
        n_units, dtype=torch.bool
    )
    pair_weight = teacher_total.unsqueeze(1) * teacher_total.unsqueeze(0) * pairs
    error = (s_hat @ s_hat.T - t_hat @ t_hat.T).square()
    dsa = (error * pair_weight).sum() / pair_weight.sum().clamp(min=1e-5)
    cos = F.cosine_similarity(
        projector(student[example, token]), teacher.detach()[example, token], dim=-1, eps=1e-5
    )
    hra = ((1.0 - cos) * teacher_w).sum() / teacher_w.sum().clamp(min=1e-5)
    return dsa, hra


def mta_loss(
    student_states: list[Tensor],
    teacher_states: list[Tensor],
    attention_mask: Tensor,
    layers: list[tuple[int, int, Tensor, Tensor]],
    projectors: dict[int, nn.Linear],
    w_span: float = 2.0,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """``w_span · (1/n) Σ_l (DSA_l + HRA_l / 10)`` over ``layers`` = (student layer, teacher
    layer, spans, span mask); also each layer's (DSA, HRA)."""
    terms = [
        layer_loss(student_states[s], teacher_states[t], attention_mask, spans, mask, projectors[s])
        for s, t, spans, mask in layers
    ]
    total = sum(dsa + hra / 10.0 for dsa, hra in terms) / len(terms)
    return w_span * total, terms
