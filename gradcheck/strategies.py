"""Hypothesis strategies for cross-entropy cases: logits by regime, targets, options, exact in every dtype.

Hypothesis draws the structure of a case (regime, shape, option flags and a seed); numpy builds the
arrays from the seed. That keeps an example cheap at any shape while Hypothesis still shrinks what
matters: the regime towards ``"moderate"``, the shape towards ``(1, 1)``, the seed towards 0.
:func:`gradcheck.verify` then simplifies the values of a failing case.

Regimes (``REGIMES``):

* ``moderate``: N(0, 1) logits;
* ``large_gap``: one logit per row far above the rest (up to ``GAP[dtype]``), probabilities underflow;
* ``huge``: magnitudes up to ``HUGE[dtype]`` (1e4 half, 1e30 float32, 1e300 float64);
* ``ties``: small integers, so maxima and other values repeat exactly;
* ``near_one_hot``: one class holds almost all the probability, usually the target;
* ``confident``: the target's logit far above the rest, so ``p_t - 1`` cancels;
* ``offset``: a large common offset on every logit of a row;
* ``many_classes``: K up to 32831, often not a multiple of 64, with the row maximum in a late tile;
* ``llm_vocab``: LLM vocabularies (32000, 50257, 128256, 151936, 262144 and 2**j +- 1), the row maximum in the
  last block, up to thousands of rows, most of them ignored (only when ``max_shape`` reaches K = 32000, or
  at the asked ``shapes``); N K at most ``max_elements`` (4096 rows at K = 32000) and the counted rows
  times K at most ``max_live_elements`` (262 rows at K = 32000), the catalogue's parameters;
* ``single``: a single row, a single class, or both;
* ``masked``: some logits are -inf (at least one finite per row);
* ``saturated`` (drawn when ``softcap`` is set): |z| / c up to 50, tanh saturated, the chain factor tiny;
* ``large_lse`` (drawn when ``lse_square_scale`` is set): rows near +-300, so the z-loss term is large.

With ``upstream=True`` every case also carries an upstream gradient (``Case.grad_output``): for
"mean"/"sum" a scalar other than 1 (negative, fractional, sometimes 0), for "none" one value per row,
the rows' values distinct (zeros and negatives among them). See :func:`upstream_gradient`.

Every value is exactly representable in the dtype (float64, float32, float16, bfloat16).
"""

from __future__ import annotations

import math
from typing import Any

import hypothesis.strategies as st
import numpy as np

from gradcheck.dtypes import FloatFormat, float_format, round_to_format
from gradcheck.errors import InvalidArgument
from gradcheck.options import DEFAULT_IGNORE_INDEX, GENERATE
from gradcheck.problem import Case, Layout, layout_of
from gradcheck.regimes import default_regimes, drawn_by, param, require_options

REGIMES = drawn_by("verify")  # every regime verify may draw; by default those whose option is set
GAP = param("large_gap", "gap")
HUGE = param("huge", "huge")
MANY_CLASSES_TILE = int(param("many_classes", "tile"))
MAX_SHAPE = GENERATE["max_shape"].default
# the few shapes drawn for a grad_fn that compiles once per shape (``compiles_per_shape``, the JAX adapters), each
# with its share in percent, about as often as _shapes draws such sizes: single rows and classes, odd and
# power-of-two sizes, a block tail (2049), the default max_shape, a late tile (32831), an LLM vocabulary
SHAPE_BUCKETS = (((1, 1), 10), ((1, 33), 5), ((7, 1), 5), ((3, 5), 20), ((8, 32), 20), ((17, 129), 15),
                 ((32, 512), 15), ((33, 2049), 6), ((64, 4096), 2), ((4, 32831), 1), ((16, 32000), 1))
LLM = {name: param("llm_vocab", name) for name in ("vocabularies", "min_power", "max_power", "block", "ignored",
                                                  "max_live_elements", "max_elements")}
LLM_CLASSES = tuple(sorted({int(k) for k in LLM["vocabularies"]} | {
    2**j + d for j in range(int(LLM["min_power"]), int(LLM["max_power"]) + 1) for d in (-1, 1)}))


