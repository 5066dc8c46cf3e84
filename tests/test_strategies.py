"""Strategies: every regime yields valid cases exact in their dtype, with the features it promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck.dtypes import float_format, round_to_format
from gradcheck.errors import InvalidArgument
from gradcheck.regimes import default_regimes, param
from gradcheck.strategies import (GAP, HUGE, MANY_CLASSES_TILE, REGIMES, UPSTREAM_SCALARS, Case, cases, dtype_floats,
                                  logits, upstream_gradient)

DTYPES = ("float64", "float32", "float16", "bfloat16")
NEEDS = {"saturated": {"softcap": 3.0}, "large_lse": {"lse_square_scale": 1e-4}}  # the option each regime needs


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
    case = data.draw(cases(dtype, regimes=(regime,), **NEEDS.get(regime, {})))
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
    if regime == "saturated":  # |z| / c within the catalogue's ratios (up to rounding to the dtype)
        ratio = np.abs(z) / 3.0
        assert np.all(ratio >= param("saturated", "ratio_low") * 0.99)
        assert np.all(ratio <= param("saturated", "ratio_high") * 1.01)
    if regime == "large_lse":  # every row near +-level
        level = param("large_lse", "level")[dtype]
        centre = np.abs(np.median(z, axis=1))
        assert np.all(centre >= level / 2 - 30) and np.all(centre <= level + 30)
    assert problem.options() == case.options()
    assert case.grad_output is None  # no upstream gradient unless asked for


def test_option_regimes_are_drawn_when_their_option_is_set_and_refused_without_it():
    assert default_regimes("verify", {}) == tuple(r for r in REGIMES if r not in NEEDS)
    assert set(default_regimes("verify", {"softcap": 30.0, "lse_square_scale": 1e-4})) == set(REGIMES)
    assert "saturated" not in default_regimes("verify", {"softcap": None, "lse_square_scale": 0.0})
    with pytest.raises(InvalidArgument, match=r"regime 'saturated' exercises softcap, so it needs softcap= set, "
                       r"got softcap=None"):
        cases("float32", regimes=("saturated",))
    with pytest.raises(InvalidArgument, match=r"regime 'large_lse' exercises lse_square_scale"):
        cases("float32", regimes=("moderate", "large_lse"))
    drawn = set()

    @settings(max_examples=150)
    @given(cases("bfloat16", softcap=1.0, lse_square_scale=1e-3))
    def collect(case: Case) -> None:
        drawn.add(case.regime)
        assert case.softcap == 1.0 and case.lse_square_scale == 1e-3

    collect()
    assert {"saturated", "large_lse", "moderate"} <= drawn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradients_are_exact_never_one_and_differ_between_rows(dtype, reduction):
    fmt = float_format(dtype)
    rng = np.random.default_rng(7)
    scalars, rows_seen = [], []
    for _ in range(400):
        n = int(rng.integers(1, 70))
        g = upstream_gradient(rng, n, reduction, fmt)
        assert _exact(g.astype(fmt.dtype)) and np.all(np.isfinite(g))
        if reduction == "none":
            assert g.shape == (n,) and len(np.unique(g)) == n  # distinct rows: first-row or ignored bugs show
            assert g[0] != 0
            rows_seen.append(g)
        else:
            assert g.shape == () and float(g) != 1.0
            scalars.append(float(g))
    if reduction == "none":
        every = np.concatenate(rows_seen)
        assert (every == 0).any() and (every < 0).any() and (np.abs(every) < 1).any() and (np.abs(every) > 1).any()
    else:
        assert 0.0 in scalars and min(scalars) < 0 and any(0 < abs(v) < 1 for v in scalars)
        assert set(UPSTREAM_SCALARS) <= set(scalars)


@settings(max_examples=40)
@given(cases("float16", reduction="none", ignore_index=-1, upstream=True), cases("float16", upstream=True))
def test_cases_carry_their_upstream_gradient_in_the_dtype(per_row, scalar):
    assert per_row.grad_output.dtype == np.float16 and per_row.grad_output.shape == (per_row.logits.shape[0],)
    assert scalar.grad_output.dtype == np.float16 and np.ndim(scalar.grad_output) == 0
    assert "grad_output" not in per_row.options()  # passed apart, only to a grad_fn that takes it


def test_the_upstream_gradient_leaves_the_other_draws_unchanged():
    plain, with_g = [], []
    for out, upstream in ((plain, False), (with_g, True)):
        @settings(max_examples=30, derandomize=True, database=None)
        @given(cases("float32", reduction="none", weighted=True, upstream=upstream))
        def collect(case: Case) -> None:
            out.append(case)

        collect()
    assert len(plain) == len(with_g)
    for a, b in zip(plain, with_g):
        assert np.array_equal(a.logits, b.logits) and np.array_equal(a.targets, b.targets)
        assert np.array_equal(a.weight, b.weight)


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
    with pytest.raises(InvalidArgument, match="upstream must be True or False, got 1"):
        cases(upstream=1)
    with pytest.raises(InvalidArgument, match="min_value must be <= max_value"):
        dtype_floats("float32", min_value=2.0, max_value=1.0)
    with pytest.raises(InvalidArgument, match="dtype must be one of"):
        dtype_floats("int8")
