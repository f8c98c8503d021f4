"""mta.integrations.trl: MTA in TRL's SFTTrainer.

One step of ``MTASFTTrainer`` equals one step of ``MTATrainer`` with ``base_loss="ce"`` on the
same batch (loss and every gradient, student and projectors). Tolerance: rtol 1e-5 in float32;
SFTTrainer's cross-entropy comes from its fused LM head (tiled log-softmax) and MTATrainer's
from the full logits, the same sums in another order.
"""

import copy

import pytest
import safetensors.torch
import torch
from training_helpers import (
    EXAMPLES,
    examples_dataset,
    gpt2,
    make_tokenizer,
    tiny_run_arguments,
    tiny_trainer,
)

from mta.checkpoints import PROJECTORS_NAME
from mta.data import DistillationCollator, pad_token_id
from mta.layers import plan_layers
from mta.loss import MTALoss

trl = pytest.importorskip("trl")
from mta.integrations.trl import MTASFTTrainer  # noqa: E402 (needs trl)

pytestmark = pytest.mark.usefixtures("eager_mta_ops")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer([e.text for e in EXAMPLES], "bytelevel", 300)


def models(tok):
    torch.manual_seed(0)
    teacher, student = gpt2(tok, 4, 48), gpt2(tok, 2, 32)
    return teacher, student, MTALoss(32, 48, plan_layers(2, 4, num_key_layers=2))


def sft_trainer(tmp_path, tok, teacher, student, mta_loss, eval_dataset=None, **overrides):
    settings = {
        **tiny_run_arguments(tmp_path, None, "ce"),
        "per_device_train_batch_size": 3,
        "bf16": False,  # SFTConfig's default; MTATrainer's reference runs in float32
        **overrides,
    }
    settings.pop("base_loss")
    return MTASFTTrainer(
        model=student,
        teacher_model=teacher,
        mta_loss=mta_loss,
        args=trl.SFTConfig(**settings),
        data_collator=DistillationCollator(pad_token_id(tok)),
        train_dataset=examples_dataset(tok),
        eval_dataset=eval_dataset,
        processing_class=tok,
    )


def step(trainer, model, student, projectors, batch, num_items):
    """Loss and gradients (by name) of one micro-batch through ``trainer.compute_loss``."""
    model.train()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = {f"student.{k}": p.grad.clone() for k, p in student.named_parameters()}
    grads |= {f"mta.{k}": p.grad.clone() for k, p in projectors.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 57])
def test_one_step_equals_mtatrainer(tmp_path, tok, num_items):
    teacher, student, mta_loss = models(tok)
    reference = tiny_trainer(
        copy.deepcopy(teacher),
        copy.deepcopy(student),
        tok,
        examples_dataset(tok),
        {**tiny_run_arguments(tmp_path / "mta", None, "ce"), "fused_lm_head": "off"},
    )
    reference.wrapper.mta_loss.load_state_dict(mta_loss.state_dict())
    adapter = sft_trainer(tmp_path / "sft", tok, teacher, student, mta_loss)
    batch = reference.data_collator([reference.train_dataset[i] for i in range(3)])
    want_loss, want = step(
        reference,
        reference.model,
        reference.student,
        reference.mta_loss,
        dict(batch),
        num_items,
    )
    got_loss, got = step(
        adapter, adapter.model, adapter.model, adapter.mta_loss, dict(batch), num_items
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
            tmp_path / str(lam), tok, teacher, student, mta_loss, label_smoothing_factor=0.1
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


@pytest.mark.parametrize("setting", ["packing", "padding_free", "assistant_only_loss"])
def test_dataset_preparation_settings_are_refused(tmp_path, tok, setting):
    with pytest.raises(ValueError, match=f"SFTConfig.{setting}=True acts while SFTTrainer"):
        sft_trainer(tmp_path, tok, *models(tok), **{setting: True})
