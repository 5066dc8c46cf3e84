"""The certified truth: correctly rounded, checked against an independent evaluation at 3000 bits."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from gradcheck.regimes import REGIMES, make_case

import gradcheck as gc
from gradcheck.exact import _round_fraction

DTYPES = ["float64", "float32", "float16", "bfloat16"]


def _to_fraction(x: mpmath.mpf) -> Fraction:
    sign, man, exp, _ = x._mpf_
    if not man:
        return Fraction(0)
    man = -man if sign else man
    return Fraction(man * 2**exp) if exp >= 0 else Fraction(man, 2**-exp)


def _mp(fr: Fraction) -> mpmath.mpf:
    return mpmath.mpf(fr.numerator) / fr.denominator


def independent(z, t, opts, what="grad", prec=3000):
    """Plain (non-interval) mpmath at ``prec`` bits, rounded to float64 by CPython's int/int division.

    3000 bits cover the cancellation in p_t - 1 at gaps up to ~730 (~1060 bits).
    """
    problem = gc.make_problem(z, t, **opts)
    out = []
    with mpmath.workprec(prec):
        d = _mp(problem.exact_divisor())
        for n in range(problem.n):
            zn = problem.logits[n].astype(np.float64)
            zmax = mpmath.mpf(float(zn.max()))
            # exp(-65536) ~ 2**-94548 changes no rounding; skipping mpmath's exp(-1e300) keeps this fast
            e = [mpmath.exp(mpmath.mpf(float(v)) - zmax) if np.isfinite(v) and float(v) - float(zmax) > -65536
                 else mpmath.mpf(0) for v in zn]
            total = mpmath.fsum(e)
            wt = [_mp(problem.exact_weight(c) * problem.exact_target(n, c)) for c in range(problem.k)]
            s = mpmath.fsum(wt)
            if what == "grad":
                out.append([(e[c] / total * s - wt[c]) / d for c in range(problem.k)])
            else:
                terms = [wt[c] * (mpmath.log(total) - (mpmath.mpf(float(zn[c])) - zmax)) for c in range(problem.k) if wt[c]]
                if any(np.isneginf(zn[c]) for c in range(problem.k) if wt[c]):
                    out.append(mpmath.inf)
                else:
                    out.append(mpmath.fsum(terms))
        if what == "grad":
            return problem.restore_shape(np.array([[float(_to_fraction(v)) for v in row] for row in out]))
        if problem.reduction == "none":
            return problem.restore_shape(np.array([float(_to_fraction(v)) if v != mpmath.inf else np.inf for v in out]))
        total = mpmath.fsum(out) / (d if problem.reduction == "mean" else 1)
        return np.array(np.inf if total == mpmath.inf else float(_to_fraction(total)))


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array_equal(a, b) or bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def _midpoint(x, dtype):
    """True where float64 x lies exactly halfway between two numbers of ``dtype`` (double rounding risk)."""
    fmt = gc.float_format(dtype)
    r = gc.round_to_format(x, fmt).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return np.abs(x - r) == fmt.ulp(r) / 2


@settings(max_examples=120)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES), st.sampled_from(DTYPES))
def test_correctly_rounded_against_independent_evaluation(seed, regime, dtype):
    z, t, opts = make_case(seed, regime, dtype)
    truth64 = gc.exact_grad(z, t, dtype="float64", **opts)
    assert _same(truth64, independent(z, t, opts))
    got = gc.exact_grad(z, t, **opts)
    assert got.dtype == gc.float_format(dtype).dtype
    safe = ~_midpoint(truth64, dtype)
    assert _same(got.astype(np.float64)[safe], gc.round_to_format(truth64, dtype).astype(np.float64)[safe])
    assert _same(got, gc.exact_grad(z, t, prefilter=False, **opts))


@settings(max_examples=60)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES))
def test_loss_correctly_rounded(seed, regime):
    z, t, opts = make_case(seed, regime)
    assert _same(gc.exact_loss(z, t, **opts), independent(z, t, opts, what="loss"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_gradients(dtype):
    """Gaps chosen so that the non-target gradients are subnormal in the checked format."""
    fmt = gc.float_format(dtype)
    gap = -np.log(fmt.tiny) + 0.5  # p ~ tiny * e**-0.5 .. tiny * e**-3: inside even bfloat16's subnormals
    z = np.array([[0.0, -gap, -gap - 1.0, -gap - 2.5]]).astype(fmt.dtype)
    t = np.array([0])
    got = gc.exact_grad(z, t)
    assert np.all(np.abs(got[0, 1:].astype(np.float64)) < fmt.tiny)
    assert np.all(got[0, 1:].astype(np.float64) > 0)
    expected = independent(z, t, {})
    safe = ~_midpoint(expected, dtype)
    assert _same(got.astype(np.float64)[safe], gc.round_to_format(expected, dtype).astype(np.float64)[safe])


def test_rational_cases_are_exact():
    # a tie: p = 1/3 each, g = (1/3 - 1, 1/3, 1/3)
    g = gc.exact_grad(np.zeros((1, 3)), np.array([0]))
    assert g[0, 0] == float(Fraction(-2, 3)) and g[0, 1] == float(Fraction(1, 3))
    # one class: p = 1, g = 0; masked classes: p = 0, g = -w t / D
    assert gc.exact_grad(np.array([[2.5]]), np.array([0]))[0, 0] == 0.0
    z = np.array([[1.0, -np.inf, -np.inf]])
    np.testing.assert_array_equal(gc.exact_grad(z, np.array([[0.5, 0.25, 0.0]]), reduction="sum"), [[0.25, -0.25, 0.0]])
    assert gc.exact_loss(z, np.array([[0.5, 0.25, 0.0]])) == np.inf
    assert gc.exact_loss(z, np.array([0])) == 0.0
    # ignored rows are exactly zero
    g = gc.exact_grad(np.ones((2, 3)) * np.array([[1.0], [2.0]]) + np.arange(3), np.array([1, -100]))
    assert not g[1].any()


def test_midpoint_rounds_to_even():
    fmt = gc.float_format("float16")
    assert _round_fraction(Fraction(2049, 2048), fmt) == 1.0  # halfway between 1 and 1 + 2**-10: even is 1
    assert _round_fraction(Fraction(2051, 2048), fmt) == 1 + 2**-9
    assert _round_fraction(Fraction(-1, 2**25), fmt) == 0.0  # half the smallest subnormal: ties to even 0
    assert _round_fraction(Fraction(65520), fmt) == np.inf  # max + half ulp rounds to infinity


def test_does_not_touch_mpmath_global_precision():
    before = (mpmath.mp.prec, mpmath.iv.prec)
    gc.exact_grad(np.array([[0.0, 1.0, -3.0]]), np.array([1]))
    assert (mpmath.mp.prec, mpmath.iv.prec) == before


@pytest.mark.slow
def test_many_classes_float64():
    """K = 100 000: the fast path stays within its bound, and the truth agrees with the independent sum."""
    rng = np.random.default_rng(99)
    k = 100_000
    z = rng.standard_normal((1, k)) * 3
    z[0, 77_777] = 25.0  # the maximum late in the row
    t = np.array([77_777])
    truth = gc.exact_grad(z, t)
    g, bound = gc.cross_entropy_grad_bounded(z, t)
    assert np.all(np.abs(g - truth) <= bound + gc.float_format("float64").ulp(truth) / 2)
    assert gc.compare(g, truth).max_ulp <= 8
    np.testing.assert_array_equal(truth[0, [0, 77_777, k - 1]], independent(z, t, {}, prec=300)[0, [0, 77_777, k - 1]])  # gaps < 60 here


def test_cut_terms_decide_a_midpoint_by_their_sign():
    """With exp(-1e5) treated as a cut term the values sit exactly on float16 midpoints; the tiny
    positive probability decides, against ties-to-even (docs/exact.md, "Cutoff")."""
    w0 = 1 + 3 * 2.0**-11  # the midpoint between 1 + 2**-10 and 1 + 2**-9 (even: 1 + 2**-9)
    z = np.array([[-1e5, 0.0]])
    g = gc.exact_grad(z, np.array([[1.0, 0.0]]), weight=np.array([w0, 1.0]), reduction="sum", dtype="float16")
    # g_0 = -w0 + p_0 S: just above -w0, so toward zero; g_1 = S (1 - p_0): just below S
    np.testing.assert_array_equal(g.astype(np.float64), [[-(1 + 2.0**-10), 1 + 2.0**-10]])
    # the case that used to raise CertificationError: huge logits, smoothing and weights
    g = gc.exact_grad(np.array([[0.0, 1e5, -500.0]]), np.array([1]), label_smoothing=0.2, weight=np.array([3.5, 1, 1]))
    eps = Fraction(0.2)  # the double nearest 0.2: smoothing uses it exactly
    t_other, t_hit = eps / 3, 1 - eps + eps / 3
    s = Fraction(3.5) * t_other + t_hit + t_other  # sum_c w_c t_c; p = (tiny, 1 - tiny, tiny); D = w_1 = 1
    # the tiny p's only matter at a midpoint: s - t_hit = 1.5 * double(0.2) is exactly one, and p_1 < 1
    # rounds it down (ties-to-even would round it up)
    below = Fraction(1, 2**2000)
    expected = [-Fraction(3.5) * t_other, s - t_hit - below, -t_other]
    np.testing.assert_array_equal(g, [[float(x) for x in expected]])
    assert float(s - t_hit) != float(s - t_hit - below)  # it really is a midpoint
    assert gc.exact_loss(np.array([[0.0, -1e300]]), np.array([[0.5, 0.0]])) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_underflow_is_negative_zero(dtype):
    """-(p_1 + p_2) underflows: the correctly rounded result is -0.0, with +0.0 where the truth is positive."""
    fmt = gc.float_format(dtype)
    z = np.array([[fmt.max, -fmt.max, fmt.max * 0.85]]).astype(fmt.dtype)
    g = gc.exact_grad(z, np.array([0])).astype(np.float64)
    assert g[0, 0] == 0 and np.signbit(g[0, 0])
    assert g[0, 1] == 0 and not np.signbit(g[0, 1])
    g = gc.exact_grad(np.array([[0.0, -800.0]]).astype(fmt.dtype), np.array([0]))
    assert np.signbit(g.astype(np.float64)[0, 0]) and g.astype(np.float64)[0, 0] <= 0


HUGE_Z = np.array([[2.0, -1.0, 0.5], [0.0, 40.0, -700.0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("targets", "options"), [
    (np.array([0, 1]), {"weight": [1e308, 1e308, 1]}),  # the divisor overflows in float64
    (np.array([0, 1]), {"weight": [1e308, 1e308, 1], "label_smoothing": 0.1}),
    (np.array([[1e308, 1e308, 1.0], [1.0, 2.0, 1e308]]), {}),  # S overflows in float64
    (np.array([[1e-300, 1e308, 1.0], [1e-300, 2.0, 1e308]]), {"weight": [1e308, 1e-300, 1e-300], "reduction": "sum"}),
])
def test_correctly_rounded_near_overflow(targets, options, dtype):
    """The prefilter is the float64 oracle's bound (for narrower formats) or its extended twin: a false
    bound there would be a wrong "certified" value (issue 15, item 4)."""
    z = HUGE_Z.astype(gc.float_format(dtype).dtype)
    truth64 = independent(z, targets, options)
    assert _same(gc.exact_grad(z, targets, dtype="float64", **options), truth64)
    got = gc.exact_grad(z, targets, **options)
    safe = ~_midpoint(truth64, dtype)
    assert _same(got.astype(np.float64)[safe], gc.round_to_format(truth64, dtype).astype(np.float64)[safe])
    assert _same(got, gc.exact_grad(z, targets, prefilter=False, **options))
    try:
        loss64 = independent(z, targets, options, what="loss")
    except OverflowError:  # the loss itself is beyond float64 (by far: these are 1e308 * 700)
        loss64 = np.array(np.inf)
    assert _same(gc.exact_loss(z, targets, dtype="float64", **options), loss64)


def test_a_row_shares_its_sum_and_factor(monkeypatch):
    """Issue 15, item 15: each element used to convert S, w_c t_c and D to intervals again (and a
    precision change made the next element recompute all K exponentials); now the row's factor
    S / (Z D) is computed once per precision. Counted, not timed."""
    from gradcheck import exact

    calls = {"interval": 0, "exp": 0}
    interval, exp_shifted = exact._interval, exact._exp_shifted

    def counted_interval(x):
        calls["interval"] += 1
        return interval(x)

    def counted_exp(*args):
        calls["exp"] += 1
        return exp_shifted(*args)

    monkeypatch.setattr(exact, "_interval", counted_interval)
    monkeypatch.setattr(exact, "_exp_shifted", counted_exp)
    k = 500
    z = np.random.default_rng(7).standard_normal((1, k)) * 3
    g = gc.exact_grad(z, np.array([3]), prefilter=False)
    precisions = calls["exp"] // k  # each precision reached evaluates the K exponentials once
    assert calls["exp"] % k == 0 and precisions <= 3
    assert calls["interval"] <= 2 * precisions + 3  # S and D per precision, w_t t_t for the one target
    assert _same(g, independent(z, np.array([3]), {}, prec=400))


def test_progress_reports_the_slow_elements_and_the_result_is_the_same():
    rng = np.random.default_rng(5)
    z, t = rng.standard_normal((2, 5000)), rng.integers(0, 5000, 2)
    calls = []
    got = gc.exact_grad(z, t, prefilter=False, progress=lambda done, total: calls.append((done, total)))
    assert np.array_equal(got, gc.exact_grad(z, t))
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total) and total > 0  # no prefilter: all go slow
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) >= 1 + total // 4096


# ---- issue 12: softcap, z-loss and the upstream gradient -------------------------------------------


def _float(v):
    """A finite mpf rounded to float64 by CPython's int division, with the exponent checked first (an
    exp(-1e300) would not fit a Fraction): far below 2**-1075 is a signed 0, far above 2**1024 is inf."""
    if not mpmath.isfinite(v):
        return float(v)
    if v == 0:
        return 0.0
    top = v._mpf_[2] + v._mpf_[3]  # exponent of the leading bit, plus one
    if top < -1100:
        return math.copysign(0.0, float(mpmath.sign(v)))
    if top > 1100:
        return math.copysign(math.inf, float(mpmath.sign(v)))
    return float(_to_fraction(v))


def _float_or_tie(v):
    """:func:`_float`, but NaN where ``v`` is exactly halfway between two doubles: there the terms this
    evaluation drops (below 2**-94548) decide, and only exact.py's cut-term signs see them."""
    x = _float(v)
    if math.isfinite(x) and x != 0 and mpmath.isfinite(v):
        gap = Fraction(math.ulp(x))
        if abs(_to_fraction(v) - Fraction(x)) * 2 == gap:
            return math.nan
    return x


