"""verify and assert_gradient: check any project's cross-entropy gradient against the truth.

Each example is a :class:`gradcheck.strategies.Case` drawn by Hypothesis. The ``grad_fn`` is called
twice on private copies; the result must have the logits' shape and dtype, be finite where the truth
is, leave the inputs untouched, repeat bit for bit, and lie within the per-element tolerance of
:mod:`gradcheck.tolerance` (docs/tolerance.md) of the truth. A value is reported wrong only when that
is certain: the float64 oracle's rigorous error bound is added to the tolerance, and elements within
that band get the benefit of the doubt (docs/tolerance.md, "Deciding a failure").

A failure is shrunk by Hypothesis (regime, shape, seed), then its values are simplified (rows and
classes dropped, numbers rounded) while it keeps failing the same way.
"""

from __future__ import annotations

import secrets
import sys
import types
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from gradcheck.adapters import to_numpy
from gradcheck.compare import ulp_distance
from gradcheck.dtypes import bit_pattern, float_format, is_supported_float, round_to_format
from gradcheck.errors import GradientMismatch, InvalidArgument
from gradcheck.exact import certified_grad
from gradcheck.oracle import row_parts
from gradcheck.options import GENERATE, VERIFY
from gradcheck.problem import Case
from gradcheck.strategies import cases
from gradcheck.tolerance import grad_tolerance, reference_grad

KINDS = ("exception", "type", "mutation", "shape", "dtype", "nondeterminism", "nonfinite", "mismatch")
SIMPLIFY_BUDGET = 400  # grad_fn checks spent on simplifying a failing case's values
PRINT_LIMIT = 64  # largest number of logits printed in a message
MIN_SHRUNK_RATIO = 2.0  # a simplified mismatch keeps at least min(its ratio, this) x the tolerance


@dataclass(frozen=True, eq=False)
class Failure:
    """What went wrong, on the smallest input found.

    Attributes:
        kind: one of ``KINDS``.
        message: one line saying what is wrong.
        case: the minimal failing input (``case.regime`` is the regime it came from).
        index: the worst element (mismatch, nonfinite, nondeterminism, mutation), else None.
        expected: the truth there, correctly rounded to the dtype (None when not a value failure).
        got: the value the ``grad_fn`` returned there.
        ulps: their distance in ULPs of the dtype.
        tolerance: the absolute tolerance of that element (docs/tolerance.md).
        ratio: the error as a multiple of the tolerance.
    """

    kind: str
    message: str
    case: Case
    index: tuple[int, ...] | None = None
    expected: float | None = None
    got: float | None = None
    ulps: float | None = None
    tolerance: float | None = None
    ratio: float | None = None


