"""Units of text that did not exist before the step (student-generated responses), parsed in the
background while the accelerator works.

:class:`UnitPool` takes texts (with the ``regions`` of :func:`mta.spans.extract_units`), answers
what it already knows from an in-memory cache and, with ``cache``, from the on-disk cache of
``mta-prepare`` (:class:`mta.prepare.UnitCache`: same keys, same entries), and sends the rest to
spaCy in worker processes (``processes >= 1``: each loads the pipeline once, then runs
``nlp.pipe`` on its share) or in one background thread (``processes=0``, which also takes a
loaded ``Language``). :meth:`UnitPool.submit` returns at once; :meth:`PendingUnits.result`
waits. The result equals ``extract_units(texts, regions=regions, rules=rules)``: the same rules,
run on the same segments (:func:`mta.spans.text_segments`).

The trainer submits a batch's texts right after generating them and collects the units only
when the student's MTA term needs them, after the teacher's forward has been launched: the parse
overlaps the teacher's forward (and the other micro-batches' generation).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mta.prepare import UnitCache, text_key
from mta.spans import (
    DEFAULT_MAX_PHRASE_TOKENS,
    UNIT_RULES,
    Segment,
    Span,
    TextUnits,
    iter_units,
    load_pipeline,
    merge_segments,
    text_segments,
)

if TYPE_CHECKING:
    from spacy.language import Language

__all__ = ["PendingUnits", "UnitPool"]

#: Raw spans of one parsed text as they cross a process boundary: (words, phrases) int64[K, 2].
_RawUnits = tuple[np.ndarray, np.ndarray]


def _parse(
    texts: list[str], nlp: Language | str | None, rules: str, max_phrase_tokens: int
) -> list[_RawUnits]:
    """Units of ``texts`` as plain arrays, in a worker process or the pool's thread (a name is
    loaded once per process by :func:`mta.spans.load_pipeline`)."""
    pipeline = nlp if hasattr(nlp, "pipe") else load_pipeline(nlp)
    units = iter_units(texts, pipeline, max_phrase_tokens=max_phrase_tokens, rules=rules)
    return [(np.asarray(u.words), np.asarray(u.phrases)) for u in units]


@dataclass
class PendingUnits:
    """The units of one :meth:`UnitPool.submit` call, being parsed; :meth:`result` waits for
    them (once; later calls return the same list)."""

    pool: UnitPool
    n_texts: int
    segments: list[Segment]
    keys: list[str]
    known: dict[str, TextUnits]
    jobs: list[tuple[list[str], Future]]
    write: bool
    _result: list[TextUnits] | None = None

    def done(self) -> bool:
        """Whether :meth:`result` would return without waiting."""
        return self._result is not None or all(job.done() for _, job in self.jobs)

    def result(self) -> list[TextUnits]:
        """One :class:`~mta.spans.TextUnits` per submitted text (re-raises a worker's error)."""
        if self._result is None:
            parsed: dict[str, TextUnits] = {}
            for keys, job in self.jobs:
                for key, (words, phrases) in zip(keys, job.result(), strict=True):
                    parsed[key] = TextUnits(words, phrases)
            self.pool._remember(parsed, self.segments, self.keys, self.write)
            units = {**self.known, **parsed}
            self._result = merge_segments(
                self.n_texts, self.segments, [units[k] for k in self.keys]
            )
        return self._result


class UnitPool:
    """Parse texts into units in the background (see the module docstring).

    Args:
        nlp: the spaCy pipeline's package name, or None for the default English pipeline; with
            ``processes=0`` also a loaded ``Language``.
        processes: worker processes (``0``: one thread of this process).
        rules, max_phrase_tokens: as in :func:`mta.spans.extract_units`.
        cache: the ``mta-prepare`` cache file to read known texts from and to append new ones to
            (``write_cache``), or None for the in-memory cache only.
        memory_entries: texts the in-memory cache keeps, the least recently used dropped first
            (a long run samples millions of responses, which would otherwise all stay).
        write_cache: append newly parsed texts to ``cache`` (False on all but one process of a
            distributed run: appends from several processes are not coordinated).

    Use as a context manager, or call :meth:`close`, to stop the workers.
    """

    def __init__(
        self,
        nlp: Language | str | None = None,
        *,
        processes: int = 1,
        rules: str = "paper",
        max_phrase_tokens: int = DEFAULT_MAX_PHRASE_TOKENS,
        cache: str | os.PathLike[str] | None = None,
        write_cache: bool = True,
        memory_entries: int = 100_000,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
            raise ValueError(f"processes must be an int >= 0, got {processes!r}")
        if rules not in UNIT_RULES:
            raise ValueError(f"rules must be one of {UNIT_RULES}, got {rules!r}")
        if processes and not (nlp is None or isinstance(nlp, str)):
            raise TypeError(
                "worker processes load the pipeline by name: pass nlp as a package name (or "
                "None), or use processes=0 to parse with a loaded Language in a thread"
            )
        self.nlp = nlp
        self.processes = processes
        self.rules = rules
        self.max_phrase_tokens = max_phrase_tokens
        self.store = (
            None
            if cache is None
            else UnitCache(
                cache, nlp, max_phrase_tokens=max_phrase_tokens, rules=rules, write=write_cache
            )
        )
        if memory_entries < 0:
            raise ValueError(f"memory_entries must be >= 0, got {memory_entries}")
        self.memory_entries = memory_entries
        self._known: OrderedDict[str, TextUnits] = OrderedDict()
        self._executor: Executor | None = None

    def __enter__(self) -> UnitPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (pending results are still collected first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=False)
            self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a UnitPool holds worker processes and cannot be pickled")

    def _pool(self) -> Executor:
        if self._executor is None:
            if self.processes:
                # spawn: the trainer's process holds CUDA and thread pools that fork would copy
                self._executor = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            else:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="mta-units")
        return self._executor

    def warm_up(self) -> None:
        """Start the workers and load their pipelines now, not on the first batch."""
        probe = ["Warm up."] * max(1, self.processes)
        self._submit_texts(probe, [None] * len(probe), cache=False).result()

    def submit(
        self, texts: Sequence[str], regions: Sequence[Sequence[Span] | None] | None = None
    ) -> PendingUnits:
        """Start parsing ``texts`` (arguments of :func:`mta.spans.extract_units`); returns at
        once."""
        return self._submit_texts(texts, regions, cache=True)

    def units(
        self, texts: Sequence[str], regions: Sequence[Sequence[Span] | None] | None = None
    ) -> list[TextUnits]:
        """``submit(texts, regions).result()``."""
        return self.submit(texts, regions).result()

    def _submit_texts(
        self, texts: Sequence[str], regions: Sequence[Sequence[Span] | None] | None, cache: bool
    ) -> PendingUnits:
        segments = text_segments(texts, regions)
        keys = [text_key(s.text) for s in segments]
        known: dict[str, TextUnits] = {}
        todo: dict[str, str] = {}
        for key, segment in zip(keys, segments, strict=True):
            if key in self._known:
                known[key] = self._known[key]
                self._known.move_to_end(key)
            elif key not in todo:
                todo[key] = segment.text
        if cache and todo and self.store is not None:
            found, todo = self.store.lookup(todo)
            known.update(found)
            self._keep(found)
        jobs = []
        if todo:
            items = list(todo.items())
            shares = max(1, min(self.processes, len(items)))
            for part in range(shares):
                share = items[part::shares]
                job = self._pool().submit(
                    _parse, [t for _, t in share], self.nlp, self.rules, self.max_phrase_tokens
                )
                jobs.append(([k for k, _ in share], job))
        return PendingUnits(self, len(texts), segments, keys, known, jobs, cache)

    def _remember(
        self, parsed: dict[str, TextUnits], segments: list[Segment], keys: list[str], write: bool
    ) -> None:
        new = {k: u for k, u in parsed.items() if k not in self._known}
        self._keep(new)
        if write and new and self.store is not None:
            texts = {k: s.text for k, s in zip(keys, segments, strict=True) if k in new}
            self.store.add({k: (texts[k], u) for k, u in new.items()})

    def _keep(self, units: dict[str, TextUnits]) -> None:
        self._known.update(units)
        while len(self._known) > self.memory_entries:
            self._known.popitem(last=False)
