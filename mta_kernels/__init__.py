"""Fused Triton kernels, with hand-written backward passes, for MTA distillation losses.

Public ops (shapes and equations in each docstring and in docs/design.md §2):

* :func:`token_importance` — teacher token importance ``w`` [B, T] (Eq. 5–7), no T×T matrix;
  :func:`token_importance_layers` for several teacher layers in one set of launches.
* :func:`span_pool` — weighted span pooling [B, K, d] (Eq. 8), no K×T matrix.
* :func:`span_weights` — span weights ``p`` [B, K] (Eq. 9).
* :func:`pairwise_distance` — cosine / euclidean unit distances [B, K, K].
* :func:`structural_loss` — fused DSA loss (Eq. 10–11), no K×K matrix.
* :func:`hidden_alignment_loss` — HRA loss (Eq. 13).

CUDA tensors run the Triton kernels, CPU tensors the eager :mod:`mta_kernels.reference` (or the
Triton kernels through the interpreter when ``TRITON_INTERPRET=1`` is set before import).
"""

from mta_kernels import reference
from mta_kernels._switches import assume_valid_spans, prefer_reference, set_fp32_matmul_precision
from mta_kernels._validation import check_spans
from mta_kernels.hidden_alignment import hidden_alignment_loss
from mta_kernels.pairwise_distance import pairwise_distance
from mta_kernels.span_pool import SpanIndex, span_index, span_pool, span_weights
from mta_kernels.structural_loss import structural_loss
from mta_kernels.token_importance import token_importance, token_importance_layers

__all__ = [
    "SpanIndex",
    "assume_valid_spans",
    "check_spans",
    "hidden_alignment_loss",
    "pairwise_distance",
    "prefer_reference",
    "reference",
    "set_fp32_matmul_precision",
    "span_index",
    "span_pool",
    "span_weights",
    "structural_loss",
    "token_importance",
    "token_importance_layers",
]
