"""The pytest plugin's session report: records of every check, merged, summarized, written as JSON and Markdown.

A record is a plain dict (JSON-ready, so that pytest-xdist workers can send it to the controller):

    {"test": nodeid, "call": n, "function": name, "dtype": name, "options": {non-default options},
     "max_examples": n, "examples": n, "worst_ulps": x, "worst_ratio": x, "precision": contract,
     "grade": contract | None, "contract_ratios": {contract: x}, "seed": n,
     "verdict": "passed" | "failed", "failure": None | {"kind", "message", "ulps", "ratio"},
     "reproduction": "gradcheck.verify(...)", "elapsed": seconds}

This module renders records; it computes no numerics and imports the standard library only (and
:mod:`gradcheck.report.jsonio`, which does too, for its Markdown tables and atomic writes).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from gradcheck.report.jsonio import markdown_code, markdown_fence, markdown_table, write_atomic

SCHEMA = "gradcheck-session-report/1"


def jsonable(value: Any) -> Any:
    """A JSON-ready copy: tuples become lists, numpy scalars Python numbers, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalar
        return jsonable(value.item())
    return str(value)


def sort_records(records: Iterable[dict]) -> list[dict]:
    """Records in a fixed order (test id, then call number) whichever worker ran them."""
    return sorted(records, key=lambda r: (r["test"], r["call"]))


def summarize(records: Iterable[dict]) -> list[dict]:
    """One summary per checked function, in order of the function's name."""
    by_function: dict[str, list[dict]] = {}
    for record in records:
        by_function.setdefault(record["function"], []).append(record)
    out = []
    for function in sorted(by_function):
        group = by_function[function]
        failed = sum(r["verdict"] == "failed" for r in group)
        out.append({
            "function": function,
            "verdict": "failed" if failed else "passed",
            "checks": len(group),
            "failed": failed,
            "dtypes": sorted({r["dtype"] for r in group}),
            "examples": sum(r["examples"] for r in group),
            "worst_ulps": max((r["worst_ulps"] or 0.0) for r in group),
            "worst_ratio": max((r["worst_ratio"] or 0.0) for r in group),
            "grades": grades(group),
        })
    return out


# tightest first: a function's grade in a dtype is the loosest grade of its checks there; verify_linear grades
# with verify's contracts (docs/linear.md, "Precision contracts"); "kernel" is kept for records written before
_ORDER = ("exact", "float64", "float32", "float16", "bfloat16", "kernel")


def grades(group: list[dict]) -> dict[str, str | None]:
    """Per dtype, the grade the function kept in every check of that dtype (None: some check met none)."""
    out: dict[str, str | None] = {}
    for dtype in sorted({r["dtype"] for r in group}):
        found = [r.get("grade") for r in group if r["dtype"] == dtype]
        out[dtype] = None if None in found else max(found, key=_ORDER.index)
    return out


def _grades_text(summary: dict) -> str:
    return ", ".join(f"{grade or 'none'} ({dtype})" for dtype, grade in summary.get("grades", {}).items())


def build(records: Iterable[dict], seed: int, version: str) -> dict:
    """The JSON document of a session."""
    checks = sort_records(records)
    failed = sum(r["verdict"] == "failed" for r in checks)
    return {
        "schema": SCHEMA,
        "gradcheck_version": version,
        "seed": seed,
        "checks_run": len(checks),
        "passed": len(checks) - failed,
        "failed": failed,
        "functions": summarize(checks),
        "checks": checks,
    }


def summary_line(summary: dict) -> str:
    """One terminal line for a checked function."""
    verdict = "passed" if summary["verdict"] == "passed" else f"FAILED {summary['failed']} of"
    checks = summary["checks"]
    return (
        f"{summary['function']}: {verdict} {checks} check{'s' if checks != 1 else ''} "
        f"({', '.join(summary['dtypes'])}), {summary['examples']} examples, "
        f"worst {summary['worst_ratio']:.3g} x tolerance ({summary['worst_ulps']:g} ULP); "
        f"grade {_grades_text(summary)}"
    )


def _options(record: dict) -> str:
    options = record["options"]
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) if options else "defaults"


def markdown(document: dict) -> str:
    """The Markdown rendering of :func:`build`'s document.

    Every string from the session (test ids, function names, option values, failure messages) is
    escaped: a code span no backtick can close, escaped text, or a fence longer than any backtick run,
    so that a renderer shows it as text and never as HTML or Markdown structure.
    """
    seed = document["seed"]
    lines = [
        "# gradcheck report",
        "",
        f"{document['checks_run']} checks of {len(document['functions'])} functions: "
        f"{document['passed']} passed, {document['failed']} failed. "
        f"Session seed {seed}: repeat with `pytest --gradcheck-seed {seed}`.",
        "",
        "## Functions",
        "",
    ]
    lines += markdown_table(
        ["function", "verdict", "checks", "dtypes", "examples", "worst / tolerance", "worst ULP", "grade"],
        [[markdown_code(s["function"]), s["verdict"], s["checks"], ", ".join(s["dtypes"]), s["examples"],
          f"{s['worst_ratio']:.3g}", f"{s['worst_ulps']:g}", _grades_text(s)] for s in document["functions"]],
    )
    lines += ["", "## Checks", ""]
    lines += markdown_table(
        ["test", "function", "dtype", "options", "examples", "contract", "worst / tolerance", "worst ULP", "grade",
         "verdict"],
        [[markdown_code(r["test"]), markdown_code(r["function"]), r["dtype"], _options(r), r["examples"],
          r.get("precision", ""), f"{r['worst_ratio']:.3g}", f"{r['worst_ulps']:g}", r.get("grade") or "none",
          r["verdict"]] for r in document["checks"]],
    )
    failures = [r for r in document["checks"] if r["failure"] is not None]
    if failures:
        lines += ["", "## Failures"]
        for r in failures:
            lines += ["", f"### {markdown_code(r['test'])}", "", *markdown_fence(r["failure"]["message"])]
    return "\n".join(lines) + "\n"


def report_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``PATH`` -> (PATH.json, PATH.md); a ``.json`` or ``.md`` suffix on PATH is replaced."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".md"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".md")


def write(path: str | os.PathLike, records: Iterable[dict], seed: int, version: str) -> tuple[Path, Path]:
    """Write the session's JSON and Markdown reports; return their paths."""
    document = build(records, seed, version)
    json_path, md_path = report_paths(path)
    write_atomic(json_path, json.dumps(document, indent=2) + "\n")
    write_atomic(md_path, markdown(document))
    return json_path, md_path
