"""Progress of long work (parsing a dataset, the demo's runs) on stderr.

On a terminal it is a tqdm bar. Anywhere else (a CI log, a file, a pipe) a redrawn bar would
write a line per update, so :class:`Progress` prints a plain line every ``every_s`` seconds and
one at the end instead::

    mta-prepare: parsing 640/2000 texts (32%), 34.1 texts/s, ETA 40 s
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["Progress", "format_duration", "hub_progress_bars"]


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Count ``total`` items of work named ``desc``; a context manager.

    Args:
        total: number of items (the ETA is computed from the rate so far).
        desc: what is being done, e.g. ``"mta-prepare: parsing"``.
        unit: the items' name in the lines (``"texts"``, ``"steps"``).
        stream: where to write (default ``sys.stderr``).
        every_s: seconds between plain lines when ``stream`` is not a terminal.
        bar: force the tqdm bar on (True) or off (False); default: whether ``stream`` is a tty.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "items",
        *,
        stream: TextIO | None = None,
        every_s: float = 10.0,
        bar: bool | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._last_line = self._start
        use_bar = bar if bar is not None else _is_terminal(self.stream)
        self._bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s"), file=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(stopped=exc_type is not None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._line()

    def set_postfix(self, **values: Any) -> None:
        """Extra values shown with the count (e.g. the latest loss)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values)

    def close(self, stopped: bool = False) -> None:
        """End the display; ``stopped``: the work ended early (an exception, Ctrl-C)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.total:
            self._line(final="stopped after" if stopped else "done in")

    def _line(self, final: str | None = None) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc} {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final is not None:
            parts.append(f"{final} {format_duration(elapsed)}")
        elif rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(", ".join(parts), file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def hub_progress_bars(enabled: bool) -> Iterator[None]:
    """``transformers``' own progress bars (one per checkpoint written, per download) on or off
    inside the block, and as they were after it."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
