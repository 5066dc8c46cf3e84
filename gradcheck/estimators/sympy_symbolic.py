"""SymPy: symbolic proofs of the gradient and softmax-Jacobian closed forms, and SymPy as a method.

Proofs (docs/methods.md, "SymPy proofs"): for K classes build the loss
``L = -sum_c w_c y_c log(exp(z_c) / sum_j exp(z_j))`` with smoothed soft targets
``y_c = (1 - eps) t_c + eps / K``, differentiate, and decide that the difference with the closed
form is zero: after differentiation no logarithm is left, so substituting ``E_j = exp(z_j)`` makes
the difference a rational function of ``E, t, w, eps``, and ``cancel`` reduces a rational function
that is identically zero to exactly 0 (a decision procedure, not a heuristic simplification).
Proofs are time-bounded (checked between elements) and cached on disk under
``$GRADCHECK_CACHE_DIR/sympy_proofs`` (default ``~/.cache/gradcheck``).

Numerics: the derivative of the log-sum-exp form is lambdified for numpy (float64) and for mpmath
(adaptive precision) and registered as ``sympy_numpy`` and ``sympy_mpmath``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import mpmath
import numpy as np

from gradcheck.dtypes import FLOAT64, FloatFormat
from gradcheck.errors import InvalidArgument, require
from gradcheck.estimators.result import MethodResult, Status, finish, unsupported
from gradcheck.estimators.row_loss import TANH_ULPS
from gradcheck.estimators.terms import backward_error, kernel_terms
from gradcheck.oracle import gamma
from gradcheck.problem import Problem

sp = require("sympy", extra="proofs")

PROOF_VERSION = 2  # bump when a statement or the decision procedure changes: old cache entries are ignored
KINDS = ("gradient", "jacobian", "lse_gradient", "kernel_gradient", "kernel_jacobian", "kernel_hessian")
KERNEL_KINDS = ("kernel_gradient", "kernel_jacobian", "kernel_hessian")
# what prove_all (the study's report) proves by default: the three plain identities, as before the
# kernel options (the study decides whether to add KERNEL_KINDS; the Hessian's K**2 second
# derivatives take about 35 s at K = 6). ``gradcheck prove`` proves every kind.
DEFAULT_KINDS = KINDS[:3]
MAX_K = 32  # lambdify limit: SymPy's diff of the K-term loss grows like K**2 (about 5 s at K = 32)
MAX_PRECISION = 4096  # bits, sympy_mpmath's cap
NUMPY_ELEMENTARY_ULPS = 2.0  # numpy float64 exp, as in docs/oracle.md


@dataclass(frozen=True)
class Proof:
    """The outcome of one symbolic proof.

    Attributes:
        kind: "gradient" (dL/dz_i = p_i sum_o w_o y_o - w_i y_i, textbook loss with weights, soft
            targets and smoothing), "jacobian" (dp_i/dz_j = delta_ij p_i - p_i p_j),
            "lse_gradient" (the same gradient for the log-sum-exp form that is lambdified), and the
            kernel options with softcap c, z-loss lambda and upstream factor g as symbols:
            "kernel_gradient", "kernel_jacobian" (softmax of c tanh(z / c)) and "kernel_hessian"
            (see :func:`_kernel_statement`).
        k: number of classes.
        status: "proved", "timeout", "failed" (the closed form is wrong: a nonzero remainder, for the
            kernel kinds also a nonzero value at a witness point) or "undecided" (kernel kinds: the
            remainder did not cancel but vanished at the witness point; never cached).
        seconds: time the proof took when it was done (read from the cache when ``cached``).
        cached: the result came from the disk cache.
        statement: the identity, in words.
    """

    kind: str
    k: int
    status: str
    seconds: float
    cached: bool
    statement: str

    @property
    def proved(self) -> bool:
        return self.status == "proved"


def cache_dir() -> Path:
    """``$GRADCHECK_CACHE_DIR`` or ``~/.cache/gradcheck``."""
    return Path(os.environ.get("GRADCHECK_CACHE_DIR") or Path.home() / ".cache" / "gradcheck")


def _symbols(k: int) -> tuple[tuple, tuple, tuple, sp.Symbol]:
    z = sp.symbols(f"z0:{k}", real=True)
    t = sp.symbols(f"t0:{k}", nonnegative=True)
    w = sp.symbols(f"w0:{k}", nonnegative=True)
    return z, t, w, sp.Symbol("epsilon", nonnegative=True)


def _statement(kind: str, k: int) -> tuple[list[sp.Expr], tuple, str]:
    """The differences that must vanish, the logit symbols, and the statement in words."""
    z, t, w, eps = _symbols(k)
    y = [(1 - eps) * t[c] + eps / k for c in range(k)]
    total = sum((sp.exp(zj) for zj in z), sp.Integer(0))
    p = [sp.exp(z[i]) / total for i in range(k)]
    s = sum((w[c] * y[c] for c in range(k)), sp.Integer(0))
    if kind == "gradient":
        loss = -sum((w[c] * y[c] * sp.log(sp.exp(z[c]) / total) for c in range(k)), sp.Integer(0))
        diffs = [sp.diff(loss, z[i]) - (p[i] * s - w[i] * y[i]) for i in range(k)]
        words = f"K={k}: d/dz_i of -sum_c w_c y_c log softmax_c(z) equals p_i sum_o w_o y_o - w_i y_i"
    elif kind == "lse_gradient":
        lse = sp.log(total)
        loss = -sum((w[c] * y[c] * (z[c] - lse) for c in range(k)), sp.Integer(0))
        diffs = [sp.diff(loss, z[i]) - (p[i] * s - w[i] * y[i]) for i in range(k)]
        words = f"K={k}: d/dz_i of -sum_c w_c y_c (z_c - logsumexp z) equals p_i sum_o w_o y_o - w_i y_i"
    elif kind == "jacobian":
        diffs = [sp.diff(p[i], z[j]) - ((p[i] if i == j else 0) - p[i] * p[j]) for i in range(k) for j in range(k)]
        words = f"K={k}: d softmax_i / dz_j equals delta_ij p_i - p_i p_j"
    else:
        raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}.")
    return diffs, z, words


# ---- the kernel options: softcap, z-loss and an upstream factor as symbols ------------------------


@dataclass(frozen=True)
class KernelParts:
    """Symbols and building blocks of the kernel loss for K classes (docs/methods.md, "SymPy proofs").

    ``zc_j = c tanh(z_j / c)``, ``p = softmax(zc)``, ``lse = log sum_j exp(zc_j)``, ``y`` the smoothed
    targets, ``S = sum_o w_o y_o``, ``chi_j = 1 - tanh(z_j / c)^2``, and ``loss = g (-sum_c w_c y_c
    log p_c / D + lam lse^2 / Dz)`` with the upstream factor ``g`` and the divisors ``D``, ``Dz``.
    Weights and ``g`` are real of either sign.
    """

    z: tuple
    t: tuple
    w: tuple
    eps: Any
    c: Any
    lam: Any
    g: Any
    d: Any
    dz: Any
    y: list
    zc: list
    p: list
    lse: Any
    s: Any
    chi: list
    loss: Any

    def zgrad(self, i: int) -> Any:
        """The claimed dL/dz'_i: ``g ((p_i S - w_i y_i) / D + 2 lam lse p_i / Dz)``."""
        return self.g * ((self.p[i] * self.s - self.w[i] * self.y[i]) / self.d
                         + 2 * self.lam * self.lse * self.p[i] / self.dz)


