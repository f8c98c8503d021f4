"""mta.callbacks: logged metrics are shown as numbers, not as formatted strings."""

from __future__ import annotations

import ast

from training_helpers import TINY, write_tiny_run

import mta_kernels
from mta.callbacks import rounded
from mta.cli import main


def test_rounded_keeps_numbers():
    logs = {"loss": 1.1141592, "dsa": 0.000123456, "epoch": 1, "total_flos": 3.0, "note": "x"}
    assert rounded(logs) == {"loss": 1.114, "dsa": 0.0001235, "epoch": 1, "note": "x"}


def test_mta_distill_prints_logged_numbers(tmp_path, capsys):
    overrides = write_tiny_run(tmp_path)
    with mta_kernels.prefer_reference():
        assert main(["--config", TINY, *overrides, "mta.enabled=false"]) == 0
    printed = [
        ast.literal_eval(line)
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("{'loss'")
    ]
    assert len(printed) == 2  # max_steps=2, logging_steps=1
    for logs in printed:
        assert all(isinstance(v, (int, float)) for v in logs.values()), logs
        assert logs["loss"] == logs["base_loss"]  # no MTA term in this run
