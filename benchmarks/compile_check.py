"""Compile every Triton kernel the launchers launch, for a GPU target, on a machine without a GPU.

The interpreter that CI runs the kernels through accepts programs the real compiler rejects and
says nothing about registers. This runs the shipped launchers — a whole MTA step (``MTALoss``
forward and backward) and every public op, at the paper's shape, bf16 and fp32 — on CPU tensors
under a stand-in driver that reports an ``sm_90`` device, and records each launch at the point
where Triton's JIT would compile it (``triton.knobs.runtime.jit_cache_hook``): the kernel, its
argument types with the JIT's own specializations (pointer alignment, integers divisible by 16,
integers equal to 1), constexprs, precision, warps and stages. Nothing is launched. Each distinct
variant is then compiled ahead of time and the ``ptxas`` shipped with Triton reports registers
and spill bytes::

    python -m benchmarks.compile_check            # sm_90, every launched variant
    python -m benchmarks.compile_check --arch 80  # another target

It must run without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction`` objects).
Tensors allocated on the CPU are 64-byte aligned, like the CUDA caching allocator's (512), so the
alignment specializations are those of a GPU run. Exit status 1 if a variant fails to compile or
spills more than ``--max-spill-bytes``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Launchers choose CUDA tile sizes only when not in the interpreter.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

import mta_kernels as mk
from mta.layers import LayerPair
from mta.loss import MTALoss
from mta.unit_plan import UnitPlan
from mta_kernels._switches import SWITCHES

# The paper's shape (docs/design.md §4).
BATCH, TOKENS, WIDTH_S, WIDTH_T, WORDS, PHRASES = 8, 512, 768, 1600, 300, 100
PAIRS = (LayerPair(1, 2, "word"), LayerPair(2, 4, "phrase"), LayerPair(3, 6, "phrase"))


@dataclass(frozen=True)
class Launch:
    """One kernel variant as the JIT would compile it."""

    kernel: triton.JITFunction
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        """The kernel, its pointer dtypes and its declared constexprs."""
        names, declared = self.kernel.arg_names, set(self.kernel.constexprs)
        meta = " ".join(
            f"{names[path[0]]}={value}"
            for path, value in self.constexprs.items()
            if path[0] in declared
        )
        dtypes = "/".join(sorted({t[1:] for t in self.signature.values() if t.startswith("*")}))
        return f"{self.kernel.__name__} [{dtypes}] {meta} (÷16: {self.divisible_ints or '-'})"

    @property
    def divisible_ints(self) -> str:
        """The integer arguments the JIT specialized as divisible by 16."""
        names = self.kernel.arg_names
        return ",".join(
            names[path[0]]
            for path, attrs in self.attrs.items()
            if not self.signature[names[path[0]]].startswith("*")
            and ["tt.divisibility", 16] in [list(a) for a in attrs]
        )


class _StandInDriver:
    """What ``JITFunction.run`` asks of the active driver before it compiles."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextlib.contextmanager
def recorded_launches(arch: int) -> Iterator[dict[str, Launch]]:
    """Inside this block the fused ops run on CPU tensors and every kernel launch is recorded
    (by its JIT cache key) instead of compiled and launched."""
    launches: dict[str, Launch] = {}

    def hook(*, key, fn, compile, **_) -> bool:
        launches.setdefault(
            str(key),
            Launch(
                fn.jit_function,
                dict(compile["signature"]),
                dict(compile["constants"]),
                compile["configs"][0],
                compile["num_warps"],
                compile["num_stages"],
            ),
        )
        return True  # skip compiling and launching

    saved = copy.copy(SWITCHES)
    previous_hook = triton.knobs.runtime.jit_cache_hook
    previous_driver = driver._active  # None until a GPU driver was made (none can be here)
    driver.set_active(_StandInDriver(arch))
    triton.knobs.runtime.jit_cache_hook = hook
    # CPU tensors take the launchers (as under the interpreter), with the CUDA tile sizes
    SWITCHES.interpreter, SWITCHES.small_blocks, SWITCHES.poison_outputs = True, False, False
    try:
        yield launches
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(previous_driver)
        for field, value in vars(saved).items():
            setattr(SWITCHES, field, value)


def _spans(count: int, low: int, high: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """[B, count, 2] sorted spans of ``low``..``high`` tokens from token 0 on, and their mask."""
    lengths = torch.randint(low, high + 1, (BATCH, count), generator=gen)
    ends = lengths.cumsum(-1).clamp_max(TOKENS)
    starts = torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), ends[:, :-1]], dim=-1)
    return torch.stack([starts, ends], dim=-1), ends > starts


def _plan(cross: bool, gen: torch.Generator) -> UnitPlan:
    attention = torch.ones(BATCH, TOKENS, dtype=torch.long)
    attention[1:, -40:] = 0
    batch = {"attention_mask": attention}
    for g, count, (low, high) in (("word", WORDS, (1, 2)), ("phrase", PHRASES, (2, 6))):
        spans, mask = _spans(count, low, high, gen)
        batch[f"{g}_student_spans"], batch[f"{g}_span_mask"] = spans, mask
        if cross:
            batch[f"{g}_teacher_spans"] = spans
    if cross:
        batch["teacher_attention_mask"] = attention
    return UnitPlan.from_batch(batch)