def dtype_floats(
    dtype: Any = "float64",
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    allow_subnormal: bool = True,
    allow_infinity: bool = False,
) -> st.SearchStrategy[float]:
    """Python floats exactly representable in ``dtype`` (bfloat16 included), never NaN.

    Bit patterns are drawn as integers, so shrinking moves towards 0 and small exponents.

    Raises:
        InvalidArgument: unsupported dtype, or min_value > max_value.
    """
    fmt = float_format(dtype)
    lo = -math.inf if min_value is None else float(min_value)
    hi = math.inf if max_value is None else float(max_value)
    if lo > hi:
        raise InvalidArgument(f"min_value must be <= max_value, got {lo!r} > {hi!r}.")
    # magnitudes are bit patterns 0 (zero) ... bits(max) (largest finite), bits(max) + 1 (inf): monotone,
    # so drawing the pattern below the range's largest magnitude never produces NaN
    largest = min(max(abs(lo), abs(hi)), fmt.max)
    top = int(round_to_format(np.array(largest), fmt).view(fmt.int_dtype)) + 1
    if not allow_infinity or math.isfinite(largest) and largest < fmt.max:
        top = min(top, int(round_to_format(np.array(fmt.max), fmt).view(fmt.int_dtype)))

    def build(bits: int, negative: bool) -> float:
        raw = np.array([bits], dtype=np.uint64).astype(fmt.int_dtype).view(fmt.dtype)
        value = float(raw.astype(np.float64)[0])
        return -value if negative else value

    def keep(x: float) -> bool:
        if math.isinf(x) and not allow_infinity:
            return False
        if not allow_subnormal and x != 0 and abs(x) < fmt.tiny:
            return False
        return lo <= x <= hi

    return st.builds(build, st.integers(0, top), st.booleans()).filter(keep)


def logits(
    dtype: Any = "float64",
    *,
    regime: str | None = None,
    max_shape: tuple[int, int] = MAX_SHAPE,
) -> st.SearchStrategy[np.ndarray]:
    """``(N, K)`` logits of one regime (drawn from those that need no option when None), exact in ``dtype``."""
    chosen = {} if regime is None else {"regimes": (regime,)}
    return cases(dtype, max_shape=max_shape, **chosen).map(lambda c: c.logits)


def cases(dtype: Any = "float64", *, upstream: bool = False, **options: Any) -> st.SearchStrategy[Case]:
    """Whole cases: logits of a regime, targets, weights and ignored rows, exact in ``dtype``.

    Args:
        dtype: float64, float32, float16 or bfloat16.
        upstream: give every case an upstream gradient (``grad_output``, :func:`upstream_gradient`);
            False: none (the gradient of the loss itself).
        **options: the generation options of :data:`gradcheck.options.GENERATE` (``targets``:
            "index" or "probs", some probability rows not summing to one; ``reduction`` and
            ``label_smoothing`` passed through; ``weighted``: nonnegative class weights, some zero;
            ``ignore_index``: some index-target rows take it, never all for "mean"; ``regimes``:
            drawn from, shrinking towards the first; ``max_shape``: the largest ``(N, K)``,
            "many_classes" needs K > 64 and is skipped below that; default: every regime that
            needs no option, plus "saturated" when ``softcap`` is set and "large_lse" when
            ``lse_square_scale`` is; ``lse_square_scale`` and ``softcap``: passed through;
            ``shapes``: every case has one of exactly these logits shapes instead, in the layout
            ``class_axis`` names for 3-D and more; each regime is drawn at the shapes that suit it:
            "single" where N or K is 1, "many_classes" where K > 64, "llm_vocab" where K >= 32000).

    Raises:
        InvalidArgument: a bad option, ignore_index with probability targets, or a regime asked for
            without the option it needs (checked eagerly, when the strategy is built).
    """
    o = GENERATE.validate({"dtype": dtype, **options}, where="cases()")
    if o["ignore_index"] is not None and o["targets"] != "index":
        raise InvalidArgument(f"ignore_index applies to targets='index' only, got targets={o['targets']!r}.")
    if not isinstance(upstream, bool):
        raise InvalidArgument(f"upstream must be True or False, got {upstream!r}.")
    layouts = None
    if o["shapes"] is not None:
        layouts = tuple(layout_of(s, o["class_axis"]) for s in o["shapes"])  # eager: a 3-D shape needs class_axis
    elif o["class_axis"] is not None:
        raise InvalidArgument(f"class_axis applies to shapes=, got class_axis={o['class_axis']} without shapes.")
    kernel = {"lse_square_scale": o["lse_square_scale"], "softcap": o["softcap"]}
    regimes = o["regimes"] or default_regimes("verify", kernel)
    require_options(regimes, kernel)
    return _cases(float_format(o["dtype"]), o["targets"], o["reduction"], o["label_smoothing"], o["weighted"],
                  o["ignore_index"], regimes, o["max_shape"], kernel, upstream, layouts)


