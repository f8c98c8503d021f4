"""The eager references against independent float64 loops, hand-computed tables and gradcheck.

The loops below are written per example and per pair straight from docs/design.md §2, deliberately
unlike the vectorized references, so that a shared mistake is unlikely.
"""

import math

import pytest
import torch
from helpers import random_spans, rel_error

from mta_kernels import reference as ref

F64_TOL = 1e-10  # float64 vs float64: only summation order differs


def loop_token_importance(hidden, mask):
    batch, num_tokens, width = hidden.shape
    out = torch.zeros(batch, num_tokens, dtype=torch.float64)
    for b in range(batch):
        h = hidden[b].double()
        h_hat = h / (h.std(dim=-1, keepdim=True) + 1e-8)
        valid = [t for t in range(num_tokens) if mask[b, t]]
        for s in valid:
            cols = [t for t in valid if t != s]
            if not cols:
                continue
            scores = torch.stack([h_hat[s] @ h_hat[t] / math.sqrt(width) for t in cols])
            alpha = torch.softmax(scores, 0)
            for t, a in zip(cols, alpha, strict=True):
                out[b, t] += a / len(valid)
    return out


def loop_span_pool(hidden, spans, mask, weights):
    batch, num_spans = spans.shape[:2]
    out = torch.zeros(batch, num_spans, hidden.shape[2], dtype=torch.float64)
    for b in range(batch):
        for k in range(num_spans):
            if not mask[b, k]:
                continue
            s, e = spans[b, k].tolist()
            total = torch.zeros(hidden.shape[2], dtype=torch.float64)
            weight_sum = 0.0
            for t in range(s, e):
                w = 1.0 if weights is None else float(weights[b, t])
                total += w * hidden[b, t].double()
                weight_sum += w
            out[b, k] = total / max(weight_sum, 1e-8)
    return out


def loop_span_weights(weights, spans, mask):
    raw = torch.zeros(spans.shape[:2], dtype=torch.float64)
    for b in range(spans.shape[0]):
        for k in range(spans.shape[1]):
            if mask[b, k]:
                s, e = spans[b, k].tolist()
                raw[b, k] = weights[b, s:e].double().sum()
    return raw / raw.sum(-1, keepdim=True).clamp_min(1e-8)


def loop_distance(units, mask, metric):
    batch, num_units = units.shape[:2]
    out = torch.zeros(batch, num_units, num_units, dtype=torch.float64)
    for b in range(batch):
        u = units[b].double()
        pairs = [
            (i, j)
            for i in range(num_units)
            for j in range(num_units)
            if i != j and mask[b, i] and mask[b, j]
        ]
        for i, j in pairs:
            if metric == "cosine":
                ui = u[i] / max(u[i].norm().item(), 1e-12)
                uj = u[j] / max(u[j].norm().item(), 1e-12)
                out[b, i, j] = 1 - ui @ uj
            else:
                out[b, i, j] = (u[i] - u[j]).norm()
        if metric == "euclidean" and pairs:
            mean = sum(out[b, i, j].item() for i, j in pairs) / len(pairs)
            if mean > 0:
                out[b] /= mean
    return out


def loop_structural(student, teacher, weights, mask, metric):
    d_s, d_t = loop_distance(student, mask, metric), loop_distance(teacher, mask, metric)
    out = torch.zeros(student.shape[0], dtype=torch.float64)
    for b in range(student.shape[0]):
        for i in range(student.shape[1]):
            for j in range(student.shape[1]):
                if i != j and mask[b, i] and mask[b, j]:
                    out[b] += weights[b, i] * weights[b, j] * (d_s[b, i, j] - d_t[b, i, j]) ** 2
    return out


def loop_hidden_alignment(student, teacher, weights, mask):
    out = torch.zeros(student.shape[0], dtype=torch.float64)
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            s, h = student[b, t].double(), teacher[b, t].double()
            cos = (s @ h) / (max(s.norm().item(), 1e-8) * max(h.norm().item(), 1e-8))
            out[b] += float(weights[b, t]) * float(mask[b, t]) * (1 - cos)
    return out


