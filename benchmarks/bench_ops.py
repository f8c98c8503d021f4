"""Speed and memory of every MTA op, and of the whole MTA loss of one step, per provider.

Providers (docs/design.md §4): ``eager`` = ``mta_kernels.reference``, ``compile`` =
``torch.compile`` of the same reference code, ``mta`` = the public ``mta_kernels`` ops (Triton on
CUDA). Modes: ``forward``, ``backward`` (the forward is run untimed, then
``backward(retain_graph=True)`` is timed), ``full``. Ops that produce teacher-side quantities
without a gradient (``token_importance``, ``span_weights``) have the forward mode only.

``mta_loss`` is the MTA term of one training step (docs/design.md §2) as the library computes it:
the shipped :class:`mta.loss.MTALoss` on the batch's :class:`mta.unit_plan.UnitPlan` for 3 layer
pairs (one word-level with ``K`` units, two phrase-level with ``K // 3``); the ``eager`` and
``compile`` providers run the same module on the reference ops. In the CSV its ``K`` is the
word-unit count.

Usage::

    python -m benchmarks.bench_ops                      # full sweep on CUDA -> benchmarks/results/
    python -m benchmarks.bench_ops --budget-s 240       # stop adding shapes after ~4 minutes
    python -m benchmarks.bench_ops --quick --device cpu --out-dir /tmp/bench   # harness check
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mta_kernels as mk
from benchmarks import harness
from mta.layers import LayerPair
from mta.loss import MTALoss
from mta.unit_plan import UnitPlan
from mta_kernels import reference

PROVIDERS = ("mta", "eager", "compile")  # run in this order: the fused rows first
MODES = ("forward", "backward", "full")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
GRANULARITIES = ("word", "phrase", "phrase")  # the paper's 3 layer pairs, lowest first
LAMBDA_DSA, LAMBDA_HRA = 2.0, 0.2
WORDS_PER_TOKEN = 300 / 512  # the paper's ~300 word units in 512 GPT-2 tokens
PHRASE_LENGTHS = (2, 6)  # phrase spans cover 2..6 tokens
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """Benchmark shape: batch ``B``, tokens ``T``, word units ``K``, student/teacher widths."""

    B: int
    T: int
    K: int
    d_student: int
    d_teacher: int

    @property
    def k_phrase(self) -> int:
        """Phrase units: a third of the word units (the paper's ~100 for ~300)."""
        return max(1, self.K // 3)


def units_for(tokens: int) -> int:
    """Word units for ``tokens`` tokens at the paper's density (300 for T=512)."""
    return max(2, round(tokens * WORDS_PER_TOKEN))


PAPER = Shape(B=8, T=512, K=300, d_student=768, d_teacher=1600)
QUICK = Shape(B=2, T=32, K=units_for(32), d_student=16, d_teacher=24)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Units:
    """One granularity's units: spans int64 [B, K, 2], mask bool [B, K], covered int32 [B, T]."""

    spans: Tensor
    mask: Tensor
    covered: Tensor  # how many valid spans hold each valid token (nonzero: c_t of HRA)


@dataclass(frozen=True)
class MTABatch:
    """Token mask and the units of both granularities, as the collator provides them."""

    attention_mask: Tensor  # int64 [B, T], right padding
    word: Units
    phrase: Units
    plan: UnitPlan  # built from the same units on the CPU, as the collator builds it
    granularities: tuple[str, ...] = GRANULARITIES


def valid_lengths(batch: int, tokens: int, gen: torch.Generator) -> list[int]:
    """Valid tokens per example: the first is full, the others uniform in [3T/4, T]."""
    low = max(1, (3 * tokens) // 4)
    return [tokens, *torch.randint(low, tokens + 1, (batch - 1,), generator=gen).tolist()]


def word_spans(
    lengths: Sequence[int], num_units: int, tokens: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sorted contiguous spans partitioning each example's valid tokens into words.

    Example ``b`` gets ``round(K · n_b / T)`` units (at least 1, at most ``n_b``) cut at random
    token boundaries; padding units are ``(0, 0)`` with mask False. Returns spans [B, K, 2], mask.
    """
    spans = torch.zeros(len(lengths), num_units, 2, dtype=torch.int64)
    mask = torch.zeros(len(lengths), num_units, dtype=torch.bool)
    for b, n in enumerate(lengths):
        k = min(n, num_units, max(1, round(num_units * n / tokens)))
        cuts = (torch.randperm(n - 1, generator=gen)[: k - 1] + 1).sort().values
        bounds = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([n])])
        spans[b, :k, 0], spans[b, :k, 1] = bounds[:-1], bounds[1:]
        mask[b, :k] = True
    return spans, mask


def phrase_spans(
    lengths: Sequence[int], num_units: int, tokens: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sorted, non-overlapping spans of 2..6 tokens inside each example's valid tokens.

    Example ``b`` gets up to ``round(K · n_b / T)`` phrases (fewer if they would not fit), separated
    by random gaps. Returns spans [B, K, 2] and mask [B, K].
    """
    low, high = PHRASE_LENGTHS
    spans = torch.zeros(len(lengths), num_units, 2, dtype=torch.int64)
    mask = torch.zeros(len(lengths), num_units, dtype=torch.bool)
    for b, n in enumerate(lengths):
        k = min(num_units, max(1, round(num_units * n / tokens)))
        sizes = torch.randint(low, high + 1, (k,), generator=gen).clamp_max(n)
        k = max(1, int((sizes.cumsum(0) <= n).sum()))
        sizes = sizes[:k]
        gaps = torch.randint(0, n - int(sizes.sum()) + 1, (k,), generator=gen).sort().values
        starts = sizes.cumsum(0) - sizes + gaps
        spans[b, :k, 0], spans[b, :k, 1] = starts, starts + sizes
        mask[b, :k] = True
    return spans, mask


def make_batch(shape: Shape, device: torch.device, seed: int) -> MTABatch:
    """Right-padded attention mask and realistic word / phrase units for ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = valid_lengths(shape.B, shape.T, gen)
    attention_mask = (torch.arange(shape.T) < torch.tensor(lengths)[:, None]).to(torch.int64)
    attention_mask = attention_mask.to(device)

    word = word_spans(lengths, shape.K, shape.T, gen)
    phrase = phrase_spans(lengths, shape.k_phrase, shape.T, gen)
    keys = {"attention_mask": attention_mask.cpu()}
    for g, (spans, mask) in (("word", word), ("phrase", phrase)):
        keys[f"{g}_student_spans"], keys[f"{g}_span_mask"] = spans, mask
    plan = UnitPlan.from_batch(keys).to(device)  # as the collator builds it, then moved

    def units(g: str) -> Units:
        return Units(keys[f"{g}_student_spans"].to(device), plan[g].mask, plan[g].coverage)

    return MTABatch(attention_mask, units("word"), units("phrase"), plan)


@dataclass
class Inputs:
    """Keyword-free arguments of one op call (``args``) and the leaves that receive gradients."""

    args: dict[str, Any]
    leaves: list[Tensor] = field(default_factory=list)


class _Maker:
    """Random inputs of one set on ``device`` (hidden states generated on the device itself)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.batch = make_batch(shape, device, seed)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.leaves: list[Tensor] = []

    def randn(self, *size: int, grad: bool = False, scale: float = 1.0) -> Tensor:
        t = torch.randn(*size, device=self.device, dtype=self.dtype, generator=self.gen) * scale
        if grad:
            t.requires_grad_(True)
            self.leaves.append(t)
        return t

    def distribution(self, mask: Tensor) -> Tensor:
        """float32 positive weights over the True entries of ``mask``, summing to 1 per row."""
        raw = torch.rand(mask.shape, device=self.device, generator=self.gen) * mask
        return raw / raw.sum(-1, keepdim=True).clamp_min(1e-8)

    def inputs(self, **args: Any) -> Inputs:
        return Inputs(args, self.leaves)


def _token_importance_inputs(m: _Maker) -> Inputs:
    s = m.shape
    return m.inputs(hidden=m.randn(s.B, s.T, s.d_teacher), attention_mask=m.batch.attention_mask)


def _span_pool_inputs(m: _Maker) -> Inputs:
    s, words = m.shape, m.batch.word
    return m.inputs(
        hidden=m.randn(s.B, s.T, s.d_student, grad=True),
        spans=words.spans,
        span_mask=words.mask,
        token_weights=m.distribution(m.batch.attention_mask),
    )


def _span_weights_inputs(m: _Maker) -> Inputs:
    words = m.batch.word
    return m.inputs(
        token_weights=m.distribution(m.batch.attention_mask),
        spans=words.spans,
        span_mask=words.mask,
    )


def _pairwise_distance_inputs(m: _Maker) -> Inputs:
    s = m.shape
    return m.inputs(units=m.randn(s.B, s.K, s.d_student, grad=True), span_mask=m.batch.word.mask)


def _structural_loss_inputs(m: _Maker) -> Inputs:
    s, mask = m.shape, m.batch.word.mask
    return m.inputs(
        student_units=m.randn(s.B, s.K, s.d_student, grad=True),
        teacher_units=m.randn(s.B, s.K, s.d_teacher),
        span_weights=m.distribution(mask),
        span_mask=mask,
    )


def _hidden_alignment_inputs(m: _Maker) -> Inputs:
    s = m.shape
    return m.inputs(
        student_hidden=m.randn(s.B, s.T, s.d_teacher, grad=True),
        teacher_hidden=m.randn(s.B, s.T, s.d_teacher),
        token_weights=m.distribution(m.batch.attention_mask),
        token_mask=m.batch.word.covered,
    )


#: The layer pairs of the ``mta_loss`` rows: one word-level pair and two phrase-level ones.
MTA_PAIRS = (
    LayerPair(1, 2, "word"),
    LayerPair(2, 4, "phrase"),
    LayerPair(3, 6, "phrase"),
)


def _mta_loss_inputs(m: _Maker) -> Inputs:
    s = m.shape
    module = MTALoss(s.d_student, s.d_teacher, MTA_PAIRS).to(m.device)
    m.leaves.extend(module.parameters())
    return m.inputs(
        module=module,
        student_hidden={
            p.student_layer: m.randn(s.B, s.T, s.d_student, grad=True) for p in MTA_PAIRS
        },
        teacher_hidden={p.teacher_layer: m.randn(s.B, s.T, s.d_teacher) for p in MTA_PAIRS},
        plan=m.batch.plan,
    )


# ----------------------------------------------------------------------------- the MTA loss


def mta_loss(args: dict[str, Any]) -> Tensor:
    """The MTA term of one step, by the shipped :class:`mta.loss.MTALoss` on the batch's
    :class:`mta.unit_plan.UnitPlan` (Eq. 14 without the base loss): the ops it runs are the fused
    ones, or the eager reference under ``mta_kernels.prefer_reference(cuda=True)`` (how the
    ``eager`` and ``compile`` providers call it)."""
    return args["module"](args["student_hidden"], args["teacher_hidden"], args["plan"]).loss


# ----------------------------------------------------------------------------- roofline


@dataclass(frozen=True)
class Work:
    """Useful floating-point operations and the fewest device-memory bytes of one kernel."""

    flops: float
    bytes: float


def _op_work(op: str, s: Shape, elt: int) -> list[tuple[Work, Work | None]]:
    """(forward, backward or None) work of each kernel ``op`` runs, inputs of ``elt`` bytes.

    Model: every input read once, every output written once (fp32 outputs, int64 spans, bool
    masks); Gram products count ``2·m·n·k`` flops; the structural loss counts the cheaper of the
    K×K Gram form and the d×d form (docs/design.md §3); the backward counts only the student
    gradient.
    """
    B, T = s.B, s.T
    tok = B * T * 5  # fp32 token weights + a mask byte per token

    def importance(d: int) -> tuple[Work, None]:
        return Work(2 * B * T * T * d, B * T * d * elt + tok), None

    def pool(k: int, d: int, grad: bool, out: int = 4) -> tuple[Work, Work | None]:
        io = tok + B * k * 17  # spans and mask
        fwd = Work(2 * B * T * d, B * T * d * elt + B * k * d * out + io)
        return fwd, (Work(2 * B * T * d, B * k * d * out + B * T * d * elt + io) if grad else None)

    def weights(k: int) -> tuple[Work, None]:
        return Work(B * T, tok + B * k * 21), None

    def distance(k: int, d: int) -> tuple[Work, Work]:
        gram = 2 * B * k * k * d
        fwd = Work(gram, B * k * d * elt + B * k * k * 4)
        return fwd, Work(gram, B * k * k * 4 + 2 * B * k * d * elt)

    def structural(k: int, ds: int, dt: int, e: int) -> tuple[Work, Work]:
        fwd = min(2 * B * k * k * (ds + dt), 2 * B * k * (ds * ds + ds * dt + dt * dt))
        bwd = min(2 * B * k * k * ds, 2 * B * k * ds * (ds + dt))
        return Work(fwd, B * k * ((ds + dt) * e + 5)), Work(bwd, B * k * ((2 * ds + dt) * e + 5))

    def alignment(d: int) -> tuple[Work, Work]:
        flops = 6 * B * T * d
        return Work(flops, 2 * B * T * d * elt + tok), Work(flops, 3 * B * T * d * elt + tok)

    def projection(ds: int, dt: int) -> tuple[Work, Work]:
        fwd = Work(2 * B * T * ds * dt, (B * T * (ds + dt) + ds * dt) * elt)
        return fwd, Work(4 * B * T * ds * dt, (2 * B * T * (ds + dt) + 2 * ds * dt) * elt)

    ds, dt = s.d_student, s.d_teacher
    if op == "token_importance":
        return [importance(dt)]
    if op == "span_pool":
        return [pool(s.K, ds, grad=True)]
    if op == "span_weights":
        return [weights(s.K)]
    if op == "pairwise_distance":
        return [distance(s.K, ds)]
    if op == "structural_loss":
        return [structural(s.K, ds, dt, elt)]
    if op == "hidden_alignment_loss":
        return [alignment(dt)]
    if op == "mta_loss":
        parts: list[tuple[Work, Work | None]] = []
        for granularity in GRANULARITIES:
            k = s.K if granularity == "word" else s.k_phrase
            parts += [
                importance(dt),
                pool(k, ds, grad=True),
                pool(k, dt, grad=False),
                weights(k),
                structural(k, ds, dt, 4),
                projection(ds, dt),
                alignment(dt),
            ]
        return parts
    raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")


def roofline_floor(
    op: str, mode: str, shape: Shape, dtype: str, copy_gb_s: float, tflop_s: float
) -> tuple[float, str]:
    """Fastest possible ms of ``op``/``mode`` given measured ceilings, and its bound.

    ``floor = Σ_kernels max(flops / tflop_s, bytes / copy_gb_s)``; the bound is ``HBM`` when the
    bytes term dominates the sum, ``MMA`` (bf16 matmul rate) otherwise.
    """
    elt = torch.finfo(DTYPES[dtype]).bits // 8
    works = [
        w
        for fwd, bwd in _op_work(op, shape, elt)
        for w in ((fwd,) if mode == "forward" else (bwd,) if mode == "backward" else (fwd, bwd))
        if w is not None
    ]
    flop_ms = [w.flops / (tflop_s * 1e12) * 1e3 for w in works]
    byte_ms = [w.bytes / (copy_gb_s * 1e9) * 1e3 for w in works]
    floor = sum(max(f, b) for f, b in zip(flop_ms, byte_ms, strict=True))
    return floor, ("HBM" if sum(byte_ms) >= sum(flop_ms) else "MMA")


# ----------------------------------------------------------------------------- op registry


@dataclass(frozen=True)
class OpSpec:
    """How to make inputs for, call, and size the output of one benchmarked op."""

    make_inputs: Callable[[_Maker], Inputs]
    call: Callable[[Any, dict[str, Any]], Tensor]
    out_shape: Callable[[Shape], tuple[int, ...]]
    forward_only: bool = False


OPS: dict[str, OpSpec] = {
    "token_importance": OpSpec(
        _token_importance_inputs,
        lambda ops, a: ops.token_importance(a["hidden"], a["attention_mask"]),
        lambda s: (s.B, s.T),
        forward_only=True,
    ),
    "span_pool": OpSpec(
        _span_pool_inputs,
        lambda ops, a: ops.span_pool(a["hidden"], a["spans"], a["span_mask"], a["token_weights"]),
        lambda s: (s.B, s.K, s.d_student),
    ),
    "span_weights": OpSpec(
        _span_weights_inputs,
        lambda ops, a: ops.span_weights(a["token_weights"], a["spans"], a["span_mask"]),
        lambda s: (s.B, s.K),
        forward_only=True,
    ),
    "pairwise_distance": OpSpec(
        _pairwise_distance_inputs,
        lambda ops, a: ops.pairwise_distance(a["units"], a["span_mask"], "cosine"),
        lambda s: (s.B, s.K, s.K),
    ),
    "structural_loss": OpSpec(
        _structural_loss_inputs,
        lambda ops, a: ops.structural_loss(
            a["student_units"], a["teacher_units"], a["span_weights"], a["span_mask"]
        ),
        lambda s: (),
    ),
    "hidden_alignment_loss": OpSpec(
        _hidden_alignment_inputs,
        lambda ops, a: ops.hidden_alignment_loss(
            a["student_hidden"], a["teacher_hidden"], a["token_weights"], a["token_mask"]
        ),
        lambda s: (),
    ),
    "mta_loss": OpSpec(_mta_loss_inputs, lambda ops, a: mta_loss(a), lambda s: ()),
}


def modes_for(op: str, modes: Sequence[str] = MODES) -> list[str]:
    """The requested modes that ``op`` has (forward only for ops without a gradient)."""
    return [m for m in modes if m == "forward" or not OPS[op].forward_only]


@functools.cache
def provider_forward(
    op: str, provider: str, compile_backend: str = "inductor"
) -> Callable[[dict[str, Any]], Tensor]:
    """``args -> output`` of ``op`` for a provider; compiled callables are cached per op."""
    call = OPS[op].call
    if provider == "mta":
        return functools.partial(call, mk)
    if provider == "eager":
        run = functools.partial(call, reference)
    elif provider == "compile":
        run = torch.compile(functools.partial(call, reference), backend=compile_backend)
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")

    def on_the_reference(args: dict[str, Any]) -> Tensor:
        # modules that call the public ops (MTALoss) take the reference on every device too
        with mk.prefer_reference(cuda=True):
            return run(args)

    return on_the_reference


def _forward_backward(
    forward: Callable[[dict[str, Any]], Tensor], args: dict[str, Any], grad: Tensor | None
) -> None:
    forward(args).backward(grad)


def build_case(
    op: str,
    provider: str,
    mode: str,
    shape: Shape,
    dtype: str,
    device: torch.device,
    *,
    n_sets: int = 3,
    seed: int = 0,
    compile_backend: str = "inductor",
) -> harness.Case:
    """``n_sets`` input sets of ``op`` and the timed call of ``mode`` on each.

    ``backward`` runs the forwards here (untimed) and times ``out.backward(g, retain_graph=True)``;
    non-scalar outputs get a fixed random float32 ``g``.
    """
    if mode not in modes_for(op):
        raise ValueError(f"mode must be one of {modes_for(op)} for {op}, got {mode!r}")
    forward = provider_forward(op, provider, compile_backend)
    sets = [
        OPS[op].make_inputs(_Maker(shape, DTYPES[dtype], device, seed + i)) for i in range(n_sets)
    ]
    gen = torch.Generator(device=device).manual_seed(seed)
    out_shape = OPS[op].out_shape(shape)
    grads = [
        torch.randn(out_shape, device=device, generator=gen) if out_shape else None for _ in sets
    ]
    if mode == "forward":
        calls = [functools.partial(forward, s.args) for s in sets]
    elif mode == "backward":
        outs = [forward(s.args) for s in sets]
        calls = [
            functools.partial(o.backward, g, retain_graph=True)
            for o, g in zip(outs, grads, strict=True)
        ]
    else:
        calls = [
            functools.partial(_forward_backward, forward, s.args, g)
            for s, g in zip(sets, grads, strict=True)
        ]
    return harness.Case(calls, [t for s in sets for t in s.leaves])


# ----------------------------------------------------------------------------- the sweep


def plan(
    ops: Sequence[str], dtypes: Sequence[str], quick: bool = False
) -> list[tuple[str, Shape, str]]:
    """(op, shape, dtype) entries in priority order, so a time budget cuts the least useful.

    Per dtype: every op at the paper's shape; the whole loss over T; the issue's target shapes
    (span pooling at T·d = 32M, the structural loss at K = 2400, d = 4096); every op over T; every
    op over d (``d_S = d_T = d``) at the paper's T. ``quick``: tiny shapes for CPU checks.
    """
    base = QUICK if quick else PAPER
    t_sweep = (64,) if quick else (1024, 2048, 4096, 8192)
    d_sweep = (32,) if quick else (768, 1600, 4096)
    targets = (
        []
        if quick
        else [
            ("span_pool", Shape(8, 8192, units_for(8192), 4096, 4096)),
            ("structural_loss", Shape(8, 4096, units_for(4096), 4096, 4096)),
        ]
    )

    def at_t(t: int) -> Shape:
        return dataclasses.replace(base, T=t, K=units_for(t))

    def at_d(d: int) -> Shape:
        return dataclasses.replace(base, d_student=d, d_teacher=d)

    entries: list[tuple[str, Shape, str]] = []
    for dtype in dtypes:
        entries += [(op, base, dtype) for op in OPS]
        entries += [("mta_loss", at_t(t), dtype) for t in t_sweep]
        entries += [(op, shape, dtype) for op, shape in targets]
        entries += [(op, at_t(t), dtype) for t in t_sweep for op in OPS]
        entries += [(op, at_d(d), dtype) for d in d_sweep for op in OPS]
    return [e for e in dict.fromkeys(entries) if e[0] in ops]


def csv_row(
    op: str,
    provider: str,
    mode: str,
    shape: Shape,
    dtype: str,
    outcome: harness.Outcome,
    gpu: str,
    commit: str,
) -> dict[str, str]:
    """One CSV row in :data:`harness.COLUMNS` order."""
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "dtype": dtype,
        "B": str(shape.B),
        "T": str(shape.T),
        "K": str(shape.K),
        "d_student": str(shape.d_student),
        "d_teacher": str(shape.d_teacher),
        **harness.outcome_fields(outcome),
        "gpu": gpu,
        "commit": commit,
        "date": harness.utc_now(),
    }


def sweep(
    entries: Sequence[tuple[str, Shape, str]],
    providers: Sequence[str],
    modes: Sequence[str],
    device: torch.device,
    csv_path: Path,
    *,
    budget_s: float = math.inf,
    run: Callable[..., harness.Outcome] = harness.run_case,
    **case_options: Any,
) -> list[dict[str, str]]:
    """Measure every entry × provider × mode, appending each row to ``csv_path`` as it comes.

    Stops before an entry once the elapsed time plus the longest entry so far exceeds
    ``budget_s``. ``case_options`` go to :func:`build_case` (``n_sets``, ``seed``,
    ``compile_backend``) and to ``run`` (``warmup_ms``, ``rep_ms``, ``cpu_reps``).
    """
    timing_keys = {"warmup_ms", "rep_ms", "cpu_reps"}
    run_options = {k: v for k, v in case_options.items() if k in timing_keys}
    build_options = {k: v for k, v in case_options.items() if k not in timing_keys}
    gpu, commit = harness.device_name(device), harness.git_commit()
    start, longest, rows = time.monotonic(), 0.0, []
    for index, (op, shape, dtype) in enumerate(entries):
        if time.monotonic() - start + longest > budget_s:
            harness.log(
                f"budget of {budget_s:.0f} s reached: {len(entries) - index} entries not run"
            )
            break
        entry_start = time.monotonic()
        for provider in providers:
            for mode in modes_for(op, modes):
                build = functools.partial(
                    build_case, op, provider, mode, shape, dtype, device, **build_options
                )
                outcome = run(build, device, **run_options)
                row = csv_row(op, provider, mode, shape, dtype, outcome, gpu, commit)
                harness.append_rows(csv_path, [row])
                rows.append(row)
                result = (
                    f"{row['ms_median']} ms, {row['peak_mem_mb'] or '-'} MiB"
                    if outcome.status == "ok"
                    else f"{outcome.status}: {outcome.message}"
                )
                harness.log(f"{op:<22} {provider:<8} {mode:<8} {dtype} {shape}: {result}")
        longest = max(longest, time.monotonic() - entry_start)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU harness check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    p.add_argument(
        "--budget-s",
        type=float,
        default=math.inf,
        help="stop adding shapes when this many seconds are (nearly) spent",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where ops_<card>.csv and device_peaks_<card>.json go "
        f"(default {RESULTS_DIR} on CUDA; required on CPU)",
    )
    p.add_argument("--n-sets", type=int, default=3, help="input sets timed round-robin")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--cpu-reps", type=int, default=3)
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile provider",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out_dir is None and torch.device(args.device).type != "cuda":
        p.error(
            "CPU runs check the harness and are not results: pass --out-dir (not "
            "benchmarks/results)"
        )
    if args.n_sets < 1:
        p.error(f"--n-sets must be >= 1, got {args.n_sets}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = harness.prepare_device(args.device)
    out_dir = args.out_dir or RESULTS_DIR
    slug = harness.card_slug(harness.device_name(device))
    peaks = harness.measure_device_peaks(device, quick=args.quick)
    harness.write_json(out_dir / f"device_peaks_{slug}.json", peaks)
    harness.log(
        f"{peaks['gpu']}: copy {peaks['copy_gb_s']:.0f} GB/s, "
        f"bf16 matmul {peaks['bf16_tflop_s']:.1f} TFLOP/s"
    )
    csv_path = out_dir / f"ops_{slug}.csv"
    rows = sweep(
        plan(args.ops, args.dtypes, quick=args.quick),
        args.providers,
        args.modes,
        device,
        csv_path,
        budget_s=args.budget_s,
        n_sets=args.n_sets,
        seed=args.seed,
        compile_backend=args.compile_backend,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps,
    )
    failed = sum(r["ms_median"] in (harness.OOM, harness.ERROR) for r in rows)
    harness.log(f"{len(rows)} rows ({failed} OOM/ERROR) appended to {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
