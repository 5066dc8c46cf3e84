"""verify_linear and assert_linear_gradient: check a fused linear cross-entropy kernel's three gradients.

``grad_fn(hidden, weight, targets, **options)`` (``bias=`` when ``bias=True``, ``grad_output=`` when it
takes it) returns ``(d_hidden, d_weight)`` or ``(d_hidden, d_weight, d_bias)``. Each example is a
:class:`LinearCase` drawn by Hypothesis (:func:`linear_cases`), judged by :func:`check_linear` against the
float64 oracle and the kernel error model of docs/linear.md, with the hygiene of ``verify`` (exceptions,
mutation, shape, dtype, aliasing, determinism, non-finite values). The search is
:func:`gradcheck.checking.search._search`; a failure is then simplified (rows, classes and hidden
dimensions dropped, values rounded) while it fails the same way.
"""

from __future__ import annotations

import inspect
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcheck.adapters import to_numpy
from gradcheck.checking.deadline import Hung, call_with_deadline, require_deadline
from gradcheck.checking.judge import same_bits
from gradcheck.checking.messages import PRINT_LIMIT, _name, format_array, format_options, mismatch_line
from gradcheck.checking.result import Failure, FailureKind, Verification
from gradcheck.checking.search import _search
from gradcheck.dtypes import float_format, round_to_format
from gradcheck.errors import GradientMismatch, InvalidArgument
from gradcheck.linear import (LinearBounded, LinearGrad, LinearProblem, bounded, contract_models, default_linear_contract,
                              linear_contracts, linear_tolerance, make_linear_problem)
from gradcheck.options import VERIFY, Option, OptionTable, flag, precision_name
from gradcheck.ulps import ulp_distance

__all__ = ["LinearCase", "LinearFailure", "LinearVerification", "assert_linear_gradient", "check_linear",
           "linear_cases", "verify_linear"]

GRADIENTS = ("d_hidden", "d_weight", "d_bias")
KERNEL_ALIAS = "kernel"  # docs/linear.md, "Precision contracts": the default, float32 (float64 for float64)
MAX_LINEAR_SHAPE = (64, 1024, 64)
SIMPLIFY_BUDGET = 200


def _shape_triple(name: str, value: Any) -> tuple[int, int, int]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 3
          and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in value))
    if not ok:
        raise InvalidArgument(f"{name} must be three positive integers (N, V, D), got {value!r}.")
    return tuple(int(x) for x in value)  # type: ignore[return-value]


def _triple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def linear_precision_name(name: str, value: Any) -> str | None:
    """A contract of verify_linear: verify's names, or "kernel" (the default, resolved per dtype)."""
    if isinstance(value, str) and value == KERNEL_ALIAS:
        return value
    try:
        return precision_name(name, value)
    except InvalidArgument:
        raise InvalidArgument(f"{name} must be one of ('kernel', 'exact', 'float64', 'float32', 'float16', "
                              f"'bfloat16') or None, got {value!r}.") from None


def resolve_linear_contract(fmt: Any, precision: str | None, *, where: str) -> str:
    """The contract checked for a dtype: ``precision``, or the kernel contract when None or "kernel".

    Raises:
        InvalidArgument: a contract narrower than the dtype, naming ``where`` and the contracts there are.
    """
    if precision in (None, KERNEL_ALIAS):
        return default_linear_contract(fmt)
    if precision not in linear_contracts(fmt):
        raise InvalidArgument(f"precision must be one of {('kernel', *linear_contracts(fmt))} for {where}, got "
                              f"{precision!r}: a {fmt.name} result cannot have been computed in the narrower "
                              f"{precision}.")
    return precision


LINEAR_REGIMES = ("moderate", "large", "dominant_row", "tiny_hidden")

# The check options of verify_linear: verify's (same rules and messages) with the linear family's shape and bias.
LINEAR_VERIFY = OptionTable("check options", (
    *(VERIFY[name] for name in ("dtype", "targets", "reduction", "label_smoothing", "lse_square_scale", "softcap",
                                "weighted", "ignore_index", "inplace", "max_examples", "seed", "timeout")),
    Option("precision", None, linear_precision_name,
           "the contract checked: 'exact', 'float64', 'float32' or the dtype itself (docs/linear.md, \"Precision "
           "contracts\"); default 'kernel': float32 accumulation, intermediates stored in the dtype at most once "
           "(float32; float64 for float64)", parse=str, metavar="P"),
    Option("bias", False, flag, "pass a bias (bias=, V values of the dtype) and expect d_bias back"),
    Option("max_shape", MAX_LINEAR_SHAPE, _shape_triple, "the largest (N, V, D) generated", parse=_triple,
           metavar="N,V,D"),
))


