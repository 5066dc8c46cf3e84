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
from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np

from gradcheck.dtypes import FloatFormat, bit_pattern, float_format, round_to_format
from gradcheck.errors import CertificationError
from gradcheck.oracle import EXTENDED_WORK, FLOAT64_WORK, grad_bounded, loss_bounded
from gradcheck.problem import Problem, make_problem

MAX_PRECISION = 1 << 16  # bits; Ziv's loop is proven to end (docs/exact.md), this only makes a bug loud

PROGRESS_BLOCK = 4096  # slow-path elements between two progress reports
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
    """``(N, K)`` correctly rounded gradient of a validated problem.

    ``where``: a boolean ``(N, K)`` mask; only those elements are certified (the others are 0), so a
    caller that needs a few elements pays for those (verify's "exact" contract, docs/tolerance.md).
    """
    rows = _RowFacts(problem)
    out = np.zeros(problem.logits.shape)
    todo = np.ones(problem.logits.shape, dtype=bool) if where is None else np.array(where, dtype=bool)
    todo[rows.zero_rows] = False  # S_n = 0: the whole row is exactly 0
    if prefilter:
        # float64 enclosures are a few float64 ulps wide: for a float64 result use x87 extended
        # precision (2**-11 ulp wide); docs/exact.md, "The prefilter"
        work = EXTENDED_WORK if fmt.precision == 53 and EXTENDED_WORK is not None else FLOAT64_WORK
        decided = _decided(*grad_bounded(problem, work), fmt)
        use = todo & ~np.isnan(decided)
        out[use] = decided[use]
        todo &= ~use
    total, done = int(todo.sum()), 0
    if progress:
        progress(0, total)
    for n in np.flatnonzero(todo.any(axis=1)):
        cols = np.flatnonzero(todo[n])
        cache: dict[int, Any] = {}  # the row's exponentials, shared by its blocks
        for start in range(0, cols.size, PROGRESS_BLOCK):
            block = cols[start:start + PROGRESS_BLOCK]
            out[n, block] = _grad_row(problem, rows, int(n), block, fmt, cache)
            done += block.size
            if progress:
                progress(done, total)
    return round_to_format(out, fmt)


def certified_loss(problem: Problem, fmt: FloatFormat) -> np.ndarray:
    """Correctly rounded loss: 0-d for mean/sum, ``(N,)`` for none (``()`` for a vector)."""
    rows = _RowFacts(problem)
    value, bound = loss_bounded(problem)
    decided = _decided(np.atleast_1d(value), np.atleast_1d(bound), fmt)
    if problem.reduction == "none":
        values = []
        for n in range(problem.n):
            kind = rows.loss_kind(n)
            if kind == "irrational" and not np.isnan(decided[n]):
                values.append(decided[n])
            elif kind == "rational":
                # the cut terms add S log(1 + tiny): the sign of S (negative weights: torch accepts them)
                values.append(_round_fraction(rows.shifted(n), fmt, _sign(rows.s(n)) if rows.has_cut[n] else 0))
            else:
                values.append(_round_interval(lambda prec, n=n: _row_loss(problem, rows, n, prec), kind, fmt))
        return problem.restore_shape(round_to_format(np.array(values), fmt))
    kinds = {rows.loss_kind(n) for n in range(problem.n)}
    kind = "inf" if "inf" in kinds else ("irrational" if "irrational" in kinds else "rational")
    if kind == "irrational" and not np.isnan(decided[0]):
        return round_to_format(np.array(decided[0]), fmt)
    live = [n for n in range(problem.n) if rows.loss_kind(n) == "rational"]
    signs = {_sign(rows.s(n)) for n in live if rows.has_cut[n]}
    if kind == "rational" and len(signs) <= 1:  # rows of mixed signs (negative weights): the enclosure decides
        exact = sum((rows.shifted(n) for n in live), Fraction(0)) / rows.divisor
        sign = signs.pop() * _sign(rows.divisor) if signs else 0
        return round_to_format(np.array(_round_fraction(exact, fmt, sign)), fmt)
    kind = "irrational" if kind == "rational" else kind

    def total(prec: int) -> Any:
        acc = _IV.mpf(0)
        for n in range(problem.n):
            if rows.loss_kind(n) in ("irrational", "rational"):
                acc += _row_loss(problem, rows, n, prec)
        return acc / _interval(rows.divisor)

    return round_to_format(np.array(_round_interval(total, kind, fmt)), fmt)


def _sign(x: Fraction) -> int:
    return (x > 0) - (x < 0)


