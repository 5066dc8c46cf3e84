"""The error model: how far a correct implementation's gradient may be from the truth, per element.

Every constant and term here is derived in docs/tolerance.md; the section is named next to each.
The bound covers any implementation built from these schemes (docs/tolerance.md, "Implementations
covered"):

* the direct formula ``p = exp(z - m) / sum exp(z - m)``, ``g = (p S - w t) / D``;
* the log-space formula ``p = exp(z - m - log sum exp(z - m))`` (torch and JAX autodiff);
* blocked online softmax (a running max and sum carried across tiles of at least ``TILE`` classes);

computed in the checked dtype with tree (pairwise) reductions, or in float32 (half precisions) or in
the dtype itself with tiles, and rounded once to the dtype at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from gradcheck.dtypes import FLOAT32, FLOAT64, FloatFormat, float_format
from gradcheck.errors import InvalidArgument
from gradcheck.oracle import RowParts, capped_logits, gamma, grad_rows, row_parts
from gradcheck.problem import Problem

# docs/tolerance.md, "Elementary functions": relative error of exp and log in units of u.
# numpy's SIMD float32 exp and log are documented within 2.52 and 3.83 ULP; one ULP is at most 2u.
# glibc, Sleef (torch) and XLA are more accurate (measured <= 1.4u); ml_dtypes and numpy's float16
# round a float32 result once (<= 1u + float32 error).
EXP_U = 6.0
LOG_U = 8.0
# docs/tolerance.md, "Kernel options": relative error of tanh in units of u. numpy's validation set holds
# float32 and float64 tanh to 2 ULP; Eigen's float32 ptanh (the rational approximation XLA's CPU tanh is
# modelled on) was up to 6 ULP before Eigen MR 2082; 6 ULP = 12 u.
TANH_U = 12.0
# docs/tolerance.md, "Blocked online softmax": the smallest tile the model accepts.
TILE = 64
# docs/tolerance.md, "Underflow floor": roundings of element i whose result can underflow.
UNDERFLOW_ROUNDINGS = 8


@dataclass(frozen=True)
class Implementation:
    """One implementation class: the precision it computes in and the depth of its row sums.

    Attributes:
        name: label used in docs and diagnostics.
        fmt: the working format (its unit roundoff u is the per-operation error).
        depth: the number of additions a term of a row sum passes through, plus the carries of a
            blocked kernel, in units of u (docs/tolerance.md, "Row sums").
        floor_unit: absolute error of one rounding that underflows (tiny when the platform may
            flush subnormals to zero, half the smallest subnormal otherwise).
    """

    name: str
    fmt: FloatFormat
    depth: float
    floor_unit: float


def tree_depth(k: int) -> int:
    """Depth of a pairwise (tree) sum of k terms: ceil(log2 k)."""
    return max(0, math.ceil(math.log2(k))) if k > 1 else 0


def tiled_depth(k: int) -> float:
    """Depth of a blocked online sum: a tree inside a tile, then one carry per further tile.

    Each carry rescales the running sum by ``exp(m_old - m_new)`` and adds the tile's sum:
    EXP_U for the exp, one rounding each for the product and the addition (docs/tolerance.md,
    "Blocked online softmax"); the ``|m_old - m_new|`` part of the rescale is charged per term.
    """
    tiles = -(-k // TILE)
    return tree_depth(min(k, TILE)) + (EXP_U + 2.0) * (tiles - 1)


def workings(fmt: FloatFormat, k: int) -> tuple[Implementation, ...]:
    """The implementation classes of the dtype's own contract, the loosest (docs/tolerance.md)."""
    return implementations(fmt, k, fmt.name)


def contracts(fmt: FloatFormat) -> tuple[str, ...]:
    """The precision contracts for a dtype, tightest first: "exact", then each working precision from
    float64 down to the dtype itself (docs/tolerance.md, "Precision contracts").

    >>> contracts(float_format("bfloat16"))
    ('exact', 'float64', 'float32', 'bfloat16')
    """
    wider = tuple(f.name for f in (FLOAT64, FLOAT32) if f.precision > fmt.precision)
    return ("exact", *wider, fmt.name)


def resolve_contract(fmt: FloatFormat, precision: str | None, *, where: str, fix: str = "") -> str:
    """The contract checked for a dtype: ``precision``, or :func:`default_contract` when None.

    Raises:
        InvalidArgument: a precision narrower than the dtype (no implementation of the dtype computes
            in it), naming ``where`` it was asked and, when given, ``fix``.
    """
    asked = default_contract(fmt) if precision is None else precision
    if asked not in contracts(fmt):
        raise InvalidArgument(f"precision must be one of {contracts(fmt)} for {where}, got {asked!r}: a {fmt.name} "
                              f"result cannot have been computed in the narrower {asked}{fix}.")
    return asked


