"""The cross-method study behind ``gradcheck report``: every method against the certified truth, in parallel.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcheck.dtypes import DTYPE_NAMES, FLOAT64
from gradcheck.errors import InvalidArgument, require
from gradcheck.regimes import REGIMES, make_case

DEFAULT_SEED = 0
DEFAULT_EXAMPLES = 16  # cases per regime and dtype; the default report must finish in two minutes on 2 cores
SHAPES: tuple[tuple[int, int], ...] = ((2, 5), (3, 8), (1, 3))  # few shapes: JAX compiles once per shape
PROOF_CLASSES = 4  # SymPy proofs for K = 1 .. 4 in the report (about 2 s uncached)
CHUNK = 24  # largest number of cases per task


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs.

    Attributes:
        seed: case ``i`` of a regime and dtype uses ``make_case(seed * 1_000_003 + i, ...)``.
        examples: cases per regime and dtype.
        dtypes, regimes: the grid.
        methods: registry names; all registered methods when empty.
        shapes: case ``i`` has shape ``shapes[i % len(shapes)]``.
        proof_classes: SymPy proofs for K = 1 .. proof_classes (0: none).
    """

    seed: int = DEFAULT_SEED
    examples: int = DEFAULT_EXAMPLES
    dtypes: tuple[str, ...] = DTYPE_NAMES
    regimes: tuple[str, ...] = REGIMES
    methods: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = SHAPES
    proof_classes: int = PROOF_CLASSES

    def case_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def shape(self, index: int) -> tuple[int, int]:
        return self.shapes[index % len(self.shapes)]


@dataclass(frozen=True, eq=False)
class Outcome:
    """One method on one case.

    Attributes:
        method: registry name.
        status: the :class:`gradcheck.estimators.Status` name.
        ulps: per-element ULP error against the truth in the case's dtype (empty unless the status is usable).
        within: every element satisfies ``|grad - truth64| <= error + ulp64(truth64) / 2`` (None when unusable).
        worst_index: the element with the largest ULP error.
        expected, got, error: the truth, the method's value and its error estimate there.
        evaluations: function evaluations the method reported.
        seconds: wall time of the method call (timing, not part of the results).
    """

    method: str
    status: str
    ulps: np.ndarray
    within: bool | None
    worst_index: tuple[int, ...] | None
    expected: float | None
    got: float | None
    error: float | None
    evaluations: int
    seconds: float

    @property
    def max_ulp(self) -> float | None:
        return float(self.ulps.max()) if self.ulps.size else None


@dataclass(frozen=True, eq=False)
class CaseResult:
    """All methods on one generated case.

    Attributes:
        dtype, regime, index: where the case sits in the grid.
        seed: the seed given to :func:`gradcheck.regimes.make_case`.
        shape: ``(N, K)``.
        gap: the largest spread ``max z - min z`` over the finite logits of a row (0 for K = 1).
        outcomes: one per method, in the configured order.
    """

    dtype: str
    regime: str
    index: int
    seed: int
    shape: tuple[int, int]
    gap: float
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True)
class WorstCase:
    """The case where a method was furthest from the truth, self-contained for reproduction."""

    seed: int
    regime: str
    dtype: str
    logits: np.ndarray
    targets: np.ndarray
    options: dict[str, Any]
    index: tuple[int, ...]
    expected: float
    got: float
    ulps: float
    error: float


@dataclass(frozen=True)
class Cell:
    """One method x regime x dtype.

    Attributes:
        cases: cases run.
        usable: cases with a usable gradient (status CONVERGED, ERROR_INCREASED or ITERATION_LIMIT).
        unsupported, non_finite: cases with those statuses.
        max_ulp, median_ulp: over every element of the usable cases (None without any).
        within_share: share of usable cases whose error estimate covered the actual error.
        worst: the worst usable case (None without any).
    """

    method: str
    regime: str
    dtype: str
    cases: int
    usable: int
    unsupported: int
    non_finite: int
    max_ulp: float | None
    median_ulp: float | None
    within_share: float | None
    worst: WorstCase | None


@dataclass(frozen=True)
class ProofRow:
    """One SymPy proof (see :class:`gradcheck.estimators.sympy_symbolic.Proof`)."""

    kind: str
    k: int
    status: str
    statement: str
    seconds: float
    cached: bool


