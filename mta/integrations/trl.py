"""MTA in TRL's trainers (``pip install trl``, optional).

:class:`MTASFTTrainer` is ``trl.SFTTrainer`` plus the MTA term: the same :class:`~mta.loss.MTALoss`
(layer plan and projectors), the same batches (:class:`mta.data.DistillationDataset` and
:class:`mta.data.DistillationCollator`, whose unit keys the term reads) and the same
normalisation as :class:`mta.trainer.MTATrainer` with ``base_loss="ce"``, so one step of either
on one batch gives the same loss and gradients (``tests/test_integrations_trl.py``)::

    L = L_SFT + λ_DSA·L_DSA + λ_HRA·L_HRA

How it fits in ``SFTTrainer`` without changing it:

* the student's hidden states come from SFTTrainer's own forward: ``output_hidden_states`` is
  passed through it and a forward hook on the student's backbone keeps them (no second forward);
  only the model's keys of the batch reach SFTTrainer, the unit keys stay for the term;
* the teacher is prepared for evaluation (:func:`mta.teacher.prepare_teacher`) and runs once per
  micro-batch for the aligned layers only;
* the projectors are a module of their own, prepared by ``accelerate`` (DDP all-reduces their
  gradients; FSDP and DeepSpeed are refused), in one optimizer group of their own
  (``projector_learning_rate``), their gradients cleared after each optimizer step as
  ``Trainer`` clears the model's; unlike ``MTATrainer``, whose wrapper makes them part of the
  model, ``Trainer``'s gradient clipping sees the student's parameters only;
* checkpoints and ``save_model`` write ``mta_projectors.safetensors`` beside what SFTTrainer
  saves (:mod:`mta.checkpoints`), ``train(resume_from_checkpoint=...)`` reloads them, and with
  ``load_best_model_at_end`` the best checkpoint's projectors come back with its student;
* the components (``dsa``, ``hra``, ``mta``, …) are logged beside SFTTrainer's own metrics.

The datasets are :class:`mta.data.DistillationDataset` (tokenized, with their units). SFTTrainer
takes ``datasets.Dataset`` only, so it is given one of row references (dataset, row), which the
collator turns back into the rows; the adapter sets ``remove_unused_columns=False`` and
``dataset_kwargs={"skip_prepare_dataset": True}`` on the config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mta.checkpoints import load_projectors, save_projectors
from mta.data import DistillationCollator, DistillationDataset
from mta.lm_head import decoder
from mta.loss import MTALoss
from mta.metrics import LoggedMetrics, MetricsLogging
from mta.student import add_projector_group, check_layer_plan
from mta.teacher import prepare_teacher, prepare_unregistered, teacher_forward

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - the module is only imported with trl
    raise ImportError("mta.integrations.trl needs trl: pip install 'trl>=1.0'") from err

__all__ = ["MTASFTTrainer", "capture_hidden_states"]

#: The batch keys SFTTrainer's forward takes; the others (unit keys, the plan) are the term's.
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
#: Columns of the row-reference datasets SFTTrainer iterates.
SOURCE_COLUMN, ROW_COLUMN = "mta_source", "mta_row"


class _RowCollator:
    """The :class:`~mta.data.DistillationCollator` of the rows that row references name."""

    def __init__(self, collator: DistillationCollator, sources: list[DistillationDataset]):
        self.collator = collator
        self.sources = sources

    def __call__(self, references: list[dict[str, int]]) -> dict[str, Any]:
        return self.collator([self.sources[r[SOURCE_COLUMN]][r[ROW_COLUMN]] for r in references])


def _row_references(dataset: Any, key: str, sources: list[DistillationDataset]) -> Any:
    """A ``datasets.Dataset`` of references to the rows of ``dataset`` (added to ``sources``
    once); None stays None."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {
            name: _row_references(d, f"{key}[{name!r}]", sources) for name, d in dataset.items()
        }
    if not isinstance(dataset, DistillationDataset):
        raise TypeError(
            f"{key} must be a mta.data.DistillationDataset (tokenized with its units), got "
            f"{type(dataset).__name__}"
        )
    from datasets import Dataset

    known = [i for i, d in enumerate(sources) if d is dataset]
    if not known:
        sources.append(dataset)
    source = known[0] if known else len(sources) - 1
    return Dataset.from_dict(
        {SOURCE_COLUMN: [source] * len(dataset), ROW_COLUMN: list(range(len(dataset)))}
    )


