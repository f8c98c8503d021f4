"""MTALoss: equality with a hand-composed computation from mk.reference, gradients, ablations,
the cross-tokenizer path, precision and errors."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import backward_bound, rel_error, tolerances

import mta_kernels as mk
from mta.layers import LayerPair, plan_layers
from mta.loss import MTALoss

R = mk.reference
B, T, T_TEACHER, D_S, D_T, N_S, N_T = 2, 10, 12, 6, 10, 4, 8
PAIRS = plan_layers(N_S, N_T, num_key_layers=2)  # 2->4 word, 4->8 phrase
# Same units in both tokenizations (index k); (0, 0) + mask False pads; word unit [4, 4) is empty.
SPANS = {
    "word": (
        [
            [[0, 1], [1, 3], [3, 4], [4, 4], [5, 8], [8, 10]],
            [[0, 2], [2, 3], [3, 5], [5, 8], [0, 0], [0, 0]],
        ],
        [
            [[0, 2], [2, 4], [4, 5], [5, 6], [6, 9], [9, 12]],
            [[0, 1], [1, 3], [3, 6], [6, 9], [0, 0], [0, 0]],
        ],
        [[True] * 6, [True] * 4 + [False] * 2],
    ),
    "phrase": (
        [[[1, 4], [5, 10], [0, 0]], [[0, 3], [3, 8], [0, 0]]],
        [[[1, 5], [6, 12], [0, 0]], [[0, 3], [3, 9], [0, 0]]],
        [[True, True, False], [True, True, False]],
    ),
}


def _batch(cross: bool) -> dict[str, torch.Tensor]:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0  # padding of example 1
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": mask}
    for g, (student, teacher, valid) in SPANS.items():
        batch[f"{g}_student_spans"] = torch.tensor(student)
        batch[f"{g}_teacher_spans"] = torch.tensor(teacher if cross else student)
        batch[f"{g}_span_mask"] = torch.tensor(valid)
    if cross:
        teacher_mask = torch.ones(B, T_TEACHER, dtype=torch.long)
        teacher_mask[1, 9:] = 0
        batch["teacher_input_ids"] = torch.zeros(B, T_TEACHER, dtype=torch.long)
        batch["teacher_attention_mask"] = teacher_mask
    return batch


def _states(cross: bool, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t_teacher = T_TEACHER if cross else T
    student = [
        torch.randn(B, T, D_S, generator=gen).to(dtype).requires_grad_() for _ in range(N_S + 1)
    ]
    teacher = [
        torch.randn(B, t_teacher, D_T, generator=gen).to(dtype).requires_grad_()
        for _ in range(N_T + 1)
    ]
    return student, teacher


@pytest.fixture
def reference_ops():
    """CPU tensors take the eager references. The wiring tests then run at eager speed even
    where conftest serves the fused ops through the slow Triton interpreter; the fused path of
    MTALoss is covered by the cosine cases of test_matches_hand_composed_reference (interpreter
    on CPU, Triton on CUDA) and by test_cuda_fused_ops_match_cpu_reference."""
    with mk.prefer_reference():
        yield


def _hand_composed(
    module: MTALoss, student, teacher, batch, cross: bool
) -> dict[str, torch.Tensor]:
    """docs/design.md §2 composed from mk.reference, with a [B, K, T] membership for c_t."""
    student_mask = batch["attention_mask"]
    teacher_mask = batch["teacher_attention_mask"] if cross else student_mask
    out = {}
    for pair in module.layer_pairs:
        g, key = pair.granularity, pair.name
        s_spans, t_spans, valid = (
            batch[f"{g}_{k}"] for k in ("student_spans", "teacher_spans", "span_mask")
        )
        h_s, h_t = student[pair.student_layer], teacher[pair.teacher_layer].detach()
        w = R.token_importance(h_t, teacher_mask)
        u_t = R.span_pool(h_t, t_spans, valid, w)
        u_s = R.span_pool(h_s, s_spans, valid, None if cross else w)
        p = R.span_weights(w, t_spans, valid)
        out[f"dsa/{key}"] = R.structural_loss(u_s, u_t, p, valid, module.metric)
        weight = module.projectors[str(pair.student_layer)].weight
        if cross:
            out[f"hra/{key}"] = R.hidden_alignment_loss(u_s @ weight.T, u_t, p, valid)
        else:
            covered = R.span_membership(s_spans, valid, T).any(dim=1) & student_mask.bool()
            out[f"hra/{key}"] = R.hidden_alignment_loss(h_s @ weight.T, h_t, w, covered)
    out["dsa"] = torch.stack([v for k, v in out.items() if k.startswith("dsa/")]).mean()
    out["hra"] = torch.stack([v for k, v in out.items() if k.startswith("hra/")]).sum()
    out["mta"] = module.lambda_dsa * out["dsa"] + module.lambda_hra * out["hra"]
    return out


@pytest.mark.parametrize(("metric", "ops"), [("cosine", "dispatch"), ("euclidean", "reference")])
@pytest.mark.parametrize("cross", [False, True], ids=["shared", "cross_tokenizer"])
def test_matches_hand_composed_reference(
    cross: bool, metric: str, ops: str, request: pytest.FixtureRequest
) -> None:
    """Loss, every component and the gradients (student states, projectors) equal the hand
    composition from mk.reference. ``dispatch`` runs the ops MTALoss gets from mta_kernels (fused
    under the interpreter or on CUDA): float32 in another reduction order, rtol 1e-5, atol 1e-7."""
    if ops == "reference":
        request.getfixturevalue("reference_ops")
    torch.manual_seed(1)
    module = MTALoss(D_S, D_T, PAIRS, lambda_dsa=1.5, lambda_hra=0.7, metric=metric)
    student, teacher = _states(cross)
    batch = _batch(cross)
    out = module(student, teacher, batch)
    expected = _hand_composed(module, student, teacher, batch, cross)
    assert set(out.components) == set(expected)
    for name, value in expected.items():
        assert out.components[name].requires_grad is False
        torch.testing.assert_close(out.components[name], value.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, expected["mta"], rtol=1e-5, atol=1e-7)
    wrt = [student[2], student[4], *module.parameters()]
    grads = torch.autograd.grad(out.loss, wrt)
    expected_grads = torch.autograd.grad(expected["mta"], wrt)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("cross", [False, True], ids=["shared", "cross_tokenizer"])
def test_backward_reaches_student_and_projectors_not_teacher(cross: bool) -> None:
    module = MTALoss(D_S, D_T, PAIRS)
    student, teacher = _states(cross, seed=2)
    out = module(student, teacher, _batch(cross))
    assert all(torch.isfinite(v) for v in out.components.values())
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(t.grad is None for t in teacher)
    for layer, hidden in enumerate(student):
        if layer in (2, 4):
            assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
            assert hidden.grad.abs().max() > 0
        else:
            assert hidden.grad is None
    for projector in module.projectors.values():
        assert projector.weight.grad is not None and projector.weight.grad.abs().max() > 0


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("cross", [False, True], ids=["shared", "cross_tokenizer"])
def test_bf16_projection(cross: bool) -> None:
    """``projection_dtype=torch.bfloat16``: the HRA terms equal the hand composition with the
    projection on bf16 operands and a bf16 output (rtol 1e-5: the same rounded values), the
    projectors stay float32 parameters with float32 gradients, and DSA is unchanged."""
    torch.manual_seed(4)
    exact = MTALoss(D_S, D_T, PAIRS)
    module = MTALoss(D_S, D_T, PAIRS, projection_dtype=torch.bfloat16)
    module.load_state_dict(exact.state_dict())
    student, teacher = _states(cross, seed=4)
    batch = _batch(cross)
    out, full = module(student, teacher, batch), exact(student, teacher, batch)
    student_mask = batch["attention_mask"]
    for pair in module.layer_pairs:
        g, key = pair.granularity, pair.name
        s_spans, t_spans, valid = (
            batch[f"{g}_{k}"] for k in ("student_spans", "teacher_spans", "span_mask")
        )
        h_s, h_t = student[pair.student_layer], teacher[pair.teacher_layer].detach()
        w = R.token_importance(h_t, batch["teacher_attention_mask"] if cross else student_mask)
        weight = module.projectors[str(pair.student_layer)].weight.bfloat16()
        if cross:
            u_s = R.span_pool(h_s, s_spans, valid, None)
            u_t = R.span_pool(h_t, t_spans, valid, w)
            p = R.span_weights(w, t_spans, valid)
            want = R.hidden_alignment_loss(u_s.bfloat16() @ weight.T, u_t, p, valid)
        else:
            covered = R.span_membership(s_spans, valid, T).any(dim=1) & student_mask.bool()
            want = R.hidden_alignment_loss(h_s.bfloat16() @ weight.T, h_t, w, covered)
        torch.testing.assert_close(out.components[f"hra/{key}"], want.detach(), rtol=1e-5, atol=0)
        assert out.components[f"hra/{key}"] != full.components[f"hra/{key}"]
        torch.testing.assert_close(out.components[f"dsa/{key}"], full.components[f"dsa/{key}"])
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-2, atol=0)
    out.loss.backward()
    for projector in module.projectors.values():
        assert projector.weight.dtype == projector.weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match=r"projection_dtype must be torch\.float32 or"):
        MTALoss(D_S, D_T, PAIRS, projection_dtype=torch.float16)


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("cross", [False, True], ids=["shared", "cross_tokenizer"])
@pytest.mark.parametrize(("use_dsa", "use_hra"), [(True, False), (False, True)])
def test_ablations(cross: bool, use_dsa: bool, use_hra: bool) -> None:
    student, teacher = _states(cross, seed=3)
    batch = _batch(cross)
    full = MTALoss(D_S, D_T, PAIRS)
    ablated = MTALoss(D_S, D_T, PAIRS, use_dsa=use_dsa, use_hra=use_hra)
    ablated.load_state_dict(full.state_dict() if use_hra else {})
    reference = full(student, teacher, batch).components
    out = ablated(student, teacher, batch)
    kept, dropped = ("dsa", "hra") if use_dsa else ("hra", "dsa")
    weight = ablated.lambda_dsa if use_dsa else ablated.lambda_hra
    assert not any(name.startswith(dropped) for name in out.components)
    assert len(ablated.projectors) == (len(PAIRS) if use_hra else 0)
    for name, value in out.components.items():
        if name != "mta":
            torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, weight * reference[kept], rtol=1e-6, atol=0)


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("cross", [False, True], ids=["shared", "cross_tokenizer"])
@pytest.mark.parametrize("num_units", [0, 3])
def test_batch_without_valid_units_gives_zero(cross: bool, num_units: int) -> None:
    """No valid unit (K = 0, or every unit masked): every term is 0, no NaN, zero gradients."""
    student, teacher = _states(cross, seed=8)
    batch = _batch(cross)
    for g in ("word", "phrase"):
        for key in ("student_spans", "teacher_spans"):
            batch[f"{g}_{key}"] = torch.zeros(B, num_units, 2, dtype=torch.long)
        batch[f"{g}_span_mask"] = torch.zeros(B, num_units, dtype=torch.bool)
    out = MTALoss(D_S, D_T, PAIRS)(student, teacher, batch)
    assert all(value.item() == 0.0 for value in out.components.values())
    out.loss.backward()
    assert student[2].grad.abs().max() == 0 and student[4].grad.abs().max() == 0


@pytest.mark.usefixtures("reference_ops")
def test_teacher_importance_computed_once_per_teacher_layer(monkeypatch) -> None:
    """One call for all the distinct teacher layers (4 and 8), each once."""
    calls: list[list[int]] = []
    original = mk.token_importance_layers

    def counting(hiddens, attention_mask):
        calls.append([id(h) for h in hiddens])
        return original(hiddens, attention_mask)

    monkeypatch.setattr(mk, "token_importance_layers", counting)
    pairs = [LayerPair(2, 4, "word"), LayerPair(3, 4, "phrase"), LayerPair(4, 8, "phrase")]
    student, teacher = _states(cross=False)
    MTALoss(D_S, D_T, pairs)(student, teacher, _batch(cross=False))
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 2


@pytest.mark.usefixtures("reference_ops")
def test_mapping_of_needed_layers_equals_full_list() -> None:
    module = MTALoss(D_S, D_T, PAIRS)
    student, teacher = _states(cross=False, seed=5)
    batch = _batch(cross=False)
    full = module(student, teacher, batch)
    sparse = module({2: student[2], 4: student[4]}, {4: teacher[4], 8: teacher[8]}, batch)
    torch.testing.assert_close(sparse.loss, full.loss, rtol=0, atol=0)


# the interpreter's tl.dot is wrong on bf16 (docs/design.md §6)
@pytest.mark.usefixtures("reference_ops")
def test_bf16_states_and_autocast_stay_float32() -> None:
    """bf16 hidden states are computed on in fp32 (same values as upcasting them first), and an
    enclosing bf16 autocast changes nothing. Tolerance 1e-6: identical fp32 ops."""
    module = MTALoss(D_S, D_T, PAIRS)
    student, teacher = _states(cross=False, seed=6, dtype=torch.bfloat16)
    batch = _batch(cross=False)
    out = module(student, teacher, batch)
    upcast = module([s.float() for s in student], [t.float() for t in teacher], batch)
    torch.testing.assert_close(out.loss, upcast.loss, rtol=1e-6, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = module(student, teacher, batch)
    torch.testing.assert_close(autocast.loss, upcast.loss, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(out.loss, student[2])
    assert grad.dtype == torch.bfloat16


def test_projectors_are_orthogonal_float32_and_keyed_by_layer() -> None:
    module = MTALoss(D_S, D_T, PAIRS)
    assert sorted(module.state_dict()) == ["projectors.2.weight", "projectors.4.weight"]
    for projector in module.projectors.values():
        weight = projector.weight
        assert weight.shape == (D_T, D_S) and weight.dtype == torch.float32
        assert projector.bias is None
        torch.testing.assert_close(weight.T @ weight, torch.eye(D_S), rtol=0, atol=1e-5)
    assert module.granularities == ("word", "phrase")


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize(
    ("cross", "drop", "match"),
    [
        (False, "attention_mask", "batch is missing 'attention_mask'"),
        (False, "word_student_spans", "batch is missing 'word_student_spans'"),
        (False, "phrase_span_mask", "batch is missing 'phrase_span_mask'"),
        (True, "word_teacher_spans", "batch is missing 'word_teacher_spans'"),
        (True, "teacher_attention_mask", "batch is missing 'teacher_attention_mask'"),
    ],
)
def test_missing_batch_key_is_named(cross: bool, drop: str, match: str) -> None:
    student, teacher = _states(cross)
    batch = _batch(cross)
    del batch[drop]
    with pytest.raises(ValueError, match=match):
        MTALoss(D_S, D_T, PAIRS)(student, teacher, batch)


@pytest.mark.usefixtures("reference_ops")
def test_forward_errors() -> None:
    module = MTALoss(D_S, D_T, PAIRS)
    student, teacher = _states(cross=False)
    batch = _batch(cross=False)
    with pytest.raises(ValueError, match="teacher_hidden_states has no entry for layer 8"):
        module(student, teacher[:5], batch)
    with pytest.raises(ValueError, match="student_hidden_states has no entry for layer 2"):
        module({4: student[4]}, teacher, batch)
    with pytest.raises(ValueError, match=r"student_hidden_states\[2\] must have shape"):
        module([s[..., :4] for s in student], teacher, batch)
    with pytest.raises(ValueError, match=r"teacher_hidden_states\[4\] must have shape"):
        module(student, [t[:, :7] for t in teacher], batch)
    bad = dict(batch, word_student_spans=batch["word_student_spans"] + 5)
    hra_only = MTALoss(D_S, D_T, PAIRS, use_dsa=False)
    with pytest.raises(ValueError, match=r"spans\[0, 4\] = \[10, 13\] is outside \[0, T=10\]"):
        hra_only(student, teacher, bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layer_pairs=[(0, 4, "word")]), "student_layer must be >= 1"),
        (dict(layer_pairs=[(2, 4, "word"), (2, 8, "phrase")]), "student layer 2 appears in more"),
        (dict(layer_pairs=[]), "layer_pairs is empty"),
        (dict(student_hidden_size=0), "student_hidden_size must be a positive int"),
        (dict(lambda_dsa=-1.0), "lambda_dsa must be a finite number >= 0"),
        (dict(metric="l2"), "metric must be 'cosine' or 'euclidean'"),
        (dict(use_dsa=False, use_hra=False), "use_dsa and use_hra are both False"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    args = dict(student_hidden_size=D_S, teacher_hidden_size=D_T, layer_pairs=PAIRS) | kwargs
    with pytest.raises(ValueError, match=match):
        MTALoss(**args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cross", [False, True], ids=["shared", "cross_tokenizer"])
def test_cuda_fused_ops_match_cpu_reference(cross: bool) -> None:
    """On CUDA the ops run the Triton kernels (fp32 dots in IEEE precision by default): loss,
    components and gradients match the CPU reference path to rtol 1e-4 / atol 1e-6 (reduction
    order and the online softmax of token importance)."""
    module = MTALoss(D_S, D_T, PAIRS)
    student, teacher = _states(cross, seed=9)
    batch = _batch(cross)
    cpu = module(student, teacher, batch)
    cpu_grads = torch.autograd.grad(cpu.loss, [student[2], student[4], *module.parameters()])
    module.cuda()
    student_cuda = [s.detach().cuda().requires_grad_() for s in student]
    teacher_cuda = [t.detach().cuda() for t in teacher]
    out = module(student_cuda, teacher_cuda, {k: v.cuda() for k, v in batch.items()})
    grads = torch.autograd.grad(out.loss, [student_cuda[2], student_cuda[4], *module.parameters()])
    for name, value in cpu.components.items():
        torch.testing.assert_close(out.components[name].cpu(), value, rtol=1e-4, atol=1e-6)
    for grad, want in zip(grads, cpu_grads, strict=True):
        torch.testing.assert_close(grad.cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("reference_ops")
def test_loss_weights_follow_lambda_and_stay_exact() -> None:
    """The loss is λ_DSA·mean DSA + λ_HRA·Σ HRA with the λs the module holds at call time, in
    float32 whatever a wrapper does to the module's buffers."""
    module = MTALoss(D_S, D_T, PAIRS)
    student, teacher = _states(cross=False)
    batch = _batch(cross=False)
    out = module(student, teacher, batch)
    c = out.components
    torch.testing.assert_close(out.loss, 2.0 * c["dsa"] + 0.2 * c["hra"], rtol=1e-6, atol=0)
    module.lambda_dsa = 0.0
    again = module(student, teacher, batch)
    torch.testing.assert_close(again.loss, 0.2 * again.components["hra"], rtol=1e-6, atol=0)
    module.to(torch.bfloat16)  # what a mixed-precision wrapper may do to a module's buffers
    assert module.combine.dtype == torch.float32
    assert module.combine[0].tolist() == pytest.approx([0.0, 0.0, 0.2, 0.2])
    module.float()
    module.lambda_dsa = 1.0 / 3.0  # not a bf16 number
    exact = module(student, teacher, batch)
    # FSDP1's mixed precision casts buffers by assigning `.data`, bypassing nn.Module._apply
    module.combine.data = module.combine.data.to(torch.bfloat16)
    cast = module(student, teacher, batch)
    assert torch.equal(cast.loss, exact.loss)


