"""Instruction and plain-text data for MTA distillation.

Records (one JSON object per line):

* ``instruction`` (+ optional ``input``, ``context``) and ``output`` (``response``) — Dolly /
  Alpaca style, formatted with a prompt template (:data:`TEMPLATES`);
* ``prompt`` and ``output`` — a prompt used verbatim (already templated, as in the MiniLLM /
  DistiLLM processed sets);
* ``text`` — plain text, loss on every token.

Each example is one string ``text = prompt + response``. The prompt and the response are
tokenized separately (so the prompt's tokens are those seen at generation time) and concatenated,
with the tokenizer's EOS token after the response; the prompt's tokens get label ``-100``, the
response tokens and the EOS token are learned. The linguistic units (:mod:`mta.spans`) are
extracted over the *content* of the example — instruction, input and response, each parsed on
its own — so the template's boilerplate (``### Instruction:``) yields no unit; they come from the
units cache (:mod:`mta.prepare`) when one is given. When the teacher uses another tokenizer, the
same text is tokenized a second time and each unit is mapped to both tokenizations.

:class:`DistillationCollator` pads a batch on the right: ``input_ids``, ``attention_mask``,
``labels`` (``-100`` on padding), ``teacher_input_ids`` / ``teacher_attention_mask`` with a second
tokenizer, and the unit keys (``{g}_student_spans``, ``{g}_teacher_spans``, ``{g}_span_mask``)
with the batch's :class:`~mta.unit_plan.UnitPlan` built from them (``"unit_plan"``), which is what
:class:`~mta.loss.MTALoss` reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mta.jsonl import read_records
from mta.prepare import UnitCache
from mta.spans import (
    GRANULARITIES,
    TextUnits,
    example_unit_spans,
    extract_units,
    fill_template,
    pad_unit_spans,
)
from mta.unit_plan import PLAN_KEY, UnitPlan

__all__ = [
    "EXAMPLES_KEY",
    "EXAMPLE_KEY",
    "FORMATS",
    "TEMPLATES",
    "DistillationCollator",
    "DistillationDataset",
    "Example",
    "GeneratedExample",
    "PromptTemplate",
    "build_dataset",
    "encode_example",
    "encode_generated",
    "format_record",
    "load_units",
    "pad_token_id",
    "read_examples",
    "read_jsonl",
    "same_tokenizer",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "instruction", "prompt", "text")
Span = tuple[int, int]
#: Where a dataset item keeps its :class:`Example`, and a collated batch the list of them.
EXAMPLE_KEY = "example"
EXAMPLES_KEY = "examples"


@dataclass(frozen=True)
class PromptTemplate:
    """``str.format`` templates of the prompt, with and without an ``{input}`` field; the
    response follows the prompt directly."""

    with_input: str
    without_input: str


#: Built-in templates. ``dolly`` is the Alpaca-style prompt of the MTA / DistiLLM / MiniLLM
#: evaluation (Dolly, SelfInst, Vicuna, S-NI); ``plain`` only separates the fields.
TEMPLATES: dict[str, PromptTemplate] = {
    "dolly": PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
    "plain": PromptTemplate(
        with_input="{instruction}\n\n{input}\n\n", without_input="{instruction}\n\n"
    ),
}


@dataclass(frozen=True)
class Example:
    """One formatted record.

    ``text = prompt + response``; ``response_start = len(prompt)`` (0 for plain text);
    ``regions``: sorted character ranges of the content (instruction, input, response), the
    ``regions`` argument of :func:`mta.spans.extract_units`.
    """

    text: str
    response_start: int
    regions: tuple[Span, ...]

    @property
    def prompt(self) -> str:
        return self.text[: self.response_start]

    @property
    def response(self) -> str:
        return self.text[self.response_start :]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not a JSON object (the message gives the line number).
    """
    return [record for _, record in read_records(path)]


def _field(record: Mapping[str, Any], names: Sequence[str], where: str, required: bool) -> str:
    for name in names:
        value = record.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(
                    f"{where}: field {name!r} must be a string, got {type(value).__name__}"
                )
            return value
    if required:
        raise ValueError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")
    return ""