def default_contract(fmt: FloatFormat) -> str:
    """float32 for the half precisions (what real kernels promise: compute in float32, round once),
    the dtype itself otherwise."""
    return FLOAT32.name if fmt.precision < FLOAT32.precision else fmt.name


def implementations(fmt: FloatFormat, k: int, precision: str) -> tuple[Implementation, ...]:
    """The implementation classes a contract accepts (docs/tolerance.md, "Precision contracts").

    * the dtype's own name: computed in the dtype itself (direct, log-space or blocked; for the half
      precisions tree sums in the dtype, or anything in float32), today's widest model;
    * a wider working precision ("float32", "float64"): any covered formula computed in that
      precision (tiled or tree sums), rounded once to the dtype;
    * "exact": none: only the correctly rounded truth (the final rounding alone).
    """
    depth = max(tiled_depth(k), tree_depth(k))  # the tiled depth is never below the tree depth
    if precision == "exact":
        return ()
    if precision != fmt.name:
        work = float_format(precision)
        return (Implementation(f"{work.name}, tiled", work, depth, work.tiny),)
    if fmt.precision >= FLOAT32.precision:
        return (Implementation("in-dtype", fmt, depth, fmt.tiny),)
    return (
        Implementation("in-dtype, tree sums", fmt, tree_depth(k), fmt.smallest_subnormal / 2),
        Implementation("float32, tiled", FLOAT32, depth, FLOAT32.tiny),
    )


def grad_tolerance(problem: Problem, parts: RowParts | None = None, grad: np.ndarray | None = None, *,
                   precision: str | None = None, band: np.ndarray | float = 0.0) -> np.ndarray:
    """The absolute tolerance of every gradient element under a precision contract, float64 ``(N, K)``.

    The largest error a correct implementation of the contract can make (:func:`element_bound`,
    the maximum over :func:`implementations`), plus half an ULP of the dtype for the final rounding
    (docs/tolerance.md, "Final rounding"), taken at ``|g| + bound + band`` so that it is the ULP of
    the truth's binade wherever the truth may be.

    Args:
        problem: the validated case; its dtype is the one checked.
        parts: the float64 softmax quantities of ``problem.logits`` when already computed.
        grad: the float64 gradient (e.g. the reference) when known.
        precision: one of :func:`contracts` (default: the dtype's own, the loosest).
        band: the reference's own uncertainty (docs/tolerance.md, "The reference").

    Returns:
        Nonnegative float64 ``(N, K)``; rows with nothing to check (ignored rows) get the floor.
    """
    parts = row_parts(capped_logits(problem)) if parts is None else parts
    precision = problem.format.name if precision is None else precision
    grad = grad_rows(problem) if grad is None else grad
    return tolerances(problem, parts, grad, band, (precision,))[precision]


def tolerances(problem: Problem, parts: RowParts, grad: np.ndarray, band: np.ndarray | float,
               precisions: tuple[str, ...], *, rows: slice | None = None) -> dict[str, np.ndarray]:
    """:func:`grad_tolerance` under several contracts at once, each implementation's bound computed once.

    ``rows``: evaluate the block of rows ``lo:hi`` only (``parts``, ``grad`` and ``band`` are then
    that block's); the values are the whole evaluation's rows, bit for bit (docs/tolerance.md,
    "Evaluation by row blocks").
    """
    fmt = problem.format
    if problem.softcap is not None:  # the softmax quantities of z' = c tanh(z / c), whatever was passed
        parts = row_parts(capped_rows(problem, rows))
    bounds: dict[Implementation, np.ndarray] = {}
    g = np.abs(grad)
    out = {}
    for precision in precisions:
        bound = np.zeros(parts.s.shape)
        for working in implementations(fmt, problem.k, precision):
            if working not in bounds:
                bounds[working] = element_bound(problem, parts, working, rows=rows)
            bound = np.maximum(bound, bounds[working])
        out[precision] = bound + 0.5 * fmt.ulp(g + bound + band)
    return out


def row_blocks(n: int, k: int, elements: int) -> list[slice]:
    """Consecutive blocks of rows ``lo:hi`` of about ``elements`` elements each (at least one row)."""
    step = max(1, elements // max(k, 1))
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]


def capped_rows(problem: Problem, rows: slice | None = None) -> np.ndarray:
    """:func:`gradcheck.oracle.capped_logits` of the rows ``lo:hi`` (all when None), by the same
    operations element by element."""
    if rows is None:
        return capped_logits(problem)
    return capped_logits(replace(problem, logits=problem.logits[rows]))


