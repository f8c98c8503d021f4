"""mta.integrations.trl: MTA in TRL's SFTTrainer and DistillationTrainer.

One step of ``MTASFTTrainer`` equals one step of ``MTATrainer`` with ``base_loss="ce"`` on the
same batch, and one step of ``MTADistillationTrainer`` one of ``MTATrainer`` with the divergence
of its ``beta`` (0: ``fkl``, 0.5: ``jsd``, 1: ``rkl``) on the batch it generated (loss and every
gradient, student and projectors). Tolerance: rtol 1e-5 in float32; TRL's losses come from its
chunked LM-head kernels (tiled log-softmax) and MTATrainer's from the full logits, the same sums
in another order.
"""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from training_helpers import (
    EXAMPLES,
    examples_dataset,
    make_tokenizer,
    tiny_run_arguments,
    tiny_trainer,
    torchrun,
)

from mta.checkpoints import PROJECTORS_NAME
from mta.data import DistillationCollator, pad_token_id
from mta.layers import plan_layers
from mta.loss import MTALoss
from mta.spans import extract_units
from mta.unit_pool import UnitPool

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from trl_helpers import (  # noqa: E402 (needs trl)
    PROMPTS,
    distillation_trainer,
    models,
    sft_trainer,
)

import mta.integrations.trl as trl_adapter  # noqa: E402 (needs trl)
from mta.integrations.trl import (  # noqa: E402 (needs trl)
    UNITS_KEY,
    MTADistillationTrainer,
    MTASFTTrainer,
    capture_hidden_states,
)

pytestmark = pytest.mark.usefixtures("eager_mta_ops")


