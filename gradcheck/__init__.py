"""gradcheck: a reference oracle and verification harness for the softmax cross-entropy gradient.

Importing the package loads only the standard library and the exceptions (gradcheck.errors);
every other public name is imported on first use (PEP 562) from the module in ``_LAZY``: the
numeric core (numpy, ml_dtypes, mpmath) when one of its names is first used, Hypothesis with
``verify``, JAX, SymPy and torch inside the modules that need them. So the pytest plugin, which
lives inside this package, loads none of them until a test runs a check.
"""

from __future__ import annotations

import importlib

from gradcheck.errors import (
    CertificationError,
    GradcheckError,
    GradientMismatch,
    InvalidArgument,
    MissingExtra,
)

__version__ = "0.1.0"

_EAGER = ("CertificationError", "GradcheckError", "GradientMismatch", "InvalidArgument", "MissingExtra")

# Public name -> (module, attribute); attribute None: the name is the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    **{name: ("gradcheck.ulps", name) for name in ("Comparison", "compare", "ulp_distance")},
    **{name: ("gradcheck.dtypes", name) for name in ("DTYPE_NAMES", "FloatFormat", "float_format",
                                                       "round_to_format")},
    **{name: ("gradcheck.exact", name) for name in ("exact_grad", "exact_loss")},
    **{name: ("gradcheck.oracle", name) for name in (
        "Bounded", "cross_entropy", "cross_entropy_bounded", "cross_entropy_grad", "cross_entropy_grad_bounded",
        "cross_entropy_hessian", "log_softmax", "softmax", "softmax_jacobian")},
    **{name: ("gradcheck.problem", name) for name in ("Problem", "make_problem")},
    **{name: ("gradcheck.estimators", name) for name in ("methods", "gradient", "MethodResult", "Status")},
    "finite_difference_gradient": ("gradcheck.estimators.finite_difference", "finite_difference_gradient"),
    "verify": ("gradcheck.checking.api", "verify"),
    "assert_gradient": ("gradcheck.checking.api", "assert_gradient"),
    "Verification": ("gradcheck.checking.result", "Verification"),
    "Case": ("gradcheck.problem", "Case"),
    "strategies": ("gradcheck.strategies", None),
    # the fused linear family (issue 13)
    **{name: ("gradcheck.linear", name) for name in (
        "LinearGrad", "LinearBounded", "LinearProblem", "linear_cross_entropy_grad",
        "linear_cross_entropy_grad_bounded", "make_linear_problem")},
    "exact_linear_grad": ("gradcheck.linear_exact", "exact_linear_grad"),
    "verify_linear": ("gradcheck.checking.linear", "verify_linear"),
    "assert_linear_gradient": ("gradcheck.checking.linear", "assert_linear_gradient"),
    "LinearVerification": ("gradcheck.checking.linear", "LinearVerification"),
    # issue 13 (linearx): the fused linear cross-entropy family's torch and JAX loss adapters
    **{name: ("gradcheck.adapters_linear", name) for name in ("torch_linear_loss_grad", "jax_linear_loss_grad")},
}

__all__ = sorted([*_EAGER, *_LAZY])


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'gradcheck' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
