"""``MTATrainer``: a ``transformers.Trainer`` that distills a frozen teacher into a student with
a base KD loss plus the MTA term (docs/design.md §2 Eq. 14)::

    L = L_base(student_logits, teacher_logits, labels) + λ_DSA·L_DSA + λ_HRA·L_HRA

Design:

* The trainer's ``model`` is :class:`StudentWithProjectors`, an ``nn.Module`` holding the student
  and the :class:`~mta.loss.MTALoss` (its projectors). Wrapping both is what makes multi-process
  training correct without special cases: DDP/FSDP/DeepSpeed wrap the projectors with the student,
  so their gradients are all-reduced (or sharded) and clipped with the student's, and the MTA loss
  is computed inside the wrapped forward. The teacher is kept outside (frozen, ``eval()``, moved to
  the student's device): it is neither broadcast nor checkpointed.
* Only the aligned hidden states are kept: both models run with ``output_hidden_states=True``
  and every layer not in the layer plan is dropped right after the forward.
* The projectors get their own optimizer parameter group (``projector_learning_rate``, default
  5e-4, ``projector_weight_decay`` 0); the scheduler scales both groups alike.
* With ``fused_lm_head`` the base loss is computed inside the wrapped forward from the models'
  last hidden states and LM-head weights (:func:`~mta.kd_losses.fused_linear_distillation_loss`,
  Liger-Kernel's fused linear JSD on CUDA when installed): no ``[B, T, V]`` logits exist.
* Checkpoints and the final export hold the student as a plain Hugging Face model
  (``save_pretrained``) with the projectors beside it in ``mta_projectors.safetensors``; resume
  restores student, projectors, optimizer (both groups), scheduler and RNG.
* Loss normalisation matches ``transformers``' token-count convention: the base loss is summed
  over response tokens and divided by the number of response tokens of the whole optimizer step
  (all micro-batches and, with ``average_tokens_across_devices``, all processes); the MTA term is a
  mean over the examples of each micro-batch, divided by the accumulation steps. One process with
  batch ``B·N`` and ``N`` processes with batch ``B`` then take the same step.
* Every component (``base_loss``, ``dsa``, ``hra``, ``dsa/<s>-<t>``, …, ``mta``) is averaged
  over the logging window (and over processes) and logged next to ``loss``.
"""

from __future__ import annotations

import inspect
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME, load_sharded_checkpoint
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, ModelOutput, logging

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()  # isinstance(x, ()) is False

from mta.callbacks import print_logs_as_numbers
from mta.data import DistillationCollator
from mta.generation import (
    GENERATION_MODES,
    SAMPLED_KEY,
    GenerationMode,
    GenerationSettings,
    StudentSampler,
)
from mta.kd_losses import (
    KINDS,
    LIGER_KINDS,
    Kind,
    distillation_loss,
    fused_linear_distillation_loss,
    liger_available,
)
from mta.layers import LayerPair
from mta.loss import MTALoss
from mta.unit_pool import UnitPool

__all__ = [
    "PROJECTORS_NAME",
    "FusedHeadLoss",
    "MTATrainer",
    "MTATrainingArguments",
    "StudentWithProjectors",
    "load_projectors",
    "same_tokenizer",
]

PROJECTORS_NAME = "mta_projectors.safetensors"
FusedHeadMode = Literal["auto", "on", "off"]
FUSED_HEAD_MODES: tuple[str, ...] = typing.get_args(FusedHeadMode)

logger = logging.get_logger(__name__)


