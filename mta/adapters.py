"""PEFT adapters in MTA runs (``pip install peft``, optional).

* A student wrapped by ``peft`` (``get_peft_model``, LoRA included on ``lm_head``; in a run's
  config ``model.student_lora``, built by :func:`lora_config`) trains as any student: the
  wrapper sees only its trainable adapter parameters, checkpoints hold the adapter
  (``adapter_model.safetensors``), and the fused LM head applies a LoRA head (:mod:`mta.lm_head`).
* A teacher fine-tuned with LoRA (the paper's OPT-6.7B teacher) is given as its base model plus
  the adapter's directory (``model.teacher_adapter``) and merged before training
  (:func:`merge_teacher_adapter`): a frozen teacher gains nothing from keeping the adapter apart,
  and merged it runs as fast as its base.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

try:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # without peft no model carries an adapter: isinstance(x, ()) is False
    PeftModel = LoraLayer = BaseTunerLayer = ()

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "BaseTunerLayer",
    "LoraLayer",
    "PeftModel",
    "check_teacher_adapter",
    "is_peft_model",
    "lora_config",
    "merge_teacher_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False when peft is not installed)."""
    return isinstance(model, PeftModel)


def merge_teacher_adapter(teacher: nn.Module, adapter: str | os.PathLike[str]) -> nn.Module:
    """``teacher`` with the PEFT adapter saved in the directory ``adapter`` merged into its
    weights (a plain model again, no adapter modules left).

    Raises:
        ImportError: peft is not installed.
        FileNotFoundError: ``adapter`` holds no ``adapter_config.json``.
    """
    check_teacher_adapter(adapter)
    return PeftModel.from_pretrained(teacher, os.fspath(adapter)).merge_and_unload()


def check_teacher_adapter(adapter: str | os.PathLike[str]) -> None:
    """Refuse a teacher adapter that :func:`merge_teacher_adapter` could not load (the errors it
    lists), before any model is loaded."""
    _require_peft("model.teacher_adapter")
    adapter = os.fspath(adapter)
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_NAME)):
        raise FileNotFoundError(
            f"{adapter!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG_NAME}): give the "
            "folder that adapter.save_pretrained() wrote"
        )


def _require_peft(key: str) -> None:
    if not PeftModel:
        raise ImportError(f"{key} needs peft: pip install 'peft>=0.13'")


def lora_config(settings: Mapping[str, Any]) -> Any:
    """``peft.LoraConfig`` of a causal LM from ``settings`` (its fields: ``r``, ``lora_alpha``,
    ``target_modules``, ``lora_dropout``, …).

    Raises:
        ImportError: peft is not installed.
        ValueError: a field peft does not know, or a value it refuses.
    """
    _require_peft("model.student_lora")
    from peft import LoraConfig

    settings = dict(settings)
    task = settings.pop("task_type", "CAUSAL_LM")
    if task != "CAUSAL_LM":
        raise ValueError(f"a student's LoRA is for a causal LM (task_type CAUSAL_LM), got {task!r}")
    try:
        return LoraConfig(task_type="CAUSAL_LM", **settings)
    except TypeError as err:  # an unknown field
        raise ValueError(f"not a peft.LoraConfig field: {err}") from None
