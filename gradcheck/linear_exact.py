"""Certified truth of the fused linear cross-entropy gradients: each element correctly rounded (docs/linear.md,
"The certified truth").

The logits ``z = h @ W.T + b`` of binary floats are dyadic rationals, computed here exactly as integers. The
logits gradient ``G`` at those exact logits is enclosed with mpmath interval arithmetic at precision P, each
enclosure turned into two fixed-point integers (floor and ceiling at a per-row scale for ``dL/dh``, a
per-class scale for ``dL/dW`` and ``dL/db``), and the products summed exactly in integers: an enclosure of
each output element. Where both ends round to the same number of the format, that is the correctly
rounded value; elsewhere P is doubled (Ziv's loop). Elements still undecided at :data:`MAX_PRECISION`
are computed with exact rationals when every row they depend on has a rational gradient (all its logits
equal, no z-loss, no softcap away from 0), else :class:`gradcheck.errors.CertificationError` is raised.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import mpmath
import numpy as np

from gradcheck.dtypes import FloatFormat, float_format, round_to_format
from gradcheck.errors import CertificationError
from gradcheck.exact import _decided, _round_dyadic, _round_fraction
from gradcheck.linear import LinearGrad, LinearProblem, bounded, make_linear_problem

__all__ = ["exact_linear_grad", "certified_linear_grad"]

MAX_PRECISION = 1 << 12  # bits; beyond it only exact rational rows are decided
_IV = type(mpmath.iv)()  # a private interval context


def exact_linear_grad(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, dtype: Any = None,
                      prefilter: bool = True, **options: Any) -> LinearGrad:
    """The three gradients, each element correctly rounded to ``dtype`` (default: the inputs' dtype).

    Args:
        hidden, weight, targets, bias, **options: as for :func:`gradcheck.linear.make_linear_problem`.
        dtype: the format to round to.
        prefilter: use the float64 oracle's rigorous bound where it decides the rounding (the results are the
            same; False computes every element with mpmath).

    Returns:
        :class:`gradcheck.linear.LinearGrad`.

    Raises:
        InvalidArgument: bad input.
        CertificationError: an element could not be decided (not expected; please report the input).
    """
    lp = make_linear_problem(hidden, weight, targets, bias=bias, **options)
    fmt = float_format(lp.format.dtype if dtype is None else dtype)
    return certified_linear_grad(lp, fmt, prefilter=prefilter)


def _integers(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``x == m * 2**e`` exactly, with ``m`` an object array of Python ints and one exponent ``e``."""
    x64 = x.astype(np.float64)
    mant, expo = np.frexp(x64)
    nz = x64 != 0
    if not nz.any():
        return np.zeros(x.shape, dtype=object), 0
    # every float64 is (integer with 53 bits) * 2**(expo - 53)
    ints = (mant * 2.0**53).astype(np.int64)
    low = int((expo[nz] - 53).min())
    out = np.empty(x.shape, dtype=object)
    flat_i, flat_e, flat_o = ints.reshape(-1), (expo - 53).reshape(-1), out.reshape(-1)
    for k in range(flat_i.size):
        flat_o[k] = int(flat_i[k]) << int(flat_e[k] - low) if flat_i[k] else 0
    return out, low


def exact_logits(lp: LinearProblem) -> tuple[np.ndarray, int]:
    """``h @ W.T + b`` exactly: integers ``Z`` (object array) and an exponent ``e``, ``z = Z * 2**e``."""
    h, eh = _integers(lp.hidden)
    w, ew = _integers(lp.weight)
    z = h.dot(w.T)
    e = eh + ew
    if lp.bias is not None:
        b, eb = _integers(lp.bias)
        low = min(e, eb)
        z = np.vectorize(lambda v: v << (e - low), otypes=[object])(z) if e > low else z
        b = np.array([v << (eb - low) for v in b], dtype=object)
        z = z + b[None, :]
        e = low
    return z, e


class _Rows:
    """Exact rational facts of the cross-entropy case: weighted targets, S_n, D, Dz, upstream g_n."""

    def __init__(self, lp: LinearProblem) -> None:
        p = lp.logits
        self.p = p
        self.d = p.exact_divisor()
        self.dz = Fraction(p.zloss_divisor())
        self.active = p.active_rows()
        self.g = [p.exact_upstream(n) for n in range(p.n)]
        self._wt: dict[int, list[Fraction]] = {}

    def wt(self, n: int) -> list[Fraction]:
        if n not in self._wt:
            self._wt[n] = [self.p.exact_weight(c) * self.p.exact_target(n, c) for c in range(self.p.k)]
        return self._wt[n]


def _iv(x: Fraction) -> Any:
    return _IV.mpf(x.numerator) / _IV.mpf(x.denominator) if x.denominator != 1 else _IV.mpf(x.numerator)


