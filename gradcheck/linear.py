"""Fused linear cross-entropy: the gradients of hidden states, classifier weight and bias (issue 13).

The logits are ``z = h @ W.T (+ b)`` with ``h`` of shape ``(N, D)``, ``W`` ``(V, D)`` and ``b`` ``(V,)``;
the loss is the cross-entropy of :mod:`gradcheck.problem` on those logits, with every case option
(class weights are ``ce_weight=``, Liger-Kernel's name, because ``weight`` is the classifier). With
``G = dL/dz`` (the logits gradient of docs/oracle.md, softcap, z-loss and ``grad_output`` included):

    dL/dh = G @ W        dL/dW = G.T @ h        dL/db = sum_n G_n

This module owns the validated linear case (:func:`make_linear_problem`), the fast float64 oracle
(:func:`linear_cross_entropy_grad`) and its rigorous running error bound
(:func:`linear_cross_entropy_grad_bounded`), and the error model of a correct fused kernel
(:func:`linear_tolerance`). The certified truth is :func:`gradcheck.linear_exact.exact_linear_grad`.
Every bound is derived in docs/linear.md; the step numbers below are its sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from gradcheck.dtypes import FLOAT32, FLOAT64, FloatFormat, DTYPE_NAMES, float_format, is_supported_float, round_to_format
from gradcheck.errors import InvalidArgument
from gradcheck.oracle import SECOND_ORDER, U, Bounded, _row_error, gamma, grad_bounded, row_parts
from gradcheck.options import CASE
from gradcheck.problem import Problem, as_array, make_problem
from gradcheck.tolerance import (EXP_U, LOG_U, Implementation, contracts, default_contract, element_bound, tiled_depth,
                                 tree_depth)

__all__ = ["LinearBounded", "LinearGrad", "LinearProblem", "linear_cross_entropy_grad",
           "linear_cross_entropy_grad_bounded", "linear_tolerance", "make_linear_problem"]

# docs/linear.md, "Elementary functions": relative error of tanh and cosh in units of u.
# float64 (glibc): tanh and cosh are listed within 2 ulp = 4 u; float32 (Sleef, numpy SIMD, Triton's
# libdevice): within 4 ulp = 8 u. The float32 figure is the one charged to a kernel.
TANH64_U = 4.0
COSH64_U = 4.0
TANH_U = 8.0
# docs/linear.md, "Softcap derivative": |d/dx sech^2 x| = 2 sech^2 x |tanh x|; its log-derivative is at most 2.
SOFTCAP_LOG_SLOPE = 2.0


class LinearGrad(NamedTuple):
    """The three gradients: ``hidden`` ``(N, D)``, ``weight`` ``(V, D)``, ``bias`` ``(V,)`` or None (no bias)."""

    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None


class LinearBounded(NamedTuple):
    """Each gradient as a float64 :class:`gradcheck.oracle.Bounded` (value and absolute error bound)."""

    hidden: Bounded
    weight: Bounded
    bias: Bounded | None


@dataclass(frozen=True, eq=False)
class LinearProblem:
    """A validated fused linear cross-entropy case. Build it with :func:`make_linear_problem`.

    Attributes:
        hidden: ``(N, D)`` read-only copy in the checked dtype.
        weight: ``(V, D)`` read-only copy in the same dtype.
        bias: ``(V,)`` read-only copy in the same dtype, or None.
        targets: ``(N,)`` int64 class indices or ``(N, V)`` float64 probabilities (as validated).
        logits: the cross-entropy case on the float64 logits ``fl(h @ W.T + b)``: its targets, class
            weights, divisors and upstream gradient are this case's (its ``logits`` are a rounding,
            used only where docs/linear.md charges the rounding).
        format: the checked dtype.
        options: the validated case options, class weights under ``"weight"`` as in :data:`CASE`.
    """

    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    targets: np.ndarray
    logits: Problem
    format: FloatFormat
    options: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, V, D)``."""
        return (self.hidden.shape[0], self.weight.shape[0], self.hidden.shape[1])

    @cached_property
    def h64(self) -> np.ndarray:
        return self.hidden.astype(np.float64)

    @cached_property
    def w64(self) -> np.ndarray:
        return self.weight.astype(np.float64)

    @cached_property
    def b64(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.astype(np.float64)

    @cached_property
    def magnitude(self) -> np.ndarray:
        """``|h| @ |W|.T + |b|``: the scale of the logits' dot products' errors (O1, K1)."""
        mag = np.abs(self.h64) @ np.abs(self.w64).T
        if self.b64 is not None:
            mag += np.abs(self.b64)
        return mag

    @cached_property
    def capped(self) -> tuple[np.ndarray | None, np.ndarray]:
        """``(z / c, c tanh(z / c))`` in float64 under softcap, else ``(None, z)``."""
        z, c = self.logits.logits, self.logits.softcap
        if c is None:
            return None, z
        with np.errstate(under="ignore"):
            x = z / c
            return x, c * np.tanh(x)

    @cached_property
    def ce(self) -> tuple[Problem, np.ndarray, np.ndarray, Any]:
        """The CE case at the float64 z', the oracle's CE gradient there, its bound, and the row parts."""
        ce_problem = _ce_problem(self.logits, self.capped[1])
        value, err = grad_bounded(ce_problem)
        return ce_problem, value, err, row_parts(ce_problem.logits)

    @cached_property
    def grad(self) -> tuple[np.ndarray, np.ndarray]:
        """The oracle's logits gradient G and its bound E (:func:`logits_grad_bounded`)."""
        return logits_grad_bounded(self)

    @cached_property
    def abs_products(self) -> tuple[np.ndarray, np.ndarray]:
        """``(|G| @ |W|, |G|.T @ |h|)``, shared by the oracle's bound and the tolerance."""
        ga = np.abs(self.grad[0])
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            return ga @ np.abs(self.w64), ga.T @ np.abs(self.h64)

    def grad_fn_options(self) -> dict[str, Any]:
        """The non-default options as a ``grad_fn`` gets them (``ce_weight=`` in the dtype; no grad_output)."""
        out = self.logits.options()
        if "weight" in out:
            out["ce_weight"] = out.pop("weight").astype(self.format.dtype)
        return out


def _array(name: str, value: Any, ndim: int, shape_text: str) -> np.ndarray:
    try:
        x = as_array(value, copy=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{name} must be an array of floats of shape {shape_text}, got "
                              f"{type(value).__name__} ({exc}).") from None
    if not is_supported_float(x.dtype):
        raise InvalidArgument(f"{name} must be a floating-point array ({', '.join(DTYPE_NAMES)}), got dtype "
                              f"{x.dtype} (shape {x.shape}).")
    if x.ndim != ndim:
        raise InvalidArgument(f"{name} must have shape {shape_text}, got shape {x.shape}.")
    if x.size == 0:
        raise InvalidArgument(f"{name} must not be empty, got shape {x.shape}.")
    x64 = x.astype(np.float64)
    bad = ~np.isfinite(x64)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(f"{name} must be finite, got {float(x64[where])!r} at index {where}.")
    x.setflags(write=False)
    return x


def make_linear_problem(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, **options: Any) -> LinearProblem:
    """Validate a fused linear case once; every linear entry point calls this.

    Args:
        hidden: ``(N, D)`` floats (float64, float32, float16, bfloat16), finite.
        weight: ``(V, D)`` floats of the same dtype, finite.
        targets: ``(N,)`` class indices in ``[0, V)`` (or ``ignore_index``), or ``(N, V)`` probabilities.
        bias: ``(V,)`` floats of the same dtype, or None.
        **options: the case options of :data:`gradcheck.options.CASE`, with the class weights named
            ``ce_weight`` (``weight`` is the classifier): ``ce_weight``, ``ignore_index``,
            ``reduction``, ``label_smoothing``, ``lse_square_scale``, ``softcap``, ``grad_output``.

    Raises:
        InvalidArgument: naming the argument, the expected and the given value.
    """
    case_options = dict(options)
    if "ce_weight" in case_options:
        case_options["weight"] = case_options.pop("ce_weight")
    unknown = [k for k in case_options if k not in CASE]
    if unknown:
        names = ", ".join("ce_weight" if n == "weight" else n for n in CASE)
        raise InvalidArgument(f"make_linear_problem() got an unknown option {unknown[0]!r}; its case options are {names}.")
    h = _array("hidden", hidden, 2, "(N, D)")
    w = _array("weight", weight, 2, "(V, D)")
    if w.dtype != h.dtype:
        raise InvalidArgument(f"weight must have the dtype of hidden ({float_format(h.dtype).name}), got "
                              f"{float_format(w.dtype).name}. Convert one, e.g. weight.astype(hidden.dtype).")
    n, d = h.shape
    v = w.shape[0]
    if w.shape[1] != d:
        raise InvalidArgument(f"weight must have shape (V, {d}) to match hidden of shape {h.shape}, got shape {w.shape}.")
    b = None
    if bias is not None:
        b = _array("bias", bias, 1, f"({v},)")
        if b.shape != (v,):
            raise InvalidArgument(f"bias must have shape ({v},), one per row of weight, got shape {b.shape}.")
        if b.dtype != h.dtype:
            raise InvalidArgument(f"bias must have the dtype of hidden ({float_format(h.dtype).name}), got "
                                  f"{float_format(b.dtype).name}.")
    t = as_array(targets, copy=False) if targets is not None else None
    if t is None or t.shape not in ((n,), (n, v)):
        got = "None" if t is None else f"shape {t.shape}"
        raise InvalidArgument(f"targets must be class indices of shape ({n},) or probabilities of shape ({n}, {v}) "
                              f"for hidden of shape {h.shape} and weight of shape {w.shape}, got {got}.")
    z = logits64(h, w, b)
    if not np.isfinite(z).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(z))[0])
        raise InvalidArgument(f"the logits hidden @ weight.T{' + bias' if b is not None else ''} must be finite, got "
                              f"{float(z[where])!r} at {where} (float64 overflow). Scale hidden or weight down.")
    problem = make_problem(z, targets, **case_options)
    validated = CASE.validate(case_options, where="make_linear_problem()")
    return LinearProblem(h, w, b, problem.targets, problem, float_format(h.dtype), validated)


