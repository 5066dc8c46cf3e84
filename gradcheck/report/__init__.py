"""Render a study and the golden vectors as files: report.json, report.md, report.html, vectors.json.

Renderers compute nothing: the numbers come from :mod:`gradcheck.study` and :mod:`gradcheck.vectors`.
Every file is rendered in memory first and then written atomically (temporary file and rename), so
an interrupted run leaves the previous files, never half-written ones.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcheck.report.jsonio import write_atomic

FILES = {
    "report.json": "data, versioned schema",
    "report.md": "tables",
    "report.html": "tables and plots",
    "vectors.json": "golden vectors",
    "linear_vectors.json": "golden vectors of the fused linear family",
}


@dataclass(frozen=True)
class Written:
    """A file written: its path and size in bytes."""

    path: Path
    size: int


def render_all(study: Any, suite: Any, *, started: _dt.datetime | None = None,
               timing: dict[str, Any] | None = None,
               linear: tuple[Any, int] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Render the files' texts; returns ({file name: text}, the report.json document).

    ``linear`` is ``(groups, seed)`` of :func:`gradcheck.vectors.linear.build_linear_suite`: it adds
    linear_vectors.json and the Markdown section on it (gradcheck.report.linear_section)."""
    from gradcheck.report.html import render_html
    from gradcheck.report.json_report import render_report_json, report_document, vector_summary
    from gradcheck.report.markdown import render_markdown
    from gradcheck.vectors import render_vectors

    texts: dict[str, str] = {}
    vectors = None
    if suite is not None:
        texts["vectors.json"] = render_vectors(suite)
        digest = hashlib.sha256(texts["vectors.json"].encode("utf-8")).hexdigest()
        vectors = vector_summary(suite, "vectors.json", digest)
    document = report_document(study, vectors, timing=dict(timing or {}), started=started)
    files = {name: desc for name, desc in FILES.items()
             if (name != "vectors.json" or suite is not None) and (name != "linear_vectors.json" or linear is not None)}
    texts["report.json"] = render_report_json(document)
    texts["report.md"] = render_markdown(study, document, files)
    if linear is not None:
        from gradcheck.report.linear_section import linear_vectors_markdown
        from gradcheck.vectors.linear import render_linear_vectors

        groups, seed = linear
        texts["linear_vectors.json"] = render_linear_vectors(groups, seed)
        texts["report.md"] = texts["report.md"].rstrip("\n") + "\n\n" + "\n".join(linear_vectors_markdown(groups)) + "\n"
    texts["report.html"] = render_html(study, document, files)
    return texts, document


def write_report(out_dir: str | Path, study: Any, suite: Any, *, started: _dt.datetime | None = None,
                 timing: dict[str, Any] | None = None) -> list[Written]:
    """Render everything, then write each file atomically into ``out_dir`` (created if missing)."""
    texts, _ = render_all(study, suite, started=started, timing=timing)
    return write_texts(out_dir, texts)


def write_texts(out_dir: str | Path, texts: dict[str, str]) -> list[Written]:
    """Write :func:`render_all`'s texts, each atomically, into ``out_dir`` (created if missing).

    Each file is the old one or the new one; to write the four as a set, a caller holds back
    interruptions around this call only (rendering, the slow part, stays interruptible).
    """
    out = Path(out_dir)
    written = []
    for name in ("vectors.json", "linear_vectors.json", "report.json", "report.md", "report.html"):
        if name in texts:
            path = write_atomic(out / name, texts[name])
            written.append(Written(path, path.stat().st_size))
    return written


def write_vectors(path: str | Path, suite: Any) -> Written:
    """Write a vectors file atomically."""
    from gradcheck.vectors import render_vectors

    p = write_atomic(path, render_vectors(suite))
    return Written(p, p.stat().st_size)


__all__ = ["FILES", "Written", "render_all", "write_report", "write_texts", "write_vectors"]
