"""The linear family's adapters (gradcheck/adapters_linear.py) and the real clients they check (issue 13, item 5).

Part 1 checks the adapters' plumbing with properties that hold bit for bit: with W = I (V = D) the
logits are h exactly, so d_hidden is the logits gradient torch's own F.cross_entropy gives; an upstream
gradient that is a power of two scales every gradient exactly (each step of a backward pass is linear
in its cotangent). Part 2 verifies real clients with ``verify_linear`` and states the grade measured.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck.adapters import jax_loss_grad, torch_loss_grad
from gradcheck.adapters_linear import jax_linear_loss_grad, torch_linear_loss_grad
from zoo import _jax_cross_entropy

N, V, D = 8, 6, 6  # N a power of two: a mean's 1/N is exact


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is not installed: the torch adapters are untested")


@pytest.fixture
def jax():
    return pytest.importorskip("jax", reason="jax is not installed: the JAX adapters are untested")


def _inputs(dtype: str = "float64", seed: int = 0, *, identity: bool = False):
    from gradcheck.dtypes import float_format

    rng = np.random.default_rng(seed)
    dt = float_format(dtype).dtype
    h = rng.normal(scale=2.0, size=(N, D)).astype(dt)
    W = np.eye(V, D, dtype=dt) if identity else rng.normal(size=(V, D)).astype(dt)
    b = rng.normal(size=V).astype(dt)
    t = rng.integers(0, V, size=N)
    return h, W, b, t


def _jax_linear(h, W, t, *, bias=None, ce_weight=None, **options):
    return _jax_cross_entropy(h @ W.T if bias is None else h @ W.T + bias, t, weight=ce_weight, **options)


OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothed": {"label_smoothing": 0.25},
    "weighted_ignored": {"ce_weight": np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.25]), "ignore_index": 2},
}


def _upstream(options: dict, value: float):
    return np.full(N, value) if options.get("reduction") == "none" else np.float64(value)


# --- part 1: the adapters' plumbing ---------------------------------------------------------------

@pytest.mark.parametrize("config", list(OPTIONS))
def test_torch_adapter_d_hidden_is_torchs_logits_gradient_when_w_is_the_identity(torch, config):
    h, W, _, t = _inputs(identity=True)
    options = OPTIONS[config]
    d_hidden, d_weight = torch_linear_loss_grad()(h, W, t, **options)
    assert d_hidden.shape == h.shape and d_weight.shape == W.shape
    logits_options = {"weight" if k == "ce_weight" else k: v for k, v in options.items()}
    assert np.array_equal(d_hidden, torch_loss_grad()(h, t, **logits_options))  # z = h @ I is h exactly


@pytest.mark.parametrize("config", list(OPTIONS))
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_torch_adapter_passes_grad_output_as_the_cotangent(torch, config, dtype):
    h, W, b, t = _inputs(dtype, seed=1)
    options = OPTIONS[config]
    if "ce_weight" in options:
        options = {**options, "ce_weight": options["ce_weight"].astype(h.dtype)}
    grad_fn = torch_linear_loss_grad()
    ones = grad_fn(h, W, t, bias=b, **options)
    fours = grad_fn(h, W, t, bias=b, grad_output=_upstream(options, 4.0).astype(h.dtype), **options)
    assert len(ones) == len(fours) == 3 and all(g.dtype == h.dtype for g in fours)
    for one, four in zip(ones, fours):  # a power of two scales exactly
        assert np.array_equal(four.astype(np.float64), 4 * one.astype(np.float64))


def test_torch_adapter_per_row_upstream_scales_each_rows_d_hidden(torch):
    h, W, b, t = _inputs(seed=2)
    g = 2.0 ** np.arange(-3, N - 3)  # a different power of two per row
    d_hidden, _, _ = torch_linear_loss_grad()(h, W, t, bias=b, reduction="none", grad_output=g)
    ones, _, _ = torch_linear_loss_grad()(h, W, t, bias=b, reduction="none")
    assert np.array_equal(d_hidden, g[:, None] * ones)  # row n of G @ W depends on row n of G only


def test_torch_adapter_gives_a_zero_gradient_for_an_unused_bias(torch):
    import torch.nn.functional as F

    def ignores_bias(h, W, t, bias=None, **options):
        return F.cross_entropy(h @ W.T, t, **options)

    h, W, b, t = _inputs(seed=3)
    d_hidden, d_weight, d_bias = torch_linear_loss_grad(ignores_bias)(h, W, t, bias=b)
    assert d_bias.shape == b.shape and not d_bias.any()
    assert torch_linear_loss_grad(ignores_bias).__name__ == "torch_linear_loss_grad(ignores_bias)"


def test_torch_adapter_calls_the_loss_with_a_bias_only_when_one_is_checked(torch):
    import torch.nn.functional as F

    seen = []

    def loss(h, W, t, **options):
        seen.append(sorted(options))
        bias = options.pop("bias", None)
        return F.cross_entropy(F.linear(h, W, bias), t, **options)

    h, W, b, t = _inputs(seed=4)
    assert len(torch_linear_loss_grad(loss)(h, W, t, reduction="sum")) == 2
    assert len(torch_linear_loss_grad(loss)(h, W, t, bias=b, grad_output=np.float64(2.0))) == 3
    assert seen == [["reduction"], ["bias"]]  # grad_output is the adapter's, never the loss's


@pytest.mark.parametrize("option", [{"softcap": 30.0}, {"lse_square_scale": 1e-4}])
def test_torch_default_loss_refuses_what_f_cross_entropy_cannot_compute(torch, option):
    h, W, _, t = _inputs()
    with pytest.raises(TypeError, match=f"torch's F.cross_entropy has no {next(iter(option))}="):
        torch_linear_loss_grad()(h, W, t, **option)


@pytest.mark.parametrize("config", list(OPTIONS))
def test_jax_adapter_passes_grad_output_as_the_cotangent(jax, config):
    h, W, b, t = _inputs(seed=5)
    options = OPTIONS[config]
    grad_fn = jax_linear_loss_grad(_jax_linear)
    ones = grad_fn(h, W, t, bias=b, **options)
    eights = grad_fn(h, W, t, bias=b, grad_output=_upstream(options, 8.0), **options)
    assert len(ones) == 3 and [g.shape for g in ones] == [h.shape, W.shape, b.shape]
    for one, eight in zip(ones, eights):
        assert np.array_equal(eight, 8 * one)


def test_jax_adapter_d_hidden_is_jaxs_logits_gradient_when_w_is_the_identity(jax):
    h, W, _, t = _inputs(seed=6, identity=True)
    d_hidden, _ = jax_linear_loss_grad(_jax_linear)(h, W, t, label_smoothing=0.25)
    expected = jax_loss_grad(_jax_cross_entropy)(h, t, label_smoothing=0.25)
    assert np.array_equal(d_hidden, expected)


def test_jax_adapter_per_example_applies_the_reduction(jax):
    def per_row(h, W, t):
        return _jax_cross_entropy(h @ W.T, t, reduction="none")

    h, W, _, t = _inputs(seed=7)
    grad_fn = jax_linear_loss_grad(per_row, accepts=(), per_example=True)
    mean, total = grad_fn(h, W, t), grad_fn(h, W, t, reduction="sum")
    for m, s in zip(mean, total):
        assert np.array_equal(m * N, s)  # the mean's 1/N = 1/8 is exact
    with pytest.raises(TypeError, match=r"takes the options \(\), got label_smoothing="):
        grad_fn(h, W, t, label_smoothing=0.1)


def test_adapters_are_public_and_lazy():
    import gradcheck

    assert gradcheck.torch_linear_loss_grad is torch_linear_loss_grad
    assert gradcheck.jax_linear_loss_grad is jax_linear_loss_grad
