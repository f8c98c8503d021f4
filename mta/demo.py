"""The embedded demo of ``mta-distill demo``: KD vs KD+MTA on a corpus every Python has.

1. Corpus: the prose paragraphs of the standard library's ``pydoc_data.topics`` (the language
   reference text behind ``help()``), every 10th passage held out.
2. Teacher: a byte-level BPE tokenizer (``tokenizers``) and a small GPT-2 trained on the training
   passages, cached under ``~/.cache/mta`` (or ``--cache-dir``) and reused by later runs.
3. Two identical, smaller GPT-2 students distilled from it with :class:`~mta.trainer.MTATrainer`:
   the base loss (forward KL) alone, and the base loss plus MTA (units from spaCy, cached too).
4. A table of held-out perplexity and final loss components, ``loss_curves.png`` and
   ``results.json`` in the output directory, and both students exported there.

Nothing is downloaded. ``--quick`` uses smaller models and fewer steps.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from mta.data import DistillationCollator, DistillationDataset, Example, load_units, pad_token_id
from mta.evaluate import perplexity
from mta.layers import plan_layers
from mta.loss import MTALoss
from mta.progress import Progress, hub_progress_bars
from mta.trainer import MTATrainer, MTATrainingArguments

__all__ = [
    "FULL",
    "QUICK",
    "DemoSettings",
    "comparison_table",
    "demo_corpus",
    "demo_passages",
    "distill_student",
    "gpt2_config",
    "results_markdown",
    "run_demo",
    "train_tokenizer",
]

DEMO_VERSION = "2"  # bump when the teacher recipe changes (invalidates cached teachers)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo mode."""

    vocab_size: int
    max_length: int
    teacher_layers: int
    teacher_width: int
    teacher_steps: int
    student_layers: int
    student_width: int
    distill_steps: int
    max_train_passages: int | None = None
    max_chars: int | None = None
    """Cut passages to this many characters (at a word boundary): less text to parse."""
    batch_size: int = 16
    heads: int = 4
    teacher_lr: float = 3e-3
    distill_lr: float = 3e-3

    def teacher_key(self) -> dict[str, Any]:
        """The settings a cached teacher depends on."""
        keys = ("vocab_size", "max_length", "teacher_layers", "teacher_width", "teacher_steps")
        return {k: getattr(self, k) for k in (*keys, "heads", "teacher_lr", "batch_size")}


QUICK = DemoSettings(
    vocab_size=512,
    max_length=64,
    teacher_layers=4,
    teacher_width=64,
    teacher_steps=120,
    student_layers=2,
    student_width=32,
    distill_steps=40,
    max_train_passages=240,
    max_chars=240,
)
FULL = DemoSettings(
    vocab_size=1024,
    max_length=96,
    teacher_layers=4,
    teacher_width=96,
    teacher_steps=500,
    student_layers=2,
    student_width=48,
    distill_steps=200,
)


def demo_passages() -> list[str]:
    """Prose paragraphs of ``pydoc_data.topics`` (no grammar/code blocks or headings), in topic
    order, whitespace collapsed."""
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            if block.startswith(" ") or len(block) < 80 or re.search(r"[*=~-]{4}", block):
                continue
            passages.append(" ".join(block.split()))
    return passages


