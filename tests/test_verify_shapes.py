"""verify(shapes=...): every regime at exactly the asked shapes, in torch's layout or the LLM's (class_axis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcheck as gc
from gradcheck.errors import InvalidArgument
from gradcheck.options import VERIFY
from gradcheck.strategies import cases

SHAPES = ((3, 70), (2, 4, 67))


def _oracle(logits, targets, **options):
    return gc.cross_entropy_grad(logits, targets, **options)


@settings(max_examples=40, database=None, deadline=None)
@given(cases(shapes=SHAPES, class_axis=-1, weighted=True))
def test_cases_have_exactly_the_asked_shapes(case):
    assert case.logits.shape in SHAPES
    assert case.targets.shape == case.logits.shape[:-1]
    assert case.regime != "single"
    assert case.options().get("class_axis") == (-1 if case.logits.ndim == 3 else None)


@settings(max_examples=20, database=None, deadline=None)
@given(cases(shapes=((2, 5, 3, 4),), class_axis=1, targets="probs"))
def test_torch_layout_cases_put_the_classes_on_axis_1(case):
    assert case.logits.shape == (2, 5, 3, 4) and case.targets.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(np.moveaxis(case.logits, 1, -1).reshape(-1, 5), case.problem.logits)


@pytest.mark.parametrize(("value", "message"), [
    ([(8,)], r"shapes must hold shapes of 2 or more positive integers .*got \(8,\)"),
    ([(8, 0)], r"got \(8, 0\)"),
    ([(8, 2.5)], r"got \(8, 2.5\)"),
    ([], r"shapes must be a non-empty list of logits shapes"),
    ("8x3", r"shapes must be a non-empty list"),
])
def test_bad_shapes_are_named(value, message):
    with pytest.raises(InvalidArgument, match=message):
        gc.verify(_oracle, shapes=value, max_examples=1)


def test_shapes_from_text_and_class_axis_required_for_3d():
    assert VERIFY["shapes"].from_text("8x128256,2x1024x32000") == ((8, 128256), (2, 1024, 32000))
    with pytest.raises(InvalidArgument, match=r"logits of shape \(2, 4, 67\) need class_axis"):
        gc.verify(_oracle, shapes=SHAPES, max_examples=1)
    with pytest.raises(InvalidArgument, match=r"class_axis must be in \[-2, 2\) for logits of shape \(3, 70\), got 2"):
        gc.verify(_oracle, shapes=SHAPES, class_axis=2, max_examples=1)
    with pytest.raises(InvalidArgument, match=r"class_axis applies to shapes="):
        gc.verify(_oracle, class_axis=1, max_examples=1)


@pytest.mark.parametrize(("shapes", "axis"), [(SHAPES, -1), (((2, 5, 3, 4),), 1)])
def test_a_correct_gradient_passes_in_both_layouts(shapes, axis):
    result = gc.verify(_oracle, shapes=shapes, class_axis=axis, max_examples=30, seed=3, weighted=True)
    assert result.passed, result


def test_torch_autograd_in_its_own_layout_passes():
    torch = pytest.importorskip("torch")

    def torch_grad(logits, targets, class_axis=None, **options):
        z = torch.tensor(logits, requires_grad=True)
        kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
        torch.nn.functional.cross_entropy(z, torch.tensor(targets), **kw).sum().backward()
        return z.grad.numpy()

    result = gc.verify(torch_grad, shapes=[(2, 5, 3, 4)], class_axis=1, max_examples=30, seed=0, reduction="none")
    assert result.passed, result


def test_a_wrong_element_is_reported_in_the_callers_layout_and_the_asked_shape_is_kept():
    asked = (2, 4, 67)

    def only_asked(logits, targets, **options):
        if logits.shape != asked:
            raise ValueError("this kernel is compiled for one shape")
        g = np.array(gc.cross_entropy_grad(logits, targets, **options))
        g[1, 3, 66] += 0.5  # the last class of the last position: a tail-of-block bug
        return g

    result = gc.verify(only_asked, shapes=[asked], class_axis=-1, max_examples=10, seed=0)
    assert not result.passed
    failure = result.failure
    assert failure.case.logits.shape == asked
    assert failure.index == (1, 3, 66)
    assert "at (1, 3, 66)" in failure.message
    assert "shapes=((2, 4, 67),), class_axis=-1" in result.reproduction


# ---- the LLM-scale regime ------------------------------------------------------------------------------------------

from gradcheck.checking.judge import check  # noqa: E402
from gradcheck.checking.result import Failure  # noqa: E402
from gradcheck.regimes import param  # noqa: E402
from gradcheck.strategies import LLM_CLASSES  # noqa: E402

@pytest.fixture(scope="module")
def llm_draws():
    drawn = []

    @settings(max_examples=25, database=None, deadline=None)  # at most 300 x 65537 (20 Mi elements), and cheap
    @given(cases(max_shape=(300, 65537), regimes=("llm_vocab",), dtype="float32"))
    def draw(case):
        drawn.append(case)

    draw()
    return drawn


def test_llm_vocab_draws_llm_vocabularies_late_maxima_and_mostly_ignored_rows(llm_draws):
    assert {32000, 50257, 128256, 151936, 262144, 2**15 - 1, 2**15 + 1, 2**18 + 1} <= set(LLM_CLASSES)
    LLM_DRAWS = llm_draws
    block = int(param("llm_vocab", "block"))
    ignored = []
    for case in LLM_DRAWS:
        p = case.problem
        assert p.k in LLM_CLASSES and p.n * p.k <= param("llm_vocab", "max_elements")
        assert p.active_rows().sum() * p.k <= param("llm_vocab", "max_live_elements")
        assert np.all(np.argmax(p.logits.astype(np.float64), axis=1) >= p.k - block)
        assert p.active_rows().any()  # the mean's divisor is not 0
        ignored.append(1 - p.active_rows().mean())
    many = [share for case, share in zip(LLM_DRAWS, ignored) if case.problem.n >= 20]
    assert many and np.mean(many) > 0.75
    assert max(case.problem.n for case in LLM_DRAWS) >= 100


def test_llm_vocab_reaches_thousands_of_rows_with_the_counted_ones_capped():
    from gradcheck.strategies import _shapes, cap_counted_rows

    assert param("llm_vocab", "max_elements") // 32000 >= 4096  # the "thousands of rows" at K = 32000
    assert param("llm_vocab", "max_live_elements") < param("llm_vocab", "max_elements")
    seen = []

    @settings(max_examples=60, database=None, deadline=None)
    @given(st.data())
    def shapes(data):  # the drawn shapes alone (the arrays of 4096 x 32000 would be 1 GiB each)
        n, k = _shapes(data.draw, "llm_vocab", (4096, 32000))
        assert k == 32000 and 1 <= n <= 4096
        seen.append(n)

    shapes()
    assert max(seen) > 1000
    rng = np.random.default_rng(0)
    t = np.where(rng.random(4096) < 0.9, -100, rng.integers(0, 32000, 4096))
    tags = []
    capped = cap_counted_rows(np.random.default_rng(1), t, 32000, -100, 2**23, tags)
    assert (capped != -100).sum() == 2**23 // 32000 and tags == ["ignored rows"]
    assert set(np.flatnonzero(capped != -100)) <= set(np.flatnonzero(t != -100))  # counted rows only ignored, never added
    assert np.array_equal(capped[capped != -100], t[capped != -100])
    few = t[:200]  # within the cap: the same targets, and no draw from the generator
    r = np.random.default_rng(2)
    assert cap_counted_rows(r, few, 32000, -100, 2**23, []) is few and r.random() == np.random.default_rng(2).random()


def test_an_llm_shape_with_a_thousand_rows_is_judged_on_its_counted_rows(monkeypatch):
    import gradcheck.checking.judge as judge

    shape = (1024, 32768 + 1)  # 34 Mi elements: judged whole, this took ~27 float64 arrays of it (7 GiB)
    modelled = []
    counted = judge.counted_rows
    monkeypatch.setattr(judge, "counted_rows", lambda p, rows: modelled.append(rows.size) or counted(p, rows))
    result = gc.verify(_oracle, shapes=[shape], regimes=("llm_vocab",), dtype="float32", max_examples=1, seed=0)
    assert result.passed and result.examples == 1
    assert modelled and 0 < modelled[0] <= param("llm_vocab", "max_live_elements") // shape[1]


def test_llm_vocab_is_drawn_only_when_max_shape_reaches_llm_vocabularies():
    @settings(max_examples=30, database=None, deadline=None)
    @given(cases())
    def default_draw(case):
        assert case.regime != "llm_vocab" and case.problem.k <= 4096

    default_draw()


def test_a_tail_of_block_bug_is_caught_at_llm_scale(llm_draws):
    case = next(c for c in llm_draws if c.problem.n >= 4)
    assert not isinstance(check(_oracle, case), Failure)

    def last_class_dropped(logits, targets, **options):  # a kernel that never loads the last, partial block
        k = logits.shape[1]
        keep = k // 1024 * 1024 if k % 1024 else k - 1024
        g = np.zeros_like(logits)
        t = np.where(targets == -100, -100, np.minimum(targets, keep - 1))
        g[:, :keep] = gc.cross_entropy_grad(logits[:, :keep], t, **options)
        return g

    assert isinstance(check(last_class_dropped, case), Failure)


# ---- progress ------------------------------------------------------------------------------------------------------


def test_verify_reports_progress_after_each_example_and_is_quiet_by_default(capsys):
    calls = []
    result = gc.verify(_oracle, max_examples=12, seed=0, progress=lambda done, total: calls.append((done, total)))
    assert result.passed and calls == [(i, 12) for i in range(1, 13)]
    gc.verify(_oracle, max_examples=3, seed=0)
    assert capsys.readouterr() == ("", "")


def test_the_cli_bar_appears_only_after_its_delay():
    import io

    rich_console = pytest.importorskip("rich.console")
    from gradcheck.cli import _Progress

    out = io.StringIO()
    console = rich_console.Console(file=out, force_terminal=True)
    quick = _Progress(console, "verify", 10, delay=3600.0)
    with quick:
        quick.update(5, 10)
    assert out.getvalue() == ""  # shorter than its delay: nothing drawn
    shown = _Progress(console, "verify", 10, delay=0.0)
    with shown:
        shown.update(7, 10)
    assert "7/10" in out.getvalue()
