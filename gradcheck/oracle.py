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

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gradcheck.dtypes import EXTENDED, FLOAT64, float_format, round_to_format
from gradcheck.problem import Problem, make_problem, validate_logits

U = FLOAT64.unit_roundoff  # 2**-53
# The absolute error of a result that underflows is at most half the smallest subnormal, 2**-1075;
# that is not representable (it rounds to 0), so the floor uses the smallest subnormal, 2**-1074.
ETA = FLOAT64.smallest_subnormal
EXP_ULPS = 2.0  # relative error of np.exp, in units of u (glibc: < 1 ulp; see docs/oracle.md)
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
    """

    dtype: np.dtype
    u: Any
    eta: Any
    exp_ulps: float


FLOAT64_WORK = Working(np.dtype(np.float64), U, ETA, EXP_ULPS)
# only x87 extended is analysed (docs/oracle.md); np.exp in it is charged 16 u
EXTENDED_WORK = None if EXTENDED is None else Working(
    EXTENDED.dtype, np.longdouble(2) ** -64, np.longdouble(np.finfo(np.longdouble).smallest_subnormal), 16.0)


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


def softmax(z: Any, axis: int = -1, *, dtype: Any = None) -> np.ndarray:
    """Softmax along ``axis``, stable for every finite input and for ``-inf`` (masked) entries.

    Args:
        z: float logits of any shape; NaN and +inf are rejected, -inf means probability 0.
        axis: the class axis.
        dtype: the result's dtype; the input's when None.

    Returns:
        ``exp(z - max z) / sum exp(z - max z)``, correctly rounded from float64.

    >>> softmax(np.array([0.0, np.log(3.0), -np.inf]))
    array([0.25, 0.75, 0.  ])
    """
    arr, restore = _as_rows(z, axis)
    return _round(restore(row_parts(arr).p), dtype, arr.dtype)


def log_softmax(z: Any, axis: int = -1, *, dtype: Any = None) -> np.ndarray:
    """``z - max z - log1p(sum of the other exp(z - max z))`` along ``axis``; -inf stays -inf."""
    arr, restore = _as_rows(z, axis)
    parts = row_parts(arr)
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
    """The loss of ``torch.nn.functional.cross_entropy`` (see :mod:`gradcheck.problem`).

    Args:
        logits, targets: as for :func:`gradcheck.make_problem`.
        dtype: the result's format (default: the logits' dtype).
        **options: the case options (``weight``, ``ignore_index``, ``reduction``,
            ``label_smoothing``; :data:`gradcheck.options.CASE`).

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
    """The gradient of :func:`cross_entropy` with respect to the logits.

    ``dL/dz_ni = (p_ni * sum_c w_c t_nc - w_i t_ni) / D``; for ``reduction="none"`` the gradient of
    the sum of the row losses. Shape of the logits, ``dtype`` as for :func:`cross_entropy`.

    >>> cross_entropy_grad(np.array([[0.0, np.log(3.0)]]), np.array([1]))
    array([[ 0.25, -0.25]])
    """
    problem = make_problem(logits, targets, copy=False, **options)
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


def softmax_jacobian(z: Any, *, dtype: Any = None) -> np.ndarray:
    """``diag(p) - p p^T`` per row: shape ``(K, K)`` for a vector, ``(N, K, K)`` for a batch.

    The diagonal is computed as ``p_i q_i`` with the accurate ``q_i = 1 - p_i``.
    """
    arr = validate_logits(z, ndims=(1, 2), copy=False)
    rows = arr[None, :] if arr.ndim == 1 else arr
    parts = row_parts(rows)
    jac = _jacobian(parts)
    return _round(jac[0] if arr.ndim == 1 else jac, dtype, arr.dtype)


def cross_entropy_hessian(
    logits: Any,
    targets: Any,
    *,
    dtype: Any = None,
    **options: Any,
) -> np.ndarray:
    """Second derivatives of :func:`cross_entropy` in the logits.

    The batch loss is a sum of row losses, so its Hessian is block diagonal across rows; this returns
    the blocks, ``(S_n / D) (diag(p_n) - p_n p_n^T)``, shape ``(N, K, K)`` (``(K, K)`` for a vector).
    """
    problem = make_problem(logits, targets, copy=False, **options)
    parts = row_parts(problem.logits)
    scale = scale_of(problem)  # S / D without overflow (docs/oracle.md, step 10)
    b = _row_exponents(problem, 0, problem.n, FLOAT64_WORK) if scale.rows else None
    with np.errstate(over="ignore", under="ignore"):
        s = _weighted_targets(problem, 0, problem.n, 0, problem.k, FLOAT64_WORK, b).sum(axis=1) / scale.d
        if scale.active:
            s = np.ldexp(s, (0 if b is None else b) - scale.a)
        hess = _jacobian(parts) * s[:, None, None]
    return _round(problem.restore_shape(hess), dtype, problem.logits.dtype)


