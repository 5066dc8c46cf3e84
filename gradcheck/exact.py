"""Certified truth: the loss and gradient correctly rounded to any supported dtype.

Method (docs/exact.md): every input is a binary float, hence rational, and so are the smoothed
targets, the weights and the divisor. An element whose exact value is rational is computed with
exact rational arithmetic and rounded exactly. Every other element is irrational (Lindemann-Weierstrass,
docs/exact.md), so it is neither a representable number nor a midpoint between two, and Ziv's loop
terminates: enclose it with mpmath interval arithmetic at precision P, and if both ends of the
enclosure round to the same number that number is the correctly rounded value; otherwise double P.

Before any of that, the float64 oracle's rigorous running error bound (docs/oracle.md) is tried
as the first enclosure: for float32 and narrower it nearly always decides the rounding, and mpmath
is only used for the elements it does not decide.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cached_property
from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np

from gradcheck.dtypes import FloatFormat, bit_pattern, float_format, round_to_format
from gradcheck import truth_dd, truth_f64
from gradcheck.errors import CertificationError
from gradcheck.oracle import EXTENDED_WORK, FLOAT64_WORK, grad_bounded, loss_bounded
from gradcheck.problem import Problem, make_problem

MAX_PRECISION = 1 << 16  # bits; Ziv's loop is proven to end (docs/exact.md), this only makes a bug loud

PROGRESS_BLOCK = 4096  # slow-path elements between two progress reports
ORACLE_FIRST_K = 4096  # see certified_grad
CUTOFF = 16384  # see _exp_shifted and docs/exact.md, "Cutoff"
_IV = type(mpmath.iv)()  # a private interval context: the caller's mpmath.iv precision is untouched


def exact_grad(
    logits: Any,
    targets: Any,
    *,
    dtype: Any = None,
    prefilter: bool = True,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> np.ndarray:
    """The gradient of :func:`gradcheck.cross_entropy`, correctly rounded to ``dtype``.

    Round to nearest, ties to even, subnormals and overflow as IEEE 754 defines them; an exact
    zero is +0.

    Args:
        logits, targets: as for :func:`gradcheck.make_problem`.
        dtype: the format to round to; the logits' dtype when None.
        prefilter: use the float64 oracle's error bound where it decides the rounding (results
            are identical either way; False forces mpmath for every irrational element).
        progress: called as ``progress(done, total)`` with the number of elements certified so far
            and the number that need the slow (mpmath) path, once after the fast path (done 0)
            and after each block of at most ``PROGRESS_BLOCK`` slow elements; the slow path costs
            about 50-150 us per element, so ``total`` alone is an estimate of the time left.
        **options: the case options (``weight``, ``ignore_index``, ``reduction``,
            ``label_smoothing``; :data:`gradcheck.options.CASE`).

    Returns:
        An array of ``dtype`` with the logits' shape.

    Raises:
        InvalidArgument: bad input (see :func:`gradcheck.problem.make_problem`).
        CertificationError: never expected; the precision cap was reached.
    """
    problem = make_problem(logits, targets, **options)
    fmt = float_format(problem.logits.dtype if dtype is None else dtype)
    return problem.restore_shape(certified_grad(problem, fmt, prefilter=prefilter, progress=progress))


def exact_loss(
    logits: Any,
    targets: Any,
    *,
    dtype: Any = None,
    **options: Any,
) -> np.ndarray:
    """The loss of :func:`gradcheck.cross_entropy`, correctly rounded to ``dtype`` (see :func:`exact_grad`)."""
    problem = make_problem(logits, targets, **options)
    fmt = float_format(problem.logits.dtype if dtype is None else dtype)
    return certified_loss(problem, fmt)


def certified_grad(problem: Problem, fmt: FloatFormat, *, prefilter: bool = True,
                   where: np.ndarray | None = None,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``(N, K)`` correctly rounded gradient (the VJP with the upstream gradient) of a validated problem.

    ``where``: a boolean ``(N, K)`` mask; only those elements are certified (the others are 0), so a
    caller that needs a few elements pays for those (verify's "exact" contract, docs/tolerance.md).
    """
    rows = _RowFacts(problem)
    todo = np.ones(problem.logits.shape, dtype=bool) if where is None else np.array(where, dtype=bool)
    todo[rows.zero_rows] = False  # ignored rows, a zero upstream gradient, or nothing to differentiate
    outside = None if where is None else ~todo  # zeroed at the end (the fast paths evaluate whole rows)
    out: np.ndarray | None = None  # the first fast path's result is taken as it is (NaN where it decided nothing)
    fast = prefilter and truth_dd.applies(problem)
    # formats narrower than float64: the float64 tier first where it applies (docs/exact.md, "The float64
    # tier"), otherwise the float64 oracle's bound where it decides nearly every row (K <= ORACLE_FIRST_K:
    # its relative width ~ K 2**-53 leaves ~ K^2 2**-28 elements of a row undecided in float32); the
    # double-double fast path then evaluates only the rows they left undecided
    tier = fast and fmt.precision < 53 and truth_f64.applies(problem, rows)
    if tier and todo.any():
        out = _take(truth_f64.grad_decided(problem, rows, fmt, todo), todo, out)
    elif prefilter and rows.oracle_applies and (not fast or (fmt.precision < 53 and problem.k <= ORACLE_FIRST_K)):
        # float64 enclosures are a few float64 ulps wide: for a float64 result use x87 extended
        # precision (2**-11 ulp wide); docs/exact.md, "The prefilter"
        work = EXTENDED_WORK if fmt.precision == 53 and EXTENDED_WORK is not None else FLOAT64_WORK
        value, bound = grad_bounded(problem, work)
        # GLUE (helper upstream, merging oracle a0b2225 and exact 651317f): the oracle's grad_bounded now
        # includes the product with g_n and its bound, so it is not applied a second time here
        # (_times_upstream was the exact branch's own product, written before the oracle had it).
        out = _take(_decided(value, bound, fmt), todo, out)
    if fast and todo.any():  # double-double enclosures (docs/exact.md, "The fast path")
        out = _take(truth_dd.grad_decided(problem, rows, fmt, todo), todo, out)
    if out is None:
        out = np.zeros(problem.logits.shape)
    else:  # what no path was asked for is exactly 0
        out[rows.zero_rows] = 0.0
        if outside is not None:
            out[outside] = 0.0
    total, done = int(todo.sum()), 0
    if progress:
        progress(0, total)
    for n in np.flatnonzero(todo.any(axis=1)):
        cols = np.flatnonzero(todo[n])
        cache: dict[int, Any] = {}  # the row's enclosures per precision, shared by its blocks
        for start in range(0, cols.size, PROGRESS_BLOCK):
            block = cols[start:start + PROGRESS_BLOCK]
            out[n, block] = _grad_row(rows, int(n), block, fmt, cache)
            done += block.size
            if progress:
                progress(done, total)
    return out if fmt.precision == 53 else round_to_format(out, fmt)


