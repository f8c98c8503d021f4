"""Fused Dynamic Structural Alignment loss (Eq. 10–11).

Per example ``L = Σ_{ij} W_ij E_ij²`` with ``W_ij = p_i p_j V_ij`` (``V_ij = v_i v_j [i ≠ j]``) and
``E = D^S − D^T``. Cosine: ``E = Ĝ^T − Ĝ^S`` from Gram tiles of the normalized units. Euclidean:
``E = r^S/μ_S − r^T/μ_T``, the means ``μ`` coming from a first pass over the same tiles.

Three designs, chosen by shape (:func:`structural_design`); all deterministic, without atomics,
computing only the gradients that are needed:

* **tiles, saved errors** (the usual K): one program per upper-triangular tile pair
  (``i-block ≤ j-block``; off-diagonal pairs count twice by symmetry) writes partial sums reduced in
  a fixed order, and saves the [B, K, K] error matrix (euclidean: both raw distance matrices too);
  the backward rebuilds each coefficient tile from it, one program per (row block, d-block) keeping
  its rows in registers over all column blocks;
* **tiles, recompute** (K of the order of d): the same forward without saving; one backward program
  per row block recomputes its Gram tiles for every column block and accumulates its own rows of
  fp32 gradient buffers (memory O(B·K·d));
* **moments** (cosine, K ≫ d): the d×d second moments of the normalized rows in float64
  (:class:`MomentsStructuralLossFunction`), O(K·d²) instead of O(K²·d).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from mta_kernels import reference
from mta_kernels._common import (
    contiguous,
    dot_precision,
    empty_output,
    on_input_device,
    row_normalize,
    row_normalize_backward,
    small_blocks,
    use_triton,
    work_splits,
)
from mta_kernels._switches import SWITCHES
from mta_kernels._validation import check_structural_loss_args
from mta_kernels.pairwise_distance import (
    METRIC_IDS,
    accumulate_rows,
    metric_rows,
    pair_mask,
    pair_tile,
    pair_update,
    tile_sizes,
    unit_valid,
    valid_pair_count,
)

# Forward stages: the euclidean metric needs the mean distances before the loss.
_STAGE_MEANS, _STAGE_LOSS = 0, 1


@triton.jit
def _error_tile(
    student_ptr,
    teacher_ptr,
    inv_mean_ptr,
    batch,
    offs_i,
    offs_j,
    v_i,
    v_j,
    K,
    D_S,
    D_T,
    METRIC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D_S: tl.constexpr,
    BLOCK_D_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(E = D^S − D^T, student tile, teacher tile) for one tile; raw tiles as in ``pair_tile``."""
    student = pair_tile(
        student_ptr + batch * K * D_S,
        offs_i,
        offs_j,
        v_i,
        v_j,
        D_S,
        METRIC,
        BLOCK_I,
        BLOCK_J,
        BLOCK_D_S,
        PRECISION,
    )
    teacher = pair_tile(
        teacher_ptr + batch * K * D_T,
        offs_i,
        offs_j,
        v_i,
        v_j,
        D_T,
        METRIC,
        BLOCK_I,
        BLOCK_J,
        BLOCK_D_T,
        PRECISION,
    )
    if METRIC == 0:
        error = teacher - student
    else:
        error = student * tl.load(inv_mean_ptr + 2 * batch) - teacher * tl.load(
            inv_mean_ptr + 2 * batch + 1
        )
    return error, student, teacher


@triton.jit
def _save_tile(matrix_ptr, tile, offs_i, offs_j, K, mirror):
    """Store a [BLOCK_I, BLOCK_J] tile of a symmetric [K, K] matrix, and its mirror image across
    the diagonal when ``mirror`` (an off-diagonal tile pair)."""
    rows, cols = offs_i[:, None], offs_j[None, :]
    inside = (rows < K) & (cols < K)
    tl.store(matrix_ptr + rows * K + cols, tile, mask=inside)
    tl.store(matrix_ptr + cols * K + rows, tile, mask=inside & (rows < tl.where(mirror, K, 0)))


