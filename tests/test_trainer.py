"""Tests of MTATrainer on tiny GPT-2 and LLaMA pairs built from configs (teacher deeper and wider
than the student) and one cross-tokenizer pair (LLaMA teacher with a SentencePiece-style
tokenizer, GPT-2 student with a byte-level BPE, both trained in the test).

Units come from a regex (``test_data.regex_units``) so these tests need no spaCy. Everything runs
on CPU in float32; the resume test asserts bitwise equality (same ops in the same order on one
CPU process are deterministic). The MTA ops take their eager reference on CPU here
(:func:`eager_mta_ops`): tests/conftest.py routes CPU tensors through the Triton interpreter,
which the kernel tests cover and which would make a training run take minutes.
"""

from __future__ import annotations

import math
import os

import pytest
import safetensors.torch
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
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2LMHeadModel,
    HfArgumentParser,
)

from mta.checkpoints import PROJECTORS_NAME, load_projectors
from mta.data import DistillationCollator, DistillationDataset, format_record, pad_token_id
from mta.layers import LayerPair, plan_layers
from mta.lm_head import fused_head_refusal
from mta.loss import MTALoss
from mta.trainer import MTATrainer, MTATrainingArguments

EXAMPLES = [format_record(r) for r in RECORDS]
MAX_LENGTH = 192  # every example's prompt and response fit


pytestmark = pytest.mark.usefixtures("eager_mta_ops")


@pytest.fixture(scope="module")
def toks():
    return tokenizer_pair([e.text for e in EXAMPLES])


def make_pair(kind, toks, student_dropout=0.0):
    """(teacher, student, student tokenizer, teacher tokenizer or None): teacher 4 layers × 48,
    student 2 layers × 32."""
    torch.manual_seed(0)
    if kind == "gpt2":
        tok = toks["bytelevel"]
        return gpt2(tok, 4, 48), gpt2(tok, 2, 32, student_dropout), tok, None
    if kind == "llama":
        tok = toks["metaspace"]
        return llama(tok, 4, 48), llama(tok, 2, 32), tok, None
    student_tok, teacher_tok = toks["bytelevel"], toks["metaspace"]
    return llama(teacher_tok, 4, 48), gpt2(student_tok, 2, 32), student_tok, teacher_tok


def make_trainer(tmp_path, kind, toks, mta=True, student_dropout=0.0, **overrides):
    teacher, student, tok, teacher_tok = make_pair(kind, toks, student_dropout)
    units = [regex_units(e) for e in EXAMPLES]
    dataset = DistillationDataset(
        EXAMPLES, tok, MAX_LENGTH, teacher_tokenizer=teacher_tok, units=units
    )
    settings = {
        **tiny_run_arguments(tmp_path, teacher_tok, "fkl"),
        "per_device_train_batch_size": 3,
        **overrides,
    }
    return tiny_trainer(teacher, student, tok, dataset, settings, teacher_tok=teacher_tok, mta=mta)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "cross"])
def test_steps_update_student_and_projectors_not_teacher(tmp_path, toks, kind):
    trainer = make_trainer(tmp_path, kind, toks)
    student0, proj0, teacher0 = (
        clone(trainer.student),
        clone(trainer.mta_loss),
        clone(trainer.teacher),
    )
    trainer.train()
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert not trainer.teacher.training  # still in eval mode after model.train() calls
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, teacher0[name]), name
    for before, after, what in (
        (student0, clone(trainer.student), "student"),
        (proj0, clone(trainer.mta_loss), "projector"),
    ):
        for name, value in after.items():
            if value.is_floating_point():
                assert not torch.equal(value, before[name]), f"{what} {name} did not change"
    logs = [h for h in trainer.state.log_history if "base_loss" in h]
    assert len(logs) == 2
    expected = {"loss", "base_loss", "dsa", "hra", "mta", "dsa/1-2", "dsa/2-4", "hra/1-2"}
    assert expected <= set(logs[0])
    for log in logs:
        assert all(math.isfinite(log[k]) for k in expected)
        # logged total = base + weighted MTA (float32 sums; 1e-5 relative)
        assert log["loss"] == pytest.approx(log["base_loss"] + log["mta"], rel=1e-5)
        assert log["mta"] == pytest.approx(2.0 * log["dsa"] + 0.2 * log["hra"], rel=1e-5)


