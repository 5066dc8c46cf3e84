"""The precision contract each real library's cross-entropy gradient keeps, measured (issue 11, item 4).

Each test verifies under the loosest contract (``precision=dtype``) with a fixed seed and states the
grade measured: the tightest contract met on every example. The libraries and their conventions are
benchmarks/grades.py's catalogue (its docstring cites the sources); benchmarks/grades.py prints the
same table with 200 examples (benchmarks/RESULTS.md, "Grades of real libraries").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import grades  # noqa: E402

import gradcheck  # noqa: E402
from gradcheck.adapters import jax_loss_grad  # noqa: E402

SEED = 11
TORCH = {"max_examples": 30, "max_shape": (16, 64), "seed": SEED}
JAX = {"max_examples": 10, "max_shape": (8, 32), "seed": SEED}  # jax compiles once per shape
KERAS_K1 = pytest.mark.filterwarnings(
    "ignore:In loss categorical_crossentropy, expected y_pred.shape:SyntaxWarning")  # K = 1 rows are valid


def _library(name: str) -> grades.Library:
    (library,) = [lib for lib in grades.LIBRARIES if lib.name == name]
    return library


def _measure(library: grades.Library, dtype: str, options: dict, settings: dict):
    result = grades.grade(library, dtype, options, **settings)
    assert result.passed, result  # the dtype's own contract: every library here meets it (or says why not)
    return result


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("jax", reason="keras on the JAX backend needs jax (pip install -e '.[jax]')")
    try:
        return grades.import_keras()
    except ImportError as exc:
        pytest.skip(f"keras 3 on the JAX backend cannot be imported: {exc}")


# torch CPU autograd computes in the dtype: in float16 and bfloat16 it meets the dtype's own contract
# only (hundreds of times the float32 contract's tolerance on confident rows), in float32 and float64
# that dtype's model.
@pytest.mark.parametrize("config", list(grades.TORCH_OPTIONS))
@pytest.mark.parametrize("dtype", grades.DTYPES)
def test_torch_autograd_computes_in_the_dtype(dtype, config):
    pytest.importorskip("torch", reason="torch is not installed (optional extra: pip install -e '.[torch]')")
    result = _measure(_library("torch autograd F.cross_entropy"), dtype, grades.TORCH_OPTIONS[config], TORCH)
    assert result.grade == dtype, result
    if dtype in grades.HALF:
        assert result.contract_ratios["float32"] > 50, result.contract_ratios


# Upcasting to float32 and rounding the gradient once meets the float32 contract in every option;
# several configurations are even correctly rounded on these examples (grade "exact").
@pytest.mark.parametrize("config", list(grades.TORCH_OPTIONS))
@pytest.mark.parametrize("dtype", grades.HALF)
def test_torch_float32_inside_keeps_the_float32_contract(dtype, config):
    pytest.importorskip("torch", reason="torch is not installed (optional extra: pip install -e '.[torch]')")
    result = _measure(_library("torch F.cross_entropy(logits.float()), rounded once"), dtype, grades.TORCH_OPTIONS[config], TORCH)
    assert result.grade != dtype and result.contract_ratios["float32"] <= 1.0, result  # it keeps the float32 contract
    assert result.contract_ratios["float32"] <= 1.0
    # the last rounding is all that is left: about half an ULP of the dtype, the float32 part is slack
    assert result.contract_ratios["float32"] > 0.9, result.contract_ratios


OPTAX = [(lib.name, config) for lib in grades.LIBRARIES if lib.name.startswith("optax") for config in lib.options]


# jax.grad of optax's losses is a log_softmax in the dtype: the dtype's contract, in every dtype.
@pytest.mark.parametrize(("name", "config"), OPTAX)
@pytest.mark.parametrize("dtype", grades.DTYPES)
def test_optax_computes_in_the_dtype(dtype, name, config):
    pytest.importorskip("optax", reason="optax is not installed (test extra: pip install -e '.[test]')")
    library = _library(name)
    result = _measure(library, dtype, library.options[config], JAX)
    assert result.grade == dtype, result


# keras losses compute in keras.config.floatx() (float32) whatever the inputs: half inputs get the
# float32 contract (often correctly rounded), float64 inputs are computed in float32 and fail float64's
# own contract by about 1e7 times its tolerance. That is keras's documented convention (Loss(dtype=None)
# means floatx), not a wrong formula: asked to compute in float64 (dtype="float64") keras meets it.
KERAS = {"CategoricalCrossentropy(from_logits=True)": {"targets": "probs"},
         "SparseCategoricalCrossentropy(from_logits=True)": {}}


@KERAS_K1
@pytest.mark.parametrize("name", list(KERAS))
@pytest.mark.parametrize("dtype", grades.DTYPES)
def test_keras_computes_in_float32(keras, dtype, name):
    library = _library(f"keras {name}")
    result = grades.grade(library, dtype, KERAS[name], **JAX)
    if dtype == "float64":
        assert result.grade is None and not result.passed, result
        assert result.contract_ratios["float64"] > 1e6, result.contract_ratios
        assert "differs from the truth by" in result.failure.message
        return
    assert result.passed, result
    if dtype in grades.HALF:  # keras casts to float32 (floatx): it keeps the float32 contract of half inputs
        assert result.grade != dtype and result.contract_ratios["float32"] <= 1.0, result
    else:
        assert result.grade == "float32", result


@KERAS_K1
@pytest.mark.parametrize("name", list(KERAS))
def test_keras_asked_for_float64_keeps_the_float64_contract(keras, name):
    library = _library(f"keras {name[:-1]}, dtype='float64')")
    result = _measure(library, "float64", KERAS[name], JAX)
    assert result.grade == "float64", result


@KERAS_K1
def test_keras_sum_over_batch_size_is_the_mean(keras):
    """keras's default reduction is the mean over rows: the same loss checked as reduction="sum" fails."""

    def default_reduction(logits, targets, reduction="mean"):  # ignores the reduction asked
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)(targets, logits)

    grad_fn = jax_loss_grad(default_reduction, accepts=("reduction",))
    assert gradcheck.verify(grad_fn, dtype="float32", **JAX).passed
    caught = gradcheck.verify(grad_fn, dtype="float32", reduction="sum", **JAX)
    assert not caught.passed and caught.failure.kind == "mismatch", caught
