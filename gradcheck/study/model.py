"""The study's records: what a study runs (StudyConfig) and what it found, per case, cell, proof and method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcheck.dtypes import DTYPE_NAMES
from gradcheck.regimes import OPTION_REGIMES, REGIMES

DEFAULT_SEED = 0
DEFAULT_EXAMPLES = 16  # cases per regime and dtype; the default report must finish in two minutes on 2 cores
SHAPES: tuple[tuple[int, int], ...] = ((2, 5), (3, 8), (1, 3))  # few shapes: JAX compiles once per shape
# the kernel options' rows: one shape (each shape and option compiles the JAX methods anew, about 1 s each)
OPTION_SHAPES: tuple[tuple[int, int], ...] = ((3, 8),)
PROOF_CLASSES = 4  # SymPy proofs for K = 1 .. 4 in the report (about 2 s uncached)


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs.

    Attributes:
        seed: case ``i`` of a regime and dtype uses ``make_case(seed * 1_000_003 + i, ...)``.
        examples: cases per regime and dtype.
        dtypes, regimes: the grid.
        option_regimes: the kernel options' own rows (z-loss, softcap: regimes that set their option,
            :data:`gradcheck.regimes.OPTION_REGIMES`); summarized apart, so the plain cells and totals
            do not depend on them.
        methods: registry names; all registered methods when empty.
        shapes: case ``i`` of a plain regime has shape ``shapes[i % len(shapes)]``.
        option_shapes: the same for the option regimes.
        proof_classes: SymPy proofs for K = 1 .. proof_classes (0: none).
    """

    seed: int = DEFAULT_SEED
    examples: int = DEFAULT_EXAMPLES
    dtypes: tuple[str, ...] = DTYPE_NAMES
    regimes: tuple[str, ...] = REGIMES
    option_regimes: tuple[str, ...] = OPTION_REGIMES
    methods: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = SHAPES
    proof_classes: int = PROOF_CLASSES
    option_shapes: tuple[tuple[int, int], ...] = OPTION_SHAPES

    @property
    def all_regimes(self) -> tuple[str, ...]:
        """The plain regimes, then the option regimes: every regime the study runs."""
        return self.regimes + self.option_regimes

    def case_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def shape(self, index: int, regime: str | None = None) -> tuple[int, int]:
        """The shape of case ``index`` (of ``regime``: an option regime takes ``option_shapes``)."""
        shapes = self.option_shapes if regime is not None and regime in self.option_regimes else self.shapes
        return shapes[index % len(shapes)]


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
    """The outcome of :func:`gradcheck.study.run.run_study`.

    Attributes:
        config: what ran.
        methods: the methods, in order.
        cases: every case, in grid order (dtype, regime, index).
        cells: the summaries of the plain regimes, in order method, regime, dtype.
        totals: per method and dtype over all plain regimes (regime "all"), in order method, dtype.
        proofs: SymPy proofs.
        seconds: wall time of the whole study (timing).
        method_seconds: total wall time per method over all cases (timing).
        workers: the executor used, e.g. "processes:2" or "dask:tcp://..." (environment).
        option_cells: the summaries of the option regimes (z-loss, softcap), in order method, regime, dtype.
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
    option_cells: tuple[Cell, ...] = ()
