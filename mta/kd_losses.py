"""Base distillation losses on response tokens (the ``L_base`` of docs/design.md §2 Eq. 14).

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
at once; the only full-size buffer of :func:`distillation_loss` is the logits gradient, in the
logits' dtype.

:func:`fused_linear_distillation_loss` goes one step further: it takes the final hidden states
and the LM-head weights instead of logits and projects each chunk itself, so the ``[B, T, V]``
logits of neither model ever exist. Its ``backend="liger"`` (the default on CUDA when
Liger-Kernel is installed and the kind is ``fkl``, ``rkl`` or ``jsd``) calls Liger-Kernel's
``LigerFusedLinearJSD``, whose generalized JSD is forward KL at ``β = 0``, JSD at ``β = ½`` and
reverse KL at ``β = 1``; ``backend="torch"`` is this module's own chunked projection.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "KINDS",
    "LIGER_KINDS",
    "Kind",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "liger_available",
]

Kind = Literal["ce", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
BACKENDS: tuple[str, ...] = ("auto", "torch", "liger")
LIGER_KINDS: dict[str, float] = {"fkl": 0.0, "jsd": 0.5, "rkl": 1.0}  # kind -> Liger's JSD β
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
        grads = _scale_grads(ctx.saved_tensors, grad_output)
        return grads[0], grads[1], None, None, None, None, None


def _scale_grads(grads: tuple[Tensor | None, ...], grad_output: Tensor) -> list[Tensor | None]:
    """Gradients precomputed in a forward, times the upstream scalar gradient."""
    if torch.equal(grad_output, torch.ones_like(grad_output)):  # skip full-size multiplies
        return list(grads)
    return [None if g is None else g * grad_output.to(g.dtype) for g in grads]


def _check_floating(name: str, tensor: Tensor, dims: int, shape: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


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
            f"the student has vocabulary size {student_vocab} but the teacher has "
            f"{teacher_vocab}; token-level distillation needs one shared vocabulary. If both "
            "models use the same tokenizer and one pads its embedding matrix (Qwen pads to a "
            "multiple of 64/128), pass vocab_size=len(tokenizer) to truncate both logits to the "
            "real vocabulary. With different tokenizers use kind='ce' (MTA's unit alignment works "
            "across tokenizers)."
        )
    return student_vocab


def _check_settings(
    kind: str,
    reduction: str,
    temperature: float,
    skew_alpha: float,
    chunk_size: int | None,
    labels: Tensor,
    batch: int,
    length: int,
) -> None:
    """Checks shared by both entry points (``chunk_size`` None means the default)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be an integer tensor of token ids")
    if tuple(labels.shape) != (batch, length):
        raise ValueError(
            f"labels must have shape [B, T] = {(batch, length)} like the student's inputs, got "
            f"{tuple(labels.shape)}"
        )
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(skew_alpha, (int, float)) and 0.0 < skew_alpha < 1.0):
        raise ValueError(f"skew_alpha must be in (0, 1), got {skew_alpha!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_same_device(names: str, tensors: list[Tensor | None]) -> None:
    if len({t.device for t in tensors if t is not None}) > 1:
        raise ValueError(f"{names} must be on the same device")


def _response_rows(
    labels: Tensor, ignore_index: int, reduction: str
) -> tuple[Tensor, Tensor, float]:
    """Flat indices ``b·T + t`` of the response positions (``labels[b, t + 1] != ignore_index``),
    their target ids and the reduction's scale (``1/N`` for ``mean``, 0 positions give 0)."""
    length = labels.shape[1]
    shifted = labels[:, 1:]
    response = shifted != ignore_index
    example, position = response.nonzero(as_tuple=True)
    rows = example * length + position
    targets = shifted[response].long()
    scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
    return rows, targets, scale


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
    _check_floating("student_logits", student_logits, 3, "[B, T, V]")
    batch, length, student_vocab = student_logits.shape
    _check_settings(kind, reduction, temperature, skew_alpha, chunk_size, labels, batch, length)
    if kind == "ce":
        teacher_logits = None  # unused: plain supervised cross-entropy
    elif teacher_logits is None:
        raise ValueError(f"kind={kind!r} needs teacher_logits; only kind='ce' works without them")
    else:
        _check_floating("teacher_logits", teacher_logits, 3, "[B, T, V']")
        if tuple(teacher_logits.shape[:2]) != (batch, length):
            raise ValueError(
                f"teacher_logits must have shape [B, T, V'] with [B, T] = {(batch, length)} like "
                f"student_logits, got {tuple(teacher_logits.shape)} (with different tokenizers "
                "use kind='ce')"
            )
    _check_same_device(
        "student_logits, teacher_logits and labels", [student_logits, teacher_logits, labels]
    )
    teacher_vocab = None if teacher_logits is None else teacher_logits.shape[-1]
    vocab = _check_vocab(student_vocab, teacher_vocab, vocab_size)
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // vocab)

    rows, targets, scale = _response_rows(labels, ignore_index, reduction)
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


# ---- fused LM head ----------------------------------------------------------------------


def _matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype an ``nn.Linear`` would run in here: autocast's if active, else the weight's."""
    if torch.is_autocast_enabled(x.device.type) and weight.dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _fused_linear_chunks(
    spec: _Spec,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    scale: float,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``scale · Σ`` of the token losses of ``student_hidden`` [N, d_S] (rows already gathered)
    through the heads, chunk by chunk, and the gradients flagged in ``needs_grad`` (hidden,
    weight, bias of the student). Logits are computed like ``nn.Linear`` would (in autocast's
    dtype if active), then upcast; the weight gradient accumulates in float32 (float64 for
    float64 weights)."""
    device = student_hidden.device
    loss_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    # Read the ambient autocast state first: the chunk loop below runs with autocast disabled,
    # on operands cast once to the dtype an nn.Linear would have used.
    dtype = _matmul_dtype(student_hidden, student_weight)
    weight = student_weight.to(dtype)
    bias = None if student_bias is None else student_bias.to(dtype)
    teacher = None
    if teacher_hidden is not None:
        teacher_dtype = _matmul_dtype(teacher_hidden, teacher_weight)
        teacher = (
            teacher_weight.to(teacher_dtype),
            None if teacher_bias is None else teacher_bias.to(teacher_dtype),
        )
    grad_hidden = torch.empty_like(student_hidden) if needs_grad[0] else None  # chunks cover it
    grad_weight = (
        torch.zeros(student_weight.shape, dtype=loss_dtype, device=device)
        if needs_grad[1]
        else None
    )
    grad_bias = (
        torch.zeros(student_bias.shape, dtype=loss_dtype, device=device)
        if needs_grad[2] and student_bias is not None
        else None
    )
    total = torch.zeros((), dtype=loss_dtype, device=device)
    with torch.autocast(device.type, enabled=False):
        for start in range(0, targets.numel(), chunk_size):
            end = start + chunk_size
            hidden = student_hidden[start:end].to(dtype)
            logits = F.linear(hidden, weight, bias).to(loss_dtype)
            teacher_logits = None
            if teacher is not None:
                teacher_logits = F.linear(teacher_hidden[start:end].to(teacher[0].dtype), *teacher)
            with torch.enable_grad():
                logits.requires_grad_(any(needs_grad))
                loss = _token_losses(spec, logits, teacher_logits, targets[start:end]).sum() * scale
            if any(needs_grad):
                (grad_logits,) = torch.autograd.grad(loss, logits)
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = grad_logits @ weight
                if grad_weight is not None:
                    grad_weight += grad_logits.t() @ hidden
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
            total += loss.detach()
    cast = [
        None if g is None else g.to(like.dtype)
        for g, like in ((grad_weight, student_weight), (grad_bias, student_bias))
    ]
    return total, grad_hidden, cast[0], cast[1]


class _FusedLinearLoss(torch.autograd.Function):
    """Fused LM head + loss whose backward returns gradients computed during the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        targets,
        spec,
        chunk_size,
        scale,
    ):  # type: ignore[override]
        needs_grad = tuple(ctx.needs_input_grad[:3])
        loss, *grads = _fused_linear_chunks(
            spec,
            hidden,
            weight,
            bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            targets,
            chunk_size,
            scale,
            needs_grad,
        )
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        grads = _scale_grads(ctx.saved_tensors, grad_output)
        return *grads, None, None, None, None, None, None, None


@functools.cache
def liger_available() -> bool:
    """Whether Liger-Kernel's fused linear JSD imports (checked once; a broken install counts as
    absent rather than failing inside a training step)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
    except Exception:  # e.g. a Triton it was not built for
        return False
    return True