def _same_loss(got, expected):
    """Equal where the independent evaluation is decided (see :func:`_float_or_tie`)."""
    got, expected = np.atleast_1d(np.asarray(got, np.float64)), np.atleast_1d(np.asarray(expected, np.float64))
    known = ~np.isnan(expected) | np.isnan(got)
    return _same(got[known], expected[known])


def independent_options(z, t, opts, what="grad", prec=3000):
    """Plain mpmath at ``prec`` bits straight from the definitions (common semantics, docs/exact.md):
    z' = c tanh(z / c), lse = log sum exp z', g = u_n sech^2(z / c) [(p S - A) / D + 2 lambda lse p / Dz],
    loss = sum_n [sum_c A_c (lse - z'_c)] / D + lambda sum_n lse^2 / Dz. Not via exact.py."""
    problem = gc.make_problem(z, t, **opts)
    cap, lam = problem.softcap, problem.lse_square_scale
    active = problem.active_rows()
    mean = problem.reduction == "mean"
    upstream = np.broadcast_to(np.asarray(1.0 if opts.get("grad_output") is None else opts["grad_output"],
                                          np.float64), (problem.n,))
    with mpmath.workprec(prec):
        d = _mp(problem.exact_divisor()) if mean else mpmath.mpf(1)
        dz = mpmath.mpf(int(active.sum())) if mean else mpmath.mpf(1)
        grads, losses = [], []
        for n in range(problem.n):
            zn = [mpmath.mpf(float(v)) for v in problem.logits[n].astype(np.float64)]
            if cap is None:
                zc, chain = zn, [mpmath.mpf(1)] * len(zn)
            else:
                c = mpmath.mpf(cap)
                zc = [-c if v == -mpmath.inf else c * mpmath.tanh(v / c) for v in zn]
                # sech^2 y < 4 e^{-2|y|} < 2**-28000 for |y| > 1e4: a stand-in of that size rounds the same
                # (to a signed 0) and spares mpmath's cosh of 1e300
                chain = [mpmath.mpf(0) if v == -mpmath.inf else mpmath.sech(v / c) ** 2 if abs(v / c) < 1e4
                         else mpmath.mpf(2) ** -30000 for v in zn]
            top = max(zc)
            # exp(-65536) ~ 2**-94548 is below these 3000 bits: skipping it (and mpmath's exp(-1e300)) changes nothing
            e = [mpmath.exp(v - top) if v - top > -65536 else mpmath.mpf(0) for v in zc]
            total = mpmath.fsum(e)
            lse = top + mpmath.log(total)
            p = [x / total for x in e]
            wt = [_mp(problem.exact_weight(c) * problem.exact_target(n, c)) for c in range(problem.k)]
            s = mpmath.fsum(wt)
            if not active[n]:
                grads.append([mpmath.mpf(0)] * problem.k)
                losses.append(mpmath.mpf(0))
                continue
            u = mpmath.mpf(float(upstream[n]))
            grads.append([u * chain[c] * ((p[c] * s - wt[c]) / d + 2 * lam * lse * p[c] / dz) for c in range(problem.k)])
            if any(wt[c] and zc[c] == -mpmath.inf for c in range(problem.k)):
                signs = {mpmath.sign(wt[c] / d) for c in range(problem.k) if wt[c] and zc[c] == -mpmath.inf}
                losses.append(mpmath.nan if len(signs) == 2 else signs.pop() * mpmath.inf)  # inf - inf: nan
            else:
                losses.append(mpmath.fsum(wt[c] * (lse - zc[c]) for c in range(problem.k) if wt[c]) / d + lam * lse**2 / dz)
        if what == "grad":
            return problem.restore_shape(np.array([[_float(v) for v in row] for row in grads]))
        if problem.reduction == "none":
            return problem.restore_shape(np.array([_float_or_tie(v) for v in losses]))
        return np.array(_float_or_tie(mpmath.fsum(losses)))


