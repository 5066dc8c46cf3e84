"""Exceptions raised by gradcheck: bad input, a wrong gradient, an uncertifiable value."""

from __future__ import annotations


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
