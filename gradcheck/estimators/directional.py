"""Checks of a supplied gradient along seeded random directions: directional differences and the Taylor test.

Both evaluate the float64 row losses of :mod:`gradcheck.estimators.row_loss` (every supported input
embeds exactly in float64) and cost O(1) evaluations per direction, whatever the size of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck.dtypes import FLOAT64, float_format
from gradcheck.estimators.finite_difference import C3, _pow2_at_least
from gradcheck.estimators.result import rounding_error
from gradcheck.oracle import gamma
from gradcheck.estimators.row_loss import RealRows
from gradcheck.estimators.terms import kernel_terms
from gradcheck.problem import Problem


@dataclass(frozen=True, eq=False)
class DirectionalCheck:
    """Central differences of the loss along Rademacher directions d, against ``grad . d``.

    Attributes:
        measured: ``(P,)`` central-difference directional derivatives.
        predicted: ``(P,)`` ``sum(grad * d)``.
        error: ``(P,)`` estimated error of ``measured`` plus the error of ``predicted`` allowed by
            ``grad_error`` (docs/methods.md, "Directional checks").
        evaluations: loss evaluations (each over the whole batch).
    """

    measured: np.ndarray
    predicted: np.ndarray
    error: np.ndarray
    evaluations: int

    @property
    def passed(self) -> bool:
        return bool(np.all(np.abs(self.measured - self.predicted) <= self.error))


def _setup(problem: Problem, grad: Any) -> tuple[RealRows, np.ndarray, np.ndarray, float, np.ndarray]:
    """The float64 row functions (z-loss and softcap included), the gradient, the per-row third
    directional-derivative estimate, D, and the upstream factors."""
    terms = kernel_terms(problem)
    z = problem.logits.astype(np.float64)
    g = np.asarray(grad, dtype=np.float64).reshape(z.shape)
    rows = RealRows(z, terms.wt, FLOAT64, beta=terms.beta if problem.lse_square_scale else None,
                    cap=problem.softcap)
    return rows, g, _third_bound(terms), terms.d, terms.up


def _third_bound(terms: Any) -> np.ndarray:
    """Per row, an estimate of the third derivative of F along a direction with entries in [-1, 1].

    In z': cross-entropy ``8 C3 |S|`` (S times the third cumulant of d under p, two-point bound),
    z-loss ``2 |beta| (3 + 8 C3 L)`` (the third derivative of lse^2 is ``2 (3 lse' lse'' + lse lse^(3))``,
    ``|lse'| <= 1``, ``lse'' = Var_p(d) <= 1``), L = |lse| + 1; under a softcap the chain terms of
    :class:`~gradcheck.estimators.finite_difference.Curvature` with G1, G2 the first and second
    directional bounds (docs/methods.md, "Directional checks").
    """
    s = np.abs(terms.s_rows)
    b = np.abs(terms.beta)
    big_l = np.where(np.isfinite(terms.lse), np.abs(terms.lse), 0.0) + 1.0
    g1 = s + np.abs(terms.wt).sum(axis=1) + 2 * b * big_l
    g2 = s + 2 * b * (1.0 + big_l)
    g3 = 8 * C3 * s + 2 * b * (3.0 + 8 * C3 * big_l)
    if terms.cap is None:
        return g3
    k2, k3 = 4.0 / (3.0 * np.sqrt(3.0) * terms.cap), 2.0 / terms.cap**2
    return g3 + 3 * k2 * g2 + k3 * g1


def _directions(problem: Problem, probes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.choice([-1.0, 1.0], size=(probes, *problem.logits.shape))
    return np.where(np.isfinite(problem.logits.astype(np.float64))[None], d, 0.0)  # masked logits stay put


def directional_check(problem: Problem, grad: Any, *, grad_error: Any = None, probes: int = 8,
                      seed: int = 0) -> DirectionalCheck:
    """Compare ``grad . d`` with ``(L(z + h d) - L(z - h d)) / 2h`` for ``probes`` seeded directions.

    Args:
        problem: the case.
        grad: the gradient under test, shaped like the logits.
        grad_error: per-element allowance on ``grad``; default half an ulp of its dtype (a
            correctly rounded gradient passes).
        probes: number of directions (two evaluations each, plus one).
        seed: seeds the directions (entries +1 or -1).

    The loss is ``sum_n g_n F_n / D`` (z-loss, softcap and upstream factors included). The third
    directional derivative of a row loss is S times the third cumulant of d under p, at most
    ``(max d - min d)**3 C3 = 8 C3`` per unit of S (plus the z-loss and softcap terms of
    :func:`_third_bound`); h minimizes ``T h**2 / 6 + delta / h``.
    """
    rows, g, third, d, up = _setup(problem, grad)
    if grad_error is None:
        arr = np.asarray(grad)
        grad_error = rounding_error(arr.astype(np.float64), float_format(arr.dtype)) if arr.dtype != np.float64 \
            else 0.5 * FLOAT64.ulp(g)
    grad_error = np.asarray(grad_error, dtype=np.float64).reshape(g.shape)
    dirs = _directions(problem, probes, seed)
    a_up = np.abs(up)
    total_third = float((a_up * third).sum())
    delta = float((a_up * (rows.delta + rows.spread)).sum())
    h = float(_pow2_at_least(np.cbrt(3 * delta / max(total_third, 1e-300)))) if delta > 0 else 2.0**-20
    h = min(h, 1.0)
    measured, predicted, error = [], [], []
    for dd in dirs:
        with np.errstate(invalid="ignore"):
            lp, dp = rows.full(rows.z + h * dd)
            lm, dm = rows.full(rows.z - h * dd)
        measured.append(float((up * (lp - lm)).sum()) / (2 * h) / d)
        gd = g * dd
        predicted.append(float(gd.sum()))
        n_terms = g.size + rows.n
        error.append((total_third * h * h / 6 + float((a_up * (dp + dm)).sum()) / (2 * h)
                      + gamma(n_terms + 1, FLOAT64.unit_roundoff) * float((a_up * (np.abs(lp) + np.abs(lm))).sum())
                      / (2 * h)) / abs(d)
                     + gamma(g.size, FLOAT64.unit_roundoff) * float(np.abs(gd).sum())
                     + float((grad_error * np.abs(dd)).sum()))
    return DirectionalCheck(np.array(measured), np.array(predicted), np.array(error), 1 + 2 * probes)


@dataclass(frozen=True, eq=False)
class TaylorTest:
    """The Taylor-remainder test along one direction d.

    ``r(h) = |L(z + h d) - L(z) - h grad . d|`` shrinks like h**2 when grad is right and like h
    when it is wrong. ``order`` is the median slope of log r against log h over the three
    smallest steps whose residual is above the rounding noise; ``passed`` is ``order > 1.5``
    (nearer 2 than 1), None when fewer than three steps are above the noise.

    Attributes:
        steps, residuals, noise: ``(M,)``; noise is the estimated rounding error of the residual.
        order: the fitted slope (nan when inconclusive).
        passed: True, False, or None (inconclusive).
    """

    steps: np.ndarray
    residuals: np.ndarray
    noise: np.ndarray
    order: float
    passed: bool | None


def taylor_test(problem: Problem, grad: Any, *, seed: int = 0, steps: Any = None) -> TaylorTest:
    """Run the Taylor-remainder test along a seeded Rademacher direction (steps 2**-1 .. 2**-16)."""
    rows, g, _, d, up = _setup(problem, grad)
    dd = _directions(problem, 1, seed)[0]
    hs = 2.0 ** -np.arange(1, 17) if steps is None else np.asarray(steps, dtype=np.float64)
    a_up = np.abs(up)
    l0, d0 = float((up * rows.value).sum()), float((a_up * (rows.delta + rows.spread)).sum())
    gd = float((g * dd).sum())
    res, noise = [], []
    for h in hs:
        with np.errstate(invalid="ignore"):
            lh, dh = rows.full(rows.z + h * dd)
        res.append(abs((float((up * lh).sum()) - l0) / d - h * gd))
        noise.append((float((a_up * dh).sum()) + d0
                      + gamma(rows.n + 3, FLOAT64.unit_roundoff) * (float((a_up * np.abs(lh)).sum()) + abs(l0)))
                     / abs(d) + gamma(g.size + 2, FLOAT64.unit_roundoff) * h * float(np.abs(g * dd).sum()))
    res_a, noise_a = np.array(res), np.array(noise)
    usable = np.flatnonzero(res_a > noise_a)
    if usable.size < 4:
        return TaylorTest(hs, res_a, noise_a, float("nan"), None)
    last = usable[-4:]
    slopes = np.diff(np.log(res_a[last])) / np.diff(np.log(hs[last]))
    order = float(np.median(slopes))
    return TaylorTest(hs, res_a, noise_a, order, order > 1.5)
