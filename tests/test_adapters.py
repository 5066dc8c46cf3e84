"""gradcheck/adapters.py: exact conversions to and from torch and JAX, and the four grad_fn wrappers.

The torch tests skip when torch is not installed (it is an optional dependency); likewise for JAX.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import gradcheck
from gradcheck import verify
from gradcheck.adapters import jax_grad_fn, jax_loss_grad, to_numpy, to_torch, torch_grad_fn, torch_loss_grad
from gradcheck.dtypes import bit_pattern, float_format
from zoo import _jax_cross_entropy

DTYPES = ("float64", "float32", "float16", "bfloat16")


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is not installed: the torch adapters are untested")


@pytest.fixture
def jax():
    return pytest.importorskip("jax", reason="jax is not installed: the JAX adapters are untested")


def _awkward(dtype: str) -> np.ndarray:
    """Values whose bits a sloppy conversion changes: signed zeros, infinities, NaN, subnormals, the extremes."""
    fmt = float_format(dtype)
    values = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.5, fmt.max, -fmt.max, fmt.tiny, fmt.smallest_subnormal, 1 / 3]
    return np.array(values, dtype=np.float64).astype(fmt.dtype)


def _case(dtype: str = "float64", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(5, 7)).astype(float_format(dtype).dtype)
    return logits, rng.integers(0, 7, size=5)


# --- to_numpy and to_torch ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_and_lists_pass_through_unchanged(dtype):
    x = _awkward(dtype)
    out = to_numpy(x)
    assert out.dtype == x.dtype and np.array_equal(bit_pattern(out), bit_pattern(x))
    assert to_numpy([[1.0, 2.0]]).tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_round_trip_keeps_every_bit_and_the_dtype(torch, dtype):
    x = _awkward(dtype)
    tensor = to_torch(x)
    assert str(tensor.dtype) == f"torch.{dtype}" and not tensor.requires_grad
    back = to_numpy(tensor)
    nan = np.isnan(x.astype(np.float64))
    assert back.dtype == x.dtype and np.array_equal(bit_pattern(back)[~nan], bit_pattern(x)[~nan])
    # NaN stays NaN; its sign and payload may not: torch converts every float32 NaN to bfloat16 0xFFFF
    assert np.isnan(back[nan].astype(np.float64)).all()


def test_to_torch_copies_and_makes_indices_int64(torch):
    x = np.array([1.0, 2.0])
    tensor = to_torch(x, requires_grad=True)
    assert tensor.requires_grad
    with torch.no_grad():
        tensor.mul_(3.0)
    assert x.tolist() == [1.0, 2.0]  # the caller's array is not shared
    indices = to_torch(np.array([2, 0, 1], dtype=np.int32))
    assert indices.dtype == torch.int64 and indices.tolist() == [2, 0, 1]


def test_to_numpy_detaches_and_resolves_lazy_negation(torch):
    z = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    assert to_numpy(z * 2).tolist() == [3.0, -4.0]
    assert to_numpy(torch._neg_view(torch.tensor([1.0, -3.0]))).tolist() == [-1.0, 3.0]


def test_to_numpy_keeps_bfloat16(torch):
    x = to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert str(x.dtype) == "bfloat16" and x.astype(np.float64).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_jax_arrays_become_numpy_of_the_same_dtype(jax, dtype):
    import jax.numpy as jnp

    x = _awkward(dtype)
    with jax.enable_x64(True):
        out = to_numpy(jnp.asarray(x))
    assert out.dtype == x.dtype and np.array_equal(bit_pattern(out), bit_pattern(x))


# --- torch wrappers -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_grad_fn_passes_tensors_of_the_checked_dtype(torch, dtype):
    seen = {}

    def probe(z, t, *, weight=None, **options):
        seen.update(z=z.dtype, t=t.dtype, weight=None if weight is None else weight.dtype, options=options)
        return z * 0

    wrapped = torch_grad_fn(probe)
    logits, targets = _case(dtype)
    weight = np.linspace(0.5, 2.0, 7).astype(float_format(dtype).dtype)
    out = wrapped(logits, targets, weight=weight, reduction="sum")
    assert seen == {"z": getattr(torch, dtype), "t": torch.int64, "weight": getattr(torch, dtype),
                    "options": {"reduction": "sum"}}
    assert out.dtype == logits.dtype and out.shape == logits.shape
    assert wrapped.__name__ == "probe"  # verify's messages and reproduction name the wrapped function


def test_torch_loss_grad_is_the_gradient_of_the_loss(torch):
    logits, targets = _case()
    weight = np.linspace(0.5, 2.0, 7)
    options = {"weight": weight, "label_smoothing": 0.1}
    got = torch_loss_grad()(logits, targets, **options)
    expected = gradcheck.cross_entropy_grad(logits, targets, **options)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    # per-row losses are summed before differentiating: the gradient of reduction="sum"
    summed = torch_loss_grad()(logits, targets, reduction="sum")
    np.testing.assert_array_equal(torch_loss_grad()(logits, targets, reduction="none"), summed)
    assert torch_loss_grad().__name__ == "torch_loss_grad(cross_entropy)"


def test_torch_loss_grad_takes_a_custom_loss(torch):
    def half_loss(z, t, **options):
        return 0.5 * torch.nn.functional.cross_entropy(z, t, **options)

    logits, targets = _case()
    got = torch_loss_grad(half_loss)(logits, targets)
    np.testing.assert_allclose(got, 0.5 * gradcheck.cross_entropy_grad(logits, targets), rtol=1e-12, atol=1e-15)
    assert torch_loss_grad(half_loss).__name__ == "torch_loss_grad(half_loss)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_adapters_through_verify(torch, dtype):
    # torch's autograd of F.cross_entropy computes in the dtype: it keeps the dtype's own contract
    assert verify(torch_loss_grad(), dtype=dtype, precision=dtype, seed=0, max_examples=25, weighted=True).passed

    def grad(z, t, **options):
        assert isinstance(z, torch.Tensor) and str(z.dtype) == f"torch.{dtype}"
        return torch.softmax(z, dim=1) - torch.nn.functional.one_hot(t, z.shape[1]).to(z.dtype)

    result = verify(torch_grad_fn(grad), dtype=dtype, precision=dtype, seed=0, max_examples=25, reduction="sum")
    assert result.passed, str(result)
    caught = verify(torch_grad_fn(grad), dtype=dtype, precision=dtype, seed=0, max_examples=25)  # forgot the mean
    assert not caught.passed


# --- JAX wrappers ---------------------------------------------------------------------------------

def test_jax_grad_fn_enables_x64_inside_the_call_only(jax):
    import jax.numpy as jnp

    seen = {}

    def probe(z, t, **options):
        seen.update(z=z.dtype, t=t.dtype)
        return jnp.zeros_like(z)

    wrapped = jax_grad_fn(probe)
    logits, targets = _case("float64")
    out = wrapped(logits, targets)
    assert seen == {"z": jnp.float64, "t": jnp.int64} and out.dtype == np.float64
    assert not jax.config.jax_enable_x64 and wrapped.__name__ == "probe"


def test_jax_loss_grad_compiles_once_per_static_options(jax):
    traces = []

    def loss(z, t, **options):
        traces.append(sorted(options))
        return _jax_cross_entropy(z, t, **options)

    grad_fn = jax_loss_grad(loss)
    logits, targets = _case("float64")
    weight = np.linspace(0.5, 2.0, 7)
    first = grad_fn(logits, targets, weight=weight)
    again = grad_fn(logits, targets, weight=weight[::-1].copy())  # weight is traced: no new compilation
    assert traces == [["weight"]]
    np.testing.assert_allclose(first, gradcheck.cross_entropy_grad(logits, targets, weight=weight),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(again, gradcheck.cross_entropy_grad(logits, targets, weight=weight[::-1]),
                               rtol=1e-12, atol=1e-15)
    grad_fn(logits, targets, reduction="sum")  # a new static option compiles again
    assert traces == [["weight"], ["reduction"]]
    assert grad_fn.__name__ == "jax_loss_grad(loss)" and not jax.config.jax_enable_x64
    assert isinstance(first, np.ndarray) and first.dtype == np.float64


def test_jax_adapters_through_verify(jax):
    import jax.numpy as jnp

    assert verify(jax_loss_grad(_jax_cross_entropy), dtype="float64", seed=0, max_examples=10,
                  max_shape=(4, 8)).passed

    def grad(z, t, **options):
        assert z.dtype == jnp.float64  # x64 is on inside the adapter
        return (jnp.exp(z - z.max(axis=1, keepdims=True)) / jnp.exp(z - z.max(axis=1, keepdims=True)).sum(
            axis=1, keepdims=True) - (jnp.arange(z.shape[1]) == t[:, None])) / z.shape[0]

    assert verify(jax_grad_fn(grad), seed=0, max_examples=10, max_shape=(4, 8), regimes=("moderate",)).passed


def test_jax_loss_grad_applies_the_reduction_to_per_example_losses(jax):
    optax = pytest.importorskip("optax", reason="optax is not installed: its losses are unchecked")
    grad = jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels, accepts=(), per_example=True)
    z, t = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]]), np.array([2, 0])
    assert np.allclose(grad(z, t), gradcheck.cross_entropy_grad(z, t), rtol=1e-12, atol=0)
    assert np.allclose(grad(z, t, reduction="sum"), gradcheck.cross_entropy_grad(z, t, reduction="sum"),
                       rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match=r"takes the options \(\), got weight="):
        grad(z, t, weight=np.ones(3))
    # through verify: optax's mean is torch's mean without weights and ignored rows
    assert verify(grad, max_examples=20, seed=0, reduction="sum").passed
    failed = verify(grad, max_examples=20, seed=0, weighted=True)
    assert not failed.passed and failed.failure.kind == "exception" and "got weight=" in failed.failure.message


def test_jax_loss_grad_without_per_example_sums_what_the_loss_returns(jax):
    optax = pytest.importorskip("optax", reason="optax is not installed: its losses are unchecked")
    grad = jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels)  # not told: the sum
    z, t = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]]), np.array([2, 0])
    assert np.allclose(grad(z, t), gradcheck.cross_entropy_grad(z, t, reduction="sum"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_adapters_create_inputs_on_the_device_and_bring_results_back(torch, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the cuda path runs where a GPU exists")
    seen = []

    def grad(z, t, **options):
        seen.append((z.device.type, t.device.type))
        return torch.softmax(z, dim=1) - torch.nn.functional.one_hot(t, z.shape[1]).to(z.dtype)

    result = verify(torch_grad_fn(grad, device=device), dtype="float32", reduction="sum", seed=0, max_examples=5)
    assert result.passed and set(seen) == {(device, device)}
    assert verify(torch_loss_grad(device=device), dtype="float64", seed=0, max_examples=5, weighted=True).passed


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_jax_adapters_put_inputs_on_the_device(jax, device):
    if device == "gpu" and not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("no GPU for jax here: the gpu path runs where one exists")
    seen = []

    def grad(z, t, **options):
        seen.append({d.platform for d in z.devices()})
        return jax.nn.softmax(z, axis=1) - jax.nn.one_hot(t, z.shape[1], dtype=z.dtype)

    result = verify(jax_grad_fn(grad, device=device), dtype="float32", reduction="sum", seed=0, max_examples=5)
    assert result.passed and all(s == {device} for s in seen)
    loss = jax_loss_grad(_jax_cross_entropy, device=jax.devices(device)[0])
    assert verify(loss, dtype="float32", seed=0, max_examples=5).passed


def test_jax_loss_grad_is_the_vjp_with_grad_output(jax):
    optax = pytest.importorskip("optax", reason="optax is not installed: its losses are unchecked")
    grad = jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels, accepts=(), per_example=True)
    z, t = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]]), np.array([2, 0])
    for reduction in ("mean", "sum"):
        got = grad(z, t, reduction=reduction, grad_output=np.array(-2.5))
        np.testing.assert_allclose(got, -2.5 * gradcheck.cross_entropy_grad(z, t, reduction=reduction), rtol=1e-12)
    per_row = np.array([3.0, -0.5])
    got = grad(z, t, reduction="none", grad_output=per_row)
    np.testing.assert_allclose(got, per_row[:, None] * gradcheck.cross_entropy_grad(z, t, reduction="none"), rtol=1e-12)
    np.testing.assert_array_equal(grad(z, t, reduction="none"), grad(z, t, reduction="none", grad_output=np.ones(2)))


def test_jax_grad_fn_passes_grad_output_to_a_function_that_names_it(jax):
    seen = {}

    def fn(z, t, *, grad_output=None, **options):
        seen["g"] = grad_output
        return jax.numpy.zeros_like(z)

    wrapped = jax_grad_fn(fn)
    wrapped(np.zeros((2, 3)), np.array([0, 1]), grad_output=np.array(2.0))
    assert float(seen["g"]) == 2.0 and "grad_output" in inspect.signature(wrapped).parameters


def test_jax_adapters_draw_few_shapes_each_compiled_once(jax):
    from gradcheck.strategies import shape_buckets

    shapes = []

    def loss(z, t, **options):
        shapes.append(z.shape)  # runs once per compilation
        return _jax_cross_entropy(z, t, **options)

    grad_fn = jax_loss_grad(loss)
    assert grad_fn.compiles_per_shape and jax_grad_fn(loss).compiles_per_shape
    result = verify(grad_fn, dtype="float32", seed=0, max_examples=40, max_shape=(32, 512))
    assert result.passed and result.examples == 40
    assert set(shapes) <= set(shape_buckets((32, 512))) and len(shapes) == len(set(shapes)) <= 7  # 7 buckets within (32, 512)
    asked = verify(grad_fn, dtype="float32", seed=0, max_examples=5, shapes=[(5, 11)])  # shapes= overrides them
    assert asked.passed and shapes[-1] == (5, 11)