@dataclass(frozen=True)
class MethodInfo:
    """A registered method as the report describes it."""

    name: str
    summary: str
    bound: bool


@dataclass(frozen=True, eq=False)
class Study:
    """The outcome of :func:`run_study`.

    Attributes:
        config: what ran.
        methods: the methods, in order.
        cases: every case, in grid order (dtype, regime, index).
        cells: the summaries, in order method, regime, dtype.
        totals: per method and dtype over all regimes (regime "all"), in order method, dtype.
        proofs: SymPy proofs.
        seconds: wall time of the whole study (timing).
        method_seconds: total wall time per method over all cases (timing).
        workers: the executor used, e.g. "processes:2" or "dask:tcp://..." (environment).
    """

    config: StudyConfig
    methods: tuple[MethodInfo, ...]
    cases: tuple[CaseResult, ...]
    cells: tuple[Cell, ...]
    totals: tuple[Cell, ...]
    proofs: tuple[ProofRow, ...]
    seconds: float = 0.0
    method_seconds: dict[str, float] = field(default_factory=dict)
    workers: str = ""


# --- tasks (top-level functions: they run in worker processes) -----------------------------------


@dataclass(frozen=True)
class _Chunk:
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
    from gradcheck.compare import compare
    from gradcheck.estimators import gradient
    from gradcheck.exact import exact_grad

    seed = config.case_seed(index)
    n, k = config.shape(index)
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


def _run_chunk(chunk: _Chunk) -> list[CaseResult]:
    return [run_case(chunk.config, chunk.methods, chunk.dtype, regime, i) for regime, i in chunk.items]


def run_proofs(max_classes: int) -> list[ProofRow]:
    """SymPy proofs of the closed forms for K = 1 .. max_classes (cached on disk by the estimator)."""
    if max_classes < 1:
        return []
    from gradcheck.estimators.sympy_symbolic import prove_all

    return [ProofRow(p.kind, p.k, p.status, p.statement, p.seconds, p.cached) for p in prove_all(max_classes)]


# --- executors -----------------------------------------------------------------------------------


def _chunks(config: StudyConfig, methods: tuple[str, ...]) -> list[_Chunk]:
    """Tasks of at most CHUNK cases, each of one dtype and one shape."""
    out = []
    for dtype in config.dtypes:
        for s in range(len(config.shapes)):
            items = [(r, i) for r in config.regimes for i in range(s, config.examples, len(config.shapes))]
            for start in range(0, len(items), CHUNK):
                out.append(_Chunk(config, methods, dtype, tuple(items[start:start + CHUNK])))
    return out


def _local(tasks: list[tuple[Callable, Any]], jobs: int, progress: Callable[[int], None]) -> tuple[list[Any], str]:
    """Run ``fn(arg)`` for every task on ``jobs`` processes (in this process when jobs == 1), in task order."""
    if jobs == 1:
        results = []
        for fn, arg in tasks:
            results.append(fn(arg))
            progress(1)
        return results, "in-process"
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent may hold threads (JAX, rich), and fork would copy their locks
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, arg) for fn, arg in tasks]
        for future in as_completed(futures):
            future.result()  # raise a worker's exception here
            progress(1)
        return [f.result() for f in futures], f"processes:{jobs}"


def _dask(tasks: list[tuple[Callable, Any]], address: str, progress: Callable[[int], None]) -> tuple[list[Any], str]:
    """Run the tasks on an existing Dask distributed cluster, in task order."""
    require("dask.distributed", extra="dask")
    from dask.distributed import Client, as_completed

    with Client(address) as client:
        futures = [client.submit(fn, arg, pure=False) for fn, arg in tasks]
        for future in as_completed(futures):
            future.result()
            progress(1)
        return client.gather(futures), f"dask:{address}"


def task_count(config: StudyConfig) -> int:
    """The number of progress steps :func:`run_study` reports for ``config``."""
    return len(_chunks(config, ())) + 1


