"""On-disk cache of linguistic units, and the ``mta-prepare`` command that fills it.

Parsing is the slow part of MTA's preprocessing, so it happens once per dataset: ``mta-prepare``
parses the text fields of a JSONL dataset with spaCy and writes one JSON line per distinct text::

    {"key": sha256(text), "n": len(text),
     "cfg": {"pipeline": "en_core_web_sm==3.8.0;spacy==3.8.4", "rule": "1", "max_phrase_tokens": 8},
     "words": [s0, e0, s1, e1, ...], "phrases": [...], "sum": <checksum of the fields above>}

An entry is used only when its checksum holds and its ``cfg`` equals the current one (pipeline
name/version, :data:`mta.spans.RULE_VERSION`, options); corrupt lines and stale entries are counted,
the texts re-parsed, and the file rewritten. Reading the cache never imports spaCy: the pipeline
identity comes from the installed package's metadata (and when no pipeline is installed, as on a
GPU machine, entries of any pipeline with the current rule version and options are accepted).

Texts are cached per *segment* (:func:`mta.spans.text_segments`): with ``regions``, each field of a
prompt template is its own entry, so a cache built from a dataset's raw fields serves any template.
Token ranges are tokenizer-specific and cheap (:func:`mta.spans.example_unit_spans`); they are not
cached here.

Entries are written as they are parsed (every ``batch_size`` texts, and whatever is pending when
parsing stops, Ctrl-C included), so an interrupted ``mta-prepare`` keeps what it parsed and a
rerun parses only the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mta.errors import DEBUG_HELP, UserError, run_command
from mta.jsonl import read_records
from mta.progress import Progress, format_duration
from mta.spans import (
    DEFAULT_MAX_PHRASE_TOKENS,
    RULE_VERSION,
    UNIT_RULES,
    Span,
    TextUnits,
    extract_units,
    iter_units,
    merge_segments,
    pipeline_id,
    text_segments,
)

if TYPE_CHECKING:
    from spacy.language import Language

__all__ = ["CacheStats", "UnitCache", "cached_units", "main", "text_key"]

_ENTRY_FIELDS = ("key", "n", "cfg", "words", "phrases")


def text_key(text: str) -> str:
    """sha256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _checksum(entry: dict[str, Any]) -> str:
    payload = json.dumps([entry[f] for f in _ENTRY_FIELDS], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _flat_spans(value: Any, n: int) -> bool:
    """Whether ``value`` is a flat list of (start, end) pairs with 0 <= start <= end <= n."""
    if not isinstance(value, list) or len(value) % 2 or not all(type(v) is int for v in value):
        return False
    return all(0 <= s <= e <= n for s, e in zip(value[::2], value[1::2], strict=True))


def _parse_entry(line: str) -> dict[str, Any] | None:
    """The entry on ``line``, or ``None`` if the line is corrupt (bad JSON, fields or checksum)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or any(f not in entry for f in (*_ENTRY_FIELDS, "sum")):
        return None
    n = entry["n"]
    if not (isinstance(entry["key"], str) and type(n) is int and isinstance(entry["cfg"], dict)):
        return None
    if not (_flat_spans(entry["words"], n) and _flat_spans(entry["phrases"], n)):
        return None
    return entry if entry["sum"] == _checksum(entry) else None


@dataclass
class CacheStats:
    """Counts over distinct texts (``corrupt``: unreadable cache lines), summed over calls."""

    hits: int = 0
    parsed: int = 0
    stale: int = 0
    corrupt: int = 0


class UnitCache:
    """Units of texts, read from a JSONL cache file or parsed with spaCy and appended to it.

    Args:
        path: the cache file (created with its parent directories when first written).
        nlp: spaCy ``Language``, package name, or ``None`` (default English pipeline); loaded
            only when a text has to be parsed.
        max_phrase_tokens, batch_size, n_process, rules: as in :func:`mta.spans.extract_units`
            (entries of one rule set are never read for another).
        write: ``False`` parses misses without writing (e.g. non-zero ranks of a distributed job;
            appends from several processes to one file are not coordinated).
        progress: a label such as ``"parsing units"``: show the parsing progress under it on
            stderr (:class:`mta.progress.Progress`); ``None``: silent.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        nlp: Language | str | None = None,
        *,
        max_phrase_tokens: int = DEFAULT_MAX_PHRASE_TOKENS,
        batch_size: int = 64,
        n_process: int = 1,
        write: bool = True,
        progress: str | None = None,
        rules: str = "paper",
    ) -> None:
        if rules not in UNIT_RULES:
            raise ValueError(f"rules must be one of {UNIT_RULES}, got {rules!r}")
        self.path = Path(path)
        self.rules = rules
        self.nlp = nlp
        self.batch_size = batch_size
        self.n_process = n_process
        self.max_phrase_tokens = max_phrase_tokens
        self.write = write
        self.progress = progress
        self.pipeline = pipeline_id(nlp)
        self.stats = CacheStats()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._rewrite = False

    @property
    def config(self) -> dict[str, Any]:
        """What an entry must have been built with to be used (``pipeline`` None: any)."""
        config: dict[str, Any] = {
            "pipeline": self.pipeline,
            "rule": RULE_VERSION,
            "max_phrase_tokens": self.max_phrase_tokens,
        }
        if self.rules != "paper":  # entries written before rule sets existed stay current
            config["rules"] = self.rules
            del config["max_phrase_tokens"]  # not read by the released rules
        return config

    def _is_current(self, entry: dict[str, Any]) -> bool:
        cfg = self.config
        if cfg["pipeline"] is None:
            cfg["pipeline"] = entry["cfg"].get("pipeline")
        return entry["cfg"] == cfg

    def _index(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            if self.path.exists():
                with self.path.open(encoding="utf-8") as f:
                    for line in f:
                        entry = _parse_entry(line)
                        if entry is None:
                            self.stats.corrupt += 1
                            self._rewrite = True
                        else:
                            self._entries[entry["key"]] = entry
        return self._entries

    def units(
        self, texts: Sequence[str], regions: Sequence[Sequence[Span] | None] | None = None
    ) -> list[TextUnits]:
        """Units of ``texts`` (same arguments and result as :func:`mta.spans.extract_units`)."""
        segments = text_segments(texts, regions)
        keys = [text_key(s.text) for s in segments]
        found, todo = self.lookup(dict(zip(keys, (s.text for s in segments), strict=True)))
        if todo:
            self._parse(todo, found)
        elif self._rewrite:
            self._save([])
        return merge_segments(len(texts), segments, [found[k] for k in keys])

    def lookup(self, texts: dict[str, str]) -> tuple[dict[str, TextUnits], dict[str, str]]:
        """Split ``{text_key(text): text}`` into the units the file holds, current (``found``,
        key → units), and the texts still to parse (``todo``, key → text). Stale entries are
        dropped from the index, so that the next save rewrites the file without them."""
        entries = self._index()
        found: dict[str, TextUnits] = {}
        todo: dict[str, str] = {}
        for key, text in texts.items():
            entry = entries.get(key)
            if entry is not None and self._is_current(entry):
                found[key] = TextUnits(
                    np.array(entry["words"], np.int64).reshape(-1, 2),
                    np.array(entry["phrases"], np.int64).reshape(-1, 2),
                )
                self.stats.hits += 1
                continue
            if entry is not None:
                del entries[key]
                self.stats.stale += 1
                self._rewrite = True
            todo[key] = text
        return found, todo

    def add(self, parsed: dict[str, tuple[str, TextUnits]]) -> None:
        """Store units parsed elsewhere (``{text_key(text): (text, units)}``), e.g. by
        :class:`mta.unit_pool.UnitPool`'s workers."""
        entries = self._index()
        new = []
        for key, (text, units) in parsed.items():
            if text_key(text) != key:
                raise ValueError(f"key {key!r} is not the text_key of its text")
            entries[key] = entry = self._entry(key, text, units)
            new.append(entry)
        self.stats.parsed += len(new)
        self._save(new)

    def _parse(self, todo: dict[str, str], found: dict[str, TextUnits]) -> None:
        """Parse the texts of ``todo`` (key → text) into ``found``, storing each batch of entries
        as soon as it is parsed, and what is pending when parsing stops for any reason."""
        parsed = iter_units(
            list(todo.values()),
            self.nlp,
            batch_size=self.batch_size,
            n_process=self.n_process,
            max_phrase_tokens=self.max_phrase_tokens,
            rules=self.rules,
        )
        entries = self._index()
        pending: list[dict[str, Any]] = []
        meter = Progress(len(todo), self.progress, "texts") if self.progress else None
        with meter if meter is not None else contextlib.nullcontext():
            try:
                for (key, text), units in zip(todo.items(), parsed, strict=True):
                    entry = self._entry(key, text, units)
                    entries[key] = entry
                    found[key] = units
                    pending.append(entry)
                    self.stats.parsed += 1
                    if meter is not None:
                        meter.update()
                    if len(pending) >= self.batch_size:
                        self._save(pending)
                        pending = []
            finally:
                self._save(pending)

    def _entry(self, key: str, text: str, units: TextUnits) -> dict[str, Any]:
        entry = {
            "key": key,
            "n": len(text),
            "cfg": self.config,
            "words": units.words.ravel().tolist(),
            "phrases": units.phrases.ravel().tolist(),
        }
        entry["sum"] = _checksum(entry)
        return entry

    def _save(self, new: list[dict[str, Any]]) -> None:
        """Append ``new`` entries, or rewrite the file (with every entry known, ``new`` ones
        included) when corrupt or stale lines were seen."""
        if not self.write or not (new or self._rewrite):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._rewrite:
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in new)
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in self._index().values())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._rewrite = False


