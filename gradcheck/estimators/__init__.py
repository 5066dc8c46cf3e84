"""The registry of gradient methods: names, lazy loading, and the one entry point ``gradient``.

Importing this module loads numpy only; JAX and SymPy are imported by their estimator module on
the first call of a method that needs them.

>>> import numpy as np
>>> r = gradient(np.array([[0.0, np.log(3.0)]]), np.array([1]), method="closed_form")
>>> r.grad, r.status.name, r.bound
(array([[ 0.25, -0.25]]), 'CONVERGED', True)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from gradcheck.errors import InvalidArgument
from gradcheck.estimators.result import MethodResult, Status, finish, unsupported
from gradcheck.options import CASE
from gradcheck.problem import Problem, make_problem

__all__ = ["MethodResult", "MethodSpec", "Status", "estimate", "finish", "gradient", "methods",
           "register", "spec", "unsupported"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: where it lives and what its error means.

    Attributes:
        name: the registry name.
        module: the module defining it, imported on first use.
        function: the function's name; called as ``function(problem, **fixed, **options)`` and
            returning a :class:`MethodResult`.
        summary: one line for listings.
        bound: True when the method's ``error`` is a rigorous bound, False for an estimate.
        fixed: keyword arguments bound at registration (e.g. the difference scheme).
    """

    name: str
    module: str
    function: str
    summary: str
    bound: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Callable[..., MethodResult]:
        return getattr(importlib.import_module(self.module), self.function)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec_: MethodSpec) -> MethodSpec:
    """Add a method to the registry (replacing one of the same name) and return it."""
    _REGISTRY[spec_.name] = spec_
    return spec_


def methods() -> tuple[str, ...]:
    """The names of the registered methods, in registration order."""
    return tuple(_REGISTRY)


def spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``.

    Raises:
        InvalidArgument: no method has that name.
    """
    if name not in _REGISTRY:
        raise InvalidArgument(f"method must be one of {', '.join(_REGISTRY)}, got {name!r}.")
    return _REGISTRY[name]


def estimate(problem: Problem, *, method: str = "closed_form", **options: Any) -> MethodResult:
    """Run a registered method on a validated problem (see :func:`gradient`)."""
    entry = spec(method)
    return entry.load()(problem, **entry.fixed, **options)


def gradient(
    logits: Any,
    targets: Any,
    *,
    method: str = "closed_form",
    **options: Any,
) -> MethodResult:
    """The gradient of :func:`gradcheck.cross_entropy` by the named method, with its error estimate.

    Args:
        logits, targets: as for :func:`gradcheck.make_problem`.
        method: one of :func:`methods`.
        **options: the case options (:data:`gradcheck.options.CASE`: ``weight``, ``ignore_index``,
            ``reduction``, ``label_smoothing``, ``lse_square_scale``, ``softcap``, ``grad_output``, ...);
            every method honours all of them (docs/methods.md, "Kernel options"): the result is the
            VJP ``grad_output * dL/dz``. Every other keyword is passed to the method (each method's
            docstring lists its own).

    Returns:
        A :class:`MethodResult`; ``.grad`` has the logits' shape and dtype, ``.error`` the
        per-element error estimate (or bound, when ``.bound``).

    Raises:
        InvalidArgument: bad input or an unknown method.
    """
    entry = spec(method)
    case = {k: v for k, v in options.items() if k in CASE}
    problem = make_problem(logits, targets, **case)
    method_options = {k: v for k, v in options.items() if k not in CASE}
    return entry.load()(problem, **entry.fixed, **method_options)


_FD = "gradcheck.estimators.finite_difference"
_JAX = "gradcheck.estimators.jax_autodiff"
_SYMPY = "gradcheck.estimators.sympy_symbolic"

register(MethodSpec("closed_form", "gradcheck.estimators.closed_form", "closed_form",
                    "numpy p*S - w*t with the oracle's rigorous running error bound", bound=True))
for _scheme, _summary in (
    ("forward", "forward difference of the row losses, one column at a time"),
    ("central", "central difference of the row losses, one column at a time"),
    ("complex_step", "complex step Im L(z + ih e_k) / h, analytic options only"),
    ("richardson", "Richardson-extrapolated central differences"),
):
    register(MethodSpec(f"fd_{_scheme}", _FD, "cross_entropy_difference", _summary,
                        fixed={"scheme": _scheme}))
register(MethodSpec("jax_autodiff", _JAX, "jax_gradient",
                    "jax.grad of a jnp loss, computed in the input dtype", fixed={"x64": False}))
register(MethodSpec("jax_autodiff_x64", _JAX, "jax_gradient",
                    "jax.grad of a jnp loss, computed in float64", fixed={"x64": True}))
register(MethodSpec("sympy_numpy", _SYMPY, "sympy_gradient",
                    "SymPy's derivative, lambdified with numpy in float64", fixed={"module": "numpy"}))
register(MethodSpec("sympy_mpmath", _SYMPY, "sympy_gradient",
                    "SymPy's derivative, lambdified with mpmath at adaptive precision",
                    fixed={"module": "mpmath"}))