def run_study(
    config: StudyConfig = StudyConfig(),
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int], None] | None = None,
    extra: Sequence[tuple[Callable, Any]] = (),
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
    chunks = _chunks(config, tuple(names))
    tasks: list[tuple[Callable, Any]] = [(run_proofs, config.proof_classes), *extra]
    tasks += [(_run_chunk, c) for c in chunks]
    start = time.perf_counter()
    if scheduler:
        results, workers = _dask(tasks, scheduler, tick)
    else:
        results, workers = _local(tasks, jobs or os.cpu_count() or 1, tick)
    seconds = time.perf_counter() - start
    proofs = tuple(results[0])
    extras = results[1:1 + len(extra)]
    position = {(d, r): (a, b) for a, d in enumerate(config.dtypes) for b, r in enumerate(config.regimes)}
    cases = tuple(sorted((case for chunk in results[1 + len(extra):] for case in chunk),
                         key=lambda c: (*position[c.dtype, c.regime], c.index)))
    infos = tuple(MethodInfo(n, spec(n).summary, spec(n).bound) for n in names)
    method_seconds = {n: 0.0 for n in names}
    for case in cases:
        for outcome in case.outcomes:
            method_seconds[outcome.method] += outcome.seconds
    study = Study(config, infos, cases, summarize(config, names, cases), totals(config, names, cases), proofs,
                  seconds, method_seconds, workers)
    return study, extras


def _check(config: StudyConfig, jobs: int | None) -> None:
    if isinstance(config.examples, bool) or not isinstance(config.examples, int) or config.examples < 1:
        raise InvalidArgument(f"examples must be a positive integer, got {config.examples!r}.")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise InvalidArgument(f"jobs must be a positive integer, got {jobs!r}.")
    bad = [d for d in config.dtypes if d not in DTYPE_NAMES]
    if bad or not config.dtypes:
        raise InvalidArgument(f"dtypes must be a non-empty subset of {DTYPE_NAMES}, got {config.dtypes!r}.")
    bad = [r for r in config.regimes if r not in REGIMES]
    if bad or not config.regimes:
        raise InvalidArgument(f"regimes must be a non-empty subset of {REGIMES}, got {config.regimes!r}.")
    if config.seed < 0:
        raise InvalidArgument(f"seed must be a nonnegative integer, got {config.seed!r}.")


# --- summaries -----------------------------------------------------------------------------------


def summarize(config: StudyConfig, methods: Sequence[str], cases: Sequence[CaseResult]) -> tuple[Cell, ...]:
    """One :class:`Cell` per method x regime x dtype (in that order), from the cases."""
    by_key: dict[tuple[str, str], list[CaseResult]] = {}
    for case in cases:
        by_key.setdefault((case.regime, case.dtype), []).append(case)
    cells = []
    for m, name in enumerate(methods):
        for regime in config.regimes:
            for dtype in config.dtypes:
                group = by_key.get((regime, dtype), [])
                cells.append(_cell(name, m, regime, dtype, group))
    return tuple(cells)


def totals(config: StudyConfig, methods: Sequence[str], cases: Sequence[CaseResult]) -> tuple[Cell, ...]:
    """One :class:`Cell` per method x dtype over every regime (regime "all")."""
    return tuple(_cell(name, m, "all", dtype, [c for c in cases if c.dtype == dtype])
                 for m, name in enumerate(methods) for dtype in config.dtypes)


def _cell(name: str, m: int, regime: str, dtype: str, group: list[CaseResult]) -> Cell:
    outcomes = [(case, case.outcomes[m]) for case in group]
    usable = [(c, o) for c, o in outcomes if o.within is not None]
    unsupported = sum(o.status == "UNSUPPORTED" for _, o in outcomes)
    non_finite = sum(o.status == "NON_FINITE" for _, o in outcomes)
    if not usable:
        return Cell(name, regime, dtype, len(group), 0, unsupported, non_finite, None, None, None, None)
    ulps = np.concatenate([o.ulps for _, o in usable])
    within = sum(bool(o.within) for _, o in usable) / len(usable)
    # the worst case: largest ULP error, first in case order on ties
    case, outcome = max(usable, key=lambda co: (co[1].max_ulp, -co[0].index))
    return Cell(name, regime, dtype, len(group), len(usable), unsupported, non_finite, float(ulps.max()),
                float(np.median(ulps)), within, _worst(case, outcome))


def _worst(case: CaseResult, outcome: Outcome) -> WorstCase:
    z, t, options = make_case(case.seed, case.regime, case.dtype, n=case.shape[0], k=case.shape[1])
    return WorstCase(case.seed, case.regime, case.dtype, z, t, options, tuple(outcome.worst_index or ()),
                     float(outcome.expected), float(outcome.got), float(outcome.max_ulp), float(outcome.error))