def test_oldest_trl_is_the_one_setup_admits(monkeypatch):
    """The import-time bound is the `trl` extra's (which `make test-trl-min` tests), and an older
    TRL is refused at import with the bound named."""
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert f'"trl>={trl_adapter.MIN_TRL_VERSION}"' in setup
    monkeypatch.setattr(trl, "__version__", "0.1")
    spec = importlib.util.spec_from_file_location("trl_adapter_copy", trl_adapter.__file__)
    bound = re.escape(trl_adapter.MIN_TRL_VERSION)
    with pytest.raises(ImportError, match=f"needs trl>={bound}, found 0\\.1: pip install"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer([e.text for e in EXAMPLES], "bytelevel", 300)


@pytest.mark.parametrize("caller_asks", [False, True, None])
def test_capture_keeps_the_wanted_layers_only(tok, caller_asks):
    """The kept layers are the backbone's ``hidden_states``; the output returns them only when
    its caller asked for them (``None``: through the config), so the other layers are freed once
    the forward ends."""
    _, student, _ = models(tok)
    ids = torch.tensor([[5, 9, 13, 2]])
    want = student(ids, output_hidden_states=True).hidden_states
    student.config.output_hidden_states = caller_asks is None
    with capture_hidden_states(student, [0, 2]) as captured:
        out = student(ids, output_hidden_states=caller_asks)
    assert set(captured.get()) == {0, 2}
    for layer in (0, 2):
        torch.testing.assert_close(captured.get()[layer], want[layer], rtol=0, atol=0)
    assert (out.hidden_states is not None) == (caller_asks is not False)
    with (
        pytest.raises(RuntimeError, match="no forward of the model's backbone ran"),
        capture_hidden_states(student, [1]) as idle,
    ):
        idle.get()


def step(trainer, model, student, projectors, batch, num_items, accumulation=1):
    """Loss and gradients (by name) of one micro-batch through ``trainer.training_step`` (which
    divides by the accumulation steps where ``Trainer`` does), as the first of a step of
    ``accumulation`` micro-batches (what ``Trainer.train`` sets). ``batch`` is the micro-batch as
    the loss takes it: a TRL generation batch is already generated and split."""
    trainer.current_gradient_accumulation_steps = accumulation
    trainer._prepare_inputs = lambda inputs: inputs  # CPU tensors: nothing to move
    loss = trainer.training_step(model, batch, num_items)
    grads = {f"student.{k}": p.grad.clone() for k, p in student.named_parameters()}
    grads |= {f"mta.{k}": p.grad.clone() for k, p in projectors.named_parameters()}
    return loss, grads


def reference_trainer(tmp_path, tok, teacher, student, mta_loss, base_loss):
    """The MTATrainer whose step an adapter's step must equal: copies of the models, the
    projectors of ``mta_loss``, the logits path."""
    reference = tiny_trainer(
        copy.deepcopy(teacher),
        copy.deepcopy(student),
        tok,
        examples_dataset(tok),
        {**tiny_run_arguments(tmp_path / "mta", None, base_loss), "fused_lm_head": "off"},
    )
    reference.wrapper.mta_loss.load_state_dict(mta_loss.state_dict())
    return reference


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("num_items", [None, 57])
def test_one_step_equals_mtatrainer(tmp_path, tok, num_items, accumulation):
    teacher, student, mta_loss = models(tok)
    reference = reference_trainer(tmp_path, tok, teacher, student, mta_loss, "ce")
    adapter = sft_trainer(tmp_path / "sft", tok, teacher, student, mta_loss)
    batch = reference.data_collator([reference.train_dataset[i] for i in range(3)])
    want_loss, want = step(
        reference,
        reference.model,
        reference.student,
        reference.mta_loss,
        dict(batch),
        num_items,
        accumulation,
    )
    got_loss, got = step(
        adapter,
        adapter.model,
        adapter.model,
        adapter.mta_loss,
        dict(batch),
        num_items,
        accumulation,
    )
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trains_logs_saves_and_resumes(tmp_path, tok):
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = sft_trainer(tmp_path / "a", tok, *models(tok), **settings)
    full.train()
    logged = full.state.log_history[0]
    assert logged["dsa"] > 0 and logged["hra"] > 0 and "mean_token_accuracy" in logged
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert {"model.safetensors", PROJECTORS_NAME} <= {p.name for p in checkpoint.iterdir()}
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["param_groups"]) == 3  # the student's two and the projectors'
    resumed = sft_trainer(tmp_path / "b", tok, *models(tok), **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for mine, theirs in ((resumed.model, full.model), (resumed.mta_loss, full.mta_loss)):
        for (name, a), b in zip(
            mine.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
    assert all(p.grad is None for p in resumed.mta_loss.parameters())  # cleared every step
    resumed.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / PROJECTORS_NAME).is_file()


def test_best_model_at_end_brings_back_its_projectors(tmp_path, tok):
    settings = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 1,
        "load_best_model_at_end": True,
        # the largest structural loss: an early checkpoint (it falls as training goes)
        "metric_for_best_model": "eval_dsa",
        "greater_is_better": True,
    }
    evaluation = examples_dataset(tok)
    trainer = sft_trainer(tmp_path, tok, *models(tok), eval_dataset=evaluation, **settings)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    evals = [h["eval_dsa"] for h in trainer.state.log_history if "eval_dsa" in h]
    assert len(evals) == 4 and best.endswith(f"checkpoint-{1 + evals.index(max(evals))}")
    assert not best.endswith("checkpoint-4")
    saved = safetensors.torch.load_file(f"{best}/{PROJECTORS_NAME}")
    for name, value in trainer.mta_loss.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_refusals(tmp_path, tok):
    teacher, student, mta_loss = models(tok)
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="DistillationCollator batches"):
        MTASFTTrainer(
            student, teacher_model=teacher, mta_loss=mta_loss, args=args, data_collator=None
        )
    with pytest.raises(ValueError, match="mta_loss was built for a teacher hidden size of 64"):
        MTASFTTrainer(
            student,
            teacher_model=teacher,
            mta_loss=MTALoss(32, 64, plan_layers(2, 4, num_key_layers=2)),
            args=args,
            data_collator=DistillationCollator(pad_token_id(tok)),
        )


