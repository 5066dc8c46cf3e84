"""The golden vectors: seeded edge cases with their certified loss and gradient, modeled bugs, and the checker.

A suite holds test groups (one dtype and one set of options each). Every *valid* test carries the
loss and gradient correctly rounded to the dtype (:func:`gradcheck.exact_loss`, :func:`gradcheck.exact_grad`).
Every *invalid* test repeats the inputs of a valid test of its group with the gradient a known bug
produces (missing 1/N, sign flip, no max subtraction, ...); a checker must reject it.

Everything here is platform independent, so the file is reproducible bit for bit: the inputs come from
integer and 53-bit uniform draws and IEEE basic operations; the truth is correctly rounded; the bugs
are computed from the certified float64 softmax with basic operations, and their few elementary
functions with mpmath.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from gradcheck.dtypes import DTYPE_NAMES, FLOAT32, FloatFormat, float_format, round_to_format
from gradcheck.errors import CertificationError
from gradcheck.problem import DEFAULT_IGNORE_INDEX, Problem

SCHEMA_NAME = "gradcheck-vectors"
SCHEMA_VERSION = "1.0.0"
DEFAULT_SEED = 0
CLEAR_RATIO = 2.0  # an invalid gradient is at least this many tolerances off (or not finite)
EPS_LOG = 1e-7  # the epsilon of the EpsilonInLog bug
EPS_CLIP = {"float64": 1e-7, "float32": 1e-7, "float16": 1e-4, "bfloat16": 1e-4}  # Keras-style clipping

# Logit gaps that push probabilities to the subnormal range (or to zero) in each format.
GAP = {"float64": 740.0, "float32": 100.0, "float16": 17.0, "bfloat16": 100.0}
# A gap whose exp is below half the smallest subnormal: p_t - 1 rounds to -0.
ZERO_GAP = {"float64": 750.0, "float32": 110.0, "float16": 20.0, "bfloat16": 100.0}
# many_classes: exp(-A) is below half an ulp of 1, so a sequential sum in the dtype stagnates at 1.
MANY = {"float16": 8.0, "bfloat16": 6.0}
MANY_K = 256
ATTEMPTS = 8  # draws per input kind before giving up on certifying its truth


@dataclass(frozen=True)
class GroupSpec:
    """The options shared by a test group.

    Attributes:
        name: short label.
        targets: "index" or "probs".
        reduction, label_smoothing: as for :func:`gradcheck.cross_entropy`.
        weighted: tests carry class weights.
        ignore_index: the ignored target value (index targets), None for probability targets.
        ignored_rows: some rows of each test take ``ignore_index``.
        normalized: probability targets sum to one (up to their rounding to the dtype).
    """

    name: str
    targets: str
    reduction: str = "mean"
    label_smoothing: float = 0.0
    weighted: bool = False
    ignore_index: int | None = DEFAULT_IGNORE_INDEX
    ignored_rows: bool = False
    normalized: bool = True


GROUPS: tuple[GroupSpec, ...] = (
    GroupSpec("index", "index"),
    GroupSpec("index_sum", "index", reduction="sum"),
    GroupSpec("index_none", "index", reduction="none"),
    GroupSpec("index_ignored", "index", ignored_rows=True),
    GroupSpec("index_ignore_class", "index", ignore_index=1, ignored_rows=True),
    GroupSpec("index_weighted", "index", weighted=True),
    GroupSpec("index_smoothed", "index", label_smoothing=0.1),
    GroupSpec("index_all_options", "index", label_smoothing=0.2, weighted=True, ignored_rows=True),
    GroupSpec("probs", "probs", ignore_index=None),
    GroupSpec("probs_unnormalized_sum", "probs", reduction="sum", ignore_index=None, normalized=False),
    GroupSpec("probs_smoothed_weighted", "probs", label_smoothing=0.1, weighted=True, ignore_index=None),
)

KINDS: dict[str, tuple[str, tuple[int, int], str]] = {
    # kind: (flag, shape, what it is)
    "moderate": ("Moderate", (3, 4), "logits of moderate size"),
    "large_gap": ("LargeGap", (2, 4), "a gap between the largest logit and the others that underflows probabilities"),
    "huge": ("HugeLogits", (2, 3), "logits near the largest finite number of the dtype"),
    "ties": ("Ties", (2, 4), "several equal largest logits"),
    "masked": ("MaskedClasses", (3, 4), "-inf logits (masked classes)"),
    "single_class": ("SingleClass", (2, 1), "one class: the gradient is exactly zero"),
    "signed_zero": ("SignedZero", (2, 3), "-0.0 and +0.0 logits; a near one-hot row whose target gradient rounds to -0.0"),
    "many_classes": ("ManyClasses", (1, MANY_K), "many classes whose sum stagnates when accumulated sequentially in a half precision"),
}

NOTES: dict[str, tuple[str, str]] = {
    # flag: (bugType, description)
    **{flag: ("EDGE_CASE", f"The inputs have {what}.") for flag, _, what in KINDS.values()},
    "SubnormalGradient": ("EDGE_CASE", "Some gradient elements are subnormal in the dtype."),
    "NegativeZeroGradient": ("EDGE_CASE", "Some gradient elements are -0.0: a tiny negative value rounded to zero."),
    "ZeroGradient": ("EDGE_CASE", "The whole gradient is zero."),
    "InfiniteLoss": ("EDGE_CASE", "The loss is +inf (positive target weight on a masked class); the gradient is finite."),
    "IgnoredRows": ("EDGE_CASE", "Some rows have the target ignore_index: their gradient is zero and they do not count in the mean."),
    "ZeroWeight": ("EDGE_CASE", "A class has weight 0."),
    "UnnormalizedTargets": ("EDGE_CASE", "Probability targets drawn without normalization (rows sum to up to 3): the gradient is p * sum(t) - t. Without this flag probability targets are normalized before rounding to the dtype."),
    "MissingMeanDivisor": ("MODELED_BUG", "The gradient of the sum returned for reduction='mean' (the 1/N is missing)."),
    "ReductionIgnored": ("MODELED_BUG", "Always the gradient of the mean, whatever the reduction asked for."),
    "SignFlip": ("MODELED_BUG", "t - p instead of p - t (the gradient of the negated loss)."),
    "NoMaxSubtraction": ("MODELED_BUG", "exp(z) / sum exp(z) without subtracting the row maximum: overflow (inf / inf) or underflow (0 / 0) gives NaN."),
    "LogOfSoftmax": ("MODELED_BUG", "log(softmax(z)) instead of log_softmax(z): where the target's probability underflows to 0, backpropagation gives 0 * inf = NaN."),
    "EpsilonInLog": ("MODELED_BUG", "The gradient of -log(p_t + 1e-7): each row scaled by p_t / (p_t + 1e-7)."),
    "ClippedProbabilities": ("MODELED_BUG", "p clipped to [eps, 1 - eps] before p - t (Keras style; eps 1e-7, or 1e-4 in half precision)."),
    "WrongSmoothingConvention": ("MODELED_BUG", "Label smoothing as 1 - eps on the target and eps / (K - 1) elsewhere, instead of torch's (1 - eps) t + eps / K."),
    "WeightOnEveryClass": ("MODELED_BUG", "Class weights applied per class, w_i (p_i - t_i), instead of the target's weight w_y (p_i - t_i)."),
    "WeightedMeanOverRows": ("MODELED_BUG", "The weighted mean divided by the number of rows instead of the sum of the targets' weights."),
    "IgnoredRowsCounted": ("MODELED_BUG", "Ignored rows get a zero gradient but still count in the mean's divisor."),
    "IgnoredRowsNotZeroed": ("MODELED_BUG", "Ignored rows get the gradient p (as if their target were all zero) instead of zero."),
    "SoftTargetsAssumedNormalized": ("MODELED_BUG", "p - t for probability targets: wrong for rows that do not sum to one."),
    "LastClassSkipped": ("MODELED_BUG", "An off-by-one class loop: the last class's gradient stays 0."),
    "SoftmaxOverBatchAxis": ("MODELED_BUG", "Softmax over the batch axis instead of the classes."),
    "Float32Inside": ("MODELED_BUG", "A float64 entry point that computes in float32 (modeled as the truth rounded to float32)."),
    "HalfPrecisionSequentialSum": ("MODELED_BUG", "The softmax denominator summed sequentially in the half precision: it stagnates once the terms fall below half an ulp of the running sum."),
    "BeyondToleranceUlps": ("MODELED_BUG", "The truth with its largest element moved outward by the smallest power-of-two number of ULPs beyond the verify tolerance: rejected by a checker whose tolerance is right, accepted by one too loose."),
}


@dataclass(frozen=True, eq=False)
class Vector:
    """One test.

    Attributes:
        tc_id: unique id, from 1, in file order.
        comment: what the test is.
        flags: keys of :data:`NOTES`.
        logits: ``(N, K)`` of the dtype.
        targets: ``(N,)`` int64 or ``(N, K)`` of the dtype.
        weight: ``(K,)`` of the dtype, or None.
        loss: the loss correctly rounded to the dtype (0-d, or ``(N,)`` for reduction="none").
        grad: the gradient: correctly rounded (valid), or the modeled bug's (invalid).
        result: "valid" or "invalid".
        bug: the modeled bug's flag (invalid tests), else None.
    """

    tc_id: int
    comment: str
    flags: tuple[str, ...]
    logits: np.ndarray
    targets: np.ndarray
    weight: np.ndarray | None
    loss: np.ndarray
    grad: np.ndarray
    result: str
    bug: str | None = None


@dataclass(frozen=True, eq=False)
class VectorGroup:
    """Tests sharing a dtype and options (see :class:`GroupSpec`)."""

    dtype: str
    targets: str
    reduction: str
    label_smoothing: float
    weighted: bool
    ignore_index: int | None
    tests: tuple[Vector, ...]

    def case(self, test: Vector) -> Any:
        """The test's inputs as a :class:`gradcheck.strategies.Case` (what ``verify`` checks)."""
        from gradcheck.strategies import Case

        return Case(logits=test.logits, targets=test.targets, weight=test.weight,
                    ignore_index=DEFAULT_IGNORE_INDEX if self.ignore_index is None else self.ignore_index,
                    reduction=self.reduction, label_smoothing=self.label_smoothing, regime="vectors",
                    tags=tuple(test.flags))


