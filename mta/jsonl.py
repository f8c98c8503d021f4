"""JSON-lines files: one JSON object per line, blank lines skipped, errors naming ``file:line``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_records"]


def read_records(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line of ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not valid JSON, or not a JSON object (``file:line: ...``).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"data file {str(path)!r} {what}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((number, record))
    return records
