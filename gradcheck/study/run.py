"""Running the study behind ``gradcheck report``: every method against the certified truth, in parallel.

For each dtype, regime and case index the study generates a seeded case (:func:`gradcheck.regimes.make_case`),
computes the certified truth correctly rounded to the dtype and to float64, runs every registered
method, and records per method the ULP error of each element against the truth and whether the
method's own error estimate (or bound) covered its actual error. Cases run in chunks on a local process
pool (``jobs``) or on a Dask distributed cluster (``scheduler``); results are gathered in case order,
so a study is the same for any number of workers and either executor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck.dtypes import DTYPE_NAMES, FLOAT64
from gradcheck.errors import InvalidArgument
from gradcheck.options import integer
from gradcheck.regimes import OPTION_REGIMES, REGIMES, make_case
from gradcheck.study.executors import Task, run_dask, run_local
from gradcheck.study.model import CaseResult, MethodInfo, Outcome, ProofRow, Study, StudyConfig
from gradcheck.study.summary import summarize, totals

CHUNK = 24  # largest number of cases per task


# --- tasks (top-level functions: they run in worker processes) -----------------------------------


@dataclass(frozen=True)
class Chunk:
    """Cases of one dtype and one shape (so a worker compiles each JAX function once), any regimes."""

    config: StudyConfig
    methods: tuple[str, ...]
    dtype: str
    items: tuple[tuple[str, int], ...]  # (regime, index)


def _row_gap(z: np.ndarray) -> float:
    z = z.astype(np.float64)
    finite = np.isfinite(z)
    hi = np.where(finite, z, -np.inf).max(axis=1)
    lo = np.where(finite, z, np.inf).min(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.where(finite.any(axis=1), hi - lo, 0.0)
    return float(spread.max(initial=0.0))


def run_case(config: StudyConfig, methods: Sequence[str], dtype: str, regime: str, index: int) -> CaseResult:
    """Run every method on case ``index`` of ``regime`` in ``dtype`` and compare with the certified truth."""
    from gradcheck.ulps import compare
    from gradcheck.estimators import gradient
    from gradcheck.exact import exact_grad

    seed = config.case_seed(index)
    n, k = config.shape(index, regime)
    z, t, options = make_case(seed, regime, dtype, n=n, k=k)
    truth = exact_grad(z, t, **options)
    truth64 = truth.astype(np.float64) if dtype == "float64" else exact_grad(z, t, dtype="float64", **options)
    half_ulp64 = FLOAT64.ulp(truth64) / 2
    outcomes = []
    for name in methods:
        start = time.perf_counter()
        result = gradient(z, t, method=name, **options)
        seconds = time.perf_counter() - start
        if not result.ok:
            outcomes.append(Outcome(name, result.status.name, np.zeros(0), None, None, None, None, None,
                                    result.evaluations, seconds))
            continue
        comparison = compare(result.grad, truth)
        with np.errstate(invalid="ignore", over="ignore"):
            actual = np.abs(result.grad.astype(np.float64) - truth64)
        within = bool(np.all(actual <= result.error + half_ulp64))
        where = comparison.worst_index
        outcomes.append(Outcome(
            name, result.status.name, comparison.ulp_error.ravel().copy(), within, where,
            comparison.expected_at_worst, comparison.actual_at_worst, float(result.error[where]),
            result.evaluations, seconds,
        ))
    return CaseResult(dtype, regime, index, seed, (n, k), _row_gap(z), tuple(outcomes))


def _run_chunk(chunk: Chunk) -> list[CaseResult]:
    return [run_case(chunk.config, chunk.methods, chunk.dtype, regime, i) for regime, i in chunk.items]


def run_proofs(max_classes: int) -> list[ProofRow]:
    """SymPy proofs of the closed forms for K = 1 .. max_classes (cached on disk by the estimator)."""
    if max_classes < 1:
        return []
    from gradcheck.estimators.sympy_symbolic import prove_all

    return [ProofRow(p.kind, p.k, p.status, p.statement, p.seconds, p.cached) for p in prove_all(max_classes)]


# --- the study -----------------------------------------------------------------------------------


def chunks(config: StudyConfig, methods: tuple[str, ...]) -> list[Chunk]:
    """Tasks of at most CHUNK cases, each of one dtype and one shape."""
    out = []
    for dtype in config.dtypes:
        for regimes, shapes in ((config.regimes, config.shapes), (config.option_regimes, config.option_shapes)):
            for s in range(len(shapes)):
                items = [(r, i) for r in regimes for i in range(s, config.examples, len(shapes))]
                for start in range(0, len(items), CHUNK):
                    out.append(Chunk(config, methods, dtype, tuple(items[start:start + CHUNK])))
    return out


def task_count(config: StudyConfig) -> int:
    """The number of progress steps :func:`run_study` reports for ``config``."""
    return len(chunks(config, ())) + 1


def run_study(
    config: StudyConfig = StudyConfig(),
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int], None] | None = None,
    extra: Sequence[Task] = (),
) -> tuple[Study, list[Any]]:
    """Run the study.

    Args:
        config: the grid and seed.
        jobs: local worker processes (default ``os.cpu_count()``; 1 runs in this process).
        scheduler: address of a Dask distributed scheduler; when given, ``jobs`` is ignored.
        progress: called with the number of tasks just finished (see :func:`task_count`).
        extra: further ``(function, argument)`` tasks to run on the same workers (e.g. the golden
            vectors); their results are returned in order.

    Returns:
        The :class:`Study` and the results of ``extra``.

    Raises:
        InvalidArgument: a bad configuration.
    """
    from gradcheck.estimators import methods as registered
    from gradcheck.estimators import spec

    _check(config, jobs)
    names = config.methods or registered()
    for name in names:
        spec(name)  # raises InvalidArgument for an unknown method
    tick = progress or (lambda _n: None)
    parts = chunks(config, tuple(names))
    tasks: list[Task] = [(run_proofs, config.proof_classes), *extra]
    tasks += [(_run_chunk, c) for c in parts]
    start = time.perf_counter()
    if scheduler:
        results, workers = run_dask(tasks, scheduler, tick)
    else:
        results, workers = run_local(tasks, jobs or os.cpu_count() or 1, tick)
    seconds = time.perf_counter() - start
    proofs = tuple(results[0])
    extras = results[1:1 + len(extra)]
    position = {(d, r): (a, b) for a, d in enumerate(config.dtypes) for b, r in enumerate(config.all_regimes)}
    cases = tuple(sorted((case for chunk in results[1 + len(extra):] for case in chunk),
                         key=lambda c: (*position[c.dtype, c.regime], c.index)))
    infos = tuple(MethodInfo(n, spec(n).summary, spec(n).bound) for n in names)
    method_seconds = {n: 0.0 for n in names}
    for case in cases:
        for outcome in case.outcomes:
            method_seconds[outcome.method] += outcome.seconds
    study = Study(config, infos, cases, summarize(config, names, cases), totals(config, names, cases), proofs,
                  seconds, method_seconds, workers, summarize(config, names, cases, config.option_regimes))
    return study, extras


def _check(config: StudyConfig, jobs: int | None) -> None:
    integer(1)("examples", config.examples)  # the option spec's integer rule (gradcheck/options.py)
    integer(1, allow_none=True)("jobs", jobs)
    bad = [d for d in config.dtypes if d not in DTYPE_NAMES]
    if bad or not config.dtypes:
        raise InvalidArgument(f"dtypes must be a non-empty subset of {DTYPE_NAMES}, got {config.dtypes!r}.")
    bad = [r for r in config.regimes if r not in REGIMES]
    if bad or not (config.regimes or config.option_regimes):
        raise InvalidArgument(f"regimes must be a non-empty subset of {REGIMES}, got {config.regimes!r}.")
    if config.option_regimes and not config.option_shapes:
        raise InvalidArgument(f"option_shapes must name at least one (N, K) for the option regimes "
                              f"{config.option_regimes!r}, got {config.option_shapes!r}.")
    bad = [r for r in config.option_regimes if r not in OPTION_REGIMES]
    if bad or len(set(config.option_regimes)) < len(config.option_regimes):
        raise InvalidArgument(f"option_regimes must be distinct regimes of {OPTION_REGIMES} (or none), got "
                              f"{config.option_regimes!r}.")
    integer(0)("seed", config.seed)
