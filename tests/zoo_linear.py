"""The linear bug zoo: fused linear cross-entropy kernels, correct and realistically wrong, for verify_linear.

Every function follows ``verify_linear``'s convention, ``grad_fn(hidden, weight, targets, *, bias=None,
grad_output=None, **options)`` with numpy arrays of the checked dtype, and returns ``(d_hidden, d_weight)``
or, with a bias, ``(d_hidden, d_weight, d_bias)``.

The correct kernel follows Liger-Kernel's ``fused_linear_cross_entropy_forward``
(src/liger_kernel/ops/fused_linear_cross_entropy.py, v0.8.2-7-gead96b61, with ``accum_dtype=torch.float32``):
rows in chunks of ``next_power_of_2(ceil(N / ceil(V / D)))``; per chunk the logits ``h_chunk @ W.T`` with
float32 accumulation stored in the dtype, the bias added in the dtype; the CE gradient (softcap, z-loss,
smoothing, class weights) in float32 from those logits, stored in the dtype (in place in the logits, as
Liger's Triton kernel does); a per-row ``grad_output`` ("none") folded in before the products;
``d_hidden_chunk = G_chunk @ W`` (float32 accumulation, stored in the dtype); ``d_weight += (G_chunk.T @
h_chunk)`` (the product stored in the dtype, as torch.mm of two bfloat16 tensors is, then added to a float32
accumulator); ``d_bias += G_chunk.sum(0)`` likewise; at the end a cast to the dtype and, for a scalar
``grad_output``, one multiplication in the dtype (Liger's ``element_mul_kernel``). float64 inputs are
computed in float64 throughout.

Each bug is a one-line departure from it, named after where it was shipped when it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcheck.dtypes import float_format, round_to_format

ALL = ("float64", "float32", "float16", "bfloat16")
HALF = ("float16", "bfloat16")


def _acc(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _store(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round to the dtype (once, from the accumulation format) and come back to the accumulation format."""
    acc = _acc(dtype)
    return round_to_format(x.astype(np.float64), float_format(dtype)).astype(acc)


