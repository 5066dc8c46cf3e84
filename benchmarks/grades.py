"""The grades of real libraries' cross-entropy gradients: which precision contract each keeps, per dtype and option.

Run: ``.venv/bin/python benchmarks/grades.py [--examples 200] [--seed 0] [--max-shape 32,1024]``.

Every row is ``gradcheck.verify(grad_fn, dtype=D, precision=D, **options)`` (the loosest contract, so
the search never stops early) and reads ``result.grade``, the tightest contract met on every example
(docs/tolerance.md, "Precision contracts"), and ``result.contract_ratios``, the worst error / tolerance
under each. The catalogue :data:`LIBRARIES` is also what tests/test_real_libraries.py states.

Conventions, checked against each library's source:

* optax's ``smooth_labels(labels, alpha)`` is ``(1 - alpha) * labels + alpha / num_categories``
  (optax 0.2.8, ``optax/losses/_smoothing.py``), torch's ``label_smoothing`` convention: so it is
  checked with ``label_smoothing=alpha``. optax's losses return per-example losses; the adapter takes
  their mean (``reduction="mean"``) or sum.
* keras 3 losses default to ``reduction="sum_over_batch_size"``: the sum of the per-example losses
  divided by their number, torch's ``"mean"`` without weights (keras/src/losses/loss.py,
  ``reduce_values``); ``"sum"`` and ``None`` map to ``"sum"`` and ``"none"``. Their
  ``label_smoothing`` is ``y * (1 - ls) + ls / num_classes`` (keras/src/losses/losses.py), torch's.
  A keras loss computes in its ``dtype``, by default ``keras.config.floatx()`` = float32: it casts
  float64 (and half) inputs to float32. "keras (dtype=float64)" is the same loss asked to compute in
  float64.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradcheck  # noqa: E402
from gradcheck.adapters import jax_loss_grad, to_numpy, to_torch, torch_loss_grad  # noqa: E402

DTYPES = ("float64", "float32", "float16", "bfloat16")
HALF = ("float16", "bfloat16")

TORCH_OPTIONS = {
    "default": {},
    "reduction=sum": {"reduction": "sum"},
    "reduction=none": {"reduction": "none"},
    "label_smoothing=0.1": {"label_smoothing": 0.1},
    "weighted": {"weighted": True},
    "ignore_index=1": {"ignore_index": 1},
    "targets=probs": {"targets": "probs"},
}


@dataclass(frozen=True)
class Library:
    """One gradient of a real library: ``make()`` builds the grad_fn (importing the library then)."""

    name: str
    make: Callable[[], Callable[..., Any]]
    options: dict[str, dict[str, Any]]
    dtypes: tuple[str, ...] = DTYPES
    needs: tuple[str, ...] = field(default=("torch",))


def torch_float32_inside(logits: Any, targets: Any, **options: Any) -> Any:
    """torch autograd of ``F.cross_entropy(logits.float(), ...)``: float32 inside, the gradient rounded once."""
    import torch
    import torch.nn.functional as F

    z = to_torch(logits).float().requires_grad_(True)
    t = to_torch(targets)
    if t.is_floating_point():
        t = t.float()
    if options.get("weight") is not None:
        options["weight"] = to_torch(options["weight"]).float()
    (grad,) = torch.autograd.grad(F.cross_entropy(z, t, **options).sum(), z)
    return to_numpy(grad.to(to_torch(logits).dtype))


def _optax(which: str) -> Callable[..., Any]:
    import jax
    import optax

    if which == "softmax_cross_entropy":
        return jax_loss_grad(optax.softmax_cross_entropy, accepts=(), per_example=True)
    if which == "integer_labels":
        return jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels, accepts=(), per_example=True)

    def smooth_labels_softmax_cross_entropy(logits: Any, labels: Any, label_smoothing: float) -> Any:
        one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, label_smoothing))

    return jax_loss_grad(smooth_labels_softmax_cross_entropy, accepts=("label_smoothing",), per_example=True)


def import_keras() -> Any:
    """keras 3 on the JAX backend, or raise ImportError saying why not.

    ``KERAS_BACKEND`` is read once, when keras is first imported: it is set to "jax" for that import
    only and restored after, so nothing else in the process sees it.
    """
    if "keras" not in sys.modules:
        before = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = "jax"
        try:
            import keras  # noqa: F401
        finally:
            if before is None:
                del os.environ["KERAS_BACKEND"]
            else:
                os.environ["KERAS_BACKEND"] = before
    import keras

    if keras.backend.backend() != "jax":
        raise ImportError(f"keras was imported with the {keras.backend.backend()!r} backend before; the JAX "
                          "backend needs KERAS_BACKEND=jax before the first import")
    return keras


KERAS_REDUCTION = {"mean": "sum_over_batch_size", "sum": "sum", "none": None}


def _keras(which: str, **kwargs: Any) -> Callable[..., Any]:
    keras = import_keras()
    cls = {"categorical": keras.losses.CategoricalCrossentropy,
           "sparse": keras.losses.SparseCategoricalCrossentropy}[which]

    def loss(logits: Any, targets: Any, reduction: str = "mean", label_smoothing: float = 0.0) -> Any:
        smoothing = {"label_smoothing": label_smoothing} if label_smoothing else {}
        return cls(from_logits=True, reduction=KERAS_REDUCTION[reduction], **smoothing, **kwargs)(targets, logits)

    loss.__name__ = cls.__name__ + "".join(f"({k}={v})" for k, v in kwargs.items())
    return jax_loss_grad(loss, accepts=("reduction", "label_smoothing") if which == "categorical" else ("reduction",))


LIBRARIES: tuple[Library, ...] = (
    Library("torch autograd F.cross_entropy", torch_loss_grad, TORCH_OPTIONS),
    Library("torch F.cross_entropy(logits.float()), rounded once", lambda: torch_float32_inside, TORCH_OPTIONS,
            dtypes=HALF),
    Library("optax softmax_cross_entropy", lambda: _optax("softmax_cross_entropy"),
            {"targets=probs": {"targets": "probs"}, "targets=probs, reduction=sum": {"targets": "probs", "reduction": "sum"}},
            needs=("optax",)),
    Library("optax softmax_cross_entropy_with_integer_labels", lambda: _optax("integer_labels"),
            {"default": {}, "reduction=sum": {"reduction": "sum"}}, needs=("optax",)),
    Library("optax smooth_labels + softmax_cross_entropy", lambda: _optax("smooth_labels"),
            {"label_smoothing=0.1": {"label_smoothing": 0.1}}, needs=("optax",)),
    Library("keras CategoricalCrossentropy(from_logits=True)", lambda: _keras("categorical"),
            {"targets=probs": {"targets": "probs"}, "targets=probs, reduction=sum": {"targets": "probs", "reduction": "sum"},
             "targets=probs, label_smoothing=0.1": {"targets": "probs", "label_smoothing": 0.1}}, needs=("keras",)),
    Library("keras SparseCategoricalCrossentropy(from_logits=True)", lambda: _keras("sparse"),
            {"default": {}, "reduction=sum": {"reduction": "sum"}}, needs=("keras",)),
    Library("keras CategoricalCrossentropy(from_logits=True, dtype='float64')",
            lambda: _keras("categorical", dtype="float64"), {"targets=probs": {"targets": "probs"}},
            dtypes=("float64",), needs=("keras",)),
    Library("keras SparseCategoricalCrossentropy(from_logits=True, dtype='float64')",
            lambda: _keras("sparse", dtype="float64"), {"default": {}}, dtypes=("float64",), needs=("keras",)),
)


def grade(library: Library, dtype: str, options: dict[str, Any], **settings: Any) -> gradcheck.Verification:
    """``verify`` of ``library`` under the loosest contract (``precision=dtype``), so every example is graded."""
    return gradcheck.verify(library.make(), dtype=dtype, precision=dtype, **options, **settings)


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "jax", "jaxlib", "optax", "keras", "numpy", "ml_dtypes")
    found = [f"{n} {md.version(n)}" for n in names if _installed(n)]
    return f"Python {platform.python_version()}, " + ", ".join(found) + f"; {platform.machine()} CPU"


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shape", default="32,1024", help="the largest (N, K), as N,K")
    args = parser.parse_args(argv)
    max_shape = tuple(int(x) for x in args.max_shape.split(","))
    import warnings

    # keras warns (SyntaxWarning) that K = 1 should use binary_crossentropy; the case is still valid.
    warnings.filterwarnings("ignore", message="In loss categorical_crossentropy, expected y_pred.shape",
                            category=SyntaxWarning)
    print(f"seed {args.seed}, {args.examples} examples per row, max_shape {max_shape}")
    print(versions())
    print()
    print("| library | dtype | options | grade | exact | float64 | float32 | dtype contract |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    failures = []
    for library in LIBRARIES:
        if not all(_installed(n) for n in library.needs):
            print(f"| {library.name} | | | not installed | | | | |")
            continue
        for dtype in library.dtypes:
            for label, options in library.options.items():
                r = grade(library, dtype, options, max_examples=args.examples, seed=args.seed, max_shape=max_shape)
                c = r.contract_ratios
                print(f"| {library.name} | {dtype} | {label} | {r.grade or 'none'} | {_ratio(c.get('exact'))} | "
                      f"{_ratio(c.get('float64'))} | {_ratio(c.get('float32') if dtype in HALF else None)} | "
                      f"{_ratio(c.get(dtype))} |", flush=True)
                if not r.passed:
                    failures.append(f"- {library.name}, {dtype}, {label}: {r.failure.message.splitlines()[0]}")
    if failures:
        print("\nThe rows that met no contract fail with:\n")
        print("\n".join(failures))
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
