"""mta.teacher: the frozen teacher prepared by accelerate for evaluation only, and the ZeRO-3
inference config of a teacher partitioned like the student.

The DeepSpeed engine itself needs CUDA devices: here its wiring is checked with a stand-in
``deepspeed`` module (the config it gets, the engine in eval mode); partitioning a real teacher
is a GPU check.
"""

import sys
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from training_helpers import gpt2, make_tokenizer

from mta.teacher import prepare_teacher, teacher_forward, zero3_inference_config


@pytest.fixture
def accelerator_state():
    """An accelerate state of the test's own, dropped afterwards (it is a process singleton)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(["a small teacher", "reads these words"], "bytelevel", 280)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_teacher_is_frozen_placed_and_its_forward_left_alone(
    accelerator_state, tok, mixed_precision
):
    """accelerate prepares the teacher for evaluation (no DDP wrapper, no gradients) and its
    forward keeps the model's own outputs: a bf16 teacher's hidden states stay bf16 (the
    float32 output wrapper of mixed precision would copy every layer's)."""
    teacher = gpt2(tok, 2, 32).to(torch.bfloat16)
    teacher.train()
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    prepared = prepare_teacher(teacher, accelerator)
    assert prepared is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    # not registered: Trainer.evaluate prepares the student only while that list is empty
    assert accelerator._models == []
    assert prepared.forward.__func__ is type(teacher).forward
    with torch.no_grad():
        out = prepared(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}


def test_device_map_teacher_stays_where_it_was_put(accelerator_state, tok):
    teacher = gpt2(tok, 2, 32)
    teacher.hf_device_map = {"": "cpu"}
    accelerator = Accelerator(cpu=True)
    assert prepare_teacher(teacher, accelerator) is teacher
    assert teacher not in accelerator._models
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


TRAINING_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "scheduler": {"type": "WarmupLR"},
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "cpu"},
        "offload_optimizer": {"device": "cpu"},
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def test_zero3_inference_config_keeps_partitioning_and_drops_training():
    config = zero3_inference_config(TRAINING_CONFIG, hidden_size=64)
    assert "optimizer" not in config and "scheduler" not in config
    assert "gradient_clipping" not in config
    zero = config["zero_optimization"]
    assert "offload_optimizer" not in zero
    assert zero["offload_param"] == {"device": "cpu"} and zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert config["bf16"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert TRAINING_CONFIG["zero_optimization"]["reduce_bucket_size"] == "auto"  # not mutated


@pytest.mark.parametrize(
    "change, match",
    [
        ({"zero_optimization": {"stage": 2}}, "needs a ZeRO stage 3 training config, got 2"),
        ({"train_micro_batch_size_per_gpu": "auto"}, r"'auto' for \['train_micro_batch"),
    ],
)
def test_zero3_inference_config_refusals(change, match):
    with pytest.raises(ValueError, match=match):
        zero3_inference_config({**TRAINING_CONFIG, **change}, hidden_size=64)


def test_zero3_teacher_becomes_an_inference_engine(monkeypatch, tok):
    """With ZeRO-3 the teacher goes to ``deepspeed.initialize`` with the inference config and
    comes back as the engine, in eval mode (stand-in ``deepspeed``: the engine needs CUDA)."""
    calls = {}

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    def initialize(model, config):
        calls["model"], calls["config"] = model, config
        engine = Engine(model)
        engine.train()
        return engine, None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    plugin = types.SimpleNamespace(zero_stage=3, deepspeed_config=TRAINING_CONFIG)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    teacher = gpt2(tok, 2, 32)
    engine = prepare_teacher(teacher, accelerator)
    assert isinstance(engine, Engine) and not engine.training
    assert calls["model"] is teacher
    assert calls["config"] == zero3_inference_config(TRAINING_CONFIG, hidden_size=32)


@pytest.mark.parametrize("base", ["logits", "hidden", None])
def test_teacher_forward_keeps_only_what_the_step_needs(tok, base):
    """The aligned layers' hidden states, and the logits [B, T, V], the last hidden state
    [B, T, d] (fused head: no logits) or nothing (ce); teacher_input_ids win when present."""
    torch.manual_seed(0)
    teacher = gpt2(tok, 4, 48)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    batch = {"input_ids": ids[:, :3], "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    batch |= {"teacher_input_ids": ids, "teacher_attention_mask": torch.ones_like(ids)}
    out, hidden = teacher_forward(teacher, batch, [4, 2, 4], base=base, device=torch.device("cpu"))
    assert sorted(hidden) == [2, 4] and hidden[2].shape == (2, 4, 48)
    with torch.no_grad():
        full = teacher(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(hidden[4], full.hidden_states[4], rtol=0, atol=0)
    expected = {"logits": full.logits, "hidden": full.hidden_states[-1], None: None}[base]
    if base is None:
        assert out is None
    else:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
