"""Text shared by every report: deterministic JSON (sorted keys, arrays of numbers on one line),
escaped Markdown (text, code spans, fenced blocks, tables), and atomic file writes (checked beforehand).

Standard library only: the pytest plugin's session report uses it without loading numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
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


class Markdown(str):
    """Text that is already Markdown (a code span from :func:`markdown_code`): a table cell only escapes its ``|``."""


_LINE_BREAKS = re.compile(r"\r\n|[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")
# ASCII punctuation that can start inline Markdown or HTML (code, emphasis, links, images, autolinks,
# raw HTML, entities, strikethrough, table cells) or escape what follows it
_ACTIVE = re.compile(r"[\\`*\[\]<>&|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _one_line(value: Any) -> str:
    return _LINE_BREAKS.sub(" ", str(value))


def markdown_text(value: Any) -> str:
    """``value`` as inline Markdown that renders as exactly its text, on one line.

    Every character that could start markup is backslash-escaped; an underscore between two
    letters or digits cannot (CommonMark's flanking rules), so ``closed_form`` stays as it is.
    Line breaks become spaces. For inline use: a table cell, a heading's text after its ``#``.
    """
    return _ACTIVE.sub(lambda m: "\\" + m.group(0), _one_line(value))


def markdown_code(value: Any) -> Markdown:
    """``value`` as one inline code span that no backtick in it can close, on one line."""
    text = _one_line(value)
    if not text:
        return Markdown("")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    if text[0] == "`" or text[-1] == "`" or (text[0] == text[-1] == " " and text.strip(" ")):
        text = f" {text} "  # CommonMark strips one space on each side
    return Markdown(f"{fence}{text}{fence}")


def markdown_fence(text: Any) -> list[str]:
    """The lines of a fenced code block holding ``text`` verbatim: the fence is longer than any backtick run in it."""
    lines = str(text).splitlines() or [""]
    fence = "`" * max(3, max((len(run) for run in re.findall("`+", str(text))), default=0) + 1)
    return [fence, *lines, fence]


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell: plain text through :func:`markdown_text`; a
    :class:`Markdown` value (a code span) as it is but for its ``|``, which a table row would split on."""
    if isinstance(value, Markdown):
        return value.replace("|", "\\|")
    return markdown_text(value)


def markdown_table(header: list[Any], rows: list[list[Any]]) -> list[str]:
    """The lines of a Markdown table; every cell goes through :func:`markdown_cell`."""
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return lines


class NotWritable(OSError):
    """An output path that :func:`write_atomic` could not write (raised by :func:`check_writable`)."""


def check_writable(path: str | os.PathLike) -> Path:
    """Check, before any work, that :func:`write_atomic` can write the file ``path``; return it as a Path.

    The nearest existing folder on the way must be a folder in which a file can be created (tried with
    a temporary file, so a read-only file system or missing permission is seen as it is); ``path``
    itself must not be a folder. Missing folders below it are fine (write_atomic creates them).

    Raises:
        NotWritable: the reason, naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise NotWritable(f"cannot write {str(path)!r}: it is a directory.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotWritable(f"cannot write {str(path)!r}: {str(parent)!r} is not a directory.")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".gradcheck-probe.", suffix=".tmp")
    except OSError as exc:
        raise NotWritable(f"cannot write {str(path)!r}: {exc.strerror or exc} in {str(parent)!r}.") from None
    os.close(fd)
    os.unlink(probe)
    return path


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
