"""Facts about the floating-point formats gradcheck checks: float64, float32, float16, bfloat16."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from gradcheck.errors import InvalidArgument


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format.

    Attributes:
        name: canonical name ("float64", "float32", "float16", "bfloat16").
        dtype: the numpy dtype (bfloat16 comes from ml_dtypes).
        precision: significand bits p, the hidden bit included.
        emin: exponent of the smallest normal number, 2**emin.
        emax: exponent of the largest finite number's leading bit.
        int_dtype: the unsigned integer type of the same width (for bit views).
    """

    name: str
    dtype: np.dtype
    precision: int
    emin: int
    emax: int
    int_dtype: np.dtype

    @property
    def eps(self) -> float:
        """Machine epsilon, 2**(1 - p): the gap between 1 and the next number."""
        return math.ldexp(1.0, 1 - self.precision)

    @property
    def unit_roundoff(self) -> float:
        """u = 2**-p: the relative error bound of round-to-nearest for normal numbers."""
        return math.ldexp(1.0, -self.precision)

    @property
    def tiny(self) -> float:
        """The smallest positive normal number, 2**emin."""
        return math.ldexp(1.0, self.emin)

    @property
    def smallest_subnormal(self) -> float:
        """The smallest positive number, 2**(emin - p + 1)."""
        return math.ldexp(1.0, self.emin - self.precision + 1)

    @property
    def max(self) -> float:
        """The largest finite number, (2 - 2**(1 - p)) * 2**emax."""
        return math.ldexp(2.0 - self.eps, self.emax)

    @property
    def bits(self) -> int:
        return self.dtype.itemsize * 8

    def ulp(self, x: np.ndarray | float) -> np.ndarray:
        """The spacing of this format at |x|: 2**(max(e, emin) - p + 1) for |x| in [2**e, 2**(e+1)).

        Exact (a power of two, computed in float64) for every finite x; inf for inf or nan.
        """
        a = np.abs(np.asarray(x, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            _, e = np.frexp(a)  # a = m * 2**e with m in [0.5, 1): leading bit exponent is e - 1
        e = np.where(a == 0, self.emin + 1, e)  # zero sits in the subnormal range
        exponent = np.maximum(e - 1, self.emin) - self.precision + 1
        out = np.ldexp(1.0, exponent.astype(np.int32))
        return np.where(np.isfinite(a), out, np.inf)


FLOAT64 = FloatFormat("float64", np.dtype(np.float64), 53, -1022, 1023, np.dtype(np.uint64))
FLOAT32 = FloatFormat("float32", np.dtype(np.float32), 24, -126, 127, np.dtype(np.uint32))
FLOAT16 = FloatFormat("float16", np.dtype(np.float16), 11, -14, 15, np.dtype(np.uint16))
BFLOAT16 = FloatFormat("bfloat16", np.dtype(ml_dtypes.bfloat16), 8, -126, 127, np.dtype(np.uint16))


def _x87_extended() -> FloatFormat | None:
    """np.longdouble when it is x87 extended precision (64-bit significand), else None.

    The one probe for it: the oracle's extended working precision (docs/oracle.md) and the float64
    reference of the tolerance model (docs/tolerance.md) are analysed for exactly this format only
    (a 128-bit quad or a double-double long double would need its own analysis).
    """
    info = np.finfo(np.longdouble)
    if info.nmant != 63:
        return None
    return FloatFormat("x87 extended", np.dtype(np.longdouble), 64, int(info.minexp), int(info.maxexp) - 1,
                       np.dtype(np.uint64))


EXTENDED = _x87_extended()

FORMATS: dict[str, FloatFormat] = {f.name: f for f in (FLOAT64, FLOAT32, FLOAT16, BFLOAT16)}
DTYPE_NAMES: tuple[str, ...] = tuple(FORMATS)


def float_format(dtype: object, *, argument: str = "dtype") -> FloatFormat:
    """Look up the format of a dtype given as a name, numpy dtype, scalar type or array.

    Raises:
        InvalidArgument: the dtype is not one of float64, float32, float16, bfloat16.
    """
    if isinstance(dtype, FloatFormat):
        return dtype
    if isinstance(dtype, str) and dtype in FORMATS:
        return FORMATS[dtype]
    candidate = dtype if isinstance(dtype, type) else getattr(dtype, "dtype", dtype)
    try:
        np_dtype = np.dtype(candidate)
    except TypeError:
        np_dtype = None
    if np_dtype is not None:
        for fmt in FORMATS.values():
            if fmt.dtype == np_dtype:
                return fmt
    shown = candidate
    raise InvalidArgument(
        f"{argument} must be one of {', '.join(DTYPE_NAMES)}, got {shown!r}."
    )


def is_supported_float(dtype: np.dtype) -> bool:
    """True when ``dtype`` is one of the four formats gradcheck checks."""
    return any(fmt.dtype == dtype for fmt in FORMATS.values())


def bit_pattern(x: np.ndarray) -> np.ndarray:
    """The raw bits of a float array, as its format's unsigned integers.

    -0.0 and +0.0 differ, NaN payloads are kept: the comparison for "the same number, bit for bit".
    """
    x = np.asarray(x, order="C")
    return x.view(float_format(x.dtype).int_dtype)


def round_to_format(x: np.ndarray, fmt: FloatFormat | str) -> np.ndarray:
    """Round float64 values to ``fmt``, round to nearest, ties to even, subnormals and overflow included.

    One rounding from float64, never through an intermediate format (casting float64 to bfloat16
    through float32 would round twice). The quantum at x is ``2**max(e - p + 1, emin - p + 1)`` for
    ``|x|`` in ``[2**e, 2**(e+1))``; scaling by a power of two and ``np.rint`` (ties to even) are
    exact in float64 because the scaled value has at most p + 1 < 53 bits.

    Returns:
        An array of ``fmt.dtype`` (exact cast: every rounded value is representable).
    """
    fmt = float_format(fmt)
    x = np.asarray(x, dtype=np.float64)
    if fmt.precision == 53:
        return x.copy()
    if fmt.name in ("float32", "float16"):
        # numpy's float64 -> float32 (IEEE conversion) and float64 -> float16 (npy_double_to_half)
        # casts round once to nearest, ties to even; tests/test_dtypes.py checks both against the
        # integer rounding of exact._round_dyadic.
        with np.errstate(over="ignore"):
            return x.astype(fmt.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        _, e = np.frexp(x)
        quantum = np.maximum(e - fmt.precision, fmt.emin - fmt.precision + 1).astype(np.int32)
        y = np.ldexp(np.rint(np.ldexp(x, -quantum)), quantum)
        y = np.where(np.abs(y) > fmt.max, np.copysign(np.inf, x), y)
        y = np.where(np.isfinite(x), y, x)
    return y.astype(fmt.dtype)
