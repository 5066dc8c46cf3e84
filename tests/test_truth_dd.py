"""The double-double fast path of the certified truth: each building block within the bound it is charged."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest

import gradcheck as gc
from gradcheck import truth_dd as T


def _fr(h, lo=0.0):
    return Fraction(float(h)) + Fraction(float(lo))


def _rel(got: Fraction, exact: Fraction) -> float:
    return float(abs(got - exact) / abs(exact))


@pytest.mark.parametrize("coarse", [False, True])
def test_exp_dd_within_exp_err(coarse):
    """Against mpmath at 300 bits, including the ends of the range and tiny shifts; the coarse reduction
    within EXP_ERR_COARSE (and not within the fine one's measured 2**-101)."""
    rng = np.random.default_rng(0)
    sh = np.concatenate([-rng.uniform(0, 600, 300), [0.0, -1e-300, -2.0**-40, -599.999, -0.34657, -1e-5]])
    sl = np.where(sh != 0, sh * rng.uniform(-2.0**-53, 2.0**-53, sh.size), 0.0)
    sh, sl = T.two_sum(sh, sl)  # a normalised double-double input
    eh, el = T._exp_dd(sh, sl, coarse=True) if coarse else T.exp_dd(sh, sl)
    worst = 0.0
    with mpmath.workprec(300):
        for i in range(sh.size):
            exact = mpmath.exp(mpmath.mpf(float(sh[i])) + mpmath.mpf(float(sl[i])))
            got = mpmath.mpf(float(eh[i])) + mpmath.mpf(float(el[i]))
            worst = max(worst, float(abs(got / exact - 1)))
    assert worst <= (T.EXP_ERR_COARSE if coarse else T.EXP_ERR)
    assert (worst > 2.0**-101) == coarse  # the fine reduction: 2**-101.7 derived, about 2**-104 seen
    assert eh[sh == 0][0] == 1.0 and el[sh == 0][0] == 0.0  # exp(0) = 1 exactly (the argmax)


def test_double_double_operations_within_their_charges():
    rng = np.random.default_rng(1)
    n = 2000
    xh = rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)
    yh = rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)
    xh, xl = T.two_sum(xh, xh * rng.uniform(-2.0**-53, 2.0**-53, n))
    yh, yl = T.two_sum(yh, yh * rng.uniform(-2.0**-53, 2.0**-53, n))
    for i in range(0, n, 7):
        x, y = _fr(xh[i], xl[i]), _fr(yh[i], yl[i])
        sh, sl = T.dd_add(xh[i:i + 1], xl[i:i + 1], yh[i:i + 1], yl[i:i + 1])
        if x + y:
            assert _rel(_fr(sh[0], sl[0]), x + y) <= T.ADD_ERR
        ph, pl = T.dd_mul(xh[i:i + 1], xl[i:i + 1], yh[i:i + 1], yl[i:i + 1])
        assert _rel(_fr(ph[0], pl[0]), x * y) <= T.MUL_ERR
        qh, ql = T.dd_mul_d(xh[i:i + 1], xl[i:i + 1], yh[i:i + 1])
        assert _rel(_fr(qh[0], ql[0]), x * Fraction(float(yh[i]))) <= T.MULD_ERR


def test_pairwise_row_sum_within_its_levels():
    rng = np.random.default_rng(2)
    e = rng.random((3, 1001)) * 2.0 ** rng.integers(-40, 0, (3, 1001))
    lo = e * rng.uniform(-2.0**-54, 2.0**-54, e.shape)
    e, lo = T.two_sum(e, lo)
    h, l, levels = T.dd_sum_rows(e, lo)
    assert levels == 10
    for r in range(3):
        exact = sum((_fr(a, b) for a, b in zip(e[r], lo[r])), Fraction(0))
        assert _rel(_fr(h[r], l[r]), exact) <= levels * T.ADD_ERR


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 1001, 16384, 32000])
def test_nonnegative_row_sum_within_its_levels(width):
    """dd_sum_nonnegative (the same-sign sloppy addition, odd columns folded into the first): within
    levels * ADD_ERR of the exact sum, levels at most twice ceil(log2 width), the inputs untouched; and
    dd_add_same_sign alone within ADD_ERR on pairs of every relative size."""
    rng = np.random.default_rng(width)
    e = rng.random((3, width)) * 2.0 ** rng.integers(-60, 0, (3, width))
    e[0] = e[0, 0]  # equal terms
    lo = e * rng.uniform(-2.0**-54, 2.0**-54, e.shape)
    e, lo = T.two_sum(e, lo)
    before = (e.copy(), lo.copy())
    h, l, levels = T.dd_sum_nonnegative(e, lo)
    assert np.array_equal(e, before[0]) and np.array_equal(lo, before[1])
    assert levels <= 2 * max(1, int(np.ceil(np.log2(width)))) and (levels == 0) == (width == 1)
    for r in range(3):
        exact = sum((_fr(a, b) for a, b in zip(e[r], lo[r])), Fraction(0))
        assert _rel(_fr(h[r], l[r]), exact) <= max(levels, 1) * T.ADD_ERR
    x = rng.random(4000) * 2.0 ** rng.integers(-80, 10, 4000)
    y = rng.random(4000) * 2.0 ** rng.integers(-80, 10, 4000)
    xh, xl = T.two_sum(x, x * rng.uniform(-2.0**-53, 2.0**-53, 4000))
    yh, yl = T.two_sum(y, y * rng.uniform(-2.0**-53, 2.0**-53, 4000))
    sh, sl = T.dd_add_same_sign(xh, xl, yh, yl)
    for i in range(0, 4000, 13):
        exact = _fr(xh[i], xl[i]) + _fr(yh[i], yl[i])
        assert _rel(_fr(sh[i], sl[i]), exact) <= T.ADD_ERR


