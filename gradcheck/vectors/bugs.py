"""The modeled bugs: each a function from the certified pieces of a test to the gradient a real mistake gives.

Every bug is computed from the certified float64 softmax and the truth with IEEE basic operations
(its few elementary functions from mpmath), so its gradient is the same on every machine. A bug
returns None where it does not apply to the inputs or the options (e.g. smoothing conventions need
smoothing). :data:`BUGS` registers them all, in the order the builder tries them.

The bugs of the plain loss apply to the plain groups only (:func:`_plain_only`), except those that
do not depend on the loss (a sign flip, a skipped class, float32 inside, a tolerance too loose). The
kernel bugs (z-loss, softcap, upstream gradient: issue 12) are built from the kernel pieces of
:class:`_Context`: ``z' = c tanh(z / c)``, its softmax ``pk`` (certified, of ``z'`` rounded to float64), the
row's ``lse`` and the chain factor ``1 - tanh^2(z / c)`` (mpmath, correctly rounded to float64), and the
upstream gradient, through the one formula of :func:`_kernel_grad`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gradcheck.dtypes import FLOAT32, FloatFormat, round_to_format
from gradcheck.problem import Problem
from gradcheck.vectors.suite import EPS_CLIP, EPS_LOG


@dataclass(frozen=True, eq=False)
class _Context:
    """What the bug models need: the problem, the truth, and float64 pieces computed deterministically."""

    problem: Problem
    truth: np.ndarray  # (N, K) in the dtype
    truth64: np.ndarray  # (N, K) certified float64
    p: np.ndarray  # (N, K) certified float64 softmax (of the raw logits)
    kernel: _Kernel | None = None  # the kernel pieces (groups with z-loss, softcap or an upstream gradient)

    @property
    def fmt(self) -> FloatFormat:
        return self.problem.format

    def wt(self, targets: np.ndarray | None = None) -> np.ndarray:
        return (self.problem.dense_targets() if targets is None else targets) * self.problem.weights()

    def grad(self, p: np.ndarray, wt: np.ndarray, divisor: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (p * wt.sum(axis=1, keepdims=True) - wt) / divisor


@dataclass(frozen=True, eq=False)
class _Kernel:
    """The kernel pieces of a test, float64, the same on every machine (mpmath and the certified softmax).

    Attributes:
        zc: ``(N, K)`` the capped logits ``c tanh(z / c)`` (``-c`` for ``-inf``; ``z`` without softcap).
        pk: ``(N, K)`` the softmax of ``zc``.
        lse: ``(N, 1)`` logsumexp of each row of ``zc``.
        chain: ``(N, K)`` ``1 - tanh^2(z / c)`` (0 for ``-inf``; ones without softcap).
        upstream: ``(N, 1)`` the upstream gradient of each row (ones when none).
    """

    zc: np.ndarray
    pk: np.ndarray
    lse: np.ndarray
    chain: np.ndarray
    upstream: np.ndarray


def _mp_map(fn: Callable[..., float], *arrays: np.ndarray) -> np.ndarray:
    """``fn`` elementwise on float64 arrays, evaluated by mpmath at 120 bits and rounded once to float64."""
    import mpmath

    with mpmath.workprec(120):
        out = [float(fn(*(mpmath.mpf(float(v)) if np.isfinite(v) else float(v) for v in vals)))
               for vals in zip(*(a.ravel() for a in arrays))]
    return np.array(out, dtype=np.float64).reshape(arrays[0].shape)


def _mp_lse(z: np.ndarray) -> np.ndarray:
    """``(N, 1)`` logsumexp of float64 rows by mpmath (120 bits), rounded to float64; -inf terms skipped."""
    import mpmath

    with mpmath.workprec(120):
        return np.array([[float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in row if v != -np.inf)))]
                         for row in z], dtype=np.float64)


def kernel_pieces(problem: Problem, zc: np.ndarray | None = None) -> _Kernel:
    """The kernel pieces of ``problem`` (see :class:`_Kernel`); ``zc`` replaces the capped logits (a bug's)."""
    import mpmath

    z = problem.logits.astype(np.float64)
    c = problem.softcap
    if zc is None:
        zc = z if c is None else _mp_map(lambda v: mpmath.mpf(c) * mpmath.tanh(v / c) if v != -np.inf else -c, z)
    chain = np.ones_like(z) if c is None else _mp_map(
        lambda v: mpmath.sech(v / c) ** 2 if v != -np.inf else 0.0, z)
    return _Kernel(zc, certified_softmax(zc), _mp_lse(zc), chain, problem.upstream()[:, None])


def make_context(problem: Problem, truth: np.ndarray, truth64: np.ndarray) -> _Context:
    """The bugs' context of a test: the kernel pieces only for a problem with a kernel option."""
    return _Context(problem, truth, truth64, certified_softmax(problem.logits),
                    kernel_pieces(problem) if _is_kernel(problem) else None)


def _is_kernel(problem: Problem) -> bool:
    return bool(problem.lse_square_scale) or problem.softcap is not None or problem.grad_output is not None


def _plain_only(model: Callable[[_Context], np.ndarray | None]) -> Callable[[_Context], np.ndarray | None]:
    """A bug of the plain loss, modeled without z-loss, softcap or upstream gradient: not in the kernel groups."""

    @functools.wraps(model)
    def wrapped(c: _Context) -> np.ndarray | None:
        return None if _is_kernel(c.problem) else model(c)

    return wrapped


def certified_softmax(logits: np.ndarray) -> np.ndarray:
    """The softmax of ``(N, K)`` logits, correctly rounded to float64 (from :func:`gradcheck.exact_grad`).

    With index targets and reduction "sum" the gradient is ``p - onehot``: class 0 as target gives
    every ``p_c``, c > 0, exactly rounded; class 1 as target gives ``p_0``.
    """
    from gradcheck.exact import exact_grad

    n, k = logits.shape
    if k == 1:
        return np.ones((n, 1))
    p = exact_grad(logits, np.zeros(n, dtype=np.int64), reduction="sum", dtype="float64")
    p[:, 0] = exact_grad(logits, np.ones(n, dtype=np.int64), reduction="sum", dtype="float64")[:, 0]
    return p


def _mean_divisor(problem: Problem) -> float:
    if not problem.index_targets:
        return float(problem.n)
    return float(np.sum(problem.weights()[problem.targets[problem.active_rows()]]))


@_plain_only
def _missing_mean_divisor(c: _Context) -> np.ndarray | None:
    """Forgetting the 1/N of reduction="mean": the gradient of the sum."""
    d = c.problem.divisor()
    return c.truth64 * d if c.problem.reduction == "mean" and d != 1 else None


@_plain_only
def _reduction_ignored(c: _Context) -> np.ndarray | None:
    """Ignoring the reduction option: always the gradient of the mean."""
    if c.problem.reduction == "mean" or not c.problem.active_rows().any():
        return None
    d = _mean_divisor(c.problem)
    return c.truth64 / d if d not in (0.0, 1.0) else None


def _sign_flip(c: _Context) -> np.ndarray | None:
    """The gradient of the negated loss: t - p instead of p - t."""
    return -c.truth64 if np.any(c.truth64 != 0) else None


@_plain_only
def _no_max_subtraction(c: _Context) -> np.ndarray | None:
    """Softmax as exp(z) / sum exp(z) without subtracting the row maximum: NaN on overflow or underflow."""
    z = c.problem.logits.astype(np.float64)
    fmt = c.fmt
    over = z > math.log(fmt.max)  # exp(z) overflows to inf in the dtype
    under = np.all(z < math.log(fmt.smallest_subnormal) - 1.0, axis=1, keepdims=True)  # all exp(z) are 0
    bad = (over.any(axis=1, keepdims=True) & over) | (under & np.isfinite(z))
    if not bad.any():
        return None
    p = np.where(over.any(axis=1, keepdims=True), 0.0, c.p)
    p = np.where(bad, np.nan, p)
    return c.grad(p, c.wt(), c.problem.divisor())


@_plain_only
def _log_of_softmax(c: _Context) -> np.ndarray | None:
    """log(softmax(z)) instead of log_softmax(z): NaN rows where the target's probability underflows."""
    pr = c.problem
    if not pr.index_targets:
        return None
    rows = np.flatnonzero(pr.active_rows())
    p_t = c.p[rows, pr.targets[rows]]
    dead = rows[round_to_format(p_t, c.fmt).astype(np.float64) == 0]
    if not dead.size:
        return None
    g = c.truth64.copy()
    g[dead] = np.nan
    return g


@_plain_only
def _epsilon_in_log(c: _Context) -> np.ndarray | None:
    """A "safe" -log(p_t + 1e-7): each row scaled by p_t / (p_t + 1e-7)."""
    pr = c.problem
    if not pr.index_targets or pr.label_smoothing:
        return None
    p_t = np.ones(pr.n)
    rows = np.flatnonzero(pr.active_rows())
    p_t[rows] = c.p[rows, pr.targets[rows]]
    return c.truth64 * (p_t / (p_t + EPS_LOG))[:, None]


@_plain_only
def _clipped(c: _Context) -> np.ndarray | None:
    """Probabilities clipped to [eps, 1 - eps] before p - t (Keras style)."""
    eps = EPS_CLIP[c.fmt.name]
    p = np.clip(c.p, eps, 1.0 - eps)
    return c.grad(p, c.wt(), c.problem.divisor()) if np.any(p != c.p) else None


@_plain_only
def _smoothing_convention(c: _Context) -> np.ndarray | None:
    """Label smoothing as 1 - eps on the target and eps / (K - 1) elsewhere (not torch's)."""
    pr = c.problem
    eps = pr.label_smoothing
    if not pr.index_targets or not eps or pr.k < 2:
        return None
    y = np.full((pr.n, pr.k), eps / (pr.k - 1))
    rows = np.flatnonzero(pr.active_rows())
    y[rows, pr.targets[rows]] = 1.0 - eps
    y[~pr.active_rows()] = 0.0
    return c.grad(c.p, c.wt(y), pr.divisor())


@_plain_only
def _weight_on_every_class(c: _Context) -> np.ndarray | None:
    """Class weights applied per class, w_i (p_i - t_i), instead of the target's w_y."""
    pr = c.problem
    if not pr.index_targets or pr.weight is None or pr.label_smoothing:
        return None
    t = pr.dense_targets()
    active = pr.active_rows()[:, None]
    return np.where(active, pr.weights()[None, :] * (c.p - t), 0.0) / pr.divisor()


@_plain_only
def _weighted_mean_over_rows(c: _Context) -> np.ndarray | None:
    """The weighted mean divided by N instead of the sum of the targets' weights."""
    pr = c.problem
    if pr.weight is None or pr.reduction != "mean" or not pr.index_targets:
        return None
    return c.truth64 * pr.divisor() / pr.n


@_plain_only
def _ignored_rows_counted(c: _Context) -> np.ndarray | None:
    """Ignored rows zeroed but still counted in the mean's divisor."""
    pr = c.problem
    if not pr.index_targets or pr.weight is not None or pr.reduction != "mean" or pr.active_rows().all():
        return None
    return c.truth64 * pr.divisor() / pr.n


@_plain_only
def _ignored_rows_not_zeroed(c: _Context) -> np.ndarray | None:
    """Ignored rows given the gradient p (their target treated as all zero) instead of zero."""
    pr = c.problem
    if not pr.index_targets or pr.active_rows().all():
        return None
    g = c.truth64.copy()
    ignored = ~pr.active_rows()
    g[ignored] = c.p[ignored] / pr.divisor()
    return g


@_plain_only
def _soft_assumed_normalized(c: _Context) -> np.ndarray | None:
    """p - t for probability targets, as if every row summed to one."""
    pr = c.problem
    if pr.index_targets:
        return None
    wt = c.wt()
    with np.errstate(invalid="ignore"):
        return (c.p - wt) / pr.divisor()


def _last_class_skipped(c: _Context) -> np.ndarray | None:
    """An off-by-one class loop: the last class's gradient left 0."""
    if c.problem.k < 2:
        return None
    g = c.truth64.copy()
    g[:, -1] = 0.0
    return g


@_plain_only
def _softmax_over_batch(c: _Context) -> np.ndarray | None:
    """Softmax over the batch axis instead of the classes."""
    pr = c.problem
    if pr.n < 2:
        return None
    p = certified_softmax(np.ascontiguousarray(pr.logits.T)).T
    return c.grad(p, c.wt(), pr.divisor())


def _float32_inside(c: _Context) -> np.ndarray | None:
    """A float64 entry point that computes in float32."""
    if c.fmt.name != "float64":
        return None
    return round_to_format(c.truth64, FLOAT32).astype(np.float64)


@_plain_only
def _half_sequential_sum(c: _Context) -> np.ndarray | None:
    """The softmax denominator summed left to right in the half precision, which stagnates."""
    # exp by mpmath (platform independent); every step rounded to the dtype
    import mpmath

    fmt = c.fmt
    if fmt.precision > 11 or c.problem.k < 64:
        return None
    z = c.problem.logits.astype(np.float64)
    with np.errstate(invalid="ignore"):
        s = round_to_format(z - z.max(axis=1, keepdims=True), fmt).astype(np.float64)
    with mpmath.workprec(53):
        e = np.array([[float(mpmath.exp(v)) if np.isfinite(v) else 0.0 for v in row] for row in s])
    e = round_to_format(e, fmt).astype(np.float64)
    total = np.zeros((z.shape[0], 1))
    for col in range(z.shape[1]):
        total = round_to_format(total + e[:, col:col + 1], fmt).astype(np.float64)
    p = round_to_format(e / total, fmt).astype(np.float64)
    return c.grad(p, c.wt(), c.problem.divisor())


def _beyond_tolerance(c: _Context) -> np.ndarray | None:
    """A checker's tolerance too loose: the truth's largest element moved outward by the least 2**j ULPs beyond it."""
    from gradcheck.oracle import row_parts
    from gradcheck.reference import reference_grad
    from gradcheck.tolerance import grad_tolerance

    pr = c.problem
    fmt = c.fmt
    g = c.truth.astype(np.float64)
    if not np.any(g != 0):
        return None
    where = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)
    parts = row_parts(pr.logits)
    _, bound = reference_grad(pr, parts)
    tol = grad_tolerance(pr, parts, c.truth64)
    ulp = float(fmt.ulp(g[where]))
    # |moved - reference| >= steps * ulp - ulp / 2 - bound must exceed tol + bound
    need = (float(tol[where]) + 2 * float(bound[where]) + ulp) / ulp * (1 + 2.0**-20)
    steps = 1 << max(0, math.ceil(math.log2(need)))
    if steps >= 1 << (fmt.precision - 1):
        return None
    bits = c.truth.view(fmt.int_dtype).copy()
    bits[where] = bits[where] + np.array(steps, dtype=fmt.int_dtype)  # same sign: moves away from zero
    moved = bits.view(fmt.dtype)
    if not np.isfinite(moved[where].astype(np.float64)):
        return None
    return moved.astype(np.float64)