@dataclass(frozen=True, eq=False)
class LinearCase:
    """One input for a linear ``grad_fn``: a validated :class:`LinearProblem`, its regime and features."""

    problem: LinearProblem
    regime: str = "moderate"
    tags: tuple[str, ...] = ()

    @classmethod
    def make(cls, hidden: Any, weight: Any, targets: Any, *, bias: Any = None, regime: str = "moderate",
             tags: tuple[str, ...] = (), **options: Any) -> LinearCase:
        return cls(make_linear_problem(hidden, weight, targets, bias=bias, **options), regime, tuple(tags))

    @property
    def hidden(self) -> np.ndarray:
        return self.problem.hidden

    @property
    def weight(self) -> np.ndarray:
        return self.problem.weight

    @property
    def bias(self) -> np.ndarray | None:
        return self.problem.bias

    @property
    def targets(self) -> np.ndarray:
        t = self.problem.targets
        return t if t.ndim == 1 else t.astype(self.problem.format.dtype)

    @property
    def format(self) -> Any:
        return self.problem.format

    @property
    def dtype(self) -> str:
        return self.problem.format.name

    @property
    def grad_output(self) -> Any:
        return self.problem.logits.grad_output_for(self.problem.format.dtype)

    def options(self) -> dict[str, Any]:
        """The non-default options as a ``grad_fn`` gets them (``ce_weight=``; no bias, no grad_output)."""
        return self.problem.grad_fn_options()

    def replace(self, **changes: Any) -> LinearCase:
        """A validated copy with some of hidden, weight, bias, targets and the case options changed."""
        o = self.problem.options
        values = {"hidden": self.hidden, "weight": self.weight, "bias": self.bias, "targets": self.targets,
                  "ce_weight": self.problem.logits.weight,
                  "ignore_index": o["ignore_index"], "reduction": o["reduction"],
                  "label_smoothing": o["label_smoothing"], "lse_square_scale": o["lse_square_scale"],
                  "softcap": o["softcap"], "grad_output": self.problem.logits.grad_output}
        values.update(changes)
        return LinearCase.make(values.pop("hidden"), values.pop("weight"), values.pop("targets"),
                               regime=self.regime, tags=self.tags, **values)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' printer: this line, not every array
        printer.text(repr(self))

    def __repr__(self) -> str:
        n, v, d = self.problem.shape
        return (f"LinearCase(regime={self.regime!r}, N={n}, V={v}, D={d}, dtype={self.dtype}, "
                f"bias={self.bias is not None}, tags={self.tags})")


@dataclass(frozen=True, eq=False)
class LinearFailure(Failure):
    """A :class:`gradcheck.checking.result.Failure` that also names the gradient ("d_hidden", "d_weight",
    "d_bias"; empty when the failure is not about one of them)."""

    gradient: str = ""


@dataclass(frozen=True, eq=False)
class LinearVerification(Verification):
    """The result of :func:`verify_linear` (the fields of :class:`Verification`)."""

    @property
    def reproduction(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.arguments.items())
        return f"gradcheck.verify_linear({self.function}{args}, seed={self.seed})"

    def __str__(self) -> str:
        head = (
            f"verify_linear({self.function}, {self.dtype}): {'passed' if self.passed else 'FAILED'} after "
            f"{self.examples} examples in {self.elapsed:.2f} s; worst {self.worst_ratio:.3g} x tolerance "
            f"({self.precision} contract; {self.worst_ulps:g} ULP); grade {self.grade or 'none'}; seed {self.seed}"
        )
        return head if self.failure is None else f"{head}\n{describe_linear(self)}"


# ---- generation -------------------------------------------------------------------------------------------------

# Every generated value is m * 2**e with |m| < 2**8 and 2**-14 <= |value| <= 2**8: exact in bfloat16, float16,
# float32 and float64 (docs/linear.md, "Strategies"), so all four dtypes see the same numbers.
SIG_BITS = 8
MIN_EXP = -14


def exact_values(x: np.ndarray) -> np.ndarray:
    """Round float64 values to 8 significant bits, flush magnitudes below 2**-14 to 0 (exact in every dtype)."""
    m, e = np.frexp(x)
    m = np.round(m * (1 << SIG_BITS)) / (1 << SIG_BITS)
    out = np.ldexp(m, e)
    out[np.abs(out) < 2.0 ** MIN_EXP] = 0.0
    return np.clip(out, -256.0, 256.0)


def _sizes(limit: int, chunks: tuple[int, ...]) -> Any:
    """Sizes up to ``limit`` with the chunk edges (multiples of common chunk/block sizes, and one off) favoured."""
    from hypothesis import strategies as st

    edges = sorted({s for c in chunks for s in (c - 1, c, c + 1, 2 * c + 1, 3 * c - 1) if 1 <= s <= limit} | {1, limit})
    return st.one_of(st.sampled_from(edges), st.integers(1, limit))