def test_decide_rounds_only_what_the_enclosure_settles():
    f32 = gc.float_format("float32")
    mid = np.array([1 + 2.0**-24])  # halfway between 1 and 1 + 2**-23 in float32
    tiny = np.array([2.0**-90])
    assert np.isnan(T.decide(mid, np.array([0.0]), tiny, f32))[0]
    assert T.decide(mid, np.array([2.0**-60]), tiny, f32)[0] == 1 + 2.0**-23
    assert T.decide(mid, np.array([-2.0**-60]), tiny, f32)[0] == 1.0
    # below a power of two the gap is half: 1 - 2**-25 is the midpoint under 1
    assert np.isnan(T.decide(np.array([1 - 2.0**-25]), np.array([0.0]), tiny, f32))[0]
    assert T.decide(np.array([1 - 2.0**-25]), np.array([2.0**-70]), tiny, f32)[0] == 1.0
    # zeros: the enclosure must exclude 0, and gives the sign
    z = T.decide(np.array([1e-50, -1e-50, 1e-50]), np.zeros(3), np.array([1e-60, 1e-60, 2e-50]), f32)
    assert z[0] == 0 and not np.signbit(z[0]) and z[1] == 0 and np.signbit(z[1]) and np.isnan(z[2])
    # float64: the low part decides against the half ulp
    f64 = gc.float_format("float64")
    assert T.decide(np.array([1.0]), np.array([2.0**-54]), np.array([2.0**-100]), f64)[0] == 1.0
    assert np.isnan(T.decide(np.array([1.0]), np.array([2.0**-53]), np.array([2.0**-100]), f64))[0]
    assert T.decide(np.array([3.0]), np.array([2.0**-60]), np.array([2.0**-100]), f64)[0] == 3.0


@pytest.mark.parametrize("fmt", ["float64", "float32", "float16", "bfloat16"])
def test_decide_quick_test_changes_nothing(fmt):
    """decide's quick test (|t| + slack below the half-gap 2**(e - p)) accepts only what the half-gap test accepts, with the same
    value: over values on, near and between the format's midpoints, powers of two, the subnormal and overflow
    edges, zeros, inf and NaN, with bounds from 0 to wide, decide equals _decide_full bit for bit."""
    f = gc.float_format(fmt)
    rng = np.random.default_rng(7)
    n = 20000
    with np.errstate(all="ignore"):
        d = rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)
        d = gc.round_to_format(d, f).astype(np.float64)
        frac = rng.choice([0.0, 0.25, 0.5, -0.5, 0.4999999, -0.25, 0.5000001, 1e-9], n)
        vh = d + frac * f.ulp(d)
        special = np.array([0.0, -0.0, f.tiny, -f.tiny, f.smallest_subnormal, f.max, -f.max, np.inf, -np.inf,
                            np.nan, 1.0, 2.0, 0.5, 1 - 2.0**-(f.precision + 1), 2.0**-1030])
        vh = np.concatenate([vh, special, special * (1 + 2.0**-52)])
        m = vh.size
        vl = np.nan_to_num(np.abs(vh) * rng.choice([0.0, 2.0**-54, -2.0**-54, 2.0**-60, -2.0**-80], m), posinf=0.0)
        bound = np.nan_to_num(np.abs(vh) * rng.choice([0.0, 2.0**-100, 2.0**-60, 2.0**-30, 2.0**-10], m),
                              posinf=np.inf)
    got, full = T.decide(vh, vl, bound, f), T._decide_full(vh, vl, bound, f)
    assert np.array_equal(np.isnan(got), np.isnan(full))
    same = ~np.isnan(got)
    assert np.array_equal(got[same].view(np.uint64), full[same].view(np.uint64))  # signed zeros included
    assert same.sum() > m // 3  # and it decides a fair share (the quick test is not vacuous)


