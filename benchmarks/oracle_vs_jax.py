"""The oracle against jax.jit(jax.grad) on (4096, 1024), interleaved (issue 14, item 5).

One-run figures on this shared 2-vCPU machine vary by up to 50%, so each of ``--pairs`` rounds times
the oracle and then jax on the same arrays (logits ~ N(0, 9), index targets: those of
bench_throughput's section 2); the figures are the medians and the median of the per-pair ratios.

    PYTHONPATH=. python benchmarks/oracle_vs_jax.py [--pairs 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput  # noqa: E402

import gradcheck  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    for dtype in ("float64", "float32"):
        z = rng.normal(scale=3.0, size=(4096, 1024)).astype(dtype)
        t = rng.integers(0, 1024, size=4096)
        jax_grad = bench_throughput._jax_grad(z, t)

        def oracle() -> None:
            gradcheck.cross_entropy_grad(z, t)

        oracle()
        jax_grad()
        ours, theirs, ratios = [], [], []
        for _ in range(args.pairs):
            a = time.perf_counter()
            oracle()
            b = time.perf_counter()
            jax_grad()
            c = time.perf_counter()
            ours.append(b - a)
            theirs.append(c - b)
            ratios.append((b - a) / (c - b))
        print(f"{dtype}: oracle {statistics.median(ours) * 1e3:.1f} ms, jax {statistics.median(theirs) * 1e3:.1f} ms "
              f"(medians of {args.pairs} interleaved pairs), median pair ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
