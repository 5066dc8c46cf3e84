"""How tight each precision contract is: the worst error of correct kernels as a multiple of the contract's tolerance.

Usage: python benchmarks/contract_tightness.py [--examples 200] [--seed 0]
For each dtype and contract, verify runs the correct kernels that keep exactly that contract (the
correctly rounded truth for "exact", gradcheck's float64 oracle for "float64", float32-inside kernels
for "float32", in-dtype kernels for the dtype itself) on every configuration of the zoo, and prints the
worst ratio seen (1.0 = at the tolerance; a correct kernel must stay <= 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zoo import CORRECT_CONFIGS, numpy_logspace, numpy_online, numpy_stable, oracle  # noqa: E402
from zoo_precision import CORRECT as FLOAT32_INSIDE  # noqa: E402

import gradcheck  # noqa: E402
from gradcheck.tolerance import contracts  # noqa: E402


def truth(logits, targets, **options):
    if options.get("weight") is not None:
        options["weight"] = np.asarray(options["weight"]).astype(np.float64)
    return gradcheck.exact_grad(logits, targets, **options)


def kernels(dtype: str, contract: str) -> dict:
    if contract == "exact":
        return {"exact_grad": truth}
    if contract == "float64":
        return {"oracle": oracle}
    if contract == "float32" and dtype != "float32":
        return dict(FLOAT32_INSIDE)
    return {"numpy_stable": numpy_stable, "numpy_logspace": numpy_logspace, "numpy_online": numpy_online}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"seed {args.seed}, {args.examples} examples per kernel and configuration, max_shape (8, 32)\n")
    print("| dtype | contract | kernels | worst ratio | failed |")
    print("|---|---|---|---|---|")
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        for contract in contracts(gradcheck.float_format(dtype)):
            worst, failed, names = 0.0, 0, kernels(dtype, contract)
            for name, fn in names.items():
                for i, config in enumerate(CORRECT_CONFIGS):
                    with np.errstate(all="ignore"):
                        r = gradcheck.verify(fn, dtype=dtype, precision=contract, seed=args.seed + i,
                                             max_examples=args.examples, max_shape=(8, 32), **config)
                    worst = max(worst, r.worst_ratio)
                    failed += not r.passed
            print(f"| {dtype} | {contract} | {', '.join(names)} | {worst:.3g} | {failed} |", flush=True)


if __name__ == "__main__":
    main()
