"""The certified truth's float64 tier (results narrower than float64): each step within its charge, the
enclosure around the exact gradient, and the decisions identical to the slow path's."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcheck as gc
from gradcheck import truth_dd, truth_f64
from gradcheck.exact import _RowFacts
from gradcheck.regimes import REGIMES, make_case

NARROW = ["float32", "float16", "bfloat16"]


def test_exp_f64_within_its_charge():
    """Against mpmath at 200 bits over [-600, 0]: the ends, tiny arguments, table knots and the reduction's
    half-way points (|r| at its largest)."""
    rng = np.random.default_rng(0)
    step = np.log(2) / 2**truth_dd.TABLE_BITS
    knots = -np.arange(0, 600 / step, 9973.0) * step
    s = np.concatenate([-rng.uniform(0, 600, 400), -rng.uniform(0, 1e-3, 50), knots, knots - step / 2,
                        [0.0, -0.0, -1e-300, -2.0**-60, -599.999999, -600.0, -step / 2, -step / 2 * (1 + 2.0**-30)]])
    s = s[s >= truth_dd.MIN_SHIFT]
    e = truth_f64.exp_f64(s)
    worst = 0.0
    with mpmath.workprec(200):
        for v, got in zip(s, e):
            worst = max(worst, float(abs(mpmath.mpf(float(got)) / mpmath.exp(mpmath.mpf(float(v))) - 1)))
    assert worst <= truth_f64.EXP64
    assert worst > truth_f64.EXP64 / 16  # the charge is not vacuous: within a small factor of what is seen
    assert truth_f64.exp_f64(np.array([0.0, -0.0]))[0] == 1.0 == truth_f64.exp_f64(np.array([-0.0]))[0]


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 1000, 1001, 32000])
def test_sum_rows_within_gamma_of_its_depth(width):
    rng = np.random.default_rng(width)
    x = rng.random((3, width)) * 2.0 ** rng.integers(-40, 2, (3, width))
    x[0, :] = x[0, 0]  # equal terms: the worst case of the naive order
    before = x.copy()
    total, depth = truth_f64.sum_rows(x)
    assert np.array_equal(x, before)  # the input is not modified
    assert depth <= 2 * max(1, int(np.ceil(np.log2(width))))
    gamma = depth * truth_f64.U / (1 - depth * truth_f64.U)
    for r in range(3):
        exact = sum((Fraction(float(v)) for v in x[r]), Fraction(0))
        assert abs(Fraction(float(total[r])) - exact) <= Fraction(gamma) * exact


def _problem(seed, regime, dtype, negative, upstream):
    z, t, opts = make_case(seed, regime, dtype)
    rng = np.random.default_rng(seed)
    if t.ndim != 1 or opts.get("label_smoothing"):
        return None
    n, k = np.atleast_2d(z).shape
    if negative:
        opts["weight"] = rng.choice([-2.0, -0.5, 0.0, 1.0, 3.0], k)
    if upstream:
        opts["reduction"] = "none"
        opts["grad_output"] = rng.choice([-3.0, 0.0, 0.5, 1e-30], n)
    if n > 1 and rng.random() < 0.5:
        t = t.copy()
        t[0] = -100
    try:
        return gc.make_problem(z, t, **opts)
    except gc.InvalidArgument:
        return None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES), st.sampled_from(["float64", "float32", "bfloat16"]),
       st.booleans(), st.booleans())
def test_enclosure_holds_against_the_float64_truth(seed, regime, dtype, negative, upstream):
    """|g - exact| <= bound + half a float64 ulp (the certified float64 truth is itself rounded) on every
    evaluated element, over every regime, logits of three formats, weights of both signs, ignored rows and
    upstream gradients."""
    problem = _problem(seed, regime, dtype, negative, upstream)
    if problem is None or problem.softcap is not None:
        return
    rows = _RowFacts(problem)
    f, _, ok = truth_dd.row_factors(problem, rows)
    idx = np.flatnonzero(ok & ~rows.zero_rows)
    if idx.size == 0:
        return
    g, bound, _, _, off = truth_f64.enclose(problem, idx, f[:, 0])
    truth = gc.exact_grad(problem.logits, problem.targets, dtype="float64", **_options(problem))
    truth = np.atleast_2d(truth)[idx]
    ulp = gc.float_format("float64").ulp(truth)
    evaluated = np.ones(g.shape, dtype=bool) if off is None else ~(off[0] | off[1])
    with np.errstate(invalid="ignore"):
        err = np.abs(g - truth)
    assert np.all((err <= bound + ulp / 2)[evaluated & np.isfinite(bound)])


def _options(problem):
    opts = {"reduction": problem.reduction}
    if problem.weight is not None:
        opts["weight"] = problem.weight
    if problem.grad_output is not None:
        opts["grad_output"] = problem.grad_output
    if problem.ignore_index is not None:
        opts["ignore_index"] = problem.ignore_index
    return opts


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(REGIMES), st.sampled_from(["float64", "float32", "bfloat16"]),
       st.sampled_from(NARROW), st.booleans(), st.booleans())
def test_tier_decides_what_the_slow_path_decides(seed, regime, dtype, fmt, negative, upstream):
    """Every element the tier decides equals the slow (mpmath) path's result bit for bit, signed zeros
    included: logits of three formats, results in the three narrow formats."""
    problem = _problem(seed, regime, dtype, negative, upstream)
    if problem is None or problem.softcap is not None:
        return
    rows = _RowFacts(problem)
    f_ = gc.float_format(fmt)
    todo = np.ones(problem.logits.shape, dtype=bool)
    todo[rows.zero_rows] = False
    decided = truth_f64.grad_decided(problem, rows, f_, todo)
    slow = np.atleast_2d(gc.exact_grad(problem.logits, problem.targets, dtype=fmt, prefilter=False,
                                       **_options(problem))).astype(np.float64)
    use = todo & ~np.isnan(decided)
    assert np.array_equal(decided[use].view(np.uint64), slow[use].view(np.uint64))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tier_decides_nearly_everything_at_llm_scale(dtype):
    """(4, 32000) ordinary logits with a late maximum, weights and an ignored row: the tier leaves at most a
    few elements to the later paths (counted, not timed)."""
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((4, 32000)) * 3).astype(dtype)
    z[1, -1] = 40.0
    t = np.array([5, 31999, -100, 17])
    problem = gc.make_problem(z, t, weight=rng.uniform(0.5, 2.0, 32000))
    rows = _RowFacts(problem)
    todo = np.ones(z.shape, dtype=bool)
    todo[rows.zero_rows] = False
    decided = truth_f64.grad_decided(problem, rows, problem.format, todo)
    assert (np.isnan(decided) & todo).sum() <= 4
    assert np.all(np.isnan(decided[2]))  # the ignored row is not evaluated


def test_exact_grad_uses_the_tier_only_for_narrow_results(monkeypatch):
    """float32 results go through the tier first and leave the double-double path almost nothing; float64
    results never use it; probability targets and z-loss are outside its scope."""
    seen = []
    real_dd, real_f64 = truth_dd.grad_decided, truth_f64.grad_decided
    monkeypatch.setattr(truth_dd, "grad_decided", lambda p, r, f, todo: seen.append(("dd", int(todo.sum()))) or real_dd(p, r, f, todo))
    monkeypatch.setattr(truth_f64, "grad_decided", lambda p, r, f, todo: seen.append(("f64", int(todo.sum()))) or real_f64(p, r, f, todo))
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((8, 4096)) * 3).astype(np.float32)
    t = rng.integers(0, 4096, 8)
    gc.exact_grad(z, t)
    assert seen[0] == ("f64", z.size) and all(n <= 2 for kind, n in seen[1:])
    seen.clear()
    gc.exact_grad(z, t, dtype="float64")
    assert [kind for kind, _ in seen] == ["dd"]
    seen.clear()
    gc.exact_grad(z, t, lse_square_scale=1e-4)
    assert [kind for kind, _ in seen] == ["dd"]