def element_bound(problem: Problem, parts: RowParts, working: Implementation, *,
                  rows: slice | None = None) -> np.ndarray:
    """Forward error bound of one implementation class, per element (docs/tolerance.md, "Derivation").

    ``rows``: the block of rows ``lo:hi`` alone, ``parts`` being :func:`gradcheck.oracle.row_parts`
    of those rows; every quantity is per row but D and eta (step 8), which are the whole problem's,
    so the values are the whole evaluation's rows bit for bit (docs/tolerance.md, "Evaluation by
    row blocks").

    With ``a_i = |z_i - max z|``, ``L = log Z``, u the working unit roundoff:

    * ``r_i = 2 u a_i + (1 + LOG_U) u L + (2 EXP_U + 3) u`` bounds the relative perturbation of p_i
      before the division by Z (step 3);
    * ``eps_Z = (1 + sum_c p_c expm1(2 u a_c + (EXP_U + 1) u)) (1 + gamma_depth) - 1`` (step 4);
    * ``rel_i = exp(r_i) (1 + eps_S)(1 + u) / (1 - eps_Z) - 1`` bounds the relative error of the
      computed p_i S (steps 5-6);
    * ``E_i = S p_i rel_i + w_i t_i eps_wt + expm1(2u) M_i`` (step 7),
      then scaled by 1/D with its own error ``eta`` (step 8), plus the underflow floor (step 9).
    """
    u = working.fmt.unit_roundoff
    k = problem.k
    rows = slice(0, problem.n) if rows is None else rows
    s = parts.s
    finite = np.isfinite(s)
    a = np.where(finite, -s, 0.0)
    log_z = parts.log_z[:, None]
    depth = working.depth
    p = np.where(finite, parts.p, 0.0)
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        # step 4: the row sum Z. p_c expm1(rate) with the rate capped: a rate above 700 means
        # 2 u a > 700, so a (1 - 2u) > 746 and both p_c and its perturbed value are 0 in float64
        zeta = _zeta(problem, parts, u, rows)  # step K1: the perturbation of z' (0 without softcapping)
        rate_e = np.minimum(2 * u * a + (EXP_U + 1) * u + 2 * zeta, 700.0)
        sum_err = (p * np.expm1(rate_e)).sum(axis=1, keepdims=True)
        eps_z = (1.0 + sum_err) * (1.0 + gamma(depth, u)) - 1.0
        # step 6: targets and weights
        # |w_c t_c|, their sum and |D|: torch accepts negative class weights, and the error of a signed
        # sum is bounded by the same sum of magnitudes (the same values when no weight is negative)
        wt = np.abs(problem.dense_targets(rows=rows) * problem.weights())
        smooth = bool(problem.label_smoothing)
        weighted = problem.weight is not None
        eps_wt = math.expm1(((4 if smooth else 0) + (1 if weighted else 0)) * u)
        plain = problem.index_targets and not smooth
        eps_s = 0.0 if plain else (1 + eps_wt) * (1 + gamma(depth, u)) - 1.0
        s_row = wt.sum(axis=1, keepdims=True)
        # steps 3, 5 and the product p S: the relative error of the computed p_i S, as one expm1
        rate_p = 2 * u * a + (1 + LOG_U) * u * log_z + (2 * EXP_U + 3) * u + 2 * zeta
        rel_p = np.expm1(np.minimum(rate_p - np.log1p(-eps_z) + math.log1p(eps_s) + math.log1p(u), 700.0))
        # step 7: the two subtracted terms, their combination and the subtraction
        err_p = s_row * p * rel_p
        magnitude = s_row * p * (1 + rel_p) + wt * (1 + eps_wt)
        unscaled = err_p + wt * eps_wt + math.expm1(2 * u) * magnitude
        # step 8: the reduction's scale 1/D
        d, eta = _scale_error(problem, u)
        bound = (unscaled * (1 + eta) + magnitude * eta) / d
        # step 9: underflow floor
        w_row = np.abs(problem.weights())[None, :]
        floor = UNDERFLOW_ROUNDINGS * working.floor_unit * (1 + s_row + w_row) * max(1.0, 1.0 / d)
        if kernel_options(problem):
            bound, floor = _with_options(problem, parts, working, p, rel_p, eps_z, zeta, bound,
                                         magnitude * (1 + eta) / d, floor, rows)
    if not np.all(eps_z < 1):
        raise ArithmeticError(f"the error model is vacuous for K={k} in {working.fmt.name} (eps_Z >= 1)")
    return bound + floor


def kernel_options(problem: Problem) -> bool:
    """Any of softcap, z-loss or an upstream gradient is set (docs/tolerance.md, "Kernel options")."""
    return problem.softcap is not None or bool(problem.lse_square_scale) or problem.grad_output is not None


