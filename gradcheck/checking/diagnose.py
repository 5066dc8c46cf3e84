"""Naming a wrong gradient: the slipped convention a mismatching result matches instead.

After a mismatch has been shrunk, the ``grad_fn`` is called once more on the failing case and its
result is judged against the truth of a few *variants* of that case, each one convention a kernel
commonly gets wrong (issue 12): the upstream gradient ignored, its first row used for every row
(TransformerEngine #2139), applied twice, the z-loss term left out, softcapping left out, label
smoothing or class weights ignored. A variant is named only when the result passes it under the
same contract, and only when the variant is a different problem (an upstream gradient of ones cannot
be told from an ignored one). It is evidence, not proof: on a small shrunk case two conventions can
agree (an upstream gradient of -1 applied twice is one ignored; both are named then), and a result
can match a variant by accident where the variant hardly changes the truth. No variant passing says
nothing: most bugs match none of these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gradcheck.checking.judge import _call, compare_values
from gradcheck.checking.result import Failure, FailureKind
from gradcheck.errors import InvalidArgument

if TYPE_CHECKING:
    from gradcheck.problem import Case


def variants(case: Case) -> list[tuple[str, dict[str, Any]]]:
    """The slipped conventions that apply to ``case``: (what it is, the case changes that model it)."""
    p = case.problem
    out: list[tuple[str, dict[str, Any]]] = []
    g = p.grad_output
    if g is not None:
        active = p.active_rows() if g.ndim else np.ones(1, dtype=bool)
        if not np.all(np.broadcast_to(g, active.shape)[active] == 1.0):
            out.append(("it matches the loss's own gradient: grad_output was ignored (taken as ones)",
                        {"grad_output": None}))
        if g.ndim == 1 and np.any(g[active] != g[0]):
            out.append(("it matches grad_output[0] for every row (TransformerEngine #2139) instead of one value "
                        "per row", {"grad_output": np.full_like(g, g[0])}))
        if np.any(np.isin(g, (0.0, 1.0), invert=True)):
            out.append(("it matches grad_output applied twice (grad_output**2 * dL/dz)", {"grad_output": g * g}))
    if p.lse_square_scale:
        out.append(("it matches the gradient without the z-loss term (lse_square_scale ignored)", {"lse_square_scale": 0.0}))
    if p.softcap is not None:
        out.append(("it matches the gradient without softcapping (no tanh, no chain factor)", {"softcap": None}))
    if p.label_smoothing:
        out.append(("it matches the gradient without label smoothing", {"label_smoothing": 0.0}))
    if p.weight is not None:
        out.append(("it matches the gradient without the class weights", {"weight": None}))
    return out


def matches(grad_fn: Callable[..., Any], failure: Failure, *, timeout: float | None = None,
            precision: str | None = None, inplace: str = "flag") -> list[str]:
    """The variants of the failing case that ``grad_fn``'s result passes (their descriptions).

    Only a mismatch is diagnosed; the ``grad_fn`` is called once more (a call that fails now matches
    nothing).
    """
    if failure.kind != FailureKind.MISMATCH:
        return []
    candidates = variants(failure.case)
    if not candidates:
        return []
    outcome = _call(grad_fn, failure.case, timeout, inplace)
    if isinstance(outcome, Failure):
        return []
    got = outcome[1]
    found = []
    for text, changes in candidates:
        try:
            variant = failure.case.replace(**changes)
        except InvalidArgument:
            continue
        if not isinstance(compare_values(got, variant, precision=precision), Failure):
            found.append(text)
    return found


def diagnose(grad_fn: Callable[..., Any], failure: Failure, before: Failure | None = None, **rules: Any) -> Failure:
    """The failure with its :attr:`Failure.diagnosis` set when its result matches variants of the case.

    Simplifying a case's values can make two conventions agree (an upstream gradient simplified to
    ``[1, 3]`` is ignored and first-row-broadcast alike), so the case ``before`` simplification (the
    one Hypothesis shrank, with its drawn values) is diagnosed too, and the answer that names fewer
    conventions is kept (the simplified case's on a tie; then it says on which case it was found).
    ``rules``: ``timeout``, ``precision``, ``inplace`` as for the search.
    """
    after = matches(grad_fn, failure, **rules)
    earlier = matches(grad_fn, before, **rules) if before is not None and before is not failure else []
    if earlier and (not after or len(earlier) < len(after)):
        text = "; ".join(earlier) + " (on the case before its values were simplified)"
    elif after:
        text = "; ".join(after)
    else:
        return failure
    return Failure(failure.kind, failure.message, failure.case, failure.index, failure.expected, failure.got,
                   failure.ulps, failure.tolerance, failure.ratio, diagnosis=text)
