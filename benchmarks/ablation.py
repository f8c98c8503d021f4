"""A toy-scale ablation on this machine's CPU: KD, KD+DSA, KD+HRA, KD+MTA (the paper's equations)
and KD+MTA (the authors' released code), each over a small learning-rate sweep and 3 student
seeds, on the embedded corpus of ``mta-distill demo`` (its full-size models and budget).

One teacher (the demo's, seed 0) serves every run; each run distills a fresh student (seed 0, 1
or 2) for the demo's 200 steps with forward KL as the base loss, and reports its held-out
perplexity. Every method gets the learning rate with the best mean perplexity over the seeds
in the same sweep, so MTA is not compared against a KD run at a learning rate where KD alone is
unstable. ``--out`` writes every run as a CSV row; ``--markdown`` and ``--plot`` turn a CSV into
the README table (mean ± std over seeds, each method at its best learning rate, and the whole
sweep) and a bar chart.

Usage (about 30 minutes on 2 CPU cores)::

    python -m benchmarks.ablation --out benchmarks/results/ablation_cpu.csv
    python -m benchmarks.ablation --markdown benchmarks/results/ablation_cpu.csv
    python -m benchmarks.ablation --plot benchmarks/results/ablation_cpu.csv \\
        --png benchmarks/results/ablation_cpu.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import GPT2LMHeadModel, set_seed

from benchmarks import harness
from mta.data import DistillationDataset, Example, load_units, pad_token_id
from mta.demo import FULL, demo_corpus, distill_student, gpt2_config, load_or_train_teacher
from mta.evaluate import perplexity
from mta.layers import plan_layers
from mta.loss import MTALoss

RESULTS = Path(__file__).resolve().parent / "results" / "ablation_cpu.csv"
COLUMNS = ("method", "learning_rate", "seed", "perplexity", "machine", "commit", "date")
#: method -> (MTALoss options, or None for KD alone)
METHODS: dict[str, dict | None] = {
    "KD": None,
    "KD+DSA": {"use_hra": False},
    "KD+HRA": {"use_dsa": False},
    "KD+MTA (paper)": {},
    "KD+MTA (authors_code)": {"variant": "authors_code"},
}
LEARNING_RATES = (1e-3, 3e-3)
SEEDS = (0, 1, 2)
TEACHER_SEED = 0


def run(cache: Path) -> list[dict[str, str]]:
    """Every (method, learning rate, seed) run: one CSV row each."""
    settings = FULL
    train_texts, heldout_texts = demo_corpus(settings)
    teacher, tokenizer, _ = load_or_train_teacher(cache, settings, train_texts, TEACHER_SEED)
    examples = [Example(t, 0, ((0, len(t)),)) for t in train_texts]
    datasets = {
        rules: DistillationDataset(
            examples,
            tokenizer,
            settings.max_length,
            units=load_units(examples, cache / f"demo-units-{rules}.jsonl", rules=rules),
            membership="overlap" if rules == "paper" else "authors_code",
        )
        for rules in ("paper", "authors_code")
    }
    heldout = DistillationDataset(
        [Example(t, 0, ((0, len(t)),)) for t in heldout_texts], tokenizer, settings.max_length
    )
    pairs = plan_layers(
        settings.student_layers, settings.teacher_layers, num_key_layers=settings.student_layers
    )
    stamp = {
        "machine": harness.machine(),
        "commit": harness.git_commit(),
        "date": harness.utc_now(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for lr in LEARNING_RATES:
            for seed in SEEDS:
                set_seed(seed)
                student = GPT2LMHeadModel(
                    gpt2_config(
                        tokenizer, settings.student_layers, settings.student_width, settings.heads
                    )
                )
                for method, options in METHODS.items():
                    mta_loss = (
                        None
                        if options is None
                        else MTALoss(
                            settings.student_width, settings.teacher_width, pairs, **options
                        )
                    )
                    rules = "authors_code" if (options or {}).get("variant") else "paper"
                    model = copy.deepcopy(student)
                    distill_student(
                        "run",
                        model,
                        teacher,
                        tokenizer,
                        datasets[rules],
                        mta_loss,
                        dataclasses.replace(settings, distill_lr=lr),
                        Path(scratch),
                        seed,
                    )
                    ppl = perplexity(model, heldout, pad_token_id(tokenizer), batch_size=32)
                    rows.append(
                        {
                            "method": method,
                            "learning_rate": f"{lr:g}",
                            "seed": str(seed),
                            "perplexity": f"{ppl:.4f}",
                            **stamp,
                        }
                    )
                    print(f"{method:<24} lr {lr:g} seed {seed}: perplexity {ppl:.2f}", flush=True)
    return rows


def summary(path: Path) -> list[dict[str, object]]:
    """Per (method, learning rate): mean and std of perplexity over seeds, and whether it is the
    method's best learning rate."""
    runs = harness.read_rows(path, COLUMNS)
    cells: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["learning_rate"]), []).append(float(r["perplexity"]))
    out = []
    for (method, lr), values in cells.items():
        out.append(
            {
                "method": method,
                "learning_rate": lr,
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": len(values),
            }
        )
    for method in {row["method"] for row in out}:
        mine = [row for row in out if row["method"] == method]
        best = min(mine, key=lambda row: row["mean"])
        for row in mine:
            row["best"] = row is best
    order = list(METHODS)
    return sorted(out, key=lambda row: (order.index(row["method"]), float(row["learning_rate"])))