def _cut(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters at a word boundary."""
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


def split_passages(passages: Sequence[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held out): every ``every``-th passage is held out."""
    train = [p for i, p in enumerate(passages) if i % every]
    heldout = [p for i, p in enumerate(passages) if i % every == 0]
    return train, heldout


def demo_corpus(settings: DemoSettings) -> tuple[list[str], list[str]]:
    """(training, held-out) passages of a demo mode: :func:`split_passages` of
    :func:`demo_passages`, limited and cut as ``settings`` say."""
    train_texts, heldout_texts = split_passages(demo_passages())
    if settings.max_train_passages is not None:
        train_texts = train_texts[: settings.max_train_passages]
    if settings.max_chars is not None:
        train_texts, heldout_texts = (
            [_cut(t, settings.max_chars) for t in texts] for texts in (train_texts, heldout_texts)
        )
    return train_texts, heldout_texts


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (``<|endoftext|>`` is BOS, EOS,
    UNK and PAD), as a fast Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def gpt2_config(
    tokenizer: Any, layers: int, width: int, heads: int = 4, positions: int = 256
) -> GPT2Config:
    """A small GPT-2 config for ``tokenizer`` (no dropout: tiny models, tiny data)."""
    eos = tokenizer.eos_token_id
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _blocks(tokenizer: Any, texts: Sequence[str], size: int) -> torch.Tensor:
    """The texts' tokens, joined with EOS, cut into rows of ``size``: LongTensor[N, size]."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // size
    return torch.tensor(ids[: rows * size]).view(rows, size)


def pretrain_teacher(
    tokenizer: Any, texts: Sequence[str], settings: DemoSettings, seed: int
) -> GPT2LMHeadModel:
    """Train the teacher from scratch (AdamW, warmup then cosine decay), with a progress bar."""
    set_seed(seed)
    model = GPT2LMHeadModel(
        gpt2_config(tokenizer, settings.teacher_layers, settings.teacher_width, settings.heads)
    )
    blocks = _blocks(tokenizer, texts, settings.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.teacher_lr, weight_decay=0.01)
    warmup = max(1, settings.teacher_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s / settings.teacher_steps, 1.0)))
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with Progress(settings.teacher_steps, "teacher pretraining", "steps") as progress:
        for _ in range(settings.teacher_steps):
            rows = torch.randint(len(blocks), (settings.batch_size,), generator=generator)
            loss = model(input_ids=blocks[rows], labels=blocks[rows]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.update()
    return model.eval()


def load_or_train_teacher(
    cache_dir: Path, settings: DemoSettings, texts: Sequence[str], seed: int
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, bool]:
    """(teacher, tokenizer, reused?) — from ``cache_dir`` when a teacher with the same recipe,
    corpus and seed is there, else trained and stored (atomically) for the next run."""
    recipe = {"version": DEMO_VERSION, "seed": seed, **settings.teacher_key()}
    recipe["corpus"] = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"demo-teacher-{key}"
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return GPT2LMHeadModel.from_pretrained(path).eval(), tokenizer, True
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    teacher = pretrain_teacher(tokenizer, texts, settings, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=path.name + "."))
    try:
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return teacher, tokenizer, False


class _ProgressBar(TrainerCallback):
    """One progress display per run with the latest loss components (instead of printed log
    dicts): a bar on a terminal, a periodic line otherwise (:class:`mta.progress.Progress`)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.progress: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(state.max_steps, self.desc, "steps")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(state.global_step - self.progress.done)

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "base_loss", "dsa", "hra")
        self.progress.set_postfix(**{k: f"{logs[k]:.3f}" for k in keys if k in (logs or {})})

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.close()


def _require_spacy() -> None:
    if importlib.util.find_spec("spacy") is None:
        raise ImportError(
            "the demo's KD+MTA run needs spaCy for its linguistic units: pip install 'mta[spacy]'"
        )


def distill_student(
    name: str,
    student: GPT2LMHeadModel,
    teacher: GPT2LMHeadModel,
    tokenizer: Any,
    dataset: DistillationDataset,
    mta_loss: MTALoss | None,
    settings: DemoSettings,
    output_dir: Path,
    seed: int,
) -> list[dict[str, float]]:
    """Distill one student; returns its log history and exports it to ``output_dir / name``."""
    args = MTATrainingArguments(
        output_dir=str(output_dir / name),
        max_steps=settings.distill_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.distill_lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.distill_steps // 20),
        base_loss="fkl",
        logging_steps=max(1, settings.distill_steps // 40),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,  # the bar of _ProgressBar replaces the printed log dicts
        use_cpu=True,
        seed=seed,
        data_seed=seed,
    )
    trainer = MTATrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        mta_loss=mta_loss,
        processing_class=tokenizer,
        data_collator=DistillationCollator(pad_token_id(tokenizer)),
        train_dataset=dataset,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_ProgressBar(f"distill {name}"))
    trainer.train()
    trainer.save_model()
    return [h for h in trainer.state.log_history if "base_loss" in h]


