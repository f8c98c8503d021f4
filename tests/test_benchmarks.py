"""Tests of the benchmark harness (benchmarks/): inputs, timing, CSV, OOM rows, rendering, CLI.

Shapes are tiny so the whole file runs in well under a minute on CPU (also under
``TRITON_INTERPRET=1``); the pytest-benchmark tests time each op per provider and check that the
timed call really computed something finite. CUDA variants are marked ``cuda``.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import mta_kernels as mk
from benchmarks import bench_e2e, bench_ops, harness, render
from benchmarks.bench_ops import OPS, PAPER, Shape
from mta.layers import plan_layers
from mta.loss import MTALoss
from mta_kernels import reference

TINY = Shape(B=2, T=12, K=7, d_student=8, d_teacher=12)
CUDA = pytest.mark.cuda  # tests/conftest.py skips these without a GPU
DEVICE_DTYPES = [
    pytest.param("cpu", "fp32", id="cpu-fp32"),
    pytest.param("cuda", "fp32", id="cuda-fp32", marks=CUDA),
    pytest.param("cuda", "bf16", id="cuda-bf16", marks=CUDA),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny ops are faster and steadier that way on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("tokens", "units"), [(12, 7), (40, 23), (512, 300)])
def test_word_spans_partition_the_valid_tokens(seed, tokens, units):
    gen = torch.Generator().manual_seed(seed)
    lengths = bench_ops.valid_lengths(4, tokens, gen)
    spans, mask = bench_ops.word_spans(lengths, units, tokens, gen)
    assert spans.shape == (4, units, 2) and mask.shape == (4, units)
    assert lengths[0] == tokens and all(3 * tokens // 4 <= n <= tokens for n in lengths)
    for b, n in enumerate(lengths):
        k = int(mask[b].sum())
        assert mask[b, :k].all() and k == min(n, units, max(1, round(units * n / tokens)))
        valid = spans[b, :k]
        assert valid[0, 0] == 0 and valid[-1, 1] == n  # covers [0, n)
        assert (valid[1:, 0] == valid[:-1, 1]).all()  # contiguous and sorted
        assert (valid[:, 1] > valid[:, 0]).all()  # no empty word
        assert (spans[b, k:] == 0).all()  # padding units are (0, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("tokens", "units"), [(12, 2), (64, 12), (512, 100)])
def test_phrase_spans_are_sorted_disjoint_and_2_to_6_tokens(seed, tokens, units):
    gen = torch.Generator().manual_seed(seed)
    lengths = bench_ops.valid_lengths(4, tokens, gen)
    spans, mask = bench_ops.phrase_spans(lengths, units, tokens, gen)
    for b, n in enumerate(lengths):
        k = int(mask[b].sum())
        assert k >= 1 and mask[b, :k].all()
        valid = spans[b, :k]
        sizes = valid[:, 1] - valid[:, 0]
        assert ((sizes >= 2) & (sizes <= 6)).all()
        assert (valid[1:, 0] >= valid[:-1, 1]).all()  # sorted, non-overlapping
        assert valid[0, 0] >= 0 and valid[-1, 1] <= n
        assert (spans[b, k:] == 0).all()


def test_paper_shape_has_about_300_words_and_100_phrases():
    batch = bench_ops.make_batch(PAPER, torch.device("cpu"), seed=0)
    assert batch.word.mask[0].sum() == 300 and batch.phrase.mask[0].sum() == 100
    assert PAPER.k_phrase == 100 and bench_ops.units_for(512) == 300


@pytest.mark.parametrize("seed", [0, 3])
def test_covered_tokens_matches_the_membership_matrix(seed):
    batch = bench_ops.make_batch(TINY, torch.device("cpu"), seed)
    for units in (batch.word, batch.phrase):
        member = reference.span_membership(units.spans, units.mask, TINY.T).any(dim=1)
        expected = member & batch.attention_mask.bool()
        assert torch.equal(units.covered, expected)


# ----------------------------------------------------------------------------- the MTA loss


def test_mta_loss_is_zero_when_student_equals_teacher():
    """MTALoss on the batch's plan: same hidden states and identity projectors give equal unit
    geometry (DSA) and cosine 1 (HRA)."""
    batch = bench_ops.make_batch(TINY, torch.device("cpu"), seed=0)
    pairs = bench_ops.MTA_PAIRS
    module = MTALoss(TINY.d_teacher, TINY.d_teacher, pairs)
    for projector in module.projectors.values():
        torch.nn.init.eye_(projector.weight)
    teacher = {p.teacher_layer: torch.randn(TINY.B, TINY.T, TINY.d_teacher) for p in pairs}
    student = {p.student_layer: teacher[p.teacher_layer] for p in pairs}  # aligned = equal
    args = {"module": module, "student_hidden": student, "teacher_hidden": teacher}
    with mk.prefer_reference():
        assert bench_ops.mta_loss({**args, "plan": batch.plan}).abs() < 1e-5  # fp32 rounding
        shifted = {layer: h + torch.randn_like(h) for layer, h in student.items()}
        args["student_hidden"] = shifted
        assert bench_ops.mta_loss({**args, "plan": batch.plan}) > 1e-3


def test_mta_loss_reference_and_fused_agree_and_reach_every_leaf():
    """fp32 on CPU: both paths compute the same sums; 1e-4 relative covers reordered fp32 sums."""
    maker = bench_ops._Maker(TINY, torch.float32, torch.device("cpu"), seed=1)
    inputs = bench_ops._mta_loss_inputs(maker)
    losses = []
    for provider in ("eager", "mta"):
        for leaf in inputs.leaves:
            leaf.grad = None
        loss = bench_ops.provider_forward("mta_loss", provider)(inputs.args)
        loss.backward()
        assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in inputs.leaves)
        losses.append(loss.detach())
    assert len(inputs.leaves) == 6  # 3 student layers + the 3 projectors of MTALoss
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)


def test_compile_provider_traces_the_reference():
    """The ``compile`` wiring, with dynamo's eager backend (inductor takes ~30 s on CPU)."""
    args = bench_ops._span_pool_inputs(
        bench_ops._Maker(TINY, torch.float32, torch.device("cpu"), seed=2)
    ).args
    compiled = bench_ops.provider_forward("span_pool", "compile", "eager")(args)
    torch.testing.assert_close(compiled, bench_ops.provider_forward("span_pool", "eager")(args))