def markdown_table(path: Path) -> str:
    table = summary(path)
    runs = harness.read_rows(path, COLUMNS)
    best = [row for row in table if row["best"]]
    lines = [
        f"Computed by `python -m benchmarks.ablation --out {Path(path).as_posix()}` on "
        f"{runs[0]['machine']} (commit {runs[0]['commit']}, {runs[0]['date'][:10]}): held-out "
        f"perplexity, mean ± std over seeds {', '.join(str(s) for s in SEEDS)}; each method at "
        "its best learning rate of the sweep, then the whole sweep.",
        "",
        harness.markdown_table(
            ("method", "best learning rate", "perplexity"),
            [[r["method"], r["learning_rate"], f"{r['mean']:.2f} ± {r['std']:.2f}"] for r in best],
            right=(1, 2),
        ),
        "",
        harness.markdown_table(
            ("method", *(f"lr {lr:g}" for lr in LEARNING_RATES)),
            [
                [
                    method,
                    *(
                        f"{r['mean']:.2f} ± {r['std']:.2f}"
                        for lr in LEARNING_RATES
                        for r in table
                        if r["method"] == method and float(r["learning_rate"]) == lr
                    ),
                ]
                for method in METHODS
            ],
            right=range(1, 1 + len(LEARNING_RATES)),
        ),
    ]
    return "\n".join(lines)


def plot(path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [row for row in summary(path) if row["best"]]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(
        [f"{r['method']}\nlr {r['learning_rate']}" for r in best],
        [r["mean"] for r in best],
        yerr=[r["std"] for r in best],
        capsize=4,
        color="#4c72b0",
    )
    ax.set(ylabel="held-out perplexity", title="Toy ablation (CPU), mean ± std over 3 seeds")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="run the ablation and write its CSV here")
    p.add_argument("--markdown", type=Path, metavar="CSV", help="print the tables of a CSV")
    p.add_argument("--plot", type=Path, metavar="CSV", help="draw the bar chart of a CSV")
    p.add_argument("--png", type=Path, default=RESULTS.with_suffix(".png"))
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mta")
    args = p.parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(args.markdown))
    elif args.plot is not None:
        plot(args.plot, args.png)
    elif args.out is not None:
        harness.write_rows(args.out, run(args.cache_dir), COLUMNS)
    else:
        p.error("give --out, --markdown or --plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
