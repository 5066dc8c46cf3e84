"""What a vectors suite is: its data types, the tables of groups, input kinds and flags, and the numbers that shape them.

A suite holds test groups (one dtype and one set of options each). Every *valid* test carries the
loss and gradient correctly rounded to the dtype (:func:`gradcheck.exact_loss`, :func:`gradcheck.exact_grad`).
Every *invalid* test repeats the inputs of a valid test of its group with the gradient a known bug
produces (missing 1/N, sign flip, no max subtraction, ...); a checker must reject it.

The kernel groups (z-loss, softcap, upstream gradient: issue 12, Liger-Kernel's convention) come after
every plain group in the file, so adding them left the plain groups and their tcIds as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcheck.problem import DEFAULT_IGNORE_INDEX, Case
from gradcheck.regimes import param

# The vectors' input kinds take their numbers from the one regime catalogue (gradcheck/regimes.py).
GAP = param("large_gap", "vector_gap")
ZERO_GAP = param("signed_zero", "zero_gap")
MANY = param("many_classes", "level")
MANY_K = int(param("many_classes", "vector_classes"))
EPS_LOG = 1e-7  # the epsilon of the EpsilonInLog bug: -log(p_t + EPS_LOG)
EPS_CLIP = {"float64": 1e-7, "float32": 1e-7, "float16": 1e-4, "bfloat16": 1e-4}  # ClippedProbabilities (Keras style)
# The kernel kinds. "saturated": |z| / c in SATURATION (tanh(z/c) = +-1 to the dtype, the chain factor
# 1 - tanh^2 tiny); "large_lse": a row near +LSE_LEVEL and one near -LSE_LEVEL, so the z-loss term
# 2 lambda lse p dominates (PaLM-size logits), the logits within LSE_SPREAD of the level.
SATURATION = (float(param("saturated", "vector_ratio_low")), float(param("saturated", "vector_ratio_high")))
LSE_LEVEL = param("large_lse", "level")
LSE_SPREAD = float(param("large_lse", "spread"))
# Upstream gradients, exact in every dtype: "none" draws distinct multiples of 1/4 in [-2, 2] per row,
# "mean"/"sum" one scalar of UPSTREAM_SCALARS (never 1, the default).
UPSTREAM_QUARTERS = 8
UPSTREAM_SCALARS = (-2.0, -0.75, -0.5, 0.25, 1.5, 3.0)


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
        lse_square_scale: the z-loss factor lambda (0: none).
        softcap: the softcap c, or None.
        upstream: tests carry an upstream gradient ``grad_output`` (a scalar for "mean"/"sum", one
            value per row, differing between rows, for "none").
    """

    name: str
    targets: str
    reduction: str = "mean"
    label_smoothing: float = 0.0
    weighted: bool = False
    ignore_index: int | None = DEFAULT_IGNORE_INDEX
    ignored_rows: bool = False
    normalized: bool = True
    lse_square_scale: float = 0.0
    softcap: float | None = None
    upstream: bool = False

    @property
    def kernel(self) -> bool:
        """True for a group with a kernel option (z-loss, softcap or an upstream gradient)."""
        return bool(self.lse_square_scale) or self.softcap is not None or self.upstream


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
    # the kernel groups (issue 12); built after all the groups above, in every dtype
    GroupSpec("index_zloss", "index", lse_square_scale=0.125),
    GroupSpec("index_zloss_smoothed_weighted_ignored", "index", label_smoothing=0.1, weighted=True, ignored_rows=True,
              lse_square_scale=0.0625),
    GroupSpec("index_softcap", "index", softcap=5.0),
    GroupSpec("index_upstream", "index", upstream=True),
    GroupSpec("index_none_upstream", "index", reduction="none", ignored_rows=True, upstream=True),
    GroupSpec("index_sum_zloss_softcap_upstream", "index", reduction="sum", lse_square_scale=1e-4, softcap=30.0,
              upstream=True),
    GroupSpec("index_none_kernel_all_options", "index", reduction="none", label_smoothing=0.1, weighted=True,
              ignored_rows=True, lse_square_scale=1e-4, softcap=30.0, upstream=True),
    GroupSpec("probs_zloss_softcap_smoothed_weighted", "probs", label_smoothing=0.1, weighted=True, ignore_index=None,
              lse_square_scale=0.0625, softcap=5.0),
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
    # kernel kinds: only in the groups with the option they exercise
    "saturated": ("SaturatedSoftcap", (2, 4), "logits far beyond the softcap (|z| >> c): tanh saturates"),
    "large_lse": ("LargeLogSumExp", (2, 4), "logits near +300 and -300: the z-loss term dominates"),
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
    "ZLoss": ("EDGE_CASE", "The group's lse_square_scale lambda > 0: each counted row adds lambda * logsumexp(z')^2, unweighted, divided under 'mean' by the number of counted rows (N for probabilities); the gradient adds 2 lambda lse p / Dz (Liger-Kernel's convention; torch has no z-loss)."),
    "Softcap": ("EDGE_CASE", "The group's softcap c: the logits become z' = c tanh(z / c) first (-inf becomes -c, not masked), and the gradient is dL/dz' (1 - tanh^2(z / c))."),
    "UpstreamGradient": ("EDGE_CASE", "The test carries gradOutput g (a scalar for 'mean'/'sum', one per row for 'none'): the gradient is the vector-Jacobian product g * dL/dz, 0 on ignored rows."),
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
    "ZLossSmoothedTarget": ("MODELED_BUG", "The z-loss gradient 2 lambda lse (p - eps/K) under label smoothing instead of 2 lambda lse p (an old Liger-Kernel kernel)."),
    "SoftcapTimesLogit": ("MODELED_BUG", "The softcap as z tanh(z / c) instead of c tanh(z / c) (unsloth-zoo #593), differentiated as such."),
    "UpstreamIgnored": ("MODELED_BUG", "The upstream gradient ignored: the gradient for grad_output = 1 (Liger-Kernel #678 for reduction='none')."),
    "UpstreamFirstRowOnly": ("MODELED_BUG", "grad_output[0] used for every row under reduction='none' (TransformerEngine #2139)."),
    "ZLossClassWeighted": ("MODELED_BUG", "The z-loss term of each row multiplied by its target's class weight."),
    "ZLossDividedByWeights": ("MODELED_BUG", "The z-loss term divided under 'mean' by the cross-entropy's divisor (the sum of the targets' weights) instead of the number of counted rows."),
    "ZLossOnIgnoredRows": ("MODELED_BUG", "Ignored rows get the z-loss gradient 2 lambda lse p / Dz instead of zero."),
    "ZLossFactorTwoMissing": ("MODELED_BUG", "The z-loss gradient lambda lse p instead of 2 lambda lse p (the derivative of lse^2 is 2 lse p)."),
    "SoftcapChainRuleMissing": ("MODELED_BUG", "The gradient with respect to the capped logits z' returned: the factor 1 - tanh^2(z / c) is missing."),
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
        grad_output: the upstream gradient in the dtype (shape ``()`` or ``(N,)``), or None (ones).
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
    grad_output: np.ndarray | None = None


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
    lse_square_scale: float = 0.0
    softcap: float | None = None

    @property
    def kernel(self) -> bool:
        """True when the group has a kernel option or its tests carry an upstream gradient."""
        return bool(self.lse_square_scale) or self.softcap is not None or any(
            t.grad_output is not None for t in self.tests)

    def case(self, test: Vector) -> Any:
        """The test's inputs as a :class:`gradcheck.problem.Case` (what ``verify`` checks)."""
        g = None if test.grad_output is None else test.grad_output.astype(np.float64)
        return Case.make(test.logits, test.targets, weight=test.weight,
                         ignore_index=DEFAULT_IGNORE_INDEX if self.ignore_index is None else self.ignore_index,
                         reduction=self.reduction, label_smoothing=self.label_smoothing,
                         lse_square_scale=self.lse_square_scale, softcap=self.softcap, grad_output=g,
                         regime="vectors", tags=tuple(test.flags))


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

