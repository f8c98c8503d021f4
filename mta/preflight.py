"""Checks of an ``mta-distill`` run that need no model weights, done before anything loads.

:func:`check_run` turns every mistake it can find without a model into a
:class:`~mta.errors.UserError` that names the config key (or the file and line): placeholders a
template leaves to the command line, the training arguments, the output directory, the data files
and their records, where each model and tokenizer comes from, and the layer plan against the
depths in the models' ``config.json``. It writes nothing. What it returns is what
:func:`mta.cli.build_trainer` builds from, so nothing is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mta.config import PLACEHOLDER, ModelConfig, RunConfig, placeholder_keys
from mta.errors import UserError
from mta.model_sources import ModelSource, resolve_source

if TYPE_CHECKING:
    from mta.data import Example
    from mta.layers import LayerPair
    from mta.training_args import MTATrainingArguments

__all__ = ["CheckedRun", "check_run"]


@dataclass
class CheckedRun:
    """A configuration that passed :func:`check_run`, with what the checks read."""

    config: RunConfig
    args: MTATrainingArguments
    teacher: ModelSource
    student: ModelSource
    teacher_tokenizer: ModelSource
    student_tokenizer: ModelSource
    train_examples: list[Example]
    eval_examples: list[Example] | None
    layer_pairs: list[LayerPair] | None
    """None when the MTA term is off."""
    student_dims: tuple[int, int]
    teacher_dims: tuple[int, int]
    """(layers, hidden size) read from each model's config.json."""

    @property
    def use_mta(self) -> bool:
        return self.layer_pairs is not None


def _check_placeholders(config: RunConfig) -> None:
    keys = placeholder_keys(config)
    if keys:
        example = " ".join(f"{k}=..." for k in keys)
        raise UserError(
            f"the config leaves {', '.join(keys)} to be set ({PLACEHOLDER}): give them on the "
            f"command line, e.g. mta-distill --config FILE {example}"
        )


def _training_arguments(config: RunConfig) -> MTATrainingArguments:
    from mta.training_args import MTATrainingArguments

    if "output_dir" not in config.training:
        raise UserError("config key 'training.output_dir' is required (where the student goes)")
    try:
        return MTATrainingArguments(**config.training)
    except (TypeError, ValueError) as err:
        raise UserError(f"training: {err}") from None


