"""``StudentWithProjectors``: the trainable module of MTA distillation — the student and the MTA
loss's projectors in one ``nn.Module`` — and what its forward takes and returns.

Holding both is what makes multi-process training correct without special cases: DDP, FSDP and
DeepSpeed wrap the projectors with the student, so their gradients are all-reduced (or sharded)
and clipped with the student's, and the MTA term is computed inside the wrapped forward, where
only the aligned layers' hidden states are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from mta.kd_losses import fused_linear_distillation_loss
from mta.layers import LayerPair, model_dims
from mta.lm_head import decoder, head_operands
from mta.loss import MTALoss

__all__ = [
    "FusedHeadLoss",
    "StudentOutput",
    "StudentWithProjectors",
    "add_projector_group",
    "check_layer_plan",
]


@dataclass
class StudentOutput(ModelOutput):
    """Output of :class:`StudentWithProjectors`: student ``logits`` [B, T, V] (None with a fused
    LM head), the base loss summed over response tokens ``base_loss_sum`` (fused LM head only,
    else None) and, in eval mode, the student's cross-entropy on the labels ``student_ce_sum``
    (likewise), the MTA term ``mta_loss`` (float32 scalar, or None) and its detached
    ``mta_components``."""

    logits: Tensor | None = None
    base_loss_sum: Tensor | None = None
    student_ce_sum: Tensor | None = None
    mta_loss: Tensor | None = None
    mta_components: dict[str, Tensor] | None = None


@dataclass
class FusedHeadLoss:
    """What :class:`StudentWithProjectors` needs to compute the base loss from the student's
    last hidden states instead of returning logits (``fused_lm_head``): the labels [B, T], the
    teacher's last hidden states [B, T, d_T] and LM head (None for ``kind="ce"``) and the
    keyword arguments of :func:`~mta.kd_losses.fused_linear_distillation_loss`."""

    labels: Tensor
    teacher_hidden: Tensor | None
    teacher_weight: Tensor | None
    teacher_bias: Tensor | None
    settings: dict[str, Any]


class StudentWithProjectors(nn.Module):
    """The trainable part of MTA distillation: the student and the MTA loss (projectors).

    Its forward runs the student, keeps only the aligned hidden states and computes the MTA term,
    so that a distributed wrapper (DDP, FSDP, DeepSpeed) sees every trainable parameter.
    ``loss_type``/``accepts_loss_kwargs`` tell ``transformers.Trainer`` to count response tokens
    with the causal shift (``labels[:, 1:]``) for the loss normalisation.
    """

    loss_type = "ForCausalLM"
    accepts_loss_kwargs = True
    main_input_name = "input_ids"

    def __init__(self, student: PreTrainedModel, mta_loss: MTALoss | None = None) -> None:
        super().__init__()
        self.student = student
        self.mta_loss = mta_loss
        # FSDP's transformer auto-wrap policy reads the block classes from here.
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    @property
    def config(self) -> Any:
        """The student's config (``Trainer`` reads and sets ``use_cache`` and special tokens)."""
        return self.student.config

    def num_parameters(self, *args: Any, **kwargs: Any) -> int:
        """The student's parameter count (used by ``Trainer`` for FLOP estimates)."""
        return self.student.num_parameters(*args, **kwargs)

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Forwarded to the student (``TrainingArguments.activation_checkpointing``)."""
        self.student.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Forwarded to the student (the name older ``transformers`` releases call)."""
        self.student.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        teacher_hidden_states: Mapping[int, Tensor] | None = None,
        mta_batch: Mapping[str, Tensor] | None = None,
        fused_head_loss: FusedHeadLoss | None = None,
    ) -> StudentOutput:
        """Student forward + MTA term (+ the base loss with a fused LM head).

        Args:
            input_ids, attention_mask: student tokens [B, T].
            teacher_hidden_states: ``{teacher layer: [B, T', d_T]}`` for the layer plan (no grad).
            mta_batch: the batch's unit keys (``<g>_student_spans``, ``<g>_span_mask``, …) and
                masks, as consumed by :class:`~mta.loss.MTALoss`.
            fused_head_loss: compute the base loss here, from the student's last hidden states
                and LM head (read inside this forward, where FSDP has them unsharded), instead
                of returning logits.
        """
        use_mta = self.mta_loss is not None
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=use_mta,
            use_cache=False,
            return_dict=True,
        )
        logits = base_loss_sum = ce_sum = None
        if fused_head_loss is None:
            out = self.student(**kwargs)
            logits = out.logits
        else:
            out = decoder(self.student)(**kwargs)
            hidden, weight, bias = head_operands(
                self.student.get_output_embeddings(), out.last_hidden_state
            )
            loss = fused_head_loss
            base_loss_sum = fused_linear_distillation_loss(
                hidden,
                weight,
                loss.teacher_hidden,
                loss.teacher_weight,
                loss.labels,
                reduction="sum",
                student_bias=bias,
                teacher_bias=loss.teacher_bias,
                **loss.settings,
            )
            if not self.training:
                ce_sum = _student_ce_sum(hidden, weight, bias, loss.labels)
        if not use_mta:
            return StudentOutput(logits=logits, base_loss_sum=base_loss_sum, student_ce_sum=ce_sum)
        if teacher_hidden_states is None or mta_batch is None:
            raise ValueError("the MTA term needs teacher_hidden_states and mta_batch")
        hidden = {p.student_layer: out.hidden_states[p.student_layer] for p in self.layer_pairs}
        del out  # drop the other layers' hidden states
        mta = self.mta_loss(hidden, teacher_hidden_states, mta_batch)
        return StudentOutput(
            logits=logits,
            base_loss_sum=base_loss_sum,
            student_ce_sum=ce_sum,
            mta_loss=mta.loss,
            mta_components=mta.components,
        )

    @property
    def layer_pairs(self) -> tuple[LayerPair, ...]:
        """The MTA layer plan (empty without an MTA loss)."""
        return () if self.mta_loss is None else self.mta_loss.layer_pairs


