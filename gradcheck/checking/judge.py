"""Judging one case: call ``grad_fn`` on private copies and compare its result with the truth.

The call gets the case's arrays and options, and its upstream gradient as ``grad_output=`` when the
case has one (verify draws one for a ``grad_fn`` that takes it). It must return (within ``timeout``,
when set) without raising, ``SystemExit`` included. The
result must have the logits' shape and dtype (a list or tuple: values exact in the dtype), be a new
buffer on each call (not a view of an input or of the previous result), leave the inputs untouched,
repeat bit for bit, be finite where the truth is, and lie within the per-element tolerance of
:mod:`gradcheck.tolerance` (docs/tolerance.md) of the truth. A value is reported wrong only when that is certain: the float64
oracle's rigorous error bound is added to the tolerance, and elements within that band get the
benefit of the doubt (docs/tolerance.md, "Deciding a failure"). The comparison runs by blocks of rows,
and on the counted rows alone when the ignored ones are 0 (docs/tolerance.md, "Evaluation by row
blocks", "Ignored rows"), so its memory is a few float64 arrays of the input, not dozens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
from gradcheck.reference import by_rows, reference_grad
from gradcheck.tolerance import contracts, row_blocks, tolerances

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
    del second, a_bits, b_bits  # equal to the first result: only that one is compared
    return compare_values(first, case, precision=precision, grades=grades)


def compare_values(got: np.ndarray, case: Case, *, precision: str | None = None,
                   grades: dict[str, tuple[float, bool]] | None = None) -> Failure | tuple[float, float]:
    """Compare a result of the right shape and dtype with the truth (docs/tolerance.md).

    An element is wrong when ``|got - reference| > tolerance + bound``: then ``|got - truth|`` exceeds
    the tolerance for certain. The band below (at most ``bound`` wide, about 1e-3 of the tolerance)
    gets the benefit of the doubt.

    The comparison runs by blocks of rows (:data:`BLOCK_ELEMENTS`), so its memory is a few blocks
    beyond the reference; when every ignored row of the result is 0 (their truth is exactly 0, so
    their error is 0) only the counted rows are modelled (docs/tolerance.md, "Evaluation by row
    blocks" and "Ignored rows").

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
    blocks = row_blocks(problem.n, problem.k, BLOCK_ELEMENTS)
    bad = _first_nonfinite(got, blocks)
    if bad is not None:
        expected = _reference_at(problem, bad)
        return Failure(
            FailureKind.NONFINITE, f"grad_fn returned {float(got[bad])!r} at {layout.index(bad)} where the truth "
            f"is finite ({expected!r})", case, layout.index(bad), expected=float(expected), got=float(got[bad]),
        )
    wanted = contracts(fmt) if grades is not None else (asked,)
    counted = problem.active_rows()
    rows_of = None  # the counted rows' indices when only they are modelled
    if not counted.all() and _zero_rows(got, ~counted, blocks):
        rows_of = np.flatnonzero(counted)
        if rows_of.size == 0:  # nothing counted and every element exactly 0, the truth: no error anywhere
            if grades is not None:
                grades.update({c: (0.0, True) for c in wanted})
            return 0.0, 0.0
        problem, got = counted_rows(problem, rows_of), got[rows_of]
    verdict = _judge_rows(problem, got, wanted, asked)
    if grades is not None:
        for c in wanted:
            if c not in verdict.vacuous:
                grades[c] = (float(verdict.worst[c]), verdict.met[c])
        for c in (c for c in wanted if c in verdict.vacuous):  # no error model for this case: not certified, not met
            grades[c] = (math.inf, False)
    if verdict.worst_element is None:
        return verdict.ulps, float(verdict.worst[asked])
    _, (row, col), details = verdict.worst_element
    where = layout.index((int(row if rows_of is None else rows_of[row]), int(col)))
    expected, value, ulps, tol, ratio = details
    return Failure(
        FailureKind.MISMATCH, f"gradient differs from the truth by {ratio:.3g} x the tolerance at {where}", case,
        where, expected=float(expected), got=float(value), ulps=float(ulps), tolerance=float(tol), ratio=float(ratio),
    )


# docs/tolerance.md, "Evaluation by row blocks": the comparison's blocks of rows hold about this many
# elements (512 KiB per float64 temporary, of which a block makes a few dozen; the oracle's block), so
# beyond a few blocks its memory is a small fraction of the input's; a block is at least one row, and
# at (256, 32000) 2**16 was as fast as 2**18 and faster than 2**20 (benchmarks/RESULTS.md)
BLOCK_ELEMENTS = 1 << 16


def counted_rows(problem: Problem, rows: np.ndarray) -> Problem:
    """The problem of its counted rows alone (``rows``: every row not ignored, in order).

    Its divisor D, z-loss divisor and rescaling are the whole problem's, which depend on the counted
    rows only, and every other quantity of the oracle, the truth, the reference and the tolerance is
    per row, so its rows' values are the whole problem's, bit for bit (docs/tolerance.md, "Ignored rows").
    """
    logits, targets = problem.logits[rows], problem.targets[rows]
    g = problem.grad_output
    g = g[rows] if g is not None and g.ndim == 1 else g
    for array in (logits, targets, g):
        if array is not None:
            array.setflags(write=False)
    return replace(problem, logits=logits, targets=targets, grad_output=g, layout=None)


@dataclass
class _Verdict:
    """What :func:`_judge_rows` found: per contract the worst ratio and whether it was met, the
    contracts without an error model here, the worst ULPs, and the asked contract's worst wrong element."""

    worst: dict[str, Any]
    met: dict[str, bool]
    vacuous: dict[str, ArithmeticError]
    ulps: float = 0.0
    worst_element: tuple[Any, tuple[int, int], tuple] | None = None  # (value, (row, class), details)


def _judge_rows(problem: Problem, got: np.ndarray, wanted: tuple[str, ...], asked: str) -> _Verdict:
    """Compare ``got`` (the problem's ``(N, K)`` rows) under each wanted contract, block by block.

    The same values as one evaluation of the whole arrays: the maxima are combined as ``np.max``
    combines them (a NaN wins), the worst wrong element as ``np.argmax`` finds it (the first NaN, else
    the first largest ratio), and the exact contract's undecided elements are certified together at
    the end, as one call (:func:`_certify`).

    Raises:
        InvalidArgument: the asked contract has no error model on this case, naming it and the fix.
    """
    fmt = problem.format
    k = problem.k
    verdict = _Verdict({c: 0.0 for c in wanted}, {c: True for c in wanted}, {})
    whole = None if by_rows(problem) else reference_grad(problem)
    unsure: list[tuple[np.ndarray, ...]] = []  # the exact contract's undecided elements, per block
    for rows in row_blocks(problem.n, k, BLOCK_ELEMENTS):
        _judge_block(problem, got, rows, whole, wanted, asked, verdict, unsure)
    whole = None  # released before _certify
    if unsure and "exact" not in verdict.vacuous and _undecided_matter(verdict, unsure, asked):
        _certify(problem, unsure, verdict, asked)
    if asked in verdict.vacuous:
        wider = [c for c in contracts(fmt) if c != asked]
        raise InvalidArgument(
            f"precision={asked!r} cannot be checked on this case ({problem.k} classes, "
            f"softcap={problem.softcap!r}, lse_square_scale={problem.lse_square_scale!r}): {verdict.vacuous[asked]}, "
            f"so a correct {asked} implementation could return anything; check a wider contract "
            f"(precision={wider[-1]!r})."
        ) from None
    return verdict


def _judge_block(problem: Problem, got: np.ndarray, rows: slice, whole: tuple[np.ndarray, np.ndarray] | None,
                 wanted: tuple[str, ...], asked: str, verdict: _Verdict, unsure: list[tuple[np.ndarray, ...]]) -> None:
    """One block of rows of :func:`_judge_rows` (its temporaries die with the call)."""
    fmt = problem.format
    k = problem.k
    parts = row_parts(problem.logits[rows])
    ref, band = (whole[0][rows], whole[1][rows]) if whole is not None else reference_grad(problem, parts, rows=rows)
    g64 = ref.astype(np.float64)
    live = tuple(c for c in wanted if c not in verdict.vacuous)
    tols = _block_tolerances(problem, parts, g64, band, live, rows, verdict.vacuous)
    block = got[rows]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # "exact" of a zero truth: tolerance 0
        err = np.abs(block.astype(ref.dtype) - ref).astype(np.float64)
    ulps = ulp_distance(block, round_to_format(g64, fmt))
    verdict.ulps = max(verdict.ulps, float(ulps.max(initial=0.0)))
    for c, tol in tols.items():
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            ratio = np.where(err == 0, 0.0, err / tol)  # inf where only 0 passes
        if c == "exact":  # within half an ULP less the band: certainly the correct rounding (_certify)
            ok = err <= tol - band
            doubt = ~ok & (err <= tol + band)
            if doubt.any():
                at = np.flatnonzero(doubt)
                unsure.append((at + rows.start * k, ratio.reshape(-1)[at], tol.reshape(-1)[at],
                               g64.reshape(-1)[at], block.reshape(-1)[at], ulps.reshape(-1)[at]))
                ok = ok | doubt  # decided by _certify
                ratio = np.where(doubt, 0.0, ratio)
        else:
            ok = err <= tol + band
        verdict.worst[c] = np.maximum(verdict.worst[c], ratio.max(initial=0.0))
        verdict.met[c] = verdict.met[c] and bool(np.all(ok))
        if c == asked and not np.all(ok):
            flat = np.where(ok, -1.0, ratio).reshape(-1)
            at = int(np.argmax(flat))
            i = np.unravel_index(at, ratio.shape)
            _worst_of(verdict, flat[at], rows.start * k + at, k,
                      (g64[i], block[i], ulps[i], tol[i], ratio[i]))


def _worst_of(verdict: _Verdict, value: Any, flat: int, k: int, details: tuple) -> None:
    """Keep the worse of the element found so far and this one, as ``np.argmax`` over the whole would
    choose: the first NaN, else the largest value, the first of equal ones (``flat``: C order)."""
    old = verdict.worst_element
    if old is not None:
        old_value, (row, col), _ = old
        old_flat = row * k + col
        first = flat < old_flat
        if math.isnan(old_value) and (not math.isnan(value) or not first):
            return
        if not math.isnan(value) and not math.isnan(old_value) and (value < old_value or (value == old_value and not first)):
            return
    verdict.worst_element = (value, divmod(int(flat), k), details)


def _undecided_matter(verdict: _Verdict, unsure: list[tuple[np.ndarray, ...]], asked: str) -> bool:
    """Whether certifying the exact contract's undecided elements can change the verdict.

    It cannot when "exact" is not the asked contract, is already not met (an element certainly not
    correctly rounded), and its worst ratio so far is at least every undecided element's: a certified
    element counts 0 and an uncertified one its own ratio, so the worst stays (a NaN stays NaN). That
    is the usual case of a kernel that is not correctly rounded, and it spares the certification.
    """
    if asked == "exact" or verdict.met["exact"]:
        return True
    worst = verdict.worst["exact"]
    if np.isnan(worst):
        return False
    ratios = np.concatenate([column[1] for column in unsure])
    return bool(np.isnan(ratios).any() or worst < ratios.max())


def _certify(problem: Problem, unsure: list[tuple[np.ndarray, ...]], verdict: _Verdict, asked: str) -> None:
    """The exact contract's undecided elements (docs/tolerance.md, "Precision contracts").

    Within half an ULP less the reference's band: certainly a correct rounding; beyond half an ULP
    plus the band: certainly not. In between the reference cannot tell (in float64 its band can exceed
    half an ULP after cancellation), so those few elements are compared with the certified truth.
    """
    at, ratio, tol, g64, got, ulps = (np.concatenate(column) for column in zip(*unsure))
    where = np.zeros(problem.logits.shape, dtype=bool)
    where.reshape(-1)[at] = True
    truth = certified_grad(problem, problem.format, where=where)
    del where
    certified = got.astype(np.float64) == truth.reshape(-1)[at].astype(np.float64)
    del truth
    wrong = ~certified
    verdict.worst["exact"] = np.maximum(verdict.worst["exact"], np.where(certified, 0.0, ratio).max(initial=0.0))
    verdict.met["exact"] = verdict.met["exact"] and bool(certified.all())
    if asked == "exact" and wrong.any():
        flat = np.where(wrong, ratio, -1.0)
        j = int(np.argmax(flat))
        _worst_of(verdict, flat[j], int(at[j]), problem.k, (g64[j], got[j], ulps[j], tol[j], ratio[j]))


def _block_tolerances(problem: Problem, parts: Any, grad: np.ndarray, band: np.ndarray, wanted: tuple[str, ...],
                      rows: slice, vacuous: dict[str, ArithmeticError]) -> dict[str, np.ndarray]:
    """The tolerance of a block of rows under each wanted contract; a contract whose error model is
    vacuous there goes into ``vacuous`` instead (with the reason).

    An implementation class's forward error bound is vacuous when its relative error in the row sum
    reaches 1 (:func:`gradcheck.tolerance.element_bound` raises ArithmeticError; for instance bfloat16
    arithmetic under softcap=30, where the perturbation of z' = c tanh(z / c) alone is about 0.7). A
    contract other than the asked one is then only reported as not met; the asked one cannot be
    checked at all (:func:`_judge_rows` raises).
    """
    try:
        return tolerances(problem, parts, grad, band, wanted, rows=rows)
    except ArithmeticError:
        pass
    tols: dict[str, np.ndarray] = {}
    for contract in wanted:
        try:
            tols.update(tolerances(problem, parts, grad, band, (contract,), rows=rows))
        except ArithmeticError as exc:
            vacuous[contract] = exc
    return tols


def _first_nonfinite(got: np.ndarray, blocks: list[slice]) -> tuple[int, int] | None:
    """The first element (C order) of the ``(N, K)`` result that is not finite, or None."""
    for rows in blocks:
        bad = ~np.isfinite(got[rows].astype(np.float64))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            return int(rows.start + row), int(col)
    return None


def _zero_rows(got: np.ndarray, rows: np.ndarray, blocks: list[slice]) -> bool:
    """Whether every element of the rows marked in ``rows`` is 0 (either sign)."""
    return not any(np.any(got[b][rows[b]].astype(np.float64)) for b in blocks if rows[b].any())


def _reference_at(problem: Problem, where: tuple[int, int]) -> Any:
    """The reference's float64 value at one element (its row alone where the reference allows)."""
    row, col = where
    if by_rows(problem):
        rows = slice(row, row + 1)
        return reference_grad(problem, row_parts(problem.logits[rows]), rows=rows)[0].astype(np.float64)[0, col]
    return reference_grad(problem)[0].astype(np.float64)[row, col]


def finalize(failure: Failure) -> Failure:
    """Report the expected value of the worst element correctly rounded to the dtype (the certified truth)."""
    if failure.kind not in (FailureKind.MISMATCH, FailureKind.NONFINITE) or failure.index is None:
        return failure
    problem = failure.case.problem
    fmt = problem.format
    if fmt.name == "float64" and problem.logits.size > 4096:
        return failure  # the float64 oracle value (within its bound) is reported
    where = np.zeros(problem.shape, dtype=bool)  # the worst element alone (the caller's index), as rows
    where[failure.index] = True
    expected = float(problem.restore_shape(certified_grad(problem, fmt, where=problem.caller_layout.rows(where)))
                     [failure.index])
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
