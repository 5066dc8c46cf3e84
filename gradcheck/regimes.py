"""The one catalogue of regimes (what each exercises, which generators draw it, its parameters per
dtype), and the seeded numpy generator of the study.

Three generators draw from the catalogue, each the regimes it lists under ``drawn_by``:

* ``"verify"``: the Hypothesis strategies behind ``verify`` (:mod:`gradcheck.strategies`), which shrink;
* ``"study"``: :func:`make_case` below, plain numpy and fast: the study behind ``gradcheck report``,
  the self-check, the foundation tests and the methods-agreement tests and benchmark;
* ``"vectors"``: the golden vectors' input kinds (:mod:`gradcheck.vectors`), fixed shapes.

Every number a generator uses to shape a regime is a named parameter here, per dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gradcheck.dtypes import float_format
from gradcheck.errors import InvalidArgument
from gradcheck.options import DEFAULT_IGNORE_INDEX

PerDtype = Mapping[str, float]
LLM_VOCABULARIES = (32000.0, 50257.0, 128256.0, 151936.0, 262144.0)  # Llama 2, GPT-2, Llama 3, Qwen 2, Gemma


@dataclass(frozen=True)
class Regime:
    """One regime of the catalogue.

    Attributes:
        name: its name, the same in every generator that draws it.
        exercises: what it exercises, in one line.
        drawn_by: the generators that draw it ("verify", "study", "vectors").
        params: named parameters, each a value per dtype (or a plain number).
        needs: the case option (``"softcap"``, ``"lse_square_scale"``) without which the regime
            exercises nothing of its own: a generator draws it by default only when that option is
            set, and refuses it when asked for without the option (None: always drawn).
    """

    name: str
    exercises: str
    drawn_by: frozenset[str]
    params: Mapping[str, PerDtype | float | tuple[float, ...]] = field(default_factory=dict)
    needs: str | None = None


def _by(*generators: str) -> frozenset[str]:
    return frozenset(generators)


CATALOGUE: tuple[Regime, ...] = (
    Regime("moderate", "logits of order 1", _by("verify", "study", "vectors")),
    Regime("large_gap", "one logit per row far above the rest: probabilities subnormal or zero",
           _by("verify", "study", "vectors"), {
               # largest gap drawn: exp(-gap) is near or below the smallest subnormal of the dtype
               "gap": {"float64": 700.0, "float32": 90.0, "bfloat16": 90.0, "float16": 20.0},
               # the vectors' gap (drawn in [gap/2, gap]): the other probabilities subnormal or zero
               "vector_gap": {"float64": 740.0, "float32": 100.0, "float16": 17.0, "bfloat16": 100.0},
           }),
    Regime("huge", "magnitudes near the top of the dtype's range", _by("verify", "study", "vectors"), {
        "huge": {"float64": 1e300, "float32": 1e30, "bfloat16": 1e30, "float16": 1e4},
    }),
    Regime("ties", "small integers: maxima and other values repeat exactly", _by("verify", "study", "vectors")),
    Regime("near_one_hot", "one class holds almost all the probability, usually the target", _by("verify")),
    Regime("confident", "the target logit far above the rest: p_t - 1 cancels (the element that drives "
           "learning, lost when p_t is rounded to the dtype first)", _by("verify"), {
               # the target's margin over the row's maximum: 1 - p_t ~ K exp(-margin), below the
               # dtype's epsilon at the top of the range, so p_t rounds to 1 in the dtype
               "margin_low": {"float64": 20.0, "float32": 8.0, "float16": 4.0, "bfloat16": 3.0},
               "margin_high": {"float64": 40.0, "float32": 18.0, "float16": 10.0, "bfloat16": 8.0},
           }),
    Regime("offset", "a large common offset on every logit of a row: exp(z) overflows, and "
           "m + log Z recombined loses the small logits", _by("verify"), {
               # the largest offset; logits stay exact in the dtype with spacing at most 0.5 (half)
               "offset": {"float64": 1e10, "float32": 1e5, "float16": 512.0, "bfloat16": 256.0},
           }),
    Regime("many_classes", "K up to 32831, often not a multiple of the tile, the maximum in a late tile",
           _by("verify", "vectors"), {
               "tile": 64.0,  # tiled kernels use tiles of 64, 128 or 256 classes: all multiples of 64
               # the vectors: exp(-level) is below half an ulp of 1, a sequential half sum stagnates
               "level": {"float16": 8.0, "bfloat16": 6.0},
               "vector_classes": 256.0,
           }),
    Regime("llm_vocab", "LLM vocabularies (32000 ... 262144 classes, and 2**j +- 1), the row maximum in the last "
           "block, up to thousands of rows of which most are ignored (drawn when max_shape's K reaches 32000, or at "
           "shapes=)",
           _by("verify"), {
               "vocabularies": LLM_VOCABULARIES,
               "min_power": 15.0, "max_power": 18.0,  # K = 2**j - 1 and 2**j + 1: the tails of power-of-two blocks
               "block": 1024.0,  # the maximum lies in the last block of this many classes (often the last class)
               "ignored": 0.9,  # share of rows whose target is ignore_index (torch's -100 when it is not set)
               # counted (not ignored) rows times K at most, in every draw (more counted rows are ignored, at
               # random): verify models the counted rows alone (docs/tolerance.md, "Ignored rows"), so its
               # time and its memory beyond the input follow them; 2**23 is 262 counted rows at K = 32000
               # (64 MiB per float64 array of the judgement, a few seconds per example)
               "max_live_elements": float(2**23),
               # N * K at most when N is drawn (max_shape): the logits, each grad_fn result and its private copy
               # are of the whole input, and drawing it takes about 1.5 float64 arrays of it; 2**27 is 4096 rows
               # at K = 32000 (1 GiB of float64 while drawing, 512 MiB per float32 array)
               "max_elements": float(2**27),
           }),
    Regime("single", "a single row, a single class, or both", _by("verify")),
    Regime("single_class", "one class: the gradient is exactly zero", _by("vectors")),
    Regime("masked", "some logits are -inf (at least one finite per row)", _by("verify", "study", "vectors")),
    Regime("signed_zero", "-0.0 and +0.0 logits; a target gradient that rounds to -0.0", _by("vectors"), {
        # a gap whose exp is below half the smallest subnormal: p_t - 1 rounds to -0
        "zero_gap": {"float64": 750.0, "float32": 110.0, "float16": 20.0, "bfloat16": 100.0},
    }),
    Regime("soft_unnormalized", "probability targets, some rows not summing to one", _by("study")),
    Regime("smoothed_weighted", "label smoothing with class weights", _by("study")),
    Regime("ignored", "rows whose target is ignore_index", _by("study")),
    # the kernel options' own regimes (issue 12), drawn only when their option is set
    Regime("saturated", "softcap saturation: |z| up to many times c, so tanh(z / c) is near +-1 and the chain "
           "factor 1 - tanh^2 tiny (a small c seen from the logits), with rows across the knee |z| ~ c",
           _by("verify", "study", "vectors"), {
               # |z| / c is drawn log-uniformly in [ratio_low, ratio_high]: 1 - tanh^2 ~ 4 exp(-2 |z| / c)
               # goes from about 0.8 to 4 exp(-100) ~ 1.5e-43 (below float32's smallest subnormal, so the
               # chain factor decides whether an element is 0)
               "ratio_low": 0.25, "ratio_high": 50.0,
               # (helper vectors) the study's softcap c = 2**j, j uniform in [cap_log2_low, cap_log2_high]
               # (0.5 to 32: Gemma-2's 30 and a small c); the vectors' |z| / c in [vector_ratio_low,
               # vector_ratio_high], so tanh(z / c) is +-1 to every dtype but the chain factor is not 0 in float64
               "cap_log2_low": -1.0, "cap_log2_high": 5.0,
               "vector_ratio_low": 8.0, "vector_ratio_high": 40.0,
           }, needs="softcap"),
    Regime("large_lse", "z-loss with large |lse|: every logit of a row near +-level, so lambda * lse^2 and "
           "its gradient 2 lambda lse p are large and signed", _by("verify", "study", "vectors"), {
               # the rows' common level (drawn in [level/2, level] with either sign), and the spread of
               # the logits around it; 300 is issue 12's "logits near +-300", exact in every dtype
               "level": {"float64": 300.0, "float32": 300.0, "float16": 300.0, "bfloat16": 300.0},
               "spread": 4.0,
               # (helper vectors) the study's lambda, log-uniform in [scale_low, scale_high] (PaLM's 1e-4 up)
               "scale_low": 1e-4, "scale_high": 0.1,
           }, needs="lse_square_scale"),
)

BY_NAME: dict[str, Regime] = {r.name: r for r in CATALOGUE}


def drawn_by(generator: str) -> tuple[str, ...]:
    """The names of the regimes a generator draws, in catalogue order."""
    return tuple(r.name for r in CATALOGUE if generator in r.drawn_by)


def default_regimes(generator: str, options: Mapping[str, object]) -> tuple[str, ...]:
    """The regimes a generator draws by default given the case options set: those that need no
    option, and those whose option (:attr:`Regime.needs`) is set (not None and not 0)."""
    return tuple(r.name for r in CATALOGUE if generator in r.drawn_by
                 and (r.needs is None or options.get(r.needs) not in (None, 0, 0.0)))


def require_options(regimes: tuple[str, ...], options: Mapping[str, object]) -> None:
    """Refuse a regime asked for without the option it needs.

    Raises:
        InvalidArgument: naming the regime and the option.
    """
    for name in regimes:
        needs = BY_NAME[name].needs
        if needs is not None and options.get(needs) in (None, 0, 0.0):
            raise InvalidArgument(f"regime {name!r} exercises {needs}, so it needs {needs}= set, got "
                                  f"{needs}={options.get(needs)!r}; pass {needs}= or drop the regime.")


def param(regime: str, name: str) -> PerDtype | float | tuple[float, ...]:
    """A named parameter of a regime (per dtype, or a plain number)."""
    return BY_NAME[regime].params[name]


REGIMES: tuple[str, ...] = default_regimes("study", {})  # what make_case draws for the plain loss
# (helper vectors) the study's rows of the kernel options: the regimes that need an option; make_case
# sets that option itself. Apart from REGIMES, so the plain study (its cells and totals) stays as it was.
OPTION_REGIMES: tuple[str, ...] = tuple(r for r in drawn_by("study") if BY_NAME[r].needs is not None)
GAP = param("large_gap", "gap")
HUGE = param("huge", "huge")


def make_case(
    seed: int, regime: str, dtype: str = "float64", *, n: int | None = None, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return ``(logits, targets, options)`` for ``regime``, the logits exact in ``dtype``.

    Args:
        seed: seeds a ``numpy.random.default_rng``; the same seed gives the same case.
        regime: one of :data:`REGIMES` or :data:`OPTION_REGIMES` (which set their option in ``options``).
        dtype: format of the logits (and of probability targets).
        n, k: the shape; drawn from [1, 4] x [1, 8] when None.
    """
    if regime not in REGIMES + OPTION_REGIMES:
        raise InvalidArgument(f"regime must be one of {REGIMES + OPTION_REGIMES}, got {regime!r}.")
    rng = np.random.default_rng(seed)
    fmt = float_format(dtype)
    n = int(rng.integers(1, 5)) if n is None else n
    k = int(rng.integers(1, 9)) if k is None else k
    z = rng.standard_normal((n, k)) * rng.choice([0.1, 1.0, 4.0])
    options: dict = {}
    targets = rng.integers(0, k, n)
    if regime == "large_gap":
        gap = rng.uniform(0.3, 1.0) * GAP[dtype]
        z = -rng.uniform(0.5, 1.0, (n, k)) * gap
        z[np.arange(n), rng.integers(0, k, n)] = rng.uniform(-3, 3, n)
    elif regime == "huge":
        z = rng.uniform(-1, 1, (n, k)) * HUGE[dtype] * rng.choice([1e-3, 1.0])
    elif regime == "ties":
        z = np.round(z)
        z[:, : max(1, k // 2)] = z.max()
    elif regime == "masked":
        mask = rng.random((n, k)) < 0.4
        mask[np.arange(n), rng.integers(0, k, n)] = False
        z = np.where(mask, -np.inf, z)
        targets = np.array([rng.choice(np.flatnonzero(~mask[i])) for i in range(n)])
    elif regime == "soft_unnormalized":
        targets = rng.random((n, k)) * rng.choice([0.3, 1.0, 3.0])
        targets[rng.random((n, k)) < 0.3] = 0.0
    elif regime == "smoothed_weighted":
        options = {"weight": rng.uniform(0.0, 3.0, k), "label_smoothing": float(rng.choice([0.05, 0.1, 0.5, 1.0]))}
        if rng.random() < 0.5:
            targets = rng.dirichlet(np.ones(k), n)
        else:
            options["weight"][targets] += 0.5  # keep the weighted mean's divisor positive
    elif regime == "ignored":
        targets = np.where(rng.random(n) < 0.5, DEFAULT_IGNORE_INDEX, targets)
        targets[0] = rng.integers(0, k)
    elif regime == "saturated":  # (helper vectors) softcap c = 2**j; |z| / c log-uniform, either sign
        sat = BY_NAME["saturated"].params
        cap = float(2.0 ** int(rng.integers(int(sat["cap_log2_low"]), int(sat["cap_log2_high"]) + 1)))
        ratio = np.exp(rng.uniform(np.log(sat["ratio_low"]), np.log(sat["ratio_high"]), (n, k)))
        z = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0) * ratio * cap
        options = {"softcap": cap}
    elif regime == "large_lse":  # (helper vectors) rows near +-level; lambda log-uniform
        big = BY_NAME["large_lse"].params
        level = rng.uniform(0.5, 1.0, (n, 1)) * big["level"][dtype] * np.where(rng.random((n, 1)) < 0.5, -1.0, 1.0)
        z = level + rng.uniform(-big["spread"], big["spread"], (n, k))
        options = {"lse_square_scale": float(np.exp(rng.uniform(np.log(big["scale_low"]), np.log(big["scale_high"]))))}
    # (helper vectors) the option regimes keep "mean": every reduction would compile the JAX methods anew
    # for each shape and dtype, the bulk of the report's time; the vectors and verify cover the reductions
    if regime not in ("smoothed_weighted", *OPTION_REGIMES) and rng.random() < 0.3:
        options["reduction"] = str(rng.choice(["sum", "none"]))
    with np.errstate(over="ignore"):
        logits = z.astype(fmt.dtype)
    logits = np.where(np.isfinite(logits) | np.isneginf(z), logits, np.sign(z) * fmt.max).astype(fmt.dtype)
    if targets.dtype.kind == "f":
        targets = targets.astype(fmt.dtype)
    return logits, targets, options
