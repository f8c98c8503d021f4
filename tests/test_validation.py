"""Bad input fails before any kernel launch, with a message naming the argument.

Every case runs through the public (fused-dispatching) op and through the reference.
"""

import pytest
import torch

import mta_kernels as mk
from mta_kernels import reference as ref

B, T, K, D = 2, 6, 3, 4


def hidden(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (B, T, D)), dtype=dtype)


SPANS = torch.tensor([[[0, 2], [2, 4], [4, 6]]] * B)
MASK = torch.ones(B, K, dtype=torch.bool)
WEIGHTS = torch.rand(B, T)

CASES = [
    # (op name, args, kwargs, exception, message fragment)
    ("token_importance", (hidden(B, T, D), torch.ones(B, T)), {}, TypeError, "attention_mask"),
    (
        "token_importance",
        (hidden(B, T, D), torch.ones(B, T + 1, dtype=torch.long)),
        {},
        ValueError,
        "attention_mask must have shape",
    ),
    (
        "token_importance",
        (hidden(B, T, 1), torch.ones(B, T, dtype=torch.long)),
        {},
        ValueError,
        "width d >= 2",
    ),
    (
        "token_importance",
        (torch.ones(B, T, D, dtype=torch.long), torch.ones(B, T, dtype=torch.long)),
        {},
        TypeError,
        "hidden must be a floating tensor",
    ),
    ("span_pool", (hidden(), SPANS.float(), MASK), {}, TypeError, "spans must be an int64"),
    ("span_pool", (hidden(), SPANS[:, :, :1], MASK), {}, ValueError, "spans must have shape"),
    ("span_pool", (hidden(), SPANS[:1], MASK), {}, ValueError, "spans must have shape"),
    (
        "span_pool",
        (hidden(), SPANS + 1, MASK),
        {},
        ValueError,
        r"spans\[0, 2\] = \[5, 7\] is outside",
    ),
    ("span_pool", (hidden(), SPANS - 1, MASK), {}, ValueError, "is outside"),
    ("span_pool", (hidden(), SPANS.flip(-1), MASK), {}, ValueError, "has start > end"),
    ("span_pool", (hidden(), SPANS, MASK[:, :2]), {}, ValueError, "span_mask must have shape"),
    ("span_pool", (hidden(), SPANS, MASK.float()), {}, TypeError, "span_mask"),
    (
        "span_pool",
        (hidden(), SPANS, MASK, WEIGHTS[:, :-1]),
        {},
        ValueError,
        "token_weights must have shape",
    ),
    ("span_pool", (hidden(), SPANS.to("meta"), MASK), {}, ValueError, "same device"),
    ("span_weights", (WEIGHTS, SPANS, MASK.unsqueeze(-1)), {}, ValueError, "span_mask"),
    ("pairwise_distance", (hidden(B, K, D),), {"metric": "manhattan"}, ValueError, "metric"),
    ("pairwise_distance", (hidden(B, K),), {}, ValueError, "units must have 3 dimensions"),
    (
        "structural_loss",
        (hidden(B, K, D), hidden(B, K + 1, D), torch.rand(B, K), MASK),
        {},
        ValueError,
        "must share",
    ),
    (
        "structural_loss",
        (hidden(B, K, D), hidden(B, K, 7), torch.rand(B, K), MASK),
        {"reduction": "avg"},
        ValueError,
        "reduction",
    ),
    (
        "structural_loss",
        (hidden(B, K, D), hidden(B, K, 7), torch.rand(B, K + 1), MASK),
        {},
        ValueError,
        "span_weights must have shape",
    ),
    (
        "hidden_alignment_loss",
        (hidden(), hidden(B, T, D + 1), WEIGHTS, MASK),
        {},
        ValueError,
        r"projected to the teacher's width d_T .* got widths 4 and 5",
    ),
    (
        "hidden_alignment_loss",
        (hidden(B + 1, T, D), hidden(), WEIGHTS, MASK),
        {},
        ValueError,
        r"must hold the same tokens.*\[B, T\] differ \(student_hidden \(3, 6, 4\)",
    ),
    (
        "hidden_alignment_loss",
        (hidden(B, T - 1, D), hidden(), WEIGHTS, MASK),
        {},
        ValueError,
        r"\[B, T\] differ",
    ),
    ("span_weights", (WEIGHTS, SPANS.tolist(), MASK), {}, TypeError, "spans must be a torch"),
    ("span_weights", (WEIGHTS, SPANS, MASK.tolist()), {}, TypeError, "span_mask must be a torch"),
    ("span_pool", (hidden(), SPANS, MASK.long()), {}, TypeError, "span_mask must be a bool"),
    ("span_weights", (WEIGHTS, SPANS, MASK.int()), {}, TypeError, "span_mask must be a bool"),
    (
        "pairwise_distance",
        (hidden(B, K, D), MASK.long()),
        {},
        TypeError,
        "span_mask must be a bool",
    ),
    (
        "structural_loss",
        (hidden(B, K, D), hidden(B, K, 7), torch.rand(B, K), MASK.to(torch.uint8)),
        {},
        TypeError,
        r"span_mask must be a bool tensor .* got torch.uint8; convert a 0/1 mask",
    ),
    (
        "hidden_alignment_loss",
        (hidden(), hidden(), WEIGHTS, torch.ones(B, T + 1, dtype=torch.bool)),
        {},
        ValueError,
        "token_mask must have shape",
    ),
    (
        "hidden_alignment_loss",
        (hidden(), hidden(), WEIGHTS.long(), MASK),
        {},
        TypeError,
        "token_weights must be a floating tensor",
    ),
]


@pytest.mark.parametrize("module", [mk, ref], ids=["fused", "reference"])
@pytest.mark.parametrize(("name", "args", "kwargs", "error", "message"), CASES)
def test_bad_input_is_named(module, name, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        getattr(module, name)(*args, **kwargs)


def test_invalid_spans_may_hold_garbage():
    spans = SPANS.clone()
    spans[0, 1] = torch.tensor([-3, 99])
    mask = MASK.clone()
    mask[0, 1] = False
    out = mk.span_pool(hidden(), spans, mask)
    assert torch.equal(out[0, 1], torch.zeros(D))


def test_non_tensor_argument():
    with pytest.raises(TypeError, match=r"hidden must be a torch\.Tensor"):
        mk.span_pool([[1.0]], SPANS, MASK)


def test_assume_valid_spans_skips_only_the_range_check():
    bad = SPANS.clone()
    bad[1, 2] = torch.tensor([4, 60])  # end past T
    with mk.assume_valid_spans():
        out = mk.span_pool(hidden(), bad, MASK)  # clamped into [0, T]: no error, no crash
        assert torch.isfinite(out).all()
        with pytest.raises(TypeError, match="spans must be an int64"):
            mk.span_pool(hidden(), bad.float(), MASK)  # dtype/shape checks still run
    with pytest.raises(ValueError, match="is outside"):
        mk.span_pool(hidden(), bad, MASK)  # the check is back after the block
