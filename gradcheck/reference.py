"""The reference verify compares with: a gradient and a bound on its distance to the truth (docs/tolerance.md, "The reference")."""

from __future__ import annotations

import numpy as np

from gradcheck.dtypes import EXTENDED
from gradcheck.oracle import RowParts, grad_bounded, row_parts
from gradcheck.problem import Problem
from gradcheck.tolerance import Implementation, element_bound, tree_depth


def reference_grad(problem: Problem, parts: RowParts | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A reference gradient and a bound on its distance to the truth, per element (docs/tolerance.md,
    "The reference").

    For float32 and narrower: the float64 oracle and its rigorous running error bound. For float64:
    the direct formula evaluated in x87 extended precision (``np.longdouble``, u = 2**-64) and bounded
    by :func:`element_bound` with that u, so that the reference's uncertainty is about 2**-11 of the
    float64 tolerance. On platforms without extended precision the float64 oracle is used.

    Returns:
        (reference, bound): reference in float64 or longdouble, bound in float64, both ``(N, K)``.
    """
    if problem.format.precision < 53 or EXTENDED is None:
        return grad_bounded(problem)
    parts = row_parts(problem.logits) if parts is None else parts
    ld = np.longdouble
    z = problem.logits.astype(ld)
    k = z.shape[1]
    with np.errstate(under="ignore", invalid="ignore"):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        wt = problem.dense_targets(ld) * problem.weights().astype(ld)
        g = (p * wt.sum(axis=1, keepdims=True) - wt) / problem.divisor(ld)
    working = Implementation("longdouble reference", EXTENDED, tree_depth(k), EXTENDED.tiny)
    return g, element_bound(problem, parts, working)
