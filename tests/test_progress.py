"""mta.progress: a tqdm bar on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from mta.progress import Progress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (42, "42 s"), (125, "2 min 05 s"), (3725, "1 h 02 min")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_plain_lines_off_a_terminal():
    stream = io.StringIO()
    with Progress(4, "job: parsing", "texts", stream=stream, every_s=0.0) as progress:
        for _ in range(4):
            progress.set_postfix(loss="1.250")
            progress.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # one per update (every_s=0), one at the end
    assert re.fullmatch(
        r"job: parsing 1/4 texts \(25%\), [\d.]+ texts/s, ETA \d+ s, loss=1.250", lines[0]
    )
    assert re.fullmatch(
        r"job: parsing 4/4 texts \(100%\), [\d.]+ texts/s, done in \d+ s, "
        r"loss=1.250",
        lines[-1],
    )
    assert "\r" not in stream.getvalue()


def test_lines_are_spaced_by_every_s():
    stream = io.StringIO()
    with Progress(1000, "job", stream=stream, every_s=3600) as progress:
        for _ in range(1000):
            progress.update()
    assert len(stream.getvalue().splitlines()) == 1  # only the final line


def test_bar_on_a_terminal():
    stream = Terminal()
    with Progress(3, "job", "steps", stream=stream) as progress:
        for _ in range(3):
            progress.update()
    text = stream.getvalue()
    assert "\r" in text and "3/3" in text and "job" in text  # tqdm redraws in place
    assert "done in" not in text


def test_a_stopped_run_says_so():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress(10, "job", stream=stream, every_s=3600) as p:
        p.update(3)
        raise KeyboardInterrupt
    assert re.fullmatch(
        r"job 3/10 items \(30%\), [\d.]+ items/s, stopped after \d+ s\n", stream.getvalue()
    )
