"""mta.lm_head with PEFT LoRA heads: the head's operands ``[h | s·dropout(h)·A^T]·[W | B]^T`` equal
the head's own forward (values and adapter gradients, dropout included), in bf16 as closely as
PEFT's forward itself, and what is not a plain LoRA head is refused by name.

Tolerances: in float64 the augmented matmul and PEFT's two matmuls are the same sums (rtol
1e-10). In bf16 both round; the test bounds the augmented product's error against a float64
reference by twice PEFT's own error (plus one bf16 ulp of the largest logit).
"""

import copy

import pytest
import torch
from training_helpers import gpt2, make_tokenizer

from mta.lm_head import decoder, fused_head_refusal, head_operands

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
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_head_operands_equal_its_forward(tok, lora_bias, rows, dropout):
    student = lora_student(tok, targets=("lm_head",), lora_bias=lora_bias, lora_dropout=dropout)
    student = student.double().train()
    head = student.get_output_embeddings()
    if lora_bias:  # a bias to add: GPT-2's head has none, so give the base layer one
        bias = torch.randn(head.out_features, dtype=torch.float64)
        head.get_base_layer().bias = torch.nn.Parameter(bias)
    x = torch.randn(rows, 32, dtype=torch.float64)
    adapter = [p for n, p in head.named_parameters() if "lora_" in n]
    torch.manual_seed(1)  # the same dropout mask for both: each draws it once, from x's shape
    expected = head(x)
    grads = torch.autograd.grad(expected.square().sum(), adapter)
    torch.manual_seed(1)
    got = torch.nn.functional.linear(*head_operands(head, x))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for mine, want in zip(torch.autograd.grad(got.square().sum(), adapter), grads, strict=True):
        torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12)


def test_bf16_head_with_a_small_adapter_update_keeps_it(tok):
    """A bf16 base weight with a float32 adapter whose update is below the weight's bf16
    resolution (adding it into W would round it away): the operands are as close to the exact
    head as PEFT's own forward."""
    torch.manual_seed(0)
    student = lora_student(tok, targets=("lm_head",)).to(torch.bfloat16)
    head = student.get_output_embeddings()
    for name, param in head.named_parameters():
        if "lora_" in name:
            param.data = param.data.float() * 1e-2  # adapters stay float32, as peft keeps them
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    reference = copy.deepcopy(head).double()
    exact = reference(x.double())
    with torch.no_grad():
        peft_error = (head(x).double() - exact).abs().max()
        ours = torch.nn.functional.linear(*head_operands(head, x))
        error = (ours.double() - exact).abs().max()
    ulp = exact.abs().max() * 2**-8
    assert error <= 2 * peft_error + ulp


def test_disabled_or_merged_adapter_is_the_plain_head(tok):
    student = lora_student(tok, targets=("lm_head",))
    head = student.get_output_embeddings()
    x = torch.randn(3, 32)
    with student.disable_adapter():
        hidden, weight, _ = head_operands(head, x)
        assert hidden is x and weight is head.get_base_layer().weight
    head.merge()
    hidden, weight, _ = head_operands(head, x)
    assert hidden is x and weight is head.get_base_layer().weight


def test_peft_student_is_accepted_and_its_decoder_is_the_transformer(tok):
    student = lora_student(tok)
    assert decoder(student) is student.get_base_model().transformer
    assert fused_head_refusal(student) is None
    assert fused_head_refusal(lora_student(tok, targets=("c_attn",))) is None


def test_lora_variants_are_refused_by_name(tok):
    assert "is a variant" in fused_head_refusal(
        lora_student(tok, targets=("lm_head",), use_dora=True)
    )
    assert fused_head_refusal(lora_student(tok, targets=("lm_head",), lora_dropout=0.1)) is None


def test_other_peft_tuners_on_the_head_are_refused(tok):
    torch.manual_seed(0)
    config = peft.IA3Config(target_modules=["lm_head"], feedforward_modules=["lm_head"])
    student = peft.get_peft_model(gpt2(tok, 2, 32), config)
    assert "PEFT Linear adapter, not LoRA" in fused_head_refusal(student)
