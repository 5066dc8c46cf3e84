"""Tests of SymPy as a numerical method (sympy_numpy, sympy_mpmath); the proofs are in test_sympy_proofs.py."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from gradcheck.errors import InvalidArgument
from gradcheck.estimators import Status, gradient
from gradcheck.estimators import sympy_proofs, sympy_symbolic
from gradcheck.estimators.sympy_symbolic import MAX_K, sympy_gradient
from gradcheck.problem import make_problem


def test_the_proofs_names_are_still_importable_from_here():
    for name in ("KINDS", "DEFAULT_KINDS", "Proof", "prove", "prove_all", "cache_dir", "decide"):
        assert getattr(sympy_symbolic, name) is getattr(sympy_proofs, name)


def test_a_bad_module_is_named():
    with pytest.raises(InvalidArgument, match="module must be 'numpy' or 'mpmath'"):
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
