"""How accurate each operand precision is, modelled exactly on the CPU: the structural loss (its
Gram products) and the HRA projection, at the paper's shape.

Tensor cores read tf32 or bf16 operands and accumulate in fp32: ``tf32`` keeps 10 mantissa bits
of each fp32 operand (the other 13 cut off), ``tf32x3`` splits each operand into a tf32 head
(rounded to nearest, ties away) and tail and adds ``a_h b_t + a_t b_h`` to ``a_h b_h``, ``bf16``
keeps 7 bits (round to nearest even), and ``ieee`` is plain fp32. This module treats the
operands so, multiplies them in fp32 on the CPU (only the order of the fp32 additions differs
from a GPU) and compares the results with float64. It models the arithmetic, not a kernel:
``tests/test_precision.py`` runs the kernels themselves in each mode against float64 on CUDA.

* **Structural loss (cosine)**: fp32 unit-norm rows (column ``bf16``: bf16 rows, what bf16 units
  of a direct caller get; ``MTALoss`` pools in fp32), both Gram matrices and the student's row
  gradient ``−4 Σ_j W_ij E_ij Û_j`` with the mode's products; two regimes: independent geometries
  (early in training) and teacher = student + 1e-2 noise (late: the loss only sees differences of
  1e-2, so every rounding of a Gram entry weighs ~100× more).
* **HRA projection** ``W h`` (``MTALoss(projection_dtype=...)``): fp32 (PyTorch's own fp32 GEMM,
  or tf32 when the user enables ``torch.backends.cuda.matmul.allow_tf32``) or bf16 operands and
  output; the HRA loss and the projector's weight gradient.

Usage::

    python -m benchmarks.precision                      # the table
    python -m benchmarks.precision --out benchmarks/results/precision_model.csv
    python -m benchmarks.precision --markdown benchmarks/results/precision_model.csv
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import harness

RESULTS = Path(__file__).resolve().parent / "results" / "precision_model.csv"
MODES = ("ieee", "tf32x3", "tf32", "bf16")
COLUMNS = ("part", "regime", "quantity", *MODES)


@dataclass(frozen=True)
class Shape:
    B: int = 8
    K: int = 300
    tokens: int = 512
    d_student: int = 768
    d_teacher: int = 1600


PAPER = Shape()


def round_tf32(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to tf32 (10 mantissa bits, ties away from zero): the conversion
    (``cvt.rna.tf32.f32``) that splits each operand into head and tail in ``tf32x3``."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def truncate_tf32(x: Tensor) -> Tensor:
    """fp32 ``x`` cut to tf32 (the low 13 mantissa bits dropped): what a tensor core reads from
    an fp32 register handed to it unconverted, as plain ``tf32`` dots do (assumed here; the
    CUDA test of tests/test_precision.py holds the kernels to it)."""
    return (x.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def round_bf16(x: Tensor) -> Tensor:
    return x.float().to(torch.bfloat16).float()


def product(a: Tensor, b: Tensor, mode: str) -> Tensor:
    """``a @ b`` of fp32 operands as ``tl.dot(..., input_precision=mode)`` computes it (``bf16``:
    operands rounded to bf16), accumulated in fp32."""
    a, b = a.float(), b.float()
    if mode == "ieee":
        return a @ b
    if mode == "tf32":
        return truncate_tf32(a) @ truncate_tf32(b)
    if mode == "tf32x3":
        a_head, b_head = round_tf32(a), round_tf32(b)
        a_tail, b_tail = round_tf32(a - a_head), round_tf32(b - b_head)
        return a_head @ b_tail + a_tail @ b_head + a_head @ b_head
    if mode == "bf16":
        return round_bf16(a) @ round_bf16(b)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def hidden_like(n: int, d: int, gen: torch.Generator, batch: int) -> Tensor:
    """[batch, n, d] float64 rows shaped like an LM's hidden states: a shared direction (cosines
    ≈ 0.5) and four outlier dimensions 10× larger than the rest."""
    shared = torch.randn(batch, 1, d, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64) + shared
    x[..., :4] *= 10.0
    return x


def _rel(x: Tensor, exact: Tensor) -> float:
    return float((x.double() - exact).norm() / exact.norm())


def _dsa(student: Tensor, teacher: Tensor, p: Tensor, mode: str | None) -> tuple[Tensor, Tensor]:
    """Per-example cosine DSA loss [B] and the student's row gradient; float64 when ``mode`` is
    None, else fp32 rows (bf16 for the bf16 mode) and the mode's products."""
    s = torch.nn.functional.normalize(student, dim=-1)
    t = torch.nn.functional.normalize(teacher, dim=-1)
    num_units = s.shape[1]
    off_diagonal = ~torch.eye(num_units, dtype=torch.bool)
    pair_weight = (p.unsqueeze(2) * p.unsqueeze(1)) * off_diagonal
    if mode is None:
        error = t @ t.mT - s @ s.mT
        return (pair_weight * error.square()).sum((1, 2)), -4.0 * (pair_weight * error) @ s
    s, t = s.float(), t.float()
    if mode == "bf16":
        s, t = round_bf16(s), round_bf16(t)
    error = product(t, t.mT, mode) - product(s, s.mT, mode)
    coef = -4.0 * pair_weight.float() * error
    loss = (pair_weight.float() * error.square()).sum((1, 2))
    return loss, product(coef, s, mode)


