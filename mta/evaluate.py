"""``mta-eval``: ROUGE-L of generated responses and perplexity of the references, as in the MTA
paper's evaluation (Dolly, SelfInst, Vicuna, S-NI test sets in the Dolly JSONL format).

Usage::

    mta-eval --model runs/gpt2-dolly --data dolly/test.jsonl [--seeds 10 20 30 40 50]
             [--do-sample --temperature 1.0 --top-p 1.0] [--max-new-tokens 256]
             [--output predictions.jsonl]

* ROUGE-L: the F-measure of ``rouge-score``'s ``rougeL`` (with stemming) between each generated
  response and the reference ``output``, ×100, averaged over examples, then over seeds (the paper
  samples with 5 seeds; greedy decoding needs one).
* Perplexity: ``exp`` of the mean next-token negative log-likelihood of the reference responses
  (and their EOS token) given the prompts, with teacher forcing.

Prompts are built exactly as for training (:func:`mta.data.format_record`, same template).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mta.errors import DEBUG_HELP, UserError, run_command
from mta.model_sources import load_pretrained, resolve_source

__all__ = ["generate", "main", "perplexity", "rouge_l"]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure ×100 (``rouge_score``, Porter stemming)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("predictions and references must have the same length")
    if not predictions:
        raise ValueError("nothing to score: predictions is empty")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    max_prompt_length: int = 512,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Responses of ``model`` to ``prompts`` (left-padded batches, special tokens removed)."""
    import torch

    restore = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2, LLaMA: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt_length,
            ).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = restore
    return outputs


def perplexity(model: Any, dataset: Any, pad_token_id: int, batch_size: int = 8) -> float:
    """``exp`` of the mean NLL over the labelled (response) tokens of a
    :class:`mta.data.DistillationDataset`."""
    import torch

    from mta.data import DistillationCollator

    collate = DistillationCollator(pad_token_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate(
                [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            )
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    return math.exp(total / max(count, 1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mta-eval",
        description="Generate responses on a JSONL test set and report ROUGE-L and perplexity.",
    )
    p.add_argument("--model", required=True, help="HF model id or directory (e.g. a student)")
    p.add_argument("--tokenizer", default=None, help="defaults to --model")
    p.add_argument("--data", required=True, help="JSONL test set (instruction/input/output, ...)")
    p.add_argument("--format", default="auto", choices=["auto", "instruction", "prompt"])
    p.add_argument("--template", default="dolly")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512, help="max prompt(+response) tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one sampled generation per seed (needs --do-sample when more than one)",
    )
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default=None, help="write predictions (JSONL) here")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mta-eval``: prints a JSON summary and returns the exit status (2 for a
    user error, see :mod:`mta.errors`)."""
    opts = _parser().parse_args(argv)
    return run_command("mta-eval", lambda: _evaluate(opts), debug=opts.debug)


def _examples(opts: argparse.Namespace) -> list[Any]:
    """The prompt/response examples of ``--data`` (every check before a model loads)."""
    from mta.data import read_examples

    if len(opts.seeds) > 1 and not opts.do_sample:
        raise UserError(
            f"--seeds {' '.join(map(str, opts.seeds))} without --do-sample would repeat one "
            "greedy generation: add --do-sample (and --temperature/--top-p), or give one seed"
        )
    for name, value in (
        ("--max-new-tokens", opts.max_new_tokens),
        ("--batch-size", opts.batch_size),
        ("--max-samples", 1 if opts.max_samples is None else opts.max_samples),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if opts.max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {opts.max_length}")
    try:
        examples = read_examples(opts.data, opts.format, opts.template, opts.max_samples)
    except (OSError, TypeError, ValueError) as err:
        raise UserError(f"--data: {err}") from None
    for example in examples:
        if not example.prompt:
            raise UserError(
                f"--data: {opts.data} holds plain text records; mta-eval needs prompt/response "
                "records (instruction/input/output or prompt/output)"
            )
    return examples


def _evaluate(opts: argparse.Namespace) -> int:
    examples = _examples(opts)
    model_source = resolve_source("--model", opts.model)
    tokenizer_source = (
        resolve_source("--tokenizer", opts.tokenizer, "tokenizer")
        if opts.tokenizer
        else resolve_source(
            "--model (its tokenizer, unless --tokenizer is set)", opts.model, "tokenizer"
        )
    )
    if opts.output and Path(opts.output).is_dir():
        raise UserError(f"--output {opts.output!r} is a directory; give the path of a JSONL file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from mta.data import DistillationDataset, pad_token_id

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = opts.dtype if opts.dtype == "auto" else getattr(torch, opts.dtype)
    tokenizer = load_pretrained(AutoTokenizer, tokenizer_source)
    model = load_pretrained(AutoModelForCausalLM, model_source, dtype=dtype)
    model = model.to(device).eval()
    prompts = [e.prompt for e in examples]
    references = [e.response for e in examples]
    per_seed, generations = [], []
    for seed in opts.seeds:
        set_seed(seed)
        predictions = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=opts.max_new_tokens,
            max_prompt_length=opts.max_length,
            batch_size=opts.batch_size,
            do_sample=opts.do_sample,
            temperature=opts.temperature,
            top_p=opts.top_p,
        )
        per_seed.append(rouge_l(predictions, references))
        generations.append(predictions)
    summary: dict[str, Any] = {
        "model": opts.model,
        "data": opts.data,
        "n": len(examples),
        "rougeL": sum(per_seed) / len(per_seed),
        "rougeL_per_seed": dict(zip(opts.seeds, per_seed, strict=True)),
    }
    if not opts.no_perplexity:
        dataset = DistillationDataset(examples, tokenizer, opts.max_length)
        summary["perplexity"] = perplexity(model, dataset, pad_token_id(tokenizer), opts.batch_size)
    if opts.output:
        path = Path(opts.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for i, (example, reference) in enumerate(zip(examples, references, strict=True)):
                row = {"prompt": example.prompt, "reference": reference}
                row.update(
                    {
                        f"prediction_seed{s}": g[i]
                        for s, g in zip(opts.seeds, generations, strict=True)
                    }
                )
                handle.write(json.dumps(row) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
