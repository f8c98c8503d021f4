"""MTA in TRL's trainers (``pip install 'trl>=1.14.2'``, optional).

Two adapters, each the TRL trainer plus the MTA term of :class:`~mta.loss.MTALoss` (its layer
plan and projectors, trained, saved and reloaded)::

    L = L_TRL + λ_DSA·L_DSA + λ_HRA·L_HRA

* :class:`MTASFTTrainer` is ``trl.SFTTrainer`` on :class:`mta.data.DistillationDataset` batches
  (their unit keys read by the term), normalised as :class:`mta.trainer.MTATrainer` with
  ``base_loss="ce"``;
* :class:`MTADistillationTrainer` is ``trl.DistillationTrainer`` (on-policy: the student samples
  each completion, the teacher's distribution is matched by TRL's generalised JSD): the units of
  every prompt + completion of a generation batch are parsed in a worker process
  (:class:`mta.unit_pool.UnitPool`) from the moment it is sampled, and awaited by its first
  micro-batch after the forwards, as in ``MTATrainer``'s ``student_generation``.

One step of either on one batch gives the loss and gradients of ``MTATrainer``'s step on that
batch (``tests/test_integrations_trl.py``), with TRL's default losses: ``SFTTrainer``'s
negative log-likelihood (no label smoothing or ``compute_loss_func``) and, for
``DistillationTrainer``, ``temperature=1`` (``MTATrainer`` scales its divergence by τ², TRL does
not).

How they fit in TRL's trainers without changing them:

* the hidden states come from the trainer's own forwards: a hook on each backbone
  (:func:`capture_hidden_states`) asks for ``output_hidden_states`` and keeps the aligned
  layers (no second forward; ``DistillationTrainer``'s teacher forward gives the teacher's);
* ``SFTTrainer``'s teacher is prepared for evaluation (:func:`mta.teacher.prepare_teacher`) and
  runs once per micro-batch for the aligned layers only; ``DistillationTrainer`` prepares its own;
* the projectors are a module of their own, prepared by ``accelerate`` (DDP all-reduces their
  gradients once per optimizer step, on its last micro-batch as the student's; FSDP and
  DeepSpeed are refused), in one optimizer group of their own
  (``projector_learning_rate``), their gradients cleared after each optimizer step as
  ``Trainer`` clears the model's; unlike ``MTATrainer``, whose wrapper makes them part of the
  model, ``Trainer``'s gradient clipping sees the student's parameters only;
* checkpoints and ``save_model`` write ``mta_projectors.safetensors`` beside what TRL saves
  (:mod:`mta.checkpoints`), ``train(resume_from_checkpoint=...)`` reloads them, and with
  ``load_best_model_at_end`` the best checkpoint's projectors come back with its student;
* the components (``dsa``, ``hra``, ``mta``, …) are logged beside TRL's own metrics.

``SFTTrainer`` takes ``datasets.Dataset`` only, so it is given one of row references (dataset,
row), which the collator turns back into the rows; the adapter sets
``remove_unused_columns=False`` and ``dataset_kwargs={"skip_prepare_dataset": True}`` on the
config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from packaging.version import Version
from torch import Tensor, nn
from transformers import ProcessorMixin, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mta.checkpoints import load_projectors, save_projectors
from mta.data import (
    DistillationCollator,
    DistillationDataset,
    Example,
    chat_prompt_example,
    encode_generated,
)
from mta.generation import SampledBatch, SampledExample, submit_units
from mta.lm_head import decoder
from mta.loss import MTALoss
from mta.metrics import LoggedMetrics, MetricsLogging
from mta.spans import MEMBERSHIPS
from mta.student import add_projector_group, check_given_optimizer, check_layer_plan
from mta.teacher import prepare_teacher, prepare_unregistered, teacher_forward
from mta.unit_pool import UnitPool

#: The oldest TRL whose trainers the adapters are tested on (its DistillationTrainer is the
#: first to keep the chat template and the EOS ids its generation stops at).
MIN_TRL_VERSION = "1.14.2"

try:
    import trl
    from trl import DistillationTrainer, SFTTrainer
except ImportError as err:  # pragma: no cover - the module is only imported with trl
    raise ImportError(
        f"mta.integrations.trl needs trl: pip install 'trl>={MIN_TRL_VERSION}'"
    ) from err
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"mta.integrations.trl needs trl>={MIN_TRL_VERSION}, found {trl.__version__}: "
        f"pip install 'trl>={MIN_TRL_VERSION}'"
    )

__all__ = ["MTADistillationTrainer", "MTASFTTrainer", "capture_hidden_states"]

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


def _is_row_references(dataset: Any) -> bool:
    """Whether ``dataset`` is a ``datasets.Dataset`` that :func:`_row_references` built."""
    return getattr(dataset, "column_names", None) == [SOURCE_COLUMN, ROW_COLUMN]


class CapturedHiddenStates:
    """The hidden states a backbone's forward produced (:func:`capture_hidden_states`)."""

    def __init__(self, owner: str, layers: Sequence[int]) -> None:
        self.owner = owner
        self.wanted = tuple(layers)
        self.layers: dict[int, Tensor] | None = None
        self.with_grad = False

    def keep(self, hidden_states: Sequence[Tensor]) -> None:
        # the trainer may run the model again under no_grad for its metrics (SFTTrainer's label
        # smoothing, a compute_loss_func): the forward that builds the loss's graph is kept
        grad = torch.is_grad_enabled()
        if self.layers is None or (grad and not self.with_grad):
            self.layers = {layer: hidden_states[layer] for layer in self.wanted}
            self.with_grad = grad

    def get(self) -> dict[int, Tensor]:
        """``{layer: [B, T, d]}``; refused when no forward of the backbone ran."""
        if self.layers is None:
            raise RuntimeError(
                f"no forward of {self.owner}'s backbone ran where its hidden states were awaited"
            )
        return self.layers


