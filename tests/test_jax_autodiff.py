"""Tests of the JAX estimators: scoped float64, compile caching, XLA accuracy, Jacobian and Hessian."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

import gradcheck
from gradcheck.dtypes import FLOAT64, float_format
from gradcheck.estimators import gradient
from gradcheck.estimators.jax_autodiff import (
    XLA_ELEMENTARY_ULPS,
    cross_entropy_hessian,
    jax_gradient,
    softmax_jacobian,
)
from gradcheck.problem import make_problem

SEED = 7


def problem(n=4, k=6, dtype=np.float64, **options):
    rng = np.random.default_rng(SEED)
    return make_problem(rng.normal(scale=3.0, size=(n, k)).astype(dtype), rng.integers(0, k, size=n), **options)


@pytest.mark.parametrize("method", ["jax_autodiff", "jax_autodiff_x64"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_call_leaves_the_x64_flag_as_it_found_it(method, dtype):
    z = np.zeros((2, 3), dtype=dtype)
    assert jax.config.jax_enable_x64 is False
    gradient(z, np.array([0, 1]), method=method)
    assert jax.config.jax_enable_x64 is False
    assert jnp.asarray(1.0).dtype == jnp.float32  # still the 32-bit default
    with jax.enable_x64(True):
        gradient(z, np.array([0, 1]), method=method)
        assert jax.config.jax_enable_x64 is True
    assert jax.config.jax_enable_x64 is False


def test_x64_result_is_float64_arithmetic_and_input_dtype_is_not():
    p = problem(dtype=np.float32)
    native = jax_gradient(p, x64=False)
    wide = jax_gradient(p, x64=True)
    assert native.details["dtype"] == "float32" and wide.details["dtype"] == "float64"
    truth = gradcheck.exact_grad(p.logits, p.targets, dtype="float64")
    # float32 arithmetic leaves errors near u32 = 6e-8; float64 arithmetic rounded once to float32
    # is within half a float32 ulp of the truth (its estimate), far below that
    assert np.max(np.abs(native.grad - truth)) > 1e-10
    assert np.all(np.abs(wide.grad.astype(np.float64) - truth) <= wide.error)


def test_compiles_once_per_shape_and_dtype_and_times_it_apart():
    p = problem(n=3, k=11, reduction="sum")
    first = jax_gradient(p)
    second = jax_gradient(problem(n=3, k=11, reduction="sum"))
    assert second.details["compile_seconds"] == 0.0 and second.details["call_seconds"] > 0
    assert first.details["compile_seconds"] > 0 or second.details["compile_seconds"] == 0.0
    other = jax_gradient(problem(n=3, k=12, reduction="sum"))
    assert other.details["compile_seconds"] > 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_xla_exp_and_log_are_within_the_assumed_ulps(dtype):
    fmt = float_format(dtype)
    x = np.linspace(-80.0, 30.0, 1201).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        got_exp = np.asarray(jax.jit(jnp.exp)(jnp.asarray(x))).astype(np.float64)
        y = np.linspace(0.01, 1e4, 1201).astype(dtype)
        got_log = np.asarray(jax.jit(jnp.log)(jnp.asarray(y))).astype(np.float64)
    ref_exp = np.array([float(mpmath.exp(mpmath.mpf(float(v)))) for v in x])
    ref_log = np.array([float(mpmath.log(mpmath.mpf(float(v)))) for v in y])
    live = ref_exp > fmt.tiny
    exp_u = np.max(np.abs(got_exp - ref_exp)[live] / (ref_exp[live] * fmt.unit_roundoff))
    log_u = np.max(np.abs(got_log - ref_log) / (np.abs(ref_log) * fmt.unit_roundoff))
    assert exp_u <= XLA_ELEMENTARY_ULPS and log_u <= XLA_ELEMENTARY_ULPS


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_softmax_jacobian_matches_diag_p_minus_ppT(mode):
    rng = np.random.default_rng(SEED)
    z = rng.normal(scale=2.0, size=(3, 5))
    jac = softmax_jacobian(z, mode=mode)
    ref = gradcheck.softmax_jacobian(z)
    p = gradcheck.softmax(z)
    s = z - z.max(axis=1, keepdims=True)
    u = FLOAT64.unit_roundoff
    # estimate: p_i and p_j each carry (|s| + c) u + gamma_K; products and the diagonal sum add a few u
    eps = (np.abs(s) + XLA_ELEMENTARY_ULPS) * u + 8 * u
    size = p[:, :, None] * (np.eye(5)[None] + p[:, None, :])
    allowed = (eps[:, :, None] + eps[:, None, :] + 8 * u) * size
    assert np.all(np.abs(jac - ref) <= allowed)
    assert softmax_jacobian(z[0], mode=mode).shape == (5, 5)


def test_hessian_blocks_match_the_oracle():
    p = problem(n=3, k=4, label_smoothing=0.1, weight=np.array([1.0, 2.0, 0.5, 1.5]))
    hess = cross_entropy_hessian(p)
    ref = gradcheck.cross_entropy_hessian(p.logits, p.targets, label_smoothing=0.1,
                                          weight=np.array([1.0, 2.0, 0.5, 1.5]))
    probs = gradcheck.softmax(p.logits)
    s = p.logits - p.logits.max(axis=1, keepdims=True)
    u = FLOAT64.unit_roundoff
    scale = ((p.dense_targets() * p.weights()).sum(axis=1) / p.divisor())[:, None, None]  # S_n / D
    eps = ((np.abs(s) + XLA_ELEMENTARY_ULPS) * u + 16 * u)
    size = probs[:, :, None] * (np.eye(4)[None] + probs[:, None, :])
    allowed = (eps[:, :, None] + eps[:, None, :] + 16 * u) * size * scale
    assert hess.shape == (3, 4, 4)
    assert np.all(np.abs(hess - ref) <= allowed)


# ---- the kernel options (issue 12) ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_xla_tanh_is_within_the_assumed_ulps(dtype):
    from gradcheck.estimators.jax_autodiff import XLA_TANH_ULPS

    fmt = float_format(dtype)
    x = np.concatenate([np.linspace(-25, 25, 4000), np.geomspace(1e-8, 25, 600), -np.geomspace(1e-30, 1e-3, 60)])
    x = x.astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        got = np.asarray(jax.jit(jnp.tanh)(jnp.asarray(x))).astype(np.float64)
    ref = np.array([float(mpmath.tanh(mpmath.mpf(float(v)))) for v in x])
    assert np.max(np.abs(got - ref) / (np.abs(ref) * fmt.unit_roundoff)) <= XLA_TANH_ULPS


def test_the_vjp_uses_each_rows_upstream_gradient():
    """Liger-Kernel #678 / TransformerEngine #2139: for reduction='none' row n's gradient is g_n dl_n/dz."""
    g = np.array([2.0, -0.5, 0.0, 3.0])
    p = problem(reduction="none", grad_output=g, softcap=5.0, lse_square_scale=0.1)
    ones = problem(reduction="none", softcap=5.0, lse_square_scale=0.1)
    r, base = jax_gradient(p, x64=True), jax_gradient(ones, x64=True)
    assert np.allclose(r.grad, g[:, None] * base.grad, rtol=1e-14, atol=0) and np.all(r.grad[2] == 0)
    assert not np.allclose(r.grad, g[0] * base.grad)  # not grad_output[0] for every row
    scalar = jax_gradient(problem(reduction="sum", grad_output=-0.75, lse_square_scale=0.1), x64=True)
    plain = jax_gradient(problem(reduction="sum", lse_square_scale=0.1), x64=True)
    assert np.allclose(scalar.grad, -0.75 * plain.grad, rtol=1e-14, atol=0)


