"""Input validation: every bad input gets an InvalidArgument naming argument, expected and got."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck as gc
from gradcheck.errors import InvalidArgument
from gradcheck.problem import Case, make_problem, validate_logits

Z = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
T = np.array([0, 2, 1, 0])
P = np.full((4, 3), 0.25)


@pytest.mark.parametrize(
    ("logits", "targets", "options", "message"),
    [
        (Z, np.array([0, 1, 2]), {}, r"targets must be class indices of shape \(4,\) or probabilities of shape \(4, 3\).*got array of shape \(3,\)"),
        (Z, np.full((4, 4), 0.25), {}, r"probabilities of shape \(4, 3\).*got array of shape \(4, 4\)"),
        (Z, np.array([0, 3, 1, 0]), {}, r"targets must be class indices in \[0, 3\) or ignore_index=-100, got 3 at row 1"),
        (Z, np.array([0, -1, 1, 0]), {}, r"got -1 at row 1"),
        (Z, np.array([0.0, 1.0, 1.0, 0.0]), {}, r"class-index targets must be integers, got array of shape \(4,\) and dtype float64"),
        (Z, np.full((4, 3), 1, dtype=np.int64), {}, r"probability targets must be floating point.*dtype int64"),
        (Z, np.where(np.eye(4, 3) > 0, -0.5, 0.5), {}, r"probability targets must be finite and nonnegative, got -0.5 at index \(0, 0\)"),
        (Z, np.where(np.eye(4, 3) > 0, np.nan, 0.5), {}, r"finite and nonnegative, got nan"),
        (Z, np.where(np.eye(4, 3) > 0, np.inf, 0.5), {}, r"finite and nonnegative, got inf"),
        (np.where(np.eye(4, 3) > 0, np.nan, Z), T, {}, r"logits must be finite or -inf \(a masked class\), got nan at index \(0, 0\)"),
        (np.where(np.eye(4, 3) > 0, np.inf, Z), T, {}, r"logits must be finite or -inf.*got inf at index \(0, 0\)"),
        (np.arange(12).reshape(4, 3), T, {}, r"logits must be a floating-point array .*got int64"),
        (Z + 0j, T, {}, r"logits must be a floating-point array .*got complex"),
        (Z > 0, T, {}, r"logits must be a floating-point array .*got bool"),
        (Z.reshape(2, 2, 3), T, {}, r"logits of shape \(2, 2, 3\) need class_axis: pass class_axis=1 .* or class_axis=-1"),
        (Z.reshape(2, 2, 3), T.reshape(2, 2), {"class_axis": 3}, r"class_axis must be in \[-3, 3\) for logits of shape \(2, 2, 3\), got 3"),
        (Z.reshape(2, 2, 3), T.reshape(2, 2), {"class_axis": 1}, r"targets must be class indices of shape \(2, 3\) or probabilities of shape \(2, 2, 3\)"),
        (Z.reshape(2, 2, 3), np.array([[0, 1], [3, 1]]), {"class_axis": -1}, r"class indices in \[0, 3\) or ignore_index=-100, got 3 at index \(1, 0\)"),
        (Z.reshape(2, 2, 3), T.reshape(2, 2), {"class_axis": 1.0}, r"class_axis must be an integer or None, got 1.0"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), {}, r"at least one row and one class, got shape \(0, 3\)"),
        (np.where(np.arange(12).reshape(4, 3) < 3, -np.inf, Z), T, {}, r"at least one finite entry per row, got all -inf at row \(0,\)"),
        (Z, T, {"reduction": "avg"}, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (Z, T, {"label_smoothing": 1.5}, r"label_smoothing must be a number in \[0, 1\], got 1.5"),
        (Z, T, {"label_smoothing": -0.1}, r"label_smoothing must be a number in \[0, 1\], got -0.1"),
        (Z, T, {"label_smoothing": "a"}, r"label_smoothing must be a number in \[0, 1\], got 'a'"),
        (Z, T, {"weight": np.ones(4)}, r"weight must have shape \(3,\), one per class, got shape \(4,\)"),
        (Z, T, {"weight": np.array([1.0, np.inf, 1.0])}, r"weight must be finite, got inf for class 1"),
        (Z, T, {"weight": np.array([1.0, np.nan, 1.0])}, r"weight must be finite, got nan for class 1"),
        (Z, np.array([0, 1, 0, 1]), {"weight": np.array([1.0, -1.0, 1.0])}, r"divides by the sum of the target classes' weights, got 0"),
        (Z, P, {"ignore_index": 1}, r"ignore_index applies to class-index targets only, got ignore_index=1 with probability targets"),
        (Z, np.full(4, -100), {}, r"reduction='mean' needs at least one row whose target is not ignore_index=-100, got 4 ignored rows"),
        (Z, np.array([0, 0, 0, 0]), {"weight": np.array([0.0, 1.0, 1.0])}, r"divides by the sum of the target classes' weights, got 0"),
        (Z, T, {"ignore_index": 1.5}, r"ignore_index must be an integer, got 1.5"),
    ],
)
@pytest.mark.parametrize("entry", [gc.cross_entropy, gc.cross_entropy_grad, gc.exact_grad, gc.cross_entropy_hessian])
def test_bad_input_is_named(entry, logits, targets, options, message):
    with pytest.raises(InvalidArgument, match=message):
        entry(logits, targets, **options)


def test_invalid_argument_is_a_value_error():
    assert issubclass(InvalidArgument, ValueError)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf, 0.0]), np.array([-np.inf, -np.inf]), np.array([1, 2])])
def test_softmax_rejects_bad_logits(bad):
    with pytest.raises(InvalidArgument, match="logits"):
        gc.softmax(bad)


def test_softmax_rejects_bad_axis():
    with pytest.raises(InvalidArgument, match=r"axis must be in \[-2, 2\), got 2"):
        gc.softmax(Z, axis=2)


def test_callers_arrays_are_untouched_and_problem_is_private():
    z, t, w = Z.copy(), T.copy(), np.array([1.0, 2.0, 0.5])
    before = (z.copy(), t.copy(), w.copy())
    problem = gc.make_problem(z, t, weight=w)
    gc.cross_entropy_grad(z, t, weight=w, label_smoothing=0.1)
    gc.exact_grad(z, t, weight=w)
    for mine, theirs in zip((z, t, w), before):
        np.testing.assert_array_equal(mine, theirs)
    z[0, 0] = 99.0
    assert problem.logits[0, 0] == Z[0, 0]
    assert not problem.logits.flags.writeable and not problem.targets.flags.writeable


def test_options_hold_exactly_the_non_defaults():
    assert gc.make_problem(Z, T).options() == {}
    opts = gc.make_problem(Z.astype(np.float32), T, weight=[1, 2, 3], ignore_index=0, reduction="sum", label_smoothing=0.1).options()
    assert set(opts) == {"weight", "ignore_index", "reduction", "label_smoothing"}
    assert opts["weight"].dtype == np.float32 and opts["ignore_index"] == 0


def test_vector_logits_are_one_row():
    z = np.array([0.5, -1.0, 2.0])
    assert gc.cross_entropy_grad(z, np.int64(1)).shape == (3,)
    assert gc.cross_entropy(z, np.int64(1), reduction="none").shape == ()
    np.testing.assert_array_equal(gc.cross_entropy_grad(z, np.int64(1)), gc.cross_entropy_grad(z[None], np.array([1]))[0])


def test_divisor_semantics():
    w = np.array([1.0, 2.0, 4.0])
    assert gc.make_problem(Z, T, weight=w).divisor() == 1 + 4 + 2 + 1
    assert gc.make_problem(Z, np.array([0, 2, -100, 0]), weight=w).divisor() == 1 + 4 + 1
    assert gc.make_problem(Z, P, weight=w).divisor() == 4  # probability targets: N
    assert gc.make_problem(Z, T, reduction="sum").divisor() == 1


def test_bfloat16_weights_and_targets_are_accepted():
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    g = gc.cross_entropy_grad(Z.astype(bf), P.astype(bf), weight=np.array([1.0, 2.0, 0.5]).astype(bf))
    assert g.dtype == bf and np.all(np.isfinite(g.astype(np.float64)))


# --- issue 15, item 14 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["x", 1.0, None, True])
def test_softmax_axis_must_be_an_integer(axis):
    """Was a TypeError from comparing the axis with the rank."""
    for fn in (gc.softmax, gc.log_softmax):
        with pytest.raises(InvalidArgument, match=r"axis must be an integer, got "):
            fn(Z, axis=axis)
    np.testing.assert_array_equal(gc.softmax(Z, axis=np.int64(0)), gc.softmax(Z, axis=0))


@pytest.mark.parametrize("entry", [gc.softmax, gc.log_softmax, gc.softmax_jacobian,
                                   lambda z: gc.cross_entropy_grad(z, np.int64(0)), lambda z: gc.exact_grad(z, np.int64(0))])
def test_zero_dimensional_logits_are_refused(entry):
    """softmax of a 0-D input used to return shape (1,)."""
    with pytest.raises(InvalidArgument, match=r"logits must have at least one dimension, got shape \(\)"):
        entry(np.float64(1.5))


def _torch_inputs(torch):
    rng = np.random.default_rng(14)
    z = rng.standard_normal((4, 3)) * 2
    t = np.array([0, 2, 1, 0])
    p = rng.dirichlet(np.ones(3), 4)
    w = np.array([1.0, 2.0, 0.5])
    return z, t, p, w


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_torch_tensors_go_in_everywhere(dtype):
    """A torch tensor used to hit numpy's __array__ DeprecationWarning (copy keyword); requires_grad
    and bfloat16 tensors could not be converted at all (filterwarnings = error makes the warning fail)."""
    from conftest import require_torch

    torch = require_torch()
    z, t, p, w = _torch_inputs(torch)
    fmt = gc.float_format(dtype)
    z = z.astype(fmt.dtype)
    p_np = p.astype(fmt.dtype)
    zt = torch.tensor(z.astype(np.float64)).to(getattr(torch, dtype)).requires_grad_(True)  # exact: z is in fmt
    tt, pt, wt = torch.tensor(t), torch.tensor(p_np.astype(np.float64)).to(getattr(torch, dtype)), torch.tensor(w, requires_grad=True)
    for entry in (gc.cross_entropy, gc.cross_entropy_grad, gc.exact_grad, gc.cross_entropy_hessian, gc.exact_loss):
        for targets, targets_np in ((tt, t), (pt, p_np)):
            got, expected = entry(zt, targets, weight=wt), entry(z, targets_np, weight=w)
            assert got.dtype == expected.dtype == fmt.dtype
            np.testing.assert_array_equal(got, expected)
    g, b = gc.cross_entropy_grad_bounded(zt, tt, weight=wt)
    np.testing.assert_array_equal(g, gc.cross_entropy_grad_bounded(z, t, weight=w).value)
    for fn in (gc.softmax, gc.log_softmax, gc.softmax_jacobian):
        np.testing.assert_array_equal(fn(zt), fn(z))
    problem = gc.make_problem(zt, tt, weight=wt)
    assert problem.logits.dtype == fmt.dtype and problem.targets.dtype == np.int64
    assert zt.grad is None  # nothing flowed back into the caller's graph


def test_torch_conversion_copies_unless_asked_not_to():
    from conftest import require_torch

    from gradcheck.problem import as_array

    torch = require_torch()
    x = torch.arange(3, dtype=torch.float64)
    private, view = as_array(x, copy=True), as_array(x, copy=False)
    x[0] = 9.0
    assert private[0] == 0.0 and view[0] == 9.0


def test_jax_arrays_go_in():
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed (optional extra: pip install -e '.[jax]')")
    z, t, p, w = _torch_inputs(None)
    for dtype in (jnp.float32, jnp.bfloat16):
        zj = jnp.asarray(z, dtype=dtype)
        expected = gc.cross_entropy_grad(np.asarray(zj), t, weight=w)
        np.testing.assert_array_equal(gc.cross_entropy_grad(zj, jnp.asarray(t), weight=jnp.asarray(w)), expected)
        np.testing.assert_array_equal(gc.exact_grad(zj, jnp.asarray(p, dtype=dtype)), gc.exact_grad(np.asarray(zj), np.asarray(jnp.asarray(p, dtype=dtype))))


# ---- layouts: torch's (N, C, d1, ..., dk) and the LLM's (B, T, V) ------------------------------------------------

RNG = np.random.default_rng(14)
Z4 = RNG.normal(size=(2, 3, 4, 5))  # torch's layout: N=2, C=3, d=(4, 5)
T4 = RNG.integers(0, 3, size=(2, 4, 5))
Z3 = RNG.normal(size=(2, 6, 7))  # the LLM layout: B=2, T=6, V=7
T3 = RNG.integers(0, 7, size=(2, 6))


def _rows(z, axis):
    return np.moveaxis(z, axis, -1).reshape(-1, z.shape[axis])


@pytest.mark.parametrize(("z", "t", "axis"), [(Z4, T4, 1), (Z3, T3, -1), (Z3, T3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_layout_is_its_rows_with_the_class_axis_put_back(z, t, axis, reduction):
    flat = gc.cross_entropy_grad(_rows(z, axis), t.reshape(-1), reduction=reduction)
    got = gc.cross_entropy_grad(z, t, class_axis=axis, reduction=reduction)
    assert got.shape == z.shape
    np.testing.assert_array_equal(_rows(got, axis), flat)
    np.testing.assert_array_equal(_rows(gc.exact_grad(z, t, class_axis=axis, reduction=reduction), axis),
                                  gc.exact_grad(_rows(z, axis), t.reshape(-1), reduction=reduction))
    loss = gc.cross_entropy(z, t, class_axis=axis, reduction=reduction)
    assert loss.shape == (t.shape if reduction == "none" else ())
    np.testing.assert_array_equal(loss.reshape(-1), gc.cross_entropy(_rows(z, axis), t.reshape(-1), reduction=reduction).reshape(-1))


def test_probability_targets_have_the_logits_layout():
    p = RNG.random(Z4.shape)
    got = gc.cross_entropy_grad(Z4, p, class_axis=1)
    np.testing.assert_array_equal(_rows(got, 1), gc.cross_entropy_grad(_rows(Z4, 1), _rows(p, 1)))


def test_layouts_agree_with_torch_and_grad_output_has_the_batch_shape():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    w = np.array([0.5, -1.25, 2.0])
    g_out = RNG.normal(size=T4.shape)
    z = torch.tensor(Z4, requires_grad=True)
    F.cross_entropy(z, torch.tensor(T4), weight=torch.tensor(w), reduction="none").sum().backward()
    ours = gc.cross_entropy_grad(Z4, T4, class_axis=1, weight=w, reduction="none")
    np.testing.assert_allclose(ours, z.grad.numpy(), rtol=1e-13, atol=1e-15)
    assert Case.make(Z4, T4, class_axis=1, reduction="none", grad_output=g_out).grad_output.shape == T4.shape
    z3 = torch.tensor(Z3, requires_grad=True)
    F.cross_entropy(z3.reshape(-1, 7), torch.tensor(T3).reshape(-1)).backward()  # how LLM code calls it
    np.testing.assert_allclose(gc.cross_entropy_grad(Z3, T3, class_axis=-1), z3.grad.numpy(), rtol=1e-13, atol=1e-16)
    with pytest.raises(InvalidArgument, match=r"grad_output must be 40 numbers, shape \(2, 4, 5\), one per row"):
        gc.cross_entropy_grad(Z4, T4, class_axis=1, reduction="none", grad_output=g_out.reshape(-1))


def test_a_layout_case_gives_grad_fn_the_callers_arrays():
    case = Case.make(Z4, T4, class_axis=1)
    assert case.logits.shape == Z4.shape and case.targets.shape == T4.shape
    np.testing.assert_array_equal(case.logits, Z4)
    assert case.options() == {"class_axis": 1}
    assert case.problem.logits.shape == (40, 3)
    smaller = case.replace(logits=Z4[:1], targets=T4[:1])
    assert smaller.logits.shape == (1, 3, 4, 5) and smaller.class_axis == 1
    assert make_problem(Z, T, class_axis=-1).options() == {}  # (N, K): the class axis is implied


def test_layout_indices_map_rows_back():
    layout = make_problem(Z4, T4, class_axis=1).layout
    assert layout.batch_shape == (2, 4, 5)
    row = np.ravel_multi_index((1, 2, 3), (2, 4, 5))
    assert layout.index((row, 2)) == (1, 2, 2, 3)
    assert layout.index((row,)) == (1, 2, 3)


def test_negative_class_weights_are_torchs():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    w = np.array([-4.83, 1.5, 0.25])
    for reduction in ("mean", "sum", "none"):
        for targets, smoothing in ((T, 0.0), (T, 0.3), (P, 0.0)):
            z = torch.tensor(Z, requires_grad=True)
            loss = F.cross_entropy(z, torch.tensor(targets), weight=torch.tensor(w), reduction=reduction,
                                   label_smoothing=smoothing)
            loss.sum().backward()
            options = {"weight": w, "reduction": reduction, "label_smoothing": smoothing}
            np.testing.assert_allclose(gc.cross_entropy(Z, targets, **options), loss.detach().numpy(), rtol=1e-13)
            np.testing.assert_allclose(gc.cross_entropy_grad(Z, targets, **options), z.grad.numpy(), rtol=1e-13,
                                       atol=1e-16)
            np.testing.assert_allclose(gc.exact_grad(Z, targets, **options), z.grad.numpy(), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("seed", range(6))
def test_with_negative_weights_the_bounds_enclose_the_truth(seed):
    """The oracle's running bounds and the tolerance use |w_c t_c|, sum |w t| and |D| (they failed before:
    a loss that dropped the negative terms, negative bounds and tolerances)."""
    from gradcheck.oracle import grad_bounded, loss_bounded
    from gradcheck.tolerance import grad_tolerance

    rng = np.random.default_rng(seed)
    n, k = 5, 7
    z = rng.normal(scale=4, size=(n, k))
    w = rng.normal(size=k)
    targets = rng.random((n, k)) if seed % 2 else rng.integers(0, k, size=n)
    for reduction in ("mean", "sum", "none"):
        options = {"weight": w, "reduction": reduction, "label_smoothing": 0.1 * (seed % 3)}
        problem = make_problem(z, targets, **options)
        g, bound = grad_bounded(problem)
        truth = gc.exact_grad(z, targets, **options)
        assert np.all(bound >= 0) and np.all(np.abs(g - truth) <= bound)
        loss = loss_bounded(problem)
        assert np.all(np.abs(loss.value - gc.exact_loss(z, targets, **options)) <= loss.bound)
        tol = grad_tolerance(make_problem(z.astype(np.float32), targets, **options))
        assert np.all(tol > 0)
        g32 = gc.cross_entropy_grad(z.astype(np.float32), targets, **options)
        assert np.all(np.abs(g32 - gc.exact_grad(z.astype(np.float32), targets, **options)) <= tol)


@pytest.mark.parametrize("options", [{}, {"ignore_index": 2}, {"label_smoothing": 0.2, "ignore_index": 1}, "probs"])
def test_dense_targets_of_a_block_of_rows_are_the_whole_ones(options):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((9, 5))
    if options == "probs":
        p = make_problem(z, rng.random((9, 5)), label_smoothing=0.1)
    else:
        p = make_problem(z, rng.integers(0, 5, 9), **options)
    whole = p.dense_targets(np.float32)
    for rows in (slice(0, 9), slice(2, 5), slice(8, 9)):
        assert p.dense_targets(np.float32, rows=rows).tobytes() == whole[rows].tobytes()


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_the_finiteness_check_by_a_sum_misses_nothing(dtype):
    """validate_logits first checks that the sum is finite: NaN and +inf still get their message when the
    sum overflows or +inf meets -inf, and finite logits whose sum overflows are accepted."""
    big = float(np.finfo(dtype).max)
    with np.errstate(over="ignore"):
        cases = [np.array([[big, big], [1.0, np.nan]], dtype=dtype), np.array([[np.inf, -np.inf]], dtype=dtype),
                 np.array([[big, big, np.inf]], dtype=dtype)]
    for z in cases:
        with pytest.raises(InvalidArgument, match="logits must be finite or -inf"):
            validate_logits(z)
    assert validate_logits(np.array([[big, big], [-np.inf, 1.0]], dtype=dtype)).shape == (2, 2)


def test_exact_divisor_is_the_exact_sum_of_the_target_weights():
    """D by classes and their counts equals the per-row sum of w[t] as rationals (weights, ignored rows,
    repeated classes, weights that do not add exactly in float64)."""
    from fractions import Fraction

    rng = np.random.default_rng(5)
    k = 7
    w = rng.choice([0.1, 1e-17, 3.0, 2.0**-60, 0.0, 1e16], k)
    t = rng.integers(0, k, 300)
    t[::11] = -100
    p = gc.make_problem(np.zeros((300, k)), t, weight=w)
    assert p.exact_divisor() == sum((Fraction(float(w[c])) for c in t if c != -100), Fraction(0))
    assert gc.make_problem(np.zeros((300, k)), t).exact_divisor() == Fraction(int((t != -100).sum()))
    assert gc.make_problem(np.zeros((300, k)), t, reduction="sum").exact_divisor() == 1