def _zeta(problem: Problem, parts: RowParts, u: float, rows: slice) -> np.ndarray:
    """Step K1: the absolute error of the implementation's ``z'`` per row, ``(TANH_U + 3) u max |z'|``
    (0 without softcapping), as an ``(N, 1)`` column (of the block's rows)."""
    if problem.softcap is None:
        return np.zeros((parts.s.shape[0], 1))
    return (TANH_U + 3) * u * np.abs(capped_rows(problem, rows)).max(axis=1, keepdims=True)


def _with_options(problem: Problem, parts: RowParts, working: Implementation, p: np.ndarray, rel_p: np.ndarray,
                  eps_z: np.ndarray, zeta: np.ndarray, bound: np.ndarray, m_ce: np.ndarray,
                  floor: np.ndarray, block: slice) -> tuple[np.ndarray, np.ndarray]:
    """Steps K2-K5: the z-loss term, the upstream factor and the chain factor (docs/tolerance.md).

    ``bound`` is the scaled cross-entropy bound (steps 1-8, with K1's perturbation already in the
    rates), ``m_ce`` its magnitude ``M_i`` scaled by 1/D."""
    u = working.fmt.unit_roundoff
    lam = problem.lse_square_scale
    live = problem.active_rows()[block][:, None]
    magnitude = m_ce
    if lam:  # step K2: coef = 2 lambda lse / D_z with lse = m' + log Z
        rows = np.arange(parts.s.shape[0])
        zc = capped_rows(problem, block)
        m = zc[rows, parts.argmax][:, None]
        log_z = parts.log_z[:, None]
        lse = m + log_z
        d_lse = zeta - np.log1p(-eps_z) + LOG_U * u * log_z + u * (np.abs(m) + log_z) + u * np.abs(lse)
        dz = problem.zloss_divisor()
        coef = np.where(live, 2 * lam * np.abs(lse) / dz, 0.0)
        d_coef = np.where(live, 2 * lam * d_lse / dz, 0.0)
        t3 = coef * p
        # lambda rounded to the working precision, 2 lambda lse, 1/D_z and the product: 4 roundings on coef
        err_t3 = t3 * rel_p + p * d_coef + t3 * math.expm1(5 * u) * (1 + rel_p)
        magnitude = m_ce + t3 * (1 + rel_p)
        bound = bound + err_t3 + math.expm1(2 * u) * magnitude  # the sum with the CE part, in two pieces
        floor = floor + UNDERFLOW_ROUNDINGS * working.floor_unit * coef
    if problem.grad_output is not None:  # step K3: times g_n, placed anywhere: two roundings on the magnitude
        up = np.abs(problem.upstream()[block])[:, None]
        bound = up * (bound + math.expm1(2 * u) * (magnitude + bound))
        magnitude = up * magnitude
        floor = floor * np.maximum(1.0, up)
    if problem.softcap is not None:  # step K4: times h = 1 - tanh^2, computed as 1 - t^2 or 4e/(1+e)^2
        c = problem.softcap
        z = problem.logits[block].astype(np.float64)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            x = np.where(np.isfinite(z), np.abs(z / c), np.inf)
            t = np.tanh(x)
            e = np.exp(-2 * x)
            h = 4 * e / ((1 + e) * (1 + e))
            d_h = (2 * TANH_U + 8) * u * t * t + (2 * np.where(np.isfinite(x), x, 0.0) + EXP_U + 5) * u * h
            d_h = np.where(np.isfinite(z), d_h, 0.0)  # a -inf logit's factor is exactly 0 (tanh(-inf) = -1)
        total = magnitude + bound
        bound = h * bound + total * d_h + math.expm1(u) * h * total
        floor = floor + 4 * working.floor_unit * total
    return bound, floor


def _scale_error(problem: Problem, u: float) -> tuple[float, float]:
    """The divisor D and the relative error eta of scaling by it (docs/tolerance.md, step 8).

    D is an exact small integer without weights (a row count), or a sum of N_active weights in
    any order (depth N_active - 1) with them; the scaling costs two roundings (1/D and a product).
    With negative weights the sum's error is relative to ``sum |w_y|``, so ``eps_D`` carries the factor
    ``sum |w_y| / |D|`` (unbounded when D cancels: then eta is inf).
    """
    d = abs(problem.divisor())  # |D|: negative weights can make it negative
    if problem.reduction != "mean":
        return d, 0.0
    depth = 0
    eps_d = 0.0
    if problem.index_targets and problem.weight is not None:
        depth = max(0, int(problem.active_rows().sum()) - 1)
        eps_d = gamma(depth, u)
        w_y = problem.weight[problem.targets[problem.active_rows()]]
        if (w_y < 0).any():
            eps_d = eps_d * float(np.abs(w_y).sum()) / d if d > 0 else math.inf
    if eps_d >= 1:
        return d, math.inf
    return d, (1 + eps_d) / (1 - eps_d) * math.exp(2 * u) - 1.0
