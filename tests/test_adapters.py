"""PEFT in MTA runs (mta.adapters): LoRA students train with MTA through both LM-head paths,
checkpoint and resume bit for bit, and export an adapter that ``peft`` loads; LoRA teachers are
merged before training.

Tolerances: the fused and logits paths of one step differ by float32 summation order (the fused
head folds LoRA into one weight and sums the loss in chunks): rtol 1e-5 on the loss and on the
adapter's gradients, as the plain-student test of the fused head.
"""

import copy

import pytest
import torch
from training_helpers import (
    EXAMPLES,
    clone,
    examples_dataset,
    gpt2,
    make_tokenizer,
    tiny_run_arguments,
    tiny_trainer,
)

from mta.adapters import merge_teacher_adapter

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("eager_mta_ops")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer([e.text for e in EXAMPLES], "bytelevel", 300)


def lora(model, targets=("c_attn", "lm_head"), adapter_name="default", **config):
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
    config = peft.LoraConfig(target_modules=list(targets), **{**settings, **config})
    return peft.get_peft_model(model, config, adapter_name=adapter_name)


def make_trainer(tmp_path, tok, student=None, **overrides):
    torch.manual_seed(0)
    teacher = gpt2(tok, 4, 48)
    if student is None:
        student = lora(gpt2(tok, 2, 32))
    dataset = examples_dataset(tok)
    settings = {
        **tiny_run_arguments(tmp_path, None, "fkl"),
        "per_device_train_batch_size": 3,
        **overrides,
    }
    return tiny_trainer(teacher, student, tok, dataset, settings)


def adapter_state(model):
    return {k: v.clone() for k, v in model.named_parameters() if "lora_" in k}


def test_lora_student_trains_its_adapter_only(tmp_path, tok):
    trainer = make_trainer(tmp_path, tok)
    frozen = {k: v.clone() for k, v in trainer.student.named_parameters() if "lora_" not in k}
    adapter, teacher = adapter_state(trainer.student), clone(trainer.teacher)
    trainer.train()
    after = adapter_state(trainer.student)
    assert all(not torch.equal(after[k], adapter[k]) for k in adapter)  # A and B of each layer
    for name, value in trainer.student.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, teacher[name]), name
    logged = trainer.state.log_history[0]
    assert logged["dsa"] > 0 and logged["hra"] > 0


def test_fused_lm_head_applies_the_lm_head_adapter(tmp_path, tok):
    """One batch through fused_lm_head 'on' and 'off' with LoRA on lm_head: same loss, same
    gradients of every adapter (the head's included)."""
    results = []
    for mode in ("on", "off"):
        trainer = make_trainer(tmp_path / mode, tok, fused_lm_head=mode)
        assert trainer.fused_lm_head is (mode == "on")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in trainer.student.named_parameters() if "lora_" in k}
        assert any("lm_head" in k for k in grads)
        results.append((loss.detach(), grads))
    (fused_loss, fused_grads), (loss, grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_lm_head_takes_adapter_dropout_and_refuses_dora(tmp_path, tok):
    torch.manual_seed(0)
    student = lora(gpt2(tok, 2, 32), lora_dropout=0.1)
    assert make_trainer(tmp_path, tok, student=student, fused_lm_head="on").fused_lm_head
    student = lora(gpt2(tok, 2, 32), targets=("lm_head",), use_dora=True)
    with pytest.raises(ValueError, match="the student: its LoRA adapter 'default' is a variant"):
        make_trainer(tmp_path, tok, student=student, fused_lm_head="on")


def test_named_adapter_resumes_bitwise(tmp_path, tok):
    """peft saves an adapter not named 'default' in a folder of its name: found there."""
    settings = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    runs = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        gpt2(tok, 4, 48)  # the teacher's draws, as make_trainer makes them
        student = lora(gpt2(tok, 2, 32), adapter_name="student")
        runs.append(make_trainer(tmp_path / run, tok, student=student, **settings))
    runs[0].train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert (checkpoint / "student" / "adapter_model.safetensors").is_file()
    runs[1].train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(
        adapter_state(runs[1].student).items(),
        adapter_state(runs[0].student).values(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_lora_resume_is_bitwise_and_the_export_loads_with_peft(tmp_path, tok):
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = make_trainer(tmp_path / "a", tok, **settings)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    resumed = make_trainer(tmp_path / "b", tok, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(
        adapter_state(resumed.student).items(), adapter_state(full.student).values(), strict=True
    ):
        assert torch.equal(a, b), name
    for a, b in zip(resumed.mta_loss.parameters(), full.mta_loss.parameters(), strict=True):
        assert torch.equal(a, b)
    # the export is an adapter: peft loads it onto a fresh base and gives the trained logits
    resumed.save_model(str(tmp_path / "final"))
    torch.manual_seed(0)
    gpt2(tok, 4, 48)  # the teacher drew these numbers first
    base = gpt2(tok, 2, 32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "final")
    ids = torch.tensor([tok("The sky is blue.")["input_ids"]])
    resumed.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, resumed.student(ids).logits)


def test_resume_of_a_plain_checkpoint_into_a_lora_student_is_refused(tmp_path, tok):
    torch.manual_seed(0)
    plain = make_trainer(tmp_path / "a", tok, student=gpt2(tok, 2, 32), max_steps=1)
    plain.train()
    plain.save_model(str(tmp_path / "plain"))
    trainer = make_trainer(tmp_path / "b", tok, max_steps=1)
    with pytest.raises(ValueError, match=r"no adapter weights .* but the student is a peft model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain"))


def test_teacher_adapter_is_merged(tmp_path, tok):
    torch.manual_seed(0)
    teacher = gpt2(tok, 4, 48)
    adapted = lora(copy.deepcopy(teacher), targets=("c_attn", "c_fc"))
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok("The sky is blue.")["input_ids"]])
    adapted.eval()
    with torch.no_grad():
        expected = adapted(ids).logits
    merged = merge_teacher_adapter(teacher, tmp_path / "adapter")
    assert not isinstance(merged, peft.PeftModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        merge_teacher_adapter(teacher, tmp_path)