@functools.lru_cache(maxsize=None)
def kernel_parts(k: int) -> KernelParts:
    """The :class:`KernelParts` for K classes (cached: SymPy expressions are immutable)."""
    z = sp.symbols(f"z0:{k}", real=True)
    t = sp.symbols(f"t0:{k}", nonnegative=True)
    w = sp.symbols(f"w0:{k}", real=True)
    eps = sp.Symbol("epsilon", nonnegative=True)
    c, lam = sp.Symbol("c", positive=True), sp.Symbol("lambda", nonnegative=True)
    g, d, dz = sp.Symbol("g", real=True), sp.Symbol("D", nonzero=True), sp.Symbol("D_z", positive=True)
    y = [(1 - eps) * t[i] + eps / k for i in range(k)]
    zc = [c * sp.tanh(zi / c) for zi in z]
    total = sum((sp.exp(x) for x in zc), sp.Integer(0))
    p = [sp.exp(x) / total for x in zc]
    lse = sp.log(total)
    s = sum((w[i] * y[i] for i in range(k)), sp.Integer(0))
    chi = [1 - sp.tanh(zi / c) ** 2 for zi in z]
    loss = g * (-sum((w[i] * y[i] * sp.log(sp.exp(zc[i]) / total) for i in range(k)), sp.Integer(0)) / d
                + lam * lse**2 / dz)
    return KernelParts(z, t, w, eps, c, lam, g, d, dz, y, zc, p, lse, s, chi, loss)


