"""Worker of tests/test_fsdp.py, launched by ``torchrun --nproc_per_node 2`` on CPU (gloo).

``accelerate`` only enables FSDP on accelerators (on CPU it silently runs DDP), so this drives
PyTorch FSDP2 (``fully_shard``) directly on the trainer's own model and loss: every process
builds the same ``MTATrainer`` (tiny GPT-2 pair, regex units), shards its
``StudentWithProjectors`` per transformer block and at the root, and runs
``MTATrainer.compute_loss`` on the same batch. FSDP averages the gradients over processes, so
each sharded gradient must equal the gradient of an unsharded copy on that batch. Then the
full state dict is gathered (what ``Trainer`` saves for FSDP), split by ``MTATrainer._save``
into a plain student and the projectors, and loaded back into perturbed shards (what resuming
does). Rank 0 writes the largest differences to ``argv[1]`` as JSON; the test asserts on them.

``fsdp_worker.py trainer OUT [CHECKPOINT]`` (CUDA) instead trains through accelerate's FSDP.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from training_helpers import RECORDS, gpt2, make_tokenizer, regex_units
from transformers import GPT2LMHeadModel

import mta_kernels
from mta.checkpoints import load_projectors
from mta.data import DistillationCollator, DistillationDataset, format_record, pad_token_id
from mta.layers import plan_layers
from mta.loss import MTALoss
from mta.trainer import MTATrainer, MTATrainingArguments


def build_trainer(output_dir: str, fused_lm_head: str, **settings: Any) -> MTATrainer:
    examples = [format_record(r) for r in RECORDS]
    tok = make_tokenizer([e.text for e in examples], "bytelevel", 300)
    torch.manual_seed(0)  # same models on every process
    teacher, student = gpt2(tok, 4, 48), gpt2(tok, 2, 32)
    dataset = DistillationDataset(examples, tok, 192, units=[regex_units(e) for e in examples])
    return MTATrainer(
        model=student,
        teacher_model=teacher,
        args=MTATrainingArguments(
            output_dir=output_dir,
            report_to=[],
            base_loss="skew_fkl",
            fused_lm_head=fused_lm_head,
            **settings,
        ),
        mta_loss=MTALoss(32, 48, plan_layers(2, 4, num_key_layers=2)),
        processing_class=tok,
        data_collator=DistillationCollator(pad_token_id(tok)),
        train_dataset=dataset,
    )


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"different keys: {sorted(a.keys() ^ b.keys())}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check(fused_lm_head: str, output_dir: str) -> dict[str, float]:
    trainer = build_trainer(output_dir, fused_lm_head, use_cpu=True, ddp_backend="gloo")
    wrapper = trainer.model
    reference = copy.deepcopy(wrapper)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    reference.train()
    trainer.compute_loss(reference, batch).backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}

    for block in wrapper.student.transformer.h:
        fully_shard(block)
    fully_shard(wrapper)
    wrapper.train()
    loss = trainer.compute_loss(wrapper, batch)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in wrapper.named_parameters() if p.grad is not None}
    result = {
        "grad": max_difference(grads, expected),
        "grad_scale": max_difference(
            expected, {k: torch.zeros_like(v) for k, v in expected.items()}
        ),
    }

    # Save as Trainer does for FSDP (full state dict on rank 0), then resume into other values.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(wrapper, options=options)  # rank 0 only with cpu_offload
    saved_full = {k: v.clone() for k, v in full.items()}  # loading below redistributes `full`
    if dist.get_rank() == 0:
        trainer._save(output_dir, state_dict=full)
        saved = GPT2LMHeadModel.from_pretrained(output_dir).state_dict()
        student = {k: v for k, v in reference.student.state_dict().items() if k in saved}
        result["saved_student"] = max_difference(saved, student)
        projectors = copy.deepcopy(reference.mta_loss)
        torch.nn.init.zeros_(next(projectors.parameters()))
        load_projectors(output_dir, projectors)
        result["saved_projectors"] = max_difference(
            projectors.state_dict(), reference.mta_loss.state_dict()
        )
    with torch.no_grad():
        for param in wrapper.parameters():
            param.add_(1.0)
    set_model_state_dict(
        wrapper, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    restored = get_model_state_dict(wrapper, options=options)
    if dist.get_rank() == 0:
        result["restored"] = max_difference(restored, saved_full)
    return result


def train_with_accelerate_fsdp(output_dir: str, resume: str | None) -> None:
    """CUDA only: ``MTATrainer`` with ``fsdp`` through accelerate (FSDP2, fused LM head), 4
    steps with a checkpoint at step 2, or resumed from ``resume``."""
    trainer = build_trainer(
        output_dir,
        "on",
        fsdp="full_shard auto_wrap",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]},
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        # Adam's update of a near-zero gradient is ~±lr whatever its size; a large epsilon
        # damps that, so the exact comparison tests the restored state, not GPU summation order
        adam_epsilon=1e-3,
        disable_tqdm=True,
    )
    if not trainer.is_fsdp_enabled:
        raise AssertionError(
            f"accelerate did not enable FSDP: {trainer.accelerator.distributed_type}"
        )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(os.path.join(output_dir, "final"))


def main() -> None:
    if sys.argv[1] == "trainer":  # trainer OUTPUT_DIR [RESUME_FROM]
        train_with_accelerate_fsdp(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
        dist.destroy_process_group()
        return
    out = sys.argv[1]
    results = {}
    with mta_kernels.prefer_reference():  # eager MTA ops on CPU (the kernels are tested apart)
        for mode in ("on", "off"):
            with tempfile.TemporaryDirectory() as tmp:
                results[mode] = check(mode, tmp)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
