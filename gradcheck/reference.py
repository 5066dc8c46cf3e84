"""The reference verify compares with: a gradient and a bound on its distance to the truth (docs/tolerance.md, "The reference")."""

from __future__ import annotations

import numpy as np

from gradcheck.dtypes import EXTENDED
from gradcheck.oracle import RowParts, grad_bounded, row_parts
from gradcheck.problem import Problem
from gradcheck.tolerance import Implementation, capped_rows, element_bound, tree_depth


def by_rows(problem: Problem) -> bool:
    """Whether :func:`reference_grad` can evaluate a block of rows alone (``rows=``): the float64
    reference can; the narrower formats' is the oracle's, evaluated whole (in blocks inside)."""
    return problem.format.precision >= 53 and EXTENDED is not None


def reference_grad(problem: Problem, parts: RowParts | None = None, *,
                   rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A reference gradient and a bound on its distance to the truth, per element (docs/tolerance.md,
    "The reference").

    For float32 and narrower: the float64 oracle and its rigorous running error bound. For float64:
    the direct formula evaluated in x87 extended precision (``np.longdouble``, u = 2**-64) and bounded
    by :func:`element_bound` with that u, so that the reference's uncertainty is about 2**-11 of the
    float64 tolerance. On platforms without extended precision the float64 oracle is used. The
    kernel options and the upstream gradient are part of both (softcap, z-loss, ``grad_output``);
    under softcapping ``parts`` is recomputed from the capped logits.

    ``rows`` (only where :func:`by_rows`): the block of rows ``lo:hi`` alone, ``parts`` then being
    those rows' (or None); every quantity but D and the z-loss divisor is per row, so the values are
    the whole evaluation's rows, bit for bit (docs/tolerance.md, "Evaluation by row blocks").

    Returns:
        (reference, bound): reference in float64 or longdouble, bound in float64, both ``(N, K)``.
    """
    if not by_rows(problem):
        if rows is not None:
            raise ValueError(f"the {problem.format.name} reference is evaluated whole, got rows={rows}")
        return grad_bounded(problem)
    block = slice(0, problem.n) if rows is None else rows
    if parts is None or problem.softcap is not None:
        parts = row_parts(capped_rows(problem, rows))
    ld = np.longdouble
    z = problem.logits[block].astype(ld)
    k = z.shape[1]
    with np.errstate(under="ignore", invalid="ignore", over="ignore"):
        if problem.softcap is not None:
            c = ld(problem.softcap)
            z = c * np.tanh(z / c)
        m = z.max(axis=1, keepdims=True)
        e = np.exp(z - m)
        total = e.sum(axis=1, keepdims=True)
        p = e / total
        wt = problem.dense_targets(ld, rows=block) * problem.weights().astype(ld)
        g = (p * wt.sum(axis=1, keepdims=True) - wt) / problem.divisor(ld)
        if problem.lse_square_scale:  # + 2 lambda lse p / D_z on counted rows (docs/oracle.md, "Kernel options")
            lse = m + np.log(total)
            coef = ld(2 * problem.lse_square_scale) * lse / ld(problem.zloss_divisor())
            g = g + np.where(problem.active_rows()[block][:, None], coef * p, ld(0))
        if problem.grad_output is not None:
            g = g * problem.upstream()[block].astype(ld)[:, None]
        if problem.softcap is not None:  # times 1 - tanh^2(z / c) = 4 e / (1 + e)^2, e = exp(-2 |z / c|)
            x = np.abs(problem.logits[block].astype(ld) / ld(problem.softcap))
            ex = np.exp(-2 * x)
            g = g * (4 * ex / ((1 + ex) * (1 + ex)))
    working = Implementation("longdouble reference", EXTENDED, tree_depth(k), EXTENDED.tiny)
    return g, element_bound(problem, parts, working, rows=rows)