def _hra(
    x: Tensor, weight: Tensor, target: Tensor, mode: str | None
) -> tuple[Tensor, Tensor] | None:
    """HRA loss ``mean_t (1 − cos(W x_t, h_t))`` and its gradient w.r.t. ``W``; float64 when
    ``mode`` is None; ``bf16`` rounds operands and outputs as a bf16 GEMM does."""
    if mode == "tf32x3":
        return None  # no such GEMM in PyTorch
    if mode is None:
        projected = x @ weight.mT
    else:
        projected = product(x, weight.mT, mode).double()
        if mode == "bf16":
            projected = round_bf16(projected).double()
    norm_y, norm_h = projected.norm(dim=-1, keepdim=True), target.norm(dim=-1, keepdim=True)
    cos = (projected * target).sum(-1, keepdim=True) / (norm_y * norm_h)
    loss = (1.0 - cos).mean()
    grad_y = -(target / (norm_y * norm_h) - cos * projected / norm_y.square()) / x.shape[0]
    if mode is None:
        return loss, grad_y.mT @ x
    grad_w = product(grad_y.float().mT, x, mode)
    if mode == "bf16":
        grad_w = round_bf16(grad_w)
    return loss, grad_w


def rows(shape: Shape = PAPER, seed: int = 0) -> list[dict[str, str]]:
    """One row per (part, regime, quantity): the relative error of each mode against float64."""
    gen = torch.Generator().manual_seed(seed)
    B, K, d_s, d_t = shape.B, shape.K, shape.d_student, shape.d_teacher
    student = hidden_like(K, d_s, gen, B)
    embed = torch.linalg.qr(torch.randn(d_t, d_s, generator=gen, dtype=torch.float64))[0]
    regimes = {
        "independent": hidden_like(K, d_t, gen, B),
        # the student's geometry carried into d_T by an isometry, plus 1e-2 relative noise
        "teacher = student + 1e-2": student @ embed.mT
        + 1e-2 * student.std() * torch.randn(B, K, d_t, generator=gen, dtype=torch.float64),
    }
    p = torch.rand(B, K, generator=gen, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    out: list[dict[str, str]] = []

    def add(part: str, regime: str, run: Callable[[str | None], tuple | None]) -> None:
        exact = run(None)
        got = {mode: run(mode) for mode in MODES}
        for i, quantity in enumerate(("loss", "gradient")):
            row = {"part": part, "regime": regime, "quantity": quantity}
            for mode, value in got.items():
                row[mode] = "—" if value is None else f"{_rel(value[i], exact[i]):.1e}"
            out.append(row)

    for regime, teacher in regimes.items():
        add("structural loss (cosine)", regime, lambda mode, t=teacher: _dsa(student, t, p, mode))

    # student states arrive in bf16 and are cast up; the teacher's relate to them through W
    tokens = round_bf16(hidden_like(shape.tokens, d_s, gen, B).reshape(-1, d_s)).double()
    weight = torch.linalg.qr(torch.randn(d_t, d_s, generator=gen, dtype=torch.float64))[0]
    target = tokens @ weight.mT + torch.randn(tokens.shape[0], d_t, generator=gen).double() * 3.0
    add("HRA projection", "fp32 weights", lambda mode: _hra(tokens, weight, target, mode))
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    return harness.read_rows(path, COLUMNS)


def _table(table: Sequence[dict[str, str]]) -> str:
    return harness.markdown_table(
        COLUMNS, [[r[c] for c in COLUMNS] for r in table], right=range(3, len(COLUMNS))
    )


def markdown_table(path: Path) -> str:
    shape = PAPER
    return (
        f"Computed by `python -m benchmarks.precision --out {Path(path).as_posix()}` (operands "
        "rounded as tensor cores round them, fp32 accumulation on the CPU, against float64; "
        f"B={shape.B}, K={shape.K} units, {shape.tokens} tokens per example, "
        f"d_S={shape.d_student}, d_T={shape.d_teacher}). Relative error of the per-example "
        "losses and of the gradient: the student's unit-norm rows (DSA), the projector's "
        "weight (HRA).\n\n" + _table(read_csv(path))
    )


def main(argv: Sequence[str] | None = None) -> int:
    return harness.model_main(argv, __doc__.splitlines()[0], rows, COLUMNS, markdown_table, _table)


if __name__ == "__main__":
    sys.exit(main())
