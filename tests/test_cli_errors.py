"""The error contract of the three commands (mta.errors): each user mistake ends with exit status
2 and one line ``<prog>: error: <message>`` on stderr naming the key, file or line — no
traceback — and nothing is written. Every check of ``mta-distill`` here runs before a model loads.

The commands run in-process (``main(argv)``) for the table; a few run as the installed console
scripts to show the same from the outside (exit status, no ``Traceback``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from training_helpers import TINY, write_tiny_run

import mta.model_sources
from mta.cli import main as distill_main
from mta.config import load_config
from mta.evaluate import main as eval_main
from mta.preflight import check_run
from mta.prepare import main as prepare_main

COMMANDS = {"mta-distill": distill_main, "mta-prepare": prepare_main, "mta-eval": eval_main}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny saved teacher and student, a good train.jsonl and the overrides that use them."""
    root = tmp_path_factory.mktemp("tiny_run")
    overrides = write_tiny_run(root)
    (root / "overrides.json").write_text(json.dumps(overrides))
    return root


@pytest.fixture(autouse=True)
def closed_hub(monkeypatch):
    """The hub endpoint is a closed local port: a hub id is never reachable, and fast to refuse,
    whatever network this machine has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    mta.model_sources.hub_reachable.cache_clear()
    yield
    mta.model_sources.hub_reachable.cache_clear()


def _overrides(run_dir: Path, **changes: str) -> list[str]:
    """The good run's overrides with some keys changed (``key=value``)."""
    base = dict(item.split("=", 1) for item in json.loads((run_dir / "overrides.json").read_text()))
    base.update({k.replace("__", "."): v for k, v in changes.items()})
    return [f"{k}={v}" for k, v in base.items()]


@dataclass
class Mistake:
    """``argv(run_dir, tmp)`` → the command's arguments; ``message`` must be in the line."""

    command: str
    argv: Callable[[Path, Path], list[str]]
    message: str


def _distill(**changes: str) -> Callable[[Path, Path], list[str]]:
    def argv(run_dir: Path, tmp: Path) -> list[str]:
        values = {k: v.format(tmp=tmp, run=run_dir) for k, v in changes.items()}
        return ["--config", TINY, *_overrides(run_dir, **values)]

    return argv


def _with_file(name: str, content: str, argv: Callable[[Path, Path], list[str]]):
    """``argv`` after writing ``content`` to ``tmp / name``."""

    def build(run_dir: Path, tmp: Path) -> list[str]:
        (tmp / name).write_text(content, encoding="utf-8")
        return argv(run_dir, tmp)

    return build


def _data(content: str):
    """The good run with ``content`` as its train file."""
    return _with_file(
        "data.jsonl",
        content,
        lambda run_dir, tmp: [
            "--config",
            TINY,
            *_overrides(run_dir, data__train_file=str(tmp / "data.jsonl")),
        ],
    )


def _used_output_dir(run_dir: Path, tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "old.txt").write_text("x")
    return ["--config", TINY, *_overrides(run_dir, training__output_dir=str(tmp / "out"))]


def _prepare(data: str, *options: str):
    """``mta-prepare`` on ``data`` (written to tmp/data.jsonl) into tmp/u.jsonl."""
    return _with_file(
        "data.jsonl",
        data,
        lambda run_dir, tmp: [str(tmp / "data.jsonl"), "--cache", str(tmp / "u.jsonl"), *options],
    )


