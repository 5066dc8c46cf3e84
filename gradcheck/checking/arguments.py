"""verify's argument checks, in one function (the central option spec in gradcheck/problem.py is to replace it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradcheck.errors import InvalidArgument
from gradcheck.problem import REDUCTIONS
from gradcheck.strategies import MAX_SHAPE, REGIMES


def _check_arguments(
    grad_fn: Any, dtype: str, targets: str, reduction: str, label_smoothing: Any, weighted: Any,
    ignore_index: Any, max_examples: Any, seed: Any, max_shape: Any, regimes: Any,
) -> dict[str, Any]:
    """Validate verify's arguments; return the non-default ones (for the reproduction line)."""
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}.")
    if targets not in ("index", "probs"):
        raise InvalidArgument(f"targets must be 'index' or 'probs', got {targets!r}.")
    if reduction not in REDUCTIONS:
        raise InvalidArgument(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing <= 1:
        raise InvalidArgument(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}.")
    if not isinstance(weighted, bool):
        raise InvalidArgument(f"weighted must be True or False, got {weighted!r}.")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise InvalidArgument(f"ignore_index must be an integer or None, got {ignore_index!r}.")
        if targets != "index":
            raise InvalidArgument(f"ignore_index applies to targets='index' only, got targets={targets!r}.")
    if isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1:
        raise InvalidArgument(f"max_examples must be a positive integer, got {max_examples!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InvalidArgument(f"seed must be a nonnegative integer or None, got {seed!r}.")
    try:
        n, k = (int(v) for v in max_shape)
    except (TypeError, ValueError):
        raise InvalidArgument(f"max_shape must be a pair (N, K), got {max_shape!r}.") from None
    if n < 1 or k < 1:
        raise InvalidArgument(f"max_shape must be (N, K) with N, K >= 1, got {max_shape!r}.")
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown or not len(regimes):
        raise InvalidArgument(f"regimes must be a non-empty subset of {REGIMES}, got {tuple(regimes)!r}.")
    given = {
        "dtype": dtype, "targets": targets, "reduction": reduction, "label_smoothing": label_smoothing,
        "weighted": weighted, "ignore_index": ignore_index, "max_examples": max_examples,
        "max_shape": tuple(max_shape), "regimes": tuple(regimes),
    }
    defaults = {
        "dtype": "float64", "targets": "index", "reduction": "mean", "label_smoothing": 0.0, "weighted": False,
        "ignore_index": None, "max_examples": 100, "max_shape": MAX_SHAPE, "regimes": REGIMES,
    }
    return {k: v for k, v in given.items() if v != defaults[k]}
