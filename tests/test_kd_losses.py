"""Base distillation losses: every kind against a float64 formula, gradients, chunking, masking."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from mta.kd_losses import (
    KINDS,
    LIGER_KINDS,
    distillation_loss,
    fused_linear_distillation_loss,
    liger_available,
)

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


# ---- fused LM head ----------------------------------------------------------------------

D_S, D_T = 8, 12
BACKEND_CASES = [(k, "torch") for k in KINDS] + [(k, "liger") for k in LIGER_KINDS]
requires_liger = pytest.mark.skipif(not liger_available(), reason="needs liger-kernel")


# Liger's kernels compute -inf - -inf in masked lanes of the Triton interpreter (discarded).
interpreter_nan_lanes = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")


def _backend_param(kind: str, backend: str):
    marks = [requires_liger, interpreter_nan_lanes] if backend == "liger" else []
    return pytest.param(kind, backend, marks=marks, id=f"{kind}-{backend}")


def _heads(seed: int, dtype=torch.float32, vocab=V, teacher_vocab=None, bias=True, length=T):
    """Hidden states [B, T, d] and LM heads of a student (with grads) and a teacher (without)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, length, D_S, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, D_S, generator=gen, dtype=dtype) / 2).requires_grad_()
    bias_ = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_() if bias else None
    teacher_hidden = torch.randn(B, length, D_T, generator=gen, dtype=dtype)
    teacher_weight = torch.randn(teacher_vocab or vocab, D_T, generator=gen, dtype=dtype) / 2
    labels = torch.randint(0, vocab, (B, length), generator=gen)
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return hidden, weight, bias_, teacher_hidden, teacher_weight, labels