# --- the kernel bugs (issue 12) ---------------------------------------------------------------------


def _kernel_grad(c: _Context, *, pieces: _Kernel | None = None, upstream: np.ndarray | None = None,
                 zloss_rows: np.ndarray | None = None, zloss_shift: float = 0.0, zloss_divisor: float | None = None,
                 chain: bool = True) -> np.ndarray:
    """The gradient of the kernel loss from its pieces, with the variations the bugs make.

    ``r_n g_n [(p S_n - w t)/D + 2 lambda lse_n (p - shift) a_n / Dz] (1 - tanh^2(z / c))`` with ``r_n`` 0 on
    ignored rows, ``a_n`` the z-loss factor of each row (``zloss_rows``, default 1 on counted rows), ``Dz``
    the z-loss divisor (default :meth:`Problem.zloss_divisor`), and the chain factor only when ``chain``.
    """
    pr = c.problem
    k = pieces or c.kernel
    assert k is not None
    active = pr.active_rows()[:, None]
    wt = c.wt()
    g = k.upstream if upstream is None else upstream
    a = active.astype(np.float64) if zloss_rows is None else zloss_rows
    dz = float(pr.zloss_divisor()) if zloss_divisor is None else zloss_divisor
    with np.errstate(invalid="ignore", over="ignore"):
        ce = np.where(active, (k.pk * wt.sum(axis=1, keepdims=True) - wt) / pr.divisor(), 0.0)
        zl = 2.0 * pr.lse_square_scale * k.lse * (k.pk - zloss_shift) * a / dz if pr.lse_square_scale else 0.0
        out = g * (ce + zl)
        return out * k.chain if chain else out


