"""The kernel zoo (issue 12): LLM loss kernels with z-loss, logit softcapping and an upstream gradient,
correct and with the bugs real projects shipped or could easily ship.

The loss (Liger-Kernel's convention; docs/oracle.md): z' = c tanh(z / c) under ``softcap`` c,
p = softmax(z'), lse = logsumexp(z'); row loss l_n = -sum_c w_c t_nc log p_nc + lambda lse_n^2 (the
z-loss only on counted rows, unweighted); under "mean" the CE sum is divided by D (torch's divisor)
and the z-loss sum by Dz, the number of counted rows. The gradient checked is the VJP

    dL/dz_ni = g_n r_n [ (p_ni S_n - w_i t_ni) / D + 2 lambda lse_n p_ni / Dz ] (1 - tanh^2(z_ni / c)),

with g the upstream gradient (``grad_output``; a scalar for "mean"/"sum", one per row for "none").

Every ``grad_fn`` names ``grad_output`` in its signature, so verify exercises it. One function,
:func:`kernel`, computes the gradient; each bug is one of its ``slip`` values, the rest unchanged,
so a bug differs from the correct kernel in exactly the way it says. The shipped ones:

* ``liger_678``: Liger-Kernel #678, the per-row ``grad_output`` ignored for reduction="none";
* ``te_2139``: TransformerEngine #2139, ``grad_output[0]`` used for every row;
* ``liger_zloss_smoothing``: the old Liger z-loss gradient ``2 lambda lse (p - eps/K)`` under label
  smoothing (linkedin/Liger-Kernel src/liger_kernel/ops/cross_entropy.py at 02e90db9:
  ``X_block = exp(X - m) / d - eps; X_block += 2 * lse_square_scale * lse * X_block``);
* ``unsloth_593``: unsloth-zoo #593, ``x * tanh(x / c)`` instead of ``c * tanh(x / c)``.

``KERNEL_CORRECT`` and ``KERNEL_BUGGY`` map names to :class:`zoo.Entry` values.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradcheck.adapters import torch_loss_grad
from gradcheck.dtypes import float_format
from zoo import ALL, HALF, Entry

# configurations a correct kernel is checked under: every option alone and in combination
KERNEL_CONFIGS: tuple[dict[str, Any], ...] = (
    {"lse_square_scale": 1e-4},
    {"softcap": 30.0},
    {"lse_square_scale": 1e-4, "softcap": 30.0, "label_smoothing": 0.1, "weighted": True, "ignore_index": -100,
     "reduction": "none"},  # issue 12's done criterion
    {"lse_square_scale": 1e-3, "softcap": 1.0, "reduction": "sum", "weighted": True, "ignore_index": 0},
    {"lse_square_scale": 1e-2, "label_smoothing": 0.1, "weighted": True, "ignore_index": -1},
    {"lse_square_scale": 1e-4, "softcap": 5.0, "targets": "probs", "label_smoothing": 0.2, "weighted": True},
    {"softcap": 0.5, "targets": "probs", "reduction": "none"},
    {"reduction": "none", "ignore_index": -100},  # the upstream gradient alone
)
DONE = KERNEL_CONFIGS[2]


def _work(dtype: np.dtype, inside: str) -> Any:
    """The working precision: float64, or "native" (the dtype itself, float32 for the half dtypes)."""
    if inside == "float64":
        return np.float64
    return np.float32 if float_format(dtype).name in HALF else np.dtype(dtype).type


def kernel(logits, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           lse_square_scale=0.0, softcap=None, grad_output=None, inside="native", slip=None):
    """The loss kernel's gradient (the VJP with ``grad_output``), computed in ``inside`` precision and
    rounded once to the logits' dtype; ``slip`` names one bug (None: correct)."""
    work = _work(logits.dtype, inside)
    z = logits.astype(work)
    n, k = z.shape
    one = work(1)
    # -- softcap: z' = c tanh(z / c) (-inf -> -c), chain factor 1 - tanh^2
    chain = None
    if softcap is not None:
        c = work(softcap)
        th = np.tanh(z / c)
        zc = (z * th) if slip == "unsloth_593" else c * th
        chain = {"chain_missing": None, "chain_one_minus_tanh": one - th}.get(slip, one - th * th)
    else:
        zc = z
    # -- softmax and logsumexp of the capped logits
    with np.errstate(invalid="ignore", divide="ignore"):
        m = zc.max(axis=1, keepdims=True)
        e = np.where(np.isneginf(zc), work(0), np.exp(zc - m))
        s = e.sum(axis=1, keepdims=True)
        p = e / s
        lse = m + np.log(s)
        if slip == "lse_uncapped" and softcap is not None:
            mu = z.max(axis=1, keepdims=True)
            lse = mu + np.log(np.where(np.isneginf(z), work(0), np.exp(z - mu)).sum(axis=1, keepdims=True))
    # -- targets: one-hot or probabilities, smoothed, weighted; r marks the counted rows
    if targets.ndim == 1:
        active = targets != ignore_index
        t = np.zeros((n, k), dtype=work)
        t[np.flatnonzero(active), targets[active]] = 1
    else:
        active = np.ones(n, dtype=bool)
        t = targets.astype(work)
    if label_smoothing:
        t = work(1 - label_smoothing) * t + work(label_smoothing / k)
        t[~active] = 0
    w = np.ones(k, dtype=work) if weight is None else np.asarray(weight).astype(work)
    wt = w * t
    S = wt.sum(axis=1, keepdims=True)
    r = active[:, None].astype(work)
    if reduction == "mean":
        D = w[targets[active]].sum() if targets.ndim == 1 else work(n)
        Dz = work(np.count_nonzero(active))
    else:
        D = Dz = one
    if slip == "zloss_over_D":
        Dz = D
    elif slip == "zloss_over_all_rows" and reduction == "mean":
        Dz = work(n)
    # -- dL/dz' = r [ (p S - w t) / D + 2 lambda lse p / Dz ]
    ce = (p * S - wt) / D
    zl = work(0)
    if lse_square_scale:
        lam2 = work(2 * lse_square_scale)
        zp = (p - work(label_smoothing / k)) if slip == "liger_zloss_smoothing" else p
        if slip == "zloss_factor_one":
            lam2 = work(lse_square_scale)
        zl = lam2 * lse * zp / Dz
        if slip == "zloss_weighted":
            zl = zl * (S if targets.ndim == 2 else np.where(active, w[np.where(active, targets, 0)], 0)[:, None])
        zl = zl if slip == "zloss_not_masked" else zl * r
    if slip == "ignored_rows_get_upstream":
        ce = np.where(r > 0, ce, p / D)
    # -- the upstream gradient: g_n for each row
    if grad_output is None:
        g = np.ones((n, 1), dtype=work)
    else:
        g = np.broadcast_to(np.asarray(grad_output).astype(work), (n,)).reshape(n, 1)
    if slip == "liger_678" and reduction == "none":
        g = np.ones_like(g)
    elif slip == "te_2139":
        g = np.full_like(g, g[0, 0])
    elif slip == "grad_output_twice":
        g = g * g
    if slip == "zloss_without_upstream":
        grad = g * ce + zl
    else:
        grad = g * (ce + zl)
    if slip == "softcap_on_loss" and softcap is not None:  # c tanh(L / c) of the uncapped loss
        return _softcap_on_loss(logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                                grad_output=grad_output, inside=inside)
    if chain is not None:
        grad = grad * chain
    return grad.astype(logits.dtype)


