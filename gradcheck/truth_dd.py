"""The certified truth's fast path: double-double enclosures of the gradient, decided in bulk.

Every number here is a double-double ``(hi, lo)`` of float64 arrays, built only from IEEE 754
additions and multiplications (each correctly rounded), so every step has a proven relative error
bound (docs/exact.md, "The fast path"); no libm function is trusted. Per row the shifted exponentials
``e_c = exp(z_c - max z)`` are evaluated once (table + short Taylor polynomial), their sum ``R`` once
(pairwise), the row's factor once; each element is one product and a rounding decision. What this
cannot decide (an enclosure that straddles a rounding boundary, a value out of its range) is returned
as NaN and goes to the mpmath slow path, which is exact.

Scope: every problem (index or probability targets, label smoothing, z-loss, softcap, class weights
of either sign, ignored rows, upstream gradients) with weights and targets below 2**300 in magnitude
and a softcap c in [2**-400, 2**400]. Under softcap ``z' = c tanh(z / c)`` and the chain factor
``h = 1 - tanh^2(z / c)`` are double-double enclosures too (:func:`softcap_dd`, from the same exp).

Bounds: Joldes, Muller, Popescu, "Tight and rigorous error bounds for basic building blocks of
double-word arithmetic", ACM TOMS 44(2), 2017 (JMP below): AccurateDWPlusDW (their Algorithm 6)
has relative error <= 3u^2 + 13u^3, DWTimesDW1 (Algorithm 10) <= 7u^2, DWTimesFP1 (Algorithm 7)
<= 1.5u^2 + 4u^3, with u = 2**-53, as long as nothing underflows or overflows. This module charges
each of them more (ADD_ERR, MUL_ERR), and keeps every operand inside [2**-900, 2**500] except where
an absolute floor covers underflow.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
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
EXP_ERR_COARSE = 2.0**-94  # exp_dd(coarse=True): the argument's low part in float64, < 2**-95.1 more (step 1)
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


def recip_dd(xh: np.ndarray, xl: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``1 / (xh + xl)`` by one Newton step from ``y0 = 1 / xh`` (docs/exact.md, "The fast path", step 3).

    Returns ``(ih, il, rel)``: ``rel`` bounds the relative error of the arithmetic, computed from the
    residual ``rho = 1 - x y0`` (so it needs no assumption on ``y0``); the input's own error is the caller's.
    """
    y0 = 1.0 / xh
    ph, pl = dd_mul_d(xh, xl, y0)
    rho, _ = dd_add(np.ones(xh.shape), np.zeros(xh.shape), -ph, -pl)
    ih, il = two_sum(y0, y0 * rho)
    return ih, il, (rho * rho + MULD_ERR + ADD_ERR + 2 * U * np.abs(rho) + U2) * SAFE


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


