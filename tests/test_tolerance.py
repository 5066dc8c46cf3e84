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


# ---- kernel options: softcap, z-loss, upstream gradient (docs/tolerance.md, "Kernel options") -------------

def kernel_inside(work, logits, targets, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  lse_square_scale=0.0, softcap=None, grad_output=None, logspace=False, bug=None):
    """A correct kernel computed in ``work`` and rounded once to the logits' dtype, written as Liger-Kernel
    writes it: ``c tanh(z / c)``, the z-loss ``2 lambda lse p / n_non_ignore``, the chain factor ``1 - t^2``.

    ``bug`` models a wrong convention: "zloss_smoothed" (2 lambda lse (p - eps/K), an old Liger gradient),
    "no_chain" (the chain factor forgotten), "x_tanh" (x tanh(x / c), unsloth-zoo #593)."""
    one = work(1)
    x = logits.astype(work)
    n, k = x.shape
    if softcap is not None:
        c = work(softcap)
        t = np.tanh(x / c)
        x = x * t if bug == "x_tanh" else c * t
    m = x.max(axis=1, keepdims=True)
    with np.errstate(under="ignore", invalid="ignore"):
        e = np.exp(x - m)
        total = e.sum(axis=1, keepdims=True)
        lse = m + np.log(total)
        p = np.exp((x - m) - np.log(total)) if logspace else e / total  # not exp(x - lse): docs/tolerance.md
    if targets.ndim == 1:
        live = targets != ignore_index
        tt = np.zeros((n, k), dtype=work)
        tt[np.flatnonzero(live), targets[live]] = 1
    else:
        live = np.ones(n, dtype=bool)
        tt = targets.astype(work)
    eps = work(label_smoothing)
    if label_smoothing:
        tt = (one - eps) * tt + eps / work(k)
        tt[~live] = 0
    w = np.ones(k, dtype=work) if weight is None else weight.astype(work)
    wt = tt * w
    s = wt.sum(axis=1, keepdims=True)
    if reduction == "mean":
        d = w[targets[live]].sum() if targets.ndim == 1 else work(n)
        dz = work(live.sum())
    else:
        d = dz = one
    with np.errstate(under="ignore", invalid="ignore"):
        g = (p * s - wt) / d
        if lse_square_scale:
            coef = work(2 * lse_square_scale) * lse / dz
            zl = coef * ((p - eps / work(k)) if bug == "zloss_smoothed" else p)
            g = g + np.where(live[:, None], zl, work(0))
        if grad_output is not None:
            go = np.asarray(grad_output).astype(work)
            g = g * (go[:, None] if go.ndim else go)
        if softcap is not None and bug != "no_chain":
            g = g * (one - t * t)
    return g.astype(logits.dtype)


def draw_kernel_case(rng, dtype):
    """One seeded case with a random combination of every option, the logits and grad_output exactly
    representable in ``dtype``."""
    fmt = float_format(dtype)
    n, k = int(rng.integers(1, 7)), int(rng.integers(1, 41))
    regime = rng.integers(5)
    opts = {"reduction": ["mean", "sum", "none"][rng.integers(3)],
            "label_smoothing": [0.0, 0.1][rng.integers(2)],
            "softcap": [None, 0.5, 2.0, 30.0][rng.integers(4)],
            "lse_square_scale": [0.0, 1e-4, 1e-2][rng.integers(3)]}
    scale = opts["softcap"] or 1.0
    z = [rng.standard_normal((n, k)) * 3,
         rng.standard_normal((n, k)) * scale * 50,  # saturated: |z| >> c
         rng.standard_normal((n, k)) + 300.0,  # lse ~ 300
         rng.standard_normal((n, k)) * 3 - 300.0,
         rng.standard_normal((n, k)) * 10][regime]
    if regime == 4:
        z[rng.random((n, k)) < 0.3] = -np.inf
        z[:, 0] = 0.0 if opts["softcap"] is None else z[:, 0]
    if rng.random() < 0.5:
        opts["weight"] = round_to_format(rng.uniform(0.25, 2.0, k) * np.where(rng.random(k) < 0.2, -1.0, 1.0), fmt)
    t = rng.integers(0, k, n)
    if n > 1 and rng.random() < 0.4:
        t[0] = -100
    if opts["reduction"] == "mean" and "weight" in opts and abs(opts["weight"][t[t >= 0]].sum()) < 0.5:
        opts.pop("weight")  # a divisor that (nearly) cancels: the model is infinite there (docs/tolerance.md)
    if rng.random() < 0.7:
        go = rng.standard_normal(n) * 2 if opts["reduction"] == "none" else rng.standard_normal() * 2
        go = np.where(rng.random(np.shape(go)) < 0.15, 0.0, go)
        opts["grad_output"] = round_to_format(np.asarray(go, dtype=np.float64), fmt).astype(np.float64)
    return round_to_format(z, fmt), t, opts


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float32_inside_kernels_with_every_option_stay_within_the_float32_contract(dtype):
    """Thousands of seeded draws: a float32-inside kernel (direct or log-space) with every combination of
    softcap, z-loss, smoothing, weights of both signs, ignored rows, reductions and grad_output, rounded
    once to the dtype, is within the float32 contract's tolerance (and so the dtype's)."""
    rng = np.random.default_rng(120 if dtype == "bfloat16" else 121)
    worst = 0.0
    for i in range(1500):
        z, t, opts = draw_kernel_case(rng, dtype)
        problem = make_problem(z, t, **opts)
        got = kernel_inside(np.float32, problem.logits, t, logspace=bool(i % 2), **problem.options(),
                            grad_output=opts.get("grad_output"))
        ref, band = reference_grad(problem)
        tol = grad_tolerance(problem, grad=ref.astype(np.float64), precision="float32", band=band)
        err = np.abs(got.astype(np.float64) - ref)
        assert np.all(err <= tol + band), (i, opts, float(np.max(err / tol)))
        worst = max(worst, float(np.max(np.where(err > 0, err / tol, 0.0))))
    assert worst > 0.2  # the tolerance is reached within a factor 5 somewhere


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_dtype_kernels_with_every_option_stay_within_tolerance(dtype):
    """The kernel in the dtype itself (float32 or float64 inside), against the reference: within the
    dtype's own tolerance on every element of 600 seeded draws."""
    work = np.float32 if dtype == "float32" else np.float64
    rng = np.random.default_rng(122 if dtype == "float32" else 123)
    for i in range(600):
        z, t, opts = draw_kernel_case(rng, dtype)
        problem = make_problem(z, t, **opts)
        got = kernel_inside(work, problem.logits, t, logspace=bool(i % 2), **problem.options(),
                            grad_output=opts.get("grad_output"))
        ref, band = reference_grad(problem)
        tol = grad_tolerance(problem, grad=ref.astype(np.float64), band=band)
        err = np.abs(got.astype(ref.dtype) - ref).astype(np.float64)
        assert np.all(err <= tol + band), (i, opts, float(np.max(err / tol)))


