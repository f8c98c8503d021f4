"""Device launches and host synchronizations of one MTA step, counted on any machine.

The step is ``MTALoss`` forward and backward for three layer pairs — one word-level pair with 30
units, two phrase-level pairs with 12 — at ``B = 2, T = 64`` (a shared tokenizer), on the batch's
:class:`~mta.unit_plan.UnitPlan` as the collator builds it (on the CPU, outside the step), run
twice: with the fused ops (Triton kernels; through the interpreter on a CPU) and with the eager
reference ops.
What a GPU would be asked to do is counted while it runs:

* **Triton launches**: every ``kernel[grid](...)`` call (interpreter or compiled).
* **ATen launches**: every ATen operator that would launch device work, seen by a
  ``TorchDispatchMode`` — inside the project's custom ops too. Views and other aliasing or
  metadata-only operators are left out, and so are allocations (``empty``), which take memory
  from the caching allocator without a launch, and operators on tensors without elements.
* **Host synchronizations**: operators that read a device value back to the host
  (``_local_scalar_dense``: ``.item()``, ``.tolist()``, ``bool(tensor)``) or whose output shape
  depends on device data (``nonzero`` and friends).
* **Host-to-device copies**: tensors made from host data (``torch.tensor(...)``), each a copy to
  the device (and a stall of the launch queue when the host memory is pageable).

One uncounted step runs first, so what is cached across steps is not counted.

Usage::

    python -m benchmarks.launch_count                 # prints the table
    python -m benchmarks.launch_count --out benchmarks/results/launch_count.csv

The counts are exact. They depend on the tile sizes and column splits the launchers choose: the
committed CSV is the CPU run's (the interpreter's tiles), which a test checks is current
(docs/design.md §4); on a GPU, larger tiles can remove a reduction or two.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if "triton" not in sys.modules and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # count the kernels on a CPU, too

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mta_kernels as mk
from benchmarks import harness
from mta.layers import LayerPair
from mta.loss import MTALoss
from mta.unit_plan import UnitPlan

RESULTS = Path(__file__).resolve().parent / "results" / "launch_count.csv"
COLUMNS = ("path", "triton", "aten", "launches", "host_syncs", "host_to_device", "detail")

# The step of the issue that set the launch budget (60 launches, 0 host syncs).
BATCH, TOKENS, STUDENT_WIDTH, TEACHER_WIDTH = 2, 64, 32, 48
WORD_UNITS, PHRASE_UNITS = 30, 12
PAIRS = (LayerPair(1, 2, "word"), LayerPair(2, 4, "phrase"), LayerPair(3, 6, "phrase"))

# Operators whose result (a host value, or an output shape) depends on device data.
_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}
# Tensor methods that hand a device value to Python (each one synchronizes; counted once, not
# again for the _local_scalar_dense it may call).
_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
# torch.tensor(host data): a copy to the device.
_HOST_DATA = {"lift_fresh", "lift_fresh_copy"}
# Allocations, detaching, and the 0-d wrappers of Python scalars (kernel arguments on a GPU).
_NO_LAUNCH = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "scalar_tensor",
    "_unsafe_view",  # a view that autograd does not track (matmul's reshapes)
}


@dataclass
class Counts:
    triton: collections.Counter = field(default_factory=collections.Counter)
    aten: collections.Counter = field(default_factory=collections.Counter)
    syncs: collections.Counter = field(default_factory=collections.Counter)
    host_to_device: collections.Counter = field(default_factory=collections.Counter)
    paused: int = 0
    """> 0 while an operator's own work runs (a kernel in the interpreter, a sync method):
    what it does inside is part of it, not more launches."""

    @property
    def launches(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())


class _DispatchCounter(TorchDispatchMode):
    """Counts ATen operators; runs the project's custom ops under itself so that the operators
    their launchers call are counted as well."""

    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counts.paused:
            return func(*args, **kwargs)
        namespace = func.namespace
        name = func._schema.name.split("::")[-1]
        if namespace == "mta":  # a launcher: count what it does, not the op itself
            opdef = torch._library.custom_ops.OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if name in _SYNCS:
            self.counts.syncs[name] += 1
        elif name in _HOST_DATA:
            self.counts.host_to_device[name] += 1
        elif not (func.is_view or name in _NO_LAUNCH or _empty(out)):
            self.counts.aten[name] += 1
        return out


def _empty(out: object) -> bool:
    """An operator whose outputs hold no element launches nothing on a GPU."""
    tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


@contextlib.contextmanager
def _triton_launches(counts: Counts) -> Iterator[None]:
    """Count every ``kernel[grid](...)`` by kernel name."""
    import triton.runtime.interpreter as interpreter
    from triton.runtime.jit import JITFunction

    patched = []
    for cls in (interpreter.InterpretedFunction, JITFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not kwargs.get("warmup", False):
                counts.triton[self.__name__] += 1
            counts.paused += 1  # the interpreter's own tensor copies are not launches
            try:
                return _original(self, *args, **kwargs)
            finally:
                counts.paused -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


@contextlib.contextmanager
def _sync_methods(counts: Counts) -> Iterator[None]:
    """Count the tensor methods that hand a device value to Python."""
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def counted(name: str, original: Callable) -> Callable:
        def method(self, *args, **kwargs):
            if not counts.paused:
                counts.syncs[name] += 1
            counts.paused += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counts.paused -= 1

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def count(fn: Callable[[], object]) -> Counts:
    """What ``fn()`` asks the device for."""
    counts = Counts()
    with _triton_launches(counts), _sync_methods(counts), _DispatchCounter(counts):
        fn()
    return counts


def _spans(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sorted, non-overlapping spans of 1–3 tokens per example, some invalid."""
    spans = torch.zeros(BATCH, count, 2, dtype=torch.long)
    mask = torch.zeros(BATCH, count, dtype=torch.bool)
    for b in range(BATCH):
        start = 0
        for k in range(count):
            end = min(TOKENS, start + int(torch.randint(1, 4, (1,), generator=generator)))
            if end > start:
                spans[b, k] = torch.tensor([start, end])
                mask[b, k] = True
            start = end
    mask[1, -2:] = False  # padding units
    return spans, mask


