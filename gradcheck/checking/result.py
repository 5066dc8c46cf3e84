"""The results of checking a gradient: the kinds of failure, a Failure, and a Verification."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradcheck.problem import Case


class FailureKind(StrEnum):
    """What is wrong with a ``grad_fn``, in the order one case is checked for it (the first found is reported).

    The values are plain strings: ``kind == "mismatch"`` holds, and JSON and messages show the value.

    Attributes:
        EXCEPTION: ``grad_fn`` raised (``SystemExit`` too: ``sys.exit()`` in a ``grad_fn`` is a failure, never
            a pass; ``KeyboardInterrupt`` propagates).
        TIMEOUT: a call did not return within ``timeout`` seconds (the case is the one that hung, not shrunk).
        MUTATION: it modified an argument (logits, targets, weight or grad_output) in place.
        TYPE: its result is not an array.
        SHAPE: the result does not have the logits' shape.
        DTYPE: the result does not have the logits' dtype (a list or tuple: a value not exact in it).
        ALIASING: the result shares memory with an argument, or with the result of the previous call (a
            reused output buffer): a failure even when the values are right, since the next call
            overwrites a gradient the caller still holds.
        NONDETERMINISM: two calls on the same input returned different bits (or a failure did not replay).
        NONFINITE: a value is not finite where the truth is.
        MISMATCH: a value is farther from the truth than its tolerance, for certain.
    """

    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    MUTATION = "mutation"
    TYPE = "type"
    SHAPE = "shape"
    DTYPE = "dtype"
    ALIASING = "aliasing"
    NONDETERMINISM = "nondeterminism"
    NONFINITE = "nonfinite"
    MISMATCH = "mismatch"


@dataclass(frozen=True, eq=False)
class Failure:
    """What went wrong, on the smallest input found.

    Attributes:
        kind: see :class:`FailureKind`.
        message: one line saying what is wrong.
        case: the minimal failing input (``case.regime`` is the regime it came from).
        index: the worst element (mismatch, nonfinite, nondeterminism, mutation), else None.
        expected: the truth there, correctly rounded to the dtype (None when not a value failure).
        got: the value the ``grad_fn`` returned there.
        ulps: their distance in ULPs of the dtype.
        tolerance: the absolute tolerance of that element (docs/tolerance.md).
        ratio: the error as a multiple of the tolerance.
        diagnosis: for a mismatch, the convention the result matches instead, when one does (for
            example "grad_output ignored"); see :mod:`gradcheck.checking.diagnose`. None otherwise.
    """

    kind: FailureKind
    message: str
    case: Case
    index: tuple[int, ...] | None = None
    expected: float | None = None
    got: float | None = None
    ulps: float | None = None
    tolerance: float | None = None
    ratio: float | None = None
    diagnosis: str | None = None


@dataclass(frozen=True, eq=False)
class Verification:
    """The result of :func:`gradcheck.verify`; it never raises on a wrong gradient.

    Attributes:
        passed: no example failed.
        examples: the number of examples run (up to and including the first failure).
        worst_ulps: the largest error seen, in ULPs of the dtype, against the correctly rounded truth.
        worst_ratio: the largest error seen as a multiple of its tolerance (<= 1 when passed).
        seed: the Hypothesis seed; the same seed replays the same examples.
        dtype: the checked dtype.
        function: the ``grad_fn``'s name.
        arguments: the non-default arguments of the verify call (for the reproduction).
        failure: the shrunk counterexample when it failed, else None.
        elapsed: seconds spent.
        precision: the contract checked (docs/tolerance.md, "Precision contracts").
        grade: the tightest contract the function met on every example run ("exact", "float64",
            "float32" or the dtype), None when an example failed before its values were compared
            or met none.
        contract_ratios: per contract of the dtype, tightest first, the worst error seen as a
            multiple of that contract's tolerance.
        upstream: the upstream gradient was exercised: ``grad_fn`` names a ``grad_output``
            parameter, so every example passed one and the result was checked as the VJP
            ``grad_output * dL/dz``. False: only the gradient of the loss itself was checked
            (``grad_output`` all ones), so a mishandled upstream gradient cannot have been found.
    """

    passed: bool
    examples: int
    worst_ulps: float
    worst_ratio: float
    seed: int
    dtype: str
    function: str
    arguments: dict[str, Any] = field(default_factory=dict)
    failure: Failure | None = None
    elapsed: float = 0.0
    precision: str = ""
    grade: str | None = None
    contract_ratios: dict[str, float] = field(default_factory=dict)
    upstream: bool = False

    @property
    def upstream_text(self) -> str:
        """One phrase saying whether the upstream gradient was exercised."""
        if self.upstream:
            return "upstream gradient exercised (grad_output= on every example)"
        return ("upstream gradient NOT exercised (grad_fn takes no grad_output= parameter; only the loss's own "
                "gradient was checked)")

    @property
    def reproduction(self) -> str:
        """One line that replays this verification."""
        args = "".join(f", {k}={v!r}" for k, v in self.arguments.items())
        return f"gradcheck.verify({self.function}{args}, seed={self.seed})"

    def __str__(self) -> str:
        from gradcheck.checking.messages import describe  # messages renders this class: import it late

        head = (
            f"verify({self.function}, {self.dtype}): {'passed' if self.passed else 'FAILED'} after "
            f"{self.examples} examples in {self.elapsed:.2f} s; worst {self.worst_ratio:.3g} x tolerance "
            f"({self.precision} contract; {self.worst_ulps:g} ULP); grade {self.grade or 'none'}; seed {self.seed}; "
            f"{self.upstream_text}"
        )
        return head if self.failure is None else f"{head}\n{describe(self)}"