def draw_case(rng: np.random.Generator, n: int, v: int, d: int, regime: str, fmt: Any, *, bias: bool,
              targets: str, weighted: bool, ignore_index: int | None, ignored: str, grad_output: str,
              reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float | None) -> LinearCase:
    """One case from a seeded generator (the strategies' draw; also usable alone)."""
    scale_h, scale_w = 1.0, 1.0 / max(1.0, np.sqrt(d))
    if regime == "large":  # logits of tens: the softmax's hard regimes (near one-hot rows, large gaps)
        scale_h, scale_w = 8.0, 8.0 / max(1.0, np.sqrt(d))
    h = rng.standard_normal((n, d)) * scale_h
    if regime == "dominant_row":  # one row dominates every sum over rows (accumulation across chunks)
        h *= 2.0 ** -4
        h[0] *= 2.0 ** 8
    if regime == "tiny_hidden":
        h *= 2.0 ** -8
    w = rng.standard_normal((v, d)) * scale_w
    b = rng.standard_normal(v) if bias else None
    h, w = exact_values(h), exact_values(w)
    b = None if b is None else exact_values(b)
    tags: list[str] = []
    if targets == "probs":
        t = exact_values(rng.dirichlet(np.ones(v), size=n))
        tags.append("soft")
    else:
        t = rng.integers(0, v, size=n)
        if ignore_index is not None and ignored != "none":
            k = max(1, n // 3) if ignored == "some" else max(1, n - max(1, n // 8))
            rows = rng.choice(n, size=min(k, n), replace=False)
            t[rows] = ignore_index
            if reduction == "mean" and np.all(t == ignore_index):
                t[0] = 0
            tags.append(f"{ignored} ignored rows")
    options: dict[str, Any] = {"reduction": reduction, "label_smoothing": label_smoothing,
                               "lse_square_scale": lse_square_scale, "softcap": softcap}
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    if weighted:
        options["ce_weight"] = exact_values(rng.uniform(0.25, 4.0, size=v))
    if grad_output != "none":
        g = exact_values(rng.uniform(-4.0, 4.0, size=n if reduction == "none" else ()).reshape(-1))
        g[g == 0] = 1.5
        options["grad_output"] = g if reduction == "none" else g[0]
        tags.append("grad_output")
    dt = fmt.dtype
    return LinearCase.make(h.astype(dt), w.astype(dt), t if targets == "index" else t.astype(dt),
                           bias=None if b is None else b.astype(dt), regime=regime, tags=tuple(tags), **options)


def linear_cases(*, dtype: str = "float64", max_shape: tuple[int, int, int] = MAX_LINEAR_SHAPE, bias: bool = False,
                 targets: str = "index", weighted: bool = False, ignore_index: int | None = None,
                 reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 softcap: float | None = None, upstream: bool = False) -> Any:
    """A Hypothesis strategy of :class:`LinearCase`: shapes with N, V off the chunk and block sizes and D from 1,
    the regimes of :data:`LINEAR_REGIMES`, ignored rows (some, most) when ``ignore_index`` is set, and drawn
    upstream gradients when ``upstream``."""
    from hypothesis import strategies as st

    fmt = float_format(dtype)
    max_n, max_v, max_d = max_shape

    @st.composite
    def build(draw: Any) -> LinearCase:
        n = draw(_sizes(max_n, (4, 8, 16, 32)))
        v = draw(_sizes(max_v, (16, 64, 128, 256)))
        d = draw(_sizes(max_d, (8, 16, 32)))
        regime = draw(st.sampled_from(LINEAR_REGIMES))
        ignored = draw(st.sampled_from(("some", "most", "none"))) if ignore_index is not None else "none"
        g = draw(st.sampled_from(("none", "drawn"))) if upstream else "none"
        seed = draw(st.integers(0, 2**32 - 1))
        return draw_case(np.random.default_rng(seed), n, v, d, regime, fmt, bias=bias, targets=targets,
                         weighted=weighted, ignore_index=ignore_index, ignored=ignored, grad_output=g,
                         reduction=reduction, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                         softcap=softcap)

    return build()


# ---- judging one case ---------------------------------------------------------------------------------------------


def takes_grad_output(grad_fn: Callable[..., Any]) -> bool:
    """True when ``grad_fn`` accepts a ``grad_output=`` keyword (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(grad_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "grad_output" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def check_linear(grad_fn: Callable[..., Any], case: LinearCase, *, timeout: float | None = None,
                 precision: str | None = None, grades: dict[str, tuple[float, bool]] | None = None,
                 inplace: str = "flag") -> Failure | tuple[float, float]:
    """Check one case: a :class:`LinearFailure`, or (worst ULPs, worst error / tolerance).

    The same order as :func:`gradcheck.checking.judge.check`: the call (exception, timeout, mutation,
    type, shape, dtype, aliasing), a second call (aliasing of the two results, determinism), then the
    values (non-finite, mismatch) under the contract ``precision`` (None or "kernel": the kernel contract).
    ``inplace="allowed"`` lets the ``grad_fn`` write into its (private) hidden copy.
    """
    first = _call(grad_fn, case, timeout, inplace)
    if isinstance(first, Failure):
        return first
    second = _call(grad_fn, case, timeout, inplace)
    if isinstance(second, Failure):
        return second
    (buffers_a, a), (buffers_b, b) = first, second
    for name, x, y in zip(GRADIENTS, buffers_a, buffers_b):
        if np.may_share_memory(x, y):
            return _failure(FailureKind.ALIASING, f"grad_fn returned the same {name} buffer on two calls (the second "
                            "call overwrote the first result); return new arrays from each call", case, name)
    fmt = case.format
    for name, x, y in zip(GRADIENTS, a, b):
        xb, yb = x.view(fmt.int_dtype), y.view(fmt.int_dtype)
        if not np.array_equal(xb, yb):
            where = tuple(int(i) for i in np.argwhere(xb != yb)[0])
            return _failure(FailureKind.NONDETERMINISM, f"grad_fn returned different {name} values for the same input "
                            f"at {where}: {float(x[where])!r}, then {float(y[where])!r}", case, name, where,
                            got=float(x[where]))
    return compare_linear(a, case, precision=precision, grades=grades)


def contract_tolerances(lp: LinearProblem, ref: LinearBounded, wanted: tuple[str, ...],
                        asked: str) -> tuple[dict[str, LinearGrad], tuple[str, ...]]:
    """The tolerances of each wanted non-exact contract, and the contracts with no error model on this case.

    A contract's tolerance is the largest of its implementation classes' (:func:`gradcheck.linear.contract_models`).
    A class whose bound is vacuous here (an ArithmeticError, or a non-finite tolerance: for instance a sum of
    more than 1/u terms in bfloat16) makes the contract uncheckable on the case: only reported as not met,
    like verify's (gradcheck.checking.judge._tolerances); the asked contract then raises.

    Raises:
        InvalidArgument: the asked contract has no error model on this case, naming it and the fix.
    """
    fmt = lp.format
    tols: dict[str, LinearGrad] = {}
    vacuous: list[str] = []
    for contract in wanted:
        if contract == "exact":
            continue
        try:
            parts = [linear_tolerance(lp, ref, model) for model in contract_models(fmt, contract)]
            merged = LinearGrad(*(None if x[0] is None else np.maximum.reduce(x) for x in zip(*parts)))
            if not all(np.all(np.isfinite(t)) for t in merged if t is not None):
                raise ArithmeticError("a bound of this contract is infinite")
        except ArithmeticError as exc:
            if contract == asked:
                n, v, d = lp.shape
                raise InvalidArgument(
                    f"precision={contract!r} cannot be checked on this case (N={n}, V={v}, D={d}, "
                    f"softcap={lp.logits.softcap!r}): {exc}, so a correct {contract} implementation could return "
                    f"anything; check a wider contract (precision={default_linear_contract(fmt)!r}) or a smaller "
                    "max_shape.") from None
            vacuous.append(contract)
            continue
        tols[contract] = merged
    return tols, tuple(vacuous)


# When "exact" is only graded (not asked), the certified truth of the elements the oracle's band leaves undecided
# (float64 results, cancellation) is computed only for small cases; otherwise "exact" is not certified there.
EXACT_CERTIFY_LIMIT = 4096  # largest N * V * D (FINALIZE_LIMIT's size)


def exact_ok(got: tuple[np.ndarray, ...], lp: LinearProblem, ref: LinearBounded, *,
             asked: bool) -> tuple[list[np.ndarray], bool, list[np.ndarray]]:
    """Which elements are the correctly rounded truth (docs/linear.md, "Precision contracts": "exact").

    Where the oracle's enclosure ``value +- bound`` rounds to one number of the dtype (nearly everywhere below
    float64), that number is the truth rounded and the element must equal it; elsewhere the certified truth
    (:func:`gradcheck.linear_exact.certified_linear_grad`) decides, when "exact" is the asked contract or the
    case is small enough (:data:`EXACT_CERTIFY_LIMIT`). Returns the per-gradient masks, whether
    every element was decided (False: the contract could not be certified here, so it is not met) and the
    correctly rounded values (as float64).
    """
    from gradcheck.exact import _decided

    fmt = lp.format
    decided = [None if r is None else _decided(r.value, r.bound, fmt) for r in ref]
    # an enclosure around 0 that rounds to -0 at one end and +0 at the other rounds to zero: decided, since
    # elements are compared as numbers (signed zeros equal, as verify's exact contract compares them)
    decided = [None if d is None else np.where(np.isnan(d) & (np.abs(r.value) + r.bound < fmt.smallest_subnormal / 2),
                                               0.0, d) for d, r in zip(decided, ref)]
    unsure = sum(int(np.isnan(d).sum()) for d in decided if d is not None)
    if unsure:
        n, v, dd = lp.shape
        if not asked and n * v * dd > EXACT_CERTIFY_LIMIT:
            return [np.zeros(g.shape, dtype=bool) for g in got], False, []
        from gradcheck.errors import CertificationError
        from gradcheck.linear_exact import certified_linear_grad

        try:
            truth = certified_linear_grad(lp, fmt)
        except CertificationError:
            if asked:
                raise
            return [np.zeros(g.shape, dtype=bool) for g in got], False, []  # undecidable here: "exact" not certified
        decided = [None if d is None else np.where(np.isnan(d), t.astype(np.float64), d)
                   for d, t in zip(decided, truth)]
    decided = [d for d in decided if d is not None]
    return [g.astype(np.float64) == d for g, d in zip(got, decided)], True, decided


def compare_linear(got: tuple[np.ndarray, ...], case: LinearCase, *, precision: str | None = None,
                   grades: dict[str, tuple[float, bool]] | None = None) -> Failure | tuple[float, float]:
    """Compare the gradients with the oracle: wrong where ``|got - reference| > tolerance + bound`` (then
    ``|got - truth| > tolerance`` for certain; docs/linear.md, "Deciding a failure"), under the contract
    ``precision`` (default the kernel contract); "exact" compares with the correctly rounded truth bit for bit.

    ``grades``: when given, filled with ``contract -> (worst ratio, met)`` for every contract of the dtype.
    """
    lp = case.problem
    fmt = lp.format
    asked = default_linear_contract(fmt) if precision in (None, KERNEL_ALIAS) else precision
    ref = bounded(lp)
    wanted = linear_contracts(fmt) if grades is not None else (asked,)
    tols, vacuous = contract_tolerances(lp, ref, wanted, asked)
    present = [(name, g, r) for name, g, r in zip(GRADIENTS, got, ref) if r is not None]
    for name, g, r in present:
        g64 = g.astype(np.float64)
        bad = ~np.isfinite(g64)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            return _failure(FailureKind.NONFINITE, f"grad_fn returned {g64[where]!r} in {name} at {where} where the truth "
                            f"is finite ({r.value[where]!r})", case, name, where, expected=float(r.value[where]),
                            got=float(g64[where]))
    errs = [np.abs(g.astype(np.float64) - r.value) for _, g, r in present]
    oks: dict[str, list[np.ndarray]] = {}
    ratios: dict[str, list[np.ndarray]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for contract, tol in tols.items():
            ts = [t for t in tol if t is not None]
            ratios[contract] = [np.where(e == 0, 0.0, e / t) for e, t in zip(errs, ts)]
            oks[contract] = [e <= t + r.bound for e, t, (_, _, r) in zip(errs, ts, present)]
        if "exact" in wanted:
            masks, certain, rounded = exact_ok(tuple(g for _, g, _ in present), lp, ref, asked=asked == "exact")
            if certain:
                # the error from the correctly rounded value in half ULPs: 0 when met, at least 2 when not
                oks["exact"] = masks
                ratios["exact"] = [np.where(m, 0.0, np.abs(g.astype(np.float64) - x) / (0.5 * fmt.ulp(np.abs(x))))
                                   for m, (_, g, _), x in zip(masks, present, rounded)]
            else:
                vacuous = (*vacuous, "exact")
    if grades is not None:
        for c in oks:
            grades[c] = (max(float(x.max(initial=0.0)) for x in ratios[c]), all(bool(x.all()) for x in oks[c]))
        for c in vacuous:  # no error model (or no certification) for this case: the contract is not met
            grades[c] = (math.inf, False)
    worst_ratio, worst_ulps = 0.0, 0.0
    wrong: tuple[float, str, tuple[int, ...], float, float, float, float] | None = None
    for k, (name, g, r) in enumerate(present):
        ratio, ok = ratios[asked][k], oks[asked][k]
        value = r.value if asked != "exact" else rounded[k]  # "exact": the correctly rounded truth
        t = tols[asked][GRADIENTS.index(name)] if asked != "exact" else 0.5 * fmt.ulp(np.abs(value))
        ulps = ulp_distance(g, round_to_format(r.value, fmt))
        worst_ratio = max(worst_ratio, float(ratio.max(initial=0.0)))
        worst_ulps = max(worst_ulps, float(ulps.max(initial=0.0)))
        if not ok.all():
            flat = np.where(~ok, np.where(np.isfinite(ratio), ratio, np.finfo(np.float64).max), -1.0)
            where = tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), flat.shape))
            if wrong is None or ratio[where] > wrong[0]:
                wrong = (float(ratio[where]), name, where, float(value[where]), float(g[where]), float(ulps[where]),
                         float(t[where]))
    if wrong is not None:
        ratio, name, where, expected, value, ulps, tolerance = wrong
        return _failure(FailureKind.MISMATCH, f"{name} differs from the truth by {ratio:.3g} x the tolerance of the "
                        f"{asked} contract at {where}", case, name, where,
                        expected=float(round_to_format(np.array(expected), fmt)), got=value, ulps=ulps,
                        tolerance=tolerance, ratio=ratio)
    return worst_ulps, worst_ratio


def _failure(kind: FailureKind, message: str, case: LinearCase, gradient: str = "", index: Any = None,
             **values: Any) -> LinearFailure:
    return LinearFailure(kind, message, case, index, gradient=gradient, **values)  # type: ignore[arg-type]


def _call(grad_fn: Callable[..., Any], case: LinearCase, timeout: float | None,
          inplace: str) -> Failure | tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Call ``grad_fn`` on private copies; returns (its arrays as numpy, private copies of them)."""
    lp = case.problem
    args = {"hidden": lp.hidden.copy(), "weight": lp.weight.copy(), "targets": case.targets.copy()}
    kwargs = case.options()
    extra = {}
    if lp.bias is not None:
        extra["bias"] = lp.bias.copy()
    if case.grad_output is not None:
        g = case.grad_output
        extra["grad_output"] = g.copy() if isinstance(g, np.ndarray) else g
    before = {k: np.array(x, copy=True) for k, x in
              {**args, **extra, **({"ce_weight": kwargs["ce_weight"]} if "ce_weight" in kwargs else {})}.items()}
    try:
        result = call_with_deadline(grad_fn, timeout, args["hidden"], args["weight"], args["targets"], **kwargs, **extra)
    except Hung:
        return _failure(FailureKind.TIMEOUT, f"grad_fn did not return within the timeout of {timeout:g} s", case)
    except SystemExit as exc:
        return _failure(FailureKind.EXCEPTION, f"grad_fn raised SystemExit({exc.code!r}): it called sys.exit() or exit()",
                        case)
    except Exception as exc:  # noqa: BLE001 - any exception is the finding
        return _failure(FailureKind.EXCEPTION, f"grad_fn raised {type(exc).__name__}: {exc}", case)
    now = {**args, **extra, **({"ce_weight": kwargs["ce_weight"]} if "ce_weight" in kwargs else {})}
    own = ("hidden",) if inplace == "allowed" else ()
    for name, value in now.items():
        if name in own or not isinstance(value, np.ndarray):
            continue
        if not same_bits(value, before[name]):
            diff = value.view(np.uint8).reshape(value.shape + (-1,)) != before[name].view(np.uint8).reshape(value.shape + (-1,))
            where = tuple(int(i) for i in np.argwhere(diff.any(axis=-1))[0]) if value.ndim else ()
            return _failure(FailureKind.MUTATION, f"grad_fn modified its {name} argument in place: {name}{list(where)} was "
                            f"{before[name][where]!r}, became {value[where]!r}", case, index=where)
    expected = 3 if lp.bias is not None else 2
    shapes = (lp.hidden.shape, lp.weight.shape, None if lp.bias is None else lp.bias.shape)
    if not isinstance(result, (tuple, list)) or len(result) != expected:
        what = "(d_hidden, d_weight, d_bias)" if expected == 3 else "(d_hidden, d_weight)"
        got = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) else type(result).__name__
        return _failure(FailureKind.TYPE, f"grad_fn must return {what}, got {got}", case)
    arrays, copies = [], []
    fmt = case.format
    for name, value, shape in zip(GRADIENTS, result, shapes):
        if value is None:
            return _failure(FailureKind.TYPE, f"grad_fn returned None for {name}, not an array", case, name)
        try:
            x = to_numpy(value)
        except Exception as exc:  # noqa: BLE001
            return _failure(FailureKind.TYPE, f"grad_fn returned {type(value).__name__} for {name}, not an array ({exc})",
                            case, name)
        if x.shape != shape:
            return _failure(FailureKind.SHAPE, f"grad_fn returned {name} of shape {x.shape}, expected {shape}", case, name)
        if x.dtype != fmt.dtype:
            return _failure(FailureKind.DTYPE, f"grad_fn returned {name} of dtype {x.dtype}, expected {fmt.name}", case,
                            name)
        for arg, array in now.items():
            if arg not in own and isinstance(array, np.ndarray) and np.may_share_memory(x, array):
                return _failure(FailureKind.ALIASING, f"grad_fn returned {name} as a view of its {arg} argument; return "
                                "a new array", case, name)
        arrays.append(x)
        copies.append(np.array(x, order="C", copy=True))
    for i in range(len(arrays)):
        for j in range(i):
            if np.may_share_memory(arrays[i], arrays[j]):
                return _failure(FailureKind.ALIASING, f"grad_fn returned {GRADIENTS[i]} and {GRADIENTS[j]} in one buffer",
                                case, GRADIENTS[i])
    return tuple(arrays), tuple(copies)