@st.composite
def _cases(draw: Any, fmt: FloatFormat, targets: str, reduction: str, label_smoothing: float, weighted: bool,
           ignore_index: int | None, regimes: tuple[str, ...], max_shape: tuple[int, int],
           kernel: dict[str, Any], upstream: bool = False, layouts: tuple[Layout, ...] | None = None) -> Case:
    if layouts is None:
        layout = None
        usable = tuple(r for r in regimes if _fits(r, max_shape)) or ("moderate",)
        regime = draw(st.sampled_from(usable))
    else:  # each regime at the asked shapes that suit it ("single": a 1 in the shape; ...)
        fitting = {r: tuple(lay for lay in layouts if _fits(r, _rows_of(lay), asked=True)) for r in regimes}
        usable = tuple(r for r in regimes if fitting[r]) or ("moderate",)
        regime = draw(st.sampled_from(usable))
        layout = draw(st.sampled_from(fitting.get(regime) or layouts))
    if layout is None:
        n, k = _shapes(draw, regime, max_shape)
    else:  # the asked shape, as rows: the class axis last, the other axes flattened
        n, k = int(np.prod(layout.batch_shape)), layout.shape[layout.axis]
    if ignore_index == 0 and k == 1 and reduction == "mean":
        k = 2  # with one class every row would be ignored: the mean would be 0/0
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    z, favourite = _build_logits(regime, rng, n, k, fmt, kernel["softcap"])
    tags: list[str] = []
    if targets == "index":
        t = _index_targets(rng, z, favourite, regime)
        if regime == "llm_vocab":  # most rows are padding or prompt: ignored (torch's default -100 if unset)
            ignored = DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index
            t = _ignore_rows(rng, t, k, ignored, reduction, tags, share=float(LLM["ignored"]))
            t = cap_counted_rows(rng, t, k, ignored, int(LLM["max_live_elements"]), tags)
        elif ignore_index is not None:
            t = _ignore_rows(rng, t, k, ignore_index, reduction, tags)
    else:
        t = _probability_targets(rng, z, fmt, tags)
    weight = _weights(rng, k, fmt, t, ignore_index, reduction) if weighted else None
    # drawn last, so the arrays above are the same with and without an upstream gradient
    grad_output = upstream_gradient(rng, n, reduction, fmt) if upstream else None
    if layout is not None and not layout.plain:
        z, t, kernel = layout.restore(z), layout.restore(t), {**kernel, "class_axis": layout.class_axis}
        grad_output = None if grad_output is None or grad_output.ndim == 0 else layout.restore(grad_output)
    return Case.make(
        z, t, weight=weight, ignore_index=DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, regime=regime, tags=tuple(tags), **kernel,
        grad_output=grad_output,
    )


def _rows_of(layout: Layout) -> tuple[int, int]:
    return int(np.prod(layout.batch_shape)), layout.shape[layout.axis]


