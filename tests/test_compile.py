"""The fused ops compose with ``torch.compile(fullgraph=True)``: each kernel launch is a
registered ``torch.library`` custom op with a fake (meta) implementation, and the backward of
each ``autograd.Function`` calls custom ops too, so Dynamo traces a training step without a
graph break and AOTAutograd differentiates through it."""

import pytest
import torch
from helpers import rel_error, word_spans

import mta_kernels as mk

pytestmark = pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh


def mta_step(student, teacher, projector, attention_mask, spans, span_mask):
    """A miniature MTA loss: every public op once (euclidean distances as an extra)."""
    weights = mk.token_importance(teacher, attention_mask)
    student_units = mk.span_pool(student, spans, span_mask, weights)
    teacher_units = mk.span_pool(teacher, spans, span_mask, weights)
    p = mk.span_weights(weights, spans, span_mask)
    dsa = mk.structural_loss(student_units, teacher_units, p, span_mask)
    hra = mk.hidden_alignment_loss(student @ projector, teacher, weights, attention_mask)
    geometry = mk.pairwise_distance(student_units, span_mask, "euclidean").mean()
    return 2.0 * dsa + 0.2 * hra + geometry


def test_fullgraph_compile_matches_eager(device, seed):
    torch._dynamo.reset()
    batch, num_tokens, width_s, width_t = 2, 19, 12, 20
    spans, span_mask = word_spans(batch, num_tokens)
    teacher = torch.randn(batch, num_tokens, width_t, device=device)
    attention_mask = torch.ones(batch, num_tokens, dtype=torch.long, device=device)
    attention_mask[1, -4:] = 0
    inputs = (spans.to(device), span_mask.to(device))

    def run(step):
        student = torch.randn(
            batch,
            num_tokens,
            width_s,
            device=device,
            generator=torch.Generator(device).manual_seed(seed),
        )
        student.requires_grad_()
        projector = torch.eye(width_s, width_t, device=device, requires_grad=True)
        loss = step(student, teacher, projector, attention_mask, *inputs)
        loss.backward()
        return loss.detach(), student.grad, projector.grad

    eager = run(mta_step)
    compiled = run(torch.compile(mta_step, fullgraph=True, dynamic=False))
    for got, expected in zip(compiled, eager, strict=True):
        assert rel_error(got, expected) < 1e-5, f"seed={seed}"


def test_prefer_reference_inside_a_compiled_function():
    torch._dynamo.reset()
    hidden = torch.randn(2, 7, 6)
    mask = torch.ones(2, 7, dtype=torch.long)

    @torch.compile(fullgraph=True)
    def weights(h):
        return mk.token_importance(h, mask)

    with mk.prefer_reference():
        got = weights(hidden)
    assert rel_error(got, mk.reference.token_importance(hidden.double(), mask)) < 1e-5
