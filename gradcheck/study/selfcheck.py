"""The oracle's self-check (`gradcheck selfcheck`): the fast path against the certified truth, per regime and dtype."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from gradcheck.ulps import compare
from gradcheck.dtypes import float_format
from gradcheck.exact import exact_grad
from gradcheck.oracle import cross_entropy_grad, cross_entropy_grad_bounded
from gradcheck.regimes import OPTION_REGIMES, REGIMES, make_case


@dataclass(frozen=True)
class SelfCheckRow:
    """One regime x dtype: how far the fast path is from the truth, and whether its bound held."""

    regime: str
    dtype: str
    cases: int
    max_ulp: float
    median_ulp: float
    bound_held: bool
    seconds: float


def self_check(*, seed: int = 0, cases: int = 20, dtypes: tuple[str, ...] = ("float64", "float32")) -> list[SelfCheckRow]:
    """Run the fast oracle and the certified truth on ``cases`` seeded cases per regime and dtype.

    The float64 bound is checked as ``|fast - truth| <= bound + ulp(truth)/2`` (docs/oracle.md).
    """
    rows = []
    for dtype in dtypes:
        half = float_format("float64")
        for regime in REGIMES + OPTION_REGIMES:  # the plain regimes, then the kernel options' rows
            start = time.perf_counter()
            ulps, held = [], True
            for i in range(cases):
                z, t, opts = make_case(seed * 1_000_003 + i, regime, dtype)
                truth = exact_grad(z, t, **opts)
                ulps.append(compare(cross_entropy_grad(z, t, **opts), truth).ulp_error.ravel())
                g, bound = cross_entropy_grad_bounded(z, t, **opts)
                truth64 = exact_grad(z, t, dtype="float64", **opts)
                held &= bool(np.all(np.abs(g - truth64) <= bound + half.ulp(truth64) / 2))
            allu = np.concatenate(ulps)
            rows.append(SelfCheckRow(regime, dtype, cases, float(allu.max()), float(np.median(allu)), held,
                                     time.perf_counter() - start))
    return rows
