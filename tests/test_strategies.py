"""Strategies: every regime yields valid cases exact in their dtype, with the features it promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck.dtypes import float_format, round_to_format
from gradcheck.errors import InvalidArgument
from gradcheck.strategies import GAP, HUGE, MANY_CLASSES_TILE, REGIMES, Case, cases, dtype_floats, logits

DTYPES = ("float64", "float32", "float16", "bfloat16")


def _exact(x: np.ndarray) -> bool:
    fmt = float_format(x.dtype)
    x64 = x.astype(np.float64)
    return bool(np.array_equal(round_to_format(x64, fmt).astype(np.float64), x64, equal_nan=False))


@pytest.mark.parametrize("dtype", DTYPES)
# scale (glue): llm_vocab needs max_shape's K >= 32000, it is tested in tests/test_verify_shapes.py
@pytest.mark.parametrize("regime", [r for r in REGIMES if r != "llm_vocab"])
@settings(max_examples=15)
@given(data=st.data())
def test_every_regime_gives_valid_exact_cases(dtype, regime, data):
    case = data.draw(cases(dtype, regimes=(regime,)))
    assert case.regime == regime and case.dtype == dtype
    assert case.logits.dtype == float_format(dtype).dtype
    assert _exact(case.logits)
    n, k = case.logits.shape
    assert 1 <= n <= 64 and 1 <= k <= 32831
    problem = case.problem  # validates
    z = case.logits.astype(np.float64)
    finite = np.isfinite(z)
    assert np.all(finite.any(axis=1))
    if regime != "masked":
        assert finite.all()
    if regime == "huge":
        assert np.max(np.abs(z)) <= HUGE[dtype] * 1.01
    if regime == "large_gap":
        assert np.max(z) - np.min(z) <= 2 * GAP[dtype] + 20
    if regime == "ties":
        assert np.all(z == np.round(z))
    if regime == "many_classes":
        assert k > MANY_CLASSES_TILE
        late = max(0, (k - 1) // MANY_CLASSES_TILE * MANY_CLASSES_TILE - MANY_CLASSES_TILE)
        assert np.all(np.argmax(z, axis=1) >= late)
    if regime == "single":
        assert n == 1 or k == 1
    assert problem.options() == case.options()


def test_regimes_reach_their_extremes():
    """Across seeds: underflowing gaps, huge magnitudes, masked entries, K not a multiple of 64, ties."""
    seen = {"gap": 0.0, "huge": 0.0, "masked": False, "odd_k": False, "even_k": False, "tie": False, "k_max": 0}

    @settings(max_examples=300)
    @given(cases("float32"))
    def collect(case: Case) -> None:
        z = case.logits.astype(np.float64)
        fin = z[np.isfinite(z)]
        if case.regime == "large_gap":
            seen["gap"] = max(seen["gap"], float(np.max(fin) - np.min(fin)))
        if case.regime == "huge":
            seen["huge"] = max(seen["huge"], float(np.max(np.abs(fin))))
        seen["masked"] |= bool(np.isneginf(z).any())
        if case.regime == "many_classes":
            k = z.shape[1]
            seen["odd_k"] |= k % 64 != 0
            seen["even_k"] |= k % 64 == 0
            seen["k_max"] = max(seen["k_max"], k)
        if case.regime == "ties":
            seen["tie"] |= bool(np.any(np.sum(z == z.max(axis=1, keepdims=True), axis=1) > 1))

    collect()
    assert seen["gap"] > 60 and seen["huge"] > 1e20 and seen["masked"] and seen["tie"]
    assert seen["odd_k"] and seen["k_max"] > 256


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=20)
@given(data=st.data())
def test_options_targets_and_weights(dtype, data):
    ignore = data.draw(st.sampled_from([None, -1, 0, 2]))
    targets = "index" if ignore is not None else data.draw(st.sampled_from(["index", "probs"]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    case = data.draw(cases(dtype, targets=targets, reduction=reduction, label_smoothing=0.25, weighted=True,
                           ignore_index=ignore))
    problem = case.problem
    k = case.logits.shape[1]
    assert case.weight.shape == (k,) and _exact(case.weight) and np.all(case.weight.astype(np.float64) >= 0)
    options = case.options()
    assert options["label_smoothing"] == 0.25 and options["weight"].dtype == case.logits.dtype
    assert ("reduction" in options) == (reduction != "mean")
    if targets == "probs":
        assert case.targets.dtype == case.logits.dtype and _exact(case.targets)
        assert "soft" in case.tags
    else:
        assert case.targets.dtype == np.int64
        if ignore is not None and ignore != -100:
            assert options["ignore_index"] == ignore
    if reduction == "mean":
        assert problem.divisor() > 0


def test_soft_targets_include_rows_that_do_not_sum_to_one():
    found = []

    @settings(max_examples=60)
    @given(cases("float64", targets="probs"))
    def collect(case: Case) -> None:
        found.append("unnormalized" in case.tags)

    collect()
    assert any(found) and not all(found)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=200)
@given(data=st.data())
def test_dtype_floats_are_exact_and_in_range(dtype, data):
    x = data.draw(dtype_floats(dtype, min_value=-3.0, max_value=1e3))
    fmt = float_format(dtype)
    assert -3.0 <= x <= 1e3 and not math.isnan(x)
    assert float(round_to_format(np.array(x), fmt).astype(np.float64)) == x


def test_dtype_floats_reach_subnormals_in_bfloat16():
    values = []

    @settings(max_examples=300)
    @given(dtype_floats("bfloat16", max_value=1e-30, min_value=0.0))
    def collect(x: float) -> None:
        values.append(x)

    collect()
    assert any(0 < v < float_format("bfloat16").tiny for v in values)


@settings(max_examples=10)
@given(logits("float16", regime="huge"))
def test_logits_strategy(z):
    assert z.dtype == np.float16 and _exact(z)
    assert np.max(np.abs(z.astype(np.float64))) <= 1e4 * 1.01


def test_invalid_arguments_are_named():
    with pytest.raises(InvalidArgument, match="targets must be 'index' or 'probs', got 'soft'"):
        cases(targets="soft").example()
    with pytest.raises(InvalidArgument, match="regimes must be a non-empty subset"):
        cases(regimes=("gentle",)).example()
    with pytest.raises(InvalidArgument, match="ignore_index applies to targets='index' only"):
        cases(targets="probs", ignore_index=3).example()
    with pytest.raises(InvalidArgument, match="min_value must be <= max_value"):
        dtype_floats("float32", min_value=2.0, max_value=1.0)
    with pytest.raises(InvalidArgument, match="dtype must be one of"):
        dtype_floats("int8")
