"""The bug zoo through verify at default settings: every bug caught, every correct implementation passes."""

from __future__ import annotations

import pytest

from gradcheck import verify
from gradcheck.checking.result import FailureKind
from zoo import ZOO_BUGGY, ZOO_CORRECT, runs
from zoo_precision import PRECISION_BUGGY, PRECISION_CORRECT

BUGGY = {**ZOO_BUGGY, **PRECISION_BUGGY}
CORRECT = {**ZOO_CORRECT, **PRECISION_CORRECT}

SEED = 20240601

# jax compiles once per shape, so its full matrix (benchmarks/verify_zoo.py runs it) is too slow for the
# suite: here jax runs the default configuration in float32 and bfloat16, torch two configurations.
SUITE_ONLY = {"jax_autodiff": 1, "torch_autograd": 2, "torch_manual": 2}
SUITE_DTYPES = {"jax_autodiff": ("float32", "bfloat16")}


def _correct_runs() -> list[tuple[str, str, dict]]:
    out = []
    for name, dtype, config in runs(CORRECT):
        limit = SUITE_ONLY.get(name)
        if dtype not in SUITE_DTYPES.get(name, (dtype,)):
            continue
        if limit is None or CORRECT[name].configs.index(config) < limit:
            out.append((name, dtype, config))
    return out


def _id(run: tuple[str, str, dict]) -> str:
    name, dtype, config = run
    return f"{name}-{dtype}-" + ",".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("run", runs(BUGGY), ids=_id)
def test_every_bug_is_caught(run):
    name, dtype, config = run
    entry = BUGGY[name]
    result = verify(entry.fn, dtype=dtype, seed=SEED, **config)
    assert not result.passed, f"{name} ({entry.description}) passed verify in {dtype} with {config}"
    if entry.kind is not None:
        assert result.failure.kind == entry.kind, str(result)


@pytest.mark.parametrize("run", _correct_runs(), ids=_id)
def test_every_correct_implementation_passes(run):
    name, dtype, config = run
    entry = CORRECT[name]
    # an in-dtype implementation keeps the dtype's own contract; every other the default one
    precision = {"precision": dtype} if entry.in_dtype else {}
    result = verify(entry.fn, dtype=dtype, seed=SEED, **precision, **config)
    assert result.passed, str(result)
    assert result.grade is not None
    assert result.examples == 100
    assert 0.0 < result.worst_ratio <= 1.0


def test_zoo_is_large_enough():
    assert len(ZOO_BUGGY) >= 15
    assert {d for e in ZOO_CORRECT.values() for d in e.dtypes} == {"float64", "float32", "float16", "bfloat16"}
    kinds = {e.kind for e in ZOO_BUGGY.values()}
    assert {FailureKind.MUTATION, FailureKind.NONDETERMINISM, FailureKind.DTYPE, FailureKind.SHAPE} <= kinds
