"""Sections 2-4: oracle throughput against autodiff peers and memory floors, truth throughput, verify throughput."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import bench_common as bc
import gradcheck


# --- 2. oracle ----------------------------------------------------------------------------------------

def _jax_grad(z: np.ndarray, t: np.ndarray) -> Callable[[], Any]:
    jax = bc.optional("jax")
    import jax.numpy as jnp

    x64 = z.dtype == np.float64

    def loss(v: Any, tj: Any) -> Any:
        return jnp.mean(jax.nn.logsumexp(v, axis=1) - jnp.take_along_axis(v, tj[:, None], axis=1)[:, 0])

    with jax.enable_x64(x64):
        grad = jax.jit(jax.grad(loss))
        x, tj = jnp.asarray(z), jnp.asarray(t)
        grad(x, tj).block_until_ready()  # compile outside the timing

    def run() -> Any:
        with jax.enable_x64(x64):
            return grad(x, tj).block_until_ready()

    return run


def _torch_grad(z: np.ndarray, t: np.ndarray) -> Callable[[], Any]:
    torch = bc.optional("torch")
    zt = torch.tensor(z, requires_grad=True)
    tt = torch.tensor(t)

    def run() -> Any:
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(zt, tt), zt)
        return g

    return run


KERNEL_OPTIONS = {"softcap": 30.0, "lse_square_scale": 1e-4, "grad_output": -0.5}
OPTIONS_ROW = "gradcheck.cross_entropy_grad, softcap=30, lse_square_scale=1e-4, grad_output=-0.5"


def oracle(settings: bc.Settings, log: Callable[[str], None]) -> tuple[list[str], dict[str, float]]:
    n, k = settings.oracle_shape
    rng = np.random.default_rng(1)
    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    for dtype in ("float64", "float32"):
        z = rng.normal(scale=3.0, size=(n, k)).astype(dtype)
        t = rng.integers(0, k, size=n)
        dst = np.empty_like(z)
        candidates: list[tuple[str, Callable[[], Callable[[], Any]]]] = [
            ("np.copyto(out, logits) (memory floor)", lambda: lambda: np.copyto(dst, z)),
            ("np.exp(logits, out=out) (exp floor)", lambda: lambda: np.exp(z, out=dst)),
            ("gradcheck.cross_entropy_grad", lambda: lambda: gradcheck.cross_entropy_grad(z, t)),
            (OPTIONS_ROW, lambda: lambda: gradcheck.cross_entropy_grad(z, t, **KERNEL_OPTIONS)),
            ("jax.jit(jax.grad(loss)) (CPU)", lambda: _jax_grad(z, t)),
            ("torch autograd of F.cross_entropy (CPU, forward + backward)", lambda: _torch_grad(z, t)),
        ]
        times: dict[str, float] = {}
        measured: list[tuple[str, bc.Timing]] = []
        for name, build in candidates:
            try:
                fn = build()
                timing = bc.measure(fn, settings, repeats=max(settings.repeats, 7), warmup=True)
            except bc.Skip as note:
                rows.append([dtype, name, str(note), "—", "—", "—", "—"])
                continue
            times[name] = timing.median
            measured.append((name, timing))
        ours = times["gradcheck.cross_entropy_grad"]
        copy = times["np.copyto(out, logits) (memory floor)"]
        exp = times["np.exp(logits, out=out) (exp floor)"]
        jax_t = times.get("jax.jit(jax.grad(loss)) (CPU)")
        for name, timing in measured:
            s = timing.median
            rows.append([dtype, name, f"{bc.seconds(s)} (median of {timing.runs})", f"{n * k / s / 1e6:.0f}",
                         f"{s / copy:.3g}×", f"{s / exp:.3g}×",
                         f"{s / jax_t:.3g}×" if jax_t else "jax not measured"])
            log(f"oracle {dtype} {name}: {rows[-1][2]}")
        figures[f"oracle_vs_copyto_{dtype}"] = ours / copy
        figures[f"oracle_vs_exp_{dtype}"] = ours / exp
        if jax_t:
            figures[f"oracle_vs_jax_{dtype}"] = ours / jax_t
        if OPTIONS_ROW in times:  # issue 12: the kernel options' cost, same array, same run
            figures[f"oracle_options_vs_plain_{dtype}"] = times[OPTIONS_ROW] / ours
        if "torch autograd of F.cross_entropy (CPU, forward + backward)" in times:
            figures[f"oracle_vs_torch_{dtype}"] = ours / times["torch autograd of F.cross_entropy (CPU, forward + backward)"]
    lines = ["## 2. Oracle throughput", "",
             f"The gradient of the mean cross-entropy of ({n}, {k}) logits (~ N(0, 9)) with class-index targets, "
             "from logits already in memory (numpy arrays for ours and the floors, a device array for jax, a tensor "
             "for torch), in the logits' dtype. Each tool at its default threading on the 2 cores. Times are "
             "medians after one warm-up call (jax: after compiling); ratios are time / the floor's or jax's time "
             "in the same run (below 1 = faster). The row with the kernel options (issue 12) computes the same "
             "gradient with softcapping, the z-loss and an upstream gradient (jax's and torch's rows are without).", ""]
    lines += bc.table(["dtype", "tool", "median time", "M elements/s", "÷ np.copyto", "÷ np.exp", "÷ jax.jit(grad)"],
                      rows)
    return lines, figures


# --- 3. truth -----------------------------------------------------------------------------------------

def truth(settings: bc.Settings, log: Callable[[str], None]) -> tuple[list[str], dict[str, float]]:
    n, k = settings.truth_shape
    rng = np.random.default_rng(2)
    z64 = rng.normal(scale=3.0, size=(n, k))
    t = rng.integers(0, k, size=n)
    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    import ml_dtypes

    for dtype in ("float64", "float32", "float16", "bfloat16"):
        z = z64.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        fast = bc.measure(lambda: gradcheck.cross_entropy_grad(z, t), settings, warmup=True)
        exact = bc.measure(lambda: gradcheck.exact_grad(z, t), settings)
        mpmath_share = _mpmath_share(z, t)
        rate = n * k / exact.median
        figures[f"truth_rate_{dtype}"] = rate
        rows.append([dtype, f"{bc.seconds(exact.median)} (median of {exact.runs})", f"{rate:,.0f}",
                     f"{bc.seconds(fast.median)}", f"{exact.median / fast.median:,.3g}×", f"{mpmath_share:.1%}"])
        log(f"truth {dtype}: {rows[-1]}")
    lines = ["## 3. Truth throughput", "",
             f"`gradcheck.exact_grad` (certified, correctly rounded) on ({n}, {k}) logits ~ N(0, 9), class-index "
             "targets, mean. Enclosures with proven bounds decide the rounding wherever they can (the float64 "
             "tier for narrower results, then double-double; docs/exact.md); the rest goes through mpmath "
             "interval arithmetic (share shown). Ratio: the truth's time / the fast oracle's on the same array, "
             "same run.", ""]
    lines += bc.table(["dtype", "exact_grad median", "certified elements/s", "cross_entropy_grad",
                       "truth ÷ oracle", "elements sent to mpmath"], rows)
    return lines, figures


def _mpmath_share(z: np.ndarray, t: np.ndarray) -> float:
    """Fraction of elements that go to mpmath: exact_grad's progress report, whose first call is
    ``(0, total)`` with the count the fast paths (the float64 tier, the double-double path) left."""
    calls: list[tuple[int, int]] = []
    gradcheck.exact_grad(z, t, progress=lambda done, total: calls.append((done, total)))
    return calls[0][1] / z.size


# --- 4. verify ----------------------------------------------------------------------------------------

def draw_cases(dtype: str, config: dict[str, Any], count: int, seed: int, max_shape: tuple[int, int]) -> list:
    """``count`` cases from the public strategy, as verify draws them (generation only, seeded).

    Hypothesis always generates its minimal example, a (1, 1) case, first; it is dropped.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from gradcheck.strategies import cases

    out: list = []

    @hseed(seed)
    @settings(max_examples=count + 1, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(cases(dtype, max_shape=max_shape, **config))
    def collect(case: Any) -> None:
        out.append(case)

    collect()
    return out[1:count + 1]


def verify(settings: bc.Settings, log: Callable[[str], None]) -> tuple[list[str], dict[str, float]]:
    from zoo import numpy_stable

    import verify_zoo

    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    examples = settings.verify_examples
    shapes = (("small", (8, 32)), ("large", (64, 4096)))
    gradcheck.verify(numpy_stable, max_examples=5, seed=0, max_shape=(8, 32))  # imports Hypothesis
    for dtype in ("float64", "float32"):
        peer_small: dict[str, float] = {}
        for label, max_shape in shapes:
            sizes: list[int] = []

            def counted(logits: np.ndarray, targets: np.ndarray, **options: Any) -> np.ndarray:
                sizes.append(logits.size)
                return numpy_stable(logits, targets, **options)

            timing = bc.measure(lambda: gradcheck.verify(counted, dtype=dtype, max_examples=examples, seed=0,
                                                         max_shape=max_shape), settings)
            result = timing.value
            assert result.passed, result
            rate = result.examples / timing.median
            figures[f"verify_rate_{label}_{dtype}"] = rate
            mean_size = float(np.mean(sizes))
            sample = draw_cases(dtype, {}, min(examples, 50), 0, max_shape)
            floor = bc.measure(lambda: [numpy_stable(c.logits.copy(), c.targets.copy(), **c.options())
                                        for c in sample for _ in range(2)], settings)
            floor_rate = len(sample) / floor.median
            rows.append([dtype, f"up to {max_shape}", "gradcheck.verify (default settings)",
                         f"{rate:,.0f} (median of {timing.runs}; {result.examples} examples, mean {mean_size:,.0f} "
                         f"elements)", f"{floor_rate / rate:,.3g}× slower than the floor", "1×"])
            log(f"verify {dtype} {label}: {rate:.0f} examples/s")
            for peer, check in (("torch.autograd.gradcheck (defaults, slow mode)", verify_zoo.torch_gradcheck),
                                ("jax.test_util.check_grads (order 1, rev)", verify_zoo.jax_check_grads)):
                try:
                    if peer.startswith("torch"):
                        bc.optional("torch")
                        if label == "large" and peer in peer_small:
                            small_size = float(np.mean([c.logits.size for c in small_sample]))
                            large_size = float(np.mean([c.logits.size for c in sample]))
                            predicted = len(sample) / peer_small[peer] * (large_size / small_size) ** 2
                            if predicted > settings.skip_seconds:
                                raise bc.Skip(f"skipped: predicted {predicted:,.0f} s for {len(sample)} examples "
                                              f"> {settings.skip_seconds:.0f} s (2 N K loss evaluations each)")
                    else:
                        bc.optional("jax")
                    peer_timing = bc.measure(lambda: [check(numpy_stable, c) for c in sample], settings,
                                             repeats=min(settings.repeats, 3))
                except bc.Skip as note:
                    rows.append([dtype, f"up to {max_shape}", peer, str(note), "—", "—"])
                    continue
                passed = sum(peer_timing.value)
                peer_rate = len(sample) / peer_timing.median
                if label == "small":
                    peer_small[peer] = peer_rate
                rows.append([dtype, f"up to {max_shape}", peer,
                             f"{peer_rate:,.1f} (median of {peer_timing.runs}; {len(sample)} examples, "
                             f"{len(sample) - passed} false alarms)", f"{floor_rate / peer_rate:,.3g}× slower than the floor",
                             f"{rate / peer_rate:,.3g}×"])
                figures[f"verify_vs_{peer.split('.')[0]}_{label}_{dtype}"] = rate / peer_rate
                log(f"verify peer {peer} {dtype} {label}: {peer_rate:.1f} examples/s")
            if label == "small":
                small_sample = sample
    lines = ["## 4. verify throughput", "",
             f"`gradcheck.verify(numpy_stable, dtype=..., max_examples={examples}, seed=0, max_shape=...)` on the "
             "zoo's correct `numpy_stable` (so every example runs; Hypothesis mixes shapes, most of them small). "
             "Examples per second = examples / median wall time. *Floor*: calling the grad_fn twice per example "
             "(what verify must do) on up to 50 cases drawn from the same strategy. The peers check the same drawn "
             "cases at their defaults with the grad_fn installed as the backward of the loss "
             "(benchmarks/verify_zoo.py: torch through an autograd.Function, jax through custom_vjp + "
             "pure_callback); a 'false alarm' is a correct gradient a peer rejected.", ""]
    lines += bc.table(["dtype", "shapes", "tool", "examples/s", "vs the grad_fn floor", "verify's speed-up"], rows)
    return lines, figures
