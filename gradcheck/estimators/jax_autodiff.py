"""JAX autodiff: the VJP of a jnp cross-entropy with every option (softcap, z-loss), the softmax Jacobian and the Hessian.

float64 is enabled only inside ``jax.enable_x64`` contexts, so a call leaves the process's JAX
configuration as it found it. Each function is compiled once per shape, dtype and option layout
(ahead of time, cached), and the compile time is reported apart from the call time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from gradcheck.dtypes import FLOAT64, FloatFormat, float_format
from gradcheck.errors import require
from gradcheck.estimators.result import MethodResult, finish
from gradcheck.estimators.terms import kernel_terms
from gradcheck.oracle import gamma
from gradcheck.problem import Problem

jax = require("jax", extra="jax")
jnp = require("jax.numpy", extra="jax")

# Relative error of XLA's CPU exp and log in units of u, for every format (float16 and bfloat16 are
# computed in float32 and rounded once). tests/test_jax_autodiff.py measures them against mpmath.
XLA_ELEMENTARY_ULPS = 4.0
# Relative error of XLA's CPU tanh in units of u (measured against mpmath in tests/test_jax_autodiff.py:
# 7.0 u in float64, 4.0 u in float32 on 23 000 points).
XLA_TANH_ULPS = 10.0

_COMPILED: dict[tuple, Any] = {}


def row_losses(z: jax.Array, targets: jax.Array, weight: jax.Array, label_smoothing: jax.Array,
               lse_square_scale: jax.Array, cap: jax.Array, *, index: bool, ignore_index: int, reduction: str,
               softcap: bool, zloss: bool) -> jax.Array:
    """``(N,)`` row contributions: ``l_n / D + lambda lse_n^2 / Dz`` (mean), ``l_n + lambda lse_n^2`` otherwise.

    ``torch.nn.functional.cross_entropy`` with the kernel options (see :mod:`gradcheck.problem`):
    ``z' = cap tanh(z / cap)`` through ``jnp.tanh`` when ``softcap``, and the z-loss on the rows that
    count when ``zloss``. The loss is the sum of the contributions for "mean"/"sum" and the vector
    itself for "none". ``weight`` is always given (ones when unweighted).
    """
    k = z.shape[1]
    if index:
        active = targets != ignore_index
        t = jax.nn.one_hot(jnp.where(active, targets, 0), k, dtype=z.dtype) * active[:, None].astype(z.dtype)
        denominator = jnp.sum(jnp.where(active, weight[jnp.where(active, targets, 0)], 0))
    else:
        active = jnp.ones(z.shape[0], dtype=bool)
        t = targets
        denominator = jnp.asarray(z.shape[0], dtype=z.dtype)
    t = jnp.where(active[:, None], (1 - label_smoothing) * t + label_smoothing / k, 0)
    wt = weight[None, :] * t
    zc = cap * jnp.tanh(z / cap) if softcap else z
    m = jax.lax.stop_gradient(jnp.max(zc, axis=1, keepdims=True))
    s = zc - m
    log_z = jnp.log(jnp.sum(jnp.exp(s), axis=1, keepdims=True))
    logp = s - log_z
    rows = -jnp.sum(jnp.where(wt != 0, wt * logp, 0), axis=1)
    if reduction == "mean":
        rows = rows / denominator
    if zloss:
        lse = (m + log_z)[:, 0]
        zrows = jnp.where(active, lse_square_scale * lse * lse, 0)
        if reduction == "mean":
            zrows = zrows / jnp.sum(active).astype(z.dtype)
        rows = rows + zrows
    return rows


def cross_entropy(z: jax.Array, targets: jax.Array, weight: jax.Array, label_smoothing: jax.Array,
                  *, index: bool, ignore_index: int, reduction: str, lse_square_scale: Any = 0.0,
                  softcap: Any = None) -> jax.Array:
    """The scalar loss: the sum of :func:`row_losses` (for "none" the sum of the row losses)."""
    cap = jnp.asarray(1.0 if softcap is None else softcap, dtype=z.dtype)
    lam = jnp.asarray(lse_square_scale, dtype=z.dtype)
    return jnp.sum(row_losses(z, targets, weight, label_smoothing, lam, cap, index=index,
                              ignore_index=ignore_index, reduction=reduction, softcap=softcap is not None,
                              zloss=bool(lse_square_scale)))


def _compiled(key: tuple, build: Callable[[], Callable], args: tuple) -> tuple[Any, float]:
    """The compiled function for ``key`` and its compile seconds (0 when it was cached)."""
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    compiled = jax.jit(build()).lower(*args).compile()
    seconds = time.perf_counter() - start
    _COMPILED[key] = compiled
    return compiled, seconds


def jax_gradient(problem: Problem, *, x64: bool = False) -> MethodResult:
    """The VJP ``g * dL/dz`` by ``jax.vjp`` of :func:`row_losses`, in float64 (``x64=True``) or the logits' dtype.

    For "mean"/"sum" the cotangent of the scalar loss is the scalar ``g``; for "none" it is the
    ``(N,)`` upstream gradient (ones when the problem has none), rounded to the working dtype.

    Returns:
        A :class:`MethodResult`; ``error`` is an estimate: a first-order running error analysis of
        the backward pass ``g = -wt/D + e (sum wt / D) / Z`` (docs/methods.md, "JAX autodiff"),
        with the z-loss term ``2 lambda lse p / Dz`` and tanh's chain factor ``(1 + t)(1 - t)``,
        assuming XLA's exp and log within :data:`XLA_ELEMENTARY_ULPS` ulps, tanh within
        :data:`XLA_TANH_ULPS`, and subnormals flushed to zero (XLA's CPU default). ``details``
        holds ``compile_seconds`` (0 when cached) and ``call_seconds``.
    """
    fmt = FLOAT64 if x64 else problem.format
    name = "jax_autodiff_x64" if x64 else "jax_autodiff"
    with jax.enable_x64(fmt.precision == 53 or problem.index_targets):
        compiled, compile_seconds, args = _compile_loss_derivative(problem, fmt, "vjp")
        start = time.perf_counter()
        out = compiled(*args)
        out.block_until_ready()
        call_seconds = time.perf_counter() - start
        g = np.asarray(out).astype(np.float64)
    error = _grad_error(problem, g, fmt)
    return finish(problem, g, error, method=name, bound=False, evaluations=1,
                  details={"compile_seconds": compile_seconds, "call_seconds": call_seconds,
                           "dtype": fmt.name})


def _compile_loss_derivative(problem: Problem, fmt: FloatFormat, kind: str) -> tuple[Callable, float, tuple]:
    """The VJP (``kind="vjp"``) or the Hessian (``"hessian"``) of the loss for this problem, jitted and
    cached per shape, dtype and option layout; returns it, its compile seconds (0 when cached) and its
    arguments. Call inside the caller's ``jax.enable_x64`` block.

    The Hessian is that of ``sum_n g_n L_n`` (the scalar whose gradient is the VJP).
    """
    index = problem.index_targets
    z = np.asarray(problem.logits).astype(fmt.dtype)
    targets = problem.targets if index else problem.targets.astype(fmt.dtype)
    weight = problem.weights().astype(fmt.dtype)
    eps = np.asarray(problem.label_smoothing, dtype=fmt.dtype)
    lam = np.asarray(problem.lse_square_scale, dtype=fmt.dtype)
    cap = np.asarray(1.0 if problem.softcap is None else problem.softcap, dtype=fmt.dtype)
    scalar = problem.reduction != "none" or problem.vector
    up = problem.upstream()
    g = np.asarray(up[0] if scalar else up, dtype=fmt.dtype)
    softcap, zloss = problem.softcap is not None, bool(problem.lse_square_scale)
    key = (kind, z.shape, fmt.name, index, problem.ignore_index, problem.reduction, softcap, zloss)
    args = tuple(jnp.asarray(a) for a in (z, targets, weight, eps, lam, cap, g))

    def rows_of(z_, t_, w_, e_, l_, c_):
        out = row_losses(z_, t_, w_, e_, l_, c_, index=index, ignore_index=problem.ignore_index,
                         reduction=problem.reduction, softcap=softcap, zloss=zloss)
        return jnp.sum(out) if scalar else out

    def build() -> Callable:
        if kind == "vjp":
            def vjp(z_, t_, w_, e_, l_, c_, g_):
                _, pull = jax.vjp(lambda zz: rows_of(zz, t_, w_, e_, l_, c_), z_)
                return pull(g_)[0]
            return vjp
        return jax.hessian(lambda z_, t_, w_, e_, l_, c_, g_: jnp.sum(g_ * rows_of(z_, t_, w_, e_, l_, c_)))

    compiled, compile_seconds = _compiled(key, build, args)
    return compiled, compile_seconds, args


def _grad_error(problem: Problem, g: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Estimate of |g - exact| for the backward pass (docs/methods.md, "JAX autodiff").

    With A = |S| p / |D|, B = |wt| / |D| and Zt = 2 lambda |lse| p / Dz (float64 sizes from
    :func:`~gradcheck.estimators.terms.kernel_terms`): A carries the errors of e_i (a_i), of Z (rho)
    and of S/D (gamma_K + 2u), B that of wt (smoothing in the dtype), Zt those of p and of lse; the sum
    one rounding; under a softcap a_i grows by the rounding of z', and the chain factor
    ``(1 + t)(1 - t)`` has absolute error ``2 (XLA_TANH_ULPS + 1) u |t| + 3 u chi``; the upstream
    factor (rounded to the dtype) and its product two u.
    """
    u = fmt.unit_roundoff
    k = problem.k
    c = XLA_ELEMENTARY_ULPS
    terms = kernel_terms(problem)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        zc = terms.zc
        top = zc.max(axis=1, keepdims=True)
        s = zc - top
        alive = np.isfinite(s) & (s > np.log(fmt.tiny))
        a = np.where(alive, (np.abs(s) + c) * u, 0.0)
        if problem.softcap is not None:
            a = a + (XLA_TANH_ULPS + 2) * u * (np.abs(zc) + np.abs(top))
        rho = a.max(axis=1, keepdims=True) + gamma(k, u)
        d = abs(terms.d)
        big_a, b, big_z = (x / d for x in terms.sizes())
        eps_wt = (5 * u if problem.label_smoothing else u) if fmt.precision < 53 or problem.label_smoothing else 0.0
        lse = np.abs(terms.lse)[:, None]
        e_lse = u * (np.abs(top) + lse) + rho + c * u * np.abs(terms.lse[:, None] - top)
        zl = (big_z * (a + rho + 4 * u) + np.where(lse > 0, big_z / np.where(lse > 0, lse, 1.0), 0.0) * e_lse)
        s_rows = np.abs(terms.s_rows)[:, None] + 2 * np.abs(terms.beta * terms.lse)[:, None]
        floor = (k + 8) * fmt.tiny * np.maximum(1.0, s_rows) * max(1.0, 1.0 / d)
        err = (big_a * (a + rho + 2 * gamma(k, u) + 5 * u + eps_wt) + (u + eps_wt) * b + u * (big_a + b + big_z)
               + zl + floor)
        zg = np.abs(terms.zgrad()) / d
        err = err + 2 * u * zg
        if problem.softcap is not None:
            err = terms.chi * err + zg * (2 * (XLA_TANH_ULPS + 1) * u * np.abs(terms.t) + 3 * u * terms.chi)
        up = np.abs(terms.up)[:, None]
        err = up * err + 2 * u * np.abs(g)
    return np.where(np.isfinite(err), err, np.inf)


def softmax_jacobian(z: Any, *, mode: str = "rev", x64: bool = True) -> np.ndarray:
    """``jax.jacrev`` (``mode="rev"``) or ``jax.jacfwd`` (``"fwd"``) of a stable jnp softmax, per row.

    Returns:
        ``(K, K)`` for a vector, ``(N, K, K)`` for a batch, float64 when ``x64`` else the input dtype.
    """
    arr = np.asarray(z)
    fmt = FLOAT64 if x64 else float_format(arr.dtype)
    rows = np.atleast_2d(arr).astype(fmt.dtype)
    jac = {"rev": jax.jacrev, "fwd": jax.jacfwd}[mode]
    key = ("softmax_jacobian", rows.shape, fmt.name, mode)
    with jax.enable_x64(fmt.precision == 53):
        args = (jnp.asarray(rows),)
        compiled, _ = _compiled(key, lambda: jax.vmap(jac(jax.nn.softmax)), args)
        out = np.asarray(compiled(*args)).astype(np.float64)
    return out[0] if arr.ndim == 1 else out


def cross_entropy_hessian(problem: Problem, *, x64: bool = True) -> np.ndarray:
    """The ``(N, K, K)`` diagonal blocks of ``jax.hessian`` of ``sum_n g_n L_n`` in the logits.

    The full Hessian is ``(N, K, N, K)`` and block diagonal across rows; its blocks are returned.
    With the kernel options it includes the z-loss and the softcap (tanh's second derivative).
    """
    fmt = FLOAT64 if x64 else problem.format
    with jax.enable_x64(fmt.precision == 53 or problem.index_targets):
        compiled, _, args = _compile_loss_derivative(problem, fmt, "hessian")
        full = np.asarray(compiled(*args)).astype(np.float64)
    n = problem.n
    blocks = full[np.arange(n), :, np.arange(n), :]
    return problem.restore_shape(blocks)