def _upstream(rng, reduction, n):
    if reduction == "none":
        g = rng.choice([0.0, -1.0, 0.5, -3.25, 2.0, 1e-3, -1e5], n)
        return g
    return float(rng.choice([0.0, -1.0, 0.375, -2.5, 7.0]))


OPTION_SETS = [
    {"softcap": 30.0},
    {"softcap": 1.0},
    {"softcap": 0.05},  # c small: everything saturates
    {"lse_square_scale": 1e-4},
    {"lse_square_scale": 0.5},
    {"lse_square_scale": 3.0, "softcap": 2.0},
    {"lse_square_scale": 1e-4, "softcap": 30.0, "label_smoothing": 0.1},
    {},  # the upstream gradient alone
]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES), st.sampled_from(DTYPES), st.sampled_from(OPTION_SETS),
       st.sampled_from(["mean", "sum", "none"]), st.booleans())
def test_options_correctly_rounded_against_independent_evaluation(seed, regime, dtype, extra, reduction, upstream):
    z, t, opts = make_case(seed, regime, dtype)
    rng = np.random.default_rng(seed)
    opts = {**opts, **extra, "reduction": reduction}
    if opts.get("label_smoothing") and "label_smoothing" in extra and regime == "smoothed_weighted":
        opts["label_smoothing"] = extra["label_smoothing"]
    if upstream:
        opts["grad_output"] = _upstream(rng, reduction, np.atleast_2d(z).shape[0])
    try:
        gc.make_problem(z, t, **opts)
    except gc.InvalidArgument:  # e.g. an all -100 mean
        return
    truth64 = gc.exact_grad(z, t, dtype="float64", **opts)
    assert _same(truth64, independent_options(z, t, opts))
    got = gc.exact_grad(z, t, **opts)
    safe = ~_midpoint(truth64, dtype)
    assert _same(got.astype(np.float64)[safe], gc.round_to_format(truth64, dtype).astype(np.float64)[safe])
    assert _same_loss(gc.exact_loss(z, t, dtype="float64", **opts), independent_options(z, t, opts, what="loss"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    {"softcap": 30.0, "lse_square_scale": 1e-4, "reduction": "none", "grad_output": [2.0, -0.5, 0.0, 1.0]},
    {"softcap": 0.5, "weight": [1.0, -2.0, 0.5, 3.0, -0.25], "reduction": "sum", "grad_output": -1.5},
    {"lse_square_scale": 0.5, "weight": [2.0, -1.0, 0.5, 1.0, 1.0], "label_smoothing": 0.2},
    {"lse_square_scale": 1e-3, "ignore_index": 3, "grad_output": 0.25},
])
def test_hard_option_cases(dtype, options):
    """Softcap saturation with -inf logits, |lse| ~ 300, negative weights, ignored rows, zero and negative
    upstream gradients: every element against the independent evaluation."""
    fmt = gc.float_format(dtype)
    z = np.array([[300.0, 299.5, -np.inf, 0.0, -2.0],
                  [-300.0, -301.0, -302.5, -300.25, -np.inf],
                  [1e4, -1e4, 3.0, -np.inf, 0.125],
                  [-np.inf, -np.inf, -np.inf, -np.inf, 5.0]]).astype(fmt.dtype)
    t = np.array([0, 1, 2, 4])
    if "softcap" not in options:  # without softcap a -inf target has an infinite loss: aim elsewhere
        t = np.array([0, 1, 2, 3 if options.get("ignore_index") == 3 else 4])
    truth64 = independent_options(z, t, options)
    assert _same(gc.exact_grad(z, t, dtype="float64", **options), truth64)
    got = gc.exact_grad(z, t, **options)
    safe = ~_midpoint(truth64, dtype)
    assert _same(got.astype(np.float64)[safe], gc.round_to_format(truth64, dtype).astype(np.float64)[safe])
    assert _same_loss(gc.exact_loss(z, t, dtype="float64", **options), independent_options(z, t, options, what="loss"))


