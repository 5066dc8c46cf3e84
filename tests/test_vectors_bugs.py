"""The modeled bugs: one table that the notes agree with, each bug exercised, each invalid gradient its bug's."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck.dtypes import round_to_format
from gradcheck.exact import exact_grad
from gradcheck.vectors import BUGS, NOTES, build_suite
from gradcheck.vectors.bugs import make_context


@pytest.fixture(scope="module")
def suite():
    return build_suite(0)


def test_the_table_and_the_notes_name_the_same_bugs():
    assert set(BUGS) == {flag for flag, (kind, _) in NOTES.items() if kind == "MODELED_BUG"}
    for flag, model in BUGS.items():
        doc = (model.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"{flag}: a bug needs a one-line docstring naming the mistake it models"


def test_every_registered_bug_is_exercised_by_an_invalid_vector(suite):
    exercised = {t.bug for g in suite.groups for t in g.tests if t.result == "invalid"}
    assert exercised == set(BUGS), sorted(set(BUGS) - exercised)
    for g in suite.groups:
        bugs = [t.bug for t in g.tests if t.result == "invalid"]
        assert len(bugs) == len(set(bugs)), (g.dtype, g.targets, g.reduction)  # one per bug and group
        assert all(bug in BUGS for bug in bugs)


def test_bugs_appear_only_where_they_apply(suite):
    for g in suite.groups:
        bugs = {t.bug for t in g.tests if t.result == "invalid"}
        if g.dtype != "float64":
            assert "Float32Inside" not in bugs
        if g.dtype not in ("float16", "bfloat16"):
            assert "HalfPrecisionSequentialSum" not in bugs
        if not g.label_smoothing:
            assert "WrongSmoothingConvention" not in bugs
        if not g.weighted:
            assert not bugs & {"WeightOnEveryClass", "WeightedMeanOverRows"}
        if g.targets == "index":
            assert "SoftTargetsAssumedNormalized" not in bugs
        if g.reduction == "mean":
            assert "ReductionIgnored" not in bugs
        else:
            assert "MissingMeanDivisor" not in bugs
        # the kernel bugs need their option; the plain loss's bugs are modeled without the kernel options
        upstream = any(t.grad_output is not None for t in g.tests)
        if not g.lse_square_scale:
            assert not bugs & {"ZLossSmoothedTarget", "ZLossClassWeighted", "ZLossDividedByWeights",
                               "ZLossOnIgnoredRows", "ZLossFactorTwoMissing"}
        if g.softcap is None:
            assert not bugs & {"SoftcapTimesLogit", "SoftcapChainRuleMissing"}
        if not upstream:
            assert not bugs & {"UpstreamIgnored", "UpstreamFirstRowOnly"}
        if g.reduction != "none":
            assert "UpstreamFirstRowOnly" not in bugs
        if g.kernel:
            plain_only = {"MissingMeanDivisor", "ReductionIgnored", "NoMaxSubtraction", "LogOfSoftmax", "EpsilonInLog",
                          "ClippedProbabilities", "WrongSmoothingConvention", "WeightOnEveryClass",
                          "WeightedMeanOverRows", "IgnoredRowsCounted", "IgnoredRowsNotZeroed",
                          "SoftTargetsAssumedNormalized", "SoftmaxOverBatchAxis", "HalfPrecisionSequentialSum"}
            assert not bugs & plain_only, (g.dtype, bugs & plain_only)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_invalid_gradient_is_its_bug_on_the_inputs(suite, dtype):
    for g in (g for g in suite.groups if g.dtype == dtype):
        valid = {t.logits.tobytes() + t.targets.tobytes(): t for t in g.tests if t.result == "valid"}
        for t in (t for t in g.tests if t.result == "invalid"):
            same = valid[t.logits.tobytes() + t.targets.tobytes()]
            case = g.case(t)
            problem = case.problem
            upstream = {} if t.grad_output is None else {"grad_output": t.grad_output.astype(np.float64)}
            truth64 = exact_grad(t.logits, t.targets, dtype="float64", **case.options(), **upstream)
            ctx = make_context(problem, same.grad, truth64)
            got = round_to_format(BUGS[t.bug](ctx), problem.format)
            bits = problem.format.int_dtype
            assert np.array_equal(got.view(bits), t.grad.view(bits)), (t.tc_id, t.bug)
            assert not np.array_equal(got.view(bits), same.grad.view(bits)), (t.tc_id, t.bug)
