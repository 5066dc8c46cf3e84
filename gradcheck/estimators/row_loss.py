"""Per-row kernel losses in a working dtype, real or complex, with running error estimates.

The finite-difference methods evaluate these, never the oracle. A row's function is
``F = l + beta lse**2`` with ``l = S log Z - sum_c wt_c s_c``, ``wt`` the weighted (smoothed)
targets, ``S = sum_c wt_c``, computed on the softcapped logits ``z' = c tanh(z / c)`` (``z`` without a
softcap): ``s = z' - z'_a`` shifted by the row's argmax ``a``, ``Z = 1 + R``,
``R = sum_{c != a} exp(s_c)``, ``log Z = log1p(R)``, ``lse = z'_a + log1p(R)``, and
``beta = lambda D / Dz`` (0 without z-loss; docs/methods.md, "Row losses" and "Kernel options").
The complex version shifts by the argmax's complex value, which keeps the argmax term exactly 1
and makes the complex step free of the ``p - 1`` cancellation.
"""

from __future__ import annotations

import numpy as np

from gradcheck.dtypes import FloatFormat
from gradcheck.estimators.terms import softcap
from gradcheck.oracle import gamma

# Relative error of numpy's exp and log/log1p in units of u, per format. float64: glibc and the
# SIMD paths are below 1 ulp (as in docs/oracle.md); float32: numpy's SIMD exp/log are documented
# below 4 ulp. tests/test_finite_difference.py measures both against float64/mpmath.
ELEMENTARY_ULPS = {"float64": 2.0, "float32": 4.0}
# Relative error of numpy's real tanh, and of the real and imaginary parts of its complex tanh, in
# units of u (measured against mpmath in tests/test_finite_difference.py: at most 2.0 u real, 5.3 u
# complex128, 4.5 u complex64 on 23 000 points).
TANH_ULPS = 4.0
CTANH_ULPS = 8.0


def softcap_error(zc: np.ndarray, u: float, cap: float | None) -> np.ndarray:
    """Float64 estimate of ``|fl(c tanh(z / c)) - c tanh(z / c)|``: ``(TANH_ULPS + 2) u |z'|``.

    The quotient's rounding moves tanh by ``sech^2(x) |x| u <= |tanh x| u``, tanh adds TANH_ULPS u, the
    product with c one u (docs/methods.md, "Kernel options"). 0 without a softcap.
    """
    if cap is None:
        return np.zeros(zc.shape)
    return (TANH_ULPS + 2.0) * u * np.abs(np.asarray(zc, dtype=np.float64))