def _softcap_on_loss(logits, targets, *, softcap, grad_output, inside, **options):
    """The cap applied to the loss instead of the logits: d/dz of c tanh(L / c), L the uncapped loss."""
    work = _work(logits.dtype, inside)
    z = logits.astype(work)
    grad = kernel(logits.astype(work), targets, grad_output=None, inside=inside, **options).astype(work)
    loss = _loss(z, targets, **options)  # per row for "none", else a scalar
    factor = work(1) - np.tanh(loss / work(softcap)) ** 2
    factor = factor[:, None] if np.ndim(factor) else factor
    g = work(1) if grad_output is None else np.asarray(grad_output).astype(work)
    g = g[:, None] if np.ndim(g) else g
    return (g * factor * grad).astype(logits.dtype)


def _loss(z, targets, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, lse_square_scale=0.0):
    n, k = z.shape
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.where(np.isneginf(z), 0, np.exp(z - m)).sum(axis=1, keepdims=True))
    with np.errstate(invalid="ignore"):
        log_p = np.where(np.isneginf(z), 0, z - lse)
    if targets.ndim == 1:
        active = targets != ignore_index
        t = np.zeros((n, k), dtype=z.dtype)
        t[np.flatnonzero(active), targets[active]] = 1
    else:
        active = np.ones(n, dtype=bool)
        t = targets.astype(z.dtype)
    if label_smoothing:
        t = (1 - label_smoothing) * t + label_smoothing / k
        t[~active] = 0
    w = np.ones(k, dtype=z.dtype) if weight is None else np.asarray(weight).astype(z.dtype)
    rows = -(w * t * log_p).sum(axis=1)
    zrows = np.where(active, lse_square_scale * lse[:, 0] ** 2, 0)
    if reduction == "none":
        return rows + zrows
    if reduction == "sum":
        return rows.sum() + zrows.sum()
    d = w[targets[active]].sum() if targets.ndim == 1 else n
    return rows.sum() / d + zrows.sum() / np.count_nonzero(active)


def _make(name: str, doc: str, **fixed: Any) -> Callable[..., Any]:
    def grad_fn(logits, targets, *, grad_output=None, **options):
        return kernel(logits, targets, grad_output=grad_output, **options, **fixed)

    grad_fn.__name__ = grad_fn.__qualname__ = name
    grad_fn.__doc__ = doc
    grad_fn.__module__ = __name__
    return grad_fn


kernel_f64 = _make("kernel_f64", "The loss kernel computed in float64, rounded once to the dtype.", inside="float64")
kernel_native = _make("kernel_native", "The loss kernel computed in the dtype (float32 inside for float16 and "
                      "bfloat16), rounded once.", inside="native")