@dataclass(frozen=True, eq=False)
class VectorSuite:
    """A whole vectors file."""

    seed: int
    generator: str
    groups: tuple[VectorGroup, ...]
    notes: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(NOTES))

    @property
    def number_of_tests(self) -> int:
        return sum(len(g.tests) for g in self.groups)


# --- inputs ---------------------------------------------------------------------------------------


def _logits(kind: str, fmt: FloatFormat, rng: np.random.Generator) -> np.ndarray:
    """float64 logits of a kind (rounded to the dtype by the caller); 53-bit uniforms and IEEE operations only."""
    n, k = KINDS[kind][1]
    if kind in ("moderate", "single_class"):
        return (rng.random((n, k)) - 0.5) * 8.0
    if kind == "large_gap":
        z = -(0.5 + 0.5 * rng.random((n, k))) * GAP[fmt.name]
        z[:, 0] = (rng.random(n) - 0.5) * 2.0
        return z
    if kind == "huge":
        z = (rng.random((n, k)) - 0.5) * 2.0 * fmt.max
        z[0, :2] = (fmt.max, -fmt.max)
        return z
    if kind == "ties":
        z = rng.integers(-3, 4, (n, k)).astype(np.float64)
        z[0, :3] = 2.0 + z[0].max()
        z[1, :] = 0.5
        return z
    if kind == "masked":
        z = (rng.random((n, k)) - 0.5) * 8.0
        z[0, 1] = z[1, 2] = z[1, 3] = z[2, 3] = -np.inf
        return z
    if kind == "signed_zero":
        z = np.array([[-0.0, 0.0, -1.5], [0.0, -ZERO_GAP[fmt.name], -ZERO_GAP[fmt.name]]])
        return z
    if kind == "many_classes":
        z = np.full((n, k), -MANY[fmt.name])
        z[0, 0] = 0.0
        return z
    raise AssertionError(kind)


