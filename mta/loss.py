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
``.to(dtype)`` on the module runs the projectors in another dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import mta_kernels as mk
from mta.layers import GRANULARITIES, LayerPair, LayerPairLike, parse_layer_pairs

__all__ = ["MTALoss", "MTALossOutput"]

HiddenStates = Sequence[Tensor] | Mapping[int, Tensor]


@dataclass
class MTALossOutput:
    """``loss``: float32 scalar with grad; ``components``: detached float32 scalars for logging —
    ``dsa/<s>-<t>``, ``hra/<s>-<t>`` per layer pair, ``dsa`` (mean over pairs), ``hra`` (sum over
    pairs) for the enabled terms, and ``mta`` (the weighted total, ``loss`` detached)."""

    loss: Tensor
    components: dict[str, Tensor]


def _batch_tensor(batch: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in batch:
        raise ValueError(f"batch is missing {key!r} ({what})")
    value = batch[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    return value


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


def _coverage(spans: Tensor, span_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """``c_t``: valid token covered by at least one valid span, [B, T] bool.

    A difference array (+1 at each valid start, −1 at its end) and a cumulative sum over ``T``:
    ``O(B·(K + T))``, no ``[B, K, T]`` membership matrix.
    """
    batch, num_tokens = attention_mask.shape
    valid = span_mask.bool()
    ones = valid.to(torch.int32)
    delta = torch.zeros(batch, num_tokens + 1, dtype=torch.int32, device=spans.device)
    # Invalid spans add 0 at index 0, whatever their (unchecked) padding values.
    delta.scatter_add_(1, spans[..., 0].long() * valid, ones)
    delta.scatter_add_(1, spans[..., 1].long() * valid, -ones)
    return (delta.cumsum(dim=1)[:, :num_tokens] > 0) & attention_mask.bool()


def _unit_tensors(
    batch: Mapping[str, Tensor],
    granularities: Sequence[str],
    cross: bool,
    student_tokens: tuple[int, int],
    teacher_tokens: tuple[int, int],
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """``{g: (student spans, teacher spans, span mask)}`` from the collator's batch keys, each
    validated once against its tokenization ([B, T] of the student / the teacher)."""
    units = {}
    for g in granularities:
        what = f"from the collator in mta.spans; needed by the layer pairs with {g} units"
        student_spans = _batch_tensor(batch, f"{g}_student_spans", what)
        teacher_spans = _batch_tensor(batch, f"{g}_teacher_spans", what) if cross else student_spans
        span_mask = _batch_tensor(batch, f"{g}_span_mask", what)
        mk.check_spans(student_spans, span_mask, *student_tokens)
        if cross:
            mk.check_spans(teacher_spans, span_mask, *teacher_tokens)
        units[g] = (student_spans, teacher_spans, span_mask)
    return units


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

    ``projectors`` is an ``nn.ModuleDict`` keyed by ``str(student_layer)``.
    """

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
    ) -> None:
        super().__init__()
        for name, size in (
            ("student_hidden_size", student_hidden_size),
            ("teacher_hidden_size", teacher_hidden_size),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        for name, weight in (("lambda_dsa", lambda_dsa), ("lambda_hra", lambda_hra)):
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        if not (use_dsa or use_hra):
            raise ValueError(
                "use_dsa and use_hra are both False: MTALoss would be 0; to train without MTA do "
                "not build an MTALoss"
            )
        self.student_hidden_size = student_hidden_size
        self.teacher_hidden_size = teacher_hidden_size
        self.layer_pairs: tuple[LayerPair, ...] = tuple(parse_layer_pairs(layer_pairs))
        self.lambda_dsa = float(lambda_dsa)
        self.lambda_hra = float(lambda_hra)
        self.metric = metric
        self.use_dsa = use_dsa
        self.use_hra = use_hra
        self.projectors = nn.ModuleDict()
        if use_hra:
            for pair in self.layer_pairs:
                projector = nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)
                nn.init.orthogonal_(projector.weight)
                self.projectors[str(pair.student_layer)] = projector

    @property
    def granularities(self) -> tuple[str, ...]:
        """Unit granularities the layer pairs need (their span keys must be in the batch)."""
        used = {pair.granularity for pair in self.layer_pairs}
        return tuple(g for g in GRANULARITIES if g in used)

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{p.name}:{p.granularity}" for p in self.layer_pairs)
        return (
            f"pairs=[{pairs}], lambda_dsa={self.lambda_dsa}, lambda_hra={self.lambda_hra}, "
            f"metric={self.metric!r}, use_dsa={self.use_dsa}, use_hra={self.use_hra}"
        )

    def _project(self, student_layer: int, x: Tensor) -> Tensor:
        """``x W_l`` in the projector's dtype (float32 by default): [..., d_T]."""
        projector = self.projectors[str(student_layer)]
        return projector(x.to(projector.weight.dtype))

    def forward(
        self,
        student_hidden_states: HiddenStates,
        teacher_hidden_states: HiddenStates,
        batch: Mapping[str, Tensor],
    ) -> MTALossOutput:
        """MTA loss of one batch.

        Args:
            student_hidden_states: HF ``hidden_states`` of the student (index 0 = embeddings),
                each [B, T, d_S], or a mapping ``{layer: tensor}`` with the aligned layers.
            teacher_hidden_states: the same for the teacher, [B, T', d_T] (``T' = T`` with a
                shared tokenizer); used detached.
            batch: ``attention_mask`` [B, T] and, per needed granularity ``g``,
                ``g_student_spans`` [B, K_g, 2] and ``g_span_mask`` [B, K_g]; with different
                tokenizers also ``teacher_attention_mask`` [B, T'] and ``g_teacher_spans``.
        """
        attention_mask = _batch_tensor(
            batch, "attention_mask", "the student's attention mask [B, T]"
        )
        # Autocast (e.g. the Trainer's bf16 mixed precision) would run the ops' matmuls and the
        # projections in bf16: MTA quantities are float32 by design.
        with torch.autocast(attention_mask.device.type, enabled=False):
            return self._forward(
                student_hidden_states, teacher_hidden_states, batch, attention_mask
            )

    def _forward(
        self,
        student_hidden_states: HiddenStates,
        teacher_hidden_states: HiddenStates,
        batch: Mapping[str, Tensor],
        attention_mask: Tensor,
    ) -> MTALossOutput:
        cross = "teacher_attention_mask" in batch or "teacher_input_ids" in batch
        teacher_mask = (
            _batch_tensor(
                batch,
                "teacher_attention_mask",
                "the teacher's attention mask [B, T'], needed when the batch has teacher tokens",
            )
            if cross
            else attention_mask
        )
        if attention_mask.dim() != 2 or teacher_mask.dim() != 2:
            raise ValueError("attention_mask and teacher_attention_mask must have shape [B, T]")
        units = _unit_tensors(
            batch, self.granularities, cross, tuple(attention_mask.shape), tuple(teacher_mask.shape)
        )
        student_shape = (*attention_mask.shape, self.student_hidden_size)
        teacher_shape = (*teacher_mask.shape, self.teacher_hidden_size)

        importance: dict[int, Tensor] = {}
        coverage: dict[str, Tensor] = {}
        dsa_terms: dict[str, Tensor] = {}
        hra_terms: dict[str, Tensor] = {}
        # The spans were validated once above: skip the per-op range checks (host syncs).
        with mk.assume_valid_spans():
            for pair in self.layer_pairs:
                h_s = _hidden(
                    student_hidden_states,
                    pair.student_layer,
                    "student_hidden_states",
                    student_shape,
                )
                h_t = _hidden(
                    teacher_hidden_states,
                    pair.teacher_layer,
                    "teacher_hidden_states",
                    teacher_shape,
                ).detach()
                if pair.teacher_layer not in importance:
                    importance[pair.teacher_layer] = mk.token_importance(h_t, teacher_mask)
                w = importance[pair.teacher_layer]
                student_spans, teacher_spans, span_mask = units[pair.granularity]
                if self.use_dsa or cross:
                    u_t = mk.span_pool(h_t, teacher_spans, span_mask, w)
                    u_s = mk.span_pool(h_s, student_spans, span_mask, None if cross else w)
                    p = mk.span_weights(w, teacher_spans, span_mask)
                if self.use_dsa:
                    dsa_terms[pair.name] = mk.structural_loss(
                        u_s, u_t, p, span_mask, metric=self.metric
                    )
                if self.use_hra and cross:
                    projected = self._project(pair.student_layer, u_s)
                    hra_terms[pair.name] = mk.hidden_alignment_loss(projected, u_t, p, span_mask)
                elif self.use_hra:
                    if pair.granularity not in coverage:
                        coverage[pair.granularity] = _coverage(
                            student_spans, span_mask, attention_mask
                        )
                    projected = self._project(pair.student_layer, h_s)
                    hra_terms[pair.name] = mk.hidden_alignment_loss(
                        projected, h_t, w, coverage[pair.granularity]
                    )

        components: dict[str, Tensor] = {}
        loss = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
        for term, terms, weight, total in (
            ("dsa", dsa_terms, self.lambda_dsa, lambda v: torch.stack(v).mean()),
            ("hra", hra_terms, self.lambda_hra, lambda v: torch.stack(v).sum()),
        ):
            if not terms:
                continue
            value = total(list(terms.values()))
            loss = loss + weight * value
            components.update({f"{term}/{name}": v.detach() for name, v in terms.items()})
            components[term] = value.detach()
        components["mta"] = loss.detach()
        return MTALossOutput(loss=loss, components=components)
