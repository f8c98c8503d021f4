"""``mta-distill``: run an MTA distillation from a YAML config, or the embedded demo.

Usage::

    mta-distill --config run.yaml [section.key=value ...]   # e.g. training.learning_rate=1e-4
    mta-distill --config run.yaml --print-config            # resolved config, then exit
    mta-distill demo [--quick] [--output-dir DIR] [--cache-dir DIR]

The same command runs on several processes under ``torchrun --nproc_per_node N`` or
``accelerate launch`` (DDP through ``transformers``/``accelerate``; FSDP and DeepSpeed through the
usual ``training.fsdp`` / ``training.deepspeed`` settings). Heavy libraries are imported only
after the arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mta.config import RunConfig, load_config

if TYPE_CHECKING:
    from mta.trainer import MTATrainer

__all__ = ["build_trainer", "main", "run"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "mta_config.yaml"


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta-distill",
        description="Distill a teacher LLM into a student with a base KD loss plus MTA. "
        "Subcommand: `mta-distill demo [--quick]` runs the embedded demo.",
    )
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values, e.g. training.learning_rate=1e-4 mta.lambda_dsa=3",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta-distill demo",
        description="Offline demo: train (or reuse) a small teacher on the text of Python's "
        "pydoc_data.topics, distill a smaller student with KD and with KD+MTA, compare them.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller run (under a minute)")
    parser.add_argument("--output-dir", default="demo_runs", help="where results go")
    parser.add_argument(
        "--cache-dir", default=None, help="teacher and units cache (default ~/.cache/mta)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _dtype(name: str) -> Any:
    """``torch.dtype`` for a config dtype name (``"auto"`` kept as is)."""
    import torch

    return name if name == "auto" else getattr(torch, name)


def build_trainer(config: RunConfig) -> MTATrainer:
    """Load tokenizers, models and data of ``config`` and build the :class:`MTATrainer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mta.data import DistillationCollator, build_dataset, pad_token_id
    from mta.layers import plan_layers
    from mta.loss import MTALoss
    from mta.trainer import MTATrainer, MTATrainingArguments, same_tokenizer

    if "output_dir" not in config.training:
        raise ValueError("config key 'training.output_dir' is required (where the student goes)")
    args = MTATrainingArguments(**config.training)
    m, d = config.model, config.data
    remote = {"trust_remote_code": m.trust_remote_code}
    student_tokenizer = AutoTokenizer.from_pretrained(m.student_tokenizer or m.student, **remote)
    teacher_tokenizer = AutoTokenizer.from_pretrained(m.teacher_tokenizer or m.teacher, **remote)
    cross = not same_tokenizer(student_tokenizer, teacher_tokenizer)
    use_mta = config.mta.enabled and (config.mta.lambda_dsa > 0 or config.mta.lambda_hra > 0)

    def dataset(path: str, limit: int | None):
        return build_dataset(
            path,
            student_tokenizer,
            fmt=d.format,
            template=d.template,
            max_length=d.max_length,
            max_samples=limit,
            teacher_tokenizer=teacher_tokenizer if cross else None,
            with_units=use_mta,
            units_cache=d.units_cache,
            nlp=d.spacy_model,
            write_cache=args.process_index == 0,
        )

    with args.main_process_first(desc="tokenize and map units"):
        train_dataset = dataset(d.train_file, d.max_train_samples)
        eval_dataset = dataset(d.eval_file, d.max_eval_samples) if d.eval_file else None

    model_kwargs = {**remote}
    if m.attn_implementation is not None:
        model_kwargs["attn_implementation"] = m.attn_implementation
    teacher = AutoModelForCausalLM.from_pretrained(
        m.teacher, dtype=_dtype(m.teacher_dtype), **model_kwargs
    )
    student = AutoModelForCausalLM.from_pretrained(
        m.student, dtype=_dtype(m.student_dtype), **model_kwargs
    )
    mta_loss = None
    if use_mta:
        s_cfg, t_cfg = student.config.get_text_config(), teacher.config.get_text_config()
        pairs = plan_layers(
            s_cfg.num_hidden_layers,
            t_cfg.num_hidden_layers,
            config.mta.num_key_layers,
            config.mta.num_word_layers,
            config.mta.stride,
            pairs=config.mta.layer_pairs,
        )
        mta_loss = MTALoss(
            s_cfg.hidden_size,
            t_cfg.hidden_size,
            pairs,
            lambda_dsa=config.mta.lambda_dsa,
            lambda_hra=config.mta.lambda_hra,
            metric=config.mta.metric,
            use_dsa=config.mta.lambda_dsa > 0,
            use_hra=config.mta.lambda_hra > 0,
        )
    collator = DistillationCollator(
        pad_token_id(student_tokenizer), pad_token_id(teacher_tokenizer) if cross else None
    )
    return MTATrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        mta_loss=mta_loss,
        processing_class=student_tokenizer,
        teacher_processing_class=teacher_tokenizer if cross else None,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )


def run(config: RunConfig) -> MTATrainer:
    """Train as configured; the student (plain HF model), its projectors and the resolved config
    end up in ``training.output_dir``."""
    from transformers import set_seed

    set_seed(int(config.training.get("seed", 42)))
    trainer = build_trainer(config)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.args.should_save:
        path = Path(trainer.args.output_dir) / CONFIG_NAME
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mta-distill``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        opts = _demo_parser().parse_args(argv[1:])
        from mta.demo import run_demo

        run_demo(
            quick=opts.quick, output_dir=opts.output_dir, cache_dir=opts.cache_dir, seed=opts.seed
        )
        return 0
    opts = _train_parser().parse_args(argv)
    try:
        config = load_config(opts.config, opts.overrides)
    except (FileNotFoundError, TypeError, ValueError) as err:
        print(f"mta-distill: error: {err}", file=sys.stderr)
        return 2
    if opts.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    run(config)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Destroy the process group a distributed run (torchrun, accelerate launch) created: left to
    interpreter shutdown, gloo's threads can abort the process ("terminate called without an
    active exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