def grad_rows(problem: Problem) -> np.ndarray:
    """The float64 ``(N, K)`` gradient of a validated problem."""
    if scale_of(problem).active:  # weights or targets near overflow: the rescaled evaluation
        return grad_bounded(problem)[0]
    if problem.index_targets and not problem.label_smoothing:
        return _one_hot_grad(problem)
    parts = row_parts(problem.logits)
    wt = problem.dense_targets() * problem.weights()
    s = wt.sum(axis=1)
    with np.errstate(under="ignore"):
        g = parts.p * (s[:, None] - wt) - wt * parts.q
        return g / problem.divisor()


def _one_hot_grad(problem: Problem) -> np.ndarray:
    """Index targets without smoothing, in cache-sized row blocks, on :data:`THREADS` threads.

    ``g_i = e_i * (w_t / (D Z))`` for ``i != t`` and ``g_t = -w_t q_t / D``: the formulas of
    :func:`row_parts` and the general path, with fewer passes over memory. Each element sees at most
    3 roundings after exp (docs/oracle.md, "One-hot path"), fewer than the general path the bound of
    :func:`grad_bounded` is derived for. Rows are independent, so the result is bit-identical for any
    blocking and thread count.
    """
    n, k = problem.logits.shape
    active = problem.active_rows()
    wt = np.zeros(n)
    wt[active] = problem.weights()[problem.targets[active]]
    factor = wt / problem.divisor()
    out = np.empty((n, k))

    def block(lo: int, hi: int) -> None:
        z64 = np.asarray(problem.logits[lo:hi], dtype=np.float64)
        rows = np.arange(hi - lo)
        argmax = np.argmax(z64, axis=1)
        _, _, g = shifted_exp(z64, argmax)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            g[rows, argmax] = 0.0
            r = g.sum(axis=1)
            g[rows, argmax] = 1.0
            total = 1.0 + r
            live = np.flatnonzero(active[lo:hi])
            cls = problem.targets[lo:hi][live]
            e_t = g[live, cls]
            q_t = np.where(cls == argmax[live], r[live] / total[live], 1.0 - e_t / total[live])
            np.multiply(g, (factor[lo:hi] / total)[:, None], out=out[lo:hi])
            out[lo:hi][live, cls] = -(factor[lo:hi][live] * q_t)
        return None

    for_row_blocks(n, k, block)
    return out


