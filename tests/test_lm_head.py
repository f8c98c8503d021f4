"""mta.lm_head with PEFT LoRA heads: the folded weight equals the head's own forward (values and
adapter gradients), and what cannot be folded is refused by name.

Tolerances: the folded product ``x·(W + s·B·A)^T`` and PEFT's ``x·W^T + s·(x·A^T)·B^T`` are the
same sums in another order, so in float64 they agree to rounding (rtol 1e-10); float32 gradients
of the two orders differ by ~1e-4 relative on elements where large terms cancel, which would
hide nothing but make a float32 test flaky.
"""

import pytest
import torch
from training_helpers import gpt2, make_tokenizer

from mta.lm_head import decoder, fused_head_refusal, head_weight_and_bias

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(["a small student", "reads these words", "and more"], "bytelevel", 280)


def lora_student(tok, *, targets=("c_attn", "lm_head"), **config):
    """A GPT-2 student with a LoRA adapter whose B is random (a trained-like adapter)."""
    torch.manual_seed(0)
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
    return peft.get_peft_model(
        gpt2(tok, 2, 32), peft.LoraConfig(target_modules=list(targets), **{**settings, **config})
    )


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7])
def test_folded_lora_head_equals_its_forward(tok, lora_bias, rows):
    student = lora_student(tok, targets=("lm_head",), lora_bias=lora_bias).double()
    head = student.get_output_embeddings()
    if lora_bias:  # a bias to fold: GPT-2's head has none, so give the base layer one
        bias = torch.randn(head.out_features, dtype=torch.float64)
        head.get_base_layer().bias = torch.nn.Parameter(bias)
    x = torch.randn(rows, 32, dtype=torch.float64)
    adapter = [p for n, p in head.named_parameters() if "lora_" in n]
    expected = head(x)
    grads = torch.autograd.grad(expected.square().sum(), adapter)
    weight, bias = head_weight_and_bias(head)
    folded = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(folded, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(folded.square().sum(), adapter), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_disabled_or_merged_adapter_is_the_base_weight(tok):
    student = lora_student(tok, targets=("lm_head",))
    head = student.get_output_embeddings()
    with student.disable_adapter():
        weight, _ = head_weight_and_bias(head)
        assert weight is head.get_base_layer().weight
    head.merge()
    weight, _ = head_weight_and_bias(head)
    assert weight is head.get_base_layer().weight


def test_peft_student_is_foldable_and_its_decoder_is_the_transformer(tok):
    student = lora_student(tok)
    assert decoder(student) is student.get_base_model().transformer
    assert fused_head_refusal(student) is None
    assert fused_head_refusal(lora_student(tok, targets=("c_attn",))) is None


@pytest.mark.parametrize(
    "config, match",
    [
        ({"lora_dropout": 0.1}, "lora_dropout=0.1, which drops the adapter's input only"),
        ({"use_dora": True}, "is a variant"),
    ],
)
def test_unfoldable_lora_heads_are_refused_by_name(tok, config, match):
    assert match in fused_head_refusal(lora_student(tok, targets=("lm_head",), **config))


def test_other_peft_tuners_on_the_head_are_refused(tok):
    torch.manual_seed(0)
    config = peft.IA3Config(target_modules=["lm_head"], feedforward_modules=["lm_head"])
    student = peft.get_peft_model(gpt2(tok, 2, 32), config)
    assert "PEFT Linear adapter, not LoRA" in fused_head_refusal(student)
