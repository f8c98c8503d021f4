"""From the paper's equations to the authors' released code, one difference at a time, measured.

On one random batch (bf16-like hidden states with a shared direction, padded examples, tiling
word units and overlapping phrases; 3 layer pairs: one word-level, two phrase-level), each row
applies one more of the differences of docs/design.md §8 and reports ``L_DSA``, ``L_HRA`` and
``loss = 2.0 L_DSA + 0.2 L_HRA``. The first row is ``MTALoss(variant="paper")`` and the last
``MTALoss(variant="authors_code")`` (checked to 1e-6 when the table is made); the rows between are
compositions of the same ``mta_kernels`` ops. A last row gives the DSA that sums over pairs
``i < j`` only, as other reproductions do: half the paper's.

Usage::

    python -m benchmarks.variants                      # the table
    python -m benchmarks.variants --out benchmarks/results/variants_cpu.csv
    python -m benchmarks.variants --markdown benchmarks/results/variants_cpu.csv
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import mta_kernels as mk
from benchmarks import harness
from mta.layers import LayerPair
from mta.loss import MTALoss
from mta.spans import pad_unit_spans
from mta.unit_plan import UnitPlan

RESULTS = Path(__file__).resolve().parent / "results" / "variants_cpu.csv"
COLUMNS = ("step", "equations", "released", "L_DSA", "L_HRA", "loss")
B, T, D_S, D_T = 4, 48, 32, 48
PAIRS = (LayerPair(2, 4, "word"), LayerPair(3, 6, "phrase"), LayerPair(4, 8, "phrase"))
LAMBDA_DSA, LAMBDA_HRA = 2.0, 0.2

#: The differences, in the order they are applied (each row keeps the ones above it):
#: (step, the equations, the released code).
STEPS = (
    ("paper", "the equations: MTALoss(variant='paper')", "—"),
    (
        "release_weights",
        "token weights: H / (std + 1e-8), mean over valid rows",
        "H / (std + 1e-5), mean over all rows, padding rows included",
    ),
    (
        "student_pooling",
        "student units pooled with the teacher's weights",
        "with the student's own weights",
    ),
    (
        "batch_dsa",
        "DSA: per-example sum, batch mean",
        "batch total over the batch total of pair weights",
    ),
    (
        "membership_hra",
        "HRA: Σ_t w_t c_t (1 − cos) per example, batch mean",
        "over (token, unit) memberships, normalized per example, mean over examples with units",
    ),
    ("bias", "projector Linear without bias", "with a bias"),
    (
        "hra_mean",
        "L_HRA: the sum over layer pairs",
        "the mean over layer pairs (= MTALoss(variant='authors_code'))",
    ),
)


def batch(seed: int = 0) -> tuple[list[Tensor], list[Tensor], UnitPlan]:
    """Student states (5 layers), teacher states (9 layers) and the unit plan of the batch."""
    gen = torch.Generator().manual_seed(seed)

    def states(layers: int, width: int) -> list[Tensor]:
        shared = torch.randn(B, 1, width, generator=gen)
        return [
            (torch.randn(B, T, width, generator=gen) + shared).bfloat16().float()
            for _ in range(layers)
        ]

    lengths = [T, T - 7, T - 15, T - 22]
    attention = torch.zeros(B, T, dtype=torch.long)
    words, phrases = [], []
    for b, length in enumerate(lengths):
        attention[b, :length] = 1
        cuts = torch.randperm(length - 1, generator=gen)[: length // 3].add(1).sort().values
        bounds = [0, *cuts.tolist(), length]
        words.append(list(itertools.pairwise(bounds)))
        starts = torch.randint(0, length - 4, (length // 4,), generator=gen).tolist()
        phrases.append(sorted((s, s + 2 + (s * 7) % 5) for s in starts))
    features = [
        {
            f"{g}_{model}_spans": np.array(units[b], np.int64).reshape(-1, 2)
            for g, units in (("word", words), ("phrase", phrases))
            for model in ("student", "teacher")
        }
        for b in range(B)
    ]
    plan = UnitPlan.from_batch({"attention_mask": attention, **pad_unit_spans(features)})
    return states(5, D_S), states(9, D_T), plan


def _terms(
    student: list[Tensor],
    teacher: list[Tensor],
    plan: UnitPlan,
    projectors: dict[int, torch.nn.Linear],
    applied: set[str],
) -> tuple[float, float]:
    """(L_DSA, L_HRA) with the differences in ``applied``."""
    options = {"std_eps": 1e-5, "padding_rows": True} if "release_weights" in applied else {}
    dsa_terms, hra_terms = [], []
    mask = plan.attention_mask
    for pair in PAIRS:
        h_s, h_t = student[pair.student_layer], teacher[pair.teacher_layer]
        unit = plan[pair.granularity]
        w_t = mk.token_importance(h_t, mask, **options)
        w_s = mk.token_importance(h_s, mask, **options) if "student_pooling" in applied else w_t
        u_t = mk.span_pool(h_t, unit.teacher, token_weights=w_t)
        u_s = mk.span_pool(h_s, unit.student, token_weights=w_s)
        counts = unit.coverage
        total = (w_t * counts).sum(-1)  # Z: the weight of every membership
        floored = total.clamp_min(1e-5)
        p = mk.span_weights(w_t, unit.teacher)
        if "batch_dsa" in applied:
            p = p * (total.clamp_min(1e-8) / floored)[:, None]
            pair_weights = p.sum(-1).square() - p.square().sum(-1)
            numerator = mk.structural_loss(u_s, u_t, p, unit.mask, reduction="none")
            dsa_terms.append(numerator.sum() / pair_weights.sum().clamp_min(1e-5))
        else:
            dsa_terms.append(mk.structural_loss(u_s, u_t, p, unit.mask))
        projector = projectors[pair.student_layer]
        projected = h_s @ projector.weight.T
        if "bias" in applied:
            projected = projected + projector.bias
        if "membership_hra" in applied:
            per_example = mk.hidden_alignment_loss(
                projected, h_t, w_t * counts / floored[:, None], counts, reduction="none"
            )
            hra_terms.append(per_example.sum() / (total / floored).sum().clamp_min(1e-5))
        else:
            hra_terms.append(mk.hidden_alignment_loss(projected, h_t, w_t, counts))
    hra = torch.stack(hra_terms)
    return float(torch.stack(dsa_terms).mean()), float(
        hra.mean() if "hra_mean" in applied else hra.sum()
    )


def rows(seed: int = 0) -> list[dict[str, str]]:
    """One row per step of :data:`STEPS`, then the i<j DSA; the ends checked against MTALoss."""
    student, teacher, plan = batch(seed)
    torch.manual_seed(seed)
    released = MTALoss(D_S, D_T, PAIRS, variant="authors_code")
    projectors = {int(k): v for k, v in released.projectors.items()}
    paper = MTALoss(D_S, D_T, PAIRS)
    with torch.no_grad():
        for layer, projector in paper.projectors.items():
            projector.weight.copy_(released.projectors[layer].weight)
    values: dict[str, tuple[float, float]] = {}
    applied: set[str] = set()
    with torch.no_grad(), mk.prefer_reference():
        for name, *_ in STEPS:
            applied.add(name)
            values[name] = _terms(student, teacher, plan, projectors, applied)
        ends = {
            "paper": paper(student, teacher, plan).components,
            "hra_mean": released(student, teacher, plan).components,
        }
    for step, components in ends.items():
        for got, key in zip(values[step], ("dsa", "hra"), strict=True):
            if abs(got - float(components[key])) > 1e-6 * abs(float(components[key])):
                raise AssertionError(f"{step}: {key} {got} != MTALoss's {float(components[key])}")
    out = [_row(name, paper, release, *values[name]) for name, paper, release in STEPS]
    dsa, hra = values["paper"]
    out.append(
        _row(
            "pairs_i_lt_j",
            "DSA over ordered pairs i ≠ j",
            "over pairs i < j only (other reproductions)",
            dsa / 2,
            hra,
        )
    )
    return out


def _row(step: str, paper: str, release: str, dsa: float, hra: float) -> dict[str, str]:
    loss = LAMBDA_DSA * dsa + LAMBDA_HRA * hra
    return {
        "step": step,
        "equations": paper,
        "released": release,
        "L_DSA": f"{dsa:.6g}",
        "L_HRA": f"{hra:.6g}",
        "loss": f"{loss:.6g}",
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    return harness.read_rows(path, COLUMNS)


def _table(table: Sequence[dict[str, str]]) -> str:
    return harness.markdown_table(
        ("the equations", "the released code (cumulative)", "L_DSA", "L_HRA", "loss"),
        [[r["equations"], r["released"], r["L_DSA"], r["L_HRA"], r["loss"]] for r in table],
        right=range(2, 5),
    )


def markdown_table(path: Path) -> str:
    return (
        f"Computed by `python -m benchmarks.variants --out {Path(path).as_posix()}` on one random "
        f"batch (B={B}, T={T} with padding, d_S={D_S}, d_T={D_T}, 3 layer pairs, the same "
        "projector weights in every row); each row adds one difference to those above it, and "
        "loss = 2 L_DSA + 0.2 L_HRA.\n\n" + _table(read_csv(path))
    )


def main(argv: Sequence[str] | None = None) -> int:
    return harness.model_main(argv, __doc__.splitlines()[0], rows, COLUMNS, markdown_table, _table)


if __name__ == "__main__":
    sys.exit(main())
