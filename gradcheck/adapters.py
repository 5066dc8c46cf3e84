"""Adapters between numpy ``grad_fn`` calls and torch or JAX: tensors of the checked dtype in, numpy out.

``verify`` calls ``grad_fn(logits, targets, **options)`` with numpy arrays. These wrappers let it check

* a torch or JAX *gradient* function, called with tensors of the same dtype
  (:func:`torch_grad_fn`, :func:`jax_grad_fn`);
* a torch or JAX *loss* function, differentiated by the framework's own autodiff
  (:func:`torch_loss_grad`, :func:`jax_loss_grad`); ``reduction="none"`` losses are summed first,
  which is the gradient ``verify`` expects.

torch and jax are imported when a wrapper is called, never at import time.

JAX compiles a jitted function once per input shape, so a check drawing a new shape for every
example spends its time compiling (9-19 s per 100 examples for an optax loss, issue 14). The JAX
wrappers therefore carry ``compiles_per_shape = True``: ``verify`` then draws every regime at a few
fixed shapes (:data:`gradcheck.strategies.SHAPE_BUCKETS` within ``max_shape``), so each is compiled
once per dtype and option set. Padding each case to a bucket (masked classes, ignored rows) was not
chosen: it is not exactly equivalent (a longer row changes the order of XLA's sums, a mean over
padded rows changes its divisor, and optax's losses have no ignored rows). Asking for ``shapes=``
overrides the set; any ``grad_fn`` may carry the attribute.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from gradcheck.dtypes import float_format
from gradcheck.errors import require
from gradcheck.problem import as_array

GradFn = Callable[..., Any]


def to_numpy(value: Any) -> np.ndarray:
    """Convert a numpy, torch or JAX array (or an array-like) to numpy, keeping its dtype.

    A torch bfloat16 tensor becomes an ml_dtypes bfloat16 array (exactly, through float32).
    """
    return as_array(value, copy=False)  # the one conversion (gradcheck.problem)


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return {
        "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[float_format(dtype).name]


def to_torch(array: np.ndarray, *, requires_grad: bool = False, device: Any = None) -> Any:
    """A torch tensor holding ``array`` exactly: floats keep their dtype (bfloat16 included), ints are int64.

    ``device``: where the tensor lives ("cpu", "cuda", "cuda:1", a ``torch.device``; default the CPU).
    """
    require("torch", extra="torch")
    import torch

    if array.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device or "cpu")
    fmt = float_format(array.dtype)
    source = array.astype(np.float32) if fmt.name == "bfloat16" else np.array(array, copy=True)
    tensor = torch.from_numpy(np.ascontiguousarray(source)).to(_torch_dtype(fmt.dtype)).to(device or "cpu")
    return tensor.requires_grad_(requires_grad)


def _torch_options(options: dict[str, Any], device: Any = None) -> dict[str, Any]:
    out = dict(options)
    for name in ("weight", "grad_output"):  # the upstream gradient: a scalar of the dtype or (N,)
        if out.get(name) is not None:
            array = np.asarray(out[name])
            out[name] = to_torch(array, device=device).reshape(array.shape)  # a 0-d array stays 0-d
    return out


def torch_grad_fn(fn: GradFn, *, device: Any = None) -> GradFn:
    """Wrap a torch gradient function ``fn(logits, targets, **options) -> tensor`` for ``verify``.

    Logits, probability targets, ``weight`` and ``grad_output`` become tensors of the checked dtype
    on ``device`` (default the CPU; "cuda", "cuda:1", ...), class indices int64; the result comes
    back to numpy. The wrapper has ``fn``'s signature (``functools.wraps``), so verify passes
    ``grad_output=`` exactly when ``fn`` names that parameter.
    """

    @functools.wraps(fn)
    def grad_fn(logits: np.ndarray, targets: np.ndarray, **options: Any) -> np.ndarray:
        return to_numpy(fn(to_torch(logits, device=device), to_torch(targets, device=device),
                           **_torch_options(options, device)))

    return grad_fn


def torch_loss_grad(loss_fn: GradFn | None = None, *, device: Any = None) -> GradFn:
    """The gradient of a torch loss through ``torch.autograd``; default ``F.cross_entropy``.

    ``loss_fn(logits, targets, **options)`` returns a scalar, or per-row losses for
    ``reduction="none"``. The gradient is the vector-Jacobian product with ``grad_output`` (what
    ``loss.backward(grad_output)`` computes): a scalar for a scalar loss, one value per row for
    per-row losses; None (the default) means ones, so per-row losses are summed. The returned
    ``grad_fn`` always takes ``grad_output=``, so verify always exercises it. The inputs are created
    on ``device`` (default the CPU; "cuda", "cuda:1", ...), the gradient comes back to numpy.
    """

    def grad_fn(logits: np.ndarray, targets: np.ndarray, *, grad_output: Any = None, **options: Any) -> np.ndarray:
        require("torch", extra="torch")
        import torch
        import torch.nn.functional as F

        fn = F.cross_entropy if loss_fn is None else loss_fn
        z = to_torch(logits, requires_grad=True, device=device)
        loss = fn(z, to_torch(targets, device=device), **_torch_options(options, device))
        if grad_output is None:
            upstream = torch.ones_like(loss)
        else:
            upstream = to_torch(np.asarray(grad_output), device=device).to(loss.dtype).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, z, grad_outputs=upstream)
        return to_numpy(grad)

    grad_fn.__name__ = grad_fn.__qualname__ = f"torch_loss_grad({getattr(loss_fn, '__name__', 'cross_entropy')})"
    return grad_fn


def _jax_options(options: dict[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp

    out = dict(options)
    for name in ("weight", "grad_output"):  # the upstream gradient: a 0-d array or (N,) of the dtype
        if out.get(name) is not None:
            out[name] = jnp.asarray(out[name])
    return out


def _jax_put(array: Any, device: Any) -> Any:
    import jax
    import jax.numpy as jnp

    if device is None:
        return jnp.asarray(array)
    if isinstance(device, str):  # "cpu", "gpu", "cuda", "cuda:1", "gpu:0"
        kind, _, index = device.partition(":")
        device = jax.devices({"cuda": "gpu"}.get(kind, kind))[int(index or 0)]
    return jax.device_put(array, device)


def jax_grad_fn(fn: GradFn, *, device: Any = None) -> GradFn:
    """Wrap a JAX gradient function for ``verify``: jnp arrays of the checked dtype (x64 enabled for float64).

    ``device``: a jax device or a name ("cpu", "gpu", "cuda:1"); default jax's default device.
    ``grad_output`` (a 0-d array or one value per row) reaches ``fn`` when ``fn`` names that parameter
    (the wrapper has its signature). The wrapper has ``compiles_per_shape = True`` (see the module).
    """

    @functools.wraps(fn)
    def grad_fn(logits: np.ndarray, targets: np.ndarray, **options: Any) -> np.ndarray:
        require("jax", extra="jax")
        import jax

        with jax.enable_x64(True):
            kwargs = _jax_options(options)
            for name in ("weight", "grad_output"):
                if kwargs.get(name) is not None:
                    kwargs[name] = _jax_put(kwargs[name], device)
            return to_numpy(fn(_jax_put(logits, device), _jax_put(targets, device), **kwargs))

    grad_fn.compiles_per_shape = True  # type: ignore[attr-defined]
    return grad_fn


def refuse_unaccepted(name: str, accepts: tuple[str, ...] | None, options: dict[str, Any]) -> None:
    """TypeError naming the first option a loss does not take (``accepts`` None: it takes every one)."""
    if accepts is None:
        return
    extra = [k for k in options if k not in accepts]
    if extra:
        raise TypeError(f"{name} takes the options {accepts}, got {extra[0]}= (the loss cannot compute this "
                        "case; check it without that option)")


def jax_loss_grad(loss_fn: GradFn, *, accepts: tuple[str, ...] | None = None,
                  per_example: bool = False, device: Any = None) -> GradFn:
    """The gradient of a JAX loss ``loss_fn(logits, targets, **options)`` through ``jax.grad``.

    Args:
        loss_fn: returns a scalar, or per-row losses (then summed: the gradient ``verify`` expects
            for ``reduction="none"``).
        accepts: the options ``loss_fn`` takes (default: every option verify passes). An option
            verify passes that is not among them is an error naming it (the loss cannot compute
            that case), except ``reduction`` with ``per_example``.
        per_example: ``loss_fn`` returns per-example losses and takes no ``reduction`` (optax's
            losses): the adapter applies it, the mean over rows or the sum.
        device: a jax device or a name ("cpu", "gpu", "cuda:1") the inputs are put on; default
            jax's default device.

    The gradient is the vector-Jacobian product with ``grad_output`` (``jax.vjp``): a scalar for a
    scalar loss, one value per row for per-row losses; None (the default) means ones, so per-row
    losses are summed. The returned ``grad_fn`` always takes ``grad_output=``, so verify always
    exercises it.

    The gradient is jit-compiled once per shape, dtype and set of static options (integers, strings,
    floats); ``weight`` and ``grad_output`` are traced. x64 is enabled inside the call only. The
    ``grad_fn`` has ``compiles_per_shape = True``, so verify draws from a few shapes (see the module).

    >>> import optax  # doctest: +SKIP
    >>> grad_fn = jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels, accepts=(), per_example=True)
    """
    compiled: dict[tuple, Any] = {}
    name = f"jax_loss_grad({getattr(loss_fn, '__name__', 'loss')})"

    def grad_fn(logits: np.ndarray, targets: np.ndarray, *, grad_output: Any = None, **options: Any) -> np.ndarray:
        require("jax", extra="jax")
        import jax
        import jax.numpy as jnp

        reduction = options.pop("reduction", "mean") if per_example else None
        refuse_unaccepted(name, accepts, options)
        weight = options.pop("weight", None)
        static = tuple(sorted(options.items()))
        key = (static, reduction)
        if key not in compiled:
            def vjp(z: Any, t: Any, w: Any, g: Any) -> Any:
                extra = {} if w is None else {"weight": w}

                def loss_of(z: Any) -> Any:
                    loss = loss_fn(z, t, **extra, **dict(static))
                    if reduction is None or reduction == "none":
                        return loss
                    return jnp.mean(loss) if reduction == "mean" else jnp.sum(loss)

                loss, pull = jax.vjp(loss_of, z)
                upstream = jnp.ones_like(loss) if g is None else jnp.reshape(g, loss.shape).astype(loss.dtype)
                return pull(upstream)[0]

            compiled[key] = jax.jit(vjp)
        with jax.enable_x64(True):
            w = None if weight is None else _jax_put(weight, device)
            g = None if grad_output is None else _jax_put(np.asarray(grad_output), device)
            return to_numpy(compiled[key](_jax_put(logits, device), _jax_put(targets, device), w, g))

    grad_fn.__name__ = grad_fn.__qualname__ = name
    grad_fn.compiles_per_shape = True  # type: ignore[attr-defined]
    return grad_fn
