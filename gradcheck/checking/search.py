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


def record(stats: dict, outcome: Failure | tuple[float, float], grades: dict[str, tuple[float, bool]]) -> None:
    """Count one example: its worst ULPs and ratio (a mismatch's too), and what each contract made of it.

    An example that failed before its values were compared (an exception, a wrong shape, ...) meets
    no contract.
    """
    stats["examples"] += 1
    if isinstance(outcome, Failure):
        stats["failed"] = True
        if outcome.kind == FailureKind.MISMATCH:
            stats["ulps"] = max(stats["ulps"], outcome.ulps or 0.0)
            stats["ratio"] = max(stats["ratio"], outcome.ratio or 0.0)
    else:
        stats["ulps"] = max(stats["ulps"], outcome[0])
        stats["ratio"] = max(stats["ratio"], outcome[1])
    met, ratios = stats.setdefault("met", {}), stats.setdefault("ratios", {})
    if not grades:
        stats["ungraded"] = True
    for contract, (ratio, ok) in grades.items():
        ratios[contract] = max(ratios.get(contract, 0.0), ratio)
        met[contract] = met.get(contract, True) and ok


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
            timeout: float | None = None, precision: str | None = None, inplace: str = "flag",
            progress: Callable[[int, int], None] | None = None) -> Failure | None:
    """Run Hypothesis; return the shrunk failure or None.

    ``progress(done, max_examples)`` is called after each example of the search (not of shrinking).

    ``stats`` counts the examples up to and including the first failure and keeps, over those, the
    worst ULPs and ratio under the asked contract (the failing example's included) and, per contract,
    the worst ratio and whether every example met it (keys ``examples``, ``ulps``, ``ratio``,
    ``failed``, ``ratios``, ``met``; see :func:`record`).
    """
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Flaky

    seen: list[Failure] = []

    def test(case: Case) -> None:
        grades: dict[str, tuple[float, bool]] = {}
        outcome = check(grad_fn, case, timeout=timeout, precision=precision, grades=grades, inplace=inplace)
        if not stats["failed"]:
            record(stats, outcome, grades)
            if progress is not None:
                progress(stats["examples"], max_examples)
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
