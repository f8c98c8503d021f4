"""Training on responses the student samples itself: GKD's on-policy mode and DistiLLM's adaptive
off-policy mode, with the units of each sampled response parsed in the background.

Modes (:class:`GenerationSettings`, ``training.student_generation``):

* ``off`` — the dataset's responses only.
* ``on_policy`` (GKD, Agarwal et al. 2024): each micro-batch, with probability ``lmbda``, the
  batch's responses are replaced by ones the student samples from its prompts; the base loss and
  MTA are computed on them.
* ``adaptive`` (DistiLLM, Ko et al. 2024, as its public code runs it): a replay buffer of sampled
  examples (``buffer_size``) and a threshold ``θ`` (``init_threshold``) that grows by
  ``threshold_step`` (capped at 1) whenever the validation loss rises by ``loss_eps`` or more
  above the loss at the last raise (the first evaluation only sets that reference). Each
  micro-batch draws ``r ~ U(0, 1)``: with ``r < θ·(1 − step/total_steps)``, or ``r < θ`` while the
  buffer is not yet full, the student samples responses for the batch (trained on at once and
  pushed to the buffer); else with ``r < θ`` the batch is drawn from the buffer (``B`` examples
  without replacement); else it is the dataset's batch.

Sampling uses the student's ``generate`` in eval mode under ``no_grad``, prompted exactly as the
dataset's tokens are (:func:`mta.data.encode_generated`), with ``temperature``, ``top_p``,
``top_k`` and ``max_new_tokens``. The random draws of a process (``r``, the buffer draws and the
seed of each ``generate`` call, which runs under a forked torch RNG) come from its own generator
seeded by ``(seed, rank)``; with the buffer and the threshold it is the sampler's state, which
checkpoints hold (:meth:`StudentSampler.state_dict`) so that a resumed run continues exactly.

A sampled batch is collated at once (tokens, labels, the teacher's tokens with two tokenizers)
and its units are submitted to a :class:`mta.unit_pool.UnitPool`; the unit keys and the
:class:`~mta.unit_plan.UnitPlan` are added by :meth:`SampledBatch.unit_keys`, which the trainer
calls only after the teacher's forward is launched.
"""

from __future__ import annotations

import contextlib
import typing
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mta.data import (
    EXAMPLE_KEY,
    EXAMPLES_KEY,
    DistillationCollator,
    Example,
    GeneratedExample,
    encode_example,
    encode_generated,
)
from mta.spans import TextUnits, example_unit_spans
from mta.unit_plan import PLAN_KEY
from mta.unit_pool import PendingUnits, UnitPool

__all__ = [
    "GENERATION_MODES",
    "SAMPLED_KEY",
    "AdaptiveThreshold",
    "GenerationSettings",
    "ReplayBuffer",
    "SampledBatch",
    "SampledExample",
    "StudentSampler",
    "submit_units",
]

GenerationMode = Literal["off", "on_policy", "adaptive"]
GENERATION_MODES: tuple[str, ...] = typing.get_args(GenerationMode)

#: Where a sampled batch keeps its :class:`SampledBatch` (units still to add).
SAMPLED_KEY = "sampled_units"