def _fits(regime: str, shape: tuple[int, int], *, asked: bool = False) -> bool:
    """Whether a regime can be drawn within ``max_shape``, or at an ``asked`` shape (both as (rows, K))."""
    n, k = shape
    if regime == "single":
        return not asked or n == 1 or k == 1
    if regime == "many_classes":
        return k > MANY_CLASSES_TILE
    if regime == "llm_vocab":
        return k >= LLM_CLASSES[0]
    return True


def shape_buckets(max_shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The :data:`SHAPE_BUCKETS` within ``max_shape``, each repeated by its share (never empty: (1, 1) fits)."""
    return tuple(s for s, share in SHAPE_BUCKETS if s[0] <= max_shape[0] and s[1] <= max_shape[1] for _ in range(share))


UPSTREAM_SCALARS = (-1.0, 0.5, -0.5, 2.0, -3.0, 0.375, 1.5, -0.125, 0.0)  # exact in every dtype; 0 one draw in 12
UPSTREAM_GRID = 8  # per-row values are distinct multiples of 1/UPSTREAM_GRID in [-8, 8], times a power of two
UPSTREAM_POWERS = (-8, 4)  # the range of that power of two's exponent


def upstream_gradient(rng: np.random.Generator, n: int, reduction: str, fmt: FloatFormat) -> np.ndarray:
    """An upstream gradient exact in ``fmt``: shape ``()`` for "mean"/"sum", ``(n,)`` for "none".

    A scalar is never 1 (that is the loss's own gradient): one of ``UPSTREAM_SCALARS`` (negative,
    fractional, 0) or, a quarter of the time, a random value of the dtype in [-4, 4]. Per-row values
    are distinct (so a kernel that uses one row's value for every row, or ignores them, differs):
    multiples of 1/8 in [-8, 8] drawn without replacement (with replacement beyond 129 rows) times one
    power of two in [2**-8, 2**4] (so 0 and negatives occur), and half the time one row is 0. Every
    value has at most 8 significant bits and a small exponent: exact in float16 and bfloat16.
    """
    if reduction != "none":
        if rng.random() < 0.25:
            value = float(round_to_format(np.array(rng.uniform(-4.0, 4.0)), fmt))
            if value != 1.0:
                return np.array(value)
        return np.array(UPSTREAM_SCALARS[int(rng.integers(0, len(UPSTREAM_SCALARS)))] if rng.random() < 11 / 12
                        else 0.0)
    grid = np.arange(-8 * UPSTREAM_GRID, 8 * UPSTREAM_GRID + 1) / UPSTREAM_GRID
    values = rng.choice(grid, size=n, replace=n > grid.size)
    if n > 1 and rng.random() < 0.5 and not np.any(values == 0.0):
        values[rng.integers(1, n)] = 0.0  # a row whose upstream gradient is 0 (not the first: see below)
    if values[0] == 0.0 or np.count_nonzero(values == values[0]) > 1:  # row 0 nonzero and unlike the rest
        unused = np.setdiff1d(grid[grid != 0.0], values[1:])
        values[0] = unused[-1] if unused.size else grid[-1]
    scale = 2.0 ** int(rng.integers(UPSTREAM_POWERS[0], UPSTREAM_POWERS[1] + 1))
    return round_to_format(values * scale, fmt).astype(np.float64)


def _shapes(draw: Any, regime: str, max_shape: tuple[int, int]) -> tuple[int, int]:
    """Mostly small shapes, sometimes medium, rarely the largest (keeps examples cheap)."""
    max_n, max_k = max_shape
    if regime == "single":
        kind = draw(st.sampled_from(("one", "row", "column")))
        if kind == "one":
            return 1, 1
        if kind == "row":
            return 1, draw(st.integers(1, min(max_k, 64)))
        return draw(st.integers(1, min(max_n, 64))), 1
    if regime == "llm_vocab":
        k = draw(st.sampled_from(tuple(c for c in LLM_CLASSES if c <= max_k)))
        return draw(st.integers(1, max(1, min(max_n, int(LLM["max_elements"]) // k)))), k  # counted rows: _cases
    if regime == "many_classes":
        tiles = draw(st.integers(1, 512))
        tiles = tiles if tiles <= 8 or tiles % 8 == 0 else tiles % 8 + 1  # mostly few tiles, some many
        k = min(MANY_CLASSES_TILE * tiles + draw(st.integers(0, MANY_CLASSES_TILE - 1)), max_k)
        return draw(st.integers(1, min(max_n, 4))), max(k, MANY_CLASSES_TILE + 1)
    bucket = draw(st.integers(0, 9))
    limit_n, limit_k = (8, 32) if bucket < 6 else ((32, 512) if bucket < 9 else MAX_SHAPE)
    n = draw(st.integers(1, max(1, min(max_n, limit_n))))
    k = draw(st.integers(1, max(1, min(max_k, limit_k))))
    return n, k


def _build_logits(regime: str, rng: np.random.Generator, n: int, k: int, fmt: FloatFormat,
                  softcap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a regime (rounded to ``fmt``) and each row's favoured class (its argmax)."""
    name = fmt.name
    z = rng.standard_normal((n, k))
    rows = np.arange(n)
    if regime == "large_gap":
        gaps = rng.uniform(0.0, GAP[name], (n, k)) * (rng.random((n, k)) < 0.5)
        z = z - gaps
        top = rng.integers(0, k, n)
        z[rows, top] = z.max(axis=1) + rng.uniform(0.5, 1.0, n) * GAP[name] * (rng.random(n) < 0.7)
    elif regime == "huge":
        exponent = rng.uniform(0.0, math.log10(HUGE[name]), (n, k))
        z = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0) * 10.0**exponent
        if k > 1:  # repeat a row's maximum somewhere: ties at huge magnitude
            z[rows, rng.integers(0, k, n)] = np.where(rng.random(n) < 0.3, z.max(axis=1), z[rows, 0])
    elif regime == "ties":
        z = rng.integers(-2, 3, (n, k)).astype(np.float64)
        z[rng.random(n) < 0.25] = rng.integers(-2, 3)
    elif regime == "near_one_hot":
        small = name in ("float16", "bfloat16")
        top = rng.integers(0, k, n)
        z = 0.5 * z
        z[rows, top] += rng.uniform(3.0, 15.0, n) if small else rng.uniform(5.0, 40.0, n)
    elif regime == "confident":
        top = rng.integers(0, k, n)
        margin = rng.uniform(param("confident", "margin_low")[name], param("confident", "margin_high")[name], n)
        z = 0.5 * z
        z[rows, top] = z.max(axis=1) + margin
    elif regime == "offset":
        z = z + (np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.5, 1.0, n)
                 * param("offset", "offset")[name])[:, None]
    elif regime == "many_classes":
        tile = MANY_CLASSES_TILE
        late = max(0, (k - 1) // tile * tile - tile)  # the last full tile or the partial one
        top = rng.integers(late, k, n)
        z[rows, top] = z.max(axis=1) + rng.uniform(0.0, 3.0, n)
    elif regime == "llm_vocab":
        block = min(int(LLM["block"]), k)
        top = np.where(rng.random(n) < 0.5, k - 1, rng.integers(k - block, k, n))  # often the very last class
        z[rows, top] = z.max(axis=1) + rng.uniform(0.0, 3.0, n)
    elif regime == "saturated":  # needs softcap (cases() checks): |z| / c log-uniform, either sign
        low, high = np.log(param("saturated", "ratio_low")), np.log(param("saturated", "ratio_high"))
        ratio = np.exp(rng.uniform(low, high, (n, k)))
        z = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0) * np.minimum(ratio * softcap, fmt.max / 2)
    elif regime == "large_lse":
        level = param("large_lse", "level")[name]
        z = (np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.5, 1.0, n) * level)[:, None] \
            + param("large_lse", "spread") * z
    elif regime == "masked":
        mask = rng.random((n, k)) < 0.3
        mask[rows, np.argmax(z, axis=1)] = False
        z = np.where(mask, -np.inf, z)
    z = round_to_format(z, fmt)
    favourite = np.argmax(_comparable(z), axis=1)
    return z, favourite