def _kernel_statement(kind: str, k: int) -> tuple[list[sp.Expr], str]:
    kp = kernel_parts(k)
    z, p, chi = kp.z, kp.p, kp.chi

    def h(i: int, j: int) -> Any:  # the softmax Jacobian in z'
        return (p[i] if i == j else 0) - p[i] * p[j]

    if kind == "kernel_gradient":
        diffs = [sp.diff(kp.loss, z[i]) - kp.zgrad(i) * chi[i] for i in range(k)]
        words = (f"K={k}: d/dz_i of g (-sum_c w_c y_c log softmax_c(z') / D + lambda lse(z')^2 / D_z), "
                 "z' = c tanh(z / c), equals g ((p_i S - w_i y_i) / D + 2 lambda lse p_i / D_z) (1 - tanh^2(z_i / c))")
    elif kind == "kernel_jacobian":
        diffs = [sp.diff(p[i], z[j]) - h(i, j) * chi[j] for i in range(k) for j in range(k)]
        words = f"K={k}: d softmax_i(c tanh(z / c)) / dz_j equals (delta_ij p_i - p_i p_j) (1 - tanh^2(z_j / c))"
    else:  # kernel_hessian
        grads = [sp.diff(kp.loss, z[i]) for i in range(k)]
        th = [sp.tanh(zi / kp.c) for zi in z]
        diffs = [sp.diff(grads[i], z[j])
                 - (kp.g * (kp.s * h(i, j) / kp.d + 2 * kp.lam * (p[i] * p[j] + kp.lse * h(i, j)) / kp.dz)
                    * chi[i] * chi[j] + (kp.zgrad(i) * (-2 * th[i] * chi[i] / kp.c) if i == j else 0))
                 for i in range(k) for j in range(k)]
        words = (f"K={k}: the Hessian of the same loss equals g (S H_ij / D + 2 lambda (p_i p_j + lse H_ij) / D_z) "
                 "chi_i chi_j - delta_ij 2 tanh(z_i / c) chi_i G_i / c, H = diag p - p p^T, G_i the z'-gradient")
    return diffs, words


