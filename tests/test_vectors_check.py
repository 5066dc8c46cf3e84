"""The vectors checker: correct implementations pass, each invalid vector is rejected, a bug is recognized."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gradcheck.vectors import BUGS, VectorSuite, build_suite, check_vectors
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
    result = check_vectors(_quiet(fn), suite, targets=("index", "probs"))
    assert result.passed, [o.message for o in result.implementation_failures][:3]
    assert len(result.outcomes) == suite.number_of_tests


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
