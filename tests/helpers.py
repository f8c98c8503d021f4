"""Shared test utilities: error metric, tolerances, random spans."""

import itertools

import torch
from torch import Tensor

FUSED_DTYPES = (torch.float32, torch.float16)
"""Dtypes the fused kernels are checked in everywhere; bf16 only on CUDA (docs/design.md §6:
``tl.dot`` on bf16 is wrong in the Triton interpreter)."""


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error ``‖a − e‖ / ‖e‖`` in float64; inf for NaN/inf or a shape mismatch,
    so a NaN (e.g. a poisoned, unwritten output element) never passes."""
    if actual.shape != expected.shape:
        return float("inf")
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def storage_rounding(expected: Tensor, dtype: torch.dtype) -> float:
    """Relative error of merely storing ``expected`` in ``dtype``: a floor for any result
    returned in that dtype (gradients come back in the input's dtype)."""
    return rel_error(expected.to(dtype), expected)


def tolerances(dtype: torch.dtype, device: str) -> tuple[float, float]:
    """(forward, backward) bounds on the relative error against the float64 reference.

    * Interpreter, fp32/fp16 inputs: 1e-5 / 1e-4 — everything accumulates in fp32 with exact
      (``ieee``) dot products; fp16 inputs are upcast exactly.
    * CUDA fp32: 5e-4 — ``tl.dot`` runs at ``input_precision="ieee"`` by default, so this is
      loose on purpose to also hold with ``set_fp32_matmul_precision("tf32x3")``.
    * CUDA bf16: 2e-2 — bf16 tensor-core operands carry 2^-9 relative rounding each.
    """
    if dtype == torch.bfloat16:
        return 2e-2, 2e-2
    if device == "cuda":
        return 5e-4, 5e-4
    return 1e-5, 1e-4


def backward_bound(dtype: torch.dtype, device: str, expected: Tensor) -> float:
    """Backward bound plus the unavoidable rounding of a gradient stored in ``dtype``."""
    return tolerances(dtype, device)[1] + storage_rounding(expected, dtype)


def random_spans(
    batch: int, num_spans: int, num_tokens: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random spans with every edge case: empty, single-token, whole-sequence, overlapping,
    and invalid spans holding out-of-range garbage that must be ignored.

    Returns int64 spans [B, K, 2] and a bool mask [B, K].
    """
    starts = torch.randint(0, num_tokens + 1, (batch, num_spans), generator=generator)
    lengths = torch.randint(0, 7, (batch, num_spans), generator=generator)
    ends = (starts + lengths).clamp_max(num_tokens)
    spans = torch.stack([starts, ends], dim=-1)
    mask = torch.rand(batch, num_spans, generator=generator) > 0.2
    if num_spans >= 4:
        spans[0, 0] = torch.tensor([0, num_tokens])  # whole sequence
        spans[0, 1] = torch.tensor([2, 2])  # empty
        spans[0, 2] = torch.tensor([1, 2])  # single token
        mask[0, :3] = True
        spans[0, 3] = torch.tensor([-5, num_tokens + 9])  # garbage behind an invalid span
        mask[0, 3] = False
    return spans, mask


def word_spans(
    batch: int, num_tokens: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sorted, non-overlapping spans tiling each sequence (like word units): [B, K, 2], mask."""
    all_spans = []
    for _ in range(batch):
        cuts = [0]
        while cuts[-1] < num_tokens:
            step = int(torch.randint(1, 4, (1,), generator=generator))
            cuts.append(min(num_tokens, cuts[-1] + step))
        all_spans.append(list(itertools.pairwise(cuts)))
    num_spans = max(len(s) for s in all_spans)
    spans = torch.zeros(batch, num_spans, 2, dtype=torch.long)
    mask = torch.zeros(batch, num_spans, dtype=torch.bool)
    for b, example in enumerate(all_spans):
        spans[b, : len(example)] = torch.tensor(example)
        mask[b, : len(example)] = True
    return spans, mask


def check_against_reference(
    fused,
    reference,
    args: list,
    *,
    grad_args: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    seed: int,
    non_contiguous: bool = False,
    forward_atol: float = 0.0,
    backward_atol: float = 0.0,
) -> None:
    """Run ``fused`` on ``device`` with floating ``args`` cast to ``dtype``, and ``reference`` on
    the very same values in float64 and in float32; compare outputs and the gradients of
    ``args[i]`` for ``i`` in ``grad_args`` (the others must get no gradient).

    Bound (flash-attention's rule plus the stated tolerance): ``err(fused) ≤ tol +
    2·err(reference in fp32)`` with ``err`` the relative error against float64. The second term
    only matters where the exact answer is ~0 (e.g. the cosine gradient of 1-d units), where any
    finite-precision result has a large relative error. Gradients returned in a 16-bit dtype
    are also allowed their own storage rounding. With ``non_contiguous`` the floating inputs
    are handed over as strided views. ``forward_atol`` adds an absolute floor per output element
    for outputs that are differences of O(1) quantities (a cosine distance ``1 − cos`` of nearly
    parallel units): fp32 resolves them only to a few 1e-7, whatever their size.
    ``backward_atol`` does the same for gradients that are exactly 0 in exact arithmetic (the
    euclidean distance of exactly two valid units is 1 whatever they are), where any fp32 result
    is rounding noise and only its size can be bounded.
    """
    fused_args, ref64_args, ref32_args = [], [], []
    for i, arg in enumerate(args):
        if isinstance(arg, Tensor) and arg.is_floating_point():
            value = arg.to(dtype)
            ref64_args.append(value.double().requires_grad_(i in grad_args))
            ref32_args.append(value.float().requires_grad_(i in grad_args))
            value = value.to(device)
            if non_contiguous:
                value = value.transpose(0, -1).contiguous().transpose(0, -1)
            fused_args.append(value.detach().requires_grad_(i in grad_args))
        else:
            fused_args.append(arg.to(device) if isinstance(arg, Tensor) else arg)
            ref64_args.append(arg)
            ref32_args.append(arg)
    out = fused(*fused_args)
    expected = reference(*ref64_args)
    baseline = reference(*ref32_args)
    forward_tol, _ = tolerances(dtype, device)
    assert out.dtype == torch.float32, f"output dtype {out.dtype}"
    error = rel_error(out, expected)
    floor = forward_atol * expected.numel() ** 0.5 / max(expected.norm().item(), 1e-30)
    bound = forward_tol + 2 * rel_error(baseline, expected) + floor
    assert error <= bound, f"forward rel error {error:.3g} > {bound:.3g} (seed={seed})"
    if not grad_args:
        return
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    out.backward(upstream.to(device=device, dtype=torch.float32))
    expected.backward(upstream)
    baseline.backward(upstream.float())
    for i, mine in enumerate(fused_args):
        if not isinstance(mine, Tensor) or not mine.is_floating_point():
            continue
        if i not in grad_args:
            assert mine.grad is None, f"arg {i} must get no gradient"
            continue
        exact = ref64_args[i].grad
        assert mine.grad is not None and mine.grad.dtype == mine.dtype, f"grad of arg {i}"
        floor = backward_atol * exact.numel() ** 0.5 / max(exact.norm().item(), 1e-30)
        bound = (
            backward_bound(mine.dtype, device, exact)
            + 2 * rel_error(ref32_args[i].grad, exact)
            + floor
        )
        error = rel_error(mine.grad, exact)
        assert error <= bound, f"grad of arg {i}: rel error {error:.3g} > {bound:.3g} (seed={seed})"
