"""Shared pieces of the trainer-side tests (data, trainer, CLI, DDP): records, tokenizers trained
in the test with ``tokenizers`` (nothing from a hub), regex units (no spaCy), tiny GPT-2 models and
a tiny saved run for configs/tiny.yaml."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mta.data import Example, format_record
from mta.spans import TextUnits

RECORDS = [
    {
        "instruction": "Name the colour of a clear sky.",
        "input": "",
        "output": "The sky is blue on a clear day.",
    },
    {
        "instruction": "Summarize the text in one sentence.",
        "input": "Cats sleep for most of the day and they hunt small animals at night.",
        "output": "Cats sleep by day and hunt by night.",
    },
    {"prompt": "Question: what does a compiler do?\nAnswer: ", "output": "It translates code."},
    {"text": "Python lists are mutable sequences that keep their items in order."},
    {
        "instruction": "Give two uses of a hammer.",
        "context": "",
        "response": "A hammer drives nails and breaks stones into smaller pieces.",
    },
    {
        "instruction": "Explain why the sea is salty.",
        "input": "Rivers carry minerals.",
        "output": "Rivers carry dissolved minerals into the sea where water evaporates.",
    },
]


#: The records as examples (the plain-text one included).
EXAMPLES = [format_record(r) for r in RECORDS]


def make_tokenizer(texts: list[str], kind: str = "bytelevel", vocab_size: int = 320):
    """A fast HF tokenizer trained on ``texts``: ``bytelevel`` (GPT-2 style) or ``metaspace``
    (SentencePiece style with a BOS token prepended, as LLaMA)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mta.demo import train_tokenizer

    if kind == "bytelevel":
        return train_tokenizer(texts, vocab_size)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tokenizer_pair(texts: list[str]) -> dict:
    """The two tokenizations the trainer tests run: ``bytelevel`` (300 tokens) and
    ``metaspace`` (340), trained on ``texts``."""
    return {
        "bytelevel": make_tokenizer(texts, "bytelevel", 300),
        "metaspace": make_tokenizer(texts, "metaspace", 340),
    }


def tiny_run_arguments(output_dir, teacher_tokenizer, base_loss: str) -> dict:
    """``MTATrainingArguments`` keywords of a two-step CPU run that logs every step and saves
    nothing; ``base_loss`` is ``ce`` when the teacher has its own tokenizer."""
    return {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "base_loss": "ce" if teacher_tokenizer is not None else base_loss,
    }


def tiny_trainer(
    teacher,
    student,
    tok,
    dataset,
    arguments: dict,
    *,
    teacher_tok=None,
    mta: bool = True,
    with_examples: bool = False,
    **trainer_kwargs,
):
    """An ``MTATrainer`` of a 4×48 teacher and a 2×32 student on ``dataset`` (MTA on two layer
    pairs unless ``mta=False``), batched by the ``DistillationCollator`` of both tokenizers."""
    from mta.data import DistillationCollator, pad_token_id
    from mta.layers import plan_layers
    from mta.loss import MTALoss
    from mta.trainer import MTATrainer, MTATrainingArguments

    collator = DistillationCollator(
        pad_token_id(tok),
        None if teacher_tok is None else pad_token_id(teacher_tok),
        with_examples=with_examples,
    )
    return MTATrainer(
        model=student,
        teacher_model=teacher,
        args=MTATrainingArguments(**arguments),
        mta_loss=MTALoss(32, 48, plan_layers(2, 4, num_key_layers=2)) if mta else None,
        processing_class=tok,
        teacher_processing_class=teacher_tok,
        data_collator=collator,
        train_dataset=dataset,
        **trainer_kwargs,
    )


def examples_dataset(tok, max_length: int = 192):
    """:data:`EXAMPLES` tokenized by ``tok`` with their regex units (every prompt and response
    fits in 192 tokens)."""
    from mta.data import DistillationDataset

    return DistillationDataset(EXAMPLES, tok, max_length, units=[regex_units(e) for e in EXAMPLES])


def regex_units(example: Example) -> TextUnits:
    """Deterministic units without spaCy: words = ``\\w+`` runs, phrases = word pairs, inside
    the example's content regions."""
    words, phrases = [], []
    for start, end in example.regions:
        piece = example.text[start:end]
        words += [(start + m.start(), start + m.end()) for m in re.finditer(r"\w+", piece)]
        phrases += [(start + m.start(), start + m.end()) for m in re.finditer(r"\w+ \w+", piece)]
    return TextUnits(np.array(words).reshape(-1, 2), np.array(phrases).reshape(-1, 2))


def gpt2(tok, layers, width, dropout=0.0, vocab=None):
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab or len(tok),
            n_layer=layers,
            n_embd=width,
            n_head=4,
            n_positions=256,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )


def llama(tok, layers, width):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )


def clone(module):
    """A detached copy of ``module``'s state dict (to compare weights before and after)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = str(CONFIGS / "tiny.yaml")


def write_tiny_run(root: Path, records=RECORDS, cross: bool = False) -> list[str]:
    """Save a tiny teacher (GPT-2 4×48) and student (2×32) with a tokenizer trained on
    ``records``, and the records as JSONL; return the overrides of configs/tiny.yaml."""
    texts = [format_record(r).text for r in records]
    tok = make_tokenizer(texts, "bytelevel", 300)
    teacher_tok = make_tokenizer(texts, "metaspace", 340) if cross else tok
    gpt2(teacher_tok, 4, 48).save_pretrained(root / "teacher")
    teacher_tok.save_pretrained(root / "teacher")
    gpt2(tok, 2, 32).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [
        f"model.teacher={root / 'teacher'}",
        f"model.student={root / 'student'}",
        f"data.train_file={data}",
        f"data.units_cache={root / 'units.jsonl'}",
        f"training.output_dir={root / 'out'}",
    ]


def torchrun(processes: int, *args: str) -> None:
    """Run ``python -m torch.distributed.run --nproc_per_node=<processes> <args>`` on CPU and
    assert it succeeded. Workers get one OpenMP thread each and no Triton interpreter (CPU
    tensors then take the eager MTA ops); the rendezvous port is a free local one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={port}",
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
