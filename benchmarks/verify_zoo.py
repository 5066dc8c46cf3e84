"""Measure verify on the bug zoo: detection and false alarms per dtype, against torch.autograd.gradcheck
and jax.test_util.check_grads at their defaults, and the time of verify with 200 examples.

Run: ``.venv/bin/python benchmarks/verify_zoo.py [--quick] [--kernel] [--json out.json]``.

``--kernel``: only the kernel zoo of issue 12 (tests/zoo_kernel.py: z-loss, softcap, the upstream
gradient): its table per entry and dtype (caught / passed), and verify's throughput with the new
options against without, as ratios measured in one run (:func:`time_kernel_options`).

* verify: default settings (100 examples), seed = the run's index, every (entry, dtype, config).
* torch.autograd.gradcheck / jax.test_util.check_grads: defaults (torch: eps=1e-6, atol=1e-5,
  rtol=1e-3; jax: order=1, modes=("rev",) since a custom VJP has no forward mode, default eps and
  tolerances per dtype). The grad_fn is installed as the backward of the (correctly rounded) loss;
  a run fails when any of ``CASES`` cases drawn by gradcheck.strategies (max shape ``SHAPE``) fails
  or raises.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from zoo import ALL, ZOO_BUGGY, ZOO_CORRECT, numpy_stable, runs  # noqa: E402
from zoo_kernel import DONE, KERNEL_BUGGY, KERNEL_CORRECT, kernel, kernel_native  # noqa: E402

import gradcheck  # noqa: E402
from gradcheck.adapters import to_numpy, to_torch  # noqa: E402
from gradcheck.strategies import Case, cases  # noqa: E402

CASES = 5
SHAPE = (4, 100)


def draw_cases(dtype: str, config: dict[str, Any], count: int, seed: int) -> list[Case]:
    """``count`` deterministic cases from the public strategy (Hypothesis' find-free draw)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    kwargs = {k: v for k, v in config.items() if k in ("targets", "reduction", "label_smoothing", "weighted",
                                                          "ignore_index", "lse_square_scale", "softcap")}
    out: list[Case] = []

    @hseed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(cases(dtype, max_shape=SHAPE, **kwargs))
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out[:count]


def _loss_options(case: Case) -> dict[str, Any]:
    return {
        "weight": None if case.weight is None else case.weight.astype(np.float64),
        "ignore_index": case.ignore_index, "label_smoothing": case.label_smoothing,
        "lse_square_scale": case.lse_square_scale, "softcap": case.softcap,
    }