def _detect(record: Mapping[str, Any], where: str) -> str:
    if "instruction" in record:
        return "instruction"
    if "prompt" in record:
        return "prompt"
    if "text" in record:
        return "text"
    raise ValueError(
        f"{where}: cannot tell the format: expected 'instruction'/'output', 'prompt'/'output' or "
        f"'text' fields, got {sorted(record)}"
    )


def format_record(
    record: Mapping[str, Any],
    fmt: str = "auto",
    template: str | PromptTemplate = "dolly",
    where: str = "record",
) -> Example:
    """Format one record into an :class:`Example` (see the module docstring); ``where`` names
    the record in error messages."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
        template = TEMPLATES[template]
    if fmt == "auto":
        fmt = _detect(record, where)
    if fmt == "text":
        text = _field(record, ("text",), where, True)
        return Example(text, 0, ((0, len(text)),) if text else ())
    if fmt == "instruction":
        fields = {
            "instruction": _field(record, ("instruction",), where, True),
            "input": _field(record, ("input", "context"), where, False),
        }
        prompt_template = template.with_input if fields["input"].strip() else template.without_input
    else:
        fields = {"prompt": _field(record, ("prompt",), where, True)}
        prompt_template = "{prompt}"
    output = _field(record, ("output", "response"), where, True)
    prompt, _ = fill_template(prompt_template, **fields)
    text, regions = fill_template(prompt_template + "{output}", **fields, output=output)
    return Example(text, len(prompt), tuple(regions))


def _content_marker(n: int) -> str:
    # private-use characters: no real content holds them, and ``trim`` leaves them in place
    return f"\ue000mta-content-{n}\ue001"


def chat_prompt_example(
    render: Callable[[list[dict[str, Any]]], str], messages: Sequence[Mapping[str, Any]]
) -> Example:
    """A conversation as a prompt :class:`Example`: ``render(messages)`` (the chat template's
    text), its content regions the messages' contents.

    Each content is located by rendering the conversation once more with a unique marker in its
    place, so the template's own text (role markup, a system prompt it adds) is never taken for
    content, even where it holds a content's words. The contents put back in the markers' places
    must give the real rendering, verbatim or stripped of surrounding whitespace (templates that
    ``trim``).

    Raises:
        ValueError: a content is not a string, the template renders a content other than once
            or out of order, or not as the contents themselves.
    """
    contents = []
    for n, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(
                f"message {n} of a prompt has content of type {type(content).__name__}: MTA "
                "aligns text units, so message contents must be strings"
            )
        contents.append(content)
    text = render([dict(m) for m in messages])
    marked = render([{**m, "content": _content_marker(n)} for n, m in enumerate(messages)])
    pieces, cursor = [], 0  # the template's text between the contents
    for n in range(len(messages)):
        marker = _content_marker(n)
        count = marked.count(marker)
        if count != 1:
            how = "leaves out or transforms" if count == 0 else f"renders {count} times"
            raise ValueError(
                f"the chat template {how} message {n}'s content, so its units cannot be placed "
                "in the prompt's text"
            )
        start = marked.index(marker)
        if start < cursor:
            raise ValueError(f"the chat template renders message {n}'s content out of order")
        pieces.append(marked[cursor:start])
        cursor = start + len(marker)
    for placed in (contents, [c.strip() for c in contents]):
        rebuilt, regions = "", []
        for piece, content in zip(pieces, placed, strict=True):
            rebuilt += piece
            if content:
                regions.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content
        if rebuilt + marked[cursor:] == text:
            return Example(text, len(text), tuple(regions))
    raise ValueError(
        "the chat template does not render the messages' contents as they are (nor stripped), "
        "so their units cannot be placed in the prompt's text"
    )


def _offsets(enc: Any, shift: int = 0) -> np.ndarray:
    return np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) + shift


def _is_lone_space(tokenizer: Any, token_id: int) -> bool:
    """A token that is only a word-start marker (SentencePiece ``▁``, byte-level ``Ġ``)."""
    return tokenizer.convert_ids_to_tokens(token_id) in ("▁", "Ġ")


def encode_example(
    tokenizer: Any, example: Example, max_length: int, add_eos: bool
) -> tuple[list[int], np.ndarray, int, bool, bool]:
    """``(ids, offsets int64[T, 2], n_prompt, truncated, eos_added)`` of an example, at most
    ``max_length`` tokens.

    The prompt (with the tokenizer's special tokens, e.g. BOS) and the response (without) are
    tokenized separately and concatenated, so the prompt's tokens are exactly those a model sees
    at generation time and no token straddles the boundary; the response's offsets are shifted to
    ``text`` coordinates. A lone word-start token that a SentencePiece-style tokenizer puts in
    front of text tokenized on its own is dropped (the same text after the prompt has none). The
    end is truncated; EOS (offsets ``(0, 0)``) is appended only when asked and when the response
    was not cut — a cut response must not teach the model to stop mid-sentence.
    """
    prompt, response = example.prompt, example.response
    if prompt:
        head = tokenizer(prompt, return_offsets_mapping=True)
        tail = tokenizer(response, return_offsets_mapping=True, add_special_tokens=False)
        tail_ids, tail_offsets = list(tail["input_ids"]), _offsets(tail, len(prompt))
        if tail_ids and not response[:1].isspace() and _is_lone_space(tokenizer, tail_ids[0]):
            tail_ids, tail_offsets = tail_ids[1:], tail_offsets[1:]
        ids = list(head["input_ids"]) + tail_ids
        offsets = np.concatenate([_offsets(head), tail_offsets])
        n_prompt = len(head["input_ids"])
    else:
        enc = tokenizer(response, return_offsets_mapping=True)
        ids, offsets, n_prompt = list(enc["input_ids"]), _offsets(enc), 0
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: set tokenizer.eos_token")
    truncated = len(ids) > max_length
    eos_added = add_eos and len(ids) < max_length
    ids, offsets = ids[:max_length], offsets[:max_length]
    if eos_added:
        ids.append(tokenizer.eos_token_id)
        offsets = np.concatenate([offsets, np.zeros((1, 2), np.int64)])
    return ids, offsets, min(n_prompt, len(ids)), truncated, eos_added


@dataclass(frozen=True)
class GeneratedExample:
    """A prompt with a response sampled from the student, ready to train on.

    ``example``: prompt + the decoded response, with the response's character range added to the
    prompt's content regions (units are extracted from it as from a dataset example);
    ``input_ids``: the prompt's tokens then the sampled tokens exactly as generated, up to and
    including the first EOS, at most ``max_length`` in all; ``offsets`` int64[T, 2]: each token's
    character range in ``example.text`` (``(0, 0)`` for EOS); ``n_prompt``: prompt tokens;
    ``ends_with_eos``: the response ended with EOS; ``truncated``: ``max_length`` cut it.
    """

    example: Example
    input_ids: list[int]
    offsets: np.ndarray
    n_prompt: int
    ends_with_eos: bool
    truncated: bool

    @property
    def labels(self) -> list[int]:
        """``-100`` on the prompt, the sampled tokens on the response."""
        return [-100] * self.n_prompt + self.input_ids[self.n_prompt :]


def _token_offsets(tokenizer: Any, ids: Sequence[int], text: str) -> np.ndarray:
    """int64[len(ids), 2] character ranges of ``ids`` in ``text = decode(ids)``: the offsets of
    re-encoding ``text`` when that gives back ``ids`` (the usual case), else the growth of the
    decoded prefix at each token (a sampled, non-canonical tokenization)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) == list(ids):
        return _offsets(enc)
    offsets = np.zeros((len(ids), 2), np.int64)
    end = 0
    for i in range(len(ids)):
        # a byte-level token may end inside a character: its prefix decodes with a
        # replacement character, hence the clamp to a non-decreasing range within text
        grown = min(
            len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)), len(text)
        )
        offsets[i] = (end, max(end, grown))
        end = max(end, grown)
    return offsets


