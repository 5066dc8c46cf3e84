"""gradcheck: a reference oracle and verification harness for the softmax cross-entropy gradient.

Importing the package is cheap: it loads numpy, ml_dtypes and mpmath only. JAX, SymPy,
Hypothesis and torch are imported by the modules that need them, when they are used.
"""

from __future__ import annotations

from gradcheck.compare import Comparison, compare, ulp_distance
from gradcheck.dtypes import DTYPE_NAMES, FloatFormat, float_format, round_to_format
from gradcheck.errors import CertificationError, GradcheckError, GradientMismatch, InvalidArgument
from gradcheck.exact import exact_grad, exact_loss
from gradcheck.oracle import (
    Bounded,
    cross_entropy,
    cross_entropy_bounded,
    cross_entropy_grad,
    cross_entropy_grad_bounded,
    cross_entropy_hessian,
    log_softmax,
    softmax,
    softmax_jacobian,
)
from gradcheck.problem import Problem, make_problem

__version__ = "0.1.0"

# Heavy parts (Hypothesis, JAX, SymPy) load on first use: name -> (module, attribute or None).
_LAZY = {
    "methods": ("gradcheck.estimators", "methods"),
    "gradient": ("gradcheck.estimators", "gradient"),
    "MethodResult": ("gradcheck.estimators", "MethodResult"),
    "Status": ("gradcheck.estimators", "Status"),
    "finite_difference_gradient": ("gradcheck.estimators.finite_difference", "finite_difference_gradient"),
    "verify": ("gradcheck.checking.api", "verify"),
    "assert_gradient": ("gradcheck.checking.api", "assert_gradient"),
    "Verification": ("gradcheck.checking.result", "Verification"),
    "strategies": ("gradcheck.strategies", None),
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'gradcheck' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    *_LAZY,
    "Bounded",
    "CertificationError",
    "Comparison",
    "DTYPE_NAMES",
    "FloatFormat",
    "GradcheckError",
    "GradientMismatch",
    "InvalidArgument",
    "Problem",
    "compare",
    "cross_entropy",
    "cross_entropy_bounded",
    "cross_entropy_grad",
    "cross_entropy_grad_bounded",
    "cross_entropy_hessian",
    "exact_grad",
    "exact_loss",
    "float_format",
    "log_softmax",
    "make_problem",
    "round_to_format",
    "softmax",
    "softmax_jacobian",
    "ulp_distance",
]