def _plot(histories: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, history in histories.items():
        left.plot([h["step"] for h in history], [h["base_loss"] for h in history], label=name)
    left.set(xlabel="step", ylabel="base loss (forward KL)", title="Base distillation loss")
    left.legend()
    mta_history = histories["KD+MTA"]
    for term in ("dsa", "hra"):
        right.plot([h["step"] for h in mta_history], [h[term] for h in mta_history], label=term)
    right.set(xlabel="step", ylabel="loss", title="MTA terms (KD+MTA run)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _params(model: torch.nn.Module) -> str:
    return f"{_count(model) / 1e3:.0f}k"


def _source_commit() -> str:
    """``git describe --always --dirty`` of the source tree this module runs from, or
    ``unknown`` (an installed copy, no git)."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _provenance(quick: bool, seed: int, reused: bool) -> dict[str, str]:
    """Where a results.json comes from: machine, commit, date, command."""
    return {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "commit": _source_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"mta-distill demo{' --quick' if quick else ''} --seed {seed} "
        f"({'quick' if quick else 'full'}; teacher {'reused' if reused else 'trained'})",
    }


def comparison_table(results: Mapping[str, Any]) -> str:
    """The demo's comparison of the teacher and the two students, from what ``results.json``
    holds: parameters, held-out perplexity and the final loss components."""
    header = f"{'model':<16}{'params':>8}{'held-out ppl':>14}{'base (fkl)':>12}{'dsa':>9}{'hra':>9}"
    teacher = results["teacher"]
    lines = [
        header,
        "-" * len(header),
        f"{'teacher':<16}{teacher['params'] / 1e3:>7.0f}k{teacher['perplexity']:>14.2f}",
    ]
    for name, row in results["students"].items():
        extra = "".join(f"{row[k]:>9.4f}" if k in row else f"{'-':>9}" for k in ("dsa", "hra"))
        lines.append(
            f"{'student ' + name:<16}{row['params'] / 1e3:>7.0f}k{row['perplexity']:>14.2f}"
            f"{row['base_loss']:>12.4f}{extra}"
        )
    return "\n".join(lines)


def results_markdown(path: str | os.PathLike[str]) -> str:
    """The README's demo section: the comparison table of the results file ``path`` with where
    it comes from (``mta-distill demo --table PATH`` prints it)."""
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    return (
        f"From `{Path(path).as_posix()}`: `{results['command']}` at commit "
        f"`{results['commit']}`, {results['date']}, {results['machine']}, "
        f"{results['seconds']:.0f} s; layer pairs {results['layer_pairs']}.\n\n"
        f"```\n{comparison_table(results)}\n```"
    )


def run_demo(
    quick: bool = False,
    output_dir: str | os.PathLike[str] = "demo_runs",
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns what ``results.json`` holds."""
    _require_spacy()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no per-run warnings between the progress displays
    try:
        with hub_progress_bars(enabled=False):  # nor a bar for each checkpoint written
            return _run_demo(quick, Path(output_dir), cache_dir, seed)
    finally:
        hf_logging.set_verbosity(verbosity)


def _run_demo(
    quick: bool, output: Path, cache_dir: str | os.PathLike[str] | None, seed: int
) -> dict[str, Any]:
    start = time.perf_counter()
    settings = QUICK if quick else FULL
    if output.is_dir() and any(output.iterdir()):
        print(f"replacing the results of an earlier demo run in {output}/")
    output.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "mta"
    train_texts, heldout_texts = demo_corpus(settings)
    print(
        f"MTA demo ({'quick' if quick else 'full'}): {len(train_texts)} training and "
        f"{len(heldout_texts)} held-out passages from pydoc_data.topics; cache {cache}"
    )
    teacher, tokenizer, reused = load_or_train_teacher(cache, settings, train_texts, seed)
    print(f"teacher: {'reused from cache' if reused else 'trained'} ({_params(teacher)} params)")

    examples = [Example(t, 0, ((0, len(t)),)) for t in train_texts]
    units = load_units(examples, cache / "demo-units.jsonl", progress=True)
    train_set = DistillationDataset(examples, tokenizer, settings.max_length, units=units)
    heldout = [Example(t, 0, ((0, len(t)),)) for t in heldout_texts]
    heldout_set = DistillationDataset(heldout, tokenizer, settings.max_length)

    set_seed(seed)
    student = GPT2LMHeadModel(
        gpt2_config(tokenizer, settings.student_layers, settings.student_width, settings.heads)
    )
    pairs = plan_layers(
        settings.student_layers, settings.teacher_layers, num_key_layers=settings.student_layers
    )
    runs = {
        "KD": (copy.deepcopy(student), None),
        "KD+MTA": (
            copy.deepcopy(student),
            MTALoss(settings.student_width, settings.teacher_width, pairs),
        ),
    }
    histories, rows = {}, {}
    for name, (model, mta_loss) in runs.items():
        directory = name.lower().replace("+", "_")
        histories[name] = distill_student(
            directory, model, teacher, tokenizer, train_set, mta_loss, settings, output, seed
        )
        ppl = perplexity(model, heldout_set, pad_token_id(tokenizer), batch_size=32)
        rows[name] = {"perplexity": ppl, **histories[name][-1]}
    teacher_ppl = perplexity(teacher, heldout_set, pad_token_id(tokenizer), batch_size=32)
    _plot(histories, output / "loss_curves.png")

    pair_text = ", ".join(f"{p.name} {p.granularity}" for p in pairs)
    results = {
        "settings": asdict(settings),
        "teacher": {"perplexity": teacher_ppl, "reused": reused, "params": _count(teacher)},
        "students": {name: {**row, "params": _count(student)} for name, row in rows.items()},
        "layer_pairs": pair_text,
        "seconds": time.perf_counter() - start,
        **_provenance(quick, seed, reused),
    }
    print(f"\nlayer pairs (student-teacher): {pair_text}")
    print(comparison_table(results))
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nloss curves: {output / 'loss_curves.png'}; students: {output / 'kd'}, "
        f"{output / 'kd_mta'}; {results['seconds']:.0f} s"
    )
    return results
