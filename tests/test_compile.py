"""The fused ops compose with ``torch.compile(fullgraph=True)``: each kernel launch is a
registered ``torch.library`` custom op with a fake (meta) implementation, and the backward of
each ``autograd.Function`` calls custom ops too, so Dynamo traces a training step without a
graph break and AOTAutograd differentiates through it."""

import pytest
import torch
from helpers import random_spans, rel_error, word_spans

import mta_kernels as mk
from mta.layers import LayerPair
from mta.loss import MTALoss
from mta.unit_plan import UnitPlan

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


# (B, T, phrase units K): five batches of the kind a data loader yields — every T and K new,
# and B changing too (the last batch of an epoch). B = 1 is left out: PyTorch specializes sizes
# 0 and 1, so a batch of one example compiles once more by design.
SHAPES = ((2, 16, 5), (2, 23, 7), (3, 31, 4), (2, 12, 8), (3, 40, 6))


def _plan_batch(batch: int, num_tokens: int, phrases: int, seed: int) -> tuple:
    """Hidden states and the collated UnitPlan of one batch (word units tiling each sequence,
    phrase units random and overlapping, some padding tokens)."""
    gen = torch.Generator().manual_seed(seed)
    attention = torch.ones(batch, num_tokens, dtype=torch.long)
    attention[-1, -3:] = 0
    word, word_mask = word_spans(batch, num_tokens, gen)
    phrase, phrase_mask = random_spans(batch, phrases, num_tokens, gen)
    plan = UnitPlan.from_batch(
        {
            "attention_mask": attention,
            "word_student_spans": word,
            "word_span_mask": word_mask,
            "phrase_student_spans": phrase,
            "phrase_span_mask": phrase_mask,
        }
    )
    student = [torch.randn(batch, num_tokens, 20, generator=gen) for _ in range(4)]
    teacher = [torch.randn(batch, num_tokens, 28, generator=gen) for _ in range(7)]
    return student, teacher, plan


@pytest.mark.parametrize("variant", ["paper", "authors_code"])
def test_mta_step_compiles_once_across_batch_shapes(variant):
    """``torch.compile(dynamic=True, fullgraph=True)`` of MTALoss forward + backward traces one
    graph for batches of different B, T and K (sizes are symbols; nothing in the step reads a
    size as a Python constant or breaks the graph), and every batch matches the eager module."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.backends.debugging.aot_eager(graph, example_inputs)

    pairs = (LayerPair(1, 2, "word"), LayerPair(2, 4, "phrase"), LayerPair(3, 6, "phrase"))
    # widths: d_S + d_T > K (one structural backward), and no T of the batches (duck sizing)
    module = MTALoss(20, 28, pairs, variant=variant)

    def step(student, teacher, plan):
        return module(student, teacher, plan).loss

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend=counting_backend)
    for i, shape in enumerate(SHAPES):
        results = []
        for run in (step, compiled):
            student, teacher, plan = _plan_batch(*shape, seed=i)
            student = [s.requires_grad_() for s in student]
            module.zero_grad(set_to_none=True)
            loss = run(student, teacher, plan)
            loss.backward()
            grads = [student[p.student_layer].grad for p in pairs]
            results.append((loss.detach(), *grads, *(w.grad for w in module.parameters())))
        for got, expected in zip(results[1], results[0], strict=True):
            assert rel_error(got, expected) < 1e-6, f"batch shape {shape}"
    assert len(graphs) == 1, f"{len(graphs)} graphs for {len(SHAPES)} batch shapes"
