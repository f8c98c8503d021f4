"""Builders of the TRL adapters' tests (``tests/test_integrations_trl.py``) and of their DDP
worker (``tests/trl_ddp_worker.py``): tiny GPT-2 pairs, the adapters on CPU in float32."""

from __future__ import annotations

import datasets
import torch
import trl
from training_helpers import examples_dataset, gpt2, tiny_run_arguments

from mta.data import DistillationCollator, pad_token_id
from mta.integrations.trl import MTADistillationTrainer, MTASFTTrainer
from mta.layers import plan_layers
from mta.loss import MTALoss

#: Short prompts (the generated batches' prompts are left-padded to the longest).
PROMPTS = [
    "Name the colour of a clear sky.",
    "Give two uses of a hammer.",
    "Explain why the sea is salty. Rivers carry minerals.",
]


def models(tok):
    """A 4×48 teacher, a 2×32 student and their MTA loss, the same on every call."""
    torch.manual_seed(0)
    teacher, student = gpt2(tok, 4, 48), gpt2(tok, 2, 32)
    return teacher, student, MTALoss(32, 48, plan_layers(2, 4, num_key_layers=2))


def _settings(output_dir, overrides: dict) -> dict:
    settings = {
        **tiny_run_arguments(output_dir, None, "ce"),
        "per_device_train_batch_size": 3,
        "bf16": False,  # TRL's configs default to it; MTATrainer's reference runs in float32
        **overrides,
    }
    settings.pop("base_loss")
    return settings


def sft_trainer(
    tmp_path, tok, teacher, student, mta_loss, eval_dataset=None, optimizers=(None, None), **o
):
    return MTASFTTrainer(
        model=student,
        teacher_model=teacher,
        mta_loss=mta_loss,
        args=trl.SFTConfig(**_settings(tmp_path, o)),
        data_collator=DistillationCollator(pad_token_id(tok)),
        train_dataset=examples_dataset(tok),
        eval_dataset=eval_dataset,
        processing_class=tok,
        optimizers=optimizers,
    )


def distillation_trainer(
    tmp_path, tok, teacher, student, mta_loss, units, prompts=PROMPTS, peft_config=None, **o
):
    settings = _settings(tmp_path, {"max_completion_length": 6, "pad_to_multiple_of": None, **o})
    return MTADistillationTrainer(
        student,
        teacher,
        mta_loss=mta_loss,
        args=trl.DistillationConfig(**settings),
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        unit_pool=units,
        peft_config=peft_config,
    )