@triton.jit
def _structural_fwd_kernel(
    student_ptr,
    teacher_ptr,  # [B, K, D_S], [B, K, D_T]: normalized (cosine) or raw (euclidean)
    weight_ptr,  # [B, K] span weights p (read only where valid)
    valid_ptr,  # [B, K] bool
    tile_pairs_ptr,  # [n_pairs, 2] int32 (i-block, j-block) with i-block <= j-block
    inv_mean_ptr,  # [B, 2] fp32 (1/μ_S, 1/μ_T), euclidean loss stage
    partial_ptr,  # [3, B, n_pairs] fp32
    saved_ptr,  # [n_saved, B, K, K] fp32: V∘E, then (euclidean) r^S and r^T (with SAVE)
    K,
    D_S,
    D_T,
    METRIC: tl.constexpr,
    STAGE: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D_S: tl.constexpr,
    BLOCK_D_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial sums of one tile pair. Means stage: (Σ V r^S, Σ V r^T, 0). Loss stage:
    (Σ W E², Σ 2 W E D^S, Σ 2 W E D^T), the last two only needed by the euclidean backward;
    with ``SAVE`` also the tile and its mirror image of ``V∘E`` (and of the raw distances, for the
    euclidean backward), so that the backward reads them instead of recomputing both Grams."""
    pid, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    block_i = tl.load(tile_pairs_ptr + 2 * pid)
    block_j = tl.load(tile_pairs_ptr + 2 * pid + 1)
    offs_i = block_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = block_j * BLOCK_J + tl.arange(0, BLOCK_J)
    v_i = unit_valid(valid_ptr + batch * K, offs_i, K)
    v_j = unit_valid(valid_ptr + batch * K, offs_j, K)
    error, student, teacher = _error_tile(
        student_ptr,
        teacher_ptr,
        inv_mean_ptr,
        batch,
        offs_i,
        offs_j,
        v_i,
        v_j,
        K,
        D_S,
        D_T,
        METRIC,
        BLOCK_I,
        BLOCK_J,
        BLOCK_D_S,
        BLOCK_D_T,
        PRECISION,
    )
    valid = pair_mask(v_i, v_j, offs_i, offs_j)
    symmetry = tl.where(block_i == block_j, 1.0, 2.0)
    # [3, B, n_pairs]: the sums of each quantity contiguous per example, so that one tile pair's
    # partials are the totals with no reduction (and a reduction yields contiguous rows)
    out = partial_ptr + batch * tl.num_programs(0) + pid
    part = tl.num_programs(1) * tl.num_programs(0)
    if STAGE == 0:
        tl.store(out, symmetry * tl.sum(tl.sum(tl.where(valid, student, 0.0), axis=1), axis=0))
        tl.store(
            out + part, symmetry * tl.sum(tl.sum(tl.where(valid, teacher, 0.0), axis=1), axis=0)
        )
        tl.store(out + 2 * part, 0.0)
    else:
        if SAVE:
            mirror = block_i != block_j
            square = tl.num_programs(1).to(tl.int64) * K * K  # one [B, K, K] matrix
            _save_tile(
                saved_ptr + batch * K * K, tl.where(valid, error, 0.0), offs_i, offs_j, K, mirror
            )
            if METRIC == 1:
                _save_tile(saved_ptr + square + batch * K * K, student, offs_i, offs_j, K, mirror)
                _save_tile(
                    saved_ptr + 2 * square + batch * K * K, teacher, offs_i, offs_j, K, mirror
                )
        p_i = tl.load(weight_ptr + batch * K + offs_i, mask=v_i, other=0.0).to(tl.float32)
        p_j = tl.load(weight_ptr + batch * K + offs_j, mask=v_j, other=0.0).to(tl.float32)
        weighted_error = tl.where(valid, p_i[:, None] * p_j[None, :] * error, 0.0)
        tl.store(out, symmetry * tl.sum(tl.sum(weighted_error * error, axis=1), axis=0))
        if METRIC == 1:
            inv_mean_s = tl.load(inv_mean_ptr + 2 * batch)
            inv_mean_t = tl.load(inv_mean_ptr + 2 * batch + 1)
            tl.store(
                out + part,
                2.0
                * symmetry
                * inv_mean_s
                * tl.sum(tl.sum(weighted_error * student, axis=1), axis=0),
            )
            tl.store(
                out + 2 * part,
                2.0
                * symmetry
                * inv_mean_t
                * tl.sum(tl.sum(weighted_error * teacher, axis=1), axis=0),
            )
        else:
            tl.store(out + part, 0.0)
            tl.store(out + 2 * part, 0.0)


@triton.jit
def _side_coefficients(
    weighted_error,  # [BLOCK_I, BLOCK_J] W_ij E_ij (0 off valid pairs)
    valid,
    tile,  # the side's Gram (cosine) or raw distance (euclidean) tile
    inv_mean_ptr,
    coupling_ptr,
    batch,
    scale,
    SIDE: tl.constexpr,  # 0 student (E grows with D^S), 1 teacher (E shrinks with D^T)
    METRIC: tl.constexpr,
):
    """Coefficients ``C_ij`` of one side's row gradient (see :func:`_structural_bwd_kernel`).

    Cosine: ``∓4 s W E`` (student −, teacher +). Euclidean, with ``σ = ±1`` (student +):
    ``C = 2 s σ (2 W E − a V) / (μ r)`` where ``r > 0``, else 0.
    """
    sign = 1.0 - 2.0 * SIDE
    if METRIC == 0:
        coef = -4.0 * sign * scale * weighted_error
    else:
        inv_mean = tl.load(inv_mean_ptr + 2 * batch + SIDE)
        coupling = tl.where(valid, tl.load(coupling_ptr + 2 * batch + SIDE), 0.0)
        dloss = sign * (2.0 * weighted_error - coupling) * inv_mean
        positive = valid & (tile > 0)
        coef = tl.where(positive, 2.0 * scale * dloss / tl.where(positive, tile, 1.0), 0.0)
    return coef


@triton.jit
def _structural_bwd_kernel(
    student_ptr,
    teacher_ptr,
    weight_ptr,
    valid_ptr,
    inv_mean_ptr,
    coupling_ptr,  # [B, 2] fp32 (a_S, a_T) = Σ 2 W E D / N_pairs (euclidean)
    scale_ptr,  # [B] fp32 dL/dL_b
    grad_student_ptr,
    grad_teacher_ptr,  # [n_split, B, K, D] fp32 partial gradients (written, then accumulated)
    grad_weight_ptr,  # [n_split, B, K] fp32 partial gradients
    K,
    D_S,
    D_T,
    METRIC: tl.constexpr,
    NEED_STUDENT: tl.constexpr,
    NEED_TEACHER: tl.constexpr,
    NEED_WEIGHTS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D_S: tl.constexpr,
    BLOCK_D_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row block ``i`` against the column blocks ``j ≡ split (mod n_split)``.

    Splitting the columns over ``n_split`` programs (grid axis 1) fills the GPU when ``K`` is
    small; each split accumulates its own partial gradients, summed afterwards in a fixed order.

    Cosine: ``gÛ^S_i = −4 Σ_j W_ij E_ij Û^S_j`` and ``gÛ^T_i = +4 Σ_j W_ij E_ij Û^T_j``.
    Euclidean: ``gU^S_i = Σ_j C_ij (U^S_i − U^S_j)``, ``C_ij = 2 (2 W E − a_S V)_ij / (μ_S r^S_ij)``
    and the teacher's with the opposite sign. Both: ``gp_i = 2 Σ_j p_j V_ij E_ij²``. All × scale_b.
    """
    pid_i, split, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n_split = tl.num_programs(1)
    partial = split.to(tl.int64) * tl.num_programs(2) + batch  # index of this [B, ...] slice
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    scale = tl.load(scale_ptr + batch)
    v_i = unit_valid(valid_ptr + batch * K, offs_i, K)
    p_i = tl.load(weight_ptr + batch * K + offs_i, mask=v_i, other=0.0).to(tl.float32)
    grad_p = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(split * BLOCK_J, K, n_split * BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        v_j = unit_valid(valid_ptr + batch * K, offs_j, K)
        error, student, teacher = _error_tile(
            student_ptr,
            teacher_ptr,
            inv_mean_ptr,
            batch,
            offs_i,
            offs_j,
            v_i,
            v_j,
            K,
            D_S,
            D_T,
            METRIC,
            BLOCK_I,
            BLOCK_J,
            BLOCK_D_S,
            BLOCK_D_T,
            PRECISION,
        )
        valid = pair_mask(v_i, v_j, offs_i, offs_j)
        p_j = tl.load(weight_ptr + batch * K + offs_j, mask=v_j, other=0.0).to(tl.float32)
        if NEED_WEIGHTS:
            grad_p += (
                2.0 * scale * tl.sum(tl.where(valid, p_j[None, :] * error * error, 0.0), axis=1)
            )
        weighted_error = tl.where(valid, p_i[:, None] * p_j[None, :] * error, 0.0)
        if NEED_STUDENT:
            coef = _side_coefficients(
                weighted_error, valid, student, inv_mean_ptr, coupling_ptr, batch, scale, 0, METRIC
            )
            accumulate_rows(
                grad_student_ptr + partial * K * D_S,
                student_ptr + batch * K * D_S,
                coef,
                offs_i,
                offs_j,
                v_i,
                v_j,
                K,
                D_S,
                j0 == split * BLOCK_J,
                METRIC,
                BLOCK_D_S,
                PRECISION,
            )
        if NEED_TEACHER:
            coef = _side_coefficients(
                weighted_error, valid, teacher, inv_mean_ptr, coupling_ptr, batch, scale, 1, METRIC
            )
            accumulate_rows(
                grad_teacher_ptr + partial * K * D_T,
                teacher_ptr + batch * K * D_T,
                coef,
                offs_i,
                offs_j,
                v_i,
                v_j,
                K,
                D_T,
                j0 == split * BLOCK_J,
                METRIC,
                BLOCK_D_T,
                PRECISION,
            )
    if NEED_WEIGHTS:
        tl.store(grad_weight_ptr + partial * K + offs_i, grad_p, mask=offs_i < K)


@triton.jit
def _structural_bwd_saved_kernel(
    saved_ptr,  # [n_saved, B, K, K] fp32 from the forward: V∘E, then (euclidean) r^S and r^T
    rows_ptr,  # [B, K, D] this side's rows (normalized for cosine, raw for euclidean)
    weight_ptr,
    valid_ptr,
    inv_mean_ptr,
    coupling_ptr,
    scale_ptr,
    grad_rows_ptr,  # [B, K, D] fp32
    grad_weight_ptr,  # [B, K] fp32 (written with NEED_WEIGHTS by the d-block-0 programs)
    K,
    D,
    METRIC: tl.constexpr,
    SIDE: tl.constexpr,
    NEED_WEIGHTS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row block ``i`` × d-block of one side's gradient from the saved error matrix: the same
    coefficients as :func:`_structural_bwd_kernel`, without recomputing a Gram tile; the d-block's
    rows stay in registers across all column blocks and are written once (no split, no partial
    buffers, no reduction)."""
    pid_i, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr + batch)
    square = tl.num_programs(2).to(tl.int64) * K * K
    errors = saved_ptr + batch * K * K
    tiles = saved_ptr + (1 + SIDE) * square + batch * K * K
    v_i = unit_valid(valid_ptr + batch * K, offs_i, K)
    p_i = tl.load(weight_ptr + batch * K + offs_i, mask=v_i, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_I, BLOCK_D), tl.float32)
    grad_p = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(0, K, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        v_j = unit_valid(valid_ptr + batch * K, offs_j, K)
        valid = pair_mask(v_i, v_j, offs_i, offs_j)
        square_ij = offs_i[:, None] * K + offs_j[None, :]
        error = tl.load(errors + square_ij, mask=valid, other=0.0)
        p_j = tl.load(weight_ptr + batch * K + offs_j, mask=v_j, other=0.0).to(tl.float32)
        # masked like the recompute design: an invalid pair's term is 0 whatever p holds
        if NEED_WEIGHTS:
            grad_p += (
                2.0 * scale * tl.sum(tl.where(valid, p_j[None, :] * error * error, 0.0), axis=1)
            )
        weighted_error = tl.where(valid, p_i[:, None] * p_j[None, :] * error, 0.0)
        tile = weighted_error  # unused by the cosine coefficients
        if METRIC == 1:
            tile = tl.load(tiles + square_ij, mask=valid, other=0.0)
        coef = _side_coefficients(
            weighted_error, valid, tile, inv_mean_ptr, coupling_ptr, batch, scale, SIDE, METRIC
        )
        acc += pair_update(
            rows_ptr + batch * K * D, coef, offs_i, offs_j, v_i, v_j, offs_d, D, METRIC, PRECISION
        )
    rows = (batch * K + offs_i)[:, None] * D + offs_d[None, :]
    tl.store(grad_rows_ptr + rows, acc, mask=(offs_i[:, None] < K) & (offs_d[None, :] < D))
    if NEED_WEIGHTS:  # written by the programs of the first d-block
        tl.store(
            grad_weight_ptr + batch * K + offs_i, grad_p, mask=offs_i < tl.where(pid_d == 0, K, 0)
        )


STRUCTURAL_DESIGNS = ("saved", "recompute", "moments")


def structural_design(metric: str, num_units: int, width_student: int, width_teacher: int) -> str:
    """The design of the structural loss at this shape (``SWITCHES.structural_design`` forces one):

    * ``"saved"`` while the forward's [B, K, K] error matrix (euclidean: also both raw distance
      matrices, ``n = 3``) takes no more memory than the units, ``n·K ≤ d_S + d_T`` — the usual
      case (K ≈ 100–300 units against widths of 10³): the backward reads it instead of
      recomputing both Gram matrices on every tile;
    * ``"moments"`` (cosine only) when ``K·(d_S + d_T) > 2·(d_S² + d_S·d_T + d_T²)``: the d×d
      form (:class:`MomentsStructuralLossFunction`), O(K·d²) float64 products instead of the
      tiles' O(K²·d) — at the paper's widths from K ≈ 3700 units (a long context). The factor 2
      is an estimate of float64 GEMMs against ``tf32x3`` tiles on a Hopper GPU, not a
      measurement;
    * ``"recompute"`` between the two (and for every larger euclidean K): memory O(B·K·d).
    """
    choice = SWITCHES.structural_design
    if choice != "auto" and choice not in STRUCTURAL_DESIGNS:
        raise ValueError(
            f"SWITCHES.structural_design must be 'auto' or one of {STRUCTURAL_DESIGNS}, "
            f"got {choice!r}"
        )
    if choice == "moments" and metric != "cosine":
        return "recompute"  # the euclidean distances have no low-rank form
    if choice != "auto":
        return choice
    widths = width_student + width_teacher
    squares = width_student**2 + width_student * width_teacher + width_teacher**2
    if metric == "cosine" and num_units * widths > 2 * squares:
        return "moments"
    return "saved" if _saved_matrices(metric) * num_units <= widths else "recompute"


def _saved_matrices(metric: str) -> int:
    return 1 if metric == "cosine" else 3


@functools.lru_cache(maxsize=64)
def _upper_tile_pairs(n_blocks: int, device: torch.device) -> Tensor:
    """(i-block, j-block) pairs with i-block <= j-block: [n(n+1)/2, 2] int32."""
    pairs = torch.triu_indices(n_blocks, n_blocks)
    return pairs.t().to(device=device, dtype=torch.int32).contiguous()


def _meta(
    metric: str, width_student: int, width_teacher: int, dtype: torch.dtype
) -> dict[str, int | str]:
    """Launch meta-parameters: the pairwise tiles of each side (and their ``num_warps``)."""
    student = tile_sizes(metric, width_student, dtype)
    teacher = tile_sizes(metric, width_teacher, dtype)
    meta = dict(
        BLOCK_I=student["BLOCK_I"],
        BLOCK_J=student["BLOCK_J"],
        BLOCK_D_S=student["BLOCK_D"],
        BLOCK_D_T=teacher["BLOCK_D"],
        PRECISION=dot_precision(),
        METRIC=METRIC_IDS[metric],
    )
    if "num_warps" in student:
        meta["num_warps"] = student["num_warps"]
    return meta


@torch.library.custom_op("mta::structural_loss_forward", mutates_args=())
@on_input_device
def _structural_forward(
    student_rows: Tensor,
    teacher_rows: Tensor,
    weights: Tensor,
    valid: Tensor,
    metric: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both forward stages: (per-example loss [B], 1/μ [B, 2], coupling a [B, 2], saved
    matrices [n_saved, B, K, K]), all fp32; the cosine metric has no means nor coupling, and
    without ``save`` nothing is saved (empty tensors: the kernels never read them)."""
    batch, num_units, width_s = student_rows.shape
    meta = _meta(metric, width_s, teacher_rows.shape[2], student_rows.dtype)
    device = student_rows.device
    tile_pairs = _upper_tile_pairs(triton.cdiv(max(num_units, 1), meta["BLOCK_I"]), device)
    partial = empty_output(3, batch, tile_pairs.shape[0], dtype=torch.float32, device=device)
    shape = (_saved_matrices(metric), batch, num_units, num_units) if save else (0,)
    saved = empty_output(*shape, dtype=torch.float32, device=device)
    if metric == "cosine":
        inv_mean = partial.new_empty(0)
    else:
        inv_mean = torch.ones(batch, 2, dtype=torch.float32, device=device)
        pair_count = valid_pair_count(valid).clamp_min(1.0).unsqueeze(-1)

    def launch(stage: int) -> Tensor:
        if batch * num_units == 0:
            return partial.new_zeros(3, batch)
        _structural_fwd_kernel[(tile_pairs.shape[0], batch)](
            student_rows,
            teacher_rows,
            weights,
            valid,
            tile_pairs,
            inv_mean,
            partial,
            saved if save else partial,
            num_units,
            width_s,
            teacher_rows.shape[2],
            STAGE=stage,
            SAVE=save and stage == _STAGE_LOSS,
            **meta,
        )
        # [3, B] totals; a single tile pair (K within one block) holds them already
        return partial[..., 0] if tile_pairs.shape[0] == 1 else partial.sum(-1)

    if metric == "cosine":
        return launch(_STAGE_LOSS)[0], inv_mean, partial.new_empty(0), saved
    means = launch(_STAGE_MEANS)[:2].t() / pair_count
    inv_mean = torch.where(means != 0, 1.0 / means, inv_mean).contiguous()
    sums = launch(_STAGE_LOSS)
    return sums[0].contiguous(), inv_mean, (sums[1:].t() / pair_count).contiguous(), saved


@_structural_forward.register_fake
def _(student_rows, teacher_rows, weights, valid, metric, save):
    batch, num_units = student_rows.shape[:2]
    extra = (0,) if metric == "cosine" else (batch, 2)
    saved = (_saved_matrices(metric), batch, num_units, num_units) if save else (0,)
    return (
        student_rows.new_empty(batch, dtype=torch.float32),
        student_rows.new_empty(extra, dtype=torch.float32),
        student_rows.new_empty(extra, dtype=torch.float32),
        student_rows.new_empty(saved, dtype=torch.float32),
    )


@torch.library.custom_op("mta::structural_loss_backward", mutates_args=())
@on_input_device
def _structural_backward(
    student_rows: Tensor,
    teacher_rows: Tensor,
    weights: Tensor,
    valid: Tensor,
    inv_mean: Tensor,
    coupling: Tensor,
    saved: Tensor,
    grad_loss: Tensor,
    metric: str,
    need_student: bool,
    need_teacher: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 gradients w.r.t. the student rows, the teacher rows and ``p`` (an empty tensor for
    each one not needed): from the forward's saved matrices when it saved them, else by
    :func:`_structural_bwd_kernel` recomputing the tiles."""
    batch, num_units, width_s = student_rows.shape
    width_t = teacher_rows.shape[2]
    meta = _meta(metric, width_s, width_t, student_rows.dtype)
    device = student_rows.device
    if saved.dim() == 4:  # the forward saved its matrices
        return _saved_backward(
            student_rows,
            teacher_rows,
            weights,
            valid,
            inv_mean,
            coupling,
            saved,
            contiguous(grad_loss.float()),
            meta,
            (need_student, need_teacher, need_weights),
        )
    row_blocks = triton.cdiv(max(num_units, 1), meta["BLOCK_I"])
    column_blocks = triton.cdiv(max(num_units, 1), meta["BLOCK_J"])
    n_split = work_splits(row_blocks * batch, column_blocks, device)

    def buffer(needed: bool, *shape: int) -> Tensor:
        # every element is written: each split owns at least one column block
        return empty_output(*shape if needed else (0,), dtype=torch.float32, device=device)

    grad_student = buffer(need_student, n_split, batch, num_units, width_s)
    grad_teacher = buffer(need_teacher, n_split, batch, num_units, width_t)
    grad_weights = buffer(need_weights, n_split, batch, num_units)
    if batch * num_units > 0:
        _structural_bwd_kernel[(row_blocks, n_split, batch)](
            student_rows,
            teacher_rows,
            weights,
            valid,
            inv_mean,
            coupling,
            contiguous(grad_loss.float()),
            grad_student,
            grad_teacher,
            grad_weights,
            num_units,
            width_s,
            width_t,
            NEED_STUDENT=need_student,
            NEED_TEACHER=need_teacher,
            NEED_WEIGHTS=need_weights,
            **meta,
        )

    def reduce(grad: Tensor) -> Tensor:
        if grad.numel() == 0:
            return grad
        return grad[0] if grad.shape[0] == 1 else grad.sum(0)

    return reduce(grad_student), reduce(grad_teacher), reduce(grad_weights)


def _saved_backward(
    student_rows: Tensor,
    teacher_rows: Tensor,
    weights: Tensor,
    valid: Tensor,
    inv_mean: Tensor,
    coupling: Tensor,
    saved: Tensor,
    scale: Tensor,
    meta: dict,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_structural_bwd_saved_kernel` once per side that needs its gradient, the first
    launch also writing ``p``'s (when only ``p`` needs one: a student launch with no rows)."""
    batch, num_units, _ = student_rows.shape
    device = student_rows.device
    sides = (student_rows, teacher_rows)
    grads = [
        empty_output(
            *(batch, num_units, rows.shape[2]) if need else (0,),
            dtype=torch.float32,
            device=device,
        )
        for rows, need in zip(sides, needs[:2], strict=True)
    ]
    grads.append(
        empty_output(*(batch, num_units) if needs[2] else (0,), dtype=torch.float32, device=device)
    )
    if batch * num_units == 0:
        return grads[0], grads[1], grads[2]
    for n, side in enumerate([side for side in (0, 1) if needs[side]] or [0]):
        width = sides[side].shape[2] if needs[side] else 0
        block_d = meta["BLOCK_D_S" if side == 0 else "BLOCK_D_T"]
        if meta["METRIC"] == METRIC_IDS["cosine"] and not small_blocks():
            block_d = 64  # the rows of one d-block stay in registers over all column blocks
        _structural_bwd_saved_kernel[
            (triton.cdiv(num_units, meta["BLOCK_I"]), max(1, triton.cdiv(width, block_d)), batch)
        ](
            saved,
            sides[side],
            weights,
            valid,
            inv_mean,
            coupling,
            scale,
            grads[side] if needs[side] else grads[2],
            grads[2],
            num_units,
            width,
            METRIC=meta["METRIC"],
            SIDE=side,
            NEED_WEIGHTS=needs[2] and n == 0,
            BLOCK_I=meta["BLOCK_I"],
            BLOCK_J=meta["BLOCK_J"],
            BLOCK_D=block_d,
            PRECISION=meta["PRECISION"],
            **{k: v for k, v in meta.items() if k == "num_warps"},
        )
    return grads[0], grads[1], grads[2]


@_structural_backward.register_fake
def _(
    student_rows,
    teacher_rows,
    weights,
    valid,
    inv_mean,
    coupling,
    saved,
    grad_loss,
    metric,
    need_student,
    need_teacher,
    need_weights,
):
    def buffer(needed: bool, *shape: int) -> Tensor:
        return student_rows.new_empty(*shape if needed else (0,), dtype=torch.float32)

    batch, num_units, width_s = student_rows.shape
    return (
        buffer(need_student, batch, num_units, width_s),
        buffer(need_teacher, batch, num_units, teacher_rows.shape[2]),
        buffer(need_weights, batch, num_units),
    )


class StructuralLossFunction(torch.autograd.Function):
    """Per-example DSA loss [B] with hand-written backward for both unit sets and ``p``."""

    @staticmethod
    def forward(
        ctx,
        student_units: Tensor,
        teacher_units: Tensor,
        span_weights: Tensor,
        span_mask: Tensor,
        metric: str,
    ) -> Tensor:
        student_units, teacher_units = contiguous(student_units), contiguous(teacher_units)
        valid = contiguous(span_mask)
        weights = contiguous(span_weights)
        student_rows, student_inv_norm = metric_rows(student_units, metric)
        teacher_rows, teacher_inv_norm = metric_rows(teacher_units, metric)
        save = (
            any(ctx.needs_input_grad[:3])
            and structural_design(
                metric, student_rows.shape[1], student_rows.shape[2], teacher_rows.shape[2]
            )
            == "saved"
        )
        loss, inv_mean, coupling, saved = _structural_forward(
            student_rows, teacher_rows, weights, valid, metric, save
        )
        ctx.metric = metric
        ctx.save_for_backward(
            student_units,
            teacher_units,
            student_rows,
            teacher_rows,
            student_inv_norm,
            teacher_inv_norm,
            weights,
            valid,
            inv_mean,
            coupling,
            saved,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (
            student_units,
            teacher_units,
            student_rows,
            teacher_rows,
            student_inv_norm,
            teacher_inv_norm,
            weights,
            valid,
            inv_mean,
            coupling,
            saved,
        ) = ctx.saved_tensors
        need_student, need_teacher, need_weights = ctx.needs_input_grad[:3]
        if not (need_student or need_teacher or need_weights):
            return None, None, None, None, None
        grad_student, grad_teacher, grad_weights = _structural_backward(
            student_rows,
            teacher_rows,
            weights,
            valid,
            inv_mean,
            coupling,
            saved,
            grad_loss,
            ctx.metric,
            need_student,
            need_teacher,
            need_weights,
        )

        def finish(grad: Tensor, units: Tensor, inv_norm: Tensor) -> Tensor:
            if ctx.metric == "cosine":
                return row_normalize_backward(units, inv_norm, grad, valid)
            return grad.to(units.dtype)

        return (
            finish(grad_student, student_units, student_inv_norm) if need_student else None,
            finish(grad_teacher, teacher_units, teacher_inv_norm) if need_teacher else None,
            grad_weights.to(weights.dtype) if need_weights else None,
            None,
            None,
        )


class MomentsStructuralLossFunction(torch.autograd.Function):
    """Per-example cosine DSA loss [B] from the second moments of the normalized rows (K ≫ d).

    With ``q = p·v`` and unit-norm rows ``t_i``, ``s_i`` (zero for invalid units), the sum over all
    ordered pairs is ``Σ_ij q_i q_j (t_i·t_j − s_i·s_j)² = ‖M_T‖² − 2‖C‖² + ‖M_S‖²`` with
    ``M_T = Σ_i q_i t_i t_iᵀ`` [d_T, d_T], ``M_S`` likewise [d_S, d_S] and ``C = Σ_i q_i t_i s_iᵀ``
    [d_T, d_S]; the diagonal ``Σ_i q_i² (‖t_i‖² − ‖s_i‖²)²`` (zero but for zero rows) is taken
    off. Backward, per valid row, minus the same diagonal terms:
    ``g_t = 4 q (M_T t − C s)``, ``g_s = −4 q (Cᵀ t − M_S s)``,
    ``g_p = 2 (tᵀM_T t − 2 tᵀC s + sᵀM_S s)``.

    The loss is a difference of terms of the order of ``(Σ q)²``, so the moments and the
    products run in float64: the cancellation then costs ≈ 1e-16·(Σ q)²/L relative, far below
    fp32 rounding even for nearly equal geometries. Memory: O(B·K·d + B·d²).
    """

    @staticmethod
    def forward(
        ctx, student_units: Tensor, teacher_units: Tensor, span_weights: Tensor, span_mask: Tensor
    ) -> Tensor:
        student_units, teacher_units = contiguous(student_units), contiguous(teacher_units)
        valid = contiguous(span_mask)
        student_rows, student_inv_norm = row_normalize(student_units)
        teacher_rows, teacher_inv_norm = row_normalize(teacher_units)
        keep = valid.unsqueeze(-1)
        # masked rows are never read: whatever an invalid unit holds (NaN included) is dropped
        s = torch.where(keep, student_rows.double(), 0.0)
        t = torch.where(keep, teacher_rows.double(), 0.0)
        q = torch.where(valid, span_weights.double(), 0.0)
        m_t = t.mT @ (q.unsqueeze(-1) * t)
        m_s = s.mT @ (q.unsqueeze(-1) * s)
        cross = t.mT @ (q.unsqueeze(-1) * s)
        diagonal = t.square().sum(-1) - s.square().sum(-1)  # E_ii
        loss = (
            m_t.square().sum((1, 2))
            - 2.0 * cross.square().sum((1, 2))
            + m_s.square().sum((1, 2))
            - (q * diagonal).square().sum(-1)
        )
        # a difference of large terms: exactly 0 below two valid units (no pair), never < 0
        has_pairs = valid.sum(-1) >= 2
        loss = torch.where(has_pairs, loss.clamp_min(0.0), 0.0)
        ctx.weights_dtype = span_weights.dtype
        inputs = (student_units, teacher_units, student_inv_norm, teacher_inv_norm, valid)
        ctx.save_for_backward(*inputs, s, t, q, m_t, m_s, cross, diagonal, has_pairs)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        units_s, units_t, inv_norm_s, inv_norm_t, valid, *moments = ctx.saved_tensors
        s, t, q, m_t, m_s, cross, diagonal, has_pairs = moments
        need_student, need_teacher, need_weights = ctx.needs_input_grad[:3]
        # [B, 1]; an example without a pair has no gradient (its terms cancel only to rounding)
        scale = torch.where(has_pairs, grad_loss.double(), 0.0).unsqueeze(-1)
        t_m_t = t @ m_t if need_teacher or need_weights else None  # rows M_T t_i
        t_c = t @ cross if need_student or need_weights else None  # rows Cᵀ t_i
        s_m_s = s @ m_s if need_student or need_weights else None  # rows M_S s_i
        grads: list[Tensor | None] = [None, None, None]
        own = (q * diagonal).unsqueeze(-1)  # the diagonal term of each row's sum
        coef = (4.0 * scale * q).unsqueeze(-1)
        if need_student:
            grad_rows = -coef * (t_c - s_m_s - own * s)
            grads[0] = row_normalize_backward(units_s, inv_norm_s, grad_rows.float(), valid)
        if need_teacher:
            grad_rows = coef * (t_m_t - s @ cross.mT - own * t)
            grads[1] = row_normalize_backward(units_t, inv_norm_t, grad_rows.float(), valid)
        if need_weights:
            row_sums = (
                (t_m_t * t).sum(-1)
                - 2.0 * (t_c * s).sum(-1)
                + (s_m_s * s).sum(-1)
                - q * diagonal.square()
            )
            grad_p = torch.where(valid, 2.0 * scale * row_sums, 0.0)
            grads[2] = grad_p.to(ctx.weights_dtype)
        return (*grads, None)


def structural_loss(
    student_units: Tensor,
    teacher_units: Tensor,
    span_weights: Tensor,
    span_mask: Tensor,
    metric: str = "cosine",
    reduction: str = "mean",
) -> Tensor:
    """Dynamic Structural Alignment loss of one layer pair (Eq. 10–11): float32.

    Per example ``L = Σ_{i≠j, v_i v_j} p_i p_j (D^S_ij − D^T_ij)²`` over ordered pairs, with ``D``
    the :func:`~mta_kernels.pairwise_distance` of each side; 0 with fewer than two valid units.
    The fused path never materializes a K×K matrix.

    Args:
        student_units: [B, K, d_S] fp32/bf16/fp16 pooled student units.
        teacher_units: [B, K, d_T] pooled teacher units (``d_T`` may differ from ``d_S``).
        span_weights: [B, K] float ``p`` (Eq. 9).
        span_mask: [B, K] bool unit validity.
        metric: ``"cosine"`` or ``"euclidean"``.
        reduction: ``"mean"`` over examples, ``"sum"``, or ``"none"`` for a [B] tensor.

    Gradients flow to whichever of the units and ``span_weights`` require grad.

    Example::

        >>> s, t = torch.randn(2, 6, 8), torch.randn(2, 6, 16)
        >>> p = torch.full((2, 6), 1 / 6)
        >>> structural_loss(s, t, p, torch.ones(2, 6, dtype=torch.bool)).shape
        torch.Size([])
    """
    if not use_triton(student_units, teacher_units, span_weights):
        return reference.structural_loss(
            student_units, teacher_units, span_weights, span_mask, metric, reduction
        )
    check_structural_loss_args(
        student_units, teacher_units, span_weights, span_mask, metric, reduction
    )
    num_units, width_student = student_units.shape[1:]
    if structural_design(metric, num_units, width_student, teacher_units.shape[2]) == "moments":
        per_example = MomentsStructuralLossFunction.apply(
            student_units, teacher_units, span_weights, span_mask
        )
    else:
        per_example = StructuralLossFunction.apply(
            student_units, teacher_units, span_weights, span_mask, metric
        )
    return reference.reduce_loss(per_example, reduction)
