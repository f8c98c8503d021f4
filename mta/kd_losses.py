"""Base distillation losses on response tokens (the ``L_base`` of DESIGN §2 Eq. 14).

With ``p = softmax(z_T / τ)`` the teacher's and ``q = softmax(z_S / τ)`` the student's next-token
distribution at one response position, the per-token losses are

=============  ==========================================================================
``ce``         ``−log softmax(z_S)[y]`` (SFT cross-entropy; no temperature, teacher unused)
``fkl``        ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)``
``rkl``        ``KL(q ‖ p)``
``jsd``        ``½ KL(p ‖ m) + ½ KL(q ‖ m)``, ``m = ½ (p + q)``
``skew_fkl``   ``KL(p ‖ α p + (1 − α) q)`` (DistiLLM skew forward KL, ``α = skew_alpha``)
``skew_rkl``   ``KL(q ‖ α q + (1 − α) p)`` (DistiLLM skew reverse KL)
``tvd``        ``½ Σ_v |p_v − q_v|``
=============  ==========================================================================

Every divergence is multiplied by ``τ²`` (Hinton et al., 2015) so that gradient magnitudes stay
comparable across temperatures; ``ce`` ignores ``temperature``. The result is the mean (or sum)
over response positions: labels follow the Hugging Face convention, ``logits[:, t]`` predicts
``labels[:, t + 1]`` and positions whose shifted label is ``ignore_index`` (prompt, padding) are
skipped. With no response position the loss is ``0``.

Memory: only response positions are gathered, ``chunk_size`` rows at a time, and the gradient of
each chunk is computed inside the forward (the technique of Liger-Kernel's fused losses), so
neither the ``[N, V]`` float32 log-probabilities of both models nor their autograd graph are held
at once; the only full-size buffer is the logits gradient, in the logits' dtype. Liger-Kernel
itself is not used: its logit-level JSD/KL ops take precomputed ``[N, V]`` log-probabilities,
which is exactly what this module avoids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KINDS", "distillation_loss"]

KINDS: tuple[str, ...] = ("ce", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
CHUNK_ELEMENTS = 1 << 25  # default chunk: ~32M logits (128 MiB per float32 [chunk, V] buffer)


@dataclass(frozen=True)
class _Spec:
    """What to compute on each chunk of gathered rows."""

    kind: str
    temperature: float
    skew_alpha: float
    vocab_size: int


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a ‖ b)`` per row from log-probabilities: [N]."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _mixture(log_a: Tensor, log_b: Tensor, alpha: float) -> Tensor:
    """``log(α a + (1 − α) b)``, computed stably in log space."""
    return torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))


def _token_losses(spec: _Spec, student: Tensor, teacher: Tensor | None, targets: Tensor) -> Tensor:
    """Per-row losses of one chunk, float32 (float64 for float64 inputs): [N]."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    if spec.kind == "ce":
        return F.cross_entropy(student.to(dtype), targets, reduction="none")
    assert teacher is not None  # checked by distillation_loss
    log_q = F.log_softmax(student.to(dtype) / spec.temperature, dim=-1)
    log_p = F.log_softmax(teacher.to(dtype) / spec.temperature, dim=-1)
    if spec.kind == "fkl":
        loss = _kl(log_p, log_q)
    elif spec.kind == "rkl":
        loss = _kl(log_q, log_p)
    elif spec.kind == "jsd":
        log_m = _mixture(log_p, log_q, 0.5)
        loss = 0.5 * (_kl(log_p, log_m) + _kl(log_q, log_m))
    elif spec.kind == "skew_fkl":
        loss = _kl(log_p, _mixture(log_p, log_q, spec.skew_alpha))
    elif spec.kind == "skew_rkl":
        loss = _kl(log_q, _mixture(log_q, log_p, spec.skew_alpha))
    else:  # tvd
        loss = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    return loss * spec.temperature**2


