"""Truth at scale (issue 14, item 1): exact_grad against the fast oracle at LLM vocabulary sizes.

For K in 512 ... 262 144 and float64/float32: logits ~ N(0, 9) of about 2**20 elements ((N, K) with
N = 2**20 // K, at least 4 rows), class-index targets, mean. Times are medians of ``--repeats`` runs
of the same arrays, in one process, back to back; the ratio is the truth's time over the oracle's
(``gradcheck.cross_entropy_grad``) on the same array in the same run, the median over interleaved
(oracle, truth) pairs. "Slow path" is the share of
elements neither the oracle's bound nor the double-double enclosure decides (they go to mpmath,
docs/exact.md).

With softcap=30 (Gemma 2's final-logit cap) the same arrays again, the oracle with the same softcap.

    PYTHONPATH=. python benchmarks/truth_at_scale.py [--repeats 3] [--out FILE] [--results benchmarks/RESULTS.md]

``--results`` puts the table into that file in place of its "Truth at scale" section (the other sections stay).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import gradcheck

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SOFTCAP = 30.0
KS = (512, 4096, 32000, 128256, 262144)
ELEMENTS = 1 << 20


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _slow_share(z: np.ndarray, t: np.ndarray, **options) -> float:
    """The share of elements sent to mpmath (exact_grad's progress report: its first call is (0, total))."""
    calls: list[tuple[int, int]] = []
    gradcheck.exact_grad(z, t, progress=lambda done, total: calls.append((done, total)), **options)
    return calls[0][1] / z.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(14)
    gradcheck.exact_grad(np.zeros((1, 2)), np.array([0]))  # builds the exp table once, outside the timing
    rows = []
    for k in KS:
        n = max(4, ELEMENTS // k)
        z64 = rng.normal(scale=3.0, size=(n, k))
        t = rng.integers(0, k, size=n)
        for dtype, opts in [(d, o) for d in ("float64", "float32") for o in ({}, {"softcap": SOFTCAP})]:
            z = z64.astype(dtype)
            # interleaved pairs, so that the load of this shared machine hits both alike; the ratio is the
            # median of the per-pair ratios
            pairs = [(_median(lambda: gradcheck.cross_entropy_grad(z, t, **opts), 1),
                      _median(lambda: gradcheck.exact_grad(z, t, **opts), 1)) for _ in range(args.repeats)]
            oracle = statistics.median(p[0] for p in pairs)
            exact = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(e / o for o, e in pairs)
            share = _slow_share(z, t, **opts)
            label = ", ".join(f"{key}={value:g}" for key, value in opts.items()) or "—"
            rows.append((k, n, dtype, label, exact, oracle, ratio, share))
            print(f"K={k} N={n} {dtype} {label}: exact {exact:.3f} s, oracle {oracle:.4f} s, ratio {ratio:.1f}x, "
                  f"slow path {share:.2e}", flush=True)
    z = np.random.default_rng(15).normal(scale=3.0, size=(8, 128256)).astype(np.float32)
    t = np.random.default_rng(16).integers(0, 128256, size=8)
    llm = _median(lambda: gradcheck.exact_grad(z, t), args.repeats)
    from gradcheck import truth_jit

    kernels = (f"the compiled kernels (numba {truth_jit.numba.__version__})" if truth_jit.enabled()
               else "the numpy code (no compiled kernels: numba missing or GRADCHECK_JIT=0)")
    lines = ["## Truth at scale (issue 14, item 1)", "",
             f"exact_grad (correctly rounded) against cross_entropy_grad (fast oracle) on about 2**20 logits ~ N(0, 9), "
             f"index targets, mean; medians of {args.repeats} interleaved (oracle, truth) pairs, ratio = median of the pair ratios; load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores; the truth by {kernels}.", "",
             "| K | N | dtype | options | exact_grad | oracle | truth ÷ oracle | slow-path share |",
             "|---:|---:|---|---|---:|---:|---:|---:|"]
    for k, n, dtype, label, exact, oracle, ratio, share in rows:
        lines.append(f"| {k} | {n} | {dtype} | {label} | {exact:.3f} s | {oracle:.4f} s | {ratio:.1f}x | {share:.2e} |")
    lines += ["", f"(8, 128256) float32: exact_grad {llm:.3f} s (median of {args.repeats}; before: 51 s)."]
    bc.write_section(lines, args.out, args.results)


if __name__ == "__main__":
    main()