@pytest.mark.parametrize(("kind", "backend"), [_backend_param(*c) for c in BACKEND_CASES])
def test_fused_linear_matches_float64_formula(kind: str, backend: str) -> None:
    """Value and gradients (hidden, weight, bias) vs autograd on the float64 formula applied to
    the float64 logits. fp32 logits of size ~5 from 8-term dot products carry ~1e-6 relative
    error, hence rtol 2e-5 / atol 2e-6; chunk_size=3 forces a partial last chunk."""
    bias = backend == "torch"
    hidden, weight, bias_, teacher_hidden, teacher_weight, labels = _heads(7, bias=bias)
    loss = fused_linear_distillation_loss(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        labels,
        kind,
        temperature=2.5,
        chunk_size=3,
        student_bias=bias_,
        backend=backend,
    )
    params = [t for t in (hidden, weight, bias_) if t is not None]
    grads = torch.autograd.grad(loss, params)
    params64 = [t.detach().double().requires_grad_() for t in params]
    logits64 = F.linear(*params64)
    ref = _reference(
        logits64, F.linear(teacher_hidden.double(), teacher_weight.double()), labels, kind, 2.5
    )
    ref_grads = torch.autograd.grad(ref, params64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_gradcheck_float64(kind: str) -> None:
    """Finite differences through the fused Function (hidden, weight and bias need grad)."""
    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _heads(
        11, dtype=torch.float64, vocab=5, length=4
    )

    def fn(h, w, b):
        return fused_linear_distillation_loss(
            h,
            w,
            teacher_hidden,
            teacher_weight,
            labels,
            kind,
            temperature=1.7,
            skew_alpha=0.3,
            chunk_size=2,
            student_bias=b,
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(("kind", "backend"), [_backend_param(*c) for c in BACKEND_CASES])
def test_fused_linear_equals_logits_path_under_bf16_autocast(kind: str, backend: str) -> None:
    """Under bf16 autocast the heads run in bf16 like ``nn.Linear`` would, on the same rows, so
    the value equals the logits path's to fp32 summation order (rtol 1e-5) while the float32
    value differs by the bf16 rounding (asserted 10x larger, so an fp32 matmul would fail). The
    gradients are float32; a chunk's bf16 weight-gradient product is rounded before the float32
    sum over chunks where the logits path rounds once (atol 2e-3: ~2^-8 of entries of size ~0.2).
    """
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _heads(13, bias=False, length=16)
    results = []
    for fused, autocast in ((True, True), (False, True), (False, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = fused_linear_distillation_loss(
                    hidden,
                    weight,
                    teacher_hidden,
                    teacher_weight,
                    labels,
                    kind,
                    chunk_size=5,
                    backend=backend,
                )
            else:
                loss = distillation_loss(
                    F.linear(hidden, weight), F.linear(teacher_hidden, teacher_weight), labels, kind
                )
        results.append((loss, torch.autograd.grad(loss, (hidden, weight))))
    (fused_loss, fused_grads), (loss, grads), (fp32_loss, _) = results
    assert fused_loss.dtype == torch.float32
    assert [g.dtype for g in fused_grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-7)
    assert (fused_loss - fp32_loss).abs() > 10 * (fused_loss - loss).abs()
    for fused_grad, grad in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(fused_grad, grad, rtol=0, atol=2e-3)


def test_fused_linear_truncates_a_padded_vocabulary_and_scales_with_grad_output() -> None:
    """A teacher head padded to 16 rows: vocab_size=11 uses the first 11 rows of both heads (the
    padded rows get zero gradient); ``3 · loss`` backpropagates 3× the gradients."""
    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _heads(
        17, vocab=13, teacher_vocab=16
    )
    with pytest.raises(ValueError, match=r"vocabulary size 13 .* has 16"):
        fused_linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels)
    loss = fused_linear_distillation_loss(
        hidden, weight, teacher_hidden, teacher_weight, labels, vocab_size=V, student_bias=bias
    )
    grads = torch.autograd.grad(3 * loss, (hidden, weight, bias))
    expected = distillation_loss(
        F.linear(hidden, weight[:V], bias[:V]), F.linear(teacher_hidden, teacher_weight[:V]), labels
    )
    expected_grads = torch.autograd.grad(3 * expected, (hidden, weight, bias))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert weight.shape[0] > V and grads[1][V:].abs().max() == 0


@pytest.mark.parametrize(("kind", "backend"), [_backend_param(*c) for c in BACKEND_CASES])
def test_fused_linear_no_response_token_gives_zero(kind: str, backend: str) -> None:
    """0 and zero gradients (no row to project: both backends return before any kernel)."""
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _heads(19, bias=False)
    labels.fill_(-100)
    loss = fused_linear_distillation_loss(
        hidden, weight, teacher_hidden, teacher_weight, labels, kind, backend=backend
    )
    grads = torch.autograd.grad(loss, (hidden, weight), allow_unused=True, materialize_grads=True)
    assert loss.item() == 0.0 and all(g.abs().max() == 0 for g in grads)


def test_fused_linear_saves_no_logits() -> None:
    """Autograd keeps only the three precomputed gradients: the gathered response rows' hidden
    gradient [N, d_S], the weight gradient [V, d_S] and the bias gradient [V] — nothing [N, V]."""
    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _heads(23, vocab=64, length=32)
    n_rows = int((labels[:, 1:] != -100).sum())
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_linear_distillation_loss(
            hidden,
            weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=bias,
            chunk_size=8,
            backend="torch",
        )
    gc.collect()
    alive = {tuple(t.shape) for ref in saved if (t := ref()) is not None}
    assert {(n_rows, D_S), (64, D_S), (64,)} <= alive
    assert not any(len(shape) == 2 and shape[1] == 64 and shape[0] != 64 for shape in alive)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize(("kind", "backend"), [_backend_param(*c) for c in BACKEND_CASES])
def test_fused_linear_no_grad_path_matches(kind: str, backend: str) -> None:
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _heads(27, bias=False)
    args = (hidden, weight, teacher_hidden, teacher_weight, labels, kind)
    with_grad = fused_linear_distillation_loss(*args, backend=backend, chunk_size=4)
    with torch.no_grad():
        without = fused_linear_distillation_loss(*args, backend=backend, chunk_size=4)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=1e-7)


def test_fused_linear_auto_takes_torch_on_cpu() -> None:
    """``auto`` uses Liger only on CUDA: on CPU it is the torch path, bit for bit."""
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _heads(29, bias=False)
    args = (hidden, weight, teacher_hidden, teacher_weight, labels, "jsd")
    auto = fused_linear_distillation_loss(*args, backend="auto")
    torch.testing.assert_close(
        auto, fused_linear_distillation_loss(*args, backend="torch"), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(backend="triton"), ValueError, "backend must be one of"),
        (
            dict(kind="tvd", backend="liger"),
            ValueError,
            "backend='liger' cannot run.*no kind='tvd'",
        ),
        (dict(student_bias=torch.zeros(V), backend="liger"), ValueError, "takes no LM-head bias"),
        (
            dict(student_bias=torch.zeros(V + 1)),
            ValueError,
            r"student_bias must be None or a \[V\]",
        ),
        (
            dict(student_weight=torch.zeros(V, D_S + 1)),
            ValueError,
            "student_weight must have shape",
        ),
        (
            dict(teacher_weight=torch.zeros(V, D_T + 1)),
            ValueError,
            "teacher_weight must have shape",
        ),
        (dict(teacher_hidden=torch.zeros(B, T + 1, D_T)), ValueError, "teacher_hidden must have"),
        (dict(teacher_hidden=None), ValueError, "kind='fkl' needs teacher_hidden"),
        (dict(student_hidden=torch.zeros(B * T, D_S)), ValueError, r"\[B, T, d_S\]"),
        (
            dict(teacher_weight=torch.zeros(V, D_T, requires_grad=True)),
            ValueError,
            "teacher is constant",
        ),
        (dict(labels=torch.zeros(B, T)), TypeError, "labels must be an integer tensor"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    ],
)
def test_fused_linear_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _heads(31, bias=False)
    args = dict(
        student_hidden=hidden,
        student_weight=weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        labels=labels,
    )
    with pytest.raises(error, match=match):
        fused_linear_distillation_loss(**(args | kwargs))


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


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize(("kind", "backend"), [_backend_param(*c) for c in BACKEND_CASES])
def test_cuda_fused_linear_bf16_matches_logits_path(kind: str, backend: str) -> None:
    """bf16 heads on CUDA: the fused loss equals the logits path on the same device (both run the
    bf16 matmul; rtol 2e-2 covers a chunk's vs the whole batch's bf16 GEMM rounding)."""
    hidden, weight, _, teacher_hidden, teacher_weight, labels = _heads(37, bias=False, length=64)
    s_h, s_w = (t.detach().cuda().bfloat16().requires_grad_() for t in (hidden, weight))
    t_h, t_w, labels = (
        teacher_hidden.cuda().bfloat16(),
        teacher_weight.cuda().bfloat16(),
        labels.cuda(),
    )
    fused = fused_linear_distillation_loss(
        s_h, s_w, t_h, t_w, labels, kind, chunk_size=16, backend=backend
    )
    fused_grads = torch.autograd.grad(fused, (s_h, s_w))
    plain = distillation_loss(F.linear(s_h, s_w), F.linear(t_h, t_w), labels, kind)
    grads = torch.autograd.grad(plain, (s_h, s_w))
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=1e-3)
    for fused_grad, grad in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(fused_grad.float(), grad.float(), rtol=5e-2, atol=5e-3)
