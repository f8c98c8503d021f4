"""The work of one MTA step as the kernels are designed, beside the floor of the same math.

For each part of one MTA step (``MTALoss`` forward + backward, 3 layer pairs: one word-level, two
phrase-level; bf16 hidden states) at a benchmark shape, this prints the floating-point operations
and the bytes the design moves, next to the floor that ``bench_ops`` measures speed against
(``bench_ops._op_work``: every input read once, every output written once, useful flops only).
The design figures follow the kernels' own launch parameters (the launchers' tile sizes for a GPU,
the structural loss's choice of backward) and count what the programs do:

* FLOPs include recomputation (token importance's second pass over the scores) and the three
  tensor-core products of each ``tf32x3`` dot on fp32 operands (column ``mma``);
* bytes are those the programs load and store, re-reads across tiles included (served by the L2
  cache while an example's operands fit there, which the paper's shape does).

Exact for the design as written; speed needs a GPU (``bench_ops`` measures it and prints the
achieved fraction of the floor). Usage::

    python -m benchmarks.roofline                   # the table
    python -m benchmarks.roofline --out benchmarks/results/roofline_model.csv
    python -m benchmarks.roofline --markdown benchmarks/results/roofline_model.csv
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from benchmarks import harness
from benchmarks.bench_ops import GRANULARITIES, PAPER, Shape, Work, _op_work, make_batch
from mta_kernels._switches import SWITCHES

RESULTS = Path(__file__).resolve().parent / "results" / "roofline_model.csv"
COLUMNS = (
    "part",
    "mma",
    "design_gflop",
    "floor_gflop",
    "design_mb",
    "floor_mb",
    "note",
)
_BF16, _FP32 = 2, 4  # bytes per element: hidden states, units and gradients

# the kernel modules themselves (the package re-exports functions under their names)
_token_importance, _structural, _span_pool = (
    importlib.import_module(f"mta_kernels.{name}")
    for name in ("token_importance", "structural_loss", "span_pool")
)


@dataclass(frozen=True)
class Part:
    part: str
    mma: str
    design: Work
    floor: Work
    note: str = ""


@contextlib.contextmanager
def _gpu_tiles() -> Iterator[None]:
    """The launchers' CUDA tile sizes, whatever this process runs the kernels on."""
    saved = SWITCHES.small_blocks
    SWITCHES.small_blocks = False
    try:
        yield
    finally:
        SWITCHES.small_blocks = saved


def _add(*works: Work) -> Work:
    return Work(sum(w.flops for w in works), sum(w.bytes for w in works))


def _floor(shape: Shape) -> dict[str, Work]:
    """The floor of each part, from the benchmark's model (forward + backward)."""
    parts = _op_work("mta_loss", shape, _BF16)
    names = ("importance", "pool_student", "pool_teacher", "weights", "structural", "proj", "hra")
    out: dict[str, list[Work]] = {name: [] for name in names}
    for i, (fwd, bwd) in enumerate(parts):
        out[names[i % len(names)]] += [fwd] + ([bwd] if bwd is not None else [])
    # the teacher layers are distinct per pair: one importance per pair, as the model counts
    return {name: _add(*works) for name, works in out.items()}


