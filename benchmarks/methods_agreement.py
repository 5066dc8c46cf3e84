"""Per method and dtype: the worst ULP error against the certified truth and the worst real/estimated error.

Usage: python benchmarks/methods_agreement.py [--cases 40] [--seed 0] [--proofs 8]
Cases are seeded random draws over the regimes of tests/test_estimators.py (moderate logits, large
gaps, huge magnitudes, ties, many classes, masked -inf, soft targets, smoothing, weights, ignored
rows). Prints a markdown table, then the SymPy proof times for K = 1 .. --proofs (no cache).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

import gradcheck
from gradcheck.dtypes import FLOAT64
from gradcheck.estimators import estimate, methods
from gradcheck.exact import certified_grad

DTYPES = ("float64", "float32", "float16", "bfloat16")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_estimators import agreement_case  # noqa: E402  (the cases the agreement tests draw)

from gradcheck.regimes import REGIMES


def draw(rng: np.random.Generator, dtype: str, regime: str):
    return agreement_case(int(rng.integers(2**32)), dtype, regime, wide=bool(rng.integers(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="cases per regime and dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proofs", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    stats: dict[tuple[str, str], dict] = {}
    for dtype in DTYPES:
        for regime in REGIMES:
            for _ in range(args.cases):
                problem = draw(rng, dtype, regime)
                truth = certified_grad(problem, FLOAT64)
                truth_d = certified_grad(problem, problem.format)
                for name in methods():
                    r = estimate(problem, method=name)
                    s = stats.setdefault((name, dtype), {"ulp": 0.0, "ratio": 0.0, "cases": 0, "refused": 0,
                                                         "worst_regime": ""})
                    s["cases"] += 1
                    if not r.ok:
                        s["refused"] += 1
                        continue
                    g = np.asarray(r.grad, dtype=np.float64).reshape(truth.shape)
                    e = np.asarray(r.error).reshape(truth.shape)
                    ulp = float(gradcheck.ulp_distance(g.astype(problem.format.dtype), truth_d).max())
                    real = np.abs(g - truth)
                    allowed = e + 0.5 * FLOAT64.ulp(truth)
                    ratio = float(np.max(np.where(real == 0, 0.0, real / np.where(allowed > 0, allowed, np.inf))))
                    if ulp > s["ulp"]:
                        s["ulp"], s["worst_regime"] = ulp, regime
                    s["ratio"] = max(s["ratio"], ratio)
    print("| method | dtype | cases | refused (status) | worst ULP vs truth (regime) | worst real/estimated |")
    print("|---|---|---|---|---|---|")
    for (name, dtype), s in stats.items():
        print(f"| {name} | {dtype} | {s['cases']} | {s['refused']} | {s['ulp']:.3g} ({s['worst_regime']}) "
              f"| {s['ratio']:.3g} |")
    if args.proofs:
        from gradcheck.estimators.sympy_symbolic import KINDS, prove

        os.environ["GRADCHECK_CACHE_DIR"] = tempfile.mkdtemp()
        print("\n| K | " + " | ".join(f"{k} (s)" for k in KINDS) + " |")
        print("|---|" + "---|" * len(KINDS))
        for k in range(1, args.proofs + 1):
            row = [prove(kind, k, use_cache=False) for kind in KINDS]
            assert all(p.proved for p in row), row
            print(f"| {k} | " + " | ".join(f"{p.seconds:.2f}" for p in row) + " |")
        start = time.perf_counter()
        for k in range(1, args.proofs + 1):
            for kind in KINDS:
                prove(kind, k)  # writes the cache
        cold = time.perf_counter() - start
        start = time.perf_counter()
        for k in range(1, args.proofs + 1):
            for kind in KINDS:
                assert prove(kind, k).cached
        print(f"\nall proofs, writing the cache: {cold:.2f} s; from the cache: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