MISTAKES = {
    "missing data file": Mistake(
        "mta-distill",
        _distill(data__train_file="{tmp}/missing.jsonl"),
        "data.train_file: data file '{tmp}/missing.jsonl' does not exist",
    ),
    "malformed JSONL line": Mistake(
        "mta-distill",
        _data('{"text": "fine"}\n{"text": \n'),
        "data.train_file: {tmp}/data.jsonl:2: not valid JSON",
    ),
    "record of no known format": Mistake(
        "mta-distill",
        _data('{"question": "q"}\n'),
        "data.train_file: {tmp}/data.jsonl:1: cannot tell the format",
    ),
    "empty JSONL": Mistake(
        "mta-distill", _data("\n\n"), "{tmp}/data.jsonl: the file holds no records"
    ),
    "unknown base loss": Mistake(
        "mta-distill",
        _distill(training__base_loss="kl"),
        "config key 'training.base_loss' must be one of ['ce', 'fkl', 'rkl', 'jsd'",
    ),
    "layer pair out of range": Mistake(
        "mta-distill",
        _distill(mta__layer_pairs="[[1, 9, word]]"),
        "mta.layer_pairs: ",
    ),
    "layer pair message names the depths": Mistake(
        "mta-distill",
        _distill(mta__layer_pairs="[[3, 2, word]]"),
        "student layer 3 of layer pair 3-2 is out of range: the student has 2 layers",
    ),
    "authors_code variant with the euclidean metric": Mistake(
        "mta-distill",
        _distill(mta__variant="authors_code", mta__metric="euclidean"),
        "mta.variant=authors_code uses the cosine metric",
    ),
    "unknown variant": Mistake(
        "mta-distill",
        _distill(mta__variant="released"),
        "config key 'mta.variant' must be one of ['paper', 'authors_code']",
    ),
    "student generation from plain-text records": Mistake(
        "mta-distill",
        _with_file(
            "data.jsonl",
            '{"instruction": "Say hi.", "output": "Hi."}\n{"text": "No prompt here."}\n',
            lambda run_dir, tmp: [
                "--config",
                TINY,
                *_overrides(
                    run_dir,
                    data__train_file=str(tmp / "data.jsonl"),
                    training__student_generation="on_policy",
                ),
            ],
        ),
        "training.student_generation=on_policy samples responses from the prompts, but record 2 "
        "of data.train_file '{tmp}/data.jsonl' is plain text (no prompt)",
    ),
    "adaptive student generation without an eval set": Mistake(
        "mta-distill",
        _distill(training__student_generation="adaptive"),
        "training.student_generation=adaptive raises its sampling threshold from the validation "
        "loss: set data.eval_file",
    ),
    "unknown student generation mode": Mistake(
        "mta-distill",
        _distill(training__student_generation="always"),
        "config key 'training.student_generation' must be one of ['off', 'on_policy', 'adaptive']",
    ),
    "teacher adapter that is not an adapter folder": Mistake(
        "mta-distill",
        _distill(model__teacher_adapter="{tmp}"),
        "model.teacher_adapter: '{tmp}' is not a PEFT adapter directory (no adapter_config.json)",
    ),
    "student LoRA with an unknown field": Mistake(
        "mta-distill",
        _distill(model__student_lora="{{r: 4, rank_dropout: 0.1}}"),
        "model.student_lora: not a peft.LoraConfig field:",
    ),
    "unknown key": Mistake(
        "mta-distill", _distill(mta__lamda_dsa="3"), "Did you mean 'mta.lambda_dsa'?"
    ),
    "broken YAML": Mistake(
        "mta-distill",
        _with_file(
            "run.yaml", "model:\n  teacher: [a\n", lambda run, tmp: ["--config", f"{tmp}/run.yaml"]
        ),
        "{tmp}/run.yaml:3:1: not valid YAML",
    ),
    "missing config file": Mistake(
        "mta-distill",
        lambda run_dir, tmp: ["--config", str(tmp / "nope.yaml")],
        "config file '{tmp}/nope.yaml' does not exist",
    ),
    "missing local model directory": Mistake(
        "mta-distill",
        _distill(model__teacher="{tmp}/no-such-teacher"),
        "model.teacher: local directory '{tmp}/no-such-teacher' does not exist",
    ),
    "model directory without config.json": Mistake(
        "mta-distill",
        lambda run_dir, tmp: ["--config", TINY, *_overrides(run_dir, model__student=str(tmp))],
        "model.student: directory '{tmp}' holds no config.json",
    ),
    "hub id that cannot be reached": Mistake(
        "mta-distill",
        _distill(model__teacher="some-org/some-model"),
        "model.teacher: 'some-org/some-model' is not a local directory, the Hugging Face hub "
        "cannot be reached from this machine and the model is not in the local Hugging Face "
        "cache; download it where there is network (huggingface-cli download "
        "some-org/some-model --local-dir DIR) and set model.teacher=DIR",
    ),
    "the shipped template": Mistake(
        "mta-distill",
        lambda run_dir, tmp: ["--config", TINY],
        "the config leaves model.teacher, model.student, data.train_file, training.output_dir "
        "to be set (REPLACE_ME)",
    ),
    "existing output directory": Mistake(
        "mta-distill",
        _used_output_dir,
        "training.output_dir '{tmp}/out' already holds files: choose a new directory, set "
        "training.overwrite_output_dir=true",
    ),
    "missing checkpoint": Mistake(
        "mta-distill",
        _distill(training__resume_from_checkpoint="{tmp}/checkpoint-5"),
        "training.resume_from_checkpoint: '{tmp}/checkpoint-5' is not a checkpoint directory",
    ),
    "unknown template": Mistake(
        "mta-distill",
        _distill(data__template="alpaca"),
        "config key 'data.template' must be one of ['dolly', 'plain'], got 'alpaca'",
    ),
    "max_length too small": Mistake(
        "mta-distill", _distill(data__max_length="1"), "'data.max_length' must be at least 2"
    ),
    "no samples": Mistake(
        "mta-distill",
        _distill(data__max_train_samples="0"),
        "config key 'data.max_train_samples' must be at least 1 (null: all records), got 0",
    ),
    "a string where a number goes": Mistake(
        "mta-distill",
        _distill(training__learning_rate="fast"),
        "config key 'training.learning_rate' expects float, got str 'fast'",
    ),
    "a YAML boolean where a number goes": Mistake(
        "mta-distill",
        _distill(mta__lambda_dsa="yes"),
        "config key 'mta.lambda_dsa' expects float, got bool yes",
    ),
    "mta-prepare: misspelled field": Mistake(
        "mta-prepare",
        _prepare('{"instruction": "a", "response": "b"}\n', "--fields", "instruction", "reponse"),
        "--fields: 'reponse' is in no record of {tmp}/data.jsonl; its records have the fields "
        "instruction, response",
    ),
    "mta-prepare: missing data file": Mistake(
        "mta-prepare",
        lambda run, tmp: [f"{tmp}/none.jsonl", "--cache", f"{tmp}/u.jsonl", "--fields", "text"],
        "data file '{tmp}/none.jsonl' does not exist",
    ),
    "mta-prepare: malformed JSONL line": Mistake(
        "mta-prepare",
        _prepare('{"text": "a"}\nnot json\n', "--fields", "text"),
        "{tmp}/data.jsonl:2: not valid JSON",
    ),
    "mta-prepare: bad --n-process": Mistake(
        "mta-prepare",
        _prepare('{"text": "a"}\n', "--fields", "text", "--n-process", "0"),
        "--n-process must be at least 1, or -1 for one per CPU, got 0",
    ),
    "mta-eval: several seeds of greedy decoding": Mistake(
        "mta-eval",
        lambda run_dir, tmp: [
            "--model",
            str(run_dir / "student"),
            "--data",
            str(run_dir / "train.jsonl"),
            "--seeds",
            "1",
            "2",
        ],
        "--seeds 1 2 without --do-sample would repeat one greedy generation",
    ),
    "mta-eval: missing model directory": Mistake(
        "mta-eval",
        _with_file(
            "test.jsonl",
            '{"instruction": "Say hi.", "output": "Hi."}\n',
            lambda run, tmp: ["--model", f"{tmp}/student", "--data", f"{tmp}/test.jsonl"],
        ),
        "--model: local directory '{tmp}/student' does not exist",
    ),
    "mta-eval: no samples": Mistake(
        "mta-eval",
        lambda run, tmp: [
            "--model",
            f"{run}/student",
            "--data",
            f"{run}/train.jsonl",
            "--max-samples",
            "0",
        ],
        "--max-samples must be at least 1, got 0",
    ),
    "mta-eval: missing data file": Mistake(
        "mta-eval",
        lambda run_dir, tmp: [
            "--model",
            str(run_dir / "student"),
            "--data",
            str(tmp / "test.jsonl"),
        ],
        "--data: data file '{tmp}/test.jsonl' does not exist",
    ),
}


