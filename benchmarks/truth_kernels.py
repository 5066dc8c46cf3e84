"""The certified truth's compiled kernels against the numpy code they replace: ns per element and the ratio.

On (8, 32000) logits ~ N(0, 9) (float64) or their float32 rounding, one thread, best of ``--repeats`` runs
of each piece, both on the same arrays in the same process:

* exponential: ``truth_jit.exp_pairs`` against ``truth_dd._exp_dd(coarse=True)`` on the shifted logits (in
  pieces of PLAIN_CHUNK elements, as the numpy path runs it);
* steps 1-2 of a plain double-double block: ``truth_jit.plain_sums`` (shift, exponential, the row sums)
  against ``truth_dd._plain_sums``;
* step 5 for float64 results: ``truth_jit.decide_rows`` against ``dd_mul`` and ``truth_dd.decide`` chunk
  by chunk, as ``_block_plain`` runs them;
* the float64 tier: ``truth_f64._enclose_jit`` against ``truth_f64.enclose`` and ``truth_dd.decide``
  (float32 results).

The results are the same bit for bit (tests/test_truth_jit.py); this measures only time. Nothing is
asserted.

    PYTHONPATH=. python benchmarks/truth_kernels.py [--repeats 20] [--out FILE] [--results benchmarks/RESULTS.md]

``--results`` puts the table into that file in place of its "Truth kernels" section (the other sections stay).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import gradcheck as gc
from gradcheck import oracle, truth_dd as T, truth_f64 as F, truth_jit as J

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    if not J.enabled():
        raise SystemExit("the compiled kernels are off (numba missing or GRADCHECK_JIT=0): nothing to compare")
    oracle.THREADS = 1
    m, k = 8, 32000
    seed = 14
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(m, k))
    t = rng.integers(0, k, size=m)
    a = np.argmax(z, axis=1)
    (c1, c2, c3, c4), th, tl = T._constants()
    size = z.size
    rows = []

    sh, sl = T.two_sum(z, -z[np.arange(m), a][:, None])
    sh, sl = sh.ravel(), sl.ravel()
    oh, ol = np.empty(size), np.empty(size)
    cj = np.array([c1, c2, c3 + c4])

    def numpy_exp() -> None:  # in pieces of PLAIN_CHUNK, as _plain_sums runs it
        for i in range(0, size, T.PLAIN_CHUNK):
            T._exp_dd(sh[i:i + T.PLAIN_CHUNK], sl[i:i + T.PLAIN_CHUNK], coarse=True)

    rows.append(("exponential (double-double, coarse)",
                 _best(lambda: J.exp_pairs(sh, sl, cj, th, tl, J.POW2, oh, ol), args.repeats),
                 _best(numpy_exp, args.repeats)))

    eh, el = np.empty((m, k)), np.empty((m, k))
    w = max(1, T.PLAIN_CHUNK // m)
    chunks = [(0, m, c0, min(c0 + w, k)) for c0 in range(0, k, w)]
    with np.errstate(all="ignore"):
        rows.append(("steps 1-2: shift, exponential, row sums",
                     _best(lambda: T._plain_sums_jit(z, a, eh, el), args.repeats),
                     _best(lambda: T._plain_sums(z, a, chunks, eh, el), args.repeats)))
    gh, gl = np.full(m, -1 / 3e4), np.full(m, 1e-21)
    per_e = np.full(m, 2.0**-90)
    out = np.empty((m, k))
    f64 = gc.float_format("float64")

    def numpy_step5() -> None:
        for r0, r1, c0, c1_ in chunks:
            ec = eh[r0:r1, c0:c1_]
            vh, vl = T.dd_mul(ec, el[r0:r1, c0:c1_], gh[r0:r1, None], gl[r0:r1, None])
            bound = ec * per_e[r0:r1, None]
            bound += T.FLOOR
            out[r0:r1, c0:c1_] = T.decide(vh, vl, bound, f64)

    with np.errstate(all="ignore"):
        rows.append(("step 5, float64: product and decision",
                     _best(lambda: J.decide_rows(eh, el, gh, gl, per_e, out), args.repeats),
                     _best(numpy_step5, args.repeats)))

    z32 = z.astype(np.float32)
    problem = gc.make_problem(z32, t)
    f = np.full(m, 1.0 / m)
    idx = np.arange(m)
    f32 = gc.float_format("float32")

    def numpy_tier() -> None:
        g, bound, *_ = F.enclose(problem, idx, f)
        T.decide(g, 0.0, bound, f32)

    rows.append(("float64 tier, float32 results: enclosure and decision",
                 _best(lambda: F._enclose_jit(problem, idx, f, decide=True), args.repeats),
                 _best(numpy_tier, args.repeats)))

    lines = ["## Truth kernels", "",
             f"`benchmarks/truth_kernels.py`: ({m}, {k}) logits ~ N(0, 9), one thread, best of {args.repeats} runs "
             f"of each piece, numba {J.numba.__version__}, load average {os.getloadavg()[0]:.1f}.", "",
             "| piece | kernel, ns/element | numpy, ns/element | numpy ÷ kernel |", "|---|---:|---:|---:|"]
    for name, kernel, numpy_time in rows:
        lines.append(f"| {name} | {kernel / size * 1e9:.1f} | {numpy_time / size * 1e9:.1f} | "
                     f"{numpy_time / kernel:.1f}x |")
    bc.write_section(lines, args.out, args.results)


if __name__ == "__main__":
    main()
