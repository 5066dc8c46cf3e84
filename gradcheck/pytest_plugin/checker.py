"""What the ``gradcheck`` fixture yields: a GradientChecker, and the session record of each check it runs.

Standard library only at import: :func:`gradcheck.verify` (and with it numpy, mpmath, ml_dtypes and
Hypothesis) is imported by the first check.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from gradcheck.errors import GradientMismatch
from gradcheck.pytest_plugin import session_report


@dataclass
class Settings:
    """The session's gradcheck settings, shared by every test (and every xdist worker)."""

    seed: int
    dtypes: tuple[str, ...]
    defaults: dict[str, Any]  # check options set for the session (--gradcheck-<option>, ini gradcheck_<option>)
    report: str | None
    records: list[dict] = field(default_factory=list)
    device: str | None = None
    # --gradcheck-progress: writes one line to the terminal (past pytest's capture); None: quiet
    progress: Callable[[str], None] | None = None


PROGRESS_AFTER = 2.0  # seconds: a check that ends sooner writes no progress line
PROGRESS_EVERY = 2.0  # seconds between two lines of the same check


def progress_lines(write: Callable[[str], None], nodeid: str, what: str,
                   clock: Callable[[], float] = time.monotonic) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for verify that writes ``nodeid: what done/total examples, t s``
    once the check has run :data:`PROGRESS_AFTER` seconds, then every :data:`PROGRESS_EVERY` seconds."""
    started = clock()
    last = [started - PROGRESS_EVERY]

    def progress(done: int, total: int) -> None:
        now = clock()
        if now - started >= PROGRESS_AFTER and now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            write(f"gradcheck: {nodeid}: {what} {done}/{total} examples, {now - started:.1f} s")

    return progress


def check_seed(session_seed: int, nodeid: str, call: int) -> int:
    """The seed of a test's ``call``-th check: fixed by the session seed and the test id."""
    digest = hashlib.blake2b(f"{session_seed}\0{nodeid}\0{call}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def _checking() -> ModuleType:
    """:mod:`gradcheck.checking.api` (``verify``, ``describe``), imported on the first check."""
    return importlib.import_module("gradcheck.checking.api")


def _linear() -> ModuleType:
    """:mod:`gradcheck.checking.linear` (``verify_linear``, ``describe_linear``), imported on the first linear check."""
    return importlib.import_module("gradcheck.checking.linear")


# the defaults a linear check takes from the session and the marker: the options verify and verify_linear
# share (max_shape is (N, K) for verify and (N, V, D) for verify_linear); precision is shared: verify_linear has
# verify's contracts (docs/linear.md, "Precision contracts"; linprec glue)
_NOT_LINEAR = ("max_shape", "regimes")


class GradientChecker:
    """What the ``gradcheck`` fixture yields: ``verify`` and ``assert_gradient`` with this test's defaults,
    and ``verify_linear`` and ``assert_linear_gradient`` for the fused linear family (issue 13).

    Attributes:
        dtype: the dtype this test item checks (its id, e.g. ``test_grad[float32]``).
        seed: the session seed (each check's own seed is derived from it and the test id).
        defaults: the keyword defaults of every check in this test (from the options, ini and marker).
        results: the :class:`gradcheck.Verification` of each check run so far in this test.
        device: ``--gradcheck-device`` (or ini ``gradcheck_device``), None when not set: pass it to
            the adapters, e.g. ``torch_loss_grad(device=gradcheck.device)``.
    """

    def __init__(self, nodeid: str, settings: Settings, dtype: str, defaults: dict[str, Any]) -> None:
        self.dtype = dtype
        self.seed = settings.seed
        self.device = settings.device  # --gradcheck-device: for the torch and jax adapters' device=
        self.defaults = {"dtype": dtype, **defaults}
        self.results: list[Any] = []
        self._nodeid = nodeid
        self._settings = settings

    def verify(self, grad_fn: Callable[..., Any], /, **options: Any) -> Any:
        """:func:`gradcheck.verify` with this test's defaults; the result is recorded for the report.

        Returns:
            A :class:`gradcheck.Verification`; it never raises because the gradient is wrong.

        Raises:
            InvalidArgument: a bad argument.
        """
        __tracebackhide__ = True
        options = {**self.defaults, **options}
        call = len(self.results)
        options.setdefault("seed", check_seed(self._settings.seed, self._nodeid, call))
        self._progress(options, "verify")
        result = _checking().verify(grad_fn, **options)
        self.results.append(result)
        self._settings.records.append(_record(self._nodeid, call, result, options))
        return result

    def assert_gradient(self, grad_fn: Callable[..., Any], /, **options: Any) -> None:
        """:func:`gradcheck.assert_gradient` with this test's defaults.

        Raises:
            GradientMismatch: the gradient is wrong; the message is the full account (worst element,
                expected and got, ULPs, tolerance, minimal input, seed, reproduction).
            InvalidArgument: a bad argument.
        """
        __tracebackhide__ = True
        result = self.verify(grad_fn, **options)
        if not result.passed:
            raise GradientMismatch(_checking().describe(result))

    def verify_linear(self, grad_fn: Callable[..., Any], /, **options: Any) -> Any:
        """:func:`gradcheck.checking.linear.verify_linear` with this test's defaults; recorded for the report.

        The defaults it takes are this item's dtype and the session's and marker's options that
        verify_linear shares with verify, ``precision`` included (not ``max_shape`` or ``regimes``: pass a linear
        ``max_shape=(N, V, D)`` here).

        Returns:
            A :class:`gradcheck.checking.linear.LinearVerification`; it never raises because a gradient is wrong.

        Raises:
            InvalidArgument: a bad argument.
        """
        __tracebackhide__ = True
        linear = _linear()
        defaults = {k: v for k, v in self.defaults.items() if k in linear.LINEAR_VERIFY and k not in _NOT_LINEAR}
        options = {**defaults, **options}
        call = len(self.results)
        options.setdefault("seed", check_seed(self._settings.seed, self._nodeid, call))
        self._progress(options, "verify_linear")
        result = linear.verify_linear(grad_fn, **options)
        self.results.append(result)
        self._settings.records.append(_record(self._nodeid, call, result, options, describe=linear.describe_linear))
        return result

    def assert_linear_gradient(self, grad_fn: Callable[..., Any], /, **options: Any) -> None:
        """:func:`gradcheck.checking.linear.assert_linear_gradient` with this test's defaults.

        Raises:
            GradientMismatch: a gradient is wrong; the message names which (d_hidden, d_weight, d_bias) and
                the element, expected and got, the minimal h, W, b and targets, the seed and the reproduction.
            InvalidArgument: a bad argument.
        """
        __tracebackhide__ = True
        result = self.verify_linear(grad_fn, **options)
        if not result.passed:
            raise GradientMismatch(_linear().describe_linear(result))

    def _progress(self, options: dict[str, Any], what: str) -> None:
        """With --gradcheck-progress, a progress callback (unless the test passes its own progress=)."""
        if self._settings.progress is not None:
            options.setdefault("progress", progress_lines(self._settings.progress, self._nodeid, what))

    def __repr__(self) -> str:
        return f"<gradcheck fixture: dtype {self.dtype}, session seed {self.seed}, checks run {len(self.results)}>"


def _record(nodeid: str, call: int, result: Any, options: dict[str, Any],
            describe: Callable[[Any], str] | None = None) -> dict:
    """The session report's record of one check (see :mod:`gradcheck.pytest_plugin.session_report`);
    ``describe`` writes the failure message (default :func:`gradcheck.checking.messages.describe`)."""
    failure = result.failure
    worst_ulps, worst_ratio = result.worst_ulps, result.worst_ratio
    if failure is not None:  # the failing element is the worst seen (worst_* cover the passing examples)
        worst_ulps = max(worst_ulps, getattr(failure, "ulps", None) or 0.0)
        worst_ratio = max(worst_ratio, getattr(failure, "ratio", None) or 0.0)
    arguments = dict(result.arguments)
    for name in ("dtype", "max_examples", "seed"):
        arguments.pop(name, None)
    return session_report.jsonable({
        "test": nodeid,
        "call": call,
        "function": result.function,
        "dtype": result.dtype,
        "options": arguments,
        "max_examples": options.get("max_examples", 100),
        "examples": result.examples,
        "worst_ulps": worst_ulps,
        "worst_ratio": worst_ratio,
        "precision": result.precision,
        "grade": result.grade,
        "contract_ratios": dict(result.contract_ratios),
        "seed": result.seed,
        "verdict": "passed" if result.passed else "failed",
        "failure": None if failure is None else {
            "kind": getattr(failure, "kind", None),
            "message": (describe or _checking().describe)(result),
            "ulps": getattr(failure, "ulps", None),
            "ratio": getattr(failure, "ratio", None),
        },
        "reproduction": result.reproduction,
        "elapsed": round(result.elapsed, 4),
    })