def test_softcap_of_minus_infinity_is_minus_c_with_zero_derivative():
    """Under softcap -inf is not masked: it is -c in the softmax (so it takes probability) and its own
    gradient is exactly +0 (the chain factor 1 - tanh^2 is 0)."""
    z = np.array([[0.0, -np.inf]])
    g = gc.exact_grad(z, np.array([0]), softcap=1.0, reduction="sum")
    assert g[0, 1] == 0 and not np.signbit(g[0, 1])
    p1 = 1 / (1 + np.exp(1.0))  # softmax([0, -1]) of the capped logits
    assert g[0, 0] == pytest.approx(-p1, rel=1e-15)
    all_masked = gc.exact_grad(np.full((1, 3), -np.inf), np.array([1]), softcap=2.0)
    assert not all_masked.any()
    assert gc.exact_loss(np.full((1, 3), -np.inf), np.array([1]), softcap=2.0) == pytest.approx(np.log(3), rel=1e-15)


def test_zloss_gradient_under_smoothing_is_p_not_p_minus_eps():
    """Liger-Kernel once shipped 2 lambda lse (p - eps/K) as the z-loss gradient under label smoothing;
    with the CE term cancelled out (one class is hit, the rest get eps / K) the truth is 2 lambda lse p."""
    z = np.array([[1.0, 2.0, 3.0]])
    lam = 0.25
    with_z = gc.exact_grad(z, np.array([2]), lse_square_scale=lam, label_smoothing=0.3)
    plain = gc.exact_grad(z, np.array([2]), label_smoothing=0.3)
    lse = np.log(np.exp(z).sum())
    p = np.exp(z - lse)
    np.testing.assert_allclose(with_z - plain, 2 * lam * lse * p, rtol=1e-13)


