"""The vectors checker: correct implementations pass, each invalid vector is rejected, a bug is recognized."""

from __future__ import annotations

from dataclasses import replace

import sys

import numpy as np
import pytest

from gradcheck.errors import InvalidArgument
from gradcheck.vectors import BUGS, VectorCheck, VectorSuite, build_suite, check_vectors
from zoo import forgot_mean, numpy_logspace, numpy_online, numpy_stable, oracle


@pytest.fixture(scope="module")
def suite():
    return build_suite(0)


def _quiet(fn):
    """The zoo's numpy code warns on overflow (inf - inf) for huge logits; the tests turn warnings into errors."""

    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("fn", [numpy_stable, numpy_logspace, numpy_online, oracle])
def test_correct_implementations_pass_every_vector(suite, fn):
    if fn is oracle:  # float64 inside: the default contracts of every dtype
        results = [check_vectors(_quiet(fn), suite, targets=("index", "probs"))]
    else:  # computed in the dtype: the dtype's own contract
        results = [check_vectors(_quiet(fn), suite, dtypes=(d,), precision=d)
                   for d in ("float64", "float32", "float16", "bfloat16")]
    for result in results:
        assert result.passed, [o.message for o in result.implementation_failures][:3]
    assert sum(len(r.outcomes) for r in results) == suite.number_of_tests


def test_the_default_contract_holds_half_vectors_to_float32(suite):
    in_dtype = check_vectors(_quiet(numpy_stable), suite, dtypes=("bfloat16",))
    assert not in_dtype.passed and all(o.classified for o in in_dtype.outcomes)  # the file itself is fine
    assert check_vectors(_quiet(numpy_stable), suite, dtypes=("bfloat16",), precision="bfloat16").passed
    with pytest.raises(InvalidArgument, match=r"precision must be one of .* for the float32 tests, got 'bfloat16'"):
        check_vectors(numpy_stable, suite, dtypes=("float32",), precision="bfloat16")


def _replay(test):
    """An implementation that returns this test's stored gradient for its inputs (and the truth elsewhere)."""

    def fn(logits, targets, **options):
        if logits.shape == test.logits.shape and np.array_equal(logits.view(np.uint8), test.logits.view(np.uint8)):
            return test.grad.copy()
        return oracle(logits, targets, **options)

    return fn


def test_each_invalid_vector_is_rejected_end_to_end(suite):
    seen = set()
    for gi, g in enumerate(suite.groups):
        for t in g.tests:
            if t.result != "invalid" or t.bug in seen:
                continue
            seen.add(t.bug)
            one = VectorSuite(suite.seed, suite.generator, (replace(g, tests=(t,)),))
            result = check_vectors(_replay(t), one)
            assert not result.passed and result.implementation_failures, t.bug
    assert seen == {*BUGS, "BeyondToleranceUlps"}


def test_a_buggy_implementation_fails_and_is_recognized(suite):
    result = check_vectors(_quiet(forgot_mean), suite, dtypes=("float32",), targets=("index",))
    assert not result.passed
    assert any("MissingMeanDivisor" in o.resembles for o in result.implementation_failures)


def test_a_reused_output_buffer_cannot_hide_a_wrong_kernel(suite):
    """Issue 15, item 2: wrong on every other call into one persistent buffer, it passed every vector."""
    buffers, calls = {}, [0]

    def reused(logits, targets, **options):
        g = _quiet(numpy_stable)(logits, targets, **options)
        calls[0] += 1
        out = buffers.setdefault((g.shape, g.dtype), np.empty_like(g))
        out[...] = -g if calls[0] % 2 == 1 else g  # wrong on odd calls: the next call hid it
        return out

    result = check_vectors(reused, suite, dtypes=("float32",), targets=("index",))
    assert not result.passed
    assert all("grad_fn returned the same buffer on two calls" in o.message for o in result.implementation_failures)


def test_sys_exit_in_grad_fn_is_a_failure(suite):
    """Issue 15, item 1: the vectors checker calls grad_fn too; SystemExit must not end the process."""
    result = check_vectors(lambda z, t, **o: sys.exit(0), suite, dtypes=("float64",), targets=("probs",))
    assert not result.passed and "grad_fn raised SystemExit(0)" in result.implementation_failures[0].message


def test_nothing_to_check_is_not_a_pass(suite):
    """Issue 15, item 3: zero tests checked passed anything."""
    empty = VectorSuite(suite.seed, suite.generator, ())
    with pytest.raises(InvalidArgument, match="^the vectors file has no tests"):
        check_vectors(numpy_stable, empty)
    one = VectorSuite(suite.seed, suite.generator, tuple(g for g in suite.groups if g.dtype == "float32"))
    with pytest.raises(InvalidArgument, match="no test of dtype float16 and targets probs: it holds float32/index"):
        check_vectors(numpy_stable, one, dtypes=("float16",), targets=("probs",))
    assert not VectorCheck("f", ()).passed  # and a result without outcomes is no pass either
