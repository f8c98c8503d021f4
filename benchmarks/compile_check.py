"""Compile every Triton kernel for a GPU target on a machine without a GPU, and count spills.

The interpreter that CI runs the kernels through accepts programs the real compiler rejects and
says nothing about registers. This compiles each kernel variant the launchers use on CUDA (their
own tile-size functions, at the paper's shapes) ahead of time for ``sm_90`` by default, runs the
``ptxas`` shipped with Triton on the PTX and reports registers and spill bytes::

    python -m benchmarks.compile_check            # sm_90, all variants
    python -m benchmarks.compile_check --arch 80  # another target

It must run without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction`` objects).
Exit status 1 if a variant fails to compile or spills more than ``--max-spill-bytes``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Launchers choose CUDA tile sizes only when not in the interpreter.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import importlib

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The package re-exports functions under the modules' names: fetch the modules themselves.
_common, hidden_alignment, pairwise_distance, span_pool, structural_loss, token_importance = (
    importlib.import_module(f"mta_kernels.{name}")
    for name in (
        "_common",
        "hidden_alignment",
        "pairwise_distance",
        "span_pool",
        "structural_loss",
        "token_importance",
    )
)

F32, BF16, I32, I64, BOOL = "*fp32", "*bf16", "*i32", "*i64", "*i1"
# Paper shapes (docs/design.md §4): T = 512, d_S = 768, d_T = 1600.
TOKENS, WIDTH_S, WIDTH_T = 512, 768, 1600


@dataclass
class Variant:
    name: str
    kernel: triton.JITFunction
    types: dict[str, str]  # runtime argument -> Triton type
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3


def _split(meta: dict) -> tuple[dict, int, int]:
    """Launch meta-parameters -> (constexprs, num_warps, num_stages)."""
    constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
    return constexprs, meta.get("num_warps", 4), meta.get("num_stages", 3)


def variants() -> list[Variant]:
    out: list[Variant] = []
    for dtype, torch_dtype in ((BF16, torch.bfloat16), (F32, torch.float32)):
        meta, warps, stages = _split(token_importance._launch_meta(TOKENS, WIDTH_T, torch_dtype))
        layers = {f"h{i}_ptr": dtype for i in range(token_importance.LAYERS_PER_LAUNCH)}
        common = dict(
            layers, inv_std_ptr=F32, mask_ptr=I64, B="i32", T="i32", D="i32", scale="fp32"
        )
        out.append(
            Variant(
                f"token_importance.row_stats {dtype}",
                token_importance._row_stats_kernel,
                {**common, "row_max_ptr": F32, "row_factor_ptr": F32},
                meta,
                warps,
                stages,
            )
        )
        out.append(
            Variant(
                f"token_importance.column_sum {dtype}",
                token_importance._column_sum_kernel,
                {**common, "row_max_ptr": F32, "row_factor_ptr": F32, "out_ptr": F32},
                meta,
                warps,
                stages,
            )
        )
    out.append(
        Variant(
            "token_importance.inv_std",
            token_importance._inv_std_kernel,
            dict(
                {f"h{i}_ptr": BF16 for i in range(token_importance.LAYERS_PER_LAUNCH)},
                mask_ptr=I64,
                inv_std_ptr=F32,
                n_rows="i32",
                D="i32",
                eps="fp32",
            ),
            dict(BLOCK_D=_common.block_size(WIDTH_T, 1024)),
        )
    )
    for name, kernel, types in (
        (
            "row_normalize.fwd",
            _common.row_normalize_fwd_kernel,
            dict(x_ptr=F32, out_ptr=F32, inv_norm_ptr=F32, D="i32", eps="fp32"),
        ),
        (
            "row_normalize.bwd",
            _common.row_normalize_bwd_kernel,
            dict(
                x_ptr=F32,
                inv_norm_ptr=F32,
                grad_hat_ptr=F32,
                valid_ptr=BOOL,
                grad_x_ptr=F32,
                D="i32",
                eps="fp32",
            ),
        ),
    ):
        out.append(Variant(name, kernel, types, dict(BLOCK_D=_common.block_size(WIDTH_T, 1024))))
    span_types = dict(
        h_ptr=BF16,
        w_ptr=F32,
        starts_ptr=I32,
        ends_ptr=I32,
        out_ptr=F32,
        wsum_ptr=F32,
        T="i32",
        K="i32",
        D="i32",
        eps="fp32",
    )
    out.append(
        Variant(
            "span_pool.sum",
            span_pool._span_sum_kernel,
            span_types,
            dict(
                HAS_WEIGHTS=True,
                NORMALIZE=True,
                BLOCK_T=8,
                BLOCK_D=_common.block_size(WIDTH_S, 256, floor=1),
            ),
        )
    )
    out.append(
        Variant(
            "span_pool.weights",
            span_pool._span_weights_kernel,
            dict(
                w_ptr=F32,
                starts_ptr=I32,
                ends_ptr=I32,
                valid_ptr=BOOL,
                out_ptr=F32,
                total_ptr=F32,
                T="i32",
                K="i32",
                eps="fp32",
            ),
            dict(BLOCK_K=_common.block_size(300, 128), BLOCK_L=8),
        )
    )
    gather_types = dict(
        g_ptr=F32,
        divisor_ptr=F32,
        w_ptr=F32,
        h_ptr=BF16,
        order_ptr=I32,
        sorted_starts_ptr=I32,
        sorted_ends_ptr=I32,
        k_lo_ptr=I32,
        k_hi_ptr=I32,
        out_ptr=BF16,
        dot_ptr=F32,
        T="i32",
        K="i32",
        D="i32",
        n_blocks="i32",
        n_rows="i32",
        eps="fp32",
    )
    out.append(
        Variant(
            "span_pool.gather",
            span_pool._span_gather_kernel,
            gather_types,
            dict(
                HAS_DIVISOR=True,
                HAS_WEIGHTS=True,
                WITH_DOT=True,
                WRITE_OUT=True,
                BLOCK_T=span_pool._gather_block_t(),
                BLOCK_D=span_pool.gather_block_d(WIDTH_S),
            ),
        )
    )
    for metric in ("cosine", "euclidean"):
        metric_id = pairwise_distance.METRIC_IDS[metric]
        for rows, rows_dtype in ((F32, torch.float32), (BF16, torch.bfloat16)):
            meta, warps, stages = _split(pairwise_distance.tile_sizes(metric, WIDTH_S, rows_dtype))
            precision = _common.dot_precision() if rows == F32 else "ieee"
            constexprs = dict(meta, METRIC=metric_id, PRECISION=precision)
            out.append(
                Variant(
                    f"pairwise_distance.fwd {metric} {rows}",
                    pairwise_distance._distance_fwd_kernel,
                    dict(
                        x_ptr=rows,
                        valid_ptr=BOOL,
                        out_ptr=F32,
                        partial_ptr=F32,
                        K="i32",
                        D="i32",
                        n_j="i32",
                    ),
                    constexprs,
                    warps,
                    stages,
                )
            )
            out.append(
                Variant(
                    f"pairwise_distance.bwd {metric} {rows}",
                    pairwise_distance._distance_bwd_kernel,
                    dict(
                        x_ptr=rows,
                        valid_ptr=BOOL,
                        grad_out_ptr=F32,
                        dist_ptr=F32,
                        inv_mean_ptr=F32,
                        coupling_ptr=F32,
                        grad_x_ptr=F32,
                        K="i32",
                        D="i32",
                    ),
                    constexprs,
                    warps,
                    stages,
                )
            )
            smeta, swarps, sstages = _split(
                structural_loss._meta(metric, WIDTH_S, WIDTH_T, rows_dtype)
            )
            smeta["PRECISION"] = precision
            unit_types = dict(
                student_ptr=rows,
                teacher_ptr=rows,
                weight_ptr=F32,
                valid_ptr=BOOL,
                inv_mean_ptr=F32,
                K="i32",
                D_S="i32",
                D_T="i32",
            )
            for stage in (0, 1) if metric == "euclidean" else (1,):
                out.append(
                    Variant(
                        f"structural_loss.fwd {metric} stage={stage} {rows}",
                        structural_loss._structural_fwd_kernel,
                        dict(unit_types, tile_pairs_ptr=I32, partial_ptr=F32),
                        dict(smeta, STAGE=stage),
                        swarps,
                        sstages,
                    )
                )
            out.append(
                Variant(
                    f"structural_loss.bwd {metric} {rows}",
                    structural_loss._structural_bwd_kernel,
                    dict(
                        unit_types,
                        coupling_ptr=F32,
                        scale_ptr=F32,
                        grad_student_ptr=F32,
                        grad_teacher_ptr=F32,
                        grad_weight_ptr=F32,
                    ),
                    dict(smeta, NEED_STUDENT=True, NEED_TEACHER=False, NEED_WEIGHTS=True),
                    swarps,
                    sstages,
                )
            )
    block_t, block_d = hidden_alignment._blocks(WIDTH_T)
    out.append(
        Variant(
            "hidden_alignment.fwd",
            hidden_alignment._hidden_alignment_fwd_kernel,
            dict(
                s_ptr=F32,
                t_ptr=BF16,
                weight_ptr=F32,
                keep_ptr=BOOL,
                stats_ptr=F32,
                partial_ptr=F32,
                T="i32",
                D="i32",
                n_blocks="i32",
                n_rows="i32",
                eps="fp32",
            ),
            dict(BLOCK_T=block_t, BLOCK_D=block_d),
        )
    )
    out.append(
        Variant(
            "hidden_alignment.bwd",
            hidden_alignment._hidden_alignment_bwd_kernel,
            dict(
                s_ptr=F32,
                t_ptr=BF16,
                weight_ptr=F32,
                keep_ptr=BOOL,
                stats_ptr=F32,
                scale_ptr=F32,
                grad_s_ptr=F32,
                grad_t_ptr=BF16,
                T="i32",
                D="i32",
                n_rows="i32",
            ),
            dict(NEED_STUDENT=True, NEED_TEACHER=False, BLOCK_T=block_t, BLOCK_D=block_d),
        )
    )
    return out


def _ptxas(arch: int) -> str:
    """The ``ptxas`` Triton itself uses for this target (it ships more than one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def compile_variant(variant: Variant, arch: int) -> tuple[int, int]:
    """Compile for ``sm_<arch>``; (registers, spill-store bytes) reported by ``ptxas -v``."""
    kernel = variant.kernel
    signature = {}
    for arg in kernel.arg_names:
        if arg in variant.constexprs:
            signature[arg] = "constexpr"
        elif arg in variant.types:
            signature[arg] = variant.types[arg]
        else:
            raise KeyError(f"{variant.name}: no type given for argument {arg!r}")
    source = ASTSource(kernel, signature, variant.constexprs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(compiled.asm["ptx"])
    suffix = "a" if arch == 90 else ""
    try:
        report = subprocess.run(
            [_ptxas(arch), f"-arch=sm_{arch}{suffix}", "-v", handle.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    finally:
        os.unlink(handle.name)
    registers = max(int(r) for r in re.findall(r"Used (\d+) registers", report))
    spills = max(int(s) for s in re.findall(r"(\d+) bytes spill stores", report))
    return registers, spills


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--max-spill-bytes", type=int, default=128)
    parser.add_argument("--only", default="", help="compile only variants whose name contains this")
    args = parser.parse_args(argv)
    failures = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    for variant in variants():
        if args.only not in variant.name:
            continue
        try:
            registers, spills = compile_variant(variant, args.arch)
        except Exception as error:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL  {variant.name}: {type(error).__name__}: {str(error)[:500]}")
            continue
        bad = spills > args.max_spill_bytes
        failures += bad
        print(
            f"{'SPILL' if bad else 'ok   '} {variant.name}: {registers} registers, "
            f"{spills} bytes spilled, {variant.num_warps} warps"
        )
    print(f"{failures} failing variant(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