def decide(expr: sp.Expr, k: int) -> str:
    """Decide whether a difference built from :func:`kernel_parts` vanishes identically.

    Replace ``tanh(z_j / c)`` by a symbol T_j, then ``exp(sum_j n_j c T_j)`` by ``prod_j E_j^n_j`` and
    ``log(sum_j E_j)`` by a symbol Lambda: if the result, rational in independent symbols, cancels to
    0, the identity holds for all values ("proved": substituting functions of z into a zero rational
    function gives zero). Otherwise the difference is evaluated at a fixed rational point with 30
    digits: a nonzero value refutes the identity ("failed"); a zero there decides nothing
    ("undecided").
    """
    kp = kernel_parts(k)
    tt = sp.symbols(f"T0:{k}", real=True)
    ee = sp.symbols(f"E0:{k}", positive=True)
    big_lambda = sp.Symbol("Lambda", real=True)

    def to_powers(arg: sp.Expr) -> sp.Expr:
        arg = sp.expand(arg)
        out, rest = sp.Integer(1), arg
        for tj, ej in zip(tt, ee):
            n = sp.simplify(arg.coeff(tj) / kp.c)
            if not n.is_integer:
                return sp.exp(arg)
            out, rest = out * ej**n, rest - n * kp.c * tj
        rest = sp.simplify(rest)
        return out if rest == 0 else out * sp.exp(rest)

    rational = expr.xreplace({sp.tanh(zj / kp.c): tj for zj, tj in zip(kp.z, tt)})
    rational = rational.replace(sp.exp, to_powers)
    rational = rational.xreplace({sp.log(sum(ee, sp.Integer(0))): big_lambda})
    if not (rational.has(sp.exp, sp.log, sp.tanh) or any(rational.has(zj) for zj in kp.z)):
        if sp.cancel(sp.together(rational)) == 0:
            return "proved"
    value = sp.N(expr.subs(_witness_point(kp)), 30)
    return "failed" if value.is_number and value != 0 and abs(value) > 1e-20 else "undecided"


def _witness_point(kp: KernelParts) -> dict:
    """A fixed point with rational coordinates at which a wrong identity is shown to fail."""
    k = len(kp.z)
    point = {kp.eps: sp.Rational(1, 10), kp.c: sp.Rational(3, 2), kp.lam: sp.Rational(1, 3),
             kp.g: sp.Rational(-7, 4), kp.d: sp.Rational(5, 2), kp.dz: sp.Integer(3)}
    for j in range(k):
        point[kp.z[j]] = sp.Rational(7 * j - 9, 4 + j)
        point[kp.t[j]] = sp.Rational(j + 1, k + 2)
        point[kp.w[j]] = sp.Rational(3 + 2 * j, 5)
    return point


def _is_zero(expr: sp.Expr, z: tuple) -> bool:
    """Decide expr == 0: with z_j = log E_j (E_j > 0) it is rational in the symbols; ``cancel`` gives 0 iff it is."""
    e_syms = sp.symbols(f"E0:{len(z)}", positive=True)
    rational = expr.subs({zj: sp.log(ej) for zj, ej in zip(z, e_syms)})
    if rational.has(sp.log) or rational.has(sp.exp):
        return bool(sp.simplify(expr) == 0)  # not expected; simplify can only miss a zero, never invent one
    return sp.cancel(sp.together(rational)) == 0


def prove(kind: str, k: int, *, timeout: float = 120.0, use_cache: bool = True) -> Proof:
    """Prove one identity for K classes (see :class:`Proof`), or read it from the cache.

    Args:
        kind: one of :data:`KINDS`.
        k: number of classes, >= 1.
        timeout: seconds; checked between elements, so one element may overrun it.
        use_cache: read and write ``cache_dir()/sympy_proofs``.

    Raises:
        InvalidArgument: unknown kind or k < 1.
    """
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}.")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgument(f"k must be an integer >= 1, got {k!r}.")
    k = int(k)
    start = time.perf_counter()
    if kind in KERNEL_KINDS:
        diffs, words = _kernel_statement(kind, k)
        check = lambda expr: decide(expr, k)  # noqa: E731
    else:
        diffs, z, words = _statement(kind, k)
        check = lambda expr: "proved" if _is_zero(expr, z) else "failed"  # noqa: E731
    digest = hashlib.sha256(
        f"{PROOF_VERSION}|{sp.__version__}|{kind}|{k}|{sp.srepr(diffs)}".encode()).hexdigest()[:20]
    path = cache_dir() / "sympy_proofs" / f"{kind}_k{k}_{digest}.json"
    if use_cache:
        cached = _read_cache(path)
        if cached is not None:
            return Proof(kind, k, cached[0], cached[1], True, words)
    status = "proved"
    for expr in diffs:
        if time.perf_counter() - start > timeout:
            status = "timeout"
            break
        outcome = check(expr)
        if outcome != "proved":
            status = outcome
            break
    seconds = time.perf_counter() - start
    if use_cache and status != "timeout":
        _write_cache(path, {"kind": kind, "k": k, "status": status, "seconds": seconds,
                            "sympy": sp.__version__, "statement": words})
    return Proof(kind, k, status, seconds, False, words)