def test_loss_decreases(tmp_path, toks):
    trainer = make_trainer(tmp_path, "gpt2", toks, max_steps=30, learning_rate=3e-3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "base_loss" in h]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # 30 Adam steps on 6 examples: the measured drop is > 2x; require 30%.
    assert last < 0.7 * first, losses


def test_projectors_have_their_own_param_group(tmp_path, toks):
    trainer = make_trainer(tmp_path, "gpt2", toks, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    assert len(optimizer.param_groups) == 3
    projector_group = optimizer.param_groups[2]
    assert projector_group["lr"] == 5e-4 and projector_group["weight_decay"] == 0.0
    assert {id(p) for p in projector_group["params"]} == {
        id(p) for p in trainer.mta_loss.parameters()
    }
    student = {id(p) for g in optimizer.param_groups[:2] for p in g["params"]}
    assert student == {id(p) for p in trainer.student.parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("with_projectors", [False, True])
def test_a_given_optimizer_must_hold_the_projectors(tmp_path, toks, with_projectors):
    """optimizers=(optimizer, None) over the student only would leave the projectors at their
    initialisation: refused by name; with a group of theirs it trains them."""
    teacher, student, tok, _ = make_pair("gpt2", toks, 0.0)
    mta_loss = MTALoss(32, 48, plan_layers(2, 4, num_key_layers=2))
    projectors = [*mta_loss.parameters()] if with_projectors else []
    optimizer = torch.optim.AdamW([*student.parameters(), *projectors], lr=1e-3)
    before = clone(mta_loss)
    settings = {**tiny_run_arguments(tmp_path, None, "fkl"), "per_device_train_batch_size": 3}

    def build():
        return MTATrainer(
            model=student,
            teacher_model=teacher,
            args=MTATrainingArguments(**settings),
            mta_loss=mta_loss,
            processing_class=tok,
            data_collator=DistillationCollator(pad_token_id(tok)),
            train_dataset=DistillationDataset(
                EXAMPLES, tok, MAX_LENGTH, units=[regex_units(e) for e in EXAMPLES]
            ),
            optimizers=(optimizer, None),
        )

    if not with_projectors:
        refusal = r"leaves out 2 MTA projector parameters \(projectors\.1\.weight, "
        with pytest.raises(ValueError, match=refusal):
            build()
        return
    build().train()
    assert not any(torch.equal(p, before[n]) for n, p in mta_loss.named_parameters())


def test_base_loss_alone(tmp_path, toks):
    trainer = make_trainer(tmp_path, "gpt2", toks, mta=False, max_steps=1)
    trainer.train()
    log = trainer.state.log_history[0]
    assert set(log) >= {"loss", "base_loss"} and "dsa" not in log
    assert log["loss"] == pytest.approx(log["base_loss"], rel=1e-5)


def test_resume_gives_the_same_weights(tmp_path, toks):
    """6 steps with a checkpoint at 3, then a new trainer resumed from it: bitwise equal weights.
    Dropout 0.1 and a shuffled sampler make the RNG restore matter; gradient accumulation 2."""
    settings = {
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
    }
    full = make_trainer(tmp_path / "a", "gpt2", toks, student_dropout=0.1, **settings)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    resumed = make_trainer(tmp_path / "b", "gpt2", toks, student_dropout=0.1, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for mine, theirs in ((resumed.student, full.student), (resumed.mta_loss, full.mta_loss)):
        for (name, a), b in zip(
            mine.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
    losses = [[h["loss"] for h in t.state.log_history if "base_loss" in h] for t in (full, resumed)]
    assert losses[1] == losses[0]  # steps 1-3 from the checkpoint's state, 4-6 recomputed
    # the checkpoint: a plain HF student, the projectors beside it, 3 optimizer groups
    weights = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert not any("projector" in k or k.startswith(("student.", "mta_loss.")) for k in weights)
    assert (checkpoint / PROJECTORS_NAME).is_file()
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["param_groups"]) == 3
    # the final export reloads as a plain model with the trained weights
    resumed.save_model(str(tmp_path / "final"))
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name
    projectors = MTALoss(32, 48, plan_layers(2, 4, num_key_layers=2))
    load_projectors(tmp_path / "final", projectors)
    for name, value in projectors.state_dict().items():
        assert torch.equal(value, resumed.mta_loss.state_dict()[name]), name
    with pytest.raises(ValueError, match="layer_pairs"):
        load_projectors(tmp_path / "final", MTALoss(32, 48, [LayerPair(2, 4, "word")]))


def test_padded_teacher_vocabulary_is_truncated(tmp_path, toks):
    """Same tokenizer, teacher LM head padded to a multiple of 64 (as Qwen): the base loss runs
    over the tokenizer's vocabulary."""
    tok = toks["bytelevel"]
    teacher = gpt2(tok, 4, 48, vocab=64 * math.ceil((len(tok) + 1) / 64))
    units = [regex_units(e) for e in EXAMPLES]
    trainer = MTATrainer(
        model=gpt2(tok, 2, 32),
        teacher_model=teacher,
        args=MTATrainingArguments(
            output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, logging_steps=1
        ),
        processing_class=tok,
        data_collator=DistillationCollator(pad_token_id(tok)),
        train_dataset=DistillationDataset(EXAMPLES, tok, MAX_LENGTH, units=units),
    )
    assert trainer.vocab_size == len(tok)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["base_loss"])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("small_head", "Resize its embeddings"),
        ("cross_kd", "base_loss='ce'"),
        ("layer_range", "out of range"),
        ("hidden_size", "hidden size of 64"),
        ("no_tokenizer", "pass the shared tokenizer"),
    ],
)
def test_configuration_errors(tmp_path, toks, case, match):
    tok = toks["bytelevel"]
    kwargs = {"processing_class": tok}
    teacher, student = gpt2(tok, 4, 48), gpt2(tok, 2, 32)
    args = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True}
    if case == "small_head":
        student = gpt2(tok, 2, 32, vocab=len(tok) - 5)
        teacher = gpt2(tok, 4, 48, vocab=len(tok) + 10)
    elif case == "no_tokenizer":
        teacher = gpt2(tok, 4, 48, vocab=len(tok) + 10)
        kwargs = {}
    elif case == "cross_kd":
        kwargs["teacher_processing_class"] = toks["metaspace"]
    elif case == "layer_range":
        kwargs["mta_loss"] = MTALoss(32, 48, [LayerPair(3, 4, "word")])
    else:
        kwargs["mta_loss"] = MTALoss(64, 48, [LayerPair(2, 4, "word")])
    with pytest.raises(ValueError, match=match):
        MTATrainer(student, teacher, MTATrainingArguments(**args), **kwargs)


