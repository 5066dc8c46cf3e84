"""The judgement of one result: by row blocks and on the counted rows, the same verdict as the whole arrays at once."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradcheck.checking.judge as judge
from gradcheck.checking.result import Failure, FailureKind
from gradcheck.dtypes import round_to_format
from gradcheck.exact import certified_grad
from gradcheck.oracle import grad_rows, row_parts
from gradcheck.problem import Case
from gradcheck.reference import reference_grad
from gradcheck.strategies import cases
from gradcheck.tolerance import contracts, tolerances
from gradcheck.ulps import ulp_distance


def whole_compare(got, case, *, precision=None, grades=None):
    """The comparison of the whole arrays at once, as verify made it before row blocks (the test's oracle)."""
    problem = case.problem
    fmt = problem.format
    asked = fmt.name if precision is None else precision
    layout = problem.caller_layout
    got = layout.rows(got) if problem.layout is not None else got
    parts = row_parts(problem.logits)
    ref, bound = reference_grad(problem, parts)
    g64 = ref.astype(np.float64)
    bad = ~np.isfinite(got.astype(np.float64))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return Failure(FailureKind.NONFINITE, f"grad_fn returned {float(got[where])!r} at {layout.index(where)} where "
                       f"the truth is finite ({g64[where]!r})", case, layout.index(where), expected=float(g64[where]),
                       got=float(got[where]))
    wanted = contracts(fmt) if grades is not None else (asked,)
    tols, vacuous = {}, []
    for c in wanted:
        try:
            tols.update(tolerances(problem, parts, g64, bound, (c,)))
        except ArithmeticError:
            vacuous.append(c)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(got.astype(ref.dtype) - ref).astype(np.float64)
        ratios = {c: np.where(err == 0, 0.0, err / t) for c, t in tols.items()}
    ok = {c: err <= t + bound for c, t in tols.items()}
    if "exact" in tols:
        sure = err <= tols["exact"] - bound
        unsure = ~sure & (err <= tols["exact"] + bound)
        certified = np.zeros_like(sure)
        if unsure.any():
            truth = certified_grad(problem, fmt, where=unsure)
            certified = unsure & (got.astype(np.float64) == truth.astype(np.float64))
        ok["exact"] = sure | certified
        ratios["exact"] = np.where(certified, 0.0, ratios["exact"])
    if grades is not None:
        for c in tols:
            grades[c] = (float(ratios[c].max(initial=0.0)), bool(np.all(ok[c])))
        for c in vacuous:
            grades[c] = (math.inf, False)
    if asked in vacuous:
        raise judge.InvalidArgument(asked)
    tol, ratio = tols[asked], ratios[asked]
    ulps = ulp_distance(got, round_to_format(g64, fmt))
    wrong = ~ok[asked]
    if wrong.any():
        flat = np.where(wrong, ratio, -1.0)
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), flat.shape))
        return Failure(FailureKind.MISMATCH, f"gradient differs from the truth by {ratio[where]:.3g} x the tolerance at "
                       f"{layout.index(where)}", case, layout.index(where), expected=float(g64[where]),
                       got=float(got[where]), ulps=float(ulps[where]), tolerance=float(tol[where]),
                       ratio=float(ratio[where]))
    return float(ulps.max(initial=0.0)), float(ratio.max(initial=0.0))


def _fields(outcome):
    """Every field of a verdict, as text (so that NaN equals NaN and -0.0 differs from 0.0)."""
    if isinstance(outcome, Failure):
        return tuple(repr(x) for x in (outcome.kind, outcome.message, outcome.index, outcome.expected, outcome.got,
                                       outcome.ulps, outcome.tolerance, outcome.ratio))
    return tuple(repr(x) for x in outcome)


def _results(case, rng):
    """A correct result, one element off, a NaN, and (with ignored rows) a tiny value and -0 there."""
    p = case.problem
    g = round_to_format(grad_rows(p), p.format)
    out = [g.copy()]
    wrong = g.copy()
    wrong.reshape(-1)[rng.integers(0, g.size)] *= 1.5
    out.append(wrong)
    nan = g.copy()
    nan.reshape(-1)[rng.integers(0, g.size)] = np.nan
    out.append(nan)
    ignored = ~p.active_rows()
    if ignored.any():
        tiny = g.copy()
        tiny[np.flatnonzero(ignored)[0], 0] = p.format.smallest_subnormal
        out.append(tiny)
        zero = g.copy()
        zero[ignored] = -0.0
        out.append(zero)
    return [p.restore_shape(x) for x in out]


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_row_blocks_and_counted_rows_give_the_whole_arrays_verdict(data, monkeypatch_block):
    dtype = data.draw(st.sampled_from(["float64", "float32", "bfloat16", "float16"]))
    options = data.draw(st.fixed_dictionaries({}, optional={
        "ignore_index": st.sampled_from([-100, 0, 2]), "reduction": st.sampled_from(["sum", "none"]),
        "weighted": st.just(True), "label_smoothing": st.just(0.1), "softcap": st.just(3.0),
        "lse_square_scale": st.just(0.01)}))
    case = data.draw(cases(dtype=dtype, upstream=data.draw(st.booleans()), max_shape=(40, 300), **options))
    monkeypatch_block(data.draw(st.sampled_from([1, 7, 1 << 20])))  # one row per block, a few, or one block
    for got in _results(case, np.random.default_rng(0)):
        for precision in (None, "exact"):
            before, after = {}, {}
            try:
                expected = _fields(whole_compare(got, case, precision=precision, grades=before))
            except judge.InvalidArgument:
                with pytest.raises(judge.InvalidArgument, match="cannot be checked on this case"):
                    judge.compare_values(got, case, precision=precision, grades=after)
                continue
            assert _fields(judge.compare_values(got, case, precision=precision, grades=after)) == expected
            assert repr(after) == repr(before)


