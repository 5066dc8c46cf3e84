"""The study's summaries: the cases folded into one Cell per method x regime x dtype, and per method x dtype."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradcheck.regimes import make_case
from gradcheck.study.model import CaseResult, Cell, Outcome, StudyConfig, WorstCase


def summarize(config: StudyConfig, methods: Sequence[str], cases: Sequence[CaseResult],
              regimes: Sequence[str] | None = None) -> tuple[Cell, ...]:
    """One :class:`Cell` per method x regime x dtype (in that order), from the cases.

    ``regimes``: the rows (default the plain regimes, ``config.regimes``; the option rows are
    ``config.option_regimes``).
    """
    by_key: dict[tuple[str, str], list[CaseResult]] = {}
    for case in cases:
        by_key.setdefault((case.regime, case.dtype), []).append(case)
    cells = []
    for m, name in enumerate(methods):
        for regime in config.regimes if regimes is None else regimes:
            for dtype in config.dtypes:
                group = by_key.get((regime, dtype), [])
                cells.append(_cell(name, m, regime, dtype, group))
    return tuple(cells)


def totals(config: StudyConfig, methods: Sequence[str], cases: Sequence[CaseResult]) -> tuple[Cell, ...]:
    """One :class:`Cell` per method x dtype over every plain regime (regime "all"; the option rows apart)."""
    plain = set(config.regimes)
    return tuple(_cell(name, m, "all", dtype, [c for c in cases if c.dtype == dtype and c.regime in plain])
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
