"""The error model: derived bounds that hold for correct implementations and stay far below |g|."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcheck import exact_grad, make_problem
from gradcheck.dtypes import float_format, round_to_format
from gradcheck.regimes import GAP, HUGE
from gradcheck.oracle import row_parts
from gradcheck.reference import reference_grad
from gradcheck.tolerance import (
    contracts,
    default_contract,
    implementations,
    EXP_U,
    TILE,
    element_bound,
    grad_tolerance,
    tiled_depth,
    tree_depth,
    workings,
)
from zoo import numpy_logspace, numpy_online, numpy_stable


def test_depths():
    assert [tree_depth(k) for k in (1, 2, 3, 4, 5, 4096, 4097)] == [0, 1, 2, 2, 3, 12, 13]
    assert tiled_depth(TILE) == tree_depth(TILE)
    assert tiled_depth(TILE + 1) == tree_depth(TILE) + EXP_U + 2
    assert all(tiled_depth(k) >= tree_depth(min(k, TILE)) for k in range(1, 300))


def test_workings_per_dtype():
    assert [w.fmt.name for w in workings(float_format("float64"), 10)] == ["float64"]
    assert [w.fmt.name for w in workings(float_format("bfloat16"), 10)] == ["bfloat16", "float32"]
    half = workings(float_format("float16"), 5000)
    assert half[0].depth == tree_depth(5000) and half[1].depth == tiled_depth(5000)


def _hard_cases(dtype):
    rng = np.random.default_rng(7)
    gap, huge = GAP[dtype], HUGE[dtype]  # the catalogue's large_gap and huge regimes
    yield rng.standard_normal((6, 37)), rng.integers(0, 37, 6)
    z = rng.standard_normal((4, 9)) - rng.uniform(0, gap, (4, 9))
    yield z, np.argmin(z, axis=1)  # targets on the least likely class
    yield np.array([[-0.24, -0.2397478492, -300.0, -300.0, -1.8163956]]), np.array([2])
    yield rng.uniform(-huge, huge, (3, 5)), rng.integers(0, 5, 3)
    z = rng.standard_normal((2, 300))
    z[:, 290] += 6.0  # near one-hot, maximum in the last tile
    yield z, np.array([290, 3])
    yield np.zeros((3, 4)), np.array([0, 1, 3])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("impl", [numpy_stable, numpy_logspace, numpy_online], ids=lambda f: f.__name__)
def test_correct_implementations_within_tolerance_of_certified_truth(dtype, impl):
    fmt = float_format(dtype)
    for z, t in _hard_cases(dtype):
        for options in ({}, {"label_smoothing": 0.3, "weight": np.linspace(0.25, 2.0, z.shape[1])}):
            logits = round_to_format(z, fmt)
            problem = make_problem(logits, t, **options)
            got = impl(problem.logits.copy(), t, **problem.options()).astype(np.float64)
            truth = exact_grad(problem.logits, t, dtype="float64", **options)
            tol = grad_tolerance(problem)
            assert np.all(np.abs(got - truth) <= tol), (dtype, impl.__name__, np.max(np.abs(got - truth) / tol))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_tolerance_is_tight_on_moderate_logits(dtype):
    """For N(0, 1) logits and K = 37 the tolerance stays below 100 u of the subtracted terms."""
    fmt = float_format(dtype)
    rng = np.random.default_rng(3)
    problem = make_problem(rng.standard_normal((8, 37)).astype(np.float32).astype(fmt.dtype), rng.integers(0, 37, 8))
    parts = row_parts(problem.logits)
    tol = grad_tolerance(problem, parts)
    magnitude = (parts.p + problem.dense_targets()) / problem.divisor()
    assert np.max(tol / magnitude) < 100 * fmt.unit_roundoff
    assert np.max(tol / magnitude) > fmt.unit_roundoff  # not below one rounding either


def test_tolerance_grows_with_distance_from_the_max():
    problem = make_problem(np.array([[0.0, -1.0, -30.0, -300.0]]), np.array([0]))
    parts = row_parts(problem.logits)
    relative = grad_tolerance(problem, parts)[0, 1:] / parts.p[0, 1:]
    assert relative[0] < relative[1] < relative[2]
    assert relative[2] > 2 * 300 * 2.0**-53  # the shifted logit's rounding, amplified by exp


def test_underflow_floor_for_probabilities_below_the_smallest_subnormal():
    problem = make_problem(np.array([[0.0, -800.0]]), np.array([0]))
    tol = grad_tolerance(problem)
    assert 0 < tol[0, 1] < 1e-300


def test_element_bound_rejects_a_vacuous_model():
    problem = make_problem(np.zeros((1, 3)), np.array([0]))
    parts = row_parts(problem.logits)
    from gradcheck.tolerance import Implementation

    vacuous = Implementation("toy", float_format("bfloat16"), 1000.0, 0.0)
    with pytest.raises(ArithmeticError, match="vacuous"):
        element_bound(problem, parts, vacuous)
    assert math.isfinite(float(element_bound(problem, parts, workings(float_format("bfloat16"), 3)[0]).max()))


# ---- precision contracts (docs/tolerance.md, "Precision contracts") -------------------------------

def _stable_in(work, logits, targets, **options):
    """numpy_stable computed in ``work`` and rounded once to the logits' dtype."""
    wide = {k: (np.asarray(v).astype(work) if k == "weight" else v) for k, v in options.items()}
    targets = targets.astype(work) if targets.dtype.kind == "f" else targets
    return numpy_stable(logits.astype(work), targets, **wide).astype(logits.dtype)


