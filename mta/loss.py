"""The MTA loss module: DSA and HRA over the aligned layer pairs (docs/design.md §2, Eq. 5–14).

For each :class:`~mta.layers.LayerPair` ``(l, l', g)`` with student states ``H^S = hs_S[l]`` and
teacher states ``H^T = hs_T[l']`` (detached):

* ``w = token_importance(H^T, teacher mask)`` — computed once per distinct teacher layer.
* Shared tokenizer (the paper): ``U^T = span_pool(H^T, spans_g, w)``, ``U^S = span_pool(H^S,
  spans_g, w)`` (both with the teacher's ``w``), ``p = span_weights(w, spans_g)``;
  ``DSA_l = structural_loss(U^S, U^T, p)``; ``HRA_l = Σ_t w_t c_t (1 − cos(W_l H^S_t, H^T_t))``
  with ``c_t = 1`` on valid tokens covered by a valid span of granularity ``g``.
* Different tokenizers (the batch carries ``teacher_attention_mask``): ``U^T`` is pooled with the
  teacher's ``w`` over the teacher's tokens, ``U^S`` with a plain mean over the student's tokens
  of the same unit, ``p`` comes from the teacher, and HRA compares ``W_l U^S_k`` with ``U^T_k``
  weighted by ``p_k`` over valid units.

``L_DSA`` is the mean over layer pairs, ``L_HRA`` the sum, each a mean over examples, and
``loss = λ_DSA · L_DSA + λ_HRA · L_HRA``.

Precision: the whole forward runs with autocast disabled, so every MTA quantity is float32 even
inside a bf16 mixed-precision step. Projectors ``W_l`` (``Linear(d_S, d_T, bias=False)``,
orthogonal init) are float32 parameters and the student states are cast up to them: the
projection (``B·T·d_S·d_T``) is small next to the models and the loss sees no bf16 rounding.
``.to(dtype)`` on the module runs the projectors in another dtype; ``projection_dtype`` bf16 keeps
them float32 parameters and projects with bf16 operands (the step's largest GEMMs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import mta_kernels as mk
from mta.layers import GRANULARITIES, LayerPair, LayerPairLike, parse_layer_pairs
from mta.unit_plan import PLAN_KEY, GranularityUnits, UnitPlan

__all__ = ["PROJECTION_DTYPES", "VARIANTS", "MTALoss", "MTALossOutput"]

#: ``"paper"``: the equations as published; ``"authors_code"``: what the authors' released code
#: computes (docs/design.md §8).
VARIANTS = ("paper", "authors_code")


#: The operand dtypes of the HRA projection (``MTALoss(projection_dtype=...)``).
PROJECTION_DTYPES = (torch.float32, torch.bfloat16)

HiddenStates = Sequence[Tensor] | Mapping[int, Tensor]


@dataclass
class MTALossOutput:
    """``loss``: float32 scalar with grad; ``components``: detached float32 scalars for logging —
    ``dsa/<s>-<t>``, ``hra/<s>-<t>`` per layer pair, ``dsa`` (mean over pairs), ``hra`` (sum over
    pairs; the mean with ``variant="authors_code"``) for the enabled terms, and ``mta`` (the
    weighted total, ``loss`` detached)."""

    loss: Tensor
    components: dict[str, Tensor]


def _hidden(states: HiddenStates, layer: int, name: str, shape: tuple[int, int, int]) -> Tensor:
    """``states[layer]``, checked to be a float tensor of ``shape`` ([B, T, d])."""
    try:
        hidden = states[layer]
    except (IndexError, KeyError):
        hidden = None
    if hidden is None:
        raise ValueError(
            f"{name} has no entry for layer {layer}: pass the model's hidden_states "
            "(output_hidden_states=True; index 0 is the embedding output) or a mapping "
            "{layer index: tensor} holding every aligned layer"
        )
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError(f"{name}[{layer}] must be a floating torch.Tensor, got {hidden!r:.80}")
    if tuple(hidden.shape) != shape:
        raise ValueError(
            f"{name}[{layer}] must have shape [B, T, d] = {shape}, got {tuple(hidden.shape)}"
        )
    return hidden


class _LossWeight:
    """A λ of :class:`MTALoss`: a finite float ``>= 0``; setting it rebuilds the combination."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, module: MTALoss | None, owner: type | None = None) -> float:
        return self if module is None else getattr(module, self.slot)  # type: ignore[return-value]

    def __set__(self, module: MTALoss, weight: float) -> None:
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(f"{self.name} must be a finite number >= 0, got {weight!r}")
        object.__setattr__(module, self.slot, float(weight))
        module._update_combine()


