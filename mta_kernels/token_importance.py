"""Teacher token importance (Eq. 5–7) without the T×T score matrix.

``w_t = (1/N) Σ_s softmax_t(Ĥ_s·Ĥ_t / √d)`` over valid rows ``s`` (or all ``T`` rows: the
``padding_rows`` option of the authors' released variant) and valid columns ``t ≠ s``, with
``Ĥ = H / (std(H) + ε)``, ``ε = 1e-8`` by default. Three launches, all O(B·T·d) memory:

1. ``_inv_std_kernel``: ``r_t = 1 / (std(H_t) + 1e-8)`` per token (two passes over ``d``).
2. ``_row_stats_kernel``: flash-style online softmax over key tiles → per-row max ``m_s`` and sum
   ``ℓ_s``. The key range is split over ``n_split`` programs per row block when the batch alone
   would not fill the GPU (each split writes its own partial ``(m, ℓ)``: no atomics).
3. ``_column_sum_kernel``: merges the splits' partials of each row block it reads
   (``m = max_k m_k``, ``ℓ = Σ_k ℓ_k e^{m_k − m}``, in a fixed order), recomputes each score tile
   and sums ``exp(A_st − m_s) / ℓ_s`` over the valid rows with a valid column, counting the valid
   rows ``N`` along the same sweep, and divides by ``N``.

Scores are ``r_s r_t ⟨H_s, H_t⟩ / √d``: ``tl.dot`` on the raw states (tensor cores for 16-bit input)
with the normalization folded in afterwards. The op has no gradient (teacher side).

:func:`token_importance_layers` computes it for up to :data:`LAYERS_PER_LAUNCH` teacher layers of
the same shape in those three launches (a grid axis over the layers, each program picking its
layer's tensor), which is how :class:`mta.loss.MTALoss` calls it.
"""

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from mta_kernels import reference
from mta_kernels._common import (
    block_size,
    contiguous,
    dot_precision,
    empty_output,
    on_input_device,
    small_blocks,
    use_triton,
    work_splits,
)
from mta_kernels._validation import STD_EPS, check_token_importance_args

#: Teacher layers one set of launches handles (the kernels take that many tensor arguments).
LAYERS_PER_LAUNCH = 4


@triton.jit
def _layer(h0_ptr, h1_ptr, h2_ptr, h3_ptr, layer):
    """The hidden states of ``layer`` (0..3) among the launch's tensors."""
    return tl.where(
        layer == 0, h0_ptr, tl.where(layer == 1, h1_ptr, tl.where(layer == 2, h2_ptr, h3_ptr))
    )


