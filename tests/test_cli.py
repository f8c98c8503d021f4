"""Tests of the YAML config, ``mta-distill`` (config runs and the demo) and ``mta-eval``.

The end-to-end runs call ``main()`` in-process (the console scripts are thin shims around it;
``--help`` checks the installed entry points) and need spaCy for the units. As in
tests/test_trainer.py the MTA ops take their eager reference on CPU (what a user's CPU run does).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sysconfig
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from training_helpers import CONFIGS, RECORDS, TINY, gpt2, make_tokenizer, write_tiny_run

from mta.checkpoints import PROJECTORS_NAME
from mta.cli import CONFIG_NAME, build_trainer, main
from mta.config import load_config
from mta.data import format_record
from mta.errors import UserError
from mta.evaluate import generate, rouge_l
from mta.evaluate import main as eval_main

pytestmark = pytest.mark.usefixtures("eager_mta_ops")


def test_entry_points_answer_help():
    """The installed console scripts, run from this interpreter's own scripts folder (never
    found through PATH, which a fresh machine does not set up)."""
    try:
        dist = importlib.metadata.distribution("mta")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mta is imported from the source tree, not installed (no console scripts)")
    scripts = {e.name for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"mta-distill", "mta-prepare", "mta-eval"}
    folder = Path(sysconfig.get_path("scripts"))
    for command in sorted(scripts):
        path = folder / command
        assert path.is_file(), f"{command} is declared but not installed in {folder}"
        out = subprocess.run([str(path), "--help"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith(f"usage: {command}"), out.stdout[:200]


def test_repository_configs_load():
    config = load_config(CONFIGS / "gpt2-xl_to_gpt2_dolly.yaml")
    assert (config.model.teacher, config.model.student) != ("", "")
    assert config.training["base_loss"] == "skew_rkl" and config.mta.lambda_dsa == 2.0
    assert isinstance(config.training["learning_rate"], float)  # "5.0e-4" read as a float
    tiny = load_config(TINY, ["training.learning_rate=1e-4", "mta.layer_pairs=[[1, 2, word]]"])
    assert tiny.training["learning_rate"] == 1e-4 and tiny.mta.layer_pairs == [(1, 2, "word")]
    # YAML 1.1 reads unquoted on/off as booleans: a choice of strings takes the word typed
    for value, expected in (("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")):
        fused = load_config(TINY, [f"training.fused_lm_head={value}"])
        assert fused.training["fused_lm_head"] == expected


RELEASED_RECIPES = sorted((CONFIGS / "authors_code").glob("*.yaml"))


def test_released_recipes_are_the_authors_variant():
    assert [p.name for p in RELEASED_RECIPES] == [
        "gpt2-1.5B_to_gpt2_dolly.yaml",
        "opt-6.7B_to_1.3B_dolly.yaml",
        "qwen1.5-1.8B_to_0.5B_dolly.yaml",
    ]
    for path in RELEASED_RECIPES:
        config = load_config(path)
        assert config.mta.variant == "authors_code" and config.mta.metric == "cosine"
        assert config.training["base_loss"] == "skew_rkl"
        assert config.data.max_length == 256 and config.training["num_train_epochs"] == 5
        # one word-level pair first, then the phrase-level ones (--split_layer_mapping 0 1 n n)
        granularities = [g for _, _, g in config.mta.layer_pairs]
        assert granularities == ["word"] + ["phrase"] * (len(granularities) - 1)
        text = path.read_text()
        assert "student generation" in text.lower()  # each says how it samples
        training = config.training  # DistiLLM's adaptive sampling, as released
        assert training["student_generation"] == "adaptive"
        assert training["replay_buffer_size"] == 1000 and training["eval_on_start"]
        assert training["adaptive_init_threshold"] == 0.0 and training["adaptive_loss_eps"] == 0.1


@pytest.mark.parametrize("recipe", RELEASED_RECIPES, ids=lambda p: p.stem)
def test_released_recipes_run_at_tiny_size(recipe, tmp_path):
    """Each released recipe, its models, sizes and schedule swapped for tiny ones, trains."""
    pytest.importorskip("spacy")
    records = [r for r in RECORDS if "instruction" in r]
    overrides = write_tiny_run(tmp_path, records)
    train = str(tmp_path / "train.jsonl")
    tiny = [
        f"data.eval_file={train}",
        "model.teacher_dtype=float32",
        "mta.layer_pairs=[[1, 2, word], [2, 4, phrase]]",
        "training.max_steps=2",
        "training.per_device_train_batch_size=2",
        "training.per_device_eval_batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.bf16=false",
        "training.use_cpu=true",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "training.disable_tqdm=true",
    ]
    if load_config(recipe).training.get("student_generation", "off") != "off":
        # sample from the first step (θ = 1) into a 2-example buffer, in one unit worker process
        tiny += [
            "training.adaptive_init_threshold=1.0",
            "training.replay_buffer_size=2",
            "training.generation_max_new_tokens=8",
            "training.unit_workers=1",
            "training.eval_on_start=false",
        ]
    assert main(["--config", str(recipe), *overrides, *tiny]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["mta.lamda_dsa=3"],
            "unknown config key 'mta.lamda_dsa'. Did you mean 'mta.lambda_dsa'",
        ),
        (["trainer.seed=1"], "unknown config key 'trainer'"),
        (["training.learing_rate=1"], "Did you mean 'training.learning_rate'"),
        (["mta.lambda_dsa=high"], "'mta.lambda_dsa' expects float, got str 'high'"),
        (["training.max_steps=2.5"], "'training.max_steps' expects int"),
        (["mta.metric=l2"], r"'mta.metric' must be one of \['cosine', 'euclidean'\]"),
        (["training.fused_lm_head=always"], r"must be one of \['auto', 'on', 'off'\]"),
        (["mta.layer_pairs=[[1, 2]]"], r"'mta.layer_pairs\[0\]' expects 3 items"),
        (["data.max_length"], "must look like 'section.key=value'"),
        (["data.max_length.x=3"], "'max_length' is a value, not a section"),
        (["data.train_file=null"], "'data.train_file' expects str"),
        (["model=gpt2"], "config section 'model' must be a mapping"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(TINY, overrides)


def test_config_missing_keys_and_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"teacher": "t"}, "data": {"train_file": "x"}}))
    with pytest.raises(UserError, match=r"missing required key\(s\) 'model.student'"):
        load_config(path)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    # the CLI turns config errors into a one-line message and exit status 2
    assert main(["--config", TINY, "mta.lamda_dsa=3"]) == 2
    assert "Did you mean 'mta.lambda_dsa'" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["--config", TINY, "--print-config", "mta.lambda_hra=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["mta"]["lambda_hra"] == 0.5 and printed["training"]["max_steps"] == 2


def test_distill_and_evaluate_end_to_end(tmp_path, capsys):
    pytest.importorskip("spacy")
    overrides = write_tiny_run(tmp_path)
    assert main(["--config", TINY, *overrides]) == 0
    out = tmp_path / "out"
    assert {"model.safetensors", PROJECTORS_NAME, CONFIG_NAME, "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert all(k.startswith(("transformer.", "lm_head.")) for k in weights)  # a plain GPT-2
    assert yaml.safe_load((out / CONFIG_NAME).read_text())["model"]["teacher"].endswith("teacher")
    capsys.readouterr()
    eval_file = tmp_path / "test.jsonl"
    prompted = [r for r in RECORDS if "text" not in r]
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in prompted))
    pred = tmp_path / "pred.jsonl"
    args = ["--model", str(out), "--max-new-tokens", "8", "--batch-size", "4"]
    assert eval_main([*args, "--data", str(eval_file), "--output", str(pred)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == len(prompted) and 0 <= summary["rougeL"] <= 100
    assert math.isfinite(summary["perplexity"]) and summary["perplexity"] > 1
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == len(prompted) and isinstance(rows[0]["prediction_seed0"], str)
    assert eval_main([*args, "--data", str(tmp_path / "train.jsonl")]) == 2
    assert "holds plain text records" in capsys.readouterr().err


def test_generate_left_pads_without_a_pad_token():
    tok = make_tokenizer([format_record(r).text for r in RECORDS], "metaspace", 340)
    assert tok.pad_token is None
    model = gpt2(tok, 2, 32).eval()
    prompts = ["Name the colour of a clear sky.", "Cats sleep"]
    batched = generate(model, tok, prompts, max_new_tokens=4)
    # greedy decoding of a left-padded batch = each prompt alone
    assert batched == [generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert tok.pad_token is None and tok.padding_side == "right"  # restored


def test_rouge_l_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    # LCS 2 of 2 predicted / 4 reference words: F = 2·1·0.5 / 1.5
    assert rouge_l(["the cat"], ["the cat sat down"]) == pytest.approx(100 * 2 / 3)
    assert rouge_l(["dogs run", "the cat"], ["cats sleep", "the cat"]) == pytest.approx(50.0)


def test_cross_tokenizer_run_needs_ce(tmp_path):
    overrides = write_tiny_run(tmp_path, cross=True)
    config = load_config(TINY, [*overrides, "mta.enabled=false"])
    with pytest.raises(UserError, match=r"set training\.base_loss=ce"):
        build_trainer(config)
    trainer = build_trainer(
        load_config(TINY, [*overrides, "mta.enabled=false", "training.base_loss=ce"])
    )
    assert trainer.cross_tokenizer and "teacher_input_ids" in trainer.train_dataset[0]


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("spacy")
    out, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "student KD+MTA" in printed and "held-out ppl" in printed
    results = json.loads((out / "results.json").read_text())
    for name in ("KD", "KD+MTA"):
        row = results["students"][name]
        assert math.isfinite(row["perplexity"]) and math.isfinite(row["base_loss"])
    assert math.isfinite(results["students"]["KD+MTA"]["dsa"])
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "kd_mta" / PROJECTORS_NAME).is_file() and not (
        out / "kd" / PROJECTORS_NAME
    ).exists()
    assert any(cache.glob("demo-teacher-*/model.safetensors"))


def test_lora_student_and_merged_teacher_adapter(tmp_path):
    """``model.student_lora`` trains a LoRA student (its export is the adapter, which peft
    loads); ``model.teacher_adapter`` merges a LoRA adapter into the teacher first."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("spacy")
    overrides = write_tiny_run(tmp_path)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    peft.get_peft_model(teacher, config).save_pretrained(tmp_path / "teacher_adapter")
    lora = "{r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: [c_attn, lm_head]}"
    argv = [*overrides, f"model.teacher_adapter={tmp_path / 'teacher_adapter'}"]
    assert main(["--config", TINY, *argv, f"model.student_lora={lora}"]) == 0
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", PROJECTORS_NAME} <= names
    assert "model.safetensors" not in names
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    student = peft.PeftModel.from_pretrained(base, out)
    trained = {k for k, _ in student.named_parameters() if "lora_" in k}
    assert any("lm_head" in k for k in trained) and any("c_attn" in k for k in trained)
    # mta-eval evaluates the export: the base model with the adapter applied
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = student.eval()(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(loaded, expected)
    eval_file = tmp_path / "test.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS if "text" not in r))
    argv = ["--model", str(out), "--data", str(eval_file), "--max-new-tokens", "4"]
    assert eval_main(argv) == 0
