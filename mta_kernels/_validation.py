"""Argument checks shared by the reference and the fused ops.

Every public op calls its ``check_*`` function before any computation or kernel launch, so bad
input fails with a ``ValueError``/``TypeError`` that names the argument instead of producing a
silent wrong answer or an illegal memory access. The span range check reads one scalar back from
the device (one host synchronization per call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mta_kernels._switches import SWITCHES

# Numerical guards of docs/design.md §2.
STD_EPS = 1e-8  # token importance: H / (std + eps); cosine of hidden states: max(norm, eps)
DENOM_EPS = 1e-8  # span pooling and span weights: max(sum of weights, eps)
NORM_EPS = 1e-12  # cosine distance: U / max(norm, eps)

METRICS = ("cosine", "euclidean")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


def check_float(name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {_describe(t)}")


def check_mask(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    """A token mask (``attention_mask``, ``token_mask``): bool or integer, nonzero = valid, as
    Hugging Face's integer attention masks."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be a bool or integer 0/1 tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_span_mask(t: Tensor, shape: tuple[int, ...]) -> None:
    """The validity of units: a bool tensor, as the collator makes it (an integer mask could hold
    values other than 0 and 1, which no op can interpret)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"span_mask must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(
            f"span_mask must be a bool tensor (True marks a valid unit), got {t.dtype}; "
            "convert a 0/1 mask with span_mask.bool()"
        )
    if tuple(t.shape) != shape:
        raise ValueError(f"span_mask must have shape {shape}, got {tuple(t.shape)}")


def check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_same_device(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_spans(spans: Tensor, span_mask: Tensor, batch: int, num_tokens: int) -> None:
    """``spans`` int [B, K, 2] with ``0 <= start <= end <= T`` wherever ``span_mask`` is set
    (the range part reads a flag back from the device; ``assume_valid_spans`` skips it)."""
    if not isinstance(spans, Tensor):
        raise TypeError(f"spans must be a torch.Tensor, got {type(spans).__name__}")
    if spans.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"spans must be an int64 or int32 tensor of token ranges, got {spans.dtype}"
        )
    if spans.dim() != 3 or spans.shape[0] != batch or spans.shape[2] != 2:
        raise ValueError(f"spans must have shape [B={batch}, K, 2], got {tuple(spans.shape)}")
    check_span_mask(span_mask, (batch, spans.shape[1]))
    if spans.numel() == 0 or torch.compiler.is_compiling() or not SWITCHES.span_range_checks:
        return  # compiled graphs skip the value check; the kernels clamp ranges into [0, T]
    valid = span_mask.bool()
    starts, ends = spans[..., 0], spans[..., 1]
    bad_range = valid & ((starts < 0) | (ends > num_tokens))
    bad_order = valid & (starts > ends)
    flags = torch.stack([bad_range.any(), bad_order.any()]).tolist()
    if flags[0]:
        b, k = (int(i) for i in bad_range.nonzero()[0])
        raise ValueError(f"spans[{b}, {k}] = {spans[b, k].tolist()} is outside [0, T={num_tokens}]")
    if flags[1]:
        b, k = (int(i) for i in bad_order.nonzero()[0])
        raise ValueError(f"spans[{b}, {k}] = {spans[b, k].tolist()} has start > end")


def check_token_importance_args(
    hidden: Tensor, attention_mask: Tensor, std_eps: float | None = None
) -> None:
    """``std_eps``: ``None`` (the default ε) or a positive finite number."""
    if std_eps is not None:
        if isinstance(std_eps, bool) or not isinstance(std_eps, (int, float)) or not std_eps > 0:
            raise ValueError(f"std_eps must be a positive number, got {std_eps!r}")
        if std_eps == float("inf"):
            raise ValueError(f"std_eps must be finite, got {std_eps!r}")
    check_float("hidden", hidden, 3)
    if hidden.shape[-1] < 2:
        raise ValueError(
            f"hidden must have a width d >= 2 (std is Bessel-corrected), got {hidden.shape}"
        )
    check_mask("attention_mask", attention_mask, tuple(hidden.shape[:2]))
    check_same_device(hidden=hidden, attention_mask=attention_mask)


def check_token_weights(token_weights: Tensor, batch: int, num_tokens: int) -> None:
    check_float("token_weights", token_weights, 2)
    check_shape("token_weights", token_weights, (batch, num_tokens))


def check_span_pool_args(
    hidden: Tensor, spans: Tensor | None, span_mask: Tensor, token_weights: Tensor | None
) -> None:
    """``spans`` None: they come from a SpanIndex, checked when it was built (checking their
    shape again inside a compiled step would make its sizes constants)."""
    check_float("hidden", hidden, 3)
    batch, num_tokens = hidden.shape[0], hidden.shape[1]
    if token_weights is not None:
        check_token_weights(token_weights, batch, num_tokens)
    check_same_device(hidden=hidden, spans=spans, span_mask=span_mask, token_weights=token_weights)
    if spans is not None:
        check_spans(spans, span_mask, batch, num_tokens)


def check_span_weights_args(token_weights: Tensor, spans: Tensor | None, span_mask: Tensor) -> None:
    """``spans`` as in :func:`check_span_pool_args`."""
    check_float("token_weights", token_weights, 2)
    check_same_device(token_weights=token_weights, spans=spans, span_mask=span_mask)
    if spans is not None:
        check_spans(spans, span_mask, token_weights.shape[0], token_weights.shape[1])


def check_pairwise_distance_args(units: Tensor, span_mask: Tensor | None, metric: str) -> None:
    check_float("units", units, 3)
    if span_mask is not None:
        check_span_mask(span_mask, tuple(units.shape[:2]))
    check_same_device(units=units, span_mask=span_mask)
    check_choice("metric", metric, METRICS)


def check_structural_loss_args(
    student_units: Tensor,
    teacher_units: Tensor,
    span_weights: Tensor,
    span_mask: Tensor,
    metric: str,
    reduction: str,
) -> None:
    check_float("student_units", student_units, 3)
    check_float("teacher_units", teacher_units, 3)
    if teacher_units.shape[:2] != student_units.shape[:2]:
        raise ValueError(
            "student_units and teacher_units must share [B, K] (their widths may differ), got "
            f"{tuple(student_units.shape)} and {tuple(teacher_units.shape)}"
        )
    batch_units = tuple(student_units.shape[:2])
    check_float("span_weights", span_weights, 2)
    check_shape("span_weights", span_weights, batch_units)
    check_span_mask(span_mask, batch_units)
    check_same_device(
        student_units=student_units,
        teacher_units=teacher_units,
        span_weights=span_weights,
        span_mask=span_mask,
    )
    check_choice("metric", metric, METRICS)
    check_choice("reduction", reduction, REDUCTIONS)


def _both_shapes(student_hidden: Tensor, teacher_hidden: Tensor) -> str:
    # only on the error path: formatting shapes inside a compiled step would break its graph
    return f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden " + str(
        tuple(teacher_hidden.shape)
    )


def check_hidden_alignment_args(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    token_weights: Tensor,
    token_mask: Tensor,
    reduction: str,
) -> None:
    check_float("student_hidden", student_hidden, 3)
    check_float("teacher_hidden", teacher_hidden, 3)
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            "student_hidden and teacher_hidden must hold the same tokens, one row per token of "
            f"the same batch: their [B, T] differ ({_both_shapes(student_hidden, teacher_hidden)})"
        )
    if student_hidden.shape[2] != teacher_hidden.shape[2]:
        raise ValueError(
            "student_hidden must be projected to the teacher's width d_T before the hidden "
            f"alignment loss (e.g. by MTALoss's projectors), got widths {student_hidden.shape[2]} "
            f"and {teacher_hidden.shape[2]} ({_both_shapes(student_hidden, teacher_hidden)})"
        )
    batch, num_tokens = student_hidden.shape[0], student_hidden.shape[1]
    check_token_weights(token_weights, batch, num_tokens)
    check_mask("token_mask", token_mask, (batch, num_tokens))
    check_same_device(
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        token_weights=token_weights,
        token_mask=token_mask,
    )
    check_choice("reduction", reduction, REDUCTIONS)
