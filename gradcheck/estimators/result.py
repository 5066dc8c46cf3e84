"""The result every gradient method returns, its status codes, and the helpers that build it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from gradcheck.dtypes import FLOAT64, FloatFormat, round_to_format
from gradcheck.problem import Problem


class Status(IntEnum):
    """How a method ended, ordered from best to worst (a result reports its worst element).

    Attributes:
        CONVERGED: the method finished normally; ``error`` describes the whole gradient.
        ERROR_INCREASED: an iterative method stopped because its error estimate began to grow
            (rounding overtook truncation); the best iterate is returned.
        ITERATION_LIMIT: an iterative method reached its iteration or precision cap before its
            own convergence test passed; the last iterate is returned with its estimate.
        NON_FINITE: some element is not finite (e.g. a finite difference of an infinite loss);
            those elements are NaN with an infinite error.
        UNSUPPORTED: the method cannot work on this input (complex step with a non-analytic
            option, finite differences in float16); the gradient is all NaN, the error all inf.
    """

    CONVERGED = 0
    ERROR_INCREASED = 1
    ITERATION_LIMIT = 2
    NON_FINITE = 3
    UNSUPPORTED = 4


@dataclass(frozen=True, eq=False)
class MethodResult:
    """A gradient with its error estimate, from one method.

    Attributes:
        grad: the gradient, in the logits' dtype and shape.
        error: per element, an estimate (``bound=False``) or a rigorous bound (``bound=True``) of
            ``|grad - exact gradient|``; it includes the final rounding of ``grad`` to its dtype.
            float64, the shape of ``grad``; inf where the method gave no value.
        bound: True when ``error`` is a proven bound, False when it is an estimate.
        evaluations: function evaluations used (loss evaluations for finite differences, each
            counting one vectorized call over the batch; 1 for a closed form or autodiff call).
        status: see :class:`Status`.
        method: the registry name of the method.
        reason: why the status is not CONVERGED (empty otherwise).
        details: method-specific diagnostics (steps, precisions, compile and call seconds).
    """

    grad: np.ndarray
    error: np.ndarray
    bound: bool
    evaluations: int
    status: Status
    method: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True unless the method gave no usable value (NON_FINITE or UNSUPPORTED)."""
        return self.status < Status.NON_FINITE

    def __repr__(self) -> str:
        kind = "bound" if self.bound else "estimate"
        worst = float(np.max(self.error, initial=0.0))
        return (
            f"MethodResult(method={self.method!r}, status={self.status.name}, shape={self.grad.shape}, "
            f"dtype={self.grad.dtype}, max error {kind}={worst:.3g}, evaluations={self.evaluations})"
        )


def finish(
    problem: Problem,
    grad64: np.ndarray,
    error64: np.ndarray,
    *,
    method: str,
    bound: bool,
    evaluations: int,
    status: Status = Status.CONVERGED,
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> MethodResult:
    """Round an ``(N, K)`` float64 gradient to the problem's dtype and widen its error to match.

    Rounding to nearest adds at most half a unit in the last place of the rounded value
    (docs/methods.md, "Final rounding"). Non-finite elements become NaN with an infinite error
    and make the status at least NON_FINITE.
    """
    fmt = problem.format
    grad64 = np.asarray(grad64, dtype=np.float64)
    error64 = np.asarray(error64, dtype=np.float64)
    bad = ~np.isfinite(grad64) | ~np.isfinite(error64)
    grad64 = np.where(bad, np.nan, grad64)
    rounded = round_to_format(grad64, fmt)
    error = error64 + rounding_error(rounded, fmt)
    error = np.where(bad, np.inf, error)
    if bad.any() and status < Status.NON_FINITE:
        status = Status.NON_FINITE
        reason = f"{int(bad.sum())} element(s) are not finite" + (f"; {reason}" if reason else "")
    return MethodResult(
        problem.restore_shape(rounded), problem.restore_shape(error), bound, evaluations,
        Status(status), method, reason, dict(details or {}),
    )


def unsupported(problem: Problem, *, method: str, reason: str, bound: bool = False) -> MethodResult:
    """The result of a method that cannot work on this input: all NaN, error inf, status UNSUPPORTED."""
    shape = problem.logits.shape
    grad = np.full(shape, np.nan, dtype=problem.logits.dtype)
    error = np.full(shape, np.inf)
    return MethodResult(
        problem.restore_shape(grad), problem.restore_shape(error), bound, 0, Status.UNSUPPORTED,
        method, reason,
    )


def rounding_error(rounded: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Half an ulp of ``fmt`` at each rounded value: the error of rounding to it (0 for float64 input).

    A float64 result rounded to float64 is unchanged, so nothing is added.
    """
    if fmt.precision == FLOAT64.precision:
        return np.zeros(rounded.shape)
    return 0.5 * fmt.ulp(np.asarray(rounded, dtype=np.float64))