def workloads() -> dict[str, Callable[[], None]]:
    """What the launchers are driven with: the MTA step as training runs it, and each public op
    with every input needing grad (the variants a direct caller can reach)."""
    gen = torch.Generator().manual_seed(0)

    def mta_step(
        dtype: torch.dtype, metric: str, cross: bool, variant: str = "paper"
    ) -> Callable[[], None]:
        def run() -> None:
            module = MTALoss(WIDTH_S, WIDTH_T, PAIRS, metric=metric, variant=variant)
            student = {
                p.student_layer: torch.randn(BATCH, TOKENS, WIDTH_S, dtype=dtype).requires_grad_()
                for p in PAIRS
            }
            teacher = {
                p.teacher_layer: torch.randn(BATCH, TOKENS, WIDTH_T, dtype=dtype) for p in PAIRS
            }
            module(student, teacher, _plan(cross, gen)).loss.backward()

        return run

    def ops(dtype: torch.dtype) -> None:
        hidden = torch.randn(BATCH, TOKENS, WIDTH_S, dtype=dtype, requires_grad=True)
        weights = torch.rand(BATCH, TOKENS, requires_grad=True)
        units = _plan(False, gen)["word"]
        pooled = mk.span_pool(hidden, units.student, token_weights=weights)
        plain = mk.span_pool(hidden, units.student)
        p = mk.span_weights(weights, units.student)
        rows = torch.randn(BATCH, WORDS, WIDTH_S, dtype=dtype, requires_grad=True)
        teacher_rows = torch.randn(BATCH, WORDS, WIDTH_T, dtype=dtype, requires_grad=True)
        total = pooled.sum() + plain.sum() + p.sum()
        for metric in ("cosine", "euclidean"):
            total = total + mk.pairwise_distance(rows, units.mask, metric).sum()
            total = total + mk.structural_loss(rows, teacher_rows, p, units.mask, metric)
        projected = torch.randn(BATCH, TOKENS, WIDTH_T, dtype=dtype, requires_grad=True)
        target = torch.randn(BATCH, TOKENS, WIDTH_T, dtype=dtype, requires_grad=True)
        total = total + mk.hidden_alignment_loss(projected, target, weights, units.coverage)
        total.backward()
        mk.token_importance(target.detach(), torch.ones(BATCH, TOKENS, dtype=torch.long))
        # one key block: the key range is not split (n_split = 1, an int the JIT specializes)
        short = target.detach()[:, :64]
        mk.token_importance(short, torch.ones(BATCH, 64, dtype=torch.long))

    def many_units(dtype: torch.dtype) -> None:
        """K of the order of d: the structural backward recomputes its tiles (above d_S + d_T,
        below the cosine moments form's K)."""
        for metric, units in (
            ("cosine", WIDTH_S + WIDTH_T + 32),
            ("euclidean", WIDTH_S + WIDTH_T),
        ):
            rows = torch.randn(2, units, WIDTH_S, dtype=dtype, requires_grad=True)
            teacher_rows = torch.randn(2, units, WIDTH_T, dtype=dtype, requires_grad=True)
            p = torch.rand(2, units, requires_grad=True)
            mask = torch.ones(2, units, dtype=torch.bool)
            mk.structural_loss(rows, teacher_rows, p, mask, metric).backward()

    out: dict[str, Callable[[], None]] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[f"MTA step {name} cosine"] = mta_step(dtype, "cosine", cross=False)
        out[f"MTA step {name} euclidean"] = mta_step(dtype, "euclidean", cross=False)
        out[f"MTA step {name} cross-tokenizer"] = mta_step(dtype, "cosine", cross=True)
        out[f"MTA step {name} authors_code"] = mta_step(
            dtype, "cosine", cross=False, variant="authors_code"
        )
        out[f"public ops {name}"] = lambda dtype=dtype: ops(dtype)
        out[f"structural loss of many units {name}"] = lambda dtype=dtype: many_units(dtype)
    return out


def record(arch: int) -> list[Launch]:
    """Every distinct kernel variant the workloads launch, in first-launch order."""
    with recorded_launches(arch) as launches:
        for run in workloads().values():
            run()
    return list(launches.values())


def never_launched(launches: list[Launch]) -> list[str]:
    """The kernels (``*_kernel`` JIT functions of ``mta_kernels``) no workload launched."""
    defined = {
        f"{module.__name__}.{name}"
        for module in (sys.modules[m] for m in list(sys.modules) if m.startswith("mta_kernels."))
        for name, value in vars(module).items()
        if isinstance(value, triton.JITFunction) and name.endswith("_kernel")
    }
    seen = {f"{launch.kernel.__module__}.{launch.kernel.__name__}" for launch in launches}
    return sorted(defined - seen)


def _ptxas(arch: int) -> str:
    """The ``ptxas`` Triton itself uses for this target (it ships more than one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def compile_launch(launch: Launch, arch: int) -> tuple[int, int]:
    """Compile for ``sm_<arch>``; (registers, spill-store bytes) reported by ``ptxas -v``."""
    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages),
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
    launches = record(args.arch)
    missing = never_launched(launches)
    failures = len(missing)
    print(f"triton {triton.__version__}, target sm_{args.arch}: {len(launches)} launched variants")
    for name in missing:
        print(f"FAIL  {name}: no workload launches it, so it is not checked")
    for launch in launches:
        if args.only not in launch.name:
            continue
        try:
            registers, spills = compile_launch(launch, args.arch)
        except Exception as error:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL  {launch.name}: {type(error).__name__}: {str(error)[:500]}")
            continue
        bad = spills > args.max_spill_bytes
        failures += bad
        print(
            f"{'SPILL' if bad else 'ok   '} {launch.name}: {registers} registers, "
            f"{spills} bytes spilled, {launch.num_warps} warps, {launch.num_stages} stages"
        )
    print(f"{failures} failing variant(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
