"""Section 5: catch rate on the bug zoo and false alarms on its correct implementations, verify against the peers.

verify runs at its defaults (100 examples, shapes up to (64, 4096)), seed = the run's index. Each peer
checks ``settings.zoo_cases`` cases drawn from the same public strategy (shapes up to
``settings.zoo_shape``) at its own defaults; a run counts as a detection when any case fails or raises.
torch and jax install the grad_fn as the backward of the loss (benchmarks/verify_zoo.py); numdifftools
and scipy differentiate a numpy loss evaluated in the checked dtype (:func:`numpy_loss`) and compare
with ``np.allclose`` defaults.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import numpy as np

import bench_common as bc
import gradcheck
from bench_throughput import draw_cases
from gradcheck.adapters import to_numpy


def _grad(fn: Any, case: Any) -> np.ndarray:
    return np.asarray(to_numpy(fn(case.logits.copy(), case.targets.copy(), **case.options())))


def numpy_loss(case: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The case's loss in numpy, computed in the checked dtype, vectorized: (N K, ...) -> (...).

    ``sum_n sum_c wt_nc (logsumexp(z_n) - z_nc) / D`` with ``wt`` the weighted smoothed targets and ``D``
    the divisor of the reduction ("none": the sum of the row losses, whose gradient is checked).
    """
    problem = case.problem
    dtype = case.logits.dtype
    n, k = case.logits.shape
    wt = (problem.dense_targets() * problem.weights()).astype(dtype)[:, :, None]
    d = dtype.type(problem.divisor())

    def loss(xi: np.ndarray) -> np.ndarray:
        tail = np.shape(xi)[1:]
        x = np.asarray(xi).reshape(n, k, -1).astype(dtype)
        m = np.max(x, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        lse = m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))
        rows = np.sum(np.where(wt > 0, wt * (lse - x), 0), axis=1)
        return (np.sum(rows, axis=0) / d).reshape(tail)

    return loss


def numdifftools_check(fn: Any, case: Any) -> bool:
    """numdifftools.Gradient of the loss (in the checked dtype) vs the grad_fn, np.allclose defaults; True = passed."""
    import numdifftools as nd

    loss = numpy_loss(case)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            numeric = np.asarray(nd.Gradient(lambda x: float(loss(x)))(case.logits.astype(np.float64).ravel()))
            return bool(np.allclose(numeric.reshape(case.logits.shape), _grad(fn, case).astype(np.float64)))
    except Exception:  # noqa: BLE001 - a crash is a detection
        return False


def scipy_check(fn: Any, case: Any) -> bool:
    """scipy.differentiate.jacobian of the loss (in the checked dtype, vectorized) vs the grad_fn; True = passed."""
    from scipy.differentiate import jacobian

    loss = numpy_loss(case)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = jacobian(lambda xi: loss(xi)[None], case.logits.ravel())
            numeric = np.asarray(res.df)[0].reshape(case.logits.shape)
            return bool(np.allclose(numeric, _grad(fn, case).astype(np.float64)))
    except Exception:  # noqa: BLE001
        return False


def _peers() -> list[tuple[str, str, Callable[[Any, Any], bool]]]:
    import verify_zoo

    return [("torch.autograd.gradcheck", "torch", verify_zoo.torch_gradcheck),
            ("jax.test_util.check_grads", "jax", verify_zoo.jax_check_grads),
            ("numdifftools.Gradient + allclose", "numdifftools", numdifftools_check),
            ("scipy.differentiate.jacobian + allclose", "scipy.differentiate", scipy_check)]


