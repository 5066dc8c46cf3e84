"""Error measurement: ULP distance between floats and a per-element comparison against the truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck.dtypes import FloatFormat, float_format
from gradcheck.errors import InvalidArgument
from gradcheck.problem import as_array


def _ordered(x: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Map floats to int64 so that consecutive floats map to consecutive integers and +0 == -0."""
    bits = x.view(fmt.int_dtype).astype(np.uint64)
    sign_bit = np.uint64(1) << np.uint64(fmt.bits - 1)
    magnitude = (bits & (sign_bit - np.uint64(1))).astype(np.int64)
    return np.where(bits & sign_bit, -magnitude, magnitude)


def ulp_distance(a: Any, b: Any, *, dtype: Any = None) -> np.ndarray:
    """The number of representable numbers between ``a`` and ``b``, as float64.

    ULPs are counted in one format: ``dtype`` when given (both are first rounded to it), else the
    dtype of ``a`` and ``b``, which must then be the same: a float64 value against a float32 one has
    no single spacing to count in (counted in float64 such a pair is ~1e8 ULP apart for a float32
    rounding), so mixed dtypes are refused rather than silently measured in the wider format. A
    Python float or int takes the other argument's dtype. Signed zeros are equal, subnormals count
    one each, +inf is one step beyond the largest finite number, and NaN against anything (NaN
    included) is ``inf``.

    Args:
        a, b: arrays of float64, float32, float16 or bfloat16, broadcastable.
        dtype: the format whose ULPs are counted; required when ``a`` and ``b`` differ in dtype.

    Returns:
        float64 array: exact for distances below 2**53.

    Raises:
        InvalidArgument: an unsupported dtype, or ``a`` and ``b`` of different dtypes without ``dtype``.

    >>> ulp_distance(np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2.0)))
    array(1.)
    >>> ulp_distance(np.float64(-0.0), np.float64(5e-324))
    array(1.)
    """
    a_arr, b_arr = as_array(a, copy=False), as_array(b, copy=False)
    if dtype is None:
        a_scalar, b_scalar = (isinstance(x, (int, float)) and not isinstance(x, np.generic) for x in (a, b))
        if a_arr.dtype != b_arr.dtype and not (a_scalar or b_scalar):
            raise InvalidArgument(
                f"a and b must have the same dtype to count ULPs, got {a_arr.dtype} and {b_arr.dtype}. "
                f"Say whose ULPs to count, e.g. ulp_distance(a, b, dtype={b_arr.dtype.name!r})."
            )
        dtype = b_arr.dtype if a_scalar else a_arr.dtype
    fmt = float_format(dtype, argument="dtype of a and b")
    a_arr, b_arr = np.broadcast_arrays(a_arr.astype(fmt.dtype), b_arr.astype(fmt.dtype))
    oa, ob = _ordered(np.array(a_arr, order="C"), fmt), _ordered(np.array(b_arr, order="C"), fmt)
    # |oa - ob| < 2**64 always; the wrapped uint64 difference is exact
    hi, lo = np.maximum(oa, ob), np.minimum(oa, ob)
    with np.errstate(over="ignore"):
        dist = (hi.astype(np.uint64) - lo.astype(np.uint64)).astype(np.float64)
    nan = np.isnan(a_arr.astype(np.float64)) | np.isnan(b_arr.astype(np.float64))
    return np.where(nan, np.inf, dist)


@dataclass(frozen=True)
class Comparison:
    """Per-element errors of ``actual`` against ``expected`` in one format.

    Attributes:
        dtype: the format the ULPs are counted in.
        abs_error: ``|actual - expected|`` (float64; inf where either is non-finite and they differ).
        rel_error: ``abs_error / |expected|`` (inf where expected is 0 and actual is not).
        ulp_error: :func:`ulp_distance` per element.
        worst_index: index of the largest ULP error (ties: the largest absolute error, then first).
        expected_at_worst, actual_at_worst: the two values there.
    """

    dtype: str
    abs_error: np.ndarray
    rel_error: np.ndarray
    ulp_error: np.ndarray
    worst_index: tuple[int, ...]
    expected_at_worst: float
    actual_at_worst: float

    @property
    def max_ulp(self) -> float:
        return float(self.ulp_error.max(initial=0.0))

    @property
    def max_abs(self) -> float:
        return float(self.abs_error.max(initial=0.0))

    @property
    def max_rel(self) -> float:
        return float(self.rel_error.max(initial=0.0))

    def __str__(self) -> str:
        return (
            f"max {self.max_ulp:g} ULP ({self.dtype}) at {self.worst_index}: expected "
            f"{self.expected_at_worst!r}, got {self.actual_at_worst!r}; max abs {self.max_abs:.3g}, "
            f"max rel {self.max_rel:.3g}"
        )


def compare(actual: Any, expected: Any, *, dtype: Any = None) -> Comparison:
    """Compare ``actual`` with ``expected`` element by element (see :class:`Comparison`).

    Raises:
        InvalidArgument: unsupported dtype.
    """
    exp_arr = as_array(expected, copy=False)
    act_arr = as_array(actual, copy=False)
    fmt = float_format(exp_arr.dtype if dtype is None else dtype, argument="dtype of expected")
    act_arr, exp_arr = np.broadcast_arrays(act_arr.astype(fmt.dtype), exp_arr.astype(fmt.dtype))
    ulps = ulp_distance(act_arr, exp_arr, dtype=fmt.dtype)
    a64, e64 = act_arr.astype(np.float64), exp_arr.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        abs_err = np.where(ulps == 0, 0.0, np.abs(a64 - e64))
        abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)
        rel_err = np.where(abs_err == 0, 0.0, abs_err / np.abs(e64))
    if ulps.size:
        order = np.lexsort((-abs_err.ravel(), -ulps.ravel()))
        worst = tuple(int(i) for i in np.unravel_index(order[0], ulps.shape)) if ulps.ndim else ()
        exp_w, act_w = float(e64[worst]), float(a64[worst])
    else:
        worst, exp_w, act_w = (), float("nan"), float("nan")
    return Comparison(fmt.name, abs_err, rel_err, ulps, worst, exp_w, act_w)