@pytest.mark.parametrize("shape", [(2, 9, 5), (3, 13, 7), (1, 2, 4)])
def test_token_importance_matches_loops(shape, seed):
    batch, num_tokens, _ = shape
    hidden = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    mask = torch.ones(batch, num_tokens, dtype=torch.long)
    mask[0, num_tokens // 2 :] = 0  # padding (example 0 keeps >= 1 token)
    got = ref.token_importance(hidden, mask)
    assert rel_error(got, loop_token_importance(hidden, mask)) < F64_TOL, f"seed={seed}"
    sums = got.sum(-1)
    for b in range(batch):
        n_valid = int(mask[b].sum())
        assert abs(sums[b].item() - (1.0 if n_valid >= 2 else 0.0)) < 1e-12, f"seed={seed}"
    assert (got[mask == 0] == 0).all()


def test_token_importance_degenerate_rows():
    hidden = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    got = ref.token_importance(hidden, mask)
    # One valid token: its only row has no valid column -> contributes nothing.
    assert torch.equal(got[0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(got[1], torch.zeros(4, dtype=torch.float64))
    # Two valid tokens: each row puts all its mass on the other one, N = 2.
    assert torch.allclose(got[2], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("weighted", [False, True])
def test_span_pool_matches_loops(weighted, seed):
    hidden = torch.randn(3, 17, 6, dtype=torch.float64)
    spans, mask = random_spans(3, 8, 17)
    weights = torch.rand(3, 17, dtype=torch.float64) if weighted else None
    got = ref.span_pool(hidden, spans, mask, weights)
    assert rel_error(got, loop_span_pool(hidden, spans, mask, weights)) < F64_TOL, f"seed={seed}"


def test_span_pool_hand_computed():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0]]])
    spans = torch.tensor([[[0, 2], [1, 4], [2, 2], [3, 4], [0, 1]]])
    mask = torch.tensor([[True, True, True, True, False]])
    weights = torch.tensor([[1.0, 3.0, 0.0, 2.0]])
    expected = torch.tensor([[[2.5, 1.5], [4.6, 3.6], [0.0, 0.0], [7.0, 6.0], [0.0, 0.0]]])
    assert torch.allclose(ref.span_pool(hidden, spans, mask, weights), expected)
    mean = torch.tensor([[[2.0, 1.0], [5.0, 4.0], [0.0, 0.0], [7.0, 6.0], [0.0, 0.0]]])
    assert torch.allclose(ref.span_pool(hidden, spans, mask), mean)


def test_span_weights_matches_loops_and_table(seed):
    weights = torch.rand(3, 15, dtype=torch.float64)
    spans, mask = random_spans(3, 7, 15)
    got = ref.span_weights(weights, spans, mask)
    assert rel_error(got, loop_span_weights(weights, spans, mask)) < F64_TOL, f"seed={seed}"
    table = ref.span_weights(
        torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
        torch.tensor([[[0, 2], [2, 3], [3, 4]]]),
        torch.tensor([[True, True, False]]),
    )
    assert torch.allclose(table, torch.tensor([[0.5, 0.5, 0.0]]))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance_matches_loops(metric, seed):
    units = torch.randn(2, 7, 5, dtype=torch.float64)
    units[0, 2] = units[0, 4]  # duplicate units -> zero distance
    units[1, 1] = 0.0  # zero unit
    mask = torch.rand(2, 7) > 0.2
    mask[0, [2, 4]] = True
    got = ref.pairwise_distance(units, mask, metric)
    assert rel_error(got, loop_distance(units, mask, metric)) < F64_TOL, f"seed={seed}"
    assert got[0, 2, 4].abs() < 1e-12 and got[0, 4, 2].abs() < 1e-12
    assert (got.diagonal(dim1=1, dim2=2) == 0).all()


