"""``MTATrainer``: a ``transformers.Trainer`` that distills a frozen teacher into a student with
a base KD loss plus the MTA term (docs/design.md §2 Eq. 14)::

    L = L_base(student_logits, teacher_logits, labels) + λ_DSA·L_DSA + λ_HRA·L_HRA

Design:

* The trainer's ``model`` is :class:`~mta.student.StudentWithProjectors`, the student and the
  :class:`~mta.loss.MTALoss` (its projectors) in one module that distributed wrappers see whole.
  The teacher is kept outside (frozen, prepared for evaluation by :mod:`mta.teacher`): it is
  neither broadcast nor checkpointed.
* Only the aligned hidden states are kept: both models run with ``output_hidden_states=True``
  and every layer not in the layer plan is dropped right after the forward.
* The projectors get their own optimizer parameter group (``projector_learning_rate``, default
  5e-4, ``projector_weight_decay`` 0); the scheduler scales both groups alike. An optimizer
  given in ``optimizers`` must hold them (:func:`mta.student.check_given_optimizer`).
* With ``fused_lm_head`` the base loss is computed inside the wrapped forward from the models'
  last hidden states and LM-head weights (:func:`~mta.kd_losses.fused_linear_distillation_loss`,
  Liger-Kernel's fused linear JSD on CUDA when installed): no ``[B, T, V]`` logits exist.
* Checkpoints and the final export hold the student as a plain Hugging Face model
  (``save_pretrained``) with the projectors beside it (:mod:`mta.checkpoints`); resume restores
  student, projectors, optimizer (both groups), scheduler, RNG and the student-generation state.
* Loss normalisation matches ``transformers``' token-count convention: the base loss is summed
  over response tokens and divided by the number of response tokens of the whole optimizer step
  (all micro-batches and, with ``average_tokens_across_devices``, all processes); the MTA term is a
  mean over the examples of each micro-batch, divided by the accumulation steps. One process with
  batch ``B·N`` and ``N`` processes with batch ``B`` then take the same step.
* Every component (``base_loss``, ``dsa``, ``hra``, ``dsa/<s>-<t>``, …, ``mta``) is averaged
  over the logging window (and over processes) and logged next to ``loss``
  (:class:`~mta.metrics.LoggedMetrics`).
* ``Trainer``'s private ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` are
  overridden: ``transformers`` has no public hook that writes the student as a plain model from
  the wrapper, or that loads a checkpoint into a module it did not save (``save_model`` is
  public but also gathers FSDP/DeepSpeed state dicts before it calls ``_save``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from mta.callbacks import print_logs_as_numbers
from mta.checkpoints import (
    PROJECTORS_NAME,
    SamplerCheckpoints,
    load_projectors,
    load_student_weights,
    read_sampler_state,
    sampler_state_name,
    save_projectors,
)
from mta.data import DistillationCollator, same_tokenizer
from mta.generation import SAMPLED_KEY, StudentSampler
from mta.kd_losses import LIGER_KINDS, distillation_loss, liger_available
from mta.lm_head import fused_head_refusal, head_operands, vocab_rows
from mta.loss import MTALoss
from mta.metrics import LoggedMetrics, MetricsLogging
from mta.student import (
    FusedHeadLoss,
    StudentWithProjectors,
    add_projector_group,
    check_given_optimizer,
    check_layer_plan,
)
from mta.teacher import prepare_teacher, teacher_forward
from mta.training_args import MTATrainingArguments
from mta.unit_pool import UnitPool

# PROJECTORS_NAME … sampler_state_name: their homes are mta.checkpoints, mta.student, mta.data;
# re-exported because code written against earlier versions imports them from here.
__all__ = [
    "PROJECTORS_NAME",
    "FusedHeadLoss",
    "MTATrainer",
    "MTATrainingArguments",
    "StudentWithProjectors",
    "load_projectors",
    "same_tokenizer",
    "sampler_state_name",
]

logger = logging.get_logger(__name__)


class MTATrainer(MetricsLogging, Trainer):
    """Distill ``teacher_model`` into ``model`` with a base KD loss plus MTA.

    Args:
        model: the student (``PreTrainedModel`` with an LM head); trained.
        teacher_model: the teacher; frozen (``requires_grad_(False)``, ``eval()``) and prepared
            by ``accelerate`` for evaluation only (:func:`mta.teacher.prepare_teacher`: on the
            training device, partitioned with DeepSpeed ZeRO-3, or left where a ``device_map``
            put it).
        args: :class:`MTATrainingArguments`.
        mta_loss: the :class:`~mta.loss.MTALoss` (layer plan and projectors), or None for the
            base loss alone.
        processing_class: the student's tokenizer (saved with checkpoints; used to resolve a
            padded vocabulary).
        teacher_processing_class: the teacher's tokenizer if it differs from the student's; the
            batches must then carry ``teacher_input_ids``/``teacher_attention_mask`` and units
            mapped to each tokenization, and ``base_loss`` must be ``"ce"``.
        unit_pool: with ``student_generation`` and MTA, the :class:`~mta.unit_pool.UnitPool`
            that parses the sampled responses' units (default: ``args.unit_workers`` processes
            of the default spaCy pipeline, no disk cache).
        **kwargs: the other ``transformers.Trainer`` arguments (``data_collator``,
            ``train_dataset``, ``eval_dataset``, ``callbacks``, …).

    Raises:
        ValueError: a layer of the plan is out of range, the hidden sizes do not match the MTA
            loss, the vocabularies cannot be reconciled, or different tokenizers are combined
            with a logit-level base loss.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_model: PreTrainedModel,
        args: MTATrainingArguments,
        mta_loss: MTALoss | None = None,
        processing_class: Any = None,
        teacher_processing_class: Any = None,
        unit_pool: UnitPool | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MTATrainingArguments):
            raise TypeError(f"args must be MTATrainingArguments, got {type(args).__name__}")
        if "model_init" in kwargs:
            raise ValueError("MTATrainer does not support model_init: pass the student as model")
        self.cross_tokenizer = teacher_processing_class is not None and not (
            processing_class is not None
            and same_tokenizer(processing_class, teacher_processing_class)
        )
        if self.cross_tokenizer and args.base_loss != "ce":
            raise ValueError(
                f"base_loss={args.base_loss!r} compares the teacher's and the student's "
                "next-token distributions, which needs one shared vocabulary; the teacher and "
                "student tokenizers differ. Use base_loss='ce' (MTA's unit alignment works "
                "across tokenizers) or give both models the same tokenizer."
            )
        check_layer_plan(model, teacher_model, mta_loss)
        self.vocab_size = self._resolve_vocab(model, teacher_model, args, processing_class)
        super().__init__(
            model=StudentWithProjectors(model, mta_loss),
            args=args,
            processing_class=processing_class,
            **kwargs,
        )
        self.label_names = ["labels"]
        check_given_optimizer(self.optimizer, mta_loss)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs are visible to a single process, which the Trainer would "
                "drive with nn.DataParallel (unsupported here): launch one process per GPU with "
                "`torchrun --nproc_per_node N -m mta.cli ...` or `accelerate launch`, or set "
                "CUDA_VISIBLE_DEVICES to one GPU"
            )
        if (self.args.fsdp or self.args.deepspeed) and not (
            self.is_fsdp_enabled or self.is_deepspeed_enabled
        ):
            logger.warning(
                "training.fsdp/deepspeed is set but accelerate runs %s without it (FSDP and "
                "DeepSpeed need CUDA devices): this run uses plain data parallelism",
                self.accelerator.distributed_type,
            )
        self.teacher = prepare_teacher(teacher_model, self.accelerator)
        self.fused_lm_head = self._use_fused_head()
        self.metrics = LoggedMetrics()
        self.sampler = self._build_sampler(unit_pool, teacher_processing_class)
        if self.sampler is not None:
            self.add_callback(SamplerCheckpoints(self.sampler))
        print_logs_as_numbers(self)

    def _build_sampler(
        self, unit_pool: UnitPool | None, teacher_tokenizer: Any
    ) -> StudentSampler | None:
        """The :class:`~mta.generation.StudentSampler` of ``args.student_generation`` (None when
        off), after checking that this run can sample."""
        settings = self.args.generation_settings()
        if settings.mode == "off":
            return None
        where = f"student_generation={settings.mode!r}"
        if self.processing_class is None:
            raise ValueError(f"{where} needs the student's tokenizer: pass processing_class")
        if not (
            isinstance(self.data_collator, DistillationCollator)
            and self.data_collator.with_examples
        ):
            raise TypeError(
                f"{where} needs batches that carry their prompts: pass "
                "data_collator=mta.data.DistillationCollator(..., with_examples=True), got "
                f"{self.data_collator!r}"
            )
        max_length = getattr(self.train_dataset, "max_length", None)
        if max_length is None:
            raise TypeError(
                f"{where} needs a mta.data.DistillationDataset as train_dataset (its max_length "
                "bounds the sampled sequences)"
            )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                f"{where} runs the student's generate, which this trainer does not drive under "
                "FSDP or DeepSpeed sharding: use plain data parallelism (DDP)"
            )
        if (
            settings.mode == "adaptive"
            and settings.buffer_size < self.args.per_device_train_batch_size
        ):
            raise ValueError(
                f"replay_buffer_size={settings.buffer_size} is smaller than a batch "
                f"(per_device_train_batch_size={self.args.per_device_train_batch_size})"
            )
        mta_loss = self.wrapper.mta_loss
        variant = "paper" if mta_loss is None else mta_loss.variant
        if mta_loss is not None and unit_pool is None:
            unit_pool = UnitPool(processes=settings.unit_workers, rules=variant)
        if unit_pool is not None and unit_pool.rules != variant:
            raise ValueError(
                f"the unit pool extracts units with rules={unit_pool.rules!r} but the MTA loss "
                f"is the {variant!r} variant"
            )
        return StudentSampler(
            settings,
            tokenizer=self.processing_class,
            teacher_tokenizer=teacher_tokenizer if self.cross_tokenizer else None,
            collator=self.data_collator,
            max_length=max_length,
            units=unit_pool if mta_loss is not None else None,
            rules=variant,
            membership=getattr(self.train_dataset, "membership", "overlap"),
            seed=(self.args.seed, self.args.process_index),
        )

    # ---- construction checks ------------------------------------------------------------

    def _resolve_vocab(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        args: MTATrainingArguments,
        tokenizer: Any,
    ) -> int | None:
        """Vocabulary the base loss runs over (None: the logits' own, which match)."""
        if args.base_loss == "ce" or self.cross_tokenizer:
            return None
        rows_s, rows_t = vocab_rows(student), vocab_rows(teacher)
        if args.vocab_size is not None:
            return args.vocab_size
        if rows_s == rows_t:
            return None
        if tokenizer is None:
            raise ValueError(
                f"the student's LM head has {rows_s} rows and the teacher's {rows_t}: pass the "
                "shared tokenizer as processing_class (or set vocab_size in "
                "MTATrainingArguments) so that both logits can be truncated to the real vocabulary"
            )
        if len(tokenizer) > min(rows_s, rows_t):
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the student's LM head has "
                f"{rows_s} rows and the teacher's {rows_t}: the smaller model cannot score every "
                "token. Resize its embeddings (model.resize_token_embeddings(len(tokenizer))) or "
                "use base_loss='ce'."
            )
        return len(tokenizer)

    def _use_fused_head(self) -> bool:
        """Resolve ``args.fused_lm_head`` (see :class:`MTATrainingArguments`)."""
        mode = self.args.fused_lm_head
        if mode == "off":
            return False
        if mode == "auto" and not (
            self.args.device.type == "cuda"
            and self.args.base_loss in LIGER_KINDS
            and liger_available()
        ):
            return False
        reasons = []
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            reasons.append(
                "DeepSpeed ZeRO-3 partitions the LM head, whose weight the fused loss reads "
                "outside the head's own forward"
            )
        models = [("student", self.wrapper.student)]
        if self.args.base_loss != "ce":
            models.append(("teacher", self.teacher))
            weight = self.teacher.get_output_embeddings().weight
            # (an empty tensor resolves "cpu:0" to "cpu" and "cuda" to the current index)
            if weight.device != torch.empty(0, device=self.args.device).device:
                reasons.append(
                    f"the teacher's LM head is on {weight.device}, not on the training device "
                    f"{self.args.device}"
                )
        for side, model in models:
            if not reasons and (reason := fused_head_refusal(model)) is not None:
                reasons.append(f"the {side}: {reason}")
        if not reasons:
            return True
        if mode == "on":
            raise ValueError(
                f"fused_lm_head='on' cannot be used: {'; '.join(reasons)}. Set fused_lm_head="
                "'off' to compute the base loss from the models' logits."
            )
        logger.info("fused_lm_head='auto' falls back to logits: %s", "; ".join(reasons))
        return False

    # ---- accessors ---------------------------------------------------------------------

    @property
    def wrapper(self) -> StudentWithProjectors:
        """The (unwrapped) :class:`StudentWithProjectors`."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def student(self) -> PreTrainedModel:
        """The student model."""
        return self.wrapper.student

    @property
    def mta_loss(self) -> MTALoss | None:
        """The MTA loss module (projectors), or None."""
        return self.wrapper.mta_loss

    # ---- optimizer ---------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer over the student, plus one group for the projectors
        (``projector_learning_rate``, ``projector_weight_decay``)."""
        if self.optimizer is not None:
            return self.optimizer
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        optimizer = super().create_optimizer(wrapper.student)
        add_projector_group(
            optimizer,
            wrapper.mta_loss,
            self.args.projector_learning_rate,
            self.args.projector_weight_decay,
        )
        return optimizer

    # ---- student generation --------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, Tensor | int | None]:
        """The micro-batches of one optimizer step, with those the sampler chooses replaced by
        student-sampled (or replayed) ones before the step's tokens are counted."""
        if self.sampler is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = []
        for _ in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            batches.append(
                self.sampler.batch_for_step(
                    self.student,
                    batch,
                    self.state.global_step,
                    self.state.max_steps,
                    self.accelerator.autocast,
                )
            )
        counts = self.sampler.counts
        self.metrics.set_value("train", "sampled_batches", counts["sampled"])
        self.metrics.set_value("train", "replayed_batches", counts["replayed"])
        if self.sampler.settings.mode == "adaptive":
            self.metrics.set_value("train", "adaptive_threshold", self.sampler.threshold.threshold)
        return super().get_batch_samples(iter(batches), len(batches), device)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``; with ``student_generation='adaptive'`` the run's evaluation
        (prefix ``eval``) also updates the threshold from its ``eval_student_ce``."""
        metrics = super().evaluate(*args, **kwargs)
        if self.sampler is not None and self.sampler.settings.mode == "adaptive":
            key = "eval_student_ce"
            if key in metrics:
                self.sampler.threshold.observe(metrics[key])
        return metrics

    # ---- loss --------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """``L_base + L_MTA`` of one micro-batch (normalised as in the module docstring)."""
        if self.cross_tokenizer and "teacher_input_ids" not in inputs:
            raise ValueError(
                "the teacher's tokenizer differs from the student's but the batch has no "
                "teacher_input_ids: build the dataset with teacher_tokenizer= (mta.data)"
            )
        if "teacher_input_ids" in inputs and self.args.base_loss != "ce":
            raise ValueError(
                "the batch has teacher_input_ids (different tokenizers) but base_loss="
                f"{self.args.base_loss!r} needs a shared vocabulary: use base_loss='ce'"
            )
        labels = inputs["labels"]
        teacher_base, teacher_hidden = teacher_forward(
            self.teacher,
            inputs,
            [p.teacher_layer for p in self.wrapper.layer_pairs],
            base=None
            if self.args.base_loss == "ce"
            else ("hidden" if self.fused_lm_head else "logits"),
            device=self.args.device,
            autocast=self.accelerator.autocast,
        )
        if SAMPLED_KEY in inputs:
            # a sampled batch: its units were parsed while it was generated and while the
            # teacher's forward, launched above, runs
            inputs = {**inputs, **inputs[SAMPLED_KEY].unit_keys(self.args.device)}
        kd = {
            "kind": self.args.base_loss,
            "temperature": self.args.temperature,
            "skew_alpha": self.args.skew_alpha,
            "vocab_size": self.vocab_size,
        }
        fused = None
        if self.fused_lm_head:
            weight = bias = None
            if teacher_base is not None:
                teacher_base, weight, bias = head_operands(
                    self.teacher.get_output_embeddings(), teacher_base
                )
            fused = FusedHeadLoss(labels, teacher_base, weight, bias, kd)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            teacher_hidden_states=teacher_hidden,
            mta_batch=inputs,
            fused_head_loss=fused,
        )
        if fused is None:
            base_sum = distillation_loss(
                outputs.logits, teacher_base, labels, reduction="sum", **kd
            )
        else:
            base_sum = outputs.base_loss_sum
        num_local = (labels[:, 1:] != -100).sum().clamp(min=1)
        mta = outputs.mta_loss
        if num_items_in_batch is None:
            loss = base_sum / num_local
            if mta is not None:
                loss = loss + mta
        else:
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = base_sum * scale / torch.as_tensor(num_items_in_batch).clamp(min=1)
            if mta is not None:
                # The base sum is divided by the step's token count; the MTA mean is divided by
                # the accumulation steps so that both sum to one step. Evaluation has none.
                steps = getattr(self, "current_gradient_accumulation_steps", 1)
                loss = loss + mta / (steps if model.training else 1)
        components = {"base_loss": base_sum.detach() / num_local, **(outputs.mta_components or {})}
        if not model.training:
            ce_sum = outputs.student_ce_sum
            if ce_sum is None:
                ce_sum = distillation_loss(
                    outputs.logits.detach(), None, labels, kind="ce", reduction="sum"
                )
            components["student_ce"] = ce_sum / num_local
        self.metrics.add_means("train" if model.training else "eval", components)
        if return_outputs:
            return loss, {"logits": outputs.logits}
        return loss

    # ---- saving / loading --------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the student as a plain HF model and the projectors beside it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.wrapper
        student_state = projector_state = None
        if state_dict is not None:  # gathered by DeepSpeed/FSDP: split by submodule prefix
            student_state = {
                k.removeprefix("student."): v
                for k, v in state_dict.items()
                if k.startswith("student.")
            }
            projector_state = {
                k.removeprefix("mta_loss."): v
                for k, v in state_dict.items()
                if k.startswith("mta_loss.")
            }
        wrapper.student.save_pretrained(output_dir, state_dict=student_state)
        if wrapper.mta_loss is not None:
            save_projectors(output_dir, wrapper.mta_loss, projector_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load the student's weights and the projectors from a checkpoint directory.

        FSDP and DeepSpeed runs resume from their own checkpoint files (``pytorch_model_fsdp*``,
        ``global_step*``), which ``Trainer`` writes beside the plain student and which hold the
        whole wrapped module, student and projectors: those go through ``Trainer``'s loader.
        """
        if self.sampler is not None:
            state = read_sampler_state(resume_from_checkpoint, self.args.process_index)
            self.sampler.load_state_dict(state)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(resume_from_checkpoint, wrapper.student)
        if wrapper.mta_loss is not None:
            load_projectors(resume_from_checkpoint, wrapper.mta_loss)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_best_model()  # their own checkpoint files (see _load_from_checkpoint)
        else:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
