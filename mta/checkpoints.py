"""What an MTA run writes beside the student in every checkpoint and in its final export, and
reads back on resume.

* ``mta_projectors.safetensors`` (:data:`PROJECTORS_NAME`): the MTA loss's projectors, with the
  widths and layer plan they were built for in the header (:func:`save_projectors`,
  :func:`load_projectors`).
* The student's own weights as ``save_pretrained`` wrote them (:func:`load_student_weights`):
  a plain Hugging Face model, or for a ``peft`` student its adapter (``adapter_model.safetensors``
  and ``adapter_config.json``, which ``peft.PeftModel.from_pretrained`` loads).
* ``mta_student_generation-rank<r>.json``: each process's student-generation state (generator,
  threshold, replay buffer), written by :class:`SamplerCheckpoints`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import safetensors.torch
from torch import Tensor, nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer import load_sharded_checkpoint
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from mta.adapters import is_peft_model
from mta.generation import StudentSampler
from mta.loss import MTALoss

__all__ = [
    "PROJECTORS_NAME",
    "SamplerCheckpoints",
    "load_projectors",
    "load_student_weights",
    "projector_metadata",
    "read_sampler_state",
    "sampler_state_name",
    "save_projectors",
]

PROJECTORS_NAME = "mta_projectors.safetensors"


def projector_metadata(mta_loss: MTALoss) -> dict[str, str]:
    """What is needed to rebuild the projectors' module: stored in the safetensors header."""
    return {
        "format": "pt",
        "student_hidden_size": str(mta_loss.student_hidden_size),
        "teacher_hidden_size": str(mta_loss.teacher_hidden_size),
        "layer_pairs": json.dumps(
            [[p.student_layer, p.teacher_layer, p.granularity] for p in mta_loss.layer_pairs]
        ),
    }


def load_projectors(path: str | os.PathLike[str], mta_loss: MTALoss) -> None:
    """Load ``mta_projectors.safetensors`` (a file or the directory holding it) into ``mta_loss``.

    Raises:
        FileNotFoundError: no projector file there.
        ValueError: the file was saved for other layers or widths.
    """
    path = os.fspath(path)
    file = os.path.join(path, PROJECTORS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no MTA projectors at {file!r}: checkpoints written by MTATrainer hold "
            f"{PROJECTORS_NAME} beside the student's weights"
        )
    with safetensors.safe_open(file, framework="pt") as handle:
        saved = handle.metadata() or {}
    expected = projector_metadata(mta_loss)
    for key in ("student_hidden_size", "teacher_hidden_size", "layer_pairs"):
        if key in saved and saved[key] != expected[key]:
            raise ValueError(
                f"{file!r} holds projectors for {key}={saved[key]} but the MTA loss has "
                f"{key}={expected[key]}; build the MTALoss with the run's layer plan"
            )
    state = safetensors.torch.load_file(file, device="cpu")
    mta_loss.load_state_dict(state, strict=True)


def save_projectors(
    output_dir: str | os.PathLike[str],
    mta_loss: MTALoss,
    state: Mapping[str, Tensor] | None = None,
) -> None:
    """Write ``mta_loss``'s projectors (or ``state``, their gathered state dict) to
    ``output_dir/mta_projectors.safetensors``."""
    if state is None:
        state = mta_loss.state_dict()
    safetensors.torch.save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        os.path.join(output_dir, PROJECTORS_NAME),
        metadata=projector_metadata(mta_loss),
    )


def load_student_weights(checkpoint: str, student: nn.Module) -> None:
    """Load the student's weights from a checkpoint: ``model.safetensors`` (or its sharded
    index), refusing any missing or unexpected key but the tied ones ``save_pretrained`` omits;
    for a ``peft.PeftModel`` its active adapter's ``adapter_model.safetensors``."""
    if is_peft_model(student):
        _load_adapter_weights(checkpoint, student)
        return
    single = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        state = safetensors.torch.load_file(single, device="cpu")
        result = student.load_state_dict(state, strict=False)
    elif os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)):
        result = load_sharded_checkpoint(student, checkpoint, strict=False)
    else:
        raise ValueError(f"no student weights ({SAFE_WEIGHTS_NAME}) in checkpoint {checkpoint!r}")
    # Keys of tied parameters (lm_head ↔ embeddings) are not saved; anything else must be.
    own = {name for name, _ in student.named_parameters()}
    missing = [k for k in result.missing_keys if k in own]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint!r} does not match the student: missing "
            f"{missing}, unexpected {list(result.unexpected_keys)}"
        )


def _load_adapter_weights(checkpoint: str, student: nn.Module) -> None:
    """Each active adapter's weights, from where ``PeftModel.save_pretrained`` put them: the
    checkpoint itself for ``default``, its ``<name>/`` folder for any other name."""
    from peft import set_peft_model_state_dict
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME

    trainable = {k for k, p in student.named_parameters() if p.requires_grad}
    missing: set[str] = set(trainable)
    for name in student.active_adapters:
        folder = checkpoint if name == "default" else os.path.join(checkpoint, name)
        file = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise ValueError(
                f"no adapter weights ({ADAPTER_WEIGHTS_NAME}) for adapter {name!r} in checkpoint "
                f"{checkpoint!r}, but the student is a peft model: resume from a checkpoint of "
                "the same LoRA run"
            )
        state = safetensors.torch.load_file(file, device="cpu")
        result = set_peft_model_state_dict(student, state, adapter_name=name)
        if result.unexpected_keys:
            raise ValueError(
                f"checkpoint {checkpoint!r} does not match the student's adapter {name!r}: "
                f"unexpected {list(result.unexpected_keys)}"
            )
        missing &= set(result.missing_keys)
    # every trainable parameter (the adapters, modules_to_save) was in one of the files
    if missing:
        raise ValueError(
            f"checkpoint {checkpoint!r} does not hold the student's trainable {sorted(missing)}"
        )


def sampler_state_name(process_index: int) -> str:
    """The file of one process's :class:`~mta.generation.StudentSampler` state in a checkpoint."""
    return f"mta_student_generation-rank{process_index}.json"


def read_sampler_state(checkpoint: str, process_index: int) -> dict[str, Any]:
    """This process's sampler state from ``checkpoint`` (refused when it has none)."""
    path = os.path.join(checkpoint, sampler_state_name(process_index))
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {checkpoint!r} has no student-generation state for process "
            f"{process_index} ({os.path.basename(path)}): it was written without "
            "student_generation or by fewer processes; resume with the run's settings"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class SamplerCheckpoints(TrainerCallback):
    """Writes each process's sampler state into every checkpoint the trainer saves, and stops
    the sampler's unit workers when training ends."""

    def __init__(self, sampler: StudentSampler) -> None:
        self.sampler = sampler

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # every process writes its own file; the first to get here creates the folder
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, sampler_state_name(args.process_index))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.sampler.state_dict(), f)

    def on_train_end(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        if self.sampler.units is not None:
            self.sampler.units.close()
