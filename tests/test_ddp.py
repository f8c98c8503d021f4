"""DDP: ``torchrun --nproc_per_node 2 -m mta.cli`` (2 CPU processes, gloo) against one process.

Same config, same global batch (2 processes × 2 examples vs 1 process × 4, sequential sampling):
the logged losses and the trained weights (student and MTA projectors) must match. The examples
have different numbers of response tokens, so this checks the token-count normalisation across
processes as well as the projectors' gradient all-reduce. Plain SGD makes the update linear in the
gradient, so the only differences are float32 summation order (tolerance 1e-6 absolute on weights
that move by > 1e-3, 1e-5 relative on losses). Run with the logits path and with the fused LM head
(whose head weight gets its gradient from a custom Function, outside the head's own forward).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from training_helpers import RECORDS, TINY, torchrun, write_tiny_run

import mta_kernels
from mta.checkpoints import PROJECTORS_NAME, sampler_state_name
from mta.cli import run
from mta.config import load_config

# 8 examples with different response lengths: two optimizer steps of a global batch of 4.
DDP_RECORDS = [r for r in RECORDS if "text" not in r][:4] * 2


def _losses(output_dir) -> list[float]:
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "base_loss" in h]


def _weights(output_dir) -> dict[str, torch.Tensor]:
    weights = safetensors.torch.load_file(output_dir / "model.safetensors")
    projectors = safetensors.torch.load_file(output_dir / PROJECTORS_NAME)
    return {**weights, **{f"projector.{k}": v for k, v in projectors.items()}}


@pytest.mark.parametrize("fused_lm_head", ["off", "on"])
def test_ddp_two_processes_match_one(tmp_path, fused_lm_head):
    pytest.importorskip("spacy")  # units of the tiny dataset (the workers read them from cache)
    overrides = [
        *write_tiny_run(tmp_path, DDP_RECORDS),
        f"training.fused_lm_head={fused_lm_head}",
        "training.optim=sgd",
        "training.learning_rate=0.5",
        "training.lr_scheduler_type=constant",
        "training.max_steps=2",
        "training.save_strategy=steps",
        "training.save_steps=2",
        "training.train_sampling_strategy=sequential",
    ]
    single = [*overrides, f"training.output_dir={tmp_path / 'single'}"]
    with mta_kernels.prefer_reference():  # eager MTA ops, as in the workers (no interpreter)
        run(load_config(TINY, [*single, "training.per_device_train_batch_size=4"]))
    initial = safetensors.torch.load_file(tmp_path / "student" / "model.safetensors")

    torchrun(
        2,
        "-m",
        "mta.cli",
        "--config",
        TINY,
        *overrides,
        f"training.output_dir={tmp_path / 'ddp'}",
        "training.per_device_train_batch_size=2",
        "training.ddp_backend=gloo",
    )

    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=1e-5)
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    moved = max((a[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # the comparison is not vacuous


def test_ddp_each_process_samples_its_own_prompts(tmp_path):
    """Student generation under 2-process DDP (adaptive, θ = 1: every micro-batch sampled or
    replayed): each process samples from the prompts of its own shard with its own generator,
    and its sampler state lands in the checkpoint beside the other's."""
    pytest.importorskip("spacy")  # the sampled responses' units are parsed during training
    torchrun(
        2,
        "-m",
        "mta.cli",
        "--config",
        TINY,
        *write_tiny_run(tmp_path, DDP_RECORDS),
        f"data.eval_file={tmp_path / 'train.jsonl'}",
        f"training.output_dir={tmp_path / 'ddp'}",
        "training.per_device_train_batch_size=2",
        "training.ddp_backend=gloo",
        "training.max_steps=2",
        "training.save_strategy=steps",
        "training.save_steps=2",
        "training.train_sampling_strategy=sequential",
        "training.student_generation=adaptive",
        "training.adaptive_init_threshold=1.0",
        "training.replay_buffer_size=2",
        "training.generation_max_new_tokens=6",
        "training.unit_workers=0",
    )
    checkpoint = tmp_path / "ddp" / "checkpoint-2"
    states = [json.loads((checkpoint / sampler_state_name(rank)).read_text()) for rank in (0, 1)]
    prompts = []
    for state in states:
        assert sum(state["counts"].values()) == 2 and state["counts"]["sampled"] >= 1
        buffer = state["buffer"]["items"]
        assert len(buffer) == 2
        prompts.append({item["text"][: item["response_start"]] for item in buffer})
    assert states[0]["rng"] != states[1]["rng"]  # one generator per process
    assert prompts[0].isdisjoint(prompts[1])  # each process prompts with its own examples