def _read_cache(path: Path) -> tuple[str, float] | None:
    """A cache entry's (status, seconds), or None when it is missing or corrupt (then it is redone)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not UTF-8, not JSON
        return None
    if not isinstance(data, dict) or data.get("status") not in ("proved", "failed"):
        return None
    seconds = data.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        return None
    return data["status"], float(seconds)


def _write_cache(path: Path, entry: dict[str, Any]) -> None:
    """Write (or overwrite) a cache entry atomically; a cache that cannot be written is no error."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():  # a corrupt entry of the worst kind: a folder where the file belongs
            import shutil

            shutil.rmtree(path)
        tmp.write_text(json.dumps(entry))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def prove_all(k_max: int = 8, *, kinds: tuple[str, ...] = DEFAULT_KINDS, timeout: float = 120.0,
              use_cache: bool = True) -> list[Proof]:
    """Every identity in ``kinds`` for K = 1 .. k_max."""
    return [prove(kind, k, timeout=timeout, use_cache=use_cache) for k in range(1, k_max + 1) for kind in kinds]


@functools.lru_cache(maxsize=None)
def derivative(k: int, module: str) -> Callable:
    """SymPy's derivative of ``L = -sum_c v_c (z_c - log sum_j exp z_j)``, lambdified for ``module``.

    Returns:
        ``f(z, v) -> list of K values``, ``z`` and ``v`` sequences of K numbers (numpy: columns).
    """
    z = sp.symbols(f"z0:{k}", real=True)
    v = sp.symbols(f"v0:{k}", nonnegative=True)
    lse = sp.log(sum((sp.exp(zj) for zj in z), sp.Integer(0)))
    loss = -sum((v[c] * (z[c] - lse) for c in range(k)), sp.Integer(0))
    return sp.lambdify((z, v), [sp.diff(loss, zi) for zi in z], modules=module, cse=True)


@functools.lru_cache(maxsize=None)
def kernel_derivative(k: int, module: str, softcap: bool) -> Callable:
    """SymPy's derivative of ``F = -sum_c v_c (z'_c - lse) + beta lse^2``, lambdified for ``module``.

    ``z' = cap tanh(z / cap)`` when ``softcap`` (else z), ``lse = m + log sum_j exp(z'_j - m)``: the
    shift m is a symbol held constant (F does not depend on it), evaluated at the row's max z'.

    Returns:
        ``f(z, v, beta, cap, m) -> list of K values``.
    """
    z = sp.symbols(f"z0:{k}", real=True)
    v = sp.symbols(f"v0:{k}", real=True)
    beta, cap, m = sp.Symbol("beta", real=True), sp.Symbol("cap", positive=True), sp.Symbol("m", real=True)
    zc = [cap * sp.tanh(zj / cap) for zj in z] if softcap else list(z)
    lse = m + sp.log(sum((sp.exp(x - m) for x in zc), sp.Integer(0)))
    loss = -sum((v[c] * (zc[c] - lse) for c in range(k)), sp.Integer(0)) + beta * lse**2
    return sp.lambdify((z, v, beta, cap, m), [sp.diff(loss, zi) for zi in z], modules=module, cse=True)


def _kernel(problem: Problem) -> bool:
    return problem.softcap is not None or bool(problem.lse_square_scale)


