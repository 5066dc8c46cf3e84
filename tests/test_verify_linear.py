"""verify_linear and assert_linear_gradient on the linear zoo: every bug caught at default settings, every
correct kernel passes (gradcheck/checking/linear.py; docs/linear.md)."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck import GradientMismatch, InvalidArgument, assert_linear_gradient, verify_linear
from zoo_linear import ZOO_LINEAR_BUGGY, ZOO_LINEAR_CORRECT, liger_correct, runs

SEED = 20240601
# the correct kernels run fewer examples in the suite than the default 100 (benchmarks run the default)
CORRECT_EXAMPLES = 15


def _id(run):
    name, dtype, config = run
    return f"{name}-{dtype}-" + ",".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("run", runs(ZOO_LINEAR_BUGGY), ids=_id)
def test_every_bug_is_caught_at_default_settings(run):
    name, dtype, config = run
    entry = ZOO_LINEAR_BUGGY[name]
    result = verify_linear(entry.fn, dtype=dtype, seed=SEED, **config)
    assert not result.passed, f"{name} ({entry.description}) passed: {result}"
    if entry.kind is not None:
        assert result.failure.kind == entry.kind
    else:
        assert result.failure.kind == "mismatch"


@pytest.mark.parametrize("run", [r for r in runs(ZOO_LINEAR_CORRECT) if r[0] != "torch_upcast" or r[1] != "float64"]
                         + [("torch_upcast", "float64", {})], ids=_id)
def test_correct_kernels_pass(run):
    name, dtype, config = run
    result = verify_linear(ZOO_LINEAR_CORRECT[name].fn, dtype=dtype, seed=SEED, max_examples=CORRECT_EXAMPLES,
                           **config)
    assert result.passed, str(result)
    # the kernel contract is "float32" ("float64" for float64); measured: none of them meets a tighter one
    kernel = "float64" if dtype == "float64" else "float32"
    assert result.precision == result.grade == kernel, str(result)
    assert 0 < result.worst_ratio <= 1


def test_message_names_gradient_element_inputs_seed_and_reproduction():
    bug = ZOO_LINEAR_BUGGY["bias_last_chunk_only"].fn
    with pytest.raises(GradientMismatch) as info:
        assert_linear_gradient(bug, dtype="float32", bias=True, seed=7)
    text = str(info.value)
    assert "in d_bias" in text and "worst element d_bias[" in text
    assert "hidden = np.array(" in text and "weight = np.array(" in text and "bias = np.array(" in text
    assert "targets = np.array(" in text
    assert "seed 7" in text
    assert "gradcheck.verify_linear(zoo_linear.bias_last_chunk_only, dtype='float32', bias=True, seed=7)" in text


def test_failure_is_simplified():
    result = verify_linear(ZOO_LINEAR_BUGGY["smoothing_dropped"].fn, label_smoothing=0.1, seed=3)
    n, v, d = result.failure.case.problem.shape
    assert n * v * d <= 64  # a few rows, classes and dimensions are enough to show it


def test_grad_output_passed_only_when_accepted():
    seen = []

    def with_g(hidden, weight, targets, grad_output=None, **options):
        seen.append(grad_output is not None)
        return liger_correct(hidden, weight, targets, grad_output=grad_output, **options)

    def without_g(hidden, weight, targets):  # no grad_output parameter, no **kwargs: never passed one
        return liger_correct(hidden, weight, targets)

    assert verify_linear(with_g, max_examples=20, seed=1).passed
    assert any(seen) and not all(seen)
    assert verify_linear(without_g, max_examples=10, seed=1).passed


def test_hygiene_kinds():
    calls = [0]

    def nondeterministic(hidden, weight, targets, **options):  # every other call differs (a counter, no RNG)
        dh, dw = liger_correct(hidden, weight, targets, **options)
        calls[0] += 1
        dh = dh.copy()
        dh.flat[0] = dh.flat[0] + dh.dtype.type(calls[0] % 2)
        return dh, dw

    def wrong_arity(hidden, weight, targets, **options):
        return liger_correct(hidden, weight, targets, **options)[0]

    def aliasing(hidden, weight, targets, **options):
        dh, dw = liger_correct(hidden, weight, targets, **options)
        hidden = np.array(hidden)
        return dh, weight  # a view of its argument

    def raises(hidden, weight, targets, **options):
        raise RuntimeError("boom")

    assert verify_linear(nondeterministic, seed=1).failure.kind == "nondeterminism"
    assert verify_linear(wrong_arity, seed=1).failure.kind == "type"
    assert verify_linear(aliasing, seed=1).failure.kind == "aliasing"
    failure = verify_linear(raises, seed=1).failure
    assert failure.kind == "exception" and "boom" in failure.message


def test_bias_expected_back():
    def no_bias_grad(hidden, weight, targets, *, bias=None, **options):
        return liger_correct(hidden, weight, targets, bias=bias, **options)[:2]

    failure = verify_linear(no_bias_grad, bias=True, seed=1).failure
    assert failure.kind == "type" and "(d_hidden, d_weight, d_bias)" in failure.message


@pytest.mark.parametrize("options, match", [
    ({"max_shape": (4, 4)}, r"max_shape must be three positive integers \(N, V, D\)"),
    ({"bias": 1}, r"bias"),
    ({"dtype": "int8"}, r"dtype"),
    ({"colour": 1}, r"unknown option 'colour'"),
    ({"targets": "probs", "ignore_index": 0}, r"ignore_index applies to class-index targets only"),
])
def test_invalid_check_options(options, match):
    with pytest.raises(InvalidArgument, match=match):
        verify_linear(liger_correct, **options)


def test_expected_value_in_the_message_is_the_certified_truth():
    from gradcheck.linear_exact import certified_linear_grad

    result = verify_linear(ZOO_LINEAR_BUGGY["sum_as_mean"].fn, dtype="bfloat16", reduction="sum", seed=2)
    f = result.failure
    truth = certified_linear_grad(f.case.problem, f.case.format)
    assert f.expected == float(getattr(truth, f.gradient[2:])[f.index])


def test_torch_tensors_and_probability_targets():
    torch = pytest.importorskip("torch")

    def as_torch(hidden, weight, targets, **options):
        return tuple(torch.from_numpy(np.asarray(x)) for x in liger_correct(hidden, weight, targets, **options))

    def soft(hidden, weight, targets, **options):  # probability targets through torch autograd
        from zoo_linear import torch_upcast

        return torch_upcast(hidden, weight, targets, **options)

    assert verify_linear(as_torch, dtype="float32", max_examples=10, seed=1).passed
    assert verify_linear(soft, dtype="float32", targets="probs", max_examples=10, seed=1).passed


def test_strategy_draws_the_features_of_the_brief():
    from hypothesis import HealthCheck, given, settings

    from gradcheck.checking.linear import linear_cases

    seen = {"n_off_chunk": False, "v_off_block": False, "d1": False, "some": False, "most": False, "large": False,
            "grad_output": False}

    @settings(max_examples=300, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(linear_cases(dtype="bfloat16", bias=True, ignore_index=-100, upstream=True, max_shape=(64, 300, 40)))
    def draw(case):
        n, v, d = case.problem.shape
        seen["n_off_chunk"] |= n % 4 != 0 and n > 4
        seen["v_off_block"] |= v % 64 != 0 and v > 64
        seen["d1"] |= d == 1
        seen["some"] |= "some ignored rows" in case.tags
        seen["most"] |= "most ignored rows" in case.tags
        seen["large"] |= case.regime == "large" and float(np.abs(case.problem.logits.logits).max()) > 20
        seen["grad_output"] |= case.grad_output is not None
        for x in (case.hidden, case.weight, case.bias):  # exact in every dtype: the same numbers in float16
            x64 = x.astype(np.float64)
            assert np.array_equal(x64.astype(np.float16).astype(np.float64), x64)

    draw()
    assert all(seen.values()), seen


def test_regression_storage_underflow_scaled_by_grad_output():
    """verify_linear once failed liger_correct here (float16, seed 1): an element of G below half float16's
    smallest subnormal, stored before the scalar grad_output -3.578 was applied; the contract now charges the
    storage's underflow |g| times (docs/linear.md, K5)."""
    from gradcheck.checking.linear import LinearCase, compare_linear

    f16 = np.float16
    hidden = np.array([[-13.1875, 3.875, -1.0, -1.5078125, 5.1875, 10.625, 3.0]], dtype=f16)
    weight = np.array([
        [0.11083984375, 0.3203125, -0.578125, 0.240234375, -0.11279296875, 0.00800323486328125, -0.171875],
        [-0.7001953125, 0.39990234375, -0.7001953125, 0.199951171875, -0.0200042724609375, 0.199951171875,
         0.08001708984375],
        [0.0] * 7,
        [0.199951171875, -0.39990234375, 0.0, -0.5, 1.0, 0.98828125, 0.300048828125],
        [-1.2265625, 0.98046875, 0.2373046875, 0.361328125, 0.06591796875, -0.39453125, 0.2890625]], dtype=f16)
    targets = np.array([2])
    case = LinearCase.make(hidden, weight, targets, grad_output=f16(-3.578))
    got = liger_correct(hidden, weight, targets, grad_output=case.grad_output)
    assert got[1][0, 0] == 0  # the flushed element
    outcome = compare_linear(got, case)
    assert isinstance(outcome, tuple), outcome.message