@dataclass(frozen=True, eq=False)
class Verification:
    """The result of :func:`verify`; it never raises on a wrong gradient.

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

    @property
    def reproduction(self) -> str:
        """One line that replays this verification."""
        args = "".join(f", {k}={v!r}" for k, v in self.arguments.items())
        return f"gradcheck.verify({self.function}{args}, seed={self.seed})"

    def __str__(self) -> str:
        head = (
            f"verify({self.function}, {self.dtype}): {'passed' if self.passed else 'FAILED'} after "
            f"{self.examples} examples in {self.elapsed:.2f} s; worst {self.worst_ulps:g} ULP, "
            f"{self.worst_ratio:.3g} x tolerance; seed {self.seed}"
        )
        return head if self.failure is None else f"{head}\n{describe(self)}"


class _Failed(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries the Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.kind, failure.message)
        self.failure = failure


def verify(grad_fn: Callable[..., Any], **options: Any) -> Verification:
    """Check ``grad_fn(logits, targets, **options)`` on Hypothesis-generated cases.

    Args:
        grad_fn: returns the gradient of ``torch.nn.functional.cross_entropy`` with respect to the
            logits (an array-like of the logits' shape and dtype: numpy, torch or jax). It receives
            numpy arrays of ``dtype`` and, as keywords, the options that differ from their defaults
            (``weight``, ``ignore_index``, ``label_smoothing``, ``reduction``).
        **options: the check options of :data:`gradcheck.options.VERIFY`, each with its one rule:

        dtype: "float64", "float32", "float16" or "bfloat16".
        targets: "index" (class indices, int64) or "probs" (probabilities of ``dtype``).
        reduction, label_smoothing: the options checked.
        weighted: pass class weights (``weight=``, an array of K values of ``dtype``).
        ignore_index: when set, passed to ``grad_fn`` and some rows take that target.
        max_examples: the number of examples Hypothesis generates.
        seed: the Hypothesis seed; a random one (recorded in the result) when None.
        max_shape: the largest ``(N, K)`` generated (default ``(64, 4096)``; "many_classes" reaches
            K = 32831 when ``max_shape`` allows it).
        regimes: the logits regimes drawn from (see :mod:`gradcheck.strategies`).

    Returns:
        A :class:`Verification`; it never raises because the gradient is wrong.

    Raises:
        InvalidArgument: a bad argument (named in the message).
    """
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}.")
    o = VERIFY.validate(options, where="verify()")
    arguments = {k: v for k, v in VERIFY.non_defaults(o).items() if k != "seed"}  # the seed is printed apart
    seed = secrets.randbits(32) if o["seed"] is None else o["seed"]
    strategy = cases(**GENERATE.non_defaults(o))
    max_examples = o["max_examples"]
    start = time.perf_counter()
    stats = {"examples": 0, "ulps": 0.0, "ratio": 0.0, "failed": False}
    failure = _search(grad_fn, strategy, seed, max_examples, stats)
    if failure is not None:
        failure = _finalize(grad_fn, simplify(grad_fn, failure))
    return Verification(
        passed=failure is None, examples=stats["examples"], worst_ulps=stats["ulps"], worst_ratio=stats["ratio"],
        seed=seed, dtype=o["dtype"], function=_name(grad_fn), arguments=arguments, failure=failure,
        elapsed=time.perf_counter() - start,
    )


def assert_gradient(grad_fn: Callable[..., Any], **kwargs: Any) -> None:
    """Like :func:`verify`, but raise on a failure.

    Raises:
        GradientMismatch: naming the worst element, expected and got, the error in ULPs and the
            tolerance, the minimal failing logits and targets, the seed and how to reproduce.
        InvalidArgument: a bad argument.
    """
    result = verify(grad_fn, **kwargs)
    if not result.passed:
        raise GradientMismatch(describe(result))


def _search(grad_fn: Callable[..., Any], strategy: Any, seed: int, max_examples: int, stats: dict) -> Failure | None:
    """Run Hypothesis; return the shrunk failure or None."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Flaky

    seen: list[Failure] = []

    def test(case: Case) -> None:
        outcome = check(grad_fn, case)
        if not stats["failed"]:
            stats["examples"] += 1
            if isinstance(outcome, Failure):
                stats["failed"] = True
            else:
                stats["ulps"] = max(stats["ulps"], outcome[0])
                stats["ratio"] = max(stats["ratio"], outcome[1])
        if isinstance(outcome, Failure):
            seen.append(outcome)
            raise _Failed(outcome)

    run = hypothesis_seed(seed)(settings(
        max_examples=max_examples, database=None, deadline=None, derandomize=False, print_blob=False,
        report_multiple_bugs=False, verbosity=Verbosity.quiet, phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(test)))
    try:
        run()
    except _Failed as exc:
        return exc.failure
    except Flaky:  # failed once, passed when Hypothesis replayed the same input
        case = seen[0].case if seen else None
        return Failure("nondeterminism", "grad_fn failed on an input, then passed on the same input", case)
    return None


def check(grad_fn: Callable[..., Any], case: Case) -> Failure | tuple[float, float]:
    """Check one case: a :class:`Failure`, or (worst ULPs, worst error / tolerance)."""
    first = _call(grad_fn, case)
    if isinstance(first, Failure):
        return first
    second = _call(grad_fn, case)
    if isinstance(second, Failure):
        return second
    fmt = float_format(case.logits.dtype)
    a_bits, b_bits = first.view(fmt.int_dtype), second.view(fmt.int_dtype)
    if not np.array_equal(a_bits, b_bits):
        where = tuple(int(i) for i in np.argwhere(a_bits != b_bits)[0])
        return Failure(
            "nondeterminism", f"grad_fn returned different values for the same input at {where}: "
            f"{float(first[where])!r}, then {float(second[where])!r}", case, where,
            got=float(first[where]),
        )
    return compare_values(first, case)


def compare_values(got: np.ndarray, case: Case) -> Failure | tuple[float, float]:
    """Compare a result of the right shape and dtype with the truth (docs/tolerance.md).

    An element is wrong when ``|got - reference| > tolerance + bound``: then ``|got - truth|`` exceeds
    the tolerance for certain. The band below (at most ``bound`` wide, about 1e-3 of the tolerance)
    gets the benefit of the doubt.
    """
    problem = case.problem
    fmt = problem.format
    parts = row_parts(problem.logits)
    ref, bound = reference_grad(problem, parts)
    g64 = ref.astype(np.float64)
    tol = grad_tolerance(problem, parts, g64)
    bad = ~np.isfinite(got.astype(np.float64))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return Failure(
            "nonfinite", f"grad_fn returned {float(got[where])!r} at {where} where the truth is finite "
            f"({g64[where]!r})", case, where, expected=float(g64[where]), got=float(got[where]),
        )
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got.astype(ref.dtype) - ref).astype(np.float64)
        ratio = np.where(err == 0, 0.0, err / tol)
    ulps = ulp_distance(got, round_to_format(g64, fmt))
    wrong = err > tol + bound
    if wrong.any():
        flat = np.where(wrong, ratio, -1.0)
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), flat.shape))
        return Failure(
            "mismatch", f"gradient differs from the truth by {ratio[where]:.3g} x the tolerance at {where}",
            case, where, expected=float(g64[where]), got=float(got[where]), ulps=float(ulps[where]),
            tolerance=float(tol[where]), ratio=float(ratio[where]),
        )
    return float(ulps.max(initial=0.0)), float(ratio.max(initial=0.0))


