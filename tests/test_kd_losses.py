"""Base distillation losses: every kind against a float64 formula, gradients, chunking, masking."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from mta.kd_losses import KINDS, distillation_loss

DIVERGENCES = [k for k in KINDS if k != "ce"]
B, T, V = 2, 7, 11


def _reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Float64 definition on probabilities (not log space), differentiable by autograd."""
    s, t = student.double()[:, :-1], teacher.double()[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    if kind == "ce":
        log_q = s - s.exp().sum(-1, keepdim=True).log()
        per_token = -log_q.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    else:
        q = (s / temperature).exp()
        q = q / q.sum(-1, keepdim=True)
        p = (t / temperature).exp()
        p = p / p.sum(-1, keepdim=True)

        def kl(a, b):
            return (a * (a / b).log()).sum(-1)

        per_token = {
            "fkl": lambda: kl(p, q),
            "rkl": lambda: kl(q, p),
            "jsd": lambda: 0.5 * kl(p, (p + q) / 2) + 0.5 * kl(q, (p + q) / 2),
            "skew_fkl": lambda: kl(p, alpha * p + (1 - alpha) * q),
            "skew_rkl": lambda: kl(q, alpha * q + (1 - alpha) * p),
            "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
        }[kind]() * temperature**2
    return (per_token * keep).sum() / keep.sum().clamp_min(1)


def _reference_and_grad(student, teacher, labels, kind, temperature=1.0):
    """``_reference`` and its float64 gradient with respect to ``student``."""
    s64 = student.detach().double().requires_grad_()
    ref = _reference(s64, teacher, labels, kind, temperature)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    return ref, ref_grad


def _inputs(seed: int, dtype=torch.float32, batch=B, length=T, vocab=V, teacher_vocab=None):
    gen = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, length, vocab, generator=gen)).to(dtype)
    teacher = (2 * torch.randn(batch, length, teacher_vocab or vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return student.requires_grad_(), teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_value_and_grad_match_float64_formula(kind: str, temperature: float) -> None:
    """fp32 chunked loss and its gradient vs autograd on the float64 formula.

    Tolerance rtol=1e-5/atol=1e-6: float32 log-softmax over 11 logits of size ~6 is exact to a few
    ulps (~1e-7 relative); chunk_size=3 forces several chunks and a partial last one.
    """
    student, teacher, labels = _inputs(seed=len(kind) + int(10 * temperature))
    loss = distillation_loss(student, teacher, labels, kind, temperature, chunk_size=3)
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = _reference_and_grad(student, teacher, labels, kind, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64_student_and_teacher(kind: str) -> None:
    """Finite differences through the custom autograd Function (both inputs need grad)."""
    student, teacher, labels = _inputs(seed=3, dtype=torch.float64, batch=2, length=4, vocab=5)
    labels[0, :3] = 2  # keep 5 of the 6 predicted positions
    teacher.requires_grad_(kind != "ce")
    inputs = (student, teacher)

    def fn(s, t):
        return distillation_loss(s, t, labels, kind, temperature=1.7, skew_alpha=0.3, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind: str) -> None:
    """chunk_size 1 and one chunk give the same value and gradients up to fp32 summation order."""
    student, teacher, labels = _inputs(seed=7, length=9)
    teacher.requires_grad_()
    results = []
    for chunk_size in (1, 4, None):
        loss = distillation_loss(student, teacher, labels, kind, chunk_size=chunk_size)
        grads = torch.autograd.grad(loss, (student, teacher), allow_unused=True)
        results.append((loss, grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        for grad, first in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(grad, first, rtol=1e-6, atol=1e-8)
    if kind == "ce":  # the teacher is unused
        assert results[0][1][1] is None


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_temperature_scaling(kind: str) -> None:
    """loss(z, τ) = τ² · loss(z / τ, 1) (the T² convention)."""
    student, teacher, labels = _inputs(seed=11)
    tau = 3.0
    hot = distillation_loss(student, teacher, labels, kind, temperature=tau)
    cold = distillation_loss(student / tau, teacher / tau, labels, kind, temperature=1.0)
    torch.testing.assert_close(hot, tau**2 * cold, rtol=1e-5, atol=1e-7)


def test_ce_matches_torch_and_ignores_teacher_and_temperature() -> None:
    student, teacher, labels = _inputs(seed=5)
    expected = F.cross_entropy(student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    for teacher_arg, temperature in ((None, 1.0), (teacher, 4.0)):
        loss = distillation_loss(student, teacher_arg, labels, "ce", temperature=temperature)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_positions_have_no_effect(kind: str) -> None:
    """Logits at prompt/padding positions (and the last position) get exactly zero gradient."""
    student, teacher, labels = _inputs(seed=13)
    labels[labels == -100] = -1
    loss = distillation_loss(student, teacher, labels, kind, ignore_index=-1)
    (grad,) = torch.autograd.grad(loss, student)
    unused = torch.ones(B, T, dtype=torch.bool)
    unused[:, :-1] = labels[:, 1:] == -1
    assert grad[unused].abs().max() == 0
    assert grad[~unused].abs().amax(-1).min() > 0
    perturbed = student.detach().clone()
    perturbed[unused] += 5 * torch.randn_like(perturbed[unused])
    torch.testing.assert_close(
        distillation_loss(perturbed, teacher, labels, kind, ignore_index=-1), loss
    )


@pytest.mark.parametrize("kind", KINDS)
def test_no_response_token_gives_zero(kind: str) -> None:
    student, teacher, labels = _inputs(seed=17)
    labels.fill_(-100)
    labels[:, 0] = 3  # position 0 is never predicted
    loss = distillation_loss(student, teacher, labels, kind)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0
    assert grad.abs().max() == 0


@pytest.mark.parametrize("kind", ["fkl", "ce"])
def test_sum_reduction_and_grad_output_scaling(kind: str) -> None:
    student, teacher, labels = _inputs(seed=19)
    n_tokens = int((labels[:, 1:] != -100).sum())
    mean = distillation_loss(student, teacher, labels, kind)
    total = distillation_loss(student, teacher, labels, kind, reduction="sum")
    torch.testing.assert_close(total, n_tokens * mean)
    (grad_mean,) = torch.autograd.grad(mean, student, retain_graph=True)
    (grad_scaled,) = torch.autograd.grad(3 * mean, student)  # backward honours grad_output
    torch.testing.assert_close(grad_scaled, 3 * grad_mean)


def test_no_grad_path_matches() -> None:
    student, teacher, labels = _inputs(seed=23)
    with_grad = distillation_loss(student, teacher, labels, "jsd", chunk_size=2)
    with torch.no_grad():
        without = distillation_loss(student, teacher, labels, "jsd", chunk_size=2)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_bf16_logits() -> None:
    """bf16 in: computed in fp32 on the bf16 values (rtol 1e-5); grad is bf16 (rounding 2^-8)."""
    student, teacher, labels = _inputs(seed=29, dtype=torch.bfloat16)
    loss = distillation_loss(student, teacher, labels, "skew_rkl")
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = _reference_and_grad(student, teacher, labels, "skew_rkl")
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=8e-3, atol=1e-5)


def test_no_full_vocab_float32_buffer_is_saved() -> None:
    """After the forward autograd holds only the logits-gradient buffer (bf16 here): no [N, V]
    float32 log-probabilities of either model survive the chunk loop."""
    student, teacher, labels = _inputs(seed=31, dtype=torch.bfloat16, length=32, vocab=64)
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = distillation_loss(student, teacher, labels, "fkl", chunk_size=8)
    gc.collect()
    alive = [t for ref in saved if (t := ref()) is not None]
    assert len(saved) > len(alive)  # the chunks' own graphs were saved, then freed
    assert [(t.shape, t.dtype) for t in alive] == [(torch.Size([B * 32, 64]), torch.bfloat16)]
    loss.backward()
    assert student.grad is not None


def test_vocab_size_truncates_padded_vocabulary() -> None:
    """A teacher padded to 16 entries: vocab_size=11 equals the loss on the first 11 logits."""
    student, teacher, labels = _inputs(seed=37, vocab=13, teacher_vocab=16)
    with pytest.raises(
        ValueError, match=r"vocabulary size 13 .* has 16.*vocab_size=len\(tokenizer\)"
    ):
        distillation_loss(student, teacher, labels, "fkl")
    loss = distillation_loss(student, teacher, labels, "fkl", vocab_size=V, chunk_size=3)
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = _reference_and_grad(student[..., :V], teacher[..., :V], labels, "fkl")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[..., :V].double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert grad[..., V:].abs().max() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(kind="kl"), ValueError, "kind must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(skew_alpha=1.0), ValueError, r"skew_alpha must be in \(0, 1\)"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(vocab_size=12), ValueError, "vocab_size=12 exceeds"),
        (dict(vocab_size=0), ValueError, "vocab_size must be a positive int"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(teacher_logits=None), ValueError, "kind='fkl' needs teacher_logits"),
        (dict(labels=torch.zeros(B, T)), TypeError, "labels must be an integer tensor"),
        (
            dict(labels=torch.zeros(B, T + 1, dtype=torch.long)),
            ValueError,
            "labels must have shape",
        ),
        (dict(teacher_logits=torch.zeros(B, T + 2, V)), ValueError, "different tokenizers"),
        (
            dict(student_logits=torch.zeros(B * T, V)),
            ValueError,
            r"student_logits must have shape \[B, T, V\]",
        ),
        (dict(student_logits=torch.zeros(B, T, V, dtype=torch.long)), TypeError, "floating"),
    ],
)
def test_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    student, teacher, labels = _inputs(seed=41)
    args = dict(student_logits=student, teacher_logits=teacher, labels=labels, kind="fkl")
    with pytest.raises(error, match=match):
        distillation_loss(**(args | kwargs))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_bf16_matches_cpu(kind: str) -> None:
    """Same bf16 logits on CUDA and CPU: both compute in fp32, so values agree to fp32 rounding
    (rtol 1e-5) and bf16 gradients to one bf16 ulp (rtol 8e-3)."""
    student, teacher, labels = _inputs(seed=43, dtype=torch.bfloat16, length=33, vocab=257)
    results = []
    for device in ("cpu", "cuda"):
        s = student.detach().to(device).requires_grad_()
        loss = distillation_loss(s, teacher.to(device), labels.to(device), kind, chunk_size=16)
        (grad,) = torch.autograd.grad(loss, s)
        results.append((loss.cpu(), grad.float().cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=8e-3, atol=1e-6)


@pytest.mark.cuda
@requires_cuda
def test_cuda_peak_memory_is_bounded_by_the_chunk() -> None:
    """Forward + backward allocate the bf16 logits gradient plus O(chunk · V) float32 work space,
    far below the 2 x [N, V] float32 log-probabilities (256 MiB here) an unchunked loss holds."""
    batch, length, vocab, chunk = 4, 256, 32768, 32
    student, teacher, labels = _inputs(
        seed=47, dtype=torch.bfloat16, batch=batch, length=length, vocab=vocab
    )
    student = student.detach().cuda().requires_grad_()
    teacher, labels = teacher.cuda(), labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = distillation_loss(student, teacher, labels, "skew_fkl", chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = student.numel() * student.element_size()
    assert extra <= grad_bytes + 24 * chunk * vocab * 4 + (8 << 20), extra