# ---- precision contracts (docs/linear.md, "Precision contracts") -------------------------------------------------

from gradcheck.dtypes import float_format, round_to_format  # noqa: E402

PRECISION_SHAPE = (16, 128, 16)


def _round(x, fmt):
    return round_to_format(np.asarray(x, dtype=np.float64), fmt)


def _tree_sum(x, fmt):
    """A pairwise sum over the last axis, each addition rounded to fmt."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = np.concatenate([x, np.zeros(x.shape[:-1] + (1,))], axis=-1)
        x = _round(x[..., 0::2] + x[..., 1::2], fmt)
    return x[..., 0]


def _tree_matmul(a, b, fmt):
    """a @ b with every product and every (pairwise) addition rounded to fmt."""
    return _tree_sum(_round(a[:, None, :] * b.T[None, :, :], fmt), fmt)


def in_dtype_kernel(hidden, weight, targets):
    """Default options only: every operation in the dtype itself (pairwise sums), as a half-precision kernel
    without float32 accumulation computes it."""
    fmt = float_format(hidden.dtype)
    h, w = hidden.astype(np.float64), weight.astype(np.float64)
    n, v = h.shape[0], w.shape[0]
    z = _tree_matmul(h, w.T, fmt)
    e = _round(np.exp(_round(z - z.max(axis=1, keepdims=True), fmt)), fmt)
    p = _round(e / _tree_sum(e, fmt)[:, None], fmt)
    y = np.zeros((n, v))
    y[np.arange(n), targets] = 1.0
    g = _round(_round(p - y, fmt) / n, fmt)
    return (_tree_matmul(g, w, fmt).astype(hidden.dtype), _tree_matmul(g.T, h, fmt).astype(hidden.dtype))


def float64_kernel(hidden, weight, targets, *, bias=None, **options):
    """Every intermediate in float64, each gradient rounded once to the dtype (the float64 oracle)."""
    from gradcheck import linear_cross_entropy_grad

    g = linear_cross_entropy_grad(hidden, weight, targets, bias=bias, **options)
    return (g.hidden, g.weight) if bias is None else tuple(g)


def exact_kernel(hidden, weight, targets, *, bias=None, **options):
    """The certified truth: every element correctly rounded."""
    from gradcheck import exact_linear_grad

    g = exact_linear_grad(hidden, weight, targets, bias=bias, **options)
    return (g.hidden, g.weight) if bias is None else tuple(g)


def one_ulp_off(hidden, weight, targets, *, bias=None, **options):
    """exact_kernel with d_weight[0, 0] moved one ULP away from zero."""
    d_hidden, d_weight, *rest = exact_kernel(hidden, weight, targets, bias=bias, **options)
    d_weight = d_weight.copy()
    d_weight[0, 0] = np.nextafter(d_weight[0, 0], np.copysign(np.inf, d_weight[0, 0]), dtype=d_weight.dtype)
    return (d_hidden, d_weight, *rest)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float32_inside_kernel_is_graded_float32_in_half_precision(dtype):
    result = verify_linear(liger_correct, dtype=dtype, seed=SEED, max_examples=CORRECT_EXAMPLES, bias=True)
    assert result.passed and result.precision == "float32" and result.grade == "float32", str(result)
    assert set(result.contract_ratios) == {"exact", "float64", "float32", dtype}
    assert result.contract_ratios["float64"] > 1 and result.contract_ratios[dtype] <= result.contract_ratios["float32"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float64_kernel_rounded_once_is_graded_float64_or_exact(dtype):
    result = verify_linear(float64_kernel, dtype=dtype, seed=SEED, max_examples=CORRECT_EXAMPLES, bias=True)
    assert result.passed and result.grade in ("exact", "float64"), str(result)
    assert verify_linear(float64_kernel, dtype=dtype, seed=SEED, max_examples=CORRECT_EXAMPLES,
                         precision="float64").passed


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_in_dtype_kernel_fails_float32_but_keeps_its_dtype_contract(dtype):
    options = {"dtype": dtype, "seed": SEED, "max_examples": CORRECT_EXAMPLES, "max_shape": PRECISION_SHAPE}
    default = verify_linear(in_dtype_kernel, **options)
    assert not default.passed and default.failure.kind == "mismatch", str(default)
    assert "float32 contract" in default.failure.message
    own = verify_linear(in_dtype_kernel, precision=dtype, **options)
    assert own.passed and own.precision == dtype and own.grade == dtype, str(own)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_contract_fails_a_kernel_one_ulp_off(dtype):
    options = {"dtype": dtype, "seed": SEED, "max_examples": CORRECT_EXAMPLES, "max_shape": PRECISION_SHAPE}
    truth = verify_linear(exact_kernel, precision="exact", **options)
    assert truth.passed and truth.grade == "exact" and truth.worst_ratio == 0.0, str(truth)
    graded = verify_linear(exact_kernel, **options)  # "exact" graded under the default contract, too (small cases)
    assert graded.passed and graded.grade == "exact" and graded.contract_ratios["exact"] == 0.0, str(graded)
    exact = verify_linear(one_ulp_off, precision="exact", **options)
    assert not exact.passed and exact.failure.kind == "mismatch" and exact.failure.gradient == "d_weight", str(exact)
    assert exact.failure.index == (0, 0) and "exact contract" in exact.failure.message
    default = verify_linear(one_ulp_off, **options)  # one ULP is within the kernel contract
    assert default.passed and default.grade != "exact", str(default)


def test_exact_contract_fails_a_float64_kernel_under_cancellation():
    # measured: the float64 oracle rounded once is not correctly rounded where d_hidden cancels (seed 0 of this
    # draw: d_hidden[10, 11]); "exact" is a real step above "float64", which it meets
    from gradcheck.checking.linear import check_linear, draw_case

    case = draw_case(np.random.default_rng(0), 21, 12, 13, "large", float_format("float32"), bias=False,
                     targets="index", weighted=False, ignore_index=None, ignored="none", grad_output="none",
                     reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None)
    outcome = check_linear(float64_kernel, case, precision="exact")
    assert outcome.kind == "mismatch" and outcome.gradient == "d_hidden" and outcome.index == (10, 11), outcome
    assert outcome.ratio >= 2 and outcome.expected == float(exact_kernel(case.hidden, case.weight, case.targets)[0][10, 11])
    grades = {}
    assert isinstance(check_linear(float64_kernel, case, precision="float64", grades=grades), tuple)
    assert grades["float64"][1] and not grades["exact"][1]


@pytest.mark.parametrize(("dtype", "precision", "message"), [
    ("float32", "float8", "precision must be one of ('kernel', 'exact', 'float64', 'float32', 'float16', 'bfloat16')"),
    ("float32", 3, "precision must be one of"),
    ("bfloat16", "float16", "a bfloat16 result cannot have been computed in the narrower float16"),
    ("float32", "bfloat16", "precision must be one of ('kernel', 'exact', 'float64', 'float32') for dtype='float32'"),
])
def test_bad_precision_is_an_invalid_argument_naming_it(dtype, precision, message):
    with pytest.raises(InvalidArgument, match="precision") as info:
        verify_linear(liger_correct, dtype=dtype, precision=precision)
    assert message in str(info.value)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_kernel_alias_is_the_default_contract(dtype):
    options = {"dtype": dtype, "seed": SEED, "max_examples": 5}
    a, b = verify_linear(liger_correct, **options), verify_linear(liger_correct, precision="kernel", **options)
    assert a.precision == b.precision == ("float64" if dtype == "float64" else "float32")
    assert (a.passed, a.grade, a.worst_ratio) == (b.passed, b.grade, b.worst_ratio)


def test_cli_verify_linear_precision(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from gradcheck import cli

    (tmp_path / "flce_precision.py").write_text(
        "from test_verify_linear import exact_kernel, one_ulp_off  # noqa: F401\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    common = ["--dtype", "bfloat16", "--max-examples", "5", "--seed", "1", "--max-shape", "8,32,8"]
    assert cli.main(["verify", "--linear", "flce_precision:exact_kernel", "--precision", "exact", *common,
                     "--json", "ok.json"]) == 0, capsys.readouterr()
    run = json.loads((tmp_path / "ok.json").read_text())["runs"][0]
    assert run["precision"] == "exact" and run["grade"] == "exact"
    assert cli.main(["verify", "--linear", "flce_precision:one_ulp_off", "--precision", "exact", *common]) == 1
    assert "exact contract" in capsys.readouterr().err


def test_plugin_fixture_passes_its_precision_to_verify_linear():
    from gradcheck.pytest_plugin.checker import GradientChecker, Settings

    settings = Settings(seed=1, dtypes=("bfloat16",), defaults={}, report=None)
    checker = GradientChecker("t::test[bfloat16]", settings, "bfloat16",
                              {"precision": "exact", "max_examples": 5})
    result = checker.verify_linear(one_ulp_off, max_shape=(8, 32, 8))
    assert result.precision == "exact" and not result.passed and "exact contract" in result.failure.message