def parts(shape: Shape = PAPER) -> list[Part]:
    """The design and the floor of each part of one MTA step at ``shape``."""
    B, T, d_s, d_t = shape.B, shape.T, shape.d_student, shape.d_teacher
    units = {"word": shape.K, "phrase": shape.k_phrase}
    batch = make_batch(shape, torch.device("cpu"), seed=0)
    floor = _floor(shape)
    with _gpu_tiles():
        meta = _token_importance._launch_meta(T, d_t, torch.bfloat16)
        structural = [
            (units[g], _structural._meta("cosine", d_s, d_t, torch.float32)) for g in GRANULARITIES
        ]
        saved = [
            _structural.structural_design("cosine", k, d_s, d_t) == "saved" for k, _ in structural
        ]
        gather_t = _span_pool._gather_block_t()
    layers = len(GRANULARITIES)  # one teacher layer per pair

    # token importance: two passes over the score tiles (row statistics, then column sums)
    rows, cols = triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(T, meta["BLOCK_N"])
    score_pass = 2 * B * T * T * d_t
    # every score tile loads its query and its key rows: T·d·(rows + cols) per pass; the
    # inverse standard deviations read each row twice
    importance = Work(
        layers * 2 * score_pass,
        layers * B * T * d_t * _BF16 * (2 + 2 * (rows + cols)),
    )

    # span pooling: each valid span reads its tokens once; forward for both sides, the
    # student's backward gathers each token block's candidate spans
    covered = {
        g: int(((u.spans[..., 1] - u.spans[..., 0]) * u.mask).sum())
        for g, u in (("word", batch.word), ("phrase", batch.phrase))
    }
    pool_fwd = _add(
        *(
            Work(2 * covered[g] * (d_s + d_t), covered[g] * (d_s + d_t) * _BF16)
            for g in GRANULARITIES
        )
    )
    # a span of ℓ tokens is read by at most ℓ / BLOCK_T + 1 token blocks of the gather
    valid = {"word": int(batch.word.mask.sum()), "phrase": int(batch.phrase.mask.sum())}
    pool_bwd = _add(
        *(
            Work(
                2 * covered[g] * d_s,
                (covered[g] / gather_t + valid[g]) * d_s * _FP32 + B * T * d_s * _BF16,
            )
            for g in GRANULARITIES
        )
    )

    # rows normalized for the cosine Gram tiles: a pass over the units per side, and back
    normalize = _add(
        *(
            Work(6 * B * k * (2 * d_s + d_t), B * k * _FP32 * (2 * (d_s + d_t) + 3 * d_s))
            for k, _ in structural
        )
    )

    def structural_forward(k: int, m: dict, save: bool) -> Work:
        blocks = triton.cdiv(k, m["BLOCK_I"])
        tile_pairs = blocks * (blocks + 1) // 2
        tile = m["BLOCK_I"] * m["BLOCK_J"]
        return Work(
            3 * B * tile_pairs * 2 * tile * (d_s + d_t),  # tf32x3: three MMAs per product
            B * tile_pairs * (m["BLOCK_I"] + m["BLOCK_J"]) * (d_s + d_t) * _FP32
            + (B * k * k * _FP32 if save else 0),
        )

    def structural_backward(k: int, m: dict, save: bool) -> Work:
        row_blocks = triton.cdiv(k, m["BLOCK_I"])
        col_blocks = triton.cdiv(k, m["BLOCK_J"])
        tiles = B * row_blocks * col_blocks * m["BLOCK_I"] * m["BLOCK_J"]
        if save:  # the saved design: coefficients from V∘E, rows accumulated in registers
            d_blocks = triton.cdiv(d_s, 64)
            return Work(
                3 * 2 * tiles * d_s,
                tiles * _FP32 * d_blocks + B * k * d_s * _FP32 * (row_blocks + 1),
            )
        return Work(  # recompute both Gram tiles on every tile, then accumulate
            3 * 2 * tiles * (2 * d_s + d_t),
            B * row_blocks * (m["BLOCK_I"] + k) * (2 * d_s + d_t) * _FP32 * 2,
        )

    dsa = _add(
        *(
            _add(structural_forward(k, m, s), structural_backward(k, m, s))
            for (k, m), s in zip(structural, saved, strict=True)
        )
    )
    recompute = _add(
        *(
            _add(structural_forward(k, m, False), structural_backward(k, m, False))
            for k, m in structural
        )
    )

    # HRA: the dense projection (ATen, fp32: autocast is off inside MTALoss) and the alignment
    # kernels (forward reads both sides, backward both again and writes the student's gradient)
    projection = Work(layers * 6 * B * T * d_s * d_t, layers * B * T * (d_s + 3 * d_t) * _FP32 * 2)
    alignment = Work(
        layers * 12 * B * T * d_t,
        layers * B * T * d_t * (2 * (_FP32 + _BF16) + _FP32),
    )

    choice = "saved error matrix" if all(saved) else "recompute (K > d_S + d_T)"
    return [
        Part(
            "token importance (3 teacher layers)",
            "bf16",
            importance,
            floor["importance"],
            "two passes over the score tiles: the second recomputes them",
        ),
        Part(
            "span pooling (both sides forward, the student's backward)",
            "—",
            _add(pool_fwd, pool_bwd),
            _add(floor["pool_student"], floor["pool_teacher"]),
            "phrases cover fewer tokens than the floor model's T; each backward token block "
            "reads its candidate spans' gradients",
        ),
        Part("span weights", "—", floor["weights"], floor["weights"]),
        Part(
            "row normalization of the units (both sides, and back)",
            "—",
            normalize,
            Work(0, 0),
            "a separate pass: not fused into the structural kernels",
        ),
        Part(
            "structural loss forward + backward",
            "tf32x3",
            dsa,
            floor["structural"],
            f"backward: {choice}; tf32x3 counts three MMAs per product",
        ),
        Part(
            "structural loss, had the backward recomputed the Grams",
            "tf32x3",
            recompute,
            floor["structural"],
            "the design used when K > d_S + d_T, for comparison",
        ),
        Part(
            "HRA projection forward + backward (ATen)",
            "fp32",
            projection,
            floor["proj"],
            "dense x·W over all B·T tokens: the largest part of the step (fp32; "
            "MTALoss(projection_dtype=torch.bfloat16) runs it on bf16 tensor cores)",
        ),
        Part("hidden alignment forward + backward", "—", alignment, floor["hra"]),
    ]


def rows(shape: Shape = PAPER) -> list[dict[str, object]]:
    return [
        dict(
            part=p.part,
            mma=p.mma,
            design_gflop=f"{p.design.flops / 1e9:.3f}",
            floor_gflop=f"{p.floor.flops / 1e9:.3f}",
            design_mb=f"{p.design.bytes / 1e6:.2f}",
            floor_mb=f"{p.floor.bytes / 1e6:.2f}",
            note=p.note,
        )
        for p in parts(shape)
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    return harness.read_rows(path, COLUMNS)


def markdown_table(path: Path) -> str:
    shape = PAPER
    lines = [
        f"Computed by `python -m benchmarks.roofline --out {Path(path).as_posix()}` (the design "
        f"as written, not a measurement; B={shape.B}, T={shape.T}, K={shape.K} words / "
        f"{shape.k_phrase} phrases, d_S={shape.d_student}, d_T={shape.d_teacher}, bf16 states, "
        "MTALoss forward + backward, 3 layer pairs).",
        "",
        harness.markdown_table(
            (
                "part",
                "MMA operands",
                "design GFLOP",
                "floor GFLOP",
                "design MB",
                "floor MB",
                "note",
            ),
            [[r[column] for column in COLUMNS] for r in read_csv(path)],
            right=range(2, 6),
        ),
    ]
    return "\n".join(lines)


def _render(table: Sequence[dict[str, object]]) -> str:
    return "\n".join(
        f"{r['part']:<58} {r['mma']:>6}  {r['design_gflop']:>9} / {r['floor_gflop']:>9} GFLOP"
        f"  {r['design_mb']:>9} / {r['floor_mb']:>9} MB"
        for r in table
    )


def main(argv: Sequence[str] | None = None) -> int:
    return harness.model_main(argv, __doc__.splitlines()[0], rows, COLUMNS, markdown_table, _render)


if __name__ == "__main__":
    sys.exit(main())
