"""Tests of student generation (mta.generation, mta.data.encode_generated) and of MTATrainer
training on sampled responses, on tiny GPT-2 / LLaMA models built from configs.

The dataset's units come from a regex (no spaCy); the units of sampled responses are parsed by
spaCy through a :class:`mta.unit_pool.UnitPool` in a thread of the test process (``unit_workers``
0: a worker process would import torch and spaCy again, seconds per test). The MTA ops take their
eager reference on CPU, as in tests/test_trainer.py. Resume is compared bitwise: one CPU process
runs the same ops in the same order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_helpers import (
    RECORDS,
    clone,
    gpt2,
    llama,
    regex_units,
    tiny_run_arguments,
    tiny_trainer,
    tokenizer_pair,
)

from mta.checkpoints import sampler_state_name
from mta.data import (
    DistillationCollator,
    DistillationDataset,
    encode_example,
    encode_generated,
    format_record,
    pad_token_id,
)
from mta.generation import (
    SAMPLED_KEY,
    AdaptiveThreshold,
    GenerationSettings,
    ReplayBuffer,
    SampledExample,
    StudentSampler,
)
from mta.spans import extract_units
from mta.trainer import MTATrainer, MTATrainingArguments
from mta.unit_pool import UnitPool

pytest.importorskip("spacy")

# generation samples from prompts: the plain-text record has none
PROMPTED = [format_record(r) for r in RECORDS if "text" not in r]
MAX_LENGTH = 240  # below the models' 256 positions; every prompt fits with room to sample


pytestmark = pytest.mark.usefixtures("eager_mta_ops")


@pytest.fixture(scope="module")
def toks():
    return tokenizer_pair([e.text for e in PROMPTED])


@pytest.fixture(scope="module")
def pool():
    with UnitPool(processes=0) as units:
        yield units


# ---- encode_generated ---------------------------------------------------------------------


def test_generated_tokens_labels_and_offsets(toks):
    tok = toks["bytelevel"]
    example = PROMPTED[1]
    reply = " Cats sleep by day."
    response = tok(reply, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    g = encode_generated(tok, example, [*response, eos, eos, eos], MAX_LENGTH)  # padded after EOS
    prompt_ids = tok(example.prompt)["input_ids"]
    assert g.input_ids == prompt_ids + response + [eos]
    assert g.labels == [-100] * len(prompt_ids) + response + [eos]
    assert g.ends_with_eos and not g.truncated
    assert g.example.text == example.prompt + reply
    assert g.example.regions[-1] == (len(example.prompt), len(g.example.text))
    assert g.example.regions[:-1] == tuple(
        r for r in example.regions if r[1] <= len(example.prompt)
    )
    # a canonical sample is tokenized exactly as the dataset tokenizes its text
    ids, offsets, n_prompt, truncated, eos_added = encode_example(tok, g.example, MAX_LENGTH, True)
    assert (ids, n_prompt, truncated, eos_added) == (g.input_ids, len(prompt_ids), False, True)
    assert np.array_equal(offsets, g.offsets)
    assert g.offsets[-1].tolist() == [0, 0]


def test_generated_response_cut_at_max_length_gets_no_eos(toks):
    tok = toks["bytelevel"]
    example = PROMPTED[0]
    n_prompt = len(tok(example.prompt)["input_ids"])
    response = tok(" The sky is blue on a clear day and at noon.", add_special_tokens=False)[
        "input_ids"
    ]
    g = encode_generated(tok, example, [*response, tok.eos_token_id], n_prompt + 3)
    assert g.input_ids[n_prompt:] == response[:3]
    assert g.truncated and not g.ends_with_eos
    assert g.example.text == example.prompt + tok.decode(response[:3])


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_given_prompt_tokens_and_several_eos_ids(toks, kind):
    """Prompt tokens passed in (TRL tokenizes its prompts itself) are kept and placed in the
    prompt's text, with or without the tokenizer's special tokens; the response ends at the
    first of several EOS ids."""
    tok = toks[kind]
    example = PROMPTED[1]
    reply = tok(" Cats sleep.", add_special_tokens=False)["input_ids"]
    stop = tok.convert_tokens_to_ids(".")
    default = encode_generated(tok, example, reply, MAX_LENGTH)
    with_bos, without = (tok(example.prompt, add_special_tokens=s).input_ids for s in (True, False))
    assert (with_bos != without) == (kind == "metaspace")  # the metaspace tokenizer adds a BOS
    for prompt_ids in (with_bos, without):
        g = encode_generated(tok, example, reply, MAX_LENGTH, prompt_ids=prompt_ids)
        assert g.input_ids == prompt_ids + reply and g.n_prompt == len(prompt_ids)
        assert g.example == default.example
        assert np.array_equal(g.offsets[g.n_prompt :], default.offsets[default.n_prompt :])
    eos = [tok.eos_token_id, stop]
    g = encode_generated(tok, example, [*reply, 7, 8], MAX_LENGTH, eos_token_ids=eos)
    assert g.input_ids[g.n_prompt :] == reply[: reply.index(stop) + 1] and g.ends_with_eos
    assert g.offsets[-1].tolist() == [0, 0]  # an EOS is not text
    with pytest.raises(ValueError, match="not the tokenization of its text"):
        encode_generated(tok, example, reply, MAX_LENGTH, prompt_ids=default.input_ids[1:4])


def test_left_padded_example_shifts_its_spans_and_keeps_its_padding(toks):
    """A row placed after ``pad_left`` padding columns (TRL's left-padded prompts): its unit
    spans move by the padding, its state keeps it, and it cannot carry teacher tokens."""
    tok = toks["bytelevel"]
    example = PROMPTED[1]
    g = encode_generated(tok, example, tok(" Cats sleep.")["input_ids"], MAX_LENGTH)
    units = regex_units(g.example)
    flush = SampledExample(g, None, units).unit_item("overlap")
    padded = SampledExample(g, None, units, pad_left=3)
    shifted = padded.unit_item("overlap")
    assert len(flush["word_student_spans"]) > 0 and shifted.keys() == flush.keys()
    for key, spans in flush.items():
        if key.endswith("_spans"):
            assert np.array_equal(shifted[key], spans + 3), key
    again = SampledExample.from_state(json.loads(json.dumps(padded.state())))
    assert again.pad_left == 3
    assert all(np.array_equal(again.unit_item("overlap")[k], v) for k, v in shifted.items())
    teacher = (g.input_ids, g.offsets, False)
    with pytest.raises(ValueError, match="has no teacher tokens of its own"):
        SampledExample(g, teacher, units, pad_left=3)
    with pytest.raises(ValueError, match="pad_left must be >= 0"):
        SampledExample(g, None, units, pad_left=-1)


def test_non_canonical_sample_keeps_its_tokens(toks):
    """A sampled tokenization that re-encoding would not give (one token per character of `` the``)
    keeps the sampled ids; offsets then come from the decoded prefixes."""
    tok = toks["bytelevel"]
    pieces = [tok.convert_tokens_to_ids(c) for c in ("Ġ", "t", "h", "e")]
    assert tok.unk_token_id not in pieces
    assert tok(" the", add_special_tokens=False)["input_ids"] != pieces
    g = encode_generated(tok, PROMPTED[0], pieces, MAX_LENGTH)
    n = len(g.input_ids) - len(pieces)
    assert g.input_ids[n:] == pieces
    text = g.example.text
    assert [text[s:e] for s, e in g.offsets[n:].tolist()] == [" ", "t", "h", "e"]


def test_plain_text_and_full_prompts_are_refused(toks):
    tok = toks["bytelevel"]
    plain = format_record({"text": "Just text."})
    with pytest.raises(ValueError, match="plain text"):
        encode_generated(tok, plain, [1, 2], MAX_LENGTH)
    n_prompt = len(tok(PROMPTED[0].prompt)["input_ids"])
    with pytest.raises(ValueError, match="no room"):
        encode_generated(tok, PROMPTED[0], [1, 2], n_prompt)


# ---- the adaptive threshold and the replay buffer -----------------------------------------


def test_adaptive_threshold_follows_a_scripted_validation_loss():
    schedule = AdaptiveThreshold(init_threshold=0.0, loss_eps=0.1, step=0.1)
    expected = []
    for loss in [2.0, 2.05, 2.11, 2.15, 2.3, 1.0, 2.45, 5.0, 6.0]:
        schedule.observe(loss)
        expected.append((round(schedule.threshold, 10), schedule.reference))
    assert expected == [
        (0.0, 2.0),  # the first evaluation only sets the reference
        (0.0, 2.0),  # +0.05 < eps
        (0.1, 2.11),  # +0.11 >= eps: raised, new reference
        (0.1, 2.11),
        (0.2, 2.3),
        (0.2, 2.3),  # a fall never lowers it
        (0.3, 2.45),
        (0.4, 5.0),
        (0.5, 6.0),
    ]
    assert schedule.probability(0, 100) == pytest.approx(0.5)
    assert schedule.probability(25, 100) == pytest.approx(0.375)
    assert schedule.probability(100, 100) == 0.0
    capped = AdaptiveThreshold(0.95, 0.0, 0.1)
    capped.observe(1.0)
    capped.observe(1.0)
    assert capped.threshold == 1.0


class ScriptedRandom:
    """Stands in for the sampler's generator: ``random()`` returns the scripted values."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def sampler_for(mode, toks, **settings):
    tok = toks["bytelevel"]
    return StudentSampler(
        GenerationSettings(mode, **settings),
        tokenizer=tok,
        collator=DistillationCollator(pad_token_id(tok)),
        max_length=MAX_LENGTH,
        units=None,
    )


def test_adaptive_choice_follows_distillm(toks):
    sampler = sampler_for("adaptive", toks, init_threshold=0.6, buffer_size=4)
    sampler.rng = ScriptedRandom([0.5, 0.55, 0.7, 0.25, 0.5, 0.1])
    # θ = 0.6; at step 50 of 100 the chance of sampling anew is 0.3
    assert sampler.choose(2, 50, 100) == "sampled"  # r < θ while the buffer is not full
    sampler.buffer.push([None] * 4)  # full
    assert sampler.choose(2, 50, 100) == "replayed"  # 0.3 <= r < θ
    assert sampler.choose(2, 50, 100) == "dataset"  # r >= θ
    assert sampler.choose(2, 50, 100) == "sampled"  # r < θ·(1 - step/total)
    assert sampler.choose(2, 100, 100) == "replayed"  # nothing new at the end of training
    on_policy = sampler_for("on_policy", toks, lmbda=0.25)
    on_policy.rng = ScriptedRandom([0.2, 0.3])
    assert [on_policy.choose(2, 0, 10), on_policy.choose(2, 0, 10)] == ["sampled", "dataset"]


def test_replay_buffer_keeps_the_last_and_draws_without_replacement(toks):
    buffer = ReplayBuffer(3)
    buffer.push(list(range(5)))
    assert list(buffer.items) == [2, 3, 4] and buffer.full()
    rng = np.random.default_rng(0)
    drawn = buffer.sample(3, rng)
    assert sorted(drawn) == [2, 3, 4]
    with pytest.raises(ValueError, match="cannot draw 4"):
        buffer.sample(4, rng)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="student_generation must be one of"):
        GenerationSettings("sometimes")
    with pytest.raises(ValueError, match="lmbda"):
        GenerationSettings("on_policy", lmbda=1.5)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings("on_policy", temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings("on_policy", max_new_tokens=0)
    with pytest.raises(ValueError, match="student_generation must be one of"):
        MTATrainingArguments(output_dir="x", student_generation="always", report_to=[])


# ---- sampling with a model ----------------------------------------------------------------


def test_sampled_batch_tokens_and_units_match_its_text(toks, pool):
    """Every sampled row: labels are the sampled tokens, the units equal extract_units of the
    decoded text, and a sampled example survives the JSON state round trip."""
    torch.manual_seed(0)
    tok = toks["bytelevel"]
    student = gpt2(tok, 2, 32)
    collator = DistillationCollator(pad_token_id(tok), with_examples=True)
    sampler = StudentSampler(
        GenerationSettings("on_policy", lmbda=1.0, max_new_tokens=12),
        tokenizer=tok,
        collator=collator,
        max_length=MAX_LENGTH,
        units=pool,
        seed=(1, 0),
    )
    dataset = DistillationDataset(
        PROMPTED, tok, MAX_LENGTH, units=[regex_units(e) for e in PROMPTED]
    )
    batch = collator([dataset[i] for i in range(3)])
    sampled = sampler.batch_for_step(student, batch, 0, 10)
    assert sampler.counts["sampled"] == 1
    examples = sampled[SAMPLED_KEY].examples
    texts = [e.generated.example.text for e in examples]
    regions = [e.generated.example.regions for e in examples]
    expected_units = extract_units(texts, regions=regions)
    for b, e in enumerate(examples):
        g = e.generated
        n = len(g.input_ids)
        assert sampled["input_ids"][b, :n].tolist() == g.input_ids
        assert sampled["labels"][b, 1:n].tolist() == g.labels[1:]
        assert (sampled["labels"][b, n:] == -100).all()
        assert len(g.input_ids) - g.n_prompt <= 12
        assert g.example.prompt == dataset[b]["example"].prompt
        assert e.text_units() == expected_units[b]
        again = SampledExample.from_state(json.loads(json.dumps(e.state())))
        assert again.generated.input_ids == g.input_ids
        assert np.array_equal(again.generated.offsets, g.offsets)
        assert again.text_units() == e.text_units()
    keys = sampled[SAMPLED_KEY].unit_keys(torch.device("cpu"))
    assert keys["unit_plan"].units["word"].mask.shape[0] == 3


def test_cross_tokenizer_sampled_rows_are_tokenized_for_the_teacher(toks, pool):
    torch.manual_seed(0)
    tok, teacher_tok = toks["bytelevel"], toks["metaspace"]
    sampler = StudentSampler(
        GenerationSettings("on_policy", lmbda=1.0, max_new_tokens=10),
        tokenizer=tok,
        teacher_tokenizer=teacher_tok,
        collator=DistillationCollator(pad_token_id(tok), pad_token_id(teacher_tok)),
        max_length=MAX_LENGTH,
        units=pool,
    )
    sampled = sampler.sample(gpt2(tok, 2, 32), PROMPTED[:2])
    batch = sampler.collate(sampled)
    for b, e in enumerate(sampled):
        ids, _, _, _, _ = encode_example(
            teacher_tok, e.generated.example, MAX_LENGTH, e.generated.ends_with_eos
        )
        assert batch["teacher_input_ids"][b, : len(ids)].tolist() == ids
    keys = batch[SAMPLED_KEY].unit_keys(torch.device("cpu"))
    plan = keys["unit_plan"]
    assert plan.cross_tokenizer
    assert plan.units["word"].teacher.valid.sum() == plan.units["word"].student.valid.sum()


# ---- MTATrainer -------------------------------------------------------------------------


def make_trainer(tmp_path, toks, pool, kind="gpt2", dropout=0.0, **overrides):
    torch.manual_seed(0)
    if kind == "gpt2":
        tok, teacher_tok = toks["bytelevel"], None
        teacher, student = gpt2(tok, 4, 48), gpt2(tok, 2, 32, dropout)
    else:  # cross-tokenizer: LLaMA teacher with its own tokenizer
        tok, teacher_tok = toks["bytelevel"], toks["metaspace"]
        teacher, student = llama(teacher_tok, 4, 48), gpt2(tok, 2, 32, dropout)
    dataset = DistillationDataset(
        PROMPTED,
        tok,
        MAX_LENGTH,
        teacher_tokenizer=teacher_tok,
        units=[regex_units(e) for e in PROMPTED],
    )
    settings = {
        **tiny_run_arguments(tmp_path, teacher_tok, "skew_rkl"),
        "per_device_train_batch_size": 2,
        "generation_max_new_tokens": 8,
        "unit_workers": 0,
        **overrides,
    }
    return tiny_trainer(
        teacher,
        student,
        tok,
        dataset,
        settings,
        teacher_tok=teacher_tok,
        with_examples=True,
        eval_dataset=dataset,
        unit_pool=pool,
    )


@pytest.mark.parametrize("kind", ["gpt2", "cross"])
def test_on_policy_steps_train_the_student_on_its_samples(tmp_path, toks, pool, kind):
    trainer = make_trainer(
        tmp_path, toks, pool, kind, student_generation="on_policy", generation_lmbda=1.0
    )
    student0, teacher0 = clone(trainer.student), clone(trainer.teacher)
    seen = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append(SAMPLED_KEY in inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert seen == [True, True] and trainer.sampler.counts["sampled"] == 2
    assert any(not torch.equal(v, trainer.student.state_dict()[k]) for k, v in student0.items())
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher0.items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math_finite(h["loss"]) and h["sampled_batches"] >= 1 for h in logs)
    assert all("dsa" in h and "hra" in h for h in logs)


def math_finite(x):
    return np.isfinite(x)


def test_adaptive_samples_then_replays_and_reads_the_validation_loss(tmp_path, toks, pool):
    """θ starts at 1: the first micro-batches are sampled until the 4-example buffer is full,
    then (θ·(1 − step/total) falls) replayed ones appear; each evaluation reports the student's
    cross-entropy, which the threshold reads."""
    trainer = make_trainer(
        tmp_path,
        toks,
        pool,
        student_generation="adaptive",
        adaptive_init_threshold=1.0,
        replay_buffer_size=4,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
    )
    observed = []
    observe = trainer.sampler.threshold.observe
    trainer.sampler.threshold.observe = lambda loss: (observed.append(loss), observe(loss))
    trainer.train()
    counts = trainer.sampler.counts
    assert (
        counts["sampled"] >= 2 and counts["sampled"] + counts["replayed"] + counts["dataset"] == 6
    )
    assert len(trainer.sampler.buffer) == 4
    evals = [h["eval_student_ce"] for h in trainer.state.log_history if "eval_student_ce" in h]
    assert observed == evals and len(evals) == 2
    assert trainer.sampler.threshold.reference is not None


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("on_policy", {"generation_lmbda": 0.5}),
        ("adaptive", {"adaptive_init_threshold": 0.8, "replay_buffer_size": 3}),
    ],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, toks, pool, mode, extra):
    """6 steps with a checkpoint at 3, then a new trainer resumed from it: bitwise equal weights
    and losses; the checkpoint holds the sampler's generator, threshold and buffer."""
    settings = {
        "student_generation": mode,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        **extra,
    }
    full = make_trainer(tmp_path / "a", toks, pool, dropout=0.1, **settings)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = json.loads((checkpoint / sampler_state_name(0)).read_text())
    assert saved["mode"] == mode
    resumed = make_trainer(tmp_path / "b", toks, pool, dropout=0.1, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(
        resumed.student.state_dict().items(), full.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (full, resumed)]
    assert losses[1] == losses[0]
    assert resumed.sampler.counts == full.sampler.counts
    assert full.sampler.counts["sampled"] >= 1
    assert resumed.sampler.state_dict()["rng"] == full.sampler.state_dict()["rng"]


def test_generation_needs_prompts_and_the_right_collator(tmp_path, toks, pool):
    with pytest.raises(TypeError, match="with_examples=True"):
        trainer = make_trainer(tmp_path, toks, pool, student_generation="on_policy")
        MTATrainer(
            model=trainer.student,
            teacher_model=trainer.teacher,
            args=trainer.args,
            mta_loss=trainer.mta_loss,
            processing_class=trainer.processing_class,
            data_collator=DistillationCollator(0),
            train_dataset=trainer.train_dataset,
        )
    with pytest.raises(ValueError, match="replay_buffer_size=1 is smaller than a batch"):
        make_trainer(tmp_path, toks, pool, student_generation="adaptive", replay_buffer_size=1)
    with pytest.raises(ValueError, match="rules='authors_code'"):
        make_trainer(
            tmp_path,
            toks,
            UnitPool(processes=0, rules="authors_code"),
            student_generation="on_policy",
        )


def test_collator_carries_examples_only_when_asked(toks):
    tok = toks["bytelevel"]
    dataset = DistillationDataset(PROMPTED, tok, MAX_LENGTH)
    items = [dataset[0], dataset[1]]
    assert "examples" not in DistillationCollator(pad_token_id(tok))(items)  # tensors only
    batch = DistillationCollator(pad_token_id(tok), with_examples=True)(items)
    assert batch["examples"] == [PROMPTED[0], PROMPTED[1]]
    bare = [{"input_ids": i["input_ids"], "labels": i["labels"]} for i in items]
    with pytest.raises(ValueError, match="carry their example"):
        DistillationCollator(pad_token_id(tok), with_examples=True)(bare)