def _chunked(
    spec: _Spec,
    student: Tensor,
    teacher: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    chunk_size: int,
    scale: float,
    needs_grad: tuple[bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``scale · Σ`` of the token losses over ``rows`` of the flat logits, chunk by chunk.

    ``student`` [M, V] and ``teacher`` [M, V'] are the flattened logits, ``rows`` [N] the response
    positions and ``targets`` [N] their labels. Returns the loss and, for the inputs flagged in
    ``needs_grad``, the gradient of the loss with respect to them (zero outside ``rows`` and
    beyond ``vocab_size``), accumulated chunk by chunk.
    """
    inputs = (student, teacher)
    grads = [
        torch.zeros_like(x) if need else None for x, need in zip(inputs, needs_grad, strict=True)
    ]
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=dtype, device=student.device)
    vocab = spec.vocab_size
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        chunk = [
            None if x is None else x.index_select(0, idx)[:, :vocab].requires_grad_(need)
            for x, need in zip(inputs, needs_grad, strict=True)
        ]
        with torch.enable_grad():
            loss = _token_losses(spec, chunk[0], chunk[1], targets[start : start + chunk_size])
            loss = loss.sum() * scale
        wanted = [i for i, g in enumerate(grads) if g is not None]
        if wanted:
            chunk_grads = torch.autograd.grad(loss, [chunk[i] for i in wanted])
            for i, chunk_grad in zip(wanted, chunk_grads, strict=True):
                grads[i][:, :vocab].index_copy_(0, idx, chunk_grad)
        total += loss.detach()
    return total, grads[0], grads[1]


class _ChunkedLoss(torch.autograd.Function):
    """Chunked loss whose backward returns gradients computed during the forward."""

    @staticmethod
    def forward(ctx, student, teacher, rows, targets, spec, chunk_size, scale):  # type: ignore[override]
        needs_grad = (ctx.needs_input_grad[0], teacher is not None and ctx.needs_input_grad[1])
        loss, grad_student, grad_teacher = _chunked(
            spec, student, teacher, rows, targets, chunk_size, scale, needs_grad
        )
        ctx.save_for_backward(grad_student, grad_teacher)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        grads = list(ctx.saved_tensors)
        if not torch.equal(grad_output, torch.ones_like(grad_output)):  # skip a full-size multiply
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return grads[0], grads[1], None, None, None, None, None


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, V], got {tuple(logits.shape)}")


def _check_vocab(student_vocab: int, teacher_vocab: int | None, vocab_size: int | None) -> int:
    """The vocabulary size the losses run over."""
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        smallest = min(student_vocab, teacher_vocab or student_vocab)
        if vocab_size > smallest:
            raise ValueError(
                f"vocab_size={vocab_size} exceeds the logits' vocabulary (student "
                f"{student_vocab}, teacher {teacher_vocab}); it must be <= {smallest}"
            )
        return vocab_size
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        raise ValueError(
            f"student_logits has vocabulary size {student_vocab} but teacher_logits has "
            f"{teacher_vocab}; token-level distillation needs one shared vocabulary. If both "
            "models use the same tokenizer and one pads its embedding matrix (Qwen pads to a "
            "multiple of 64/128), pass vocab_size=len(tokenizer) to truncate both logits to the "
            "real vocabulary. With different tokenizers use kind='ce' (MTA's unit alignment works "
            "across tokenizers)."
        )
    return student_vocab


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Base distillation loss over response tokens: a float32 scalar (float64 for float64 logits).

    Args:
        student_logits: [B, T, V] student logits (any float dtype; computed in float32).
        teacher_logits: [B, T, V'] teacher logits, or None for ``kind="ce"``. Gradients flow into
            them only if they require grad (normally the teacher is frozen).
        labels: [B, T] integer token ids, ``ignore_index`` on prompt and padding positions; the
            HF shift is applied here (``logits[:, t]`` predicts ``labels[:, t + 1]``).
        kind: one of ``ce, fkl, rkl, jsd, skew_fkl, skew_rkl, tvd`` (see the module docstring).
        temperature: ``τ > 0`` for the divergences (result scaled by ``τ²``); unused by ``ce``.
        skew_alpha: ``α ∈ (0, 1)`` of the skew KLs (DistiLLM uses 0.1).
        chunk_size: response positions per chunk; default ``max(1, 2**25 // V)``.
        vocab_size: truncate both logits to their first ``vocab_size`` entries (for a model whose
            embedding matrix is padded beyond the tokenizer's vocabulary).
        ignore_index: label value of skipped positions.
        reduction: ``mean`` over response positions (0 if there are none) or ``sum``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_logits("student_logits", student_logits)
    batch, length, student_vocab = student_logits.shape
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be an integer tensor of token ids")
    if tuple(labels.shape) != (batch, length):
        raise ValueError(
            f"labels must have shape [B, T] = {(batch, length)} like student_logits, got "
            f"{tuple(labels.shape)}"
        )
    if kind == "ce":
        teacher_logits = None  # unused: plain supervised cross-entropy
    elif teacher_logits is None:
        raise ValueError(f"kind={kind!r} needs teacher_logits; only kind='ce' works without them")
    else:
        _check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape[:2]) != (batch, length):
            raise ValueError(
                f"teacher_logits must have shape [B, T, V'] with [B, T] = {(batch, length)} like "
                f"student_logits, got {tuple(teacher_logits.shape)} (with different tokenizers "
                "use kind='ce')"
            )
    tensors = [student_logits, labels] + ([teacher_logits] if teacher_logits is not None else [])
    if len({t.device for t in tensors}) > 1:
        raise ValueError("student_logits, teacher_logits and labels must be on the same device")
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(skew_alpha, (int, float)) and 0.0 < skew_alpha < 1.0):
        raise ValueError(f"skew_alpha must be in (0, 1), got {skew_alpha!r}")
    teacher_vocab = None if teacher_logits is None else teacher_logits.shape[-1]
    vocab = _check_vocab(student_vocab, teacher_vocab, vocab_size)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    shifted = labels[:, 1:]
    response = shifted != ignore_index
    example, position = response.nonzero(as_tuple=True)
    rows = example * length + position
    targets = shifted[response].long()
    scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
    spec = _Spec(kind, float(temperature), float(skew_alpha), vocab)
    student = student_logits.reshape(batch * length, student_vocab)
    teacher = None if teacher_logits is None else teacher_logits.reshape(batch * length, -1)
    needs_grad = (
        student.requires_grad,
        teacher is not None and teacher.requires_grad,
    )
    if torch.is_grad_enabled() and any(needs_grad):
        return _ChunkedLoss.apply(student, teacher, rows, targets, spec, chunk_size, scale)
    return _chunked(spec, student, teacher, rows, targets, chunk_size, scale, (False, False))[0]
