"""The compiled kernels of the certified truth (gradcheck.truth_jit): the numpy code they replace, bit for bit.

The kernels claim no error analysis of their own: they perform the operations of truth_dd's numpy code in the
same order, so docs/exact.md's bounds hold for them. These tests check that claim where it could fail: a
compiler that fuses a * b + c (TwoSum and Dekker's product would no longer be exact), a kernel that differs
from its numpy original in any bit, a sum whose tree has more levels than the bound counts.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck as gc
from gradcheck import truth_dd as T
from gradcheck import truth_jit as J

pytest.importorskip("numba", reason="the `fast` extra (numba) is not installed: the numpy code runs instead")


def _constants():
    (c1, c2, c3, c4), th, tl = T._constants()
    return np.array([c1, c2, c3 + c4]), th, tl


def _bits(x):
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


def test_no_fused_multiply_add():
    """a * b - fl(a * b) is 0 in IEEE arithmetic; a compiler that contracts it into one fma returns the
    product's rounding error (2**-59 here)."""
    assert J.contracts(1 + 2.0**-30, 1 + 2.0**-29) == 0.0
    assert (1 + 2.0**-30) * (1 + 2.0**-29) - 1 - 2.0**-29 - 2.0**-30 == 0.0  # (the product does round)


def test_exp_matches_numpy_bit_for_bit():
    c, th, tl = _constants()
    rng = np.random.default_rng(11)
    sh = np.concatenate([-rng.uniform(0, 600, 200000), -rng.uniform(0, 1e-3, 1000), [0.0, -0.0, -600.0, -1e-300,
                         -2.0**-40, -599.999, -0.34657359027997264, -5e-324]])
    sl = np.where(sh != 0, sh * rng.uniform(-2.0**-53, 2.0**-53, sh.size), 0.0)
    sh, sl = T.two_sum(sh, sl)
    oh, ol = np.empty(sh.size), np.empty(sh.size)
    J.exp_pairs(sh, sl, c, th, tl, J.POW2, oh, ol)
    eh, el = T._exp_dd(sh, sl, coarse=True)
    assert np.array_equal(_bits(oh), _bits(eh)) and np.array_equal(_bits(ol), _bits(el))


@pytest.mark.parametrize("width", list(range(1, 20)) + [255, 256, 257, 1000, 4097])
def test_levels_are_the_halving_trees(width):
    _, _, levels = T.dd_sum_nonnegative(np.zeros((1, width)), np.zeros((1, width)))
    assert J.levels_of(width) == levels


