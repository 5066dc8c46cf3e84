"""The bug zoo: correct and realistically wrong cross-entropy gradients, for tests and benchmarks.

Every function follows ``verify``'s calling convention, ``grad_fn(logits, targets, **options)`` with
numpy arrays of the checked dtype and only the non-default options as keywords. Each
:class:`Entry` says which dtypes and which ``verify`` configurations it applies to: a correct entry
must pass all of them, a buggy one must fail each of them (its bug shows under that configuration).

``ZOO_CORRECT`` and ``ZOO_BUGGY`` map names to entries.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcheck.adapters import jax_loss_grad, torch_grad_fn, torch_loss_grad
from gradcheck.checking.result import FailureKind
from gradcheck.dtypes import float_format

ALL = ("float64", "float32", "float16", "bfloat16")
HALF = ("float16", "bfloat16")
TILE = 64

# configurations a correct implementation is checked under: together they exercise every option
CORRECT_CONFIGS: tuple[dict[str, Any], ...] = (
    {},
    {"reduction": "sum", "weighted": True, "label_smoothing": 0.2, "ignore_index": 0},
    {"targets": "probs", "reduction": "none", "weighted": True, "label_smoothing": 0.1},
    {"targets": "probs"},
    {"reduction": "mean", "weighted": True, "ignore_index": -1},
)


@dataclass(frozen=True)
class Entry:
    """A zoo member.

    Attributes:
        name: short identifier.
        fn: the ``grad_fn``.
        description: what it does (for buggy ones: the bug).
        dtypes: the dtypes it applies to.
        configs: ``verify`` keyword sets it applies to.
        kind: for a bug that is not about values, the failure kind ``verify`` must report.
        in_dtype: a correct implementation that computes in the checked dtype itself: it keeps the
            dtype's own contract, not the default float32 one of the half precisions.
    """

    name: str
    fn: Callable[..., Any]
    description: str
    dtypes: tuple[str, ...] = ALL
    configs: tuple[dict[str, Any], ...] = ({},)
    kind: FailureKind | None = None
    in_dtype: bool = False


# --- shared pieces, computed in the logits' dtype -------------------------------------------------

def _work(dtype: np.dtype) -> np.dtype:
    """bfloat16 sums go through float32 (ml_dtypes' np.sum is a sequential bfloat16 loop)."""
    return np.dtype(np.float32) if float_format(dtype).name == "bfloat16" else dtype


def _sum(x: np.ndarray, axis: int | None = None, keepdims: bool = False) -> np.ndarray:
    return np.sum(x, axis=axis, keepdims=keepdims, dtype=_work(x.dtype)).astype(x.dtype)


def _targets(logits: np.ndarray, targets: np.ndarray, weight: Any, ignore_index: int,
             label_smoothing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted dense targets ``w * t`` (smoothed), the active rows, and the weights, in the dtype."""
    dt = logits.dtype
    n, k = logits.shape
    if targets.ndim == 1:
        active = targets != ignore_index
        t = np.zeros((n, k), dtype=dt)
        t[np.flatnonzero(active), targets[active]] = 1
    else:
        active = np.ones(n, dtype=bool)
        t = targets.astype(dt)
    if label_smoothing:
        t = dt.type(1 - label_smoothing) * t + dt.type(label_smoothing / k)
        t[~active] = 0
    w = np.ones(k, dtype=dt) if weight is None else np.asarray(weight, dtype=dt)
    return w * t, active, w


def _divisor(logits: np.ndarray, targets: np.ndarray, w: np.ndarray, active: np.ndarray, reduction: str) -> Any:
    if reduction != "mean":
        return None
    if targets.ndim == 1:
        return _sum(w[targets[active]])
    return logits.shape[0]


def _finish(p: np.ndarray, wt: np.ndarray, d: Any) -> np.ndarray:
    g = p * _sum(wt, axis=1, keepdims=True) - wt
    return g if d is None else g / d


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / _sum(e, axis=1, keepdims=True)


# --- correct implementations ------------------------------------------------------------------------

def numpy_stable(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """The textbook stable formula in the logits' dtype: p = exp(z - max) / sum, g = (p S - w t) / D."""
    wt, active, w = _targets(logits, targets, weight, ignore_index, label_smoothing)
    return _finish(_softmax(logits), wt, _divisor(logits, targets, w, active, reduction))


def numpy_logspace(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Through log-softmax: p = exp((z - max) - log sum exp(z - max)), in the dtype."""
    s = logits - logits.max(axis=1, keepdims=True)
    log_p = s - np.log(_sum(np.exp(s), axis=1, keepdims=True))
    wt, active, w = _targets(logits, targets, weight, ignore_index, label_smoothing)
    return _finish(np.exp(log_p), wt, _divisor(logits, targets, w, active, reduction))


def _online_softmax(z: np.ndarray, *, rescale: str = "right", pad: float = -np.inf) -> np.ndarray:
    """Blocked online softmax: one pass over tiles of TILE classes with a running max and sum."""
    n, k = z.shape
    tiles = -(-k // TILE)
    padded = np.full((n, tiles * TILE), pad, dtype=z.dtype)
    padded[:, :k] = z
    m = np.full((n, 1), -np.inf, dtype=z.dtype)
    total = np.zeros((n, 1), dtype=z.dtype)
    with np.errstate(invalid="ignore"):
        for start in range(0, tiles * TILE, TILE):
            block = padded[:, start:start + TILE]
            m_new = np.maximum(m, block.max(axis=1, keepdims=True))
            if rescale == "right":
                factor = np.where(m == m_new, 1, np.exp(m - m_new))
            elif rescale == "inverted":
                factor = np.where(m == m_new, 1, np.exp(m_new - m))
            else:  # "none": the running sum keeps its old scale
                factor = np.ones_like(m)
            e = np.where(np.isneginf(block), 0, np.exp(block - m_new))
            total = total * factor.astype(z.dtype) + np.sum(e, axis=1, keepdims=True).astype(z.dtype)
            m = m_new
        p = np.where(np.isneginf(padded), 0, np.exp(padded - m)) / total
    return p[:, :k].astype(z.dtype)


def numpy_online(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """A tiled online-softmax kernel (like fused GPU kernels): float32 inside for half dtypes."""
    work = np.float32 if float_format(logits.dtype).name in HALF else logits.dtype
    p = _online_softmax(logits.astype(work)).astype(logits.dtype)
    wt, active, w = _targets(logits, targets, weight, ignore_index, label_smoothing)
    return _finish(p, wt, _divisor(logits, targets, w, active, reduction))


def oracle(logits, targets, **options):
    """gradcheck's own float64 oracle, rounded to the dtype.

    The weight goes in as float64 (exact): make_problem rejects bfloat16 weights (dtype kind "V").
    """
    from gradcheck import cross_entropy_grad

    if options.get("weight") is not None:
        options["weight"] = np.asarray(options["weight"]).astype(np.float64)
    return cross_entropy_grad(logits, targets, dtype=logits.dtype, **options)


def _torch_manual(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """torch ops in the tensor's dtype: softmax, dense targets, g = (p S - w t) / D."""
    import torch

    n, k = logits.shape
    if targets.dim() == 1:
        active = targets != ignore_index
        t = torch.zeros_like(logits)
        t[active.nonzero()[:, 0], targets[active]] = 1
    else:
        active = torch.ones(n, dtype=torch.bool)
        t = targets.clone()
    if label_smoothing:
        t = (1 - label_smoothing) * t + label_smoothing / k
        t[~active] = 0
    w = torch.ones(k, dtype=logits.dtype) if weight is None else weight
    wt = w * t
    g = torch.softmax(logits, dim=1) * wt.sum(dim=1, keepdim=True) - wt
    if reduction == "mean":
        g = g / (w[targets[active]].sum() if targets.dim() == 1 else n)
    return g


def _jax_cross_entropy(z, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """torch.nn.functional.cross_entropy semantics written with jax.nn.log_softmax."""
    import jax
    import jax.numpy as jnp

    n, k = z.shape
    log_p = jax.nn.log_softmax(z, axis=-1)
    if t.ndim == 1:
        active = t != ignore_index
        dense = jax.nn.one_hot(jnp.where(active, t, 0), k, dtype=z.dtype) * active[:, None].astype(z.dtype)
    else:
        active = jnp.ones(n, dtype=bool)
        dense = t
    if label_smoothing:
        dense = ((1 - label_smoothing) * dense + label_smoothing / k) * active[:, None].astype(z.dtype)
    w = jnp.ones(k, dtype=z.dtype) if weight is None else weight
    wt = w * dense
    rows = -jnp.sum(jnp.where(wt > 0, wt * log_p, 0), axis=-1)
    if reduction == "mean":
        d = jnp.sum(jnp.where(active, w[jnp.where(active, t, 0)], 0)) if t.ndim == 1 else n
        return jnp.sum(rows) / d
    return jnp.sum(rows) if reduction == "sum" else rows


torch_autograd = torch_loss_grad()  # torch.autograd of F.cross_entropy
torch_autograd.__name__ = torch_autograd.__qualname__ = "torch_autograd"
torch_manual = torch_grad_fn(_torch_manual)
torch_manual.__name__ = torch_manual.__qualname__ = "torch_manual"
jax_autodiff = jax_loss_grad(_jax_cross_entropy)
jax_autodiff.__name__ = jax_autodiff.__qualname__ = "jax_autodiff"

ZOO_CORRECT: dict[str, Entry] = {
    e.name: e for e in (
        Entry("numpy_stable", numpy_stable, "stable direct formula in the dtype", configs=CORRECT_CONFIGS,
              in_dtype=True),
        Entry("numpy_logspace", numpy_logspace, "through log-softmax in the dtype", configs=CORRECT_CONFIGS,
              in_dtype=True),
        Entry("numpy_online", numpy_online, "tiled online softmax (64-class tiles), p rounded to the dtype",
              configs=CORRECT_CONFIGS, in_dtype=True),
        Entry("oracle", oracle, "gradcheck.cross_entropy_grad", configs=CORRECT_CONFIGS),
        Entry("torch_autograd", torch_autograd, "torch.autograd of F.cross_entropy", configs=CORRECT_CONFIGS,
              in_dtype=True),
        Entry("torch_manual", torch_manual, "torch ops in the dtype, softmax minus targets", configs=CORRECT_CONFIGS,
              in_dtype=True),
        Entry("jax_autodiff", jax_autodiff, "jax.grad of a jax.nn.log_softmax loss", configs=CORRECT_CONFIGS,
              in_dtype=True),
    )
}


# --- buggy implementations --------------------------------------------------------------------------

def forgot_mean(logits, targets, **options):
    """Forgot the 1/N of the mean: returns the gradient of the sum."""
    return numpy_stable(logits, targets, **{**options, "reduction": "sum"})


def softmax_wrong_axis(logits, targets, **options):
    """Softmax over the batch axis instead of the classes."""
    p = np.exp(logits - logits.max(axis=0, keepdims=True))
    p = p / _sum(p, axis=0, keepdims=True)
    wt, active, w = _targets(logits, targets, None, -100, 0.0)
    return _finish(p, wt, _divisor(logits, targets, w, active, "mean"))


def sign_flipped(logits, targets, **options):
    """t - p instead of p - t (the gradient of the negated loss)."""
    return -numpy_stable(logits, targets, **options)


def no_max_subtraction(logits, targets, **options):
    """exp(z) / sum exp(z) without subtracting the row maximum: overflows for large logits."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(logits)
        p = e / _sum(e, axis=1, keepdims=True)
    wt, active, w = _targets(logits, targets, None, -100, 0.0)
    return _finish(p, wt, _divisor(logits, targets, w, active, "mean"))


def eps_in_log(logits, targets, **options):
    """The gradient of -log(p_t + 1e-7) (an epsilon inside the log): scaled by p_t / (p_t + eps)."""
    p = _softmax(logits)
    n = logits.shape[0]
    onehot = np.zeros_like(p)
    onehot[np.arange(n), targets] = 1
    p_t = p[np.arange(n), targets][:, None]
    return (p_t / (p_t + logits.dtype.type(1e-7))) * (p - onehot) / n


def clipped_probs(logits, targets, **options):
    """p clipped to [eps, 1 - eps] before p - t (Keras-style; eps 1e-7, or 1e-4 in half precision)."""
    eps = 1e-4 if float_format(logits.dtype).name in HALF else 1e-7
    p = np.clip(_softmax(logits), logits.dtype.type(eps), logits.dtype.type(1 - eps)).astype(logits.dtype)
    wt, active, w = _targets(logits, targets, None, -100, 0.0)
    return _finish(p, wt, _divisor(logits, targets, w, active, "mean"))


def float32_inside(logits, targets, **options):
    """A float64 entry point that computes in float32 (a stray astype) and casts back."""
    return numpy_stable(logits.astype(np.float32), targets, **options).astype(logits.dtype)


def _tiled(name: str, rescale: str = "right", pad: float = -np.inf) -> Callable[..., Any]:
    def grad_fn(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        work = np.float32 if float_format(logits.dtype).name in HALF else logits.dtype
        p = _online_softmax(logits.astype(work), rescale=rescale, pad=pad).astype(logits.dtype)
        wt, active, w = _targets(logits, targets, weight, ignore_index, label_smoothing)
        return _finish(p, wt, _divisor(logits, targets, w, active, reduction))

    grad_fn.__name__ = grad_fn.__qualname__ = name
    return grad_fn


tiled_no_rescale = _tiled("tiled_no_rescale", rescale="none")
tiled_no_rescale.__doc__ = "Online softmax that forgets to rescale the running sum when the max grows."
tiled_inverted_rescale = _tiled("tiled_inverted_rescale", rescale="inverted")
tiled_inverted_rescale.__doc__ = "Online softmax rescaling by exp(m_new - m_old) instead of exp(m_old - m_new)."
tiled_zero_padding = _tiled("tiled_zero_padding", pad=0.0)
tiled_zero_padding.__doc__ = "Tiled kernel padding the last partial tile with 0 instead of -inf."


def smoothing_fairseq(logits, targets, *, label_smoothing=0.0, **options):
    """fairseq's convention: eps / (K - 1) on the other classes and 1 - eps on the target."""
    n, k = logits.shape
    t = np.full((n, k), label_smoothing / max(k - 1, 1), dtype=logits.dtype)
    t[np.arange(n), targets] = 1 - label_smoothing
    return (_softmax(logits) * _sum(t, axis=1, keepdims=True) - t) / n


def weighted_mean_over_rows(logits, targets, *, weight, **options):
    """Weighted mean divided by the number of rows instead of the sum of the target weights."""
    return numpy_stable(logits, targets, weight=weight, reduction="sum") / logits.shape[0]


def ignored_rows_counted(logits, targets, *, ignore_index, **options):
    """Ignored rows get a zero gradient but are still counted in the mean's divisor."""
    return numpy_stable(logits, targets, ignore_index=ignore_index, reduction="sum") / logits.shape[0]


def last_row_skipped(logits, targets, **options):
    """An off-by-one row loop: the last row is never written."""
    g = numpy_stable(logits, targets, **options)
    out = np.zeros_like(g)
    for row in range(g.shape[0] - 1):
        out[row] = g[row]
    return out


def last_class_skipped(logits, targets, **options):
    """An off-by-one class loop: the last class's gradient stays 0."""
    g = numpy_stable(logits, targets, **options)
    g[:, -1] = 0
    return g


def weight_on_every_class(logits, targets, *, weight, **options):
    """Weights applied per class to p - t (w_i (p_i - t_i)) instead of by the target's weight."""
    wt, active, w = _targets(logits, targets, None, -100, 0.0)
    g = w * (_softmax(logits) - wt)
    return g / _sum(w[targets])


def soft_assumed_normalized(logits, targets, **options):
    """p - t for probability targets: wrong for rows that do not sum to one."""
    return (_softmax(logits) - targets) / logits.shape[0]


def reduction_ignored(logits, targets, **options):
    """Always the mean, whatever reduction was asked for."""
    options.pop("reduction", None)
    return numpy_stable(logits, targets, **options)


def logsumexp_recombined(logits, targets, **options):
    """p = exp(z - (max + log sum)): the logsumexp is rounded at |max| before subtracting."""
    m = logits.max(axis=1, keepdims=True)
    lse = m + np.log(_sum(np.exp(logits - m), axis=1, keepdims=True))
    wt, active, w = _targets(logits, targets, None, -100, 0.0)
    return _finish(np.exp(logits - lse), wt, _divisor(logits, targets, w, active, "mean"))


def bf16_sequential_sum(logits, targets, **options):
    """The stable formula with np.sum on bfloat16: a sequential bfloat16 sum that stagnates."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / np.sum(e, axis=1, keepdims=True)
    wt, active, w = _targets(logits, targets, None, -100, 0.0)
    return _finish(p, wt, _divisor(logits, targets, w, active, "mean"))


def ignore_index_unsupported(logits, targets, **options):
    """One-hot through np.eye(K)[targets]: ignore_index=-100 rows crash or wrap around."""
    k = logits.shape[1]
    onehot = np.eye(k, dtype=logits.dtype)[targets]
    return (_softmax(logits) - onehot) / logits.shape[0]


def mutates_logits(logits, targets, **options):
    """Subtracts the row max in place, changing the caller's logits."""
    logits -= logits.max(axis=1, keepdims=True)
    return numpy_stable(logits, targets, **options)


_calls = itertools.count()


def nondeterministic(logits, targets, **options):
    """Sums the classes in a different order on every call (like unordered atomic adds)."""
    order = np.random.default_rng(next(_calls)).permutation(logits.shape[1])
    g = np.empty_like(logits)
    g[:, order] = numpy_stable(np.ascontiguousarray(logits[:, order]), _permute(targets, order), **options)
    return g


def _permute(targets: np.ndarray, order: np.ndarray) -> np.ndarray:
    if targets.ndim == 2:
        return np.ascontiguousarray(targets[:, order])
    inverse = np.argsort(order)
    return inverse[targets]


def returns_float64(logits, targets, **options):
    """Fills a default np.zeros buffer: the result is float64 whatever the input dtype."""
    out = np.zeros(logits.shape)
    out[...] = numpy_stable(logits, targets, **options)
    return out


def squeezes_rows(logits, targets, **options):
    """np.squeeze on the result: a single row comes back with shape (K,)."""
    return np.squeeze(numpy_stable(logits, targets, **options))


ZOO_BUGGY: dict[str, Entry] = {
    e.name: e for e in (
        Entry("forgot_mean", forgot_mean, forgot_mean.__doc__),
        Entry("softmax_wrong_axis", softmax_wrong_axis, softmax_wrong_axis.__doc__),
        Entry("sign_flipped", sign_flipped, sign_flipped.__doc__),
        Entry("no_max_subtraction", no_max_subtraction, no_max_subtraction.__doc__),
        Entry("eps_in_log", eps_in_log, eps_in_log.__doc__),
        Entry("clipped_probs", clipped_probs, clipped_probs.__doc__),
        Entry("float32_inside", float32_inside, float32_inside.__doc__, dtypes=("float64",)),
        Entry("tiled_no_rescale", tiled_no_rescale, tiled_no_rescale.__doc__),
        Entry("tiled_inverted_rescale", tiled_inverted_rescale, tiled_inverted_rescale.__doc__),
        Entry("tiled_zero_padding", tiled_zero_padding, tiled_zero_padding.__doc__),
        Entry("smoothing_fairseq", smoothing_fairseq, smoothing_fairseq.__doc__, configs=({"label_smoothing": 0.1},)),
        Entry("weighted_mean_over_rows", weighted_mean_over_rows, weighted_mean_over_rows.__doc__,
              configs=({"weighted": True},)),
        Entry("ignored_rows_counted", ignored_rows_counted, ignored_rows_counted.__doc__,
              configs=({"ignore_index": -1},)),
        Entry("last_row_skipped", last_row_skipped, last_row_skipped.__doc__),
        Entry("last_class_skipped", last_class_skipped, last_class_skipped.__doc__),
        Entry("weight_on_every_class", weight_on_every_class, weight_on_every_class.__doc__,
              configs=({"weighted": True},)),
        Entry("soft_assumed_normalized", soft_assumed_normalized, soft_assumed_normalized.__doc__,
              configs=({"targets": "probs"},)),
        Entry("reduction_ignored", reduction_ignored, reduction_ignored.__doc__, configs=({"reduction": "sum"},)),
        Entry("logsumexp_recombined", logsumexp_recombined, logsumexp_recombined.__doc__),
        Entry("bf16_sequential_sum", bf16_sequential_sum, bf16_sequential_sum.__doc__, dtypes=("bfloat16",)),
        Entry("ignore_index_unsupported", ignore_index_unsupported, ignore_index_unsupported.__doc__,
              configs=({"ignore_index": -100},)),
        Entry("mutates_logits", mutates_logits, mutates_logits.__doc__, kind=FailureKind.MUTATION),
        Entry("nondeterministic", nondeterministic, nondeterministic.__doc__,
              dtypes=("float64", "float32"), kind=FailureKind.NONDETERMINISM),  # half sums go through float32: order-proof
        Entry("returns_float64", returns_float64, returns_float64.__doc__, dtypes=("float32", *HALF), kind=FailureKind.DTYPE),
        Entry("squeezes_rows", squeezes_rows, squeezes_rows.__doc__, kind=FailureKind.SHAPE),
    )
}


def runs(entries: dict[str, Entry]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (name, dtype, config) an entry applies to."""
    return [(e.name, dtype, config) for e in entries.values() for dtype in e.dtypes for config in e.configs]
