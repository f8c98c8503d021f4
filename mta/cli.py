"""``mta-distill``: run an MTA distillation from a YAML config, or the embedded demo.

Usage::

    mta-distill --config run.yaml [section.key=value ...]   # e.g. training.learning_rate=1e-4
    mta-distill --config run.yaml --print-config            # resolved config, then exit
    mta-distill demo [--quick] [--output-dir DIR] [--cache-dir DIR]
    mta-distill demo --table results.json                   # an earlier run's comparison

The same command runs on several processes under ``torchrun --nproc_per_node N`` or
``accelerate launch`` (DDP through ``transformers``/``accelerate``; FSDP and DeepSpeed through the
usual ``training.fsdp`` / ``training.deepspeed`` settings). Heavy libraries are imported only
after the arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mta.config import RunConfig, load_config
from mta.errors import DEBUG_HELP, UserError, run_command
from mta.model_sources import ModelSource, load_pretrained
from mta.preflight import CheckedRun, check_run
from mta.progress import hub_progress_bars

if TYPE_CHECKING:
    from mta.trainer import MTATrainer

__all__ = ["build_trainer", "main", "run", "train"]

CONFIG_NAME = "mta_config.yaml"


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta-distill",
        description="Distill a teacher LLM into a student with a base KD loss plus MTA. "
        "Subcommand: `mta-distill demo [--quick]` runs the embedded demo. A mistake in the "
        "config, the data or the models' locations is reported in one line (exit status 2) "
        "before any model loads.",
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
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
    parser.add_argument(
        "--table",
        metavar="RESULTS_JSON",
        help="print the comparison of an earlier run's results.json as Markdown (with its "
        "commit, date and machine) and exit",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def _dtype(name: str) -> Any:
    """``torch.dtype`` for a config dtype name (``"auto"`` kept as is)."""
    import torch

    return name if name == "auto" else getattr(torch, name)


def build_trainer(config: RunConfig) -> MTATrainer:
    """Check ``config`` (:func:`mta.preflight.check_run`: every check that needs no model), then
    load the tokenizers, the data and the models and build the :class:`MTATrainer`.

    Raises:
        UserError: a mistake found before any model loads, naming its key, file or line.
    """
    return _build(check_run(config))


def _build(checked: CheckedRun) -> MTATrainer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mta.adapters import lora_config, merge_teacher_adapter
    from mta.data import (
        DistillationCollator,
        DistillationDataset,
        load_units,
        pad_token_id,
        same_tokenizer,
    )
    from mta.loss import MTALoss
    from mta.trainer import MTATrainer
    from mta.unit_pool import UnitPool

    config, args = checked.config, checked.args
    m, d = config.model, config.data
    remote = {"trust_remote_code": m.trust_remote_code}

    def load(loader: Any, source: ModelSource, **kwargs: Any) -> Any:
        return load_pretrained(loader, source, **remote, **kwargs)

    student_tokenizer = load(AutoTokenizer, checked.student_tokenizer)
    teacher_tokenizer = load(AutoTokenizer, checked.teacher_tokenizer)
    cross = not same_tokenizer(student_tokenizer, teacher_tokenizer)
    if cross and checked.use_mta and config.mta.variant == "authors_code":
        raise UserError(
            "mta.variant=authors_code needs one tokenizer for both models (the released code has "
            "no cross-tokenizer path), but the teacher's and the student's tokenizers differ: "
            "set mta.variant=paper or give both models the same tokenizer"
        )
    if cross and args.base_loss != "ce":
        raise UserError(
            f"training.base_loss={args.base_loss} compares the two models' logits, but the "
            "teacher's and the student's tokenizers differ, so their vocabularies do not match: "
            "set training.base_loss=ce (MTA's units still align across tokenizers) or give both "
            "models the same tokenizer"
        )

    def dataset(key: str, path: str, examples: list) -> DistillationDataset:
        try:
            units = (
                load_units(
                    examples,
                    d.units_cache,
                    d.spacy_model,
                    write_cache=args.process_index == 0,
                    progress=args.process_index == 0,
                    rules=config.mta.variant,
                )
                if checked.use_mta
                else None
            )
            return DistillationDataset(
                examples,
                student_tokenizer,
                d.max_length,
                teacher_tokenizer=teacher_tokenizer if cross else None,
                units=units,
                membership="overlap" if config.mta.variant == "paper" else "authors_code",
            )
        except (ImportError, TypeError, ValueError) as err:
            raise UserError(f"{key} {path!r}: {err}") from None

    with args.main_process_first(desc="tokenize and map units"):
        train_dataset = dataset("data.train_file", d.train_file, checked.train_examples)
        eval_dataset = (
            dataset("data.eval_file", d.eval_file, checked.eval_examples)
            if checked.eval_examples is not None
            else None
        )

    model_kwargs = {}
    if m.attn_implementation is not None:
        model_kwargs["attn_implementation"] = m.attn_implementation
    teacher = load(
        AutoModelForCausalLM, checked.teacher, dtype=_dtype(m.teacher_dtype), **model_kwargs
    )
    student = load(
        AutoModelForCausalLM, checked.student, dtype=_dtype(m.student_dtype), **model_kwargs
    )
    if m.teacher_adapter is not None:
        teacher = merge_teacher_adapter(teacher, m.teacher_adapter)
    if m.student_lora is not None:
        from peft import get_peft_model

        student = get_peft_model(student, lora_config(m.student_lora))
    mta_loss = None
    if checked.layer_pairs is not None:
        mta_loss = MTALoss(
            checked.student_dims[1],
            checked.teacher_dims[1],
            checked.layer_pairs,
            lambda_dsa=config.mta.lambda_dsa,
            lambda_hra=config.mta.lambda_hra,
            metric=config.mta.metric,
            projection_dtype=_dtype(config.mta.projection_dtype),
            variant=config.mta.variant,
            use_dsa=config.mta.lambda_dsa > 0,
            use_hra=config.mta.lambda_hra > 0,
        )
    collator = DistillationCollator(
        pad_token_id(student_tokenizer),
        pad_token_id(teacher_tokenizer) if cross else None,
        with_examples=args.student_generation != "off",
    )
    unit_pool = None
    if checked.use_mta and args.student_generation != "off":
        # the sampled responses' units: parsed in the background, cached beside the dataset's
        unit_pool = UnitPool(
            d.spacy_model,
            processes=args.unit_workers,
            rules=config.mta.variant,
            cache=d.units_cache,
            write_cache=args.process_index == 0,
        )
    try:
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
            unit_pool=unit_pool,
        )
    except (
        TypeError,
        ValueError,
    ) as err:  # the trainer's checks of the models against the settings
        raise UserError(f"training: {err}") from None


def train(trainer: MTATrainer, config: RunConfig) -> MTATrainer:
    """Train as configured; the student (plain HF model), its projectors and the resolved config
    end up in ``training.output_dir``."""
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.args.should_save:
        path = Path(trainer.args.output_dir) / CONFIG_NAME
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return trainer


def _seed(config: RunConfig) -> None:
    from transformers import set_seed

    set_seed(int(config.training.get("seed", 42)))


def run(config: RunConfig) -> MTATrainer:
    """Check, build and train (:func:`build_trainer`, then :func:`train`)."""
    _seed(config)
    return train(build_trainer(config), config)


def _distill(opts: argparse.Namespace) -> int:
    config = load_config(opts.config, opts.overrides)
    if opts.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    _seed(config)
    try:
        # The trainer lives only inside this call: freed while every process of a distributed
        # run is still there (its DDP state can wait on the peers when destroyed).
        _build_and_train(config)
    finally:
        _close_process_group()
    return 0


def _build_and_train(config: RunConfig) -> None:
    trainer = build_trainer(config)
    with hub_progress_bars(enabled=not trainer.args.disable_tqdm):
        train(trainer, config)


def _demo(opts: argparse.Namespace) -> int:
    from mta.demo import results_markdown, run_demo

    if opts.table is not None:
        try:
            print(results_markdown(opts.table))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"--table {opts.table!r}: not a demo results.json ({err!r})") from None
        return 0
    try:
        run_demo(
            quick=opts.quick, output_dir=opts.output_dir, cache_dir=opts.cache_dir, seed=opts.seed
        )
    except ImportError as err:  # spaCy missing: the message says what to install
        raise UserError(str(err)) from err
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mta-distill``; returns the exit status (2 for a user error, see
    :mod:`mta.errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        opts = _demo_parser().parse_args(argv[1:])
        return run_command("mta-distill demo", lambda: _demo(opts), debug=opts.debug)
    opts = _train_parser().parse_args(argv)
    return run_command("mta-distill", lambda: _distill(opts), debug=opts.debug)


def _close_process_group() -> None:
    """Destroy the process group a distributed run (torchrun, accelerate launch) created: left to
    interpreter shutdown, gloo's threads can abort the process ("terminate called without an
    active exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