def _student_ce_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    """The student's cross-entropy on ``labels`` summed over response tokens, from its last
    hidden states and LM head (no logits), without gradients."""
    with torch.no_grad():
        return fused_linear_distillation_loss(
            hidden, weight, None, None, labels, kind="ce", reduction="sum", student_bias=bias
        )


def check_layer_plan(
    student: PreTrainedModel, teacher: PreTrainedModel, mta_loss: MTALoss | None
) -> None:
    """Refuse an MTA loss built for other hidden sizes or layers than the two models have."""
    if mta_loss is None:
        return
    if not isinstance(mta_loss, MTALoss):
        raise TypeError(f"mta_loss must be an mta.loss.MTALoss, got {type(mta_loss).__name__}")
    student_depth, teacher_depth = model_dims(student.config)[0], model_dims(teacher.config)[0]
    for side, model, width in (
        ("student", student, mta_loss.student_hidden_size),
        ("teacher", teacher, mta_loss.teacher_hidden_size),
    ):
        depth, hidden_size = model_dims(model.config)
        if hidden_size != width:
            raise ValueError(
                f"mta_loss was built for a {side} hidden size of {width} but the {side} has "
                f"hidden_size={hidden_size}"
            )
        for pair in mta_loss.layer_pairs:
            layer = getattr(pair, f"{side}_layer")
            if layer > depth:
                raise ValueError(
                    f"layer pair {pair.name} uses {side} layer {layer}, out of range: the "
                    f"{side} has {depth} layers (hidden_states indices 1..{depth}); fix "
                    "mta.layer_pairs or build the plan with mta.layers.plan_layers("
                    f"{student_depth}, {teacher_depth})"
                )


def check_given_optimizer(
    optimizer: torch.optim.Optimizer | None, mta_loss: MTALoss | None
) -> None:
    """Refuse an optimizer given to the trainer (``optimizers=(optimizer, scheduler)``) that
    leaves out trainable projector parameters: they would get gradients and never move."""
    if optimizer is None or mta_loss is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in mta_loss.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"the optimizer given in optimizers=(optimizer, scheduler) leaves out {len(missing)} "
            f"MTA projector parameters ({missing[0]}, ...): give it a group of "
            "mta_loss.parameters() before building its scheduler, or let the trainer build both "
            "(its projector_learning_rate group)"
        )


def add_projector_group(
    optimizer: torch.optim.Optimizer,
    mta_loss: MTALoss | None,
    learning_rate: float,
    weight_decay: float,
) -> None:
    """Give the MTA projectors' trainable parameters their own group of ``optimizer`` (the
    scheduler then scales it with the student's groups)."""
    if mta_loss is None:
        return
    params = [p for p in mta_loss.parameters() if p.requires_grad]
    if params:
        optimizer.add_param_group(
            {"params": params, "lr": learning_rate, "weight_decay": weight_decay}
        )