class MTALoss(nn.Module):
    """Multi-Granular Trajectory Alignment loss (DSA + HRA) for a set of layer pairs.

    Args:
        student_hidden_size: ``d_S``.
        teacher_hidden_size: ``d_T``.
        layer_pairs: from :func:`mta.layers.plan_layers` (or entries accepted by
            :func:`mta.layers.parse_layer_pairs`); each student layer at most once.
        lambda_dsa, lambda_hra: weights of the two terms (paper: 2.0 / 0.2; 3.0 / 0.3 at 7B).
        metric: ``cosine`` (paper) or ``euclidean`` unit distances for DSA.
        use_dsa, use_hra: ablation switches; at least one must be on. Projectors exist only with
            ``use_hra`` (so no unused parameters reach the optimizer or DDP).
        projection_dtype: the operands of the HRA projection: ``torch.float32`` (default: exact)
            or ``torch.bfloat16`` (bf16 tensor cores, fp32 accumulation, a bf16 output; the
            projectors stay float32 parameters). The projection is the largest part of the
            step's arithmetic (``6·B·T·d_S·d_T`` per pair); bf16 trades ≈1e-2 relative error in
            the projector's gradient for it (``benchmarks/results/precision_model.csv``).

    ``projectors`` is an ``nn.ModuleDict`` keyed by ``str(student_layer)``.
    """

    lambda_dsa = _LossWeight()
    lambda_hra = _LossWeight()

    def __init__(
        self,
        student_hidden_size: int,
        teacher_hidden_size: int,
        layer_pairs: Sequence[LayerPairLike],
        lambda_dsa: float = 2.0,
        lambda_hra: float = 0.2,
        metric: str = "cosine",
        use_dsa: bool = True,
        use_hra: bool = True,
        projection_dtype: torch.dtype = torch.float32,
        variant: str = "paper",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "authors_code" and metric != "cosine":
            raise ValueError(
                f"variant='authors_code' uses the cosine metric (the released code has no other), "
                f"got metric={metric!r}"
            )
        for name, size in (
            ("student_hidden_size", student_hidden_size),
            ("teacher_hidden_size", teacher_hidden_size),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        if projection_dtype not in PROJECTION_DTYPES:
            raise ValueError(
                "projection_dtype must be torch.float32 or torch.bfloat16, got "
                f"{projection_dtype!r}"
            )
        if not (use_dsa or use_hra):
            raise ValueError(
                "use_dsa and use_hra are both False: MTALoss would be 0; to train without MTA do "
                "not build an MTALoss"
            )
        self.student_hidden_size = student_hidden_size
        self.teacher_hidden_size = teacher_hidden_size
        self.layer_pairs: tuple[LayerPair, ...] = tuple(parse_layer_pairs(layer_pairs))
        self.metric = metric
        self.use_dsa = use_dsa
        self.use_hra = use_hra
        self.projection_dtype = projection_dtype
        self.variant = variant
        self.projectors = nn.ModuleDict()
        if use_hra:
            for pair in self.layer_pairs:
                # the release: Linear with a bias and PyTorch's default init
                released = variant == "authors_code"
                projector = nn.Linear(student_hidden_size, teacher_hidden_size, bias=released)
                if not released:
                    nn.init.orthogonal_(projector.weight)
                self.projectors[str(pair.student_layer)] = projector
        self.terms = [("dsa", p) for p in self.layer_pairs if use_dsa] + [
            ("hra", p) for p in self.layer_pairs if use_hra
        ]
        self.lambda_dsa = lambda_dsa
        self.lambda_hra = lambda_hra

    def _update_combine(self) -> None:
        """Set ``combine`` [3, n_terms] float32: the per-layer terms combine into (loss, L_DSA,
        L_HRA) by one product with it — L_DSA is the mean over pairs, L_HRA the sum, loss =
        λ_DSA L_DSA + λ_HRA L_HRA. A buffer (it moves with the module, and a compiled step reads
        it as an input), remade in float32 whenever the module is cast or a λ changes."""
        if not hasattr(self, "_lambda_dsa") or not hasattr(self, "_lambda_hra"):
            return  # __init__ has not set both yet
        old = self._buffers.get("combine")
        combine = self._combine_matrix()
        self.register_buffer(
            "combine", combine if old is None else combine.to(old.device), persistent=False
        )
        self._recast_combine: dict[torch.device, Tensor] = {}

    def _combine_matrix(self) -> Tensor:
        n_dsa = sum(term == "dsa" for term, _ in self.terms)
        n_hra = sum(term == "hra" for term, _ in self.terms)
        # L_HRA: the sum over pairs in the paper, the mean in the released code
        hra_share = 1.0 / max(n_hra, 1) if self.variant == "authors_code" else 1.0
        combine = torch.zeros(3, len(self.terms))
        for column, (term, _) in enumerate(self.terms):
            share = 1.0 / n_dsa if term == "dsa" else hra_share
            weight = self.lambda_dsa if term == "dsa" else self.lambda_hra
            combine[0, column] = weight * share
            combine[1 if term == "dsa" else 2, column] = share
        return combine

    def _float32_combine(self) -> Tensor:
        """``combine``, or its exact float32 values when a wrapper cast the buffer without
        ``nn.Module._apply`` (FSDP1 mixed precision assigns ``buffer.data``): made once per
        device, so the λs never go through bf16."""
        combine = self.combine
        if combine.dtype == torch.float32:
            return combine
        if combine.device not in self._recast_combine:
            self._recast_combine[combine.device] = self._combine_matrix().to(combine.device)
        return self._recast_combine[combine.device]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MTALoss:
        out = super()._apply(fn, recurse)
        self._update_combine()  # exact float32 weights on the new device, whatever the cast
        return out

    @property
    def granularities(self) -> tuple[str, ...]:
        """Unit granularities the layer pairs need (their span keys must be in the batch)."""
        used = {pair.granularity for pair in self.layer_pairs}
        return tuple(g for g in GRANULARITIES if g in used)

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{p.name}:{p.granularity}" for p in self.layer_pairs)
        return (
            f"pairs=[{pairs}], lambda_dsa={self.lambda_dsa}, lambda_hra={self.lambda_hra}, "
            f"metric={self.metric!r}, use_dsa={self.use_dsa}, use_hra={self.use_hra}, "
            f"projection_dtype={self.projection_dtype}, variant={self.variant!r}"
        )

    def _project(self, student_layer: int, x: Tensor) -> Tensor:
        """``x W_l``: [..., d_T], in the projector's dtype (float32 unless the module was cast),
        or with bf16 operands and output when ``projection_dtype`` is bf16."""
        projector = self.projectors[str(student_layer)]
        if self.projection_dtype != torch.bfloat16:
            return projector(x.to(projector.weight.dtype))
        # autocast casts the operands (the module is still called: wrappers' hooks run)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return projector(x)

    def forward(
        self,
        student_hidden_states: HiddenStates,
        teacher_hidden_states: HiddenStates,
        batch: UnitPlan | Mapping[str, Any],
    ) -> MTALossOutput:
        """MTA loss of one batch.

        Args:
            student_hidden_states: HF ``hidden_states`` of the student (index 0 = embeddings),
                each [B, T, d_S], or a mapping ``{layer: tensor}`` with the aligned layers.
            teacher_hidden_states: the same for the teacher, [B, T', d_T] (``T' = T`` with a
                shared tokenizer); used detached.
            batch: the batch's :class:`~mta.unit_plan.UnitPlan` (built and validated where the
                batch was collated: then the loss reads nothing back from the device), or a
                collated batch holding one under ``"unit_plan"``, or the plan's keys themselves
                (``attention_mask`` [B, T] and, per needed granularity ``g``,
                ``g_student_spans`` [B, K_g, 2] and ``g_span_mask`` [B, K_g]; with different
                tokenizers also ``teacher_attention_mask`` [B, T'] and ``g_teacher_spans``),
                from which the plan is built here.
        """
        plan = self.plan(batch)
        device = _hidden_device(student_hidden_states)
        if plan.device != device:
            plan = plan.to(device)
        # Autocast (e.g. the Trainer's bf16 mixed precision) would run the ops' matmuls and the
        # projections in bf16: MTA quantities are float32 by design.
        with torch.autocast(device.type, enabled=False):
            return self._forward(student_hidden_states, teacher_hidden_states, plan)

    def plan(self, batch: UnitPlan | Mapping[str, Any]) -> UnitPlan:
        """The :class:`~mta.unit_plan.UnitPlan` of ``batch`` (see :meth:`forward`)."""
        if isinstance(batch, UnitPlan):
            return batch
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a UnitPlan or a mapping, got {type(batch).__name__}")
        plan = batch.get(PLAN_KEY)
        if plan is None:
            return UnitPlan.from_batch(batch, self.granularities)
        if not isinstance(plan, UnitPlan):
            raise TypeError(f"batch[{PLAN_KEY!r}] must be a UnitPlan, got {type(plan).__name__}")
        return plan

    def _forward(
        self,
        student_hidden_states: HiddenStates,
        teacher_hidden_states: HiddenStates,
        plan: UnitPlan,
    ) -> MTALossOutput:
        cross = plan.cross_tokenizer
        if cross and self.variant == "authors_code":
            raise ValueError(
                "variant='authors_code' needs one tokenizer for both models (the released code "
                "has no cross-tokenizer path); this batch carries teacher_attention_mask"
            )
        teacher_mask = plan.teacher_attention_mask if cross else plan.attention_mask
        student_shape = (*plan.attention_mask.shape, self.student_hidden_size)
        teacher_shape = (*teacher_mask.shape, self.teacher_hidden_size)
        units = {g: plan[g] for g in self.granularities}
        authors = self.variant == "authors_code"
        # the released code: std + 1e-5, every row (padding included) a query
        importance_options = {"std_eps": 1e-5, "padding_rows": True} if authors else {}

        teacher_layers = list(dict.fromkeys(p.teacher_layer for p in self.layer_pairs))
        teacher = {
            layer: _hidden(
                teacher_hidden_states, layer, "teacher_hidden_states", teacher_shape
            ).detach()
            for layer in teacher_layers
        }
        student = {
            pair.student_layer: _hidden(
                student_hidden_states, pair.student_layer, "student_hidden_states", student_shape
            )
            for pair in self.layer_pairs
        }

        def importance(states: dict[int, Tensor], mask: Tensor) -> dict[int, Tensor]:
            # every distinct layer's token importance in one set of launches
            weights = mk.token_importance_layers(list(states.values()), mask, **importance_options)
            return dict(zip(states, weights, strict=True))

        teacher_weights = importance(teacher, teacher_mask)
        # the released code pools the student's units with the student's own weights
        student_weights = (
            importance(student, plan.attention_mask) if authors and self.use_dsa else {}
        )

        numerators: dict[tuple[str, LayerPair], Tensor] = {}  # [B] per-example sums
        denominators: dict[tuple[str, LayerPair], Tensor] = {}  # [B], authors_code only
        for pair in self.layer_pairs:
            h_s, h_t = student[pair.student_layer], teacher[pair.teacher_layer]
            w = teacher_weights[pair.teacher_layer]
            unit = units[pair.granularity]
            if authors:
                w_s = student_weights.get(pair.student_layer)  # only DSA pools the student
                self._authors_pair(pair, h_s, h_t, w, w_s, unit, numerators, denominators)
                continue
            if self.use_dsa or cross:
                u_t = mk.span_pool(h_t, unit.teacher, token_weights=w)
                u_s = mk.span_pool(h_s, unit.student, token_weights=None if cross else w)
                p = mk.span_weights(w, unit.teacher)
            if self.use_dsa:
                numerators["dsa", pair] = mk.structural_loss(
                    u_s, u_t, p, unit.mask, metric=self.metric, reduction="none"
                )
            if self.use_hra and cross:
                projected = self._project(pair.student_layer, u_s)
                numerators["hra", pair] = mk.hidden_alignment_loss(
                    projected, u_t, p, unit.mask, reduction="none"
                )
            elif self.use_hra:
                projected = self._project(pair.student_layer, h_s)
                numerators["hra", pair] = mk.hidden_alignment_loss(
                    projected, h_t, w, unit.coverage, reduction="none"
                )

        # A few launches for every term at once: the value of each term (the batch mean of its
        # per-example losses; with authors_code, batch totals over batch totals), the loss as
        # one dot product, and the two totals (logged only) as one more product.
        per_term = torch.stack([numerators[t] for t in self.terms])
        if authors:
            totals = torch.stack([denominators[t] for t in self.terms]).sum(dim=1)
            per_term = per_term.sum(dim=1) / _release_floor(totals)
        else:
            per_term = per_term.mean(dim=1)
        # float32 (a no-op cast but for float64 reference runs)
        combine = self._float32_combine().to(per_term.dtype)
        loss = combine[0] @ per_term
        shown = per_term.detach()
        dsa, hra = combine[1:] @ shown
        components: dict[str, Tensor] = {}
        for name, total, used in (("dsa", dsa, self.use_dsa), ("hra", hra, self.use_hra)):
            if used:
                components.update(
                    {
                        f"{name}/{pair.name}": shown[i]
                        for i, (term, pair) in enumerate(self.terms)
                        if term == name
                    }
                )
                components[name] = total.detach()
        components["mta"] = loss.detach()
        return MTALossOutput(loss=loss, components=components)

    def _authors_pair(
        self,
        pair: LayerPair,
        h_s: Tensor,
        h_t: Tensor,
        w_t: Tensor,
        w_s: Tensor | None,
        unit: GranularityUnits,
        numerators: dict[tuple[str, LayerPair], Tensor],
        denominators: dict[tuple[str, LayerPair], Tensor],
    ) -> None:
        """One layer pair as the authors' released code computes it (docs/design.md §8): per
        example the numerator and the denominator whose batch totals make each term.

        Memberships are (token, unit) pairs; ``k_t`` units hold token ``t`` (``unit.coverage``),
        ``Z = Σ_t k_t w_t`` and the unit weights ``W_u = Σ_{t∈u} w_t / max(Z, 1e-5)``.
        DSA: ``Σ_{u≠v} W_u W_v (C^S_uv − C^T_uv)²`` over ``(ΣW)² − ΣW²``; HRA:
        ``Σ_t k_t w_t (1 − cos(W_l h^S_t + b_l, h^T_t)) / max(Z, 1e-5)`` over ``Z / max(Z, 1e-5)``.
        Units are pooled with each model's own weights; scaling a unit does not change its
        cosine Gram row, so the release's normalization of the pooling weights drops out.
        """
        counts = unit.coverage
        member_weights = w_t * counts
        total = member_weights.sum(dim=-1)  # Z [B]
        floored = _release_floor(total)
        if self.use_dsa:
            u_t = mk.span_pool(h_t, unit.teacher, token_weights=w_t)
            u_s = mk.span_pool(h_s, unit.student, token_weights=w_s)
            # span_weights divides by max(Z, 1e-8); the release by max(Z, 1e-5)
            p = mk.span_weights(w_t, unit.teacher) * (total.clamp_min(1e-8) / floored)[:, None]
            numerators["dsa", pair] = mk.structural_loss(
                u_s, u_t, p, unit.mask, metric="cosine", reduction="none"
            )
            denominators["dsa", pair] = p.sum(dim=-1).square() - p.square().sum(dim=-1)
        if self.use_hra:
            projected = self._project(pair.student_layer, h_s)
            numerators["hra", pair] = mk.hidden_alignment_loss(
                projected, h_t, member_weights / floored[:, None], counts, reduction="none"
            )
            denominators["hra", pair] = total / floored


def _release_floor(total: Tensor) -> Tensor:
    """The released code's floor on every normalizing total, ``max(total, 1e-5)``. A literal: a
    float read from a global or an attribute would be a symbolic input of a compiled step (and
    restart its tracing once specialized)."""
    return total.clamp_min(1e-5)


def _hidden_device(states: HiddenStates) -> torch.device:
    values = states.values() if isinstance(states, Mapping) else states
    for value in values:
        if isinstance(value, Tensor):
            return value.device
    raise ValueError("student_hidden_states holds no tensor")
