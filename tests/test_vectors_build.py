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
    for flag in ("NegativeZeroGradient", "SubnormalGradient", "InfiniteLoss", "HugeLogits", "MaskedClasses", "IgnoredRows",
                 "ZLoss", "Softcap", "UpstreamGradient", "SaturatedSoftcap", "LargeLogSumExp"):
        assert flag in used
    for g in suite.groups:
        # a kernel group drops the kinds its dtype's own contract cannot judge (bfloat16 with c = 30)
        assert sum(t.result == "valid" for t in g.tests) >= (3 if g.kernel else 7)
        assert all(t.result == "valid" or t.bug == t.flags[0] for t in g.tests)
        for t in g.tests:
            assert t.grad.dtype == t.logits.dtype == t.loss.dtype and t.grad.shape == t.logits.shape


def test_the_plain_groups_are_unchanged_by_the_kernel_groups(suite):
    """The kernel groups (issue 12) come after every plain group: the plain groups keep their bytes and tcIds.

    Compared with the committed file's plain groups (before and after it is regenerated with the
    kernel groups, its first groups are the plain ones).
    """
    import json
    from pathlib import Path

    from gradcheck.vectors import VectorSuite
    from gradcheck.vectors.file import vectors_document
    from gradcheck.vectors.suite import GROUPS

    committed = Path(__file__).resolve().parent.parent / "reports" / "vectors.json"
    if not committed.exists():
        pytest.skip("reports/vectors.json is not generated yet")
    plain = build_suite(0, groups=tuple(g for g in GROUPS if not g.kernel))
    ours = vectors_document(plain)["testGroups"]
    theirs = json.loads(committed.read_text(encoding="utf-8"))["testGroups"][:len(ours)]
    assert ours == theirs
    assert [g.kernel for g in suite.groups] == sorted(g.kernel for g in suite.groups)  # plain first
    kept = VectorSuite(suite.seed, suite.generator, tuple(g for g in suite.groups if not g.kernel))
    assert vectors_document(kept)["testGroups"] == ours


def test_valid_kernel_gradients_are_the_certified_truth(suite):
    from gradcheck.exact import exact_grad, exact_loss

    for g in (g for g in suite.groups if g.kernel and g.dtype in ("float32", "bfloat16")):
        for t in g.tests[:2]:
            options = dict(weight=None if t.weight is None else t.weight.astype(np.float64), reduction=g.reduction,
                           label_smoothing=g.label_smoothing, lse_square_scale=g.lse_square_scale, softcap=g.softcap)
            if g.ignore_index is not None:
                options["ignore_index"] = g.ignore_index
            upstream = {} if t.grad_output is None else {"grad_output": t.grad_output.astype(np.float64)}
            truth = exact_grad(t.logits, t.targets, **options, **upstream)
            bits = t.grad.dtype.itemsize * 8
            view = {16: np.uint16, 32: np.uint32}[bits]
            assert np.array_equal(truth.view(view), t.grad.view(view)), (t.tc_id, g.dtype)
            loss = np.asarray(exact_loss(t.logits, t.targets, **options))
            assert np.array_equal(loss.view(view), t.loss.view(view)), t.tc_id


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
