"""The report's prose and number formats, shared by the Markdown and HTML renderers."""

from __future__ import annotations

from gradcheck.study import Cell

MATH = (
    "For logits z (N x K), targets t, class weights w and label smoothing eps, torch's cross-entropy has "
    "the gradient dL/dz_ni = (p_ni S_n - w_i y_ni) / D, with p = softmax(z) per row, smoothed targets "
    "y = (1 - eps) t + eps / K, S_n = sum_c w_c y_nc, and D the reduction's divisor (the sum of the "
    "targets' weights for mean over class indices, N for mean over probabilities, 1 for sum and none). "
    "For one-hot targets without weights or smoothing it is the familiar (p - t) / N."
)
TRUTH = (
    "Every method is compared with the certified truth: exact rational arithmetic where the value is "
    "rational, mpmath interval arithmetic in Ziv's loop elsewhere, correctly rounded to the dtype "
    "(docs/exact.md). An error of 0 ULP means the method returned the correctly rounded value; "
    "'within estimate' is the share of cases where the method's own error estimate (a proven bound for "
    "closed_form) covered its actual error at every element."
)
PROVES: dict[str, str] = {
    "closed_form": "The formula itself, evaluated in float64 with a rigorous running error bound: agreement "
                   "with the truth shows the implementation of p S - w y is right and its bound holds.",
    "fd_forward": "Differences of the loss, knowing nothing of the formula: agreement within the estimate "
                  "shows the closed form is the derivative of the loss that is actually computed.",
    "fd_central": "As fd_forward, second order: a tighter independent check of the derivative.",
    "fd_complex_step": "Im L(z + ih) / h has no subtractive cancellation: an independent derivative close to "
                       "full precision where the options are analytic.",
    "fd_richardson": "Central differences extrapolated to h = 0: independent of the formula, with an "
                     "estimate from the extrapolation table.",
    "jax_autodiff": "Reverse-mode autodiff of a jnp loss in the input dtype: what a framework computes.",
    "jax_autodiff_x64": "The same in float64: autodiff agrees with the truth within its estimate (XLA flushes "
                        "subnormals to zero: large ULP counts on tiny elements).",
    "sympy_numpy": "SymPy's symbolic derivative of the loss, lambdified for numpy: the derivative a computer "
                   "algebra system finds, evaluated in float64.",
    "sympy_mpmath": "SymPy's derivative evaluated with mpmath at adaptive precision: the symbolic derivative "
                    "agrees with the truth to the last bit.",
}
REGIMES: dict[str, str] = {
    "moderate": "moderate logits", "large_gap": "large gaps: probabilities underflow",
    "huge": "logits near the format's maximum", "ties": "equal largest logits",
    "masked": "-inf logits", "soft_unnormalized": "probability targets, not normalized",
    "smoothed_weighted": "label smoothing and class weights", "ignored": "rows with ignore_index",
    "saturated": "softcap c (0.5 to 32), |z| up to 50 c: tanh saturates",
    "large_lse": "z-loss lambda (1e-4 to 0.1), logits near +-300",
}
KERNEL = (
    "The kernel options (Liger-Kernel's convention; torch has neither): softcap c makes the logits "
    "z' = c tanh(z / c) first, so the gradient gains the chain factor 1 - tanh^2(z / c); the z-loss adds "
    "lambda lse(z')^2 per counted row, so dL/dz' gains 2 lambda lse p / Dz (Dz the number of counted rows "
    "under mean). Their rows are apart from the plain regimes and not in the summary."
)


def kernel_options(options: dict) -> str:
    """A kernel group's or case's options in a few characters: 'lambda=0.125, c=5, grad_output', or '-'."""
    parts = []
    if options.get("lseSquareScale"):
        parts.append(f"lambda={options['lseSquareScale']:g}")
    if options.get("softcap") is not None:
        parts.append(f"c={options['softcap']:g}")
    if options.get("upstream"):
        parts.append("grad_output")
    return ", ".join(parts) or "-"
ULP_NOTE = (
    "ULP errors are counted per element. Approximate methods (finite differences) have huge ULP errors "
    "on elements that are tiny next to the rest of their row (e.g. a probability of 1e-30 estimated as "
    "1e-12): their absolute error is still within their estimate. For them 'within estimate' is the "
    "column that matters; for the exact methods it is the ULP error."
)


def fmt_ulp(x: float | None) -> str:
    """A ULP count for a table: integers as such, large values in scientific notation, '-' for none."""
    if x is None:
        return "-"
    if x < 1e5:
        return f"{x:g}"
    return f"{x:.2e}"


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def cell_text(c: Cell) -> str:
    """'max / median (share)', or why there is nothing."""
    if c.usable == 0:
        return "unsupported" if c.unsupported == c.cases else f"non-finite ({c.non_finite})"
    extra = f", {c.cases - c.usable} n/a" if c.usable < c.cases else ""
    return f"{fmt_ulp(c.max_ulp)} / {fmt_ulp(c.median_ulp)} ({fmt_share(c.within_share)}{extra})"
