"""The golden vectors: reproducible bytes, a correct implementation passes, every invalid vector is rejected."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gradcheck.checking.judge import compare_values
from gradcheck.checking.result import Failure
from gradcheck.errors import InvalidArgument
from gradcheck.report.vector_file import parse_vectors, render_vectors, schema
from gradcheck.vectors import BUGS, NOTES, VectorSuite, build_suite, check_vectors
from zoo import forgot_mean, numpy_logspace, numpy_online, numpy_stable, oracle

COMMITTED = Path(__file__).resolve().parent.parent / "reports" / "vectors.json"


@pytest.fixture(scope="module")
def suite():
    return build_suite(0)


@pytest.fixture(scope="module")
def text(suite):
    return render_vectors(suite)


def test_committed_file_is_reproduced_byte_for_byte(text):
    if not COMMITTED.exists():
        pytest.skip("reports/vectors.json is not generated yet")
    assert COMMITTED.read_text(encoding="utf-8") == text, (
        "reports/vectors.json is stale: regenerate it with `gradcheck vectors --out reports/vectors.json`")


def test_file_matches_schema_and_round_trips(text):
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads(text)
    jsonschema.validate(doc, schema())
    assert doc["numberOfTests"] == sum(len(g["tests"]) for g in doc["testGroups"])
    assert [t["tcId"] for g in doc["testGroups"] for t in g["tests"]] == list(range(1, doc["numberOfTests"] + 1))
    assert render_vectors(parse_vectors(text)) == text


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


def test_parse_rejects_broken_files(text):
    with pytest.raises(InvalidArgument, match="not JSON"):
        parse_vectors(text[:-10])
    doc = json.loads(text)
    doc["schema"] = "something-else"
    with pytest.raises(InvalidArgument, match="must have schema 'gradcheck-vectors'"):
        parse_vectors(json.dumps(doc))
    doc = json.loads(text)
    doc["testGroups"][0]["tests"][0]["grad"]["repr"][0][0] = "12345.0"
    with pytest.raises(InvalidArgument, match="does not match hex"):
        parse_vectors(json.dumps(doc), validate=False)
    doc = json.loads(text)
    doc["numberOfTests"] += 1
    with pytest.raises(InvalidArgument, match="numberOfTests"):
        parse_vectors(json.dumps(doc), validate=False)
