"""Seeded numpy generators of hard cross-entropy cases, one per named regime.

Plain numpy and fast: used by the self-check, the foundation tests and the study. The Hypothesis
strategies in :mod:`gradcheck.strategies` cover the same ground with shrinking, for ``verify``.
"""

from __future__ import annotations

import numpy as np

from gradcheck.dtypes import float_format
from gradcheck.errors import InvalidArgument

REGIMES: tuple[str, ...] = ("moderate", "large_gap", "huge", "ties", "masked", "soft_unnormalized", "smoothed_weighted", "ignored")
GAP = {"float64": 700.0, "float32": 90.0, "float16": 12.0, "bfloat16": 90.0}
HUGE = {"float64": 1e300, "float32": 1e30, "float16": 1e4, "bfloat16": 1e30}


def make_case(
    seed: int, regime: str, dtype: str = "float64", *, n: int | None = None, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return ``(logits, targets, options)`` for ``regime``, the logits exact in ``dtype``.

    Args:
        seed: seeds a ``numpy.random.default_rng``; the same seed gives the same case.
        regime: one of :data:`REGIMES`.
        dtype: format of the logits (and of probability targets).
        n, k: the shape; drawn from [1, 4] x [1, 8] when None.
    """
    if regime not in REGIMES:
        raise InvalidArgument(f"regime must be one of {REGIMES}, got {regime!r}.")
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
        targets = np.where(rng.random(n) < 0.5, -100, targets)
        targets[0] = rng.integers(0, k)
    if regime != "smoothed_weighted" and rng.random() < 0.3:
        options["reduction"] = str(rng.choice(["sum", "none"]))
    with np.errstate(over="ignore"):
        logits = z.astype(fmt.dtype)
    logits = np.where(np.isfinite(logits) | np.isneginf(z), logits, np.sign(z) * fmt.max).astype(fmt.dtype)
    if targets.dtype.kind == "f":
        targets = targets.astype(fmt.dtype)
    return logits, targets, options
