"""Adapters for the fused linear cross-entropy family: a torch or JAX loss of (h, W, targets) checked through autodiff.

``verify_linear`` calls ``grad_fn(hidden, weight, targets, **options)`` with numpy arrays (``bias=``
when it checks a bias, ``grad_output=`` when the function takes it) and expects
``(d_hidden, d_weight)`` or ``(d_hidden, d_weight, d_bias)``. These wrappers turn a *loss*

    loss_fn(hidden, classifier, targets, **options)            # bias=b added when a bias is checked

into such a ``grad_fn``: the framework's own autodiff computes the vector-Jacobian product with the
upstream gradient ``grad_output`` g (torch: ``torch.autograd.grad(loss, ..., grad_outputs=g)``; JAX:
``jax.vjp``), g = 1 when it is not given. For ``reduction="none"`` the loss is per row and g has one
value per row (ones by default), which is the gradient of ``sum_n g_n l_n``.

The classifier weight is the second argument; class weights (V values) are the option ``ce_weight=``,
Liger-Kernel's name and gradcheck.linear's (``weight`` is the classifier): a ``loss_fn`` receives
them as ``ce_weight=``, and the default torch loss passes them to ``F.cross_entropy`` as ``weight=``.

torch and jax are imported when a wrapper is called, never at import time (gradcheck/adapters.py).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradcheck.adapters import _jax_put, refuse_unaccepted, to_numpy, to_torch
from gradcheck.errors import require

GradFn = Callable[..., Any]

# what torch's F.cross_entropy cannot compute (Liger-Kernel's kernel options; docs/oracle.md "Kernel options")
_NOT_IN_TORCH = ("lse_square_scale", "softcap")


def _name(loss_fn: Any, default: str) -> str:
    return getattr(loss_fn, "__name__", default) if loss_fn is not None else default


def _upstream(grad_output: Any, loss: Any, torch: Any) -> Any:
    """The cotangent of ``loss``: ones when not given, else grad_output in the loss's dtype and shape
    (exactly: a value of the checked dtype is representable in any wider float format)."""
    if grad_output is None:
        return torch.ones_like(loss)
    g = np.broadcast_to(np.asarray(grad_output), tuple(loss.shape))
    return to_torch(g, device=loss.device).to(loss.dtype).reshape(loss.shape)  # to_torch makes a () array (1,)


def _torch_options(options: dict[str, Any], device: Any) -> dict[str, Any]:
    out = dict(options)
    if out.get("ce_weight") is not None:
        out["ce_weight"] = to_torch(np.asarray(out["ce_weight"]), device=device)
    return out


def torch_linear_loss_grad(loss_fn: GradFn | None = None, *, device: Any = None) -> GradFn:
    """The gradients (d_hidden, d_weight[, d_bias]) of a torch loss through ``torch.autograd``.

    Args:
        loss_fn: ``loss_fn(hidden, classifier, targets, **options)`` returns a scalar, or per-row
            losses for ``reduction="none"``; it gets ``bias=`` (a tensor of V values) when a bias is
            checked. Default: ``F.cross_entropy(F.linear(hidden, classifier, bias), targets, **options)``,
            which computes in the inputs' dtype and has no z-loss or softcap (asking for them is a
            TypeError naming the option); class weights ``ce_weight=`` become its ``weight=``.
        device: where the tensors are created ("cpu", "cuda", "cuda:1", a ``torch.device``;
            default the CPU); the gradients come back to numpy.

    Returns:
        ``grad_fn(hidden, weight, targets, *, bias=None, grad_output=None, **options)`` for
        ``verify_linear``: h, W and b become tensors of their dtype with ``requires_grad``, class
        indices int64, class weights (``ce_weight=``) tensors; ``grad_output`` (g) is the cotangent of the
        loss (torch's ``loss.backward(g)``). A loss that does not use an input gets a zero gradient
        for it (``materialize_grads``), which the checker then judges.

    >>> import torch.nn.functional as F  # doctest: +SKIP
    >>> def upcast(h, W, t, bias=None, ce_weight=None, **o):  # float32 inside, gradients rounded once to the dtype
    ...     b, w = (None if x is None else x.float() for x in (bias, ce_weight))
    ...     return F.cross_entropy(F.linear(h.float(), W.float(), b), t, weight=w, **o)
    >>> grad_fn = torch_linear_loss_grad(upcast)  # doctest: +SKIP
    """
    name = f"torch_linear_loss_grad({_name(loss_fn, 'linear_cross_entropy')})"

    def grad_fn(hidden: np.ndarray, weight: np.ndarray, targets: np.ndarray, /, *, bias: np.ndarray | None = None,
                grad_output: Any = None, **options: Any) -> tuple[np.ndarray, ...]:
        require("torch", extra="torch")
        import torch
        import torch.nn.functional as F

        h = to_torch(np.asarray(hidden), requires_grad=True, device=device)
        W = to_torch(np.asarray(weight), requires_grad=True, device=device)
        b = None if bias is None else to_torch(np.asarray(bias), requires_grad=True, device=device)
        t = to_torch(np.asarray(targets), device=device)
        kwargs = _torch_options(options, device)
        if loss_fn is None:
            unsupported = [k for k in _NOT_IN_TORCH if k in kwargs]
            if unsupported:
                raise TypeError(f"{name}: torch's F.cross_entropy has no {unsupported[0]}= (pass a loss_fn that "
                                "computes it, or check without that option)")
            if "ce_weight" in kwargs:
                kwargs["weight"] = kwargs.pop("ce_weight")
            loss = F.cross_entropy(F.linear(h, W, b), t, **kwargs)
        else:
            loss = loss_fn(h, W, t, **({} if b is None else {"bias": b}), **kwargs)
        inputs = (h, W) if b is None else (h, W, b)
        grads = torch.autograd.grad(loss, inputs, grad_outputs=_upstream(grad_output, loss, torch),
                                    allow_unused=True, materialize_grads=True)
        return tuple(to_numpy(g) for g in grads)

    grad_fn.__name__ = grad_fn.__qualname__ = name
    return grad_fn


def jax_linear_loss_grad(loss_fn: GradFn, *, accepts: tuple[str, ...] | None = None,
                         per_example: bool = False, device: Any = None) -> GradFn:
    """The gradients (d_hidden, d_weight[, d_bias]) of a JAX loss through ``jax.vjp``.

    Args:
        loss_fn: ``loss_fn(hidden, classifier, targets, **options)`` returns a scalar, or per-row
            losses for ``reduction="none"``; it gets ``bias=`` when a bias is checked and ``ce_weight=``
            (class weights, traced) when they are.
        accepts: the options ``loss_fn`` takes (default: every option verify_linear passes). Another
            option is a TypeError naming it (the loss cannot compute that case), except ``reduction``
            with ``per_example``.
        per_example: ``loss_fn`` returns per-row losses and takes no ``reduction`` (optax's losses on
            ``hidden @ classifier.T``): the adapter applies it, the mean over rows or the sum.
        device: a jax device or a name ("cpu", "gpu", "cuda:1"); default jax's default device.

    Returns:
        A ``grad_fn`` for ``verify_linear``; ``grad_output`` g is the cotangent given to the VJP
        (ones when not given). It is jit-compiled once per shape, dtype, bias or not and set of
        static options; x64 is enabled inside the call only.

    >>> import optax  # doctest: +SKIP
    >>> loss = lambda h, W, t: optax.softmax_cross_entropy_with_integer_labels(h @ W.T, t)
    >>> grad_fn = jax_linear_loss_grad(loss, accepts=(), per_example=True)  # doctest: +SKIP
    """
    compiled: dict[tuple, Any] = {}
    name = f"jax_linear_loss_grad({_name(loss_fn, 'loss')})"

    def grad_fn(hidden: np.ndarray, weight: np.ndarray, targets: np.ndarray, /, *, bias: np.ndarray | None = None,
                grad_output: Any = None, **options: Any) -> tuple[np.ndarray, ...]:
        require("jax", extra="jax")
        import jax
        import jax.numpy as jnp

        reduction = options.pop("reduction", "mean") if per_example else None
        refuse_unaccepted(name, accepts, options)
        class_weight = options.pop("ce_weight", None)
        static = tuple(sorted(options.items()))
        with_bias = bias is not None
        key = (static, reduction, with_bias, class_weight is not None, grad_output is not None)
        if key not in compiled:
            def loss(h: Any, W: Any, b: Any, t: Any, w: Any) -> Any:
                extra = {} if w is None else {"ce_weight": w}
                if with_bias:
                    extra["bias"] = b
                value = loss_fn(h, W, t, **extra, **dict(static))
                if reduction == "mean":
                    return jnp.mean(value)
                return jnp.sum(value) if reduction == "sum" else value

            def vjp(h: Any, W: Any, b: Any, t: Any, w: Any, g: Any) -> Any:
                out, pullback = jax.vjp(lambda h, W, b: loss(h, W, b, t, w), h, W, b)
                cotangent = jnp.ones_like(out) if g is None else jnp.broadcast_to(g.astype(out.dtype), out.shape)
                return pullback(cotangent)

            compiled[key] = jax.jit(vjp)
        with jax.enable_x64(True):
            put = lambda x: None if x is None else _jax_put(np.asarray(x), device)  # noqa: E731
            grads = compiled[key](put(hidden), put(weight), put(bias), put(targets), put(class_weight),
                                  put(grad_output))
            return tuple(to_numpy(g) for g in grads[:3 if with_bias else 2])

    grad_fn.__name__ = grad_fn.__qualname__ = name
    return grad_fn