def test_upstream_gradient_is_a_vjp_per_row():
    """reduction='none' with a per-row upstream gradient: row n is g_n times its own gradient (Liger-Kernel
    #678 ignored it; TransformerEngine #2139 used grad_output[0] for every row). Exact, since g_n are powers of 2."""
    rng = np.random.default_rng(3)
    z, t = rng.standard_normal((3, 6)), np.array([1, 4, 0])
    base = gc.exact_grad(z, t, reduction="none")
    g = np.array([2.0, -0.5, 0.0])
    got = gc.exact_grad(z, t, reduction="none", grad_output=g)
    np.testing.assert_array_equal(got, base * g[:, None])
    assert not np.signbit(got[2]).any()  # a zero upstream gradient gives +0, not -0 * g
    np.testing.assert_array_equal(gc.exact_grad(z, t, grad_output=-4.0), -4.0 * gc.exact_grad(z, t))


def test_zloss_rows_without_target_weight_still_have_a_gradient():
    """A counted row whose target class has weight 0 has no cross-entropy gradient but keeps its z-loss one."""
    z = np.array([[0.5, -1.0, 2.0]])
    w = np.array([0.0, 1.0, 1.0])
    g = gc.exact_grad(z, np.array([0]), weight=w, lse_square_scale=0.1, reduction="sum")
    lse = np.log(np.exp(z).sum())
    np.testing.assert_allclose(g, 0.2 * lse * np.exp(z - lse), rtol=1e-14)
    assert not gc.exact_grad(z, np.array([0]), weight=w, reduction="sum").any()


