"""The error model: derived bounds that hold for correct implementations and stay far below |g|."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcheck import exact_grad, make_problem
from gradcheck.dtypes import float_format, round_to_format
from gradcheck.regimes import GAP, HUGE
from gradcheck.oracle import row_parts
from gradcheck.tolerance import (
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
