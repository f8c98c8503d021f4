"""The LM head seen from outside its forward: what the fused base loss
(:func:`mta.kd_losses.fused_linear_distillation_loss`) needs to read the head's weight instead of
calling it, and when it must not.

* :func:`fused_head_refusal` says why a model's logits are not ``lm_head(last hidden state)``
  (then the fused loss would train on something else than the model's logits).
* :func:`unsharded_weight` reads the head's full weight inside a wrapped forward.
* :func:`vocab_rows` is the logits' width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()  # isinstance(x, ()) is False

__all__ = ["fused_head_refusal", "unsharded_weight", "vocab_rows"]


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
