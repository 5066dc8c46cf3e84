"""gradcheck.ulps: ULP distance and the per-element comparison result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradcheck as gc
from gradcheck.dtypes import FORMATS


def _from_bits(bits, fmt):
    return np.array(bits, dtype=fmt.int_dtype).view(fmt.dtype)


@pytest.mark.parametrize("name", list(FORMATS))
def test_ulp_distance_landmarks(name):
    fmt = FORMATS[name]
    d = lambda a, b: float(gc.ulp_distance(np.array(a, fmt.dtype), np.array(b, fmt.dtype)))  # noqa: E731
    sub = fmt.smallest_subnormal
    assert d(0.0, -0.0) == 0
    assert d(0.0, sub) == 1 and d(-sub, sub) == 2
    assert d(fmt.tiny, fmt.tiny - sub) == 1  # normal to the largest subnormal
    assert d(1.0, 1.0 + fmt.eps) == 1 and d(1.0, 1.0 - fmt.eps / 2) == 1
    assert d(fmt.max, np.inf) == 1 and d(np.inf, np.inf) == 0
    assert d(-np.inf, np.inf) == 2 * (2 ** (fmt.bits - 1) - 2 ** (fmt.precision - 1))
    assert d(np.nan, np.nan) == np.inf and d(np.nan, 1.0) == np.inf
    # the number of representable values in [1, 2) is 2**(p-1)
    assert d(1.0, 2.0) == 2 ** (fmt.precision - 1)


@given(st.integers(0, 2**16 - 2), st.integers(1, 50))
def test_ulp_distance_counts_steps_float16(bits, steps):
    fmt = FORMATS["float16"]
    a = _from_bits(bits, fmt)
    b = _from_bits(min(bits + steps, 0x7C00), fmt)
    if np.isnan(a) or np.isnan(b) or bits >= 0x7C00:
        return
    assert float(gc.ulp_distance(a, b)) == min(bits + steps, 0x7C00) - bits


@given(st.floats(width=64, allow_nan=False), st.floats(width=64, allow_nan=False))
def test_ulp_distance_is_a_symmetric_metric(a, b):
    dab = gc.ulp_distance(np.float64(a), np.float64(b))
    assert dab == gc.ulp_distance(np.float64(b), np.float64(a))
    assert (dab == 0) == (a == b)


def test_ulp_distance_broadcasts_and_keeps_shape():
    a = np.zeros((2, 3), np.float32)
    assert gc.ulp_distance(a, np.float32(0)).shape == (2, 3)
    assert gc.ulp_distance(np.float32(1), np.float32(1)).shape == ()


def test_comparison_reports_the_worst_element():
    expected = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    actual = expected.copy()
    actual[1, 0] = np.nextafter(np.float32(3.0), np.float32(4.0))
    actual[0, 1] = np.float32(2.0) + 8 * np.finfo(np.float32).eps * 2
    result = gc.compare(actual, expected)
    assert result.worst_index == (0, 1)
    assert result.expected_at_worst == 2.0 and result.actual_at_worst == float(actual[0, 1])
    assert result.max_ulp == 8 and result.ulp_error[1, 0] == 1
    assert result.rel_error[0, 1] == pytest.approx(abs(float(actual[0, 1]) - 2.0) / 2.0)
    assert "max 8 ULP (float32) at (0, 1)" in str(result)


def test_comparison_of_nan_is_infinite():
    result = gc.compare(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    assert result.worst_index == (0,) and result.max_ulp == np.inf and result.max_abs == np.inf


def test_ulp_distance_refuses_mixed_dtypes():
    """Issue 15, item 14: float64 against float32 silently counted float64 ULPs (1.07e8 for one rounding)."""
    from gradcheck.errors import InvalidArgument

    x32 = np.float32(0.1)
    with pytest.raises(InvalidArgument, match=r"a and b must have the same dtype to count ULPs, got float64 and float32.*dtype='float32'"):
        gc.ulp_distance(np.float64(0.1), x32)
    with pytest.raises(InvalidArgument, match="got float32 and float64"):
        gc.ulp_distance(np.zeros(3, np.float32), np.zeros(3))
    assert float(gc.ulp_distance(np.float64(0.1), x32, dtype=np.float32)) == 0  # 0.1 rounds to x32
    assert float(gc.ulp_distance(np.float64(0.1), np.float64(x32), dtype="float64")) > 1e8  # what was silent
    # a Python number takes the other side's dtype
    assert float(gc.ulp_distance(x32, 0.1)) == 0 and float(gc.ulp_distance(1.0, np.float16(1.0))) == 0


def test_compare_and_ulp_distance_take_torch_tensors_bfloat16_and_requires_grad_included():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import gradcheck as gc

    z = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.bfloat16, requires_grad=True)
    truth = gc.exact_grad(z, torch.tensor([1]))  # was: "Got unsupported ScalarType BFloat16"
    got = torch.tensor(truth.astype(np.float32)).to(torch.bfloat16).requires_grad_(True)
    assert gc.compare(got, truth).max_ulp == 0
    assert gc.ulp_distance(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0], dtype=np.float32)).tolist() == [0.0, 0.0]
