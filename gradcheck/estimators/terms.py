"""The kernel options as every estimator sees them: softcap, z-loss factor, upstream factor, in float64.

For a row n that counts (``r_n = 1``) the estimators differentiate (docs/methods.md, "Kernel options")

    F_n(z) = l_n(z') + beta_n lse(z')**2,   z' = c tanh(z / c),   beta_n = lambda D / Dz,

so that the checked gradient is ``g_n F_n'(z) / D`` with ``g_n`` the upstream factor
(:meth:`Problem.upstream`), ``D`` the cross-entropy divisor and ``Dz`` the z-loss divisor
(:meth:`Problem.zloss_divisor`). Ignored rows have ``wt = 0`` and ``beta = 0``: F is constant there.
The float64 magnitudes here (``p``, ``lse``, the chain factor) size the error estimates; no estimator
takes its value from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradcheck.problem import Problem


def softcap(z: np.ndarray, cap: float | None) -> np.ndarray:
    """``c tanh(z / c)`` in the dtype of ``z`` (``-inf`` maps to ``-c``); ``z`` itself when ``cap`` is None."""
    if cap is None:
        return z
    c = np.asarray(cap, dtype=z.dtype)
    with np.errstate(invalid="ignore"):
        return np.tanh(z / c) * c


def chain_factor(z: np.ndarray, cap: float | None) -> np.ndarray:
    """``1 - tanh(z / c)**2`` without cancellation: ``4 e / (1 + e)**2``, ``e = exp(-2 |z| / c)`` (float64).

    Each of the few operations is one rounding (exp within 2 ulps): a relative error below ``8 u``,
    which matters only as a size here. 1 without a softcap; 0 at ``-inf``.
    """
    if cap is None:
        return np.ones(z.shape)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        e = np.exp(-2.0 * np.abs(np.asarray(z, dtype=np.float64)) / cap)
        return np.where(np.isfinite(z), 4.0 * e / (1.0 + e) ** 2, 0.0)


@dataclass(frozen=True, eq=False)
class Terms:
    """Float64 pieces of the kernel loss of a problem, per row and element.

    Attributes:
        zc: ``(N, K)`` softcapped logits z' (the logits without a softcap).
        t: ``(N, K)`` ``tanh(z / c)`` (zeros without a softcap).
        chi: ``(N, K)`` the chain factor ``1 - t**2`` (ones without a softcap).
        p: ``(N, K)`` ``softmax(z')``.
        lse: ``(N,)`` ``logsumexp(z')``.
        wt: ``(N, K)`` weighted smoothed targets ``w_c t_nc`` (0 on ignored rows).
        s_rows: ``(N,)`` ``S_n = sum_c wt_nc``.
        d: the divisor D (float64).
        beta: ``(N,)`` ``lambda D / Dz`` on counted rows, 0 on ignored rows (0 without z-loss).
        up: ``(N,)`` the upstream factor ``g_n``.
        cap: the softcap c, or None.
    """

    zc: np.ndarray
    t: np.ndarray
    chi: np.ndarray
    p: np.ndarray
    lse: np.ndarray
    wt: np.ndarray
    s_rows: np.ndarray
    d: float
    beta: np.ndarray
    up: np.ndarray
    cap: float | None

    def zgrad(self) -> np.ndarray:
        """``F'`` in z' (before the chain factor and the upstream factor): ``p S - wt + 2 beta lse p``."""
        return (self.p * self.s_rows[:, None] - self.wt
                + 2.0 * (self.beta * self.lse)[:, None] * self.p)

    def sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A, B, Zt)``: the magnitudes ``|S| p``, ``|wt|``, ``2 |beta lse| p`` of F''s three terms."""
        return (np.abs(self.s_rows)[:, None] * self.p, np.abs(self.wt),
                2.0 * np.abs(self.beta * self.lse)[:, None] * self.p)

    def grad(self) -> np.ndarray:
        """The gradient ``g_n chi F' / D`` in float64 (a size for estimates, not a reference)."""
        return self.up[:, None] * self.chi * self.zgrad() / self.d


def kernel_beta(problem: Problem) -> np.ndarray:
    """``(N,)`` ``beta_n = lambda D / Dz`` for counted rows, 0 for ignored rows (float64)."""
    if not problem.lse_square_scale:
        return np.zeros(problem.n)
    active = problem.active_rows()
    return np.where(active, problem.lse_square_scale * float(problem.divisor()) / problem.zloss_divisor(), 0.0)


def kernel_terms(problem: Problem) -> Terms:
    """The :class:`Terms` of a problem, computed in float64 from its logits."""
    z = np.asarray(problem.logits, dtype=np.float64)
    cap = problem.softcap
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        zc = softcap(z, cap)
        t = np.tanh(z / cap) if cap is not None else np.zeros(z.shape)
        m = np.max(zc, axis=1, keepdims=True)
        e = np.exp(zc - m)
        total = e.sum(axis=1, keepdims=True)
        p = e / total
        lse = (m + np.log(total))[:, 0]
    wt = problem.dense_targets() * problem.weights()
    return Terms(zc, t, chain_factor(z, cap), p, lse, wt, wt.sum(axis=1), float(problem.divisor()),
                 kernel_beta(problem), problem.upstream(), cap)
