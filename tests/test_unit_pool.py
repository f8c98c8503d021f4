"""Tests of mta.unit_pool: background parsing equals extract_units, in a thread and in worker
processes, for both rule sets, and shares its entries with the mta-prepare cache."""

from __future__ import annotations

import sys

import pytest

from mta import spans as S
from mta.prepare import UnitCache
from mta.unit_pool import UnitPool

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Below is an instruction.\n\n### Instruction:\nName a colour.\n\n"
    "### Response:\nThe sky is blue.",
    "She has not eaten the big red apple that her mother bought yesterday.",
    "The quick brown fox jumps over the lazy dog near the river bank.",  # a repeat
]
# content regions of the second text (instruction and response), as mta.data builds them
REGIONS = [None, [(43, 57), (73, 89)], None, None]


@pytest.mark.parametrize("rules", S.UNIT_RULES)
def test_thread_pool_equals_extract_units(nlp, rules):
    regions = REGIONS if rules == "paper" else None
    expected = S.extract_units(TEXTS, nlp, regions=regions, rules=rules)
    with UnitPool(nlp, processes=0, rules=rules) as pool:
        pending = pool.submit(TEXTS, regions)
        assert pending.result() == expected
        assert pending.result() is pending.result()  # collected once
        # a second call is answered from memory: no job is sent
        again = pool.submit(TEXTS, regions)
        assert again.jobs == [] and again.done() and again.result() == expected


def test_worker_processes_equal_extract_units(nlp):
    expected = S.extract_units(TEXTS, nlp, regions=REGIONS)
    with UnitPool(processes=2) as pool:
        pending = pool.submit(TEXTS, REGIONS)
        assert len(pending.jobs) == 2  # the distinct segments are split over both workers
        assert pending.result() == expected


def test_disk_cache_is_the_prepare_cache(tmp_path, nlp, monkeypatch):
    path = tmp_path / "units.jsonl"
    expected = S.extract_units(TEXTS, nlp, regions=REGIONS)
    with UnitPool(nlp, processes=0, cache=path) as pool:
        assert pool.units(TEXTS, REGIONS) == expected
    # mta-prepare's reader sees every entry, without parsing
    monkeypatch.setitem(sys.modules, "spacy", None)
    cache = UnitCache(path)
    assert cache.units(TEXTS, REGIONS) == expected
    assert cache.stats.parsed == 0 and cache.stats.hits == 4  # distinct segments
    # and a new pool answers from the file, sending nothing to parse (spaCy is not needed)
    with UnitPool(processes=0, cache=path) as pool:
        pending = pool.submit(TEXTS, REGIONS)
        assert pending.jobs == [] and pending.result() == expected


def test_write_cache_false_leaves_the_file_alone(tmp_path, nlp):
    path = tmp_path / "units.jsonl"
    with UnitPool(nlp, processes=0, cache=path, write_cache=False) as pool:
        pool.units(TEXTS[:1])
    assert not path.exists()


def test_bad_arguments_are_named(nlp):
    with pytest.raises(ValueError, match="processes must be an int >= 0"):
        UnitPool(processes=-1)
    with pytest.raises(ValueError, match="rules must be one of"):
        UnitPool(rules="mine")
    with pytest.raises(TypeError, match="by name"):
        UnitPool(nlp, processes=1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(UnitPool(processes=0))


def test_memory_cache_keeps_the_most_recent_texts(nlp):
    expected = S.extract_units(TEXTS, nlp, regions=REGIONS)
    with UnitPool(nlp, processes=0, memory_entries=2) as pool:
        assert pool.units(TEXTS, REGIONS) == expected  # 4 distinct segments parsed
        assert len(pool._known) == 2
        again = pool.submit(TEXTS[2:3])  # the last text parsed: still remembered
        assert again.jobs == [] and again.result() == expected[2:3]
        assert pool.submit(TEXTS[:1]).jobs  # the first: dropped, parsed again
    with pytest.raises(ValueError, match="memory_entries"):
        UnitPool(memory_entries=-1)
