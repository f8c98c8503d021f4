"""Test configuration: Triton kernels run through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before Triton is imported, so this happens at conftest import,
before any test module imports ``mta_kernels``.
"""

import os
import random
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could enable its interpreter"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mta_kernels._switches import SWITCHES  # noqa: E402  (after TRITON_INTERPRET)
from mta_kernels.structural_loss import STRUCTURAL_DESIGNS  # noqa: E402

SWITCHES.poison_outputs = True  # an output element a kernel forgets to write fails a comparison

FUSED_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config: pytest.Config) -> None:
    # The benchmark tests check that each timed call runs and gives finite results; CPU timings
    # say nothing about GPU speed, so their wide statistics table is off unless asked for.
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable"):
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where the fused (Triton) path runs: CUDA if present, else CPU through the interpreter."""
    return FUSED_DEVICE


@pytest.fixture(params=STRUCTURAL_DESIGNS)
def structural_design(request, monkeypatch) -> str:
    """Every design of the structural loss on the same inputs: tiles with the K×K error matrix
    saved for the backward, tiles recomputed in the backward (K of the order of d), and the d×d
    moments (K ≫ d; the euclidean metric recomputes instead)."""
    monkeypatch.setattr(SWITCHES, "structural_design", request.param)
    return request.param


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; failures print it (``assert ..., f"seed={seed}"``)."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="module")
def eager_mta_ops():
    """CPU tensors take the eager reference of the MTA ops, not the Triton interpreter (the
    kernel tests cover the interpreter; a training run through it would take minutes). Modules
    of training tests use it with ``pytestmark = pytest.mark.usefixtures("eager_mta_ops")``."""
    import mta_kernels

    with mta_kernels.prefer_reference():
        yield


@pytest.fixture(scope="session")
def nlp():
    """The default English spaCy pipeline (the test is skipped without spaCy or a pipeline)."""
    pytest.importorskip("spacy")
    from mta import spans

    if spans.default_pipeline_name() is None:
        pytest.skip("no English spaCy pipeline installed")
    return spans.load_pipeline()
