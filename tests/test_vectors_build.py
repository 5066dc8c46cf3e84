"""Building the suite: the groups, flags and bugs it holds, valid gradients certified, every vector labelled right."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck.vectors import BUGS, NOTES, build_suite
from gradcheck.checking.judge import compare_values
from gradcheck.checking.result import Failure


@pytest.fixture(scope="module")
def suite():
    return build_suite(0)


def test_groups_flags_and_bugs(suite):
    used = {f for g in suite.groups for t in g.tests for f in t.flags}
    assert used <= set(NOTES)
    assert {*BUGS, "BeyondToleranceUlps"} <= used  # every modeled bug appears somewhere
    for flag in ("NegativeZeroGradient", "SubnormalGradient", "InfiniteLoss", "HugeLogits", "MaskedClasses", "IgnoredRows"):
        assert flag in used
    for g in suite.groups:
        assert sum(t.result == "valid" for t in g.tests) >= 7
        assert all(t.result == "valid" or t.bug == t.flags[0] for t in g.tests)
        for t in g.tests:
            assert t.grad.dtype == t.logits.dtype == t.loss.dtype and t.grad.shape == t.logits.shape


def test_valid_gradients_are_the_certified_truth(suite):
    from gradcheck.exact import exact_grad

    g = next(g for g in suite.groups if g.weighted and g.targets == "index" and g.dtype == "float16")
    for t in g.tests[:3]:
        truth = exact_grad(t.logits, t.targets, weight=t.weight.astype(np.float64), reduction=g.reduction,
                           label_smoothing=g.label_smoothing)
        assert np.array_equal(truth.view(np.uint16), t.grad.view(np.uint16))


def test_every_vector_is_classified_as_labelled(suite):
    for g in suite.groups:
        for t in g.tests:
            outcome = compare_values(t.grad, g.case(t))
            assert isinstance(outcome, Failure) == (t.result == "invalid"), (t.tc_id, t.comment)