def _prompt_offsets(tokenizer: Any, prompt: str, prompt_ids: Sequence[int]) -> np.ndarray:
    """int64[len(prompt_ids), 2] character ranges of ``prompt_ids`` in ``prompt``, which they
    must tokenize exactly (with the tokenizer's special tokens or without: a prompt rendered by
    a chat template holds its special tokens as text)."""
    for special in (True, False):
        enc = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(prompt_ids):
            return _offsets(enc)
    raise ValueError(
        f"the prompt's {len(prompt_ids)} tokens are not the tokenization of its text "
        f"{prompt[:60]!r}{'…' if len(prompt) > 60 else ''} (with or without special tokens) by "
        f"{type(tokenizer).__name__}, so its units cannot be placed on them"
    )


def encode_generated(
    tokenizer: Any,
    example: Example,
    response_ids: Sequence[int],
    max_length: int,
    *,
    prompt_ids: Sequence[int] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> GeneratedExample:
    """Tokens, labels and text of ``example``'s prompt followed by a response the student
    sampled (``response_ids``: the generated tokens, padding after EOS allowed).

    The prompt's tokens are ``prompt_ids`` when given (the tokens the student was prompted with,
    which must tokenize ``example.prompt``), else the prompt tokenized as
    :class:`DistillationDataset` tokenizes it; the response keeps the sampled tokens, cut after
    the first EOS (any of ``eos_token_ids``, by default the tokenizer's) or where prompt +
    response reach ``max_length``, and is decoded to text for the teacher's tokenizer and the
    units. A response cut before EOS gets no EOS.

    Raises:
        ValueError: the example has no prompt, its prompt leaves no room for a response token,
            or ``prompt_ids`` do not tokenize it.
    """
    if example.response_start == 0:
        raise ValueError(
            "student generation needs a prompt to sample from, but this example is plain text "
            "(a 'text' record): use instruction or prompt/output records"
        )
    eos_ids = {tokenizer.eos_token_id} if eos_token_ids is None else set(eos_token_ids)
    eos_ids.discard(None)
    if prompt_ids is None:
        head = tokenizer(example.prompt, return_offsets_mapping=True)
        prompt_ids, prompt_offsets = list(head["input_ids"]), _offsets(head)
    else:
        prompt_ids = [int(t) for t in prompt_ids]
        prompt_offsets = _prompt_offsets(tokenizer, example.prompt, prompt_ids)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens, leaving no room for a response within "
            f"max_length={max_length}"
        )
    response = [int(t) for t in response_ids]
    first_eos = next((i for i, t in enumerate(response) if t in eos_ids), None)
    if first_eos is not None:
        response = response[: first_eos + 1]
    truncated = len(response) > room
    response = response[:room]
    ends_with_eos = bool(response) and response[-1] in eos_ids
    words = response[:-1] if ends_with_eos else response
    reply = tokenizer.decode(words, clean_up_tokenization_spaces=False) if words else ""
    prompt = example.prompt
    text = prompt + reply
    regions = tuple(r for r in example.regions if r[1] <= len(prompt))
    if reply.strip():
        regions += ((len(prompt), len(text)),)
    offsets = [prompt_offsets, _token_offsets(tokenizer, words, reply) + len(prompt)]
    if ends_with_eos:
        offsets.append(np.zeros((1, 2), np.int64))
    return GeneratedExample(
        Example(text, len(prompt), regions),
        prompt_ids + response,
        np.concatenate(offsets).reshape(-1, 2),
        len(prompt_ids),
        ends_with_eos,
        truncated,
    )