def _files(*roots: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", list(MISTAKES))
def test_mistake_is_one_line_and_exit_2(name, run_dir, tmp_path, capsys):
    mistake = MISTAKES[name]
    argv = mistake.argv(run_dir, tmp_path)
    before = _files(run_dir, tmp_path)
    start = time.perf_counter()
    status = COMMANDS[mistake.command](argv)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2, (status, err)
    assert len(lines) == 1 and lines[0].startswith(f"{mistake.command}: error: "), err
    expected = mistake.message.format(tmp=tmp_path, run=run_dir)
    assert expected in lines[0], f"\nexpected: {expected}\n     got: {lines[0]}"
    assert "Traceback" not in err + out
    assert _files(run_dir, tmp_path) == before, "a refused command wrote files"
    assert elapsed < 20, f"the check took {elapsed:.0f} s"


def test_hub_offline_setting_is_named(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert distill_main(["--config", TINY, *_overrides(run_dir, model__student="gpt2")]) == 2
    assert "model.student: 'gpt2' is not a local directory, HF_HUB_OFFLINE is set" in (
        capsys.readouterr().err
    )


def test_existing_output_dir_is_allowed_when_asked(run_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    overrides = _overrides(run_dir, training__output_dir=str(tmp_path / "out"))
    checked = check_run(load_config(TINY, [*overrides, "training.overwrite_output_dir=true"]))
    assert checked.args.overwrite_output_dir and checked.layer_pairs


def test_tokenizer_folders_of_every_kind_are_accepted(tmp_path):
    for name in ("vocab.txt", "spiece.model", "merges.txt", "tokenizer.json"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("x")
        source = mta.model_sources.resolve_source("--tokenizer", str(folder), "tokenizer")
        assert source.local_files_only and source.name == str(folder)


def test_hub_probe_goes_through_a_proxy(monkeypatch):
    """Behind a proxy a direct connection says nothing: the probe asks through the proxy."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a proxy that refuses at once
    start = time.perf_counter()
    assert mta.model_sources.hub_reachable() is False
    assert time.perf_counter() - start < 10


def test_string_keys_take_yaml_boolean_words(run_dir):
    """Every string-typed key takes no/off/yes/on as the word typed; boolean keys their truth."""
    overrides = _overrides(run_dir)
    config = load_config(
        TINY,
        [
            *overrides,
            "training.save_strategy=no",
            "training.eval_strategy=no",
            "training.fused_lm_head=off",
            "training.hub_model_id=yes",
            "model.attn_implementation=On",
            "data.template=No",
            "training.use_cpu=yes",
            "mta.enabled=on",
            "training.fsdp_config={limit_all_gathers: yes}",
        ],
    )
    assert config.training["save_strategy"] == "no" and config.training["eval_strategy"] == "no"
    assert config.training["fused_lm_head"] == "off"
    assert config.training["hub_model_id"] == "yes" and config.model.attn_implementation == "On"
    assert config.data.template == "No"
    assert config.training["use_cpu"] is True and config.mta.enabled is True
    assert config.training["fsdp_config"] == {"limit_all_gathers": True}
    assert type(config.training["save_strategy"]) is str  # a plain str, YAML-dumpable
    # an on/off choice also takes the other words YAML reads as booleans
    for word, expected in (("true", "on"), ("On", "on"), ("FALSE", "off"), ("no", "off")):
        fused = load_config(TINY, [*overrides, f"training.fused_lm_head={word}"])
        assert fused.training["fused_lm_head"] == expected, word
    # keys inside an untyped mapping are names, kept as the word typed; everything dumps
    kwargs = load_config(TINY, [*overrides, "training.lr_scheduler_kwargs={yes: 1, on: no}"])
    assert kwargs.training["lr_scheduler_kwargs"] == {"yes": 1, "on": False}
    assert yaml.safe_load(yaml.safe_dump(kwargs.to_dict()))["training"]["lr_scheduler_kwargs"]


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("mta-distill", ["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        ("mta-prepare", ["none.jsonl", "--cache", "u.jsonl", "--fields", "text"], "does not exist"),
    ],
)
def test_console_scripts_print_no_traceback(command, argv, message, tmp_path):
    script = Path(sysconfig.get_path("scripts")) / command
    if not script.is_file():
        pytest.skip("mta is imported from the source tree, not installed (no console scripts)")
    env = {k: v for k, v in os.environ.items() if k not in ("MTA_DEBUG", "TRITON_INTERPRET")}
    done = subprocess.run(
        [str(script), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"{command}: error: ")
    assert message in done.stderr and "Traceback" not in done.stderr
    # --debug shows the traceback of the same error
    debug = subprocess.run(
        [str(script), *argv, "--debug"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mta.cli.load_config", interrupted)
    assert distill_main(["--config", "any.yaml"]) == 130
    assert capsys.readouterr().err.strip() == "mta-distill: interrupted"
