"""The failure message of a verification, and the arrays and options in it as Python source."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gradcheck.checking.result import FailureKind
from gradcheck.dtypes import float_format, is_supported_float

if TYPE_CHECKING:
    from gradcheck.checking.result import Verification

PRINT_LIMIT = 64  # largest number of logits printed in a message


def describe(result: Verification) -> str:
    """The full failure message: what is wrong, where, the minimal input, the seed, how to reproduce."""
    f = result.failure
    if f is None:
        return str(result)
    case = f.case
    fmt = case.format
    lines = [f"{result.function} is wrong ({f.kind}): {f.message}."]
    if f.kind == FailureKind.MISMATCH:
        lines.append(mismatch_line(f, fmt, f"{f.index}", "the tolerance", "docs/tolerance.md"))
        lines += contract_lines(result, fmt.name)
    if f.diagnosis:
        lines.append(f"  diagnosis: {f.diagnosis}.")
    upstream = case.grad_output
    lines += [
        f"  minimal failing input (regime {case.regime!r}, {fmt.name}, found after {result.examples} examples):",
        f"    logits = {format_array(case.logits)}",
        f"    targets = {format_array(case.targets)}",
        f"    options = {format_options(case.options())}",
    ]
    if upstream is not None:
        lines.append(f"    grad_output = {format_value(upstream)}")
    call = "logits, targets, grad_output=grad_output, **options" if upstream is not None else "logits, targets, **options"
    lines += [
        f"  {result.upstream_text}.",
        f"  seed {result.seed}; reproduce with:",
        f"    {result.reproduction}",
        f"    or call {result.function}({call}) with the arrays above",
    ]
    return "\n".join(lines)


def mismatch_line(f: Any, fmt: Any, element: str, tolerance: str, doc: str) -> str:
    """The line a mismatch's message gives its worst element: both values, the error against ``tolerance``
    (its name in the text), in absolute terms and in ULPs, and the doc that derives it."""
    tol_ulps = f.tolerance / float(fmt.ulp(f.expected))
    return (f"  worst element {element}: expected {f.expected!r} (the truth rounded to {fmt.name}), got "
            f"{f.got!r}; error {f.ratio:.3g} x {tolerance} {f.tolerance:.3g} (absolute error "
            f"{abs(f.got - f.expected):.3g}, {f.ulps:g} ULP; the tolerance is {tol_ulps:.3g} ULP, {doc})")


def contract_meaning(precision: str, dtype: str) -> str:
    """What a precision contract promises, in one sentence."""
    if precision == "exact":
        return f"the result is the correctly rounded truth in {dtype}"
    if precision == dtype:
        return f"a correct implementation may compute in {dtype} itself"
    return f"a correct implementation computes in {precision} (or wider) and rounds once to {dtype}"


def contract_lines(result: Verification, dtype: str) -> list[str]:
    """Which contract was asked, what it means, which grade the function reached, how to ask for it."""
    lines = [f"  contract precision={result.precision!r}: {contract_meaning(result.precision, dtype)}."]
    ratios = ", ".join(f"{c} {r:.3g} x" for c, r in result.contract_ratios.items())
    if result.grade is None:
        lines.append(f"  it met no contract on the examples run (worst error per contract: {ratios}).")
    else:
        lines.append(f"  it reached grade {result.grade!r}: {contract_meaning(result.grade, dtype)} "
                     f"(worst error per contract: {ratios}). If that is what you intend, check it with "
                     f"precision={result.grade!r}.")
    return lines


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


def format_value(x: Any) -> str:
    """Python source for an array, or for a numpy scalar of a float dtype (``np.float16(0.5)``)."""
    if isinstance(x, np.ndarray):
        return format_array(x)
    fmt = float_format(np.asarray(x).dtype)
    dtype = "ml_dtypes.bfloat16" if fmt.name == "bfloat16" else f"np.{fmt.name}"
    return f"{dtype}({float(x)!r})"


def format_options(options: dict[str, Any]) -> str:
    """Python source for the keyword options of a case (arrays through :func:`format_array`)."""
    parts = [f"{k!r}: {format_array(v) if isinstance(v, np.ndarray) else repr(v)}" for k, v in options.items()]
    return "{" + ", ".join(parts) + "}"


def _name(fn: Any) -> str:
    """The importable name of a function, ``module.qualname`` (the bare name for __main__ and builtins)."""
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{module}.{name}" if module and module not in ("__main__", "builtins") else str(name)
