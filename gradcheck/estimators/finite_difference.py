"""Finite differences: a generic gradient of any scalar function, and the structured cross-entropy path.

Schemes: forward, central, complex step and Richardson-extrapolated central differences. Each picks
its step from the working dtype's unit roundoff u and the scale of the input, and returns an error
estimate (truncation plus rounding) derived in docs/methods.md, "Finite differences".

The structured path uses that the batch loss is a sum of independent row losses: perturbing column
k of every row at once gives all N partial derivatives of column k from one pair of (vectorized)
evaluations of the row losses, so the full gradient costs 2K evaluations (central) instead of 2NK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcheck.dtypes import FLOAT64, FloatFormat, float_format
from gradcheck.errors import InvalidArgument
from gradcheck.estimators.result import MethodResult, Status, finish, rounding_error, unsupported
from gradcheck.oracle import gamma
from gradcheck.estimators.row_loss import CTANH_ULPS, ComplexRows, RealRows, softcap_error
from gradcheck.estimators.terms import kernel_terms, softcap
from gradcheck.problem import Problem

SCHEMES = ("forward", "central", "complex_step", "richardson")
# Sup over the real line of |sigma'| and |sigma''| for the logistic sigma: the second and third
# derivatives of a row loss in one logit are S sigma'(.) and S sigma''(.), hence bounded by C2 S and
# C3 S (docs/methods.md; tests/test_finite_difference.py re-derives both with SymPy).
C2 = 0.25
C3 = 1.0 / (6.0 * math.sqrt(3.0))
RICHARDSON_H0 = 0.5  # first step; the row loss is analytic in the strip |Im z_k| < pi (docs/methods.md)
MAX_LEVELS = 8


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise InvalidArgument(f"scheme must be one of {SCHEMES}, got {scheme!r}.")
    return scheme


def _pow2_at_least(x: np.ndarray) -> np.ndarray:
    """The smallest power of two >= x (elementwise, x > 0)."""
    _, e = np.frexp(np.asarray(x, dtype=np.float64))
    y = np.ldexp(0.5, e)
    return np.where(y < x, 2 * y, y)


@dataclass(frozen=True)
class Curvature:
    """Per-row bounds on the second and third derivatives of a row function in one logit.

    ``F = l + beta lse^2`` in z', then z' = c tanh(z / c) (docs/methods.md, "Kernel options"):
    in z', ``|F'| <= |S| + max|wt| + 2 |beta| L``, ``|F''| <= C2 |S| + 2 |beta| max(1, L)``,
    ``|F'''| <= C3 |S| + |beta| (8/9 + 2 C3 L)`` with ``L`` the largest ``|lse|`` on the interval
    (``|lse| + h``: ``|d lse / dz| <= 1``); the softcap's ``|phi''| <= 4 / (3 sqrt(3) c)`` and
    ``|phi'''| <= 2 / c^2`` enter through ``f'' = F'' phi'^2 + F' phi''`` and
    ``f''' = F''' phi'^3 + 3 F'' phi' phi'' + F' phi'''`` (``|phi'| <= 1``).
    """

    s: np.ndarray  # |S|
    w: np.ndarray  # max_c |wt_c|
    beta: np.ndarray  # |beta|
    lse: np.ndarray  # |lse|
    cap: float | None

    def bounds(self, h: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(bound on |f''|, bound on |f'''|)`` over steps up to ``h``."""
        big_l = self.lse + h
        g1 = self.s + self.w + 2 * self.beta * big_l
        g2 = C2 * self.s + 2 * self.beta * np.maximum(1.0, big_l)
        g3 = C3 * self.s + self.beta * (8.0 / 9.0 + 2 * C3 * big_l)
        if self.cap is None:
            return g2, g3
        k2, k3 = 4.0 / (3.0 * math.sqrt(3.0) * self.cap), 2.0 / self.cap**2
        return g2 + k2 * g1, g3 + 3 * k2 * g2 + k3 * g1


def cross_entropy_difference(problem: Problem, *, scheme: str = "central", max_levels: int = MAX_LEVELS) -> MethodResult:
    """The gradient of the cross-entropy by finite differences of its row functions, in the logits' dtype.

    The row functions include the z-loss and the softcap (:mod:`gradcheck.estimators.row_loss`);
    each row's derivative is multiplied by its upstream factor in float64 (a VJP).

    Args:
        problem: a validated case.
        scheme: "forward", "central", "complex_step" or "richardson".
        max_levels: Richardson only: the largest number of halvings of the step.

    Returns:
        A :class:`MethodResult` whose ``error`` is an estimate, not a bound: truncation (bounded
        with the sup of the loss's derivatives) plus a first-order running estimate of rounding.
        Status UNSUPPORTED for float16 and bfloat16 (a difference there keeps about u**(2/3), i.e.
        a few bits); NON_FINITE where the loss is infinite (weight on a masked class); Richardson
        reports ERROR_INCREASED or ITERATION_LIMIT per its stopping rule.

    >>> import gradcheck
    >>> p = gradcheck.make_problem(np.array([[0.0, 1.0, 2.0]]), np.array([2]))
    >>> r = cross_entropy_difference(p, scheme="complex_step")
    >>> bool(np.all(np.abs(r.grad - gradcheck.exact_grad(p.logits, p.targets)) <= r.error))
    True
    """
    _check_scheme(scheme)
    name = f"fd_{scheme}"
    fmt = problem.format
    if fmt.precision < 24:
        return unsupported(problem, method=name, reason=(
            f"finite differences need float32 or float64; in {fmt.name} (u = {fmt.unit_roundoff:g}) "
            f"a difference keeps about u**(2/3) = {fmt.unit_roundoff ** (2 / 3):.1g} relative accuracy"))
    terms = kernel_terms(problem)
    wt = terms.wt
    wt_d = wt.astype(fmt.dtype)
    s_rows = wt_d.astype(np.float64).sum(axis=1)
    d = terms.d
    u = fmt.unit_roundoff
    cap = problem.softcap
    beta = terms.beta if problem.lse_square_scale else None
    z = np.asarray(problem.logits)
    with np.errstate(invalid="ignore", over="ignore"):
        curv = Curvature(np.abs(s_rows), np.max(np.abs(wt), axis=1), np.abs(terms.beta),
                         np.where(np.isfinite(terms.lse), np.abs(terms.lse), 0.0), cap)
        big_a, big_b, big_z = terms.sizes()
        if cap is not None:
            # rounding of z'_k at the perturbed points (real schemes) and the derivative taken at the
            # rounded z'_c of the other columns (every scheme): docs/methods.md, "Kernel options"
            ez = softcap_error(softcap(z.astype(fmt.dtype), cap), u, cap)
            cap_err = (big_a + big_b + big_z) * ez
            hess = np.abs(s_rows) + 2 * np.abs(terms.beta) * (1.0 + np.abs(terms.lse))
            point = hess[:, None] * terms.p * (ez + ez.max(axis=1, keepdims=True)) * terms.chi
        else:
            cap_err = np.zeros(z.shape)
            point = np.zeros(z.shape)
    if scheme == "complex_step":
        g, err, evals, status, details = _complex_step(z, wt_d, s_rows, fmt, beta, cap, curv)
    else:
        rows = RealRows(z, wt_d, fmt, beta=beta, cap=cap)
        if scheme == "richardson":
            g, err, evals, status, details = _richardson(rows, curv, cap_err, fmt, max_levels)
        else:
            g, err, evals, status, details = _difference(rows, curv, cap_err, fmt, scheme)
    up = terms.up[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        grad = up * g / d
        # the function actually differentiated uses wt, S and beta rounded to the dtype: S p_k and wt_k
        # move by (gamma_K + u_wt) relative, the z-loss term by u + 2 u64 (docs/methods.md, "Model error")
        model = (gamma(problem.k, u) + (u if fmt.precision < 53 else 0.0)) * (np.abs(g) + 2 * np.abs(wt))
        model = model + (u + 2 * FLOAT64.unit_roundoff) * big_z * terms.chi
        error = np.abs(up) * (err + model + point) / abs(d) + 2 * FLOAT64.unit_roundoff * np.abs(grad)
    reason = "" if status == Status.CONVERGED else details.pop("reason", "")
    return finish(problem, grad, error, method=name, bound=False, evaluations=evals, status=status,
                  reason=reason, details=details)


def _difference(rows: RealRows, curv: Curvature, cap_err: np.ndarray, fmt: FloatFormat, scheme: str) -> tuple:
    """Forward or central differences, one column per pair of evaluations."""
    z = rows.z
    n, k = z.shape
    l0, d0 = rows.value, rows.delta
    noise = d0 + cap_err.max(axis=1)
    f2, f3 = curv.bounds(1.0)
    # optimal steps: central minimizes f3 h^2/6 + noise/h, forward f2 h/2 + 2 noise/h
    with np.errstate(divide="ignore", invalid="ignore"):
        h_row = (np.cbrt(3 * noise / np.where(f3 > 0, f3, 1.0)) if scheme == "central"
                 else 2 * np.sqrt(noise / np.where(f2 > 0, f2, 1.0)))
    h_row = np.clip(np.nan_to_num(h_row, nan=1.0, posinf=1.0), 0.0, 1.0)
    g = np.empty((n, k))
    err = np.empty((n, k))
    z64 = z.astype(np.float64)
    finite = np.isfinite(z64)
    evals = 1
    for c in range(k):
        zc = z64[:, c]
        h = _pow2_at_least(np.maximum(h_row, 2 * fmt.ulp(np.where(finite[:, c], zc, 0.0)) + fmt.smallest_subnormal))
        with np.errstate(invalid="ignore", over="ignore"):
            zp = (zc + h).astype(fmt.dtype)
            hp = np.where(finite[:, c], zp.astype(np.float64) - zc, h)
            lp, dp = rows.column(c, zp)
            if scheme == "central":
                zm = (zc - h).astype(fmt.dtype)
                hm = np.where(finite[:, c], zc - zm.astype(np.float64), h)
                lm, dm = rows.column(c, zm)
                evals += 2
                width = hp + hm
                c2, c3 = curv.bounds(np.maximum(hp, hm))
                g[:, c] = (lp - lm) / width
                err[:, c] = (c3 * np.maximum(hp, hm) ** 2 / 6 + c2 * np.abs(hp - hm) / 2
                             + (dp + dm + 2 * cap_err[:, c]) / width)
            else:
                evals += 1
                c2, _ = curv.bounds(hp)
                g[:, c] = (lp - l0) / hp
                err[:, c] = c2 * hp / 2 + (dp + d0 + 2 * cap_err[:, c]) / hp
    return g, err, evals, Status.CONVERGED, {"step_per_row": h_row}


def richardson_start(cap: float | None) -> float:
    """The first Richardson step: 1/2, or under a softcap c the largest power of two at most c/4.

    The row function is analytic in the strip ``|Im z_k| < rho`` with ``rho = pi`` (poles of the
    logistic) or, under a softcap, ``min(pi, pi c / 2)`` (poles of tanh(z / c)); ``h0 = rho / (2 pi)``
    keeps the table's ratio ``(h0 / rho)^2`` near 1/40 (docs/methods.md, "Richardson").
    """
    if cap is None or cap >= 2.0:
        return RICHARDSON_H0
    return float(2.0 ** math.floor(math.log2(cap / 4.0)))


def _richardson(rows: RealRows, curv: Curvature, cap_err: np.ndarray, fmt: FloatFormat, max_levels: int) -> tuple:
    """Central differences at h0 / 2**j, extrapolated in h**2 (Neville table), per element stopping.

    Error estimate of the returned T_jj: |T_jj - T_{j-1,j-1}| (the truncation of the worse
    iterate) plus the propagated rounding r_jj (docs/methods.md, "Richardson").
    """
    z = rows.z
    n, k = z.shape
    z64 = z.astype(np.float64)
    finite = np.isfinite(z64)
    g = np.full((n, k), np.nan)
    err = np.full((n, k), np.inf)
    state = np.full((n, k), int(Status.ITERATION_LIMIT))
    evals = 1
    levels_used = 0
    start = richardson_start(rows.cap)
    for c in range(k):
        zc = np.where(finite[:, c], z64[:, c], 0.0)
        floor = 2 * fmt.ulp(zc) + fmt.smallest_subnormal
        h0 = _pow2_at_least(np.maximum(start, floor))
        prev_t: list[np.ndarray] = []
        prev_r: list[np.ndarray] = []
        best, best_err = np.full(n, np.nan), np.full(n, np.inf)
        done = np.zeros(n, dtype=bool)
        last_diff = np.full(n, np.inf)
        for j in range(max_levels):
            h = h0 / 2.0**j
            small = h < floor  # the step cannot shrink further at this scale
            with np.errstate(invalid="ignore", over="ignore"):
                zp, zm = (z64[:, c] + h).astype(fmt.dtype), (z64[:, c] - h).astype(fmt.dtype)
                lp, dp = rows.column(c, zp)
                lm, dm = rows.column(c, zm)
                hp = np.where(finite[:, c], zp.astype(np.float64) - z64[:, c], h)
                hm = np.where(finite[:, c], z64[:, c] - zm.astype(np.float64), h)
                c2, _ = curv.bounds(np.maximum(hp, hm))
                t = [(lp - lm) / (hp + hm)]
                r = [(dp + dm + 2 * cap_err[:, c]) / (hp + hm) + c2 * np.abs(hp - hm) / 2]
                for m in range(1, j + 1):
                    f = 4.0**m - 1
                    t.append(t[m - 1] + (t[m - 1] - prev_t[m - 1]) / f)
                    r.append(r[m - 1] + (r[m - 1] + prev_r[m - 1]) / f)
            evals += 2
            levels_used = max(levels_used, j + 1)
            if j > 0:
                diff = np.abs(t[j] - prev_t[j - 1])
                est = diff + r[j]
                active = ~done
                increased = active & (diff > last_diff) & (diff > 2 * r[j])
                converged = active & ~increased & (diff <= 2 * r[j])
                take = active & ~increased
                best = np.where(take, t[j], best)
                best_err = np.where(take, est, best_err)
                state[:, c] = np.where(converged, int(Status.CONVERGED), state[:, c])
                state[:, c] = np.where(increased, int(Status.ERROR_INCREASED), state[:, c])
                done |= converged | increased | (active & ~np.isfinite(diff))
                last_diff = np.where(take, diff, last_diff)
            prev_t, prev_r = t, r
            if done.all() or small.all():
                break
        g[:, c], err[:, c] = best, best_err
    status = Status(int(state.max()))
    details: dict[str, Any] = {"levels": levels_used, "first_step": start}
    if status != Status.CONVERGED:
        names = {int(s): Status(int(s)).name for s in np.unique(state)}
        counts = {names[int(s)]: int((state == s).sum()) for s in np.unique(state)}
        details["reason"] = f"per-element outcomes {counts}"
    return g, err, evals, status, details


def _complex_step(z: np.ndarray, wt_d: np.ndarray, s_rows: np.ndarray, fmt: FloatFormat,
                  beta: np.ndarray | None, cap: float | None, curv: Curvature) -> tuple:
    """Im F(z + i h e_k) / h per column, h = u: truncation h**2 f3 / 6 is below u**2 f3.

    Estimate (docs/methods.md, "Complex step"): T1 relative ``eps1``, T2 ``gamma_K``, T3 through the
    errors of Re lse and Im lse, all three times the chain factor's relative error under a softcap.
    """
    rows = ComplexRows(z, wt_d, fmt, beta=beta, cap=cap)
    n, k = z.shape
    u = fmt.unit_roundoff
    h = u
    g = np.empty((n, k))
    err = np.empty((n, k))
    eps1 = 2 * rows.amax + 2 * gamma(k, u) + (rows.c + 6) * u + gamma(k, u)
    floor = np.abs(s_rows) * k * fmt.smallest_subnormal / h
    _, f3 = curv.bounds(h)
    b64 = np.zeros(n) if rows.beta is None else np.abs(rows.beta.astype(np.float64))
    z64 = z.astype(np.float64)
    za64 = rows.za.astype(np.float64)
    for c in range(k):
        parts = rows.imag_parts(c, h)
        t1, t2, t3, chi = parts["t1"], parts["t2"], parts["t3"], parts["chi"]
        g[:, c] = t1 + t2 + t3
        e = np.abs(t1) * eps1 + gamma(k, u) * np.abs(t2) + u * np.abs(t1 + t2) + f3 * h * h / 6 + floor
        if rows.beta is not None:
            at = rows.a == c
            re, im, log_im = parts["lse_re"], parts["lse_im"], parts["log_im"]
            # Im lse = [k = a] y + Im log1p(R) (relative eps1, and u for the sum); Re lse = z'_a + log1p(R)
            err_im = eps1 * np.abs(log_im) + np.where(at, 2 * u * np.abs(chi), 0.0)
            err_re = 2 * u * np.abs(re) + (2 * rows.amax + 2 * gamma(k, u) + (rows.c + 2) * u) * np.abs(re - za64)
            e = (e + 2 * b64 * (np.abs(re) * err_im + np.abs(im) * err_re) + 3 * u * np.abs(t3)
                 + b64 * k * fmt.smallest_subnormal / h)
        if cap is not None:
            # chi = Im c tanh((z + i h) / c) / h: complex tanh, the quotient's rounding (2 |x| u
            # relative on sech^2 x), h / c and the product with c
            with np.errstate(invalid="ignore", over="ignore"):
                x = np.where(np.isfinite(z64[:, c]), np.abs(z64[:, c]) / cap, 0.0)
            e = e + (CTANH_ULPS + 2 * x + 3) * u * (np.abs(t1) + np.abs(t2) + np.abs(t3))
        err[:, c] = e
    return g, err, k, Status.CONVERGED, {"step": h}


def finite_difference_gradient(
    f: Callable[[np.ndarray], Any],
    x: Any,
    *,
    scheme: str = "central",
    f_error: float | None = None,
    max_levels: int = MAX_LEVELS,
) -> MethodResult:
    """The gradient of any scalar function by finite differences, one coordinate at a time.

    Steps come from the dtype of ``x`` (float32 or float64) and the scale of each coordinate:
    ``h_i = u**(1/2) max(|x_i|, 1)`` (forward), ``u**(1/3) max(|x_i|, 1)`` (central), ``u``
    (complex step), ``max(|x_i|, 1) / 8`` halved per level (Richardson), each rounded up to a power
    of two. Nothing is known of f's derivatives, so truncation is estimated from a second step
    2h (docs/methods.md, "Generic differences").

    Args:
        f: maps an array shaped like ``x`` to a scalar (complex in, complex out for the complex step).
        x: the point, float32 or float64.
        scheme: "forward", "central", "complex_step" or "richardson".
        f_error: absolute error of one evaluation of f; default ``4 u |f(x)|`` (assumes f is
            computed to a few units of roundoff of its value).
        max_levels: Richardson only.

    Returns:
        A :class:`MethodResult` (``method="finite_difference"``), ``error`` an estimate.
        UNSUPPORTED when the dtype is narrower than float32, or for the complex step when f does
        not return a complex value for complex input (not analytic, or drops the imaginary part).

    >>> r = finite_difference_gradient(lambda v: np.sum(np.sin(v)), np.array([0.5, 1.0]))
    >>> bool(np.all(np.abs(r.grad - np.cos([0.5, 1.0])) <= r.error))
    True
    """
    _check_scheme(scheme)
    x = np.array(x)
    fmt = float_format(x.dtype, argument="x")
    if fmt.precision < 24:
        return _generic_unsupported(x.shape, fmt, 0, f"finite differences need float32 or float64, got {fmt.name}")
    u = fmt.unit_roundoff
    flat = x.reshape(-1).astype(np.float64)
    f0 = float(np.real(f(x)))
    delta = 4 * u * abs(f0) if f_error is None else float(f_error)
    grad = np.empty(flat.size)
    err = np.empty(flat.size)
    evals = 1
    status = Status.CONVERGED
    at = _shifted(f, flat, x.shape, fmt)
    for i in range(flat.size):
        if scheme == "complex_step":
            value = at(i, 1j * u)
            evals += 1
            if not np.iscomplexobj(value):
                return _generic_unsupported(x.shape, fmt, evals,
                                            "f returned a real value for complex input: it is not analytic as written")
            grad[i] = np.imag(value) / u
            err[i] = 4 * u * abs(grad[i])
            continue
        scale = max(abs(flat[i]), 1.0)
        real_at = lambda s, i=i: float(np.real(at(i, s)))  # noqa: E731 - f along coordinate i
        if scheme == "richardson":
            grad[i], err[i], used, st = _generic_richardson(real_at, scale, delta, max_levels)
            status = max(status, st)
        else:
            grad[i], err[i], used = _generic_difference(real_at, scheme, scale, f0, delta, u)
        evals += used
    st = Status.NON_FINITE if not np.all(np.isfinite(grad)) else status
    return _array_result(grad.reshape(x.shape), err.reshape(x.shape), fmt, _GENERIC, evals, st, "")


_GENERIC = "finite_difference"  # the method name of finite_difference_gradient's results


def _shifted(f: Callable[[np.ndarray], Any], flat: np.ndarray, shape: tuple[int, ...], fmt: FloatFormat) -> Callable:
    """``at(i, step)``: f at the point ``flat`` with ``step`` (real or imaginary) added to coordinate i."""

    def at(i: int, step: Any) -> Any:
        y = flat.astype(np.result_type(fmt.dtype, np.asarray(step).dtype)).copy()
        y[i] = y[i] + step
        return f(y.reshape(shape).astype(np.result_type(fmt.dtype, y.dtype)))

    return at


def _generic_unsupported(shape: tuple[int, ...], fmt: FloatFormat, evals: int, reason: str) -> MethodResult:
    return _array_result(np.full(shape, np.nan), np.full(shape, np.inf), fmt, _GENERIC, evals, Status.UNSUPPORTED,
                         reason)


def _generic_difference(f1: Callable[[float], float], scheme: str, scale: float, f0: float, delta: float,
                        u: float) -> tuple[float, float, int]:
    """Forward or central difference for one coordinate, truncation estimated from a second step 2h.

    Returns the derivative, its error estimate and the evaluations of f used.
    """
    power = 0.5 if scheme == "forward" else 1.0 / 3.0
    h = float(_pow2_at_least(u**power * scale))
    if scheme == "central":
        d1 = (f1(h) - f1(-h)) / (2 * h)
        d2 = (f1(2 * h) - f1(-2 * h)) / (4 * h)
        return d1, abs(d2 - d1) / 3 + delta / h, 4  # error(2h) = 4 error(h) to first order
    fp, f2 = f1(h), f1(2 * h)
    d1, d2 = (fp - f0) / h, (f2 - f0) / (2 * h)
    return d1, abs(d2 - d1) + 2 * delta / h, 2


def _generic_richardson(f1: Callable[[float], float], scale: float, delta: float, max_levels: int) -> tuple:
    """Neville table of central differences at h0 / 2**j, h0 = max(|x|, 1) / 8, for one coordinate.

    Nothing is known of f's analyticity radius, so the whole table is built and the diagonal
    entry with the smallest estimate ``max(diff_j, diff_{j-1}) + r_j`` (two consecutive
    differences, so one coincidental agreement cannot make it small) is returned, from j = 2 on.
    CONVERGED when that difference is at the rounding level, ERROR_INCREASED when the estimates
    grew again after it, ITERATION_LIMIT when the last level was still the best.
    """
    h0 = float(_pow2_at_least(scale / 8))
    prev_t: list[float] = []
    prev_r: list[float] = []
    diffs: list[float] = [math.inf]
    best = (math.inf, math.nan, 0, False)  # (estimate, value, level, at the noise)
    for j in range(max_levels):
        h = h0 / 2.0**j
        t = [(f1(h) - f1(-h)) / (2 * h)]
        r = [delta / h]
        for m in range(1, j + 1):
            q = 4.0**m - 1
            t.append(t[m - 1] + (t[m - 1] - prev_t[m - 1]) / q)
            r.append(r[m - 1] + (r[m - 1] + prev_r[m - 1]) / q)
        if j > 0:
            diffs.append(abs(t[j] - prev_t[j - 1]))
            if j >= 2:
                est = max(diffs[-1], diffs[-2]) + r[j]
                if est < best[0]:
                    best = (est, t[j], j, max(diffs[-1], diffs[-2]) <= 2 * r[j])
        prev_t, prev_r = t, r
    est, value, level, noise = best
    status = Status.CONVERGED if noise else (
        Status.ITERATION_LIMIT if level == max_levels - 1 else Status.ERROR_INCREASED)
    return value, est, 2 * max_levels, status


def _array_result(grad: np.ndarray, err: np.ndarray, fmt: FloatFormat, method: str, evals: int,
                  status: Status, reason: str) -> MethodResult:
    rounded = np.asarray(grad, dtype=np.float64).astype(fmt.dtype)
    error = np.asarray(err, dtype=np.float64) + rounding_error(rounded, fmt)
    bad = ~np.isfinite(rounded.astype(np.float64))
    if bad.any() and status < Status.NON_FINITE:
        status, reason = Status.NON_FINITE, f"{int(bad.sum())} element(s) are not finite"
    return MethodResult(rounded, np.where(bad, np.inf, error), False, evals, status, method, reason)