def _grad_rows(lp: LinearProblem, rows: _Rows, zint: np.ndarray, ze: int, prec: int,
               need: np.ndarray) -> list[list[Any]]:
    """Interval enclosures of ``G_nv`` at precision ``prec`` for the rows in ``need`` (None: an exact zero, or a
    row not needed)."""
    _IV.prec = prec
    p = lp.logits
    lam, c = p.lse_square_scale, p.softcap
    out: list[list[Any]] = []
    scale = _IV.mpf(2) ** ze
    d_iv, dz_iv = _iv(rows.d), _iv(rows.dz) if rows.dz else None  # D > 0 (make_problem)
    for n in range(p.n):
        if not need[n] or not rows.active[n] or rows.g[n] == 0:
            out.append([None] * p.k)
            continue
        z = [_IV.mpf(int(v)) * scale for v in zint[n]]
        if c is not None:
            c_iv = _IV.mpf(c)
            x = [v / c_iv for v in z]
            # tanh x = 1 - 2 / (exp(2x) + 1): x occurs once, so the enclosure is tight
            t = [1 - 2 / (_IV.exp(2 * v) + 1) for v in x]
            zc = [c_iv * v for v in t]
            f = [4 / (_IV.exp(v) + _IV.exp(-v)) ** 2 for v in x]
        else:
            zc, f = z, None
        m = _IV.mpf(max(int(v) for v in zint[n])) * scale if c is None else _IV.mpf(0)  # any shift is valid
        e = [_IV.exp(v - m) for v in zc]
        total = sum(e[1:], e[0])
        wt = rows.wt(n)
        s = sum(wt, Fraction(0))
        row = []
        zl = (2 * _IV.mpf(lam) * (m + _IV.log(total)) / dz_iv) if lam else None
        for v in range(p.k):
            pv = e[v] / total
            a = (pv * _iv(s) - _iv(wt[v])) / d_iv
            if zl is not None:
                a = a + zl * pv
            if f is not None:
                a = a * f[v]
            row.append(a * _iv(rows.g[n]))
        out.append(row)
    return out


def _fixed(x: Any, shift: int) -> tuple[int, int]:
    """floor and ceiling of ``x * 2**shift`` for an interval ``x``."""
    def one(raw: tuple, up: bool) -> int:
        sign, man, exp, _ = raw
        v = -man if sign else man
        k = exp + shift
        if k >= 0:
            return v << k
        return -((-v) >> -k) if up else v >> -k

    lo, hi = x._mpi_
    return one(lo, False), one(hi, True)


def _exponent(x: Any) -> int:
    """An upper bound on log2 |x| for an interval x (very negative for 0)."""
    ends = [r for r in x._mpi_ if r[1]]
    if not ends:
        return -(1 << 30)
    return max(r[2] + r[3] for r in ends)


def _enclose(lp: LinearProblem, g: list[list[Any]], prec: int, todo: list[np.ndarray]) -> tuple[Any, ...]:
    """Integer enclosures ``[lo, hi] * 2**e`` of ``G @ W`` (per row e), ``G.T @ h`` and ``sum_n G`` (per class e),
    computed for the rows of dh and the classes of dW and db that ``todo`` still asks for (0 elsewhere)."""
    n, v, d = lp.shape
    w, ew = _integers(lp.weight)
    h, eh = _integers(lp.hidden)
    exps = np.array([[(_exponent(x) if x is not None else -(1 << 30)) for x in row] for row in g])
    row_top = exps.max(axis=1)
    col_top = exps.max(axis=0)
    rows_h = np.flatnonzero(todo[0].any(axis=1))
    cols = np.flatnonzero(todo[1].any(axis=1) | (todo[2] if len(todo) > 2 else False))
    lo_r, hi_r = np.zeros((rows_h.size, v), dtype=object), np.zeros((rows_h.size, v), dtype=object)
    lo_c, hi_c = np.zeros((n, cols.size), dtype=object), np.zeros((n, cols.size), dtype=object)
    for a, i in enumerate(rows_h):
        for j in range(v):
            if g[i][j] is not None:
                lo_r[a, j], hi_r[a, j] = _fixed(g[i][j], prec - int(row_top[i]))
    for i in range(n):
        for b, j in enumerate(cols):
            if g[i][j] is not None:
                lo_c[i, b], hi_c[i, b] = _fixed(g[i][j], prec - int(col_top[j]))
    wpos, wneg = np.where(w > 0, w, 0), np.where(w < 0, w, 0)
    hpos, hneg = np.where(h > 0, h, 0), np.where(h < 0, h, 0)

    def spread(shape: tuple[int, ...], at: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, dtype=object)
        out[at] = values
        return out

    dh = (spread((n, d), rows_h, lo_r.dot(wpos) + hi_r.dot(wneg)), spread((n, d), rows_h, hi_r.dot(wpos) + lo_r.dot(wneg)),
          np.array([ew - (prec - int(t)) for t in row_top])[:, None])
    dw = (spread((v, d), cols, lo_c.T.dot(hpos) + hi_c.T.dot(hneg)), spread((v, d), cols, hi_c.T.dot(hpos) + lo_c.T.dot(hneg)),
          np.array([eh - (prec - int(t)) for t in col_top])[:, None])
    db = None
    if lp.bias is not None:
        db = (spread((v,), cols, lo_c.sum(axis=0)), spread((v,), cols, hi_c.sum(axis=0)),
              np.array([-(prec - int(t)) for t in col_top]))
    return dh, dw, db


