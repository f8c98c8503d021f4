"""Timing, peak memory, device ceilings and the results CSV shared by every benchmark.

Follows Liger-Kernel's practice: a benchmark case is a list of zero-argument callables, one per
input set; on CUDA they are timed round-robin with ``triton.testing.do_bench`` (CUDA events,
warm-up, L2 flushed between runs) at the quantiles median / p20 / p80, and the peak memory is
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (the inputs),
maximized over the input sets. On CPU a plain ``perf_counter`` timer stands in (it exists so the
harness itself is tested in CI; CPU numbers are not results) and no memory is recorded.

A provider that runs out of memory yields a row whose time and memory fields read ``OOM``; any
other exception yields ``ERROR`` (the message goes to stderr). Rows are never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

COLUMNS = (
    "op",
    "provider",
    "mode",
    "dtype",
    "B",
    "T",
    "K",
    "d_student",
    "d_teacher",
    "ms_median",
    "ms_p20",
    "ms_p80",
    "peak_mem_mb",
    "gpu",
    "commit",
    "date",
)
QUANTILES = (0.5, 0.2, 0.8)  # the order of Timing's fields
OOM = "OOM"
ERROR = "ERROR"
MIB = 2**20


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median: float
    p20: float
    p80: float


@dataclass
class Case:
    """What one (op, provider, mode, shape, dtype) measurement runs.

    ``calls[i]()`` runs the timed region on input set ``i``; ``grad_to_none`` are the leaves whose
    ``.grad`` is reset before every call so that gradients are allocated, never accumulated.
    """

    calls: list[Callable[[], object]]
    grad_to_none: list[Tensor]


@dataclass(frozen=True)
class Outcome:
    """Result of :func:`run_case`: a timing and peak MiB (None on CPU), or OOM / ERROR."""

    timing: Timing | None
    peak_mem_mb: float | None
    status: str = "ok"  # "ok", OOM or ERROR
    message: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[Tensor] = (),
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_reps: int = 5,
) -> Timing:
    """Median / p20 / p80 milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (``warmup_ms``/``rep_ms`` are its warm-up and repetition
    times). CPU: one warm-up call then ``cpu_reps`` calls timed with ``time.perf_counter``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(
            fn,
            warmup=warmup_ms,
            rep=rep_ms,
            grad_to_none=list(grad_to_none),
            quantiles=list(QUANTILES),
        )
        return Timing(median, p20, p80)
    _reset_grads(grad_to_none)
    fn()
    times = []
    for _ in range(cpu_reps):
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor(QUANTILES, dtype=torch.float64)
    )
    return Timing(median.item(), p20.item(), p80.item())


def peak_memory_mb(case: Case, device: torch.device) -> float | None:
    """Max over input sets of the peak extra CUDA memory (MiB) of one call; None on CPU."""
    if device.type != "cuda":
        return None
    peak = 0
    for call in case.calls:
        _reset_grads(case.grad_to_none)
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        peak = max(peak, torch.cuda.max_memory_allocated(device) - baseline)
    return peak / MIB


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or host) out-of-memory error, whichever way it was raised."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Return freed CUDA blocks to the driver (collecting reference cycles first); no-op on CPU."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_case(
    build: Callable[[], Case],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_reps: int = 5,
) -> Outcome:
    """Build a case, warm it up, record its peak memory and timing; OOM/errors become outcomes.

    The case and the exception (whose traceback holds the tensors) are released before the cache
    is emptied, so one provider's OOM does not starve the next one.
    """
    failure: tuple[str, str] | None = None
    case: Case | None = None
    try:
        case = build()
        outcome = _measure(case, device, warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_reps=cpu_reps)
    except Exception as exc:  # recorded as a row; the sweep goes on
        failure = (OOM if is_oom(exc) else ERROR, f"{type(exc).__name__}: {exc}")
    del case
    free_memory(device)
    if failure is not None:
        return Outcome(None, None, *failure)
    return outcome


def _measure(
    case: Case, device: torch.device, *, warmup_ms: float, rep_ms: float, cpu_reps: int
) -> Outcome:
    case.calls[0]()  # warm-up: compilation and autotuning stay out of memory and time
    peak = peak_memory_mb(case, device)
    rotation = itertools.cycle(case.calls)
    timing = time_fn(
        lambda: next(rotation)(),
        device,
        grad_to_none=case.grad_to_none,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        cpu_reps=cpu_reps,
    )
    return Outcome(timing, peak)


