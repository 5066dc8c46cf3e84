"""The fast numpy oracle: softmax, loss, gradient, Jacobian and Hessian, with running error bounds.

Everything is computed in float64 (every supported input format embeds exactly in float64) and
rounded once, correctly, to the requested dtype. The formulas avoid the avoidable cancellation:

* per row, m = max z, s = z - m, e = exp(s); the argmax term is exactly 1, so
  ``R = sum_{c != argmax} e_c`` is summed on its own, ``Z = 1 + R``, ``log Z = log1p(R)``;
* ``q_i = 1 - p_i`` is ``R / Z`` for the argmax (where ``1 - p`` would cancel) and ``1 - p_i``
  elsewhere (there ``p_i <= 1/2``, so no cancellation);
* ``g_i = p_i S - w_i t_i`` is evaluated as ``p_i (S - w_i t_i) - w_i t_i q_i``: for a one-hot
  target that is ``-q_t``, never ``p_t - 1`` (which is 0 in float64 once the gap exceeds ~37).

The bounds returned by the ``*_bounded`` functions are rigorous first-order running error bounds,
derived in docs/oracle.md, section "Running error bound".
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gradcheck.dtypes import EXTENDED, FLOAT64, FloatFormat, float_format, round_to_format
from gradcheck.problem import Problem, check_logit_values, make_problem, validate_logits

U = FLOAT64.unit_roundoff  # 2**-53
# The absolute error of a result that underflows is at most half the smallest subnormal, 2**-1075;
# that is not representable (it rounds to 0), so the floor uses the smallest subnormal, 2**-1074.
ETA = FLOAT64.smallest_subnormal
EXP_ULPS = 2.0  # relative error of np.exp, in units of u (glibc: < 1 ulp; see docs/oracle.md)
# relative error of np.tanh in units of u: numpy's own validation set (numpy/_core/tests/data/
# umath-validation-set-tanh.csv, numpy 2.4.6) holds float64 tanh to 2 ULP; we charge twice that, 4 ULP
# = 8 u (docs/oracle.md, "Kernel options", step K1)
TANH_ULPS = 8.0
LOG1P_ULPS = 2.0  # relative error of np.log1p in units of u (< 1 ulp, as the loss bound always assumed)
# the perturbation argument of the kernel options is first order: rows whose logits carry a larger
# absolute error than this (softcap c above ~1e9) get an infinite bound (docs/oracle.md, step K2)
MAX_PERTURBATION = 2.0**-20
SECOND_ORDER = 1.01  # allowance for second-order terms (docs/oracle.md, valid while K*u < 1e-3)


def gamma(n: np.ndarray | float, u: Any = U) -> Any:
    """Higham's gamma_n = n u / (1 - n u) for unit roundoff u; infinite once n u >= 1.

    The relative error bound of n roundings in a row, e.g. of a sum of n + 1 nonnegative terms in any
    order (Higham, Accuracy and Stability of Numerical Algorithms, Lemma 3.1). The one definition used
    by the oracle, the tolerance model and the estimators.
    """
    nu = n * u
    if np.ndim(nu) == 0:
        return nu / (1 - nu) if nu < 1 else math.inf
    return np.where(nu < 1, nu / (1 - np.minimum(nu, 0.5)), np.inf)


@dataclass(frozen=True)
class Working:
    """A working precision for the bounded evaluation (docs/oracle.md, "Working precision").

    Attributes:
        dtype: float64, or np.longdouble where it is x87 extended (64-bit significand).
        u: unit roundoff.
        eta: the smallest subnormal (twice the absolute error of an underflowing result).
        exp_ulps: the relative error of np.exp, in units of u.
        tanh_ulps: the relative error of np.tanh, in units of u.
    """

    dtype: np.dtype
    u: Any
    eta: Any
    exp_ulps: float
    tanh_ulps: float = TANH_ULPS


FLOAT64_WORK = Working(np.dtype(np.float64), U, ETA, EXP_ULPS)
# only x87 extended is analysed (docs/oracle.md); np.exp in it is charged 16 u, np.tanh (glibc tanhl) 32 u
EXTENDED_WORK = None if EXTENDED is None else Working(
    EXTENDED.dtype, np.longdouble(2) ** -64, np.longdouble(np.finfo(np.longdouble).smallest_subnormal), 16.0, 32.0)


class Bounded(NamedTuple):
    """A float64 result and a bound on its absolute error against the exact value, per element."""

    value: np.ndarray
    bound: np.ndarray


@dataclass(frozen=True)
class RowParts:
    """Per-row softmax quantities in float64 (see the module docstring)."""

    s: np.ndarray  # (N, K) z - max z, rounded (s_hi)
    s_lo: np.ndarray  # (N, K) its rounding error: s + s_lo == z - max z exactly
    e: np.ndarray  # (N, K) exp(z - max z)
    argmax: np.ndarray  # (N,)
    r: np.ndarray  # (N,) sum of e over the non-argmax classes
    z: np.ndarray  # (N,) 1 + r
    p: np.ndarray  # (N, K) softmax
    q: np.ndarray  # (N, K) 1 - p, accurate
    log_z: np.ndarray  # (N,) log1p(r)


def shifted_exp(z64: np.ndarray, argmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``s = z - max z`` split exactly as ``s_hi + s_lo`` (TwoSum), and ``e = exp(s_hi) (1 + s_lo)``.

    Rounding ``z - max z`` costs a relative error ``|s| u`` in ``exp(s)`` (up to ~700 u at large
    gaps); the compensation brings it down to ``EXP_ULPS + 2`` u (docs/oracle.md, step 2). Masked and
    overflowed entries (``s_hi = -inf``) get ``s_lo = 0`` and ``e = 0``.
    """
    rows = np.arange(z64.shape[0])
    return _shifted_exp(z64, z64[rows, argmax][:, None])