def sympy_gradient(problem: Problem, *, module: str = "numpy", precision: int | None = None) -> MethodResult:
    """The gradient from SymPy's lambdified derivative.

    With a softcap or a z-loss the derivative is that of :func:`kernel_derivative`; the upstream
    factor multiplies each row's result (in float64, or exactly at the working precision for mpmath).

    Args:
        problem: a validated case with at most :data:`MAX_K` classes (else UNSUPPORTED).
        module: "numpy" (float64; logits shifted by the row max, which the derivative is invariant
            to) or "mpmath" (exact shift, then precision doubled per row from ``precision``, default
            2p + 20 bits, until the error estimate decides the rounding to the dtype, up to
            :data:`MAX_PRECISION`; ITERATION_LIMIT if not).

    Returns:
        A :class:`MethodResult` whose ``error`` is an estimate (docs/methods.md, "SymPy numerics").
    """
    name = f"sympy_{module}"
    if module not in ("numpy", "mpmath"):
        raise InvalidArgument(f"module must be 'numpy' or 'mpmath', got {module!r}.")
    if problem.k > MAX_K:
        return unsupported(problem, method=name, reason=(
            f"SymPy's derivative is lambdified for K <= {MAX_K} classes, got K={problem.k}"))
    if _kernel(problem):
        fn = kernel_derivative(problem.k, module, problem.softcap is not None)
    else:
        fn = derivative(problem.k, module)
    if module == "numpy":
        return _numpy_gradient(problem, fn)
    return _mpmath_gradient(problem, fn, precision)


