"""The reference verify compares with: within its bound of the truth, the bound negligible beside the tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck import exact_grad, make_problem
from gradcheck.dtypes import EXTENDED
from gradcheck.oracle import grad_bounded
from gradcheck.reference import reference_grad
from gradcheck.tolerance import grad_tolerance


@pytest.mark.skipif(EXTENDED is None, reason="no extended precision long double on this platform")
def test_float64_reference_is_within_its_bound_and_the_bound_is_negligible():
    rng = np.random.default_rng(11)
    for z, t in ((rng.standard_normal((5, 40)), rng.integers(0, 40, 5)),
                 (rng.standard_normal((3, 6)) * 200, rng.integers(0, 6, 3))):
        problem = make_problem(z, t, label_smoothing=0.1, weight=rng.uniform(0.1, 2, z.shape[1]))
        ref, bound = reference_grad(problem)
        truth = exact_grad(z, t, label_smoothing=0.1, weight=problem.weight)
        # the truth rounded to float64 is within half an ulp of the truth
        assert np.all(np.abs(ref.astype(np.float64) - truth) <= bound + np.spacing(np.abs(truth)))
        assert np.max(bound / grad_tolerance(problem)) < 1e-3


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_narrower_dtypes_use_the_oracle_and_its_rigorous_bound(dtype):
    rng = np.random.default_rng(3)
    problem = make_problem(rng.standard_normal((4, 9)).astype(np.float32).astype(dtype), rng.integers(0, 9, 4))
    ref, bound = reference_grad(problem)
    expected, expected_bound = grad_bounded(problem)
    assert np.array_equal(ref, expected) and np.array_equal(bound, expected_bound)
    truth = exact_grad(problem.logits, problem.targets, dtype="float64")
    assert np.all(np.abs(ref - truth) <= bound + np.spacing(np.abs(truth)))


@pytest.mark.skipif(EXTENDED is None, reason="no extended precision long double on this platform")
def test_float64_reference_with_kernel_options_is_within_its_bound_of_the_mpmath_truth():
    """softcap, z-loss and grad_output in the longdouble reference: within its bound of an independent
    mpmath evaluation (tests/test_oracle.py), and the bound is still negligible beside the tolerance."""
    from test_oracle import independent_kernel, worst_ratio_ld

    rng = np.random.default_rng(12)
    for opts in ({"softcap": 30.0, "lse_square_scale": 1e-4, "grad_output": -1.5},
                 {"softcap": 0.5, "label_smoothing": 0.1, "reduction": "none", "grad_output": np.array([2.0, 0.0, -0.5])},
                 {"lse_square_scale": 0.5, "weight": np.array([1.0, -0.5, 2.0, 0.25, 1.5]), "reduction": "sum"}):
        z = rng.standard_normal((3, 5)) * 40 + 100
        t = np.array([0, -100, 4])
        problem = make_problem(z, t, **opts)
        ref, bound = reference_grad(problem)
        assert worst_ratio_ld(ref, bound.astype(np.longdouble), independent_kernel(problem)[0]) <= 1.0
        assert np.max(bound / grad_tolerance(problem)) < 1e-2


@pytest.mark.skipif(EXTENDED is None, reason="no extended precision long double on this platform")
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0}, {"lse_square_scale": 0.01}, {"ignore_index": 3},
                                     {"label_smoothing": 0.1, "weight": np.linspace(-0.5, 2.0, 37)},
                                     {"reduction": "none", "grad_output": np.linspace(-2.0, 3.0, 23)}])
def test_the_float64_reference_of_a_block_of_rows_is_the_whole_ones_bit_for_bit(options):
    from gradcheck.oracle import row_parts
    from gradcheck.reference import by_rows
    from gradcheck.tolerance import row_blocks

    rng = np.random.default_rng(3)
    z = rng.standard_normal((23, 37)) * 4
    z[2, 5] = -np.inf
    p = make_problem(z, rng.integers(0, 37, 23), **options)
    assert by_rows(p) and not by_rows(make_problem(z.astype(np.float32), p.targets))
    ref, bound = reference_grad(p)
    for rows in row_blocks(p.n, p.k, 3 * 37):
        r, b = reference_grad(p, row_parts(p.logits[rows]), rows=rows)
        assert np.array_equal(r, ref[rows]) and np.array_equal(np.signbit(r), np.signbit(ref[rows]))
        assert b.tobytes() == bound[rows].tobytes()
    with pytest.raises(ValueError, match="evaluated whole"):
        reference_grad(make_problem(z.astype(np.float32), p.targets), rows=slice(0, 1))