def cached_units(
    texts: Sequence[str],
    cache: str | os.PathLike[str] | None,
    nlp: Language | str | None = None,
    *,
    regions: Sequence[Sequence[Span] | None] | None = None,
    max_phrase_tokens: int = DEFAULT_MAX_PHRASE_TOKENS,
    batch_size: int = 64,
    n_process: int = 1,
    rules: str = "paper",
) -> list[TextUnits]:
    """:func:`mta.spans.extract_units` through the cache file ``cache`` (``None``: no cache)."""
    if cache is None:
        return extract_units(
            texts,
            nlp,
            batch_size=batch_size,
            n_process=n_process,
            max_phrase_tokens=max_phrase_tokens,
            regions=regions,
            rules=rules,
        )
    store = UnitCache(
        cache,
        nlp,
        max_phrase_tokens=max_phrase_tokens,
        batch_size=batch_size,
        n_process=n_process,
        rules=rules,
    )
    return store.units(texts, regions)


def _read_texts(paths: Sequence[str], fields: Sequence[str]) -> tuple[int, list[str]]:
    """(number of records, the non-empty string values of ``fields``) of JSONL files.

    Raises:
        UserError: a file is missing or malformed (``file:line``), a field holds something else
            than a string, or a field is in no record (the message lists the fields found).
    """
    records, texts = 0, []
    seen: set[str] = set()
    for path in paths:
        try:
            lines = read_records(path)
        except (OSError, ValueError) as err:
            raise UserError(str(err)) from None
        for line, record in lines:
            records += 1
            seen.update(record)
            for field in fields:
                value = record.get(field)
                if value is not None and not isinstance(value, str):
                    raise UserError(
                        f"{path}:{line}: field {field!r} must be a string, "
                        f"got {type(value).__name__}"
                    )
                if value:
                    texts.append(value)
    absent = [f for f in fields if f not in seen]
    if absent:
        where = ", ".join(paths)
        raise UserError(
            f"--fields: {', '.join(repr(f) for f in absent)} {'is' if len(absent) == 1 else 'are'} "
            f"in no record of {where}; its records have the fields "
            f"{', '.join(sorted(seen)) or '(none)'}"
        )
    return records, texts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mta-prepare",
        description="Parse the text fields of JSONL datasets once and cache their word and phrase "
        "units for MTA distillation (a second run reads the cache without importing spaCy). "
        "Entries are written as they are parsed: an interrupted run keeps them and a rerun "
        "parses only the rest.",
    )
    p.add_argument("data", nargs="+", help="JSONL files, one JSON object per line")
    p.add_argument("--cache", required=True, help="cache file to create or update (JSONL)")
    p.add_argument(
        "--fields",
        nargs="+",
        required=True,
        help="text fields to parse, each on its own (e.g. instruction context response)",
    )
    p.add_argument("--pipeline", default=None, help="spaCy package (default: en_core_web_sm)")
    p.add_argument("--max-phrase-tokens", type=int, default=DEFAULT_MAX_PHRASE_TOKENS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-process", type=int, default=1, help="spaCy worker processes (-1: all)")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def _check_options(args: argparse.Namespace) -> None:
    for name, value in (
        ("--batch-size", args.batch_size),
        ("--max-phrase-tokens", args.max_phrase_tokens),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if args.n_process < 1 and args.n_process != -1:
        raise UserError(
            f"--n-process must be at least 1, or -1 for one per CPU, got {args.n_process}"
        )
    cache = Path(args.cache)
    if cache.is_dir():
        raise UserError(f"--cache {args.cache!r} is a directory; give the path of a JSONL file")


def _prepare(args: argparse.Namespace) -> int:
    _check_options(args)
    records, texts = _read_texts(args.data, args.fields)
    cache = UnitCache(
        args.cache,
        args.pipeline,
        max_phrase_tokens=args.max_phrase_tokens,
        batch_size=args.batch_size,
        n_process=args.n_process,
        progress="mta-prepare: parsing",
    )
    start = time.perf_counter()
    try:
        cache.units(texts)
    except KeyboardInterrupt:
        print(
            f"mta-prepare: stopped after parsing {cache.stats.parsed} texts, which are in "
            f"{args.cache}; the same command continues from there",
            file=sys.stderr,
        )
        raise
    except (ImportError, OSError) as err:  # no spaCy / pipeline: the message says what to install
        raise UserError(str(err)) from None
    elapsed = time.perf_counter() - start
    s = cache.stats
    rate = f", {s.parsed / elapsed:.0f} texts/s" if s.parsed else ""
    print(
        f"mta-prepare: {records} records, {len(texts)} texts ({s.hits + s.parsed} distinct): "
        f"{s.hits} cached, {s.parsed} parsed ({s.stale} stale, {s.corrupt} corrupt lines) "
        f"in {format_duration(elapsed) if elapsed >= 60 else f'{elapsed:.1f} s'}{rate} "
        f"-> {args.cache}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mta-prepare``: prints a one-line summary and returns the exit status (2
    for a user error, see :mod:`mta.errors`)."""
    args = _parser().parse_args(argv)
    return run_command("mta-prepare", lambda: _prepare(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
