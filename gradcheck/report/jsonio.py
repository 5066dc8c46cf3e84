"""Text shared by every report: deterministic JSON (sorted keys, arrays of numbers on one line),
Markdown tables, and atomic file writes.

Standard library only: the pytest plugin's session report uses it without loading numpy.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _scalar(o: Any) -> bool:
    return o is None or isinstance(o, (str, int, float, bool))


def dumps(obj: Any) -> str:
    """JSON with sorted keys and one-space indents; a list of scalars stays on one line, a list of
    such lists puts one per line. No NaN or infinity (they raise ValueError). Ends with a newline."""

    def emit(o: Any, level: int) -> str:
        pad, inner = " " * level, " " * (level + 1)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(str(k))}: {emit(v, level + 1)}" for k, v in sorted(o.items())]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(_scalar(e) for e in o):
                return json.dumps(list(o), allow_nan=False)
            return "[\n" + ",\n".join(inner + emit(e, level + 1) for e in o) + "\n" + pad + "]"
        return json.dumps(o, allow_nan=False)

    return emit(obj, 0) + "\n"


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell: ``|`` escaped, line breaks as spaces."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a Markdown table; every cell goes through :func:`markdown_cell`."""
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return lines


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    A reader (or an interrupted run) sees the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
