"""The NaN policy of every op, on the eager reference and on the Triton path alike.

1. NaN or inf at a masked-out position (padding, tokens outside every valid span, invalid units,
   ``token_mask = 0``) never changes a result: outputs and gradients are bit-identical to those
   of the same inputs with finite values there, and the gradient at those positions is 0.
2. NaN at a valid position propagates to every output of that example that depends on it, as
   any PyTorch loss would; other examples are unchanged, and no output of that example changes
   to another finite value (a matmul may spread the NaN to more of the example's outputs).

Each case builds inputs and names the positions that are masked out and one that is valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import mta_kernels as mk
from mta_kernels import reference as ref
from mta_kernels._switches import SWITCHES

pytestmark = pytest.mark.kernels

B, T, K, D = 2, 12, 4, 8
SPANS = torch.tensor([[[0, 3], [3, 5], [6, 9], [9, 10]], [[1, 4], [4, 8], [0, 0], [8, 11]]])
SPAN_MASK = torch.tensor([[True, True, True, False], [True, True, False, True]])
# Tokens outside every valid span: example 0: 5, 9, 10, 11 (span 3 is invalid); example 1: 0, 11.
OUTSIDE = torch.zeros(B, T, dtype=torch.bool)
OUTSIDE[0, [5, 9, 10, 11]] = True
OUTSIDE[1, [0, 11]] = True
ATTENTION = torch.ones(B, T, dtype=torch.long)
ATTENTION[1, 10:] = 0


@dataclass
class Case:
    """``run(*tensors)`` → output; ``tensors`` are the float inputs (those in ``grad`` get
    gradients); ``masked[i]`` marks the masked-out elements of ``tensors[i]`` (None: none);
    ``valid`` = (tensor index, element index) of a valid position and ``depends`` the output
    elements that depend on it (a bool mask of the output)."""

    run: Callable[..., Tensor]
    tensors: list[Tensor]
    grad: tuple[int, ...]
    masked: list[Tensor | None]
    valid: tuple[int, tuple[int, ...]]
    depends: Tensor


def _rows(mask_bt: Tensor, width: int) -> Tensor:
    return mask_bt.unsqueeze(-1).expand(-1, -1, width)


def token_importance_case(op) -> Case:
    padding = ATTENTION == 0
    depends = torch.zeros(B, T, dtype=torch.bool)
    depends[0] = True  # every weight of the example (the softmax couples all its tokens)
    return Case(
        run=lambda h: op.token_importance(h, ATTENTION),
        tensors=[torch.randn(B, T, D)],
        grad=(),
        masked=[_rows(padding, D)],
        valid=(0, (0, 4, 2)),
        depends=depends,
    )


def span_pool_case(op) -> Case:
    depends = torch.zeros(B, K, D, dtype=torch.bool)
    depends[0, 2, 1] = True  # token 7 lies in span 2 only; feature 1
    return Case(
        run=lambda h, w: op.span_pool(h, SPANS, SPAN_MASK, w),
        tensors=[torch.randn(B, T, D), torch.rand(B, T)],
        grad=(0, 1),
        masked=[_rows(OUTSIDE, D), OUTSIDE],
        valid=(0, (0, 7, 1)),
        depends=depends,
    )


def span_weights_case(op) -> Case:
    depends = torch.zeros(B, K, dtype=torch.bool)
    depends[1, [0, 1, 3]] = True  # the valid spans of example 1 (normalization)
    return Case(
        run=lambda w: op.span_weights(w, SPANS, SPAN_MASK),
        tensors=[torch.rand(B, T)],
        grad=(0,),
        masked=[OUTSIDE],
        valid=(0, (1, 5)),
        depends=depends,
    )


def pairwise_case(op, metric: str) -> Case:
    invalid = ~SPAN_MASK
    depends = torch.zeros(B, K, K, dtype=torch.bool)
    if metric == "cosine":
        depends[0, 1, [0, 2]] = depends[0, [0, 2], 1] = True  # row and column of unit 1
    else:
        depends[0, :3, :3] = ~torch.eye(3, dtype=torch.bool)  # the mean distance couples all
    return Case(
        run=lambda u: op.pairwise_distance(u, SPAN_MASK, metric),
        tensors=[torch.randn(B, K, D)],
        grad=(0,),
        masked=[_rows(invalid, D)],
        valid=(0, (0, 1, 3)),
        depends=depends,
    )


def structural_case(op, metric: str, design: str = "auto") -> Case:
    """``design``: the design of the structural loss (SWITCHES.structural_design), chosen when
    the forward runs."""
    invalid = ~SPAN_MASK
    depends = torch.tensor([True, False])

    def run(s: Tensor, t: Tensor, p: Tensor) -> Tensor:
        saved = SWITCHES.structural_design
        SWITCHES.structural_design = design
        try:
            return op.structural_loss(s, t, p, SPAN_MASK, metric, "none")
        finally:
            SWITCHES.structural_design = saved

    return Case(
        run=run,
        tensors=[torch.randn(B, K, D), torch.randn(B, K, 2 * D), torch.rand(B, K)],
        grad=(0, 1, 2),
        masked=[_rows(invalid, D), _rows(invalid, 2 * D), invalid],
        valid=(1, (0, 2, 5)),
        depends=depends,
    )


def hidden_alignment_case(op) -> Case:
    token_mask = torch.rand(B, T) > 0.3
    token_mask[1, 6] = True
    off = ~token_mask
    return Case(
        run=lambda s, t, w: op.hidden_alignment_loss(s, t, w, token_mask, "none"),
        tensors=[torch.randn(B, T, D), torch.randn(B, T, D), torch.rand(B, T)],
        grad=(0, 1, 2),
        masked=[_rows(off, D), _rows(off, D), off],
        valid=(0, (1, 6, 3)),
        depends=torch.tensor([False, True]),
    )


CASES = {
    "token_importance": token_importance_case,
    "span_pool": span_pool_case,
    "span_weights": span_weights_case,
    "pairwise_cosine": lambda op: pairwise_case(op, "cosine"),
    "pairwise_euclidean": lambda op: pairwise_case(op, "euclidean"),
    "structural_cosine": lambda op: structural_case(op, "cosine"),
    "structural_euclidean": lambda op: structural_case(op, "euclidean"),
    "structural_cosine_recompute": lambda op: structural_case(op, "cosine", "recompute"),
    "structural_euclidean_recompute": lambda op: structural_case(op, "euclidean", "recompute"),
    "structural_cosine_moments": lambda op: structural_case(op, "cosine", "moments"),
    "hidden_alignment": hidden_alignment_case,
}


def _evaluate(case: Case, tensors: list[Tensor], device: str) -> tuple[Tensor, list[Tensor]]:
    inputs = [t.to(device).detach().requires_grad_(i in case.grad) for i, t in enumerate(tensors)]
    out = case.run(*inputs)
    grads: list[Tensor] = []
    if case.grad:
        upstream = torch.linspace(0.5, 1.5, out.numel()).view_as(out).to(device)
        grads = [
            g.cpu() for g in torch.autograd.grad(out, [inputs[i] for i in case.grad], upstream)
        ]
    return out.detach().cpu(), grads


PATHS = ["reference", "triton"]


def _op_and_device(path: str, device: str):
    return (ref, "cpu") if path == "reference" else (mk, device)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_masked_positions_never_change_a_result(name, path, poison, device):
    torch.manual_seed(0)
    op, where = _op_and_device(path, device)
    case = CASES[name](op)
    clean_out, clean_grads = _evaluate(case, case.tensors, where)
    assert torch.isfinite(clean_out).all()
    poisoned = [
        t.masked_fill(m, poison) if m is not None else t
        for t, m in zip(case.tensors, case.masked, strict=True)
    ]
    out, grads = _evaluate(case, poisoned, where)
    assert torch.equal(out, clean_out), f"{poison} at masked positions changed the output"
    for i, clean, grad in zip(case.grad, clean_grads, grads, strict=True):
        assert torch.equal(grad, clean), f"{poison} at masked positions changed grad {i}"
        masked = case.masked[i]
        if masked is not None:
            assert (grad[masked] == 0).all(), f"grad {i} is not 0 at masked positions"


# The interpreter computes with NumPy, which warns on the NaN arithmetic this test is about.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_nan_at_a_valid_position_propagates(name, path, device):
    torch.manual_seed(0)
    op, where = _op_and_device(path, device)
    case = CASES[name](op)
    clean_out, _ = _evaluate(case, case.tensors, where)
    index, element = case.valid
    poisoned = [t.clone() for t in case.tensors]
    poisoned[index][element] = float("nan")
    out, _ = _evaluate(case, poisoned, where)
    assert out[case.depends].isnan().all(), "NaN at a valid position did not reach the output"
    example = element[0]
    kept = out[example].isnan() | (out[example] == clean_out[example])
    assert kept.all(), "NaN at a valid position turned outputs into other finite values"
    others = torch.arange(B) != example
    assert torch.equal(out[others], clean_out[others]), "NaN changed another example's outputs"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", PATHS)
def test_nan_weight_reaches_the_gradients_of_its_span(path, device):
    """A NaN token weight inside a valid span: the gradients of that span's tokens are NaN, never
    finite numbers (a max that drops NaN would divide by the 1e-8 floor instead)."""
    op, where = _op_and_device(path, device)
    hidden = torch.randn(1, 6, 4, device=where, requires_grad=True)
    weights = torch.rand(1, 6, device=where)
    weights[0, 1] = float("nan")
    spans = torch.tensor([[[0, 3], [3, 6]]], device=where)
    mask = torch.ones(1, 2, dtype=torch.bool, device=where)
    pooled = op.span_pool(hidden, spans, mask, weights)
    (grad,) = torch.autograd.grad(pooled.sum(), hidden)
    assert grad[0, :3].isnan().all()
    if path == "triton":  # the reference's membership matmul may spread it over the example
        assert torch.isfinite(grad[0, 3:]).all()
