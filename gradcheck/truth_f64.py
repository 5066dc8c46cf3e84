"""The certified truth's float64 tier: enclosures in plain float64 for results narrower than float64.

A float32 (float16, bfloat16) result is decided by an enclosure about ``2**-40`` wide relative, far
from the ``2**-98`` of the double-double path (:mod:`gradcheck.truth_dd`), so for those formats each
element is one float64 exponential from the same table (:func:`exp_f64`, within ``EXP64``), one
product and a rounding decision; per row a pairwise float64 sum and one division. Every step has a
proven bound (docs/exact.md, "The float64 tier"); as in the double-double path no libm function is
trusted. What it does not decide is NaN and goes on to the double-double path, then to mpmath.

Scope: one-hot problems (class-index targets without label smoothing) without softcap or z-loss, where
the double-double path applies; class weights of either sign, ignored rows and upstream gradients
included.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradcheck import truth_dd as dd
from gradcheck.dtypes import FloatFormat
from gradcheck.oracle import shifts_are_exact

U = 2.0**-53
# exp_f64's relative error: the table entry's high part (u + 10u^2), the quadratic (u (1 + 2**-16) of
# rounding, |r|^3 / 6 < 2**-55.2 of truncation), the reduced argument (< 2**-69) and the product (u):
# 3.23u in all (docs/exact.md, "The float64 tier", step 1); charged 4u
EXP64 = 4 * U
INV_STEP = 2.0**dd.TABLE_BITS / math.log(2)
F64_REL = U + dd.F_REL  # the high part of the double-double row factor F


def exp_f64(s: np.ndarray) -> np.ndarray:
    """``exp(s)`` within ``EXP64`` relative for ``MIN_SHIFT <= s <= 0`` (``exp(0) = 1`` exactly).

    ``k = rint(s 2**16 / ln 2)``, ``r = (s - k c1) - k fl(c2 + c3)`` (``k c1`` exact, the subtraction exact
    by Sterbenz), ``exp(r) ~ 1 + r + r^2 / 2`` (``|r| < 2**-17.5``), times the table's high part
    ``2**((k mod 2**16) / 2**16)`` and ``2**(k >> 16)`` (exact: the result is normal).
    """
    (c1, c2, c3, _), th, _ = dd._constants()
    k = np.rint(s * INV_STEP)
    r = (s - k * c1) - k * (c2 + c3)
    p = 1.0 + (r + 0.5 * (r * r))
    ki = k.astype(np.intp)  # intp indices: np.take converts any other kind on every call
    e = np.take(th, ki & ((1 << dd.TABLE_BITS) - 1), mode="clip")  # 0 <= index < 2**16
    e *= p
    return np.ldexp(e, (ki >> dd.TABLE_BITS).astype(np.int32), out=e)


def sum_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Row sums of nonnegative terms by pairwise halving, and the depth: every term goes through at most
    ``depth`` float64 additions, so the sum is within ``gamma(depth) = depth u / (1 - depth u)`` relative.

    A level adds the two halves; an odd last column is added to the first (two additions at that level).
    ``x`` is not modified.
    """
    depth = 0
    while x.shape[1] > 1:
        w = x.shape[1]
        h = w // 2
        y = x[:, :h] + x[:, h:2 * h]
        depth += 1
        if w % 2:
            y[:, 0] += x[:, w - 1]
            depth += 1
        x = y
    return x[:, 0].copy(), depth


def applies(problem: Any, rows: Any) -> bool:
    """The problems this tier covers (module docstring)."""
    return (dd.applies(problem) and problem.index_targets and not problem.label_smoothing
            and problem.softcap is None and not rows.lam)


