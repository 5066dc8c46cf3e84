"""Shared pieces of the benchmark run: settings, medians of repeated runs, skips with a note, tables, machine facts."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:  # the bug zoo lives with the tests
    sys.path.insert(0, str(ROOT / "tests"))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass(frozen=True)
class Settings:
    """What one run measures and how hard it tries.

    Attributes:
        shapes: the (N, K) of the full-gradient verification section.
        oracle_shape: the array of the throughput section.
        repeats: the most runs of one measurement; the figure is their median.
        cell_seconds: a measurement stops repeating once its runs took this long (slow tools: median of 1).
        skip_seconds: a peer predicted to take longer than this at a shape is skipped with a note.
        truth_shape: float64 array certified in the truth-throughput section.
        verify_examples: examples per verify call in the verify-throughput section.
        zoo_cases: cases each peer checks per zoo run (detection); zoo_shape their largest shape.
        zoo_dtypes: dtypes of the detection section.
        zoo_limit: None, or the number of zoo runs per (zoo, dtype) (the smoke test uses a few).
        truth_limit: largest N*K whose accuracy is measured against exact_grad (beyond: the bounded oracle).
    """

    shapes: tuple[tuple[int, int], ...] = ((8, 10), (32, 100), (128, 1000), (512, 4096))
    oracle_shape: tuple[int, int] = (4096, 1024)
    repeats: int = 5
    cell_seconds: float = 20.0
    skip_seconds: float = 120.0
    truth_shape: tuple[int, int] = (8, 512)
    verify_examples: int = 200
    zoo_cases: int = 5
    zoo_shape: tuple[int, int] = (4, 100)
    zoo_dtypes: tuple[str, ...] = ("float64", "float32")
    zoo_limit: int | None = None
    truth_limit: int = 128 * 1000


QUICK = Settings(
    shapes=((2, 3), (4, 8)), oracle_shape=(64, 32), repeats=1, cell_seconds=0.0, skip_seconds=60.0,
    truth_shape=(2, 16), verify_examples=5, zoo_cases=2, zoo_shape=(4, 16), zoo_limit=2,
)


@dataclass
class Timing:
    """Median seconds of ``runs`` runs, and the value the last run returned."""

    median: float
    runs: int
    value: Any = None
    all: list[float] = field(default_factory=list)


def measure(fn: Callable[[], Any], settings: Settings, *, repeats: int | None = None,
            warmup: bool = False) -> Timing:
    """Run ``fn`` up to ``repeats`` times (at least once) while the runs took under ``cell_seconds``."""
    repeats = settings.repeats if repeats is None else repeats
    if warmup:
        fn()
    times: list[float] = []
    value = None
    while True:
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
        if len(times) >= repeats or sum(times) + statistics.median(times) > settings.cell_seconds:
            break
    return Timing(statistics.median(times), len(times), value, times)


class Skip(Exception):
    """A measurement that was not made; the note says why (it is printed in the row)."""


def optional(module: str) -> Any:
    """Import a peer, or raise Skip naming the missing package."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not installed ({exc})") from None


def seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} µs"


def ratio(x: float) -> str:
    return f"{x:.3g}×"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; every cell must be filled (an empty one is a bug in the caller)."""
    for row in rows:
        assert len(row) == len(header) and all(str(c).strip() for c in row), row
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("gradcheck", "numpy", "mpmath", "hypothesis", "jax", "jaxlib", "torch", "numdifftools", "scipy",
                 "numba"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, str]:
    facts = {
        "cpu": cpu_model(), "cores": str(os.cpu_count()), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import torch

        facts["torch threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    return facts


def write_section(lines: list[str], out: str | None, results: Path | None) -> None:
    """Print a ``## heading`` section given as lines, write it to ``out`` and put it into the markdown file
    ``results`` in place of its section of that heading (:func:`replace_section`), each where given."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    if results:
        replace_section(results, lines[0][3:], text)


def replace_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` (a ``## heading`` section) into the markdown file ``path`` in place of the section of
    that heading (matched up to its first parenthesis), or at its end when it has none."""
    key = heading.split("(", 1)[0].strip()
    old = path.read_text() if path.exists() else ""
    chunks = ("\n" + old).split("\n## ")
    out, done = [chunks[0].strip("\n")] if chunks[0].strip() else [], False
    for chunk in chunks[1:]:
        if chunk.split("\n", 1)[0].split("(", 1)[0].strip() == key:
            out.append(text.rstrip())
            done = True
        else:
            out.append(("## " + chunk).rstrip())
    if not done:
        out.append(text.rstrip())
    path.write_text("\n\n".join(out) + "\n")
