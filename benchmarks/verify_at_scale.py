"""verify at LLM shapes: examples/s and peak memory at (8, 128256), (2, 1024, 32000) and (4096, 32000), and JAX's shape buckets.

Run: ``.venv/bin/python benchmarks/verify_at_scale.py [--examples N] [--dtype float32] [--jax]``.

* verify section: ``verify(kernel, shapes=[shape], class_axis=-1, dtype=..., max_examples=N, seed=0)`` for a
  numpy reference kernel (softmax minus the one-hot target in the dtype's own arithmetic, what a tiled kernel
  computes, the rows in C order: the (2, 1024, 32000) case is the LLM layout, (B, T, V)); examples/s is
  examples over wall time of the whole call (generation, two calls of the kernel, the judgement under every
  contract, i.e. the grade). (4096, 32000) draws the "llm_vocab" regime alone (``regimes=("llm_vocab",)``):
  90% of the rows ignored and at most ``max_live_elements`` counted (262 rows), the other shapes every regime.
  Peak memory: tracemalloc's peak during the call (numpy reports its buffers to it), also as a multiple of
  a float64 array of the input's size, and the process's maximum resident set (``resource.getrusage``,
  which includes the interpreter and is the maximum since the process started).
* ``--jax``: ``jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels)`` through verify, 100 examples,
  with a new shape per example (``compiles_per_shape = False``: before) and with the shape buckets (after),
  examples/s of the whole call and of the time inside the grad_fn (compilation included).

Figures are ratios and rates measured in one run on one machine; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradcheck  # noqa: E402

SHAPES = (((8, 128256), None), ((2, 1024, 32000), None), ((4096, 32000), ("llm_vocab",)))  # (shape, regimes)


def numpy_kernel(logits: np.ndarray, targets: np.ndarray, **options) -> np.ndarray:
    """softmax(z) - onehot(t), over the mean's divisor, in the logits' dtype, class axis last (a reference kernel)."""
    if options.get("class_axis", -1) not in (-1, logits.ndim - 1) or set(options) - {"class_axis", "ignore_index"}:
        raise TypeError(f"numpy_kernel takes the LLM layout and ignore_index only, got {sorted(options)}")
    ignore = options.get("ignore_index", -100)
    k = logits.shape[-1]
    z = logits.reshape(-1, k)
    t = targets.reshape(-1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    g = e / e.sum(axis=1, keepdims=True)
    live = np.flatnonzero(t != ignore)
    g[live, t[live]] -= 1
    g[t == ignore] = 0
    g /= max(live.size, 1)
    return g.reshape(logits.shape)


def measure_verify(shape: tuple[int, ...], dtype: str, examples: int, regimes: tuple[str, ...] | None = None) -> dict:
    tracemalloc.start()
    start = time.perf_counter()
    chosen = {} if regimes is None else {"regimes": regimes}
    result = gradcheck.verify(numpy_kernel, shapes=[shape], class_axis=-1, dtype=dtype, max_examples=examples, seed=0,
                              **chosen)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"shape": shape, "regimes": "llm_vocab" if regimes else "all", "dtype": dtype, "passed": result.passed,
            "examples": result.examples, "float64_bytes": int(np.prod(shape)) * 8,
            "seconds": elapsed, "per_second": result.examples / elapsed, "peak": peak, "rss": rss,
            "logits_bytes": int(np.prod(shape)) * np.dtype(dtype).itemsize, "grade": result.grade}


def measure_jax(dtype: str, examples: int = 100) -> list[dict]:
    import optax

    from gradcheck.adapters import jax_loss_grad

    rows = []
    for buckets in (False, True):
        inner = jax_loss_grad(optax.softmax_cross_entropy_with_integer_labels, accepts=(), per_example=True)
        spent = [0.0]

        def grad_fn(z, t, grad_output=None, **options):
            t0 = time.perf_counter()
            out = inner(z, t, grad_output=grad_output, **options)
            spent[0] += time.perf_counter() - t0
            return out

        grad_fn.compiles_per_shape = buckets
        start = time.perf_counter()
        result = gradcheck.verify(grad_fn, dtype=dtype, max_examples=examples, seed=0)
        elapsed = time.perf_counter() - start
        rows.append({"draw": "shape buckets (after)" if buckets else "a shape per example (before)", "dtype": dtype,
                     "passed": result.passed, "examples": result.examples, "seconds": elapsed,
                     "per_second": result.examples / elapsed, "in_grad_fn": spent[0],
                     "grad_fn_per_second": result.examples / spent[0]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--jax", action="store_true", help="also measure the JAX shape buckets")
    parser.add_argument("--no-verify", action="store_true", help="skip the verify-at-scale section")
    args = parser.parse_args()
    if not args.no_verify:
        print("| shape | regimes | dtype | examples | passed | grade | s | examples/s | tracemalloc peak | peak / logits "
              "| peak / float64 input | max RSS |")
        print("|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for shape, regimes in SHAPES:
            r = measure_verify(shape, args.dtype, args.examples, regimes)
            print(f"| {r['shape']} | {r['regimes']} | {r['dtype']} | {r['examples']} | {r['passed']} | {r['grade']} | "
                  f"{r['seconds']:.1f} | {r['per_second']:.3f} | {r['peak'] / 2**20:.0f} MiB | "
                  f"{r['peak'] / r['logits_bytes']:.1f} | {r['peak'] / r['float64_bytes']:.1f} | "
                  f"{r['rss'] / 2**20:.0f} MiB |", flush=True)
    if args.jax:
        print()
        print("| optax loss, 100 examples | dtype | passed | s | examples/s | s in grad_fn | examples/s in grad_fn |")
        print("|---|---|---|---:|---:|---:|---:|")
        for dtype in ("float32", "float64"):
            for r in measure_jax(dtype):
                print(f"| {r['draw']} | {r['dtype']} | {r['passed']} | {r['seconds']:.1f} | {r['per_second']:.2f} | "
                      f"{r['in_grad_fn']:.1f} | {r['grad_fn_per_second']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
