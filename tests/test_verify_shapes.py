"""verify(shapes=...): every regime at exactly the asked shapes, in torch's layout or the LLM's (class_axis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

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