# ---- issue 14 item 1: the double-double fast path ---------------------------------------------------


def _fast_equals_slow(seed, regime, dtype, lam, negative, upstream, softcap=None):
    """The case of ``seed`` and ``regime`` with the kernel options asked (z-loss ``lam``, weights of both
    signs, an upstream gradient, softcap unless the regime set one, an ignored row half the time):
    exact_grad with and without the double-double fast path, bit for bit."""
    z, t, opts = make_case(seed, regime, dtype)
    rng = np.random.default_rng(seed)
    n, k = np.atleast_2d(z).shape
    if softcap is not None:
        opts.setdefault("softcap", softcap)
    if negative:
        opts["weight"] = rng.choice([-2.0, -0.5, 0.0, 1.0, 3.0], k)
    if lam:
        opts["lse_square_scale"] = lam
    if upstream:
        opts["reduction"] = "none"
        opts["grad_output"] = _upstream(rng, "none", n)
    if n > 1 and t.ndim == 1 and rng.random() < 0.5:
        t = t.copy()
        t[0] = -100
    try:
        gc.make_problem(z, t, **opts)
    except gc.InvalidArgument:
        return
    assert _same(gc.exact_grad(z, t, **opts), gc.exact_grad(z, t, prefilter=False, **opts))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES), st.sampled_from(DTYPES),
       st.sampled_from([0.0, 1e-4, 0.5]), st.booleans(), st.booleans())