def _numpy_gradient(problem: Problem, fn: Callable) -> MethodResult:
    """Evaluate ``-v_i (1 - p_i) + sum_{c != i} v_c p_i`` (SymPy's form) in float64, with its estimate."""
    u = FLOAT64.unit_roundoff
    k = problem.k
    z = problem.logits.astype(np.float64)
    v = problem.dense_targets() * problem.weights()
    d = problem.divisor()
    up = problem.upstream()[:, None]
    if _kernel(problem):
        terms = kernel_terms(problem)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            m = terms.zc.max(axis=1)
            cap = 1.0 if problem.softcap is None else problem.softcap
            g = np.stack([np.broadcast_to(np.asarray(col, dtype=np.float64), z.shape[:1])
                          for col in fn(list(z.T), list(v.T), terms.beta, cap, m)], axis=1)
            grad = up * g / d
        err = backward_error(problem, grad, FLOAT64, exp_ulps=NUMPY_ELEMENTARY_ULPS, tanh_ulps=TANH_ULPS,
                             chain_per_term=True)
        return finish(problem, grad, err, method="sympy_numpy", bound=False, evaluations=1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s = z - z.max(axis=1, keepdims=True)
        g = np.stack([np.broadcast_to(np.asarray(col, dtype=np.float64), z.shape[:1])
                      for col in fn(list(s.T), list(v.T))], axis=1)
        # estimate (docs/methods.md): p_i from s, with relative error eps_p = a_i + rho + 2u; the sizes
        # with |v| (signed weights) and p from the float64 softmax
        a = np.where(np.isfinite(s), (np.abs(s) + NUMPY_ELEMENTARY_ULPS) * u, 0.0)
        rho = a.max(axis=1, keepdims=True) + gamma(k, u)
        eps_p = a + rho + 2 * u
        p = kernel_terms(problem).p
        av = np.abs(v)
        s_abs = av.sum(axis=1, keepdims=True)
        big_a = p * (s_abs - av)
        big_b = av * np.abs(1.0 - p)
        err = av * (eps_p + 2 * u) + (big_a + big_b) * (eps_p + 2 * gamma(k, u) + u)
        err += (k + 8) * FLOAT64.smallest_subnormal * np.maximum(s_abs, 1.0)
        grad = up * g / d
        err = np.abs(up) * err / abs(d) + 2 * u * np.abs(grad)
    return finish(problem, grad, err, method="sympy_numpy", bound=False, evaluations=1)


def _mpmath_gradient(problem: Problem, fn: Callable, precision: int | None) -> MethodResult:
    """Per row: exact shift, evaluate at P bits, double P until the estimate decides the rounding.

    With the kernel options the logits enter unshifted (the derivative's own shift m is the row's
    max z' at P bits), beta = lambda D / Dz and the upstream factor are exact rationals, and the
    estimate adds the chain factor's cancellation ``1 - tanh^2`` (docs/methods.md, "SymPy numerics").
    """
    fmt = problem.format
    n, k = problem.logits.shape
    z = problem.logits.astype(np.float64)
    d = problem.exact_divisor()
    kernel = _kernel(problem)
    if kernel:
        terms = kernel_terms(problem)
        big_a, big_b, big_z = (x / abs(terms.d) for x in terms.sizes())
        zg = np.abs(terms.zgrad()) / abs(terms.d)
        with np.errstate(invalid="ignore", over="ignore"):
            x = (np.where(np.isfinite(z), np.abs(z), 0.0) / problem.softcap if problem.softcap is not None
                 else np.zeros(z.shape))
        active = problem.active_rows()
        beta_exact = [Fraction(problem.lse_square_scale) * d / problem.zloss_divisor() if active[r] else Fraction(0)
                      for r in range(n)]
    grad = np.zeros((n, k))
    err = np.zeros((n, k))
    status = Status.CONVERGED
    top = 0
    evaluations = 0
    for row in range(n):
        v_exact = [problem.exact_weight(c) * problem.exact_target(row, c) for c in range(k)]
        up = problem.exact_upstream(row)
        if up == 0 or (not any(v_exact) and not (kernel and beta_exact[row])):
            continue  # the row's gradient is exactly 0
        prec = precision or 2 * fmt.precision + 20
        while True:
            evaluations += 1
            with mpmath.workprec(prec):
                v = [_mpf(x) for x in v_exact]
                dd = _mpf(d)
                if kernel:
                    zs = [mpmath.mpf(float(x)) for x in z[row]]
                    if problem.softcap is not None:
                        cap = mpmath.mpf(problem.softcap)
                        zc = [cap * mpmath.tanh(x / cap) for x in zs]
                    else:
                        cap, zc = mpmath.mpf(1), zs
                    vals = [x * _mpf(up) / dd for x in fn(zs, v, _mpf(beta_exact[row]), cap, max(zc))]
                else:
                    za = mpmath.mpf(float(np.max(z[row])))
                    s = [mpmath.fsub(mpmath.mpf(float(x)), za, exact=True) if np.isfinite(x) else mpmath.mpf("-inf")
                         for x in z[row]]
                    vals = [x * _mpf(up) / dd for x in fn(s, v)]
                g = np.array([float(x) for x in vals])
                # relative 2**-prec per operation over about 2K + 10 operations on terms of size
                # (S p_i + v_i) / D (docs/methods.md, "SymPy numerics")
                scale = np.array([float((abs(x) + 2 * abs(vi) * abs(_mpf(up))) / abs(dd)) for x, vi in zip(vals, v)])
                e_prec = (2 * k + 10) * 2.0**-prec * scale
                if kernel:
                    a_up = abs(float(up))
                    e_prec = e_prec + 2.0**-prec * a_up * (
                        (2 * k + 10) * (big_a[row] + big_b[row] + 2 * big_z[row]) * terms.chi[row]
                        + (8 + 2 * x[row]) * zg[row])
            if _small(g, e_prec, fmt) or prec >= MAX_PRECISION:
                if not _small(g, e_prec, fmt):
                    status = Status.ITERATION_LIMIT
                break
            prec *= 2
        e = e_prec + FLOAT64.unit_roundoff * np.abs(g)  # conversion to float64
        top = max(top, prec)
        grad[row], err[row] = g, e
    reason = "" if status == Status.CONVERGED else f"precision cap {MAX_PRECISION} bits reached"
    return finish(problem, grad, err, method="sympy_mpmath", bound=False, evaluations=evaluations,
                  status=status, reason=reason, details={"max_precision": top})


def _mpf(x: Fraction) -> Any:
    return mpmath.mpf(x.numerator) / x.denominator if x.denominator != 1 else mpmath.mpf(x.numerator)


def _small(g: np.ndarray, e: np.ndarray, fmt: FloatFormat) -> bool:
    """True when the precision error is below 1/8 ulp of ``fmt`` at g (or a quarter of its smallest subnormal)."""
    return bool(np.all(e <= np.maximum(fmt.ulp(g) / 8, fmt.smallest_subnormal / 4)))