def _index_targets(kind: str, spec: GroupSpec, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.integers(0, k, n)
    if kind == "large_gap":
        t[0], t[1] = 0, k - 1  # row 1: the target's probability underflows
    elif kind == "masked":
        t[2] = 3  # the target is a masked class: infinite loss
        t[0] = 0
    elif kind in ("signed_zero", "many_classes"):
        t[-1] = 0
    if spec.ignored_rows and n >= 2:
        if spec.ignore_index is not None and 0 <= spec.ignore_index < k:
            t[t == spec.ignore_index] = 0
            t[0] = spec.ignore_index
        else:
            t[0] = spec.ignore_index
    return t.astype(np.int64)


def _prob_targets(kind: str, spec: GroupSpec, k: int, n: int, rng: np.random.Generator, fmt: FloatFormat) -> np.ndarray:
    r = rng.random((n, k))
    r[rng.random((n, k)) < 0.3] = 0.0
    if kind == "signed_zero":
        r[-1] = 0.0
        r[-1, 0] = 1.0
    if kind == "masked":
        r[2, 3] = 0.5  # mass on a masked class: infinite loss
    r[r.sum(axis=1) == 0, 0] = 1.0
    t = r / r.sum(axis=1, keepdims=True) if spec.normalized else r * 3.0
    return round_to_format(t, fmt)


def _weights(kind: str, k: int, targets: np.ndarray, rng: np.random.Generator, fmt: FloatFormat) -> np.ndarray:
    """Multiples of 1/2 in [1/2, 4] (exact in every dtype); in "moderate" a class no target uses gets 0."""
    w = rng.integers(1, 9, k) / 2.0
    if kind == "moderate":
        used = set(targets.tolist()) if targets.ndim == 1 else set(np.flatnonzero(targets.any(axis=0)).tolist())
        free = [c for c in range(k) if c not in used]
        if free:
            w[free[0]] = 0.0
    return round_to_format(w, fmt)


def _flags(kind: str, spec: GroupSpec, problem: Problem, grad: np.ndarray, loss: np.ndarray) -> tuple[str, ...]:
    fmt = problem.format
    g = grad.astype(np.float64)
    flags = [KINDS[kind][0]]
    if np.any((g != 0) & (np.abs(g) < fmt.tiny)):
        flags.append("SubnormalGradient")
    if np.any((g == 0) & np.signbit(g)):
        flags.append("NegativeZeroGradient")
    if np.all(g == 0):
        flags.append("ZeroGradient")
    if np.any(np.isinf(loss.astype(np.float64))):
        flags.append("InfiniteLoss")
    if problem.index_targets and not problem.active_rows().all():
        flags.append("IgnoredRows")
    if problem.weight is not None and np.any(problem.weight == 0):
        flags.append("ZeroWeight")
    if not problem.index_targets and not spec.normalized:
        flags.append("UnnormalizedTargets")
    return tuple(flags)


# --- the certified softmax and the modeled bugs ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Context:
    """What the bug models need: the problem, the truth, and float64 pieces computed deterministically."""

    problem: Problem
    truth: np.ndarray  # (N, K) in the dtype
    truth64: np.ndarray  # (N, K) certified float64
    p: np.ndarray  # (N, K) certified float64 softmax

    @property
    def fmt(self) -> FloatFormat:
        return self.problem.format

    def wt(self, targets: np.ndarray | None = None) -> np.ndarray:
        return (self.problem.dense_targets() if targets is None else targets) * self.problem.weights()

    def grad(self, p: np.ndarray, wt: np.ndarray, divisor: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (p * wt.sum(axis=1, keepdims=True) - wt) / divisor


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


def _missing_mean_divisor(c: _Context) -> np.ndarray | None:
    d = c.problem.divisor()
    return c.truth64 * d if c.problem.reduction == "mean" and d != 1 else None


def _reduction_ignored(c: _Context) -> np.ndarray | None:
    if c.problem.reduction == "mean" or not c.problem.active_rows().any():
        return None
    d = _mean_divisor(c.problem)
    return c.truth64 / d if d not in (0.0, 1.0) else None


def _sign_flip(c: _Context) -> np.ndarray | None:
    return -c.truth64 if np.any(c.truth64 != 0) else None


def _no_max_subtraction(c: _Context) -> np.ndarray | None:
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


def _log_of_softmax(c: _Context) -> np.ndarray | None:
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


def _epsilon_in_log(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if not pr.index_targets or pr.label_smoothing:
        return None
    p_t = np.ones(pr.n)
    rows = np.flatnonzero(pr.active_rows())
    p_t[rows] = c.p[rows, pr.targets[rows]]
    return c.truth64 * (p_t / (p_t + EPS_LOG))[:, None]


def _clipped(c: _Context) -> np.ndarray | None:
    eps = EPS_CLIP[c.fmt.name]
    p = np.clip(c.p, eps, 1.0 - eps)
    return c.grad(p, c.wt(), c.problem.divisor()) if np.any(p != c.p) else None


def _smoothing_convention(c: _Context) -> np.ndarray | None:
    pr = c.problem
    eps = pr.label_smoothing
    if not pr.index_targets or not eps or pr.k < 2:
        return None
    y = np.full((pr.n, pr.k), eps / (pr.k - 1))
    rows = np.flatnonzero(pr.active_rows())
    y[rows, pr.targets[rows]] = 1.0 - eps
    y[~pr.active_rows()] = 0.0
    return c.grad(c.p, c.wt(y), pr.divisor())


def _weight_on_every_class(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if not pr.index_targets or pr.weight is None or pr.label_smoothing:
        return None
    t = pr.dense_targets()
    active = pr.active_rows()[:, None]
    return np.where(active, pr.weights()[None, :] * (c.p - t), 0.0) / pr.divisor()


def _weighted_mean_over_rows(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if pr.weight is None or pr.reduction != "mean" or not pr.index_targets:
        return None
    return c.truth64 * pr.divisor() / pr.n


def _ignored_rows_counted(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if not pr.index_targets or pr.weight is not None or pr.reduction != "mean" or pr.active_rows().all():
        return None
    return c.truth64 * pr.divisor() / pr.n


def _ignored_rows_not_zeroed(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if not pr.index_targets or pr.active_rows().all():
        return None
    g = c.truth64.copy()
    ignored = ~pr.active_rows()
    g[ignored] = c.p[ignored] / pr.divisor()
    return g


def _soft_assumed_normalized(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if pr.index_targets:
        return None
    wt = c.wt()
    with np.errstate(invalid="ignore"):
        return (c.p - wt) / pr.divisor()


def _last_class_skipped(c: _Context) -> np.ndarray | None:
    if c.problem.k < 2:
        return None
    g = c.truth64.copy()
    g[:, -1] = 0.0
    return g


def _softmax_over_batch(c: _Context) -> np.ndarray | None:
    pr = c.problem
    if pr.n < 2:
        return None
    p = certified_softmax(np.ascontiguousarray(pr.logits.T)).T
    return c.grad(p, c.wt(), pr.divisor())


def _float32_inside(c: _Context) -> np.ndarray | None:
    if c.fmt.name != "float64":
        return None
    return round_to_format(c.truth64, FLOAT32).astype(np.float64)


def _half_sequential_sum(c: _Context) -> np.ndarray | None:
    """Z accumulated left to right in the dtype; exp by mpmath (platform independent), every step rounded."""
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
}


def _beyond_tolerance(c: _Context, case: Any) -> np.ndarray | None:
    """The truth with its largest element moved outward by 2**j ULPs, the least power of two beyond the tolerance."""
    from gradcheck.oracle import row_parts
    from gradcheck.tolerance import grad_tolerance, reference_grad

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


# --- building the suite ---------------------------------------------------------------------------


def _rejected(grad: np.ndarray, case: Any, *, strict: bool) -> bool:
    """True when verify's tolerance model rejects ``grad`` (clearly: by CLEAR_RATIO, unless not strict)."""
    from gradcheck.checking.judge import compare_values
    from gradcheck.checking.result import Failure

    outcome = compare_values(grad, case)
    if not isinstance(outcome, Failure):
        return False
    return outcome.kind == "nonfinite" or not strict or (outcome.ratio or 0.0) >= CLEAR_RATIO


def _accepted(grad: np.ndarray, case: Any) -> bool:
    from gradcheck.checking.judge import compare_values
    from gradcheck.checking.result import Failure

    return not isinstance(compare_values(grad, case), Failure)


def build_group(spec: GroupSpec, dtype: str, seed: int, group_index: int) -> VectorGroup:
    """The tests of one group: one valid test per input kind, then one invalid test per applicable bug.

    tcIds are left 0 here; :func:`build_suite` numbers all tests in file order.
    """
    from gradcheck.exact import exact_grad, exact_loss
    from gradcheck.problem import make_problem

    fmt = float_format(dtype)
    ignore = DEFAULT_IGNORE_INDEX if spec.ignore_index is None else spec.ignore_index
    empty = VectorGroup(dtype, spec.targets, spec.reduction, spec.label_smoothing, spec.weighted,
                        spec.ignore_index, ())
    valid: list[Vector] = []
    contexts: list[tuple[Vector, _Context, Any]] = []
    for kind_index, kind in enumerate(KINDS):
        if kind == "many_classes" and (dtype not in MANY or spec.name != "index"):
            continue
        rng = np.random.default_rng([seed, group_index, DTYPE_NAMES.index(dtype), kind_index])
        for _attempt in range(ATTEMPTS):
            z = round_to_format(_logits(kind, fmt, rng), fmt)
            n, k = z.shape
            if spec.targets == "index":
                t = _index_targets(kind, spec, k, n, rng)
            else:
                t = _prob_targets(kind, spec, k, n, rng, fmt)
            w = _weights(kind, k, t, rng, fmt) if spec.weighted else None
            w64 = None if w is None else w.astype(np.float64)
            options = dict(weight=w64, ignore_index=ignore, reduction=spec.reduction,
                           label_smoothing=spec.label_smoothing)
            problem = make_problem(z, t, **options)
            try:
                truth = exact_grad(z, t, **options)
                loss = np.asarray(exact_loss(z, t, **options))
                truth64 = truth.astype(np.float64) if dtype == "float64" else exact_grad(
                    z, t, dtype="float64", **options)
                break
            except CertificationError:
                # exact.py's CUTOFF enclosure cannot settle an element whose rational part is exactly a
                # rounding midpoint (shifts below -65536); draw again (deterministic)
                continue
        else:
            raise CertificationError(f"no certifiable {kind} case for {spec.name} in {dtype}")
        test = Vector(0, f"{KINDS[kind][2]}; {spec.name}", _flags(kind, spec, problem, truth, loss), z, t, w,
                      loss, truth, "valid")
        case = empty.case(test)
        if not _accepted(truth, case):
            raise AssertionError(f"the tolerance model rejects the truth: {dtype} {spec.name} {kind}")
        valid.append(test)
        contexts.append((test, _Context(problem, truth, truth64, certified_softmax(z)), case))
    invalid: list[Vector] = []
    for bug in (*BUGS, "BeyondToleranceUlps"):
        for test, ctx, case in contexts:
            g64 = _beyond_tolerance(ctx, case) if bug == "BeyondToleranceUlps" else BUGS[bug](ctx)
            if g64 is None:
                continue
            grad = round_to_format(g64, fmt)
            if _rejected(grad, case, strict=bug != "BeyondToleranceUlps"):
                comment = f"{NOTES[bug][1]} Inputs: {test.comment.split(';')[0]}."
                invalid.append(Vector(0, comment, (bug, *test.flags), test.logits, test.targets, test.weight,
                                      test.loss, grad, "invalid", bug))
                break
    return VectorGroup(dtype, spec.targets, spec.reduction, spec.label_smoothing, spec.weighted, spec.ignore_index,
                       tuple(valid + invalid))


def build_suite(seed: int = DEFAULT_SEED, *, dtypes: tuple[str, ...] = DTYPE_NAMES,
                groups: tuple[GroupSpec, ...] = GROUPS) -> VectorSuite:
    """Every group in every dtype (dtype-major), tests numbered 1.. in file order."""
    from gradcheck import __version__

    built = [build_group(spec, dtype, seed, i) for dtype in dtypes for i, spec in enumerate(groups)]
    numbered, tc = [], 0
    for group in built:
        tests = []
        for test in group.tests:
            tc += 1
            tests.append(Vector(tc, test.comment, test.flags, test.logits, test.targets, test.weight, test.loss,
                                test.grad, test.result, test.bug))
        numbered.append(VectorGroup(group.dtype, group.targets, group.reduction, group.label_smoothing,
                                    group.weighted, group.ignore_index, tuple(tests)))
    return VectorSuite(seed, f"gradcheck {__version__}", tuple(numbered))


# --- the checker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorOutcome:
    """One test against the checker and (for its inputs) the implementation.

    Attributes:
        tc_id: the test.
        expected: "valid" or "invalid".
        classified: the checker classified the test's own gradient as labelled (valid accepted,
            invalid rejected).
        implementation_ok: the implementation's gradient on these inputs passed ``verify``'s checks
            (None when the inputs were already run for an earlier test).
        message: what went wrong, empty when nothing did.
        resembles: modeled bugs (flags) whose gradient on these inputs the implementation's is closer to
            than to the truth.
    """

    tc_id: int
    expected: str
    classified: bool
    implementation_ok: bool | None
    message: str = ""
    resembles: tuple[str, ...] = ()


@dataclass(frozen=True)
class VectorCheck:
    """The result of :func:`check_vectors`; ``passed`` when the implementation and the checker are both right."""

    function: str
    outcomes: tuple[VectorOutcome, ...]

    @property
    def passed(self) -> bool:
        return all(o.classified and o.implementation_ok is not False for o in self.outcomes)

    @property
    def implementation_failures(self) -> tuple[VectorOutcome, ...]:
        return tuple(o for o in self.outcomes if o.implementation_ok is False)

    @property
    def misclassified(self) -> tuple[VectorOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.classified)


def _key(group_index: int, test: Vector) -> tuple:
    w = b"" if test.weight is None else test.weight.tobytes()
    return group_index, test.logits.tobytes(), test.targets.tobytes(), w


def check_vectors(grad_fn: Callable[..., Any], suite: VectorSuite, *, dtypes: tuple[str, ...] | None = None,
                  targets: tuple[str, ...] | None = None,
                  progress: Callable[[int], None] | None = None) -> VectorCheck:
    """Run ``grad_fn`` on the inputs of every test and check the vectors themselves.

    For each test the checker (verify's tolerance model, :func:`gradcheck.verify.compare_values`)
    must accept its gradient when it is valid and reject it when invalid; ``grad_fn`` runs once
    per distinct input and must pass :func:`gradcheck.verify.check` (shape, dtype, no mutation,
    determinism, within tolerance of the truth).

    Args:
        grad_fn: as for :func:`gradcheck.verify`.
        suite: e.g. from :func:`gradcheck.report.vector_file.load_vectors`.
        dtypes, targets: run only the groups of these dtypes / target kinds (all when None).
        progress: called with 1 after each test.
    """
    from gradcheck.checking.judge import check
    from gradcheck.checking.messages import _name
    from gradcheck.checking.result import Failure

    outcomes = []
    seen: dict[tuple, Any] = {}
    for gi, group in enumerate(suite.groups):
        if (dtypes and group.dtype not in dtypes) or (targets and group.targets not in targets):
            continue
        bugs_here = [t for t in group.tests if t.result == "invalid"]
        for test in group.tests:
            case = group.case(test)
            ok_vector = _accepted(test.grad, case) if test.result == "valid" else not _accepted(test.grad, case)
            message = "" if ok_vector else (
                f"tcId {test.tc_id}: the checker {'rejects' if test.result == 'valid' else 'accepts'} this "
                f"{test.result} gradient; the file does not match this gradcheck's tolerance model")
            key = _key(gi, test)
            impl_ok = None
            resembles: tuple[str, ...] = ()
            if key not in seen:
                outcome = check(grad_fn, case)
                seen[key] = outcome
                impl_ok = not isinstance(outcome, Failure)
                if not impl_ok:
                    message = (message + "; " if message else "") + f"tcId {test.tc_id}: {outcome.message}"
                    resembles = _resembles(grad_fn, case, test, [b for b in bugs_here if _key(gi, b) == key])
            outcomes.append(VectorOutcome(test.tc_id, test.result, ok_vector, impl_ok, message, resembles))
            if progress:
                progress(1)
    return VectorCheck(_name(grad_fn), tuple(outcomes))


def _resembles(grad_fn: Callable[..., Any], case: Any, valid: Vector, bugs: list[Vector]) -> tuple[str, ...]:
    """The modeled bugs whose gradient the implementation's output is closer to than to the truth."""
    from gradcheck.adapters import to_numpy

    try:
        got = to_numpy(grad_fn(case.logits.copy(), case.targets.copy(), **case.options())).astype(np.float64)
    except Exception:  # noqa: BLE001 - the failure was already reported
        return ()
    if got.shape != valid.grad.shape:
        return ()

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        same_nan = np.isnan(a) & np.isnan(b)
        with np.errstate(invalid="ignore"):
            d = np.where(same_nan, 0.0, np.abs(a - b))
        return float(np.nan_to_num(d, nan=np.inf).max(initial=0.0))

    to_truth = distance(got, valid.grad.astype(np.float64))
    return tuple(b.bug for b in bugs if b.bug and distance(got, b.grad.astype(np.float64)) < to_truth)


__all__ = ["BUGS", "GROUPS", "KINDS", "NOTES", "GroupSpec", "Vector", "VectorCheck", "VectorGroup",
           "VectorOutcome", "VectorSuite", "build_suite", "certified_softmax", "check_vectors"]
