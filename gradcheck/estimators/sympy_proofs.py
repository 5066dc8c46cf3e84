"""SymPy proofs of the closed forms: gradient and softmax Jacobian, plain and with the kernel options.

For K classes build the loss ``L = -sum_c w_c y_c log(exp(z_c) / sum_j exp(z_j))`` with smoothed
soft targets ``y_c = (1 - eps) t_c + eps / K``, differentiate, and decide that the difference with
the closed form is zero: after differentiation no logarithm is left, so substituting
``E_j = exp(z_j)`` makes the difference a rational function of ``E, t, w, eps``, and ``cancel``
reduces a rational function that is identically zero to exactly 0 (a decision procedure, not a
heuristic simplification). The kernel kinds (softcap, z-loss, upstream factor as symbols) replace
tanh, exp and the logsumexp by symbols first and refute with a witness point (:func:`decide`).
Proofs are time-bounded (checked between elements) and cached on disk under
``$GRADCHECK_CACHE_DIR/sympy_proofs`` (default ``~/.cache/gradcheck``); docs/methods.md,
"SymPy proofs".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradcheck.errors import InvalidArgument, require

sp = require("sympy", extra="proofs")

PROOF_VERSION = 2  # bump when a statement or the decision procedure changes: old cache entries are ignored
KINDS = ("gradient", "jacobian", "lse_gradient", "kernel_gradient", "kernel_jacobian", "kernel_hessian")
KERNEL_KINDS = ("kernel_gradient", "kernel_jacobian", "kernel_hessian")
# what prove_all (the study's report) proves by default: the three plain identities, as before the
# kernel options (the study decides whether to add KERNEL_KINDS; the Hessian's K**2 second
# derivatives take about 35 s at K = 6). ``gradcheck prove`` proves every kind.
DEFAULT_KINDS = KINDS[:3]


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
