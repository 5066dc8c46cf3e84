"""SymPy as a gradient method: its derivative of the loss, lambdified for numpy and for mpmath.

The derivative of the log-sum-exp form (with the kernel options, of ``F = l + beta lse^2`` on the
softcapped logits) is lambdified for numpy (float64) and for mpmath (adaptive precision) and
registered as ``sympy_numpy`` and ``sympy_mpmath`` (docs/methods.md, "SymPy numerics"). The proofs
live in :mod:`gradcheck.estimators.sympy_proofs`; their public names are importable from here too.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any, Callable

import mpmath
import numpy as np

from gradcheck.dtypes import FLOAT64, FloatFormat
from gradcheck.errors import InvalidArgument, require
from gradcheck.estimators.result import MethodResult, Status, finish, unsupported
from gradcheck.estimators.row_loss import TANH_ULPS
from gradcheck.estimators.sympy_proofs import (  # the proofs' names, importable from here as before the split
    DEFAULT_KINDS,
    KERNEL_KINDS,
    KINDS,
    PROOF_VERSION,
    KernelParts,
    Proof,
    _is_zero,
    cache_dir,
    decide,
    kernel_parts,
    prove,
    prove_all,
)
from gradcheck.estimators.terms import backward_error, kernel_terms
from gradcheck.oracle import gamma
from gradcheck.problem import Problem

sp = require("sympy", extra="proofs")

__all__ = ["DEFAULT_KINDS", "KERNEL_KINDS", "KINDS", "MAX_K", "MAX_PRECISION", "PROOF_VERSION", "KernelParts", "Proof",
           "cache_dir", "decide", "derivative", "kernel_derivative", "kernel_parts", "prove", "prove_all",
           "sympy_gradient"]

MAX_K = 32  # lambdify limit: SymPy's diff of the K-term loss grows like K**2 (about 5 s at K = 32)
MAX_PRECISION = 4096  # bits, sympy_mpmath's cap
NUMPY_ELEMENTARY_ULPS = 2.0  # numpy float64 exp, as in docs/oracle.md


@functools.lru_cache(maxsize=None)
def derivative(k: int, module: str) -> Callable:
    """SymPy's derivative of ``L = -sum_c v_c (z_c - log sum_j exp z_j)``, lambdified for ``module``.

    Returns:
        ``f(z, v) -> list of K values``, ``z`` and ``v`` sequences of K numbers (numpy: columns).
    """
    z = sp.symbols(f"z0:{k}", real=True)
    v = sp.symbols(f"v0:{k}", nonnegative=True)
    lse = sp.log(sum((sp.exp(zj) for zj in z), sp.Integer(0)))
    loss = -sum((v[c] * (z[c] - lse) for c in range(k)), sp.Integer(0))
    return sp.lambdify((z, v), [sp.diff(loss, zi) for zi in z], modules=module, cse=True)


@functools.lru_cache(maxsize=None)
def kernel_derivative(k: int, module: str, softcap: bool) -> Callable:
    """SymPy's derivative of ``F = -sum_c v_c (z'_c - lse) + beta lse^2``, lambdified for ``module``.

    ``z' = cap tanh(z / cap)`` when ``softcap`` (else z), ``lse = m + log sum_j exp(z'_j - m)``: the
    shift m is a symbol held constant (F does not depend on it), evaluated at the row's max z'.

    Returns:
        ``f(z, v, beta, cap, m) -> list of K values``.
    """
    z = sp.symbols(f"z0:{k}", real=True)
    v = sp.symbols(f"v0:{k}", real=True)
    beta, cap, m = sp.Symbol("beta", real=True), sp.Symbol("cap", positive=True), sp.Symbol("m", real=True)
    zc = [cap * sp.tanh(zj / cap) for zj in z] if softcap else list(z)
    lse = m + sp.log(sum((sp.exp(x - m) for x in zc), sp.Integer(0)))
    loss = -sum((v[c] * (zc[c] - lse) for c in range(k)), sp.Integer(0)) + beta * lse**2
    return sp.lambdify((z, v, beta, cap, m), [sp.diff(loss, zi) for zi in z], modules=module, cse=True)


def _kernel(problem: Problem) -> bool:
    return problem.softcap is not None or bool(problem.lse_square_scale)


def sympy_gradient(problem: Problem, *, module: str = "numpy", precision: int | None = None) -> MethodResult:
    """The gradient from SymPy's lambdified derivative.

    With a softcap or a z-loss the derivative is that of :func:`kernel_derivative`; the upstream
    factor multiplies each row's result (in float64, or exactly at the working precision for mpmath).

    Args:
        problem: a validated case with at most :data:`MAX_K` classes (else UNSUPPORTED).
        module: "numpy" (float64; logits shifted by the row max, which the derivative is invariant
            to) or "mpmath" (exact shift, then precision doubled per row from ``precision``, default
            2p + 20 bits, until the error estimate decides the rounding to the dtype, up to
            :data:`MAX_PRECISION`; ITERATION_LIMIT if not).

    Returns:
        A :class:`MethodResult` whose ``error`` is an estimate (docs/methods.md, "SymPy numerics").
    """
    name = f"sympy_{module}"
    if module not in ("numpy", "mpmath"):
        raise InvalidArgument(f"module must be 'numpy' or 'mpmath', got {module!r}.")
    if problem.k > MAX_K:
        return unsupported(problem, method=name, reason=(
            f"SymPy's derivative is lambdified for K <= {MAX_K} classes, got K={problem.k}"))
    if _kernel(problem):
        fn = kernel_derivative(problem.k, module, problem.softcap is not None)
    else:
        fn = derivative(problem.k, module)
    if module == "numpy":
        return _numpy_gradient(problem, fn)
    return _mpmath_gradient(problem, fn, precision)


def _numpy_gradient(problem: Problem, fn: Callable) -> MethodResult:
    """Evaluate ``-v_i (1 - p_i) + sum_{c != i} v_c p_i`` (SymPy's form) in float64, with its estimate."""
    u = FLOAT64.unit_roundoff
    k = problem.k
    z = problem.logits.astype(np.float64)
    v = problem.dense_targets() * problem.weights()
    d = problem.divisor()
    up = problem.upstream()[:, None]
    if _kernel(problem):
        terms = kernel_terms(problem)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            m = terms.zc.max(axis=1)
            cap = 1.0 if problem.softcap is None else problem.softcap
            g = np.stack([np.broadcast_to(np.asarray(col, dtype=np.float64), z.shape[:1])
                          for col in fn(list(z.T), list(v.T), terms.beta, cap, m)], axis=1)
            grad = up * g / d
        err = backward_error(problem, grad, FLOAT64, exp_ulps=NUMPY_ELEMENTARY_ULPS, tanh_ulps=TANH_ULPS,
                             chain_per_term=True)
        return finish(problem, grad, err, method="sympy_numpy", bound=False, evaluations=1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s = z - z.max(axis=1, keepdims=True)
        g = np.stack([np.broadcast_to(np.asarray(col, dtype=np.float64), z.shape[:1])
                      for col in fn(list(s.T), list(v.T))], axis=1)
        # estimate (docs/methods.md): p_i from s, with relative error eps_p = a_i + rho + 2u; the sizes
        # with |v| (signed weights) and p from the float64 softmax
        a = np.where(np.isfinite(s), (np.abs(s) + NUMPY_ELEMENTARY_ULPS) * u, 0.0)
        rho = a.max(axis=1, keepdims=True) + gamma(k, u)
        eps_p = a + rho + 2 * u
        p = kernel_terms(problem).p
        av = np.abs(v)
        s_abs = av.sum(axis=1, keepdims=True)
        big_a = p * (s_abs - av)
        big_b = av * np.abs(1.0 - p)
        err = av * (eps_p + 2 * u) + (big_a + big_b) * (eps_p + 2 * gamma(k, u) + u)
        err += (k + 8) * FLOAT64.smallest_subnormal * np.maximum(s_abs, 1.0)
        grad = up * g / d
        err = np.abs(up) * err / abs(d) + 2 * u * np.abs(grad)
    return finish(problem, grad, err, method="sympy_numpy", bound=False, evaluations=1)


def _mpmath_gradient(problem: Problem, fn: Callable, precision: int | None) -> MethodResult:
    """Per row: exact shift, evaluate at P bits, double P until the estimate decides the rounding.

    With the kernel options the logits enter unshifted (the derivative's own shift m is the row's
    max z' at P bits), beta = lambda D / Dz and the upstream factor are exact rationals, and the
    estimate adds the chain factor's cancellation ``1 - tanh^2`` (docs/methods.md, "SymPy numerics").
    """
    fmt = problem.format
    n, k = problem.logits.shape
    z = problem.logits.astype(np.float64)
    d = problem.exact_divisor()
    kernel = _kernel(problem)
    if kernel:
        terms = kernel_terms(problem)
        big_a, big_b, big_z = (x / abs(terms.d) for x in terms.sizes())
        zg = np.abs(terms.zgrad()) / abs(terms.d)
        with np.errstate(invalid="ignore", over="ignore"):
            x = (np.where(np.isfinite(z), np.abs(z), 0.0) / problem.softcap if problem.softcap is not None
                 else np.zeros(z.shape))
        active = problem.active_rows()
        beta_exact = [Fraction(problem.lse_square_scale) * d / problem.zloss_divisor() if active[r] else Fraction(0)
                      for r in range(n)]
    grad = np.zeros((n, k))
    err = np.zeros((n, k))
    status = Status.CONVERGED
    top = 0
    evaluations = 0
    for row in range(n):
        v_exact = [problem.exact_weight(c) * problem.exact_target(row, c) for c in range(k)]
        up = problem.exact_upstream(row)
        if up == 0 or (not any(v_exact) and not (kernel and beta_exact[row])):
            continue  # the row's gradient is exactly 0
        prec = precision or 2 * fmt.precision + 20
        while True:
            evaluations += 1
            with mpmath.workprec(prec):
                v = [_mpf(x) for x in v_exact]
                dd = _mpf(d)
                if kernel:
                    zs = [mpmath.mpf(float(x)) for x in z[row]]
                    if problem.softcap is not None:
                        cap = mpmath.mpf(problem.softcap)
                        zc = [cap * mpmath.tanh(x / cap) for x in zs]
                    else:
                        cap, zc = mpmath.mpf(1), zs
                    vals = [x * _mpf(up) / dd for x in fn(zs, v, _mpf(beta_exact[row]), cap, max(zc))]
                else:
                    za = mpmath.mpf(float(np.max(z[row])))
                    s = [mpmath.fsub(mpmath.mpf(float(x)), za, exact=True) if np.isfinite(x) else mpmath.mpf("-inf")
                         for x in z[row]]
                    vals = [x * _mpf(up) / dd for x in fn(s, v)]
                g = np.array([float(x) for x in vals])
                # relative 2**-prec per operation over about 2K + 10 operations on terms of size
                # (S p_i + v_i) / D (docs/methods.md, "SymPy numerics")
                scale = np.array([float((abs(x) + 2 * abs(vi) * abs(_mpf(up))) / abs(dd)) for x, vi in zip(vals, v)])
                e_prec = (2 * k + 10) * 2.0**-prec * scale
                if kernel:
                    a_up = abs(float(up))
                    e_prec = e_prec + 2.0**-prec * a_up * (
                        (2 * k + 10) * (big_a[row] + big_b[row] + 2 * big_z[row]) * terms.chi[row]
                        + (8 + 2 * x[row]) * zg[row])
            if _small(g, e_prec, fmt) or prec >= MAX_PRECISION:
                if not _small(g, e_prec, fmt):
                    status = Status.ITERATION_LIMIT
                break
            prec *= 2
        e = e_prec + FLOAT64.unit_roundoff * np.abs(g)  # conversion to float64
        top = max(top, prec)
        grad[row], err[row] = g, e
    reason = "" if status == Status.CONVERGED else f"precision cap {MAX_PRECISION} bits reached"
    return finish(problem, grad, err, method="sympy_mpmath", bound=False, evaluations=evaluations,
                  status=status, reason=reason, details={"max_precision": top})


def _mpf(x: Fraction) -> Any:
    return mpmath.mpf(x.numerator) / x.denominator if x.denominator != 1 else mpmath.mpf(x.numerator)


def _small(g: np.ndarray, e: np.ndarray, fmt: FloatFormat) -> bool:
    """True when the precision error is below 1/8 ulp of ``fmt`` at g (or a quarter of its smallest subnormal)."""
    return bool(np.all(e <= np.maximum(fmt.ulp(g) / 8, fmt.smallest_subnormal / 4)))