@pytest.fixture
def monkeypatch_block():
    saved = judge.BLOCK_ELEMENTS

    def set_block(elements):
        judge.BLOCK_ELEMENTS = elements

    yield set_block
    judge.BLOCK_ELEMENTS = saved


def _llm_case(n=64, k=4099, dtype="float32", share=0.9, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)).astype(dtype)
    t = np.where(rng.random(n) < share, -100, rng.integers(0, k, n))
    t[0] = 1
    return Case.make(z, t, regime="llm_vocab")


def test_only_the_counted_rows_are_modelled_when_the_ignored_ones_are_zero(monkeypatch):
    case = _llm_case()
    p = case.problem
    got = round_to_format(grad_rows(p), p.format)
    modelled = []
    counted = judge.counted_rows
    monkeypatch.setattr(judge, "counted_rows", lambda problem, rows: modelled.append(rows) or counted(problem, rows))
    assert not isinstance(judge.compare_values(got, case, grades={}), Failure)
    assert len(modelled) == 1 and np.array_equal(modelled[0], np.flatnonzero(p.active_rows()))
    got[np.flatnonzero(~p.active_rows())[0], 5] = np.float32(1e-38)  # not 0: the ignored rows are modelled too
    modelled.clear()
    outcome = judge.compare_values(got, case, grades={})
    assert not modelled and _fields(outcome) == _fields(whole_compare(got, case, grades={}))


def test_a_wrong_element_of_a_counted_row_is_named_at_its_own_row():
    case = _llm_case()
    p = case.problem
    got = round_to_format(grad_rows(p), p.format)
    row = int(np.flatnonzero(p.active_rows())[-1])
    got[row, 7] = 0.5
    failure = judge.compare_values(got, case)
    assert isinstance(failure, Failure) and failure.kind == FailureKind.MISMATCH and failure.index == (row, 7)
    assert _fields(failure) == _fields(whole_compare(got, case))


def test_the_judgement_takes_a_few_float64_arrays_of_the_input_not_dozens(monkeypatch_block):
    # docs/tolerance.md, "Evaluation by row blocks": every row counted (the general case), all contracts
    monkeypatch_block(1 << 16)
    case = _llm_case(n=64, k=32000, share=0.0)
    got = round_to_format(grad_rows(case.problem), case.problem.format)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outcome = judge.compare_values(got, case, grades={})
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert not isinstance(outcome, Failure)
    assert peak < 6 * 8 * got.size  # the whole arrays at once took 27 float64 arrays of it


def test_an_ignored_row_of_zeros_no_longer_makes_a_contract_vacuous():
    # docs/tolerance.md, "Ignored rows": bfloat16 arithmetic under softcap=30 has no error model on a row
    # of |z| ~ 10 (the perturbation of z' alone is about 0.6); when that row is ignored and its result is 0
    # nothing is modelled there, so the bfloat16 contract can be checked on the counted row
    z = np.array([[0.5, -0.25, 0.125, 0.0], [10.0, -10.0, 9.0, 8.0]], dtype="float32")
    case = Case.make(z.astype(round_to_format(np.zeros(1), "bfloat16").dtype), np.array([1, -100]), softcap=30.0,
                     regime="llm_vocab")
    p = case.problem
    got = round_to_format(grad_rows(p), p.format)
    assert np.all(got[1] == 0)
    grades = {}
    assert not isinstance(judge.compare_values(got, case, precision="bfloat16", grades=grades), Failure)
    assert grades["bfloat16"][1] and grades["exact"][1]
    got[1, 0] = got.dtype.type(2.0**-120)  # not 0: the ignored row is modelled, and it has no error model
    with pytest.raises(judge.InvalidArgument, match="precision='bfloat16' cannot be checked"):
        judge.compare_values(got, case, precision="bfloat16")
    with pytest.raises(judge.InvalidArgument):  # judged whole, as before, the zeros were refused too
        whole_compare(np.where(np.arange(2)[:, None] == 1, 0, got).astype(got.dtype), case, precision="bfloat16")


def test_the_undecided_elements_are_certified_only_when_the_verdict_can_depend_on_them(monkeypatch):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((16, 4099)).astype("float32")
    t = rng.integers(0, 4099, 16)
    case = Case.make(z, t, regime="moderate")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    in_float32 = e / e.sum(axis=1, keepdims=True)  # a float32 kernel: within its contract, not correctly rounded
    in_float32[np.arange(16), t] -= 1
    in_float32 /= 16
    certified = []
    certify = judge._certify
    monkeypatch.setattr(judge, "_certify", lambda *args: certified.append(1) or certify(*args))
    grades = {}
    assert not isinstance(judge.compare_values(in_float32, case, grades=grades), Failure)
    assert not grades["exact"][1] and not certified  # already not correctly rounded, worse than any undecided one
    assert repr(grades) == repr(_grades(whole_compare, in_float32, case))
    truth = round_to_format(grad_rows(case.problem), case.problem.format)
    judge.compare_values(truth, case, grades={})
    judge.compare_values(in_float32, case, precision="exact")
    assert len(certified) == 2  # while "exact" is met so far, or asked, the undecided elements decide


def _grades(compare, got, case):
    grades = {}
    compare(got, case, grades=grades)
    return grades
