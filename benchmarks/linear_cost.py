"""Cost of the fused linear checks (issue 13): verify_linear per example, exact_linear_grad per shape, and the
linear zoo's detection table. Figures are ratios measured in one run (plus the seconds they come from).

Run: ``.venv/bin/python benchmarks/linear_cost.py [--quick]``.

* judge: one example at (N, V, D) = (64, 4096, 256) judged by gradcheck (the bounded oracle, the kernel
  tolerance, the comparisons), against one call of torch autograd of F.linear + F.cross_entropy on
  float32-upcast inputs (``tests/zoo_linear.py: torch_upcast``) at the same shape: the ratio is how many
  grad_fn calls one example's judging costs.
* verify_linear: 10 examples at max_shape (64, 4096, 256) with torch_upcast, seconds per example.
* exact_linear_grad: (8, 64, 16) and (64, 512, 64), float32, with a bias.
* the zoo: every buggy entry at default settings (seed 0), caught or not, examples to the first failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from zoo_linear import ZOO_LINEAR_BUGGY, runs, torch_upcast  # noqa: E402

from gradcheck.checking.linear import compare_linear, draw_case, verify_linear  # noqa: E402
from gradcheck.dtypes import float_format  # noqa: E402
from gradcheck.linear_exact import exact_linear_grad  # noqa: E402


def _case(n, v, d, dtype, seed=0):
    return draw_case(np.random.default_rng(seed), n, v, d, "moderate", float_format(dtype), bias=True,
                     targets="index", weighted=False, ignore_index=None, ignored="none", grad_output="none",
                     reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None)


def judge_cost(dtype: str) -> tuple[float, float]:
    case = _case(64, 4096, 256, dtype)
    torch_upcast(case.hidden, case.weight, case.targets, bias=case.bias)  # warm-up: torch's first call
    t = time.perf_counter()
    got = torch_upcast(case.hidden, case.weight, case.targets, bias=case.bias)
    call = time.perf_counter() - t
    t = time.perf_counter()
    outcome = compare_linear(got, case)
    judge = time.perf_counter() - t
    assert not hasattr(outcome, "kind"), outcome
    return judge, call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print("| dtype | judge one example (s) | one torch_upcast call (s) | ratio |")
    print("|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        judge, call = judge_cost(dtype)
        print(f"| {dtype} | {judge:.2f} | {call:.3f} | {judge / call:.0f} |")
    examples = 3 if args.quick else 10
    t = time.perf_counter()
    result = verify_linear(torch_upcast, dtype="bfloat16", bias=True, max_shape=(64, 4096, 256),
                           max_examples=examples, seed=0)
    per = (time.perf_counter() - t) / result.examples
    print(f"\nverify_linear(torch_upcast, bfloat16, bias, max_shape=(64, 4096, 256)): {result.examples} examples, "
          f"{per:.2f} s per example (random shapes up to the maximum), passed={result.passed}")
    print("\n| exact_linear_grad shape | seconds |")
    print("|---|---|")
    for shape in ((8, 64, 16),) + (() if args.quick else ((64, 512, 64),)):
        case = _case(*shape, "float32")
        t = time.perf_counter()
        exact_linear_grad(case.hidden, case.weight, case.targets, bias=case.bias)
        print(f"| {shape} | {time.perf_counter() - t:.2f} |")
    print("\n| bug | dtype | config | caught | examples | gradient |")
    print("|---|---|---|---|---|---|")
    for name, dtype, config in runs(ZOO_LINEAR_BUGGY):
        r = verify_linear(ZOO_LINEAR_BUGGY[name].fn, dtype=dtype, seed=0, **config)
        f = r.failure
        print(f"| {name} | {dtype} | {config} | {'yes' if f else 'NO'} | {r.examples} | "
              f"{getattr(f, 'gradient', '') or (f.kind if f else '')} |")


if __name__ == "__main__":
    main()
