"""Every option, defined once: its name, default, the one validation rule and its help text.

Two tables use these definitions:

* :data:`CASE` — the options of a case, taken by every numeric entry point (``cross_entropy_grad``,
  ``exact_grad``, ``make_problem``, ``gradient``, ...) and passed to a ``grad_fn``;
* :data:`VERIFY` — the options of a check, taken by ``verify``/``assert_gradient``, the pytest
  marker and fixture, and ``gradcheck verify`` (whose flags are generated from this table).

One rule for Python and numpy values, the same through every entry point (tests/test_options.py):

* a **number** accepts ``int``, ``float`` and numpy integer or floating scalars (also 0-d arrays of
  them) and keeps a Python ``float``; it refuses ``bool`` (``True`` is not 1.0), strings and non-finite
  values;
* an **integer** accepts ``int`` and numpy integers and keeps an ``int``; it refuses ``bool`` and
  floats (even ``2.0``);
* a **flag** accepts ``True``/``False`` and ``numpy.bool_``, nothing else;
* a **choice** accepts one of its strings.

Checks that need more than one option, or the data (``weight`` needs K, ``ignore_index`` needs index
targets), live where that is known: :func:`gradcheck.problem.make_problem` for cases.

Adding an option: one :class:`Option` here, placed in the table(s) it belongs to; its numerics; its
tests (docs/ARCHITECTURE.md, "Adding an option").

This module imports the standard library only, so the pytest plugin and the CLI can build their
keywords and flags from it without loading numpy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradcheck.errors import InvalidArgument

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """One option.

    Attributes:
        name: the keyword.
        default: its value when not given (never passed to a ``grad_fn``).
        check: ``check(name, value)`` returns the canonical value or raises InvalidArgument.
        help: one line for docstrings, ``--help`` and the plugin's marker documentation.
        parse: turns a command-line or ini string into a value before ``check`` (None: not a flag).
        metavar: the flag's placeholder in ``--help``.
        choices: the allowed values, when they are a fixed set (for ``--help`` and argparse).
    """

    name: str
    default: Any
    check: Check
    help: str
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        return self.check(self.name, value)

    def from_text(self, text: str) -> Any:
        """A command-line or ini string, parsed and then checked by the same one rule.

        Raises:
            InvalidArgument: the text does not parse, or its value breaks the rule (the same message
                as the value would get from the Python API).
        """
        if self.parse is None:
            raise InvalidArgument(f"{self.name} cannot be given as text, got {text!r}.")
        try:
            value = self.parse(text)
        except (TypeError, ValueError):
            value = text  # the rule refuses a string with its own message
        return self.validate(value)

    @property
    def is_flag(self) -> bool:
        return self.check is flag


class OptionTable(Mapping[str, Option]):
    """An ordered set of options, with one function that validates keyword arguments against it."""

    def __init__(self, what: str, options: Iterable[Option]) -> None:
        self.what = what
        self._options = {o.name: o for o in options}

    def __getitem__(self, name: str) -> Option:
        return self._options[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def subset(self, what: str, names: Iterable[str]) -> OptionTable:
        """The table of some of these options (same definitions, this table's order)."""
        wanted = set(names)
        return OptionTable(what, (o for name, o in self._options.items() if name in wanted))

    def defaults(self) -> dict[str, Any]:
        return {name: o.default for name, o in self._options.items()}

    def validate(self, given: Mapping[str, Any], *, where: str) -> dict[str, Any]:
        """Every option of the table, given ones checked and the others at their defaults.

        Raises:
            InvalidArgument: an unknown keyword (naming the known ones), or a value its rule refuses.
        """
        unknown = [k for k in given if k not in self._options]
        if unknown:
            raise InvalidArgument(
                f"{where} got an unknown option {unknown[0]!r}; its {self.what} are {', '.join(self._options)}."
            )
        return {name: (o.validate(given[name]) if name in given else o.default) for name, o in self._options.items()}

    def non_defaults(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of validated ``values`` that differ from their defaults, in table order."""
        return {k: v for k, v in values.items() if k in self._options and not _same(v, self._options[k].default)}


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays
        return False


# ---- the rules -----------------------------------------------------------------------------------


def _is_bool(value: Any) -> bool:
    """bool or numpy's bool scalar (named bool_ or bool), told apart without importing numpy."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def _is_real(value: Any) -> bool:
    if _is_bool(value):
        return False
    if isinstance(value, numbers.Real):  # int, float, numpy integer and floating scalars
        return True
    shape = getattr(value, "shape", None)  # a 0-d numpy array
    return shape == () and getattr(getattr(value, "dtype", None), "kind", "") in "iuf"


def number(low: float, high: float = math.inf, *, low_open: bool = False, allow_none: bool = False) -> Check:
    """A finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``), kept as float."""
    left = "(" if low_open else "["
    span = f"{left}{low:g}, {high:g}]" if math.isfinite(high) else (f"> {low:g}" if low_open else f">= {low:g}")
    words = f"in {span}" if math.isfinite(high) else span

    def check(name: str, value: Any) -> float | None:
        if value is None and allow_none:
            return None
        if not _is_real(value):
            none = " or None" if allow_none else ""
            raise InvalidArgument(f"{name} must be a number {words}{none}, got {value!r}.")
        x = float(value)
        inside = (low < x if low_open else low <= x) and x <= high
        if not (math.isfinite(x) and inside):
            raise InvalidArgument(f"{name} must be a number {words}, got {value!r}.")
        return x

    return check


def integer(minimum: int | None = None, *, allow_none: bool = False) -> Check:
    """An integer (not a bool, not a float), at least ``minimum`` when given, kept as int."""

    def check(name: str, value: Any) -> int | None:
        if value is None and allow_none:
            return None
        what = {None: "an integer", 0: "a nonnegative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        what += " or None" if allow_none else ""
        if _is_bool(value) or not isinstance(value, numbers.Integral):
            raise InvalidArgument(f"{name} must be {what}, got {value!r}.")
        if minimum is not None and value < minimum:
            raise InvalidArgument(f"{name} must be {what}, got {value!r}.")
        return int(value)

    return check


def flag(name: str, value: Any) -> bool:
    """True or False (numpy.bool_ too), kept as bool."""
    if _is_bool(value):
        return bool(value)
    raise InvalidArgument(f"{name} must be True or False, got {value!r}.")


def choice(values: tuple[str, ...]) -> Check:
    allowed = f"{values[0]!r} or {values[1]!r}" if len(values) == 2 else f"one of {values}"

    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in values:
            raise InvalidArgument(f"{name} must be {allowed}, got {value!r}.")
        return value

    return check


def array_or_none(name: str, value: Any) -> Any:
    """Passed through; the shape and values are checked where K is known (make_problem)."""
    return value


def dtype_name(name: str, value: Any) -> str:
    """A float format given by name, numpy dtype or ml_dtypes type; kept as its name."""
    from gradcheck.dtypes import float_format  # numpy; loaded when a check is actually validated

    return float_format(value).name


def precision_name(name: str, value: Any) -> str | None:
    """A precision contract (docs/tolerance.md, "Precision contracts"); checked against the dtype by verify."""
    if value is None:
        return None
    known = ("exact", "float64", "float32", "float16", "bfloat16")
    if isinstance(value, str) and value in known:
        return value
    try:
        return dtype_name(name, value)  # a numpy dtype or ml_dtypes type names its format
    except InvalidArgument:
        raise InvalidArgument(f"{name} must be one of {known} or None, got {value!r}.") from None


def shape_pair(name: str, value: Any) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a pair (N, K), got {value!r}.") from None
    if n < 1 or k < 1:
        raise InvalidArgument(f"{name} must be (N, K) with N, K >= 1, got {value!r}.")
    return n, k


def shape_list(name: str, value: Any) -> tuple[tuple[int, ...], ...] | None:
    """None, or a non-empty sequence of logits shapes, each of at least 2 positive integer sizes."""
    if value is None:
        return None
    example = "e.g. [(8, 128256), (2, 1024, 32000)]"
    shapes = None
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        shapes = [tuple(s) if isinstance(s, Iterable) and not isinstance(s, (str, bytes)) else None for s in value]
    if not shapes or any(s is None for s in shapes):
        raise InvalidArgument(f"{name} must be a non-empty list of logits shapes ({example}), got {value!r}.")
    out = []
    for s in shapes:
        if len(s) < 2 or any(_is_bool(d) or not isinstance(d, numbers.Integral) or d < 1 for d in s):
            raise InvalidArgument(
                f"{name} must hold shapes of 2 or more positive integers ({example}), got {s!r} in {value!r}.")
        out.append(tuple(int(d) for d in s))
    return tuple(out)


def _shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """``8x128256,2x1024x32000``: shapes separated by commas (or spaces), sizes by ``x``."""
    return tuple(tuple(int(d) for d in part.split("x")) for part in text.replace(",", " ").split() if part)


def regime_names(name: str, value: Any) -> tuple[str, ...]:
    from gradcheck.regimes import drawn_by

    known = drawn_by("verify")
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else None
    if not names or any(r not in known for r in names):
        raise InvalidArgument(f"{name} must be a non-empty subset of {known}, got {value!r}.")
    return names


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.replace(",", " ").split() if part)


def _pair(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.replace("x", ",").split(","))


# ---- the options ---------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")
TARGET_KINDS = ("index", "probs")
DEFAULT_IGNORE_INDEX = -100
MAX_SHAPE = (64, 4096)

REDUCTION = Option("reduction", "mean", choice(REDUCTIONS),
                   "how row losses combine: 'mean' (torch's divisor), 'sum' or 'none' (per row)",
                   parse=str, metavar="R", choices=REDUCTIONS)
LABEL_SMOOTHING = Option("label_smoothing", 0.0, number(0.0, 1.0),
                         "eps in [0, 1]: targets become (1 - eps) t + eps / K", parse=float, metavar="EPS")
WEIGHT = Option("weight", None, array_or_none, "class weights, K finite numbers (negative ones too, as torch), or None")
IGNORE_INDEX = Option("ignore_index", DEFAULT_IGNORE_INDEX, integer(),
                      "rows whose class-index target equals it are skipped")
LSE_SQUARE_SCALE = Option("lse_square_scale", 0.0, number(0.0),
                          "lambda >= 0: each counted row adds lambda * logsumexp(z)^2 (PaLM's z-loss), "
                          "unweighted, divided under 'mean' by the number of counted rows",
                          parse=float, metavar="LAMBDA")
SOFTCAP = Option("softcap", None, number(0.0, low_open=True, allow_none=True),
                 "c > 0: logits become c * tanh(z / c) before everything else (Gemma-2 softcapping; "
                 "-inf maps to -c)", parse=float, metavar="C")
GRAD_OUTPUT = Option("grad_output", None, array_or_none,
                     "the upstream gradient: a number for 'mean'/'sum', N numbers for 'none' (None: ones); "
                     "the gradient is grad_output times dL/dz")

CLASS_AXIS = Option("class_axis", None, integer(allow_none=True),
                    "the logits' class axis: 1 for torch's (N, C, d1, ..., dk), -1 for the LLM layout (B, T, V); "
                    "required for 3-D and more (None: the last axis of (K,) or (N, K))", parse=int, metavar="AXIS")

CASE = OptionTable("case options", (WEIGHT, IGNORE_INDEX, REDUCTION, LABEL_SMOOTHING, LSE_SQUARE_SCALE, SOFTCAP,
                                    GRAD_OUTPUT, CLASS_AXIS))

VERIFY = OptionTable("check options", (
    Option("dtype", "float64", dtype_name, "the dtype of the arrays given to grad_fn",
           parse=str, metavar="DTYPE", choices=("float64", "float32", "float16", "bfloat16")),
    Option("precision", None, precision_name,
           "the contract checked: the narrowest working precision a correct implementation may use "
           "before rounding once to the dtype ('exact', 'float64', 'float32' or the dtype itself; "
           "default float32 for float16/bfloat16, the dtype otherwise)", parse=str, metavar="P"),
    Option("targets", "index", choice(TARGET_KINDS), "'index' (class indices) or 'probs' (probabilities)",
           parse=str, metavar="KIND", choices=TARGET_KINDS),
    REDUCTION,
    LABEL_SMOOTHING,
    LSE_SQUARE_SCALE,
    SOFTCAP,
    Option("weighted", False, flag, "pass class weights (weight=, K values of the dtype)"),
    Option("ignore_index", None, integer(allow_none=True),
           "when set, passed to grad_fn and some rows take that target", parse=int, metavar="I"),
    Option("inplace", "flag", choice(("flag", "allowed")),
           "'flag': any write to an argument fails; 'allowed': grad_fn may write the gradient into its "
           "(private) logits buffer and return it, as Liger-Kernel does", parse=str, metavar="MODE",
           choices=("flag", "allowed")),
    Option("max_examples", 100, integer(1), "examples to generate", parse=int, metavar="N"),
    Option("seed", None, integer(0, allow_none=True), "the Hypothesis seed (random and recorded when None)",
           parse=int, metavar="S"),
    Option("max_shape", MAX_SHAPE, shape_pair, "the largest (N, K) generated", parse=_pair, metavar="N,K"),
    Option("shapes", None, shape_list,
           "draw every regime at exactly these logits shapes (2-D (N, K), or 3-D and more with class_axis); "
           "replaces max_shape", parse=_shapes, metavar="NxK,..."),
    CLASS_AXIS,
    Option("regimes", None, regime_names, "the logits regimes drawn from (default: all of verify's)",
           parse=_csv, metavar="R,..."),
    Option("timeout", None, number(0.0, low_open=True, allow_none=True),
           "seconds each grad_fn call may take before it fails as hung (default: no limit; POSIX, main thread)",
           parse=float, metavar="SECONDS"),
))

# What a Hypothesis strategy draws (gradcheck.strategies.cases): the check options without the search's own.
SEARCH = ("precision", "inplace", "max_examples", "seed", "timeout")  # how verify judges and runs, not what it draws
GENERATE = VERIFY.subset("generation options", (n for n in VERIFY if n not in SEARCH))