class _RowFacts:
    """Exact rational facts of each row: weighted targets w_c t_c, their sum S, the divisor D."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        z = problem.logits.astype(np.float64)
        self.finite = np.isfinite(z)
        zmax = z.max(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", over="ignore"):
            # exp(z - max z) < exp(-CUTOFF): enclosed by [0, exp(-CUTOFF)] (docs/exact.md, "Cutoff");
            # the margin covers the rounding of z - max z in float64
            self.cut = self.finite & ((z - zmax) < -CUTOFF * (1 + 2.0**-40))
        self.main = self.finite & ~self.cut
        self.has_cut = self.cut.any(axis=1)
        # every main logit equal to the max: with the cut terms at 0, p is 1/m on them (case R2)
        self.tie = np.all(~self.main | (z == zmax), axis=1)
        self.nmain = self.main.sum(axis=1)
        self.divisor = problem.exact_divisor()
        self._wt: dict[int, list[Fraction]] = {}
        self._s: dict[int, Fraction] = {}
        base_zero = problem.dense_targets() == 0 if not problem.label_smoothing else None
        wt_zero = np.zeros(problem.logits.shape, dtype=bool) if base_zero is None else base_zero
        wt_zero |= (problem.weights() == 0)[None, :]
        wt_zero[~problem.active_rows()] = True
        self.wt_zero = wt_zero
        self.zero_rows = np.all(wt_zero, axis=1)

    def wt(self, n: int) -> list[Fraction]:
        if n not in self._wt:
            p = self.problem
            self._wt[n] = [p.exact_weight(c) * p.exact_target(n, c) for c in range(p.k)]
        return self._wt[n]

    def s(self, n: int) -> Fraction:
        if n not in self._s:
            self._s[n] = sum(self.wt(n), Fraction(0))
        return self._s[n]

    def loss_kind(self, n: int) -> str:
        """"zero", "inf", "rational" or "irrational" for row n's loss (docs/exact.md, section Loss).

        "rational": one main logit, so with the cut terms at 0 the row loss is the rational
        ``sum_c w_c t_c (max z - z_c)``; the cut terms add ``S log(1 + tiny) > 0``.
        """
        if self.zero_rows[n]:
            return "zero"
        if np.any(~self.finite[n] & ~self.wt_zero[n]):
            return "inf"  # weight on a masked class: -log 0
        return "rational" if self.nmain[n] == 1 else "irrational"

    def shifted(self, n: int) -> Fraction:
        """``sum_c w_c t_c (max z - z_c)`` over the finite classes, exactly."""
        z = self.problem.logits[n].astype(np.float64)
        zmax = Fraction(float(z[self.finite[n]].max()))
        wt = self.wt(n)
        return sum((wt[c] * (zmax - Fraction(float(z[c]))) for c in range(len(z)) if self.finite[n, c] and wt[c]),
                   Fraction(0))


def _grad_row(problem: Problem, rows: _RowFacts, n: int, cols: np.ndarray, fmt: FloatFormat,
              cache: dict[int, Any] | None = None) -> list[float]:
    """Correctly rounded g_nc for the given columns of row n.

    ``cache`` keeps the row's exponentials and factor per precision across calls for the same row
    (a row certified in blocks computes them once).
    """
    wt = rows.wt(n)
    s = rows.s(n)
    d = rows.divisor
    out = []
    # the sign of S / D: the direction the cut terms move p_c S / D (1 when no weight is negative and
    # S > 0; torch accepts negative class weights, so S and D may be negative)
    positive = (s > 0) - (s < 0) if d > 0 else (s < 0) - (s > 0)
    if rows.tie[n]:
        # With the cut terms at 0, p_c is 1/m on the main classes and 0 elsewhere: rational. The cut
        # terms make p_c a little smaller on the main classes and a little larger than 0 on their
        # own; that sign decides a value that sits exactly on a midpoint (docs/exact.md, "Cutoff").
        m = int(rows.nmain[n])
        for c in cols:
            if rows.main[n, c]:
                p, sign = Fraction(1, m), -positive if rows.has_cut[n] else 0
            else:
                p, sign = Fraction(0), positive if rows.cut[n, c] else 0
            out.append(_round_fraction((p * s - wt[c]) / d, fmt, sign))
        return out
    cache = {} if cache is None else cache

    def partition(prec: int) -> tuple[list[Any], Any]:
        """The row's exponentials and its one factor ``S / (Z D)`` at ``prec``, shared by its elements.

        Kept for every precision reached: an element that needs more bits must not make the next
        one recompute the K exponentials at the starting precision.
        """
        if prec not in cache:
            _IV.prec = prec
            z = problem.logits[n].astype(np.float64)
            zmax = float(np.max(z))
            e = [_exp_shifted(float(v), zmax, rows.cut[n, c]) if rows.finite[n, c] else _IV.mpf(0)
                 for c, v in enumerate(z)]
            d_iv = _interval(d)
            cache[prec] = (e, _interval(s) / (sum(e, _IV.mpf(0)) * d_iv), d_iv)
        _IV.prec = prec
        return cache[prec]

    for c in cols:
        if not rows.main[n, c]:  # masked (p = 0: exact) or cut (p tiny and positive: the sign decides)
            out.append(_round_fraction(-wt[c] / d, fmt, positive if rows.cut[n, c] else 0))
            continue

        def element(prec: int, c: int = int(c)) -> Any:
            # g_c = e_c S / (Z D) - w_c t_c / D: an enclosure of the same number (docs/exact.md, "Cost")
            e, factor, d_iv = partition(prec)
            return e[c] * factor - _interval(wt[c]) / d_iv if wt[c] else e[c] * factor

        out.append(_round_interval(element, "irrational", fmt))
    return out


def _row_loss(problem: Problem, rows: _RowFacts, n: int, prec: int) -> Any:
    """Enclosure of the unscaled row loss S log Z + sum_c w_c t_c (max z - z_c) at precision prec."""
    _IV.prec = prec
    z = problem.logits[n].astype(np.float64)
    zmax = float(np.max(z))
    wt = rows.wt(n)
    total = _IV.mpf(0)
    shifted = _IV.mpf(0)
    for c, v in enumerate(z):
        if rows.finite[n, c]:
            total += _exp_shifted(float(v), zmax, rows.cut[n, c])
            if wt[c]:
                shifted += _interval(wt[c]) * (zmax - _IV.mpf(float(v)))
    return _interval(rows.s(n)) * _IV.log(total) + shifted


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
