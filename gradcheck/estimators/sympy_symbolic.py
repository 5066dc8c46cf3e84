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
from gradcheck.oracle import gamma
from gradcheck.problem import Problem

sp = require("sympy", extra="proofs")

PROOF_VERSION = 1  # bump when a statement or the decision procedure changes: old cache entries are ignored
KINDS = ("gradient", "jacobian", "lse_gradient")
MAX_K = 32  # lambdify limit: SymPy's diff of the K-term loss grows like K**2 (about 5 s at K = 32)
MAX_PRECISION = 4096  # bits, sympy_mpmath's cap
NUMPY_ELEMENTARY_ULPS = 2.0  # numpy float64 exp, as in docs/oracle.md


@dataclass(frozen=True)
class Proof:
    """The outcome of one symbolic proof.

    Attributes:
        kind: "gradient" (dL/dz_i = p_i sum_o w_o y_o - w_i y_i, textbook loss with weights, soft
            targets and smoothing), "jacobian" (dp_i/dz_j = delta_ij p_i - p_i p_j) or
            "lse_gradient" (the same gradient for the log-sum-exp form that is lambdified).
        k: number of classes.
        status: "proved", "timeout" or "failed" (a nonzero remainder: the closed form is wrong).
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
    diffs, z, words = _statement(kind, k)
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
        if not _is_zero(expr, z):
            status = "failed"
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


def prove_all(k_max: int = 8, *, kinds: tuple[str, ...] = KINDS, timeout: float = 120.0,
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


def sympy_gradient(problem: Problem, *, module: str = "numpy", precision: int | None = None) -> MethodResult:
    """The gradient from SymPy's lambdified derivative.

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
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s = z - z.max(axis=1, keepdims=True)
        g = np.stack([np.broadcast_to(np.asarray(col, dtype=np.float64), z.shape[:1])
                      for col in fn(list(s.T), list(v.T))], axis=1)
        # estimate (docs/methods.md): p_i from s, with relative error eps_p = a_i + rho + 2u
        a = np.where(np.isfinite(s), (np.abs(s) + NUMPY_ELEMENTARY_ULPS) * u, 0.0)
        rho = a.max(axis=1, keepdims=True) + gamma(k, u)
        eps_p = a + rho + 2 * u
        s_rows = v.sum(axis=1, keepdims=True)
        p = np.where(s_rows > 0, (g + v) / np.where(s_rows > 0, s_rows, 1.0), 0.0)
        big_a = np.abs(p) * np.maximum(s_rows - v, 0.0)
        big_b = v * np.abs(1.0 - p)
        err = v * (eps_p + 2 * u) + (big_a + big_b) * (eps_p + 2 * gamma(k, u) + u)
        err += (k + 8) * FLOAT64.smallest_subnormal * np.maximum(s_rows, 1.0)
        grad = g / d
        err = err / d + 2 * u * np.abs(grad)
    return finish(problem, grad, err, method="sympy_numpy", bound=False, evaluations=1)


def _mpmath_gradient(problem: Problem, fn: Callable, precision: int | None) -> MethodResult:
    """Per row: exact shift, evaluate at P bits, double P until the estimate decides the rounding."""
    fmt = problem.format
    n, k = problem.logits.shape
    z = problem.logits.astype(np.float64)
    d = problem.exact_divisor()
    grad = np.zeros((n, k))
    err = np.zeros((n, k))
    status = Status.CONVERGED
    top = 0
    evaluations = 0
    for row in range(n):
        v_exact = [problem.exact_weight(c) * problem.exact_target(row, c) for c in range(k)]
        if not any(v_exact):
            continue  # S = 0: the row's gradient is exactly 0
        prec = precision or 2 * fmt.precision + 20
        while True:
            evaluations += 1
            with mpmath.workprec(prec):
                za = mpmath.mpf(float(np.max(z[row])))
                s = [mpmath.fsub(mpmath.mpf(float(x)), za, exact=True) if np.isfinite(x) else mpmath.mpf("-inf")
                     for x in z[row]]
                v = [_mpf(x) for x in v_exact]
                dd = _mpf(d)
                vals = [x / dd for x in fn(s, v)]
                g = np.array([float(x) for x in vals])
                # relative 2**-prec per operation over about 2K + 10 operations on terms of size
                # (S p_i + v_i) / D (docs/methods.md, "SymPy numerics")
                scale = np.array([float((abs(x) + 2 * abs(vi)) / dd) for x, vi in zip(vals, v)])
                e_prec = (2 * k + 10) * 2.0**-prec * scale
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