def logits64(h: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """``fl(h @ W.T + b)`` in float64 (every input format embeds exactly in float64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = h.astype(np.float64) @ w.astype(np.float64).T
        if b is not None:
            z += b.astype(np.float64)
    return z


# ---- the float64 oracle and its bound --------------------------------------------------------------------------


def linear_cross_entropy_grad(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, dtype: Any = None,
                              **options: Any) -> LinearGrad:
    """The gradients of the fused linear cross-entropy, from float64, rounded once to ``dtype``.

    Args:
        hidden, weight, targets, bias, **options: as for :func:`make_linear_problem`.
        dtype: the result's format (default: the inputs' dtype).

    Returns:
        :class:`LinearGrad` ``(hidden, weight, bias)``; ``bias`` is None when no bias was given.

    >>> g = linear_cross_entropy_grad(np.eye(2), np.eye(2), np.array([0, 1]), reduction="sum")
    >>> g.hidden
    array([[-0.26894142,  0.26894142],
           [ 0.26894142, -0.26894142]])
    """
    lp = make_linear_problem(hidden, weight, targets, bias=bias, **options)
    fmt = float_format(lp.format.dtype if dtype is None else dtype)
    g = lp.grad[0]
    dh, dw, db = products(lp, g)
    return LinearGrad(round_to_format(dh, fmt), round_to_format(dw, fmt), None if db is None else round_to_format(db, fmt))


def linear_cross_entropy_grad_bounded(hidden: Any, weight: Any, targets: Any, *, bias: Any = None,
                                      **options: Any) -> LinearBounded:
    """The float64 gradients and a rigorous bound on the absolute error of each element (docs/linear.md,
    "The oracle's running error bound"). Options as for :func:`linear_cross_entropy_grad`."""
    return bounded(make_linear_problem(hidden, weight, targets, bias=bias, **options))


def bounded(lp: LinearProblem) -> LinearBounded:
    """:func:`linear_cross_entropy_grad_bounded` of a validated case."""
    g, e = lp.grad
    values = products(lp, g)
    n, v, d = lp.shape
    h, w = np.abs(lp.h64), np.abs(lp.w64)
    ga = np.abs(g)
    gw, gh = lp.abs_products
    eta = FLOAT64.smallest_subnormal
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        # step O4: sum_c E_c |x_c| + gamma_terms sum_c |g_c| |x_c|, and an underflow floor per term
        bh = SECOND_ORDER * (e @ w + gamma(v) * gw) + (v + 1) * eta
        bw = SECOND_ORDER * (e.T @ h + gamma(n) * gh) + (n + 1) * eta
        bb = None if lp.bias is None else SECOND_ORDER * (e.sum(axis=0) + gamma(n) * ga.sum(axis=0)) + (n + 1) * eta
    return LinearBounded(Bounded(values[0], bh), Bounded(values[1], bw),
                         None if bb is None else Bounded(values[2], bb))


def products(lp: LinearProblem, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(G @ W, G.T @ h, sum_n G_n)`` in float64."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        dh = g @ lp.w64
        dw = g.T @ lp.h64
        db = None if lp.bias is None else g.sum(axis=0)
    return dh, dw, db


def logits_error64(lp: LinearProblem) -> np.ndarray:
    """Step O1: ``|fl(h @ W.T + b) - (h @ W.T + b)| <= gamma_{D+1} (|h| @ |W|.T + |b|)`` (products exact or not,
    any summation order; Higham, Accuracy and Stability, eq. 3.5), plus an underflow floor."""
    d = lp.hidden.shape[1]
    return SECOND_ORDER * gamma(d + 1) * lp.magnitude + (d + 1) * FLOAT64.smallest_subnormal


def logits_grad_bounded(lp: LinearProblem) -> tuple[np.ndarray, np.ndarray]:
    """``G = dL/dz`` in float64 at the float64 logits, and a rigorous bound on ``|G - G(exact logits)|``
    (docs/linear.md, steps O1-O3)."""
    problem = lp.logits
    z = problem.logits
    dz = logits_error64(lp)
    c = problem.softcap
    x, zc = lp.capped
    if c is not None:  # step O2: z' = c tanh(z / c); Lipschitz 1, plus its own evaluation
        dzc = dz + (TANH64_U + 3) * U * np.abs(zc) + FLOAT64.smallest_subnormal
    else:
        dzc = dz
    ce_problem, ce, ce_err, parts = lp.ce  # the CE part at z' (docs/oracle.md)
    rho, eps_p, _ = _row_error(parts)
    a_val, a_err = _sensitive_part(problem, ce_problem, parts, ce, ce_err, dzc, rho[:, None] + U * (parts.log_z[:, None] + 1),
                                   eps_p, U)
    if c is not None:  # step O3: times f = sech^2(z / c), relative error eps_f
        with np.errstate(over="ignore", under="ignore"):
            f = 1.0 / np.cosh(x) ** 2
            eps_f = np.expm1(np.minimum(SOFTCAP_LOG_SLOPE * (dz / c + U * np.abs(x)), 700.0)) + (2 * COSH64_U + 3) * U
    else:
        f, eps_f = 1.0, 0.0
    gn = problem.upstream()[:, None]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        g = gn * (f * a_val)
        fa = np.abs(f * a_val)
        err = np.abs(gn) * (f * a_err + (np.abs(a_val) + a_err) * f * eps_f / (1 - eps_f) + 2 * U * fa)
        err = SECOND_ORDER * err + 4 * FLOAT64.smallest_subnormal
    return g, err


def _ce_problem(problem: Problem, zc: np.ndarray) -> Problem:
    """The cross-entropy case (class weights, targets, reduction, smoothing) at logits ``zc``, without the
    kernel options (their terms are added here)."""
    return make_problem(zc, problem.targets, weight=problem.weight, ignore_index=problem.ignore_index,
                        reduction=problem.reduction, label_smoothing=problem.label_smoothing)


def _sensitive_part(problem: Problem, ce_problem: Problem, parts: Any, ce: np.ndarray, ce_err: np.ndarray,
                    dz: np.ndarray, d_lse: np.ndarray, rel_p: np.ndarray, u: float) -> tuple[np.ndarray, np.ndarray]:
    """``A = (p S - w t) / D + 2 lambda lse p / Dz`` (the gradient in z' before softcap and upstream), and its
    error: the evaluation error given (``ce_err`` for the CE part; ``d_lse``, ``rel_p`` for the z-loss part)
    plus the sensitivity to a logits error ``dz`` (docs/linear.md, "Sensitivity to the logits").

    With ``delta_n = max_c dz_nc``: ``p_i`` moves by a factor within ``exp(+-(dz_i + delta_n))`` and
    ``lse_n`` by at most ``delta_n``.
    """
    active = problem.active_rows()[:, None]
    delta = dz.max(axis=1, keepdims=True)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        spread = np.minimum(dz + delta, 700.0)
        move = np.expm1(spread)
        p = parts.p
        wt = ce_problem.dense_targets() * ce_problem.weights()
        s_abs = np.abs(wt.sum(axis=1, keepdims=True))
        d = float(problem.divisor())
        sens = s_abs / abs(d) * p * move
        value = ce.copy()
        err = ce_err + sens
        lam = problem.lse_square_scale
        if lam:
            dzl = problem.zloss_divisor()
            lse = np.max(ce_problem.logits, axis=1, keepdims=True) + parts.log_z[:, None]
            scale = 2 * lam / dzl
            zl = np.where(active, scale * lse * p, 0.0)
            zl_err = scale * (p * (np.abs(lse) * move + delta * np.exp(spread))          # sensitivity
                              + p * (1 + rel_p) * d_lse + np.abs(lse) * p * rel_p + 3 * u * np.abs(lse) * p)
            value = value + zl
            err = err + np.where(active, zl_err, 0.0) + u * np.abs(value)
    return value, err


# ---- the error model of a correct fused kernel ------------------------------------------------------------------


@dataclass(frozen=True)
class KernelModel:
    """One implementation class a precision contract accepts (docs/linear.md, "Precision contracts").

    Attributes:
        name: the contract's name.
        acc: the accumulation (working) format.
        store: the format chunk-sized intermediates (logits, their gradient, per-chunk partial products) may
            be stored in once: the dtype for the "float32" contract (Liger-structured), float64 for the
            "float64" contract (rounded once, at the end, to the dtype), the dtype for the in-dtype class.
        tree: the sums are pairwise (depth ceil(log2 k) + 1 roundings per term) rather than in any order
            (k roundings): the in-dtype class of a half-precision dtype, where any-order sums of V or N terms
            have no useful bound (docs/linear.md, "Precision contracts").
    """

    name: str
    acc: FloatFormat
    store: FloatFormat
    tree: bool = False

    def sum_error(self, k: int) -> float:
        """The relative error factor of a sum of k products in ``acc``: gamma_k, or gamma_(depth + 1) for a tree."""
        return gamma(tree_depth(k) + 1, self.acc.unit_roundoff) if self.tree else gamma(k, self.acc.unit_roundoff)


def linear_contracts(fmt: FloatFormat) -> tuple[str, ...]:
    """The precision contracts of verify_linear for a dtype, tightest first: verify's
    (:func:`gradcheck.tolerance.contracts`): "exact", each wider working precision, the dtype itself."""
    return contracts(fmt)


def default_linear_contract(fmt: FloatFormat) -> str:
    """The kernel contract (issue 13's default): float32 accumulation, intermediates stored in the dtype at most
    once (float64 throughout for float64): the contract named "float32" (float64 for float64), which is verify's
    default contract too (:func:`gradcheck.tolerance.default_contract`)."""
    return default_contract(fmt)


def contract_models(fmt: FloatFormat, name: str) -> tuple[KernelModel, ...]:
    """The implementation classes a (non-exact) contract accepts; its tolerance is the largest of theirs.

    * "float64": accumulate in float64, keep every intermediate in float64, round once to the dtype;
    * "float32": accumulate in float32, intermediates stored in the dtype at most once (the kernel contract);
    * the dtype of a half precision: arithmetic in the dtype with pairwise sums, or anything "float32" accepts.
    """
    if name == "exact":
        return ()
    if name == FLOAT64.name:
        return (KernelModel(name, FLOAT64, FLOAT64),)
    if name == FLOAT32.name:
        return (KernelModel(name, FLOAT32, fmt),)
    if name == fmt.name:  # a half precision's own contract
        return (KernelModel(name, fmt, fmt, tree=True), KernelModel(name, FLOAT32, fmt))
    raise InvalidArgument(f"precision must be one of {linear_contracts(fmt)} for {fmt.name}, got {name!r}.")


def kernel_model(fmt: FloatFormat) -> KernelModel:
    """The default contract for a dtype: accumulate in float32 (float64 for float64), store in the dtype."""
    return contract_models(fmt, default_linear_contract(fmt))[0]


def linear_tolerance(lp: LinearProblem, reference: LinearBounded | None = None,
                     model: KernelModel | None = None) -> LinearGrad:
    """The absolute tolerance of every element of the three gradients for a correct kernel (docs/linear.md).

    Args:
        lp: the validated case.
        reference: the oracle's bounded values (computed when None); their bound is the band the final
            rounding's ULP is taken over.
        model: the contract (default :func:`kernel_model` of the dtype).

    Returns:
        :class:`LinearGrad` of float64 tolerances.
    """
    model = kernel_model(lp.format) if model is None else model
    reference = bounded(lp) if reference is None else reference
    n, v, d = lp.shape
    ua, ud = model.acc.unit_roundoff, model.store.unit_roundoff
    sub_d = model.store.smallest_subnormal
    problem = lp.logits
    h, w = np.abs(lp.h64), np.abs(lp.w64)
    z = problem.logits
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        # step K1: the logits: a (D+1)-term dot product in acc, the matmul stored in the dtype, the bias added in it
        mag = lp.magnitude
        zhw = np.abs(z if lp.bias is None else z - lp.b64)
        dz = model.sum_error(d + 1) * mag + (d + 1) * model.acc.tiny
        dz = dz + ud * (zhw + dz) + sub_d
        if lp.bias is not None:
            dz = dz + ud * (np.abs(z) + dz) + sub_d
        dz = dz + logits_error64(lp)  # the float64 logits the model is evaluated at are a rounding too
        # step K2: softcap in acc
        c = problem.softcap
        x, zc = lp.capped
        if c is not None:
            dzc = dz + (TANH_U + 3) * ua * np.abs(zc) + model.acc.tiny
        else:
            dzc = dz
        # step K3: the CE gradient's evaluation error in acc: the logits contract (docs/tolerance.md), at the
        # perturbed logits: p moves by a factor within exp(2 delta) and the rates by one within 1 + delta
        ce_problem, ce, _, parts = lp.ce
        depth = max(tiled_depth(v), tree_depth(v))
        working = Implementation(f"{model.acc.name}, tiled", model.acc, depth, model.acc.tiny)
        delta = dzc.max(axis=1, keepdims=True)
        ce_eval = element_bound(ce_problem, parts, working) * np.exp(np.minimum(3 * delta, 700.0))
        # z-loss evaluation (docs/linear.md, step K3): lse and p in acc
        a = np.where(np.isfinite(parts.s), -parts.s, 0.0)
        rate_e = np.minimum(2 * ua * a + (EXP_U + 1) * ua, 700.0)
        eps_z = (1.0 + (parts.p * np.expm1(rate_e)).sum(axis=1, keepdims=True)) * (1.0 + gamma(depth, ua)) - 1.0
        log_z = parts.log_z[:, None]
        lse_abs = np.abs(np.max(zc, axis=1, keepdims=True) + log_z)
        d_lse = -np.log1p(-eps_z) + LOG_U * ua * log_z + ua * lse_abs + ua
        rate_p = 2 * ua * a + (1 + LOG_U) * ua * log_z + (2 * EXP_U + 3) * ua
        rel_p = np.expm1(np.minimum(rate_p - np.log1p(-eps_z), 700.0))
        a_val, a_err = _sensitive_part(problem, ce_problem, parts, ce, ce_eval, dzc, d_lse, rel_p, ua)
        # step K4: the softcap derivative 1 - tanh^2 in acc (absolute error) and its sensitivity
        if c is not None:
            f = 1.0 / np.cosh(x) ** 2
            df = f * np.expm1(np.minimum(SOFTCAP_LOG_SLOPE * dz / c, 700.0)) + (2 * TANH_U + 5) * ua
        else:
            f, df = 1.0, 0.0
        # step K5: the upstream factor (one rounding), then G stored in the dtype once; a kernel may store G
        # before a scalar upstream factor is applied (Liger), so the storage's underflow is charged |g| times
        gn = np.abs(problem.upstream())[:, None]
        g_abs = gn * np.abs(f * a_val)
        eg = gn * ((f + df) * a_err + np.abs(a_val) * df) + 3 * ua * (g_abs + gn * ((f + df) * a_err + np.abs(a_val) * df))
        eg = eg + ud * (g_abs + eg) + sub_d * np.maximum(1.0, gn)
        gs = g_abs + eg  # |G as stored| <= |G| + E
        # step K6: the products in acc (any order, chunked), per-chunk partials stored in the dtype once;
        # |G| is the oracle's (the same float64 numbers), so (|G| + E) @ |x| = |G| @ |x| + E @ |x|
        gw, gh = lp.abs_products
        ew, eh = eg @ w, eg.T @ h
        th = ew + (model.sum_error(v) + ud) * (gw + ew) + (v + 1) * (model.acc.tiny + sub_d)
        tw = eh + (model.sum_error(n) + ud) * (gh + eh) + (n + 1) * (model.acc.tiny + sub_d)
        tb = None
        if lp.bias is not None:
            tb = eg.sum(axis=0) + (model.sum_error(n) + ud) * gs.sum(axis=0) + (n + 1) * (model.acc.tiny + sub_d)
        # step K7: a scalar grad_output applied to the stored results in the dtype (Liger's element_mul)
        scaled = problem.grad_output is not None and problem.reduction != "none"
        out = []
        for tol, ref in ((th, reference.hidden), (tw, reference.weight), (tb, reference.bias)):
            if tol is None:
                out.append(None)
                continue
            tol = SECOND_ORDER * tol
            if scaled:
                tol = tol + ud * (np.abs(ref.value) + tol + ref.bound) + sub_d
            # step K8: the final rounding to the dtype, half an ULP where the truth may be
            out.append(tol + 0.5 * lp.format.ulp(np.abs(ref.value) + tol + ref.bound))
    return LinearGrad(*out)
