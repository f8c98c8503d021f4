"""Tests of mta.data: record formats, prompt template regions, labels, units, collator.

Tokenizers are trained here with ``tokenizers`` on the test's own records (byte-level BPE as in
GPT-2/Qwen, and SentencePiece-style Metaspace BPE with a BOS token as in LLaMA). The helpers
(``RECORDS``, ``make_tokenizer``, ``regex_units``) are shared with the other trainer-side tests.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from training_helpers import RECORDS, make_tokenizer, regex_units

from mta.data import (
    TEMPLATES,
    DistillationCollator,
    DistillationDataset,
    Example,
    build_dataset,
    chat_prompt_example,
    format_record,
    load_units,
    pad_token_id,
    read_jsonl,
)
from mta.spans import TextUnits


def examples() -> list[Example]:
    return [format_record(r) for r in RECORDS]


@pytest.fixture(scope="module")
def tokenizers_():
    texts = [e.text for e in examples()]
    return {kind: make_tokenizer(texts, kind) for kind in ("bytelevel", "metaspace")}


# ---------------------------------------------------------------------------- formatting


@pytest.mark.parametrize("with_input", [False, True])
def test_dolly_template_regions_cover_exactly_the_fields(with_input):
    record = {"instruction": "Do X.", "input": "Some input." if with_input else "", "output": "Y."}
    ex = format_record(record)
    template = TEMPLATES["dolly"]
    expected_prompt = (template.with_input if with_input else template.without_input).format(
        instruction="Do X.", input="Some input."
    )
    assert ex.prompt == expected_prompt and ex.prompt.endswith("### Response:\n")
    assert ex.response == "Y." and ex.text == expected_prompt + "Y."
    pieces = [ex.text[s:e] for s, e in ex.regions]
    assert pieces == (["Do X.", "Some input.", "Y."] if with_input else ["Do X.", "Y."])


def test_prompt_text_and_alias_formats():
    ex = format_record(RECORDS[2])
    assert ex.prompt == RECORDS[2]["prompt"] and ex.response == "It translates code."
    assert [ex.text[s:e] for s, e in ex.regions] == [RECORDS[2]["prompt"], "It translates code."]
    ex = format_record(RECORDS[3])
    assert ex.response_start == 0 and ex.regions == ((0, len(RECORDS[3]["text"])),)
    ex = format_record(RECORDS[4])  # context / response aliases
    assert ex.response == RECORDS[4]["response"] and "### Input" not in ex.text


@pytest.mark.parametrize(
    ("record", "kwargs", "error", "match"),
    [
        ({"instruction": "x"}, {}, ValueError, "missing field 'output' / 'response'"),
        ({"question": "x"}, {}, ValueError, "cannot tell the format"),
        ({"instruction": 3, "output": "y"}, {}, TypeError, "'instruction' must be a string"),
        ({"text": "x"}, {"fmt": "chat"}, ValueError, "format must be one of"),
        ({"text": "x"}, {"template": "alpaca2"}, ValueError, "template must be one of"),
        ({"text": "x"}, {"fmt": "prompt"}, ValueError, "missing field 'prompt'"),
    ],
)
def test_format_record_errors(record, kwargs, error, match):
    with pytest.raises(error, match=match):
        format_record(record, **kwargs)


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_jsonl(path) == [{"text": "a"}, {"text": "b"}]
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------- chat prompts

#: A template in the style of Qwen's: a default system prompt when the conversation has none.
SYSTEM_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}<|system|>You are a helpful assistant. Help the "
    "user.\n{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: Llama 3's way: every content trimmed.
TRIMMING = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "help"},
    {"role": "assistant", "content": "What do you need help with?"},
    {"role": "user", "content": "  A user helps. "},
]


def render_with(tokenizers_, template):
    tok = tokenizers_["bytelevel"]

    def render(messages):
        return tok.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )

    return render


@pytest.mark.parametrize(
    ("template", "contents"),
    [
        (SYSTEM_DEFAULT, [m["content"] for m in CONVERSATION]),
        (TRIMMING, [m["content"].strip() for m in CONVERSATION]),
    ],
    ids=["default-system-prompt", "trimming"],
)
def test_chat_prompt_regions_are_the_message_contents(tokenizers_, template, contents):
    """Each region is its message's content where the template put it, never the template's
    text holding the same words ("help" in the default system prompt)."""
    render = render_with(tokenizers_, template)
    ex = chat_prompt_example(render, CONVERSATION)
    assert ex.text == render(CONVERSATION) and ex.response_start == len(ex.text)
    assert [ex.text[s:e] for s, e in ex.regions] == contents
    marker = ex.text.index("<|user|>") if template == SYSTEM_DEFAULT else ex.text.index("[user]")
    assert ex.regions[0][0] > marker  # not the "Help" of the system prompt before it


def test_chat_prompt_skips_empty_contents(tokenizers_):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi there."}]
    ex = chat_prompt_example(render_with(tokenizers_, SYSTEM_DEFAULT), messages)
    assert [ex.text[s:e] for s, e in ex.regions] == ["Hi there."]


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        (SYSTEM_DEFAULT, [{"role": "user", "content": None}], "content of type NoneType"),
        (
            "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}",
            CONVERSATION[:1],
            "renders 2 times message 0's content",
        ),
        (
            "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}",
            CONVERSATION[:2],
            "renders message 1's content out of order",
        ),
        (
            "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}",
            CONVERSATION[:1],
            "leaves out or transforms message 0's content",
        ),
        (
            "{% for m in messages %}{{ m['content'].replace('help', 'aid') }}{% endfor %}",
            CONVERSATION[:1],
            "does not render the messages' contents as they are",
        ),
    ],
    ids=["not-text", "twice", "reordered", "transformed", "edited"],
)
def test_chat_prompt_errors(tokenizers_, template, messages, match):
    with pytest.raises(ValueError, match=match):
        chat_prompt_example(render_with(tokenizers_, template), messages)


# ---------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_labels_cover_exactly_the_response_and_eos(tokenizers_, kind):
    tok = tokenizers_[kind]
    exs = examples()
    ds = DistillationDataset(exs, tok, max_length=256)
    assert len(ds) == len(exs)
    for ex, item in zip(exs, ds.items, strict=True):
        ids, labels = item["input_ids"], item["labels"]
        learned = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
        assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=True))
        if ex.response_start == 0:  # plain text: every target token, no EOS appended
            assert labels[1:] == ids[1:]
            continue
        assert learned[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id
        # the labelled tokens are a suffix and decode to the response (modulo a leading space)
        first = labels.index(learned[0])
        assert all(lab != -100 for lab in labels[first:])
        assert tok.decode(learned[:-1]).strip() == ex.response.strip()
        assert tok.decode(ids[:first], skip_special_tokens=True).strip() == ex.prompt.strip()


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_cut_response_gets_no_eos(tokenizers_, kind):
    tok = tokenizers_[kind]
    ex = examples()[5]
    full = DistillationDataset([ex], tok, max_length=256).items[0]["input_ids"]
    cut = DistillationDataset([ex], tok, max_length=len(full) - 3).items[0]
    assert len(cut["input_ids"]) == len(full) - 3
    assert cut["input_ids"] == full[: len(full) - 3]  # a prefix, no EOS glued on
    assert tok.eos_token_id not in cut["input_ids"][-1:]
    exact = DistillationDataset([ex], tok, max_length=len(full)).items[0]["input_ids"]
    assert exact == full  # the EOS fits exactly


def test_response_has_no_lone_word_start_token(tokenizers_):
    # SentencePiece-style tokenizers put a lone "▁" in front of text tokenized on its own.
    tok = tokenizers_["metaspace"]
    for item in DistillationDataset(examples(), tok, max_length=256).items:
        learned = [
            t for t, lab in zip(item["input_ids"], item["labels"], strict=True) if lab != -100
        ]
        assert tok.convert_ids_to_tokens(learned[0]) != "▁"


def test_truncation_drops_examples_without_response(tokenizers_, caplog):
    tok = tokenizers_["bytelevel"]
    long_prompt = format_record({"instruction": "word " * 200, "output": "Short answer."})
    short = format_record(RECORDS[0])
    with caplog.at_level(logging.WARNING, logger="mta.data"):
        ds = DistillationDataset([long_prompt, short], tok, max_length=160)
    assert len(ds) == 1 and "dropped 1 of 2 examples" in caplog.text
    assert len(ds[0]["input_ids"]) <= 160
    with pytest.raises(ValueError, match="raise max_length"):
        DistillationDataset([long_prompt], tok, max_length=160)


def test_bad_arguments(tokenizers_):
    tok = tokenizers_["bytelevel"]
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        DistillationDataset(examples(), tok, max_length=1)
    with pytest.raises(ValueError, match="one TextUnits per example"):
        DistillationDataset(examples(), tok, units=[TextUnits.empty()])
    with pytest.raises(TypeError, match="must be a fast"):
        DistillationDataset(examples(), type("Slow", (), {"is_fast": False})())


# ---------------------------------------------------------------------------- collator


@pytest.mark.parametrize("cross", [False, True])
def test_collator_batches_tokens_labels_and_units(tokenizers_, cross):
    student_tok = tokenizers_["bytelevel"]
    teacher_tok = tokenizers_["metaspace"] if cross else None
    exs = examples()
    units = [regex_units(e) for e in exs]
    ds = DistillationDataset(exs, student_tok, 256, teacher_tokenizer=teacher_tok, units=units)
    collate = DistillationCollator(
        pad_token_id(student_tok), pad_token_id(teacher_tok) if cross else None
    )
    batch = collate([ds[i] for i in range(len(ds))])
    lengths = torch.tensor([len(ds[i]["input_ids"]) for i in range(len(ds))])
    B, T = batch["input_ids"].shape
    assert (len(exs), int(lengths.max())) == (B, T)
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert ("teacher_input_ids" in batch) == cross
    for g in ("word", "phrase"):
        s_spans, t_spans = batch[f"{g}_student_spans"], batch[f"{g}_teacher_spans"]
        mask = batch[f"{g}_span_mask"]
        assert s_spans.dtype == torch.long and mask.dtype == torch.bool
        assert s_spans.shape == t_spans.shape == (*mask.shape, 2)
        assert (s_spans[~mask] == 0).all() and (t_spans[~mask] == 0).all()
        if not cross:
            assert torch.equal(s_spans, t_spans)
        for b, ex in enumerate(exs):
            n = int(mask[b].sum())
            assert n == len(units[b][g])  # no truncation here: every unit maps to both
            assert (s_spans[b, :n, 1] <= lengths[b]).all() and (s_spans[b, :n, 0] >= 0).all()
            for k, (cs, ce) in enumerate(units[b][g].tolist()):
                # the same unit k decodes to its characters in both tokenizations
                for spans, ids, tok in (
                    (s_spans, batch["input_ids"], student_tok),
                    (t_spans, batch.get("teacher_input_ids"), teacher_tok),
                ):
                    if tok is None:
                        continue
                    s, e = spans[b, k].tolist()
                    assert ex.text[cs:ce] in tok.decode(ids[b, s:e]).replace("▁", " ")
    if cross:
        t_len = torch.tensor([len(ds[i]["teacher_input_ids"]) for i in range(len(ds))])
        assert torch.equal(batch["teacher_attention_mask"].sum(1), t_len)
    assert (batch["labels"][:, 0] == -100).all()  # position 0 is never a target


# ---------------------------------------------------------------------------- units


def test_load_units_explains_how_to_get_units_without_spacy(monkeypatch, tmp_path):
    def no_spacy(*args, **kwargs):
        raise ImportError("mta.spans needs spaCy to parse texts")

    monkeypatch.setattr("mta.data.extract_units", no_spacy)
    with pytest.raises(ImportError, match=r"pip install 'mta\[spacy\]'.*mta-prepare"):
        load_units(examples())


def test_units_come_from_content_regions_and_cache(tmp_path, tokenizers_):
    pytest.importorskip("spacy")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cache = tmp_path / "units.jsonl"
    exs = examples()
    units = load_units(exs, cache)
    assert cache.is_file()
    for ex, u in zip(exs, units, strict=True):
        assert len(u.words) > 0
        for g in ("word", "phrase"):
            for s, e in u[g].tolist():  # no unit inside the template's boilerplate
                assert any(rs <= s and e <= re_ for rs, re_ in ex.regions), ex.text[s:e]
    assert load_units(exs, cache) == units  # read back from the cache
    ds = build_dataset(path, tokenizers_["bytelevel"], units_cache=cache, max_samples=3)
    assert len(ds) == 3 and "word_student_spans" in ds[0]
