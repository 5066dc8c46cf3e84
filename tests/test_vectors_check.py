"""The vectors checker: correct implementations pass, each invalid vector is rejected, a bug is recognized."""

from __future__ import annotations

import functools
from dataclasses import replace

import sys

import numpy as np
import pytest

from gradcheck.errors import InvalidArgument
from gradcheck.vectors import BUGS, KINDS, VectorCheck, VectorSuite, build_suite, check_vectors
from zoo import forgot_mean, numpy_logspace, numpy_online, numpy_stable, oracle


@pytest.fixture(scope="module")
def suite():
    return build_suite(0)


@pytest.fixture(scope="module")
def plain(suite):
    """The groups of the plain loss (the zoo's numpy kernels take no kernel options)."""
    return VectorSuite(suite.seed, suite.generator, tuple(g for g in suite.groups if not g.kernel))


@pytest.fixture(scope="module")
def kernel_suite(suite):
    """The kernel groups: z-loss, softcap, upstream gradients (issue 12)."""
    return VectorSuite(suite.seed, suite.generator, tuple(g for g in suite.groups if g.kernel))


def _quiet(fn):
    """The zoo's numpy code warns on overflow (inf - inf) for huge logits; the tests turn warnings into errors."""

    @functools.wraps(fn)  # keeps the signature: whether it takes grad_output= decides the upstream tests
    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("fn", [numpy_stable, numpy_logspace, numpy_online, oracle])
def test_correct_implementations_pass_every_vector(plain, fn):
    if fn is oracle:  # float64 inside: the default contracts of every dtype
        results = [check_vectors(_quiet(fn), plain, targets=("index", "probs"))]
    else:  # computed in the dtype: the dtype's own contract
        results = [check_vectors(_quiet(fn), plain, dtypes=(d,), precision=d)
                   for d in ("float64", "float32", "float16", "bfloat16")]
    for result in results:
        assert result.passed, [o.message for o in result.implementation_failures][:3]
    assert sum(len(r.outcomes) for r in results) == plain.number_of_tests


def test_the_default_contract_holds_half_vectors_to_float32(plain):
    in_dtype = check_vectors(_quiet(numpy_stable), plain, dtypes=("bfloat16",))
    assert not in_dtype.passed and all(o.classified for o in in_dtype.outcomes)  # the file itself is fine
    assert check_vectors(_quiet(numpy_stable), plain, dtypes=("bfloat16",), precision="bfloat16").passed
    with pytest.raises(InvalidArgument, match=r"precision must be one of .* for the float32 tests, got 'bfloat16'"):
        check_vectors(numpy_stable, plain, dtypes=("float32",), precision="bfloat16")


def _replay(test):
    """An implementation that returns this test's stored gradient for its inputs (and the truth elsewhere)."""

    def fn(logits, targets, *, grad_output=None, **options):
        if logits.shape == test.logits.shape and np.array_equal(logits.view(np.uint8), test.logits.view(np.uint8)):
            return test.grad.copy()
        upstream = {} if grad_output is None else {"grad_output": np.asarray(grad_output).astype(np.float64)}
        return oracle(logits, targets, **options, **upstream)

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


def test_a_buggy_implementation_fails_and_is_recognized(plain):
    result = check_vectors(_quiet(forgot_mean), plain, dtypes=("float32",), targets=("index",))
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

    result = check_vectors(reused, VectorSuite(suite.seed, suite.generator, tuple(g for g in suite.groups if not g.kernel)),
                           dtypes=("float32",), targets=("index",))
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


# --- the kernel options (issue 12) -----------------------------------------------------------------

KERNEL_BUGS = ("ZLossSmoothedTarget", "SoftcapTimesLogit", "UpstreamIgnored", "UpstreamFirstRowOnly",
               "ZLossClassWeighted", "ZLossDividedByWeights", "ZLossOnIgnoredRows", "ZLossFactorTwoMissing",
               "SoftcapChainRuleMissing")


