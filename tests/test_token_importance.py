"""Fused token importance vs the reference (interpreter on CPU, native on CUDA)."""

import functools
import math

import pytest
import torch
from helpers import FUSED_DTYPES, check_against_reference, rel_error

import mta_kernels as mk
from mta_kernels import reference as ref

SHAPES = [(2, 37, 19), (1, 5, 3), (3, 50, 40), (1, 1, 8)]
#: the paper's definition, and the authors' released one (ε = 1e-5, padding rows as queries)
OPTIONS = {"paper": {}, "authors_code": {"std_eps": 1e-5, "padding_rows": True}}

pytestmark = pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh


def make_inputs(batch: int, num_tokens: int, width: int):
    hidden = torch.randn(batch, num_tokens, width) * 3 + 1
    mask = torch.ones(batch, num_tokens, dtype=torch.long)
    mask[0, num_tokens // 2 + 1 :] = 0
    if batch > 2:
        mask[2] = 0
        mask[2, 1] = 1  # a single valid token: all zeros
    return hidden, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_matches_reference(shape, dtype, options, device, seed):
    hidden, mask = make_inputs(*shape)
    check_against_reference(
        functools.partial(mk.token_importance, **options),
        functools.partial(ref.token_importance, **options),
        [hidden, mask],
        grad_args=(),
        dtype=dtype,
        device=device,
        seed=seed,
    )


def test_strided_and_bool_mask(device, seed):
    hidden, mask = make_inputs(2, 21, 12)
    check_against_reference(
        mk.token_importance,
        ref.token_importance,
        [hidden, mask.bool()],
        grad_args=(),
        dtype=torch.float32,
        device=device,
        seed=seed,
        non_contiguous=True,
    )


def test_weights_are_a_distribution(device):
    hidden, mask = make_inputs(3, 29, 16)
    weights = mk.token_importance(hidden.to(device), mask.to(device)).cpu()
    assert torch.allclose(weights.sum(-1), torch.tensor([1.0, 1.0, 0.0]), atol=1e-6)
    assert (weights[mask == 0] == 0).all() and (weights >= 0).all()


def test_no_grad_flows(device):
    hidden = torch.randn(2, 9, 8, device=device, requires_grad=True)
    weights = mk.token_importance(hidden, torch.ones(2, 9, dtype=torch.long, device=device))
    assert not weights.requires_grad


@pytest.mark.cuda
def test_bf16_cuda(seed):
    hidden, mask = make_inputs(2, 300, 256)
    check_against_reference(
        mk.token_importance,
        ref.token_importance,
        [hidden, mask],
        grad_args=(),
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )


@pytest.mark.cuda
def test_large_sequence_cuda(seed):
    hidden, mask = make_inputs(2, 1500, 320)
    got = mk.token_importance(hidden.cuda(), mask.cuda())
    assert rel_error(got, ref.token_importance(hidden.double(), mask)) < 5e-4, f"seed={seed}"


def test_nan_in_padding_does_not_leak(device):
    # Models may leave NaN/inf in padded positions (e.g. SDPA with left padding).
    hidden, mask = make_inputs(2, 23, 16)
    hidden[0, -1] = float("nan")
    hidden[0, -2] = float("inf")
    assert mask[0, -1] == 0 and mask[0, -2] == 0
    got = mk.token_importance(hidden.to(device), mask.to(device)).cpu()
    assert torch.isfinite(got).all()
    assert rel_error(got, ref.token_importance(hidden.double(), mask)) < 1e-5


@pytest.mark.parametrize("layers", [1, 3, 6])  # 6: two sets of launches (4 layers each at most)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_several_layers_at_once(layers, options, device, seed):
    hiddens = [torch.randn(2, 37, 24) for _ in range(layers)]
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 30:] = 0
    together = mk.token_importance_layers(
        [h.to(device) for h in hiddens], mask.to(device), **options
    )
    assert together.shape == (layers, 2, 37)
    for h, w in zip(hiddens, together, strict=True):
        expected = ref.token_importance(h.double(), mask, **options)
        assert rel_error(w, expected) <= 1e-5, f"seed={seed}"
        assert torch.equal(w, mk.token_importance(h.to(device), mask.to(device), **options))


def test_several_layers_argument_errors():
    mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one tensor"):
        mk.token_importance_layers([], mask)
    with pytest.raises(
        ValueError, match=r"share one shape and dtype: .* hiddens\[1\] is \(2, 5, 3\)"
    ):
        mk.token_importance_layers([torch.randn(2, 5, 4), torch.randn(2, 5, 3)], mask)
    with pytest.raises(TypeError, match=r"hiddens\[0\] must be a torch.Tensor"):
        mk.token_importance_layers([[1.0]], mask)


@pytest.mark.parametrize("padding_rows", [False, True])
def test_reference_matches_a_loop(padding_rows):
    """The reference against a float64 loop over rows: keys are the valid tokens other than the
    row; the rows are the valid tokens, or all T with ``padding_rows`` (then ``N = T``)."""
    hidden, mask = make_inputs(3, 9, 5)
    hidden = hidden.double()
    eps = 1e-5
    expected = torch.zeros(3, 9, dtype=torch.float64)
    for b in range(3):
        scaled = [hidden[b, i] / (hidden[b, i].std() + eps) for i in range(9)]
        rows = [i for i in range(9) if padding_rows or mask[b, i]]
        for i in rows:
            keys = [j for j in range(9) if mask[b, j] and j != i]
            if not keys:
                continue
            scores = torch.stack([scaled[i] @ scaled[j] / math.sqrt(5) for j in keys])
            expected[b, keys] += torch.softmax(scores, dim=0) / len(rows)
    got = ref.token_importance(hidden, mask, std_eps=eps, padding_rows=padding_rows)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_padding_rows_are_read(path, device):
    """With ``padding_rows`` the padding rows are queries: their states change the weights, and a
    NaN there reaches every weight of its example (only); without it nothing there counts."""
    hidden, mask = make_inputs(2, 23, 16)
    device = "cpu" if path == "reference" else device
    changed = hidden.clone()
    changed[0, -1] = 5 * torch.randn(16)
    poisoned = hidden.clone()
    poisoned[0, -1] = float("nan")
    op = ref.token_importance if path == "reference" else mk.token_importance

    def run(h: torch.Tensor, padding_rows: bool) -> torch.Tensor:
        return op(h.to(device), mask.to(device), padding_rows=padding_rows).cpu()

    assert torch.equal(run(hidden, False), run(changed, False))
    assert not torch.allclose(run(hidden, True), run(changed, True))
    nan = run(poisoned, True)
    assert nan[0, mask[0] == 1].isnan().all() and torch.isfinite(nan[1]).all()
    assert torch.isfinite(run(poisoned, False)).all()


@pytest.mark.parametrize("std_eps", [0.0, -1.0, float("inf"), True, "1e-5"])
def test_std_eps_must_be_a_positive_number(std_eps, device):
    hidden, mask = make_inputs(2, 5, 4)
    for op in (mk.token_importance, ref.token_importance):
        with pytest.raises(ValueError, match=r"std_eps must be (a positive|finite)"):
            op(hidden.to(device), mask.to(device), std_eps=std_eps)