def _torch_kernel_loss(z, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       lse_square_scale=0.0, softcap=None):
    """The kernel's loss written with torch ops (F.cross_entropy on the capped logits plus the z-loss):
    differentiated by torch.autograd with grad_output through gradcheck.adapters.torch_loss_grad."""
    import torch
    import torch.nn.functional as F

    if z.dtype in (torch.float16, torch.bfloat16):  # float32 inside (as Liger's kernels): autograd rounds once
        z = z.float()
        weight = None if weight is None else weight.float()
        t = t if t.dim() == 1 else t.float()
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(zc, t, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if not lse_square_scale:
        return ce
    active = (t != ignore_index) if t.dim() == 1 else torch.ones(z.shape[0], dtype=torch.bool)
    # lse = m + log sum exp(z' - m) with m detached, so that autograd's d lse / dz' is the stable softmax
    # exp(z' - m) / sum; torch.logsumexp's backward is exp(z' - lse), which loses p's accuracy once lse
    # is rounded at a large |lse| (zoo.logsumexp_recombined: offsets of 1e10 in float64)
    m = zc.detach().max(dim=1, keepdim=True).values
    lse = m[:, 0] + torch.log(torch.exp(zc - m).sum(dim=1))
    zrows = torch.where(active, lse_square_scale * lse ** 2, torch.zeros((), dtype=z.dtype))
    if reduction == "none":
        return ce + zrows
    return ce + (zrows.sum() if reduction == "sum" else zrows.sum() / active.sum())


torch_kernel = torch_loss_grad(_torch_kernel_loss)
torch_kernel.__name__ = torch_kernel.__qualname__ = "torch_kernel"

KERNEL_CORRECT: dict[str, Entry] = {
    e.name: e for e in (
        Entry("kernel_f64", kernel_f64, kernel_f64.__doc__, configs=KERNEL_CONFIGS),
        Entry("kernel_native", kernel_native, kernel_native.__doc__, configs=KERNEL_CONFIGS),
        Entry("torch_kernel", torch_kernel, "torch.autograd (with grad_output) of F.cross_entropy on c tanh(z / c) "
              "plus the z-loss, in the dtype (float32 inside for float16 and bfloat16)", configs=KERNEL_CONFIGS),
    )
}

ZLOSS = {"lse_square_scale": 1e-4}
CAP = {"softcap": 30.0}
NONE = {"reduction": "none"}

# name -> (the bug, the verify configuration that shows it, dtypes)
_BUGS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "liger_678": ("Liger-Kernel #678: the per-row grad_output ignored for reduction='none'", NONE, ALL),
    "te_2139": ("TransformerEngine #2139: grad_output[0] used for every row", NONE, ALL),
    "liger_zloss_smoothing": ("old Liger-Kernel z-loss gradient 2 lambda lse (p - eps/K) under label smoothing, "
                              "not 2 lambda lse p", {**ZLOSS, "label_smoothing": 0.1}, ALL),
    "unsloth_593": ("unsloth-zoo #593: x * tanh(x / c) instead of c * tanh(x / c)", CAP, ALL),
    "zloss_weighted": ("the z-loss term weighted by the target's class weight", {**ZLOSS, "weighted": True}, ALL),
    "zloss_over_D": ("the z-loss divided by D (the sum of the target weights) instead of the counted rows",
                     {**ZLOSS, "weighted": True}, ALL),
    "zloss_over_all_rows": ("the z-loss mean over all N rows, ignored ones included",
                            {**ZLOSS, "ignore_index": -100}, ALL),
    "zloss_not_masked": ("the z-loss gradient left on ignored rows", {**ZLOSS, "ignore_index": -100}, ALL),
    "zloss_factor_one": ("the z-loss gradient lambda lse p (the factor 2 of d lse^2 forgotten)", ZLOSS, ALL),
    "zloss_without_upstream": ("grad_output applied to the cross-entropy term only, not the z-loss term", ZLOSS,
                               ALL),
    "chain_missing": ("the softcap chain factor 1 - tanh^2 missing (dL/dz' returned)", CAP, ALL),
    "chain_one_minus_tanh": ("the softcap chain factor 1 - tanh instead of 1 - tanh^2", CAP, ALL),
    "softcap_on_loss": ("the softcap applied to the loss, c tanh(L / c), instead of to the logits", CAP, ALL),
    "lse_uncapped": ("the z-loss lse taken from the uncapped logits", {**ZLOSS, **CAP}, ALL),
    "grad_output_twice": ("grad_output applied twice", {}, ALL),
    "ignored_rows_get_upstream": ("ignored rows get grad_output * p / D instead of 0", {**NONE, "ignore_index": -100},
                                  ALL),
}

KERNEL_BUGGY: dict[str, Entry] = {
    name: Entry(name, _make(name, doc, inside="native", slip=name), doc, dtypes=dtypes, configs=(config,))
    for name, (doc, config, dtypes) in _BUGS.items()
}