def _comparable(z: np.ndarray) -> np.ndarray:
    """``z`` where numpy orders it itself (float64, float32, float16), else as float64 (bfloat16): the same
    comparisons, without a float64 copy of an LLM-sized array."""
    return z if z.dtype.kind == "f" else z.astype(np.float64)


def _index_targets(rng: np.random.Generator, z: np.ndarray, favourite: np.ndarray, regime: str) -> np.ndarray:
    n, k = z.shape
    t = rng.integers(0, k, n)
    bad = ~np.isfinite(_comparable(z[np.arange(n), t]))  # the targets' logits alone
    t[bad] = favourite[bad]  # never a masked class: its loss would be infinite
    if regime in ("near_one_hot", "large_gap"):
        pick = rng.random(n) < 0.6
        t[pick] = favourite[pick]
    elif regime == "confident":
        t = favourite.copy()
    return t.astype(np.int64)


def _ignore_rows(rng: np.random.Generator, t: np.ndarray, k: int, ignore_index: int, reduction: str,
                 tags: list[str], share: float = 0.3) -> np.ndarray:
    t = t.copy()
    t[rng.random(t.shape[0]) < share] = ignore_index
    active = t != ignore_index
    if reduction == "mean" and not active.any():
        choices = [c for c in range(k) if c != ignore_index]
        if choices:
            t[0] = choices[0]
        # else K == 1 and ignore_index == 0: every row is ignored whatever we do; leave it to "sum"
    if (t == ignore_index).any():
        tags.append("ignored rows")
    return t