# ----------------------------------------------------------------------------- per-op benchmarks


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("provider", ["eager", "mta"])
@pytest.mark.parametrize("op", list(OPS))
def test_op_benchmark(benchmark, op, provider, device, dtype):
    """Time the training-relevant mode of each op; the timed call must produce finite results."""
    if (op, provider, device) == ("mta_loss", "mta", "cpu"):
        pytest.skip(
            "interpreter: ~10 s per call; test_mta_loss_reference_and_fused_agree covers it"
        )
    device = torch.device(device)
    mode = bench_ops.modes_for(op, ("full", "forward"))[0]
    case = bench_ops.build_case(op, provider, mode, TINY, dtype, device, n_sets=1, seed=3)

    def call():
        for leaf in case.grad_to_none:
            leaf.grad = None
        out = case.calls[0]()
        harness.synchronize(device)
        return out

    out = benchmark.pedantic(call, rounds=2, iterations=1, warmup_rounds=1)
    if mode == "forward":
        assert torch.isfinite(out).all()
    else:
        assert case.grad_to_none and all(
            leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in case.grad_to_none
        )


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_build_case_rotates_independent_input_sets(mode):
    case = bench_ops.build_case(
        "span_pool", "eager", mode, TINY, "fp32", torch.device("cpu"), n_sets=3, seed=5
    )
    assert len(case.calls) == 3 and len(case.grad_to_none) == 3
    assert not torch.equal(case.grad_to_none[0], case.grad_to_none[1])
    for call, leaf in zip(case.calls, case.grad_to_none, strict=True):
        call()
        if mode != "forward":
            assert leaf.grad is not None and leaf.grad.shape == leaf.shape


def test_build_case_rejects_backward_of_a_forward_only_op():
    with pytest.raises(ValueError, match="mode must be one of"):
        bench_ops.build_case(
            "token_importance", "eager", "backward", TINY, "fp32", torch.device("cpu")
        )


# ----------------------------------------------------------------------------- harness


def test_time_fn_on_cpu_counts_calls_and_orders_quantiles():
    calls = []
    timing = harness.time_fn(
        lambda: calls.append(sum(range(2000))), torch.device("cpu"), cpu_reps=7
    )
    assert len(calls) == 8  # one warm-up + 7 timed
    assert 0 < timing.p20 <= timing.median <= timing.p80


