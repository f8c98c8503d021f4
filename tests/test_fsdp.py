"""FSDP2 (``fully_shard``) on the trainer's model and loss: 2 CPU processes with gloo.

``accelerate`` enables FSDP only on accelerators (on CPU it runs DDP and MTATrainer warns), so
tests/fsdp_worker.py shards ``StudentWithProjectors`` itself and calls
``MTATrainer.compute_loss`` with the fused LM head on and off. Gradients of the sharded model
must equal those of an unsharded copy on the same batch (float32 summation order: 1e-5 absolute
on gradients of size ~2), and the gathered full state dict must save to a plain student plus
projectors and load back into the shards exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from training_helpers import torchrun

from mta.checkpoints import PROJECTORS_NAME

TESTS = Path(__file__).resolve().parent


def _launch(processes: int, *args: str) -> None:
    torchrun(processes, str(TESTS / "fsdp_worker.py"), *args)  # its folder is on its sys.path


def test_fsdp2_sharded_gradients_and_state_dict_round_trip(tmp_path):
    out = tmp_path / "result.json"
    _launch(2, str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"on", "off"}
    for mode, result in results.items():
        assert result["grad_scale"] > 0.1, mode  # the gradients compared are not ~0
        assert result["grad"] < 1e-5, (mode, result)
        for key in ("saved_student", "saved_projectors", "restored"):
            assert result[key] == 0.0, (mode, key, result)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_accelerate_fsdp_resume_gives_the_same_weights(tmp_path):
    """``MTATrainer`` under accelerate's FSDP2 (1 GPU, fused LM head): 4 steps, versus 2 steps
    then a new process resumed from the step-2 checkpoint (FSDP's own model and optimizer files):
    same exported student and projectors (1e-6: same kernels in the same order)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch(1, "trainer", str(full))
    _launch(1, "trainer", str(resumed), str(full / "checkpoint-2"))
    for name in ("model.safetensors", PROJECTORS_NAME):
        a = safetensors.torch.load_file(full / "final" / name)
        b = safetensors.torch.load_file(resumed / "final" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
