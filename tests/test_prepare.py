"""Tests of mta.prepare: the on-disk unit cache and the ``mta-prepare`` command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mta.prepare as P
from mta import spans as S

TEXTS = [
    "The cat sat on the mat.",
    "She has not eaten the big red apple.",
    "Write a short poem about the sea.",
    "The cat sat on the mat.",  # duplicate: parsed and stored once
]
DISTINCT = 3


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def no_parsing(monkeypatch) -> None:
    """Make any import of spaCy or any pipeline load fail for the rest of the test."""
    monkeypatch.setitem(sys.modules, "spacy", None)

    def refuse(*args, **kwargs):
        raise ImportError("parsing was attempted")

    monkeypatch.setattr(S, "load_pipeline", refuse)


def test_round_trip(tmp_path, nlp):
    path = tmp_path / "sub" / "units.jsonl"
    cache = P.UnitCache(path, nlp)
    first = cache.units(TEXTS)
    assert first == S.extract_units(TEXTS, nlp)
    assert cache.stats == P.CacheStats(hits=0, parsed=DISTINCT)
    entries = lines(path)
    assert len(entries) == DISTINCT
    assert entries[0]["key"] == P.text_key(TEXTS[0])
    assert entries[0]["cfg"] == {
        "pipeline": S.pipeline_id(nlp),
        "rule": S.RULE_VERSION,
        "max_phrase_tokens": S.DEFAULT_MAX_PHRASE_TOKENS,
    }
    again = P.UnitCache(path, nlp)
    assert again.units(TEXTS) == first
    assert again.stats == P.CacheStats(hits=DISTINCT, parsed=0)
    assert len(lines(path)) == DISTINCT


def test_hit_never_imports_spacy_and_a_miss_parses(tmp_path, nlp, monkeypatch):
    path = tmp_path / "units.jsonl"
    expected = P.cached_units(TEXTS, path)  # default pipeline, as mta-prepare uses it
    no_parsing(monkeypatch)
    assert P.cached_units(TEXTS, path) == expected
    with pytest.raises(ImportError, match="parsing was attempted"):  # the block is effective
        P.cached_units(["A text that is not cached."], path)


def test_changed_text_misses(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    P.UnitCache(path, nlp).units(TEXTS)
    cache = P.UnitCache(path, nlp)
    changed = [*TEXTS[:2], TEXTS[2].replace("sea", "sky")]
    assert cache.units(changed) == S.extract_units(changed, nlp)
    assert cache.stats == P.CacheStats(hits=2, parsed=1)
    assert len(lines(path)) == DISTINCT + 1  # appended, nothing rewritten


@pytest.mark.parametrize("change", ["rule", "max_phrase_tokens", "pipeline"])
def test_stale_entries_are_rebuilt(tmp_path, nlp, monkeypatch, change):
    path = tmp_path / "units.jsonl"
    P.UnitCache(path, nlp).units(TEXTS)
    kwargs = {}
    if change == "rule":
        monkeypatch.setattr(P, "RULE_VERSION", "test-bump")
    elif change == "max_phrase_tokens":
        kwargs["max_phrase_tokens"] = 3
    cache = P.UnitCache(path, nlp, **kwargs)
    if change == "pipeline":
        cache.pipeline = "en_other_pipeline==9.9;spacy==9.9"
    result = cache.units(TEXTS)
    assert result == S.extract_units(TEXTS, nlp, **kwargs)
    assert cache.stats == P.CacheStats(hits=0, parsed=DISTINCT, stale=DISTINCT)
    entries = lines(path)
    assert len(entries) == DISTINCT, "stale entries are replaced, not kept beside the new ones"
    assert all(e["cfg"] == cache.config for e in entries)
    reread = P.UnitCache(path, nlp, **kwargs)
    if change == "pipeline":
        reread.pipeline = cache.pipeline
    assert reread.units(TEXTS) == result and reread.stats.hits == DISTINCT


def test_corrupt_entries_are_detected_and_rebuilt(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    expected = P.UnitCache(path, nlp).units(TEXTS)
    raw = path.read_text(encoding="utf-8").splitlines()
    tampered = json.loads(raw[0])
    tampered["words"][1] += 1  # valid JSON, wrong checksum
    out_of_range = json.loads(raw[1])
    out_of_range["n"] = 1  # spans beyond the text, even with a matching checksum
    out_of_range["sum"] = P._checksum(out_of_range)
    raw = [json.dumps(tampered), json.dumps(out_of_range), raw[2][: len(raw[2]) // 2], "[1, 2]"]
    path.write_text("\n".join(raw) + "\n", encoding="utf-8")
    cache = P.UnitCache(path, nlp)
    assert cache.units(TEXTS) == expected
    assert cache.stats == P.CacheStats(hits=0, parsed=DISTINCT, corrupt=4)
    assert len(lines(path)) == DISTINCT  # rewritten without the corrupt lines
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    reread = P.UnitCache(path, nlp)
    assert reread.units(TEXTS) == expected and reread.stats.hits == DISTINCT


def test_a_corrupt_line_is_dropped_even_when_all_requested_texts_hit(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    P.UnitCache(path, nlp).units(TEXTS)
    with path.open("a", encoding="utf-8") as f:
        f.write("{not json\n")
    cache = P.UnitCache(path, nlp)
    cache.units(TEXTS[:1])
    assert cache.stats == P.CacheStats(hits=1, corrupt=1)
    assert len(lines(path)) == DISTINCT


def test_cache_without_a_pipeline_accepts_the_recorded_one(tmp_path, nlp, monkeypatch):
    path = tmp_path / "units.jsonl"
    expected = P.UnitCache(path, nlp).units(TEXTS)
    monkeypatch.setattr(S, "default_pipeline_name", lambda: None)  # e.g. the GPU machine
    no_parsing(monkeypatch)
    cache = P.UnitCache(path)
    assert cache.pipeline is None
    assert cache.units(TEXTS) == expected


def test_regions_are_cached_per_field(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    fields = {"instruction": "Write a short poem about the sea.", "response": "The sea is blue."}
    alpaca = S.fill_template(
        "### Instruction:\n{instruction}\n\n### Response:\n{response}", **fields
    )
    chat = S.fill_template("<|user|>\n{instruction}</s>\n<|assistant|>\n{response}</s>", **fields)
    P.UnitCache(path, nlp).units(list(fields.values()))  # what mta-prepare --fields does
    for text, regions in (alpaca, chat):
        cache = P.UnitCache(path, nlp)
        got = cache.units([text], regions=[regions])
        assert got == S.extract_units([text], nlp, regions=[regions])
        assert cache.stats == P.CacheStats(hits=2)


def test_write_false_and_no_cache(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    cache = P.UnitCache(path, nlp, write=False)
    assert cache.units(TEXTS) == S.extract_units(TEXTS, nlp)
    assert not path.exists()
    assert P.cached_units(TEXTS, None, nlp) == cache.units(TEXTS)


def write_dataset(path: Path) -> None:
    records = [
        {"instruction": TEXTS[0], "context": "", "response": TEXTS[1], "category": "x"},
        {"instruction": TEXTS[2], "context": None, "response": TEXTS[0], "category": "y"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")


def test_cli_parses_once_then_reads_without_spacy(tmp_path, nlp, capsys):
    data, cache = tmp_path / "data.jsonl", tmp_path / "units.jsonl"
    write_dataset(data)
    args = [str(data), "--cache", str(cache), "--fields", "instruction", "context", "response"]
    assert P.main(args) == 0
    out = capsys.readouterr().out
    assert "2 records, 4 texts (3 distinct): 0 cached, 3 parsed" in out
    code = (
        "import sys; sys.modules['spacy'] = None; from mta.prepare import main; "
        f"sys.exit(main({args!r}))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "3 cached, 0 parsed (0 stale, 0 corrupt lines)" in run.stdout


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"instruction": "ok"}\n{"instruction": 3}\n', r"data.jsonl:2: field 'instruction'"),
        ('{"instruction": "ok"}\nnot json\n', r"data.jsonl:2: not valid JSON"),
        ('["a list"]\n', r"data.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_cli_rejects_bad_datasets(tmp_path, content, match, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(content, encoding="utf-8")
    assert P.main([str(data), "--cache", str(tmp_path / "u.jsonl"), "--fields", "instruction"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mta-prepare: error: ") and re.search(match, err), err
    assert not (tmp_path / "u.jsonl").exists()


def test_cli_requires_cache_and_fields(tmp_path, capsys):
    with pytest.raises(SystemExit):
        P.main([str(tmp_path / "data.jsonl"), "--fields", "text"])
    with pytest.raises(SystemExit):
        P.main([str(tmp_path / "data.jsonl"), "--cache", str(tmp_path / "u.jsonl")])
    assert "required" in capsys.readouterr().err


# ------------------------------------------------------------------ incremental writes, resume

MANY = [
    f"The {noun} {verb} the {thing}."
    for noun in ("cat", "dog", "bird")
    for verb in ("sees", "likes", "chases")
    for thing in ("ball", "tree")
]  # 18 distinct texts


class StopAfter:
    """A pipeline that parses like ``nlp`` but is interrupted (Ctrl-C) after ``n`` texts, and
    records how many cache lines were on disk at each text it handed out."""

    def __init__(self, nlp, n: int, path: Path) -> None:
        self.nlp, self.n, self.path = nlp, n, path
        self.meta = nlp.meta  # what the cache keys entries with
        self.lines_seen: list[int] = []

    def pipe(self, texts, batch_size, n_process):
        for i, doc in enumerate(self.nlp.pipe(texts, batch_size=batch_size)):
            if i == self.n:
                raise KeyboardInterrupt
            self.lines_seen.append(len(lines(self.path)) if self.path.exists() else 0)
            yield doc


def test_entries_are_written_while_parsing_and_kept_on_interrupt(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    stopper = StopAfter(nlp, 11, path)
    cache = P.UnitCache(path, stopper, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        cache.units(MANY)
    # each batch of 4 is on disk before the next text is parsed; the 3 pending ones at the stop too
    assert stopper.lines_seen == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8]
    assert len(lines(path)) == 11 and cache.stats.parsed == 11
    resumed = P.UnitCache(path, nlp, batch_size=4)
    assert resumed.units(MANY) == S.extract_units(MANY, nlp)
    assert resumed.stats == P.CacheStats(hits=11, parsed=len(MANY) - 11)
    assert len(lines(path)) == len(MANY)


def test_rewrite_after_corrupt_lines_happens_once_then_appends(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    P.UnitCache(path, nlp).units(MANY[:3])
    path.write_text(path.read_text() + "not json\n")
    cache = P.UnitCache(path, nlp, batch_size=2)
    assert cache.units(MANY) == S.extract_units(MANY, nlp)
    assert cache.stats.corrupt == 1 and cache.stats.parsed == len(MANY) - 3
    assert sorted(e["key"] for e in lines(path)) == sorted(P.text_key(t) for t in MANY)


def test_stale_entries_are_replaced_not_duplicated(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    P.UnitCache(path, nlp, max_phrase_tokens=5).units(MANY[:6])
    cache = P.UnitCache(path, nlp, max_phrase_tokens=8, batch_size=2)
    assert cache.units(MANY[:6]) == S.extract_units(MANY[:6], nlp, max_phrase_tokens=8)
    assert cache.stats.stale == 6
    entries = lines(path)
    assert len(entries) == 6 and {e["cfg"]["max_phrase_tokens"] for e in entries} == {8}


def test_cli_interrupt_keeps_the_parsed_texts(tmp_path, nlp, monkeypatch, capsys):
    data, cache = tmp_path / "data.jsonl", tmp_path / "units.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in MANY))
    real = S.load_pipeline
    monkeypatch.setattr(S, "load_pipeline", lambda name=None: StopAfter(real(name), 5, cache))
    args = [str(data), "--cache", str(cache), "--fields", "text", "--batch-size", "2"]
    assert P.main(args) == 130
    err = capsys.readouterr().err
    assert "mta-prepare: stopped after parsing 5 texts, which are in" in err
    assert err.strip().endswith("mta-prepare: interrupted") and "Traceback" not in err
    monkeypatch.setattr(S, "load_pipeline", real)
    assert P.main(args) == 0
    assert f"18 texts (18 distinct): 5 cached, {len(MANY) - 5} parsed" in capsys.readouterr().out


def test_cli_shows_progress_as_plain_lines_off_a_terminal(tmp_path, nlp, capsys):
    data, cache = tmp_path / "data.jsonl", tmp_path / "units.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in MANY))
    assert P.main([str(data), "--cache", str(cache), "--fields", "text"]) == 0
    err = capsys.readouterr().err  # not a terminal: no bar, a line at the end
    assert re.search(r"mta-prepare: parsing 18/18 texts \(100%\), [\d.]+ texts/s, done in", err)
    assert "\r" not in err


def test_cli_parses_in_parallel(tmp_path, nlp, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in MANY))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    for cache, n in ((one, "1"), (two, "2")):
        args = [str(data), "--cache", str(cache), "--fields", "text", "--n-process", n]
        assert P.main([*args, "--batch-size", "4"]) == 0
    assert P.UnitCache(one, nlp).units(MANY) == P.UnitCache(two, nlp).units(MANY)
    assert {e["key"] for e in lines(one)} == {e["key"] for e in lines(two)}
