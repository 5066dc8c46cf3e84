"""The make-moons network's hand-derived backprop, checked by gradcheck (issue 13, item 7).

The logits gradient G = (p - y) / N is checked with ``assert_gradient``, the output layer's three
gradients (dL/da, dL/dW2, dL/db2) with ``assert_linear_gradient``, and a deliberately wrong backprop is
caught. The checked functions are the ones ``train`` uses (moons.py), so a pass covers the training code.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from moons import Network, logits_grad, loss, make_moons, output_layer_grad, train

SEED = 13
CHECK = {"max_examples": 40, "seed": SEED}


def test_the_data_are_two_interleaving_half_circles():
    X, y = make_moons(101, noise=None, seed=0)
    assert X.shape == (101, 2) and np.bincount(y).tolist() == [50, 51]
    outer, inner = X[y == 0], X[y == 1]
    assert np.allclose(np.hypot(*outer.T), 1.0)                          # the upper half of the unit circle
    assert np.allclose(np.hypot(inner[:, 0] - 1, inner[:, 1] - 0.5), 1.0)  # shifted by (1, 0.5) and flipped
    assert (outer[:, 1] >= 0).all() and (inner[:, 1] <= 0.5).all()
    with pytest.raises(ValueError, match="n_samples must be at least 2, got 1"):
        make_moons(1)


def test_training_separates_the_moons():
    X, y = make_moons(400, noise=0.15, seed=0)
    net, losses = train(X, y, steps=1500)
    assert losses[-1] < losses[0] / 10
    assert net.accuracy(X, y) > 0.97
    X_test, y_test = make_moons(400, noise=0.15, seed=1)
    assert net.accuracy(X_test, y_test) > 0.95


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_logits_gradient_is_right(dtype):
    # up to 512 classes (the network has 2): the default (64, 4096) costs ten times more here
    gradcheck.assert_gradient(logits_grad, dtype=dtype, max_shape=(32, 512), **CHECK)


def test_a_softmax_without_the_row_maximum_is_caught():
    """exp(z) overflows on the large logits verify draws: inf / inf is NaN."""

    def naive_logits_grad(logits, targets):
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(logits)
            G = e / e.sum(axis=1, keepdims=True)
        G[np.arange(len(targets)), targets] -= 1
        return G / len(targets)

    result = gradcheck.verify(naive_logits_grad, dtype="float64", max_shape=(32, 512), **CHECK)
    assert not result.passed and result.failure.kind == "nonfinite", result


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_output_layer_gradients_are_right(dtype, bias):
    gradcheck.assert_linear_gradient(output_layer_grad, dtype=dtype, bias=bias, **CHECK)


def divides_by_n_twice(hidden, weight, targets, *, bias=None):
    """A classic slip: G already carries the mean's 1/N, and dW2 divides by N again."""
    d_hidden, d_weight, *d_bias = output_layer_grad(hidden, weight, targets, bias=bias)
    return (d_hidden, d_weight / len(targets), *d_bias)


def test_a_wrong_backprop_is_caught():
    result = gradcheck.verify_linear(divides_by_n_twice, dtype="float64", bias=True, **CHECK)
    assert not result.passed
    with pytest.raises(gradcheck.GradientMismatch, match="weight"):
        gradcheck.assert_linear_gradient(divides_by_n_twice, dtype="float64", bias=True, **CHECK)


def test_the_wrong_backprop_still_trains_but_more_slowly():
    """Why checking beats watching the loss: the bug only shrinks dW2's step, and the loss still falls."""
    X, y = make_moons(400, noise=0.15, seed=0)
    _, right = train(X, y, steps=300)
    _, wrong = train(X, y, steps=300, output_layer=divides_by_n_twice)
    assert wrong[-1] < wrong[0]          # the loss falls: nothing looks broken
    assert wrong[-1] > right[-1]         # but it is not the gradient of the loss


def test_the_fixture_checks_the_output_layer(gradcheck):  # noqa: F811 - the plugin's fixture
    gradcheck.assert_linear_gradient(output_layer_grad, bias=True, max_examples=10)


def test_backprop_matches_central_differences_of_the_loss():
    """The hidden layer's gradients too (not a linear-CE family member), against central differences.

    Their error is about h^2/6 |f'''| (truncation) + u |f| / h (rounding): with h = 1e-5, |f| < 1 and
    third derivatives of order one, a few 1e-11 (measured: at most 1.3e-11). A wrong formula is off by
    the size of a gradient element (1e-3 to 1e-1 here); the bound 1e-8 sits between the two."""
    X, y = make_moons(64, noise=0.15, seed=2)
    net = Network.init(8, seed=3)
    grads = net.gradients(X, y)
    for name in ("W1", "b1", "W2", "b2"):
        p = getattr(net, name)
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            saved = p[i]
            p[i] = saved + 1e-5
            up = loss(net.logits(X), y)
            p[i] = saved - 1e-5
            down = loss(net.logits(X), y)
            p[i] = saved
            numeric[i] = (up - down) / 2e-5
        assert np.abs(grads[name] - numeric).max() < 1e-8, name
