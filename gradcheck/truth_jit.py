"""Compiled kernels (numba) for the certified truth's plain rows: the double-double path and the float64 tier.

The same IEEE 754 operations in the same order as the numpy code they replace: in :mod:`gradcheck.truth_dd`
``_exp_dd(coarse=True)``, ``dd_add_same_sign``, ``dd_mul`` and ``decide`` for float64; in
:mod:`gradcheck.truth_f64` ``enclose`` and ``decide`` for float32. So the error analysis of docs/exact.md
("The fast path", steps 1, 2 and 5; "The float64 tier") holds for them as it stands: numba compiles without fast-math, so LLVM neither reassociates nor contracts ``a * b + c`` into a
fused multiply-add (which would break TwoSum's and Dekker's product's exactness). Tests check both: each
kernel against its numpy original bit for bit, and the kernels' arithmetic for contraction
(tests/test_truth_jit.py). What the kernels change is the memory traffic: one pass over a row computes its
exponentials and the first level of their sum, where numpy makes one pass per operation (docs/exact.md,
"Compiled kernels").

numba is the ``fast`` extra (part of ``report``); without it, or with ``GRADCHECK_JIT=0``, the numpy code
runs and the results are the same (both are correctly rounded).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from gradcheck import truth_dd as _dd
from gradcheck import truth_f64 as _f64

try:  # the `fast` extra
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None


def enabled() -> bool:
    """Whether the kernels run: numba is importable and ``GRADCHECK_JIT`` is not ``0``."""
    return numba is not None and os.environ.get("GRADCHECK_JIT", "1") != "0"


if numba is not None:
    def _jit(fn: Any) -> Any:
        """numba.njit without fast-math, releasing the GIL, cached on disk where numba finds a writable cache
        directory (beside this file, or a per-user one); where it finds none, compiled in each process."""
        options = {"nogil": True, "fastmath": False, "error_model": "numpy"}
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available for file ..."
            return numba.njit(**options)(fn)

    # the constants of the numpy code, the same floats (numba reads a global once, at compilation)
    SPLITTER = _dd.SPLITTER
    INV_PIECE = _f64.INV_STEP  # 2**TABLE_BITS / ln 2, as in truth_dd._exp_dd
    MIN_SHIFT = _dd.MIN_SHIFT
    U = _dd.U
    SAFE = _dd.SAFE
    FLOOR = _dd.FLOOR
    E_CUT = _dd.E_CUT
    EXP64 = _f64.EXP64
    F64_REL = _f64.F64_REL
    TINY = 2.0**-1022
    TINY32 = 2.0**-126
    QUICK_MIN, QUICK_MAX = 2.0**-960, 2.0**960  # decide64's quick test: where _ufp is exact
    PHI = 2.0**52 + 1
    POW2 = np.array([2.0**n for n in range(-1022, 1)])  # 2**n, n = -1022 ... 0: the scalings of _exp1

    @_jit
    def _two_sum(a: float, b: float) -> tuple[float, float]:
        s = a + b
        bb = s - a
        return s, (a - (s - bb)) + (b - bb)

    @_jit
    def _fast_two_sum(a: float, b: float) -> tuple[float, float]:
        s = a + b
        return s, b - (s - a)

    @_jit
    def _two_prod(a: float, b: float) -> tuple[float, float]:
        p = a * b
        c = SPLITTER * a
        ah = c - (c - a)
        al = a - ah
        c = SPLITTER * b
        bh = c - (c - b)
        bl = b - bh
        return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl

    @_jit
    def _add_same_sign(xh: float, xl: float, yh: float, yl: float) -> tuple[float, float]:
        sh, sl = _two_sum(xh, yh)
        return _fast_two_sum(sh, sl + (xl + yl))

    @_jit
    def _mul(xh: float, xl: float, yh: float, yl: float) -> tuple[float, float]:
        ch, cl1 = _two_prod(xh, yh)
        cl3 = cl1 + (xh * yl + xl * yh)
        return _fast_two_sum(ch, cl3)

    @_jit
    def _exp1(sh: float, sl: float, c: Any, th: Any, tl: Any, pw: Any) -> tuple[float, float]:
        """truth_dd._exp_dd(sh, sl, coarse=True) for one element, ``MIN_SHIFT <= sh <= 0``; ``c`` is (c1, c2,
        c3 + c4), ``pw`` is :data:`POW2`. The scaling by ``2**n`` (-866 <= n <= 0) is a product with a power of
        two: RN(v 2**n), as np.ldexp gives it (exact but where a low part falls below 2**-1022)."""
        k = np.rint(sh * INV_PIECE)  # (the same product as sh * (2**TABLE_BITS / math.log(2)))
        t1 = sh - k * c[0]
        h, l1 = _two_sum(t1, k * -c[1])
        low = l1 + sl
        low -= k * c[2]
        rh, rl = _two_sum(h, low)
        cc = SPLITTER * rh
        a = cc - (cc - rh)
        b = rh - a
        wh, wl = _fast_two_sum(rh, (0.5 * a) * a)
        f = (rh * rh) * rh * (1.0 / 6 + rh * (1.0 / 24 + rh * (1.0 / 120)))
        tail = wl + (rl + (a * b + (0.5 * (b * b) + rh * rl))) + f
        ki = np.int64(k)
        j = ki & 0xFFFF
        n = ki >> 16
        big, small = th[j], tl[j]
        ph, pe = _two_prod(big, wh)
        pe += big * tail + small * wh
        vh, vl = _fast_two_sum(big, ph)
        vh, vl = _fast_two_sum(vh, vl + (small + pe))
        s = pw[min(max(n + 1022, 0), 1022)]  # (clamped: never a read outside the table)
        return vh * s, vl * s

    @_jit
    def exp_pairs(sh: Any, sl: Any, c: Any, th: Any, tl: Any, pw: Any, oh: Any, ol: Any) -> None:
        """:func:`_exp1` elementwise (1-D arrays): the test's view of the kernel's exponential."""
        for i in range(sh.size):
            oh[i], ol[i] = _exp1(sh[i], sl[i], c, th, tl, pw)

    @_jit
    def _e(zc: float, zah: float, c: Any, th: Any, tl: Any, pw: Any) -> tuple[float, float, int]:
        """``e = exp(z - max z)`` for one logit: (hi, lo, 0), or (0, 0, 1) masked (-inf), (0, 0, 2) cut."""
        if zc == -np.inf:
            return 0.0, 0.0, 1
        sh, sl = _two_sum(zc, -zah)
        if not sh >= MIN_SHIFT:  # beyond e**-600, or z - max z overflowed
            return 0.0, 0.0, 2
        vh, vl = _exp1(sh, sl, c, th, tl, pw)
        return vh, vl, 0

    @_jit
    def plain_sums(z: Any, a: Any, c: Any, th: Any, tl: Any, pw: Any, eh: Any, el: Any, rh: Any, rl: Any,
                   flags: Any, ph: Any, pl: Any) -> None:
        """Steps 1-2 for each row of ``z`` (m, k): ``eh + el`` the exponentials (the argmax's exactly 1),
        ``rh + rl`` the sum of the others in :func:`truth_dd._halve`'s tree (pairs ``(j, j + k // 2)``, an
        odd last term folded into the first), ``flags`` 1 where a row has a masked or cut class; ``ph``, ``pl``
        scratch of ``k // 2`` (at least 1)."""
        m, k = z.shape
        for r in range(m):
            zah = np.float64(z[r, a[r]])
            half = k // 2
            off = 0
            for j in range(half):  # both halves' exponentials and the first level of the sum in one pass
                xh, xl, f1 = _e(np.float64(z[r, j]), zah, c, th, tl, pw)
                yh, yl, f2 = _e(np.float64(z[r, j + half]), zah, c, th, tl, pw)
                off |= f1 | f2
                eh[r, j], el[r, j] = xh, xl
                eh[r, j + half], el[r, j + half] = yh, yl
                if j == a[r]:
                    xh, xl = 0.0, 0.0
                if j + half == a[r]:
                    yh, yl = 0.0, 0.0
                ph[j], pl[j] = _add_same_sign(xh, xl, yh, yl)
            w = half
            if k % 2:
                xh, xl, f1 = _e(np.float64(z[r, k - 1]), zah, c, th, tl, pw)
                off |= f1
                eh[r, k - 1], el[r, k - 1] = xh, xl
                if k - 1 == a[r]:
                    xh, xl = 0.0, 0.0
                if k == 1:
                    ph[0], pl[0] = 0.0, 0.0  # the only class is the argmax: R = 0
                    w = 1
                else:
                    ph[0], pl[0] = _add_same_sign(ph[0], pl[0], xh, xl)
            while w > 1:
                h2 = w // 2
                for j in range(h2):
                    ph[j], pl[j] = _add_same_sign(ph[j], pl[j], ph[j + h2], pl[j + h2])
                if w % 2:
                    ph[0], pl[0] = _add_same_sign(ph[0], pl[0], ph[w - 1], pl[w - 1])
                w = h2
            rh[r], rl[r] = ph[0], pl[0]
            flags[r] = 1 if off else 0

    @_jit
    def _ufp(x: float) -> float:
        """``2**floor(log2 x)`` for ``2**-1000 <= x < 2**960``, in three operations (Rump, "Ultimately fast
        accurate summation", SIAM J. Sci. Comput. 31(5), 2009, Algorithm 3.5; checked over that range by
        tests/test_truth_jit.py): the float64 exponent bits of decide's quick test, without a bit cast."""
        q = PHI * x
        return abs(q - (1 - 2.0**-53) * q)

    @_jit
    def _quick64(vh: float, vl: float, bound: float) -> bool:
        """truth_dd.decide's quick test for float64 (d = vh, t = vl) where ``QUICK_MIN <= |d| < QUICK_MAX`` (the
        range of :func:`_ufp`), without branches: True where it accepts ``vh``."""
        at, ad = abs(vl), abs(vh)
        pw = _ufp(ad)
        return (at + (bound * SAFE + 2 * U * at) < pw * 2.0**-53) & (ad != pw) & (ad >= QUICK_MIN) & (ad < QUICK_MAX)

    @_jit
    def _half_gaps(vh: float, vl: float, bound: float, d: float, t: float, emin: int, precision: int,
                   tiny: float) -> float:
        """truth_dd._decide_full for the candidate ``d`` (``t = (vh - d) + vl``) of a format of ``precision``
        bits whose least normal exponent is ``emin`` and least normal number ``tiny``: ``d`` where the
        enclosure lies strictly inside the half-gaps around it (a zero ``d`` takes the enclosure's sign), else
        NaN."""
        at = abs(t)
        slack = bound * SAFE + 2 * U * at
        ad = abs(d)
        up, down = t + slack, t - slack
        if not (ad < np.inf and at < np.inf and slack < np.inf):
            return np.nan
        if ad == 0:
            e = emin
            power = False
        else:
            mant, ex = math.frexp(ad)
            e = ex - 1
            power = mant == 0.5 and ad > tiny
        ulp = math.ldexp(1.0, max(e, emin) - precision + 1)
        half_up = ulp / 4 if power and d < 0 else ulp / 2
        half_down = ulp / 4 if power and d > 0 else ulp / 2
        if not (up < half_up and down > -half_down):
            return np.nan
        if ad == 0:
            s = vh + vl
            if not (s - slack > 0 or s + slack < 0):
                return np.nan
            return 0.0 if vh > 0 else -0.0
        return d

    @_jit
    def _decide64(vh: float, vl: float, bound: float) -> float:
        """truth_dd.decide for float64: :func:`_quick64`, else :func:`_half_gaps` (``d = vh``, ``t = vl``)."""
        if _quick64(vh, vl, bound):
            return vh
        return _half_gaps(vh, vl, bound, vh, vl, -1022, 53, TINY)

    @_jit
    def decide_rows(eh: Any, el: Any, gh: Any, gl: Any, per_e: Any, out: Any) -> None:
        """Step 5 for float64 results: ``out[r, c] = decide(e_c G_r, e_c per_e_r + FLOOR)``: :func:`_decide64`'s
        quick test without branches (so that the loop compiles to vector code), then the whole of it where the
        quick test failed."""
        m, k = eh.shape
        for r in range(m):
            g1, g2, pe = gh[r], gl[r], per_e[r]
            er, lr, orow = eh[r], el[r], out[r]
            for j in range(k):
                e1 = er[j]
                vh, vl = _mul(e1, lr[j], g1, g2)
                orow[j] = vh if _quick64(vh, vl, e1 * pe + FLOOR) else np.nan
            for j in range(k):
                if orow[j] != orow[j]:
                    e1 = er[j]
                    vh, vl = _mul(e1, lr[j], g1, g2)
                    orow[j] = _decide64(vh, vl, e1 * pe + FLOOR)

    @_jit
    def decide_pairs(vh: Any, vl: Any, bound: Any, out: Any) -> None:
        """:func:`_decide64` elementwise (1-D arrays): the test's view of the kernel's decision."""
        for i in range(vh.size):
            out[i] = _decide64(vh[i], vl[i], bound[i])

    @_jit
    def _exp64(s: float, c: Any, th: Any, pw: Any) -> float:
        """truth_f64.exp_f64 for one element, ``MIN_SHIFT <= s <= 0``; ``c`` is (c1, c2 + c3)."""
        k = np.rint(s * INV_PIECE)
        r = (s - k * c[0]) - k * c[1]
        p = 1.0 + (r + 0.5 * (r * r))
        ki = np.int64(k)
        return (th[ki & 0xFFFF] * p) * pw[min(max((ki >> 16) + 1022, 0), 1022)]

    @_jit
    def _quick32(vh: float, bound: float) -> tuple[float, bool]:
        """truth_dd.decide's quick test for float32 with ``vl = 0`` (a nonzero finite float32 ``d`` is inside the
        range of :func:`_ufp`), without branches: ``(d, accepted)``."""
        d = np.float64(np.float32(vh))
        at, ad = abs(vh - d), abs(d)
        pw = _ufp(ad)
        return d, (at + (bound * SAFE + 2 * U * at) < pw * 2.0**-24) & (ad != pw) & (ad > 0) & (ad < np.inf)

    @_jit
    def _decide32(vh: float, bound: float) -> float:
        """truth_dd.decide for float32 with ``vl = 0``: :func:`_quick32`, else :func:`_half_gaps`."""
        d, q = _quick32(vh, bound)
        if q:
            return d
        return _half_gaps(vh, 0.0, bound, d, vh - d, -126, 24, TINY32)

    @_jit
    def decide32_pairs(vh: Any, bound: Any, out: Any) -> None:
        """:func:`_decide32` elementwise (1-D arrays): the test's view of the kernel's decision."""
        for i in range(vh.size):
            out[i] = _decide32(vh[i], bound[i])

    @_jit
    def tier_rows(z: Any, a: Any, t: Any, f: Any, c: Any, th: Any, pw: Any, shift: float, decide: bool, g: Any,
                  bound: Any, sums: Any, g_row: Any, g_rel: Any, flags: Any) -> None:
        """truth_f64.enclose's steps 1-4 for each row of ``z`` (m, k), then (``decide``) the float32 decision
        into ``g``; else ``g`` and ``bound`` as enclose returns them. ``sums`` is scratch of ``k // 2``
        (at least 1); ``g_row``, ``g_rel`` (per row) as enclose returns them, ``flags`` 1 where a row has
        a masked or cut class (their elements are left for the caller)."""
        m, k = z.shape
        depth = levels_of(k)
        gamma = depth * U / (1 - depth * U)
        for r in range(m):
            zr, gr, br = z[r], g[r], bound[r]
            za = np.float64(zr[a[r]])
            smax = 0.0
            ncut = 0
            off = 0
            for j in range(k):  # step 1: s, e (kept in g), the largest |s| evaluated
                zc = np.float64(zr[j])
                sc = zc - za
                if zc == -np.inf:
                    gr[j] = 0.0
                    br[j] = 0.0
                    off = 1
                elif not sc >= MIN_SHIFT:
                    gr[j] = 0.0
                    br[j] = 0.0
                    off = 1
                    ncut += 1
                else:
                    gr[j] = _exp64(sc, c, th, pw)
                    br[j] = -sc
                    smax = max(smax, -sc)
            gr[a[r]] = 0.0
            # step 2: R = the others' sum in truth_f64.sum_rows's tree
            half = k // 2
            for j in range(half):
                sums[j] = gr[j] + gr[j + half]
            w = half
            if k % 2:
                if k == 1:
                    sums[0] = 0.0
                    w = 1
                else:
                    sums[0] += gr[k - 1]
            while w > 1:
                h2 = w // 2
                for j in range(h2):
                    sums[j] = sums[j] + sums[j + h2]
                if w % 2:
                    sums[0] += sums[w - 1]
                w = h2
            rs = sums[0]
            gr[a[r]] = 1.0
            r_abs = rs * (EXP64 + shift * smax + gamma)
            if off:
                r_abs = r_abs + ncut * E_CUT
            r_abs *= SAFE
            zz = 1.0 + rs
            z_rel = r_abs / zz + U
            # step 3: G = F / Z, every element but the target e_c G
            gw = f[r] / zz
            grel = (F64_REL + z_rel + U) * SAFE
            g_row[r], g_rel[r] = gw, grel
            base = (EXP64 + grel + U) * SAFE
            ss = shift * SAFE
            tr = t[r]
            et = gr[tr]
            st = br[tr]
            for j in range(k):
                gc = gr[j] * gw
                if shift:
                    bj = abs(gc) * (base + ss * br[j])
                else:
                    bj = abs(gc) * base
                gr[j] = gc
                br[j] = bj + FLOOR
            # step 4: the target, -G X with X = R at the argmax and 1 + (R - e_t) elsewhere
            if tr == a[r]:
                x, x_abs = rs, r_abs
            else:
                y = rs - et
                x = 1.0 + y
                x_abs = r_abs + et * (EXP64 + shift * st) + U * abs(y) + U * x
            gt = -(gw * x)
            gr[tr] = gt
            br[tr] = abs(gt) * ((grel + x_abs / x + U) * SAFE) + FLOOR
            if decide:  # _decide32's quick test without branches (vector code), the whole of it where that failed
                for j in range(k):
                    vh, bj = gr[j], br[j]
                    d, q = _quick32(vh, bj)
                    gr[j] = d if q else vh
                    br[j] = -1.0 if q else bj  # (a bound is >= 0 or NaN, never -1: -1 marks a decided element)
                for j in range(k):
                    if br[j] != -1.0:  # (a NaN bound too: _decide32 returns NaN for it)
                        gr[j] = _decide32(gr[j], br[j])
            flags[r] = off

    @_jit
    def levels_of(width: int) -> int:
        """The levels :func:`truth_dd._halve` counts for a row of ``width`` terms (an odd width's last term
        folded into the first costs one level more), the depth truth_f64.sum_rows counts: the kernels sum
        in that same tree."""
        levels = 0
        while width > 1:
            levels += 1 + width % 2
            width //= 2
        return levels

    @_jit
    def magnitudes(z: Any) -> tuple[float, float]:
        """``(largest finite |z|, smallest nonzero finite |z|)`` (0 and inf where there is none): the scan of
        truth_f64._exact_shifts in one pass."""
        big, small = 0.0, np.inf
        for x in z.ravel():
            v = abs(np.float64(x))
            if v < np.inf:
                big = max(big, v)
                if v > 0:
                    small = min(small, v)
        return big, small

    @_jit
    def contracts(a: float, b: float) -> float:
        """``a * b - fl(a * b)``: 0 unless the compiler fused the two into one multiply-add (the test's probe)."""
        p = a * b
        return a * b - p
