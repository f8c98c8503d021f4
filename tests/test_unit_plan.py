"""mta.unit_plan: the batch's units, validated and prepared once where the batch is collated."""

from __future__ import annotations

import pickle

import pytest
import torch
from training_helpers import RECORDS, make_tokenizer, regex_units

import mta_kernels as mk
from benchmarks import launch_count
from mta.data import DistillationCollator, DistillationDataset, format_record, pad_token_id
from mta.layers import plan_layers
from mta.loss import MTALoss
from mta.unit_plan import PLAN_KEY, UnitPlan, coverage
from mta_kernels import reference as R


def _collated(cross: bool = False) -> dict:
    examples = [format_record(r) for r in RECORDS]
    texts = [e.text for e in examples]
    tok = make_tokenizer(texts, "bytelevel", 300)
    teacher_tok = make_tokenizer(texts, "metaspace", 340) if cross else None
    data = DistillationDataset(
        examples, tok, 96, teacher_tokenizer=teacher_tok, units=[regex_units(e) for e in examples]
    )
    collate = DistillationCollator(pad_token_id(tok), pad_token_id(teacher_tok) if cross else None)
    return collate([data[i] for i in range(len(data))])


def test_coverage_matches_membership() -> None:
    """Difference-array coverage counts equal the [B, K, T] membership definition (random
    overlapping spans, invalid spans with garbage values, empty spans, padding)."""
    gen = torch.Generator().manual_seed(4)
    batch, units, length = 3, 7, 13
    starts = torch.randint(0, length + 1, (batch, units), generator=gen)
    ends = torch.minimum(
        starts + torch.randint(0, 4, (batch, units), generator=gen), torch.tensor(length)
    )
    spans = torch.stack([starts, ends], dim=-1)
    valid = torch.rand(batch, units, generator=gen) < 0.7
    spans[~valid] = torch.tensor([99, -5])  # never read
    attention = (torch.rand(batch, length, generator=gen) < 0.8).long()
    member = R.span_membership(spans, valid, length)
    expected = member.sum(dim=1, dtype=torch.int32) * attention.to(torch.int32)
    got = coverage(mk.span_index(spans, valid, length), attention)
    assert got.dtype == torch.int32 and torch.equal(got, expected)
    assert (expected > 1).any()  # tokens in several units are counted once per unit


@pytest.mark.parametrize("cross", [False, True])
def test_collator_builds_the_plan(cross):
    batch = _collated(cross)
    plan = batch[PLAN_KEY]
    assert isinstance(plan, UnitPlan) and set(plan) == {"word", "phrase"}
    assert plan.cross_tokenizer == cross
    for g in ("word", "phrase"):
        units = plan[g]
        assert torch.equal(units.mask, batch[f"{g}_span_mask"])
        spans = torch.stack([units.student.starts, units.student.ends], dim=-1)
        assert torch.equal(
            spans, torch.where(units.mask[..., None], batch[f"{g}_student_spans"], 0)
        )
        assert (units.teacher is units.student) == (not cross)
        assert units.coverage.shape == batch["attention_mask"].shape
    assert (
        pickle.loads(pickle.dumps(plan))["word"].student.num_tokens
        == plan["word"].student.num_tokens
    )


def test_missing_granularity_is_named():
    batch = _collated()
    plan = UnitPlan.from_batch({k: v for k, v in batch.items() if not k.startswith("phrase")})
    with pytest.raises(ValueError, match=r"the batch has no phrase units .* it has: \['word'\]"):
        plan["phrase"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: b.pop("attention_mask"), ValueError, "batch is missing 'attention_mask'"),
        (
            lambda b: b["word_student_spans"].__setitem__((0, 0), torch.tensor([0, 999])),
            ValueError,
            r"batch\['word_student_spans'\]: spans\[0, 0\] = \[0, 999\] is outside",
        ),
        (
            lambda b: b.__setitem__("word_span_mask", b["word_span_mask"].long()),
            TypeError,
            r"batch\['word_student_spans'\]: span_mask must be a bool tensor",
        ),
        (
            lambda b: b.__setitem__("phrase_student_spans", b["phrase_student_spans"][:1]),
            ValueError,
            r"batch\['phrase_student_spans'\]: holds 1 examples where the attention mask has \d",
        ),
        (lambda b: b.pop("word_span_mask"), ValueError, "batch is missing 'word_span_mask'"),
    ],
)
def test_bad_batches_get_clear_errors(change, error, match):
    batch = {k: v for k, v in _collated().items() if k != PLAN_KEY}
    change(batch)
    with pytest.raises(error, match=match):
        UnitPlan.from_batch(batch)


def test_teacher_spans_are_checked_against_teacher_tokens():
    batch = {k: v for k, v in _collated(cross=True).items() if k != PLAN_KEY}
    t = batch["teacher_attention_mask"].shape[1]
    batch["word_teacher_spans"][1, 0] = torch.tensor([0, t + 1])
    with pytest.raises(ValueError, match=rf"'word_teacher_spans'\]: spans\[1, 0\] .* T={t}\]"):
        UnitPlan.from_batch(batch)


@pytest.mark.parametrize("cross", [False, True])
def test_loss_on_the_plan_equals_the_loss_on_the_keys(cross):
    """The collator's plan and a plan MTALoss builds from the keys give the same loss and
    gradients, bit for bit (eager reference ops)."""
    batch = _collated(cross)
    keys = {k: v for k, v in batch.items() if k != PLAN_KEY}
    torch.manual_seed(0)
    size, tok_len = keys["attention_mask"].shape
    t_len = keys["teacher_attention_mask"].shape[1] if cross else tok_len
    pairs = plan_layers(2, 4, num_key_layers=2)
    module = MTALoss(16, 24, pairs)
    student = [torch.randn(size, tok_len, 16, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(size, t_len, 24) for _ in range(5)]
    results = []
    with mk.prefer_reference():
        for source in (batch, keys, batch[PLAN_KEY]):
            out = module(student, teacher, source)
            grads = torch.autograd.grad(out.loss, student[1:])
            results.append((out.loss.detach(), grads))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1], strict=True))
    assert results[0][0] > 0


def test_plan_moves_to_a_device():
    batch = _collated()
    plan = batch[PLAN_KEY].to("meta")
    assert plan.device.type == "meta" and plan["word"].coverage.device.type == "meta"
    assert plan["word"].student.num_tokens == batch[PLAN_KEY]["word"].student.num_tokens


def test_the_step_on_a_plan_reads_nothing_back(monkeypatch):
    """MTALoss forward + backward on a collated plan: no host synchronization, no copy from the
    host (the counts of benchmarks/launch_count, fused ops)."""
    monkeypatch.setattr(mk._switches.SWITCHES, "poison_outputs", False)
    counts = launch_count.count_step(
        "fused", torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    assert not counts.syncs and not counts.host_to_device
    assert counts.triton  # the fused path ran


@pytest.mark.cuda
def test_cuda_plan_from_pinned_memory():
    plan = _collated()[PLAN_KEY].pin_memory().to("cuda", non_blocking=True)
    assert plan.device.type == "cuda" and plan["phrase"].teacher.k_lo.is_cuda