def step_inputs(device: torch.device) -> tuple[MTALoss, dict, dict, UnitPlan]:
    """(loss module, student and teacher hidden states, the batch's unit plan — built on the
    CPU, as the collator builds it, then moved to ``device``) of the counted step."""
    generator = torch.Generator().manual_seed(0)
    loss = MTALoss(STUDENT_WIDTH, TEACHER_WIDTH, PAIRS).to(device)
    student = {
        p.student_layer: torch.randn(BATCH, TOKENS, STUDENT_WIDTH, generator=generator)
        .to(device)
        .requires_grad_()
        for p in PAIRS
    }
    teacher = {
        p.teacher_layer: torch.randn(BATCH, TOKENS, TEACHER_WIDTH, generator=generator).to(device)
        for p in PAIRS
    }
    attention = torch.ones(BATCH, TOKENS, dtype=torch.long)
    attention[1, -5:] = 0
    batch = {"attention_mask": attention}
    for g, k in (("word", WORD_UNITS), ("phrase", PHRASE_UNITS)):
        spans, mask = _spans(k, generator)
        batch[f"{g}_student_spans"], batch[f"{g}_span_mask"] = spans, mask
    return loss, student, teacher, UnitPlan.from_batch(batch).to(device)


def count_step(path: str, device: torch.device) -> Counts:
    """Counts of one forward + backward of the step, ``path`` ``fused`` or ``eager``, after one
    uncounted step (so that what is cached across steps is not counted)."""
    loss, student, teacher, batch = step_inputs(device)

    def step() -> None:
        loss.zero_grad(set_to_none=True)  # as an optimizer step leaves them: no accumulation
        for hidden in student.values():
            hidden.grad = None
        out = loss(student, teacher, batch)
        out.loss.backward()

    with mk.prefer_reference(cuda=True) if path == "eager" else contextlib.nullcontext():
        step()
        return count(step)


def _top(counter: collections.Counter, n: int = 6) -> str:
    return ", ".join(f"{name} {c}" for name, c in counter.most_common(n))


def rows(device: torch.device) -> list[dict[str, object]]:
    out = []
    for path in ("fused", "eager"):
        c = count_step(path, device)
        detail = f"triton: {_top(c.triton)}; aten: {_top(c.aten)}"
        if c.syncs:
            detail += f"; syncs: {_top(c.syncs)}"
        if c.host_to_device:
            detail += f"; host->device: {_top(c.host_to_device)}"
        out.append(
            dict(
                path=path,
                triton=sum(c.triton.values()),
                aten=sum(c.aten.values()),
                launches=c.launches,
                host_syncs=sum(c.syncs.values()),
                host_to_device=sum(c.host_to_device.values()),
                detail=detail,
            )
        )
    return out


def write_csv(path: Path, table: Sequence[dict[str, object]]) -> None:
    harness.write_rows(path, table, COLUMNS)


def read_csv(path: Path) -> list[dict[str, object]]:
    return [
        {k: (int(v) if k not in ("path", "detail") else v) for k, v in row.items()}
        for row in harness.read_rows(path, COLUMNS)
    ]


def markdown_table(path: Path) -> str:
    """The committed counts as a Markdown table (for the README)."""
    lines = [
        f"Counted by `python -m benchmarks.launch_count --out {Path(path).as_posix()}` "
        "(exact counts; one step = MTALoss forward + backward, 3 layer pairs, B=2, T=64; "
        "budget: 60 launches, 0 host syncs).",
        "",
        harness.markdown_table(
            (
                "path",
                "launches",
                "Triton",
                "ATen",
                "host syncs",
                "host-to-device copies",
                "most frequent",
            ),
            [
                [
                    r[k]
                    for k in (
                        "path",
                        "launches",
                        "triton",
                        "aten",
                        "host_syncs",
                        "host_to_device",
                        "detail",
                    )
                ]
                for r in read_csv(path)
            ],
            right=range(1, 6),
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the CSV here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--markdown", type=Path, metavar="CSV", help="print the table of a counts CSV and exit"
    )
    args = p.parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(args.markdown))
        return 0
    table = rows(torch.device(args.device))
    if args.out is not None:
        write_csv(args.out, table)
    for row in table:
        print(
            f"{row['path']:<6} {row['launches']:>4} launches ({row['triton']} Triton + "
            f"{row['aten']} ATen), {row['host_syncs']} host syncs, "
            f"{row['host_to_device']} host-to-device copies"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
