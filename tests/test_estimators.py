"""Tests of the method registry, the result type, and every method's agreement with the certified truth."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradcheck
from gradcheck.dtypes import FLOAT64
from gradcheck.errors import InvalidArgument
from gradcheck.estimators import MethodResult, Status, estimate, gradient, methods, spec
from gradcheck.exact import certified_grad
from gradcheck.problem import make_problem

ALL = ("closed_form", "fd_forward", "fd_central", "fd_complex_step", "fd_richardson", "jax_autodiff",
       "jax_autodiff_x64", "sympy_numpy", "sympy_mpmath")
DTYPES = ("float64", "float32", "float16", "bfloat16")
from gradcheck.regimes import REGIMES, make_case  # the study's generator, the catalogue's regimes


def test_registry_lists_every_method_and_the_package_exports_it():
    assert methods() == ALL
    assert gradcheck.methods() == ALL
    assert gradcheck.gradient is gradient and gradcheck.MethodResult is MethodResult
    assert spec("closed_form").bound and not spec("fd_central").bound


def test_unknown_method_is_named_in_the_error():
    with pytest.raises(InvalidArgument, match=r"method must be one of closed_form, .*got 'newton'"):
        gradient(np.zeros((1, 2)), np.array([0]), method="newton")


def test_bad_input_is_rejected_before_any_method_runs():
    with pytest.raises(InvalidArgument, match="targets must be class indices in \\[0, 2\\)"):
        gradient(np.zeros((1, 2)), np.array([5]), method="fd_central")


def test_result_is_frozen_and_shaped_like_the_logits():
    r = gradient(np.array([0.0, 1.0, 2.0], dtype=np.float32), np.array(1), method="closed_form")
    assert r.grad.shape == (3,) and r.grad.dtype == np.float32 and r.error.shape == (3,)
    assert r.status is Status.CONVERGED and r.method == "closed_form" and r.evaluations == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.grad = None  # type: ignore[misc]
    assert "closed_form" in repr(r) and "bound" in repr(r)


def test_status_order_puts_failures_last():
    assert Status.CONVERGED < Status.ERROR_INCREASED < Status.ITERATION_LIMIT < Status.NON_FINITE < Status.UNSUPPORTED
    ok = gradient(np.zeros((1, 2)), np.array([0]), method="fd_central")
    bad = gradient(np.zeros((1, 2), dtype=np.float16), np.array([0]), method="fd_central")
    assert ok.ok and not bad.ok and bad.status is Status.UNSUPPORTED
    assert np.all(np.isnan(bad.grad.astype(np.float64))) and np.all(np.isinf(bad.error))


def test_importing_the_registry_loads_neither_jax_nor_sympy():
    code = ("import sys, gradcheck; gradcheck.methods(); import gradcheck.estimators; "
            "gradcheck.gradient([[0.0, 1.0]], [1], method='fd_central'); "
            "print(sorted(m for m in ('jax', 'sympy', 'torch', 'hypothesis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- agreement with the certified truth ---------------------------------------------------------

@st.composite
def cases(draw, dtypes=DTYPES):
    """(problem, regime): a validated case of one regime (:func:`gradcheck.regimes.make_case`), from a drawn seed.

    Half the cases have many classes (K in [40, 70)), beyond a tile of the blocked paths.
    """
    dtype = draw(st.sampled_from(dtypes))
    regime = draw(st.sampled_from(REGIMES))
    seed = draw(st.integers(0, 2**32 - 1))
    return agreement_case(seed, dtype, regime, wide=draw(st.booleans())), regime


def agreement_case(seed, dtype, regime, *, wide=False):
    """The validated case ``make_case(seed, regime, dtype)`` (also used by benchmarks/methods_agreement.py)."""
    k = int(np.random.default_rng(seed).integers(40, 70)) if wide else None
    logits, targets, options = make_case(seed, regime, dtype, k=k)
    return make_problem(logits, targets, **options)


def truth64(problem):
    return certified_grad(problem, FLOAT64)


def check_agreement(problem, result):
    """Assert |grad - truth| <= error (+ half a float64 ulp for the truth's own rounding), or an honest status."""
    if not result.ok:
        assert result.reason, result
        assert np.all(np.isinf(result.error[~np.isfinite(result.grad.astype(np.float64))]))
        if result.status is Status.NON_FINITE:
            # only where the loss itself is infinite (positive target weight on a masked class), or
            # where a difference's error term overflows: steps of 2 ulp(z) square past the largest
            # float once |z| > sqrt(max) (the study's "huge" regime reaches 1e300)
            z = problem.logits.astype(np.float64)
            wt = problem.dense_targets() * problem.weights()
            overflow = np.max(np.abs(z[np.isfinite(z)]), initial=0.0) > np.sqrt(problem.format.max)
            assert overflow or np.any((wt > 0) & np.isneginf(z)), result
        return
    truth = truth64(problem)
    grad = np.asarray(problem.restore_shape(result.grad), dtype=np.float64).reshape(truth.shape)
    error = np.asarray(result.error).reshape(truth.shape)
    real = np.abs(grad - truth)
    allowed = error + 0.5 * FLOAT64.ulp(truth)
    bad = ~(real <= allowed)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{result.method}: error {real[where]:.3g} exceeds its estimate {error[where]:.3g} at {where}: "
            f"truth {truth[where]!r}, got {grad[where]!r}; logits {problem.logits.tolist()}, "
            f"targets {problem.targets.tolist()}, options {problem.options()}")


AGREEMENT = settings(derandomize=True, deadline=None, max_examples=60,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# JAX compiles once per shape (about 0.3 s each), so it sees fewer examples
EXAMPLES = {"jax_autodiff": 25, "jax_autodiff_x64": 25, "sympy_mpmath": 40}


@pytest.mark.parametrize("method", ALL)
def test_every_method_agrees_with_the_truth_within_its_own_estimate(method):
    @settings(AGREEMENT, max_examples=EXAMPLES.get(method, 60))
    @given(case=cases())
    def agrees(case):
        problem, _ = case
        result = estimate(problem, method=method)
        assert result.method == method
        check_agreement(problem, result)

    agrees()


@pytest.mark.parametrize("method", [m for m in ALL if m.startswith("fd_")])
def test_finite_differences_refuse_half_precision(method):
    for dtype in (np.float16, ml_dtypes.bfloat16):
        r = gradient(np.zeros((2, 3), dtype=dtype), np.array([0, 1]), method=method)
        assert r.status is Status.UNSUPPORTED and "float32 or float64" in r.reason


def test_the_check_catches_an_estimate_that_is_too_small():
    problem = make_problem(np.array([[0.3, -1.2, 2.0, 0.5]]), np.array([2]))
    honest = estimate(problem, method="fd_central")
    check_agreement(problem, honest)
    shrunk = dataclasses.replace(honest, error=honest.error / 1000)
    with pytest.raises(AssertionError, match="exceeds its estimate"):
        check_agreement(problem, shrunk)
    wrong = dataclasses.replace(honest, grad=honest.grad + 10 * honest.error)
    with pytest.raises(AssertionError, match="exceeds its estimate"):
        check_agreement(problem, wrong)


def test_closed_form_bound_is_flagged_as_a_bound_and_holds_on_a_hard_case():
    z = np.array([[0.0, 745.0, -1e300], [1e300, 1e300, 0.0]])
    r = gradient(z, np.array([0, 1]), method="closed_form")
    assert r.bound
    check_agreement(make_problem(z, np.array([0, 1])), r)