def _fake_case(error: Exception | None) -> harness.Case:
    def call():
        if error is not None:
            raise error

    return harness.Case([call], [])


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "ok"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"), harness.OOM),
        (RuntimeError("CUDA error: out of memory"), harness.OOM),
        (RuntimeError("Triton compilation failed"), harness.ERROR),
    ],
)
def test_run_case_turns_failures_into_outcomes(error, status):
    outcome = harness.run_case(lambda: _fake_case(error), torch.device("cpu"), cpu_reps=1)
    assert outcome.status == status
    fields = harness.outcome_fields(outcome)
    if status == "ok":
        assert float(fields["ms_median"]) > 0 and fields["peak_mem_mb"] == ""
    else:
        assert fields["ms_median"] == fields["ms_p20"] == fields["ms_p80"] == status
        assert fields["peak_mem_mb"] == (harness.OOM if status == harness.OOM else "")
        assert str(error) in outcome.message


def test_sweep_records_an_oom_provider_and_goes_on(tmp_path, monkeypatch):
    real = bench_ops.provider_forward

    def forward(op, provider, compile_backend="inductor"):
        if provider == "mta":

            def out_of_memory(args):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            return out_of_memory
        return real(op, provider, compile_backend)

    monkeypatch.setattr(bench_ops, "provider_forward", forward)
    path = tmp_path / "ops.csv"
    entries = [("span_pool", TINY, "fp32"), ("span_weights", TINY, "fp32")]
    rows = bench_ops.sweep(
        entries,
        ["eager", "mta"],
        ["forward", "full"],
        torch.device("cpu"),
        path,
        n_sets=1,
        cpu_reps=1,
    )
    assert rows == harness.read_rows(path)
    got = [(r["op"], r["provider"], r["mode"], r["ms_median"]) for r in rows]
    assert [g[:3] for g in got] == [
        ("span_pool", "eager", "forward"),
        ("span_pool", "eager", "full"),
        ("span_pool", "mta", "forward"),
        ("span_pool", "mta", "full"),
        ("span_weights", "eager", "forward"),
        ("span_weights", "mta", "forward"),
    ]
    assert all((g[3] == harness.OOM) == (g[1] == "mta") for g in got)
    assert all(float(g[3]) > 0 for g in got if g[1] == "eager")


def test_sweep_budget_stops_adding_entries(tmp_path):
    entries = [("span_weights", TINY, "fp32")] * 3
    rows = bench_ops.sweep(
        entries,
        ["eager"],
        ["forward"],
        torch.device("cpu"),
        tmp_path / "a.csv",
        budget_s=0.0,
        cpu_reps=1,
    )
    assert rows == [] and not (tmp_path / "a.csv").exists()
    rows = bench_ops.sweep(
        entries[:2],
        ["eager"],
        ["forward"],
        torch.device("cpu"),
        tmp_path / "b.csv",
        budget_s=math.inf,
        cpu_reps=1,
    )
    assert len(rows) == 2


def _row(**fields: str) -> dict[str, str]:
    row = dict.fromkeys(harness.COLUMNS, "1")
    row.update(
        op="span_pool",
        provider="eager",
        mode="full",
        dtype="bf16",
        gpu="Test GPU",
        commit="abc",
        date="2026-01-01T00:00:00Z",
        peak_mem_mb="",
    )
    row.update(fields)
    return row


def test_csv_round_trip_has_exactly_the_issue_columns(tmp_path):
    assert ",".join(harness.COLUMNS) == (
        "op,provider,mode,dtype,B,T,K,d_student,d_teacher,ms_median,ms_p20,ms_p80,peak_mem_mb,"
        "gpu,commit,date"
    )
    path = tmp_path / "results.csv"
    rows = [_row(ms_median="1.5"), _row(provider="mta", ms_median=harness.OOM)]
    harness.append_rows(path, rows[:1])
    harness.append_rows(path, rows[1:])  # appends without a second header
    assert path.read_text().splitlines()[0] == ",".join(harness.COLUMNS)
    assert harness.read_rows(path) == rows
    with pytest.raises(ValueError, match="columns"):
        harness.append_rows(path, [{**rows[0], "extra": "x"}])
    other = tmp_path / "other.csv"
    other.write_text("op,ms\nx,1\n")
    with pytest.raises(ValueError, match="expected"):
        harness.read_rows(other)
    with pytest.raises(ValueError, match="write to a new file"):
        harness.append_rows(other, rows)


def test_device_peaks_and_slug():
    peaks = harness.measure_device_peaks(torch.device("cpu"), quick=True)
    assert peaks["gpu"] == "cpu" and peaks["copy_gb_s"] > 0 and peaks["bf16_tflop_s"] > 0
    assert harness.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ----------------------------------------------------------------------------- roofline


