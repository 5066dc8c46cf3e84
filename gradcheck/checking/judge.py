"""Judging one case: call ``grad_fn`` on private copies and compare its result with the truth.

The result must have the logits' shape and dtype, leave the inputs untouched, repeat bit for bit, be
finite where the truth is, and lie within the per-element tolerance of :mod:`gradcheck.tolerance`
(docs/tolerance.md) of the truth. A value is reported wrong only when that is certain: the float64
oracle's rigorous error bound is added to the tolerance, and elements within that band get the
benefit of the doubt (docs/tolerance.md, "Deciding a failure").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gradcheck.adapters import to_numpy
from gradcheck.checking.result import Failure, FailureKind
from gradcheck.ulps import ulp_distance
from gradcheck.dtypes import bit_pattern, float_format, is_supported_float, round_to_format
from gradcheck.exact import certified_grad
from gradcheck.oracle import row_parts
from gradcheck.reference import reference_grad
from gradcheck.tolerance import grad_tolerance

if TYPE_CHECKING:
    from gradcheck.problem import Case


def check(grad_fn: Callable[..., Any], case: Case) -> Failure | tuple[float, float]:
    """Check one case: a :class:`Failure`, or (worst ULPs, worst error / tolerance)."""
    first = _call(grad_fn, case)
    if isinstance(first, Failure):
        return first
    second = _call(grad_fn, case)
    if isinstance(second, Failure):
        return second
    fmt = float_format(case.logits.dtype)
    a_bits, b_bits = first.view(fmt.int_dtype), second.view(fmt.int_dtype)
    if not np.array_equal(a_bits, b_bits):
        where = tuple(int(i) for i in np.argwhere(a_bits != b_bits)[0])
        return Failure(
            FailureKind.NONDETERMINISM, f"grad_fn returned different values for the same input at {where}: "
            f"{float(first[where])!r}, then {float(second[where])!r}", case, where,
            got=float(first[where]),
        )
    return compare_values(first, case)


def compare_values(got: np.ndarray, case: Case) -> Failure | tuple[float, float]:
    """Compare a result of the right shape and dtype with the truth (docs/tolerance.md).

    An element is wrong when ``|got - reference| > tolerance + bound``: then ``|got - truth|`` exceeds
    the tolerance for certain. The band below (at most ``bound`` wide, about 1e-3 of the tolerance)
    gets the benefit of the doubt.
    """
    problem = case.problem
    fmt = problem.format
    parts = row_parts(problem.logits)
    ref, bound = reference_grad(problem, parts)
    g64 = ref.astype(np.float64)
    tol = grad_tolerance(problem, parts, g64)
    bad = ~np.isfinite(got.astype(np.float64))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return Failure(
            FailureKind.NONFINITE, f"grad_fn returned {float(got[where])!r} at {where} where the truth is finite "
            f"({g64[where]!r})", case, where, expected=float(g64[where]), got=float(got[where]),
        )
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got.astype(ref.dtype) - ref).astype(np.float64)
        ratio = np.where(err == 0, 0.0, err / tol)
    ulps = ulp_distance(got, round_to_format(g64, fmt))
    wrong = err > tol + bound
    if wrong.any():
        flat = np.where(wrong, ratio, -1.0)
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), flat.shape))
        return Failure(
            FailureKind.MISMATCH, f"gradient differs from the truth by {ratio[where]:.3g} x the tolerance at {where}",
            case, where, expected=float(g64[where]), got=float(got[where]), ulps=float(ulps[where]),
            tolerance=float(tol[where]), ratio=float(ratio[where]),
        )
    return float(ulps.max(initial=0.0)), float(ratio.max(initial=0.0))


def finalize(failure: Failure) -> Failure:
    """Report the expected value of the worst element correctly rounded to the dtype (the certified truth)."""
    if failure.kind not in (FailureKind.MISMATCH, FailureKind.NONFINITE) or failure.index is None:
        return failure
    problem = failure.case.problem
    fmt = problem.format
    if fmt.name == "float64" and problem.logits.size > 4096:
        return failure  # the float64 oracle value (within its bound) is reported
    expected = float(certified_grad(problem, fmt)[failure.index])
    ulps = float(ulp_distance(np.array(failure.got, dtype=fmt.dtype), np.array(expected, dtype=fmt.dtype)))
    return Failure(
        failure.kind, failure.message, failure.case, failure.index, expected, failure.got, ulps,
        failure.tolerance, failure.ratio,
    )


def _call(grad_fn: Callable[..., Any], case: Case) -> Failure | np.ndarray:
    """Call grad_fn on private copies; check it raised nothing, mutated nothing, and the shape and dtype."""
    logits, targets = case.logits.copy(), case.targets.copy()
    options = case.options()
    weight = options.get("weight")
    weight_before = None if weight is None else weight.copy()
    try:
        result = grad_fn(logits, targets, **options)
    except Exception as exc:  # noqa: BLE001 - any exception is the finding
        return Failure(FailureKind.EXCEPTION, f"grad_fn raised {type(exc).__name__}: {exc}", case)
    for name, now, before in (("logits", logits, case.logits), ("targets", targets, case.targets),
                              ("weight", weight, weight_before)):
        if now is not None and not same_bits(now, before):
            where = tuple(int(i) for i in np.argwhere(_bits(now) != _bits(before))[0])
            return Failure(
                FailureKind.MUTATION, f"grad_fn modified its {name} argument in place: {name}{list(where)} was "
                f"{before[where]!r}, became {now[where]!r}", case, where,
            )
    try:
        got = to_numpy(result)
    except Exception as exc:  # noqa: BLE001
        return Failure(FailureKind.TYPE, f"grad_fn returned {type(result).__name__}, not an array ({exc})", case)
    fmt = float_format(case.logits.dtype)
    if got.shape != case.logits.shape:
        return Failure(
            FailureKind.SHAPE, f"grad_fn returned shape {got.shape} for logits of shape {case.logits.shape}", case,
        )
    if got.dtype != fmt.dtype:
        if not hasattr(result, "dtype"):  # a list or tuple: values must be exact in the dtype
            got = got.astype(fmt.dtype)
        else:
            return Failure(
                FailureKind.DTYPE, f"grad_fn returned dtype {got.dtype} for logits of dtype {fmt.name}", case,
            )
    return np.ascontiguousarray(got)


def _bits(x: np.ndarray) -> np.ndarray:
    """Bit patterns of a float array (so that NaN equals NaN and -0 differs from 0); ints unchanged."""
    return bit_pattern(x) if is_supported_float(x.dtype) else np.asarray(x)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits (NaN equals NaN, -0 differs from 0)."""
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))
