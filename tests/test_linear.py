"""The fused linear oracle, its bound, the kernel error model and the certified truth (gradcheck/linear.py,
gradcheck/linear_exact.py; docs/linear.md)."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from gradcheck.checking.linear import draw_case
from gradcheck.dtypes import float_format
from gradcheck.errors import InvalidArgument
from gradcheck.linear import (linear_cross_entropy_grad, linear_cross_entropy_grad_bounded, linear_tolerance,
                              make_linear_problem)
from gradcheck.linear_exact import exact_linear_grad

torch = pytest.importorskip("torch")

OPTION_SETS = (
    {},
    {"reduction": "sum", "label_smoothing": 0.1, "weighted": True},
    {"reduction": "none", "grad_output": "drawn", "lse_square_scale": 1e-2},
    {"softcap": 5.0, "grad_output": "drawn"},
    {"softcap": 3.0, "lse_square_scale": 1e-3, "weighted": True, "label_smoothing": 0.2},
)


def _case(seed, dtype="float64", regime="large", n=7, v=11, d=5, **o):
    go = o.pop("grad_output", "none")
    return draw_case(np.random.default_rng(seed), n, v, d, regime, float_format(dtype), bias=True, targets="index",
                     weighted=o.pop("weighted", False), ignore_index=-100, ignored="some", grad_output=go,
                     reduction=o.get("reduction", "mean"), label_smoothing=o.get("label_smoothing", 0.0),
                     lse_square_scale=o.get("lse_square_scale", 0.0), softcap=o.get("softcap"))


def _kw(case):
    kw = dict(case.options())
    if case.grad_output is not None:
        kw["grad_output"] = case.grad_output
    return kw


def _torch_grads(case):
    """float64 torch autograd of F.linear + (softcap) + F.cross_entropy (+ z-loss): an independent gradient."""
    lp = case.problem
    h = torch.tensor(case.hidden.astype(np.float64), requires_grad=True)
    w = torch.tensor(case.weight.astype(np.float64), requires_grad=True)
    b = torch.tensor(case.bias.astype(np.float64), requires_grad=True)
    o = lp.options
    z = torch.nn.functional.linear(h, w, b)
    if o["softcap"] is not None:
        z = o["softcap"] * torch.tanh(z / o["softcap"])
    t = torch.tensor(case.targets)
    cw = None if o["weight"] is None else torch.tensor(np.asarray(o["weight"], dtype=np.float64))
    loss = torch.nn.functional.cross_entropy(z, t, weight=cw, reduction=o["reduction"],
                                             label_smoothing=o["label_smoothing"])
    if o["lse_square_scale"]:
        act = t != -100
        zl = o["lse_square_scale"] * torch.logsumexp(z, 1) ** 2 * act
        loss = loss + {"mean": zl.sum() / act.sum(), "sum": zl.sum(), "none": zl}[o["reduction"]]
    g = lp.logits.grad_output
    loss.backward(torch.ones_like(loss) if g is None else torch.tensor(g).reshape(loss.shape))
    return h.grad.numpy(), w.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("seed", range(3))
def test_bounded_oracle_encloses_the_truth_and_agrees_with_torch(options, seed):
    case = _case(seed, **dict(options))
    got = linear_cross_entropy_grad_bounded(case.hidden, case.weight, case.targets, bias=case.bias, **_kw(case))
    exact = exact_linear_grad(case.hidden, case.weight, case.targets, bias=case.bias, prefilter=False, **_kw(case))
    for mine, truth, theirs in zip(got, exact, _torch_grads(case)):
        # the truth rounded to float64 is within half an ulp of the exact value
        assert np.all(np.abs(mine.value - truth) <= mine.bound + 0.5 * np.spacing(np.abs(truth)))
        assert np.all(mine.bound <= 1e-12 * np.abs(mine.value).max() + 1e-300)  # not vacuous
        # torch's float64 autograd is an independent formula (its 1 - tanh^2 cancels: only close, not exact)
        np.testing.assert_allclose(mine.value, theirs, rtol=0, atol=1e-12 * np.abs(theirs).max())


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_exact_within_bound_of_the_oracle_and_rounds_like_it_where_decided(dtype, options):
    case = _case(11, dtype, **dict(options))
    fmt = float_format(dtype)
    exact = exact_linear_grad(case.hidden, case.weight, case.targets, bias=case.bias, prefilter=False, **_kw(case))
    bounded = linear_cross_entropy_grad_bounded(case.hidden, case.weight, case.targets, bias=case.bias, **_kw(case))
    for e, b in zip(exact, bounded):
        assert e.dtype == fmt.dtype
        e64 = e.astype(np.float64)
        assert np.all(np.abs(e64 - b.value) <= b.bound + 0.5 * fmt.ulp(np.abs(b.value) + b.bound))
        if fmt.precision < 53:  # the float64 enclosure nearly always decides a narrower rounding
            assert np.mean(e64 == fmt.dtype.type(0) + b.value.astype(fmt.dtype).astype(np.float64)) > 0.9


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_prefilter_changes_nothing(dtype, options):
    case = _case(21, dtype, n=5, v=9, d=4, **dict(options))
    a = exact_linear_grad(case.hidden, case.weight, case.targets, bias=case.bias, **_kw(case))
    b = exact_linear_grad(case.hidden, case.weight, case.targets, bias=case.bias, prefilter=False, **_kw(case))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))


def test_exact_is_correctly_rounded_on_a_case_computed_by_hand():
    # h = [[1, 0]], W = I, targets 0: p = softmax([1, 0]); dh = dW row... = [p0 - 1, p1]
    h = np.array([[1.0, 0.0]], dtype=np.float32)
    w = np.eye(2, dtype=np.float32)
    got = exact_linear_grad(h, w, np.array([0]))
    p1 = 1 / (1 + np.e)
    assert got.hidden.tolist() == [[np.float32(-p1), np.float32(p1)]]
    assert got.weight.tolist() == [[np.float32(-p1), 0.0], [np.float32(p1), 0.0]]
    assert got.bias is None


def test_exact_rational_rows_end_ziv_loop():
    # all logits equal (W = 0): p = 1/V exactly; d_weight = (1/V - t) h is a midpoint of bfloat16 here
    h = np.array([[1.0 + 2.0**-7]], dtype=gradcheck.float_format("bfloat16").dtype)
    w = np.zeros((4, 1), dtype=h.dtype)
    got = exact_linear_grad(h, w, np.array([3]), reduction="sum")
    truth = [(0.25) * (1 + 2.0**-7)] * 3 + [-0.75 * (1 + 2.0**-7)]
    from gradcheck.exact import _round_fraction
    from fractions import Fraction
    fmt = float_format("bfloat16")
    want = [_round_fraction(Fraction(x), fmt) for x in truth]
    assert got.weight[:, 0].astype(np.float64).tolist() == want


def test_fast_oracle_rounds_the_float64_values():
    case = _case(3, "float32", **{"label_smoothing": 0.1})
    fast = linear_cross_entropy_grad(case.hidden, case.weight, case.targets, bias=case.bias, **_kw(case))
    bounded = linear_cross_entropy_grad_bounded(case.hidden, case.weight, case.targets, bias=case.bias, **_kw(case))
    for f, b in zip(fast, bounded):
        assert f.dtype == np.float32
        np.testing.assert_array_equal(f, b.value.astype(np.float32))


def test_public_names():
    for name in ("linear_cross_entropy_grad", "linear_cross_entropy_grad_bounded", "exact_linear_grad",
                 "verify_linear", "assert_linear_gradient", "LinearGrad", "make_linear_problem"):
        assert getattr(gradcheck, name) is not None
    g = gradcheck.linear_cross_entropy_grad(np.eye(2), np.eye(2), np.array([0, 1]))
    assert g._fields == ("hidden", "weight", "bias")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_tolerance_is_positive_and_scales_with_the_dtype(dtype):
    case = _case(4, dtype, regime="moderate")
    tol = linear_tolerance(case.problem)
    ref = linear_cross_entropy_grad_bounded(case.hidden, case.weight, case.targets, bias=case.bias, **_kw(case))
    fmt = float_format(dtype)
    for t, r in zip(tol, ref):
        assert np.all(t > 0)
        # at least the final rounding's half ulp, and far below the values themselves for float32 and wider
        assert np.all(t >= 0.5 * fmt.ulp(np.abs(r.value)))
        if fmt.precision >= 24:
            assert np.median(t / (np.abs(r.value) + 1e-30)) < 1e-3


# ---- validation: one message per argument -------------------------------------------------------------------


H = np.ones((3, 4))
W = np.ones((5, 4))
T = np.array([0, 1, 2])


@pytest.mark.parametrize("call, match", [
    (lambda: make_linear_problem(np.ones(4), W, T), r"hidden must have shape \(N, D\), got shape \(4,\)"),
    (lambda: make_linear_problem(H, np.ones((5, 3)), T), r"weight must have shape \(V, 4\)"),
    (lambda: make_linear_problem(H, W.astype(np.float32), T), r"weight must have the dtype of hidden \(float64\)"),
    (lambda: make_linear_problem(H, W, T, bias=np.ones(4)), r"bias must have shape \(5,\)"),
    (lambda: make_linear_problem(H, W, np.array([0, 1])), r"targets must be class indices of shape \(3,\)"),
    (lambda: make_linear_problem(H, W, np.array([0, 1, 7])), r"targets must be class indices in \[0, 5\)"),
    (lambda: make_linear_problem(H.astype(int), W, T), r"hidden must be a floating-point array"),
    (lambda: make_linear_problem(np.full((3, 4), np.nan), W, T), r"hidden must be finite, got nan"),
    (lambda: make_linear_problem(H, W, T, ce_weight=np.ones(4)), r"weight must have shape \(5,\)"),
    (lambda: make_linear_problem(H, W, T, colour=1), r"unknown option 'colour'"),
    (lambda: make_linear_problem(H, W, T, reduction="none", grad_output=np.ones(2)), r"grad_output must be 3"),
    (lambda: make_linear_problem(np.full((3, 4), 1e200), np.full((5, 4), 1e200), T), r"logits .* must be finite"),
    (lambda: exact_linear_grad(H, W, T, softcap=-1.0), r"softcap"),
    (lambda: linear_cross_entropy_grad(H, W, T, label_smoothing=2.0), r"label_smoothing"),
])
def test_invalid_arguments_are_named(call, match):
    with pytest.raises(InvalidArgument, match=match):
        call()