def test_eval_loss_ignores_gradient_accumulation(tmp_path, toks):
    # Evaluation has no accumulation: before training (no accumulation state yet) and after
    # training with 4 accumulation steps, the same weights must give the same eval loss.
    trainer = make_trainer(
        tmp_path,
        "gpt2",
        toks,
        gradient_accumulation_steps=4,
        max_steps=1,
        per_device_eval_batch_size=3,
    )
    trainer.eval_dataset = trainer.train_dataset
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    trainer.current_gradient_accumulation_steps = 4
    after_with_state = trainer.evaluate()["eval_loss"]
    trainer.current_gradient_accumulation_steps = 1
    after_without = trainer.evaluate()["eval_loss"]
    assert math.isfinite(before)
    assert after_with_state == pytest.approx(after_without, rel=1e-6)
    metrics = trainer.evaluate()
    for key in ("eval_base_loss", "eval_dsa", "eval_hra", "eval_mta", "eval_dsa/1-2"):
        assert math.isfinite(metrics[key]), key
    # eval loss = base + MTA; the base is token-weighted in eval_loss and a per-batch mean in
    # eval_base_loss, which differ a little when batches hold different numbers of tokens
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_base_loss"] + metrics["eval_mta"], rel=1e-2
    )


def test_bad_base_loss_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="base_loss must be one of"):
        MTATrainingArguments(output_dir=str(tmp_path), base_loss="kl")