def test_fast_path_equals_the_slow_path(seed, regime, dtype, lam, negative, upstream):
    """The double-double enclosure only decides what the mpmath path decides the same way: identical
    results with and without it (index and probability targets, smoothing, z-loss, weights of both signs,
    ignored rows, upstream gradients)."""
    _fast_equals_slow(seed, regime, dtype, lam, negative, upstream)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fast_path_decides_nearly_everything_at_llm_scale(dtype):
    """(4, 32000) ordinary logits: the enclosure decides all but a few elements (counted, not timed), and
    sampled elements agree with the independent evaluation."""
    from gradcheck import truth_dd
    from gradcheck.exact import _RowFacts

    rng = np.random.default_rng(11)
    z = (rng.standard_normal((4, 32000)) * 3).astype(dtype)
    z[1, -1] = 40.0  # a late maximum
    t = np.array([5, 31999, 0, 17])
    problem = gc.make_problem(z, t, lse_square_scale=1e-4)
    decided = truth_dd.grad_decided(problem, _RowFacts(problem), problem.format, np.ones(z.shape, dtype=bool))
    assert np.isnan(decided).sum() <= 4


@pytest.mark.slow
def test_fast_path_at_llm_scale_against_independent_evaluation():
    """(4, 32000) with z-loss and a late maximum: every element against the independent evaluation."""
    rng = np.random.default_rng(11)
    z = rng.standard_normal((4, 32000)) * 3
    z[1, -1] = 40.0
    t = np.array([5, 31999, 0, 17])
    truth = gc.exact_grad(z, t, lse_square_scale=1e-4)
    assert _same(truth, independent_options(z, t, {"lse_square_scale": 1e-4}, prec=300))  # gaps < 60 here


# ---- the fast path under softcap (helper captruth) ----------------------------------------------

CAPS = [30.0, 1.0, 0.05, 2.0**-20, 1e4]


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES + ("saturated",)), st.sampled_from(DTYPES),
       st.sampled_from(CAPS), st.sampled_from([0.0, 1e-4, 0.5]), st.booleans(), st.booleans())
def test_fast_path_under_softcap_equals_the_slow_path(seed, regime, dtype, cap, lam, negative, upstream):
    """Under softcap the double-double enclosure (z', h from exp_dd) decides only what mpmath decides the
    same way, bit for bit in every format: every regime (huge, masked, ties, large gaps, saturated |z| / c
    up to 50), c from 2**-20 to 1e4, with z-loss, weights of both signs, ignored rows, upstream gradients."""
    _fast_equals_slow(seed, regime, dtype, lam, negative, upstream, softcap=cap)


def _capped_case(dtype, c):
    """|z| / c log-spaced from 1e-12 to 50 with both signs, -inf entries, a zero, and a logit at the
    format's top (huge z), in rows of 24; targets on every kind of entry (a -inf one included)."""
    fmt = gc.float_format(dtype)
    rng = np.random.default_rng(21)
    ratio = np.exp(rng.uniform(np.log(1e-12), np.log(50.0), (6, 24)))
    z = np.where(rng.random((6, 24)) < 0.5, -1.0, 1.0) * ratio * c
    z[0, 3] = z[2, 7] = z[4, 0] = -np.inf
    z[1, 5] = 0.0
    z[3, 11] = fmt.max
    z[5, :] = rng.standard_normal(24) * 3 * c  # an ordinary row around the knee
    with np.errstate(over="ignore"):
        z = z.astype(fmt.dtype)
    return z, np.array([0, 5, 7, 11, 2, 23])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    {"softcap": 30.0},
    {"softcap": 1.0, "lse_square_scale": 0.5, "reduction": "none", "grad_output": [1.0, -2.0, 0.5, 3.0, 0.0, -0.25]},
    {"softcap": 0.01, "label_smoothing": 0.1, "weight": np.linspace(-1.0, 2.0, 24), "reduction": "sum"},
])
def test_fast_path_under_softcap_against_independent_evaluation(dtype, options):
    """Saturated, tiny-|z| / c, huge and masked logits: the fast path decides nearly every element, and the
    result equals the independent 3000-bit evaluation (float64) and the slow path bit for bit (every format)."""
    c = options["softcap"]
    z, t = _capped_case(dtype, c)
    calls = []
    got = gc.exact_grad(z, t, progress=lambda done, total: calls.append(total), **options)
    assert calls[0] <= 4  # of 144 elements, to mpmath
    assert _same(got, gc.exact_grad(z, t, prefilter=False, **options))
    if dtype == "float64":
        assert _same(got, independent_options(z, t, options))
    else:
        truth64 = independent_options(z, t, options)
        safe = ~_midpoint(truth64, dtype)
        assert _same(got.astype(np.float64)[safe], gc.round_to_format(truth64, dtype).astype(np.float64)[safe])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fast_path_decides_nearly_everything_under_softcap(dtype):
    """(4, 32000) ordinary logits under Gemma-2's softcap 30 with z-loss and upstream gradients: the
    slow path (mpmath) gets at most a few elements (counted by exact_grad's progress report, not timed);
    before the double-double tanh it got all 128 000."""
    rng = np.random.default_rng(12)
    z = (rng.standard_normal((4, 32000)) * 3).astype(dtype)
    z[1, -1] = 40.0  # a late maximum
    z[2, :100] = -np.inf
    t = np.array([5, 31999, 0, 17])
    calls = []
    g = gc.exact_grad(z, t, softcap=30.0, lse_square_scale=1e-4, reduction="none",
                      grad_output=[1.0, -0.5, 2.0, 0.25], progress=lambda done, total: calls.append(total))
    assert calls[0] <= 4
    assert not g[2, :100].any() and not np.signbit(g[2, :100]).any()  # -inf: h = 0, exactly +0


