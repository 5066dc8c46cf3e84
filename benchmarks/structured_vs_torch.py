"""Time the structured central difference against torch.autograd.gradcheck's slow mode, in one run.

Usage: python benchmarks/structured_vs_torch.py [--n 128] [--k 1000] [--skip-torch]
Prints one JSON object: seconds for each, the evaluation counts and the central difference's
worst error against the certified truth next to its own estimate.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

import gradcheck
from gradcheck.estimators import gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    z = rng.normal(scale=3.0, size=(args.n, args.k))
    t = rng.integers(0, args.k, size=args.n)
    out: dict[str, object] = {"shape": [args.n, args.k], "dtype": "float64", "machine": platform.processor() or platform.machine()}

    start = time.perf_counter()
    result = gradient(z, t, method="fd_central")
    out["structured_central_seconds"] = time.perf_counter() - start
    out["structured_central_evaluations"] = result.evaluations
    truth = gradcheck.exact_grad(z, t)
    real = np.abs(result.grad - truth)
    out["structured_central_max_abs_error"] = float(real.max())
    out["structured_central_max_estimate"] = float(result.error.max())
    out["structured_central_worst_ratio"] = float(np.max(real / result.error))

    if not args.skip_torch:
        import torch

        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        tt = torch.tensor(t)
        start = time.perf_counter()
        ok = torch.autograd.gradcheck(lambda x: torch.nn.functional.cross_entropy(x, tt), (zt,),
                                      fast_mode=False)
        out["torch_gradcheck_slow_seconds"] = time.perf_counter() - start
        out["torch_gradcheck_passed"] = bool(ok)
        out["torch_gradcheck_evaluations"] = 2 * args.n * args.k
        out["speedup"] = out["torch_gradcheck_slow_seconds"] / out["structured_central_seconds"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
