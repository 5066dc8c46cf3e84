"""Tests of the finite-difference estimators: generic and structured paths, steps, probes, Taylor test."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import sympy as sp

import gradcheck
from gradcheck.dtypes import FLOAT64
from gradcheck.errors import InvalidArgument
from gradcheck.estimators import Status, gradient
from gradcheck.estimators.directional import directional_check, taylor_test
from gradcheck.estimators.finite_difference import C2, C3, cross_entropy_difference, finite_difference_gradient
from gradcheck.estimators.row_loss import ELEMENTARY_ULPS, RealRows, clog1p
from gradcheck.problem import make_problem

RNG_SEED = 20240611


def moderate(n=6, k=9, dtype=np.float64, seed=RNG_SEED):
    rng = np.random.default_rng(seed)
    return make_problem((rng.normal(scale=3.0, size=(n, k))).astype(dtype), rng.integers(0, k, size=n))


def test_sigmoid_derivative_bounds_are_the_sups():
    x = sp.Symbol("x", real=True)
    sig = 1 / (1 + sp.exp(-x))
    for order, constant in ((1, C2), (2, C3)):
        deriv = sp.diff(sig, x, order)
        crit = [c for c in sp.solve(sp.diff(deriv, x), x) if c.is_real]
        sup = max(abs(float(deriv.subs(x, c))) for c in crit)
        assert math.isclose(sup, constant, rel_tol=1e-14)
        grid = np.linspace(-40, 40, 200001)
        assert np.max(np.abs(sp.lambdify(x, deriv, "numpy")(grid))) <= constant * (1 + 1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_elementary_functions_are_within_the_assumed_ulps(dtype):
    x = np.linspace(-80.0, 0.0, 40001).astype(dtype)
    fmt = gradcheck.float_format(dtype)
    if dtype == "float32":
        ref_exp, ref_log = np.exp(x.astype(np.float64)), np.log1p(np.exp(x.astype(np.float64)) * 7)
        got_exp, got_log = np.exp(x), np.log1p(np.exp(x.astype(np.float64)).astype(np.float32) * np.float32(7))
        arg = np.exp(x.astype(np.float64)).astype(np.float32).astype(np.float64) * 7
        ref_log = np.log1p(arg)
    else:
        x = x[::40]
        ref_exp = np.array([float(mpmath.exp(mpmath.mpf(float(v)))) for v in x])
        got_exp = np.exp(x)
        arg = np.exp(x) * 7
        got_log = np.log1p(arg)
        ref_log = np.array([float(mpmath.log1p(mpmath.mpf(float(v)))) for v in arg])
    # relative error in units of u (reference rounding adds at most u/2 in float64, nothing for float32)
    exp_ulps = np.max(np.abs(got_exp.astype(np.float64) - ref_exp) / (ref_exp * fmt.unit_roundoff))
    log_ulps = np.max(np.abs(got_log.astype(np.float64) - ref_log) / (ref_log * fmt.unit_roundoff))
    assert exp_ulps <= ELEMENTARY_ULPS[dtype] and log_ulps <= ELEMENTARY_ULPS[dtype]


def test_row_losses_match_the_oracle_within_their_estimate():
    p = moderate()
    wt = p.dense_targets() * p.weights()
    rows = RealRows(p.logits, wt, FLOAT64)
    truth = gradcheck.exact_loss(p.logits, p.targets, reduction="none")
    assert np.all(np.abs(rows.value - truth) <= rows.delta + 0.5 * FLOAT64.ulp(truth))
    z2 = p.logits.copy()
    z2[:, 3] += 0.25
    assert np.array_equal(rows.column(3, z2[:, 3])[0], rows.full(z2)[0])  # same operations, same bits


def test_clog1p_keeps_tiny_imaginary_parts():
    w = np.array([1e-3 + 1e-30j, 5.0 - 2e-20j])
    ref = [complex(mpmath.log1p(mpmath.mpc(v.real, v.imag))) for v in w]
    got = clog1p(w)
    assert np.allclose(got.real, [r.real for r in ref], rtol=4e-16, atol=0)
    assert np.allclose(got.imag, [r.imag for r in ref], rtol=4e-16, atol=0)


def test_structured_costs_two_evaluations_per_class():
    p = moderate(n=50, k=7)
    assert cross_entropy_difference(p, scheme="central").evaluations == 2 * 7 + 1
    assert cross_entropy_difference(p, scheme="forward").evaluations == 7 + 1
    assert cross_entropy_difference(p, scheme="complex_step").evaluations == 7


def test_step_follows_the_dtype_and_the_scale():
    small = cross_entropy_difference(moderate(), scheme="central").details["step_per_row"]
    p32 = moderate(dtype=np.float32)
    single = cross_entropy_difference(p32, scheme="central").details["step_per_row"]
    big = moderate()
    big = make_problem(big.logits * 100, big.targets)
    large = cross_entropy_difference(big, scheme="central").details["step_per_row"]
    assert np.all(single > 10 * small)  # (u32 / u64)**(1/3) = 2**(29/3) ~ 800
    assert np.median(large) > 2 * np.median(small)  # rounding of the row loss grows with |s|


@pytest.mark.parametrize("scheme", ["forward", "central", "complex_step", "richardson"])
def test_central_and_complex_step_accuracy_ordering_in_float64(scheme):
    p = moderate()
    r = cross_entropy_difference(p, scheme=scheme)
    truth = gradcheck.exact_grad(p.logits, p.targets)
    ulps = gradcheck.compare(r.grad, truth).ulp_error
    assert r.status is Status.CONVERGED
    assert np.all(np.abs(r.grad - truth) <= r.error)
    # the expected orders of accuracy: u**(1/2), u**(2/3), u, Richardson in between
    worst = float(np.max(np.abs(r.grad - truth)))
    limit = {"forward": 1e-6, "central": 1e-9, "complex_step": 1e-15, "richardson": 1e-12}[scheme]
    assert worst < limit
    if scheme == "complex_step":
        assert np.median(ulps) <= 4


def test_weight_on_a_masked_class_is_reported_not_returned():
    z = np.array([[0.0, -np.inf, 1.0], [0.5, 0.2, 0.1]])
    r = gradient(z, np.array([0, 1]), method="fd_central", label_smoothing=0.1)
    assert r.status is Status.NON_FINITE and "not finite" in r.reason
    assert np.all(np.isnan(r.grad[0])) and np.all(np.isfinite(r.grad[1]))
    cs = gradient(z, np.array([0, 1]), method="fd_complex_step", label_smoothing=0.1)
    assert cs.status is Status.CONVERGED  # the imaginary part stays finite


def test_bad_scheme_is_rejected():
    with pytest.raises(InvalidArgument, match="scheme must be one of .*got 'backward'"):
        cross_entropy_difference(moderate(), scheme="backward")


@pytest.mark.parametrize("scheme", ["forward", "central", "complex_step", "richardson"])
def test_generic_gradient_of_any_scalar_function(scheme):
    x = np.array([0.3, -1.7, 2.5, 10.0])

    def f(v):
        return np.sum(np.sin(v) * np.exp(v / 4))

    r = finite_difference_gradient(f, x, scheme=scheme)
    exact = np.cos(x) * np.exp(x / 4) + np.sin(x) * np.exp(x / 4) / 4
    assert r.method == "finite_difference" and r.grad.shape == x.shape
    assert np.all(np.abs(r.grad - exact) <= r.error + 0.5 * FLOAT64.ulp(exact))
    assert r.status in (Status.CONVERGED, Status.ERROR_INCREASED)


def test_generic_complex_step_refuses_a_non_analytic_function():
    r = finite_difference_gradient(lambda v: np.sum(np.abs(v)), np.array([1.0, -2.0]), scheme="complex_step")
    assert r.status is Status.UNSUPPORTED and "not analytic" in r.reason


def test_generic_refuses_half_precision():
    r = finite_difference_gradient(lambda v: np.sum(v * v), np.array([1.0], dtype=np.float16))
    assert r.status is Status.UNSUPPORTED


def test_directional_check_accepts_the_truth_and_rejects_a_wrong_gradient():
    p = moderate(n=20, k=30)
    truth = gradcheck.exact_grad(p.logits, p.targets)
    check = directional_check(p, truth, probes=6, seed=1)
    assert check.passed and check.evaluations == 13
    wrong = truth.copy()
    wrong[3, 4] += 1e-6  # one element off by 1e-6
    assert not directional_check(p, wrong, probes=6, seed=1).passed
    again = directional_check(p, truth, probes=6, seed=1)
    assert np.array_equal(again.measured, check.measured)  # seeded


def test_taylor_test_slope_is_two_for_the_truth_and_one_for_a_wrong_gradient():
    p = moderate(n=8, k=5)
    truth = gradcheck.exact_grad(p.logits, p.targets)
    good = taylor_test(p, truth, seed=3)
    assert good.passed is True and 1.8 < good.order < 2.2
    bad = taylor_test(p, truth * 1.001, seed=3)
    assert bad.passed is False and 0.8 < bad.order < 1.2
    f32 = taylor_test(p, truth.astype(np.float32), seed=3)
    assert f32.passed is True


def test_taylor_test_is_inconclusive_without_curvature():
    p = make_problem(np.zeros((2, 3)), np.array([-100, -100]), reduction="sum")
    result = taylor_test(p, np.zeros((2, 3)))
    assert result.passed is None and math.isnan(result.order)


# ---- the kernel options (issue 12) ----------------------------------------------------------------

def test_softcap_derivative_bounds_are_the_sups():
    """|phi''| <= 4 / (3 sqrt(3) c) and |phi'''| <= 2 / c^2 for phi = c tanh(x / c) (Curvature's constants)."""
    x = sp.Symbol("x", real=True)
    phi = sp.tanh(x)  # c = 1; phi_c^(n)(x) = c^(1-n) phi^(n)(x/c)
    for order, constant in ((2, 4 / (3 * math.sqrt(3))), (3, 2.0)):
        deriv = sp.diff(phi, x, order)
        grid = np.linspace(-20, 20, 400001)
        values = np.abs(sp.lambdify(x, deriv, "numpy")(grid))
        assert np.max(values) <= constant * (1 + 1e-12) and np.max(values) >= constant * (1 - 1e-6)


def test_curvature_bounds_hold_along_a_line():
    """f(x) = F(softcap(z with z_k = x)) with the z-loss: |f''|, |f'''| from mpmath.diff stay below the bounds."""
    from gradcheck.estimators.finite_difference import Curvature

    rng = np.random.default_rng(11)
    for trial in range(6):
        k, cap, beta = 4, float(rng.choice([0.5, 3.0])), float(rng.choice([0.0, 0.3, 2.0]))
        z = rng.normal(scale=3.0, size=k)
        wt = rng.uniform(0.0, 1.5, size=k)
        col = int(rng.integers(0, k))

        def f(x):
            zz = [mpmath.mpf(float(v)) for v in z]
            zz[col] = x
            zc = [cap * mpmath.tanh(v / cap) for v in zz]
            lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in zc))
            return -mpmath.fsum(mpmath.mpf(float(w)) * (v - lse) for w, v in zip(wt, zc)) + beta * lse**2

        with mpmath.workdps(40):
            xs = np.linspace(z[col] - 1, z[col] + 1, 21)
            d2 = max(abs(float(mpmath.diff(f, mpmath.mpf(float(x)), 2))) for x in xs)
            d3 = max(abs(float(mpmath.diff(f, mpmath.mpf(float(x)), 3))) for x in xs)
            lse0 = float(mpmath.log(mpmath.fsum(mpmath.exp(cap * mpmath.tanh(mpmath.mpf(float(v)) / cap)) for v in z)))
        curv = Curvature(np.array([wt.sum()]), np.array([wt.max()]), np.array([beta]), np.array([abs(lse0)]), cap)
        b2, b3 = curv.bounds(1.0)
        assert d2 <= b2[0] and d3 <= b3[0], (trial, d2, b2, d3, b3)


def test_numpy_tanh_real_and_complex_are_within_the_assumed_ulps():
    from gradcheck.estimators.row_loss import CTANH_ULPS, TANH_ULPS

    x = np.concatenate([np.linspace(-25, 25, 4000), np.geomspace(1e-8, 25, 600), -np.geomspace(1e-30, 1e-3, 60)])
    for dtype, cdtype in ((np.float64, np.complex128), (np.float32, np.complex64)):
        fmt = gradcheck.float_format(dtype)
        u = fmt.unit_roundoff
        xd = x.astype(dtype)
        ref = np.array([float(mpmath.tanh(mpmath.mpf(float(v)))) for v in xd])
        assert np.max(np.abs(np.tanh(xd).astype(np.float64) - ref) / np.abs(ref)) <= TANH_ULPS * u
        h = dtype(u)
        w = np.tanh(xd.astype(cdtype) + cdtype(1j * h))
        cref = [mpmath.tanh(mpmath.mpc(float(v), float(h))) for v in xd]
        for got, want in ((w.real, [c.real for c in cref]), (w.imag, [c.imag for c in cref])):
            want = np.array([float(v) for v in want])
            assert np.max(np.abs(got.astype(np.float64) - want) / np.abs(want)) <= CTANH_ULPS * u


def kernel_problem(dtype=np.float64, **options):
    rng = np.random.default_rng(RNG_SEED)
    z = rng.normal(scale=3.0, size=(6, 7)).astype(dtype)
    return make_problem(z, rng.integers(0, 7, size=6), **options)


def test_row_functions_include_the_z_loss_and_the_softcap_and_column_matches_full():
    p = kernel_problem(lse_square_scale=0.25, softcap=2.0, label_smoothing=0.1)
    from gradcheck.estimators.terms import kernel_terms

    terms = kernel_terms(p)
    rows = RealRows(p.logits, terms.wt, FLOAT64, beta=terms.beta, cap=2.0)
    # F = l(z') + beta lse(z')^2, computed independently in mpmath
    for n in range(p.n):
        zc = [2 * mpmath.tanh(mpmath.mpf(float(v)) / 2) for v in p.logits[n]]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in zc))
        want = -mpmath.fsum(mpmath.mpf(float(w)) * (v - lse) for w, v in zip(terms.wt[n], zc)) + terms.beta[n] * lse**2
        assert abs(rows.value[n] - float(want)) <= rows.delta[n] + rows.spread[n]
    z2 = p.logits.copy()
    z2[:, 3] += 0.25
    assert np.array_equal(rows.column(3, z2[:, 3])[0], rows.full(z2)[0])  # same operations, same bits


def test_the_step_follows_the_softcaps_curvature():
    plain = cross_entropy_difference(kernel_problem(), scheme="central").details["step_per_row"]
    tight = cross_entropy_difference(kernel_problem(softcap=0.5), scheme="central").details["step_per_row"]
    assert np.all(tight < plain)  # f''' grows like 1/c^2: a smaller step
    from gradcheck.estimators.finite_difference import richardson_start

    assert richardson_start(None) == 0.5 and richardson_start(30.0) == 0.5 and richardson_start(0.5) == 0.125
    r = cross_entropy_difference(kernel_problem(softcap=0.5), scheme="richardson")
    assert r.details["first_step"] == 0.125 and r.status in (Status.CONVERGED, Status.ERROR_INCREASED)


def test_complex_step_with_softcap_through_a_masked_logit():
    z = np.array([[0.0, -np.inf, 1.0], [0.5, 0.2, 40.0]])
    r = gradient(z, np.array([1, 2]), method="fd_complex_step", softcap=3.0, lse_square_scale=0.1)
    assert r.status is Status.CONVERGED and r.grad[0, 1] == 0.0  # -inf -> -c, derivative 0
    from test_estimators import mp_kernel_grad

    ref = mp_kernel_grad(z, np.array([1, 2]), softcap=3.0, lse_square_scale=0.1)
    assert np.all(np.abs(r.grad - ref) <= r.error + 0.5 * FLOAT64.ulp(ref))
    # a target on the masked class is finite under a softcap: no NON_FINITE
    c = gradient(z, np.array([1, 2]), method="fd_central", softcap=3.0)
    assert c.status is Status.CONVERGED


@pytest.mark.parametrize("options", [dict(softcap=1.5), dict(lse_square_scale=0.3),
                                     dict(softcap=4.0, lse_square_scale=0.1, reduction="none",
                                          grad_output=np.array([2.0, -1.0, 0.0, 0.5, 1.0, -3.0]))])
def test_directional_check_and_taylor_test_with_the_kernel_options(options):
    from test_estimators import mp_kernel_grad

    p = kernel_problem(**options)
    truth = mp_kernel_grad(p.logits, p.targets, **options)
    check = directional_check(p, truth, probes=6, seed=2)
    assert check.passed
    plain = gradcheck.exact_grad(p.logits, p.targets, **{k: v for k, v in options.items() if k == "reduction"})
    assert not directional_check(p, plain, probes=6, seed=2).passed  # the options matter
    good = taylor_test(p, truth, seed=3)
    assert good.passed is True and 1.8 < good.order < 2.2
    assert taylor_test(p, plain, seed=3).passed is False
