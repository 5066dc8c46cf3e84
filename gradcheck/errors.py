"""Exceptions raised by gradcheck: bad input, a wrong gradient, an uncertifiable value, a missing extra.

Standard library only: the pytest plugin and ``gradcheck/__init__.py`` import it at load.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class GradcheckError(Exception):
    """Base class of every exception gradcheck raises on purpose."""


class InvalidArgument(GradcheckError, ValueError):
    """An argument is not what the function accepts.

    The message names the argument, what was expected and what was given:
    ``"targets must be class indices in [0, 5) or ignore_index=-100, got 7 at row 3."``
    """


class GradientMismatch(GradcheckError, AssertionError):
    """A gradient under test differs from the truth by more than its tolerance.

    Raised by :func:`gradcheck.assert_gradient`. The message names the worst element,
    the expected and the actual value, the error in ULPs, the tolerance, the minimal
    failing input, the seed and a one-line reproduction.
    """


class CertificationError(GradcheckError, ArithmeticError):
    """The certified truth could not be decided within the precision cap.

    This is not expected for any input the package accepts (see docs/exact.md for why the
    exact value is never a rounding boundary); it exists so that a failure is loud.
    """


class MissingExtra(GradcheckError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it.

    ``require("jax", extra="jax")`` raises it when JAX is missing:
    ``"jax is not installed; gradcheck installs it with the extra 'jax': pip install 'gradcheck[jax]'"``.
    """

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"{module} is not installed; gradcheck installs it with the extra {extra!r}: "
            f"pip install 'gradcheck[{extra}]'",
            name=module,
        )
        self.extra = extra


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` (dotted names allowed), or say which extra of gradcheck installs it.

    Args:
        module: the module to import, e.g. ``"jax.numpy"``.
        extra: the extra that installs its distribution, e.g. ``"jax"``.

    Returns:
        The imported module.

    Raises:
        MissingExtra: the module's top-level package is not installed. Any other import failure
            (a broken installation, a missing dependency of the package itself) propagates unchanged.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != top:
            raise
        raise MissingExtra(top, extra) from exc