def test_roofline_floor_by_hand():
    """hidden_alignment_loss forward reads two [B,T,d] bf16 tensors, weights and mask once."""
    shape = Shape(B=2, T=4, K=3, d_student=8, d_teacher=16)
    floor, bound = bench_ops.roofline_floor(
        "hidden_alignment_loss", "forward", shape, "bf16", copy_gb_s=1e-9, tflop_s=1.0
    )
    expected_bytes = 2 * 2 * 4 * 16 * 2 + 2 * 4 * 5
    assert bound == "HBM" and floor == pytest.approx(expected_bytes * 1e3)


@pytest.mark.parametrize(
    ("op", "shape", "bound"),
    [
        ("span_pool", PAPER, "HBM"),
        ("hidden_alignment_loss", PAPER, "HBM"),
        ("token_importance", PAPER, "MMA"),
        ("structural_loss", Shape(8, 4096, 2400, 4096, 4096), "MMA"),
    ],
)
def test_roofline_bound_on_hopper_like_ceilings(op, shape, bound):
    floor, got = bench_ops.roofline_floor(
        op,
        "full" if op != "token_importance" else "forward",
        shape,
        "bf16",
        copy_gb_s=3000.0,
        tflop_s=800.0,
    )
    assert got == bound and floor > 0


# ----------------------------------------------------------------------------- rendering


def _write_results(folder: Path) -> None:
    shape = {
        "B": str(PAPER.B),
        "T": str(PAPER.T),
        "K": str(PAPER.K),
        "d_student": str(PAPER.d_student),
        "d_teacher": str(PAPER.d_teacher),
    }
    rows = [
        _row(op="mta_loss", provider="eager", ms_median="10.0", peak_mem_mb="900", **shape),
        _row(op="mta_loss", provider="compile", ms_median="4.0", peak_mem_mb="500", **shape),
        _row(op="mta_loss", provider="mta", ms_median="2.0", peak_mem_mb="100", **shape),
        _row(
            op="mta_loss",
            provider="eager",
            ms_median=harness.OOM,
            ms_p20=harness.OOM,
            ms_p80=harness.OOM,
            peak_mem_mb=harness.OOM,
            **{**shape, "T": "4096", "K": "2400"},
        ),
        _row(
            op="mta_loss",
            provider="mta",
            ms_median="9.0",
            peak_mem_mb="800",
            **{**shape, "T": "4096", "K": "2400"},
        ),
    ]
    harness.append_rows(folder / "ops_test-gpu.csv", rows)
    e2e = [
        dict.fromkeys(bench_e2e.E2E_COLUMNS, "1")
        | {"variant": v, "ms_median": ms, "overhead": o, "preset": "paper", "peak_mem_mb": ""}
        for v, ms, o in (("base", "100", ""), ("mta", "105", "0.05"))
    ]
    harness.append_rows(folder / "e2e_test-gpu.csv", e2e, bench_e2e.E2E_COLUMNS)
    peaks = {
        "gpu": "Test GPU",
        "copy_gb_s": 3000.0,
        "bf16_tflop_s": 800.0,
        "torch": "t",
        "triton": "t",
        "commit": "abc",
        "date": "d",
    }
    (folder / "device_peaks_test-gpu.json").write_text(json.dumps(peaks))