@contextlib.contextmanager
def capture_hidden_states(
    model: nn.Module, layers: Sequence[int], owner: str = "the model"
) -> Iterator[CapturedHiddenStates]:
    """Ask ``model``'s backbone (:func:`mta.lm_head.decoder`) for its ``hidden_states`` in
    every forward run inside the block and keep ``layers`` of them, from the first forward with
    gradients enabled (else the first one). The backbone's output drops its ``hidden_states``
    again unless the caller asked for them (argument or config)."""
    backbone = decoder(model)
    if backbone is None:
        raise ValueError(
            f"{type(model).__name__} has no separate backbone whose hidden states MTA can read"
        )
    captured = CapturedHiddenStates(owner, layers)
    config = getattr(backbone, "config", None)
    wanted_by_caller = []

    def request(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        asked = kwargs.get("output_hidden_states")  # None: the config decides, as in HF models
        if asked is None:
            asked = getattr(config, "output_hidden_states", False)
        wanted_by_caller.append(bool(asked))
        return args, {**kwargs, "output_hidden_states": True}

    def keep(module: nn.Module, args: Any, output: Any) -> Any:
        captured.keep(output.hidden_states)
        if wanted_by_caller.pop():
            return output
        # the other layers go now, not with the caller's outputs (a teacher's are kept
        # while its logits are matched)
        return dataclasses.replace(output, hidden_states=None)

    handles = [
        backbone.register_forward_pre_hook(request, with_kwargs=True),
        backbone.register_forward_hook(keep),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _check_parallelism(trainer: Any) -> None:
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise ValueError(
            f"{type(trainer).__name__} trains the projectors beside the student, which is not "
            "done under FSDP or DeepSpeed here: use DDP, or mta.trainer.MTATrainer (whose "
            "model holds the projectors)"
        )


def _refuse_vision(is_vlm: bool) -> None:
    if is_vlm:
        raise ValueError(
            "MTADistillationTrainer aligns text units: a vision-language processor is not supported"
        )


def _check_mta_loss(mta_loss: Any, projector_learning_rate: float) -> None:
    if not isinstance(mta_loss, MTALoss):
        raise TypeError(f"mta_loss must be an mta.loss.MTALoss, got {type(mta_loss).__name__}")
    if projector_learning_rate <= 0:
        raise ValueError(f"projector_learning_rate must be > 0, got {projector_learning_rate}")


class _MTAProjectors(MetricsLogging):
    """What both adapters add to their TRL trainer (listed before it): the projectors
    (:class:`~mta.loss.MTALoss`) prepared, in their own optimizer group, saved with the model
    and reloaded on resume, and the term's components logged."""

    projectors: nn.Module
    projector_learning_rate: float
    projector_weight_decay: float

    def _prepare_projectors(
        self, mta_loss: MTALoss, learning_rate: float, weight_decay: float
    ) -> None:
        _check_parallelism(self)
        check_given_optimizer(self.optimizer, mta_loss)
        self.projectors = prepare_unregistered(self.accelerator, mta_loss)
        self.projector_learning_rate = learning_rate
        self.projector_weight_decay = weight_decay
        self.metrics = LoggedMetrics()
        self.add_callback(_ProjectorSteps(self))

    @property
    def mta_loss(self) -> MTALoss:
        """The (unwrapped) MTA loss module."""
        return self.accelerator.unwrap_model(self.projectors)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """TRL's optimizer over the student, plus the projectors' group."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        add_projector_group(
            optimizer, self.mta_loss, self.projector_learning_rate, self.projector_weight_decay
        )
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """The TRL trainer's ``training_step``; under DDP the projectors' gradients are
        all-reduced on the last micro-batch of a step only, as ``Trainer`` does the student's
        (it holds the student's all-reduce back with ``accelerator.no_sync(model)``)."""
        waits = contextlib.nullcontext()
        if not self.accelerator.sync_gradients:
            waits = self.accelerator.no_sync(self.projectors)
        with waits:
            return super().training_step(model, inputs, num_items_in_batch)

    def _add_term(
        self,
        loss: Tensor,
        hidden: Mapping[int, Tensor],
        teacher_hidden: Mapping[int, Tensor],
        batch: Mapping[str, Any],
        training: bool,
        per_step: bool,
    ) -> Tensor:
        """``loss`` plus the MTA term of the micro-batch: its mean, divided by the accumulation
        steps when ``per_step`` (the base loss is normalised by the step's token count, so that
        both sum to one step), as :meth:`mta.trainer.MTATrainer.compute_loss`."""
        mta = self.projectors(hidden, teacher_hidden, batch)
        self.metrics.add_means("train" if training else "eval", mta.components)
        if per_step:
            return loss + mta.loss / getattr(self, "current_gradient_accumulation_steps", 1)
        return loss + mta.loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's export (or checkpoint), with the projectors beside it."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_projectors(output_dir, self.mta_loss)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; resuming also reloads the checkpoint's projectors."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir!r}")
        if resume_from_checkpoint:
            load_projectors(resume_from_checkpoint, self.mta_loss)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class MTASFTTrainer(_MTAProjectors, SFTTrainer):
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
        _check_mta_loss(mta_loss, projector_learning_rate)
        if not isinstance(data_collator, DistillationCollator):
            raise TypeError(
                "MTASFTTrainer reads its unit keys from mta.data.DistillationCollator batches, "
                f"got data_collator={data_collator!r}"
            )
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
        self._prepare_projectors(mta_loss, projector_learning_rate, projector_weight_decay)
        self.teacher = prepare_teacher(teacher_model, self.accelerator)
        self._sources = sources

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``SFTTrainer.evaluate``; ``eval_dataset`` is a :class:`~mta.data.DistillationDataset`
        (or a dict of them), as at construction."""
        # Trainer.evaluate calls itself once per entry of a dict of eval sets, with the entry's
        # name (of self.eval_dataset) or its row references (converted on the way in)
        if eval_dataset is not None and not (
            isinstance(eval_dataset, str) or _is_row_references(eval_dataset)
        ):
            eval_dataset = _row_references(eval_dataset, "eval_dataset", self._sources)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def predict(self, test_dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict`` on a :class:`~mta.data.DistillationDataset`."""
        test_dataset = _row_references(test_dataset, "test_dataset", self._sources)
        return super().predict(test_dataset, *args, **kwargs)

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
        pairs = self.mta_loss.layer_pairs
        student = self.accelerator.unwrap_model(model)
        with capture_hidden_states(student, [p.student_layer for p in pairs], "the student") as s:
            result = super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        _, teacher_hidden = teacher_forward(
            self.teacher,
            inputs,
            [p.teacher_layer for p in pairs],
            base=None,
            device=self.args.device,
            autocast=self.accelerator.autocast,
        )
        # Trainer divides the loss by the accumulation steps itself without num_items_in_batch
        per_step = num_items_in_batch is not None and model.training
        loss = self._add_term(loss, s.get(), teacher_hidden, inputs, model.training, per_step)
        return (loss, outputs) if return_outputs else loss


#: Where MTADistillationTrainer's generated batches keep each row's units (per-sample, so that
#: TRL's shuffling and splitting of the generation batch carry them).
UNITS_KEY = "mta_units"


class MTADistillationTrainer(_MTAProjectors, DistillationTrainer):
    """``trl.DistillationTrainer`` with the MTA term (module docstring).

    Each generated batch (``DistillationTrainer._generate_and_score_completions``) gets, per
    row, the text of its prompt and completion with its tokens' character ranges
    (:func:`mta.data.encode_generated` on the exact tokens TRL built, prompts left-padded), and
    the units of that text start parsing in ``unit_pool``; ``compute_loss`` runs TRL's loss with
    the hidden states of both backbones kept, then adds the term on the micro-batch's units.
    Units come from the prompt's content (a plain prompt whole, a conversation's message
    contents in the chat template's text) and the completion; under the authors' code's rules
    (``MTALoss(variant="authors_code")``) from the whole text, template included.

    Args:
        model, teacher_model: the student and the teacher, loaded (the layer plan is checked
            against them); they share a vocabulary, as ``DistillationTrainer`` requires.
        mta_loss: the :class:`~mta.loss.MTALoss` whose projectors are trained.
        args: a ``trl.DistillationConfig``.
        unit_pool: the :class:`~mta.unit_pool.UnitPool` parsing the generated texts, its rules
            the loss's variant (default: one worker process); closed when training ends.
        membership: which tokens belong to a unit (:func:`mta.spans.to_token_spans`).
        projector_learning_rate, projector_weight_decay: the projectors' optimizer group.
        **kwargs: the other ``DistillationTrainer`` arguments (``train_dataset`` with its
            ``"prompt"`` column, ``processing_class``, ``peft_config``, …); not ``tools``.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher_model: nn.Module,
        *,
        mta_loss: MTALoss,
        args: Any = None,
        unit_pool: UnitPool | None = None,
        membership: str = "overlap",
        projector_learning_rate: float = 5e-4,
        projector_weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        _check_mta_loss(mta_loss, projector_learning_rate)
        for name, value in (("model", model), ("teacher_model", teacher_model)):
            if not isinstance(value, nn.Module):
                raise TypeError(
                    f"MTADistillationTrainer needs {name} loaded (the layer plan is checked "
                    f"against it), got {type(value).__name__}"
                )
        if kwargs.get("tools"):
            raise ValueError(
                "MTADistillationTrainer does not take tools: tool responses inserted into a "
                "completion are not the student's text, whose units MTA aligns"
            )
        check_layer_plan(model, teacher_model, mta_loss)
        if unit_pool is not None and unit_pool.rules != mta_loss.variant:
            raise ValueError(
                f"the unit pool extracts units with rules={unit_pool.rules!r} but the MTA loss "
                f"is the {mta_loss.variant!r} variant"
            )
        if membership not in MEMBERSHIPS:
            raise ValueError(f"membership must be one of {MEMBERSHIPS}, got {membership!r}")
        _refuse_vision(isinstance(kwargs.get("processing_class"), ProcessorMixin))
        super().__init__(model=model, teacher_model=teacher_model, args=args, **kwargs)
        _refuse_vision(self._is_vlm)  # the processor TRL loaded when none was given
        self._prepare_projectors(mta_loss, projector_learning_rate, projector_weight_decay)
        self.unit_pool = (
            UnitPool(processes=1, rules=mta_loss.variant) if unit_pool is None else unit_pool
        )
        self.membership = membership

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the unit pool's workers stop when it ends."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.unit_pool.close()

    # ---- the units of the generated rows ---------------------------------------------------

    def _prompt_example(self, prompt: str | Sequence[Mapping[str, Any]]) -> Example:
        """The prompt as :class:`~mta.data.Example` text: a plain prompt as it is (all content),
        a conversation rendered by the chat template as TRL renders it, its messages' contents
        the content regions (:func:`mta.data.chat_prompt_example`)."""
        if isinstance(prompt, str):
            return Example(prompt, len(prompt), ((0, len(prompt)),))

        def render(messages: list[dict[str, Any]]) -> str:
            return self.processing_class.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
                **self.chat_template_kwargs,
            )

        return chat_prompt_example(render, prompt)

    def _row_units(
        self, prompts: Sequence[Any], batch: Mapping[str, Tensor]
    ) -> list[SampledExample]:
        """Per row of a generated batch, its :class:`~mta.generation.SampledExample` (units
        parsing) placed in the batch's columns: left-padded prompt, then completion."""
        prompt_ids, prompt_mask = batch["prompt_ids"].cpu(), batch["prompt_mask"].cpu().bool()
        completion_ids = batch["completion_ids"].cpu()
        completion_mask = batch["completion_mask"].cpu().bool()
        width = prompt_ids.shape[1]
        generated = []
        for b, prompt in enumerate(prompts):
            tokens = prompt_ids[b][prompt_mask[b]].tolist()
            completion = completion_ids[b][completion_mask[b]].tolist()
            example = self._prompt_example(prompt)
            try:
                row = encode_generated(
                    self._tokenizer,
                    example,
                    completion,
                    len(tokens) + max(1, len(completion)),
                    prompt_ids=tokens,
                    eos_token_ids=self.eos_token_ids,
                )
            except ValueError as err:
                raise ValueError(
                    f"row {b} of the generated batch: {err}. The units are placed on TRL's "
                    "prompt tokens through their text (the prompt, or the chat template's "
                    "rendering of it), which processing_class must tokenize back to them"
                ) from err
            generated.append(row)
        pending = submit_units(self.unit_pool, generated, self.mta_loss.variant)
        return [
            SampledExample(g, None, pending, i, pad_left=width - g.n_prompt)
            for i, g in enumerate(generated)
        ]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generated batch, with each row's units (:data:`UNITS_KEY`)."""
        batch = super()._generate_and_score_completions(inputs)
        batch[UNITS_KEY] = self._row_units([x["prompt"] for x in inputs], batch)
        return batch

    # ---- the loss --------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """DistillationTrainer's loss of the micro-batch plus the MTA term, normalised as
        :meth:`mta.trainer.MTATrainer.compute_loss` (the base loss is already per step)."""
        pairs = self.mta_loss.layer_pairs
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with (
            capture_hidden_states(student, [p.student_layer for p in pairs], "the student") as s,
            capture_hidden_states(teacher, [p.teacher_layer for p in pairs], "the teacher") as t,
        ):
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
        # the units are awaited only now, the forwards launched
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        rows = SampledBatch(inputs[UNITS_KEY], self.membership, {"attention_mask": attention.cpu()})
        units = rows.unit_keys(attention.device)
        # a device_map teacher's layers sit on their shards (no-ops otherwise)
        teacher_hidden = {layer: h.to(attention.device) for layer, h in t.get().items()}
        loss = self._add_term(loss, s.get(), teacher_hidden, units, model.training, model.training)
        return (loss, None) if return_outputs else loss


class _ProjectorSteps(TrainerCallback):
    """What ``Trainer`` does for its model, done for the projectors: their gradients cleared
    after each optimizer step (``Trainer`` clears the model's only), and with
    ``load_best_model_at_end`` the best checkpoint's projectors reloaded with its student."""

    def __init__(self, trainer: _MTAProjectors) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.mta_loss.zero_grad(set_to_none=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.mta_loss.zero_grad(set_to_none=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.load_best_model_at_end and state.best_model_checkpoint:
            load_projectors(state.best_model_checkpoint, self.trainer.mta_loss)