def prepare_device(name: str) -> torch.device:
    """``torch.device(name)``; on CPU also one intra-op thread (stable timings on shared hosts)."""
    device = torch.device(name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    return device


def machine() -> str:
    """Short host description: OS, architecture, CPU model (Linux), CPU count, Python version."""
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if models:
            cpu += f" {models[0].strip()}"
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def card_slug(name: str) -> str:
    """File-name form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> str:
    """``$MTA_COMMIT`` if set, else ``git describe --always --dirty``, else ``unknown``."""
    if os.environ.get("MTA_COMMIT"):
        return os.environ["MTA_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def outcome_fields(outcome: Outcome) -> dict[str, str]:
    """The ``ms_*`` and ``peak_mem_mb`` CSV fields of an outcome."""
    if outcome.timing is None:
        peak = OOM if outcome.status == OOM else ""
        return {
            "ms_median": outcome.status,
            "ms_p20": outcome.status,
            "ms_p80": outcome.status,
            "peak_mem_mb": peak,
        }
    t = outcome.timing
    peak = "" if outcome.peak_mem_mb is None else f"{outcome.peak_mem_mb:.1f}"
    return {
        "ms_median": f"{t.median:.4f}",
        "ms_p20": f"{t.p20:.4f}",
        "ms_p80": f"{t.p80:.4f}",
        "peak_mem_mb": peak,
    }


def append_rows(
    path: Path, rows: Iterable[Mapping[str, object]], columns: Sequence[str] = COLUMNS
) -> None:
    """Append rows to a CSV, writing the header when the file is new.

    Raises ValueError if an existing file has other columns or a row has missing/extra keys.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(columns):
            raise ValueError(
                f"{path} has columns {header}, expected {list(columns)}; write to a new file"
            )
        new = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        for row in rows:
            if set(row) != set(columns):
                raise ValueError(f"row keys {sorted(row)} differ from the columns {list(columns)}")
            writer.writerow(row)


def write_rows(
    path: Path, rows: Iterable[Mapping[str, object]], columns: Sequence[str] = COLUMNS
) -> None:
    """Replace a results CSV with ``rows`` (see :func:`append_rows`)."""
    Path(path).unlink(missing_ok=True)
    append_rows(path, rows, columns)


def model_main(
    argv: Sequence[str] | None,
    description: str,
    compute: Callable[[], Sequence[Mapping[str, object]]],
    columns: Sequence[str],
    markdown: Callable[[Path], str],
    render: Callable[[Sequence[Mapping[str, object]]], str],
) -> int:
    """The command line of a model computed on any machine (``--out CSV`` writes its rows,
    ``--markdown CSV`` prints the README table of a committed CSV); the rows computed are printed
    as ``render`` makes them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="write the CSV here")
    parser.add_argument("--markdown", type=Path, metavar="CSV", help="print the table of a CSV")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(args.markdown))
        return 0
    table = compute()
    if args.out is not None:
        write_rows(args.out, table, columns)
    print(render(table))
    return 0


def markdown_table(
    header: Sequence[str], body: Iterable[Sequence[object]], right: Container[int] = ()
) -> str:
    """A Markdown table (no final newline); the columns numbered in ``right`` are right-aligned
    (numbers)."""
    rule = "|" + "".join("---:|" if i in right else "---|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    return "\n".join(lines)


def read_rows(path: Path, columns: Sequence[str] = COLUMNS) -> list[dict[str, str]]:
    """Rows of a results CSV as dicts; ValueError if its header is not exactly ``columns``."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(columns):
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(columns)}")
        return list(reader)


def measure_device_peaks(device: torch.device, quick: bool = False) -> dict[str, object]:
    """Measured ceilings for the roofline: device copy bandwidth and bf16 matmul rate.

    Copy: ``dst.copy_(src)`` of a 1 GiB fp32 tensor (8 MiB with ``quick``), counting bytes read plus
    written. Matmul: ``a @ b`` of random bf16 ``n×n`` matrices, ``n = 8192`` (256 with ``quick``),
    ``2 n³`` flops. Both timed with :func:`time_fn` (median).
    """
    numel = 2**21 if quick else 2**28
    n = 256 if quick else 8192
    copy_ms = _copy_ms(numel, device)
    matmul_ms = _matmul_ms(n, device)
    copy_bytes = 2 * numel * 4
    free_memory(device)
    import triton

    return {
        "gpu": device_name(device),
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_gb_s": copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_n": n,
        "matmul_ms": matmul_ms,
        "bf16_tflop_s": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": utc_now(),
    }


def _copy_ms(numel: int, device: torch.device) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device).median


def _matmul_ms(n: int, device: torch.device) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return time_fn(lambda: a @ b, device).median


def write_json(path: Path, data: Mapping[str, object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def log(message: str) -> None:
    """Progress line on stderr (flushed: the device tool shows only the output's tail)."""
    print(message, file=sys.stderr, flush=True)