def cap_counted_rows(rng: np.random.Generator, t: np.ndarray, k: int, ignore_index: int, max_live: int,
                     tags: list[str]) -> np.ndarray:
    """Index targets with at most ``max_live // k`` counted rows (at least one): beyond that, counted
    rows chosen at random are ignored too ("llm_vocab"'s ``max_live_elements``).

    Targets within the cap are returned as they are, without drawing from ``rng``, so every case
    drawn before the cap existed is drawn the same.
    """
    limit = max(1, max_live // max(k, 1))
    live = np.flatnonzero(t != ignore_index)
    if live.size <= limit:
        return t
    t = t.copy()
    t[rng.choice(live, live.size - limit, replace=False)] = ignore_index
    if "ignored rows" not in tags:
        tags.append("ignored rows")
    return t


def _probability_targets(rng: np.random.Generator, z: np.ndarray, fmt: FloatFormat, tags: list[str]) -> np.ndarray:
    n, k = z.shape
    t = rng.dirichlet(np.full(k, 0.5), n) if k > 1 else np.ones((n, 1))
    kind = rng.integers(0, 4, n)  # 0, 1: a distribution; 2: scaled; 3: one-hot or zero row
    scale = rng.uniform(0.0, 3.0, n)
    t[kind == 2] *= scale[kind == 2, None]
    for row in np.flatnonzero(kind == 3):
        t[row] = 0.0
        if rng.random() < 0.7:
            t[row, rng.integers(0, k)] = 1.0
    t[~np.isfinite(z.astype(np.float64))] = 0.0  # no target mass on masked classes
    t = round_to_format(t, fmt)
    tags.append("soft")
    sums = t.astype(np.float64).sum(axis=1)
    if np.any(np.abs(sums - 1.0) > 1e-3):
        tags.append("unnormalized")
    return t


def _weights(rng: np.random.Generator, k: int, fmt: FloatFormat, t: np.ndarray, ignore_index: int | None,
             reduction: str) -> np.ndarray:
    w = rng.uniform(0.0, 2.0, k) * (rng.random(k) >= 0.1)
    w = round_to_format(w, fmt)
    if reduction == "mean" and t.ndim == 1:  # the divisor sum_n w_{t_n} must not be 0
        active = t[t != (DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index)]
        if active.size and float(np.sum(w.astype(np.float64)[active])) == 0.0:
            w[active[0]] = 1.0
    return w