def test_label_smoothing_keeps_the_mta_gradient(tmp_path, tok):
    """With label smoothing SFTTrainer runs the model twice, the second time under no_grad for
    its metrics: the term reads the first forward, so the student gets the MTA gradient."""
    grads = []
    for lam in (0.0, 1.0):
        teacher, student, _ = models(tok)
        mta_loss = MTALoss(
            32, 48, plan_layers(2, 4, num_key_layers=2), lambda_dsa=lam, lambda_hra=lam
        )
        trainer = sft_trainer(
            tmp_path / str(lam),
            tok,
            teacher,
            student,
            mta_loss,
            label_smoothing_factor=0.1,
            # TRL 1.14's default chunked_nll fails under label smoothing with or without MTA
            loss_type="nll",
        )
        batch = trainer.data_collator([{"mta_source": 0, "mta_row": i} for i in range(3)])
        trainer.compute_loss(trainer.model.train(), batch).backward()
        grads.append(trainer.model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_evaluate_takes_a_distillation_dataset(tmp_path, tok):
    trainer = sft_trainer(tmp_path, tok, *models(tok))
    # teacher and projectors unregistered: evaluate() then prepares the student itself
    assert trainer.accelerator._models == []
    metrics = trainer.evaluate(eval_dataset=examples_dataset(tok))
    assert metrics["eval_dsa"] > 0 and "eval_loss" in metrics
    assert trainer.accelerator._models == [trainer.model]


def test_a_given_optimizer_must_hold_the_projectors(tmp_path, tok):
    teacher, student, mta_loss = models(tok)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"leaves out 2 MTA projector parameters"):
        sft_trainer(tmp_path, tok, teacher, student, mta_loss, optimizers=(optimizer, None))


def test_dicts_of_eval_sets_evaluate_each_with_the_term(tmp_path, tok):
    """A dict of DistillationDatasets, at construction (evaluated during training, each under
    its name) or passed to evaluate(): Trainer calls evaluate once per entry."""
    sets = {"short": examples_dataset(tok), "again": examples_dataset(tok)}
    trainer = sft_trainer(
        tmp_path, tok, *models(tok), eval_dataset=sets, eval_strategy="steps", eval_steps=1
    )
    trainer.train(None, None)  # resume_from_checkpoint, trial: Trainer.train's positional order
    logged = [set(entry) for entry in trainer.state.log_history]
    for name in sets:
        assert any({f"eval_{name}_loss", f"eval_{name}_dsa"} <= keys for keys in logged), name
    metrics = trainer.evaluate(eval_dataset={"given": examples_dataset(tok)})
    assert metrics["eval_given_dsa"] > 0
    with pytest.raises(TypeError, match=r"eval_dataset\['given'\] must be a mta.data.Distil"):
        trainer.evaluate(eval_dataset={"given": datasets.Dataset.from_dict({"text": ["a"]})})


@pytest.mark.parametrize("setting", ["packing", "padding_free", "assistant_only_loss"])
def test_dataset_preparation_settings_are_refused(tmp_path, tok, setting):
    with pytest.raises(ValueError, match=f"SFTConfig.{setting}=True acts while SFTTrainer"):
        sft_trainer(tmp_path, tok, *models(tok), **{setting: True})


# ---- MTADistillationTrainer --------------------------------------------------------------