def _zloss_smoothed_target(c: _Context) -> np.ndarray | None:
    """The z-loss gradient 2 lambda lse (p - eps/K) under label smoothing (an old Liger-Kernel kernel)."""
    pr = c.problem
    if not pr.lse_square_scale or not pr.label_smoothing:
        return None
    return _kernel_grad(c, zloss_shift=pr.label_smoothing / pr.k)


def _softcap_times_logit(c: _Context) -> np.ndarray | None:
    """The softcap as z tanh(z / c) instead of c tanh(z / c) (unsloth-zoo #593), differentiated as such."""
    import mpmath

    pr = c.problem
    cap = pr.softcap
    z = pr.logits.astype(np.float64)
    if cap is None or not np.all(np.isfinite(z)):
        return None  # -inf * tanh(-inf) = +inf: the bug's softmax is NaN; other inputs show it
    zc = _mp_map(lambda v: v * mpmath.tanh(v / cap), z)
    slope = _mp_map(lambda v: mpmath.tanh(v / cap) + v / cap * mpmath.sech(v / cap) ** 2, z)
    k = c.kernel
    assert k is not None
    bug = kernel_pieces(pr, zc)
    return _kernel_grad(c, pieces=_Kernel(zc, bug.pk, bug.lse, slope, k.upstream))


