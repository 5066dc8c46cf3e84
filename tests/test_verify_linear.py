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