#: A template adding a system prompt that holds one of the prompts' text.
CHAT_TEMPLATE = (
    "<|system|>\nYou answer prompts such as: " + PROMPTS[1] + "\n"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def units(nlp):
    with UnitPool(nlp, processes=0) as pool:
        yield pool


def generated(trainer, n=3):
    """A generated batch of ``n`` training rows (the student samples, as in a step)."""
    trainer.model.train()
    return trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generated_rows_carry_the_units_of_their_text(tmp_path, tok, units, nlp, chat):
    """Each row's tokens are TRL's (prompt left-padded, completion after it); its units are
    extract_units of its text within the content (the prompt's, or the messages', and the
    completion), and every unit's token range, in the batch's columns, decodes to its words."""
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if chat else PROMPTS
    # sampled byte-level tokens may split a character, which decodes on its own as U+FFFD
    split = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    trainer = distillation_trainer(
        tmp_path,
        tok,
        *models(tok),
        units,
        prompts=prompts,
        generation_kwargs={"suppress_tokens": split},
        pad_to_multiple_of=8 if chat else None,  # TRL's padding, on both sides of the rows
    )
    batch = generated(trainer)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool()
    rows = batch[UNITS_KEY]
    texts = [r.generated.example.text for r in rows]
    regions = [r.generated.example.regions for r in rows]
    want = extract_units(texts, nlp, regions=regions)
    for b, row in enumerate(rows):
        g = row.generated
        assert ids[b][mask[b]].tolist() == g.input_ids
        assert row.pad_left == int((~batch["prompt_mask"][b].bool()).sum())
        assert row.text_units() == want[b]
        prompt_region = g.example.regions[0]
        if chat:  # the message's content only, not the template around it
            assert g.example.text[slice(*prompt_region)] == PROMPTS[b]
            assert prompt_region[0] == g.example.text.index("<|user|>\n") + len("<|user|>\n")
        else:
            assert prompt_region == (0, len(PROMPTS[b]))
        spans = row.unit_item(trainer.membership)
        for s, e in spans["word_student_spans"]:
            assert mask[b, s:e].all()
        words = [g.example.text[a:z] for a, z in want[b].words]
        assert len(spans["word_student_spans"]) == len(words)
        for word, (s, e) in zip(words, spans["word_student_spans"], strict=True):
            assert word in tok.decode(ids[b, s:e]), (word, s, e)
            # and no token more than the word needs
            assert word not in tok.decode(ids[b, s + 1 : e]), (word, s, e)
            assert word not in tok.decode(ids[b, s : e - 1]), (word, s, e)


def test_completions_end_at_any_of_the_students_eos_ids(tmp_path, tok, units):
    """The student's generation config lists a second EOS id (TRL stops at any of them): each
    row's completion ends there, with the stop token learned but not taken for text."""
    teacher, student, mta_loss = models(tok)
    stop = tok.convert_tokens_to_ids(".")
    student.generation_config.eos_token_id = [tok.eos_token_id, stop]
    words = tok(" the sky", add_special_tokens=False)["input_ids"]
    # every prefix of it biased, the longer ones more (a lone token's bias applies after any
    # token): each row samples exactly it
    forced = [*words, stop]
    bias = {tuple(forced[: n + 1]): 100.0 * (n + 1) for n in range(len(forced))}
    trainer = distillation_trainer(
        tmp_path, tok, teacher, student, mta_loss, units, generation_kwargs={"sequence_bias": bias}
    )
    batch = generated(trainer)
    for b, row in enumerate(batch[UNITS_KEY]):
        g = row.generated
        completion = batch["completion_ids"][b][batch["completion_mask"][b].bool()].tolist()
        assert completion == forced and g.input_ids[g.n_prompt :] == forced
        assert g.ends_with_eos and not g.truncated and g.offsets[-1].tolist() == [0, 0]
        assert g.example.response == " the sky"
        assert g.example.text[slice(*row.text_units().words[-1])] == "sky"


def test_shuffled_micro_batches_keep_their_rows_units(tmp_path, tok, units):
    """TRL shuffles a generation batch and splits it into micro-batches: each row's units
    travel with it."""
    trainer = distillation_trainer(
        tmp_path,
        tok,
        *models(tok),
        units,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=3,
    )
    trainer.model.train()
    trainer._prepare_inputs([trainer.train_dataset[i] for i in range(3)])
    prompts = set()
    for micro in trainer._buffered_inputs:
        (row,) = micro[UNITS_KEY]
        ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1)[0]
        mask = torch.cat([micro["prompt_mask"], micro["completion_mask"]], dim=1)[0].bool()
        assert ids[mask].tolist() == row.generated.input_ids
        prompts.add(row.generated.example.prompt)
    assert prompts == set(PROMPTS)


