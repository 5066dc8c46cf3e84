"""Checking an implementation against a suite: its gradient on every input, and the file's own labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcheck.vectors.suite import Vector, VectorSuite


@dataclass(frozen=True)
class VectorOutcome:
    """One test against the checker and (for its inputs) the implementation.

    Attributes:
        tc_id: the test.
        expected: "valid" or "invalid".
        classified: the checker classified the test's own gradient as labelled (valid accepted,
            invalid rejected).
        implementation_ok: the implementation's gradient on these inputs passed ``verify``'s checks
            (None when the inputs were already run for an earlier test).
        message: what went wrong, empty when nothing did.
        resembles: modeled bugs (flags) whose gradient on these inputs the implementation's is closer to
            than to the truth.
    """

    tc_id: int
    expected: str
    classified: bool
    implementation_ok: bool | None
    message: str = ""
    resembles: tuple[str, ...] = ()


@dataclass(frozen=True)
class VectorCheck:
    """The result of :func:`check_vectors`; ``passed`` when the implementation and the checker are both right.

    ``upstream_skipped``: tests with an upstream gradient (``gradOutput``) whose inputs were not run
    because ``grad_fn`` does not take ``grad_output=`` (see :func:`gradcheck.checking.api.takes_grad_output`);
    the file's own labels were still checked.
    """

    function: str
    outcomes: tuple[VectorOutcome, ...]
    upstream_skipped: int = 0

    @property
    def passed(self) -> bool:
        """True when at least one implementation check ran and every test is right (nothing checked is no pass)."""
        return (any(o.implementation_ok is not None for o in self.outcomes)
                and all(o.classified and o.implementation_ok is not False for o in self.outcomes))

    @property
    def implementation_failures(self) -> tuple[VectorOutcome, ...]:
        return tuple(o for o in self.outcomes if o.implementation_ok is False)

    @property
    def misclassified(self) -> tuple[VectorOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.classified)


def _key(group_index: int, test: Vector) -> tuple:
    w = b"" if test.weight is None else test.weight.tobytes()
    g = b"" if test.grad_output is None else test.grad_output.tobytes()
    return group_index, test.logits.tobytes(), test.targets.tobytes(), w, g


def check_vectors(grad_fn: Callable[..., Any], suite: VectorSuite, *, dtypes: tuple[str, ...] | None = None,
                  targets: tuple[str, ...] | None = None, precision: str | None = None,
                  progress: Callable[[int], None] | None = None) -> VectorCheck:
    """Run ``grad_fn`` on the inputs of every test and check the vectors themselves.

    For each test the checker (verify's tolerance model, :func:`gradcheck.checking.judge.compare_values`)
    must accept its gradient when it is valid and reject it when invalid; ``grad_fn`` runs once
    per distinct input and must pass :func:`gradcheck.checking.judge.check` (shape, dtype, no mutation,
    determinism, within tolerance of the truth). A test with an upstream gradient passes it as
    ``grad_output=`` when ``grad_fn``'s signature names that parameter, as ``verify`` does; otherwise its
    inputs are not run (the expected gradient is the vector-Jacobian product) and counted in
    ``upstream_skipped``.

    Args:
        grad_fn: as for :func:`gradcheck.verify`.
        suite: e.g. from :func:`gradcheck.vectors.file.load_vectors`.
        dtypes, targets: run only the groups of these dtypes / target kinds (all when None).
        precision: the contract ``grad_fn`` is held to, as for :func:`gradcheck.verify` (default:
            float32 for the half dtypes, the dtype otherwise); the vectors' own labels are those of the
            widest model, so a valid vector passes every contract and an invalid one fails every one.
        progress: called with 1 after each test.

    Raises:
        InvalidArgument: the suite has no tests, or none of an asked dtype, target kind or pair of
            them: nothing would be checked, and that is not a pass.
    """
    from gradcheck.checking.api import takes_grad_output
    from gradcheck.checking.judge import check
    from gradcheck.checking.messages import _name
    from gradcheck.checking.result import Failure

    _require_coverage(suite, dtypes, targets)
    upstream = takes_grad_output(grad_fn)
    skipped = 0
    contract = {g.dtype: _contract(g.dtype, precision) for g in suite.groups if _selected(g, dtypes, targets)}
    outcomes = []
    seen: dict[tuple, Any] = {}
    for gi, group in enumerate(suite.groups):
        if not _selected(group, dtypes, targets):
            continue
        bugs_here = [t for t in group.tests if t.result == "invalid"]
        for test in group.tests:
            case = group.case(test)
            ok_vector = _accepted(test.grad, case) if test.result == "valid" else not _accepted(test.grad, case)
            message = "" if ok_vector else (
                f"tcId {test.tc_id}: the checker {'rejects' if test.result == 'valid' else 'accepts'} this "
                f"{test.result} gradient; the file does not match this gradcheck's tolerance model")
            key = _key(gi, test)
            impl_ok = None
            resembles: tuple[str, ...] = ()
            if test.grad_output is not None and not upstream:
                skipped += 1
            elif key not in seen:
                outcome = check(grad_fn, case, precision=contract[group.dtype])
                seen[key] = outcome
                impl_ok = not isinstance(outcome, Failure)
                if not impl_ok:
                    message = (message + "; " if message else "") + f"tcId {test.tc_id}: {outcome.message}"
                    resembles = _resembles(grad_fn, case, test, [b for b in bugs_here if _key(gi, b) == key])
            outcomes.append(VectorOutcome(test.tc_id, test.result, ok_vector, impl_ok, message, resembles))
            if progress:
                progress(1)
    return VectorCheck(_name(grad_fn), tuple(outcomes), skipped)


def _contract(dtype: str, precision: str | None) -> str:
    """The contract of a group's dtype: the asked one, or verify's default; narrower than the dtype refused."""
    from gradcheck.dtypes import float_format
    from gradcheck.options import VERIFY
    from gradcheck.tolerance import resolve_contract

    asked = None if precision is None else VERIFY["precision"].validate(precision)
    return resolve_contract(float_format(dtype), asked, where=f"the {dtype} tests",
                            fix="; restrict the check to the dtypes it applies to (dtypes=, --dtype)")


def _selected(group: Any, dtypes: tuple[str, ...] | None, targets: tuple[str, ...] | None) -> bool:
    return (not dtypes or group.dtype in dtypes) and (not targets or group.targets in targets)


def _require_coverage(suite: VectorSuite, dtypes: tuple[str, ...] | None, targets: tuple[str, ...] | None) -> None:
    """Refuse a check that would run no test for some asked dtype and target kind."""
    from gradcheck.errors import InvalidArgument

    if suite.number_of_tests == 0:
        raise InvalidArgument("the vectors file has no tests: nothing would be checked, which is not a pass.")
    held = sorted({(g.dtype, g.targets) for g in suite.groups if g.tests})
    for d in dtypes or (None,):
        for t in targets or (None,):
            if not any((d is None or d == hd) and (t is None or t == ht) for hd, ht in held):
                asked = " and ".join(x for x in (d and f"dtype {d}", t and f"targets {t}") if x)
                raise InvalidArgument(f"the vectors file has no test of {asked}: it holds "
                                      f"{', '.join(f'{hd}/{ht}' for hd, ht in held)}; nothing would be checked.")


def _resembles(grad_fn: Callable[..., Any], case: Any, valid: Vector, bugs: list[Vector]) -> tuple[str, ...]:
    """The modeled bugs whose gradient the implementation's output is closer to than to the truth."""
    from gradcheck.adapters import to_numpy

    options = case.options()
    if case.grad_output is not None:
        options["grad_output"] = case.grad_output
    try:
        got = to_numpy(grad_fn(case.logits.copy(), case.targets.copy(), **options)).astype(np.float64)
    except (Exception, SystemExit):  # noqa: BLE001 - the failure was already reported
        return ()
    if got.shape != valid.grad.shape:
        return ()

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        same_nan = np.isnan(a) & np.isnan(b)
        with np.errstate(invalid="ignore"):
            d = np.where(same_nan, 0.0, np.abs(a - b))
        return float(np.nan_to_num(d, nan=np.inf).max(initial=0.0))

    to_truth = distance(got, valid.grad.astype(np.float64))
    return tuple(b.bug for b in bugs if b.bug and distance(got, b.grad.astype(np.float64)) < to_truth)


def _accepted(grad: np.ndarray, case: Any) -> bool:
    """True when verify's tolerance model accepts ``grad`` as the gradient of ``case``."""
    from gradcheck.checking.judge import compare_values
    from gradcheck.checking.result import Failure

    return not isinstance(compare_values(grad, case), Failure)
