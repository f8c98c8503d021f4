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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mta.spans import (
    DEFAULT_MAX_PHRASE_TOKENS,
    RULE_VERSION,
    Span,
    TextUnits,
    extract_units,
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
        max_phrase_tokens, batch_size, n_process: as in :func:`mta.spans.extract_units`.
        write: ``False`` parses misses without writing (e.g. non-zero ranks of a distributed job;
            appends from several processes to one file are not coordinated).
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
    ) -> None:
        self.path = Path(path)
        self.nlp = nlp
        self.batch_size = batch_size
        self.n_process = n_process
        self.max_phrase_tokens = max_phrase_tokens
        self.write = write
        self.pipeline = pipeline_id(nlp)
        self.stats = CacheStats()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._rewrite = False

    @property
    def config(self) -> dict[str, Any]:
        """What an entry must have been built with to be used (``pipeline`` None: any)."""
        return {
            "pipeline": self.pipeline,
            "rule": RULE_VERSION,
            "max_phrase_tokens": self.max_phrase_tokens,
        }

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
        entries = self._index()
        keys = [text_key(s.text) for s in segments]
        found: dict[str, TextUnits] = {}
        todo: dict[str, str] = {}
        for key, seg in zip(keys, segments, strict=True):
            if key in found or key in todo:
                continue
            entry = entries.get(key)
            if entry is not None and self._is_current(entry):
                found[key] = TextUnits(
                    np.array(entry["words"], np.int64).reshape(-1, 2),
                    np.array(entry["phrases"], np.int64).reshape(-1, 2),
                )
                self.stats.hits += 1
                continue
            if entry is not None:
                self.stats.stale += 1
                self._rewrite = True
            todo[key] = seg.text
        if todo:
            parsed = extract_units(
                list(todo.values()),
                self.nlp,
                batch_size=self.batch_size,
                n_process=self.n_process,
                max_phrase_tokens=self.max_phrase_tokens,
            )
            self.stats.parsed += len(todo)
            new = [self._entry(k, t, u) for (k, t), u in zip(todo.items(), parsed, strict=True)]
            entries.update((e["key"], e) for e in new)
            found.update(zip(todo, parsed, strict=True))
            self._save(new)
        elif self._rewrite:
            self._save([])
        return merge_segments(len(texts), segments, [found[k] for k in keys])

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
        """Append ``new`` entries, or rewrite the file when corrupt or stale lines were seen."""
        if not self.write:
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
        )
    store = UnitCache(
        cache, nlp, max_phrase_tokens=max_phrase_tokens, batch_size=batch_size, n_process=n_process
    )
    return store.units(texts, regions)


def _read_texts(paths: Sequence[str], fields: Sequence[str]) -> tuple[int, list[str]]:
    """(number of records, the non-empty string values of ``fields``) of JSONL files."""
    records, texts = 0, []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: each line must be a JSON object")
                records += 1
                for field in fields:
                    value = record.get(field)
                    if value is not None and not isinstance(value, str):
                        raise ValueError(
                            f"{path}:{line_no}: field {field!r} must be a string, "
                            f"got {type(value).__name__}"
                        )
                    if value:
                        texts.append(value)
    return records, texts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mta-prepare",
        description="Parse the text fields of JSONL datasets once and cache their word and phrase "
        "units for MTA distillation (a second run reads the cache without importing spaCy).",
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mta-prepare``; prints a one-line summary and returns the exit status."""
    args = _parser().parse_args(argv)
    records, texts = _read_texts(args.data, args.fields)
    cache = UnitCache(
        args.cache,
        args.pipeline,
        max_phrase_tokens=args.max_phrase_tokens,
        batch_size=args.batch_size,
        n_process=args.n_process,
    )
    start = time.perf_counter()
    cache.units(texts)
    elapsed = time.perf_counter() - start
    s = cache.stats
    rate = f", {s.parsed / elapsed:.0f} texts/s" if s.parsed else ""
    print(
        f"mta-prepare: {records} records, {len(texts)} texts ({s.hits + s.parsed} distinct): "
        f"{s.hits} cached, {s.parsed} parsed ({s.stale} stale, {s.corrupt} corrupt lines) "
        f"in {elapsed:.1f} s{rate} -> {args.cache}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
