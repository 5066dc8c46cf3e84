"""gradcheck/vectors/linear.py and gradcheck/report/linear_section.py: the fused linear family's golden vectors.

(Named test_linear_vectors.py, not test_vectors_linear.py: tests/test_vectors_* belong to the vectors suite.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradcheck.linear import linear_cross_entropy_grad
from gradcheck.report.floats import decode_floats
from gradcheck.report.linear_section import linear_vectors_markdown
from gradcheck.vectors.linear import (
    LINEAR_BUGS,
    LINEAR_GROUPS,
    SHAPES,
    build_linear_suite,
    check_linear_vectors,
    parse_linear_vectors,
    render_linear_vectors,
)
from gradcheck.errors import InvalidArgument

DTYPES = ("float64", "float32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def suite():
    return build_linear_suite(0)


def oracle(hidden, weight, targets, *, bias=None, **options):
    """A correct implementation: float64 inside, rounded once."""
    g = linear_cross_entropy_grad(hidden, weight, targets, bias=bias, **options)
    return (g.hidden, g.weight) if bias is None else tuple(g)


def bias_dropped(hidden, weight, targets, *, bias=None, **options):
    out = oracle(hidden, weight, targets, bias=bias, **options)
    return out if bias is None else (out[0], out[1], np.zeros_like(out[2]))


def test_every_group_in_every_dtype_with_and_without_bias(suite):
    assert [(g.dtype, g.spec.name) for g in suite] == [(d, s.name) for d in DTYPES for s in LINEAR_GROUPS]
    assert {g.spec.bias for g in suite} == {True, False}
    for g in suite:
        valid = [t for t in g.tests if t.result == "valid"]
        assert len(valid) == len(SHAPES)
        assert [t.case.problem.shape for t in valid] == [s[:3] for s in SHAPES]
        for t in g.tests:
            assert len(t.grad) == (3 if g.spec.bias else 2)
            assert all(x.dtype == t.case.format.dtype for x in t.grad)
    ids = [t.tc_id for g in suite for t in g.tests]
    assert ids == list(range(1, len(ids) + 1))


def test_every_modeled_bug_is_in_the_suite_in_every_dtype(suite):
    for dtype in DTYPES:
        found = {t.bug for g in suite if g.dtype == dtype for t in g.tests if t.result == "invalid"}
        assert found == set(LINEAR_BUGS), dtype


def test_a_bug_is_kept_only_where_it_shows(suite):
    """With one row a missing 1/N is no bug, and with one class every gradient is 0 (a zero bias gradient is right)."""
    for g in suite:
        for t in g.tests:
            n, v, _ = t.case.problem.shape
            if t.bug == "MissingMeanDivisor":
                assert n > 1
            if t.bug in ("BiasGradientDropped", "LabelSmoothingDropped"):
                assert v > 1


def test_the_judge_classifies_every_test(suite):
    outcomes = check_linear_vectors(None, suite)
    assert outcomes and all(o.classified for o in outcomes)
    assert all(o.implementation_ok is None for o in outcomes)


def test_a_correct_implementation_passes_every_valid_test_and_a_bias_bug_fails(suite):
    f32 = tuple(g for g in suite if g.dtype == "float32")
    good = check_linear_vectors(oracle, f32)
    assert all(o.implementation_ok for o in good if o.result == "valid")
    bad = check_linear_vectors(bias_dropped, f32)
    failed = {o.tc_id for o in bad if o.implementation_ok is False}
    biased = {t.tc_id for g in f32 if g.spec.bias for t in g.tests if t.result == "valid" and t.case.problem.shape[1] > 1}
    assert failed == biased
    assert all("d_bias" in o.message for o in bad if o.implementation_ok is False)


def test_the_file_is_deterministic_and_bit_exact(suite):
    text = render_linear_vectors(suite)
    assert text == render_linear_vectors(build_linear_suite(0))
    assert text != render_linear_vectors(build_linear_suite(1, dtypes=DTYPES))
    document = json.loads(text)
    assert document["schema"] == "gradcheck-linear-vectors" and document["numberOfTests"] == sum(len(g.tests) for g in suite)
    tests = {t["tcId"]: t for g in document["testGroups"] for t in g["tests"]}
    for g in suite:
        for t in g.tests:
            encoded = tests[t.tc_id]
            assert encoded["result"] == t.result and encoded["flags"] == ([t.bug] if t.bug else [])
            for key, x in zip(("dHidden", "dWeight", "dBias"), t.grad):
                decoded = decode_floats(encoded[key])
                assert decoded.dtype == x.dtype and np.array_equal(decoded.view(np.uint8), x.view(np.uint8))
            assert ("dBias" in encoded) == g.spec.bias == ("bias" in encoded)


def test_the_report_section_counts_the_tests(suite):
    f64 = tuple(g for g in suite if g.dtype == "float64")
    lines = linear_vectors_markdown(f64, check_linear_vectors(oracle, f64))
    text = "\n".join(lines)
    assert lines[0] == "## Golden vectors of the fused linear family"
    assert f"{sum(len(g.tests) for g in f64)} tests in {len(f64)} groups" in text
    row = next(line for line in lines if line.startswith("| `linear_bias` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    group = next(g for g in f64 if g.spec.name == "linear_bias")
    assert cells[:4] == ["`linear_bias`", "float64", "yes", str(len(SHAPES))]
    assert cells[-2:] == [f"{len(group.tests)}/{len(group.tests)}", f"{len(SHAPES)}/{len(SHAPES)}"]
    for flag in LINEAR_BUGS:
        assert f"- `{flag}`:" in text


def test_the_file_reads_back_bit_for_bit(suite):
    f16 = tuple(g for g in suite if g.dtype == "float16")
    text = render_linear_vectors(f16)
    back = parse_linear_vectors(text)
    assert render_linear_vectors(back) == text
    assert [o.classified for o in check_linear_vectors(None, back)] == [True] * sum(len(g.tests) for g in f16)


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "must be JSON"),
    ('{"schema": "gradcheck-vectors"}', "must have schema 'gradcheck-linear-vectors', got 'gradcheck-vectors'"),
    ('{"schema": "gradcheck-linear-vectors", "testGroups": [{"name": "x"}]}', "malformed linear vectors file: KeyError"),
])
def test_a_file_that_is_not_linear_vectors_is_refused(text, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_linear_vectors(text)


def test_the_file_does_not_depend_on_the_cpus_simd(tmp_path):
    """The bugs' gradients are certified values: the file is the same with numpy's AVX-512 kernels and without
    (it was not when they came from the float64 oracle, whose exp and log move with the SIMD in use)."""
    import os
    import subprocess
    import sys

    texts = []
    for i, disabled in enumerate(("", "X86_V4 AVX512_ICL AVX512_SPR")):
        out = tmp_path / f"v{i}.json"
        env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
        subprocess.run([sys.executable, "-m", "gradcheck", "vectors", "--linear", "--out", str(out)], env=env,
                       check=True, capture_output=True)
        texts.append(out.read_bytes())
    assert texts[0] == texts[1]
