"""The process-wide switches of ``mta_kernels``, in one object (:data:`SWITCHES`).

* ``interpreter``: ``TRITON_INTERPRET=1`` was set when Triton was imported, so CPU tensors may run
  the kernels (read once, at import).
* ``prefer_reference``: above 0, CPU tensors take the eager reference anyway
  (:func:`prefer_reference`, which nests); ``prefer_reference_cuda``: the same for CUDA tensors
  (``prefer_reference(cuda=True)``: benchmarks and counts of the eager path on a GPU).
* ``span_range_checks``: the span range check, one host synchronization per op
  (:func:`assume_valid_spans` turns it off).
* ``fp32_dot_precision``: how ``tl.dot`` treats fp32 operands (:func:`set_fp32_matmul_precision`).
* ``small_blocks``: interpreter-sized tiles; tests turn it off to run the GPU tile sizes on CPU.
* ``poison_outputs``: NaN-fill kernel outputs before launch (tests), so that an element a kernel
  forgets to write fails a comparison.
* ``structural_design``: ``"auto"`` (the structural loss picks its design by shape:
  :func:`mta_kernels.structural_loss.structural_design`), or ``"saved"`` / ``"recompute"`` /
  ``"moments"`` to force one (tests run each on the same inputs; the euclidean metric has no
  ``"moments"`` form and recomputes instead).

A plain object, not ``ContextVar``s: the dispatch runs inside compiled graphs, and Dynamo traces
(and guards on) attribute reads of a global object but not ``ContextVar.get``. The switches are
therefore process-wide, not per thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "PRECISIONS",
    "SWITCHES",
    "Switches",
    "assume_valid_spans",
    "prefer_reference",
    "set_fp32_matmul_precision",
]

#: ``tl.dot`` modes for fp32 operands: "tf32x3" splits each operand into a tf32 head and tail and
#: runs three tensor-core products, close to fp32 (~1e-6 relative); "ieee" is exact fp32 on CUDA
#: cores (slow); "tf32" the fastest (~1e-3 relative). bf16 operands always use tensor cores with
#: fp32 accumulation; the interpreter computes every dot exactly whatever the mode.
PRECISIONS = ("tf32x3", "ieee", "tf32")


@dataclass
class Switches:
    """See the module docstring."""

    interpreter: bool
    prefer_reference: int = 0
    prefer_reference_cuda: int = 0
    span_range_checks: bool = True
    fp32_dot_precision: str = "tf32x3"
    small_blocks: bool = False
    poison_outputs: bool = False
    structural_design: str = "auto"


_interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
SWITCHES = Switches(interpreter=_interpreter, small_blocks=_interpreter)


@contextlib.contextmanager
def prefer_reference(cuda: bool = False) -> Iterator[None]:
    """Inside this block CPU tensors take the eager reference even when ``TRITON_INTERPRET=1``
    — for code that runs whole models on CPU, where the interpreter would be needlessly slow —
    and, with ``cuda=True``, CUDA tensors too (to measure the eager path on a GPU); otherwise CUDA
    tensors still run the Triton kernels. Process-wide, not per thread."""
    SWITCHES.prefer_reference += 1
    SWITCHES.prefer_reference_cuda += int(cuda)
    try:
        yield
    finally:
        SWITCHES.prefer_reference -= 1
        SWITCHES.prefer_reference_cuda -= int(cuda)


@contextlib.contextmanager
def assume_valid_spans() -> Iterator[None]:
    """Skip the span *range* check (and its host synchronization) inside this block.

    For callers that validated their spans once (``check_spans``) and then call several ops with
    them (a :class:`~mta_kernels.SpanIndex` does this for the span ops by itself). Shape and
    dtype checks still run, and the kernels
    clamp ranges into ``[0, T]``, so an unchecked bad span can give a wrong value, never an
    illegal memory access. Process-wide, not per thread.
    """
    before = SWITCHES.span_range_checks
    SWITCHES.span_range_checks = False
    try:
        yield
    finally:
        SWITCHES.span_range_checks = before


def set_fp32_matmul_precision(precision: str) -> None:
    """How ``tl.dot`` treats fp32 operands: ``"tf32x3"`` (default), ``"ieee"`` or ``"tf32"``
    (see :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    SWITCHES.fp32_dot_precision = precision