def _counted_step(device: str):
    """The launch-budget step (3 layer pairs, B=2, T=64; benchmarks.launch_count) as a function
    returning the loss and the gradients of every leaf."""
    from benchmarks.launch_count import step_inputs

    module, student, teacher, plan = step_inputs(torch.device(device))
    leaves = [*student.values(), *module.parameters()]

    def step() -> tuple[torch.Tensor, ...]:
        out = module(student, teacher, plan)
        return (out.loss.detach(), *torch.autograd.grad(out.loss, leaves))

    return step, student, teacher, plan


@pytest.mark.kernels
def test_repeated_steps_are_bitwise_equal(device: str) -> None:
    """No atomics, no split-dependent order: the same batch gives the same bits every time
    (100 steps on CUDA, 3 through the interpreter)."""
    step, *_ = _counted_step(device)
    first = step()
    for _ in range(100 if device == "cuda" else 3):
        for got, want in zip(step(), first, strict=True):
            assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_replays_from_a_cuda_graph() -> None:
    """Forward and backward capture in one CUDA graph (no host synchronization, no host-to-device
    copy, no allocation outside the graph's pool); a replay on new hidden states gives the bits of
    an eager step on them."""
    step, student, teacher, _ = _counted_step("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator fills its pools
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        gen = torch.Generator("cuda").manual_seed(seed)
        with torch.no_grad():
            for hidden in [*student.values(), *teacher.values()]:
                hidden.copy_(torch.randn(hidden.shape, generator=gen, device="cuda"))
        graph.replay()
        for got, want in zip(captured, step(), strict=True):
            assert torch.equal(got, want), f"seed={seed}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_paper_shape_with_outliers_and_nan_padding() -> None:
    """The paper's shape (B=8, T=512, d_S=768, d_T=1600, ~300 word and ~100 phrase units, 3 layer
    pairs) in bf16, with the massive activations of real LMs (4 channels at |x| ≈ 3000), NaN in
    every padding position of the teacher and garbage (1e4) in the student's: loss, components
    and gradients match the float64 reference on the same values within the bf16 bound (2e-2:
    bf16 tensor-core operands round to 2^-9), and padding gets zero gradient.

    The student's padding holds finite values, as a trainable model's does: a NaN row there would
    reach the projectors' gradient ``g^T x`` (NaN · 0), as it reaches the gradient of the
    student's own LM head."""
    from benchmarks.bench_ops import PAPER, make_batch

    pairs = (LayerPair(1, 2, "word"), LayerPair(2, 4, "phrase"), LayerPair(3, 6, "phrase"))
    batch = make_batch(PAPER, torch.device("cuda"), seed=0)
    padding = batch.attention_mask == 0
    assert padding.any()
    gen = torch.Generator("cuda").manual_seed(0)

    def states(width: int, layers: list[int], fill: float) -> dict[int, torch.Tensor]:
        out = {}
        for layer in layers:
            h = torch.randn(PAPER.B, PAPER.T, width, generator=gen, device="cuda")
            h[..., :4] *= 3000.0 / h[..., :4].abs().mean()
            out[layer] = h.masked_fill(padding[..., None], fill).bfloat16()
        return out

    student = states(PAPER.d_student, [p.student_layer for p in pairs], 1e4)
    teacher = states(PAPER.d_teacher, [p.teacher_layer for p in pairs], float("nan"))
    module = MTALoss(PAPER.d_student, PAPER.d_teacher, pairs).cuda()
    exact_module = copy.deepcopy(module).double()

    def run(mod, cast, context):
        s = {k: cast(v).requires_grad_() for k, v in student.items()}
        t = {k: cast(v) for k, v in teacher.items()}
        with context:
            out = mod(s, t, batch.plan)
        grads = torch.autograd.grad(out.loss, [*s.values(), *mod.parameters()])
        return out, grads

    fused, fused_grads = run(module, lambda x: x.detach(), contextlib.nullcontext())
    exact, exact_grads = run(
        exact_module, lambda x: x.detach().double(), mk.prefer_reference(cuda=True)
    )
    forward_tol = tolerances(torch.bfloat16, "cuda")[0]
    for name, value in exact.components.items():
        assert rel_error(fused.components[name], value) < forward_tol, name
    for got, want in zip(fused_grads, exact_grads, strict=True):
        assert rel_error(got, want) < backward_bound(got.dtype, "cuda", want)
    for got in fused_grads[: len(student)]:
        assert not got[padding].any()


@pytest.mark.kernels
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_padding_contents_change_nothing(path: str, device: str) -> None:
    """NaN in the teacher's padding and garbage in the student's (the NaN policy of MTALoss, see
    the README): the loss, its components and every gradient are those of zeros there, and the
    padding's gradient is 0."""
    step, student, teacher, plan = _counted_step(device)
    context = mk.prefer_reference(cuda=True) if path == "reference" else contextlib.nullcontext()
    padding = plan.attention_mask == 0
    assert padding.any()
    with torch.no_grad():
        for h in [*student.values(), *teacher.values()]:
            h.masked_fill_(padding[..., None], 0.0)
    with context:
        clean = step()
        with torch.no_grad():
            for h in teacher.values():
                h.masked_fill_(padding[..., None], float("nan"))
            for h in student.values():
                h.masked_fill_(padding[..., None], 1e4)
        poisoned = step()
    for got, want in zip(poisoned, clean, strict=True):
        assert torch.equal(got, want)
    for grad in poisoned[1 : 1 + len(student)]:
        assert not grad[padding].any()
