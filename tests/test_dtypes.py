"""Float format facts and correct rounding from float64."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck.dtypes import FORMATS, float_format, round_to_format
from gradcheck.errors import InvalidArgument
from gradcheck.exact import _round_dyadic


@pytest.mark.parametrize("name", list(FORMATS))
def test_facts_match_finfo(name):
    fmt = FORMATS[name]
    info = ml_dtypes.finfo(fmt.dtype) if name == "bfloat16" else np.finfo(fmt.dtype)
    assert fmt.eps == float(info.eps)
    assert fmt.tiny == float(info.tiny)
    assert fmt.max == float(info.max)
    assert fmt.smallest_subnormal == float(info.smallest_subnormal)
    assert fmt.precision == info.nmant + 1


@pytest.mark.parametrize("name", list(FORMATS))
def test_ulp_is_the_gap_to_the_next_number(name):
    fmt = FORMATS[name]
    xs = np.array([1.0, 1.5, fmt.tiny, fmt.smallest_subnormal * 3, fmt.max / 2, 0.0]).astype(fmt.dtype)
    for x in xs:
        assert fmt.ulp(float(x)) == float(_next_up(x, fmt)) - float(x), (name, x)


def _next_up(x, fmt):
    bits = np.array(x, dtype=fmt.dtype).view(fmt.int_dtype)
    return (bits + np.array(1, dtype=fmt.int_dtype)).view(fmt.dtype)


@pytest.mark.parametrize("name", ["float32", "float16"])
def test_round_to_format_matches_numpy_casts(name):
    rng = np.random.default_rng(7)
    fmt = FORMATS[name]
    x = rng.standard_normal(20000) * np.exp2(rng.integers(fmt.emin - fmt.precision - 3, fmt.emax + 2, 20000))
    special = [0.0, -0.0, np.inf, -np.inf, fmt.max, -fmt.max, fmt.smallest_subnormal / 2, fmt.smallest_subnormal * 1.5]
    x = np.concatenate([x, special])
    with np.errstate(over="ignore"):
        expected = x.astype(fmt.dtype)
    got = round_to_format(x, name)
    np.testing.assert_array_equal(got.view(fmt.int_dtype), expected.view(fmt.int_dtype))


@given(st.floats(allow_nan=False, width=64), st.sampled_from(list(FORMATS)))
def test_round_to_format_agrees_with_integer_rounding(x, name):
    """Two independent roundings: float64 scaling with rint, and integer arithmetic on the mantissa."""
    fmt = FORMATS[name]
    got = float(round_to_format(np.array(x), fmt))
    if x == 0 or math.isinf(x):
        assert got == x
        return
    mantissa, exponent = math.frexp(x)
    expected = _round_dyadic(int(mantissa * 2**53), exponent - 53, fmt)
    assert got == expected and math.copysign(1, got) == math.copysign(1, x)


def test_bfloat16_is_rounded_once():
    """1 + 2**-8 + 2**-30 is just above a bfloat16 midpoint; float32 first would round to the midpoint, then to even."""
    x = 1 + 2.0**-8 + 2.0**-30
    assert float(round_to_format(np.array(x), "bfloat16")) == 1 + 2.0**-7
    assert float(np.float32(x).astype(ml_dtypes.bfloat16)) == 1.0  # the double rounding we avoid


@pytest.mark.parametrize("spelling", ["float32", np.float32, np.dtype("float32"), np.zeros(2, np.float32)])
def test_float_format_accepts_spellings(spelling):
    assert float_format(spelling).name == "float32"


@pytest.mark.parametrize("bad", ["float8", np.int32, np.complex128, object()])
def test_float_format_rejects_other_types(bad):
    with pytest.raises(InvalidArgument, match="dtype must be one of float64, float32, float16, bfloat16, got"):
        float_format(bad)
