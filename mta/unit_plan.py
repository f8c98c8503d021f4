"""The units of one batch, prepared once: the batch contract between the data and the MTA loss.

A :class:`UnitPlan` is built where a batch is collated — on the CPU, in the data loader's workers
(:class:`mta.data.DistillationCollator` does it) — from the padded unit ranges of
:func:`mta.spans.pad_unit_spans` and the attention masks. Building it validates every span there
(no device is involved, so no host synchronization) and prepares, per granularity, everything the
ops of every layer pair read: the spans sorted, with the per-token candidate counts of the backward
gather (:class:`mta_kernels.SpanIndex`, for the student's tokens and, with two tokenizers, the
teacher's), and the coverage of HRA (how many units hold each token). It moves to the device
with the batch (``to``, ``pin_memory``: the data loader and ``accelerate`` call them), and
:class:`mta.loss.MTALoss` only reads it — so one step of the loss rebuilds nothing and reads
nothing back from the device.

The keys it is built from (``{g}_student_spans``, ``{g}_teacher_spans`` LongTensor[B, K_g, 2],
``{g}_span_mask`` BoolTensor[B, K_g], ``attention_mask`` [B, T], ``teacher_attention_mask``
[B, T'] with two tokenizers) stay valid as a batch of their own: ``MTALoss`` builds the plan from
them when a batch has none (validating them then: on a GPU, one host synchronization per span
tensor, i.e. per granularity and tokenization).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import mta_kernels as mk
from mta.layers import GRANULARITIES

__all__ = ["PLAN_KEY", "GranularityUnits", "UnitPlan", "coverage"]

#: Where a collated batch (a dict) keeps its plan.
PLAN_KEY = "unit_plan"


def coverage(index: mk.SpanIndex, attention_mask: Tensor) -> Tensor:
    """How many valid units hold each valid token, [B, T] int32 (0 on padding): nonzero is the
    ``c_t`` of HRA, and the count is the token's number of memberships (the authors' variant
    weighs each token once per unit it is in).

    A difference array (+1 at each valid start, −1 at its end) and a cumulative sum over ``T``:
    ``O(B·(K + T))``, no ``[B, K, T]`` membership matrix. Invalid units are empty ranges at 0.
    """
    batch, num_tokens = attention_mask.shape
    delta = torch.zeros(batch, num_tokens + 1, dtype=torch.int32, device=attention_mask.device)
    ones = index.valid.to(torch.int32)
    delta.scatter_add_(1, index.starts.long(), ones)
    delta.scatter_add_(1, index.ends.long(), -ones)
    counts = delta.cumsum(dim=1, dtype=torch.int32)[:, :num_tokens]
    return torch.where(attention_mask.bool(), counts, 0)


@dataclass(frozen=True)
class GranularityUnits:
    """The units of one granularity: their spans in the student's tokens and in the teacher's
    (the same index with one tokenizer), and how many of them hold each student token
    (:func:`coverage`: nonzero is HRA's ``c_t``)."""

    student: mk.SpanIndex
    teacher: mk.SpanIndex
    coverage: Tensor

    @property
    def mask(self) -> Tensor:
        """[B, K] bool: the unit is valid (in both tokenizations)."""
        return self.student.valid

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GranularityUnits:
        student = self.student.to(device, non_blocking=non_blocking)
        teacher = (
            student
            if self.teacher is self.student
            else self.teacher.to(device, non_blocking=non_blocking)
        )
        return GranularityUnits(
            student, teacher, self.coverage.to(device, non_blocking=non_blocking)
        )

    def pin_memory(self) -> GranularityUnits:
        student = self.student.pin_memory()
        teacher = student if self.teacher is self.student else self.teacher.pin_memory()
        return GranularityUnits(student, teacher, self.coverage.pin_memory())


def _tensor(batch: Mapping[str, Any], key: str, what: str) -> Tensor:
    if key not in batch:
        raise ValueError(f"batch is missing {key!r} ({what})")
    value = batch[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    return value


def _mask(batch: Mapping[str, Any], key: str, what: str) -> Tensor:
    mask = _tensor(batch, key, what)
    if mask.dim() != 2:
        raise ValueError(f"batch[{key!r}] must have shape [B, T], got {tuple(mask.shape)}")
    return mask


@dataclass(frozen=True)
class UnitPlan:
    """The units of one batch, validated and prepared for every op (see the module docstring).

    ``attention_mask`` [B, T] is the student's; ``teacher_attention_mask`` [B, T'] is set only
    when the teacher has its own tokenizer; ``units`` maps a granularity to its
    :class:`GranularityUnits`.
    """

    attention_mask: Tensor
    teacher_attention_mask: Tensor | None
    units: Mapping[str, GranularityUnits]

    @property
    def cross_tokenizer(self) -> bool:
        return self.teacher_attention_mask is not None

    @property
    def device(self) -> torch.device:
        return self.attention_mask.device

    def __getitem__(self, granularity: str) -> GranularityUnits:
        if granularity not in self.units:
            raise ValueError(
                f"the batch has no {granularity} units ({granularity}_student_spans, "
                f"{granularity}_span_mask from the collator in mta.spans), which layer pairs of "
                f"that granularity need; it has: {sorted(self.units) or 'none'}"
            )
        return self.units[granularity]

    def __iter__(self) -> Iterator[str]:
        return iter(self.units)

    @classmethod
    def from_batch(
        cls, batch: Mapping[str, Any], granularities: Sequence[str] = GRANULARITIES
    ) -> UnitPlan:
        """Validate and prepare the units of a collated batch (any device; on the CPU nothing
        is read back from a device).

        Args:
            batch: ``attention_mask``, per granularity ``g`` of ``granularities`` that the batch
                holds, ``{g}_student_spans`` and ``{g}_span_mask``; with two tokenizers
                (``teacher_attention_mask`` or ``teacher_input_ids`` in the batch) also
                ``teacher_attention_mask`` and ``{g}_teacher_spans``.
            granularities: the granularities to prepare; those the batch lacks are left out
                (indexing the plan with one says what is missing).

        Raises:
            ValueError/TypeError: a missing key, a wrong shape or dtype, a span outside its
                tokens (naming the key, the example and the unit).
        """
        attention = _mask(batch, "attention_mask", "the student's attention mask [B, T]")
        cross = "teacher_attention_mask" in batch or "teacher_input_ids" in batch
        teacher_attention = (
            _mask(
                batch,
                "teacher_attention_mask",
                "the teacher's attention mask [B, T'], needed when the batch has teacher tokens",
            )
            if cross
            else None
        )
        teacher_tokens = (teacher_attention if cross else attention).shape
        units = {}
        for g in granularities:
            if f"{g}_student_spans" not in batch and f"{g}_span_mask" not in batch:
                continue
            what = f"from the collator in mta.spans; needed by the layer pairs with {g} units"
            spans = _tensor(batch, f"{g}_student_spans", what)
            span_mask = _tensor(batch, f"{g}_span_mask", what)
            student = _index(f"{g}_student_spans", spans, span_mask, attention.shape)
            teacher = student
            if cross:
                teacher_spans = _tensor(batch, f"{g}_teacher_spans", what)
                teacher = _index(f"{g}_teacher_spans", teacher_spans, span_mask, teacher_tokens)
            units[g] = GranularityUnits(student, teacher, coverage(student, attention))
        return cls(attention, teacher_attention, units)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UnitPlan:
        """The plan on ``device`` (what ``accelerate`` calls on every batch)."""
        teacher = self.teacher_attention_mask
        return UnitPlan(
            self.attention_mask.to(device, non_blocking=non_blocking),
            None if teacher is None else teacher.to(device, non_blocking=non_blocking),
            {g: u.to(device, non_blocking=non_blocking) for g, u in self.units.items()},
        )

    def pin_memory(self) -> UnitPlan:
        """The plan in pinned host memory (what the data loader calls with ``pin_memory``)."""
        teacher = self.teacher_attention_mask
        return UnitPlan(
            self.attention_mask.pin_memory(),
            None if teacher is None else teacher.pin_memory(),
            {g: u.pin_memory() for g, u in self.units.items()},
        )


def _index(key: str, spans: Tensor, span_mask: Tensor, tokens: torch.Size) -> mk.SpanIndex:
    """:func:`mta_kernels.span_index` against the [B, T] of ``tokens``, its messages naming the
    batch key."""
    try:
        if spans.dim() >= 1 and spans.shape[0] != tokens[0]:
            raise ValueError(
                f"holds {spans.shape[0]} examples where the attention mask has {tokens[0]}"
            )
        return mk.span_index(spans, span_mask, tokens[1])
    except (TypeError, ValueError) as err:
        raise type(err)(f"batch[{key!r}]: {err}") from None
