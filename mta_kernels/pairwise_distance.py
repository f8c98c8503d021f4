"""Normalized pairwise distances between units, and the tile helpers the structural loss reuses.

Cosine distances come from Gram tiles ``Û_i Û_jᵀ`` (``tl.dot``; 16-bit inputs on tensor cores) of
rows normalized once by :func:`row_normalize`. Euclidean distances are computed from explicit
differences ``U_i − U_j`` in [BLOCK_I, BLOCK_J, BLOCK_D] tiles rather than from ``‖U_i‖² + ‖U_j‖² −
2⟨U_i, U_j⟩``, which loses all precision for nearby units (and then blows up the ``1/r`` of the
gradient); the mean ``μ`` over valid ordered pairs is a second, scalar pass.

Backward passes are row-block programs that loop over column blocks, build the coefficient tile
``C`` of ``g_i = Σ_j C_ij ∂(pair term)`` and accumulate it into their own rows of an fp32 gradient
buffer, one program per row block: deterministic and without atomics.
"""

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
    row_normalize,
    row_normalize_backward,
    small_blocks,
    use_triton,
)
from mta_kernels._validation import check_pairwise_distance_args

# ``METRIC`` constexpr of the kernels.
METRIC_IDS = {"cosine": 0, "euclidean": 1}


@triton.jit
def unit_valid(valid_ptr, offs, K):
    """``v_k`` of one example's units ``offs``: in range and valid."""
    return tl.load(valid_ptr + offs, mask=offs < K, other=0) != 0


@triton.jit
def pair_mask(v_i, v_j, offs_i, offs_j):
    """``V_ij = v_i v_j [i ≠ j]``."""
    return v_i[:, None] & v_j[None, :] & (offs_i[:, None] != offs_j[None, :])


@triton.jit
def load_rows(x_ptr, offs, valid, offs_d, D):
    """Rows ``offs`` of one example's [K, D] matrix on the columns ``offs_d``, 0 for invalid
    units: their values (NaN included) are never read."""
    return tl.load(
        x_ptr + offs[:, None] * D + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )


@triton.jit
def gram_tile(
    x_ptr,
    offs_i,
    offs_j,
    v_i,
    v_j,
    D,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``⟨X_i, X_j⟩`` for rows ``offs_i`` × ``offs_j`` of one example's [K, D] matrix: fp32."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = load_rows(x_ptr, offs_i, v_i, offs_d, D)
        b = load_rows(x_ptr, offs_j, v_j, offs_d, D)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def euclidean_tile(
    x_ptr,
    offs_i,
    offs_j,
    v_i,
    v_j,
    D,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``‖X_i − X_j‖`` for rows ``offs_i`` × ``offs_j`` from explicit differences: fp32."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = load_rows(x_ptr, offs_i, v_i, offs_d, D).to(tl.float32)
        b = load_rows(x_ptr, offs_j, v_j, offs_d, D).to(tl.float32)
        diff = a[:, None, :] - b[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    return tl.sqrt(acc)


@triton.jit
def pair_tile(
    x_ptr,
    offs_i,
    offs_j,
    v_i,
    v_j,
    D,
    METRIC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Gram tile of normalized rows (cosine) or distance tile (euclidean); rows of invalid
    units read as 0."""
    if METRIC == 0:
        tile = gram_tile(x_ptr, offs_i, offs_j, v_i, v_j, D, BLOCK_I, BLOCK_J, BLOCK_D, PRECISION)
    else:
        tile = euclidean_tile(x_ptr, offs_i, offs_j, v_i, v_j, D, BLOCK_I, BLOCK_J, BLOCK_D)
    return tile


@triton.jit
def pair_update(
    x_ptr,  # [K, D] forward rows of one example (normalized for cosine, raw for euclidean)
    coef,  # [BLOCK_I, BLOCK_J] fp32 coefficients C_ij
    offs_i,
    offs_j,
    v_i,
    v_j,
    offs_d,
    D,
    METRIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One d-chunk of ``Σ_j C_ij X_j`` (cosine) or ``Σ_j C_ij (X_i − X_j)`` (euclidean, from
    exact differences): [BLOCK_I, BLOCK_D] fp32."""
    x_j = load_rows(x_ptr, offs_j, v_j, offs_d, D)
    if METRIC == 0:
        update = tl.dot(coef.to(x_j.dtype), x_j, input_precision=PRECISION)
    else:
        x_i = load_rows(x_ptr, offs_i, v_i, offs_d, D).to(tl.float32)
        diff = x_i[:, None, :] - x_j.to(tl.float32)[None, :, :]
        update = tl.sum(coef[:, :, None] * diff, axis=1)
    return update


@triton.jit
def accumulate_rows(
    grad_ptr,  # [K, D] fp32 gradient rows of one example, owned by this program
    x_ptr,
    coef,
    offs_i,
    offs_j,
    v_i,
    v_j,
    K,
    D,
    first,
    METRIC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``grad_i += pair_update`` over all of ``D``: a read-modify-write of rows this program owns
    (a plain store for its ``first`` column block, so the buffer needs no zero-filling).

    Used where the coefficient tile is expensive (recomputed Gram tiles) and ``D`` too wide to
    keep ``grad_i`` in registers across the column blocks.
    """
    read_rows = tl.where(first, 0, K)  # rows to read back: none on the first column block
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        update = pair_update(x_ptr, coef, offs_i, offs_j, v_i, v_j, offs_d, D, METRIC, PRECISION)
        rows_i = offs_i[:, None] * D + offs_d[None, :]
        mask_i = (offs_i[:, None] < K) & (offs_d[None, :] < D)
        # The previous column block stored these rows, maybe from other threads (the load and
        # store layouts can differ): Triton orders global memory only across a barrier.
        tl.debug_barrier()
        grad = tl.load(
            grad_ptr + rows_i, mask=(offs_i[:, None] < read_rows) & (offs_d[None, :] < D), other=0.0
        )
        tl.store(grad_ptr + rows_i, grad + update, mask=mask_i)


@triton.jit
def _distance_fwd_kernel(
    x_ptr,  # [B, K, D] normalized rows (cosine) or raw rows (euclidean)
    valid_ptr,  # [B, K] bool
    out_ptr,  # [B, K, K] fp32: 1 − Gram (cosine) or raw distance (euclidean)
    partial_ptr,  # [B, n_i·n_j] fp32 Σ of the tile's valid distances (euclidean mean)
    K,
    D,
    n_j,
    METRIC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_i = (pid // n_j) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = (pid % n_j) * BLOCK_J + tl.arange(0, BLOCK_J)
    v_i = unit_valid(valid_ptr + batch * K, offs_i, K)
    v_j = unit_valid(valid_ptr + batch * K, offs_j, K)
    tile = pair_tile(
        x_ptr + batch * K * D,
        offs_i,
        offs_j,
        v_i,
        v_j,
        D,
        METRIC,
        BLOCK_I,
        BLOCK_J,
        BLOCK_D,
        PRECISION,
    )
    if METRIC == 0:
        tile = 1.0 - tile
    tile = tl.where(pair_mask(v_i, v_j, offs_i, offs_j), tile, 0.0)
    tl.store(
        out_ptr + batch * K * K + offs_i[:, None] * K + offs_j[None, :],
        tile,
        mask=(offs_i[:, None] < K) & (offs_j[None, :] < K),
    )
    tl.store(partial_ptr + batch * tl.num_programs(0) + pid, tl.sum(tl.sum(tile, axis=1), axis=0))


@triton.jit
def _distance_bwd_kernel(
    x_ptr,  # [B, K, D] as in the forward
    valid_ptr,  # [B, K] bool
    grad_out_ptr,  # [B, K, K] gradient w.r.t. the output
    dist_ptr,  # [B, K, K] forward output (euclidean)
    inv_mean_ptr,  # [B] fp32 1/μ (euclidean)
    coupling_ptr,  # [B] fp32 A = Σ G∘D / N_pairs (euclidean)
    grad_x_ptr,  # [B, K, D] fp32
    K,
    D,
    METRIC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """A tiled matmul over the (given) K×K gradient, one [BLOCK_I, BLOCK_D] output tile per program.

    Cosine: ``gX̂_i = −Σ_j (G_ij + G_ji) X̂_j``. Euclidean: ``gX_i = Σ_j C_ij (X_i − X_j)`` with
    ``C_ij = (G_ij + G_ji − 2A) / (μ² D_ij)`` over valid pairs with ``D_ij > 0``.
    """
    pid_i, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    square = batch * K * K
    v_i = unit_valid(valid_ptr + batch * K, offs_i, K)
    acc = tl.zeros((BLOCK_I, BLOCK_D), tl.float32)
    for j0 in range(0, K, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_range = (offs_i[:, None] < K) & (offs_j[None, :] < K)
        v_j = unit_valid(valid_ptr + batch * K, offs_j, K)
        valid = pair_mask(v_i, v_j, offs_i, offs_j)
        g = tl.load(
            grad_out_ptr + square + offs_i[:, None] * K + offs_j[None, :], mask=in_range, other=0.0
        ).to(tl.float32)
        g += tl.load(
            grad_out_ptr + square + offs_j[None, :] * K + offs_i[:, None], mask=in_range, other=0.0
        ).to(tl.float32)
        if METRIC == 0:
            coef = tl.where(valid, -g, 0.0)
        else:
            dist = tl.load(
                dist_ptr + square + offs_i[:, None] * K + offs_j[None, :], mask=in_range, other=0.0
            )
            inv_mean = tl.load(inv_mean_ptr + batch)
            coupling = tl.load(coupling_ptr + batch)
            positive = valid & (dist > 0)
            coef = tl.where(
                positive,
                (g - 2.0 * coupling) * inv_mean * inv_mean / tl.where(positive, dist, 1.0),
                0.0,
            )
        acc += pair_update(
            x_ptr + batch * K * D, coef, offs_i, offs_j, v_i, v_j, offs_d, D, METRIC, PRECISION
        )
    tl.store(
        grad_x_ptr + batch * K * D + offs_i[:, None] * D + offs_d[None, :],
        acc,
        mask=(offs_i[:, None] < K) & (offs_d[None, :] < D),
    )


def tile_sizes(metric: str, width: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes of the pairwise kernels for rows of ``dtype``: Gram tiles feed ``tl.dot``;
    euclidean tiles are 3-D."""
    if metric == "cosine":
        if small_blocks():
            return dict(BLOCK_I=16, BLOCK_J=16, BLOCK_D=block_size(width, 16))
        # Three to five live 64×64 fp32 tiles: 8 warps, and d chunks of 32 (bf16) or 16 (fp32
        # rows, whose tf32x3 dots split each operand in three) keep the structural backward free
        # of register spills on sm_90 with Triton 3.6 and 3.9 (wider chunks spill 0.2–2.5 kB).
        cap_d = 32 if dtype == torch.bfloat16 else 16
        return dict(BLOCK_I=64, BLOCK_J=64, BLOCK_D=block_size(width, cap_d), num_warps=8)
    cap = 16 if small_blocks() else 32
    return dict(
        BLOCK_I=cap, BLOCK_J=cap, BLOCK_D=block_size(width, 16 if small_blocks() else 8, floor=1)
    )


def valid_mask(span_mask: Tensor | None, units: Tensor) -> Tensor:
    """``span_mask`` as a contiguous bool [B, K] (all True when None); the kernels read it
    directly (a bool pointer), with no conversion launched."""
    if span_mask is None:
        return torch.ones(units.shape[:2], dtype=torch.bool, device=units.device)
    return contiguous(span_mask)


@torch.library.custom_op("mta::pairwise_distance_forward", mutates_args=())
@on_input_device
def _distance_forward(rows: Tensor, valid: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Launch :func:`_distance_fwd_kernel`: (1 − Gram or raw distances [B, K, K], tile sums)."""
    batch, num_units, width = rows.shape
    meta = tile_sizes(metric, width, rows.dtype)
    grid_i = triton.cdiv(num_units, meta["BLOCK_I"])
    grid_j = triton.cdiv(num_units, meta["BLOCK_J"])
    out = empty_output(batch, num_units, num_units, dtype=torch.float32, device=rows.device)
    partial = empty_output(batch, grid_i * grid_j, dtype=torch.float32, device=rows.device)
    if out.numel() > 0:
        _distance_fwd_kernel[(grid_i * grid_j, batch)](
            rows,
            valid,
            out,
            partial,
            num_units,
            width,
            grid_j,
            METRIC=METRIC_IDS[metric],
            PRECISION=dot_precision(),
            **meta,
        )
    return out, partial


@_distance_forward.register_fake
def _(rows, valid, metric):
    batch, num_units, width = rows.shape
    meta = tile_sizes(metric, width, rows.dtype)
    n_tiles = triton.cdiv(num_units, meta["BLOCK_I"]) * triton.cdiv(num_units, meta["BLOCK_J"])
    return (
        rows.new_empty(batch, num_units, num_units, dtype=torch.float32),
        rows.new_empty(batch, n_tiles, dtype=torch.float32),
    )


@torch.library.custom_op("mta::pairwise_distance_backward", mutates_args=())
@on_input_device
def _distance_backward(
    rows: Tensor,
    valid: Tensor,
    grad_out: Tensor,
    dist: Tensor,
    inv_mean: Tensor,
    coupling: Tensor,
    metric: str,
) -> Tensor:
    """Launch :func:`_distance_bwd_kernel`: fp32 gradient w.r.t. ``rows``."""
    batch, num_units, width = rows.shape
    grad_rows = empty_output(*rows.shape, dtype=torch.float32, device=rows.device)
    meta = tile_sizes(metric, width, rows.dtype)
    if grad_rows.numel() > 0:
        grid = (triton.cdiv(num_units, meta["BLOCK_I"]), triton.cdiv(width, meta["BLOCK_D"]), batch)
        _distance_bwd_kernel[grid](
            rows,
            valid,
            contiguous(grad_out),
            dist,
            inv_mean,
            coupling,
            grad_rows,
            num_units,
            width,
            METRIC=METRIC_IDS[metric],
            PRECISION=dot_precision(),
            **meta,
        )
    return grad_rows


@_distance_backward.register_fake
def _(rows, valid, grad_out, dist, inv_mean, coupling, metric):
    return rows.new_empty(rows.shape, dtype=torch.float32)


def metric_rows(units: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Rows the kernels read, with the saved 1/‖U‖: unit-norm rows (cosine), or the units
    themselves and an empty placeholder (euclidean)."""
    if metric == "cosine":
        return row_normalize(units)
    return units, units.new_empty(0, dtype=torch.float32)


def valid_pair_count(valid: Tensor) -> Tensor:
    """Number of valid ordered pairs ``i ≠ j`` per example: [B] fp32."""
    count = valid.sum(-1, dtype=torch.float32)
    return count * (count - 1).clamp_min(0)


class PairwiseDistanceFunction(torch.autograd.Function):
    """``D = pairwise_distance(U, mask, metric)`` with hand-written backward for ``U``."""

    @staticmethod
    def forward(ctx, units: Tensor, span_mask: Tensor | None, metric: str) -> Tensor:
        units = contiguous(units)
        valid = valid_mask(span_mask, units)
        rows, inv_norm = metric_rows(units, metric)
        out, partial = _distance_forward(rows, valid, metric)
        n_pairs = valid_pair_count(valid)
        inv_mean = torch.ones(units.shape[0], dtype=torch.float32, device=units.device)
        if metric == "euclidean":
            mean = partial.sum(-1) / n_pairs.clamp_min(1.0)
            inv_mean = torch.where(mean != 0, 1.0 / mean, inv_mean)
            out = out * inv_mean.view(-1, 1, 1)
        ctx.metric = metric
        ctx.save_for_backward(units, rows, inv_norm, valid, out, inv_mean, n_pairs)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        units, rows, inv_norm, valid, dist, inv_mean, n_pairs = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        coupling = inv_mean  # the cosine backward reads no coupling
        if ctx.metric == "euclidean":
            coupling = (grad_out.float() * dist).sum((1, 2)) / n_pairs.clamp_min(1.0)
        grad_rows = _distance_backward(rows, valid, grad_out, dist, inv_mean, coupling, ctx.metric)
        if ctx.metric == "cosine":
            return row_normalize_backward(units, inv_norm, grad_rows, valid), None, None
        return grad_rows.to(units.dtype), None, None


def pairwise_distance(
    units: Tensor, span_mask: Tensor | None = None, metric: str = "cosine"
) -> Tensor:
    """Normalized pairwise distances between units: [B, K, K] float32.

    ``cosine``: ``D_ij = 1 − ⟨Û_i, Û_j⟩``, ``Û = U / max(‖U‖, 1e-12)``. ``euclidean`` (RKD):
    ``D_ij = ‖U_i − U_j‖ / μ`` with ``μ`` the mean over valid ordered pairs ``i ≠ j``. Invalid
    rows/columns and the diagonal are 0. Differentiable w.r.t. ``units``, with finite (zero)
    gradients where two units coincide.

    Args:
        units: [B, K, d] fp32/bf16/fp16.
        span_mask: optional [B, K] bool validity of the units.
        metric: ``"cosine"`` or ``"euclidean"``.

    Example::

        >>> u = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
        >>> pairwise_distance(u)
        tensor([[[0., 1., 0.],
                 [1., 0., 1.],
                 [0., 1., 0.]]])
    """
    if not use_triton(units):
        return reference.pairwise_distance(units, span_mask, metric)
    check_pairwise_distance_args(units, span_mask, metric)
    return PairwiseDistanceFunction.apply(units, span_mask, metric)
