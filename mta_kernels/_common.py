"""Helpers shared by the fused ops: dispatch, launch utilities and the row-normalization kernels.

Dispatch (docs/design.md §3): CUDA tensors run the Triton kernels; CPU tensors run the eager
reference, unless ``TRITON_INTERPRET=1`` was set before Triton was imported, in which case the
Triton kernels run on CPU through the interpreter (that is how CI checks them). float64 inputs
always take the reference, which is what ``torch.autograd.gradcheck`` exercises.
"""

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from mta_kernels._switches import SWITCHES
from mta_kernels._validation import NORM_EPS

_F = TypeVar("_F", bound=Callable)


def small_blocks() -> bool:
    return SWITCHES.small_blocks


def on_input_device(launcher: _F) -> _F:
    """Run a kernel launcher with its first tensor argument's CUDA device current.

    Triton launches on ``torch.cuda.current_device()``, not on the tensors' device: without this
    guard, tensors on ``cuda:1`` while ``cuda:0`` is current would be read from the wrong GPU.
    """

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = next(a for a in args if isinstance(a, Tensor))
        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def dot_precision() -> str:
    return SWITCHES.fp32_dot_precision


def empty_output(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when ``SWITCHES.poison_outputs``)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if SWITCHES.poison_outputs else out


def use_triton(*tensors: Tensor | None) -> bool:
    """True when the fused Triton path applies; anything else goes to the (validating) reference."""
    present = [t for t in tensors if t is not None]
    if not all(isinstance(t, Tensor) for t in present):
        return False  # the reference raises the TypeError
    if any(t.dtype == torch.float64 for t in present):
        return False
    device = present[0].device
    if device.type == "cpu":
        return SWITCHES.interpreter and SWITCHES.prefer_reference == 0
    return device.type == "cuda" and SWITCHES.prefer_reference_cuda == 0


def work_splits(programs: int, blocks: int, device: torch.device) -> int:
    """Into how many programs to split a loop over ``blocks`` tiles that ``programs`` programs
    would otherwise run alone: enough for ~2 programs per SM, at most 4 (each split writes its
    own partial results, merged afterwards in a fixed order) and at most ``blocks``. The
    interpreter uses 2, so that every split and its merge are tested on CPU."""
    if device.type != "cuda":
        return max(1, min(2, blocks))
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(4, blocks, triton.cdiv(2 * sm_count, max(programs, 1))))


def contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of derived operands fed to ``tl.dot`` (normalized rows, coefficient tiles).

    bf16 inputs keep bf16 operands (tensor cores, fp32 accumulation; their error is of the order
    of the inputs' own rounding). fp16 and fp32 inputs get fp32 operands, so they meet the fp32
    accuracy contract (tests: 1e-5 forward).
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def block_size(n: int, cap: int, floor: int = 16) -> int:
    """Smallest power of two >= n, clamped to [floor, cap] (``tl.dot`` needs >= 16)."""
    return max(floor, min(cap, triton.next_power_of_2(max(n, 1))))


@triton.jit
def floor_at(x, eps):
    """``max(x, eps)`` that keeps a NaN ``x`` NaN (``tl.maximum`` lowers to a max that drops
    NaN, which would turn a NaN norm or sum into ``eps`` and its quotients into finite numbers)."""
    return tl.where(x < eps, eps, x)


@triton.jit
def row_normalize_fwd_kernel(
    x_ptr,  # [R, D] input rows
    out_ptr,  # [R, D] x / max(||x||, eps), in the dot dtype
    inv_norm_ptr,  # [R] fp32: 1 / max(||x||, eps)
    D,
    eps,
    BLOCK_D: tl.constexpr,
):
    """One program per row: ``out = x / max(‖x‖₂, eps)`` computed in fp32."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * D + offs, mask=offs < D, other=0.0).to(tl.float32)
        acc += x * x
    inv_norm = 1.0 / floor_at(tl.sqrt(tl.sum(acc, axis=0)), eps)
    tl.store(inv_norm_ptr + row, inv_norm)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * D + offs, mask=offs < D, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + row * D + offs, (x * inv_norm).to(out_ptr.dtype.element_ty), mask=offs < D
        )


@triton.jit
def row_normalize_bwd_kernel(
    x_ptr,  # [R, D] forward input
    inv_norm_ptr,  # [R] fp32 saved by the forward
    grad_hat_ptr,  # [R, D] fp32 gradient w.r.t. the normalized rows
    valid_ptr,  # [R] bool or int: rows that took part (the others get a zero gradient)
    grad_x_ptr,  # [R, D] gradient w.r.t. x (x's dtype)
    D,
    eps,
    BLOCK_D: tl.constexpr,
):
    """``g_x = r (g − ⟨g, x̂⟩ x̂)``, ``r = 1/max(‖x‖, eps)``; ``r g`` where the clamp is active.

    Rows that are not valid are never read (their values, NaN included, cannot reach a gradient).
    """
    row = tl.program_id(0).to(tl.int64)
    row_valid = tl.load(valid_ptr + row) != 0
    inv_norm = tl.where(row_valid, tl.load(inv_norm_ptr + row), 0.0)
    read_width = tl.where(row_valid, D, 0)  # columns read: none for an invalid row
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        loaded = offs < read_width
        x = tl.load(x_ptr + row * D + offs, mask=loaded, other=0.0).to(tl.float32)
        g = tl.load(grad_hat_ptr + row * D + offs, mask=loaded, other=0.0)
        acc += g * x
    # Below the clamp the norm is the constant eps: no projection term.
    unclamped = inv_norm < 1.0 / eps
    projection = tl.where(unclamped, tl.sum(acc, axis=0) * inv_norm * inv_norm, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        loaded = offs < read_width
        x = tl.load(x_ptr + row * D + offs, mask=loaded, other=0.0).to(tl.float32)
        g = tl.load(grad_hat_ptr + row * D + offs, mask=loaded, other=0.0)
        grad = inv_norm * (g - projection * x)
        tl.store(grad_x_ptr + row * D + offs, grad.to(grad_x_ptr.dtype.element_ty), mask=offs < D)


@torch.library.custom_op("mta::row_normalize", mutates_args=())
@on_input_device
def row_normalize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` [..., D] scaled to unit norm: (x̂ in the dot dtype, 1/max(‖x‖, 1e-12) fp32)."""
    x = contiguous(x)
    rows, width = x.numel() // max(x.shape[-1], 1), x.shape[-1]
    out = empty_output(*x.shape, dtype=dot_dtype(x.dtype), device=x.device)
    inv_norm = empty_output(*x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows > 0:
        row_normalize_fwd_kernel[(rows,)](
            x, out, inv_norm, width, NORM_EPS, BLOCK_D=block_size(width, 1024)
        )
    return out, inv_norm


@row_normalize.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=dot_dtype(x.dtype)), x.new_empty(
        x.shape[:-1], dtype=torch.float32
    )


@torch.library.custom_op("mta::row_normalize_backward", mutates_args=())
@on_input_device
def row_normalize_backward(x: Tensor, inv_norm: Tensor, grad_hat: Tensor, valid: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of :func:`row_normalize` given fp32 ``grad_hat``; x's dtype. Rows
    where ``valid`` [...] (``x``'s leading shape, bool or int) is 0 get a zero gradient."""
    x = contiguous(x)
    rows, width = x.numel() // max(x.shape[-1], 1), x.shape[-1]
    grad_x = empty_output(*x.shape, dtype=x.dtype, device=x.device)
    if rows > 0:
        row_normalize_bwd_kernel[(rows,)](
            x,
            inv_norm,
            contiguous(grad_hat),
            contiguous(valid),
            grad_x,
            width,
            NORM_EPS,
            BLOCK_D=block_size(width, 1024),
        )
    return grad_x


@row_normalize_backward.register_fake
def _(x: Tensor, inv_norm: Tensor, grad_hat: Tensor, valid: Tensor) -> Tensor:
    return torch.empty_like(x)