def _upstream_ignored(c: _Context) -> np.ndarray | None:
    """The upstream gradient ignored: the gradient for grad_output = 1 (Liger-Kernel #678 for reduction='none')."""
    pr = c.problem
    if pr.grad_output is None or np.all(pr.upstream()[pr.active_rows()] == 1.0):
        return None
    return _kernel_grad(c, upstream=np.ones((pr.n, 1)))


def _upstream_first_row_only(c: _Context) -> np.ndarray | None:
    """grad_output[0] used for every row under reduction='none' (TransformerEngine #2139)."""
    pr = c.problem
    if pr.grad_output is None or pr.reduction != "none" or pr.n < 2:
        return None
    g = pr.upstream()
    if np.all(g[pr.active_rows()] == g[0]):
        return None
    return _kernel_grad(c, upstream=np.full((pr.n, 1), g[0]))


def _zloss_class_weighted(c: _Context) -> np.ndarray | None:
    """The z-loss term of each row multiplied by its target's class weight."""
    pr = c.problem
    if not pr.lse_square_scale or pr.weight is None or not pr.index_targets:
        return None
    active = pr.active_rows()
    a = np.zeros((pr.n, 1))
    a[active, 0] = pr.weight[pr.targets[active]]
    return _kernel_grad(c, zloss_rows=a)