def _shifted_exp(z64: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`shifted_exp` with the row maxima ``m`` (shape ``(N, 1)``) given: for a column tile."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s_hi = np.subtract(z64, m)
        a = np.add(s_hi, m)  # TwoSum(z, -m) (Knuth): s_hi + s_lo == z - m exactly
        s_lo = np.subtract(z64, a)
        np.subtract(s_hi, a, out=a)
        np.subtract(-m, a, out=a)
        s_lo += a
        if not np.isfinite(np.subtract(z64.min(axis=1), m[:, 0])).all():
            s_lo[~np.isfinite(s_hi)] = 0.0  # masked (-inf) or overflowed shifts: e = 0 below
        e = np.exp(s_hi, out=a)
        e += np.multiply(e, s_lo)  # e (1 + s_lo): the product is tiny, so one rounding (the sum)
    return s_hi, s_lo, e


def row_parts(z: np.ndarray, work: Working = FLOAT64_WORK) -> RowParts:
    """Compute the softmax quantities of validated ``(N, K)`` logits (any supported dtype) in ``work``."""
    z64 = np.asarray(z, dtype=work.dtype)
    n = z64.shape[0]
    rows = np.arange(n)
    argmax = np.argmax(z64, axis=1)
    s_hi, s_lo, e = shifted_exp(z64, argmax)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        e_other = e.copy()
        e_other[rows, argmax] = 0.0
        r = e_other.sum(axis=1)
        total = 1.0 + r
        p = e / total[:, None]
        q = 1.0 - p
        q[rows, argmax] = r / total
        log_z = np.log1p(r)
    return RowParts(s_hi, s_lo, e, argmax, r, total, p, q, log_z)


def _row_error(parts: RowParts, work: Working = FLOAT64_WORK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative error bounds of R (rho), p (eps_p) and q (eps_q); docs/oracle.md, steps 1-5."""
    k = parts.s.shape[1]
    rows = np.arange(parts.s.shape[0])
    u = work.u
    zero = work.dtype.type(0)
    a = np.where(parts.e > 0, (work.exp_ulps + 2) * u, zero)  # exp and e + e s_lo (docs/oracle.md step 2)
    a[rows, parts.argmax] = 0  # exp(0) = 1 exactly
    rho = a.max(axis=1) + gamma(k, u)
    eps_z = rho + u
    eps_p = a + eps_z[:, None] + u
    eps_q = eps_p + u
    eps_q[rows, parts.argmax] = rho + eps_z + u
    return rho, eps_p, eps_q


def softmax(z: Any, axis: int = -1, *, dtype: Any = None, softcap: float | None = None) -> np.ndarray:
    """Softmax along ``axis``, stable for every finite input and for ``-inf`` (masked) entries.

    Args:
        z: float logits of any shape; NaN and +inf are rejected, -inf means probability 0.
        axis: the class axis.
        dtype: the result's dtype; the input's when None.
        softcap: c > 0: the softmax of ``c tanh(z / c)`` (docs/oracle.md, "Kernel options"); -inf
            then maps to -c, so it is not masked, and a slice of all -inf is valid.

    Returns:
        ``exp(z - max z) / sum exp(z - max z)``, correctly rounded from float64.

    >>> softmax(np.array([0.0, np.log(3.0), -np.inf]))
    array([0.25, 0.75, 0.  ])
    """
    arr, restore, c = _as_rows(z, axis, softcap)
    return _round(restore(row_parts(_capped(arr, c)).p), dtype, arr.dtype)


def log_softmax(z: Any, axis: int = -1, *, dtype: Any = None, softcap: float | None = None) -> np.ndarray:
    """``z - max z - log1p(sum of the other exp(z - max z))`` along ``axis``; -inf stays -inf.

    ``softcap`` as for :func:`softmax` (then computed on ``c tanh(z / c)``, and -inf maps to a finite value)."""
    arr, restore, c = _as_rows(z, axis, softcap)
    parts = row_parts(_capped(arr, c))
    with np.errstate(invalid="ignore"):
        out = (parts.s - parts.log_z[:, None]) + parts.s_lo
    return _round(restore(out), dtype, arr.dtype)


def cross_entropy(
    logits: Any,
    targets: Any,
    *,
    dtype: Any = None,
    **options: Any,
) -> np.ndarray:
    """The loss of ``torch.nn.functional.cross_entropy`` (see :mod:`gradcheck.problem`), with the kernel
    options of Liger-Kernel (``softcap``, ``lse_square_scale``; docs/oracle.md, "Kernel options").

    Args:
        logits, targets: as for :func:`gradcheck.make_problem`.
        dtype: the result's format (default: the logits' dtype).
        **options: the case options (``weight``, ``ignore_index``, ``reduction``,
            ``label_smoothing``, ``lse_square_scale``, ``softcap``; :data:`gradcheck.options.CASE`).
            ``grad_output`` is accepted and does not change the loss.

    Returns:
        A 0-d array (mean, sum) or the ``(N,)`` per-row losses (none), in ``dtype`` (default: the
        logits' dtype). +inf when a target has weight on a masked (-inf) class.

    >>> cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
    array(0.69314718)
    """
    problem = make_problem(logits, targets, copy=False, **options)
    return _round(loss_bounded(problem).value, dtype, problem.logits.dtype)


def cross_entropy_grad(
    logits: Any,
    targets: Any,
    *,
    dtype: Any = None,
    **options: Any,
) -> np.ndarray:
    """The gradient of :func:`cross_entropy` with respect to the logits, times ``grad_output``.

    ``dL/dz_ni = r_n g_n [(p_ni S_n - w_i t_ni) / D + 2 lambda lse_n p_ni / D_z] (1 - tanh^2(z_ni / c))``
    with p the softmax of the (softcapped) logits, ``S_n = sum_c w_c t_nc``, ``r_n`` 0 for ignored
    rows and ``g_n`` the upstream gradient (``grad_output``; ones when None). For ``reduction="none"``
    without ``grad_output`` that is the gradient of the sum of the row losses. Shape of the logits,
    ``dtype`` as for :func:`cross_entropy`.

    >>> cross_entropy_grad(np.array([[0.0, np.log(3.0)]]), np.array([1]))
    array([[ 0.25, -0.25]])
    """
    # the one-hot path checks the logits' values by the row maxima it computes (see _one_hot_grad)
    problem = make_problem(logits, targets, copy=False, check_values=False, **options)
    fmt = float_format(problem.logits.dtype if dtype is None else dtype)
    if _one_hot_applies(problem):  # rounded block by block when narrower: bit for bit the same
        return problem.restore_shape(_one_hot_grad(problem, fmt))
    check_logit_values(problem)
    g = grad_rows(problem)
    return _round(problem.restore_shape(g), dtype, problem.logits.dtype)


def cross_entropy_grad_bounded(logits: Any, targets: Any, **options: Any) -> Bounded:
    """The float64 gradient and a rigorous bound on its absolute error, per element.

    Options as for :func:`cross_entropy_grad` (without ``dtype``). The bound is derived in
    docs/oracle.md; the certified truth uses it to skip mpmath where it is conclusive.
    """
    problem = make_problem(logits, targets, copy=False, **options)
    value, bound = grad_bounded(problem)
    return Bounded(problem.restore_shape(value), problem.restore_shape(bound))


def cross_entropy_bounded(logits: Any, targets: Any, **options: Any) -> Bounded:
    """The float64 loss and a rigorous bound on its absolute error (docs/oracle.md)."""
    return loss_bounded(make_problem(logits, targets, copy=False, **options))


def softmax_jacobian(z: Any, *, dtype: Any = None, softcap: float | None = None) -> np.ndarray:
    """``d p_o / d z_i`` per row: ``diag(p) - p p^T``, shape ``(K, K)`` for a vector, ``(N, K, K)`` for a batch.

    The diagonal is computed as ``p_i q_i`` with the accurate ``q_i = 1 - p_i``. With ``softcap`` c,
    p is the softmax of ``z' = c tanh(z / c)`` and column i is multiplied by ``dz'_i / dz_i =
    1 - tanh^2(z_i / c)`` (docs/oracle.md, "Kernel options").
    """
    c = _softcap_value(softcap)
    arr = validate_logits(z, ndims=(1, 2), copy=False, all_masked_ok=c is not None)
    rows = arr[None, :] if arr.ndim == 1 else arr
    parts = row_parts(_capped(rows, c))
    jac = _jacobian(parts)
    if c is not None:
        jac = jac * _chain(rows, c)[:, None, :]
    return _round(jac[0] if arr.ndim == 1 else jac, dtype, arr.dtype)


def cross_entropy_hessian(
    logits: Any,
    targets: Any,
    *,
    dtype: Any = None,
    **options: Any,
) -> np.ndarray:
    """Second derivatives of :func:`cross_entropy` in the logits (of ``sum_n g_n l_n`` with ``grad_output``).

    The batch loss is a sum of row losses, so its Hessian is block diagonal across rows; this returns
    the blocks, shape ``(N, K, K)`` (``(K, K)`` for a vector). With ``J = diag(p) - p p^T`` of the
    softmax of ``z'`` (docs/oracle.md, "Kernel options", the Hessian):

        H_n = g_n [ diag(h) F_n diag(h) + diag(G'_n * z''_n) ],
        F_n = r_n [ (S_n / D) J + (2 lambda / D_z) (p p^T + lse_n J) ],

    where ``h = 1 - tanh^2(z / c)``, ``z'' = -2 z' h / c^2``, ``G'_n`` the gradient in ``z'`` (``h = 1``,
    ``z'' = 0`` without softcapping).
    """
    problem = make_problem(logits, targets, copy=False, **options)
    zc = capped_logits(problem)
    parts = row_parts(zc)
    scale = scale_of(problem)  # S / D without overflow (docs/oracle.md, step 10)
    b = _row_exponents(problem, 0, problem.n, FLOAT64_WORK) if scale.rows else None
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s = _weighted_targets(problem, 0, problem.n, 0, problem.k, FLOAT64_WORK, b).sum(axis=1) / scale.d
        if scale.active:
            s = np.ldexp(s, (0 if b is None else b) - scale.a)
        jac = _jacobian(parts)
        lam = problem.lse_square_scale
        if lam:
            live = problem.active_rows()
            lse = zc[np.arange(problem.n), parts.argmax] + parts.log_z
            k2 = np.where(live, 2 * lam / problem.zloss_divisor(), 0.0)
            hess = jac * (s + k2 * lse)[:, None, None] + k2[:, None, None] * (parts.p[:, :, None] * parts.p[:, None, :])
        else:
            hess = jac * s[:, None, None]
        if problem.softcap is not None:
            c = problem.softcap
            h = _chain(problem.logits, c)
            inner = dataclasses.replace(problem, logits=zc, softcap=None, grad_output=None)
            g_cap = grad_rows(inner)  # the gradient in z'
            hess = hess * h[:, :, None] * h[:, None, :]
            idx = np.arange(problem.k)
            hess[:, idx, idx] += g_cap * (-2.0 * zc * h / (c * c))
        if problem.grad_output is not None:
            hess = hess * problem.upstream()[:, None, None]
    return _round(problem.restore_shape(hess), dtype, problem.logits.dtype)


def _softcap_value(softcap: Any) -> float | None:
    """``softcap`` checked by its one rule (:data:`gradcheck.options.SOFTCAP`)."""
    from gradcheck.options import SOFTCAP

    return SOFTCAP.validate(softcap)


def _capped(z: np.ndarray, c: float | None) -> np.ndarray:
    """``c tanh(z / c)`` in float64 (``z`` itself when ``c`` is None), as :func:`_logits_tile` computes it."""
    if c is None:
        return z
    with np.errstate(over="ignore", under="ignore"):
        return c * np.tanh(np.asarray(z, dtype=np.float64) / c)


def _chain(z: np.ndarray, c: float) -> np.ndarray:
    """``1 - tanh^2(z / c)`` in float64, as :func:`_chain_tile` computes it (no cancellation)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        e = np.exp(-2 * np.abs(np.asarray(z, dtype=np.float64) / c))
        return 4 * e / ((1.0 + e) * (1.0 + e))


def grad_rows(problem: Problem) -> np.ndarray:
    """The float64 ``(N, K)`` gradient of a validated problem: ``grad_output`` times dL/dz (a VJP)."""
    if _one_hot_applies(problem):
        return _one_hot_grad(problem)
    return grad_bounded(problem, with_bound=False)[0]  # the general formula (and the options), in blocks


def _one_hot_applies(problem: Problem) -> bool:
    """Index targets, no smoothing, no softcap or z-loss, nothing near overflow: :func:`_one_hot_grad`."""
    return (problem.index_targets and not problem.label_smoothing and not kernel_options(problem)
            and not scale_of(problem).active)


def _one_hot_grad(problem: Problem, fmt: FloatFormat | None = None) -> np.ndarray:
    """Index targets without smoothing, in cache-sized row blocks, on :data:`THREADS` threads.

    ``g_i = e_i * (w_t / (D Z))`` for ``i != t`` and ``g_t = -w_t q_t / D``: the formulas of
    :func:`row_parts` and the general path, with fewer passes over memory. Each element sees at most
    3 roundings after exp (docs/oracle.md, "One-hot path"), fewer than the general path the bound of
    :func:`grad_bounded` is derived for. Rows are independent, so the result is bit-identical for any
    blocking and thread count.

    The blocks write ``e_c (w_t / (D Z))`` for every class and keep each row's argmax, ``R``, ``Z``
    and ``e_t``; the target elements are then written for all rows at once (a block's few-element
    operations cost more in numpy's per-call overhead than the block's arithmetic).

    It also checks the logits' values, so ``make_problem(..., check_values=False)`` may precede it: a
    row holds no NaN or +inf and a finite entry exactly when its maximum ``z[argmax]`` is finite
    (``np.argmax`` returns the first NaN where there is one, in every supported dtype), and a
    :func:`direct_rows` maximum is in ``[0, 64]``. A block with another row maximum is left for
    :func:`gradcheck.problem.check_logit_values`, which raises the error make_problem would have.

    With ``fmt`` (narrower than float64) each block's float64 values are rounded to ``fmt`` as they
    are written, so no float64 array of the whole input is made: the result is ``round_to_format`` of
    the float64 result, bit for bit (docs/oracle.md, "Cost: the float32 path").
    """
    n, k = problem.logits.shape
    active = problem.active_rows()
    factor = _one_hot_factor(problem, problem.divisor())
    up = None if problem.grad_output is None else problem.upstream()
    narrow = fmt is not None and fmt.precision < 53
    out = np.empty((n, k), dtype=fmt.dtype if narrow else np.float64)
    cast = narrow and fmt.name in ("float32", "float16")  # numpy's cast rounds once (dtypes.round_to_format)
    precision = problem.format.precision
    factor_ok = _direct_factor(factor)
    every_factor_ok = bool(factor_ok.all())
    argmax = np.empty(n, dtype=np.intp)  # per row, from the blocks: the argmax (first occurrence), R, Z, e_t
    r = np.empty(n)
    total = np.empty(n)
    e_t = np.empty(n)
    cls = np.where(active, problem.targets, 0)  # the target column (0 for ignored rows: read, never used)
    buffer = _row_buffer(k)
    blocks = ONE_HOT_BLOCK_FACTOR if precision == 53 else NARROW_BLOCK_FACTOR
    span = np.arange(min(n, _block_rows(k, blocks)))
    starts = span * k  # where each row of a block starts in the flat block

    invalid = []

    def block(lo: int, hi: int) -> None:
        zb = problem.logits[lo:hi]
        rows = span[:hi - lo]
        am = np.argmax(zb, axis=1, out=argmax[lo:hi])
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            m = zb[rows, am]
            direct = _direct_max(m, k)
            every = bool(direct.all())
            if not every and not np.isfinite(m).all():
                invalid.append(lo)  # NaN, +inf or a row of all -inf: check_logit_values raises below
                return None
            if not every_factor_ok:
                direct &= factor_ok[lo:hi]
                every = bool(direct.all())
            g = _exp_rows(zb, am, precision, direct, every)
            flat = np.reshape(g, -1, copy=False)  # a view (it raises rather than copy): g is C-contiguous
            at = np.add(starts[:hi - lo], am)
            e_m = flat[at]  # 1 where shifted; exp(m) where direct
            flat[at] = 0.0
            rb = np.add.reduce(g, axis=1, out=r[lo:hi])
            flat[at] = e_m
            zt = np.add(e_m, rb, out=total[lo:hi])
            e_t[lo:hi] = flat[np.add(starts[:hi - lo], cls[lo:hi], out=at)]
            f = (factor[lo:hi] / zt)[:, None]
            if buffer is not None:
                np.setbufsize(buffer)  # restored when the errstate ends
            if up is None and (cast or not narrow):  # straight into the result (rounded once when narrow)
                np.multiply(g, f, out=out[lo:hi])
                return None
            np.multiply(g, f, out=g)
            if up is not None:  # the upstream gradient: one product, as in grad_bounded (step K6)
                g *= up[lo:hi, None]
            out[lo:hi] = g if cast or not narrow else round_to_format(g, fmt)
        return None

    for_row_blocks(n, k, block, blocks)
    if invalid:
        check_logit_values(problem)
        raise AssertionError("a row maximum is not finite, yet the logits passed check_logit_values")
    live = np.flatnonzero(active)
    at = cls[live]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        z_t = total[live]
        q_t = np.where(at == argmax[live], r[live] / z_t, 1.0 - e_t[live] / z_t)
        g_t = -(factor[live] * q_t)
        if up is not None:
            g_t *= up[live]
    out[live, at] = g_t if cast or not narrow else round_to_format(g_t, fmt)
    return out


DIRECT_MAX = 64.0  # a row max in [0, DIRECT_MAX]: exp(z) unshifted (docs/oracle.md, "Direct rows")
DIRECT_MIN_FACTOR = 2.0**-896  # the one-hot row factor w_t / D at least this (or 0): Z <= 2**124 cannot underflow it


def direct_rows(m: np.ndarray, factor: np.ndarray | None = None, k: int = 1) -> np.ndarray:
    """Rows whose ``e_c = exp(z_c)`` needs no shift: row max ``m`` in ``[0, DIRECT_MAX]`` (and, with the
    one-hot row ``factor``, ``factor == 0`` or ``|factor| >= DIRECT_MIN_FACTOR``), for ``k < 2**31`` classes.

    Then ``1 <= Z = sum_c exp(z_c) <= K exp(64) < 2**124``: nothing overflows, an ``e_c`` that underflows
    also underflows shifted (``z_c < -708`` implies ``z_c - m < -708``) and its absolute error is at most
    ``eta / 2`` after the division by ``Z >= 1``, and ``exp`` of the exact input has relative error
    ``EXP_ULPS u``, below the shifted ``(EXP_ULPS + 2) u``, at the cost of ``EXP_ULPS u`` at the argmax
    (where ``exp(0) = 1`` was exact). docs/oracle.md, "Direct rows".
    """
    with np.errstate(invalid="ignore"):
        ok = _direct_max(m, k)
    if factor is not None:
        ok &= _direct_factor(factor)
    return ok


def _direct_max(m: np.ndarray, k: int) -> np.ndarray:
    """The row-max condition of :func:`direct_rows`: ``0 <= m <= DIRECT_MAX`` (False for NaN), ``k < 2**31``.

    Compared in ``m``'s own format: exact, since 0 and 64 are representable in every supported one."""
    m = np.asarray(m)
    if k >= 2**31:
        return np.zeros(m.shape, dtype=bool)
    return (m >= 0) & (m <= DIRECT_MAX)


def _direct_factor(factor: np.ndarray) -> np.ndarray:
    """The one-hot row-factor condition of :func:`direct_rows`: ``factor == 0`` or ``|factor| >= DIRECT_MIN_FACTOR``."""
    f = np.abs(factor)
    return (f == 0) | (f >= DIRECT_MIN_FACTOR)


def _exp_rows(zb: np.ndarray, argmax: np.ndarray, precision: int, direct: np.ndarray, every: bool) -> np.ndarray:
    """``e`` of a block of rows: ``exp(z)`` on the :func:`direct_rows` (all of them when ``every``),
    :func:`_exp_shifted` on the others.

    Each row's values depend on that row alone (bit for bit whatever the blocking). The result is
    C-contiguous, often one of this thread's scratch blocks, as for :func:`_exp_shifted`: the row sums
    that follow add in the order of a C row (numpy sums the rows of a Fortran-ordered block in
    another order, another rounding).
    """
    if every:
        s = _scratch(zb.shape)[0]
        with np.errstate(under="ignore"):
            return np.exp(zb, out=s, dtype=np.float64)
    e = np.ascontiguousarray(_exp_shifted(zb, argmax, precision))  # a copy only from strided float64 logits
    if direct.any():
        with np.errstate(under="ignore"):
            e[direct] = np.exp(np.asarray(zb[direct], dtype=np.float64))
    return e


def shifts_are_exact(big: float, small: float, precision: int) -> bool:
    """Every ``z - m`` of values of ``precision < 53`` whose largest magnitude is ``big`` and smallest
    nonzero one ``small`` (inf: none) is exact in float64: both are multiples of ``2**(e_min - p)`` and
    ``|z - m| < 2**(e_max + 1)``, so a span of at most ``52 - p`` binades suffices (docs/oracle.md, "Cost:
    the float32 path")."""
    return not np.isfinite(small) or int(np.frexp(big)[1]) - int(np.frexp(small)[1]) <= 52 - precision


def _exp_shifted(zb: np.ndarray, argmax: np.ndarray, precision: int) -> np.ndarray:
    """``e`` of :func:`shifted_exp` for a block of rows, bit for bit, with fewer passes and no allocation.

    The result is one of this thread's scratch blocks (valid until the thread's next call).

    * Inputs narrower than float64 whose nonzero magnitudes span at most ``52 - p`` binades: every
      ``z - m`` is exact in float64 (both are multiples of ``2**(e_min - p)`` and ``|z - m| <
      2**(e_max + 1)``), so ``s_lo = 0`` and the compensation ``e + e s_lo`` is the identity.
    * Otherwise TwoSum and the compensation, as :func:`_shifted_exp` computes them (the same
      operations, in place in scratch blocks: allocating each temporary cost more than the arithmetic).
    (docs/oracle.md, "Cost: the float32 path".)
    """
    rows = np.arange(zb.shape[0])
    s, a, b = _scratch(zb.shape)
    if precision < 53:
        np.copyto(s, zb)  # exact
        m = s[rows, argmax][:, None]
        big = max(abs(float(m.max())), abs(float(zb.min())))  # the largest magnitude (-inf: none)
        if np.isfinite(big):
            mag = np.abs(zb if precision == 24 else s, out=b if precision < 24 else None)
            small = float(mag.min())
            if small == 0:  # exact zeros shift exactly; the smallest nonzero magnitude decides
                mag[mag == 0] = np.inf
                small = float(mag.min())
            if shifts_are_exact(big, small, precision):
                np.subtract(s, m, out=s)
                return np.exp(s, out=s)
        return _shifted_exp(s.copy(), m)[2]
    m = zb[rows, argmax][:, None]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if not np.isfinite(np.subtract(zb.min(axis=1), m[:, 0])).all():
            return _shifted_exp(zb, m)[2]  # masked or overflowing shifts
        np.subtract(zb, m, out=s)  # TwoSum(z, -m), as in _shifted_exp
        np.add(s, m, out=a)
        np.subtract(s, a, out=b)
        np.subtract(zb, a, out=a)
        np.add(b, m, out=b)
        np.subtract(a, b, out=a)  # s_lo = (z - a) + (-m - (s - a))
        np.exp(s, out=s)
        np.multiply(s, a, out=a)
        s += a
    return s


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three float64 scratch blocks of ``shape`` for the calling thread (kept for the next block)."""
    cache = getattr(_SCRATCH, "blocks", None)
    if cache is None or cache[0].shape != shape:
        cache = tuple(np.empty(shape) for _ in range(3))
        _SCRATCH.blocks = cache
    return cache


def for_row_blocks(n: int, k: int, work: Any, factor: int = 1) -> None:
    """Call ``work(lo, hi)`` on row blocks of about ``factor`` times :data:`BLOCK_ELEMENTS` elements, threaded.

    numpy releases the GIL in its loops, so blocks run in parallel; a block of 64 Ki float64 values
    (512 KiB; 1 MiB for the one-hot path's scratch blocks, 2 MiB for narrower inputs: this machine's L2
    per core is 1 MiB) keeps the passes of the formulas in cache and is large enough that numpy's
    per-call overhead does not dominate.
    """
    step = _block_rows(k, factor)
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if len(bounds) == 1 or THREADS == 1:
        for lo, hi in bounds:
            work(lo, hi)
        return

    pending = iter(bounds)
    lock = threading.Lock()  # each block goes to exactly one thread (also without a GIL)

    def run() -> None:
        while True:
            with lock:
                block = next(pending, None)
            if block is None:
                return
            work(*block)

    # one task per thread, not one per block (that cost more in submission and GIL hand-offs than its
    # arithmetic: 64 blocks of (4096, 1024), 23 ms on 2 threads against 18 on 1); each task takes the
    # next block when it is done with one, so a thread slowed by the other's load or by the host does
    # not leave the other idle at the end (against two contiguous halves, on 2 threads, interleaved:
    # float32 (4096, 1024) median pair ratios 0.97, 0.97, 0.94, 0.78 in four runs of 120; float64 0.99)
    tasks = min(THREADS, len(bounds))
    for future in [_pool().submit(run) for _ in range(tasks)]:
        future.result()


def _block_rows(k: int, factor: int = 1) -> int:
    """Rows per block of :func:`for_row_blocks`: about ``factor`` times :data:`BLOCK_ELEMENTS` elements."""
    return max(1, factor * BLOCK_ELEMENTS // max(k, 1))


def _row_buffer(k: int) -> int | None:
    """numpy's ufunc buffer size (``np.setbufsize``, in elements) for the row-scaling product of rows of ``k``.

    numpy's buffered iterator cuts an ``(R, K)`` by ``(R, 1)`` product into chunks of the buffer size
    (8192 elements); a chunk that spans several rows has to copy the broadcast factor into a buffer
    first, which doubled the cost of the product for ``K = 1024``. A buffer of one row (rounded up to
    numpy's multiple of 16) avoids it; rows of 8192 or more, or very short ones, keep the buffer as
    it is (None). The product is elementwise, so its bits do not depend on the chunking.
    """
    return None if k < 256 or k >= 8192 else -(-k // 16) * 16


BLOCK_ELEMENTS = 1 << 16
# the one-hot path keeps one scratch block, not the bounded path's ~25 temporaries, so its blocks are twice
# as large (interleaved medians on (4096, 1024): 20.4 -> 14.3 ms float64, 13.7 -> 9.9 float32, rows
# evaluated shifted 27.3 -> 22.1 and 17.4 -> 12.9); the bounded path's memory stays a few blocks
ONE_HOT_BLOCK_FACTOR = 2
# inputs narrower than float64 (their shifts are mostly certified exact: one or two scratch blocks, not
# TwoSum's three) take blocks twice as large again; on (4096, 1024), interleaved on two threads, float32
# median 11.8 -> 10.0 and 13.3 -> 12.4 ms (two runs of 120), rows evaluated shifted 12.6 -> 10.4;
# float64 inputs stay at 2: direct rows 13.0 -> 13.1, shifted (TwoSum) 22.8 -> 27.6
NARROW_BLOCK_FACTOR = 4
THREADS = min(8, os.cpu_count() or 1)
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(THREADS, thread_name_prefix="gradcheck"))
    return _POOL[0]


def divisor_terms(problem: Problem) -> int:
    """Roundings in D: none when it is a count (no weights, or probability targets), else N - 1."""
    if problem.reduction != "mean" or problem.weight is None or not problem.index_targets:
        return 0
    return max(0, int(problem.active_rows().sum()) - 1)


@dataclass(frozen=True)
class Scale:
    """Exact power-of-two rescaling that keeps the evaluation finite (docs/oracle.md, step 10).

    Attributes:
        a: the divisor is evaluated as ``D' = sum_n w_{y_n} 2**-a`` (``a = 0``: unscaled).
        d: ``D'`` in the working precision.
        d_rel: the relative error of ``D'`` (roundings of the sum, plus the underflow of its terms).
        rows: the weighted targets of row n are evaluated as ``w_c t_nc 2**-b_n`` (per row ``b_n``).
    """

    a: int
    d: Any
    d_rel: Any
    rows: bool

    @property
    def active(self) -> bool:
        return self.a != 0 or self.rows


def scale_of(problem: Problem, work: Working = FLOAT64_WORK) -> Scale:
    """The rescaling ``problem`` needs in ``work`` so that no product, sum or divisor overflows.

    None is needed (and the evaluation is the unscaled one, bit for bit) unless the weights or the
    probability targets come within a factor of ``K`` (``N`` for the divisor) of the overflow
    threshold; x87 extended precision never needs it for float64 inputs.
    """
    limit = np.finfo(work.dtype).maxexp - 4  # headroom for the few sums of terms of size S in the bound
    u = work.u
    w = problem.weight
    w_exp = 1 if w is None else int(np.frexp(np.abs(w).max())[1])
    t_max = float(problem.targets.max()) if not problem.index_targets and problem.targets.size else 1.0
    rows = w_exp + int(np.frexp(max(t_max, 1.0))[1]) + problem.k.bit_length() > limit
    terms = divisor_terms(problem)
    if problem.reduction == "mean" and problem.index_targets and problem.weight is not None:
        active = problem.targets[problem.active_rows()]
        wa = w[active]
        signed = bool((wa < 0).any())
        big = int(np.frexp(np.abs(wa).max())[1])
        if big + active.size.bit_length() > limit:
            with np.errstate(under="ignore"):
                scaled = np.ldexp(wa, -big).astype(work.dtype)
                d = work.dtype.type(np.sum(scaled))
            # each of the terms loses at most eta / 2 to underflow and D' >= 1/2 (w >= 0); with negative
            # weights the sum's error is relative to sum |w'| (docs/oracle.md, step 8)
            if not signed:
                return Scale(big, d, gamma(terms, u) + active.size * work.eta * 2, rows)
            abs_sum = work.dtype.type(np.sum(np.abs(scaled)))
            return Scale(big, d, _signed_rel(terms, u, abs_sum, d, active.size * work.eta), rows)
        if signed:
            d = _divisor(problem, work.dtype)
            abs_sum = work.dtype.type(np.sum(np.abs(wa).astype(work.dtype)))
            return Scale(0, d, _signed_rel(terms, u, abs_sum, d, active.size * work.eta), rows)
    return Scale(0, _divisor(problem, work.dtype), gamma(terms, u), rows)


def _signed_rel(terms: int, u: Any, abs_sum: Any, d: Any, under: Any) -> Any:
    """Relative error of a divisor summed from weights of both signs: ``(gamma sum |w| + underflow) / |D|``."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        rel = (gamma(terms, u) * abs_sum * (1 + 2 * gamma(terms, u)) + under) / abs(d)
    return rel if np.isfinite(rel) else np.inf


def _dense_tile(problem: Problem, lo: int, hi: int, c0: int, c1: int, dtype: Any) -> np.ndarray:
    """``problem.dense_targets(dtype)[lo:hi, c0:c1]`` for the tile alone, by the same operations."""
    if problem.index_targets:
        t = np.zeros((hi - lo, c1 - c0), dtype=dtype)
        cls = problem.targets[lo:hi]
        active = cls != problem.ignore_index
        inside = np.flatnonzero(active & (cls >= c0) & (cls < c1))
        t[inside, cls[inside] - c0] = 1
    else:
        t = np.array(problem.targets[lo:hi, c0:c1], dtype=dtype)
        active = np.ones(hi - lo, dtype=bool)
    if problem.label_smoothing:
        one, eps = np.dtype(dtype).type(1), np.dtype(dtype).type(problem.label_smoothing)
        t = (one - eps) * t + eps / problem.k
        t[~active] = 0.0
    return t


def _weighted_targets(problem: Problem, lo: int, hi: int, c0: int, c1: int, work: Working,
                      b: np.ndarray | None) -> np.ndarray:
    """``w_c t_nc`` on a tile; with per-row exponents ``b`` as ``fl(m_w m_t) 2**(e_w + e_t - b_n)``.

    The mantissa product (both in [1/2, 1)) is one rounding and never under- or overflows; the
    power of two is exact unless the result is subnormal (then at most eta / 2 absolute, as for an
    unscaled product that underflows): docs/oracle.md, step 10.
    """
    t = _dense_tile(problem, lo, hi, c0, c1, work.dtype)
    w = _weight_tile(problem, c0, c1, work.dtype)
    if b is None:
        return t * w
    mt, et = np.frexp(t)
    mw, ew = np.frexp(w)
    with np.errstate(under="ignore"):
        return np.ldexp(mt * mw, et + ew - b[:, None])


def _row_exponents(problem: Problem, lo: int, hi: int, work: Working) -> np.ndarray:
    """``b_n``: the largest ``e_w + e_t`` over the nonzero products of each row (0 for none)."""
    b = np.full(hi - lo, np.iinfo(np.int32).min, dtype=np.int64)
    for c0, c1 in _columns(problem.k):
        w_m, w_e = np.frexp(_weight_tile(problem, c0, c1, work.dtype))
        mt, et = np.frexp(_dense_tile(problem, lo, hi, c0, c1, work.dtype))
        live = (mt != 0) & (w_m != 0)
        b = np.maximum(b, np.where(live, et + w_e, b[:, None]).max(axis=1))
    return np.where(b == np.iinfo(np.int32).min, 0, b)


def _weight_tile(problem: Problem, c0: int, c1: int, dtype: Any) -> np.ndarray:
    """``problem.weights()[c0:c1]`` in ``dtype``, without a K-sized array of ones for no weights."""
    if problem.weight is None:
        return np.ones(c1 - c0, dtype=dtype)
    return problem.weight[c0:c1].astype(dtype)


def _divisor(problem: Problem, dtype: Any) -> Any:
    """``problem.divisor(dtype)``, the same value, without a K-sized array of ones for no weights."""
    if problem.weight is None and problem.reduction == "mean" and problem.index_targets:
        return np.dtype(dtype).type(np.count_nonzero(problem.active_rows()))  # a count: exact
    return problem.divisor(dtype)


def _columns(k: int) -> list[tuple[int, int]]:
    """Column tiles: the whole row up to :data:`COLUMN_BLOCK` classes, else tiles of that size."""
    return [(c0, min(c0 + COLUMN_BLOCK, k)) for c0 in range(0, k, COLUMN_BLOCK)]


COLUMN_BLOCK = 1 << 18  # longer rows are evaluated in two passes over column tiles (2 MiB each)


def grad_bounded(problem: Problem, work: Working = FLOAT64_WORK, *, with_bound: bool = True) -> tuple[np.ndarray, Any]:
    """``(N, K)`` gradient in ``work`` precision and its running error bound (docs/oracle.md, steps 1-10, K1-K6).

    With the default float64 the value is :func:`grad_rows`'s; with :data:`EXTENDED_WORK` it is the
    general formula evaluated in x87 extended precision, and both arrays are ``np.longdouble``.
    Evaluated in row blocks and, for rows longer than :data:`COLUMN_BLOCK`, column tiles with two
    passes (row max and sums, then the elements): the extra memory is a few blocks beyond the two
    results. Where the value is not finite the bound is inf. The kernel options (softcap, z-loss) and
    the upstream gradient are part of the value and of the bound. ``with_bound=False`` returns
    ``(value, None)``: the same operations for the value, bit for bit, without the bound's.
    """
    n, k = problem.logits.shape
    scale = scale_of(problem, work)
    # the one-hot formulas also for the CE part under softcap / z-loss (their terms are added after, K4-K6)
    one_hot = work is FLOAT64_WORK and problem.index_targets and not problem.label_smoothing and not scale.active
    factor = None
    if one_hot:
        factor = _one_hot_factor(problem, scale.d)
    g_out = np.empty((n, k), dtype=work.dtype)
    b_out = np.empty((n, k), dtype=work.dtype) if with_bound else None

    def block(lo: int, hi: int) -> None:
        _bounded_block(problem, work, scale, factor, lo, hi, g_out, b_out)

    for_row_blocks(n, k, block)
    return g_out, b_out


def kernel_options(problem: Problem) -> bool:
    """True when softcapping or the z-loss act (then the one-hot shortcut does not apply)."""
    return problem.softcap is not None or bool(problem.lse_square_scale)


def _one_hot_factor(problem: Problem, d: Any) -> np.ndarray:
    """``w_{y_n} / D`` per row (0 for ignored rows): the row factor of the one-hot path."""
    active = problem.active_rows()
    wt_t = np.zeros(problem.n)
    wt_t[active] = 1.0 if problem.weight is None else problem.weight[problem.targets[active]]
    return wt_t / d


def capped_logits(problem: Problem, work: Working = FLOAT64_WORK) -> np.ndarray:
    """The logits the softmax sees, in ``work``: ``z``, or ``z' = c tanh(z / c)`` under softcapping."""
    return _logits_tile(problem, 0, problem.n, 0, problem.k, work)


def _logits_tile(problem: Problem, lo: int, hi: int, c0: int, c1: int, work: Working) -> np.ndarray:
    """``z'`` on a tile: ``fl(c fl(tanh(fl(z / c))))`` (docs/oracle.md, step K1); ``-inf`` becomes ``-c``."""
    z = np.asarray(problem.logits[lo:hi, c0:c1], dtype=work.dtype)
    if problem.softcap is None:
        return z
    c = work.dtype.type(problem.softcap)
    with np.errstate(over="ignore", under="ignore"):
        return c * np.tanh(z / c)


def _chain_tile(problem: Problem, lo: int, hi: int, c0: int, c1: int, work: Working) -> tuple[np.ndarray, np.ndarray]:
    """``h = 1 - tanh^2(z / c)`` as ``4 e / (1 + e)^2``, ``e = exp(-2 |z / c|)``, and its relative error
    bound (docs/oracle.md, step K4): no cancellation when ``|z| >> c``, where ``1 - tanh^2`` would be 0."""
    z = np.asarray(problem.logits[lo:hi, c0:c1], dtype=work.dtype)
    c = work.dtype.type(problem.softcap)
    one = work.dtype.type(1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        x = np.abs(z / c)
        e = np.exp(-2 * x)
        ope = one + e
        h = 4 * e / (ope * ope)
        rel = np.where(h > 0, 2 * work.u * x + (work.exp_ulps + 5) * work.u, 0 * work.u)
    return h, rel


def _bounded_block(problem: Problem, work: Working, scale: Scale, factor: np.ndarray | None,
                   lo: int, hi: int, g_out: np.ndarray, b_out: np.ndarray) -> None:
    """Rows ``lo:hi`` of :func:`grad_bounded`: pass 1 the row max, R and S; pass 2 each element."""
    k = problem.k
    u = work.u
    zero = work.dtype.type(0)
    one = work.dtype.type(1)
    rows = np.arange(hi - lo)
    tiles = _columns(k)
    b = _row_exponents(problem, lo, hi, work) if scale.rows else None
    capped = problem.softcap is not None
    signed = problem.weight is not None and bool((problem.weight < 0).any())
    # pass 1: max and argmax (first occurrence) of z (z' under softcapping), and max |z'|
    m = np.full(hi - lo, -np.inf, dtype=work.dtype)
    argmax = np.zeros(hi - lo, dtype=np.int64)
    big = np.zeros(hi - lo, dtype=work.dtype)
    first = None  # the one tile's z' when the row is one tile (softcapping: tanh once per element)
    for c0, c1 in tiles:
        zc = _logits_tile(problem, lo, hi, c0, c1, work)
        first = zc if len(tiles) == 1 else None
        am = np.argmax(zc, axis=1)
        mx = zc[rows, am]
        better = mx > m
        m, argmax = np.where(better, mx, m), np.where(better, am + c0, argmax)
        if capped:
            big = np.maximum(big, np.abs(zc).max(axis=1))
    # rows evaluated unshifted, e_c = exp(z_c) (docs/oracle.md, "Direct rows"): plain cross-entropy only
    direct = (direct_rows(m, None if factor is None else factor[lo:hi], k)
              if work is FLOAT64_WORK and not kernel_options(problem) else np.zeros(hi - lo, dtype=bool))
    e_m = np.ones(hi - lo, dtype=work.dtype)  # e at the argmax: 1 shifted, exp(m) direct
    m = m[:, None]
    # then R = sum_{c != argmax} e_c, any e_c > 0 there, S and A = sum |w_c t_c| (= S for w >= 0)
    r = np.zeros(hi - lo, dtype=work.dtype)
    s = np.zeros(hi - lo, dtype=work.dtype)
    a_sum = np.zeros(hi - lo, dtype=work.dtype) if signed else s
    positive = np.zeros(hi - lo, dtype=bool)
    cached = None
    for c0, c1 in tiles:
        zc = _logits_tile(problem, lo, hi, c0, c1, work) if first is None else first
        e = _tile_exp(zc, m, direct)
        here = np.flatnonzero((argmax >= c0) & (argmax < c1))
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            e_m[here] = e[here, argmax[here] - c0]
            e_other = e.copy()
            e_other[here, argmax[here] - c0] = 0.0
            r += e_other.sum(axis=1)
            positive |= (e_other > 0).any(axis=1)
            wt = _weighted_targets(problem, lo, hi, c0, c1, work, b)
            s += wt.sum(axis=1)
            if signed:
                a_sum += np.abs(wt).sum(axis=1)
        cached = (e, wt) if len(tiles) == 1 else None
    a_max = np.where(positive, (work.exp_ulps + 2) * u, zero)
    rho = a_max + gamma(k, u)
    a_m = np.where(direct, work.exp_ulps * u, zero)  # exp(m) at the argmax of a direct row, else exp(0) = 1
    eps_z = np.maximum(rho, a_m) + u
    eps_wt = (4 * u if problem.label_smoothing else 0 * u) + u
    d = scale.d
    d_abs = abs(d)
    s = s[:, None]
    a_col = a_sum[:, None]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        total = e_m + r
        opts = _row_options(problem, work, lo, hi, m[:, 0], r, rho, big)
        for c0, c1 in tiles:
            if cached is None:
                zc = _logits_tile(problem, lo, hi, c0, c1, work)
                e = _tile_exp(zc, m, direct)
                wt = _weighted_targets(problem, lo, hi, c0, c1, work, b)
            else:
                e, wt = cached
            here = np.flatnonzero((argmax >= c0) & (argmax < c1))
            at = argmax[here] - c0
            # step 4-5: p, q (R / Z at the argmax), and their relative errors
            p = e / total[:, None]
            q = 1.0 - p
            q[here, at] = r[here] / total[here]
            if b_out is not None:
                a = np.where(e > 0, (work.exp_ulps + 2) * u, zero)
                a[here, at] = a_m[here]
                eps_p = a + eps_z[:, None] + u
                eps_q = eps_p + u
                eps_q[here, at] = (rho + eps_z + u)[here]
            if capped and b_out is not None:  # step K2: the computed z' is a perturbation of the exact one
                eps_p = eps_p + 2 * opts.zeta[:, None]
                eps_q = eps_q + 2 * opts.zeta[:, None]
            s_minus = s - wt if signed else np.maximum(s - wt, 0)
            if factor is not None:
                g = _one_hot_tile(problem, lo, hi, c0, c1, e, r, total, argmax, factor)
            elif work is FLOAT64_WORK:
                g = (p * (s - wt) - wt * q) / d
            else:
                g = (p * s_minus - wt * q) / d
            if b_out is None:  # the value alone (grad_rows): the same operations, no bound
                if scale.active:
                    shift = (np.zeros(hi - lo, dtype=np.int64) if b is None else b) - scale.a
                    g = np.ldexp(g, shift[:, None])
                if opts.active:
                    g, _ = _with_options(problem, work, opts, lo, hi, c0, c1, g, None, p, None)
                g_out[lo:hi, c0:c1] = g
                continue
            # steps 7-9, with |w t| (weights may be negative)
            wt_abs = np.abs(wt) if signed else wt
            sm_abs = np.abs(s_minus) if signed else s_minus
            d_s_minus = (gamma(k, u) + eps_wt) * a_col + eps_wt * wt_abs + u * sm_abs
            d_t1 = p * d_s_minus + sm_abs * p * eps_p + u * p * sm_abs
            d_t2 = (eps_wt + eps_q + u) * wt_abs * q
            t_sum = p * sm_abs + wt_abs * q
            d_g0 = d_t1 + d_t2 + u * t_sum
            bound = d_g0 / d_abs + np.abs(g) * (scale.d_rel + 2 * u)
            floor = (k + 8) * work.eta * np.maximum(one, a_col) * max(one, one / d_abs)
            bound = SECOND_ORDER * bound + floor
            if scale.active:  # step 10: back from the scaled domain, exactly but for under/overflow
                shift = (np.zeros(hi - lo, dtype=np.int64) if b is None else b) - scale.a
                g = np.ldexp(g, shift[:, None])
                bound = np.ldexp(bound, shift[:, None]) + 2 * work.eta
            if opts.active:
                g, bound = _with_options(problem, work, opts, lo, hi, c0, c1, g, bound, p, eps_p)
            if scale.d_rel > MAX_PERTURBATION:  # D after cancellation (negative weights): no first-order bound
                bound[...] = np.inf
            bound[~np.isfinite(g) | np.isnan(bound)] = np.inf
            g_out[lo:hi, c0:c1] = g
            b_out[lo:hi, c0:c1] = bound


@dataclass(frozen=True)
class RowOptions:
    """Per-row quantities of the kernel options and the upstream gradient (docs/oracle.md, K2-K6).

    Attributes:
        active: any of softcap, z-loss or grad_output is set.
        zeta: (rows,) bound on the absolute error of every computed ``z'`` of the row (0 without softcap).
        coef: (rows,) ``2 lambda lse / D_z`` (0 for ignored rows and without z-loss).
        d_coef: (rows,) bound on its absolute error.
        up: (rows, 1) the upstream gradient, or None.
    """

    active: bool
    zeta: Any
    coef: Any
    d_coef: Any
    up: Any


def _tile_exp(zc: np.ndarray, m: np.ndarray, direct: np.ndarray) -> np.ndarray:
    """``e`` on a column tile of :func:`_bounded_block`: ``exp(z)`` on direct rows, shifted on the others."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if direct.all():
            return np.exp(zc)
        e = _shifted_exp(zc, m)[2]
        if direct.any():
            e[direct] = np.exp(zc[direct])
    return e


def _row_options(problem: Problem, work: Working, lo: int, hi: int, m: np.ndarray, r: np.ndarray,
                 rho: np.ndarray, big: np.ndarray) -> RowOptions:
    """The per-row factors of the options (docs/oracle.md, steps K2, K3 and K6)."""
    u = work.u
    zeta = 0 * u
    if problem.softcap is not None:  # step K2
        c = work.dtype.type(problem.softcap)
        zeta = (work.tanh_ulps + 2) * u * big + 2 * c * work.eta
        zeta = np.where(zeta <= MAX_PERTURBATION, zeta, np.inf)
    coef = d_coef = zero = np.zeros(hi - lo, dtype=work.dtype)
    lam = problem.lse_square_scale
    if lam:  # step K3: lse = m + log1p(R), coef = (2 lambda lse) / D_z
        with np.errstate(over="ignore", invalid="ignore"):
            log_z = np.log1p(r)
            lse = m + log_z
            d_lse = zeta + (rho + LOG1P_ULPS * u) * log_z + u * np.abs(lse)
            two_lam = work.dtype.type(2 * lam)
            dz = work.dtype.type(problem.zloss_divisor())  # a row count: exact
            live = problem.active_rows()[lo:hi]
            coef = np.where(live, two_lam * lse / dz, zero)
            d_coef = np.where(live, two_lam * d_lse / dz + 2 * u * np.abs(coef), zero)
    up = None if problem.grad_output is None else problem.upstream()[lo:hi].astype(work.dtype)[:, None]
    active = problem.softcap is not None or bool(lam) or up is not None
    return RowOptions(active, np.broadcast_to(zeta, (hi - lo,)), coef, d_coef, up)


def _with_options(problem: Problem, work: Working, opts: RowOptions, lo: int, hi: int, c0: int, c1: int,
                  g: np.ndarray, bound: np.ndarray, p: np.ndarray, eps_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add the z-loss term, multiply by the upstream gradient and by the chain factor (steps K5-K6).

    ``g`` and ``bound`` are the cross-entropy part in the true (unscaled) domain."""
    u = work.u
    eta = work.eta
    k = problem.k
    value_only = bound is None
    if problem.lse_square_scale:  # step K5: g' = g_ce + p coef
        coef = opts.coef[:, None]
        t3 = p * coef
        g_new = g + t3
        if not value_only:
            d_t3 = np.abs(coef) * p * eps_p + p * opts.d_coef[:, None] + u * np.abs(t3)
            bound = bound + SECOND_ORDER * (d_t3 + u * (np.abs(g) + np.abs(t3))) + (k + 8) * eta * np.abs(coef) + 2 * eta
        g = g_new
    if opts.up is not None:  # step K6: times the upstream gradient, one rounding
        g = g * opts.up
        if not value_only:
            bound = np.abs(opts.up) * bound + SECOND_ORDER * u * np.abs(g) + eta
    if problem.softcap is not None:  # step K4: times the chain factor h
        h, h_rel = _chain_tile(problem, lo, hi, c0, c1, work)
        g_h = g * h
        if not value_only:
            bound = h * bound + SECOND_ORDER * (np.abs(g) * h * h_rel + u * np.abs(g_h)) + 8 * eta * np.abs(g) + eta
        g = g_h
    return g, bound


def _one_hot_tile(problem: Problem, lo: int, hi: int, c0: int, c1: int, e: np.ndarray, r: np.ndarray,
                  total: np.ndarray, argmax: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """:func:`_one_hot_grad`'s formulas on a column tile (bit-identical for whole rows)."""
    g = np.multiply(e, (factor[lo:hi] / total)[:, None])
    cls = problem.targets[lo:hi]
    live = np.flatnonzero((cls != problem.ignore_index) & (cls >= c0) & (cls < c1))
    at = cls[live]
    e_t = e[live, at - c0]
    q_t = np.where(at == argmax[live], r[live] / total[live], 1.0 - e_t / total[live])
    g[live, at - c0] = -(factor[lo:hi][live] * q_t)
    return g


def loss_bounded(problem: Problem) -> Bounded:
    """Float64 loss (0-d for mean/sum, ``(N,)`` for none) and its running error bound.

    Rows whose weighted targets come near overflow are evaluated rescaled by ``2**-b_n`` and the
    divisor by ``2**-a`` (docs/oracle.md, step 10); the row losses are brought to a common scale
    before they are summed. Under softcapping everything is computed on ``z'``; the z-loss
    ``lambda lse^2`` of each counted row is added in the true domain (docs/oracle.md, step K7).
    """
    zc = capped_logits(problem)
    parts = row_parts(zc)
    n, k = problem.logits.shape
    rho, _, _ = _row_error(parts)
    scale = scale_of(problem)
    signed = problem.weight is not None and bool((problem.weight < 0).any())
    b = _row_exponents(problem, 0, n, FLOAT64_WORK) if scale.rows else None
    wt = _weighted_targets(problem, 0, n, 0, k, FLOAT64_WORK, b)
    s = wt.sum(axis=1)
    zeta = _loss_zeta(problem, zc)
    with np.errstate(invalid="ignore", under="ignore", over="ignore"):
        # wt_c * (-s_c), with 0 where wt_c = 0 (also on masked classes, where -s_c = +inf)
        shifted = np.where(wt != 0, wt * -(parts.s + parts.s_lo), 0.0)
        row_loss = s * parts.log_z + shifted.sum(axis=1)
        row_abs = np.abs(s) * parts.log_z + np.abs(shifted).sum(axis=1) if signed else row_loss
        a_sum = np.abs(wt).sum(axis=1) if signed else s
        eps_wt = (4 * U if problem.label_smoothing else 0.0) + U
        eps_row = np.maximum(eps_wt + rho + 4 * U, eps_wt + 2 * U + gamma(k)) + U
        row_bound = eps_row * row_abs + (k + 4) * ETA * np.maximum(a_sum, 1.0)
        if problem.softcap is not None:  # step K7: |S d lse| + sum |w t dz'| <= 2 A zeta
            row_bound = row_bound + np.where(a_sum != 0, 2 * a_sum * zeta, 0.0)
    if scale.active:
        ce = _scaled_loss(problem, scale, np.zeros(n, dtype=np.int64) if b is None else b, row_loss, row_bound)
    elif problem.reduction == "none":
        ce = Bounded(problem.restore_shape(row_loss), problem.restore_shape(SECOND_ORDER * row_bound))
    else:
        d = problem.divisor()
        with np.errstate(invalid="ignore", under="ignore"):
            total = np.sum(row_loss) / d
            mass = np.sum(np.abs(row_loss)) if signed else np.sum(row_loss)
            bound = (np.sum(row_bound) + gamma(n) * mass) / abs(d) + (scale.d_rel + 2 * U) * abs(total)
        ce = Bounded(np.array(total), np.array(SECOND_ORDER * bound + ETA))
    if scale.d_rel > MAX_PERTURBATION:
        ce = Bounded(ce.value, np.full_like(ce.bound, np.inf))
    if not problem.lse_square_scale:
        return ce
    return _with_zloss(problem, ce, parts, zc, rho, zeta)


def _loss_zeta(problem: Problem, zc: np.ndarray) -> Any:
    """``zeta_n`` of step K2 per row (0 without softcapping), inf past :data:`MAX_PERTURBATION`."""
    if problem.softcap is None:
        return np.zeros(problem.n)
    zeta = (TANH_ULPS + 2) * U * np.abs(zc).max(axis=1) + 2 * problem.softcap * ETA
    return np.where(zeta <= MAX_PERTURBATION, zeta, np.inf)


def _with_zloss(problem: Problem, ce: Bounded, parts: RowParts, zc: np.ndarray, rho: np.ndarray,
                zeta: np.ndarray) -> Bounded:
    """The loss plus ``lambda lse_n^2`` of every counted row, divided by D_z under "mean" (step K7)."""
    lam = problem.lse_square_scale
    live = problem.active_rows()
    rows = np.arange(problem.n)
    with np.errstate(invalid="ignore", under="ignore", over="ignore"):
        lse = zc[rows, parts.argmax] + parts.log_z
        d_lse = zeta + (rho + LOG1P_ULPS * U) * parts.log_z + U * np.abs(lse)
        zl = np.where(live, lam * (lse * lse), 0.0)
        d_zl = np.where(live, lam * (2 * np.abs(lse) * d_lse + d_lse * d_lse) + 2 * U * zl + ETA, 0.0)
        value = np.asarray(ce.value, dtype=np.float64)
        if problem.reduction == "none":
            zl_r, d_zl_r = problem.restore_shape(zl), problem.restore_shape(d_zl)
            total = value + zl_r
            bound = ce.bound + SECOND_ORDER * (d_zl_r + U * (np.abs(value) + zl_r)) + ETA
        else:
            dz = problem.zloss_divisor()  # a row count: exact
            z_total = np.sum(zl) / dz
            z_bound = (np.sum(d_zl) + gamma(problem.n) * np.sum(zl)) / dz + U * z_total
            total = np.array(value + z_total)
            bound = np.array(ce.bound + SECOND_ORDER * (z_bound + U * (abs(value) + z_total)) + ETA)
        bound = np.where(np.isfinite(total) & ~np.isnan(bound), bound, np.inf)
    return Bounded(total, bound)


def _scaled_loss(problem: Problem, scale: Scale, b: np.ndarray, row_loss: np.ndarray, row_bound: np.ndarray) -> Bounded:
    """The loss from row losses ``row_loss_n 2**-b_n`` and a divisor ``D 2**-a`` (docs/oracle.md, step 10)."""
    n = problem.n
    with np.errstate(invalid="ignore", under="ignore", over="ignore"):
        if problem.reduction == "none":
            value = np.ldexp(row_loss, b)
            bound = np.ldexp(SECOND_ORDER * row_bound, b) + 2 * ETA
        else:
            top = int(b.max())
            # to the common scale 2**top: exact but for underflow, at most eta / 2 per row
            rl, rb = np.ldexp(row_loss, b - top), np.ldexp(row_bound, b - top)
            total = np.sum(rl) / scale.d
            inner = (np.sum(rb) + n * ETA + gamma(n) * np.sum(rl)) / scale.d + (scale.d_rel + 2 * U) * abs(total)
            value = np.array(np.ldexp(total, top - scale.a))
            bound = np.array(np.ldexp(SECOND_ORDER * inner + ETA, top - scale.a) + 2 * ETA)
        bound = np.where(np.isfinite(value), bound, np.inf)
    return Bounded(problem.restore_shape(value), problem.restore_shape(bound))


def _jacobian(parts: RowParts) -> np.ndarray:
    p = parts.p
    with np.errstate(under="ignore"):
        jac = -p[:, :, None] * p[:, None, :]
        idx = np.arange(p.shape[1])
        jac[:, idx, idx] = p * parts.q
    return jac


def _as_rows(z: Any, axis: int, softcap: Any = None) -> tuple[np.ndarray, Any, float | None]:
    """Validate logits of any shape (and ``softcap``) and move ``axis`` last, flattened to rows; returns
    the undo and the softcap."""
    c = _softcap_value(softcap)
    arr = validate_logits(z, ndims=None, axis=axis, copy=False, all_masked_ok=c is not None)
    moved = np.moveaxis(arr, axis, -1)
    shape = moved.shape

    def restore(x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x.reshape(shape), -1, axis)

    return moved.reshape(-1, shape[-1]), restore, c


def _round(x: np.ndarray, dtype: Any, default: np.dtype) -> np.ndarray:
    fmt = float_format(default if dtype is None else dtype)
    return round_to_format(np.asarray(x, dtype=np.float64), fmt)