def chunk_size(n: int, v: int, d: int) -> int:
    """Liger's chunk: next_power_of_2(ceil(N / ceil(V / D)))."""
    inc = -(-v // d)
    c = -(-n // inc)
    return 1 << max(0, (c - 1).bit_length())


def _ce_grad(z: np.ndarray, targets: np.ndarray, *, ce_weight, ignore_index, reduction, label_smoothing,
             lse_square_scale, softcap, n_total: int, divisor: float, zl_divisor: float, bug: set) -> np.ndarray:
    """Liger's cross-entropy kernel on one chunk of logits, in the accumulation format: the gradient in z."""
    acc = z.dtype
    v = z.shape[1]
    if softcap is not None:
        t = np.tanh(z / acc.type(softcap))
        z = acc.type(softcap) * t
    active = targets != ignore_index
    m = z.max(axis=1, keepdims=True)
    if "vocab_tail" in bug and v > 64 and v % 64:
        e = np.exp(z - m)
        e[:, v - v % 64:] = 0  # the last partial block left out of the normaliser
        s = e.sum(axis=1, keepdims=True)
        p = np.exp(z - m) / s
    else:
        e = np.exp(z - m)
        p = e / e.sum(axis=1, keepdims=True)
    lse = m + np.log(e.sum(axis=1, keepdims=True))
    y = np.where(active, targets, 0)
    onehot = np.zeros_like(z)
    onehot[np.arange(len(y)), y] = 1
    eps = acc.type(0 if "smoothing_dropped" in bug else label_smoothing)
    tsm = (acc.type(1) - eps) * onehot + eps / acc.type(v)
    w = np.ones(v, dtype=acc) if ce_weight is None else ce_weight.astype(acc)
    wt = tsm * w
    s = wt.sum(axis=1, keepdims=True)
    g = (p * s - wt) / acc.type(divisor)
    if lse_square_scale:
        zdiv = divisor if "zloss_by_ce_divisor" in bug else zl_divisor
        zl = acc.type(2 * lse_square_scale) * lse * p / acc.type(zdiv)
        if "zloss_weighted" in bug:
            zl = zl * w[y][:, None]
        g = g + zl
    if "ignored_rows_not_masked" not in bug:
        g = np.where(active[:, None], g, acc.type(0))
    if softcap is not None and "softcap_no_derivative" not in bug:
        g = g * (acc.type(1) - t * t)
    return g


def liger_kernel(hidden, weight, targets, *, bias=None, grad_output=None, ce_weight=None, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None, bug=(), chunk=None):
    """The Liger-structured fused kernel (see the module docstring); ``bug`` names departures from it."""
    bug = set(bug)
    dtype = hidden.dtype
    acc = _acc(dtype)
    n, d = hidden.shape
    v = weight.shape[0]
    h, w = hidden.astype(acc), weight.astype(acc)
    b = None if bias is None else bias.astype(acc)
    active = targets != ignore_index
    if reduction == "mean":
        count = n if "ignored_rows_counted" in bug else int(active.sum())
        divisor = float(np.sum(ce_weight.astype(np.float64)[targets[active]])) if ce_weight is not None else count
        zl_divisor = count
    else:
        divisor = zl_divisor = 1.0
    if "sum_as_mean" in bug and reduction == "sum":
        divisor = float(max(1, int(active.sum())))
    size = chunk or chunk_size(n, v, d)
    dh = np.zeros((n, d), dtype=dtype)
    accum_dtype = dtype if "dw_accumulated_in_dtype" in bug else acc  # Liger's default accum_dtype=None
    dw = np.zeros((v, d), dtype=accum_dtype)
    db = None if b is None else np.zeros(v, dtype=accum_dtype)
    g_out = None if grad_output is None else np.asarray(grad_output)
    per_row = g_out is not None and g_out.ndim == 1
    starts = list(range(0, n, size))
    if "tail_chunk_dropped" in bug and n % size and len(starts) > 1:
        starts = starts[:-1]
    for lo in starts:
        hi = min(lo + size, n)
        z = _store(h[lo:hi] @ w.T, dtype)
        if b is not None and "bias_not_in_logits" not in bug:
            z = _store(z + b, dtype)
        g = _ce_grad(z, targets[lo:hi], ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap, n_total=n,
                     divisor=divisor, zl_divisor=zl_divisor, bug=bug)
        g = _store(g, dtype)
        if per_row and "grad_output_first_row" not in bug:
            g = _store(g * g_out[lo:hi].astype(acc)[:, None], dtype)
        elif per_row:  # Liger #968 / #1298: d_hidden right (folded per row), d_weight and d_bias scaled by go[0]
            dh_g = _store(g * g_out[lo:hi].astype(acc)[:, None], dtype)
            dh[lo:hi] = round_to_format((dh_g @ w).astype(np.float64), float_format(dtype))
            g = _store(g * acc.type(g_out[0]), dtype)
        if not (per_row and "grad_output_first_row" in bug):
            dh[lo:hi] = round_to_format((g @ w).astype(np.float64), float_format(dtype))
        part = _store(g.T @ h[lo:hi], dtype)
        if "dw_accumulated_in_dtype" in bug:
            dw = round_to_format((dw.astype(np.float64) + part.astype(np.float64)), float_format(dtype))
        else:
            dw += part
        if db is not None:
            colsum = _store(g.sum(axis=0), dtype)
            if "bias_last_chunk_only" in bug:
                db = colsum.astype(accum_dtype)
            elif "dw_accumulated_in_dtype" in bug:
                db = round_to_format(db.astype(np.float64) + colsum.astype(np.float64), float_format(dtype))
            else:
                db += colsum
    fmt = float_format(dtype)
    out = [dh, round_to_format(dw.astype(np.float64), fmt)]
    if db is not None:
        out.append(round_to_format(db.astype(np.float64), fmt))
    if g_out is not None and not per_row and "grad_output_dropped_for_weight" not in bug:
        s = acc.type(g_out)
        out = [round_to_format((x.astype(acc) * s).astype(np.float64), fmt) for x in out]
    elif g_out is not None and not per_row:
        s = acc.type(g_out)
        out = [round_to_format((x.astype(acc) * s).astype(np.float64), fmt) if i != 1 else x for i, x in enumerate(out)]
    return tuple(out)


def _variant(bug: str, **fixed: Any) -> Callable[..., Any]:
    def fn(hidden, weight, targets, *, bias=None, grad_output=None, **options):
        return liger_kernel(hidden, weight, targets, bias=bias, grad_output=grad_output, bug=(bug,), **fixed, **options)

    fn.__name__ = fn.__qualname__ = bug
    return fn


def liger_correct(hidden, weight, targets, *, bias=None, grad_output=None, **options):
    """Liger's structure with float32 accumulation (accum_dtype=torch.float32)."""
    return liger_kernel(hidden, weight, targets, bias=bias, grad_output=grad_output, **options)


def liger_small_chunks(hidden, weight, targets, *, bias=None, grad_output=None, **options):
    """The same with chunks of 3 rows (N rarely a multiple): more chunk-sized intermediates, same contract."""
    return liger_kernel(hidden, weight, targets, bias=bias, grad_output=grad_output, chunk=3, **options)


def torch_upcast(hidden, weight, targets, *, bias=None, grad_output=None, ce_weight=None, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None):
    """torch autograd of F.linear + F.cross_entropy on inputs upcast to float32 (float64 kept), cast back."""
    import torch

    from gradcheck.adapters import to_torch

    work = torch.float64 if hidden.dtype == np.float64 else torch.float32
    h = to_torch(hidden).to(work).requires_grad_(True)
    w = to_torch(weight).to(work).requires_grad_(True)
    b = None if bias is None else to_torch(bias).to(work).requires_grad_(True)
    t = torch.from_numpy(np.array(targets))  # a writable copy
    z = torch.nn.functional.linear(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    cw = None if ce_weight is None else to_torch(ce_weight).to(work)
    loss = torch.nn.functional.cross_entropy(z, t, weight=cw, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing)
    if lse_square_scale:
        act = t != ignore_index
        zl = lse_square_scale * torch.logsumexp(z, dim=1) ** 2 * act
        loss = loss + (zl.sum() / act.sum() if reduction == "mean" else zl.sum() if reduction == "sum" else zl)
    if grad_output is None:
        seed = torch.ones_like(loss)
    else:
        seed = torch.as_tensor(np.asarray(grad_output, dtype=np.float64)).to(work).reshape(loss.shape)
    loss.backward(seed)
    out = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    fmt = float_format(hidden.dtype)
    return tuple(round_to_format(x.detach().double().numpy(), fmt) for x in out)


# ---- bugs outside values ---------------------------------------------------------------------------------------


def mutates_hidden(hidden, weight, targets, **options):
    """Writes into its hidden argument."""
    out = liger_correct(hidden, weight, targets, **options)
    hidden[...] = 0
    return out


def returns_float32(hidden, weight, targets, **options):
    """Returns float32 whatever the dtype."""
    return tuple(x.astype(np.float32) for x in liger_correct(hidden, weight, targets, **options))


def transposed_weight_grad(hidden, weight, targets, **options):
    """Returns d_weight as (D, V)."""
    out = list(liger_correct(hidden, weight, targets, **options))
    out[1] = np.ascontiguousarray(out[1].T)
    return tuple(out)


@dataclass(frozen=True)
class Entry:
    """A zoo member: its function, what it does, the dtypes and verify_linear configurations it applies to, and
    for a bug not about values the failure kind verify_linear must report."""

    name: str
    fn: Callable[..., Any]
    description: str
    dtypes: tuple[str, ...] = ALL
    configs: tuple[dict[str, Any], ...] = ({},)
    kind: str | None = None


CORRECT_CONFIGS: tuple[dict[str, Any], ...] = (
    {},
    {"bias": True, "reduction": "sum", "weighted": True, "label_smoothing": 0.1, "ignore_index": 0},
    {"bias": True, "reduction": "none", "lse_square_scale": 1e-3, "softcap": 30.0},
    {"reduction": "mean", "weighted": True, "ignore_index": -1, "lse_square_scale": 1e-2},
)

ZOO_LINEAR_CORRECT: dict[str, Entry] = {e.name: e for e in (
    Entry("liger_correct", liger_correct, "Liger-structured, float32 accumulation", configs=CORRECT_CONFIGS),
    Entry("liger_small_chunks", liger_small_chunks, "Liger-structured, 3-row chunks", configs=CORRECT_CONFIGS[:2]),
    Entry("torch_upcast", torch_upcast, "torch F.linear + F.cross_entropy on float32-upcast inputs",
          configs=CORRECT_CONFIGS[:3]),
)}

ZOO_LINEAR_BUGGY: dict[str, Entry] = {e.name: e for e in (
    Entry("grad_output_first_row", _variant("grad_output_first_row"),
          "reduction='none': d_weight and d_bias scaled by grad_output[0] (Liger #968, #1298)",
          configs=({"reduction": "none", "bias": True},)),
    Entry("smoothing_dropped", _variant("smoothing_dropped"),
          "label smoothing silently dropped by the fused path (Liger #243)", configs=({"label_smoothing": 0.1},)),
    Entry("bias_not_in_logits", _variant("bias_not_in_logits"),
          "the bias left out of the logits the gradient is computed from (bias path, cut-cross-entropy #52)",
          configs=({"bias": True},)),
    Entry("bias_last_chunk_only", _variant("bias_last_chunk_only"),
          "d_bias overwritten by each chunk instead of accumulated (bias path)", configs=({"bias": True},)),
    Entry("dw_accumulated_in_dtype", _variant("dw_accumulated_in_dtype"),
          "d_weight and d_bias accumulated in the (half) dtype across chunks (Liger's accum_dtype=None; axolotl #1601, "
          "Liger #1391)", dtypes=HALF, configs=({"bias": True},)),
    Entry("tail_chunk_dropped", _variant("tail_chunk_dropped", chunk=4),
          "the last partial row chunk skipped when N is not a multiple of the chunk"),
    Entry("vocab_tail", _variant("vocab_tail"),
          "the last partial vocabulary block left out of the softmax normaliser (V not a multiple of 64)"),
    Entry("ignored_rows_counted", _variant("ignored_rows_counted"),
          "reduction='mean' divides by N, counting ignored rows", configs=({"ignore_index": -100},)),
    Entry("ignored_rows_not_masked", _variant("ignored_rows_not_masked"),
          "ignored rows still get a gradient", configs=({"ignore_index": -100, "reduction": "sum"},)),
    Entry("sum_as_mean", _variant("sum_as_mean"), "reduction='sum' divided by the row count",
          configs=({"reduction": "sum"},)),
    Entry("zloss_weighted", _variant("zloss_weighted"), "the z-loss term weighted by the class weight",
          configs=({"lse_square_scale": 1e-2, "weighted": True},)),
    Entry("zloss_by_ce_divisor", _variant("zloss_by_ce_divisor"),
          "the z-loss divided by the weighted CE divisor instead of the row count",
          configs=({"lse_square_scale": 1e-2, "weighted": True},)),
    Entry("softcap_no_derivative", _variant("softcap_no_derivative"), "softcap's 1 - tanh^2 factor forgotten",
          configs=({"softcap": 5.0},)),
    Entry("grad_output_dropped_for_weight", _variant("grad_output_dropped_for_weight"),
          "a scalar grad_output applied to d_hidden and d_bias but not d_weight", configs=({"reduction": "sum"},)),
    Entry("mutates_hidden", mutates_hidden, "writes into hidden", kind="mutation"),
    Entry("returns_float32", returns_float32, "returns float32", dtypes=("float64", "float16", "bfloat16"),
          kind="dtype"),
    Entry("transposed_weight_grad", transposed_weight_grad, "d_weight returned as (D, V)", kind="shape"),
)}


def runs(entries: dict[str, Entry]) -> list[tuple[str, str, dict]]:
    """(name, dtype, config) for every applicable combination."""
    return [(name, dtype, config) for name, e in entries.items() for dtype in e.dtypes for config in e.configs]