def test_render_readme_and_plots_from_csv(tmp_path):
    _write_results(tmp_path)
    readme = tmp_path / "README.md"
    assert render.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "\n### Test GPU\n" in text and "\n## Test GPU" not in text
    assert (
        "| mta_loss | full | bf16 | 8 | 512 | 300 | 768 | 1600 | 10.0 | 4.00 | 2.00 | 5.00× | "
        "2.00× | 900 | 500 | 100 |" in text
    )
    assert "only mta runs" in text and "eager OOM, mta runs" in text
    assert "| end-to-end MTA overhead ≤ 10% of the base KD step | +5.0% | met |" in text
    assert "slope 1.00 over 2 T values" in text  # 100 -> 800 MiB for T 512 -> 4096
    for name in ("test-gpu_ms_vs_T.png", "test-gpu_mem_vs_T.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text
    summary = tmp_path / "summary.md"
    render.main(["--results", str(tmp_path), "--summary", str(summary)])
    assert "## Test GPU" in summary.read_text() and "png" not in summary.read_text()


def test_render_without_results_says_so(tmp_path):
    readme = tmp_path / "README.md"
    render.main(["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "No results have been recorded yet" in text and "## How to run" in text
    assert not list(tmp_path.glob("*.png"))


def test_committed_readme_is_what_render_produces(tmp_path):
    """benchmarks/README.md is generated: rendering the committed results reproduces it."""
    readme = render.README
    if not readme.exists():
        pytest.skip("benchmarks/README.md not generated yet")
    out = tmp_path / "README.md"
    cards = render.load_results(render.RESULTS_DIR)
    plots = {
        c.slug: [
            render.RESULTS_DIR / f"{c.slug}_{s}.png"
            for s in ("ms_vs_T", "mem_vs_T")
            if (render.RESULTS_DIR / f"{c.slug}_{s}.png").exists()
        ]
        for c in cards
    }
    out.write_text(render.render_readme(cards, readme, plots))
    assert out.read_text() == readme.read_text()


# ----------------------------------------------------------------------------- CLIs and script


def test_bench_ops_cli_quick(tmp_path):
    args = [
        "--quick",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
        "--ops",
        "span_weights",
        "structural_loss",
        "--providers",
        "eager",
        "--dtypes",
        "fp32",
        "--cpu-reps",
        "1",
        "--n-sets",
        "1",
    ]
    assert bench_ops.main(args) == 0
    rows = harness.read_rows(tmp_path / "ops_cpu.csv")
    shapes = {(r["T"], r["d_student"], r["d_teacher"]) for r in rows}
    assert len(shapes) == 3  # base, T sweep, d sweep
    assert len(rows) == len(shapes) * (1 + 3)  # shapes x (span_weights forward + 3 modes)
    assert json.loads((tmp_path / "device_peaks_cpu.json").read_text())["gpu"] == "cpu"
    with pytest.raises(SystemExit):
        bench_ops.main(["--quick", "--device", "cpu"])  # CPU numbers never go to results/


def test_plan_puts_the_paper_shape_first_and_has_no_duplicates():
    entries = bench_ops.plan(list(OPS), ["bf16", "fp32"])
    assert entries[: len(OPS)] == [(op, PAPER, "bf16") for op in OPS]
    assert len(entries) == len(set(entries))
    loss_ts = [
        s.T
        for op, s, d in entries
        if op == "mta_loss" and d == "bf16" and s.d_teacher == PAPER.d_teacher
    ]
    assert loss_ts[:5] == [512, 1024, 2048, 4096, 8192]
    assert {s.d_teacher for _, s, _ in entries} == {768, 1600, 4096}


def test_e2e_uses_the_default_layer_plan():
    models = bench_e2e.build_models(bench_e2e.PRESETS["tiny"], torch.device("cpu"))
    assert models.mta_loss.layer_pairs == tuple(plan_layers(4, 8))


@pytest.mark.parametrize(
    ("device", "variants"),
    [
        # the fused variant runs through the Triton interpreter on CPU (~10 s a step): CUDA only
        pytest.param("cpu", ("base", "fused_head", "eager"), id="cpu"),
        pytest.param("cuda", bench_e2e.VARIANTS, id="cuda", marks=CUDA),
    ],
)
def test_e2e_step_tiny(tmp_path, device, variants):
    path = tmp_path / "e2e.csv"
    rows = bench_e2e.run_e2e(
        "tiny", variants, torch.device(device), path, n_sets=1, cpu_reps=1, warmup_ms=10, rep_ms=50
    )
    assert harness.read_rows(path, bench_e2e.E2E_COLUMNS) == rows
    assert [r["variant"] for r in rows] == list(variants)
    base = float(rows[0]["ms_median"])
    assert rows[0]["overhead"] == ""
    for row in rows[1:]:
        overhead = (float(row["ms_median"]) - base) / base
        assert float(row["overhead"]) == pytest.approx(overhead, abs=1e-3)


def test_e2e_records_a_failed_model_build(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench_e2e, "build_models", out_of_memory)
    rows = bench_e2e.run_e2e("tiny", ["mta", "base"], torch.device("cpu"), tmp_path / "e.csv")
    assert [(r["variant"], r["ms_median"]) for r in rows] == [("base", "OOM"), ("mta", "OOM")]
    with pytest.raises(ValueError, match="base"):
        bench_e2e.run_e2e("tiny", ["mta"], torch.device("cpu"))


def test_gpu_check_script_parses():
    script = Path(bench_ops.__file__).with_name("gpu_check.sh")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