def test_softcap_slow_path_where_z_over_c_overflows():
    """The slow path's shift c tanh(max z / c) with max z / c beyond float64 (1.8e308 / 0.01): tanh is 1,
    no overflow warning (numpy's scalar division raised one, an error under this suite's filterwarnings)."""
    z = np.array([[np.finfo(np.float64).max, 1.0, -np.inf]])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = gc.exact_grad(z, np.array([1]), softcap=0.01, prefilter=False)
    assert _same(g, independent_options(z, np.array([1]), {"softcap": 0.01}))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_under_softcap_where_the_chain_factor_is_below_2_to_the_minus_865(dtype):
    """|z| / c in (300, 340]: h ~ 2**-866 ... 2**-981, carried as mantissa times 2**hexp, so float64
    gradients near 2**-900 are decided (not only bounded); |z| / c of 700 and more: h < 2**-2000, a signed
    zero. Every element decided, and equal to the independent evaluation and the slow path."""
    fmt = gc.float_format(dtype)
    c = 0.5 if dtype in ("float16", "bfloat16") else 1.0  # |z| up to 350 is exact in every format
    ratio = np.linspace(300.5, 340.0, 20)
    z = np.concatenate([-ratio * c, [0.0, 1.0, -700 * c, 1500 * c, -1e6 * c if dtype == "float64" else -fmt.max]])
    z = np.stack([z, -z[::-1]]).astype(fmt.dtype)
    t = np.array([20, 3])
    options = {"softcap": c, "lse_square_scale": 0.25, "reduction": "sum"}
    calls = []
    got = gc.exact_grad(z, t, progress=lambda done, total: calls.append(total), **options)
    assert calls[0] == 0
    assert _same(got, gc.exact_grad(z, t, prefilter=False, **options))
    truth64 = independent_options(z, t, options)
    if dtype == "float64":
        assert np.all(np.abs(got[0, :20]) > 2.0**-990) and _same(got, truth64)
    else:
        safe = ~_midpoint(truth64, dtype)
        assert _same(got.astype(np.float64)[safe], gc.round_to_format(truth64, dtype).astype(np.float64)[safe])


@pytest.mark.parametrize("cap", [1e-130, 1e130])
def test_softcap_outside_the_fast_range_goes_to_the_slow_path(cap):
    """c outside [2**-400, 2**400] (where step 0's products could leave the range) is not taken by the
    fast path, and the slow path still gives the independent evaluation's values."""
    from gradcheck import truth_dd

    z = np.array([[2e-130, -1e-131, 0.0, -np.inf], [3.0, -2.0, 1e120, 0.5]])
    t = np.array([1, 2])
    assert not truth_dd.applies(gc.make_problem(z, t, softcap=cap))
    assert truth_dd.applies(gc.make_problem(z, t, softcap=2.0**-400)) and truth_dd.applies(gc.make_problem(z, t, softcap=2.0**400))
    assert _same(gc.exact_grad(z, t, softcap=cap), independent_options(z, t, {"softcap": cap}))