def _zloss_divided_by_weights(c: _Context) -> np.ndarray | None:
    """The z-loss term divided under 'mean' by the cross-entropy's divisor D instead of the counted rows."""
    pr = c.problem
    if not pr.lse_square_scale or pr.reduction != "mean":
        return None
    d = float(pr.divisor())
    return None if d == pr.zloss_divisor() or d == 0 else _kernel_grad(c, zloss_divisor=d)


def _zloss_on_ignored_rows(c: _Context) -> np.ndarray | None:
    """Ignored rows get the z-loss gradient 2 lambda lse p / Dz instead of zero."""
    pr = c.problem
    if not pr.lse_square_scale or pr.active_rows().all():
        return None
    k = c.kernel
    assert k is not None
    g = c.truth64.copy()
    ignored = ~pr.active_rows()
    extra = 2.0 * pr.lse_square_scale * k.lse * k.pk / float(pr.zloss_divisor()) * k.upstream * k.chain
    g[ignored] = extra[ignored]
    return g


def _zloss_factor_two_missing(c: _Context) -> np.ndarray | None:
    """The z-loss gradient lambda lse p instead of 2 lambda lse p (d(lse^2) = 2 lse dlse)."""
    pr = c.problem
    if not pr.lse_square_scale:
        return None
    return _kernel_grad(c, zloss_rows=0.5 * pr.active_rows()[:, None])