# ---- simplifying a failure ------------------------------------------------------------------------------------------


def simplify_linear(grad_fn: Callable[..., Any], failure: Failure, *, timeout: float | None = None,
                    inplace: str = "flag", precision: str | None = None) -> Failure:
    """Drop rows, classes and hidden dimensions, then round values, while the case fails the same way."""
    if failure.kind == FailureKind.TIMEOUT:
        return failure
    budget = [SIMPLIFY_BUDGET]
    keep_ratio = min(failure.ratio or 0.0, 2.0)

    def attempt(candidate: LinearCase | None) -> Failure | None:
        if candidate is None or budget[0] <= 0:
            return None
        budget[0] -= 1
        outcome = check_linear(grad_fn, candidate, timeout=timeout, inplace=inplace, precision=precision)
        if isinstance(outcome, Failure) and outcome.kind == failure.kind and (outcome.ratio or 0.0) >= keep_ratio:
            return outcome
        return None

    current = failure
    for axis in ("rows", "classes", "dims"):
        current = _drop(current, axis, attempt)
    return _round(current, attempt)


def _size(case: LinearCase, axis: str) -> int:
    n, v, d = case.problem.shape
    return {"rows": n, "classes": v, "dims": d}[axis]


def _subset(case: LinearCase, keep: np.ndarray, axis: str) -> LinearCase | None:
    lp = case.problem
    g = lp.logits.grad_output
    try:
        if axis == "rows":
            g = g[keep] if g is not None and g.ndim == 1 else g
            return case.replace(hidden=lp.hidden[keep], targets=case.targets[keep], grad_output=g)
        if axis == "dims":
            return case.replace(hidden=lp.hidden[:, keep], weight=lp.weight[:, keep])
        t = case.targets
        if t.ndim == 1:
            ignore = lp.options["ignore_index"]
            if 0 <= ignore < keep.size:
                return None
            active = t != ignore
            if not np.all(keep[t[active]]):
                return None
            t = t.copy()
            t[active] -= np.cumsum(~keep)[t[active]]
        else:
            t = t[:, keep]
        w = lp.logits.weight
        return case.replace(weight=lp.weight[keep], bias=None if lp.bias is None else lp.bias[keep], targets=t,
                            ce_weight=None if w is None else w[keep])
    except InvalidArgument:
        return None