def _exp_dd(sh: np.ndarray, sl: np.ndarray, coarse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``exp(sh + sl)`` as a double-double within ``EXP_ERR`` relative (``EXP_ERR_COARSE`` when ``coarse``),
    for ``MIN_SHIFT <= sh <= 0``.

    s = k ln2 / 2**16 + r, |r| <= ln2 / 2**17 (k * piece exact); exp(s) = 2**(k >> 16) T[k & 0xffff]
    exp(r), exp(r) = 1 + r + r^2/2 + r^3 (1/6 + r/24 + r^2/120) + O(r^6), and T exp(r) = T + T (exp(r) - 1)
    (docs/exact.md, "The fast path", step 1). ``coarse`` forms the low part of r (``sl``, the last two
    pieces) in float64: 12 operations fewer, ``2**-95`` more error.
    """
    (c1, c2, c3, c4), th, tl = _constants()
    k = np.rint(sh * (2**TABLE_BITS / math.log(2)))
    t1 = sh - k * c1  # exact (Sterbenz for k != 0)
    h, l1 = two_sum(t1, k * -c2)  # k * c2 exact
    if coarse:  # |l1 + s_l| < 2**-43.7, |k (c3 + c4)| < 2**-45.5: three roundings < 2**-95.1 in all
        low = l1 + sl
        low -= k * (c3 + c4)
        rh, rl = two_sum(h, low)
    else:
        h, l2 = two_sum(h, k * -c3)
        low = l1 + l2
        if sl.any():  # (a zero low part adds exactly nothing)
            h, l3 = two_sum(h, sl)
            low += l3
        low -= k * c4
        rh, rl = fast_two_sum(h, low)
    # exp(r) - 1 = w_h + tail: r^2 / 2 = a^2 / 2 + a b + b^2 / 2 + r_h r_l + r_l^2 / 2 with a the leading 26 bits
    # of r_h and b = r_h - a (a^2 / 2, a b and b^2 / 2 exact); the cubic tail F (|F| < 2**-55) in float64
    c = SPLITTER * rh
    a = c - (c - rh)
    b = rh - a
    wh, wl = fast_two_sum(rh, (0.5 * a) * a)  # a^2 / 2 < |r_h| 2**-18
    f = (rh * rh) * rh * (1.0 / 6 + rh * (1.0 / 24 + rh * (1.0 / 120)))
    tail = wl + (rl + (a * b + (0.5 * (b * b) + rh * rl))) + f
    ki = k.astype(np.intp)  # |k| < 2**26; intp indices: np.take converts any other kind on every call
    j = ki & ((1 << TABLE_BITS) - 1)
    n = (ki >> TABLE_BITS).astype(np.int32)
    big, small = np.take(th, j, mode="clip"), np.take(tl, j, mode="clip")  # 0 <= j < 2**16
    # T (1 + w_h + tail) = T_h + T_h w_h (TwoProd) + [T_h tail + T_l w_h + T_l] (T_l tail < 2**-106 dropped)
    ph, pe = two_prod(big, wh)
    pe += big * tail + small * wh
    vh, vl = fast_two_sum(big, ph)  # 1 <= T_h < 2 and |p_h| < 2**-16
    vh, vl = fast_two_sum(vh, vl + (small + pe))
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


def dd_add_same_sign(xh: Any, xl: Any, yh: Any, yl: Any) -> tuple[np.ndarray, np.ndarray]:
    """SloppyDWPlusDW for normalised double-doubles of the same sign: relative error <= ADD_ERR.

    ``sh + sl = xh + yh`` exactly (TwoSum); ``fl(xl + yl)`` errs by at most ``u (|xl| + |yl|) <= u^2 (|xh| +
    |yh|)`` and ``fl(sl + w)`` by at most ``u (|sl| + |w|) <= 2u^2 |sh| (1 + u)``; the last FastTwoSum is exact.
    With no cancellation (same signs) that is ``3u^2 + O(u^3)`` of the sum (docs/exact.md, step 2; Yang et
    al., "On the robustness of double-word addition algorithms", arXiv:2404.05948, prove the sloppy
    addition exceeds ``3u^2`` only where Sterbenz's lemma applies to the high parts, i.e. opposite signs).
    """
    sh, sl = two_sum(xh, yh)
    return fast_two_sum(sh, sl + (xl + yl))


def _halve(h: np.ndarray, lo: np.ndarray, times: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Up to ``times`` levels of :func:`dd_sum_nonnegative` (columns ``w -> ceil(w / 2)`` each), and the levels
    they count; ``h`` and ``lo`` may be modified."""
    levels = 0
    for _ in range(times):
        w = h.shape[1]
        if w < 2:
            break
        half = w // 2
        nh, nl = dd_add_same_sign(h[:, :half], lo[:, :half], h[:, half:2 * half], lo[:, half:2 * half])
        levels += 1
        if w % 2:
            nh[:, 0], nl[:, 0] = dd_add_same_sign(nh[:, 0], nl[:, 0], h[:, w - 1], lo[:, w - 1])
            levels += 1
        h, lo = nh, nl
    return h, lo, levels


def dd_sum_nonnegative(h: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`dd_sum_rows` for nonnegative terms, by :func:`dd_add_same_sign` (11 operations a pair, not 20).

    An odd last column is added to the first at the same level, so that term and the first go through
    two additions there: ``levels`` counts the most additions any term goes through (the relative error is at
    most ``levels * ADD_ERR``, first order). The inputs are not modified.
    """
    h, lo, levels = _halve(h, lo, max(1, h.shape[1]).bit_length() * 2)
    return h[:, 0].copy(), lo[:, 0].copy(), levels


# ---- softcap: z' = c tanh(z / c) and h = 1 - tanh^2(z / c) ------------------------------------

TANH_SMALL = 2.0**-30  # |z / c| below this: tanh x = x - x^3/3 (docs/exact.md, "The fast path", step 0)
SMALL_ERR = 2.0**-111  # relative error of z' and of h on that branch (step 0)
LOG2E_LO = (1 / math.log(2)) * (1 - 2.0**-50)  # below log2(e): two roundings of 2**-53 each
SAT_CLIP = 1e5  # 2|x| beyond this counts as 1e5 in the saturated bound (h <= 4 e**-1e5 is 0 anyway)


@dataclass(frozen=True)
class Capped:
    """The softcapped logits of a block of rows, each ``(m, K)`` (docs/exact.md, "The fast path", step 0).

    ``z' = zh + zl`` within ``zeta`` (absolute); the chain factor ``h = (hh + hl) 2**hexp`` within
    ``h_rel`` (relative) where ``sat`` is False (``hexp`` is 0 unless ``2 |z / c| > 600``); where ``sat``
    is True (``2 |z / c| > 1200``) only ``0 < h < 2**hlog`` is known (``hlog`` bounds every h); ``zero``
    marks the ``-inf`` logits (``z' = -c``, ``h = 0``).
    """

    zh: np.ndarray
    zl: np.ndarray
    zeta: np.ndarray
    hh: np.ndarray
    hl: np.ndarray
    h_rel: np.ndarray
    hexp: np.ndarray
    sat: np.ndarray
    hlog: np.ndarray
    zero: np.ndarray


def softcap_dd(z: np.ndarray, c: float) -> Capped:
    """``c tanh(z / c)`` and ``1 - tanh^2(z / c)`` as double-doubles with proven error bounds, from
    ``E = exp(-2 |z / c|)`` (:func:`exp_dd`): ``tanh|x| = (1 - E) / (1 + E)``, ``h = 4 E / (1 + E)^2``
    (no cancellation when saturated); docs/exact.md, "The fast path", step 0. ``2**-400 <= c <= 2**400``."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        zero = np.isneginf(z)
        zf = np.where(zero, 0.0, z)
        q = zf / c
        aq = np.abs(q)
        small = aq < TANH_SMALL
        # x = z / c as a double-double: q c = ph + pl exactly, z - ph exact (Sterbenz), two roundings after
        ph, pl = two_prod(q, np.full(q.shape, c))
        xl = ((zf - ph) - pl) / c
        xh, xl = fast_two_sum(q, xl)
        x_err = 4 * U2 * aq  # |x - (xh + xl)| <= 2.01 u |xl| <= 4 u^2 |q|
        sign = np.where(zf < 0, -1.0, 1.0)  # the sign of q and of xh
        yh, yl = -2 * np.abs(xh), -2 * sign * xl  # -2 |x|, exactly
        regular = ~small & ~zero & (yh >= MIN_SHIFT)
        flat = ~small & ~zero & ~regular  # 2 |x| > 600 (or z / c overflowed): E < 2**-865, tanh |x| ~ 1
        band = flat & (yh >= 2 * MIN_SHIFT)  # 600 < 2 |x| <= 1200: h from exp(-|x|)^2, scaled
        sat = flat & ~band  # 2 |x| > 1200: h < 2**-1729, only bounded
        eh, el = exp_dd(np.where(regular, yh, 0.0), np.where(regular, yl, 0.0))
        e_rel = (EXP_ERR + 2 * x_err) * SAFE  # exp's own error, and e**(2 x_err) - 1 for the argument's
        one, nil = np.ones(z.shape), np.zeros(z.shape)
        nh, nl = dd_add(one, nil, -eh, -el)  # 1 - E, absolute error n_err
        n_err = (e_rel * eh + ADD_ERR * np.abs(nh)) * SAFE
        wh, wl = dd_add(one, nil, eh, el)  # 1 + E in (1, 2], relative error w_rel
        ih, il, i_rel = recip_dd(wh, wl)
        i_rel = i_rel + (e_rel * eh / wh + ADD_ERR) * SAFE
        th, tl = dd_mul(nh, nl, ih, il)  # tanh |x|
        t_err = (np.abs(th) * (i_rel + MUL_ERR) + n_err * ih * (1 + i_rel)) * SAFE
        zh, zl = dd_mul_d(th, tl, np.full(z.shape, c))
        zh, zl = sign * zh, sign * zl
        zeta = (c * t_err + MULD_ERR * np.abs(zh)) * SAFE + FLOOR
        i2h, i2l = dd_mul(ih, il, ih, il)
        hh, hl = dd_mul(eh, el, i2h, i2l)
        hh, hl = 4 * hh, 4 * hl
        h_rel = (e_rel + 2 * i_rel + 2 * MUL_ERR) * SAFE
        # |x| < 2**-30: z' = z - z x^2 / 3 within |z| (2/15) x^4 (+ the roundings), h = 1 - x^2 within (2/3) x^4
        q2 = q * q
        zh = np.where(small, zf, zh)
        zl = np.where(small, -(zf * q2) / 3, zl)
        zeta = np.where(small, np.abs(zf) * SMALL_ERR + FLOOR, zeta)
        hh = np.where(small, 1.0, hh)
        hl = np.where(small, -q2, hl)
        h_rel = np.where(small, SMALL_ERR + FLOOR, h_rel)
        # 2 |x| > 600: tanh |x| = 1 - 2E / (1 + E) within 2E <= 2**-864
        zh = np.where(flat, sign * c, zh)
        zl = np.where(flat | zero, 0.0, zl)
        zeta = np.where(flat, c * 2.0**-864 + FLOOR, zeta)
        # 600 < 2 |x| <= 1200: v = exp(-|x|) = m 2**e (m in [1/2, 1), exact scaling), h = 4 m^2 2**(2e) (1 + E)**-2,
        # the last factor within 2E <= 2**-864 of 1
        hexp = np.zeros(z.shape, dtype=np.int64)
        if band.any():
            vh, vl = exp_dd(yh[band] / 2, yl[band] / 2)
            mh, ve = np.frexp(vh)
            ml = np.ldexp(vl, -ve)
            m2h, m2l = dd_mul(mh, ml, mh, ml)
            hh[band], hl[band], hexp[band] = 4 * m2h, 4 * m2l, 2 * ve
            h_rel[band] = (2 * (EXP_ERR + x_err[band]) + MUL_ERR + 2.0**-864) * SAFE
        # 2 |x| > 1200: h <= 4E = 2**(2 - 2|x| log2(e)) <= 2**(2 - nsat); elsewhere h <= 1, or
        # (hh + hl) 2**hexp with hh = 4 m^2 < 4 (the band)
        nsat = np.floor(np.minimum(2 * aq, SAT_CLIP) * LOG2E_LO * (1 - 2.0**-50))
        hlog = np.where(sat, 2 - np.where(sat, nsat, 0.0), np.where(band, hexp + 3, 1)).astype(np.int64)
        # -inf: z' = -c exactly, h = 0
        zh = np.where(zero, -c, zh)
        zeta = np.where(zero, 0.0, zeta)
        hh = np.where(sat | zero, 0.0, hh)
        hl = np.where(sat | zero, 0.0, hl)
        h_rel = np.where(sat | zero, 0.0, h_rel)
    return Capped(zh, zl, zeta, hh, hl, h_rel, hexp, sat, hlog, zero)


def _settle(vh: np.ndarray, vl: np.ndarray, bound: np.ndarray, fmt: FloatFormat, cap: Capped | None,
            sel: Any) -> np.ndarray:
    """:func:`decide` on ``u dL/dz'`` enclosed by ``(vh + vl, bound)``; under softcap first times the chain
    factor ``h`` of the elements ``sel`` (docs/exact.md, "The fast path", step 7)."""
    if cap is None:
        return decide(vh, vl, bound, fmt)
    hh, hl, h_rel, hexp = cap.hh[sel], cap.hl[sel], cap.h_rel[sel], cap.hexp[sel]
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        wh, wl = dd_mul(vh, vl, hh, hl)
        w_bound = (np.abs(wh) * (h_rel + MUL_ERR) + bound * hh * (1 + h_rel)) * SAFE
        # times 2**hexp (hexp <= 0): exact unless it underflows, then within 2**-1074 per part (FLOOR)
        wh, wl, w_bound = np.ldexp(wh, hexp), np.ldexp(wl, hexp), np.ldexp(w_bound, hexp) + FLOOR
        out = decide(wh, wl, w_bound, fmt)
        # 0 < h < 2**hlog, so |g| < 2**(ex + hlog) with |v| + bound < 2**ex: where that is at most half
        # the smallest subnormal and v's sign is certain, g is that signed zero (saturated h, and
        # scaled ones that underflowed)
        mag = (np.abs(vh) + np.abs(vl) + bound) * SAFE
        _, ex = np.frexp(mag)
        sub_exp = math.frexp(fmt.smallest_subnormal)[1] - 1  # smallest subnormal = 2**sub_exp
        # (frexp(inf) has exponent 0: a finite mag is required)
        below = (ex.astype(np.int64) + cap.hlog[sel] <= sub_exp - 1) & np.isfinite(mag)
        sure = (np.abs(vh) - np.abs(vl)) > bound * SAFE  # the sign of v, hence of g (h > 0)
        zero = np.where(below & sure & np.isfinite(vh), np.copysign(0.0, vh), np.nan)
        out = np.where(cap.sat[sel], np.nan, out)
        return np.where(np.isnan(out), zero, out)


# ---- decisions --------------------------------------------------------------------------------

def decide(vh: np.ndarray, vl: np.ndarray, bound: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Where every number of ``[vh + vl - bound, vh + vl + bound]`` rounds to the same number of ``fmt``,
    that number (as float64, signed zeros included); NaN elsewhere.

    First the quick test of nearly every element: with ``d = RN_fmt(vh)``, ``t`` and the slack as in
    :func:`_decide_full`, ``fl(|t| + slack) < 2**(e - p)`` where ``2**e <= |d| < 2**(e+1)`` (the exponent
    bits of ``d``) and ``|d|`` is not a power of two: ``2**(e - p)`` is then both half-gaps around ``d``
    (at most them where ``d`` is subnormal in ``fmt``), so the full test would accept ``d`` too
    (docs/exact.md, "The decision"). The few elements it leaves go to :func:`_decide_full`: the results are
    the same as without the quick test.
    """
    vh, vl, bound = np.broadcast_arrays(vh, vl, bound)
    with np.errstate(invalid="ignore", over="ignore"):
        if fmt.precision == 53:
            d, t = vh, vl  # RN(vh) = vh, and t = (vh - vh) + vl = vl exactly
        else:
            d = round_to_format(vh, fmt).astype(np.float64)
            t = (vh - d) + vl
        at = np.abs(t)
        room = at + (bound * SAFE + 2 * U * at)
        # 2**e: the float64 exponent bits of d (0 for zeros and float64 subnormals, inf for inf and NaN)
        pw = (np.ascontiguousarray(d).view(np.uint64) & _EXPONENT_BITS).view(np.float64)
        quick = (room < pw * 2.0**-fmt.precision) & (np.abs(d) != pw)
    out = np.array(d, dtype=np.float64) if d is vh else d
    rest = np.nonzero(~quick)
    if rest[0].size:
        out[rest] = _decide_full(vh[rest], vl[rest], bound[rest], fmt)
    return out


_EXPONENT_BITS = np.uint64(0x7FF0000000000000)


def _decide_full(vh: np.ndarray, vl: np.ndarray, bound: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """:func:`decide` for every element, by the half-gaps around the candidate.

    ``d = RN_fmt(vh)`` (vh nudged toward vl for narrower formats) is the candidate; ``t = (vh - d) + vl`` is the offset from it (``vh - d`` exact by
    Sterbenz, one rounding in the sum); the enclosure must lie strictly inside the half-gaps around d
    (the gap below a power of two is half the one above).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        # the candidate: vh nudged one float64 ulp toward vl (the value lies between them), so that a vh
        # exactly on a midpoint of a narrower format still yields the right neighbour
        near = vh if fmt.precision >= 53 else np.where(vl != 0, np.nextafter(vh, np.copysign(np.inf, vl)), vh)
        d = round_to_format(near, fmt).astype(np.float64)
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
F_REL = MUL_ERR + 2 * U2  # F = (u w[t]) * RN_dd(1 / D): one product and one rounding to double-double
UB_REL = MULD_ERR + U2  # u B = RN_dd(B) * u


def applies(problem: Any) -> bool:
    """The problems this fast path covers (module docstring): weights and probability targets below
    2**300 in magnitude (so no product of them overflows or loses more than the floor), and a softcap
    in [2**-400, 2**400] (so that every product of step 0 stays in range)."""
    if problem.softcap is not None and not 2.0**-400 <= problem.softcap <= 2.0**400:
        return False
    w = problem.weight
    if w is not None and not np.all(np.abs(w) <= 2.0**300):
        return False
    return problem.index_targets or bool(np.all(problem.targets <= 2.0**300))


def _one_hot(problem: Any) -> bool:
    return problem.index_targets and not problem.label_smoothing


def row_factors(problem: Any, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row ``(f, ub, ok)``: ``f[:, 0] + f[:, 1]`` is ``F = u w[t] / D`` (one-hot) or ``u / D`` within
    F_REL relative, ``ub`` is ``u B`` within UB_REL, and ``ok`` marks the rows whose factors are in range
    (docs/exact.md, "The fast path", step 5)."""
    n = problem.logits.shape[0]
    # per row: F = u w[t] / D (one-hot) or u / D, and u B (B = 2 lambda / Dz), as double-doubles from
    # u w[t] exact (TwoProd) times 1/D and B rounded to double-double: F_REL and UB_REL relative
    one_hot = _one_hot(problem)
    u = problem.upstream()
    if one_hot:
        wt = np.ones(n) if problem.weight is None else np.zeros(n)
        if problem.weight is not None:
            act = problem.active_rows()
            wt[act] = problem.weight[problem.targets[act]]
        uh_, ul_ = two_prod(u, wt)
    else:
        uh_, ul_ = u, np.zeros(n)
    inv_d = dd_of(1 / rows.divisor)
    b_dd = dd_of(rows.b)
    with np.errstate(under="ignore", over="ignore"):
        fh_, fl_ = dd_mul(uh_, ul_, np.full(n, inv_d[0]), np.full(n, inv_d[1]))
        bh_, bl_ = dd_mul_d(np.full(n, b_dd[0]), np.full(n, b_dd[1]), u)
    f = np.stack([fh_, fl_], axis=1)
    ub = np.stack([bh_, bl_], axis=1)
    lim = 2.0**-390, 2.0**390  # inside [2**-400, 2**400] with room for the roundings above
    # no underflow or overflow in what formed them: 1/D and B normal, u w[t] exact, u splittable
    ok = (np.abs(u) < 2.0**990) & ((uh_ == 0) | (np.abs(uh_) > 2.0**-900))
    if not (2.0**-900 < abs(inv_d[0]) < 2.0**900) or not (b_dd[0] == 0 or 2.0**-900 < abs(b_dd[0]) < 2.0**900):
        ok[:] = False
    for x in (fh_, bh_):
        ax = np.abs(x)
        ok &= (ax == 0) | ((ax > lim[0]) & (ax < lim[1]))
    return f, ub, ok


def grad_decided(problem: Any, rows: Any, fmt: FloatFormat, todo: np.ndarray) -> np.ndarray:
    """``(N, K)``: the correctly rounded gradient where the enclosure decides it, NaN elsewhere.

    ``rows`` is exact.py's ``_RowFacts`` (the exact rationals D, B and the upstream gradients);
    only rows with something in ``todo`` are evaluated, in blocks of about BLOCK elements.
    """
    _constants()
    k = problem.k
    if _one_hot(problem) and problem.softcap is None and not rows.lam:  # plain rows: streamed in cache-sized chunks
        step, block = max(1, PLAIN_BLOCK // max(k, 1)), _block_plain
    else:
        step, block = max(1, BLOCK // max(k, 1)), (_block if _one_hot(problem) else _block_dense)
    return by_row_blocks(problem, rows, todo, step,
                         lambda idx, f, ub, out: block(problem, rows, fmt, idx, f, ub, out))


def by_row_blocks(problem: Any, rows: Any, todo: np.ndarray, step: int, block: Any) -> np.ndarray:
    """An ``(N, K)`` array of NaN with ``block(idx, f, ub, out)`` called on blocks of ``step`` rows: the rows
    with something in ``todo`` whose factors (:func:`row_factors`) are in range, one block per task on the
    oracle's threads."""
    from gradcheck.oracle import for_row_blocks

    out = np.full(problem.logits.shape, np.nan)
    live = np.flatnonzero(todo.any(axis=1))
    if live.size == 0:
        return out
    f, ub, ok = row_factors(problem, rows)
    live = live[ok[live]]
    blocks = [live[i:i + step] for i in range(0, live.size, step)]

    def work(lo: int, hi: int) -> None:
        for b in blocks[lo:hi]:
            block(b, f, ub, out)

    for_row_blocks(len(blocks), BLOCK, work)
    return out


BLOCK = 1 << 16


def _normaliser(rh: np.ndarray, rl: np.ndarray, levels: int, e_err: np.ndarray, ncut: np.ndarray) -> tuple:
    """Steps 2-3 from ``R``: its bound ``r_err``, ``Z = 1 + R`` (relative error ``d_z``) and ``1/Z`` (``d_inv``)."""
    r_err = (rh * (e_err + levels * ADD_ERR) + ncut * E_CUT) * SAFE
    zh, zl = dd_add(np.ones(rh.shape), np.zeros(rh.shape), rh, rl)
    d_z = (r_err / zh + ADD_ERR) * SAFE  # relative error of Z (Z >= 1)
    # step 3: 1 / Z by one Newton step, its error from the computed residual
    ih, il, d_inv = recip_dd(zh, zl)
    return r_err, zh, zl, d_z, ih, il, d_inv + d_z


def _rows(problem: Any, idx: np.ndarray, ub: np.ndarray) -> tuple:
    """Steps 0-4 for rows ``idx``: (under softcap z' and h,) e, R, Z, 1/Z (and lse when a row has a
    z-loss), with their bounds. ``e_err`` (per row) is the relative error of every e_c."""
    z = problem.logits[idx].astype(np.float64)
    m = len(idx)
    rr = np.arange(m)
    a = np.argmax(z, axis=1)  # also the argmax of z' (tanh is increasing; equal z give equal z')
    cap = None
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        if problem.softcap is None:
            zah, zal, zeta_a = z[rr, a], np.zeros(m), np.zeros(m)
            sh, sl = two_sum(z, -zah[:, None])  # s = z - max z exactly (sh + sl)
            masked = np.isneginf(z)
            e_err = np.full(m, EXP_ERR)
        else:
            # step 0: z' and h; s = z' - z'_a within delta, so e_c = exp(s) within e**delta - 1 more
            cap = softcap_dd(z, problem.softcap)
            zah, zal, zeta_a = cap.zh[rr, a], cap.zl[rr, a], cap.zeta[rr, a]
            sh, sl = dd_add(cap.zh, cap.zl, -zah[:, None], -zal[:, None])
            delta = (cap.zeta + zeta_a[:, None] + ADD_ERR * np.abs(sh)) * SAFE
            pos = (sh > 0) | ((sh == 0) & (sl > 0))  # s <= 0 exactly: clamping moves s~ no farther from s
            sh, sl = np.where(pos, 0.0, sh), np.where(pos, 0.0, sl)
            delta[rr, a] = 0.0
            dmax = delta.max(axis=1)
            e_err = np.where(dmax <= 2.0**-40, (EXP_ERR + dmax * (1 + dmax)) * SAFE, np.inf)
            masked = np.zeros(z.shape, dtype=bool)  # -inf is -c: counted (its own h is 0)
        inside = sh >= MIN_SHIFT
        if inside.all():  # nothing masked or cut (the usual block): no masks to apply
            cut = off = np.zeros(z.shape, dtype=bool)
            eh, el = exp_dd(sh, sl)
        else:
            cut = ~masked & ~inside  # beyond e**-600, or z - max z overflowed
            off = masked | cut
            sh = np.where(off, 0.0, sh)
            sl = np.where(off, 0.0, sl)
            # step 1: e_c within e_err (exp(0) = 1 exactly at the argmax)
            eh, el = exp_dd(sh, sl)
            eh[off] = 0.0
            el[off] = 0.0
        # step 2: R = sum of the others, pairwise; Z = 1 + R
        eh[rr, a] = 0.0
        el[rr, a] = 0.0
        rh, rl, levels = dd_sum_nonnegative(eh, el)
        eh[rr, a] = 1.0
        r_err, zh, zl, d_z, ih, il, d_inv = _normaliser(rh, rl, levels, e_err, cut.sum(axis=1))
        # step 4: lse = max z + log Z (z-loss only): log Z = y0' + log1p(Z exp(-y0') - 1)
        lh = ll = lse_err = None
        if np.any(ub[idx, 0]):
            g0 = np.log(zh)
            xh, xl = exp_dd(-g0, np.zeros(m))
            qh, ql = dd_mul(zh, zl, xh, xl)
            r0h, r0l = dd_add(qh, ql, -np.ones(m), np.zeros(m))
            l1h, l1l = dd_add(r0h, r0l, -0.5 * r0h * r0h, np.zeros(m))  # log1p(r0) ~ r0 - r0^2 / 2
            ah, al = dd_add(zah, zal, g0, np.zeros(m))  # exact (TwoSum) without softcap: zal = 0
            lh, ll = dd_add(ah, al, l1h, l1l)
            lse_err = (d_z * (1 + d_z) + np.abs(qh) * (EXP_ERR + MUL_ERR)
                       + ADD_ERR * (2 * np.abs(r0h) + 2 * np.abs(lh)) + np.abs(r0h) ** 3) * SAFE
            if cap is not None:  # z'_a within zeta_a, and the sum z'_a + g0 rounded to double-double
                lse_err = (lse_err + zeta_a + ADD_ERR * np.abs(ah)) * SAFE
            # |log1p(x) - (x - x^2/2)| <= |x|^3 holds for |x| <= 1/2; np.log is far closer than 2**-40
            lse_err = np.where(np.abs(r0h) <= 2.0**-40, lse_err, np.inf)
    return (z, m, rr, a, masked, cut, off, eh, el, rh, rl, r_err, zh, zl, d_z, ih, il, d_inv, lh, ll, lse_err,
            e_err, cap)


def _block(problem: Any, rows: Any, fmt: FloatFormat, idx: np.ndarray, f: np.ndarray, ub: np.ndarray,
           out: np.ndarray) -> None:
    """Rows ``idx``: docs/exact.md, "The fast path", steps 1-5."""
    if idx.size == 0:
        return
    (z, m, rr, a, masked, cut, off, eh, el, rh, rl, r_err, zh, zl, d_z, ih, il, d_inv, lh, ll,
     lse_err, e_err, cap) = _rows(problem, idx, ub)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        fh, fl = f[idx, 0], f[idx, 1]
        bh, bl = ub[idx, 0], ub[idx, 1]
        if lh is not None:
            th, tl = dd_mul(bh, bl, lh, ll)  # u B lse
            big = np.abs(th) > LIMIT
            hh, hl = dd_add(fh, fl, th, tl)  # F + u B lse
            h_err = (np.abs(bh) * (lse_err + MUL_ERR * np.abs(lh)) + ADD_ERR * np.abs(hh) + F_REL * np.abs(fh) + UB_REL * np.abs(th)) * SAFE
        else:
            th = tl = None
            big = np.zeros(m, dtype=bool)
            hh, hl, h_err = fh, fl, F_REL * np.abs(fh)
        # step 5: every element but the target: g_c = e_c G, G = (F + u B lse) / Z
        gh, gl = dd_mul(hh, hl, ih, il)
        g_err = (np.abs(gh) * (d_inv + MUL_ERR) + h_err * np.abs(ih) * (1 + d_inv)) * SAFE
        dec = np.empty(z.shape)
        step = max(1, CHUNK // m)
        # |v_hi| <= e_c |G_hi| (1 + 2**-50), so the bound is e_c times a row constant
        per_e = ((np.abs(gh) * (e_err + MUL_ERR) * (1 + 2.0**-50) + g_err) * SAFE)[:, None]
        for c0 in range(0, z.shape[1], step):
            ec, lc = eh[:, c0:c0 + step], el[:, c0:c0 + step]
            vh, vl = dd_mul(ec, lc, gh[:, None], gl[:, None])
            bound = ec * per_e
            bound += FLOOR
            dec[:, c0:c0 + step] = _settle(vh, vl, bound, fmt, cap, (slice(None), slice(c0, c0 + step)))
        off_classes(dec, masked, cut, gh, g_err, fmt)
        t = problem.targets[idx]
        dec_t = _target(t, a, eh[rr, t], el[rr, t], e_err, rh, rl, r_err, zh, zl, d_z, ih, il, d_inv, fh, fl,
                        (th, tl, bh, lh, lse_err) if th is not None else None, fmt, cap, (rr, t))
        dec_t[off[rr, t]] = np.nan  # a masked or cut target: the slow path's rational cases
        dec[rr, t] = dec_t
        if cap is not None:
            dec[cap.zero] = 0.0  # softcap: a -inf logit's chain factor is 0, its gradient exactly +0
        dec[big] = np.nan
    out[idx] = dec


def off_classes(dec: np.ndarray, masked: np.ndarray, cut: np.ndarray, g: np.ndarray, g_err: np.ndarray,
                fmt: FloatFormat) -> None:
    """Step 5's classes that are not evaluated, in ``dec`` (rows of the row factor ``g`` within ``g_err``):
    masked ones (``p = 0``; the target is set after) are exactly +0; a cut one has ``0 < e_c <= E_CUT``, so
    ``|g_c| <= E_CUT (|G| + err)``: the zero of G's sign when that is below half the smallest subnormal and
    the sign is certain, else NaN (the slow path)."""
    dec[masked] = 0.0
    tiny = E_CUT * (np.abs(g) + g_err) * SAFE < fmt.smallest_subnormal / 2
    sure = np.abs(g) > g_err
    dec[cut] = np.broadcast_to(np.where(tiny & sure, np.copysign(0.0, g), np.nan)[:, None], cut.shape)[cut]


def _target(t: np.ndarray, a: np.ndarray, et_h: np.ndarray, et_l: np.ndarray, e_err: np.ndarray, rh: np.ndarray,
            rl: np.ndarray, r_err: np.ndarray, zh: np.ndarray, zl: np.ndarray, d_z: np.ndarray, ih: np.ndarray,
            il: np.ndarray, d_inv: np.ndarray, fh: np.ndarray, fl: np.ndarray, zloss: tuple | None,
            fmt: FloatFormat, cap: Capped | None, sel: Any) -> np.ndarray:
    """Step 5's target element of each row: ``g_t = (-F X + u B lse e_t) / Z``, ``X = R`` at the argmax and
    ``Z - e_t`` (``>= Z / 2``) elsewhere; ``zloss`` is ``(u B lse hi, lo, u B hi, lse hi, lse_err)`` or None."""
    at_max = t == a
    xh2, xl2 = dd_add(zh, zl, -et_h, -et_l)
    xh2, xl2 = np.where(at_max, rh, xh2), np.where(at_max, rl, xl2)
    x_err = np.where(at_max, r_err, d_z * zh + et_h * e_err + ADD_ERR * np.abs(xh2)) * SAFE
    yh, yl = dd_mul(-fh, -fl, xh2, xl2)
    y_err = np.abs(fh) * (x_err + np.abs(xh2) * (MUL_ERR + F_REL))
    if zloss is not None:
        th, tl, bh, lh, lse_err = zloss
        wh, wl = dd_mul(th, tl, et_h, et_l)
        y_err = y_err + np.abs(bh) * (lse_err * et_h + np.abs(lh * et_h) * (e_err + 2 * MUL_ERR + UB_REL))
        yh, yl = dd_add(yh, yl, wh, wl)
    y_err = (y_err + ADD_ERR * np.abs(yh)) * SAFE
    vth, vtl = dd_mul(yh, yl, ih, il)
    t_bound = (np.abs(vth) * (d_inv + MUL_ERR) + y_err * np.abs(ih) * (1 + d_inv)) * SAFE + FLOOR
    return _settle(vth, vtl, t_bound, fmt, cap, sel)


_SCRATCH = threading.local()
PLAIN_CHUNK = 1 << 14  # elements per chunk of the plain path
PLAIN_HALVINGS = 2  # levels of the row sum done on each chunk while it is in cache
PLAIN_BLOCK = 1 << 18  # elements per block of rows (the per-row work is done once per block)


def _scratch(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 buffers of at least ``size`` elements for the calling thread, kept for its next block (an
    allocation of a block's size per block costs more than its arithmetic on this machine)."""
    cache = getattr(_SCRATCH, "pair", None)
    if cache is None or cache[0].size < size:
        cache = (np.empty(size), np.empty(size))
        _SCRATCH.pair = cache
    return cache


def _block_plain(problem: Any, rows: Any, fmt: FloatFormat, idx: np.ndarray, f: np.ndarray, ub: np.ndarray,
                 out: np.ndarray) -> None:
    """Rows ``idx`` of a one-hot problem without softcap or z-loss: steps 1-5 as :func:`_block` computes them,
    by the compiled kernels of :mod:`gradcheck.truth_jit` where they run (the same operations, one pass per
    row), else streamed in chunks of about PLAIN_CHUNK elements (groups of whole rows when ``K <= PLAIN_CHUNK``,
    else column pieces of every row of the block): each is shifted, exponentiated and halved PLAIN_HALVINGS
    times on the way to its row sums while it is in cache; the rest of the pairwise sum runs on those
    partial sums, so a term goes through at most the chunk's levels plus the partial sums' levels."""
    from gradcheck import truth_jit

    if idx.size == 0:
        return
    m, k = idx.size, problem.k
    rr = np.arange(m)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    z = problem.logits[lo:hi] if hi - lo == m else problem.logits[idx]  # rows in order: a view
    a = np.argmax(z, axis=1)
    if k <= PLAIN_CHUNK:  # (rows, columns) of each chunk: groups of whole rows, or pieces of every row
        g = PLAIN_CHUNK // k
        chunks = [(r0, min(r0 + g, m), 0, k) for r0 in range(0, m, g)]
    else:
        w = max(1, PLAIN_CHUNK // m)
        chunks = [(0, m, c0, min(c0 + w, k)) for c0 in range(0, k, w)]
    buf_h, buf_l = _scratch(m * k)
    eh, el = buf_h[:m * k].reshape(m, k), buf_l[:m * k].reshape(m, k)
    jit = truth_jit.enabled()
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        if jit:
            rh, rl, levels, masked, cut = _plain_sums_jit(z, a, eh, el)
        else:
            rh, rl, levels, masked, cut = _plain_sums(z, a, chunks, eh, el)
        e_err = np.full(m, EXP_ERR_COARSE)
        ncut = np.zeros(m) if cut is None else cut.sum(axis=1)
        r_err, zh, zl, d_z, ih, il, d_inv = _normaliser(rh, rl, levels, e_err, ncut)
        # step 5: every element but the target is e_c G, G = F / Z; |v_hi| <= e_c |G_hi| (1 + 2**-50)
        fh, fl = f[idx, 0], f[idx, 1]
        gh, gl = dd_mul(fh, fl, ih, il)
        g_err = (np.abs(gh) * (d_inv + MUL_ERR) + F_REL * np.abs(fh) * np.abs(ih) * (1 + d_inv)) * SAFE
        per_e = ((np.abs(gh) * (EXP_ERR_COARSE + MUL_ERR) * (1 + 2.0**-50) + g_err) * SAFE)[:, None]
        dest = out[lo:hi] if hi - lo == m else np.empty((m, k))  # rows in order: written in place
        if jit and fmt.precision == 53:
            truth_jit.decide_rows(eh, el, gh, gl, per_e[:, 0], dest)
        else:
            ghc, glc = gh[:, None], gl[:, None]
            for r0, r1, c0, c1 in chunks:
                ec = eh[r0:r1, c0:c1]
                vh, vl = dd_mul(ec, el[r0:r1, c0:c1], ghc[r0:r1], glc[r0:r1])
                bound = ec * per_e[r0:r1]
                bound += FLOOR
                dest[r0:r1, c0:c1] = decide(vh, vl, bound, fmt)
        if masked is not None:
            off_classes(dest, masked, cut, gh, g_err, fmt)
        t = problem.targets[idx]
        dec_t = _target(t, a, eh[rr, t], el[rr, t], e_err, rh, rl, r_err, zh, zl, d_z, ih, il, d_inv, fh, fl,
                        None, fmt, None, (rr, t))
        if masked is not None:
            dec_t[masked[rr, t] | cut[rr, t]] = np.nan  # a masked or cut target: the slow path's rational cases
        dest[rr, t] = dec_t
    if hi - lo != m:
        out[idx] = dest


def _plain_sums(z: np.ndarray, a: np.ndarray, chunks: list, eh: np.ndarray, el: np.ndarray) -> tuple:
    """Steps 1-2 of :func:`_block_plain` in numpy, chunk by chunk: ``e`` into ``eh + el``, and ``(R hi, R lo,
    levels, masked, cut)`` (the masks None when no class is masked or cut)."""
    m, k = z.shape
    rr = np.arange(m)
    zah = z[rr, a].astype(np.float64)[:, None]
    part = sum(-(-(c1 - c0) // 2**PLAIN_HALVINGS) for r0, _, c0, c1 in chunks if r0 == 0)  # >= the chunks' widths
    part_h, part_l = np.empty((m, part)), np.empty((m, part))
    masked = cut = None
    chunk_levels = filled = 0
    # per chunk: s = z - max z exactly (TwoSum), e_c within EXP_ERR_COARSE, the first levels of the sum of the
    # others (the argmax's e is exactly 1 and is not summed)
    for r0, r1, c0, c1 in chunks:
        zc = z[r0:r1, c0:c1].astype(np.float64)
        sh, sl = two_sum(zc, -zah[r0:r1])
        inside = sh >= MIN_SHIFT
        if not inside.all():
            if masked is None:
                masked, cut = np.zeros((m, k), dtype=bool), np.zeros((m, k), dtype=bool)
            masked[r0:r1, c0:c1] = np.isneginf(zc)
            cut[r0:r1, c0:c1] = ~masked[r0:r1, c0:c1] & ~inside  # beyond e**-600, or z - max z overflowed
            sh[~inside], sl[~inside] = 0.0, 0.0
            ch, cl = _exp_dd(sh, sl, coarse=True)
            ch[~inside], cl[~inside] = 0.0, 0.0
        else:
            ch, cl = _exp_dd(sh, sl, coarse=True)
        eh[r0:r1, c0:c1], el[r0:r1, c0:c1] = ch, cl
        ar = a[r0:r1] - c0
        mine = np.flatnonzero((ar >= 0) & (ar < c1 - c0))
        ch[mine, ar[mine]] = 0.0
        cl[mine, ar[mine]] = 0.0
        ph_, pl_, levels = _halve(ch, cl, PLAIN_HALVINGS)
        chunk_levels = max(chunk_levels, levels)
        w = ph_.shape[1]
        at = filled if k > PLAIN_CHUNK else 0
        part_h[r0:r1, at:at + w], part_l[r0:r1, at:at + w] = ph_, pl_
        filled = at + w
    rh, rl, levels = dd_sum_nonnegative(part_h[:, :filled], part_l[:, :filled])
    return rh, rl, chunk_levels + levels, masked, cut


def _plain_sums_jit(z: np.ndarray, a: np.ndarray, eh: np.ndarray, el: np.ndarray) -> tuple:
    """:func:`_plain_sums` by truth_jit.plain_sums: one pass per row, the sum in :func:`_halve`'s tree over the
    whole row (so ``levels`` is that tree's); the masks from numpy, for the rows the kernel flags."""
    from gradcheck import truth_jit

    m, k = z.shape
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float64)  # (float16 and bfloat16: exact)
    (c1, c2, c3, c4), th, tl = _constants()
    rh, rl, flags = np.empty(m), np.empty(m), np.zeros(m, dtype=np.uint8)
    ph, pl = np.empty(max(1, k // 2)), np.empty(max(1, k // 2))
    truth_jit.plain_sums(np.ascontiguousarray(z), a, np.array([c1, c2, c3 + c4]), th, tl, truth_jit.POW2, eh, el, rh,
                         rl, flags, ph, pl)
    masked, cut = flagged_masks(z, a, flags)
    return rh, rl, truth_jit.levels_of(k), masked, cut


def flagged_masks(z: np.ndarray, a: np.ndarray, flags: np.ndarray) -> tuple:
    """``(masked, cut)`` of a block of logits ``z`` (row argmaxes ``a``) whose rows ``flags`` marks as holding a
    masked (-inf) or cut (``fl(z - max z) < MIN_SHIFT``, or overflowed) class, as a kernel found them; ``(None,
    None)`` when no row is marked."""
    if not flags.any():
        return None, None
    masked, cut = np.zeros(z.shape, dtype=bool), np.zeros(z.shape, dtype=bool)
    hit = np.flatnonzero(flags)
    zc = z[hit].astype(np.float64)
    sh = zc - zc[np.arange(hit.size), a[hit]][:, None]  # the kernels' fl(z - max z)
    masked[hit] = np.isneginf(zc)
    cut[hit] = ~masked[hit] & ~(sh >= MIN_SHIFT)
    return masked, cut


UNDER = 2.0**-1068  # absolute: the underflow of the few products that form w_c t_c (<= 2**-1075 each)


def _block_dense(problem: Any, rows: Any, fmt: FloatFormat, idx: np.ndarray, f: np.ndarray, ub: np.ndarray,
                 out: np.ndarray) -> None:
    """Rows ``idx`` with a weighted target on every class (smoothing, probabilities): docs/exact.md,
    "The fast path", step 6. ``f`` holds ``u / D`` here."""
    if idx.size == 0:
        return
    (z, m, rr, a, masked, cut, off, eh, el, rh, rl, r_err, zh, zl, d_z, ih, il, d_inv, lh, ll,
     lse_err, e_err, cap) = _rows(problem, idx, ub)
    k = problem.k
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        # A_c = w_c ((1 - eps) t0_c + eps / K), t0 >= 0: relative error A_REL, plus UNDER absolute
        if problem.index_targets:
            t0 = np.zeros((m, k))
            t0[rr, problem.targets[idx]] = 1.0
        else:
            t0 = np.array(problem.targets[idx], dtype=np.float64)
        w = np.ones(k) if problem.weight is None else problem.weight
        eps = Fraction(problem.label_smoothing)
        if eps:
            (alh, all_), (beh, bel) = dd_of(1 - eps), dd_of(eps / k)
            th_, tl_ = dd_mul_d(np.full(t0.shape, alh), np.full(t0.shape, all_), t0)
            th_, tl_ = dd_add(th_, tl_, beh, bel)
            ah_, al_ = dd_mul_d(th_, tl_, w[None, :])
            a_rel = 2 * U2 + MULD_ERR + ADD_ERR + MULD_ERR
        else:
            ah_, al_ = two_prod(t0, w[None, :])
            a_rel = 0.0
        abs_a = np.abs(ah_)
        # S = sum_c A_c, pairwise (terms of both signs: each level errs by ADD_ERR of at most sum |A|)
        sh_, sl_, levels = dd_sum_rows(ah_, al_)
        sum_abs = abs_a.sum(axis=1) * SAFE
        s_err = ((levels * ADD_ERR + a_rel) * sum_abs + k * UNDER) * SAFE
        uh, ul = f[idx, 0], f[idx, 1]  # u / D
        bh, bl = ub[idx, 0], ub[idx, 1]  # u B
        # F = u S / D + u B lse, G = F / Z
        f1h, f1l = dd_mul(uh, ul, sh_, sl_)
        f_err = np.abs(uh) * s_err + (MUL_ERR + F_REL) * np.abs(f1h)
        big = np.zeros(m, dtype=bool)
        if lh is not None:
            th, tl = dd_mul(bh, bl, lh, ll)
            big = np.abs(th) > LIMIT
            t_err = np.abs(bh) * lse_err + (MUL_ERR + UB_REL) * np.abs(th)
            fh, fl = dd_add(f1h, f1l, th, tl)
            f_err = f_err + t_err + ADD_ERR * np.abs(fh)
        else:
            th = tl = None
            t_err = 0.0
            fh, fl = f1h, f1l
        f_err = f_err * SAFE
        gh, gl = dd_mul(fh, fl, ih, il)
        g_err = (np.abs(gh) * (d_inv + MUL_ERR) + f_err * np.abs(ih) * (1 + d_inv)) * SAFE
        # every element but the argmax: g_c = e_c G - H_c, H_c = (u / D) A_c
        dec = np.empty(z.shape)
        step = max(1, CHUNK // m)
        for c0 in range(0, k, step):
            sl_c = slice(c0, c0 + step)
            ec, lc = eh[:, sl_c], el[:, sl_c]
            hh, hl = dd_mul(uh[:, None], ul[:, None], ah_[:, sl_c], al_[:, sl_c])
            h_err = np.abs(uh)[:, None] * (a_rel * abs_a[:, sl_c] + UNDER) + (MUL_ERR + F_REL) * np.abs(hh)
            ph, pl = dd_mul(ec, lc, gh[:, None], gl[:, None])
            vh, vl = dd_add(ph, pl, -hh, -hl)
            cut_c = cut[:, sl_c]
            bound = (np.abs(ph) * (e_err[:, None] + MUL_ERR) + ec * g_err[:, None] + h_err + ADD_ERR * np.abs(vh)
                     + np.where(cut_c, E_CUT * (np.abs(gh) + g_err)[:, None], 0.0)) * SAFE + FLOOR
            dec[:, sl_c] = _settle(vh, vl, bound, fmt, cap, (slice(None), sl_c))
        exact_zero = masked & (ah_ == 0)  # p = 0 and A = 0
        dec[exact_zero] = 0.0
        # a cut class without target weight: 0 < g_c / G <= E_CUT, a signed zero when that underflows
        tiny = E_CUT * (np.abs(gh) + g_err) * SAFE < fmt.smallest_subnormal / 2
        sure = np.abs(gh) > g_err
        lone = cut & (ah_ == 0)
        dec[lone] = np.broadcast_to(np.where(tiny & sure, np.copysign(0.0, gh), np.nan)[:, None], cut.shape)[lone]
        # the argmax: g_a = [(u / D)(S - A_a) + u B lse - H_a R] / Z  (q_a = R / Z, no cancellation)
        aah, aal = ah_[rr, a], al_[rr, a]
        xh, xl = dd_add(sh_, sl_, -aah, -aal)  # S - A_a
        x_err = s_err + np.abs(uh) * 0 + a_rel * np.abs(aah) + UNDER + ADD_ERR * np.abs(xh)
        y1h, y1l = dd_mul(uh, ul, xh, xl)
        y_err = np.abs(uh) * x_err + (MUL_ERR + F_REL) * np.abs(y1h)
        hah, hal = dd_mul(uh, ul, aah, aal)
        ha_err = np.abs(uh) * (a_rel * np.abs(aah) + UNDER) + (MUL_ERR + F_REL) * np.abs(hah)
        y3h, y3l = dd_mul(hah, hal, rh, rl)
        y_err = y_err + ha_err * rh + np.abs(hah) * r_err + MUL_ERR * np.abs(y3h)
        yh, yl = dd_add(y1h, y1l, -y3h, -y3l)
        y_err = y_err + ADD_ERR * np.abs(yh)
        if th is not None:
            yh, yl = dd_add(yh, yl, th, tl)
            y_err = y_err + t_err + ADD_ERR * np.abs(yh)
        y_err = y_err * SAFE
        vah, val = dd_mul(yh, yl, ih, il)
        a_bound = (np.abs(vah) * (d_inv + MUL_ERR) + y_err * np.abs(ih) * (1 + d_inv)) * SAFE + FLOOR
        dec[rr, a] = _settle(vah, val, a_bound, fmt, cap, (rr, a))
        if cap is not None:
            dec[cap.zero] = 0.0  # softcap: a -inf logit's chain factor is 0, its gradient exactly +0
        dec[big] = np.nan
    out[idx] = dec
