"""Tests of the method registry, the result type, and every method's agreement with the certified truth."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import subprocess
import sys
from fractions import Fraction

import ml_dtypes
import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradcheck
from gradcheck.dtypes import FLOAT64
from gradcheck.errors import InvalidArgument
from gradcheck.estimators import MethodResult, Status, estimate, gradient, methods, spec
from gradcheck.estimators.terms import kernel_terms
from gradcheck.exact import certified_grad
from gradcheck.options import REDUCTIONS
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


# ---- the kernel options (issue 12): agreement with an independent mpmath evaluation -------------

def mp_kernel_grad(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   lse_square_scale=0.0, softcap=None, grad_output=None):
    """``g_n dL/dz`` from the definitions (common.md, issue 12), in mpmath, float64 out.

    Written from the raw arguments, not from Problem or the oracle: smoothed targets, torch's divisor D,
    the z-loss divisor Dz (counted rows), ``z' = c tanh(z / c)`` with ``-inf -> -c``, the chain factor
    ``sech^2(z / c)``, ``1 - p_i`` as ``sum_{c != i} e_c / Z``. The precision doubles from 256 bits
    until two evaluations agree to 2**-70 relative (or 1e-330 absolute).
    """
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    n, k = z.shape
    t_arr = np.asarray(targets)
    index = t_arr.dtype.kind in "iu"
    t_arr = t_arr.reshape(n) if index else t_arr.astype(np.float64).reshape(n, k)
    w = [Fraction(1)] * k if weight is None else [Fraction(float(x)) for x in np.asarray(weight, dtype=np.float64)]
    eps = Fraction(label_smoothing)
    active = [not index or int(t_arr[r]) != ignore_index for r in range(n)]
    tt = [[(1 - eps) * (Fraction(int(int(t_arr[r]) == c)) if index else Fraction(float(t_arr[r, c]))) + eps / k
           if active[r] else Fraction(0) for c in range(k)] for r in range(n)]
    if reduction == "mean":
        d = sum((w[int(t_arr[r])] for r in range(n) if active[r]), Fraction(0)) if index else Fraction(n)
        dz = Fraction(sum(active))
    else:
        d = dz = Fraction(1)
    if grad_output is None:
        up = [Fraction(1)] * n
    else:
        g = np.asarray(grad_output, dtype=np.float64)
        up = [Fraction(float(g))] * n if g.ndim == 0 else [Fraction(float(x)) for x in g.reshape(n)]
    lam = Fraction(lse_square_scale)

    def evaluate(prec):
        out = np.zeros((n, k), dtype=object)
        with mpmath.workprec(prec):
            mp = lambda q: mpmath.mpf(q.numerator) / q.denominator  # noqa: E731
            for r in range(n):
                if not active[r]:
                    out[r] = [mpmath.mpf(0)] * k
                    continue
                if softcap is None:
                    zc = [mpmath.mpf(float(x)) for x in z[r]]
                    chi = [mpmath.mpf(1)] * k
                else:
                    cc = mpmath.mpf(softcap)
                    zc = [-cc if x == -np.inf else cc * mpmath.tanh(mpmath.mpf(float(x)) / cc) for x in z[r]]
                    chi = [mpmath.mpf(0) if x == -np.inf else mpmath.sech(mpmath.mpf(float(x)) / cc) ** 2 for x in z[r]]
                m = max(zc)
                e = [mpmath.mpf(0) if x == -mpmath.inf else mpmath.exp(x - m) for x in zc]
                total = mpmath.fsum(e)
                lse = m + mpmath.log(total)
                s = mpmath.fsum(mp(w[c] * tt[r][c]) for c in range(k))
                for i in range(k):
                    p = e[i] / total
                    q = mpmath.fsum(e[c] for c in range(k) if c != i) / total
                    wt = mp(w[i] * tt[r][i])
                    out[r, i] = mp(up[r]) * chi[i] * ((p * (s - wt) - wt * q) / mp(d) + 2 * mp(lam) * lse * p / mp(dz))
        return out

    prec = 256
    prev = evaluate(prec)
    while prec <= 16384:
        prec *= 2
        cur = evaluate(prec)
        if all(abs(a - b) <= max(abs(b) * mpmath.mpf(2) ** -70, mpmath.mpf(10) ** -330)
               for a, b in zip(prev.ravel(), cur.ravel())):
            break
        prev = cur
    return np.array([[float(x) for x in row] for row in cur])


KERNEL_COMBOS = [dict(zip(("softcap", "lse_square_scale", "grad_output"), bits))
                 for bits in itertools.product((False, True), repeat=3)]
EXTRAS = ("plain", "smoothing, weights, ignored rows", "probability targets")


def kernel_spec(i):
    """Case ``i`` of the seeded kernel set: every combination of softcap, z-loss and upstream gradient
    (8) x reduction (3) x extras (3), on logits of scale 3, 30 or 300 with offsets 0 or +-300, softcaps
    0.5, 5 or 30 (saturation |z| >> c), lambda 1e-4, 0.1 or 1, and signed weights."""
    combo = KERNEL_COMBOS[i % 8]
    reduction = REDUCTIONS[(i // 8) % 3]
    extra = EXTRAS[(i // 24) % 3]
    rng = np.random.default_rng(1000 + i)
    n, k = 4, 5
    z = rng.normal(scale=(3.0, 30.0, 300.0)[i % 3], size=(n, k)) + (0.0, 300.0, -300.0)[(i // 3) % 3]
    if i % 5 == 0:
        z[0, 1] = -np.inf
    opts = {"reduction": reduction}
    if extra == "probability targets":
        targets = rng.dirichlet(np.ones(k), size=n) * rng.uniform(0.5, 2.0, size=(n, 1))
        if combo["softcap"] is False:
            targets[0, 1] = 0.0  # no target on the masked class
    else:
        targets = rng.integers(0, k, size=n)
        targets[0] = 0
    if extra == "smoothing, weights, ignored rows":
        targets[2] = -100
        opts.update(label_smoothing=0.1, weight=rng.uniform(-0.5, 3.0, size=k))
        opts["weight"][targets[0]] = 1.5  # D stays away from 0
        if combo["softcap"] is False:
            opts["label_smoothing"] = 0.0 if i % 5 == 0 else 0.1  # a smoothed target on -inf is an infinite loss
    if combo["softcap"]:
        opts["softcap"] = (0.5, 5.0, 30.0)[(i // 2) % 3]
    if combo["lse_square_scale"]:
        opts["lse_square_scale"] = (1e-4, 0.1, 1.0)[(i // 4) % 3]
    if combo["grad_output"]:
        opts["grad_output"] = (np.array([-1.5, 0.0, 0.25, 3.0]) if reduction == "none" else -0.75)
    return z, targets, opts


KERNEL_CASES = 72


@functools.lru_cache(maxsize=None)
def kernel_case(i, dtype):
    """(problem, mpmath reference at the logits rounded to dtype) for :func:`kernel_spec` ``i``."""
    z, targets, opts = kernel_spec(i)
    zd = z.astype(gradcheck.float_format(dtype).dtype)
    problem = make_problem(zd, targets, **opts)
    return problem, mp_kernel_grad(zd.astype(np.float64), targets, **opts)


def kernel_agreement(method, dtype):
    """Worst ratio |grad - reference| / (error + half a float64 ulp) over the kernel cases."""
    worst = 0.0
    for i in range(KERNEL_CASES):
        problem, ref = kernel_case(i, dtype)
        result = estimate(problem, method=method)
        assert result.status in (Status.CONVERGED, Status.ERROR_INCREASED, Status.ITERATION_LIMIT), (i, result)
        grad = np.asarray(result.grad, dtype=np.float64)
        allowed = result.error + 0.5 * FLOAT64.ulp(ref)
        diff = np.abs(grad - ref)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(diff == 0, 0.0, diff / allowed)
        bad = ~(ratio <= 1)
        if bad.any():
            where = tuple(int(x) for x in np.argwhere(bad)[0])
            raise AssertionError(f"{method} {dtype} case {i} {kernel_spec(i)[2]}: at {where} got {grad[where]!r}, "
                                 f"reference {ref[where]!r}, error {abs(grad[where] - ref[where]):.3g} > estimate "
                                 f"{result.error[where]:.3g}")
        worst = max(worst, float(ratio.max()))
    return worst


KERNEL_METHODS = [(m, d) for m in ALL for d in DTYPES if not (m.startswith("fd_") and d in ("float16", "bfloat16"))]


@pytest.mark.parametrize("method,dtype", KERNEL_METHODS)
def test_every_method_honours_the_kernel_options_within_its_estimate(method, dtype):
    worst = kernel_agreement(method, dtype)
    assert 0 < worst <= 1  # nonzero: the cases exercise every element's estimate


def test_the_kernel_cases_cover_every_combination_and_the_reference_is_not_the_plain_gradient():
    seen = set()
    for i in range(KERNEL_CASES):
        z, targets, opts = kernel_spec(i)
        seen.add((("softcap" in opts), ("lse_square_scale" in opts), ("grad_output" in opts), opts["reduction"],
                  np.asarray(targets).ndim, "weight" in opts))
    assert len(seen) == 8 * 3 * 3
    # the reference equals the plain gradient without options, and differs with each option
    z, targets, opts = kernel_spec(24)  # no options, mean, smoothing/weights/ignored
    plain = {k: v for k, v in opts.items() if k in ("weight", "label_smoothing", "reduction")}
    assert np.allclose(mp_kernel_grad(z, targets, **opts), gradcheck.exact_grad(z, targets, **plain), rtol=1e-15, atol=0)
    for extra in ({"softcap": 5.0}, {"lse_square_scale": 0.1}, {"grad_output": -0.75}):
        assert np.max(np.abs(mp_kernel_grad(z, targets, **opts, **extra) - gradcheck.exact_grad(z, targets, **plain))) > 1e-3


def test_a_modelled_bug_is_outside_every_estimate():
    """The estimates are not vacuous: the Liger z-loss slip 2 lambda lse (p - eps/K) and x tanh(x/c) miss."""
    rng = np.random.default_rng(5)
    z = rng.normal(scale=3.0, size=(4, 5))
    t = rng.integers(0, 5, size=4)
    opts = dict(label_smoothing=0.2, lse_square_scale=0.5, softcap=4.0)
    ref = mp_kernel_grad(z, t, **opts)
    p = make_problem(z, t, **opts)
    terms = kernel_terms(p)
    # the z-loss term 2 lambda lse (p - eps/K) / Dz instead of 2 lambda lse p / Dz (all rows count here)
    slip = ref - 2 * 0.5 * terms.lse[:, None] * (0.2 / 5) / p.zloss_divisor() * terms.chi
    # unsloth-zoo #593: z' = x tanh(x / c), its chain factor tanh(x/c) + (x/c) sech^2(x/c)
    x = z / 4.0
    wrong_cap = (mp_kernel_grad(z * np.tanh(x), t, label_smoothing=0.2, lse_square_scale=0.5)
                 * (np.tanh(x) + x / np.cosh(x) ** 2))
    for method in ALL:
        r = estimate(p, method=method)
        assert np.all(np.abs(r.grad - ref) <= r.error + 0.5 * FLOAT64.ulp(ref)), method
        assert np.any(np.abs(slip - r.grad) > r.error), method
        assert np.any(np.abs(wrong_cap - r.grad) > r.error), method


@st.composite
def kernel_regime_cases(draw, dtypes=DTYPES):
    """A case of one of the study's regimes with drawn kernel options: softcap (None, 0.5, 5, 30),
    z-loss (0, 1e-4, 0.1, 1) and an upstream gradient (none, a scalar, or per row for 'none')."""
    dtype = draw(st.sampled_from(dtypes))
    regime = draw(st.sampled_from(REGIMES))
    seed = draw(st.integers(0, 2**32 - 1))
    logits, targets, options = make_case(seed, regime, dtype)
    cap = draw(st.sampled_from([None, 0.5, 5.0, 30.0]))
    lam = draw(st.sampled_from([0.0, 1e-4, 0.1, 1.0]))
    if cap is not None:
        options["softcap"] = cap
    if lam:
        options["lse_square_scale"] = lam
    if draw(st.booleans()):
        n = np.atleast_2d(logits).shape[0]
        per_row = options.get("reduction") == "none" and np.ndim(logits) == 2
        values = draw(st.lists(st.sampled_from([-1.5, -0.25, 0.0, 0.5, 2.0, 3.0]), min_size=n, max_size=n))
        options["grad_output"] = np.array(values) if per_row else values[0]
    return make_problem(logits, targets, **options), regime


@pytest.mark.parametrize("method", ALL)
def test_every_method_agrees_with_the_certified_truth_under_the_kernel_options(method):
    @settings(AGREEMENT, max_examples=EXAMPLES.get(method, 40) // 2 + 10)
    @given(case=kernel_regime_cases())
    def agrees(case):
        problem, _ = case
        result = estimate(problem, method=method)
        check_agreement(problem, result)

    agrees()