def kernel_grad_fn(bug=None):
    """A Liger-style kernel in float64, rounded once to the dtype, with one of the modeled convention bugs.

    Written here from the semantics (common to Liger-Kernel's cross_entropy: z' = c tanh(z / c); the
    z-loss lambda lse(z')^2 unweighted, over the counted rows; the VJP with grad_output), not from
    gradcheck's modules, so that the vectors are checked against an independent implementation.
    """

    def grad_fn(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                lse_square_scale=0.0, softcap=None, grad_output=None):
        z = logits.astype(np.float64)
        n, k = z.shape
        chain = np.ones_like(z)
        zc = z
        if softcap is not None:
            th = np.tanh(z / softcap)  # tanh(-inf) = -1: a masked logit becomes -c, its chain factor 0
            zc = z * th if bug == "SoftcapTimesLogit" else softcap * th
            if bug == "SoftcapTimesLogit":
                chain = np.where(np.isfinite(z), th + z / softcap * (1 - th * th), 0.0)
            elif bug != "SoftcapChainRuleMissing":
                chain = 1 / np.cosh(z / softcap) ** 2  # sech^2: 1 - th^2 cancels where |z| >> c
        m = zc.max(axis=1, keepdims=True)
        e = np.exp(zc - m)
        p = e / e.sum(axis=1, keepdims=True)
        lse = m + np.log(e.sum(axis=1, keepdims=True))
        w = np.ones(k) if weight is None else weight.astype(np.float64)
        if targets.ndim == 1:
            active = targets != ignore_index
            t = np.zeros((n, k))
            t[np.flatnonzero(active), targets[active]] = 1.0
            d = float(np.sum(w[targets[active]])) if reduction == "mean" else 1.0
        else:
            active = np.ones(n, dtype=bool)
            t = targets.astype(np.float64)
            d = float(n) if reduction == "mean" else 1.0
        if label_smoothing:
            t = np.where(active[:, None], (1 - label_smoothing) * t + label_smoothing / k, 0.0)
        dz = float(np.count_nonzero(active)) if reduction == "mean" else 1.0
        g = np.ones(n) if grad_output is None else np.broadcast_to(np.asarray(grad_output, np.float64), (n,))
        if bug == "UpstreamIgnored":
            g = np.ones(n)
        elif bug == "UpstreamFirstRowOnly":
            g = np.full(n, g[0])
        wt = t * w
        ce = (p * wt.sum(axis=1, keepdims=True) - wt) / d
        zl = 2 * lse_square_scale * lse * (p - label_smoothing / k if bug == "ZLossSmoothedTarget" else p)
        a = active[:, None].astype(np.float64)
        if bug == "ZLossClassWeighted" and targets.ndim == 1:
            a = np.where(active, w[np.where(active, targets, 0)], 0.0)[:, None]
        elif bug == "ZLossFactorTwoMissing":
            a = a / 2
        elif bug == "ZLossOnIgnoredRows":
            a = np.ones((n, 1))
        if bug == "ZLossDividedByWeights":
            dz = d
        with np.errstate(invalid="ignore"):
            out = g[:, None] * (np.where(active[:, None], ce, 0.0) + zl * a / dz) * chain
        return out.astype(logits.dtype)

    grad_fn.__name__ = grad_fn.__qualname__ = f"kernel_{bug or 'correct'}"
    return grad_fn


def test_the_kernel_groups_cover_every_option_in_every_dtype(kernel_suite):
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        groups = [g for g in kernel_suite.groups if g.dtype == dtype]
        assert any(g.lse_square_scale for g in groups) and any(g.softcap is not None for g in groups)
        assert {g.reduction for g in groups if any(t.grad_output is not None for t in g.tests)} == {"mean", "sum", "none"}
        assert any(g.lse_square_scale and g.softcap and g.label_smoothing and g.weighted and g.ignore_index == -100
                   and g.reduction == "none" for g in groups)
        # every input kind (but the plain-only many classes) is in some kernel group of every dtype
        kinds = {t.flags[0] for g in groups for t in g.tests if t.result == "valid"}
        assert kinds == {flag for kind, (flag, _, _) in KINDS.items() if kind != "many_classes"}, (dtype, kinds)
    for g in kernel_suite.groups:
        for t in g.tests:
            if t.grad_output is not None and g.reduction == "none":
                assert t.grad_output.shape == (t.logits.shape[0],) and t.grad_output.dtype == t.logits.dtype
                assert t.logits.shape[0] < 2 or len(set(t.grad_output.tolist())) == t.logits.shape[0]


def test_a_correct_kernel_passes_every_kernel_vector(kernel_suite):
    result = check_vectors(_quiet(kernel_grad_fn()), kernel_suite)
    assert result.passed, [o.message for o in result.implementation_failures][:3]
    assert result.upstream_skipped == 0


@pytest.mark.parametrize("bug", KERNEL_BUGS)
def test_each_kernel_bug_is_caught_and_named(kernel_suite, bug):
    """Each modeled convention bug, as a real kernel, fails the vectors and is recognized by its flag."""
    result = check_vectors(_quiet(kernel_grad_fn(bug)), kernel_suite)
    assert not result.passed
    named = {b for o in result.implementation_failures for b in o.resembles}
    assert bug in named, (bug, sorted(named))


def test_a_grad_fn_without_grad_output_skips_the_upstream_tests(kernel_suite):
    fn = kernel_grad_fn()

    def no_upstream(logits, targets, **options):  # **options does not count as taking grad_output
        return fn(logits, targets, **options)

    result = check_vectors(_quiet(no_upstream), kernel_suite)
    upstream = sum(t.grad_output is not None for g in kernel_suite.groups for t in g.tests)
    assert result.upstream_skipped == upstream > 0
    assert result.passed  # the other kernel tests ran and passed; the skipped ones are counted, not passed
    only = VectorSuite(kernel_suite.seed, kernel_suite.generator,
                       tuple(g for g in kernel_suite.groups if all(t.grad_output is not None for t in g.tests)))
    assert not check_vectors(_quiet(no_upstream), only).passed  # nothing run is no pass