def torch_gradcheck(fn: Any, case: Case) -> bool:
    """torch.autograd.gradcheck at its defaults with fn as the backward of the loss; True = passed."""
    import torch

    options = case.options()
    dtype = case.logits.dtype

    class Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: Any) -> Any:
            ctx.save_for_backward(z)
            value = gradcheck.cross_entropy(to_numpy(z), case.targets, reduction="sum" if case.reduction == "none"
                                            else case.reduction, dtype=dtype, **_loss_options(case))
            return to_torch(np.asarray(value, dtype=dtype).reshape(()))

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            (z,) = ctx.saved_tensors
            g = to_torch(np.asarray(to_numpy_checked(fn(to_numpy(z), case.targets.copy(), **options))))
            return grad_output * g

    z = to_torch(case.logits.copy(), requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(torch.autograd.gradcheck(Loss.apply, (z,), raise_exception=False))
    except Exception:  # noqa: BLE001 - a crash is a detection
        return False


def to_numpy_checked(x: Any) -> np.ndarray:
    return to_numpy(x)


def jax_check_grads(fn: Any, case: Case) -> bool:
    """jax.test_util.check_grads at its defaults (order 1, reverse mode); True = passed."""
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    options = case.options()
    dtype = case.logits.dtype
    loss_options = _loss_options(case)
    reduction = "sum" if case.reduction == "none" else case.reduction

    def host_loss(z: np.ndarray) -> np.ndarray:
        return np.asarray(gradcheck.cross_entropy(np.asarray(z), case.targets, reduction=reduction, dtype=dtype,
                                                  **loss_options), dtype=dtype)

    def host_grad(z: np.ndarray) -> np.ndarray:
        g = np.asarray(to_numpy(fn(np.array(z), case.targets.copy(), **options)))
        if g.shape != case.logits.shape or g.dtype != dtype:
            raise ValueError("wrong shape or dtype")
        return g

    @jax.custom_vjp
    def loss(z: Any) -> Any:
        return jax.pure_callback(host_loss, jax.ShapeDtypeStruct((), dtype), z)

    def fwd(z: Any) -> Any:
        return loss(z), z

    def bwd(z: Any, go: Any) -> Any:
        return (go * jax.pure_callback(host_grad, jax.ShapeDtypeStruct(z.shape, dtype), z),)

    loss.defvjp(fwd, bwd)
    try:
        with jax.enable_x64(True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_grads(loss, (jnp.asarray(case.logits),), order=1, modes=("rev",))
        return True
    except Exception:  # noqa: BLE001 - an assertion or a crash is a detection
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the torch/jax comparison")
    parser.add_argument("--kernel", action="store_true", help="only the kernel zoo (issue 12) and its throughput")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args()
    if args.kernel:
        rows = kernel_rows()
        timing = time_kernel_options()
        print(kernel_table(rows))
        print(timing)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "timing": timing}, indent=1))
        return
    rows: list[dict[str, Any]] = []
    for label, zoo in (("correct", ZOO_CORRECT), ("buggy", ZOO_BUGGY)):
        for index, (name, dtype, config) in enumerate(runs(zoo)):
            fn = zoo[name].fn
            start = time.perf_counter()
            result = gradcheck.verify(fn, dtype=dtype, seed=index, **config)
            row = {"zoo": label, "name": name, "dtype": dtype, "config": config,
                   "verify_failed": not result.passed, "verify_seconds": time.perf_counter() - start,
                   "kind": None if result.failure is None else result.failure.kind,
                   "worst_ratio": result.worst_ratio}
            if not args.quick:
                sample = draw_cases(dtype, config, CASES, index)
                row["torch_failed"] = not all(torch_gradcheck(fn, c) for c in sample)
                row["jax_failed"] = not all(jax_check_grads(fn, c) for c in sample)
            rows.append(row)
            print(json.dumps(row), flush=True)
    timing = time_verify()
    print(table(rows, args.quick))
    print(timing)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "timing": timing}, indent=1))


def time_verify() -> str:
    """verify with 200 examples on the correct numpy implementation, and examples/s at (8, 32)."""
    start = time.perf_counter()
    result = gradcheck.verify(numpy_stable, max_examples=200, seed=0)
    full = time.perf_counter() - start
    start = time.perf_counter()
    small = gradcheck.verify(numpy_stable, max_examples=200, seed=0, max_shape=(8, 32))
    small_time = time.perf_counter() - start
    return (f"verify(numpy_stable, max_examples=200): {full:.2f} s ({result.examples} examples, passed="
            f"{result.passed}); at max_shape=(8, 32): {small_time:.2f} s = {small.examples / small_time:.0f} examples/s")


def kernel_rows() -> list[dict[str, Any]]:
    """Every kernel-zoo run at verify's defaults (seed = the run's index), and every bug under issue 12's
    done-criterion configuration in bfloat16 (config "done")."""
    rows: list[dict[str, Any]] = []
    for label, zoo in (("correct", KERNEL_CORRECT), ("buggy", KERNEL_BUGGY)):
        for index, (name, dtype, config) in enumerate(runs(zoo)):
            precision = {"precision": dtype} if zoo[name].in_dtype else {}
            rows.append(_kernel_row(label, name, dtype, config, index, precision))
    for index, name in enumerate(KERNEL_BUGGY):
        rows.append(_kernel_row("buggy", name, "bfloat16", DONE, index, {}, done=True))
    return rows


