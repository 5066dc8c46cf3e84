"""Building the suite: seeded inputs of each kind, their certified truth, and one invalid test per bug that shows.

Everything here is platform independent, so the file is reproducible bit for bit: the inputs come from
integer and 53-bit uniform draws and IEEE basic operations; the truth is correctly rounded; the bugs
are computed from the certified float64 softmax with basic operations, and their few elementary
functions with mpmath.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradcheck.dtypes import DTYPE_NAMES, FloatFormat, float_format, round_to_format
from gradcheck.errors import CertificationError, InvalidArgument
from gradcheck.problem import DEFAULT_IGNORE_INDEX, Problem
from gradcheck.vectors.bugs import BARELY_BEYOND, BUGS, make_context
from gradcheck.vectors.check import _accepted
from gradcheck.vectors.suite import (GAP, GROUPS, KINDS, LSE_LEVEL, LSE_SPREAD, MANY, NOTES, SATURATION, UPSTREAM_QUARTERS,
                                     UPSTREAM_SCALARS, ZERO_GAP, GroupSpec, Vector, VectorGroup, VectorSuite)

DEFAULT_SEED = 0
CLEAR_RATIO = 2.0  # an invalid gradient is at least this many tolerances off (or not finite)
ATTEMPTS = 8  # draws per input kind before giving up on certifying its truth


# --- inputs ---------------------------------------------------------------------------------------


def _logits(kind: str, fmt: FloatFormat, rng: np.random.Generator, softcap: float | None = None) -> np.ndarray:
    """float64 logits of a kind (rounded to the dtype by the caller); 53-bit uniforms and IEEE operations only."""
    n, k = KINDS[kind][1]
    if kind == "saturated":  # |z| in [8c, 40c] with random signs; one element of row 0 inside the cap
        assert softcap is not None
        lo, hi = SATURATION
        sign = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0)
        z = sign * (lo + (hi - lo) * rng.random((n, k))) * softcap
        z[0, 0] = (rng.random() - 0.5) * softcap
        z[1, :] = np.abs(z[1, :])  # every logit of row 1 beyond +8c: z' all near c
        return z
    if kind == "large_lse":  # row 0 near +LSE_LEVEL, row 1 near -LSE_LEVEL
        z = (rng.random((n, k)) - 0.5) * 2.0 * LSE_SPREAD
        z[0] += LSE_LEVEL[fmt.name]
        z[1] -= LSE_LEVEL[fmt.name]
        return z
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


def _grad_output(spec: GroupSpec, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """The test's upstream gradient (float64, exact in every dtype), or None for a group without one.

    "none": distinct multiples of 1/4 in [-2, 2], one per row (zeros and negatives among them);
    "mean"/"sum": one scalar of UPSTREAM_SCALARS.
    """
    if not spec.upstream:
        return None
    if spec.reduction == "none":
        quarters = np.arange(-UPSTREAM_QUARTERS, UPSTREAM_QUARTERS + 1)
        return rng.permutation(quarters)[:n] / 4.0
    return np.array(UPSTREAM_SCALARS[int(rng.integers(0, len(UPSTREAM_SCALARS)))])


def _applies(kind: str, spec: GroupSpec, dtype: str) -> bool:
    """Whether a group holds a test of this kind."""
    if kind == "many_classes":
        return dtype in MANY and spec.name == "index"
    if kind == "saturated":
        return spec.softcap is not None
    if kind == "large_lse":
        return bool(spec.lse_square_scale)
    return True


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
    if spec.lse_square_scale:
        flags.append("ZLoss")
    if spec.softcap is not None:
        flags.append("Softcap")
    if spec.upstream:
        flags.append("UpstreamGradient")
    return tuple(flags)


# --- building the suite ---------------------------------------------------------------------------


def _rejected(grad: np.ndarray, case: Any, *, strict: bool) -> bool:
    """True when verify's tolerance model rejects ``grad`` (clearly: by CLEAR_RATIO, unless not strict)."""
    from gradcheck.checking.judge import compare_values
    from gradcheck.checking.result import Failure

    outcome = compare_values(grad, case)
    if not isinstance(outcome, Failure):
        return False
    return outcome.kind == "nonfinite" or not strict or (outcome.ratio or 0.0) >= CLEAR_RATIO


