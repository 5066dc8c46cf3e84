"""The precision zoo: half-precision kernels that compute in float32 and round once, and the ways real
kernels broke that promise (issue 11; docs/tolerance.md, "Precision contracts").

Every function follows ``verify``'s calling convention. The correct ones compute everything in float32
from the half inputs (which float32 holds exactly) and round the gradient once; each bug rounds one
intermediate to the half dtype, the rest in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from zoo import CORRECT_CONFIGS, HALF, Entry, _divisor, _online_softmax, _targets, numpy_logspace, numpy_stable

F32 = np.float32


def _in_float32(impl: Callable[..., Any], name: str) -> Callable[..., Any]:
    def grad_fn(logits, targets, **options):
        if options.get("weight") is not None:
            options["weight"] = np.asarray(options["weight"]).astype(F32)
        t = targets.astype(F32) if targets.dtype.kind == "f" or targets.dtype.kind == "V" else targets
        return impl(logits.astype(F32), t, **options).astype(logits.dtype)

    grad_fn.__name__ = grad_fn.__qualname__ = name
    grad_fn.__doc__ = f"{impl.__name__} computed in float32 from the half inputs, rounded once."
    return grad_fn


def _online(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    p = _online_softmax(logits)
    wt, active, w = _targets(logits, targets, weight, ignore_index, label_smoothing)
    d = _divisor(logits, targets, w, active, reduction)
    g = p * wt.sum(axis=1, keepdims=True) - wt
    return g if d is None else g / d


_online.__name__ = "online_softmax"
stable_f32 = _in_float32(numpy_stable, "stable_f32")
logspace_f32 = _in_float32(numpy_logspace, "logspace_f32")
online_f32 = _in_float32(_online, "online_f32")

CORRECT = {f.__name__: f for f in (stable_f32, logspace_f32, online_f32)}


# ---- the bugs: float32 inside, but one intermediate rounded to the half dtype -------------------

def _parts(logits, targets, options):
    """float32 logits, weighted targets, row sums S and the divisor D (None: no division)."""
    z = logits.astype(F32)
    w = options.get("weight")
    t = targets.astype(F32) if targets.dtype.kind in "fV" else targets
    wt, active, w32 = _targets(z, t, None if w is None else np.asarray(w).astype(F32),
                               options.get("ignore_index", -100), options.get("label_smoothing", 0.0))
    d = _divisor(z, t, w32, active, options.get("reduction", "mean"))
    return z, wt, wt.sum(axis=1, keepdims=True), (F32(1) if d is None else F32(d))


def _softmax32(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def store_then_subtract(logits, targets, **options):
    """Liger-Kernel #1329: p S / D stored into the half gradient buffer, then w t / D subtracted."""
    z, wt, s, d = _parts(logits, targets, options)
    stored = (_softmax32(z) * s / d).astype(logits.dtype)
    return (stored.astype(F32) - wt / d).astype(logits.dtype)


def probs_rounded_to_half(logits, targets, **options):
    """The softmax rounded to the half dtype before p S - w t (a half probability buffer)."""
    z, wt, s, d = _parts(logits, targets, options)
    p = _softmax32(z).astype(logits.dtype).astype(F32)
    return ((p * s - wt) / d).astype(logits.dtype)


def exp_in_half(logits, targets, **options):
    """exp(z - max) evaluated in the half dtype, the sums and the rest in float32."""
    z, wt, s, d = _parts(logits, targets, options)
    e = np.exp((z - z.max(axis=1, keepdims=True)).astype(logits.dtype)).astype(F32)
    return ((e / e.sum(axis=1, keepdims=True) * s - wt) / d).astype(logits.dtype)


def lse_in_half(logits, targets, **options):
    """The row's logsumexp m + log Z kept in the half dtype, then p = exp(z - lse) in float32."""
    z, wt, s, d = _parts(logits, targets, options)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))).astype(logits.dtype).astype(F32)
    return ((np.exp(z - lse) * s - wt) / d).astype(logits.dtype)


def _tree_sum_in(dtype, x):
    """A pairwise (tree) sum along the last axis with every partial sum rounded to ``dtype``."""
    x = x.astype(dtype)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = np.concatenate([x, np.zeros(x.shape[:-1] + (1,), dtype=dtype)], axis=-1)
        x = (x[..., 0::2].astype(F32) + x[..., 1::2].astype(F32)).astype(dtype)
    return x.astype(F32)


def half_row_sum(logits, targets, **options):
    """The softmax denominator accumulated in the half dtype (tree order), the rest in float32."""
    z, wt, s, d = _parts(logits, targets, options)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return ((e / _tree_sum_in(logits.dtype, e) * s - wt) / d).astype(logits.dtype)


BUGS = {f.__name__: f for f in (store_then_subtract, probs_rounded_to_half, exp_in_half, lse_in_half,
                                half_row_sum)}


# the zoo's entries: float32-inside kernels keep the default (float32) contract of the half dtypes
PRECISION_CORRECT = {name: Entry(name, fn, fn.__doc__, dtypes=HALF, configs=CORRECT_CONFIGS)
                     for name, fn in CORRECT.items()}
PRECISION_BUGGY = {name: Entry(name, fn, fn.__doc__, dtypes=HALF, configs=CORRECT_CONFIGS[:3])
                   for name, fn in BUGS.items()}