def _call(grad_fn: Callable[..., Any], case: Case) -> Failure | np.ndarray:
    """Call grad_fn on private copies; check it raised nothing, mutated nothing, and the shape and dtype."""
    logits, targets = case.logits.copy(), case.targets.copy()
    options = case.options()
    weight = options.get("weight")
    weight_before = None if weight is None else weight.copy()
    try:
        result = grad_fn(logits, targets, **options)
    except Exception as exc:  # noqa: BLE001 - any exception is the finding
        return Failure("exception", f"grad_fn raised {type(exc).__name__}: {exc}", case)
    for name, now, before in (("logits", logits, case.logits), ("targets", targets, case.targets),
                              ("weight", weight, weight_before)):
        if now is not None and not _same_bits(now, before):
            where = tuple(int(i) for i in np.argwhere(_bits(now) != _bits(before))[0])
            return Failure(
                "mutation", f"grad_fn modified its {name} argument in place: {name}{list(where)} was "
                f"{before[where]!r}, became {now[where]!r}", case, where,
            )
    try:
        got = to_numpy(result)
    except Exception as exc:  # noqa: BLE001
        return Failure("type", f"grad_fn returned {type(result).__name__}, not an array ({exc})", case)
    fmt = float_format(case.logits.dtype)
    if got.shape != case.logits.shape:
        return Failure(
            "shape", f"grad_fn returned shape {got.shape} for logits of shape {case.logits.shape}", case,
        )
    if got.dtype != fmt.dtype:
        if not hasattr(result, "dtype"):  # a list or tuple: values must be exact in the dtype
            got = got.astype(fmt.dtype)
        else:
            return Failure(
                "dtype", f"grad_fn returned dtype {got.dtype} for logits of dtype {fmt.name}", case,
            )
    return np.ascontiguousarray(got)


