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


# ---- the kernel zoo (issue 12): z-loss, softcap and the upstream gradient -------------------------

from gradcheck.checking.messages import describe  # noqa: E402
from zoo_kernel import DONE, KERNEL_BUGGY, KERNEL_CORRECT  # noqa: E402

# bugs that are not bugs under reduction="none" (there D = Dz = 1), so not under the done criterion's config
MEAN_ONLY = {"zloss_over_D", "zloss_over_all_rows"}
# bugs that verify's diagnosis names (gradcheck/checking/diagnose.py), with the words it uses
DIAGNOSED = {"liger_678": "grad_output was ignored", "te_2139": "grad_output[0] for every row",
             "grad_output_twice": "grad_output applied twice"}
KERNEL_SUITE = {"torch_kernel": 3}  # torch's configurations run in the suite (all in benchmarks/verify_zoo.py)
# in float64 kernel_native computes exactly what kernel_f64 does (float64 inside): run once in the suite
KERNEL_SAME = {("kernel_native", "float64")}


def _kernel_correct_runs() -> list[tuple[str, str, dict]]:
    return [(name, dtype, config) for name, dtype, config in runs(KERNEL_CORRECT)
            if KERNEL_CORRECT[name].configs.index(config) < KERNEL_SUITE.get(name, len(KERNEL_CORRECT[name].configs))
            and (name, dtype) not in KERNEL_SAME]


@pytest.mark.parametrize("run", runs(KERNEL_BUGGY), ids=_id)
def test_every_kernel_bug_is_caught_at_default_settings(run):
    name, dtype, config = run
    entry = KERNEL_BUGGY[name]
    result = verify(entry.fn, dtype=dtype, seed=SEED, **config)
    assert not result.passed, f"{name} ({entry.description}) passed verify in {dtype} with {config}"
    assert result.upstream and result.failure.kind == FailureKind.MISMATCH, str(result)
    if name in DIAGNOSED:
        assert DIAGNOSED[name] in (result.failure.diagnosis or ""), str(result)


@pytest.mark.parametrize("run", _kernel_correct_runs(), ids=_id)
def test_every_correct_kernel_passes_with_every_option_combination(run):
    name, dtype, config = run
    entry = KERNEL_CORRECT[name]
    precision = {"precision": dtype} if entry.in_dtype else {}
    result = verify(entry.fn, dtype=dtype, seed=SEED, **precision, **config)
    assert result.passed, str(result)
    assert result.upstream and result.examples == 100 and result.grade is not None
    assert 0.0 < result.worst_ratio <= 1.0


@pytest.mark.parametrize("name", sorted(set(KERNEL_BUGGY) - MEAN_ONLY))
def test_done_criterion_every_kernel_bug_fails_in_bfloat16_and_is_named(name):
    """verify(kernel, lse_square_scale=1e-4, softcap=30.0, label_smoothing=0.1, weighted=True,
    ignore_index=-100, reduction="none", dtype="bfloat16") fails for each bug, with a message that says
    what is wrong (and, for the upstream gradient's bugs, which convention the result matches)."""
    entry = KERNEL_BUGGY[name]
    result = verify(entry.fn, dtype="bfloat16", seed=SEED, **DONE)
    assert not result.passed, f"{name} ({entry.description}) passed the done criterion"
    message = describe(result)
    assert f"zoo_kernel.{name} is wrong (mismatch)" in message and "grad_output = np.array(" in message
    if name in DIAGNOSED:
        assert "diagnosis: it matches" in message and DIAGNOSED[name] in message, message


def test_done_criterion_the_correct_float32_inside_kernel_passes_in_bfloat16():
    result = verify(KERNEL_CORRECT["kernel_native"].fn, dtype="bfloat16", seed=SEED, **DONE)
    assert result.passed and result.upstream and result.grade in ("exact", "float64", "float32"), str(result)


def test_kernel_zoo_covers_the_shipped_bugs_and_every_option():
    assert {"liger_678", "te_2139", "liger_zloss_smoothing", "unsloth_593"} <= set(KERNEL_BUGGY)
    assert len(KERNEL_BUGGY) >= 12
    configs = [c for e in KERNEL_CORRECT.values() for c in e.configs]
    for option in ("lse_square_scale", "softcap", "label_smoothing", "weighted", "ignore_index", "targets"):
        assert any(option in c for c in configs), option
    assert {c.get("reduction", "mean") for c in configs} == {"mean", "sum", "none"}