@pytest.mark.parametrize("bug", ["zloss_smoothed", "no_chain", "x_tanh"])
def test_wrong_conventions_exceed_the_tolerance(bug):
    """The tolerance is not vacuous: each wrong convention, float32 inside and rounded once to bfloat16,
    is outside the float32 contract on some of 300 draws (the correct kernel never is, above)."""
    rng = np.random.default_rng(124)
    caught = 0
    for _ in range(300):
        z, t, opts = draw_kernel_case(rng, "bfloat16")
        if bug == "zloss_smoothed":
            opts.update(lse_square_scale=1e-2, label_smoothing=0.1)
        else:
            opts["softcap"] = opts["softcap"] or 2.0
        problem = make_problem(z, t, **opts)
        got = kernel_inside(np.float32, problem.logits, t, **problem.options(), grad_output=opts.get("grad_output"),
                            bug=bug)
        ref, band = reference_grad(problem)
        tol = grad_tolerance(problem, grad=ref.astype(np.float64), precision="float32", band=band)
        with np.errstate(invalid="ignore"):
            caught += bool(np.any(~(np.abs(got.astype(np.float64) - ref) <= tol + band)))
    assert caught > 30, caught


# ---- evaluation by row blocks (docs/tolerance.md, "Evaluation by row blocks") ------------------------------------

def _blocked_cases():
    rng = np.random.default_rng(1)
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        for options in ({}, {"softcap": 5.0}, {"lse_square_scale": 0.01}, {"ignore_index": 3},
                        {"label_smoothing": 0.1, "weight": rng.uniform(-0.5, 2.0, 37)},
                        {"reduction": "none", "grad_output": rng.standard_normal(23)}):
            z = (rng.standard_normal((23, 37)) * 4).astype(float_format(dtype).dtype)
            z[2, 5] = -np.inf
            z[7] = z[7] * 100  # a row with large gaps
            yield dtype, options, z, rng.integers(0, 37, 23)


@pytest.mark.parametrize("dtype, options, z, t", list(_blocked_cases()))
def test_tolerances_of_a_block_of_rows_are_the_whole_ones_bit_for_bit(dtype, options, z, t):
    from gradcheck.tolerance import row_blocks, tolerances

    p = make_problem(z, t, **options)
    ref, band = reference_grad(p, row_parts(p.logits))
    fmt = p.format
    try:
        whole = tolerances(p, row_parts(p.logits), ref.astype(np.float64), band, contracts(fmt))
    except ArithmeticError:  # vacuous for this case (half precisions): every block of it is too, or some
        return
    for elements in (1, 37 * 5):
        for rows in row_blocks(p.n, p.k, elements):
            block = tolerances(p, row_parts(p.logits[rows]), ref[rows].astype(np.float64), band[rows],
                               contracts(fmt), rows=rows)
            for contract, tol in whole.items():
                assert block[contract].tobytes() == tol[rows].tobytes(), (contract, rows)