def test_kernel_hessian_matches_the_proved_formula():
    """jax.hessian of sum g_n L_n with softcap and z-loss against the formula SymPy proves (kernel_hessian):
    g (S H / D + 2 lambda (p p^T + lse H) / Dz) chi chi^T - diag(2 t chi G / c), H = diag p - p p^T."""
    from gradcheck.estimators.terms import kernel_terms

    cap, lam = 2.5, 0.2
    p = problem(n=3, k=4, label_smoothing=0.1, weight=np.array([1.0, 2.0, 0.5, 1.5]), softcap=cap,
                lse_square_scale=lam, grad_output=-1.25)
    hess = cross_entropy_hessian(p)
    t = kernel_terms(p)
    eye = np.eye(4)[None]
    h = t.p[:, :, None] * eye - t.p[:, :, None] * t.p[:, None, :]
    dz = p.zloss_divisor()
    core = (t.s_rows[:, None, None] * h / t.d
            + 2 * lam * (t.p[:, :, None] * t.p[:, None, :] + t.lse[:, None, None] * h) / dz)
    zgrad = (t.p * t.s_rows[:, None] - t.wt) / t.d + 2 * lam * t.lse[:, None] * t.p / dz
    ref = -1.25 * (core * t.chi[:, :, None] * t.chi[:, None, :]
                   - eye * (2 * t.t * t.chi * zgrad / cap)[:, :, None])
    assert hess.shape == (3, 4, 4)
    assert np.allclose(hess, ref, rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(hess - cross_entropy_hessian(problem(n=3, k=4, label_smoothing=0.1,
                                                               weight=np.array([1.0, 2.0, 0.5, 1.5]))))) > 1e-2
