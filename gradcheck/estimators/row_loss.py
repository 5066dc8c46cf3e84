"""Per-row cross-entropy losses in a working dtype, real or complex, with running error estimates.

The finite-difference methods evaluate these, never the oracle. A row's loss is
``l = S log Z - sum_c wt_c s_c`` with ``wt`` the weighted (smoothed) targets, ``S = sum_c wt_c``,
``s = z - z_a`` the logits shifted by the row's argmax ``a`` and ``Z = 1 + R``,
``R = sum_{c != a} exp(s_c)``, so that ``log Z = log1p(R)`` (docs/methods.md, "Row losses").
The complex version shifts by the argmax's complex value, which keeps the argmax term exactly 1
and makes the complex step free of the ``p - 1`` cancellation.
"""

from __future__ import annotations

import numpy as np

from gradcheck.dtypes import FloatFormat
from gradcheck.oracle import gamma

# Relative error of numpy's exp and log/log1p in units of u, per format. float64: glibc and the
# SIMD paths are below 1 ulp (as in docs/oracle.md); float32: numpy's SIMD exp/log are documented
# below 4 ulp. tests/test_finite_difference.py measures both against float64/mpmath.
ELEMENTARY_ULPS = {"float64": 2.0, "float32": 4.0}


class RealRows:
    """Row losses of ``(N, K)`` logits in ``fmt``, with cheap re-evaluation after changing one column.

    Re-evaluating after a one-column change performs the same floating-point operations as a full
    evaluation (the unchanged ``exp`` values are reused, the sums are redone over the whole row),
    so the error analysis is that of :meth:`full`.
    """

    def __init__(self, z: np.ndarray, wt: np.ndarray, fmt: FloatFormat) -> None:
        self.fmt = fmt
        self.u = fmt.unit_roundoff
        self.c = ELEMENTARY_ULPS[fmt.name]
        self.z = np.array(z, dtype=fmt.dtype)
        self.wt = np.asarray(wt, dtype=fmt.dtype)
        self.s_rows = self.wt.sum(axis=1)  # S in the working dtype: part of the evaluated function
        self.n, self.k = self.z.shape
        self.rows = np.arange(self.n)
        self.a = np.argmax(self.z, axis=1)
        self.za = self.z[self.rows, self.a]
        s, self.e, self.ea, self.ws = self._terms(self.z, self.za, self.a, self.wt)
        self.value, self.delta = self._combine(self.e.sum(axis=1), self.ea.sum(axis=1), self.ws.sum(axis=1),
                                               self.s_rows)

    def _terms(self, z: np.ndarray, za: np.ndarray, a: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, ...]:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            s = z - za[:, None]
            e = np.exp(s)
            rows = np.arange(z.shape[0])
            e[rows, a] = 0.0
            ea = np.where(e > 0, e * ((np.abs(s) + self.c) * self.u), 0.0)  # e_c a_c: exp(s_c)'s error
            ws = np.where(wt > 0, wt * -s, 0.0)  # -s >= 0
        return s, e, ea, ws

    def _combine(self, r: np.ndarray, ear: np.ndarray, wsum: np.ndarray, s_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Loss and its rounding error estimate delta (docs/methods.md, "Row losses")."""
        u, k = self.u, self.k
        with np.errstate(over="ignore", invalid="ignore"):
            lz = np.log1p(r)
            value = s_rows * lz + wsum
            err_r = ear + gamma(k, u) * r + k * self.fmt.smallest_subnormal
            delta = (
                s_rows * (err_r / (1.0 + r) + (self.c + 2) * u * lz)
                + (2 * u + gamma(k, u)) * wsum
                + u * np.abs(value)
            )
        return value.astype(np.float64), delta.astype(np.float64)

    def full(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row losses and their error estimates at other logits of the same shape (no caching)."""
        z = np.asarray(z, dtype=self.fmt.dtype)
        a = np.argmax(z, axis=1)
        za = z[np.arange(z.shape[0]), a]
        wt = self.wt[: z.shape[0]] if z.shape[0] == self.n else self.wt
        _, e, ea, ws = self._terms(z, za, a, wt)
        return self._combine(e.sum(axis=1), ea.sum(axis=1), ws.sum(axis=1), self.s_rows)

    def column(self, k: int, zk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row losses with column ``k`` of the logits replaced by ``zk`` (one evaluation)."""
        zk = np.asarray(zk, dtype=self.fmt.dtype)
        with np.errstate(invalid="ignore"):
            moved = (self.a == k) | (zk > self.za)  # the argmax changes: redo those rows in full
        keep = ~moved
        old = self.e[:, k].copy(), self.ea[:, k].copy(), self.ws[:, k].copy()
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            sk = zk - self.za
            ek = np.exp(sk)
            self.e[:, k] = np.where(keep, ek, old[0])
            self.ea[:, k] = np.where(keep & (ek > 0), ek * ((np.abs(sk) + self.c) * self.u), np.where(keep, 0.0, old[1]))
            wk = self.wt[:, k]
            self.ws[:, k] = np.where(keep, np.where(wk > 0, wk * -sk, 0.0), old[2])
        try:
            value, delta = self._combine(self.e.sum(axis=1), self.ea.sum(axis=1), self.ws.sum(axis=1),
                                         self.s_rows)
        finally:
            self.e[:, k], self.ea[:, k], self.ws[:, k] = old
        if moved.any():
            rows = np.flatnonzero(moved)
            z = self.z[rows].copy()
            z[:, k] = zk[rows]
            a = np.argmax(z, axis=1)
            za = z[np.arange(rows.size), a]
            _, e, ea, ws = self._terms(z, za, a, self.wt[rows])
            u, k_ = self.u, self.k
            with np.errstate(over="ignore", invalid="ignore"):
                r, ear, wsum, srow = e.sum(axis=1), ea.sum(axis=1), ws.sum(axis=1), self.s_rows[rows]
                lz = np.log1p(r)
                v = srow * lz + wsum
                err_r = ear + gamma(k_, u) * r + k_ * self.fmt.smallest_subnormal
                d = srow * (err_r / (1.0 + r) + (self.c + 2) * u * lz) + (2 * u + gamma(k_, u)) * wsum + u * np.abs(v)
            value[rows], delta[rows] = v, d
        return value, delta


def clog1p(w: np.ndarray) -> np.ndarray:
    """``log(1 + w)`` for complex ``w`` with ``Re w >= 0``, accurate when ``|w|`` is small.

    ``Re = log1p(2 Re w + |w|^2) / 2`` and ``Im = atan2(Im w, 1 + Re w)``: neither cancels
    (numpy's complex ``log1p`` computes ``log(1 + w)``, which loses ``Im w`` when it is tiny).
    """
    x, y = w.real, w.imag
    return 0.5 * np.log1p(2 * x + x * x + y * y) + 1j * np.arctan2(y, 1.0 + x)


class ComplexRows:
    """Imaginary parts of complex row losses for the complex step, one column at a time.

    With ``Im z = h e_k`` only column ``k`` and, when ``k`` is a row's argmax, every column of that
    row through the complex shift, carry an imaginary part (docs/methods.md, "Complex step").
    """

    def __init__(self, z: np.ndarray, wt: np.ndarray, fmt: FloatFormat) -> None:
        self.fmt = fmt
        self.u = fmt.unit_roundoff
        self.c = ELEMENTARY_ULPS[fmt.name]
        self.cdtype = np.complex128 if fmt.precision == 53 else np.complex64
        self.z = np.array(z, dtype=fmt.dtype)
        self.wt = np.asarray(wt, dtype=fmt.dtype)
        self.s_rows = self.wt.sum(axis=1)
        self.n, self.k = self.z.shape
        self.rows = np.arange(self.n)
        self.a = np.argmax(self.z, axis=1)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            self.s = self.z - self.z[self.rows, self.a][:, None]
            self.e = np.exp(self.s).astype(self.cdtype)
            self.e[self.rows, self.a] = 0.0
            self.amax = np.max(np.where(self.e.real > 0, (np.abs(self.s) + self.c) * self.u, 0.0), axis=1)
        others = self.wt.copy()
        others[self.rows, self.a] = 0.0
        self.others = others.sum(axis=1)  # sum of wt over c != a, summed directly (no S - wt_a cancellation)

    def imag_parts(self, k: int, h: float) -> tuple[np.ndarray, np.ndarray]:
        """``(T1, T2)`` with ``Im l(z + i h e_k) = h (T1 + T2)``: ``T1 = S Im log1p(R) / h``, ``T2`` the linear part.

        For a row whose argmax is ``k``, ``s_c = z_c - z_a - i h`` (c != a); otherwise only
        ``s_k = z_k - z_a + i h``. ``T2 = -sum_c wt_c Im s_c / h``.
        """
        h = self.cdtype(h).real
        at = self.a == k
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            # rows where k is not the argmax: replace column k of e by exp(s_k + i h)
            ek = np.exp(self.s[:, k].astype(self.cdtype) + 1j * h)
            old = self.e[:, k].copy()
            self.e[:, k] = np.where(at, old, ek)
            # rows where k is the argmax: every other term gets exp(-i h)
            rot = np.where(at, np.exp(-1j * h).astype(self.cdtype), 1.0).astype(self.cdtype)
            r = self.e.sum(axis=1) * rot
            self.e[:, k] = old
            t1 = self.s_rows * clog1p(r).imag / h
            wk = self.wt[:, k]
            t2 = np.where(at, self.others, -wk)
        return t1.astype(np.float64), t2.astype(np.float64)