@dataclass
class MTATrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the distillation settings.

    ``remove_unused_columns`` defaults to ``False`` (the batches carry unit spans the student's
    forward does not take) and ``ddp_find_unused_parameters`` to ``False`` (every student and
    projector parameter gets a gradient each step).
    """

    base_loss: Kind = field(
        default="fkl", metadata={"help": f"Base distillation loss, one of {KINDS}."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KD."})
    skew_alpha: float = field(default=0.1, metadata={"help": "α of skew_fkl / skew_rkl."})
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Truncate both logits to this many entries (teacher and student share a "
            "tokenizer but one pads its embeddings). Default: inferred from the tokenizer."
        },
    )
    projector_learning_rate: float = field(
        default=5e-4, metadata={"help": "Learning rate of the MTA projectors' parameter group."}
    )
    projector_weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay of the MTA projectors' parameter group."}
    )
    fused_lm_head: FusedHeadMode = field(
        default="auto",
        metadata={
            "help": "Compute the base loss from the last hidden states and the LM heads chunk by "
            "chunk (mta.kd_losses.fused_linear_distillation_loss), never materializing either "
            "model's [B, T, V] logits. 'on' (or true): always, with Liger-Kernel's fused linear "
            "JSD on CUDA for fkl/rkl/jsd when installed; 'auto': only when Liger-Kernel is "
            "installed, training runs on CUDA and base_loss is fkl, rkl or jsd; 'off' (false): "
            "never."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let mta-distill write into an output_dir that already holds files (without "
            "it, such a directory is refused unless resume_from_checkpoint is set)."
        },
    )
    student_generation: GenerationMode = field(
        default="off",
        metadata={
            "help": f"Train on responses the student samples, one of {GENERATION_MODES}: 'off' "
            "(the dataset's), 'on_policy' (GKD: each micro-batch with probability "
            "generation_lmbda) or 'adaptive' (DistiLLM's replay buffer and adaptive threshold; "
            "mta.generation)."
        },
    )
    generation_lmbda: float = field(
        default=0.5, metadata={"help": "on_policy: probability that a micro-batch is sampled."}
    )
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    generation_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top-p."})
    generation_top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    generation_max_new_tokens: int = field(
        default=256,
        metadata={"help": "Most tokens sampled per response (and at most the data's max_length)."},
    )
    adaptive_init_threshold: float = field(
        default=0.0, metadata={"help": "adaptive: the initial threshold θ."}
    )
    adaptive_loss_eps: float = field(
        default=0.1,
        metadata={"help": "adaptive: rise of eval_student_ce that raises θ by adaptive_step."},
    )
    adaptive_step: float = field(default=0.1, metadata={"help": "adaptive: increment of θ."})
    replay_buffer_size: int = field(
        default=1000, metadata={"help": "adaptive: sampled examples the replay buffer keeps."}
    )
    unit_workers: int = field(
        default=1,
        metadata={
            "help": "Processes parsing the units of sampled responses with spaCy (0: a thread "
            "of the training process)."
        },
    )
    remove_unused_columns: bool = False
    ddp_find_unused_parameters: bool | None = False

    def generation_settings(self) -> GenerationSettings:
        """The student-generation fields as :class:`mta.generation.GenerationSettings`."""
        return GenerationSettings(
            mode=self.student_generation,
            lmbda=self.generation_lmbda,
            temperature=self.generation_temperature,
            top_p=self.generation_top_p,
            top_k=self.generation_top_k,
            max_new_tokens=self.generation_max_new_tokens,
            init_threshold=self.adaptive_init_threshold,
            loss_eps=self.adaptive_loss_eps,
            threshold_step=self.adaptive_step,
            buffer_size=self.replay_buffer_size,
            unit_workers=self.unit_workers,
        )

    def __post_init__(self) -> None:
        if self.base_loss not in KINDS:
            raise ValueError(f"base_loss must be one of {KINDS}, got {self.base_loss!r}")
        if isinstance(self.fused_lm_head, bool):  # True/False from Python code
            self.fused_lm_head = "on" if self.fused_lm_head else "off"
        if self.fused_lm_head not in FUSED_HEAD_MODES:
            raise ValueError(
                f"fused_lm_head must be one of {FUSED_HEAD_MODES} (or a bool), got "
                f"{self.fused_lm_head!r}"
            )
        self.generation_settings()  # validates the student-generation fields
        if self.projector_learning_rate <= 0:
            raise ValueError(
                f"projector_learning_rate must be > 0, got {self.projector_learning_rate}"
            )
        super().__post_init__()


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
            out = self.student.base_model(**kwargs)
            head = self.student.get_output_embeddings()
            loss = fused_head_loss
            base_loss_sum = fused_linear_distillation_loss(
                out.last_hidden_state,
                _unsharded_weight(head),
                loss.teacher_hidden,
                loss.teacher_weight,
                loss.labels,
                reduction="sum",
                student_bias=head.bias,
                teacher_bias=loss.teacher_bias,
                **loss.settings,
            )
            if not self.training:
                ce_sum = _student_ce_sum(
                    out.last_hidden_state, _unsharded_weight(head), head.bias, loss.labels
                )
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


def _unsharded_weight(head: nn.Linear) -> Tensor:
    """The LM head's full [V, d] weight, read in the wrapper's forward without calling the head:
    FSDP has it unsharded there only when the head belongs to the root unit."""
    weight = head.weight
    if isinstance(weight, DTensor) or tuple(weight.shape) != (head.out_features, head.in_features):
        raise RuntimeError(
            f"the student's LM head weight is sharded here ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}): FSDP wrapped the head in a unit of its own. With "
            "fused_lm_head the head must stay in the root unit: wrap the transformer blocks only "
            "(fsdp_config transformer_layer_cls_to_wrap), or set fused_lm_head='off'"
        )
    return weight


def _num_layers(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return int(config.num_hidden_layers)


def _hidden_size(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return int(config.hidden_size)


def _vocab_rows(model: PreTrainedModel) -> int:
    """Rows of the LM head (the logits' last dimension)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


# Config attributes of architectures whose logits are transformed after the LM head, with the
# value that means "no transform" (Gemma 2/3 soft-capping, Cohere/Granite/Falcon-H1 scaling).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,
}


