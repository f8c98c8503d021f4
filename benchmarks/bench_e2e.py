"""End-to-end cost of MTA in one distillation step of a GPT-2 pair built from configs.

Variants (same models, same batches), all on the shipped modules: ``base`` = forward-KL
distillation alone on the models' logits (:func:`mta.kd_losses.distillation_loss`);
``fused_head`` = the same forward KL through :func:`mta.kd_losses.fused_linear_distillation_loss`
(both models run without their LM heads; no ``[B, T, V]`` logits); ``mta`` = base + the MTA term of
:class:`mta.loss.MTALoss` (the default :func:`mta.layers.plan_layers` of the pair, the batch's
:class:`mta.unit_plan.UnitPlan`) through the fused ``mta_kernels`` ops; ``eager`` = the same
through the eager reference (``mta_kernels.prefer_reference(cuda=True)``).
A step is teacher forward (no grad), student forward, loss, backward and an AdamW step; on CUDA
the models run under bf16 autocast (teacher weights in bf16, student master weights in fp32) and
the MTA term outside autocast (its math is fp32 by spec). Weights are random: the cost of a step
does not depend on them.

The overhead of a variant is ``(ms_variant − ms_base) / ms_base`` (the paper's MTA overhead is
+0.85; the fused head's is expected below 0, with a lower peak memory).

Usage::

    python -m benchmarks.bench_e2e                      # GPT-2 1.5B -> 124M sizes, B=8, T=512
    python -m benchmarks.bench_e2e --preset tiny --device cpu --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mta_kernels as mk
from benchmarks import harness
from benchmarks.bench_ops import RESULTS_DIR, Shape, make_batch, units_for
from mta.kd_losses import distillation_loss, fused_linear_distillation_loss
from mta.layers import plan_layers
from mta.loss import MTALoss

E2E_COLUMNS = (
    "variant",
    "preset",
    "B",
    "T",
    "d_student",
    "d_teacher",
    "ms_median",
    "ms_p20",
    "ms_p80",
    "peak_mem_mb",
    "overhead",
    "gpu",
    "commit",
    "date",
)
VARIANTS = ("base", "fused_head", "mta", "eager")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Preset:
    """GPT-2 student / teacher sizes as (layers, width, heads), vocabulary, batch and length."""

    student: tuple[int, int, int]
    teacher: tuple[int, int, int]
    vocab: int
    B: int
    T: int


PRESETS = {
    "paper": Preset(student=(12, 768, 12), teacher=(48, 1600, 25), vocab=50257, B=8, T=512),
    "tiny": Preset(student=(4, 32, 2), teacher=(8, 48, 4), vocab=128, B=2, T=32),
}


@dataclass
class Models:
    teacher: nn.Module
    student: nn.Module
    mta_loss: MTALoss  # the default layer plan of the pair, with its projectors
    optimizer: torch.optim.Optimizer
    preset: Preset


def build_models(preset: Preset, device: torch.device, seed: int = 0) -> Models:
    """Random-weight GPT-2 teacher (bf16 on CUDA, frozen) and student (fp32) from configs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def config(layers: int, width: int, heads: int) -> GPT2Config:
        return GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            vocab_size=preset.vocab,
            n_positions=max(1024, preset.T),
        )

    torch.manual_seed(seed)
    with torch.device(device):
        teacher = GPT2LMHeadModel(config(*preset.teacher)).eval().requires_grad_(False)
        student = GPT2LMHeadModel(config(*preset.student)).train()
        pairs = plan_layers(preset.student[0], preset.teacher[0])
        mta_loss = MTALoss(preset.student[1], preset.teacher[1], pairs)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    params = [*student.parameters(), *mta_loss.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return Models(teacher, student, mta_loss, optimizer, preset)


def make_step_batch(preset: Preset, device: torch.device, seed: int) -> dict[str, Any]:
    """Random token ids, a right-padded mask, labels (-100 on padding) and MTA units."""
    shape = Shape(preset.B, preset.T, units_for(preset.T), preset.student[1], preset.teacher[1])
    units = make_batch(shape, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    input_ids = torch.randint(preset.vocab, (preset.B, preset.T), device=device, generator=gen)
    labels = input_ids.masked_fill(units.attention_mask == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": units.attention_mask,
        "labels": labels,
        "unit_plan": units.plan,
    }


def train_step(models: Models, variant: str, batch: dict[str, Any]) -> None:
    """One distillation step: KD loss (+ the MTA term unless ``variant == "base"``), AdamW step."""
    device = batch["input_ids"].device
    with_mta = variant in ("mta", "eager")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "output_hidden_states": with_mta,
    }
    with autocast:
        if variant == "fused_head":  # last hidden states only, the heads fused into the loss
            with torch.no_grad():
                teacher_out = models.teacher.transformer(**inputs)
            student_out = models.student.transformer(**inputs)
            loss = fused_linear_distillation_loss(
                student_out.last_hidden_state,
                models.student.lm_head.weight,
                teacher_out.last_hidden_state,
                models.teacher.lm_head.weight,
                batch["labels"],
                kind="fkl",
            )
        else:
            with torch.no_grad():
                teacher_out = models.teacher(**inputs)
            student_out = models.student(**inputs)
            loss = distillation_loss(
                student_out.logits, teacher_out.logits, batch["labels"], kind="fkl"
            )
    if with_mta:
        reference = (
            mk.prefer_reference(cuda=True) if variant == "eager" else contextlib.nullcontext()
        )
        with reference:  # MTALoss runs its own math outside autocast
            mta = models.mta_loss(
                student_out.hidden_states, teacher_out.hidden_states, batch["unit_plan"]
            )
        loss = loss + mta.loss
    loss.backward()
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def build_step_case(
    models: Models, variant: str, device: torch.device, n_sets: int, seed: int
) -> harness.Case:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    batches = [make_step_batch(models.preset, device, seed + i) for i in range(n_sets)]
    return harness.Case([functools.partial(train_step, models, variant, b) for b in batches], [])


def e2e_row(
    preset_name: str,
    variant: str,
    outcome: harness.Outcome,
    base_ms: float | None,
    gpu: str,
    commit: str,
) -> dict[str, str]:
    """One row in :data:`E2E_COLUMNS`; ``overhead = (ms − base_ms) / base_ms`` when both exist."""
    preset = PRESETS[preset_name]
    overhead = ""
    if variant != "base" and base_ms is not None and outcome.timing is not None:
        overhead = f"{(outcome.timing.median - base_ms) / base_ms:.4f}"
    return {
        "variant": variant,
        "preset": preset_name,
        "B": str(preset.B),
        "T": str(preset.T),
        "d_student": str(preset.student[1]),
        "d_teacher": str(preset.teacher[1]),
        **harness.outcome_fields(outcome),
        "overhead": overhead,
        "gpu": gpu,
        "commit": commit,
        "date": harness.utc_now(),
    }


def run_e2e(
    preset_name: str,
    variants: Sequence[str],
    device: torch.device,
    csv_path: Path | None = None,
    *,
    n_sets: int = 2,
    seed: int = 0,
    warmup_ms: float = 300.0,
    rep_ms: float = 1500.0,
    cpu_reps: int = 2,
) -> list[dict[str, str]]:
    """Measure ``base``, then the other variants: one row each, in :data:`E2E_COLUMNS`.

    Each row is appended to ``csv_path`` as soon as it is measured, so a run cut short keeps its
    rows. OOM / ERROR are recorded, never raised.
    """
    if "base" not in variants:
        raise ValueError(
            f"variants must include 'base' (the overhead is relative to it): {variants}"
        )
    gpu, commit = harness.device_name(device), harness.git_commit()
    try:
        models = build_models(PRESETS[preset_name], device, seed)
    except Exception as exc:  # every variant gets the row that says why
        status = harness.OOM if harness.is_oom(exc) else harness.ERROR
        models, failure = None, harness.Outcome(None, None, status, f"building models: {exc}")
    rows, base_ms = [], None
    for variant in sorted(set(variants), key=VARIANTS.index):
        if models is None:
            outcome = failure
        else:
            build = functools.partial(build_step_case, models, variant, device, n_sets, seed)
            outcome = harness.run_case(
                build, device, warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_reps=cpu_reps
            )
        if variant == "base" and outcome.timing is not None:
            base_ms = outcome.timing.median
        rows.append(e2e_row(preset_name, variant, outcome, base_ms, gpu, commit))
        if csv_path is not None:
            harness.append_rows(csv_path, rows[-1:], E2E_COLUMNS)
        result = rows[-1]["ms_median"] + " ms" if outcome.timing else outcome.message
        harness.log(f"e2e {preset_name} {variant:<6}: {outcome.status} {result}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="paper")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where e2e_<card>.csv goes (default {RESULTS_DIR} on CUDA; required on CPU)",
    )
    p.add_argument("--n-sets", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = harness.prepare_device(args.device)
    if args.out_dir is None and device.type != "cuda":
        p.error("CPU runs check the harness and are not results: pass --out-dir")
    slug = harness.card_slug(harness.device_name(device))
    path = (args.out_dir or RESULTS_DIR) / f"e2e_{slug}.csv"
    run_e2e(args.preset, args.variants, device, path, n_sets=args.n_sets, seed=args.seed)
    harness.log(f"e2e rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
