"""The values an MTA trainer adds to its logs, kept in one place per split (``"train"``,
``"eval"``).

* Means: detached scalar tensors added once per micro-batch (the loss components ``base_loss``,
  ``dsa``, ``hra``, …), summed on the device without a host sync and averaged over the logging
  window, then over processes, when the logs are written.
* Values: plain numbers that are logged as they last were (counters, the adaptive threshold).

:class:`MetricsLogging` is the ``transformers.Trainer`` mixin that writes a trainer's
``self.metrics`` into its training logs and evaluation metrics (``MTATrainer`` and the TRL
adapters share it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["LoggedMetrics", "MetricsLogging"]

SPLITS = ("train", "eval")


class LoggedMetrics:
    """Running means and latest values of the logged metrics, per split (module docstring)."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, Tensor]] = {s: {} for s in SPLITS}
        self._counts = dict.fromkeys(SPLITS, 0)
        self._values: dict[str, dict[str, float]] = {s: {} for s in SPLITS}

    @staticmethod
    def _check(split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"metrics split must be one of {SPLITS}, got {split!r}")
        return split

    def add_means(self, split: str, values: Mapping[str, Tensor]) -> None:
        """Add one micro-batch's ``values`` (scalar tensors) to the split's running means."""
        sums = self._sums[self._check(split)]
        for key, value in values.items():
            value = value.detach().float()
            previous = sums.get(key)
            sums[key] = value if previous is None else previous + value
        self._counts[split] += 1

    def set_value(self, split: str, key: str, value: float) -> None:
        """Log ``key`` as ``value`` (the latest one set) with the split's next logs."""
        self._values[self._check(split)][key] = float(value)

    def reset(self, split: str) -> None:
        """Drop the split's running means (its values stay)."""
        self._sums[self._check(split)] = {}
        self._counts[split] = 0

    def pop(self, split: str, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """The split's means since the last pop, averaged over processes by ``reduce`` (a mean
        of one float32 tensor across processes, or None on one process), and its values; the
        means are reset. Every process must call it with the same keys added."""
        out: dict[str, float] = {}
        sums, count = self._sums[self._check(split)], self._counts[split]
        if count:
            keys = sorted(sums)
            means = torch.stack([sums[k] for k in keys]) / count
            if reduce is not None:
                means = reduce(means)
            out.update(zip(keys, means.tolist(), strict=True))
        self.reset(split)
        out.update(self._values[split])
        return out


class MetricsLogging:
    """Mixin of a ``transformers.Trainer`` subclass (listed before it) whose ``self.metrics``
    (:class:`LoggedMetrics`) go to the logs: the ``train`` split into each training log (means
    over the logging window and processes), the ``eval`` split into the evaluation metrics as
    ``<prefix>_<key>``."""

    metrics: LoggedMetrics

    def _logged(self, split: str) -> dict[str, float]:
        reduce = None
        if self.args.world_size > 1:
            reduce = functools.partial(self.accelerator.reduce, reduction="mean")
        return self.metrics.pop(split, reduce)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._logged("train"))
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        self.metrics.reset("eval")
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        for key, value in self._logged("eval").items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output