@pytest.mark.parametrize(
    "beta, kind, accumulation", [(0.0, "fkl", 1), (0.5, "jsd", 3), (1.0, "rkl", 1)]
)
def test_distillation_step_equals_mtatrainer(tmp_path, tok, units, beta, kind, accumulation):
    teacher, student, mta_loss = models(tok)
    reference = reference_trainer(tmp_path, tok, teacher, student, mta_loss, kind)
    adapter = distillation_trainer(
        tmp_path / "trl", tok, teacher, student, mta_loss, units, beta=beta
    )
    batch = generated(adapter)
    assert batch["prompt_mask"].min() == 0  # rows of unequal prompts: left padding is exercised
    got_loss, got = step(
        adapter, adapter.model, adapter.model, adapter.mta_loss, batch, None, accumulation
    )
    # the same rows as MTATrainer takes them: tokens, the completion as labels, the same units
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    targets = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    rows = {"input_ids": ids, "attention_mask": attention}
    DistillationCollator.add_units(rows, [r.unit_item("overlap") for r in batch[UNITS_KEY]])
    rows["labels"] = ids.masked_fill(targets == 0, -100)
    want_loss, want = step(
        reference,
        reference.model,
        reference.student,
        reference.mta_loss,
        rows,
        batch["num_items_in_batch"],
        accumulation,
    )
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_distillation_trains_logs_saves_and_resumes(tmp_path, tok, units):
    """Accumulating three micro-batches per step: the components are logged, checkpoints hold
    the projectors, and resuming from one reloads them and ends where the full run ends."""
    settings = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 3,
    }
    full = distillation_trainer(tmp_path / "a", tok, *models(tok), units, **settings)
    full.train()
    logged = full.state.log_history[0]
    assert logged["dsa"] > 0 and logged["hra"] > 0 and "entropy" in logged
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert {"model.safetensors", PROJECTORS_NAME} <= {p.name for p in checkpoint.iterdir()}
    resumed = distillation_trainer(tmp_path / "b", tok, *models(tok), units, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for mine, theirs in ((resumed.model, full.model), (resumed.mta_loss, full.mta_loss)):
        for (name, a), b in zip(
            mine.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
    assert all(p.grad is None for p in resumed.mta_loss.parameters())


def test_distillation_evaluates_with_the_term(tmp_path, tok, units):
    trainer = distillation_trainer(tmp_path, tok, *models(tok), units)
    metrics = trainer.evaluate(eval_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    assert metrics["eval_dsa"] > 0 and metrics["eval_hra"] > 0 and "eval_loss" in metrics


def test_distillation_refusals(tmp_path, tok, units):
    teacher, student, mta_loss = models(tok)
    with pytest.raises(TypeError, match="needs model loaded"):
        distillation_trainer(tmp_path, tok, teacher, "gpt2", mta_loss, units)
    with pytest.raises(ValueError, match="does not take tools"):
        MTADistillationTrainer(student, teacher, mta_loss=mta_loss, tools=[len])
    with pytest.raises(ValueError, match="membership must be one of"):
        MTADistillationTrainer(student, teacher, mta_loss=mta_loss, membership="first")

    class ImageProcessor(transformers.ProcessorMixin):
        def __init__(self):  # no tokenizer or image processor: only its kind matters here
            pass

    with pytest.raises(ValueError, match="vision-language processor is not supported"):
        MTADistillationTrainer(
            student, teacher, mta_loss=mta_loss, processing_class=ImageProcessor()
        )
    with pytest.raises(ValueError, match="rules='authors_code' but the MTA loss is the 'paper'"):
        distillation_trainer(
            tmp_path, tok, teacher, student, mta_loss, UnitPool(processes=0, rules="authors_code")
        )
    trainer = distillation_trainer(tmp_path, tok, teacher, student, mta_loss, units)
    with pytest.raises(ValueError, match="not the tokenization of its text"):
        trainer._row_units(
            ["Another prompt entirely."],
            {
                "prompt_ids": torch.tensor([[5, 6, 7]]),
                "prompt_mask": torch.ones(1, 3, dtype=torch.long),
                "completion_ids": torch.tensor([[8]]),
                "completion_mask": torch.ones(1, 1, dtype=torch.long),
            },
        )


@pytest.mark.parametrize("kind", ["sft", "distillation"])
@pytest.mark.parametrize("sharding", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_sharded_training_is_refused(tmp_path, tok, units, monkeypatch, kind, sharding):
    """Each adapter reads the trainer's own flags once accelerate is set up. FSDP and DeepSpeed
    need accelerators in accelerate, so the flag is raised right after Trainer sets it."""
    set_up = transformers.Trainer.create_accelerator_and_postprocess

    def sharded(trainer):
        set_up(trainer)
        setattr(trainer, sharding, True)

    monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess", sharded)
    # DistillationTrainer hands its teacher to DeepSpeed first (not installed here)
    monkeypatch.setattr(trl.trainer.distillation_trainer, "prepare_deepspeed", lambda m, _: m)
    build = sft_trainer if kind == "sft" else distillation_trainer
    extra = () if kind == "sft" else (units,)
    with pytest.raises(ValueError, match="not done under FSDP or DeepSpeed here: use DDP"):
        build(tmp_path, tok, *models(tok), *extra)


def test_distillation_trains_a_lora_student(tmp_path, tok, units):
    """A LoRA student (TRL's peft_config): the term reaches the adapter through the hooked
    backbone of the PeftModel, and the export holds the adapter and the projectors."""
    peft = pytest.importorskip("peft")
    teacher, student, mta_loss = models(tok)
    lora = peft.LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=8)
    trainer = distillation_trainer(
        tmp_path, tok, teacher, student, mta_loss, units, peft_config=lora
    )
    assert isinstance(trainer.model, peft.PeftModel)
    batch = generated(trainer)
    trainer.compute_loss(trainer.model, batch).backward()
    adapter = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n and g is not None for n, g in adapter.items())
    # B starts at zero, so only B has a gradient at the first step
    assert all(g.abs().sum() > 0 for n, g in adapter.items() if "lora_B" in n)
    assert all(p.grad is not None for p in trainer.mta_loss.parameters())
    trainer.model.zero_grad()
    trainer.train()
    assert trainer.state.log_history[0]["dsa"] > 0
    trainer.save_model(str(tmp_path / "final"))
    saved = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_model.safetensors", PROJECTORS_NAME} <= saved


@pytest.mark.parametrize("kind", ["sft", "distillation"])
def test_ddp_processes_end_with_the_same_projectors(tmp_path, kind):
    """Two processes train on different rows (or samples), two micro-batches per step: their
    students and projectors end equal, so the projectors' gradients were all-reduced (once per
    step), and they moved."""
    if kind == "distillation":
        pytest.importorskip("spacy")
    torchrun(2, str(Path(__file__).parent / "trl_ddp_worker.py"), kind, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # one all-reduce (of the projectors' one bucket) per optimizer step, not per micro-batch
    assert ranks[0]["projector_allreduces"].tolist() == [0, 0]
    assert ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    _, _, initial = models(make_tokenizer([e.text for e in EXAMPLES], "bytelevel", 300))
    moved = [not torch.equal(v, ranks[0][f"mta.{k}"]) for k, v in initial.state_dict().items()]
    assert any(moved)