def _take(decided: np.ndarray, todo: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """What ``decided`` settles (not NaN) among ``todo`` goes into ``out`` (``decided`` itself is the result
    when there is no ``out`` yet), and is cleared from ``todo``; returns the result."""
    open_ = np.isnan(decided)
    if out is None:
        todo &= open_
        return decided
    np.copyto(out, decided, where=todo & ~open_)
    todo &= open_
    return out


def _times_upstream(value: np.ndarray, bound: np.ndarray, g: np.ndarray, work: Any) -> tuple[np.ndarray, np.ndarray]:
    """``g_n [v - b, v + b]`` enclosed as ``fl(g_n v) +- (|g_n| b + u |fl(g_n v)| + eta)`` (one rounding)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        gv = value * g[:, None]
        b = bound * np.abs(g)[:, None] + work.u * np.abs(gv) + work.eta
        b[~np.isfinite(gv)] = np.inf
    return gv, b


def certified_loss(problem: Problem, fmt: FloatFormat) -> np.ndarray:
    """Correctly rounded loss: 0-d for mean/sum, ``(N,)`` for none (``()`` for a vector).

    The loss does not involve the upstream gradient (``grad_output``)."""
    rows = _RowFacts(problem)
    kinds = [rows.loss_exact(n) for n in range(problem.n)]
    decided = None
    if rows.oracle_applies:
        value, bound = loss_bounded(problem)
        decided = _decided(np.atleast_1d(value), np.atleast_1d(bound), fmt)
    if problem.reduction == "none":
        values = []
        for n, kind in enumerate(kinds):
            if isinstance(kind, float):  # +inf, -inf or nan
                values.append(kind)
            elif kind is not None:
                values.append(_round_fraction(kind[0], fmt, kind[1]))
            elif decided is not None and not np.isnan(decided[n]):
                values.append(decided[n])
            else:
                values.append(_round_interval(lambda prec, n=n: _row_loss(rows, n, prec, {}), "irrational", fmt))
        return problem.restore_shape(round_to_format(np.array(values), fmt))
    infinite = [k for k in kinds if isinstance(k, float)]
    if infinite:
        return round_to_format(np.array(sum(infinite)), fmt)  # +inf, -inf, or nan for both signs
    if all(k is not None for k in kinds):
        exact = sum((k[0] for k in kinds), Fraction(0))
        signs = {k[1] for k in kinds if k[1]}
        if len(signs) <= 1:
            return round_to_format(np.array(_round_fraction(exact, fmt, signs.pop() if signs else 0)), fmt)
    if decided is not None and not np.isnan(decided[0]):
        return round_to_format(np.array(decided[0]), fmt)

    def total(prec: int) -> Any:
        acc = _IV.mpf(0)
        for n in range(problem.n):
            if rows.active[n]:
                acc += _row_loss(rows, n, prec, {})
        return acc

    return round_to_format(np.array(_round_interval(total, "irrational", fmt)), fmt)


def _sign(x: Fraction) -> int:
    return (x > 0) - (x < 0)


class _RowFacts:
    """Exact rational facts of each row: weighted targets ``A_c = w_c t_c``, their sum ``S``, the divisors
    ``D`` and ``Dz``, the z-loss factor ``B = 2 lambda / Dz``, the upstream gradient ``u_n``; and which
    classes are masked, cut or tied (docs/exact.md)."""

    def __init__(self, problem: Problem) -> None:
        p = problem
        self.problem = p
        self.softcap = p.softcap
        self.lam = Fraction(p.lse_square_scale)
        self.divisor = p.exact_divisor()
        dz = p.zloss_divisor()
        self.b = 2 * self.lam / dz if self.lam and dz else Fraction(0)
        self.active = p.active_rows()
        g = p.upstream()
        self._wt: dict[int, list[Fraction]] = {}
        self._s: dict[int, Fraction] = {}
        if p.index_targets and not p.label_smoothing:  # one weighted target per row: w[t] (no (N, K) array)
            no_target = ~self.active.copy()
            no_target[self.active] = p.weights()[p.targets[self.active]] == 0
        else:
            wt_zero = p.dense_targets() == 0 if not p.label_smoothing else np.zeros(p.logits.shape, dtype=bool)
            wt_zero |= (p.weights() == 0)[None, :]
            no_target = np.all(wt_zero, axis=1) | ~self.active
        # rows whose gradient is exactly 0: ignored, zero upstream, or no target weight and no z-loss
        self.zero_rows = ~self.active | (g == 0) | (no_target & (not self.lam))
        # the float64 oracle's bound (docs/oracle.md) covers plain problems with nonnegative weights
        self.oracle_applies = (p.softcap is None and not self.lam
                               and (p.weight is None or bool(np.all(p.weight >= 0))))
        self._iv: dict[tuple[int, Fraction], Any] = {}

    # the facts of the logits, computed on first use (the fast paths need none of them)
    @cached_property
    def upstream(self) -> list[Fraction]:
        return [Fraction(float(v)) for v in self.problem.upstream()]

    @cached_property
    def z(self) -> np.ndarray:
        return self.problem.logits.astype(np.float64)

    @cached_property
    def finite(self) -> np.ndarray:
        return np.isfinite(self.z)

    @cached_property
    def counted(self) -> np.ndarray:
        """The classes that enter Z: the finite ones, or all of them under softcap (-inf becomes -c)."""
        return self.finite if self.softcap is None else np.ones(self.z.shape, dtype=bool)

    @cached_property
    def zmax(self) -> np.ndarray:
        return self.z.max(axis=1)

    @cached_property
    def argmax(self) -> np.ndarray:
        return np.argmax(self.z, axis=1)

    @cached_property
    def cut(self) -> np.ndarray:
        if self.softcap is None and not self.lam:
            with np.errstate(invalid="ignore", over="ignore"):
                # exp(z - max z) < exp(-CUTOFF): enclosed by [0, exp(-CUTOFF)] (docs/exact.md, "Cutoff");
                # the margin covers the rounding of z - max z in float64
                return self.finite & ((self.z - self.zmax[:, None]) < -CUTOFF * (1 + 2.0**-40))
        return np.zeros(self.z.shape, dtype=bool)  # no cut terms: their sign argument does not cover the options

    @cached_property
    def main(self) -> np.ndarray:
        return self.counted & ~self.cut

    @cached_property
    def has_cut(self) -> np.ndarray:
        return self.cut.any(axis=1)

    @cached_property
    def tie(self) -> np.ndarray:
        """Every main logit equal to the max: with the cut terms at 0, p is 1/m on them (case R2)."""
        return np.all(~self.main | (self.z == self.zmax[:, None]), axis=1)

    @cached_property
    def nmain(self) -> np.ndarray:
        return self.main.sum(axis=1)

    def wt(self, n: int) -> list[Fraction]:
        if n not in self._wt:
            p = self.problem
            self._wt[n] = [p.exact_weight(c) * p.exact_target(n, c) for c in range(p.k)]
        return self._wt[n]

    def s(self, n: int) -> Fraction:
        if n not in self._s:
            self._s[n] = sum(self.wt(n), Fraction(0))
        return self._s[n]

    def iv(self, x: Fraction, prec: int) -> Any:
        """``x`` as an interval at ``prec`` (converted once per precision)."""
        key = (prec, x)
        if key not in self._iv:
            _IV.prec = prec
            self._iv[key] = _interval(x)
        _IV.prec = prec
        return self._iv[key]

    def grad_exact(self, n: int, c: int) -> tuple[Fraction, int] | None:
        """``(V, sign)`` when ``g_nc`` is the rational V (plus ``sign * 0+`` from cut terms), None when it
        is irrational or not known to be rational (docs/exact.md, "Which values are rational")."""
        u, d, a_c, s, b = self.upstream[n], self.divisor, self.wt(n)[c], self.s(n), self.b
        if self.softcap is None:
            if not self.finite[n, c]:  # R1: p = 0
                return -u * a_c / d, 0
            if not b:
                if not s:  # p S = 0 whatever p is
                    return -u * a_c / d, 0
                sign = _sign(u * s / d)
                if self.cut[n, c]:  # p tiny and positive
                    return -u * a_c / d, sign
                if self.tie[n]:  # R2: p = 1/m on the main classes, a little less with cut terms
                    return u * (s / int(self.nmain[n]) - a_c) / d, -sign if self.has_cut[n] else 0
                return None
            if self.nmain[n] == 1:  # the one finite class: p = 1, q = 0, lse = max z
                return u * ((s - a_c) / d + b * Fraction(float(self.zmax[n]))), 0
            return None
        if np.isneginf(self.z[n, c]):  # softcap: the chain factor 1 - tanh^2(-inf) is 0
            return Fraction(0), 0
        if self.tie[n]:  # every class has the same z, so the same z': p = 1/K, lse = z' + log K
            k = self.problem.k
            inner = (s / k - a_c) / d  # dL/dz' without the z-loss term
            if self.z[n, c] == 0:  # z' = 0, chain factor 1
                return (u * inner, 0) if not b or k == 1 else None  # else B log(K) / K: irrational
            if not b and not inner:
                return Fraction(0), 0  # chain factor times 0
        return None

    def loss_exact(self, n: int) -> tuple[Fraction, int] | float | None:
        """Row n's contribution to the loss (divided by D and Dz as the reduction says): ``(V, sign)``
        when rational, a float (+inf, -inf or nan) when infinite, None when irrational or not known."""
        if not self.active[n]:
            return Fraction(0), 0
        p, wt, s, d = self.problem, self.wt(n), self.s(n), self.divisor
        dz = Fraction(p.zloss_divisor()) if p.reduction == "mean" else Fraction(1)
        dce = d if p.reduction == "mean" else Fraction(1)
        if self.softcap is None:
            masked = {_sign(wt[c] / dce) for c in np.flatnonzero(~self.finite[n]) if wt[c]}
            if masked:  # -A_c log 0
                return float("nan") if len(masked) == 2 else masked.pop() * float("inf")
            zmax = Fraction(float(self.zmax[n]))
            shifted = sum((wt[c] * (zmax - Fraction(float(self.z[n, c]))) for c in np.flatnonzero(self.finite[n])
                           if wt[c]), Fraction(0))
            if self.nmain[n] == 1:  # log Z = 0 with the cut terms at 0; they add S log(1 + tiny)
                return shifted / dce + self.lam * zmax * zmax / dz, _sign(s / dce) if self.has_cut[n] else 0
            if not self.lam and not s:  # S log Z = 0
                return shifted / dce, 0
            return None
        if np.all(self.z[n] == 0) and (p.k == 1 or (not s and not self.lam)):  # z' = 0, lse = log K
            return Fraction(0), 0
        if p.k == 1 and not self.lam:  # the cross-entropy of one class is 0
            return Fraction(0), 0
        return None


def _row_enclosure(rows: _RowFacts, n: int, prec: int, cache: dict[int, Any]) -> tuple:
    """Row n's shared enclosures at ``prec``: the shifted exponentials ``e_c``, ``Z``, ``R`` (every class
    but the argmax), ``lse``, and under softcap the capped logits and the chain factors. Kept per
    precision: an element that needs more bits must not make the next one recompute the K exponentials."""
    if prec not in cache:
        _IV.prec = prec
        z = rows.z[n]
        a = int(rows.argmax[n])
        if rows.softcap is None:
            mu = float(rows.zmax[n])
            e = [_exp_shifted(float(v), mu, rows.cut[n, c]) if rows.finite[n, c] else _IV.mpf(0)
                 for c, v in enumerate(z)]
            capped, chain = None, None
            za = _IV.mpf(mu)
        else:
            capped, chain = zip(*(_softcap(float(v), rows.softcap) for v in z))
            # any exact shift works (lse = mu + log sum exp(z' - mu)); near the max keeps e_a ~ 1
            # (Python floats: z / c may overflow to inf, where tanh is 1; numpy's scalar would warn)
            top = float(rows.zmax[n])
            mu = -rows.softcap if top == -math.inf else rows.softcap * math.tanh(top / rows.softcap)
            e = [_IV.exp(v - mu) for v in capped]
            za = capped[a]
        r = sum((e[c] for c in range(len(e)) if c != a), _IV.mpf(0))
        total = e[a] + r
        lse = za + _IV.log1p(r / e[a])  # log Z = log e_a + log1p(R / e_a): no cancellation for tiny R
        cache[prec] = (e, total, r, lse, capped, chain)
    _IV.prec = prec
    return cache[prec]


def _softcap(v: float, c: float) -> tuple[Any, Any]:
    """Enclosures of ``c tanh(v / c)`` and ``1 - tanh^2(v / c)`` at the current precision.

    With ``M = expm1(-2|y|)`` and ``E = exp(-2|y|) = 1 + M``: ``tanh|y| = -M / (2 + M)`` (expm1 keeps
    small |y| accurate) and ``1 - tanh^2 y = 4E / (2 + M)^2`` (no cancellation when saturated)."""
    if v == -math.inf:
        return _IV.mpf(-c), _IV.mpf(0)
    if v == 0:
        return _IV.mpf(0), _IV.mpf(1)
    y2 = -2 * (_IV.mpf(abs(v)) / _IV.mpf(c))
    m = _IV.expm1(y2)
    e = _IV.exp(y2) if abs(v) > c else 1 + m
    t = -m / (2 + m)
    return (_IV.mpf(c) * t if v > 0 else -_IV.mpf(c) * t), 4 * e / ((2 + m) * (2 + m))


def _grad_row(rows: _RowFacts, n: int, cols: np.ndarray, fmt: FloatFormat,
              cache: dict[int, Any] | None = None) -> list[float]:
    """Correctly rounded g_nc for the given columns of row n.

    ``cache`` keeps the row's enclosures per precision across calls for the same row (a row
    certified in blocks computes them once).
    """
    cache = {} if cache is None else cache
    wt, s, d, b, u = rows.wt(n), rows.s(n), rows.divisor, rows.b, rows.upstream[n]
    a = int(rows.argmax[n])
    out = []
    for c in cols:
        c = int(c)
        known = rows.grad_exact(n, c)
        if known is not None:
            out.append(_round_fraction(known[0], fmt, known[1]))
            continue

        def element(prec: int, c: int = c) -> Any:
            # g_c = u chain_c [(p_c (S - A_c) - A_c q_c) / D + B lse p_c], q_a = R / Z, q_c = 1 - p_c
            # otherwise: the same number as u chain (p S - A) / D + ..., without the cancellation of
            # p_a S - A_a (docs/exact.md, "Cost")
            e, total, r, lse, _, chain = _row_enclosure(rows, n, prec, cache)
            p = e[c] / total
            if wt[c]:
                q = r / total if c == a else 1 - p
                g = (p * rows.iv(s - wt[c], prec) - rows.iv(wt[c], prec) * q) / rows.iv(d, prec)
            else:
                g = p * rows.iv(s, prec) / rows.iv(d, prec)
            if b:
                g = g + rows.iv(b, prec) * lse * p
            if chain is not None:
                g = g * chain[c]
            return g * _IV.mpf(float(u)) if u != 1 else g

        out.append(_round_interval(element, "irrational", fmt))
    return out


def _row_loss(rows: _RowFacts, n: int, prec: int, cache: dict[int, Any]) -> Any:
    """Enclosure of row n's contribution to the loss: ``CE_n / D + lambda lse_n^2 / Dz`` with
    ``CE_n = S log1p(R / e_a) + sum_c A_c (z'_a - z'_c)`` (D = Dz = 1 unless the reduction is "mean")."""
    p = rows.problem
    e, total, r, lse, capped, _ = _row_enclosure(rows, n, prec, cache)
    a = int(rows.argmax[n])
    wt = rows.wt(n)
    z = rows.z[n]
    shifted = _IV.mpf(0)
    for c in np.flatnonzero([bool(w) for w in wt]):
        gap = (_IV.mpf(float(z[a])) - _IV.mpf(float(z[c]))) if capped is None else capped[a] - capped[c]
        shifted += rows.iv(wt[c], prec) * gap
    ce = rows.iv(rows.s(n), prec) * _IV.log1p(r / e[a]) + shifted
    mean = p.reduction == "mean"
    out = ce / rows.iv(rows.divisor, prec) if mean else ce
    if rows.lam:
        zl = rows.iv(rows.lam, prec) * lse * lse
        out = out + (zl / _IV.mpf(p.zloss_divisor()) if mean else zl)
    return out


def _exp_shifted(v: float, zmax: float, cut: bool) -> Any:
    """Enclosure of ``exp(v - zmax)`` at the current precision.

    A cut term (``v - zmax < -CUTOFF``) is enclosed by ``[0, exp(-CUTOFF)]`` (exp is increasing):
    ``exp(-16384)`` is about ``2**-23637``, so these terms move no value by more than ``2**-21000``,
    far less than the ``2**-5445`` that separates any rational these inputs produce from a rounding
    boundary it is not on; and mpmath is spared arguments like ``-1e300``, whose enclosure needs
    ``log2|v|`` extra bits. Where it matters (a value exactly on a midpoint once the cut terms are 0)
    the callers decide by the known sign of the cut terms (docs/exact.md, "Cutoff").
    """
    if cut:
        return _IV.mpf([0, _IV.exp(-CUTOFF).b])
    return _IV.exp(_IV.mpf(v) - zmax)


def _round_interval(evaluate: Any, kind: str, fmt: FloatFormat) -> float:
    """Ziv's loop: widen the precision until the enclosure's two ends round alike."""
    if kind == "zero":
        return 0.0
    if kind == "inf":
        return float("inf")
    prec = 2 * fmt.precision + 20
    while prec <= MAX_PRECISION:
        x = evaluate(prec)
        lo, hi = (_round_mpf(end, fmt) for end in x._mpi_)
        if lo == hi and math.copysign(1.0, lo) == math.copysign(1.0, hi):  # -0.0 and +0.0 differ here
            return hi
        prec *= 2
    raise CertificationError(
        f"could not decide the rounding to {fmt.name} within {MAX_PRECISION} bits; please report "
        "this input, it contradicts docs/exact.md."
    )


def _interval(x: Fraction) -> Any:
    return _IV.mpf(x.numerator) / _IV.mpf(x.denominator) if x.denominator != 1 else _IV.mpf(x.numerator)


def _round_mpf(raw: tuple, fmt: FloatFormat) -> float:
    """Round an mpmath raw value (sign, man, exp, bc) to ``fmt``; returns the float64 holding it."""
    sign, man, exp, _ = raw
    if not man:
        if exp == 0:  # zero
            return -0.0 if sign else 0.0
        return float("-inf") if sign else float("inf")  # (nan cannot come out of these formulas)
    return _round_dyadic(-man if sign else man, exp, fmt)


INFINITESIMAL = Fraction(1, 1 << 12000)  # stands in for the cut terms' sign (docs/exact.md, "Cutoff")


def _round_fraction(x: Fraction, fmt: FloatFormat, sign: int = 0) -> float:
    """Round ``x + sign * 0+`` exactly to ``fmt`` (round to nearest, ties to even).

    ``sign`` is the sign of a perturbation smaller than ``2**-21000`` (the cut terms): it only decides
    when ``x`` is exactly a midpoint. No rational these inputs produce lies closer than ``2**-5445`` to
    a boundary it is not on (docs/exact.md), so ``INFINITESIMAL = 2**-12000`` rounds the same way.
    """
    if sign:
        x = x + sign * INFINITESIMAL
    if x == 0:
        return 0.0
    num, den = x.numerator, x.denominator
    sign = -1 if num < 0 else 1
    num = abs(num)
    # scale to an integer with at least p + 2 significant bits plus a sticky bit
    shift = fmt.precision + 3 - (num.bit_length() - den.bit_length())
    scaled_num = num << shift if shift >= 0 else num
    scaled_den = den if shift >= 0 else den << -shift
    quotient, remainder = divmod(scaled_num, scaled_den)
    mantissa = 2 * quotient + (1 if remainder else 0)  # sticky bit below the kept bits
    return _round_dyadic(sign * mantissa, -shift - 1, fmt)


def _round_dyadic(man: int, exp: int, fmt: FloatFormat) -> float:
    """Round ``man * 2**exp`` (man a nonzero integer) to ``fmt``, ties to even, with overflow to inf."""
    sign = -1.0 if man < 0 else 1.0
    man = abs(man)
    top = exp + man.bit_length() - 1  # exponent of the leading bit
    if top < fmt.emin - fmt.precision - 1:  # below half the smallest subnormal: rounds to zero
        return sign * 0.0
    quantum = max(top - fmt.precision + 1, fmt.emin - fmt.precision + 1)
    if exp < quantum:
        drop = quantum - exp
        kept, rest = man >> drop, man & ((1 << drop) - 1)
        half = 1 << (drop - 1)
        if rest > half or (rest == half and kept & 1):
            kept += 1
        man, exp = kept, quantum
    if man == 0:
        return sign * 0.0
    if exp + man.bit_length() - 1 > fmt.emax:
        return sign * float("inf")
    value = math.ldexp(man, exp)  # exact: man has at most 53 bits and the exponent is in range
    return sign * value if value <= fmt.max else sign * float("inf")


def _decided(value: np.ndarray, bound: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Where ``[value - bound, value + bound]`` rounds to one number of ``fmt``, that number; else NaN.

    The interval ends are pushed outward by one ulp of the working precision so that their own
    rounding cannot shrink the enclosure. A longdouble enclosure is only used for a float64 result:
    the cast to float64 is then the one rounding (round to nearest, monotone).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        lo = np.nextafter(value - bound, value.dtype.type(-np.inf))
        hi = np.nextafter(value + bound, value.dtype.type(np.inf))
        lo_r, hi_r = round_to_format(lo, fmt), round_to_format(hi, fmt)
        same = (bit_pattern(lo_r) == bit_pattern(hi_r)) & np.isfinite(lo) & np.isfinite(hi)  # signed zeros count
    return np.where(same, hi_r.astype(np.float64), np.nan)
