"""The LM head seen from outside its forward: what the fused base loss
(:func:`mta.kd_losses.fused_linear_distillation_loss`) needs to read the head's weight instead of
calling it, and when it must not.

* :func:`fused_head_refusal` says why a model's logits are not ``lm_head(last hidden state)``
  (then the fused loss would train on something else than the model's logits).
* :func:`decoder` is the module whose last hidden state feeds the head (through a PEFT wrapper).
* :func:`head_operands` is what the fused loss multiplies: hidden states ``h'``, weight ``W'``
  and bias ``b'`` with ``h'·W'^T + b'`` equal to the head's output. For a plain head they are
  ``h``, its weight and bias. With a PEFT LoRA adapter on the head they are augmented by the
  adapter's rank: ``h' = [h | s·dropout(h)·A^T]``, ``W' = [W | B]``, ``b' = b + s·b_B``, which is
  PEFT's own forward ``h·W^T + s·(dropout(h)·A^T)·B^T`` as one matmul, built from the adapter's
  parameters so that it trains them. Nothing is folded into ``W`` (in bf16 a small ``s·B·A``
  would round away against ``W``); the cost is ``r`` more columns per adapter and one copy of
  ``h`` and ``W``. A LoRA variant (DoRA) or ``fan_in_fan_out`` is refused by name.
* :func:`unsharded_weight` reads a plain head's full weight inside a wrapped forward.
* :func:`vocab_rows` is the logits' width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()  # isinstance(x, ()) is False

from mta.adapters import BaseTunerLayer, LoraLayer, is_peft_model

__all__ = [
    "decoder",
    "fused_head_refusal",
    "head_operands",
    "lora_head_refusal",
    "unsharded_weight",
    "vocab_rows",
]


def decoder(model: nn.Module) -> nn.Module | None:
    """The module of ``model`` whose ``last_hidden_state`` its LM head reads: the Hugging Face
    ``base_model`` (of the wrapped model, for a ``peft.PeftModel``); None when the model has no
    separate one."""
    inner = model.get_base_model() if is_peft_model(model) else model
    base = inner.base_model
    return None if base is inner else base


def lora_head_refusal(head: nn.Module) -> str | None:
    """Why a PEFT LoRA head's output is not ``h'·W'^T + b'`` of :func:`head_operands` (None if
    it is)."""
    if head.fan_in_fan_out:
        return "its LoRA adapter has fan_in_fan_out=True (a transposed base weight)"
    for name in _active_adapters(head):
        if name in head.lora_variant:
            variant = type(head.lora_variant[name]).__name__
            return f"its LoRA adapter {name!r} is a variant ({variant}, e.g. DoRA)"
    return None


def _active_adapters(head: nn.Module) -> list[str]:
    if head.disable_adapters or head.merged:
        return []
    return [name for name in head.active_adapters if name in head.lora_A]


def head_operands(head: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(h', W', b')`` with ``h'·W'^T + b'`` the LM head's output on ``hidden`` [..., d]
    (module docstring): ``W'`` [V, d'], ``h'`` [..., d'], ``b'`` [V] or None; differentiable in
    ``hidden`` and the adapter's parameters."""
    if not isinstance(head, LoraLayer):
        return hidden, unsharded_weight(head), head.bias
    base = head.get_base_layer()
    weight, bias = unsharded_weight(base), base.bias
    inputs, weights = [hidden], [weight]
    for name in _active_adapters(head):
        lora_a, lora_b, scaling = head.lora_A[name], head.lora_B[name], head.scaling[name]
        x = head.lora_dropout[name](hidden.to(lora_a.weight.dtype))
        inputs.append((lora_a(x) * scaling).to(hidden.dtype))
        weights.append(lora_b.weight.to(weight.dtype))
        if lora_b.bias is not None:
            delta = (lora_b.bias * scaling).to(weight.dtype)
            bias = delta if bias is None else bias + delta
    if len(inputs) == 1:
        return hidden, weight, bias
    return torch.cat(inputs, dim=-1), torch.cat(weights, dim=-1), bias


def unsharded_weight(head: nn.Linear) -> Tensor:
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


def vocab_rows(model: PreTrainedModel) -> int:
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
    """Why ``model``'s logits are not ``h'·W'^T + b'`` with the operands of :func:`head_operands`
    on its last hidden state (None if they are): a head that is neither an ``nn.Linear`` nor a
    plain LoRA adapter on one, no separate base model, a config that transforms logits
    after the head, or logits that differ from that product on 8 tokens in eval mode (the same
    rows through one matmul: compared at rtol 1e-5, tighter than a soft-cap's effect)."""
    head = model.get_output_embeddings()
    if isinstance(head, LoraLayer):
        if (reason := lora_head_refusal(head)) is not None:
            return reason
    elif isinstance(head, BaseTunerLayer):
        return f"its LM head carries a PEFT {type(head).__name__} adapter, not LoRA"
    elif not isinstance(head, nn.Linear):
        return f"its output embeddings are {type(head).__name__}, not an nn.Linear LM head"
    base = decoder(model)
    if base is None:
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
            operands = head_operands(head, hidden.to(head.weight.device))
            fused = F.linear(*operands)
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
