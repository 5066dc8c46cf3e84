"""Truth at scale (issue 14, item 1): exact_grad against the fast oracle at LLM vocabulary sizes.

For K in 512 ... 262 144 and float64/float32: logits ~ N(0, 9) of about 2**20 elements ((N, K) with
N = 2**20 // K, at least 4 rows), class-index targets, mean. Times are medians of ``--repeats`` runs
of the same arrays, in one process, back to back; the ratio is the truth's time over the oracle's
(``gradcheck.cross_entropy_grad``) on the same array in the same run. "Slow path" is the share of
elements the double-double enclosure does not decide (they go to mpmath, docs/exact.md).

    PYTHONPATH=. python benchmarks/truth_at_scale.py [--repeats 3] [--out benchmarks/truth_at_scale.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import gradcheck
from gradcheck import truth_dd
from gradcheck.dtypes import float_format
from gradcheck.exact import _RowFacts

KS = (512, 4096, 32000, 128256, 262144)
ELEMENTS = 1 << 20


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _slow_share(z: np.ndarray, t: np.ndarray) -> float:
    problem = gradcheck.make_problem(z, t)
    rows = _RowFacts(problem)
    todo = np.ones(problem.logits.shape, dtype=bool)
    decided = truth_dd.grad_decided(problem, rows, float_format(z.dtype), todo)
    return float(np.isnan(decided).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(14)
    gradcheck.exact_grad(np.zeros((1, 2)), np.array([0]))  # builds the exp table once, outside the timing
    rows = []
    for k in KS:
        n = max(4, ELEMENTS // k)
        z64 = rng.normal(scale=3.0, size=(n, k))
        t = rng.integers(0, k, size=n)
        for dtype in ("float64", "float32"):
            z = z64.astype(dtype)
            oracle = _median(lambda: gradcheck.cross_entropy_grad(z, t), args.repeats)
            exact = _median(lambda: gradcheck.exact_grad(z, t), args.repeats)
            share = _slow_share(z, t)
            rows.append((k, n, dtype, exact, oracle, exact / oracle, share))
            print(f"K={k} N={n} {dtype}: exact {exact:.3f} s, oracle {oracle:.4f} s, ratio {exact / oracle:.1f}x, "
                  f"slow path {share:.2e}", flush=True)
    z = np.random.default_rng(15).normal(scale=3.0, size=(8, 128256)).astype(np.float32)
    t = np.random.default_rng(16).integers(0, 128256, size=8)
    llm = _median(lambda: gradcheck.exact_grad(z, t), args.repeats)
    lines = ["## Truth at scale (issue 14, item 1)", "",
             f"exact_grad (correctly rounded) against cross_entropy_grad (fast oracle) on about 2**20 logits ~ N(0, 9), "
             f"index targets, mean; median of {args.repeats}, same run; load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores.", "",
             "| K | N | dtype | exact_grad | oracle | truth ÷ oracle | slow-path share |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for k, n, dtype, exact, oracle, ratio, share in rows:
        lines.append(f"| {k} | {n} | {dtype} | {exact:.3f} s | {oracle:.4f} s | {ratio:.1f}x | {share:.2e} |")
    lines += ["", f"(8, 128256) float32: exact_grad {llm:.3f} s (median of {args.repeats}; before: 51 s)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