def _bits(x: np.ndarray) -> np.ndarray:
    """Bit patterns of a float array (so that NaN equals NaN and -0 differs from 0); ints unchanged."""
    return bit_pattern(x) if is_supported_float(x.dtype) else np.asarray(x)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))


def simplify(grad_fn: Callable[..., Any], failure: Failure) -> Failure:
    """Drop rows and classes and round values while the case fails the same way (a bounded budget)."""
    budget = [SIMPLIFY_BUDGET]
    # a simpler mismatch must stay clearly wrong, not creep to the tolerance's edge
    keep_ratio = min(failure.ratio or 0.0, MIN_SHRUNK_RATIO)

    def attempt(candidate: Case) -> Failure | None:
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        outcome = check(grad_fn, candidate)
        if isinstance(outcome, Failure) and outcome.kind == failure.kind and (outcome.ratio or 0.0) >= keep_ratio:
            return outcome
        return None

    current = failure
    for axis in (0, 1):
        current = _drop_chunks(current, axis, attempt)
    current = _round_values(current, attempt)
    return current


def _drop_chunks(failure: Failure, axis: int, attempt: Callable[[Case], Failure | None]) -> Failure:
    case = failure.case
    size = case.logits.shape[axis]
    chunk = size // 2
    while chunk >= 1 and size > 1:
        if -(-size // chunk) > 32:  # too many pieces to try: stop at this granularity
            break
        start = 0
        while start < case.logits.shape[axis] and case.logits.shape[axis] > 1:
            keep = np.ones(case.logits.shape[axis], dtype=bool)
            keep[start:start + chunk] = False
            candidate = _subset(case, keep, axis)
            found = attempt(candidate) if candidate is not None and keep.any() else None
            if found is not None:
                failure, case = found, found.case
            else:
                start += chunk
        size = case.logits.shape[axis]
        chunk //= 2
    return failure


def _variant(case: Case, **changes: Any) -> Case | None:
    """The case with some values changed, or None when that is not a valid case."""
    try:
        return case.replace(**changes)
    except InvalidArgument:
        return None


def _subset(case: Case, keep: np.ndarray, axis: int) -> Case | None:
    if axis == 0:
        return _variant(case, logits=case.logits[keep], targets=case.targets[keep])
    if case.targets.ndim == 1:
        if 0 <= case.ignore_index < case.logits.shape[1]:
            return None  # shifting class numbers would change which rows are ignored
        active = case.targets != case.ignore_index
        if not np.all(keep[case.targets[active]]):
            return None
        shift = np.cumsum(~keep)
        targets = case.targets.copy()
        targets[active] -= shift[case.targets[active]]
    else:
        targets = case.targets[:, keep]
    weight = None if case.weight is None else case.weight[keep]
    return _variant(case, logits=case.logits[:, keep], targets=targets, weight=weight)


def _round_values(failure: Failure, attempt: Callable[[Case], Failure | None]) -> Failure:
    """Replace each logit (then soft target, then weight) by a simpler number when it still fails."""
    for field_name in ("logits", "targets", "weight"):
        array = getattr(failure.case, field_name)
        if array is None or not is_supported_float(array.dtype) or array.size > PRINT_LIMIT:
            continue
        fmt = float_format(array.dtype)
        for flat in range(array.size):
            current = getattr(failure.case, field_name)
            value = float(current.reshape(-1)[flat].astype(np.float64))
            for simple in _simpler(value):
                trial = current.copy()
                trial.reshape(-1)[flat] = round_to_format(np.array(simple), fmt)
                if _same_bits(trial, current):
                    continue
                candidate = _variant(failure.case, **{field_name: trial})
                found = None if candidate is None else attempt(candidate)
                if found is not None:
                    failure = found
                    break
    return failure


def _simpler(x: float) -> list[float]:
    if x == 0:
        return []
    if not np.isfinite(x):
        return [0.0]
    out = [0.0, 1.0 if x > 0 else -1.0]
    for digits in (1, 2, 3):
        out.append(float(f"{x:.{digits}g}"))
    return [v for v in out if v != x]


def _finalize(grad_fn: Callable[..., Any], failure: Failure) -> Failure:
    """Report the expected value of the worst element correctly rounded to the dtype."""
    if failure.kind not in ("mismatch", "nonfinite") or failure.index is None:
        return failure
    problem = failure.case.problem
    fmt = problem.format
    if fmt.name == "float64" and problem.logits.size > 4096:
        return failure  # the float64 oracle value (within its bound) is reported
    expected = float(certified_grad(problem, fmt)[failure.index])
    ulps = float(ulp_distance(np.array(failure.got, dtype=fmt.dtype), np.array(expected, dtype=fmt.dtype)))
    return Failure(
        failure.kind, failure.message, failure.case, failure.index, expected, failure.got, ulps,
        failure.tolerance, failure.ratio,
    )


def describe(result: Verification) -> str:
    """The full failure message: what is wrong, where, the minimal input, the seed, how to reproduce."""
    f = result.failure
    if f is None:
        return str(result)
    case = f.case
    fmt = float_format(case.logits.dtype)
    lines = [f"{result.function} is wrong ({f.kind}): {f.message}."]
    if f.kind == "mismatch":
        tol_ulps = f.tolerance / float(fmt.ulp(f.expected))
        lines.append(
            f"  worst element {f.index}: expected {f.expected!r} (the truth rounded to {fmt.name}), got "
            f"{f.got!r}; error {f.ulps:g} ULP = {f.ratio:.3g} x the tolerance {f.tolerance:.3g} "
            f"({tol_ulps:.3g} ULP, docs/tolerance.md)"
        )
    lines += [
        f"  minimal failing input (regime {case.regime!r}, {fmt.name}, found after {result.examples} examples):",
        f"    logits = {format_array(case.logits)}",
        f"    targets = {format_array(case.targets)}",
        f"    options = {format_options(case.options())}",
        f"  seed {result.seed}; reproduce with:",
        f"    {result.reproduction}",
        f"    or call {result.function}(logits, targets, **options) with the arrays above",
    ]
    return "\n".join(lines)


def format_array(x: np.ndarray) -> str:
    """Python source for an array (exact: float64 repr of every value), or a summary when large."""
    if not is_supported_float(x.dtype):
        body = repr(x.tolist()) if x.size <= 4 * PRINT_LIMIT else f"<{x.shape} int array>"
        return f"np.array({body})"
    fmt = float_format(x.dtype)
    dtype = "ml_dtypes.bfloat16" if fmt.name == "bfloat16" else f"np.{fmt.name}"
    if x.size > PRINT_LIMIT:
        x64 = x.astype(np.float64)
        return f"<array of shape {x.shape}, {fmt.name}, min {np.min(x64):.6g}, max {np.max(x64):.6g}>"

    def render(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(render(e) for e in v) + "]"
        return {float("inf"): "np.inf", float("-inf"): "-np.inf"}.get(v, repr(v))

    return f"np.array({render(x.astype(np.float64).tolist())}, dtype={dtype})"


def format_options(options: dict[str, Any]) -> str:
    parts = [f"{k!r}: {format_array(v) if isinstance(v, np.ndarray) else repr(v)}" for k, v in options.items()]
    return "{" + ", ".join(parts) + "}"


def _name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{module}.{name}" if module and module not in ("__main__", "builtins") else str(name)


class _CallableModule(types.ModuleType):
    """``gradcheck.verify`` names both this module and the function.

    Importing the submodule (``from gradcheck.verify import ...``) rebinds the package attribute
    ``gradcheck.verify`` to the module, whatever the package's lazy ``__getattr__`` did before; making
    the module callable keeps ``gradcheck.verify(grad_fn, ...)`` working in every import order.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Verification:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