@contextlib.contextmanager
def capture_hidden_states(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Keep the ``hidden_states`` of ``model``'s backbone (:func:`mta.lm_head.decoder`) from
    the first forward run inside the block with gradients enabled (else the first one):
    ``captured["hidden_states"]`` (a tuple of [B, T, d])."""
    backbone = decoder(model)
    if backbone is None:
        raise ValueError(
            f"{type(model).__name__} has no separate backbone whose hidden states MTA can read"
        )
    captured: dict[str, Any] = {}

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        # SFTTrainer may run the model again under no_grad for its metrics (label smoothing, a
        # compute_loss_func): keep the forward that builds the graph of the loss
        grad = torch.is_grad_enabled()
        if "hidden_states" not in captured or (grad and not captured["grad"]):
            captured["hidden_states"], captured["grad"] = output.hidden_states, grad

    handle = backbone.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


class MTASFTTrainer(MetricsLogging, SFTTrainer):
    """``trl.SFTTrainer`` with the MTA term (module docstring).

    Args:
        model: the student (a ``PreTrainedModel``, or a ``peft`` model).
        teacher_model: the frozen teacher; its tokenizer must be the student's, or the batches
            carry ``teacher_input_ids`` (``DistillationDataset(..., teacher_tokenizer=...)``).
        mta_loss: the :class:`~mta.loss.MTALoss` whose projectors are trained.
        args: a ``trl.SFTConfig``.
        data_collator: a :class:`mta.data.DistillationCollator`.
        train_dataset, eval_dataset (in ``kwargs``): :class:`mta.data.DistillationDataset`
            (``eval_dataset`` also a dict of them).
        projector_learning_rate, projector_weight_decay: the projectors' optimizer group.
        **kwargs: the other ``SFTTrainer`` arguments (``train_dataset``, ``processing_class``,
            …).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        teacher_model: nn.Module,
        mta_loss: MTALoss,
        args: Any,
        data_collator: DistillationCollator,
        projector_learning_rate: float = 5e-4,
        projector_weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(mta_loss, MTALoss):
            raise TypeError(f"mta_loss must be an mta.loss.MTALoss, got {type(mta_loss).__name__}")
        if not isinstance(data_collator, DistillationCollator):
            raise TypeError(
                "MTASFTTrainer reads its unit keys from mta.data.DistillationCollator batches, "
                f"got data_collator={data_collator!r}"
            )
        if projector_learning_rate <= 0:
            raise ValueError(f"projector_learning_rate must be > 0, got {projector_learning_rate}")
        check_layer_plan(model, teacher_model, mta_loss)
        for name in ("packing", "padding_free", "completion_only_loss", "assistant_only_loss"):
            if getattr(args, name, None):
                raise ValueError(
                    f"SFTConfig.{name}=True acts while SFTTrainer prepares its dataset, which the "
                    "MTA batches skip (mta.data tokenizes them, with their units and labels): "
                    f"unset {name}; the labels of mta.data already train on the responses only"
                )
        args.remove_unused_columns = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        sources: list[DistillationDataset] = []
        for key in ("train_dataset", "eval_dataset"):
            kwargs[key] = _row_references(kwargs.get(key), key, sources)
        super().__init__(
            model=model, args=args, data_collator=_RowCollator(data_collator, sources), **kwargs
        )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "MTASFTTrainer trains the projectors beside the student, which is not done "
                "under FSDP or DeepSpeed here: use DDP, or mta.trainer.MTATrainer (whose model "
                "holds the projectors)"
            )
        self.teacher = prepare_teacher(teacher_model, self.accelerator)
        self.projectors = prepare_unregistered(self.accelerator, mta_loss)
        self._sources = sources
        self.projector_learning_rate = projector_learning_rate
        self.projector_weight_decay = projector_weight_decay
        self.metrics = LoggedMetrics()
        self.add_callback(_ProjectorSteps(self))

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``SFTTrainer.evaluate``; ``eval_dataset`` is a :class:`~mta.data.DistillationDataset`
        (or a dict of them), as at construction."""
        if eval_dataset is not None:
            eval_dataset = _row_references(eval_dataset, "eval_dataset", self._sources)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def predict(self, test_dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict`` on a :class:`~mta.data.DistillationDataset`."""
        test_dataset = _row_references(test_dataset, "test_dataset", self._sources)
        return super().predict(test_dataset, *args, **kwargs)

    @property
    def mta_loss(self) -> MTALoss:
        """The (unwrapped) MTA loss module."""
        return self.accelerator.unwrap_model(self.projectors)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """SFTTrainer's optimizer over the student, plus the projectors' group."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        add_projector_group(
            optimizer, self.mta_loss, self.projector_learning_rate, self.projector_weight_decay
        )
        return optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """SFTTrainer's loss of the micro-batch plus the MTA term, normalised as
        :meth:`mta.trainer.MTATrainer.compute_loss`."""
        model_inputs = {k: inputs[k] for k in MODEL_KEYS if k in inputs}
        model_inputs["output_hidden_states"] = True
        with capture_hidden_states(self.accelerator.unwrap_model(model)) as captured:
            result = super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        pairs = self.mta_loss.layer_pairs
        _, teacher_hidden = teacher_forward(
            self.teacher,
            inputs,
            [p.teacher_layer for p in pairs],
            base=None,
            device=self.args.device,
            autocast=self.accelerator.autocast,
        )
        hidden = {p.student_layer: captured["hidden_states"][p.student_layer] for p in pairs}
        del captured
        mta = self.projectors(hidden, teacher_hidden, inputs)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        if num_items_in_batch is not None and model.training:
            loss = loss + mta.loss / steps
        else:
            loss = loss + mta.loss
        self.metrics.add_means("train" if model.training else "eval", mta.components)
        return (loss, outputs) if return_outputs else loss

    # ---- projectors with the checkpoints -----------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """SFTTrainer's export (or checkpoint), with the projectors beside it."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_projectors(output_dir, self.mta_loss)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; resuming also reloads the checkpoint's projectors."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir!r}")
        if resume_from_checkpoint:
            load_projectors(resume_from_checkpoint, self.mta_loss)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _ProjectorSteps(TrainerCallback):
    """What ``Trainer`` does for its model, done for the projectors: their gradients cleared
    after each optimizer step (``Trainer`` clears the model's only), and with
    ``load_best_model_at_end`` the best checkpoint's projectors reloaded with its student."""

    def __init__(self, trainer: MTASFTTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.mta_loss.zero_grad(set_to_none=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.mta_loss.zero_grad(set_to_none=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.load_best_model_at_end and state.best_model_checkpoint:
            load_projectors(state.best_model_checkpoint, self.trainer.mta_loss)
