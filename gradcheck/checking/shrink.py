"""Simplifying a failing case: drop rows and classes, round values (the upstream gradient's too), while
it fails the same way.

Hypothesis has already shrunk the regime, the shape and the seed; this works on the values it drew,
within a bounded budget of ``grad_fn`` checks.

Under ``verify(shapes=...)`` the asked shapes are not left except by dropping rows: a smaller case
is kept only when it fails the same way (same kind, still clearly wrong), so it is a valid
reproduction; a kernel that accepts only the asked shapes raises on the smaller one, a different
failure, and keeps its shape. Logits of 3-D and more lose only leading-axis entries (batch elements),
never classes or inner positions, so the reproduction stays in the caller's layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gradcheck.checking.judge import check, same_bits
from gradcheck.checking.messages import PRINT_LIMIT
from gradcheck.checking.result import Failure, FailureKind
from gradcheck.dtypes import float_format, is_supported_float, round_to_format
from gradcheck.errors import InvalidArgument

if TYPE_CHECKING:
    from gradcheck.problem import Case

SIMPLIFY_BUDGET = 400  # grad_fn checks spent on simplifying a failing case's values
MIN_SHRUNK_RATIO = 2.0  # a simplified mismatch keeps at least min(its ratio, this) x the tolerance


def simplify(grad_fn: Callable[..., Any], failure: Failure, *, timeout: float | None = None,
             precision: str | None = None, inplace: str = "flag") -> Failure:
    """Drop rows and classes and round values while the case fails the same way (a bounded budget).

    A call that hung is not simplified (each attempt could cost ``timeout`` seconds); ``timeout``
    limits each attempt's calls as in the search.
    """
    if failure.kind == FailureKind.TIMEOUT:
        return failure
    budget = [SIMPLIFY_BUDGET]
    # a simpler mismatch must stay clearly wrong, not creep to the tolerance's edge
    keep_ratio = min(failure.ratio or 0.0, MIN_SHRUNK_RATIO)

    def attempt(candidate: Case) -> Failure | None:
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        outcome = check(grad_fn, candidate, timeout=timeout, precision=precision, inplace=inplace)
        if isinstance(outcome, Failure) and outcome.kind == failure.kind and (outcome.ratio or 0.0) >= keep_ratio:
            return outcome
        return None

    current = failure
    layout = failure.case.problem.caller_layout
    # logits of 3-D and more (or a class axis first): only the leading batch axis is shortened, so the
    # reproduction keeps the caller's layout; (N, K) loses rows and classes (scale: layouts)
    axes = (0, 1) if layout.plain and len(layout.shape) == 2 else (() if layout.axis == 0 else (0,))
    for axis in axes:
        current = _drop_chunks(current, axis, attempt)
    current = _round_values(current, attempt)
    return current


def _drop_chunks(failure: Failure, axis: int, attempt: Callable[[Case], Failure | None]) -> Failure:
    case = failure.case
    size = case.logits.shape[axis]
    chunk = size // 2
    while chunk >= 1 and size > 1:
        if -(-size // chunk) > 32:  # too many pieces to try: stop at this granularity
            break
        start = 0
        while start < case.logits.shape[axis] and case.logits.shape[axis] > 1:
            keep = np.ones(case.logits.shape[axis], dtype=bool)
            keep[start:start + chunk] = False
            candidate = _subset(case, keep, axis)
            found = attempt(candidate) if candidate is not None and keep.any() else None
            if found is not None:
                failure, case = found, found.case
            else:
                start += chunk
        size = case.logits.shape[axis]
        chunk //= 2
    return failure


def _variant(case: Case, **changes: Any) -> Case | None:
    """The case with some values changed, or None when that is not a valid case."""
    try:
        return case.replace(**changes)
    except InvalidArgument:
        return None


def _subset(case: Case, keep: np.ndarray, axis: int) -> Case | None:
    if axis == 0:
        g = case.problem.grad_output
        rows = {} if g is None or g.ndim == 0 else {"grad_output": g[keep]}  # one upstream value per row ("none")
        return _variant(case, logits=case.logits[keep], targets=case.targets[keep], **rows)
    if case.targets.ndim == 1:
        if 0 <= case.ignore_index < case.logits.shape[1]:
            return None  # shifting class numbers would change which rows are ignored
        active = case.targets != case.ignore_index
        if not np.all(keep[case.targets[active]]):
            return None
        shift = np.cumsum(~keep)
        targets = case.targets.copy()
        targets[active] -= shift[case.targets[active]]
    else:
        targets = case.targets[:, keep]
    weight = None if case.weight is None else case.weight[keep]
    return _variant(case, logits=case.logits[:, keep], targets=targets, weight=weight)


def _values(case: Case, field_name: str) -> np.ndarray | None:
    if field_name == "grad_output":  # a scalar or (N,) of the dtype, as the grad_fn gets it
        g = case.grad_output
        return None if g is None else np.array(g)
    return getattr(case, field_name)


def _round_values(failure: Failure, attempt: Callable[[Case], Failure | None]) -> Failure:
    """Replace each logit (then soft target, weight and upstream gradient) by a simpler number when it
    still fails; an upstream gradient is tried at 1 first (the loss's own gradient)."""
    for field_name in ("logits", "targets", "weight", "grad_output"):
        array = _values(failure.case, field_name)
        if array is None or not is_supported_float(array.dtype) or array.size > PRINT_LIMIT:
            continue
        fmt = float_format(array.dtype)
        for flat in range(array.size):
            current = _values(failure.case, field_name)
            value = float(current.reshape(-1)[flat].astype(np.float64))
            simpler = _simpler(value)
            if field_name == "grad_output":
                simpler = [1.0] + [v for v in simpler if v != 1.0] if value != 1.0 else simpler
            for simple in simpler:
                trial = current.copy()
                trial.reshape(-1)[flat] = round_to_format(np.array(simple), fmt)
                if same_bits(trial, current):
                    continue
                candidate = _variant(failure.case, **{field_name: trial})
                found = None if candidate is None else attempt(candidate)
                if found is not None:
                    failure = found
                    break
    return failure


def _simpler(x: float) -> list[float]:
    if x == 0:
        return []
    if not np.isfinite(x):
        return [0.0]
    out = [0.0, 1.0 if x > 0 else -1.0]
    for digits in (1, 2, 3):
        out.append(float(f"{x:.{digits}g}"))
    return [v for v in out if v != x]