@triton.jit
def _inv_std_kernel(
    h0_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    mask_ptr,
    inv_std_ptr,
    n_rows,
    D,
    eps,
    ALL_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (token, layer): ``1 / (std(H_t) + eps)`` (Bessel-corrected), 0 on
    padding unless ``ALL_ROWS`` (padding rows are queries too); ``inv_std`` is [L, B·T]."""
    layer = tl.program_id(1)
    h_ptr = _layer(h0_ptr, h1_ptr, h2_ptr, h3_ptr, layer)
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        total += tl.load(h_ptr + row * D + offs, mask=offs < D, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=0) / D
    sq = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_ptr + row * D + offs, mask=offs < D, other=0.0).to(tl.float32)
        centred = tl.where(offs < D, x - mean, 0.0)
        sq += centred * centred
    std = tl.sqrt(tl.sum(sq, axis=0) / (D - 1))
    valid = (tl.load(mask_ptr + row) != 0) | ALL_ROWS
    tl.store(inv_std_ptr + layer * n_rows + row, tl.where(valid, 1.0 / (std + eps), 0.0))


@triton.jit
def _query_rows(mask_ptr, batch, offs_m, T, ALL_ROWS: tl.constexpr):
    """The rows that count as queries: valid tokens, or every in-range row with ``ALL_ROWS``."""
    valid = tl.load(mask_ptr + batch * T + offs_m, mask=offs_m < T, other=0) != 0
    return (valid | ALL_ROWS) & (offs_m < T)


@triton.jit
def _score_tile(
    h_ptr,
    inv_std_ptr,
    mask_ptr,
    batch,
    offs_m,
    offs_n,
    T,
    D,
    scale,
    ALL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Masked scores ``A[offs_m, offs_n]`` of one example: −∞ on the diagonal, padding columns and
    out-of-range positions. Padding columns are never loaded, nor padding rows unless
    ``ALL_ROWS``, so whatever a model leaves in padding positions (even NaN) cannot leak into the
    valid scores."""
    base = h_ptr + batch * T * D
    row_valid = _query_rows(mask_ptr, batch, offs_m, T, ALL_ROWS)
    col_valid = tl.load(mask_ptr + batch * T + offs_n, mask=offs_n < T, other=0) != 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(
            base + offs_m[:, None] * D + offs_d[None, :],
            mask=row_valid[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        k = tl.load(
            base + offs_n[:, None] * D + offs_d[None, :],
            mask=col_valid[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    r_m = tl.load(inv_std_ptr + batch * T + offs_m, mask=offs_m < T, other=0.0)
    r_n = tl.load(inv_std_ptr + batch * T + offs_n, mask=offs_n < T, other=0.0)
    keep = col_valid[None, :] & (offs_m[:, None] != offs_n[None, :])
    return tl.where(keep, acc * (r_m[:, None] * r_n[None, :] * scale), float("-inf"))


@triton.jit
def _row_stats_kernel(
    h0_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    inv_std_ptr,
    mask_ptr,
    row_max_ptr,
    row_sum_ptr,  # [n_split, L, B, T] fp32 partial (m, ℓ) of each split's key tiles
    B,
    T,
    D,
    scale,
    ALL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles ``≡ split (mod n_split)`` for a block of query rows:
    stores that split's ``m_s`` (0 while no valid column was seen) and ``ℓ_s`` (grid axis 1:
    example + B·layer, axis 2: split)."""
    pid_m, batch, layer = tl.program_id(0), tl.program_id(1) % B, tl.program_id(1) // B
    split, n_split = tl.program_id(2), tl.num_programs(2)
    h_ptr = _layer(h0_ptr, h1_ptr, h2_ptr, h3_ptr, layer)
    batch = batch.to(tl.int64)
    shift = layer.to(tl.int64) * B * T  # this layer's slice of the [L, B, T] buffers
    inv_std_ptr += shift
    partial = split.to(tl.int64) * tl.num_programs(1) * T + shift
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(split * BLOCK_N, T, n_split * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        scores = _score_tile(
            h_ptr,
            inv_std_ptr,
            mask_ptr,
            batch,
            offs_m,
            offs_n,
            T,
            D,
            scale,
            ALL_ROWS,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            PRECISION,
        )
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # Rows with no valid column yet keep a finite reference point so exp never sees inf − inf.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(
            tl.exp(scores - safe_max[:, None]), axis=1
        )
        row_max = new_max
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    tl.store(row_max_ptr + partial + batch * T + offs_m, safe_max, mask=offs_m < T)
    tl.store(row_sum_ptr + partial + batch * T + offs_m, row_sum, mask=offs_m < T)


@triton.jit
def _column_sum_kernel(
    h0_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    inv_std_ptr,
    mask_ptr,
    row_max_ptr,
    row_sum_ptr,
    out_ptr,
    B,
    T,
    D,
    scale,
    n_split,
    ALL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``w_t = (1/N) Σ_s exp(A_st − m_s) / ℓ_s`` for a block of key columns, over the query rows
    ``s`` (valid, or all with ``ALL_ROWS``) with a valid column (``ℓ_s ≠ 0``), ``N`` their count,
    zero on padding (grid axis 1: example + B·layer)."""
    pid_n, batch, layer = tl.program_id(0), tl.program_id(1) % B, tl.program_id(1) // B
    h_ptr = _layer(h0_ptr, h1_ptr, h2_ptr, h3_ptr, layer)
    batch = batch.to(tl.int64)
    shift = layer.to(tl.int64) * B * T
    inv_std_ptr += shift
    out_ptr += shift
    split_stride = tl.num_programs(1) * T  # one split's [L, B, T] partials
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    n_valid = tl.zeros((BLOCK_M,), tl.float32)  # N of the example, counted along the sweep
    for m0 in range(0, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = shift + batch * T + offs_m
        in_range = offs_m < T
        row_max = tl.load(row_max_ptr + rows, mask=in_range, other=0.0)
        row_sum = tl.load(row_sum_ptr + rows, mask=in_range, other=0.0)
        for k in range(1, n_split):  # merge the splits' softmax statistics, in order
            other_max = tl.load(row_max_ptr + k * split_stride + rows, mask=in_range, other=0.0)
            other_sum = tl.load(row_sum_ptr + k * split_stride + rows, mask=in_range, other=0.0)
            # a split that saw no valid column has ℓ = 0 and a placeholder m = 0: it takes no
            # part in the maximum, and its exp factor is never evaluated away from 0
            mine, theirs = row_sum != 0, other_sum != 0
            merged = tl.where(
                mine & theirs, tl.maximum(row_max, other_max), tl.where(mine, row_max, other_max)
            )
            row_sum = row_sum * tl.exp(tl.where(mine, row_max - merged, 0.0)) + other_sum * tl.exp(
                tl.where(theirs, other_max - merged, 0.0)
            )
            row_max = merged
        row_valid = _query_rows(mask_ptr, batch, offs_m, T, ALL_ROWS)
        n_valid += tl.where(row_valid, 1.0, 0.0)
        # A row has no valid column iff its sum is exactly 0; `!= 0` (not `> 0`) lets NaN through.
        has_mass = row_valid & (row_sum != 0)
        factor = tl.where(has_mass, 1.0 / tl.where(has_mass, row_sum, 1.0), 0.0)
        scores = _score_tile(
            h_ptr,
            inv_std_ptr,
            mask_ptr,
            batch,
            offs_m,
            offs_n,
            T,
            D,
            scale,
            ALL_ROWS,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            PRECISION,
        )
        weighted = tl.exp(scores - row_max[:, None]) * factor[:, None]
        acc += tl.sum(tl.where(has_mass[:, None], weighted, 0.0), axis=0)
    count = tl.maximum(tl.sum(n_valid, axis=0), 1.0)
    col_valid = tl.load(mask_ptr + batch * T + offs_n, mask=offs_n < T, other=0) != 0
    tl.store(out_ptr + batch * T + offs_n, tl.where(col_valid, acc / count, 0.0), mask=offs_n < T)


def _launch_meta(num_tokens: int, width: int, dtype: torch.dtype) -> dict[str, int | str]:
    """Tile sizes and launch options of the two score passes."""
    if small_blocks():
        return dict(
            BLOCK_M=block_size(num_tokens, 32),
            BLOCK_N=block_size(num_tokens, 32),
            BLOCK_D=block_size(width, 32),
            PRECISION=dot_precision(),
        )
    # Hopper: 64-wide key tiles over 32-wide d chunks, 8 warps, 3-stage pipelined loads; 128
    # query rows for 16-bit inputs, 64 for fp32 (tf32x3 triples the operand registers). No
    # register spills on sm_90 with Triton 3.6 or 3.9 (64-wide d chunks spill up to 136 bytes).
    return dict(
        BLOCK_M=block_size(num_tokens, 128 if dtype in (torch.bfloat16, torch.float16) else 64),
        BLOCK_N=block_size(num_tokens, 64),
        BLOCK_D=block_size(width, 32),
        PRECISION=dot_precision(),
        num_warps=8,
        num_stages=3,
    )


@torch.library.custom_op("mta::token_importance", mutates_args=())
@on_input_device
def _token_importance_fused(
    hiddens: list[Tensor], attention_mask: Tensor, std_eps: float | None, padding_rows: bool
) -> Tensor:
    """Triton token importance of up to :data:`LAYERS_PER_LAUNCH` validated layers of one
    shape: [L, B, T] float32. ``std_eps=None`` is the default ε, resolved here: a float default
    read by a compiled step would become a symbolic input (and restart its tracing)."""
    layers = len(hiddens)
    hiddens = [contiguous(h) for h in hiddens]
    batch, num_tokens, width = hiddens[0].shape
    device = hiddens[0].device
    mask = contiguous(attention_mask)  # read as `!= 0`, whatever its integer or bool dtype
    out = empty_output(layers, batch, num_tokens, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    pointers = (*hiddens, *hiddens[:1] * (LAYERS_PER_LAUNCH - layers))  # unused slots: layer 0
    meta = _launch_meta(num_tokens, width, hiddens[0].dtype)
    row_blocks = triton.cdiv(num_tokens, meta["BLOCK_M"])
    n_split = work_splits(
        row_blocks * batch * layers, triton.cdiv(num_tokens, meta["BLOCK_N"]), device
    )
    inv_std = empty_output(layers, batch, num_tokens, dtype=torch.float32, device=device)
    row_max, row_sum = (
        empty_output(n_split, layers, batch, num_tokens, dtype=torch.float32, device=device)
        for _ in range(2)
    )
    scale = 1.0 / math.sqrt(width)
    _inv_std_kernel[(batch * num_tokens, layers)](
        *pointers,
        mask,
        inv_std,
        batch * num_tokens,
        width,
        STD_EPS if std_eps is None else std_eps,
        ALL_ROWS=padding_rows,
        BLOCK_D=block_size(width, 1024),
    )
    _row_stats_kernel[(row_blocks, batch * layers, n_split)](
        *pointers,
        inv_std,
        mask,
        row_max,
        row_sum,
        batch,
        num_tokens,
        width,
        scale,
        ALL_ROWS=padding_rows,
        **meta,
    )
    _column_sum_kernel[(triton.cdiv(num_tokens, meta["BLOCK_N"]), batch * layers)](
        *pointers,
        inv_std,
        mask,
        row_max,
        row_sum,
        out,
        batch,
        num_tokens,
        width,
        scale,
        n_split,
        ALL_ROWS=padding_rows,
        **meta,
    )
    return out


@_token_importance_fused.register_fake
def _(
    hiddens: list[Tensor], attention_mask: Tensor, std_eps: float | None, padding_rows: bool
) -> Tensor:
    return hiddens[0].new_empty((len(hiddens), *hiddens[0].shape[:2]), dtype=torch.float32)


def token_importance_layers(
    hiddens: Sequence[Tensor],
    attention_mask: Tensor,
    *,
    std_eps: float | None = None,
    padding_rows: bool = False,
) -> Tensor:
    """:func:`token_importance` of several layers of one model: [L, B, T] float32, no grad.

    Args:
        hiddens: L tensors [B, T, d], all of one shape and dtype (e.g. the teacher layers a layer
            plan aligns).
        attention_mask: [B, T] bool or integer, 1 for real tokens.
        std_eps, padding_rows: as for :func:`token_importance`.

    The fused path handles :data:`LAYERS_PER_LAUNCH` layers per set of three launches.
    """
    hiddens = list(hiddens)
    if not hiddens:
        raise ValueError("hiddens must hold at least one tensor [B, T, d]")
    for i, hidden in enumerate(hiddens):
        if not isinstance(hidden, Tensor):
            raise TypeError(f"hiddens[{i}] must be a torch.Tensor, got {type(hidden).__name__}")
        if hidden.shape != hiddens[0].shape or hidden.dtype != hiddens[0].dtype:
            raise ValueError(
                f"hiddens must share one shape and dtype: hiddens[0] is "
                f"{tuple(hiddens[0].shape)} {hiddens[0].dtype}, hiddens[{i}] is "
                f"{tuple(hidden.shape)} {hidden.dtype}"
            )
    if not use_triton(*hiddens):
        return torch.stack(
            [
                reference.token_importance(
                    h, attention_mask, std_eps=std_eps, padding_rows=padding_rows
                )
                for h in hiddens
            ]
        )
    for hidden in hiddens:
        check_token_importance_args(hidden, attention_mask, std_eps)
    with torch.no_grad():
        groups = [
            _token_importance_fused(
                [h.detach() for h in hiddens[i : i + LAYERS_PER_LAUNCH]],
                attention_mask,
                std_eps,
                bool(padding_rows),
            )
            for i in range(0, len(hiddens), LAYERS_PER_LAUNCH)
        ]
    return groups[0] if len(groups) == 1 else torch.cat(groups)


def token_importance(
    hidden: Tensor,
    attention_mask: Tensor,
    *,
    std_eps: float | None = None,
    padding_rows: bool = False,
) -> Tensor:
    """Teacher token importance ``w`` (Eq. 5–7): [B, T] float32, no grad.

    Args:
        hidden: [B, T, d] fp32/bf16/fp16 hidden states of one teacher layer (any strides), d ≥ 2.
        attention_mask: [B, T] bool or integer, 1 for real tokens.
        std_eps: the ``ε`` of ``H / (std(H) + ε)``; ``None``: 1e-8 (the paper's); the authors'
            released code uses 1e-5.
        padding_rows: padding rows count as queries too (their hidden states are then read), and
            ``N`` is the padded length ``T`` — as the authors' released code averages. Columns
            (keys) are always valid tokens only.

    Each example's weights sum to 1 over its valid tokens (when it has at least two) and are 0 on
    padding. The fused path never builds the T×T score matrix.

    Example::

        >>> h = torch.randn(2, 5, 8)
        >>> w = token_importance(h, torch.ones(2, 5, dtype=torch.long))
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2)))
        (torch.Size([2, 5]), True)
    """
    if not use_triton(hidden):
        return reference.token_importance(
            hidden, attention_mask, std_eps=std_eps, padding_rows=padding_rows
        )
    check_token_importance_args(hidden, attention_mask, std_eps)
    with torch.no_grad():
        return _token_importance_fused(
            [hidden.detach()], attention_mask, std_eps, bool(padding_rows)
        )[0]
