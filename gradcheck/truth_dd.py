"""The certified truth's fast path: double-double enclosures of the gradient, decided in bulk.

Every number here is a double-double ``(hi, lo)`` of float64 arrays, built only from IEEE 754
additions and multiplications (each correctly rounded), so every step has a proven relative error
bound (docs/exact.md, "The fast path"); no libm function is trusted. Per row the shifted exponentials
``e_c = exp(z_c - max z)`` are evaluated once (table + short Taylor polynomial), their sum ``R`` once
(pairwise), the row's factor once; each element is one product and a rounding decision. What this
cannot decide (an enclosure that straddles a rounding boundary, a value out of its range) is returned
as NaN and goes to the mpmath slow path, which is exact.

Scope: class-index targets without label smoothing and without softcap (z-loss, class weights of any
sign, ignored rows and upstream gradients included). Other problems use the oracle prefilter.

Bounds: Joldes, Muller, Popescu, "Tight and rigorous error bounds for basic building blocks of
double-word arithmetic", ACM TOMS 44(2), 2017 (JMP below): AccurateDWPlusDW (their Algorithm 6)
has relative error <= 3u^2 + 13u^3, DWTimesDW1 (Algorithm 10) <= 7u^2, DWTimesFP1 (Algorithm 7)
<= 1.5u^2 + 4u^3, with u = 2**-53, as long as nothing underflows or overflows. This module charges
each of them more (ADD_ERR, MUL_ERR), and keeps every operand inside [2**-900, 2**500] except where
an absolute floor covers underflow.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np

from gradcheck.dtypes import FloatFormat, round_to_format

U = 2.0**-53
U2 = U * U  # 2**-106
ADD_ERR = 4 * U2  # JMP Algorithm 6: 3u^2 + 13u^3
MUL_ERR = 8 * U2  # JMP Algorithm 10: 7u^2
MULD_ERR = 2 * U2  # JMP Algorithm 7: 1.5u^2 + 4u^3
SPLITTER = 134217729.0  # 2**27 + 1 (Veltkamp/Dekker)

TABLE_BITS = 16  # exp(r) for |r| <= ln2 / 2**17: three Taylor terms in double-double (docs/exact.md)
MIN_SHIFT = -600.0  # exp below e**-600 ~ 2**-865.6 is not evaluated: enclosed by [0, E_CUT]
E_CUT = 2.0**-865
# relative error of exp_dd, each part derived in docs/exact.md ("The fast path", step 1); charged 2**-98
EXP_ERR = 2.0**-98
FLOOR = 2.0**-1060  # absolute: covers the underflow of a few low parts (at most 2**-1075 each)
SAFE = 1 + 2.0**-40  # inflation of a bound computed in float64 (its own few roundings)


# ---- error-free transformations and double-double arithmetic (JMP) ------------------------------

def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``s + e == a + b`` exactly, ``s = fl(a + b)`` (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``s + e == a + b`` exactly when ``|a| >= |b|`` (Dekker)."""
    s = a + b
    return s, b - (s - a)


def split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a == h + l`` with 26-bit halves (Veltkamp); valid for ``|a| < 2**996``."""
    c = SPLITTER * a
    h = c - (c - a)
    return h, a - h


def two_prod(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``p + e == a * b`` exactly (Dekker), unless ``e`` underflows (then ``|error| <= 2**-1075``)."""
    p = a * b
    ah, al = split(a)
    bh, bl = split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def dd_add(xh: Any, xl: Any, yh: Any, yl: Any) -> tuple[np.ndarray, np.ndarray]:
    """AccurateDWPlusDW (JMP Algorithm 6): relative error <= ADD_ERR of the exact sum of the inputs."""
    sh, sl = two_sum(xh, yh)
    th, tl = two_sum(xl, yl)
    vh, vl = fast_two_sum(sh, sl + th)
    return fast_two_sum(vh, tl + vl)


def dd_mul(xh: Any, xl: Any, yh: Any, yl: Any) -> tuple[np.ndarray, np.ndarray]:
    """DWTimesDW1 (JMP Algorithm 10): relative error <= MUL_ERR."""
    ch, cl1 = two_prod(xh, yh)
    cl3 = cl1 + (xh * yl + xl * yh)
    return fast_two_sum(ch, cl3)


