"""Trainer callbacks that show logged metrics as numbers.

``transformers``' own printer and progress callbacks format each float as a string
(``{'loss': '1.114'}``); these show the same values rounded to four significant digits, as numbers
(``{'loss': 1.114}``), so that a printed line reads like the dict that was logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PrinterCallback, ProgressCallback, Trainer

__all__ = ["NumericPrinterCallback", "NumericProgressCallback", "print_logs_as_numbers", "rounded"]


def rounded(logs: Mapping[str, Any]) -> dict[str, Any]:
    """``logs`` for display: floats to 4 significant digits (still floats), ``total_flos`` left
    out as the stock callbacks do."""
    return {
        key: float(f"{value:.4g}") if isinstance(value, float) else value
        for key, value in logs.items()
        if key != "total_flos"
    }


class NumericPrinterCallback(PrinterCallback):
    """:class:`transformers.PrinterCallback` (used with ``disable_tqdm``), numbers as numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(rounded(logs))


class NumericProgressCallback(ProgressCallback):
    """:class:`transformers.ProgressCallback` (the tqdm bar), numbers as numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs is not None:
            self.training_bar.write(str(rounded(logs)))


def print_logs_as_numbers(trainer: Trainer) -> None:
    """Swap ``trainer``'s stock printer or progress callback for its numeric twin."""
    for stock, numeric in (
        (PrinterCallback, NumericPrinterCallback),
        (ProgressCallback, NumericProgressCallback),
    ):
        if trainer.pop_callback(stock) is not None:
            trainer.add_callback(numeric)