def for_row_blocks(n: int, k: int, work: Any) -> None:
    """Call ``work(lo, hi)`` on row blocks of about :data:`BLOCK_ELEMENTS` elements, threaded.

    numpy releases the GIL in its loops, so blocks run in parallel; a block of 64 Ki float64 values
    (512 KiB) keeps the dozen passes of the formulas in the L2 cache.
    """
    step = max(1, BLOCK_ELEMENTS // max(k, 1))
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if len(bounds) == 1 or THREADS == 1:
        for lo, hi in bounds:
            work(lo, hi)
        return
    for future in [_pool().submit(work, lo, hi) for lo, hi in bounds]:
        future.result()


BLOCK_ELEMENTS = 1 << 16
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
    w_exp = 1 if w is None else int(np.frexp(np.abs(w).max())[1])  # |w|: torch accepts negative weights
    t_max = float(problem.targets.max()) if not problem.index_targets and problem.targets.size else 1.0
    rows = w_exp + int(np.frexp(max(t_max, 1.0))[1]) + problem.k.bit_length() > limit
    terms = divisor_terms(problem)
    if problem.reduction == "mean" and problem.index_targets and problem.weight is not None:
        active = problem.targets[problem.active_rows()]
        big = int(np.frexp(np.abs(w[active]).max())[1])
        if big + active.size.bit_length() > limit:
            with np.errstate(under="ignore"):
                d = work.dtype.type(np.sum(np.ldexp(w[active], -big).astype(work.dtype)))
            # each of the terms loses at most eta / 2 to underflow and D' >= 1/2
            return Scale(big, d, gamma(terms, u) + active.size * work.eta * 2, rows)
    return Scale(0, _divisor(problem, work.dtype), gamma(terms, u), rows)


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


def grad_bounded(problem: Problem, work: Working = FLOAT64_WORK) -> tuple[np.ndarray, np.ndarray]:
    """``(N, K)`` gradient in ``work`` precision and its running error bound (docs/oracle.md, steps 1-10).

    With the default float64 the value is :func:`grad_rows`'s; with :data:`EXTENDED_WORK` it is the
    general formula evaluated in x87 extended precision, and both arrays are ``np.longdouble``.
    Evaluated in row blocks and, for rows longer than :data:`COLUMN_BLOCK`, column tiles with two
    passes (row max and sums, then the elements): the extra memory is a few blocks beyond the two
    results. Where the value is not finite the bound is inf.
    """
    n, k = problem.logits.shape
    scale = scale_of(problem, work)
    one_hot = work is FLOAT64_WORK and problem.index_targets and not problem.label_smoothing and not scale.active
    factor = None
    if one_hot:
        active = problem.active_rows()
        wt_t = np.zeros(n)
        wt_t[active] = 1.0 if problem.weight is None else problem.weight[problem.targets[active]]
        factor = wt_t / scale.d
    g_out = np.empty((n, k), dtype=work.dtype)
    b_out = np.empty((n, k), dtype=work.dtype)

    def block(lo: int, hi: int) -> None:
        _bounded_block(problem, work, scale, factor, lo, hi, g_out, b_out)

    for_row_blocks(n, k, block)
    return g_out, b_out


def _bounded_block(problem: Problem, work: Working, scale: Scale, factor: np.ndarray | None,
                   lo: int, hi: int, g_out: np.ndarray, b_out: np.ndarray) -> None:
    """Rows ``lo:hi`` of :func:`grad_bounded`: pass 1 the row max, R and S; pass 2 each element."""
    k = problem.k
    u = work.u
    zero = work.dtype.type(0)
    rows = np.arange(hi - lo)
    tiles = _columns(k)
    b = _row_exponents(problem, lo, hi, work) if scale.rows else None
    # pass 1: max and argmax (first occurrence), then R = sum_{c != argmax} e_c, any e_c > 0 there, S
    m = np.full(hi - lo, -np.inf, dtype=work.dtype)
    argmax = np.zeros(hi - lo, dtype=np.int64)
    for c0, c1 in tiles:
        zc = np.asarray(problem.logits[lo:hi, c0:c1], dtype=work.dtype)
        am = np.argmax(zc, axis=1)
        mx = zc[rows, am]
        better = mx > m
        m, argmax = np.where(better, mx, m), np.where(better, am + c0, argmax)
    m = m[:, None]
    r = np.zeros(hi - lo, dtype=work.dtype)
    s = np.zeros(hi - lo, dtype=work.dtype)
    # negative class weights (torch accepts them): the error terms below use |w_c t_c|, their sum and |D|
    # (Higham's bounds of signed sums); with nonnegative weights these are the same values, bit for bit
    signed = problem.weight is not None and bool((problem.weight < 0).any())
    s_abs = np.zeros(hi - lo, dtype=work.dtype) if signed else s
    positive = np.zeros(hi - lo, dtype=bool)
    cached = None
    for c0, c1 in tiles:
        zc = np.asarray(problem.logits[lo:hi, c0:c1], dtype=work.dtype)
        s_hi, s_lo, e = _shifted_exp(zc, m)
        here = np.flatnonzero((argmax >= c0) & (argmax < c1))
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            e_other = e.copy()
            e_other[here, argmax[here] - c0] = 0.0
            r += e_other.sum(axis=1)
            positive |= (e_other > 0).any(axis=1)
            wt = _weighted_targets(problem, lo, hi, c0, c1, work, b)
            s += wt.sum(axis=1)
            if signed:
                s_abs += np.abs(wt).sum(axis=1)
        cached = (s_hi, s_lo, e, wt) if len(tiles) == 1 else None
    a_max = np.where(positive, (work.exp_ulps + 2) * u, zero)
    rho = a_max + gamma(k, u)
    eps_z = rho + u
    eps_wt = (4 * u if problem.label_smoothing else 0 * u) + u
    d = scale.d
    d_abs = abs(d)
    one = work.dtype.type(1)
    s = s[:, None]
    s_abs = s_abs[:, None] if signed else s
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        total = 1.0 + r
        for c0, c1 in tiles:
            if cached is None:
                zc = np.asarray(problem.logits[lo:hi, c0:c1], dtype=work.dtype)
                _, _, e = _shifted_exp(zc, m)
                wt = _weighted_targets(problem, lo, hi, c0, c1, work, b)
            else:
                _, _, e, wt = cached
            here = np.flatnonzero((argmax >= c0) & (argmax < c1))
            at = argmax[here] - c0
            # step 4-5: p, q (R / Z at the argmax), and their relative errors
            p = e / total[:, None]
            q = 1.0 - p
            q[here, at] = r[here] / total[here]
            a = np.where(e > 0, (work.exp_ulps + 2) * u, zero)
            a[here, at] = 0
            eps_p = a + eps_z[:, None] + u
            eps_q = eps_p + u
            eps_q[here, at] = (rho + eps_z + u)[here]
            # S - w_i t_i >= 0 when no weight is negative (a float sum of nonnegative terms is monotone)
            s_minus = s - wt if signed else np.maximum(s - wt, 0)
            wt_abs, sm_abs = (np.abs(wt), np.abs(s_minus)) if signed else (wt, s_minus)
            if factor is not None:
                g = _one_hot_tile(problem, lo, hi, c0, c1, e, r, total, argmax, factor)
            elif work is FLOAT64_WORK:
                g = (p * (s - wt) - wt * q) / d
            else:
                g = (p * s_minus - wt * q) / d
            # steps 7-9
            d_s_minus = (gamma(k, u) + eps_wt) * s_abs + eps_wt * wt_abs + u * sm_abs
            d_t1 = p * d_s_minus + sm_abs * p * eps_p + u * p * sm_abs
            d_t2 = (eps_wt + eps_q + u) * wt_abs * q
            t_sum = p * sm_abs + wt_abs * q
            d_g0 = d_t1 + d_t2 + u * t_sum
            bound = d_g0 / d_abs + np.abs(g) * (scale.d_rel + 2 * u)
            floor = (k + 8) * work.eta * np.maximum(one, s_abs) * max(one, one / d_abs)
            bound = SECOND_ORDER * bound + floor
            if scale.active:  # step 10: back from the scaled domain, exactly but for under/overflow
                shift = (np.zeros(hi - lo, dtype=np.int64) if b is None else b) - scale.a
                g = np.ldexp(g, shift[:, None])
                bound = np.ldexp(bound, shift[:, None]) + 2 * work.eta
            bound[~np.isfinite(g)] = np.inf
            g_out[lo:hi, c0:c1] = g
            b_out[lo:hi, c0:c1] = bound


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
    before they are summed.
    """
    parts = row_parts(problem.logits)
    n, k = problem.logits.shape
    rho, _, _ = _row_error(parts)
    scale = scale_of(problem)
    b = _row_exponents(problem, 0, n, FLOAT64_WORK) if scale.rows else None
    wt = _weighted_targets(problem, 0, n, 0, k, FLOAT64_WORK, b)
    s = wt.sum(axis=1)
    with np.errstate(invalid="ignore", under="ignore", over="ignore"):
        # wt_c * (-s_c), with 0 where wt_c = 0 (also on masked classes, where -s_c = +inf)
        # (wt != 0, not wt > 0: torch accepts negative class weights)
        shifted = np.where(wt != 0, wt * -(parts.s + parts.s_lo), 0.0)
        row_loss = s * parts.log_z + shifted.sum(axis=1)
        eps_wt = (4 * U if problem.label_smoothing else 0.0) + U
        eps_row = np.maximum(eps_wt + rho + 4 * U, eps_wt + 2 * U + gamma(k)) + U
        # the bound of the signed sum: the same terms in absolute value (equal to row_loss, s when w >= 0)
        signed = problem.weight is not None and bool((problem.weight < 0).any())
        s_abs = np.abs(wt).sum(axis=1) if signed else s
        row_abs = s_abs * parts.log_z + np.abs(shifted).sum(axis=1) if signed else row_loss
        row_bound = eps_row * row_abs + (k + 4) * ETA * np.maximum(s_abs, 1.0)
    if scale.active:
        return _scaled_loss(problem, scale, np.zeros(n, dtype=np.int64) if b is None else b, row_loss, row_bound)
    if problem.reduction == "none":
        return Bounded(problem.restore_shape(row_loss), problem.restore_shape(SECOND_ORDER * row_bound))
    d = problem.divisor()
    with np.errstate(invalid="ignore", under="ignore"):
        total = np.sum(row_loss) / d
        bound = (np.sum(row_bound) + gamma(n) * np.sum(np.abs(row_loss))) / abs(d) + (gamma(divisor_terms(problem)) + 2 * U) * abs(total)
    return Bounded(np.array(total), np.array(SECOND_ORDER * bound + ETA))


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
            inner = (np.sum(rb) + n * ETA + gamma(n) * np.sum(np.abs(rl))) / abs(scale.d) + (scale.d_rel + 2 * U) * abs(total)
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


def _as_rows(z: Any, axis: int) -> tuple[np.ndarray, Any]:
    """Validate logits of any shape and move ``axis`` last, flattened to rows; returns the undo."""
    arr = validate_logits(z, ndims=None, axis=axis, copy=False)
    moved = np.moveaxis(arr, axis, -1)
    shape = moved.shape

    def restore(x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x.reshape(shape), -1, axis)

    return moved.reshape(-1, shape[-1]), restore


def _round(x: np.ndarray, dtype: Any, default: np.dtype) -> np.ndarray:
    fmt = float_format(default if dtype is None else dtype)
    return round_to_format(np.asarray(x, dtype=np.float64), fmt)