def _round_int(m: int, e: int, fmt: FloatFormat) -> float:
    return 0.0 if m == 0 else _round_dyadic(int(m), int(e), fmt)


def _rational_row(lp: LinearProblem, rows: _Rows, zint: np.ndarray, n: int) -> list[Fraction] | None:
    """Row n's gradient as exact rationals when it is rational (all logits equal, no z-loss, softcap at 0)."""
    p = lp.logits
    if not rows.active[n] or rows.g[n] == 0:
        return [Fraction(0)] * p.k
    if p.lse_square_scale or len(set(zint[n])) != 1 or (p.softcap is not None and zint[n][0] != 0):
        return None
    wt = rows.wt(n)
    s = sum(wt, Fraction(0))
    return [rows.g[n] * (s / p.k - wt[v]) / rows.d for v in range(p.k)]


def certified_linear_grad(lp: LinearProblem, fmt: FloatFormat, *, prefilter: bool = True) -> LinearGrad:
    """The correctly rounded gradients of a validated case (see the module docstring).

    ``prefilter``: first take every element whose float64 enclosure (the oracle's value and rigorous bound,
    :func:`gradcheck.linear.bounded`) rounds to one number of ``fmt`` (docs/linear.md, "The certified truth",
    step 0); the results are the same either way, False computes every element with mpmath.
    """
    n, v, d = lp.shape
    rows = _Rows(lp)
    zint, ze = exact_logits(lp)
    shapes = ((n, d), (v, d), (v,))
    results = [np.full(s, np.nan) for s in shapes[:2 if lp.bias is None else 3]]
    todo = [np.ones(s, dtype=bool) for s in shapes[:len(results)]]
    if prefilter:
        for res, left, b in zip(results, todo, bounded(lp)):
            decided = _decided(b.value, b.bound, fmt)
            use = ~np.isnan(decided)
            res[use] = decided[use]
            left &= ~use
    prec = 2 * fmt.precision + 30
    while prec <= MAX_PRECISION and any(t.any() for t in todo):
        need = todo[0].any(axis=1) if not any(t.any() for t in todo[1:]) else np.ones(n, dtype=bool)
        g = _grad_rows(lp, rows, zint, ze, prec, need)
        encl = _enclose(lp, g, prec, todo)
        for k, (res, left) in enumerate(zip(results, todo)):
            lo, hi, ex = encl[k]
            ex = np.broadcast_to(ex, lo.shape)
            for idx in zip(*np.nonzero(left)):
                a, b = _round_int(lo[idx], ex[idx], fmt), _round_int(hi[idx], ex[idx], fmt)
                if a == b and np.copysign(1.0, a) == np.copysign(1.0, b):
                    res[idx] = b
                    left[idx] = False
        prec *= 2
    if any(t.any() for t in todo):
        _rational_fallback(lp, rows, zint, fmt, results, todo)
    out = [round_to_format(r, fmt) for r in results]
    return LinearGrad(out[0], out[1], out[2] if len(out) > 2 else None)


def _rational_fallback(lp: LinearProblem, rows: _Rows, zint: np.ndarray, fmt: FloatFormat,
                       results: list[np.ndarray], todo: list[np.ndarray]) -> None:
    n, v, d = lp.shape
    g = [_rational_row(lp, rows, zint, i) for i in range(n)]
    h = [[Fraction(float(x)) for x in row] for row in lp.hidden.astype(np.float64)]
    w = [[Fraction(float(x)) for x in row] for row in lp.weight.astype(np.float64)]
    for k, (res, left) in enumerate(zip(results, todo)):
        for idx in zip(*np.nonzero(left)):
            need = [idx[0]] if k == 0 else list(range(n))
            if any(g[i] is None for i in need):
                raise CertificationError(
                    f"could not decide the rounding of {('d_hidden', 'd_weight', 'd_bias')[k]}{list(idx)} to {fmt.name} "
                    f"within {MAX_PRECISION} bits; please report this input.")
            if k == 0:
                val = sum((g[idx[0]][j] * w[j][idx[1]] for j in range(v)), Fraction(0))
            elif k == 1:
                val = sum((g[i][idx[0]] * h[i][idx[1]] for i in range(n)), Fraction(0))
            else:
                val = sum((g[i][idx[0]] for i in range(n)), Fraction(0))
            res[idx] = _round_fraction(val, fmt)
            left[idx] = False