def grad_decided(problem: Any, rows: Any, fmt: FloatFormat, todo: np.ndarray) -> np.ndarray:
    """``(N, K)``: the correctly rounded gradient in ``fmt`` (precision below 53) where the float64
    enclosure decides it, NaN elsewhere; only rows with something in ``todo`` are evaluated."""
    assert fmt.precision < 53, "the float64 tier cannot decide float64 results"
    dd._constants()
    return dd.by_row_blocks(problem, rows, todo, max(1, BLOCK // max(problem.k, 1)),
                            lambda idx, f, ub, out: _block(problem, fmt, idx, f[:, 0], out))


BLOCK = 1 << 16


def _block(problem: Any, fmt: FloatFormat, idx: np.ndarray, f: np.ndarray, out: np.ndarray) -> None:
    """Rows ``idx``: docs/exact.md, "The float64 tier", steps 1-5 (steps 1-4, and the decision of float32
    results, by truth_jit.tier_rows where the kernels run: the same operations)."""
    from gradcheck import truth_jit

    if idx.size == 0:
        return
    t = problem.targets[idx]
    if truth_jit.enabled() and np.all((t >= 0) & (t < problem.k)):  # (the kernel indexes by t unchecked)
        g, bound, g_row, g_rel, off = _enclose_jit(problem, idx, f, decide=fmt.name == "float32")
        dec = g if bound is None else dd.decide(g, 0.0, bound, fmt)
    else:
        g, bound, g_row, g_rel, off = enclose(problem, idx, f)
        dec = dd.decide(g, 0.0, bound, fmt)
    if off is not None:
        # step 5: masked non-target classes are exactly +0, a cut one the zero of G's sign when |g| <= E_CUT |G|
        # is below half the smallest subnormal; a masked or cut target: the slow path
        masked, cut = off
        with np.errstate(over="ignore", invalid="ignore"):
            dd.off_classes(dec, masked, cut, g_row, np.abs(g_row) * g_rel, fmt)
        rr, t = np.arange(len(idx)), problem.targets[idx]
        hit = masked[rr, t] | cut[rr, t]
        dec[rr[hit], t[hit]] = np.nan
    out[idx] = dec


def enclose(problem: Any, idx: np.ndarray, f: np.ndarray) -> tuple:
    """Rows ``idx`` (one-hot, no softcap or z-loss; ``f`` the float64 row factors ``F``): ``(g, bound,
    G, G_rel, off)`` with ``|g - dL/dz| <= bound`` for every class that is neither masked nor cut,
    the row factor ``G = F / Z`` within ``G_rel`` relative, and ``off = (masked, cut)`` (None when the
    block has neither): docs/exact.md, "The float64 tier", steps 1-4."""
    s = problem.logits[idx].astype(np.float64)
    m = len(idx)
    rr = np.arange(m)
    a = np.argmax(s, axis=1)
    off = None
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        # step 1: s = fl(z - max z) <= 0 within u |s| (a relative e**(u|s|) - 1 <= 2u|s| on exp(s)), or
        # exactly for inputs narrower than float64 whose magnitudes span few binades
        shift = 0.0 if _exact_shifts(s, problem.format.precision) else 2 * U
        np.subtract(s, s[rr, a][:, None], out=s)
        inside = s >= dd.MIN_SHIFT
        if not inside.all():  # masked (-inf) and cut (below e**-600) classes: not evaluated
            masked = np.isneginf(s)
            out_ = ~inside
            off = masked, out_ & ~masked
            s[out_] = 0.0
        e = exp_f64(s)
        if off is not None:
            e[off[0] | off[1]] = 0.0
        # step 2: R = sum of the others (the argmax's e is exactly 1), Z = 1 + R
        e[rr, a] = 0.0
        r, depth = sum_rows(e)
        e[rr, a] = 1.0
        smax = -s.min(axis=1)  # max |s| over the evaluated classes (0 at the others)
        gamma = depth * U / (1 - depth * U)
        r_abs = r * (EXP64 + shift * smax + gamma)
        if off is not None:
            r_abs = r_abs + off[1].sum(axis=1) * dd.E_CUT
        r_abs *= dd.SAFE
        z = 1.0 + r
        z_rel = r_abs / z + U
        # step 3: G = F / Z; every element but the target is e_c G
        g_row = f[idx] / z
        g_rel = (F64_REL + z_rel + U) * dd.SAFE
        g = e * g_row[:, None]
        bound = np.abs(g)
        if shift:
            bound *= (EXP64 + g_rel + U)[:, None] * dd.SAFE + (shift * dd.SAFE) * -s
        else:
            bound *= ((EXP64 + g_rel + U) * dd.SAFE)[:, None]
        bound += dd.FLOOR
        # step 4: the target, -G X with X = R at the argmax and 1 + (R - e_t) (>= Z / 2) elsewhere
        t = problem.targets[idx]
        et = e[rr, t]
        at_max = t == a
        y = r - et
        x = np.where(at_max, r, 1.0 + y)
        x_abs = np.where(at_max, r_abs, r_abs + et * (EXP64 + shift * -s[rr, t]) + U * np.abs(y) + U * x)
        gt = -(g_row * x)
        g[rr, t] = gt
        bound[rr, t] = np.abs(gt) * ((g_rel + x_abs / x + U) * dd.SAFE) + dd.FLOOR
    return g, bound, g_row, g_rel, off


def _enclose_jit(problem: Any, idx: np.ndarray, f: np.ndarray, decide: bool) -> tuple:
    """:func:`enclose` by truth_jit.tier_rows (the same values), or with ``decide`` the float32 decisions in
    place of ``g`` and None for ``bound``."""
    from gradcheck import truth_jit

    m, k = len(idx), problem.k
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    z = problem.logits[lo:hi] if hi - lo == m else problem.logits[idx]
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float64)  # (float16 and bfloat16: exact)
    z = np.ascontiguousarray(z)
    a = np.argmax(z, axis=1)
    exact = problem.format.precision < 53 and shifts_are_exact(*truth_jit.magnitudes(z), problem.format.precision)
    shift = 0.0 if exact else 2 * U  # (_exact_shifts in one pass)
    (c1, c2, c3, _), th, _ = dd._constants()
    g, bound = np.empty((m, k)), np.empty((m, k))
    g_row, g_rel, flags = np.empty(m), np.empty(m), np.zeros(m, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        truth_jit.tier_rows(z, a, problem.targets[idx], np.ascontiguousarray(f[idx]), np.array([c1, c2 + c3]), th,
                            truth_jit.POW2, shift, decide, g, bound, np.empty(max(1, k // 2)), g_row, g_rel, flags)
        masked, cut = dd.flagged_masks(z, a, flags)
        off = None if masked is None else (masked, cut)
    return g, None if decide else bound, g_row, g_rel, off


def _exact_shifts(z: np.ndarray, precision: int) -> bool:
    """True when every ``z - max z`` of the block is exact in float64 (:func:`shifts_are_exact` on its
    finite magnitudes; ``-inf`` shifts exactly)."""
    if precision >= 53:
        return False
    with np.errstate(invalid="ignore"):
        mag = np.abs(z)
        big = float(mag.max())
        if not np.isfinite(big):
            mag[np.isinf(mag)] = 0.0
            big = float(mag.max())
        small = float(mag.min())
        if small == 0:
            mag[mag == 0] = np.inf
            small = float(mag.min())
    return shifts_are_exact(big, small, precision)  # (all zeros or -inf: small is inf)
