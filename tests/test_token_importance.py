"""Fused token importance vs the reference (interpreter on CPU, native on CUDA)."""

import pytest
import torch
from helpers import FUSED_DTYPES, check_against_reference, rel_error

import mta_kernels as mk
from mta_kernels import reference as ref

SHAPES = [(2, 37, 19), (1, 5, 3), (3, 50, 40), (1, 1, 8)]

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
def test_matches_reference(shape, dtype, device, seed):
    hidden, mask = make_inputs(*shape)
    check_against_reference(
        mk.token_importance,
        ref.token_importance,
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
def test_several_layers_at_once(layers, device, seed):
    hiddens = [torch.randn(2, 37, 24) for _ in range(layers)]
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 30:] = 0
    together = mk.token_importance_layers([h.to(device) for h in hiddens], mask.to(device))
    assert together.shape == (layers, 2, 37)
    for h, w in zip(hiddens, together, strict=True):
        expected = ref.token_importance(h.double(), mask)
        assert rel_error(w, expected) <= 1e-5, f"seed={seed}"
        assert torch.equal(w, mk.token_importance(h.to(device), mask.to(device)))


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