@pytest.mark.parametrize("options", [{}, {"lse_square_scale": 0.5, "reduction": "sum"},
                                     {"label_smoothing": 0.25, "weight": [1.0, -2.0, 0.5, 4.0]}])
def test_fast_path_matches_mpmath_where_it_decides(options):
    """The values the fast path decides are the slow path's (which the independent tests check)."""
    from gradcheck.exact import _RowFacts, certified_grad

    rng = np.random.default_rng(4)
    z = rng.standard_normal((6, 4)) * 5
    t = rng.integers(0, 4, 6)
    problem = gc.make_problem(z, t, **options)
    for fmt in ("float64", "float32", "bfloat16"):
        fmt = gc.float_format(fmt)
        fast = T.grad_decided(problem, _RowFacts(problem), fmt, np.ones(z.shape, dtype=bool))
        slow = certified_grad(problem, fmt, prefilter=False)
        known = ~np.isnan(fast)
        assert known.mean() > 0.9
        np.testing.assert_array_equal(fast[known], slow.astype(np.float64)[known])


@pytest.mark.parametrize("c", [30.0, 1.0, 0.05, 2.0**-400, 1e6, 2.0**400])
def test_softcap_dd_within_its_bounds(c):
    """z' = c tanh(z / c) within zeta, h = 1 - tanh^2(z / c) within h_rel (or below 2**(2 - nsat) where
    saturated), against mpmath at 400 bits: |z| / c from 0 and subnormal through the 2**-30 branch point,
    the knees 2 |z| / c = 600 (h scaled) and 1200 (h bounded), to overflow of z / c; -inf is -c, h = 0."""
    rng = np.random.default_rng(5)
    ratios = np.concatenate([[0.0, 2.0**-31, 2.0**-30, 2.0**-29, 1e-8, 0.3, 1.0, 50.0, 299.99, 300.01, 599.99,
                              600.01, 1e4], np.exp(rng.uniform(np.log(1e-12), np.log(700.0), 150))])
    with np.errstate(over="ignore"):
        z = np.concatenate([ratios * c, -ratios * c, [5e-324, -5e-324, 1.0, -3.5, 1e300, -1e300, -np.inf]])
    z = z[np.isfinite(z) | np.isneginf(z)]
    cap = T.softcap_dd(z, c)
    assert cap.zero.sum() == 1 and cap.zh[cap.zero][0] == -c and cap.hh[cap.zero][0] == 0
    with mpmath.workprec(400):
        mc = mpmath.mpf(c)
        for i in np.flatnonzero(~cap.zero):
            x = mpmath.mpf(float(z[i])) / mc
            zc = mc * mpmath.tanh(x)
            assert abs(_fr(cap.zh[i], cap.zl[i]) - _to_fr(zc)) <= Fraction(float(cap.zeta[i])), (z[i], c)
            if cap.sat[i]:
                assert cap.hh[i] == 0 and 2 * abs(x) / mpmath.log(2) >= 2 - cap.hlog[i] >= 1729  # h <= 4 e^{-2|x|}
            else:
                h = _to_fr(mpmath.sech(x) ** 2)
                got = _fr(cap.hh[i], cap.hl[i]) * Fraction(2) ** int(cap.hexp[i])
                assert abs(got - h) <= Fraction(float(cap.h_rel[i])) * h and h < Fraction(2) ** int(cap.hlog[i])
                assert (cap.hexp[i] < -800) == (2 * abs(x) > 600)
                assert cap.h_rel[i] <= 2.0**-90 and cap.zeta[i] <= max(c, abs(z[i])) * 2.0**-60


def _to_fr(x) -> Fraction:
    sign, man, exp, _ = x._mpf_
    man = -man if sign else man
    return Fraction(man * 2**exp) if exp >= 0 else Fraction(man, 2**-exp)


def test_recip_dd_within_its_charge():
    rng = np.random.default_rng(6)
    xh = 1 + rng.random(500) * 2.0 ** rng.integers(0, 40, 500)
    xh, xl = T.two_sum(xh, xh * rng.uniform(-2.0**-53, 2.0**-53, xh.size))
    ih, il, rel = T.recip_dd(xh, xl)
    for i in range(xh.size):
        assert _rel(_fr(ih[i], il[i]), 1 / _fr(xh[i], xl[i])) <= rel[i] <= 2.0**-100