def _kernel_row(label: str, name: str, dtype: str, config: dict[str, Any], seed: int, precision: dict[str, Any],
                done: bool = False) -> dict[str, Any]:
    zoo = KERNEL_CORRECT if label == "correct" else KERNEL_BUGGY
    start = time.perf_counter()
    result = gradcheck.verify(zoo[name].fn, dtype=dtype, seed=seed, **precision, **config)
    row = {"zoo": label, "name": name, "dtype": dtype, "config": "done" if done else config,
           "verify_failed": not result.passed, "verify_seconds": time.perf_counter() - start,
           "kind": None if result.failure is None else str(result.failure.kind), "worst_ratio": result.worst_ratio,
           "diagnosis": None if result.failure is None else result.failure.diagnosis}
    print(json.dumps(row, default=str), flush=True)
    return row


def kernel_table(rows: list[dict[str, Any]]) -> str:
    """Entry x dtype: "caught" / "passed" (a correct kernel: "passed" is right; its worst ratio shown)."""
    lines = ["| entry | kind | " + " | ".join(ALL) + " | done (bfloat16) |", "|---|---|" + "---|" * (len(ALL) + 1)]
    names = list(KERNEL_CORRECT) + list(KERNEL_BUGGY)
    for name in names:
        label = "correct" if name in KERNEL_CORRECT else "buggy"
        cells = []
        for dtype in ALL:
            mine = [r for r in rows if r["name"] == name and r["dtype"] == dtype and r["config"] != "done"]
            if not mine:
                cells.append("-")
            elif label == "correct":
                bad = sum(r["verify_failed"] for r in mine)
                worst = max(r["worst_ratio"] for r in mine)
                cells.append(f"passed {len(mine) - bad}/{len(mine)} (worst {worst:.2g} x)")
            else:
                cells.append("caught" if all(r["verify_failed"] for r in mine) else "MISSED")
        done = [r for r in rows if r["name"] == name and r["config"] == "done"]
        cells.append(("caught" if done[0]["verify_failed"] else "MISSED") if done else "-")
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_kernel_options(max_examples: int = 200) -> str:
    """verify's examples/s with the new options against without, in one run, per dtype: the kernel
    zoo's correct kernel (float32 inside for bfloat16) called without an upstream gradient, then with
    it, with z-loss and softcap, and under the done-criterion configuration with and without the two
    options. Same kernel, seed and examples; ratios against the first row of the dtype."""
    def kernel_plain(logits, targets, **options):  # the same kernel without a grad_output parameter
        return kernel(logits, targets, **options)

    plain_done = {k: v for k, v in DONE.items() if k not in ("lse_square_scale", "softcap")}
    setups = (("no upstream gradient, no options", kernel_plain, {}),
              ("grad_output", kernel_native, {}),
              ("grad_output + z-loss + softcap", kernel_native, {"lse_square_scale": 1e-4, "softcap": 30.0}),
              ("no upstream, done config without z-loss/softcap", kernel_plain, plain_done),
              ("grad_output, done config", kernel_native, DONE))
    lines = ["| dtype | setup (kernel_native) | examples/s | ratio to the first row |", "|---|---|---|---|"]
    for dtype in ("float32", "bfloat16"):
        base = None
        for label, fn, config in setups:
            start = time.perf_counter()
            result = gradcheck.verify(fn, dtype=dtype, max_examples=max_examples, seed=0, **config)
            rate = result.examples / (time.perf_counter() - start)
            base = rate if base is None else base
            lines.append(f"| {dtype} | {label}{'' if result.passed else ' (FAILED)'} | {rate:.0f} | "
                         f"{rate / base:.2f} |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], quick: bool) -> str:
    tools = [("verify", "verify_failed")] + ([] if quick else [("torch gradcheck", "torch_failed"),
                                                                 ("jax check_grads", "jax_failed")])
    lines = ["| dtype | tool | bugs caught | false alarms |", "|---|---|---|---|"]
    for dtype in ALL:
        for tool, key in tools:
            bugs = [r for r in rows if r["dtype"] == dtype and r["zoo"] == "buggy"]
            good = [r for r in rows if r["dtype"] == dtype and r["zoo"] == "correct"]
            caught = sum(r[key] for r in bugs)
            alarms = sum(r[key] for r in good)
            lines.append(f"| {dtype} | {tool} | {caught}/{len(bugs)} | {alarms}/{len(good)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