def _check_fast(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{name} must be a fast (Rust) Hugging Face tokenizer: units are mapped to tokens with "
            "its offset_mapping; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


class DistillationDataset(Dataset):
    """Tokenized examples with their unit token ranges, built once.

    Args:
        examples: formatted examples (:func:`format_record`).
        tokenizer: the student's fast tokenizer.
        max_length: maximum tokens per example; longer ones lose their end, and those whose
            prompt leaves no room for a response token are dropped (with a warning).
        teacher_tokenizer: the teacher's fast tokenizer when it differs from the student's.
        units: one :class:`~mta.spans.TextUnits` per example (character spans of ``text``), or
            None to train without MTA (no unit keys in the batches).
        membership: how tokens belong to units (:func:`mta.spans.to_token_spans`):
            ``"overlap"`` or the authors' released ``"authors_code"`` rule.
        add_eos: append EOS after the response (default: for examples that have a prompt).

    Each item is a dict of lists / int64 arrays: ``input_ids``, ``labels``, optionally
    ``teacher_input_ids``, and the per-example unit ranges of :func:`mta.spans.example_unit_spans`;
    and the :class:`Example` itself (``"example"``: what student generation prompts with).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        max_length: int = 512,
        teacher_tokenizer: Any = None,
        units: Sequence[TextUnits] | None = None,
        add_eos: bool | None = None,
        membership: str = "overlap",
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if units is not None and len(units) != len(examples):
            raise ValueError(
                f"units must hold one TextUnits per example ({len(examples)}), got {len(units)}"
            )
        _check_fast(tokenizer, "tokenizer")
        if teacher_tokenizer is not None:
            _check_fast(teacher_tokenizer, "teacher_tokenizer")
        self.max_length = max_length
        self.membership = membership
        self.items: list[dict[str, Any]] = []
        dropped = 0
        for i, example in enumerate(examples):
            eos = example.response_start > 0 if add_eos is None else add_eos
            ids, offsets, n_prompt, truncated, eos_added = encode_example(
                tokenizer, example, max_length, eos
            )
            if len(ids) - n_prompt - eos_added < 1 or len(ids) < 2:  # no response token left
                dropped += 1
                continue
            item: dict[str, Any] = {
                "input_ids": ids,
                "labels": [-100] * n_prompt + ids[n_prompt:],
                EXAMPLE_KEY: example,
            }
            teacher_offsets, teacher_truncated = None, False
            if teacher_tokenizer is not None:
                item["teacher_input_ids"], teacher_offsets, _, teacher_truncated, _ = (
                    encode_example(teacher_tokenizer, example, max_length, eos)
                )
            if units is not None:
                item.update(
                    example_unit_spans(
                        units[i],
                        offsets,
                        teacher_offsets,
                        student_truncated=truncated,
                        teacher_truncated=teacher_truncated,
                        membership=membership,
                    )
                )
            self.items.append(item)
        if dropped:
            logger.warning(
                "dropped %d of %d examples whose prompt fills max_length=%d (no response token)",
                dropped,
                len(examples),
                max_length,
            )
        if not examples:
            raise ValueError("there are no examples (the data holds no records)")
        if not self.items:
            raise ValueError(
                f"none of the {len(examples)} examples has a response token within "
                f"max_length={max_length}: every prompt fills it; raise max_length"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class DistillationCollator:
    """Right-pads a list of :class:`DistillationDataset` items into a batch.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` LongTensor[B, T] (labels ``-100`` on
    padding), ``teacher_input_ids`` / ``teacher_attention_mask`` [B, T'] when the items carry them,
    and the unit keys (``{g}_student_spans`` / ``{g}_teacher_spans`` LongTensor[B, K_g, 2],
    ``{g}_span_mask`` BoolTensor[B, K_g]) with their validated :class:`~mta.unit_plan.UnitPlan`
    (``"unit_plan"``) when the items carry units, and with ``with_examples`` the items'
    :class:`Example` list (``"examples"``: the prompts student generation samples from; not a
    tensor, so off by default).
    """

    pad_token_id: int
    teacher_pad_token_id: int | None = None
    with_examples: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        ids = _pad([f["input_ids"] for f in features], self.pad_token_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        batch = {
            "input_ids": ids,
            "attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long(),
            "labels": _pad([f["labels"] for f in features], -100),
        }
        # Position 0 is never a target (logits at t predict t + 1): saying so keeps the Trainer's
        # token count (num_items_in_batch) right whatever its transformers version counts.
        batch["labels"][:, 0] = -100
        if "teacher_input_ids" in features[0]:
            pad = (
                self.pad_token_id
                if self.teacher_pad_token_id is None
                else self.teacher_pad_token_id
            )
            teacher = [f["teacher_input_ids"] for f in features]
            t_ids = _pad(teacher, pad)
            t_lengths = torch.tensor([len(t) for t in teacher])
            batch["teacher_input_ids"] = t_ids
            batch["teacher_attention_mask"] = (
                torch.arange(t_ids.shape[1]) < t_lengths[:, None]
            ).long()
        if self.with_examples:
            if EXAMPLE_KEY not in features[0]:
                raise ValueError(
                    "with_examples=True needs items that carry their example "
                    "(mta.data.DistillationDataset items)"
                )
            batch[EXAMPLES_KEY] = [f[EXAMPLE_KEY] for f in features]
        if f"{GRANULARITIES[0]}_student_spans" in features[0]:
            self.add_units(batch, features)
        return batch

    @staticmethod
    def add_units(batch: dict[str, Any], features: Sequence[Mapping[str, Any]]) -> None:
        """Pad the items' unit ranges into ``batch`` (collated from the same items) with their
        :class:`~mta.unit_plan.UnitPlan`."""
        batch.update(pad_unit_spans(features))
        # validated and prepared here, on the CPU: the loss then reads nothing back
        batch[PLAN_KEY] = UnitPlan.from_batch(batch)


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (same object or same vocabulary)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (GPT-2 has no pad token; padding is masked)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")


def load_units(
    examples: Sequence[Example],
    cache: str | Path | None = None,
    nlp: Any = None,
    write_cache: bool = True,
    progress: bool = False,
    rules: str = "paper",
) -> list[TextUnits]:
    """Units of each example's content regions, from the cache file ``cache`` (texts missing
    from it are parsed with spaCy and appended when ``write_cache``, with the parsing progress
    on stderr when ``progress``) or parsed in memory.

    Raises:
        ImportError: texts need parsing and spaCy (or its English pipeline) is not installed; the
            message says how to build the cache or install spaCy.
    """
    texts = [e.text for e in examples]
    # the paper's rules parse each content field on its own; the released rules, like the
    # authors' code, parse the whole text, template included
    regions = [e.regions for e in examples] if rules == "paper" else None
    try:
        if cache is None:
            return extract_units(texts, nlp, regions=regions, rules=rules)
        store = UnitCache(
            cache,
            nlp,
            write=write_cache,
            progress="parsing units" if progress else None,
            rules=rules,
        )
        return store.units(texts, regions)
    except ImportError as err:
        where = (
            f"the units cache {str(cache)!r} is missing or lacks some of these texts"
            if cache is not None
            else "no units cache is configured (data.units_cache)"
        )
        raise ImportError(
            f"MTA needs the linguistic units of every example, but {where} and they cannot be "
            f"parsed here: {err}. Either install spaCy (pip install 'mta[spacy]') or build the "
            "cache on a machine that has it: mta-prepare DATA.jsonl --cache CACHE.jsonl "
            "--fields instruction input context output response prompt text"
        ) from err


def read_examples(
    path: str | Path,
    fmt: str = "auto",
    template: str | PromptTemplate = "dolly",
    max_samples: int | None = None,
) -> list[Example]:
    """The formatted records of a JSONL file (the first ``max_samples``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no records, a line is not a JSON object, or a record lacks
            the fields of its format (messages name the file and line or record).
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1 (None: all records), got {max_samples}")
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: the file holds no records (it is empty or only blank lines)")
    if max_samples is not None:
        records = records[:max_samples]
    return [format_record(r, fmt, template, where=f"{path}:{line}") for line, r in records]


def build_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    template: str | PromptTemplate = "dolly",
    max_length: int = 512,
    max_samples: int | None = None,
    teacher_tokenizer: Any = None,
    with_units: bool = True,
    units_cache: str | Path | None = None,
    nlp: Any = None,
    write_cache: bool = True,
) -> DistillationDataset:
    """Read a JSONL file and build its :class:`DistillationDataset` (units only if
    ``with_units``; ``teacher_tokenizer`` only when it differs from ``tokenizer``)."""
    examples = read_examples(path, fmt, template, max_samples)
    units = load_units(examples, units_cache, nlp, write_cache) if with_units else None
    return DistillationDataset(examples, tokenizer, max_length, teacher_tokenizer, units)
