"""The frozen teacher, placed where the training run needs it.

:func:`prepare_teacher` freezes the teacher and hands it to ``accelerate`` as a model that is
only evaluated, as TRL prepares its teachers and reference models:

* a teacher dispatched with a ``device_map`` stays where it was put;
* with DeepSpeed ZeRO stage 3 it becomes a DeepSpeed inference engine whose parameters are
  partitioned across the processes like the student's (:func:`zero3_inference_config`), so that a
  teacher larger than one device's memory can be used;
* otherwise ``Accelerator.prepare_model(..., evaluation_mode=True)`` places it on the training
  device (FSDP included, where ``accelerate`` leaves placement to the sharding it then skips), and
  its forward is left unwrapped: the trainer runs the teacher under the same autocast as the
  student, and ``accelerate``'s wrapper would also cast every output to float32, all layers'
  hidden states included.

:func:`teacher_forward` is the teacher's part of a step: the aligned layers' hidden states and
what the base loss needs (logits, or the last hidden state for a fused LM head), nothing more.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mta.layers import model_dims
from mta.lm_head import decoder

__all__ = [
    "prepare_teacher",
    "prepare_unregistered",
    "teacher_forward",
    "zero3_inference_config",
]

# DeepSpeed config sections that only make sense for a model that is trained.
_TRAINING_ONLY = ("optimizer", "scheduler", "gradient_clipping")
_ZERO_TRAINING_ONLY = ("offload_optimizer",)


def zero3_inference_config(training_config: Mapping[str, Any], hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a frozen ZeRO-3 model, from the run's training config.

    The batch sizes, precision and ZeRO-3 parameter settings (offload, gathering thresholds)
    are kept, so the teacher is partitioned as the student is; the optimizer, the scheduler,
    gradient clipping and optimizer offload are dropped (a frozen model has none). The bucket
    sizes left ``"auto"`` get the values ``transformers`` gives them for a model of width
    ``hidden_size`` (the teacher's).

    Raises:
        ValueError: the training config is not ZeRO stage 3, or it still has an ``"auto"``
            value this function cannot resolve.
    """
    stage = training_config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise ValueError(f"a ZeRO-3 teacher needs a ZeRO stage 3 training config, got {stage}")
    config = copy.deepcopy(dict(training_config))
    for key in _TRAINING_ONLY:
        config.pop(key, None)
    zero = config["zero_optimization"]
    for key in _ZERO_TRAINING_ONLY:
        zero.pop(key, None)
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    unresolved = sorted(_auto_keys(config))
    if unresolved:
        raise ValueError(
            f"the DeepSpeed config still has 'auto' for {unresolved}: the teacher's ZeRO-3 "
            "engine needs them resolved (set them in the config)"
        )
    return config


def _auto_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            keys += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(f"{prefix}{key}")
    return keys


def prepare_unregistered(accelerator: Any, module: nn.Module, **kwargs: Any) -> nn.Module:
    """``accelerator.prepare_model(module, device_placement=True, **kwargs)``, with ``module``
    left out of the accelerator's list of prepared models: ``Trainer.evaluate`` prepares the
    student (mixed precision, FSDP/DeepSpeed wrapping) only while that list is empty, so a
    teacher or a loss module in it would leave an evaluation before training with an unprepared
    student. The list is private to ``accelerate``; nothing public keeps a module out of it."""
    prepared = accelerator.prepare_model(module, device_placement=True, **kwargs)
    registry = getattr(accelerator, "_models", None)
    if registry is not None and prepared in registry:
        registry.remove(prepared)
    return prepared


def prepare_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """``teacher`` frozen (no gradients, eval mode) and placed for ``accelerator``'s run (see the
    module docstring); the returned module is what the trainer calls."""
    teacher.requires_grad_(False)
    teacher.eval()
    if getattr(teacher, "hf_device_map", None) is not None:
        return teacher
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        import deepspeed

        config = zero3_inference_config(plugin.deepspeed_config, model_dims(teacher.config)[1])
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine
    prepared = prepare_unregistered(accelerator, teacher, evaluation_mode=True)
    # Mixed precision rebinds ``forward`` on the instance (autocast, then every output cast to
    # float32). The trainer already autocasts the teacher, and the cast would copy every layer's
    # hidden states, so the class's own forward is restored. ``unwrap_model(keep_fp32_wrapper=
    # False)`` is not used: it unwraps ``__wrapped__`` past transformers' own decorators.
    prepared.__dict__.pop("forward", None)
    prepared.__dict__.pop("_original_forward", None)
    return prepared


@torch.no_grad()
def teacher_forward(
    teacher: nn.Module,
    inputs: Mapping[str, Any],
    layers: Sequence[int],
    *,
    base: Literal["logits", "hidden"] | None,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor | None, dict[int, Tensor]]:
    """The teacher's outputs a step needs, without gradients.

    Args:
        teacher: the prepared teacher (:func:`prepare_teacher`).
        inputs: the batch; ``teacher_input_ids``/``teacher_attention_mask`` when the teacher has
            its own tokenizer, else ``input_ids``/``attention_mask``.
        layers: ``hidden_states`` indices of the aligned teacher layers.
        base: ``"logits"`` [B, T, V], ``"hidden"`` (the last hidden state [B, T, d_T], for a
            fused LM head: no logits are computed) or None (``ce``: only one position's logits
            are computed when the model allows it).
        device: where the outputs go (a ``device_map`` teacher's layers sit on their shards).
        autocast: the student's mixed-precision context (a teacher kept in fp32 would otherwise
            run its matmuls in fp32).

    Returns:
        (the base output or None, ``{layer: hidden [B, T, d_T]}``); the other layers' hidden
        states are dropped at once.
    """
    layers = sorted(set(layers))
    if not layers and base is None:
        return None, {}
    if teacher.training:
        teacher.eval()
    model, kwargs = teacher, {}
    if base == "hidden":
        model = decoder(teacher)
    elif base is None and _takes_logits_to_keep(teacher):
        kwargs["logits_to_keep"] = 1
    with autocast():
        out = model(
            input_ids=inputs.get("teacher_input_ids", inputs["input_ids"]),
            attention_mask=inputs.get("teacher_attention_mask", inputs["attention_mask"]),
            output_hidden_states=bool(layers),
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
    hidden = {layer: out.hidden_states[layer] for layer in layers}
    base_output = None
    if base is not None:
        base_output = out.logits if base == "logits" else out.last_hidden_state
    del out
    # a device_map teacher ends on its last shard, its layers on theirs (no-ops otherwise)
    hidden = {layer: h.to(device) for layer, h in hidden.items()}
    if base_output is not None:
        base_output = base_output.to(device)
    return base_output, hidden


def _takes_logits_to_keep(teacher: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (a DeepSpeed engine's module's)."""
    return _forward_takes_logits_to_keep(type(getattr(teacher, "module", teacher)))


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    # once per class: the signature is read on every step otherwise
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