def dd_mul_d(xh: Any, xl: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """DWTimesFP1 (JMP Algorithm 7): relative error <= MULD_ERR."""
    ch, cl1 = two_prod(xh, y)
    th, tl1 = fast_two_sum(ch, xl * y)
    return fast_two_sum(th, tl1 + cl1)


def dd_of(x: Fraction | float) -> tuple[float, float]:
    """The double-double nearest ``x`` (hi = RN(x), lo = RN(x - hi)): relative error <= u^2."""
    x = Fraction(x)
    hi = float(x)
    return hi, float(x - Fraction(hi))


# ---- exp --------------------------------------------------------------------------------------

_LN2_PARTS: list[float] = []
_TABLE: list[np.ndarray] = []


def _constants() -> tuple[list[float], np.ndarray, np.ndarray]:
    """ln2 / 2**16 in four 27-bit pieces (so that k * piece is exact for |k| < 2**26) and the table
    2**(j / 2**16), j < 2**16, as double-doubles (each within 2**-105 relative: docs/exact.md)."""
    if not _TABLE:
        iv = type(mpmath.iv)()  # interval arithmetic at 300 bits: each constant within 2**-280 of exact
        iv.prec = 300
        c = iv.log(2) / 2**TABLE_BITS
        parts = []
        for _ in range(3):
            m, e = math.frexp(float(_mid(c)))
            piece = math.ldexp(math.floor(m * 2**27), e - 27)  # 27 leading bits of c
            parts.append(piece)
            c = c - piece
        parts.append(float(_mid(c)))
        # two levels of 256 entries, multiplied out in double-double: 2 u^2 + MUL_ERR each
        t1 = [dd_of(_mid(iv.mpf(2) ** (iv.mpf(j << 8) / 2**TABLE_BITS))) for j in range(256)]
        t2 = [dd_of(_mid(iv.mpf(2) ** (iv.mpf(j) / 2**TABLE_BITS))) for j in range(256)]
        h1, l1 = (np.repeat(np.array(v), 256) for v in zip(*t1))
        h2, l2 = (np.tile(np.array(v), 256) for v in zip(*t2))
        th, tl = dd_mul(h1, l1, h2, l2)
        _LN2_PARTS.extend(parts)
        _TABLE.extend([th, tl])
    return _LN2_PARTS, _TABLE[0], _TABLE[1]


def _mid(x: Any) -> Fraction:
    """The midpoint of an mpmath interval, exactly (its width is below 2**-280 here)."""
    ends = []
    for sign, man, exp, _ in x._mpi_:
        man = -man if sign else man
        ends.append(Fraction(man * 2**exp) if exp >= 0 else Fraction(man, 2**-exp))
    assert abs(ends[1] - ends[0]) <= Fraction(1, 2**280) * max(1, abs(ends[0]))
    return (ends[0] + ends[1]) / 2


CHUNK = 1 << 13  # elementwise passes run on pieces of 8192 elements (64 KiB per array: cache-resident)


def exp_dd(sh: np.ndarray, sl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_exp_dd` in cache-sized pieces (the same values)."""
    if sh.size <= CHUNK:
        return _exp_dd(sh, sl)
    fh, fl = np.ravel(sh), np.ravel(sl)
    oh, ol = np.empty(fh.size), np.empty(fh.size)
    for i in range(0, fh.size, CHUNK):
        oh[i:i + CHUNK], ol[i:i + CHUNK] = _exp_dd(fh[i:i + CHUNK], fl[i:i + CHUNK])
    return oh.reshape(sh.shape), ol.reshape(sh.shape)


def _exp_dd(sh: np.ndarray, sl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``exp(sh + sl)`` as a double-double within ``EXP_ERR`` relative, for ``MIN_SHIFT <= sh <= 0``.

    s = k ln2 / 2**16 + r, |r| <= ln2 / 2**17 (k * piece exact); exp(s) = 2**(k >> 16) T[k & 0xffff]
    exp(r), exp(r) = 1 + r + r^2/2 + r^3 (1/6 + r/24 + r^2/120) + O(r^6) (docs/exact.md, step 1).
    """
    (c1, c2, c3, c4), th, tl = _constants()
    k = np.rint(sh * (2**TABLE_BITS / math.log(2)))
    t1 = sh - k * c1  # exact (Sterbenz for k != 0)
    h, l1 = two_sum(t1, -(k * c2))  # k * c2 exact
    h, l2 = two_sum(h, -(k * c3))
    h, l3 = two_sum(h, sl)
    low = ((l1 + l2) + l3) - k * c4
    rh, rl = fast_two_sum(h, low)
    # exp(r) - 1 = r + r^2 / 2 + F: r^2 exactly, F in float64 (|F| < 2**-55)
    ph, pl = two_prod(rh, rh)
    f = rh * ph * (1.0 / 6 + rh * (1.0 / 24 + rh * (1.0 / 120)))
    wh, wl = two_sum(rh, 0.5 * ph)
    tail = wl + (rl + (0.5 * pl + rh * rl)) + f
    eh, el = fast_two_sum(1.0, wh)
    eh, el = fast_two_sum(eh, el + tail)
    ki = k.astype(np.int32)  # |k| < 2**26
    j = ki & ((1 << TABLE_BITS) - 1)
    n = ki >> TABLE_BITS
    vh, vl = dd_mul(np.take(th, j), np.take(tl, j), eh, el)
    return np.ldexp(vh, n, out=vh), np.ldexp(vl, n, out=vl)


def dd_sum_rows(h: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairwise double-double sum of each row of nonnegative terms; returns (hi, lo, levels).

    Each level is one dd_add per pair, so the relative error is at most ``levels * ADD_ERR`` (first
    order; the terms are nonnegative, so every partial sum is at most the total).
    """
    levels = 0
    while h.shape[1] > 1:
        if h.shape[1] % 2:
            h = np.concatenate([h, np.zeros((h.shape[0], 1))], axis=1)
            lo = np.concatenate([lo, np.zeros((lo.shape[0], 1))], axis=1)
        half = h.shape[1] // 2
        h, lo = dd_add(h[:, :half], lo[:, :half], h[:, half:], lo[:, half:])
        levels += 1
    return h[:, 0].copy(), lo[:, 0].copy(), levels


# ---- decisions --------------------------------------------------------------------------------

def decide(vh: np.ndarray, vl: np.ndarray, bound: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Where every number of ``[vh + vl - bound, vh + vl + bound]`` rounds to the same number of ``fmt``,
    that number (as float64, signed zeros included); NaN elsewhere.

    ``d = RN_fmt(vh)`` is the candidate; ``t = (vh - d) + vl`` is the offset from it (``vh - d`` exact by
    Sterbenz, one rounding in the sum); the enclosure must lie strictly inside the half-gaps around d
    (the gap below a power of two is half the one above).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        d = round_to_format(vh, fmt).astype(np.float64)
        t = (vh - d) + vl
        slack = bound * SAFE + 2 * U * np.abs(t)
        up, down = t + slack, t - slack
        ulp = fmt.ulp(d)
        m, _ = np.frexp(np.abs(d))
        power = (m == 0.5) & (np.abs(d) > fmt.tiny)
        half_up = np.where(power & (d < 0), ulp / 4, ulp / 2)  # toward larger values
        half_down = np.where(power & (d > 0), ulp / 4, ulp / 2)
        ok = (up < half_up) & (down > -half_down) & np.isfinite(d) & np.isfinite(t) & np.isfinite(slack)
        zero = d == 0
        # a zero result: the enclosure must not contain 0, its side gives the sign
        ok &= ~zero | (vh + vl - slack > 0) | (vh + vl + slack < 0)
        d = np.where(zero, np.where(vh > 0, 0.0, -0.0), d)
    return np.where(ok, d, np.nan)


# ---- the gradient -----------------------------------------------------------------------------

LIMIT = 2.0**400  # row factors (u S / D, u B, u B lse) beyond [2**-400, 2**400] go to the slow path


def applies(problem: Any) -> bool:
    """The problems this fast path covers (module docstring)."""
    return problem.index_targets and not problem.label_smoothing and problem.softcap is None


def grad_decided(problem: Any, rows: Any, fmt: FloatFormat, todo: np.ndarray) -> np.ndarray:
    """``(N, K)``: the correctly rounded gradient where the enclosure decides it, NaN elsewhere.

    ``rows`` is exact.py's ``_RowFacts`` (the exact rationals D, B and the upstream gradients);
    only rows with something in ``todo`` are evaluated, in blocks of about BLOCK elements.
    """
    from gradcheck.oracle import for_row_blocks

    _constants()
    n, k = problem.logits.shape
    out = np.full((n, k), np.nan)
    live = np.flatnonzero(todo.any(axis=1))
    if live.size == 0:
        return out
    # per row, exactly: F = u S / D and uB = u * 2 lambda / Dz, as double-doubles
    f = np.zeros((n, 2))
    ub = np.zeros((n, 2))
    ok = np.zeros(n, dtype=bool)
    weights = problem.weight
    for r in live:
        t = int(problem.targets[r])
        u = rows.upstream[r]
        s = Fraction(1) if weights is None else Fraction(float(weights[t]))
        fr, br = u * s / rows.divisor, u * rows.b
        ok[r] = all(x == 0 or Fraction(1, 2**400) < abs(x) < 2**400 for x in (fr, br))
        f[r], ub[r] = dd_of(fr), dd_of(br)
    step = max(1, BLOCK // max(k, 1))
    blocks = [live[i:i + step] for i in range(0, live.size, step)]

    def work(lo: int, hi: int) -> None:
        for b in blocks[lo:hi]:
            _block(problem, rows, fmt, b[ok[b]], f, ub, out)

    for_row_blocks(len(blocks), BLOCK, work)  # one block of rows per task, on the oracle's threads
    return out


BLOCK = 1 << 16


def _block(problem: Any, rows: Any, fmt: FloatFormat, idx: np.ndarray, f: np.ndarray, ub: np.ndarray,
           out: np.ndarray) -> None:
    """Rows ``idx``: docs/exact.md, "The fast path", steps 1-5."""
    if idx.size == 0:
        return
    z = problem.logits[idx].astype(np.float64)
    m = len(idx)
    rr = np.arange(m)
    a = np.argmax(z, axis=1)
    zmax = z[rr, a]
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        sh, sl = two_sum(z, -zmax[:, None])  # s = z - max z exactly (sh + sl)
        masked = np.isneginf(z)
        cut = ~masked & ~(sh >= MIN_SHIFT)  # beyond e**-600, or z - max z overflowed
        off = masked | cut
        sh = np.where(off, 0.0, sh)
        sl = np.where(off, 0.0, sl)
        # step 1: e_c within EXP_ERR (exp(0) = 1 exactly at the argmax)
        eh, el = exp_dd(sh, sl)
        eh[off] = 0.0
        el[off] = 0.0
        # step 2: R = sum of the others, pairwise; Z = 1 + R
        eh[rr, a] = 0.0
        rh, rl, levels = dd_sum_rows(eh, el)
        eh[rr, a] = 1.0
        r_err = (rh * (EXP_ERR + levels * ADD_ERR) + cut.sum(axis=1) * E_CUT) * SAFE
        zh, zl = dd_add(np.ones(m), np.zeros(m), rh, rl)
        d_z = (r_err / zh + ADD_ERR) * SAFE  # relative error of Z (Z >= 1)
        # step 3: 1 / Z by one Newton step, its error from the computed residual
        y0 = 1.0 / zh
        ph, pl = dd_mul_d(zh, zl, y0)
        rho, _ = dd_add(np.ones(m), np.zeros(m), -ph, -pl)
        ih, il = two_sum(y0, y0 * rho)
        d_inv = (rho * rho + MULD_ERR + ADD_ERR + 2 * U * np.abs(rho) + U2) * SAFE + d_z
        # step 4: lse = max z + log Z (z-loss only): log Z = y0' + log1p(Z exp(-y0') - 1)
        fh, fl = f[idx, 0], f[idx, 1]
        bh, bl = ub[idx, 0], ub[idx, 1]
        if np.any(bh):
            g0 = np.log(zh)
            xh, xl = exp_dd(-g0, np.zeros(m))
            qh, ql = dd_mul(zh, zl, xh, xl)
            r0h, r0l = dd_add(qh, ql, -np.ones(m), np.zeros(m))
            l1h, l1l = dd_add(r0h, r0l, -0.5 * r0h * r0h, np.zeros(m))  # log1p(r0) ~ r0 - r0^2 / 2
            ah, al = two_sum(zmax, g0)
            lh, ll = dd_add(ah, al, l1h, l1l)
            lse_err = (d_z * (1 + d_z) + np.abs(qh) * (EXP_ERR + MUL_ERR) + ADD_ERR * (2 * np.abs(r0h) + 2 * np.abs(lh))
                       + np.abs(r0h) ** 3) * SAFE
            th, tl = dd_mul(bh, bl, lh, ll)  # u B lse
            big = np.abs(th) > LIMIT
            hh, hl = dd_add(fh, fl, th, tl)  # F + u B lse
            h_err = (np.abs(bh) * (lse_err + MUL_ERR * np.abs(lh)) + ADD_ERR * np.abs(hh) + U2 * np.abs(fh)) * SAFE
        else:
            lh = ll = lse_err = th = tl = None
            big = np.zeros(m, dtype=bool)
            hh, hl, h_err = fh, fl, U2 * np.abs(fh)
        # step 5: every element but the target: g_c = e_c G, G = (F + u B lse) / Z
        gh, gl = dd_mul(hh, hl, ih, il)
        g_err = (np.abs(gh) * (d_inv + MUL_ERR) + h_err * np.abs(ih) * (1 + d_inv)) * SAFE
        dec = np.empty(z.shape)
        step = max(1, CHUNK // m)
        for c0 in range(0, z.shape[1], step):
            ec, lc = eh[:, c0:c0 + step], el[:, c0:c0 + step]
            vh, vl = dd_mul(ec, lc, gh[:, None], gl[:, None])
            bound = (np.abs(vh) * (EXP_ERR + MUL_ERR) + ec * g_err[:, None]) * SAFE + FLOOR
            dec[:, c0:c0 + step] = decide(vh, vl, bound, fmt)
        # masked classes that are not the target: p = 0 and A = 0, exactly +0
        dec[masked] = 0.0
        # cut classes: 0 < e_c <= E_CUT, so |g_c| <= E_CUT (|G| + err): a signed zero when that underflows
        tiny = E_CUT * (np.abs(gh) + g_err) * SAFE < fmt.smallest_subnormal / 2
        sure = np.abs(gh) > g_err
        dec[cut] = np.broadcast_to(np.where(tiny & sure, np.copysign(0.0, gh), np.nan)[:, None], cut.shape)[cut]
        # the target: g_t = (-F X + u B lse e_t) / Z, X = R at the argmax, Z - e_t elsewhere (>= Z / 2)
        t = problem.targets[idx]
        et_h, et_l = eh[rr, t], el[rr, t]
        at_max = t == a
        xh2, xl2 = dd_add(zh, zl, -et_h, -et_l)
        xh2, xl2 = np.where(at_max, rh, xh2), np.where(at_max, rl, xl2)
        x_err = np.where(at_max, r_err, d_z * zh + et_h * EXP_ERR + ADD_ERR * np.abs(xh2)) * SAFE
        yh, yl = dd_mul(-fh, -fl, xh2, xl2)
        y_err = np.abs(fh) * (x_err + np.abs(xh2) * (MUL_ERR + U2))
        if lh is not None:
            wh, wl = dd_mul(th, tl, et_h, et_l)
            y_err = y_err + np.abs(bh) * (lse_err * et_h + np.abs(lh * et_h) * (EXP_ERR + 2 * MUL_ERR + U2))
            yh, yl = dd_add(yh, yl, wh, wl)
        y_err = (y_err + ADD_ERR * np.abs(yh)) * SAFE
        vth, vtl = dd_mul(yh, yl, ih, il)
        t_bound = (np.abs(vth) * (d_inv + MUL_ERR) + y_err * np.abs(ih) * (1 + d_inv)) * SAFE + FLOOR
        dec_t = decide(vth, vtl, t_bound, fmt)
        dec_t[off[rr, t]] = np.nan  # a masked or cut target: the slow path's rational cases
        dec[rr, t] = dec_t
        dec[big] = np.nan
    out[idx] = dec