def _softcap_chain_rule_missing(c: _Context) -> np.ndarray | None:
    """The gradient with respect to the capped logits returned: the factor 1 - tanh^2(z / c) missing."""
    if c.problem.softcap is None:
        return None
    return _kernel_grad(c, chain=False)


# flag -> the bug's gradient in float64 (None where it does not apply); the builder tries them in this order.
BUGS: dict[str, Callable[[_Context], np.ndarray | None]] = {
    "MissingMeanDivisor": _missing_mean_divisor,
    "ReductionIgnored": _reduction_ignored,
    "SignFlip": _sign_flip,
    "NoMaxSubtraction": _no_max_subtraction,
    "LogOfSoftmax": _log_of_softmax,
    "EpsilonInLog": _epsilon_in_log,
    "ClippedProbabilities": _clipped,
    "WrongSmoothingConvention": _smoothing_convention,
    "WeightOnEveryClass": _weight_on_every_class,
    "WeightedMeanOverRows": _weighted_mean_over_rows,
    "IgnoredRowsCounted": _ignored_rows_counted,
    "IgnoredRowsNotZeroed": _ignored_rows_not_zeroed,
    "SoftTargetsAssumedNormalized": _soft_assumed_normalized,
    "LastClassSkipped": _last_class_skipped,
    "SoftmaxOverBatchAxis": _softmax_over_batch,
    "Float32Inside": _float32_inside,
    "HalfPrecisionSequentialSum": _half_sequential_sum,
    "BeyondToleranceUlps": _beyond_tolerance,
    "ZLossSmoothedTarget": _zloss_smoothed_target,
    "SoftcapTimesLogit": _softcap_times_logit,
    "UpstreamIgnored": _upstream_ignored,
    "UpstreamFirstRowOnly": _upstream_first_row_only,
    "ZLossClassWeighted": _zloss_class_weighted,
    "ZLossDividedByWeights": _zloss_divided_by_weights,
    "ZLossOnIgnoredRows": _zloss_on_ignored_rows,
    "ZLossFactorTwoMissing": _zloss_factor_two_missing,
    "SoftcapChainRuleMissing": _softcap_chain_rule_missing,
}
# Bugs meant to land between one and two tolerances off: not held to the builder's CLEAR_RATIO.
BARELY_BEYOND = frozenset({"BeyondToleranceUlps"})
