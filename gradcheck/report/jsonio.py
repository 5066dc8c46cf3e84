"""Text shared by every report: deterministic JSON (sorted keys, arrays of numbers on one line),
Markdown tables, and atomic file writes.

Standard library only: the pytest plugin's session report uses it without loading numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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

    A reader (or an interrupted run) sees the old file or the new one, never a partial one. On any
    exception, KeyboardInterrupt and those a signal handler raises included, the temporary file is
    removed before the exception propagates: the temporary's name is chosen before it exists, so there
    is no moment at which the file exists and this function does not know it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp: Path | None = None
    fd = -1
    try:
        while fd < 0:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except FileExistsError:  # another writer's: not ours to remove
                tmp = None
        with os.fdopen(fd, "wb") as f:
            fd = -2  # the file object owns it now
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path
