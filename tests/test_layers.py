"""Layer plan: the default rule (docs/design.md §2), explicit pairs, and input errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.layers import LayerPair, parse_layer_pairs, plan_layers


def _triples(pairs: list[LayerPair]) -> list[tuple[int, int, str]]:
    return [(p.student_layer, p.teacher_layer, p.granularity) for p in pairs]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # GPT-2 1.5B (48 layers) -> 120M (12 layers): the paper's plan.
        ((12, 48), [(6, 24, "word"), (9, 36, "phrase"), (12, 48, "phrase")]),
        ((12, 12), [(6, 6, "word"), (9, 9, "phrase"), (12, 12, "phrase")]),
        # Default stride n_S // (2 (K - 1)): 24 // 4 = 6.
        ((24, 32), [(12, 16, "word"), (18, 24, "phrase"), (24, 32, "phrase")]),
        # 6 // 4 = 1: consecutive top layers; floor(l * 12 / 6).
        ((6, 12), [(4, 8, "word"), (5, 10, "phrase"), (6, 12, "phrase")]),
        # 32 // 6 = 5.
        (
            (32, 40, 4, 2),
            [(17, 21, "word"), (22, 27, "word"), (27, 33, "phrase"), (32, 40, "phrase")],
        ),
        # K = 2: stride 12 // 2 = 6; no word layer.
        ((12, 48, 2, 0), [(6, 24, "phrase"), (12, 48, "phrase")]),
        # All key layers word-level.
        ((12, 48, 2, 2), [(6, 24, "word"), (12, 48, "word")]),
        # K = 1: only the last layer.
        ((12, 48, 1, 1), [(12, 48, "word")]),
        ((1, 1, 1, 0), [(1, 1, "phrase")]),
        # Explicit stride.
        ((12, 24, 3, 1, 2), [(8, 16, "word"), (10, 20, "phrase"), (12, 24, "phrase")]),
        ((12, 24, 3, 1, 1), [(10, 20, "word"), (11, 22, "phrase"), (12, 24, "phrase")]),
        # K = n_S: every layer.
        ((3, 6, 3, 1), [(1, 2, "word"), (2, 4, "phrase"), (3, 6, "phrase")]),
        # Teacher shallower than the student: floor(9 * 6 / 12) = 4; never the embeddings.
        ((12, 6), [(6, 3, "word"), (9, 4, "phrase"), (12, 6, "phrase")]),
        ((4, 1), [(2, 1, "word"), (3, 1, "phrase"), (4, 1, "phrase")]),
    ],
)
def test_default_plan(args: tuple[int, ...], expected: list[tuple[int, int, str]]) -> None:
    assert _triples(plan_layers(*args)) == expected


@settings(max_examples=200, deadline=None, database=None)
@given(
    n_student=st.integers(1, 64),
    n_teacher=st.integers(1, 128),
    num_key=st.integers(1, 8),
    data=st.data(),
)
def test_default_plan_properties(n_student: int, n_teacher: int, num_key: int, data) -> None:
    """In range, top layer included, ascending, exactly num_word_layers word pairs at the bottom."""
    num_key = min(num_key, n_student)
    num_word = data.draw(st.integers(0, num_key))
    pairs = plan_layers(n_student, n_teacher, num_key, num_word)
    students = [p.student_layer for p in pairs]
    assert len(pairs) == num_key
    assert students[-1] == n_student
    assert students == sorted(set(students))
    if n_student >= 2 * (num_key - 1):  # room for the stride rule: the upper half is used
        assert students[0] >= n_student / 2
    assert all(1 <= p.teacher_layer <= n_teacher for p in pairs)
    assert [p.granularity for p in pairs] == ["word"] * num_word + ["phrase"] * (num_key - num_word)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(n_student_layers=0, n_teacher_layers=4), ValueError, "n_student_layers must be >= 1"),
        (dict(n_student_layers=4, n_teacher_layers=-1), ValueError, "n_teacher_layers"),
        (
            dict(n_student_layers=4.0, n_teacher_layers=4),
            TypeError,
            "n_student_layers must be an int",
        ),
        (dict(n_student_layers=True, n_teacher_layers=4), TypeError, "n_student_layers"),
        (dict(n_student_layers=4, n_teacher_layers=4, num_key_layers=0), ValueError, "num_key"),
        (
            dict(n_student_layers=12, n_teacher_layers=4, num_key_layers=2, num_word_layers=3),
            ValueError,
            r"num_word_layers \(3\) cannot exceed num_key_layers \(2\)",
        ),
        (dict(n_student_layers=4, n_teacher_layers=4, num_word_layers=-1), ValueError, "num_word"),
        (dict(n_student_layers=12, n_teacher_layers=4, stride=0), ValueError, "stride"),
        (
            dict(n_student_layers=12, n_teacher_layers=48, stride=6),
            ValueError,
            "reaches student layer 0, below 1",
        ),
        (dict(n_student_layers=2, n_teacher_layers=4), ValueError, "reaches student layer 0"),
    ],
)
def test_plan_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plan_layers(**kwargs)


def test_explicit_pairs_all_forms() -> None:
    config = [
        {"student_layer": 12, "teacher_layer": 40, "granularity": "phrase"},
        (4, 10, "word"),
        [8, 20, "phrase"],
        LayerPair(2, 1, "word"),
    ]
    expected = [(2, 1, "word"), (4, 10, "word"), (8, 20, "phrase"), (12, 40, "phrase")]
    assert _triples(plan_layers(12, 48, pairs=config)) == expected
    # The rule's arguments are ignored with explicit pairs.
    assert _triples(plan_layers(12, 48, num_key_layers=1, pairs=config)) == expected
    assert _triples(parse_layer_pairs(config)) == expected


@pytest.mark.parametrize(
    ("pairs", "error", "match"),
    [
        ([(13, 10, "word")], ValueError, r"student layer 13 .* must be in \[1, 12\]"),
        ([(6, 49, "word")], ValueError, r"teacher layer 49 .* must be in \[1, 48\]"),
        ([(0, 10, "word")], ValueError, r"layer_pairs\[0\]: student_layer must be >= 1, got 0"),
        ([(6, 24, "word"), (6, 30, "phrase")], ValueError, "student layer 6 appears in more"),
        ([(6, 24, "sentence")], ValueError, r"layer_pairs\[0\]: granularity must be one of"),
        ([(6, 24)], TypeError, r"layer_pairs\[0\] must be a LayerPair"),
        ([{"student": 6, "teacher": 24, "granularity": "word"}], ValueError, "exactly the keys"),
        ([("6", 24, "word")], TypeError, "student_layer must be an int"),
        ([], ValueError, "layer_pairs is empty"),
        ("6-24", TypeError, "layer_pairs must be a list"),
        ({"student_layer": 6}, TypeError, "layer_pairs must be a list"),
    ],
)
def test_explicit_pair_errors(pairs, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plan_layers(12, 48, pairs=pairs)


def test_layer_pair_is_frozen_and_named() -> None:
    pair = LayerPair(6, 24, "word")
    assert pair.name == "6-24"
    assert pair == LayerPair(student_layer=6, teacher_layer=24, granularity="word")
    with pytest.raises(AttributeError):
        pair.student_layer = 7  # type: ignore[misc]