def run(settings: bc.Settings, log: Callable[[str], None]) -> tuple[list[str], dict[str, float]]:
    from zoo import ZOO_BUGGY, ZOO_CORRECT, runs

    peers = []
    missing: list[str] = []
    for name, module, check in _peers():
        try:
            bc.optional(module)
            peers.append((name, check))
        except bc.Skip as note:
            missing.append(f"{name}: {note}")
    tools = ["gradcheck.verify"] + [name for name, _ in peers]
    results: list[dict[str, Any]] = []
    spent = {tool: 0.0 for tool in tools}
    for label, zoo in (("correct", ZOO_CORRECT), ("buggy", ZOO_BUGGY)):
        for dtype in settings.zoo_dtypes:
            todo = [r for r in runs(zoo) if r[1] == dtype]
            if settings.zoo_limit is not None:
                todo = todo[:settings.zoo_limit]
            for index, (name, _, config) in enumerate(todo):
                fn = zoo[name].fn
                row: dict[str, Any] = {"zoo": label, "name": name, "dtype": dtype, "config": config}
                start = time.perf_counter()
                result = gradcheck.verify(fn, dtype=dtype, seed=index, **config)
                spent["gradcheck.verify"] += time.perf_counter() - start
                row["gradcheck.verify"] = not result.passed
                sample = draw_cases(dtype, config, settings.zoo_cases, index, settings.zoo_shape)
                for peer, check in peers:
                    start = time.perf_counter()
                    row[peer] = not all(check(fn, case) for case in sample)
                    spent[peer] += time.perf_counter() - start
                results.append(row)
                log(f"detection {label} {dtype} {name} {config}: " + ", ".join(f"{t}={row[t]}" for t in tools))
    summary: list[list[str]] = []
    figures: dict[str, float] = {}
    for dtype in settings.zoo_dtypes:
        bugs = [r for r in results if r["dtype"] == dtype and r["zoo"] == "buggy"]
        good = [r for r in results if r["dtype"] == dtype and r["zoo"] == "correct"]
        for tool in tools:
            caught, alarms = sum(r[tool] for r in bugs), sum(r[tool] for r in good)
            summary.append([dtype, tool, f"{caught}/{len(bugs)} ({caught / max(len(bugs), 1):.0%})",
                            f"{alarms}/{len(good)} ({alarms / max(len(good), 1):.0%})"])
            figures[f"caught_{tool}_{dtype}"] = caught / max(len(bugs), 1)
            figures[f"alarms_{tool}_{dtype}"] = alarms / max(len(good), 1)
    for note in missing:
        summary.append(["all", note.split(":")[0], note, "—"])
    mark = {True: "caught", False: "missed"}
    detail = [[r["name"], r["dtype"], _config(r["config"])] + [mark[r[t]] for t in tools]
              for r in results if r["zoo"] == "buggy"]
    alarm_rows = [[r["name"], r["dtype"], _config(r["config"])] + ["ALARM" if r[t] else "ok" for t in tools]
                  for r in results if r["zoo"] == "correct" and any(r[t] for t in tools)]
    lines = ["## 5. Detection on the bug zoo", "",
             f"Every (entry, dtype, configuration) of tests/zoo.py in {', '.join(settings.zoo_dtypes)}. "
             "`verify` at its defaults (100 examples, shapes up to (64, 4096)), seed = the run's index. Each peer "
             f"checks {settings.zoo_cases} cases drawn from the same strategy (shapes up to {settings.zoo_shape}, "
             "same options) at its defaults; any failing or raising case is a detection. torch: the grad_fn is "
             "the backward of an autograd.Function whose forward is the correctly rounded loss; jax: a custom_vjp "
             "whose forward and backward go through jax.pure_callback (benchmarks/verify_zoo.py); numdifftools "
             "and scipy: the numerical gradient of the loss evaluated in the checked dtype, compared with "
             "np.allclose(rtol=1e-5, atol=1e-8). *Caught*: runs of a buggy entry detected; *false alarms*: runs "
             "of a correct entry rejected.", ""]
    lines += bc.table(["dtype", "tool", "bugs caught", "false alarms"], summary)
    lines += ["", "Seconds spent per tool over the whole section: " +
              ", ".join(f"{tool} {spent[tool]:.1f} s" for tool in tools) + ".", "",
              "Per bug (one row per dtype and configuration):", ""]
    lines += bc.table(["bug", "dtype", "config"] + tools, detail)
    lines += ["", "False alarms on correct implementations (only runs where some tool alarmed):", ""]
    if alarm_rows:
        lines += bc.table(["implementation", "dtype", "config"] + tools, alarm_rows)
    else:
        lines += ["No tool raised a false alarm."]
    return lines, figures


def _config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"