def _check_output_dir(args: MTATrainingArguments) -> None:
    output = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume is not None and not Path(resume).is_dir():
        raise UserError(
            f"training.resume_from_checkpoint: {str(resume)!r} is not a checkpoint directory "
            "(give one of output_dir/checkpoint-N)"
        )
    if output.exists() and not output.is_dir():
        raise UserError(f"training.output_dir: {str(output)!r} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite_output_dir and not resume:
        raise UserError(
            f"training.output_dir {str(output)!r} already holds files: choose a new directory, "
            "set training.overwrite_output_dir=true to write into it, or "
            "training.resume_from_checkpoint=<a checkpoint in it> to continue that run"
        )


def _examples(config: RunConfig, key: str, path: str, limit: int | None) -> list[Example]:
    from mta.data import TEMPLATES, read_examples

    if config.data.template not in TEMPLATES:
        raise UserError(
            f"config key 'data.template' must be one of {sorted(TEMPLATES)}, got "
            f"{config.data.template!r}"
        )
    try:
        return read_examples(path, config.data.format, config.data.template, limit)
    except (OSError, TypeError, ValueError) as err:
        raise UserError(f"{key}: {err}") from None


def _tokenizer_source(role: str, tokenizer: str | None, model: str) -> ModelSource:
    """``model.<role>_tokenizer``, or the model's own folder or hub id when it is not set."""
    key = f"model.{role}_tokenizer"
    if tokenizer:
        return resolve_source(key, tokenizer, "tokenizer")
    return resolve_source(f"model.{role} (its tokenizer, unless {key} is set)", model, "tokenizer")


def _dims(source: ModelSource, trust_remote_code: bool) -> tuple[int, int]:
    """(layers, hidden size) from the model's config.json."""
    from transformers import AutoConfig

    from mta.layers import model_dims

    try:
        config = AutoConfig.from_pretrained(
            source.name,
            local_files_only=source.local_files_only,
            trust_remote_code=trust_remote_code,
        )
        return model_dims(config)
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{source.key}: cannot read its config.json ({err})") from None


def _check_adapters(m: ModelConfig) -> None:
    """``model.teacher_adapter`` and ``model.student_lora``, before any model is loaded."""
    from mta.adapters import check_teacher_adapter, lora_config

    for key, check, value in (
        ("model.teacher_adapter", check_teacher_adapter, m.teacher_adapter),
        ("model.student_lora", lora_config, m.student_lora),
    ):
        if value is not None:
            try:
                check(value)
            except (ImportError, OSError, ValueError) as err:
                raise UserError(f"{key}: {err}") from None


def _layer_pairs(
    config: RunConfig, student: tuple[int, int], teacher: tuple[int, int]
) -> list[LayerPair]:
    from mta.layers import plan_layers

    m = config.mta
    key = "mta.layer_pairs" if m.layer_pairs is not None else "mta (the automatic layer plan)"
    try:
        return plan_layers(
            student[0],
            teacher[0],
            m.num_key_layers,
            m.num_word_layers,
            m.stride,
            pairs=m.layer_pairs,
        )
    except ValueError as err:
        raise UserError(f"{key}: {err} (depths read from the models' config.json)") from None


def _check_student_generation(
    args: MTATrainingArguments,
    config: RunConfig,
    train: list[Example],
    evaluation: list[Example] | None,
    use_mta: bool,
) -> None:
    """What ``training.student_generation`` needs: prompts to sample from, an evaluation set
    for the adaptive threshold, and spaCy for the units of the sampled text."""
    mode = args.student_generation
    if mode == "off":
        return
    if mode == "adaptive" and evaluation is None:
        raise UserError(
            "training.student_generation=adaptive raises its sampling threshold from the "
            "validation loss: set data.eval_file (and training.eval_strategy)"
        )
    plain = next((i for i, e in enumerate(train) if e.response_start == 0), None)
    if plain is not None:
        raise UserError(
            f"training.student_generation={mode} samples responses from the prompts, but record "
            f"{plain + 1} of data.train_file {config.data.train_file!r} is plain text (no prompt): "
            "use instruction or prompt/output records, or set training.student_generation=off"
        )
    from mta.spans import default_pipeline_name

    if use_mta and default_pipeline_name() is None and config.data.spacy_model is None:
        raise UserError(
            f"training.student_generation={mode} with MTA parses the units of the sampled "
            "responses during training, which needs spaCy and an English pipeline: pip install "
            "'mta[spacy]' (a units cache only holds the dataset's texts)"
        )


def check_run(config: RunConfig) -> CheckedRun:
    """Every check of ``config`` that needs no model weights (see the module docstring).

    Raises:
        UserError: the first mistake found, naming its key, file or line.
    """
    _check_placeholders(config)
    args = _training_arguments(config)
    _check_output_dir(args)
    d, m = config.data, config.model
    if d.max_length < 2:
        raise UserError(f"config key 'data.max_length' must be at least 2, got {d.max_length}")
    for key in ("max_train_samples", "max_eval_samples"):
        limit = getattr(d, key)
        if limit is not None and limit < 1:
            raise UserError(
                f"config key 'data.{key}' must be at least 1 (null: all records), got {limit}"
            )
    train = _examples(config, "data.train_file", d.train_file, d.max_train_samples)
    evaluation = (
        _examples(config, "data.eval_file", d.eval_file, d.max_eval_samples)
        if d.eval_file
        else None
    )
    teacher = resolve_source("model.teacher", m.teacher)
    student = resolve_source("model.student", m.student)
    teacher_tokenizer = _tokenizer_source("teacher", m.teacher_tokenizer, m.teacher)
    student_tokenizer = _tokenizer_source("student", m.student_tokenizer, m.student)
    _check_adapters(m)
    teacher_dims = _dims(teacher, m.trust_remote_code)
    student_dims = _dims(student, m.trust_remote_code)
    use_mta = config.mta.enabled and (config.mta.lambda_dsa > 0 or config.mta.lambda_hra > 0)
    if use_mta and config.mta.variant == "authors_code" and config.mta.metric != "cosine":
        raise UserError(
            f"mta.variant=authors_code uses the cosine metric (the released code has no other), "
            f"got mta.metric={config.mta.metric}: drop mta.metric or set mta.variant=paper"
        )
    _check_student_generation(args, config, train, evaluation, use_mta)
    pairs = _layer_pairs(config, student_dims, teacher_dims) if use_mta else None
    return CheckedRun(
        config=config,
        args=args,
        teacher=teacher,
        student=student,
        teacher_tokenizer=teacher_tokenizer,
        student_tokenizer=student_tokenizer,
        train_examples=train,
        eval_examples=evaluation,
        layer_pairs=pairs,
        student_dims=student_dims,
        teacher_dims=teacher_dims,
    )
