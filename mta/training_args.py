"""``MTATrainingArguments``: ``transformers.TrainingArguments`` plus the distillation settings
(base loss, projectors, fused LM head, student generation), the ``training`` section of a run's
YAML config."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from mta.generation import GENERATION_MODES, GenerationMode, GenerationSettings
from mta.kd_losses import KINDS, Kind

__all__ = ["FUSED_HEAD_MODES", "MTATrainingArguments"]

FusedHeadMode = Literal["auto", "on", "off"]
FUSED_HEAD_MODES: tuple[str, ...] = typing.get_args(FusedHeadMode)


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
