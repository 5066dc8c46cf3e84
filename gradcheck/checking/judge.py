"""Judging one case: call ``grad_fn`` on private copies and compare its result with the truth.

The call gets the case's arrays and options, and its upstream gradient as ``grad_output=`` when the
case has one (verify draws one for a ``grad_fn`` that takes it). It must return (within ``timeout``,
when set) without raising, ``SystemExit`` included. The
result must have the logits' shape and dtype (a list or tuple: values exact in the dtype), be a new
buffer on each call (not a view of an input or of the previous result), leave the inputs untouched,
repeat bit for bit, be finite where the truth is, and lie within the per-element tolerance of
:mod:`gradcheck.tolerance` (docs/tolerance.md) of the truth. A value is reported wrong only when that is certain: the float64
oracle's rigorous error bound is added to the tolerance, and elements within that band get the
benefit of the doubt (docs/tolerance.md, "Deciding a failure").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gradcheck.adapters import to_numpy
from gradcheck.checking.deadline import Hung, call_with_deadline
from gradcheck.checking.result import Failure, FailureKind
from gradcheck.ulps import ulp_distance
from gradcheck.dtypes import bit_pattern, is_supported_float, round_to_format
from gradcheck.errors import InvalidArgument
from gradcheck.exact import certified_grad
from gradcheck.oracle import row_parts
from gradcheck.reference import reference_grad
from gradcheck.tolerance import contracts, tolerances

if TYPE_CHECKING:
    from gradcheck.problem import Case, Problem


def check(grad_fn: Callable[..., Any], case: Case, *, timeout: float | None = None, precision: str | None = None,
          grades: dict[str, tuple[float, bool]] | None = None, inplace: str = "flag") -> Failure | tuple[float, float]:
    """Check one case: a :class:`Failure`, or (worst ULPs, worst error / tolerance).

    Each result is copied before ``grad_fn`` is called again, so a reused output buffer cannot hide
    the first result; a buffer returned twice is itself a failure (``aliasing``). ``timeout``: seconds
    per call (None: no limit; see :mod:`gradcheck.checking.deadline`). ``inplace="allowed"``: the
    ``grad_fn`` may write into its (private copy of the) logits and return that buffer.
    """
    first = _call(grad_fn, case, timeout, inplace)
    if isinstance(first, Failure):
        return first
    first_buffer, first = first
    second = _call(grad_fn, case, timeout, inplace)
    if isinstance(second, Failure):
        return second
    second_buffer, second = second
    if np.may_share_memory(first_buffer, second_buffer):
        return Failure(
            FailureKind.ALIASING, "grad_fn returned the same buffer on two calls (the second call overwrote the "
            "first result); return a new array from each call", case,
        )
    del first_buffer, second_buffer
    fmt = case.format
    a_bits, b_bits = first.view(fmt.int_dtype), second.view(fmt.int_dtype)
    if not np.array_equal(a_bits, b_bits):
        where = tuple(int(i) for i in np.argwhere(a_bits != b_bits)[0])
        return Failure(
            FailureKind.NONDETERMINISM, f"grad_fn returned different values for the same input at {where}: "
            f"{float(first[where])!r}, then {float(second[where])!r}", case, where,
            got=float(first[where]),
        )
    return compare_values(first, case, precision=precision, grades=grades)


def compare_values(got: np.ndarray, case: Case, *, precision: str | None = None,
                   grades: dict[str, tuple[float, bool]] | None = None) -> Failure | tuple[float, float]:
    """Compare a result of the right shape and dtype with the truth (docs/tolerance.md).

    An element is wrong when ``|got - reference| > tolerance + bound``: then ``|got - truth|`` exceeds
    the tolerance for certain. The band below (at most ``bound`` wide, about 1e-3 of the tolerance)
    gets the benefit of the doubt.

    Args:
        got: the result, of the logits' shape and dtype.
        case: the checked case.
        precision: the contract deciding the verdict (default: the dtype's own, the widest).
        grades: when given, filled with ``contract -> (worst ratio, met)`` for every contract of the
            dtype (:func:`gradcheck.tolerance.contracts`), also when the verdict is a mismatch.

    Returns:
        A :class:`Failure`, or (worst ULPs, worst ratio to the asked contract's tolerance).
    """
    problem = case.problem
    fmt = problem.format
    asked = fmt.name if precision is None else precision
    # the truth is the problem's (N, K) rows; indices in messages are the caller's (scale: layouts)
    layout = problem.caller_layout
    got = layout.rows(got) if problem.layout is not None else got
    parts = row_parts(problem.logits)
    ref, bound = reference_grad(problem, parts)
    g64 = ref.astype(np.float64)
    bad = ~np.isfinite(got.astype(np.float64))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return Failure(
            FailureKind.NONFINITE, f"grad_fn returned {float(got[where])!r} at {layout.index(where)} where the truth "
            f"is finite ({g64[where]!r})", case, layout.index(where), expected=float(g64[where]), got=float(got[where]),
        )
    wanted = contracts(fmt) if grades is not None else (asked,)
    tols, vacuous = _tolerances(problem, parts, g64, bound, wanted, asked)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # "exact" of a zero truth: tolerance 0
        err = np.abs(got.astype(ref.dtype) - ref).astype(np.float64)
        ratios = {c: np.where(err == 0, 0.0, err / t) for c, t in tols.items()}  # inf where only 0 passes
    ok = {c: err <= t + bound for c, t in tols.items()}
    if "exact" in tols:
        ok["exact"], certified = _exact_ok(got, problem, err, tols["exact"], bound)
        ratios["exact"] = np.where(certified, 0.0, ratios["exact"])  # the certified truth itself: no error
    if grades is not None:
        for c in tols:
            grades[c] = (float(ratios[c].max(initial=0.0)), bool(np.all(ok[c])))
        for c in vacuous:  # no error model for this case: the contract cannot be certified, so it is not met
            grades[c] = (math.inf, False)
    tol, ratio = tols[asked], ratios[asked]
    ulps = ulp_distance(got, round_to_format(g64, fmt))
    wrong = ~ok[asked]
    if wrong.any():
        flat = np.where(wrong, ratio, -1.0)
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), flat.shape))
        return Failure(
            FailureKind.MISMATCH, f"gradient differs from the truth by {ratio[where]:.3g} x the tolerance at "
            f"{layout.index(where)}", case, layout.index(where), expected=float(g64[where]), got=float(got[where]),
            ulps=float(ulps[where]),
            tolerance=float(tol[where]), ratio=float(ratio[where]),
        )
    return float(ulps.max(initial=0.0)), float(ratio.max(initial=0.0))


def _tolerances(problem: Problem, parts: Any, grad: np.ndarray, band: np.ndarray, wanted: tuple[str, ...],
                asked: str) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The tolerance under each wanted contract, and the contracts whose error model is vacuous here.

    An implementation class's forward error bound is vacuous when its relative error in the row sum
    reaches 1 (:func:`gradcheck.tolerance.element_bound` raises ArithmeticError; for instance bfloat16
    arithmetic under softcap=30, where the perturbation of z' = c tanh(z / c) alone is about 0.7). A
    contract other than the asked one is then only reported as not met; the asked one cannot be
    checked at all.

    Raises:
        InvalidArgument: the asked contract has no error model on this case, naming it and the fix.
    """
    try:
        return tolerances(problem, parts, grad, band, wanted), ()
    except ArithmeticError:
        pass
    tols: dict[str, np.ndarray] = {}
    vacuous = []
    for contract in wanted:
        try:
            tols.update(tolerances(problem, parts, grad, band, (contract,)))
        except ArithmeticError as exc:
            if contract == asked:
                wider = [c for c in contracts(problem.format) if c != contract]
                raise InvalidArgument(
                    f"precision={contract!r} cannot be checked on this case ({problem.k} classes, "
                    f"softcap={problem.softcap!r}, lse_square_scale={problem.lse_square_scale!r}): {exc}, so "
                    f"a correct {contract} implementation could return anything; check a wider contract "
                    f"(precision={wider[-1]!r})."
                ) from None
            vacuous.append(contract)
    return tols, tuple(vacuous)


def _exact_ok(got: np.ndarray, problem: Problem, err: np.ndarray, tol: np.ndarray,
              band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which elements are the correctly rounded truth (docs/tolerance.md, "Precision contracts"), and
    which of them were found equal to the certified truth.

    Within half an ULP less the reference's band: certainly a correct rounding; beyond half an ULP
    plus the band: certainly not. In between the reference cannot tell (in float64 its band can exceed
    half an ULP after cancellation), so those few elements are compared with the certified truth.
    """
    ok = err <= tol - band
    unsure = ~ok & (err <= tol + band)
    certified = np.zeros_like(ok)
    if unsure.any():
        truth = certified_grad(problem, problem.format, where=unsure)
        certified = unsure & (got.astype(np.float64) == truth.astype(np.float64))
    return ok | certified, certified


def finalize(failure: Failure) -> Failure:
    """Report the expected value of the worst element correctly rounded to the dtype (the certified truth)."""
    if failure.kind not in (FailureKind.MISMATCH, FailureKind.NONFINITE) or failure.index is None:
        return failure
    problem = failure.case.problem
    fmt = problem.format
    if fmt.name == "float64" and problem.logits.size > 4096:
        return failure  # the float64 oracle value (within its bound) is reported
    expected = float(problem.restore_shape(certified_grad(problem, fmt))[failure.index])  # the caller's index
    ulps = float(ulp_distance(np.array(failure.got, dtype=fmt.dtype), np.array(expected, dtype=fmt.dtype)))
    return Failure(
        failure.kind, failure.message, failure.case, failure.index, expected, failure.got, ulps,
        failure.tolerance, failure.ratio,
    )


def _call(grad_fn: Callable[..., Any], case: Case, timeout: float | None = None,
          inplace: str = "flag") -> Failure | tuple[np.ndarray, np.ndarray]:
    """Call grad_fn on private copies; check it raised nothing, mutated nothing, and the shape and dtype.

    With ``inplace="allowed"`` its logits copy is its own to overwrite (and to return): only the
    targets and weight must stay untouched.

    Returns its result as numpy (which may be the ``grad_fn``'s own buffer) and a private copy of it.
    """
    logits, targets = case.logits.copy(), case.targets.copy()
    options = case.options()
    weight = options.get("weight")
    weight_before = None if weight is None else weight.copy()
    grad_output = case.grad_output  # a fresh scalar or (N,) array of the dtype; None: not exercised
    upstream_before = None
    if grad_output is not None:
        options["grad_output"] = grad_output
        if isinstance(grad_output, np.ndarray):
            upstream_before = grad_output.copy()
        else:
            grad_output = None  # a numpy scalar cannot be written to
    try:
        result = call_with_deadline(grad_fn, timeout, logits, targets, **options)
    except Hung:
        return Failure(FailureKind.TIMEOUT, f"grad_fn did not return within the timeout of {timeout:g} s", case)
    except SystemExit as exc:  # sys.exit() or exit() in grad_fn: a failure, never a pass or a silent exit
        return Failure(FailureKind.EXCEPTION, f"grad_fn raised SystemExit({exc.code!r}): it called sys.exit() or "
                       "exit()", case)
    except Exception as exc:  # noqa: BLE001 - any exception is the finding
        return Failure(FailureKind.EXCEPTION, f"grad_fn raised {type(exc).__name__}: {exc}", case)
    own = ("logits",) if inplace == "allowed" else ()
    for name, now, before in (("logits", logits, case.logits), ("targets", targets, case.targets),
                              ("weight", weight, weight_before), ("grad_output", grad_output, upstream_before)):
        if name not in own and now is not None and not same_bits(now, before):
            where = tuple(int(i) for i in np.argwhere(_bits(now) != _bits(before))[0])
            return Failure(
                FailureKind.MUTATION, f"grad_fn modified its {name} argument in place: {name}{list(where)} was "
                f"{before[where]!r}, became {now[where]!r}", case, where,
            )
    if result is None:
        return Failure(FailureKind.TYPE, "grad_fn returned None, not the gradient array (a missing return?)", case)
    try:
        got = to_numpy(result)
    except Exception as exc:  # noqa: BLE001
        return Failure(FailureKind.TYPE, f"grad_fn returned {type(result).__name__}, not an array ({exc})", case)
    fmt = case.format
    if got.shape != case.logits.shape:
        return Failure(
            FailureKind.SHAPE, f"grad_fn returned shape {got.shape} for logits of shape {case.logits.shape}", case,
        )
    if got.dtype != fmt.dtype:
        if hasattr(result, "dtype"):
            return Failure(
                FailureKind.DTYPE, f"grad_fn returned dtype {got.dtype} for logits of dtype {fmt.name}", case,
            )
        # a list or tuple has no dtype: taken as the dtype only when every value is exact in it
        inexact = _inexact(got, fmt.dtype)
        if inexact is not None:
            return Failure(
                FailureKind.DTYPE, f"grad_fn returned a {type(result).__name__} whose value {float(got[inexact])!r} at "
                f"{inexact} is not exact in {fmt.name}; return an array of dtype {fmt.name}", case, inexact,
            )
        got = got.astype(fmt.dtype)
    for name, array in (("logits", logits), ("targets", targets), ("weight", weight), ("grad_output", grad_output)):
        if name not in own and array is not None and np.may_share_memory(got, array):
            return Failure(
                FailureKind.ALIASING, f"grad_fn returned a view of its {name} argument; return a new array", case,
            )
    return got, np.array(got, order="C", copy=True)


def _inexact(values: np.ndarray, dtype: np.dtype) -> tuple[int, ...] | None:
    """The first element of a list's values that the dtype does not hold exactly (None: all exact)."""
    if values.dtype.kind not in "iuf":
        return tuple(0 for _ in values.shape)  # not real numbers (bool, complex, str): not a gradient
    with np.errstate(all="ignore"):
        back = values.astype(dtype).astype(values.dtype)
    same = (back == values) | (np.isnan(back) & np.isnan(values)) if values.dtype.kind == "f" else back == values
    if same.all():
        return None
    return tuple(int(i) for i in np.argwhere(~same)[0])


def _bits(x: np.ndarray) -> np.ndarray:
    """Bit patterns of a float array (so that NaN equals NaN and -0 differs from 0); ints unchanged."""
    return bit_pattern(x) if is_supported_float(x.dtype) else np.asarray(x)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits (NaN equals NaN, -0 differs from 0)."""
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))
