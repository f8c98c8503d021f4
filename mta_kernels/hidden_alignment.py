"""Hidden Representation Alignment loss (Eq. 13) on projected student states.

Per example ``L = Σ_t a_t (1 − cos_t)`` with ``a_t = w_t [c_t ≠ 0]`` and
``cos_t = ⟨S_t, T_t⟩ / (max(‖S_t‖, ε) max(‖T_t‖, ε))``. The forward streams each token's two rows
once and saves four fp32 numbers per token; the backward is one elementwise pass:
``gS_t = −g_b a_t (T_t/(ñ_S ñ_T) − cos_t S_t/ñ_S² [‖S_t‖ > ε])`` and symmetrically for ``T``.
Rows and weights of tokens with ``c_t = 0`` are never loaded, so what they hold (NaN included)
cannot reach the loss or a gradient.
"""

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
from mta_kernels._validation import STD_EPS, check_hidden_alignment_args


@triton.jit
def _hidden_alignment_fwd_kernel(
    s_ptr,
    t_ptr,  # [B, T, D] student (projected) and teacher states
    weight_ptr,  # [B, T] token weights w_t
    keep_ptr,  # [B, T] c_t, bool or int (read as != 0)
    # [4, B·T] fp32: 1/(ñ_S ñ_T), cos/ñ_S² (0 if clamped), cos/ñ_T² (0 if clamped), 1 − cos
    stats_ptr,
    partial_ptr,  # [B, n_blocks] fp32 Σ_t a_t (1 − cos_t) over the block
    T,
    D,
    n_blocks,
    n_rows,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = (batch * T + offs_t).to(tl.int64)
    in_range = offs_t < T
    keep = tl.load(keep_ptr + rows, mask=in_range, other=0) != 0
    dot = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    sq_s = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    sq_t = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (offs_d[None, :] < D)
        s = tl.load(s_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        t = tl.load(t_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        s, t = s.to(tl.float32), t.to(tl.float32)
        dot += s * t
        sq_s += s * s
        sq_t += t * t
    norm_s = floor_at(tl.sqrt(tl.sum(sq_s, axis=1)), eps)
    norm_t = floor_at(tl.sqrt(tl.sum(sq_t, axis=1)), eps)
    cosine = tl.sum(dot, axis=1) / (norm_s * norm_t)
    weight = tl.load(weight_ptr + rows, mask=keep, other=0.0).to(tl.float32)
    tl.store(stats_ptr + rows, 1.0 / (norm_s * norm_t), mask=in_range)
    tl.store(
        stats_ptr + n_rows + rows,
        tl.where(norm_s > eps, cosine / (norm_s * norm_s), 0.0),
        mask=in_range,
    )
    tl.store(
        stats_ptr + 2 * n_rows + rows,
        tl.where(norm_t > eps, cosine / (norm_t * norm_t), 0.0),
        mask=in_range,
    )
    tl.store(stats_ptr + 3 * n_rows + rows, 1.0 - cosine, mask=in_range)
    tl.store(partial_ptr + batch * n_blocks + pid, tl.sum(weight * (1.0 - cosine), axis=0))


@triton.jit
def _hidden_alignment_bwd_kernel(
    s_ptr,
    t_ptr,
    weight_ptr,
    keep_ptr,
    stats_ptr,
    scale_ptr,  # [B] fp32 dL/dL_b
    grad_s_ptr,
    grad_t_ptr,  # [B, T, D] in the inputs' dtypes
    T,
    D,
    n_rows,
    NEED_STUDENT: tl.constexpr,
    NEED_TEACHER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = (batch * T + offs_t).to(tl.int64)
    in_range = offs_t < T
    keep = tl.load(keep_ptr + rows, mask=in_range, other=0) != 0
    mask = in_range[:, None] & (offs_d[None, :] < D)
    loaded = keep[:, None] & (offs_d[None, :] < D)
    weight = tl.load(weight_ptr + rows, mask=keep, other=0.0).to(tl.float32)
    coef = -tl.load(scale_ptr + batch) * weight
    cross = tl.load(stats_ptr + rows, mask=in_range, other=0.0)
    s = tl.load(s_ptr + rows[:, None] * D + offs_d[None, :], mask=loaded, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * D + offs_d[None, :], mask=loaded, other=0.0).to(tl.float32)
    if NEED_STUDENT:
        self_s = tl.load(stats_ptr + n_rows + rows, mask=in_range, other=0.0)
        grad_s = coef[:, None] * (t * cross[:, None] - s * self_s[:, None])
        tl.store(
            grad_s_ptr + rows[:, None] * D + offs_d[None, :],
            grad_s.to(grad_s_ptr.dtype.element_ty),
            mask=mask,
        )
    if NEED_TEACHER:
        self_t = tl.load(stats_ptr + 2 * n_rows + rows, mask=in_range, other=0.0)
        grad_t = coef[:, None] * (s * cross[:, None] - t * self_t[:, None])
        tl.store(
            grad_t_ptr + rows[:, None] * D + offs_d[None, :],
            grad_t.to(grad_t_ptr.dtype.element_ty),
            mask=mask,
        )


def _blocks(width: int) -> tuple[int, int]:
    if small_blocks():
        return 16, block_size(width, 64, floor=1)
    return 16, block_size(width, 128, floor=1)


@torch.library.custom_op("mta::hidden_alignment_forward", mutates_args=())
@on_input_device
def _hidden_alignment_forward(
    student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, keep: Tensor
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: (per-example loss [B], per-token stats [4, B·T]), fp32."""
    batch, num_tokens, width = student_hidden.shape
    n_rows = batch * num_tokens
    block_t, block_d = _blocks(width)
    n_blocks = triton.cdiv(num_tokens, block_t)
    stats = empty_output(4, n_rows, dtype=torch.float32, device=student_hidden.device)
    if n_rows == 0:
        return stats.new_zeros(batch), stats
    # every program writes its block's partial sum: no zero-filling
    partial = empty_output(batch, n_blocks, dtype=torch.float32, device=student_hidden.device)
    _hidden_alignment_fwd_kernel[(n_blocks, batch)](
        student_hidden,
        teacher_hidden,
        weight,
        keep,
        stats,
        partial,
        num_tokens,
        width,
        n_blocks,
        n_rows,
        STD_EPS,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return partial.sum(-1), stats


@_hidden_alignment_forward.register_fake
def _(student_hidden, teacher_hidden, weight, keep):
    batch, num_tokens, _ = student_hidden.shape
    return (
        student_hidden.new_empty(batch, dtype=torch.float32),
        student_hidden.new_empty(4, batch * num_tokens, dtype=torch.float32),
    )


@torch.library.custom_op("mta::hidden_alignment_backward", mutates_args=())
@on_input_device
def _hidden_alignment_backward(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    keep: Tensor,
    stats: Tensor,
    scale: Tensor,
    need_student: bool,
    need_teacher: bool,
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: gradients w.r.t. both states (empty when not needed)."""
    batch, num_tokens, width = student_hidden.shape

    def buffer(needed: bool, like: Tensor) -> Tensor:
        if not needed:
            return like.new_empty(0)
        return empty_output(*like.shape, dtype=like.dtype, device=like.device)

    grad_student = buffer(need_student, student_hidden)
    grad_teacher = buffer(need_teacher, teacher_hidden)
    if (need_student or need_teacher) and student_hidden.numel() > 0:
        block_t, block_d = _blocks(width)
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_d), batch)
        _hidden_alignment_bwd_kernel[grid](
            student_hidden,
            teacher_hidden,
            weight,
            keep,
            stats,
            contiguous(scale.float()),
            grad_student if need_student else student_hidden,
            grad_teacher if need_teacher else teacher_hidden,
            num_tokens,
            width,
            batch * num_tokens,
            NEED_STUDENT=need_student,
            NEED_TEACHER=need_teacher,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
        )
    return grad_student, grad_teacher


@_hidden_alignment_backward.register_fake
def _(student_hidden, teacher_hidden, weight, keep, stats, scale, need_student, need_teacher):
    return (
        torch.empty_like(student_hidden) if need_student else student_hidden.new_empty(0),
        torch.empty_like(teacher_hidden) if need_teacher else teacher_hidden.new_empty(0),
    )


class HiddenAlignmentFunction(torch.autograd.Function):
    """Per-example HRA loss [B] with hand-written backward for both states and the weights."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        token_weights: Tensor,
        token_mask: Tensor,
    ) -> Tensor:
        student_hidden, teacher_hidden = contiguous(student_hidden), contiguous(teacher_hidden)
        weight = contiguous(token_weights)
        keep = contiguous(token_mask)  # read as `!= 0`, whatever its integer or bool dtype
        loss, stats = _hidden_alignment_forward(student_hidden, teacher_hidden, weight, keep)
        ctx.save_for_backward(student_hidden, teacher_hidden, weight, keep, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student_hidden, teacher_hidden, weight, keep, stats = ctx.saved_tensors
        need_student, need_teacher, need_weights = ctx.needs_input_grad[:3]
        grad_student, grad_teacher = _hidden_alignment_backward(
            student_hidden,
            teacher_hidden,
            weight,
            keep,
            stats,
            grad_loss,
            need_student,
            need_teacher,
        )
        grad_weights = None
        if need_weights:
            one_minus_cos = stats[3].view_as(keep)
            grad_weights = torch.where(
                keep != 0, grad_loss.float()[:, None] * one_minus_cos, 0.0
            ).to(weight.dtype)
        return (
            grad_student if need_student else None,
            grad_teacher if need_teacher else None,
            grad_weights,
            None,
        )


def hidden_alignment_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    token_weights: Tensor,
    token_mask: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Hidden Representation Alignment loss of one layer pair (Eq. 13): float32.

    Per example ``L = Σ_t w_t c_t (1 − cos(H̃^S_t, H^T_t))`` with
    ``cos(x, y) = ⟨x, y⟩ / (max(‖x‖, 1e-8) max(‖y‖, 1e-8))``.

    Args:
        student_hidden: [B, T, d_T] student states already projected to the teacher's width.
        teacher_hidden: [B, T, d_T] teacher states.
        token_weights: [B, T] float ``w`` (teacher token importance).
        token_mask: [B, T] bool/int ``c``, nonzero for valid tokens covered by a valid span.
        reduction: ``"mean"`` over examples, ``"sum"``, or ``"none"`` for a [B] tensor.

    Example::

        >>> s = torch.randn(2, 5, 8)
        >>> mask = torch.ones(2, 5, dtype=torch.bool)
        >>> hidden_alignment_loss(s, s, torch.ones(2, 5), mask).abs().item() < 1e-6
        True
    """
    if not use_triton(student_hidden, teacher_hidden, token_weights):
        return reference.hidden_alignment_loss(
            student_hidden, teacher_hidden, token_weights, token_mask, reduction
        )
    check_hidden_alignment_args(
        student_hidden, teacher_hidden, token_weights, token_mask, reduction
    )
    per_example = HiddenAlignmentFunction.apply(
        student_hidden, teacher_hidden, token_weights, token_mask
    )
    return reference.reduce_loss(per_example, reduction)
