"""JAX autodiff: jax.grad of a jnp cross-entropy with every option, the softmax Jacobian and the Hessian.

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
from gradcheck.oracle import gamma
from gradcheck.problem import Problem

jax = require("jax", extra="jax")
jnp = require("jax.numpy", extra="jax")

# Relative error of XLA's CPU exp and log in units of u, for every format (float16 and bfloat16 are
# computed in float32 and rounded once). tests/test_jax_autodiff.py measures them against mpmath.
XLA_ELEMENTARY_ULPS = 4.0

_COMPILED: dict[tuple, Any] = {}


def cross_entropy(z: jax.Array, targets: jax.Array, weight: jax.Array, label_smoothing: jax.Array,
                  *, index: bool, ignore_index: int, reduction: str) -> jax.Array:
    """``torch.nn.functional.cross_entropy`` in jnp (see :mod:`gradcheck.problem` for the semantics).

    ``weight`` is always given (ones when unweighted); ``reduction="none"`` returns the sum of the
    row losses, whose gradient is the one gradcheck checks.
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
    m = jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True))
    s = z - m
    logp = s - jnp.log(jnp.sum(jnp.exp(s), axis=1, keepdims=True))
    total = -jnp.sum(jnp.where(wt > 0, wt * logp, 0))
    return total / denominator if reduction == "mean" else total


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
    """``jax.grad`` of :func:`cross_entropy`, in float64 (``x64=True``) or in the logits' dtype.

    Returns:
        A :class:`MethodResult`; ``error`` is an estimate: a first-order running error analysis of
        the backward pass ``g = -wt/D + e (sum wt / D) / Z`` (docs/methods.md, "JAX autodiff"),
        assuming XLA's exp and log within :data:`XLA_ELEMENTARY_ULPS` ulps and subnormals flushed
        to zero (XLA's CPU default). ``details`` holds ``compile_seconds`` (0 when cached) and
        ``call_seconds``.
    """
    fmt = FLOAT64 if x64 else problem.format
    name = "jax_autodiff_x64" if x64 else "jax_autodiff"
    with jax.enable_x64(fmt.precision == 53 or problem.index_targets):
        compiled, compile_seconds, args = _compile_loss_derivative(problem, fmt, "grad", jax.grad)
        start = time.perf_counter()
        out = compiled(*args)
        out.block_until_ready()
        call_seconds = time.perf_counter() - start
        g = np.asarray(out).astype(np.float64)
    error = _grad_error(problem, g, fmt)
    return finish(problem, g, error, method=name, bound=False, evaluations=1,
                  details={"compile_seconds": compile_seconds, "call_seconds": call_seconds,
                           "dtype": fmt.name})


def _compile_loss_derivative(problem: Problem, fmt: FloatFormat, kind: str, transform: Callable) -> tuple[Callable, float, tuple]:
    """``transform`` (jax.grad or jax.hessian) of :func:`cross_entropy` for this problem, jitted and
    cached per shape, dtype and options; returns it, its compile seconds (0 when cached) and its
    arguments. Call inside the caller's ``jax.enable_x64`` block."""
    index = problem.index_targets
    z = np.asarray(problem.logits).astype(fmt.dtype)
    targets = problem.targets if index else problem.targets.astype(fmt.dtype)
    weight = problem.weights().astype(fmt.dtype)
    eps = np.asarray(problem.label_smoothing, dtype=fmt.dtype)
    key = (kind, z.shape, fmt.name, index, problem.ignore_index, problem.reduction)
    args = tuple(jnp.asarray(a) for a in (z, targets, weight, eps))

    def build() -> Callable:
        def loss(z_, t_, w_, e_):
            return cross_entropy(z_, t_, w_, e_, index=index, ignore_index=problem.ignore_index,
                                 reduction=problem.reduction)
        return transform(loss)

    compiled, compile_seconds = _compiled(key, build, args)
    return compiled, compile_seconds, args


def _grad_error(problem: Problem, g: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Estimate of |g - exact| for the backward pass (docs/methods.md, "JAX autodiff").

    With A = e_i (S/D)/Z (recovered as |g + wt/D|) and B = wt_i/D: A carries the errors of e_i
    (a_i), of Z (rho) and of S/D (gamma_K + 2u), B that of wt (smoothing in the dtype), and the
    final sum one rounding of |A| + |B|.
    """
    u = fmt.unit_roundoff
    k = problem.k
    c = XLA_ELEMENTARY_ULPS
    z = problem.logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = z - z.max(axis=1, keepdims=True)
        alive = np.isfinite(s) & (s > np.log(fmt.tiny))
        a = np.where(alive, (np.abs(s) + c) * u, 0.0)
        rho = a.max(axis=1, keepdims=True) + gamma(k, u)
        wt = problem.dense_targets() * problem.weights()
        d = problem.divisor()
        b = wt / d
        big_a = np.abs(g + b)
        eps_wt = (5 * u if problem.label_smoothing else u) if fmt.precision < 53 or problem.label_smoothing else 0.0
        s_rows = wt.sum(axis=1, keepdims=True)
        floor = (k + 8) * fmt.tiny * np.maximum(1.0, s_rows) * max(1.0, 1.0 / d)
        err = (big_a * (a + rho + 2 * gamma(k, u) + 5 * u + eps_wt) + (u + eps_wt) * b + u * (big_a + b)
               + 2 * u * np.abs(g) + floor)
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
    """The ``(N, K, K)`` diagonal blocks of ``jax.hessian`` of :func:`cross_entropy` in the logits.

    The full Hessian is ``(N, K, N, K)`` and block diagonal across rows; its blocks are returned.
    """
    fmt = FLOAT64 if x64 else problem.format
    with jax.enable_x64(fmt.precision == 53 or problem.index_targets):
        compiled, _, args = _compile_loss_derivative(problem, fmt, "hessian", jax.hessian)
        full = np.asarray(compiled(*args)).astype(np.float64)
    n = problem.n
    blocks = full[np.arange(n), :, np.arange(n), :]
    return problem.restore_shape(blocks)


