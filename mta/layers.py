"""Layer plan: which student layer is aligned to which teacher layer, at which granularity.

Indices are Hugging Face ``hidden_states`` indices: ``0`` is the embedding output and ``l`` the
output of block ``l``, so a model with ``n`` blocks has valid key layers ``1..n`` (the embeddings
are never aligned).

Default rule (docs/design.md §2 "Layer plan"):

* ``K = num_key_layers`` student key layers are taken top-down from the last layer with a stride:
  ``n_S, n_S - stride, …, n_S - (K - 1)·stride``.
* Default ``stride = max(1, n_S // (2·(K - 1)))`` (``1`` when ``K = 1``): the key layers are spread
  evenly over the upper half of the student, the lowest one at about ``n_S / 2`` for every ``K``
  (GPT-2 small, 12 layers, ``K = 3``: stride 3, layers 12, 9, 6 as in the paper).
* The lowest ``num_word_layers`` key layers compare word units, the others phrase units.
* Teacher layer of student layer ``l``: ``max(1, floor(l·n_T / n_S))`` (GPT-2 1.5B → 120M:
  6→24, 9→36, 12→48); the ``max`` only matters for a teacher shallower than the student.

Explicit pairs (from a config) bypass the rule: see :func:`parse_layer_pairs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "GRANULARITIES",
    "LayerPair",
    "LayerPairLike",
    "model_dims",
    "parse_layer_pairs",
    "plan_layers",
]

Granularity = Literal["word", "phrase"]
GRANULARITIES: tuple[str, ...] = ("word", "phrase")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class LayerPair:
    """One aligned layer pair: ``hidden_states[student_layer]`` of the student against
    ``hidden_states[teacher_layer]`` of the teacher, compared on ``granularity`` units."""

    student_layer: int
    teacher_layer: int
    granularity: Granularity

    def __post_init__(self) -> None:
        _check_int("student_layer", self.student_layer, 1)
        _check_int("teacher_layer", self.teacher_layer, 1)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )

    @property
    def name(self) -> str:
        """``"<student>-<teacher>"``, the suffix of the per-layer loss components (``dsa/6-24``)."""
        return f"{self.student_layer}-{self.teacher_layer}"


#: A layer pair as written in a config: a LayerPair, a mapping or a 3-sequence.
LayerPairLike = LayerPair | Mapping[str, Any] | Sequence[Any]


def _to_pair(index: int, item: Any) -> LayerPair:
    """One config entry -> LayerPair (a LayerPair, a mapping or a 3-sequence)."""
    where = f"layer_pairs[{index}]"
    try:
        if isinstance(item, LayerPair):
            return item
        if isinstance(item, Mapping):
            keys = {"student_layer", "teacher_layer", "granularity"}
            if set(item) != keys:
                raise ValueError(
                    f"{where} must have exactly the keys {sorted(keys)}, got {sorted(item)}"
                )
            return LayerPair(**item)
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
            return LayerPair(*item)
    except (TypeError, ValueError) as err:
        if str(err).startswith(where):
            raise
        raise type(err)(f"{where}: {err}") from None
    raise TypeError(
        f"{where} must be a LayerPair, a mapping with student_layer/teacher_layer/granularity "
        f"or a (student_layer, teacher_layer, granularity) sequence, got {item!r}"
    )


def parse_layer_pairs(
    pairs: Sequence[LayerPairLike],
    n_student_layers: int | None = None,
    n_teacher_layers: int | None = None,
) -> list[LayerPair]:
    """Validate explicit layer pairs (e.g. from a YAML config) and sort them by student layer.

    Each entry is a :class:`LayerPair`, a mapping ``{student_layer, teacher_layer, granularity}``
    or a ``(student_layer, teacher_layer, granularity)`` sequence. Layers must lie in
    ``[1, n_layers]`` when the depths are given, and each student layer may appear once (it owns
    one projector).
    """
    if isinstance(pairs, (str, Mapping)) or not isinstance(pairs, Sequence):
        raise TypeError(f"layer_pairs must be a list of layer pairs, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("layer_pairs is empty: give at least one layer pair")
    parsed = [_to_pair(i, item) for i, item in enumerate(pairs)]
    for side, depth in (("student", n_student_layers), ("teacher", n_teacher_layers)):
        if depth is None:
            continue
        _check_int(f"n_{side}_layers", depth, 1)
        for pair in parsed:
            layer = getattr(pair, f"{side}_layer")
            if layer > depth:
                raise ValueError(
                    f"{side} layer {layer} of layer pair {pair.name} is out of range: the "
                    f"{side} has {depth} layers, so layer indices must be in [1, {depth}] "
                    "(hidden_states index; 0 is the embedding output and is never aligned)"
                )
    seen: set[int] = set()
    for pair in parsed:
        if pair.student_layer in seen:
            raise ValueError(
                f"student layer {pair.student_layer} appears in more than one layer pair; each "
                "student layer may be aligned once (it owns one projector)"
            )
        seen.add(pair.student_layer)
    return sorted(parsed, key=lambda pair: pair.student_layer)


def plan_layers(
    n_student_layers: int,
    n_teacher_layers: int,
    num_key_layers: int = 3,
    num_word_layers: int = 1,
    stride: int | None = None,
    *,
    pairs: Sequence[LayerPairLike] | None = None,
) -> list[LayerPair]:
    """Layer pairs for MTA, sorted by student layer (ascending).

    With ``pairs`` (explicit pairs from a config) they are validated against the depths and
    returned, and ``num_key_layers``, ``num_word_layers`` and ``stride`` are ignored. Otherwise the
    default rule of the module docstring applies.

    >>> [(p.student_layer, p.teacher_layer, p.granularity) for p in plan_layers(12, 48)]
    [(6, 24, 'word'), (9, 36, 'phrase'), (12, 48, 'phrase')]
    """
    _check_int("n_student_layers", n_student_layers, 1)
    _check_int("n_teacher_layers", n_teacher_layers, 1)
    if pairs is not None:
        return parse_layer_pairs(pairs, n_student_layers, n_teacher_layers)
    _check_int("num_key_layers", num_key_layers, 1)
    _check_int("num_word_layers", num_word_layers, 0)
    if num_word_layers > num_key_layers:
        raise ValueError(
            f"num_word_layers ({num_word_layers}) cannot exceed num_key_layers ({num_key_layers})"
        )
    if stride is None:
        stride = max(1, n_student_layers // (2 * (num_key_layers - 1))) if num_key_layers > 1 else 1
    _check_int("stride", stride, 1)
    lowest = n_student_layers - (num_key_layers - 1) * stride
    if lowest < 1:
        raise ValueError(
            f"num_key_layers={num_key_layers} with stride={stride} reaches student layer {lowest}, "
            f"below 1: the student has {n_student_layers} layers; lower num_key_layers or stride"
        )
    student_layers = range(lowest, n_student_layers + 1, stride)
    return [
        LayerPair(
            student_layer=layer,
            teacher_layer=max(1, layer * n_teacher_layers // n_student_layers),
            granularity="word" if rank < num_word_layers else "phrase",
        )
        for rank, layer in enumerate(student_layers)
    ]


def model_dims(config: Any) -> tuple[int, int]:
    """(blocks, hidden size) of a Hugging Face model ``config`` (its text model's, for a
    multimodal one): the range of its key layers, ``1..blocks``, and its width."""
    text = config.get_text_config()
    return int(text.num_hidden_layers), int(text.hidden_size)