def _liger_refusal(kind: str, device: torch.device, biases: bool, explicit: bool) -> str | None:
    """Why the Liger backend does not run these inputs (None if it does). ``auto`` takes it on
    CUDA only; an explicit ``backend="liger"`` also runs in the Triton interpreter (tests)."""
    if kind not in LIGER_KINDS:
        return (
            f"Liger-Kernel's fused linear JSD has no kind={kind!r} (it has {sorted(LIGER_KINDS)})"
        )
    if biases:
        return "Liger-Kernel's fused linear JSD takes no LM-head bias"
    interpreted = explicit and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return f"Liger-Kernel's Triton kernels need CUDA tensors, got {device.type} tensors"
    if not liger_available():
        return "Liger-Kernel is not installed or does not import (pip install liger-kernel)"
    return None


@functools.cache
def _liger_takes_accum_dtype() -> bool:
    """Whether this Liger-Kernel's fused linear JSD has ``accum_dtype`` (newer releases)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    return "accum_dtype" in inspect.signature(LigerFusedLinearJSD).parameters


def _liger_loss(
    kind: str,
    temperature: float,
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
) -> Tensor:
    """``Σ`` of the per-token losses through ``LigerFusedLinearJSD`` (it averages over rows and
    does not scale by ``τ²``)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    device = hidden.device.type
    if not torch.is_autocast_enabled(device):  # it multiplies hidden states by weights as given
        hidden = hidden.to(weight.dtype)
        teacher_hidden = teacher_hidden.to(teacher_weight.dtype)
    options: dict[str, Any] = {"jsd_beta": LIGER_KINDS[kind], "temperature": temperature}
    if _liger_takes_accum_dtype():
        options["accum_dtype"] = torch.float32  # the weight gradient sums over chunks
    jsd = LigerFusedLinearJSD(**options)
    mean = jsd(hidden, weight, teacher_hidden, teacher_weight, None)
    return mean.float() * (hidden.shape[0] * temperature**2)


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`distillation_loss` of ``logits = hidden @ weightᵀ + bias`` without the logits.

    Only the response rows of the final hidden states are projected, ``chunk_size`` at a time,
    and the student's gradients (hidden states, head weight and bias) are computed in the same
    pass, so the ``[B, T, V]`` logits of neither model are ever materialized. Values equal
    :func:`distillation_loss` on the logits an ``nn.Linear`` head gives (same matmul dtype,
    autocast included). The teacher is constant: its inputs must not require grad.

    Args:
        student_hidden: [B, T, d_S] the student's last hidden states (the LM head's input).
        student_weight: [V, d_S] the student's LM-head weight; student_bias: [V] or None.
        teacher_hidden: [B, T, d_T] the teacher's last hidden states, or None for ``kind="ce"``.
        teacher_weight: [V', d_T] the teacher's LM-head weight; teacher_bias: [V'] or None.
        labels, kind, temperature, skew_alpha, vocab_size, ignore_index, reduction: as in
            :func:`distillation_loss`.
        chunk_size: response rows per chunk; default ``max(1, 2**25 // V)``.
        backend: ``"torch"`` (this module's chunks), ``"liger"`` (Liger-Kernel's
            ``LigerFusedLinearJSD``: kinds ``fkl``/``rkl``/``jsd``, no bias, CUDA) or
            ``"auto"`` (Liger when it can run these inputs and gradients are wanted, else
            torch).

    Returns:
        A float32 scalar (float64 for float64 weights with the torch backend).
    """
    _check_floating("student_hidden", student_hidden, 3, "[B, T, d_S]")
    _check_floating("student_weight", student_weight, 2, "[V, d_S]")
    batch, length, width = student_hidden.shape
    _check_settings(kind, reduction, temperature, skew_alpha, chunk_size, labels, batch, length)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if student_weight.shape[1] != width:
        raise ValueError(
            f"student_weight must have shape [V, d_S] with d_S={width} like student_hidden, got "
            f"{tuple(student_weight.shape)}"
        )
    if kind == "ce":
        teacher_hidden = teacher_weight = teacher_bias = None
    elif teacher_hidden is None or teacher_weight is None:
        raise ValueError(
            f"kind={kind!r} needs teacher_hidden and teacher_weight; only kind='ce' works "
            "without them"
        )
    else:
        _check_floating("teacher_hidden", teacher_hidden, 3, "[B, T, d_T]")
        _check_floating("teacher_weight", teacher_weight, 2, "[V', d_T]")
        if tuple(teacher_hidden.shape[:2]) != (batch, length):
            raise ValueError(
                f"teacher_hidden must have shape [B, T, d_T] with [B, T] = {(batch, length)} "
                f"like student_hidden, got {tuple(teacher_hidden.shape)}"
            )
        if teacher_weight.shape[1] != teacher_hidden.shape[2]:
            raise ValueError(
                f"teacher_weight must have shape [V', d_T] with d_T={teacher_hidden.shape[2]} "
                f"like teacher_hidden, got {tuple(teacher_weight.shape)}"
            )
        if any(
            t is not None and t.requires_grad
            for t in (teacher_hidden, teacher_weight, teacher_bias)
        ):
            raise ValueError(
                "the teacher is constant in fused_linear_distillation_loss: teacher_hidden, "
                "teacher_weight and teacher_bias must not require grad (detach them, or use "
                "distillation_loss on logits to train through the teacher)"
            )
    for name, bias, weight in (
        ("student_bias", student_bias, student_weight),
        ("teacher_bias", teacher_bias, teacher_weight),
    ):
        if bias is not None and (
            not isinstance(bias, Tensor) or tuple(bias.shape) != weight.shape[:1]
        ):
            raise ValueError(
                f"{name} must be None or a [V] tensor with V={weight.shape[0]}, got "
                f"{getattr(bias, 'shape', bias)}"
            )
    _check_same_device(
        "student_hidden, student_weight, teacher_hidden, teacher_weight, the biases and labels",
        [
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
        ],
    )
    teacher_vocab = None if teacher_weight is None else teacher_weight.shape[0]
    vocab = _check_vocab(student_weight.shape[0], teacher_vocab, vocab_size)

    rows, targets, scale = _response_rows(labels, ignore_index, reduction)
    hidden = student_hidden.reshape(batch * length, width).index_select(0, rows)
    weight = student_weight[:vocab]
    bias = None if student_bias is None else student_bias[:vocab]
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.reshape(batch * length, -1).index_select(0, rows)
        teacher_weight = teacher_weight[:vocab]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab]

    biases = student_bias is not None or teacher_bias is not None
    refusal = _liger_refusal(kind, hidden.device, biases, explicit=backend == "liger")
    if backend == "liger" and refusal is not None:
        raise ValueError(f"backend='liger' cannot run this loss: {refusal}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    # Liger computes the gradients in its forward whether they are needed or not: "auto" keeps
    # it for training steps. With no response row there is nothing to project.
    use_liger = backend == "liger" or (backend == "auto" and needs_grad)
    if use_liger and refusal is None and rows.numel() > 0:
        total = _liger_loss(
            kind, float(temperature), hidden, weight, teacher_hidden, teacher_weight
        )
        return total * scale

    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // vocab)
    spec = _Spec(kind, float(temperature), float(skew_alpha), vocab)
    tensors = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets)
    if needs_grad:
        return _FusedLinearLoss.apply(*tensors, spec, chunk_size, scale)
    return _fused_linear_chunks(spec, *tensors, chunk_size, scale, (False, False, False))[0]