def test_pairwise_distance_hand_computed():
    units = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    assert torch.allclose(
        ref.pairwise_distance(units), torch.tensor([[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]])
    )
    # Euclidean: distances sqrt(5), 2, sqrt(13); mean over ordered pairs = (sqrt5+2+sqrt13)/3.
    mean = (math.sqrt(5) + 2 + math.sqrt(13)) / 3
    expected = (
        torch.tensor(
            [[[0, math.sqrt(5), 2], [math.sqrt(5), 0, math.sqrt(13)], [2, math.sqrt(13), 0]]]
        )
        / mean
    )
    assert torch.allclose(ref.pairwise_distance(units, metric="euclidean"), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_structural_loss_matches_loops(metric, seed):
    student = torch.randn(3, 6, 4, dtype=torch.float64)
    teacher = torch.randn(3, 6, 9, dtype=torch.float64)
    weights = torch.rand(3, 6, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.3
    mask[2] = False
    mask[2, 1] = True  # fewer than two valid units -> 0
    got = ref.structural_loss(student, teacher, weights, mask, metric, reduction="none")
    expected = loop_structural(student, teacher, weights, mask, metric)
    assert rel_error(got, expected) < F64_TOL, f"seed={seed}"
    assert got[2] == 0
    assert torch.allclose(
        ref.structural_loss(student, teacher, weights, mask, metric), expected.mean()
    )
    assert torch.allclose(
        ref.structural_loss(student, teacher, weights, mask, metric, "sum"), expected.sum()
    )


def test_structural_loss_is_zero_for_identical_geometry():
    units = torch.randn(2, 5, 3, dtype=torch.float64)
    weights = torch.rand(2, 5, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    # Scaling every unit leaves cosine and mean-normalized euclidean geometry unchanged.
    for metric in ("cosine", "euclidean"):
        assert ref.structural_loss(units, 3 * units, weights, mask, metric).abs() < 1e-12


def test_hidden_alignment_matches_loops(seed):
    student = torch.randn(2, 8, 5, dtype=torch.float64)
    teacher = torch.randn(2, 8, 5, dtype=torch.float64)
    student[0, 1] = 0.0
    weights = torch.rand(2, 8, dtype=torch.float64)
    mask = torch.rand(2, 8) > 0.3
    got = ref.hidden_alignment_loss(student, teacher, weights, mask, reduction="none")
    expected = loop_hidden_alignment(student, teacher, weights, mask)
    assert rel_error(got, expected) < F64_TOL, f"seed={seed}"


# ---------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_span_pool(seed):
    spans, mask = random_spans(2, 6, 9)
    hidden = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(2, 9, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: ref.span_pool(h, spans, mask, w), (hidden, weights)
    ), f"seed={seed}"


def test_gradcheck_span_weights(seed):
    spans, mask = random_spans(2, 6, 9)
    weights = (torch.rand(2, 9, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ref.span_weights(w, spans, mask), (weights,)), (
        f"seed={seed}"
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_gradcheck_pairwise_distance(metric, seed):
    units = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda u: ref.pairwise_distance(u, mask, metric), (units,)), (
        f"seed={seed}"
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_gradcheck_structural_loss(metric, seed):
    student = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda s, t, p: ref.structural_loss(s, t, p, mask, metric, "none"),
        (student, teacher, weights),
    ), f"seed={seed}"


def test_gradcheck_hidden_alignment(seed):
    student = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda s, t, w: ref.hidden_alignment_loss(s, t, w, mask, "none"),
        (student, teacher, weights),
    ), f"seed={seed}"


def test_duplicate_units_have_finite_zero_gradients():
    units = torch.randn(1, 4, 3, dtype=torch.float64)
    units[0, 1] = units[0, 2]
    units.requires_grad_()
    ref.pairwise_distance(units, metric="euclidean")[0, 1, 2].backward()
    assert torch.isfinite(units.grad).all()
    assert torch.equal(units.grad[0, 1], torch.zeros(3, dtype=torch.float64))