def test_building_a_trainer_saves_and_registers_nothing(tmp_path, toks):
    """Nothing is written, and accelerate's list of prepared models stays empty, which is what
    makes Trainer.evaluate before train prepare the student (mixed precision, wrapping)."""
    trainer = make_trainer(tmp_path, "gpt2", toks)
    assert not os.listdir(tmp_path)
    assert trainer.accelerator._models == []


def weights(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize(
    ("kind", "base_loss"), [("gpt2", "skew_rkl"), ("llama", "jsd"), ("cross", "ce")]
)
def test_fused_lm_head_trains_like_the_logits_path(tmp_path, toks, kind, base_loss):
    """The fused LM head (no [B, T, V] logits) takes the same steps as the logits path: losses
    and updated weights agree to float32 summation order (rtol 1e-4 after 3 Adam steps, which
    amplify ~1e-7 gradient differences where a gradient is near zero); eval works without
    logits."""
    runs = []
    for mode in ("on", "off"):
        trainer = make_trainer(
            tmp_path / mode, kind, toks, max_steps=3, fused_lm_head=mode, base_loss=base_loss
        )
        assert trainer.fused_lm_head == (mode == "on")
        trainer.eval_dataset = trainer.train_dataset
        trainer.train()
        logs = [h for h in trainer.state.log_history if "base_loss" in h]
        runs.append((logs, weights(trainer.student), weights(trainer.mta_loss), trainer.evaluate()))
    (fused_logs, *fused), (logs, *plain) = runs
    for fused_log, log in zip(fused_logs, logs, strict=True):
        for key in ("loss", "base_loss", "dsa", "hra"):
            assert fused_log[key] == pytest.approx(log[key], rel=1e-4), key
    for fused_weights, plain_weights in zip(fused[:2], plain[:2], strict=True):
        for name, value in fused_weights.items():
            torch.testing.assert_close(value, plain_weights[name], rtol=1e-4, atol=1e-6)
    assert fused[2]["eval_loss"] == pytest.approx(plain[2]["eval_loss"], rel=1e-4)


class ScaledLogitsGPT2(GPT2LMHeadModel):
    """A head whose logits are rescaled after the LM head (as Cohere's logit_scale)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_fused_lm_head_modes(tmp_path, toks):
    """'auto' falls back to logits on CPU; 'on' refuses a head whose logits are transformed
    after the LM head, naming the model; bools are accepted (YAML on/off)."""
    assert make_trainer(tmp_path, "gpt2", toks).fused_lm_head is False  # auto, no CUDA
    tok = toks["bytelevel"]
    plain = gpt2(tok, 2, 32)
    scaled = ScaledLogitsGPT2(plain.config)
    assert fused_head_refusal(plain) is None
    assert "not its LM head applied" in fused_head_refusal(scaled)
    assert plain.training  # the probe restores the mode
    args = MTATrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], fused_lm_head=True
    )
    assert args.fused_lm_head == "on"
    with pytest.raises(
        ValueError, match="fused_lm_head='on' cannot be used: the teacher: its logits"
    ):
        MTATrainer(plain, ScaledLogitsGPT2(gpt2(tok, 4, 48).config), args, processing_class=tok)
    with pytest.raises(ValueError, match="fused_lm_head must be one of"):
        MTATrainingArguments(output_dir=str(tmp_path), fused_lm_head="always")
    (parsed,) = HfArgumentParser(MTATrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fused_lm_head", "off"]
    )
    assert parsed.fused_lm_head == "off"


def test_fused_head_refuses_soft_capped_logits_and_sharded_heads(tmp_path, toks):
    """A config that transforms logits after the head (Gemma 2 soft-capping, whose effect on a
    fresh model's small logits is below any probe tolerance) is refused by name; an LM head
    weight that is sharded inside the wrapper's forward (FSDP unit of its own) is an error that
    says how to wrap instead."""
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    assert "final_logit_softcapping=30.0" in fused_head_refusal(gemma)
    trainer = make_trainer(tmp_path, "llama", toks, fused_lm_head="on")
    head = trainer.student.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().flatten()[:10])  # a flat shard
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with pytest.raises(RuntimeError, match="FSDP wrapped the head in a unit of its own"):
        trainer.compute_loss(trainer.model, batch)
