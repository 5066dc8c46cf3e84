"""The closed form p*S - w*t as a registered method: the numpy oracle with its rigorous bound."""

from __future__ import annotations

from gradcheck.estimators.result import MethodResult, finish
from gradcheck.oracle import grad_bounded
from gradcheck.problem import Problem


def closed_form(problem: Problem) -> MethodResult:
    """The oracle's float64 gradient rounded to the input dtype.

    ``error`` is a rigorous bound: the running error bound of docs/oracle.md plus half an ulp of
    the final rounding (docs/methods.md, "Closed form").
    """
    grad, bound = grad_bounded(problem)
    return finish(problem, grad, bound, method="closed_form", bound=True, evaluations=1)