@pytest.mark.parametrize("shape", [(3, 1), (4, 2), (5, 3), (6, 7), (4, 256), (3, 1001), (3, 4097), (200, 125), (200, 1001)])
def test_plain_sums_match_numpy_bit_for_bit(shape):
    """Each row's exponentials and the sum of the others in truth_dd._halve's tree, with -inf (masked) and
    far (cut) classes and the argmax anywhere, the first and the last column among them."""
    c, th, tl = _constants()
    m, k = shape
    rng = np.random.default_rng(k)
    z = rng.standard_normal(shape) * 5
    if k > 2:
        z[0, 1] = -np.inf
        z[1, -1] = z[1].max() - 700.0  # cut: beyond e**-600
        z[2, 0] = 50.0  # the argmax in the first column
        z[-1, -1] = 60.0  # and in the last
    a = np.argmax(z, axis=1)
    eh, el = np.empty(shape), np.empty(shape)
    rh, rl, flags = np.empty(m), np.empty(m), np.zeros(m, dtype=np.uint8)
    ph, pl = np.empty(max(1, k // 2)), np.empty(max(1, k // 2))
    J.plain_sums(z, a, c, th, tl, J.POW2, eh, el, rh, rl, flags, ph, pl)
    with np.errstate(invalid="ignore"):
        sh, sl = T.two_sum(z, -z[np.arange(m), a][:, None])
    off = np.isneginf(z) | ~(sh >= T.MIN_SHIFT)
    xh, xl = T._exp_dd(np.where(off, 0.0, sh), np.where(off, 0.0, sl), coarse=True)
    xh[off], xl[off] = 0.0, 0.0
    assert np.array_equal(_bits(eh), _bits(xh)) and np.array_equal(_bits(el), _bits(xl))
    assert np.all(eh[np.arange(m), a] == 1.0) and np.all(el[np.arange(m), a] == 0.0)
    xh[np.arange(m), a], xl[np.arange(m), a] = 0.0, 0.0
    wh, wl, _ = T.dd_sum_nonnegative(xh, xl)
    assert np.array_equal(_bits(rh), _bits(wh)) and np.array_equal(_bits(rl), _bits(wl))
    assert np.array_equal(flags.astype(bool), off.any(axis=1))


def test_decide_matches_numpy_bit_for_bit():
    """The float64 decision over values on, near and between float64 midpoints, powers of two, the subnormal
    and overflow edges, zeros, inf and NaN, with bounds from 0 to wide (as test_truth_dd's quick-test test)."""
    f = gc.float_format("float64")
    rng = np.random.default_rng(7)
    n = 40000
    with np.errstate(all="ignore"):
        d = rng.standard_normal(n) * 2.0 ** rng.integers(-1070, 1020, n)
        frac = rng.choice([0.0, 0.25, 0.5, -0.5, 0.4999999, -0.25, 0.5000001, 1e-9], n)
        vh = d
        special = np.array([0.0, -0.0, f.tiny, -f.tiny, f.smallest_subnormal, -f.smallest_subnormal, f.max, -f.max,
                            np.inf, -np.inf, np.nan, 1.0, 2.0, 0.5, 1 - 2.0**-53, 2.0**-960, 2.0**-961, 2.0**-1030])
        vh = np.concatenate([vh, special, -special])
        m = vh.size
        vl = np.nan_to_num(f.ulp(vh) * np.concatenate([frac, rng.choice(frac, m - n)]), posinf=0.0)
        vh, vl = T.fast_two_sum(vh, vl)
        vh[n:], vl[n:] = np.concatenate([special, -special]), 0.0
        bound = np.nan_to_num(np.abs(vh) * rng.choice([0.0, 2.0**-100, 2.0**-60, 2.0**-54, 2.0**-30], m),
                              posinf=np.inf) + rng.choice([0.0, 2.0**-1074, 2.0**-1060], m)
        bound[::997] = np.nan  # (0 / 0 in a bound: undecided, never a value)
    out = np.empty(m)
    J.decide_pairs(vh, vl, bound, out)
    want = T.decide(vh, vl, bound, f)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    same = ~np.isnan(out)
    assert np.array_equal(_bits(out[same]), _bits(want[same]))  # signed zeros included
    assert 0.2 < same.mean() < 0.99  # both outcomes are exercised


def test_ufp_is_the_leading_power_of_two():
    """Rump's ufp gives 2**floor(log2 x) over the range the quick tests use it in, powers of two and their
    neighbours included."""
    rng = np.random.default_rng(5)
    p2 = 2.0 ** np.arange(-1000, 960).astype(float)
    x = np.concatenate([rng.uniform(1, 2, 6000) * 2.0 ** rng.integers(-1000, 960, 6000), p2, np.nextafter(p2, 0),
                        np.nextafter(p2, np.inf), [2.0**-149, 2.0**-126, 3.4028234663852886e38]])
    x = x[(x >= 2.0**-1000) & (x < 2.0**960)]
    got = np.array([J._ufp(v) for v in x])
    _, e = np.frexp(x)
    assert np.array_equal(got, np.ldexp(1.0, e - 1))


def test_decide32_matches_numpy_bit_for_bit():
    """The float32 decision (low part 0) over values on, near and between float32 midpoints, powers of two,
    float32's subnormal and overflow edges, zeros, inf and NaN, with bounds from 0 to wide and NaN."""
    f = gc.float_format("float32")
    rng = np.random.default_rng(8)
    n = 40000
    with np.errstate(all="ignore"):
        d = gc.round_to_format(rng.standard_normal(n) * 2.0 ** rng.integers(-155, 130, n), f).astype(np.float64)
        frac = rng.choice([0.0, 0.25, 0.5, -0.5, 0.4999999, -0.25, 0.5000001, 1e-9], n)
        vh = d + frac * f.ulp(d)
        special = np.array([0.0, -0.0, f.tiny, f.smallest_subnormal, f.max, f.max * (1 + 2.0**-25), np.inf, np.nan,
                            1.0, 2.0, 0.5, 1 - 2.0**-25, 1 + 2.0**-24, 2.0**-150, 2.0**-1030, 1e300])
        vh = np.concatenate([vh, special, -special])
        m = vh.size
        bound = np.nan_to_num(np.abs(vh) * rng.choice([0.0, 2.0**-100, 2.0**-40, 2.0**-25, 2.0**-10], m),
                              posinf=np.inf) + rng.choice([0.0, 2.0**-1074, 2.0**-160], m)
        bound[::997] = np.nan
    out = np.empty(m)
    J.decide32_pairs(vh, bound, out)
    want = T.decide(vh, 0.0, bound, f)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    same = ~np.isnan(out)
    assert np.array_equal(_bits(out[same]), _bits(want[same]))
    assert 0.2 < same.mean() < 0.99


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(5, 1), (6, 2), (6, 7), (40, 300), (3, 1001), (3, 40001)])
def test_tier_rows_match_the_float64_tier_bit_for_bit(shape, dtype):
    """truth_jit.tier_rows against truth_f64.enclose: g, the bound, G and its relative error, the masks, and the
    float32 decisions against truth_dd.decide on enclose's values; masked, cut and first- and last-column
    maxima, exact and inexact shifts."""
    from gradcheck import truth_f64 as F
    from gradcheck.exact import _RowFacts

    n, k = shape
    rng = np.random.default_rng(k + n)
    z = rng.standard_normal(shape) * 4
    if k > 2:
        z[0, 1] = -np.inf
        z[1, -1] = z[1].max() - 800.0
        z[2, 0] = 40.0
        z[-1, -1] = 41.0
    z = gc.round_to_format(z, gc.float_format(dtype))
    problem = gc.make_problem(z, rng.integers(0, k, n), weight=rng.uniform(-1, 2, k))
    f, _, _ = T.row_factors(problem, _RowFacts(problem))
    idx = np.arange(n)
    want = F.enclose(problem, idx, f[:, 0])
    got = F._enclose_jit(problem, idx, f[:, 0], decide=False)
    for x, y in zip(want[:4], got[:4]):
        assert np.array_equal(_bits(x), _bits(y))
    assert (want[4] is None) == (got[4] is None) == (k <= 2)
    if want[4] is not None:
        assert all(np.array_equal(x, y) for x, y in zip(want[4], got[4]))
    dec = F._enclose_jit(problem, idx, f[:, 0], decide=True)[0]
    ref = T.decide(want[0], 0.0, want[1], gc.float_format("float32"))
    assert np.array_equal(np.isnan(dec), np.isnan(ref)) and np.array_equal(_bits(dec[~np.isnan(dec)]),
                                                                        _bits(ref[~np.isnan(ref)]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_magnitudes_decide_exact_shifts_as_numpy(dtype):
    """The one-pass scan gives truth_f64._exact_shifts's verdict, with zeros, -inf, all--inf and tiny rows."""
    from gradcheck import truth_f64 as F
    from gradcheck.oracle import shifts_are_exact

    f = gc.float_format(dtype)
    rng = np.random.default_rng(9)
    blocks = [rng.standard_normal((4, 50)) * 3, np.zeros((2, 5)), np.full((2, 3), -np.inf),
              np.array([[0.0, -np.inf, 3.0], [1e-30, 2.0, -np.inf]]), rng.standard_normal((3, 7)) * 1e-20,
              np.array([[2.0**-120, 1e30]])]
    seen = set()
    for b in blocks:
        z = gc.round_to_format(b, f)
        want = F._exact_shifts(z.astype(np.float64), f.precision)
        got = shifts_are_exact(*J.magnitudes(np.ascontiguousarray(z.astype(np.float32))), f.precision)
        assert got == want
        seen.add(want)
    assert seen == {True, False}


@pytest.mark.parametrize("case", ["plain", "masked_and_cut", "weights_ignored", "float32_logits", "bfloat16_logits",
                                  "one_class", "wide"])
def test_exact_grad_with_and_without_kernels(case, monkeypatch):
    """The certified gradient is the same array with the kernels as with the numpy code (both correctly rounded),
    in float64 and in the narrower results whose undecided rows reach the double-double path."""
    rng = np.random.default_rng(3)
    n, k = (5, 1) if case == "one_class" else (3, 70000) if case == "wide" else (40, 300)
    z = rng.standard_normal((n, k)) * 4
    t = rng.integers(0, k, n)
    options: dict = {}
    if case == "masked_and_cut":
        z[:, ::7] = -np.inf
        z[::3, 1::5] = -800.0
        t[::2] = 2
    if case == "weights_ignored":
        options = {"weight": rng.uniform(-2, 3, k), "ignore_index": 1}
        t[::4] = 1
    if case == "float32_logits":
        z = z.astype(np.float32)
    if case == "bfloat16_logits":
        z = gc.round_to_format(z, gc.float_format("bfloat16"))
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        monkeypatch.setenv("GRADCHECK_JIT", "1")
        with_kernels = gc.exact_grad(z, t, dtype=dtype, **options)
        monkeypatch.setenv("GRADCHECK_JIT", "0")
        without = gc.exact_grad(z, t, dtype=dtype, **options)
        assert np.array_equal(_bits(with_kernels.astype(np.float64)), _bits(without.astype(np.float64)))


def test_switch():
    import os

    assert J.enabled() == (os.environ.get("GRADCHECK_JIT", "1") != "0")


def test_no_writable_cache_directory_compiles_in_process():
    """Where numba finds no cache directory it can write (a read-only install and home), the kernels are
    compiled in the process instead of failing at import ('cannot cache function ...: no locator')."""
    import subprocess
    import sys

    code = "\n".join([
        "import numpy as np",
        "from numba.core import caching",
        "caching.CacheImpl._locator_classes = []  # no locator: as with no writable directory",
        "import gradcheck as gc",
        "from gradcheck import truth_jit as J",
        "assert type(J.exp_pairs._cache).__name__ == 'NullCache'",
        "g = gc.exact_grad(np.array([[0.0, 1.0, 2.0]]), np.array([1]))",
        "print(repr(float(g[0, 0])))",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    p0 = float(np.exp(0.0) / np.exp([0.0, 1.0, 2.0]).sum())
    assert abs(float(done.stdout) - p0) < 1e-15