@dataclass(frozen=True)
class GenerationSettings:
    """How and how often the student samples the responses it trains on (module docstring)."""

    mode: GenerationMode = "off"
    lmbda: float = 0.5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    init_threshold: float = 0.0
    loss_eps: float = 0.1
    threshold_step: float = 0.1
    buffer_size: int = 1000
    unit_workers: int = 1

    def __post_init__(self) -> None:
        if self.mode not in GENERATION_MODES:
            raise ValueError(
                f"student_generation must be one of {GENERATION_MODES}, got {self.mode!r}"
            )
        for name in ("lmbda", "top_p", "init_threshold", "threshold_step"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"generation {name} must be in [0, 1], got {value}")
        if self.top_p == 0.0:
            raise ValueError("generation top_p must be in (0, 1], got 0")
        if not self.temperature > 0:
            raise ValueError(f"generation temperature must be > 0, got {self.temperature}")
        if self.loss_eps < 0:
            raise ValueError(f"adaptive loss_eps must be >= 0, got {self.loss_eps}")
        for name, low in (("top_k", 0), ("max_new_tokens", 1), ("buffer_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"generation {name} must be an int >= {low}, got {value!r}")
        if self.unit_workers < 0:
            raise ValueError(f"unit_workers must be >= 0, got {self.unit_workers}")


class AdaptiveThreshold:
    """DistiLLM's adaptive probability of student-generated batches.

    ``observe(loss)`` at each validation: the first call sets the reference; later, a loss at
    least ``loss_eps`` above the reference raises ``threshold`` by ``step`` (at most 1) and makes
    it the new reference. ``probability(step, total)`` is the chance of sampling anew,
    ``threshold·(1 − step/total)``.
    """

    def __init__(self, init_threshold: float, loss_eps: float, step: float) -> None:
        self.threshold = float(init_threshold)
        self.loss_eps = float(loss_eps)
        self.step = float(step)
        self.reference: float | None = None

    def observe(self, loss: float) -> None:
        loss = float(loss)
        if self.reference is None:
            self.reference = loss
        elif loss >= self.reference + self.loss_eps:
            self.threshold = min(1.0, self.threshold + self.step)
            self.reference = loss

    def probability(self, step: int, total_steps: int) -> float:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        return self.threshold * max(0.0, 1.0 - step / total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "reference": self.reference}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.reference = None if state["reference"] is None else float(state["reference"])


@dataclass
class SampledExample:
    """One sampled response as trained on: the student's tokens and labels, the teacher's
    tokens and offsets with two tokenizers, and its units (parsing, or parsed).

    ``pad_left``: columns of padding in front of the example's tokens in its batch (TRL's
    left-padded prompts; the teacher's tokens are then the student's).
    """

    generated: GeneratedExample
    teacher: tuple[list[int], np.ndarray, bool] | None
    units: PendingUnits | TextUnits | None
    unit_index: int = 0
    pad_left: int = 0

    def __post_init__(self) -> None:
        if self.pad_left < 0:
            raise ValueError(f"pad_left must be >= 0, got {self.pad_left}")
        if self.pad_left and self.teacher is not None:
            raise ValueError(
                "a left-padded sampled example (pad_left > 0) has no teacher tokens of its own: "
                "its teacher reads the student's tokens"
            )

    def text_units(self) -> TextUnits | None:
        if isinstance(self.units, PendingUnits):
            self.units, self.unit_index = self.units.result()[self.unit_index], 0
        return self.units

    def item(self) -> dict[str, Any]:
        """The dataset-item form (:class:`mta.data.DistillationDataset`), without units; its
        example is the prompt with the sampled response."""
        item: dict[str, Any] = {
            "input_ids": self.generated.input_ids,
            "labels": self.generated.labels,
            EXAMPLE_KEY: self.generated.example,
        }
        if self.teacher is not None:
            item["teacher_input_ids"] = self.teacher[0]
        return item

    def unit_item(self, membership: str) -> dict[str, np.ndarray]:
        units = self.text_units()
        assert units is not None
        teacher_offsets, teacher_truncated = (
            (None, False) if self.teacher is None else (self.teacher[1], self.teacher[2])
        )
        # the text is the decoded tokens, so the student side has nothing cut off
        spans = example_unit_spans(
            units,
            self.generated.offsets,
            teacher_offsets,
            teacher_truncated=teacher_truncated,
            membership=membership,
        )
        if self.pad_left:
            spans = {k: v + self.pad_left for k, v in spans.items()}
        return spans

    def state(self) -> dict[str, Any]:
        """JSON-ready state (waits for the units)."""
        g, units = self.generated, self.text_units()
        return {
            "text": g.example.text,
            "response_start": g.example.response_start,
            "regions": [list(r) for r in g.example.regions],
            "input_ids": g.input_ids,
            "offsets": g.offsets.tolist(),
            "n_prompt": g.n_prompt,
            "ends_with_eos": g.ends_with_eos,
            "truncated": g.truncated,
            "teacher": None
            if self.teacher is None
            else [self.teacher[0], self.teacher[1].tolist(), self.teacher[2]],
            "units": None if units is None else [units.words.tolist(), units.phrases.tolist()],
            "pad_left": self.pad_left,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SampledExample:
        example = Example(
            state["text"], state["response_start"], tuple(tuple(r) for r in state["regions"])
        )
        generated = GeneratedExample(
            example,
            list(state["input_ids"]),
            np.asarray(state["offsets"], np.int64).reshape(-1, 2),
            state["n_prompt"],
            state["ends_with_eos"],
            state["truncated"],
        )
        teacher = state["teacher"]
        if teacher is not None:
            teacher = (
                list(teacher[0]),
                np.asarray(teacher[1], np.int64).reshape(-1, 2),
                teacher[2],
            )
        units = state["units"]
        if units is not None:
            units = TextUnits(
                np.asarray(units[0], np.int64).reshape(-1, 2),
                np.asarray(units[1], np.int64).reshape(-1, 2),
            )
        # states written before rows were left-padded have no pad_left
        return cls(generated, teacher, units, pad_left=state.get("pad_left", 0))


class ReplayBuffer:
    """The last ``capacity`` sampled examples; :meth:`sample` draws without replacement."""

    def __init__(self, capacity: int) -> None:
        self.items: deque[SampledExample] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return int(self.items.maxlen or 0)

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) == self.capacity

    def push(self, examples: Sequence[SampledExample]) -> None:
        self.items.extend(examples)

    def sample(self, k: int, rng: np.random.Generator) -> list[SampledExample]:
        if k > len(self.items):
            raise ValueError(f"cannot draw {k} examples from a buffer of {len(self.items)}")
        return [self.items[i] for i in rng.choice(len(self.items), size=k, replace=False)]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": [e.state() for e in self.items]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"the checkpoint's replay buffer holds up to {state['capacity']} examples but "
                f"this run's buffer_size is {self.capacity}"
            )
        self.items = deque(
            (SampledExample.from_state(s) for s in state["items"]), maxlen=self.capacity
        )


@dataclass
class SampledBatch:
    """The units of a batch of sampled examples, added to the batch on demand."""

    examples: list[SampledExample]
    membership: str
    masks: dict[str, Tensor]

    def unit_keys(self, device: torch.device) -> dict[str, Any]:
        """The unit keys and the plan of the batch collated from :attr:`examples` (whose
        attention masks, on the CPU, are :attr:`masks`), waiting for the units if they are still
        being parsed."""
        features = [e.unit_item(self.membership) for e in self.examples]
        keys: dict[str, Any] = dict(self.masks)
        DistillationCollator.add_units(keys, features)
        return {
            k: v.to(device) if isinstance(v, Tensor) or k == PLAN_KEY else v
            for k, v in keys.items()
        }


def submit_units(
    units: UnitPool, generated: Sequence[GeneratedExample], rules: str
) -> PendingUnits:
    """Start parsing the units of sampled examples (within their content regions under the
    paper's rules, in the whole text under the authors' code's)."""
    texts = [g.example.text for g in generated]
    regions = [g.example.regions for g in generated] if rules == "paper" else None
    return units.submit(texts, regions)


class StudentSampler:
    """Decides, per micro-batch, what the student trains on, and samples it (module docstring).

    Args:
        settings: the mode and its parameters.
        tokenizer: the student's tokenizer; ``teacher_tokenizer`` the teacher's when it differs.
        collator: the run's :class:`mta.data.DistillationCollator`.
        max_length: the dataset's token limit (prompt + response).
        units: the pool parsing the sampled responses' units, or None to train without MTA.
        rules, membership: the unit rules and token membership of the run's variant.
        seed: this process's seed (the run's seed and its rank).
    """

    def __init__(
        self,
        settings: GenerationSettings,
        *,
        tokenizer: Any,
        collator: DistillationCollator,
        max_length: int,
        units: UnitPool | None,
        teacher_tokenizer: Any = None,
        rules: str = "paper",
        membership: str = "overlap",
        seed: Sequence[int] = (0,),
    ) -> None:
        if settings.mode == "off":
            raise ValueError("a StudentSampler needs student_generation 'on_policy' or 'adaptive'")
        if tokenizer.eos_token_id is None:
            raise ValueError("student generation needs a tokenizer with an EOS token")
        self.settings = settings
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.collator = collator
        self.max_length = max_length
        self.units = units
        self.rules = rules
        self.membership = membership
        self.rng = np.random.default_rng(list(seed))
        self.threshold = AdaptiveThreshold(
            settings.init_threshold, settings.loss_eps, settings.threshold_step
        )
        self.buffer = ReplayBuffer(settings.buffer_size)
        self.counts = {"dataset": 0, "sampled": 0, "replayed": 0}

    # ---- the decision --------------------------------------------------------------------

    def choose(self, batch_size: int, step: int, total_steps: int) -> str:
        """``"dataset"``, ``"sampled"`` or ``"replayed"`` for the next micro-batch (draws ``r``)."""
        r = float(self.rng.random())
        if self.settings.mode == "on_policy":
            return "sampled" if r < self.settings.lmbda else "dataset"
        theta = self.threshold.threshold
        if r < self.threshold.probability(step, total_steps) or (
            r < theta and not self.buffer.full()
        ):
            return "sampled"
        if r < theta and len(self.buffer) >= batch_size:
            return "replayed"
        return "dataset"

    def batch_for_step(
        self,
        student: nn.Module,
        batch: dict[str, Any],
        step: int,
        total_steps: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> dict[str, Any]:
        """The micro-batch to train on in place of the dataset's ``batch``."""
        if EXAMPLES_KEY not in batch:
            raise ValueError(
                "student generation needs the batch's examples (the 'examples' key that "
                "mta.data.DistillationCollator(..., with_examples=True) adds)"
            )
        examples = batch[EXAMPLES_KEY]
        choice = self.choose(len(examples), step, total_steps)
        self.counts[choice] += 1
        if choice == "dataset":
            return batch
        if choice == "replayed":
            sampled = self.buffer.sample(len(examples), self.rng)
        else:
            sampled = self.sample(student, examples, autocast)
            if self.settings.mode == "adaptive":
                self.buffer.push(sampled)
        return self.collate(sampled)

    # ---- sampling ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        student: nn.Module,
        examples: Sequence[Example],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> list[list[int]]:
        """The tokens the student samples after each example's prompt (EOS and padding
        included, at most ``max_new_tokens``)."""
        from transformers import GenerationConfig

        prompts = [self.tokenizer(e.prompt)["input_ids"] for e in examples]
        width = max(len(p) for p in prompts)
        pad = self.collator.pad_token_id
        device = next(student.parameters()).device
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[b, width - len(p) :] = torch.as_tensor(p)
            mask[b, width - len(p) :] = 1
        s = self.settings
        config = GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_new_tokens=min(s.max_new_tokens, self.max_length - min(map(len, prompts))),
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        seed = int(self.rng.integers(2**62))
        was_training = student.training
        student.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), autocast():
                torch.manual_seed(seed)
                out = student.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                )
        finally:
            student.train(was_training)
        return out[:, width:].tolist()

    def sample(
        self,
        student: nn.Module,
        examples: Sequence[Example],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> list[SampledExample]:
        """Sample a response for each example and encode it; its units start parsing."""
        responses = self.generate(student, examples, autocast)
        generated = [
            encode_generated(self.tokenizer, e, r, self.max_length)
            for e, r in zip(examples, responses, strict=True)
        ]
        pending = None if self.units is None else submit_units(self.units, generated, self.rules)
        out = []
        for i, g in enumerate(generated):
            teacher = None
            if self.teacher_tokenizer is not None:
                t_ids, t_offsets, _, t_truncated, _ = encode_example(
                    self.teacher_tokenizer, g.example, self.max_length, g.ends_with_eos
                )
                teacher = (t_ids, t_offsets, t_truncated)
            out.append(SampledExample(g, teacher, pending, i))
        return out

    def collate(self, sampled: Sequence[SampledExample]) -> dict[str, Any]:
        """A batch of sampled examples; its units follow (:data:`SAMPLED_KEY`)."""
        batch = self.collator([e.item() for e in sampled])
        if self.units is not None:
            masks = {k: v for k, v in batch.items() if k.endswith("attention_mask")}
            batch[SAMPLED_KEY] = SampledBatch(list(sampled), self.membership, masks)
        return batch

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the generator, the threshold, the buffer (waits for pending units)."""
        return {
            "mode": self.settings.mode,
            "rng": self.rng.bit_generator.state,
            "threshold": self.threshold.state_dict(),
            "buffer": self.buffer.state_dict(),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["mode"] != self.settings.mode:
            raise ValueError(
                f"the checkpoint was written with student_generation={state['mode']!r}, this "
                f"run has {self.settings.mode!r}"
            )
        self.rng.bit_generator.state = state["rng"]
        self.threshold.load_state_dict(state["threshold"])
        self.buffer.load_state_dict(state["buffer"])
        self.counts = dict(state["counts"])
