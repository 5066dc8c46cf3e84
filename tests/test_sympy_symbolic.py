"""Tests of the SymPy proofs (decision, cache, time bound) and of SymPy as a numerical method."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import sympy as sp

import gradcheck
from gradcheck.errors import InvalidArgument
from gradcheck.estimators import Status, gradient
from gradcheck.estimators.sympy_symbolic import DEFAULT_KINDS, MAX_K, _is_zero, cache_dir, prove, prove_all


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCHECK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("k_max", [pytest.param(4), pytest.param(8, marks=pytest.mark.slow)])
def test_every_identity_is_proved_and_then_cached(private_cache, k_max):
    first = prove_all(k_max)
    assert len(first) == k_max * len(DEFAULT_KINDS)
    assert all(p.proved and not p.cached for p in first), [p for p in first if not p.proved]
    files = sorted((private_cache / "sympy_proofs").glob("*.json"))
    assert len(files) == len(first)
    assert json.loads(files[0].read_text())["status"] == "proved"
    start = time.perf_counter()
    second = prove_all(k_max)
    assert all(p.proved and p.cached for p in second)
    assert [p.seconds for p in second] == [p.seconds for p in first]  # the recorded proof times
    assert time.perf_counter() - start < sum(p.seconds for p in first)


def test_cache_dir_follows_the_environment(private_cache):
    assert cache_dir() == private_cache


def test_the_decision_refutes_a_wrong_closed_form():
    z = sp.symbols("z0:3", real=True)
    w = sp.symbols("w0:3", positive=True)
    total = sum(sp.exp(x) for x in z)
    loss = -sum(w[c] * sp.log(sp.exp(z[c]) / total) for c in range(3))
    p0 = sp.exp(z[0]) / total
    assert _is_zero(sp.diff(loss, z[0]) - (p0 * sum(w) - w[0]), z)
    assert not _is_zero(sp.diff(loss, z[0]) - (p0 - w[0]), z)  # forgets the weights
    assert not _is_zero(sp.diff(p0, z[1]) - p0 * sp.exp(z[1]) / total, z)  # wrong sign


def test_a_proof_is_time_bounded_and_a_timeout_is_not_cached(private_cache):
    result = prove("gradient", 8, timeout=0.0)
    assert result.status == "timeout" and not result.proved
    assert not (private_cache / "sympy_proofs").exists()


def test_bad_arguments_are_named():
    with pytest.raises(InvalidArgument, match="kind must be one of .*got 'hessian'"):
        prove("hessian", 2)
    with pytest.raises(InvalidArgument, match="k must be an integer >= 1, got 0"):
        prove("gradient", 0)
    with pytest.raises(InvalidArgument, match="module must be 'numpy' or 'mpmath'"):
        from gradcheck.estimators.sympy_symbolic import sympy_gradient
        from gradcheck.problem import make_problem
        sympy_gradient(make_problem(np.zeros((1, 2)), np.array([0])), module="cupy")


def test_too_many_classes_is_unsupported_not_slow():
    r = gradient(np.zeros((1, MAX_K + 1)), np.array([0]), method="sympy_numpy")
    assert r.status is Status.UNSUPPORTED and f"K <= {MAX_K}" in r.reason


def test_mpmath_numerics_are_correctly_rounded_on_a_cancelling_case():
    # one-hot target on the argmax with a gap of 200: g_t = -(1 - p_t) ~ -1.7e-87 cancels in p_t - 1,
    # below what 2p + 20 = 126 bits resolve, so the precision must grow
    z = np.array([[200.0, 0.0, -1.0]])
    r = gradient(z, np.array([0]), method="sympy_mpmath")
    truth = gradcheck.exact_grad(z, np.array([0]))
    assert r.status is Status.CONVERGED and r.details["max_precision"] > 126
    assert np.all(gradcheck.ulp_distance(r.grad, truth) <= 1)
    numpy_result = gradient(z, np.array([0]), method="sympy_numpy")
    assert gradcheck.ulp_distance(numpy_result.grad, truth).max() > 1e6  # the float64 form cancels
    assert np.all(np.abs(numpy_result.grad - truth) <= numpy_result.error)  # and says so


@pytest.mark.parametrize("corrupt", [b"[]", b"null", b"{", b"\xff\xfe garbage", b'{"status": "proved", "seconds": null}',
                                     b'{"status": "bogus", "seconds": 1.0}', b'{"status": "proved"}',
                                     b'{"status": "proved", "seconds": -1}', b"[" * 100_000, "folder"])
def test_a_corrupt_cache_entry_is_recomputed_and_overwritten(private_cache, corrupt):
    prove("gradient", 1)
    (entry,) = (private_cache / "sympy_proofs").glob("gradient_k1_*.json")
    entry.unlink()
    if corrupt == "folder":
        (entry / "inside").mkdir(parents=True)
    else:
        entry.write_bytes(corrupt)
    redone = prove("gradient", 1)
    assert redone.proved and not redone.cached
    assert json.loads(entry.read_text())["status"] == "proved"  # overwritten with a good entry
    assert prove("gradient", 1).cached
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary file left
