"""mta.metrics.LoggedMetrics: means over the logging window, latest values, per split."""

import pytest
import torch

from mta.metrics import LoggedMetrics


def test_means_are_over_the_window_then_reset():
    metrics = LoggedMetrics()
    metrics.add_means("train", {"dsa": torch.tensor(1.0), "base_loss": torch.tensor(4.0)})
    metrics.add_means("train", {"dsa": torch.tensor(3.0), "base_loss": torch.tensor(2.0)})
    metrics.add_means("eval", {"dsa": torch.tensor(10.0)})
    assert metrics.pop("train") == {"base_loss": 3.0, "dsa": 2.0}
    assert metrics.pop("train") == {}  # the window was reset
    assert metrics.pop("eval") == {"dsa": 10.0}  # the other split is its own


def test_values_are_the_latest_and_stay():
    metrics = LoggedMetrics()
    metrics.set_value("train", "sampled_batches", 1)
    metrics.set_value("train", "sampled_batches", 3)
    metrics.add_means("train", {"dsa": torch.tensor(0.5)})
    assert metrics.pop("train") == {"dsa": 0.5, "sampled_batches": 3.0}
    assert metrics.pop("train") == {"sampled_batches": 3.0}


def test_reduce_gets_one_tensor_in_sorted_key_order():
    """Processes reduce one stacked tensor: its order must not depend on insertion order."""
    seen = []

    def reduce(means):
        seen.append(means.clone())
        return means * 2

    metrics = LoggedMetrics()
    metrics.add_means("train", {"hra": torch.tensor(1.0), "dsa": torch.tensor(2.0)})
    assert metrics.pop("train", reduce) == {"dsa": 4.0, "hra": 2.0}
    torch.testing.assert_close(seen[0], torch.tensor([2.0, 1.0]))


def test_detached_float32_and_no_grad_kept():
    metrics = LoggedMetrics()
    x = torch.tensor(2.0, dtype=torch.bfloat16, requires_grad=True)
    metrics.add_means("eval", {"mta": x * 1})
    assert metrics.pop("eval") == {"mta": 2.0}


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match=r"split must be one of .*got 'test'"):
        LoggedMetrics().add_means("test", {"dsa": torch.tensor(1.0)})