def fused_head_refusal(model: PreTrainedModel) -> str | None:
    """Why ``model``'s logits are not ``lm_head(base_model(...).last_hidden_state)`` (None if
    they are): a non-``Linear`` head, no separate base model, a config that transforms logits
    after the head, or logits that differ from the head's output on 8 tokens in eval mode (the
    same kernel on the same rows: compared at rtol 1e-5, tighter than a soft-cap's effect)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"its output embeddings are {type(head).__name__}, not an nn.Linear LM head"
    base = model.base_model
    if base is model:
        return "it has no separate base model whose last hidden state feeds the LM head"
    config = model.config.get_text_config()
    for name, identity in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, identity)
        if value is not None and value != identity:
            return f"its config transforms the logits after the LM head ({name}={value})"
    embeddings = model.get_input_embeddings()
    ids = torch.arange(min(8, head.weight.shape[0]), device=embeddings.weight.device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, return_dict=True).logits
            hidden = base(input_ids=ids, use_cache=False, return_dict=True).last_hidden_state
            fused = head(hidden.to(head.weight.device))
    finally:
        model.train(was_training)
    if logits.shape != fused.shape or not torch.allclose(
        logits.float(), fused.float().to(logits.device), rtol=1e-5, atol=1e-6
    ):
        return (
            "its logits are not its LM head applied to its last hidden state (a logit "
            "soft-cap or scale after the head?)"
        )
    return None


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (same object or same vocabulary)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


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


class _ComponentMeter:
    """Running sums of the logged loss components (detached fp32 scalars) over a window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            previous = self.sums.get(key)
            self.sums[key] = value if previous is None else previous + value
        self.count += 1

    def pop_means(self) -> tuple[list[str], Tensor | None]:
        """(sorted keys, their means as one tensor), and reset; ``([], None)`` when empty."""
        if not self.count:
            return [], None
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / self.count
        self.reset()
        return keys, means


