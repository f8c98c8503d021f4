"""``MTALoss(variant="authors_code")`` against an independent statement of the released loss
(tests/release_port.py)."""

import copy
import itertools

import pytest
import release_port
import torch

import mta_kernels as mk
from mta.loss import MTALoss

B, T, D_S, D_T = 3, 16, 12, 20
PAIRS = [(2, 4, "word"), (3, 6, "phrase"), (4, 8, "phrase")]  # the released 1 word + 2 phrase


def _batch(padded: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = [T, T - 5, T - 9] if padded else [T] * B
    mask = torch.zeros(B, T, dtype=torch.long)
    batch: dict[str, torch.Tensor] = {}
    words, phrases = [], []
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
        cuts = sorted(torch.randperm(length - 1, generator=gen)[: length // 3].add(1).tolist())
        bounds = [0, *cuts, length]
        words.append(list(itertools.pairwise(bounds)))
        # overlapping phrases, one inside another, and a repeated word
        phrases.append([(0, length // 2), (length // 3, length), (1, 3), (0, length // 2)])
    for name, units in (("word", words), ("phrase", phrases)):
        width = max(len(u) for u in units) + 1  # one padding unit at least
        spans = torch.zeros(B, width, 2, dtype=torch.long)
        valid = torch.zeros(B, width, dtype=torch.bool)
        for b, example in enumerate(units):
            spans[b, : len(example)] = torch.tensor(example)
            valid[b, : len(example)] = True
        valid[1, 0] = False  # an invalid unit inside the list
        if name == "phrase":
            valid[2] = False  # an example without units: no part in either batch total
        batch[f"{name}_student_spans"] = batch[f"{name}_teacher_spans"] = spans
        batch[f"{name}_span_mask"] = valid
    batch["attention_mask"] = mask
    return batch


def _states(gen: torch.Generator, padded: bool):
    student = [(torch.randn(B, T, D_S, generator=gen) * 2 + 0.5).requires_grad_() for _ in range(5)]
    teacher = [torch.randn(B, T, D_T, generator=gen) * 2 - 0.3 for _ in range(9)]
    return student, teacher


def _release(module: MTALoss, student, teacher, batch):
    layers = [(s, t, batch[f"{g}_student_spans"], batch[f"{g}_span_mask"]) for s, t, g in PAIRS]
    projectors = {int(k): v for k, v in module.projectors.items()}
    return release_port.mta_loss(student, teacher, batch["attention_mask"], layers, projectors)


@pytest.mark.kernels  # also run on the GPU by benchmarks/gpu_check.sh (the fused path there)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("ops", ["dispatch", "reference"])
def test_matches_the_released_loss(padded: bool, ops: str, device: str) -> None:
    """Value within 1e-5 and student/projector gradients within 1e-4 (relative, fp32 in other
    orders of summation), each term too, with the default λs reproducing ``w_span = 2.0``.
    ``dispatch``: the fused kernels (on CUDA, or the interpreter on CPU); ``reference``: the
    eager ops on CPU. Padding rows are queries of the token weights in both, so padded batches
    match as well."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    module = MTALoss(D_S, D_T, PAIRS, variant="authors_code")
    batch = _batch(padded, gen)
    student, teacher = _states(gen, padded)
    expected, terms = _release(module, student, teacher, batch)
    wrt = [student[2], student[3], student[4], *module.parameters()]
    expected_grads = torch.autograd.grad(expected, wrt)
    if ops == "reference":
        with mk.prefer_reference():
            out = module(student, teacher, batch)
        grads = torch.autograd.grad(out.loss, wrt)
    else:
        on_device = copy.deepcopy(module).to(device)
        states = [s.detach().to(device).requires_grad_() for s in student]
        out = on_device(
            states, [t.to(device) for t in teacher], {k: v.to(device) for k, v in batch.items()}
        )
        grads = [
            g.cpu()
            for g in torch.autograd.grad(
                out.loss, [states[2], states[3], states[4], *on_device.parameters()]
            )
        ]
    torch.testing.assert_close(out.loss.cpu(), expected, rtol=1e-5, atol=0)
    for (s, t, _), (dsa, hra) in zip(PAIRS, terms, strict=True):
        for name, value in ((f"dsa/{s}-{t}", dsa), (f"hra/{s}-{t}", hra)):
            torch.testing.assert_close(
                out.components[name].cpu(), value.detach(), rtol=1e-5, atol=0
            )
    for grad, want in zip(grads, expected_grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_projectors_and_combination_are_the_released_ones() -> None:
    module = MTALoss(D_S, D_T, PAIRS, variant="authors_code")
    assert sorted(module.state_dict()) == [
        f"projectors.{s}.{p}" for s in (2, 3, 4) for p in ("bias", "weight")
    ]
    # loss = 2.0 · mean DSA + 0.2 · mean HRA = w_span · (1/3) Σ (DSA + HRA / 10)
    torch.testing.assert_close(
        module.combine[0], torch.tensor([2.0 / 3] * 3 + [0.2 / 3] * 3), rtol=1e-7, atol=0
    )


def test_a_batch_without_units_is_zero_not_an_error() -> None:
    """The release fails on a batch with no unit; the variant gives 0 and zero gradients."""
    gen = torch.Generator().manual_seed(3)
    batch = _batch(False, gen)
    for g in ("word", "phrase"):
        batch[f"{g}_span_mask"] = torch.zeros_like(batch[f"{g}_span_mask"])
    student, teacher = _states(gen, False)
    module = MTALoss(D_S, D_T, PAIRS, variant="authors_code")
    out = module(student, teacher, batch)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(s.grad is None or (s.grad == 0).all() for s in student)


@pytest.mark.parametrize(("use_dsa", "use_hra"), [(True, False), (False, True)])
def test_ablations_keep_the_other_term_as_released(use_dsa: bool, use_hra: bool) -> None:
    """DSA alone or HRA alone (the release's dsa/hs ablations): the kept term as in the full
    variant, the loss its weighted mean over pairs."""
    gen = torch.Generator().manual_seed(5)
    batch = _batch(True, gen)
    student, teacher = _states(gen, True)
    torch.manual_seed(5)
    full = MTALoss(D_S, D_T, PAIRS, variant="authors_code")
    ablated = MTALoss(D_S, D_T, PAIRS, variant="authors_code", use_dsa=use_dsa, use_hra=use_hra)
    ablated.load_state_dict(full.state_dict() if use_hra else {})
    expected = full(student, teacher, batch).components
    out = ablated(student, teacher, batch)
    kept, weight = ("dsa", 2.0) if use_dsa else ("hra", 0.2)
    torch.testing.assert_close(out.components[kept], expected[kept], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, weight * expected[kept], rtol=1e-6, atol=0)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        MTALoss(D_S, D_T, PAIRS, variant="released")
    with pytest.raises(ValueError, match="uses the cosine metric"):
        MTALoss(D_S, D_T, PAIRS, variant="authors_code", metric="euclidean")