def _drop(failure: Failure, axis: str, attempt: Callable[[LinearCase | None], Failure | None]) -> Failure:
    chunk = _size(failure.case, axis) // 2
    while chunk >= 1 and _size(failure.case, axis) > 1:
        if -(-_size(failure.case, axis) // chunk) > 16:
            break
        start = 0
        while start < _size(failure.case, axis) and _size(failure.case, axis) > 1:
            keep = np.ones(_size(failure.case, axis), dtype=bool)
            keep[start:start + chunk] = False
            found = attempt(_subset(failure.case, keep, axis)) if keep.any() else None
            if found is not None:
                failure = found
            else:
                start += chunk
        chunk //= 2
    return failure


def _round(failure: Failure, attempt: Callable[[LinearCase | None], Failure | None]) -> Failure:
    for name in ("hidden", "weight", "bias"):
        array = getattr(failure.case, name)
        if array is None or array.size > PRINT_LIMIT:
            continue
        fmt = float_format(array.dtype)
        for flat in range(array.size):
            current = getattr(failure.case, name)
            value = float(current.reshape(-1)[flat].astype(np.float64))
            for simple in [s for s in (0.0, float(np.sign(value)), float(f"{value:.1g}")) if s != value]:
                trial = current.copy()
                trial.reshape(-1)[flat] = round_to_format(np.array(simple), fmt)
                try:
                    candidate = failure.case.replace(**{name: trial})
                except InvalidArgument:
                    continue
                found = attempt(candidate)
                if found is not None:
                    failure = found
                    break
    return failure


FINALIZE_LIMIT = 4096  # largest N * V * D whose reported expected value comes from the certified truth


def finalize_linear(failure: Failure) -> Failure:
    """Report the worst element's expected value as the certified truth (small cases; else the oracle's
    rounding, within its bound)."""
    if failure.kind != FailureKind.MISMATCH or failure.index is None:
        return failure
    lp = failure.case.problem
    n, v, d = lp.shape
    if n * v * d > FINALIZE_LIMIT:
        return failure
    from gradcheck.linear_exact import certified_linear_grad

    truth = certified_linear_grad(lp, lp.format)[GRADIENTS.index(failure.gradient)]
    expected = float(truth[failure.index])
    ulps = float(ulp_distance(np.array(failure.got, dtype=lp.format.dtype), np.array(expected, dtype=lp.format.dtype)))
    return LinearFailure(failure.kind, failure.message, failure.case, failure.index, expected, failure.got, ulps,
                         failure.tolerance, failure.ratio, gradient=failure.gradient)


# ---- messages -------------------------------------------------------------------------------------------------------


def describe_linear(result: Verification) -> str:
    """The failure message: which gradient and element, expected and got, the minimal input, the seed, the
    reproduction."""
    f = result.failure
    if f is None:
        return str(result)
    case = f.case
    fmt = case.format
    gradient = getattr(f, "gradient", "")
    lines = [f"{result.function} is wrong ({f.kind}){' in ' + gradient if gradient else ''}: {f.message}."]
    if f.kind == FailureKind.MISMATCH:
        lines.append(mismatch_line(f, fmt, f"{gradient}{list(f.index)}", f"the {result.precision} contract's tolerance",
                                   "docs/linear.md"))
    n, v, d = case.problem.shape
    options = case.options()
    if case.grad_output is not None:
        options["grad_output"] = case.grad_output
    lines += [
        f"  minimal failing input (regime {case.regime!r}, {fmt.name}, N={n}, V={v}, D={d}, found after "
        f"{result.examples} examples):",
        f"    hidden = {format_array(case.hidden)}",
        f"    weight = {format_array(case.weight)}",
        *([f"    bias = {format_array(case.bias)}"] if case.bias is not None else []),
        f"    targets = {format_array(case.targets)}",
        f"    options = {format_options(options)}",
        f"  seed {result.seed}; reproduce with:",
        f"    {result.reproduction}",
        f"    or call {result.function}(hidden, weight, targets, {'bias=bias, ' if case.bias is not None else ''}"
        "**options) with the arrays above",
    ]
    return "\n".join(lines)


# ---- the entry points -----------------------------------------------------------------------------------------------


def verify_linear(grad_fn: Callable[..., Any], *, progress: Callable[..., Any] | None = None,
                  **options: Any) -> LinearVerification:
    """Check a fused linear cross-entropy ``grad_fn`` on Hypothesis-generated cases (docs/linear.md).

    Args:
        grad_fn: ``grad_fn(hidden, weight, targets, **options)`` returning ``(d_hidden, d_weight)``, or
            ``(d_hidden, d_weight, d_bias)`` when called with ``bias=`` (``bias=True``): numpy, torch or
            JAX arrays of the inputs' shapes and dtype. It gets numpy arrays of ``dtype``, the non-default
            case options as keywords (class weights as ``ce_weight=``), and ``grad_output=`` (a number for
            "mean"/"sum", N numbers for "none") in half the examples when its signature accepts it.
        **options: the check options of :data:`LINEAR_VERIFY`: ``dtype``, ``bias``, ``targets``,
            ``reduction``, ``label_smoothing``, ``lse_square_scale``, ``softcap``, ``weighted`` (pass
            ``ce_weight=``), ``ignore_index`` (some and most rows take it), ``inplace``, ``max_examples``,
            ``seed``, ``timeout``, ``max_shape`` ``(N, V, D)`` (default ``(64, 1024, 64)``) and ``precision``:
            the contract checked (docs/linear.md, "Precision contracts"): None or "kernel" (the default:
            float32 accumulation, intermediates stored in the dtype at most once; "float32", or "float64" for
            float64), "exact" (every element correctly rounded), "float64", "float32", or the dtype itself.

    The result's ``grade`` is the tightest contract met on every example, ``contract_ratios`` the worst
    error under each contract as a multiple of its tolerance.

        progress: called as verify's is (the CLI's progress bar), see :func:`gradcheck.checking.search._search`.

    Returns:
        A :class:`LinearVerification`; it never raises because a gradient is wrong.

    Raises:
        InvalidArgument: a bad argument.
    """
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}.")
    o = LINEAR_VERIFY.validate(options, where="verify_linear()")
    require_deadline(o["timeout"])
    if o["targets"] == "probs" and o["ignore_index"] is not None:
        raise InvalidArgument(f"ignore_index applies to class-index targets only, got ignore_index={o['ignore_index']} "
                              "with targets='probs'. Drop one of them.")
    fmt = float_format(o["dtype"])
    precision = resolve_linear_contract(fmt, o["precision"], where=f"dtype={fmt.name!r}")
    arguments = {k: v for k, v in LINEAR_VERIFY.non_defaults(o).items() if k != "seed"}
    seed = secrets.randbits(32) if o["seed"] is None else o["seed"]
    strategy = linear_cases(dtype=fmt.name, max_shape=o["max_shape"], bias=o["bias"], targets=o["targets"],
                            weighted=o["weighted"], ignore_index=o["ignore_index"], reduction=o["reduction"],
                            label_smoothing=o["label_smoothing"], lse_square_scale=o["lse_square_scale"],
                            softcap=o["softcap"], upstream=takes_grad_output(grad_fn))
    start = time.perf_counter()
    stats = {"examples": 0, "ulps": 0.0, "ratio": 0.0, "failed": False}
    failure = _search(grad_fn, strategy, seed, o["max_examples"], stats, timeout=o["timeout"], inplace=o["inplace"],
                      precision=precision, judge=check_linear, progress=progress)
    if failure is not None and failure.case is not None:
        failure = finalize_linear(simplify_linear(grad_fn, failure, timeout=o["timeout"], inplace=o["inplace"],
                                                  precision=precision))
    met = stats.get("met", {})
    graded = not stats.get("ungraded") and stats["examples"] > 0
    grade = next((c for c in linear_contracts(fmt) if met.get(c)), None) if graded else None  # the tightest met
    ratios = {c: stats["ratios"][c] for c in linear_contracts(fmt) if c in stats.get("ratios", {})}
    return LinearVerification(
        passed=failure is None, examples=stats["examples"], worst_ulps=stats["ulps"], worst_ratio=stats["ratio"],
        seed=seed, dtype=fmt.name, function=_name(grad_fn), arguments=arguments, failure=failure,
        elapsed=time.perf_counter() - start, precision=precision, grade=grade, contract_ratios=ratios,
    )


def assert_linear_gradient(grad_fn: Callable[..., Any], **options: Any) -> None:
    """Like :func:`verify_linear`, but raise on a failure.

    Raises:
        GradientMismatch: naming the gradient and element, expected and got, the minimal h, W, b and targets,
            the seed and the reproduction line.
        InvalidArgument: a bad argument.
    """
    result = verify_linear(grad_fn, **options)
    if not result.passed:
        raise GradientMismatch(describe_linear(result))