class MTATrainer(Trainer):
    """Distill ``teacher_model`` into ``model`` with a base KD loss plus MTA.

    Args:
        model: the student (``PreTrainedModel`` with an LM head); trained.
        teacher_model: the teacher; frozen (``requires_grad_(False)``, ``eval()``) and moved to
            the training device unless it was dispatched with a ``device_map``.
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
        self._check_layer_plan(model, teacher_model, mta_loss)
        self.vocab_size = self._resolve_vocab(model, teacher_model, args, processing_class)
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        self.teacher = teacher_model
        super().__init__(
            model=StudentWithProjectors(model, mta_loss),
            args=args,
            processing_class=processing_class,
            **kwargs,
        )
        self.label_names = ["labels"]
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
        if getattr(teacher_model, "hf_device_map", None) is None:
            self.teacher.to(self.args.device)
        forward_params = inspect.signature(teacher_model.forward).parameters
        self._teacher_takes_logits_to_keep = "logits_to_keep" in forward_params
        self.fused_lm_head = self._use_fused_head()
        self._train_components = _ComponentMeter()
        self._eval_components = _ComponentMeter()
        self.sampler = self._build_sampler(unit_pool, teacher_processing_class)
        if self.sampler is not None:
            self.add_callback(_SamplerCheckpoints(self))
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

    @staticmethod
    def _check_layer_plan(
        student: PreTrainedModel, teacher: PreTrainedModel, mta_loss: MTALoss | None
    ) -> None:
        if mta_loss is None:
            return
        if not isinstance(mta_loss, MTALoss):
            raise TypeError(f"mta_loss must be an mta.loss.MTALoss, got {type(mta_loss).__name__}")
        for side, model, width in (
            ("student", student, mta_loss.student_hidden_size),
            ("teacher", teacher, mta_loss.teacher_hidden_size),
        ):
            if _hidden_size(model) != width:
                raise ValueError(
                    f"mta_loss was built for a {side} hidden size of {width} but the {side} has "
                    f"hidden_size={_hidden_size(model)}"
                )
            depth = _num_layers(model)
            for pair in mta_loss.layer_pairs:
                layer = getattr(pair, f"{side}_layer")
                if layer > depth:
                    raise ValueError(
                        f"layer pair {pair.name} uses {side} layer {layer}, out of range: the "
                        f"{side} has {depth} layers (hidden_states indices 1..{depth}); fix "
                        "mta.layer_pairs or build the plan with mta.layers.plan_layers("
                        f"{_num_layers(student)}, {_num_layers(teacher)})"
                    )

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
        rows_s, rows_t = _vocab_rows(student), _vocab_rows(teacher)
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
        if wrapper.mta_loss is not None:
            params = [p for p in wrapper.mta_loss.parameters() if p.requires_grad]
            if params:
                optimizer.add_param_group(
                    {
                        "params": params,
                        "lr": self.args.projector_learning_rate,
                        "weight_decay": self.args.projector_weight_decay,
                    }
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

    @torch.no_grad()
    def _teacher_forward(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor | None, dict]:
        """What the base loss needs from the teacher — its logits, or with the fused LM head its
        last hidden states; None for ``ce`` — and ``{layer: hidden}`` of the aligned layers."""
        layers = sorted({p.teacher_layer for p in self.wrapper.layer_pairs})
        need_base = self.args.base_loss != "ce"
        if not layers and not need_base:
            return None, {}
        if self.teacher.training:
            self.teacher.eval()
        model, kwargs = self.teacher, {}
        if self.fused_lm_head:
            model = self.teacher.base_model  # no logits at all
        elif not need_base and self._teacher_takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        # Autocast as the student's forward (bf16/fp16 mixed precision): a teacher kept in fp32
        # would otherwise run its matmuls in fp32.
        with self.accelerator.autocast():
            out = model(
                input_ids=inputs.get("teacher_input_ids", inputs["input_ids"]),
                attention_mask=inputs.get("teacher_attention_mask", inputs["attention_mask"]),
                output_hidden_states=bool(layers),
                use_cache=False,
                return_dict=True,
                **kwargs,
            )
        hidden = {layer: out.hidden_states[layer] for layer in layers}
        base = None
        if need_base:
            base = out.last_hidden_state if self.fused_lm_head else out.logits
        del out  # drop the other layers' hidden states now
        if self.fused_lm_head:  # a device_map teacher's base model ends on its last shard
            device = self.args.device
            hidden = {layer: h.to(device) for layer, h in hidden.items()}
            base = None if base is None else base.to(device)
        return base, hidden

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
        teacher_base, teacher_hidden = self._teacher_forward(inputs)
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
            head = self.teacher.get_output_embeddings() if teacher_base is not None else None
            fused = FusedHeadLoss(
                labels,
                teacher_base,
                None if head is None else head.weight,
                None if head is None else head.bias,
                kd,
            )
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
        meter = self._train_components if model.training else self._eval_components
        meter.add(components)
        if return_outputs:
            return loss, {"logits": outputs.logits}
        return loss

    # ---- logging -----------------------------------------------------------------------

    def _reduced_means(self, meter: _ComponentMeter) -> dict[str, float]:
        """The meter's means, averaged over processes, then reset."""
        keys, means = meter.pop_means()
        if not keys:
            return {}
        if self.args.world_size > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        return dict(zip(keys, means.tolist(), strict=True))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss components, averaged over the logging window (and processes), to the
        training logs."""
        if "loss" in logs:
            logs.update(self._reduced_means(self._train_components))
            if self.sampler is not None:
                counts = self.sampler.counts
                logs["sampled_batches"] = counts["sampled"]
                logs["replayed_batches"] = counts["replayed"]
                if self.sampler.settings.mode == "adaptive":
                    logs["adaptive_threshold"] = self.sampler.threshold.threshold
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Evaluation, with the loss components averaged over the evaluation batches (and
        processes) added to the metrics as ``<prefix>_base_loss``, ``<prefix>_dsa``, …"""
        self._eval_components.reset()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        for key, value in self._reduced_means(self._eval_components).items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

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
            if projector_state is None:
                projector_state = wrapper.mta_loss.state_dict()
            safetensors.torch.save_file(
                {k: v.detach().contiguous().cpu() for k, v in projector_state.items()},
                os.path.join(output_dir, PROJECTORS_NAME),
                metadata=projector_metadata(wrapper.mta_loss),
            )
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
            self.sampler.load_state_dict(_read_sampler_state(resume_from_checkpoint, self.args))
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        student = wrapper.student
        single = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        if os.path.isfile(single):
            state = safetensors.torch.load_file(single, device="cpu")
            result = student.load_state_dict(state, strict=False)
        elif os.path.isfile(os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_INDEX_NAME)):
            result = load_sharded_checkpoint(student, resume_from_checkpoint, strict=False)
        else:
            raise ValueError(
                f"no student weights ({SAFE_WEIGHTS_NAME}) in checkpoint {resume_from_checkpoint!r}"
            )
        # Keys of tied parameters (lm_head ↔ embeddings) are not saved; anything else must be.
        own = {name for name, _ in student.named_parameters()}
        missing = [k for k in result.missing_keys if k in own]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint {resume_from_checkpoint!r} does not match the student: missing "
                f"{missing}, unexpected {list(result.unexpected_keys)}"
            )
        if wrapper.mta_loss is not None:
            load_projectors(resume_from_checkpoint, wrapper.mta_loss)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_best_model()  # their own checkpoint files (see _load_from_checkpoint)
        else:
            self._load_from_checkpoint(self.state.best_model_checkpoint)


def sampler_state_name(process_index: int) -> str:
    """The file of one process's :class:`~mta.generation.StudentSampler` state in a checkpoint."""
    return f"mta_student_generation-rank{process_index}.json"


def _read_sampler_state(checkpoint: str, args: TrainingArguments) -> dict[str, Any]:
    path = os.path.join(checkpoint, sampler_state_name(args.process_index))
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {checkpoint!r} has no student-generation state for process "
            f"{args.process_index} ({os.path.basename(path)}): it was written without "
            "student_generation or by fewer processes; resume with the run's settings"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _SamplerCheckpoints(TrainerCallback):
    """Writes each process's sampler state into every checkpoint ``MTATrainer`` saves, and
    stops the unit workers when training ends."""

    def __init__(self, trainer: MTATrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        sampler = self.trainer.sampler
        if sampler is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # every process writes its own file; the first to get here creates the folder
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, sampler_state_name(args.process_index))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sampler.state_dict(), f)

    def on_train_end(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        sampler = self.trainer.sampler
        if sampler is not None and sampler.units is not None:
            sampler.units.close()