def _liger_1329(logits, targets):
    """Liger-Kernel #1329: p / N stored in the half buffer, then the target's 1 / N subtracted."""
    n = logits.shape[0]
    z = logits.astype(np.float32)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    g = (p / p.sum(axis=1, keepdims=True) / n).astype(logits.dtype)
    rows = np.arange(n)
    g[rows, targets] = (g[rows, targets].astype(np.float32) - np.float32(1 / n)).astype(logits.dtype)
    return g


def _within(got, problem, precision):
    ref, band = reference_grad(problem)
    tol = grad_tolerance(problem, grad=ref.astype(np.float64), precision=precision, band=band)
    return np.abs(got.astype(ref.dtype) - ref).astype(np.float64) <= tol + band


def test_contracts_nest_from_exact_to_the_dtype():
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        fmt = float_format(dtype)
        assert contracts(fmt)[0] == "exact" and contracts(fmt)[-1] == dtype
        for z, t in _hard_cases(dtype):
            problem = make_problem(round_to_format(z, fmt), t)
            tols = [grad_tolerance(problem, precision=c) for c in contracts(fmt)]
            for tighter, looser in zip(tols, tols[1:]):
                assert np.all(tighter <= looser), dtype
            assert np.array_equal(tols[-1], grad_tolerance(problem))  # the dtype's own is the default


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_each_contract_accepts_the_implementations_it_names(dtype):
    fmt = float_format(dtype)
    for z, t in _hard_cases(dtype):
        logits = round_to_format(z, fmt)
        problem = make_problem(logits, t)
        truth = exact_grad(logits, t)  # correctly rounded to the dtype
        assert np.all(_within(truth, problem, "exact"))
        assert np.all(_within(_stable_in(np.float64, logits, t), problem, "float64"))
        if dtype != "float32":
            assert np.all(_within(_stable_in(np.float32, logits, t), problem, "float32"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_float32_contract_catches_store_then_subtract(dtype):
    # Liger-Kernel #1329 at a confident row: the truth of the target element is -1.373e-4, the bug 0
    problem = make_problem(np.array([[10.0, 0.0, -1.0, 0.5]], dtype=float_format(dtype).dtype), np.array([0]))
    bug = _liger_1329(problem.logits, problem.targets)
    assert float(bug[0, 0]) == 0.0
    assert np.all(_within(bug, problem, dtype))  # the in-dtype model cannot see it ...
    assert not _within(bug, problem, "float32")[0, 0]  # ... the float32 contract does
    assert np.all(_within(_stable_in(np.float32, problem.logits, problem.targets), problem, "float32"))


def test_default_contract_and_implementations():
    assert [default_contract(float_format(d)) for d in ("float64", "float32", "float16", "bfloat16")] == [
        "float64", "float32", "float32", "float32"]
    assert implementations(float_format("float32"), 10, "exact") == ()
    assert [w.fmt.name for w in implementations(float_format("bfloat16"), 10, "float64")] == ["float64"]
