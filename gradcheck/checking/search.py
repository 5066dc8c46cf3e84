"""The Hypothesis search: run ``grad_fn`` on generated cases and let Hypothesis shrink the first failure.

Hypothesis shrinks the regime, the shape and the seed of a case; :mod:`gradcheck.checking.shrink`
then simplifies its values. A call that hung (``timeout``) ends the search at once, unshrunk: each
shrinking step could cost the whole timeout again. Hypothesis is imported when a search runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from gradcheck.checking.judge import check
from gradcheck.checking.result import Failure, FailureKind

if TYPE_CHECKING:
    from gradcheck.problem import Case


class _Failed(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries the Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.kind, failure.message)
        self.failure = failure


class _Stop(BaseException):
    """Raised inside the Hypothesis test to end the search without shrinking (Hypothesis lets it through)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.kind, failure.message)
        self.failure = failure


def _search(grad_fn: Callable[..., Any], strategy: Any, seed: int, max_examples: int, stats: dict, *,
            timeout: float | None = None) -> Failure | None:
    """Run Hypothesis; return the shrunk failure or None.

    ``stats`` counts the examples up to and including the first failure and keeps the worst ULPs and
    ratio among the passing ones (keys ``examples``, ``ulps``, ``ratio``, ``failed``).
    """
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Flaky

    seen: list[Failure] = []

    def test(case: Case) -> None:
        outcome = check(grad_fn, case, timeout=timeout)
        if not stats["failed"]:
            stats["examples"] += 1
            if isinstance(outcome, Failure):
                stats["failed"] = True
            else:
                stats["ulps"] = max(stats["ulps"], outcome[0])
                stats["ratio"] = max(stats["ratio"], outcome[1])
        if isinstance(outcome, Failure):
            seen.append(outcome)
            if outcome.kind == FailureKind.TIMEOUT:
                raise _Stop(outcome)
            raise _Failed(outcome)

    run = hypothesis_seed(seed)(settings(
        max_examples=max_examples, database=None, deadline=None, derandomize=False, print_blob=False,
        report_multiple_bugs=False, verbosity=Verbosity.quiet, phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(test)))
    try:
        run()
    except (_Failed, _Stop) as exc:
        return exc.failure
    except Flaky:  # failed once, passed when Hypothesis replayed the same input
        case = seen[0].case if seen else None
        return Failure(FailureKind.NONDETERMINISM, "grad_fn failed on an input, then passed on the same input", case)
    return None