class RealRows:
    """Row functions ``F`` of ``(N, K)`` logits in ``fmt``, with cheap re-evaluation after changing one column.

    Re-evaluating after a one-column change performs the same floating-point operations as a full
    evaluation (the unchanged ``exp`` values are reused, the sums are redone over the whole row),
    so the error analysis is that of :meth:`full`.

    Args:
        z: the logits (before the softcap).
        wt: ``(N, K)`` weighted smoothed targets.
        fmt: the working format.
        beta: ``(N,)`` z-loss factors ``lambda D / Dz`` (None: no z-loss); rounded to ``fmt``.
        cap: the softcap c, or None.
    """

    def __init__(self, z: np.ndarray, wt: np.ndarray, fmt: FloatFormat, *, beta: np.ndarray | None = None,
                 cap: float | None = None) -> None:
        self.fmt = fmt
        self.u = fmt.unit_roundoff
        self.c = ELEMENTARY_ULPS[fmt.name]
        self.cap = cap
        self.z = np.array(z, dtype=fmt.dtype)
        self.wt = np.asarray(wt, dtype=fmt.dtype)
        self.s_rows = self.wt.sum(axis=1)  # S in the working dtype: part of the evaluated function
        self.n, self.k = self.z.shape
        zero = beta is None or not np.any(beta)
        self.beta = None if zero else np.asarray(beta, dtype=fmt.dtype)
        self.rows = np.arange(self.n)
        self.zc = softcap(self.z, cap)
        self.a = np.argmax(self.zc, axis=1)
        self.za = self.zc[self.rows, self.a]
        self.parts = self._terms(self.zc, self.za, self.a, self.wt)
        self.value, self.delta, self.lse = self._combine(self.parts, self.za, self.s_rows, self.beta)
        # the softcap's rounding of every z'_c: counts when all columns move (directional checks)
        self.spread = (self._softcap_spread(self.parts[0], self.zc, self.a, self.lse) if cap is not None
                       else np.zeros(self.n))

    def _terms(self, zc: np.ndarray, za: np.ndarray, a: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per-element ``(e, ea, ws)``: ``exp(s_c)`` (0 at the argmax), its error ``e_c a_c``, ``wt_c (-s_c)``."""
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            s = zc - za[:, None]
            e = np.exp(s)
            e[np.arange(zc.shape[0]), a] = 0.0
            ea = np.where(e > 0, e * ((np.abs(s) + self.c) * self.u), 0.0)  # e_c a_c: exp(s_c)'s error
            ws = np.where(wt != 0, wt * -s, 0.0)  # 0 * inf avoided: a masked class with no target weight
        return e, ea, ws

    def _combine(self, parts: tuple[np.ndarray, ...], za: np.ndarray, s_rows: np.ndarray,
                 beta: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row values, their operation-rounding estimate delta and lse (docs/methods.md, "Row losses")."""
        e, ea, ws = parts
        u, k = self.u, self.k
        r, ear, wsum = e.sum(axis=1), ea.sum(axis=1), ws.sum(axis=1)
        wsabs = np.abs(ws).astype(np.float64).sum(axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            lz = np.log1p(r)
            value = s_rows * lz + wsum
            lz64, r64 = lz.astype(np.float64), r.astype(np.float64)
            err_r = ear.astype(np.float64) + gamma(k, u) * r64 + k * self.fmt.smallest_subnormal
            err_lz = err_r / (1.0 + r64) + self.c * u * lz64
            delta = (np.abs(s_rows.astype(np.float64)) * (err_lz + 2 * u * lz64)
                     + (2 * u + gamma(k, u)) * wsabs + u * np.abs(value.astype(np.float64)))
            lse = za + lz
            if beta is not None:
                zl = beta * lse * lse
                value = value + zl
                lse64, b64 = lse.astype(np.float64), np.abs(beta.astype(np.float64))
                # lse: err(log1p R) and the addition; beta * lse * lse: two products; the final sum
                err_lse = err_lz + u * np.abs(lse64)
                delta = delta + b64 * (2 * np.abs(lse64) * err_lse + 2 * u * lse64 ** 2) + u * np.abs(value.astype(np.float64))
        return value.astype(np.float64), delta, lse.astype(np.float64)

    def full(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row values and their error estimates at other logits of the same shape (no caching).

        Every column may have moved, so the softcap's rounding of each z'_c counts here
        (:func:`softcap_error` times ``|dF/dz'_c|``, see docs/methods.md, "Kernel options").
        """
        z = np.asarray(z, dtype=self.fmt.dtype)
        zc = softcap(z, self.cap)
        a = np.argmax(zc, axis=1)
        za = zc[np.arange(z.shape[0]), a]
        parts = self._terms(zc, za, a, self.wt)
        value, delta, lse = self._combine(parts, za, self.s_rows, self.beta)
        if self.cap is not None:
            delta = delta + self._softcap_spread(parts[0], zc, a, lse)
        return value, delta

    def _softcap_spread(self, e: np.ndarray, zc: np.ndarray, a: np.ndarray, lse: np.ndarray) -> np.ndarray:
        """``sum_c |dF/dz'_c| err(z'_c)``, ``|dF/dz'_c| <= (|S| + 2 |beta lse|) p_c + |wt_c|``."""
        err = softcap_error(zc, self.u, self.cap)
        p = e.astype(np.float64)
        p[np.arange(p.shape[0]), a] = 1.0
        p = p / p.sum(axis=1, keepdims=True)
        scale = np.abs(self.s_rows.astype(np.float64))
        if self.beta is not None:
            scale = scale + 2 * np.abs(self.beta.astype(np.float64) * lse)
        return (scale[:, None] * p * err + np.abs(self.wt.astype(np.float64)) * err).sum(axis=1)

    def column(self, k: int, zk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row values with column ``k`` of the logits replaced by ``zk`` (one evaluation).

        ``delta`` counts the operations only: the other columns' z' are the same values in every
        call, so their softcap rounding cancels from a difference (the caller adds column k's).
        """
        zk = np.asarray(zk, dtype=self.fmt.dtype)
        zck = softcap(zk, self.cap)
        with np.errstate(invalid="ignore"):
            moved = (self.a == k) | (zck > self.za)  # the argmax changes: redo those rows in full
        keep = ~moved
        zc = self.zc.copy()
        zc[:, k] = zck
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            sk = zck - self.za
            ek = np.exp(sk)
            col = (ek, np.where(ek > 0, ek * ((np.abs(sk) + self.c) * self.u), 0.0),
                   np.where(self.wt[:, k] != 0, self.wt[:, k] * -sk, 0.0))
        parts = tuple(x.copy() for x in self.parts)
        for x, new in zip(parts, col):
            x[:, k] = np.where(keep, new, x[:, k])
        za = self.za.copy()
        if moved.any():
            rows = np.flatnonzero(moved)
            a = np.argmax(zc[rows], axis=1)
            za[rows] = zc[rows, a]
            for x, new in zip(parts, self._terms(zc[rows], za[rows], a, self.wt[rows])):
                x[rows] = new
        value, delta, _ = self._combine(parts, za, self.s_rows, self.beta)
        return value, delta


def clog1p(w: np.ndarray) -> np.ndarray:
    """``log(1 + w)`` for complex ``w`` with ``Re w >= 0``, accurate when ``|w|`` is small.

    ``Re = log1p(2 Re w + |w|^2) / 2`` and ``Im = atan2(Im w, 1 + Re w)``: neither cancels
    (numpy's complex ``log1p`` computes ``log(1 + w)``, which loses ``Im w`` when it is tiny).
    """
    x, y = w.real, w.imag
    return 0.5 * np.log1p(2 * x + x * x + y * y) + 1j * np.arctan2(y, 1.0 + x)


class ComplexRows:
    """Imaginary parts of complex row functions for the complex step, one column at a time.

    With ``Im z = h e_k`` only column ``k`` and, when ``k`` is a row's argmax, every column of that
    row through the complex shift, carry an imaginary part (docs/methods.md, "Complex step"). Under a
    softcap, column k's z' is ``fl(c tanh(z_k / c)) + i Im(c tanh((z_k + i h) / c))`` (numpy's complex
    tanh): its real part differs from that of the complex value by O(h^2), which moves ``Im F / h``
    by O(h^2) only.
    """

    def __init__(self, z: np.ndarray, wt: np.ndarray, fmt: FloatFormat, *, beta: np.ndarray | None = None,
                 cap: float | None = None) -> None:
        self.fmt = fmt
        self.u = fmt.unit_roundoff
        self.c = ELEMENTARY_ULPS[fmt.name]
        self.cap = cap
        self.cdtype = np.complex128 if fmt.precision == 53 else np.complex64
        self.z = np.array(z, dtype=fmt.dtype)
        self.wt = np.asarray(wt, dtype=fmt.dtype)
        self.s_rows = self.wt.sum(axis=1)
        self.n, self.k = self.z.shape
        self.beta = None if beta is None or not np.any(beta) else np.asarray(beta, dtype=fmt.dtype)
        self.rows = np.arange(self.n)
        self.zc = softcap(self.z, cap)
        self.a = np.argmax(self.zc, axis=1)
        self.za = self.zc[self.rows, self.a]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            self.s = self.zc - self.za[:, None]
            self.e = np.exp(self.s).astype(self.cdtype)
            self.e[self.rows, self.a] = 0.0
            self.amax = np.max(np.where(self.e.real > 0, (np.abs(self.s) + self.c) * self.u, 0.0), axis=1)
        others = self.wt.copy()
        others[self.rows, self.a] = 0.0
        self.others = others.sum(axis=1)  # sum of wt over c != a, summed directly (no S - wt_a cancellation)

    def step(self, k: int, h: float) -> np.ndarray:
        """``(N,)`` ``Im z'_k`` for ``z_k + i h``: h itself, or ``Im c tanh((z_k + i h) / c)``."""
        if self.cap is None:
            return np.full(self.n, self.fmt.dtype.type(h))
        c = self.cdtype(self.cap)
        with np.errstate(invalid="ignore", under="ignore"):
            w = np.tanh((self.z[:, k].astype(self.cdtype) + self.cdtype(1j * h)) / c) * c
        return np.where(np.isfinite(self.z[:, k]), w.imag, 0.0).astype(self.fmt.dtype)

    def imag_parts(self, k: int, h: float) -> dict[str, np.ndarray]:
        """The parts of ``Im F(z + i h e_k) / h = T1 + T2 + T3`` (float64, ``(N,)`` each).

        ``y = Im z'_k``. For a row whose argmax is ``k``, ``s_c = z'_c - z'_a - i y`` (c != a);
        otherwise only ``s_k = z'_k - z'_a + i y``. ``T1 = S Im log1p(R) / h``, ``T2 = -sum_c wt_c
        Im s_c / h``, ``T3 = Im(beta lse^2) / h`` with the complex ``lse = z'_a + [k = a] i y + log1p(R)``.
        Also returned: ``chi = y / h`` (the chain factor as computed), ``lse_re``, ``lse_im``
        (``Im lse / h``) and ``log_im`` (``Im log1p(R) / h``), for the estimate.
        """
        hh = self.fmt.dtype.type(h)
        y = self.step(k, h)
        at = self.a == k
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            # rows where k is not the argmax: replace column k of e by exp(s_k + i y)
            ek = np.exp(self.s[:, k].astype(self.cdtype) + 1j * y.astype(self.cdtype))
            old = self.e[:, k].copy()
            self.e[:, k] = np.where(at, old, ek)
            # rows where k is the argmax: every other term gets exp(-i y)
            rot = np.where(at, np.exp(-1j * y.astype(self.cdtype)), 1.0).astype(self.cdtype)
            r = self.e.sum(axis=1) * rot
            self.e[:, k] = old
            lg = clog1p(r)
            t1 = self.s_rows * lg.imag / hh
            t2 = np.where(at, self.others, -self.wt[:, k]) * (y / hh)
            lse = (self.za + np.where(at, 1j * y, 0.0)).astype(self.cdtype) + lg
            t3 = (self.beta * lse * lse).imag / hh if self.beta is not None else np.zeros(self.n)
        f64 = lambda x: np.asarray(x).astype(np.float64)  # noqa: E731
        return {"t1": f64(t1), "t2": f64(t2), "t3": f64(t3), "chi": f64(y / hh), "lse_re": f64(lse.real),
                "lse_im": f64(lse.imag / hh), "log_im": f64(lg.imag / hh)}