def build_group(spec: GroupSpec, dtype: str, seed: int, group_index: int) -> VectorGroup:
    """The tests of one group: one valid test per input kind, then one invalid test per applicable bug.

    tcIds are left 0 here; :func:`build_suite` numbers all tests in file order.
    """
    from gradcheck.exact import exact_grad, exact_loss
    from gradcheck.problem import make_problem

    fmt = float_format(dtype)
    ignore = DEFAULT_IGNORE_INDEX if spec.ignore_index is None else spec.ignore_index
    empty = VectorGroup(dtype, spec.targets, spec.reduction, spec.label_smoothing, spec.weighted,
                        spec.ignore_index, (), spec.lse_square_scale, spec.softcap)
    kernel = dict(lse_square_scale=spec.lse_square_scale, softcap=spec.softcap) if spec.kernel else {}
    valid: list[Vector] = []
    contexts: list[tuple[Vector, Any, Any]] = []
    for kind_index, kind in enumerate(KINDS):
        if not _applies(kind, spec, dtype):
            continue
        rng = np.random.default_rng([seed, group_index, DTYPE_NAMES.index(dtype), kind_index])
        for _attempt in range(ATTEMPTS):
            z = round_to_format(_logits(kind, fmt, rng, spec.softcap), fmt)
            n, k = z.shape
            if spec.targets == "index":
                t = _index_targets(kind, spec, k, n, rng)
            else:
                t = _prob_targets(kind, spec, k, n, rng, fmt)
            w = _weights(kind, k, t, rng, fmt) if spec.weighted else None
            w64 = None if w is None else w.astype(np.float64)
            g = _grad_output(spec, n, rng)
            options = dict(weight=w64, ignore_index=ignore, reduction=spec.reduction,
                           label_smoothing=spec.label_smoothing, **kernel)
            upstream = {} if g is None else {"grad_output": g}
            problem = make_problem(z, t, **options, **upstream)
            try:
                truth = exact_grad(z, t, **options, **upstream)
                loss = np.asarray(exact_loss(z, t, **options))
                truth64 = truth.astype(np.float64) if dtype == "float64" else exact_grad(
                    z, t, dtype="float64", **options, **upstream)
                break
            except CertificationError:
                # exact.py's CUTOFF enclosure cannot settle an element whose rational part is exactly a
                # rounding midpoint (shifts below -65536); draw again (deterministic)
                continue
        else:
            raise CertificationError(f"no certifiable {kind} case for {spec.name} in {dtype}")
        g_dtype = None if g is None else round_to_format(g, fmt)
        test = Vector(0, f"{KINDS[kind][2]}; {spec.name}", _flags(kind, spec, problem, truth, loss), z, t, w,
                      loss, truth, "valid", None, g_dtype)
        case = empty.case(test)
        try:
            accepted = _accepted(truth, case)
        except (ArithmeticError, InvalidArgument):
            # the dtype's own contract has no error model for these inputs (docs/tolerance.md: eps_Z >= 1,
            # e.g. bfloat16 with the softcap 30, where z' may be off by 15 u |z'| ~ 1.8, step K1): the
            # tolerance raises ArithmeticError, which the judge turns into InvalidArgument for the asked
            # contract. No vector can be labelled for every contract: the group holds no test of this kind
            if not spec.kernel:
                raise
            continue
        if not accepted:
            raise AssertionError(f"the tolerance model rejects the truth: {dtype} {spec.name} {kind}")
        valid.append(test)
        contexts.append((test, make_context(problem, truth, truth64), case))
    invalid: list[Vector] = []
    for bug, model in BUGS.items():
        for test, ctx, case in contexts:
            g64 = model(ctx)
            if g64 is None:
                continue
            grad = round_to_format(g64, fmt)
            if _rejected(grad, case, strict=bug not in BARELY_BEYOND):
                comment = f"{NOTES[bug][1]} Inputs: {test.comment.split(';')[0]}."
                invalid.append(Vector(0, comment, (bug, *test.flags), test.logits, test.targets, test.weight,
                                      test.loss, grad, "invalid", bug, test.grad_output))
                break
    return VectorGroup(dtype, spec.targets, spec.reduction, spec.label_smoothing, spec.weighted, spec.ignore_index,
                       tuple(valid + invalid), spec.lse_square_scale, spec.softcap)


def build_suite(seed: int = DEFAULT_SEED, *, dtypes: tuple[str, ...] = DTYPE_NAMES,
                groups: tuple[GroupSpec, ...] = GROUPS) -> VectorSuite:
    """Every group in every dtype, tests numbered 1.. in file order.

    The plain groups come first (dtype-major), then the kernel groups (dtype-major): adding kernel
    groups leaves the plain groups and their tcIds unchanged. A group's seed is its index in ``groups``.
    """
    from gradcheck import __version__

    order = [(dtype, i, spec) for plain in (True, False) for dtype in dtypes for i, spec in enumerate(groups)
             if spec.kernel != plain]
    built = [build_group(spec, dtype, seed, i) for dtype, i, spec in order]
    numbered, tc = [], 0
    for group in built:
        tests = []
        for test in group.tests:
            tc += 1
            tests.append(Vector(tc, test.comment, test.flags, test.logits, test.targets, test.weight, test.loss,
                                test.grad, test.result, test.bug, test.grad_output))
        numbered.append(VectorGroup(group.dtype, group.targets, group.reduction, group.label_smoothing,
                                    group.weighted, group.ignore_index, tuple(tests), group.lse_square_scale,
                                    group.softcap))
    return VectorSuite(seed, f"gradcheck {__version__}", tuple(numbered))
