"""Section 1: the cost of checking a full float64 gradient as N and K grow, ours against the peers.

Every tool checks the gradient of the mean cross-entropy with class-index targets at logits drawn
N(0, 3^2) (seed 0). Ours check ``gradcheck.cross_entropy_grad``; torch and jax check their own autograd
of their own loss (how they are used); numdifftools and scipy compute a numerical gradient of a numpy
loss that is compared with ``np.allclose`` at its defaults. The accuracy column is the error of what the
tool estimates numerically (the full gradient, or a directional derivative), against the certified truth.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import bench_common as bc
import gradcheck
from gradcheck.dtypes import FLOAT64


@dataclass
class Outcome:
    """What one check produced: its verdict, loss evaluations, and the numerical estimate it made.

    ``kind`` is "gradient" (``estimate`` is the (N, K) numerical gradient), "directional"
    (``estimate`` the numerical directional derivatives, ``directions`` the (P, N, K) directions),
    or "order" (``estimate`` the Taylor remainder's observed order).
    """

    passed: bool | None  # None: inconclusive
    evaluations: int
    kind: str
    estimate: Any
    directions: Any = None


@dataclass(frozen=True)
class Tool:
    name: str
    run: Callable[[np.ndarray, np.ndarray, np.ndarray], Outcome]
    exponent: float  # time grows like (N K)**exponent (for the skip prediction)
    what: str  # what it computes, for the notes
    limit: float | None = None  # seconds allowed instead of settings.skip_seconds
    memory: Callable[[int, int], float] | None = None  # predicted peak bytes
    # per-coordinate tools: one loss evaluation at a shape; evaluations grow like N K, so the time at a
    # new shape is predicted as (evaluations at the last shape) x (N K ratio) x (one evaluation's time)
    unit: Callable[[np.ndarray, np.ndarray], Callable[[], Any]] | None = None


# --- ours -------------------------------------------------------------------------------------------

def _structured(scheme: str) -> Callable[..., Outcome]:
    def run(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
        from gradcheck.estimators import gradient

        r = gradient(z, t, method=f"fd_{scheme}")
        ok = bool(np.all(np.abs(g - r.grad) <= r.error + FLOAT64.ulp(g)))
        return Outcome(ok, r.evaluations, "gradient", r.grad)

    return run


def _directional(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
    from gradcheck.estimators.directional import _directions, directional_check

    problem = gradcheck.make_problem(z, t)
    check = directional_check(problem, g)  # 8 seeded Rademacher probes, seed 0
    return Outcome(check.passed, check.evaluations, "directional", check.measured,
                   lambda: _directions(problem, len(check.measured), 0))


def _taylor(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
    from gradcheck.estimators.directional import taylor_test

    result = taylor_test(gradcheck.make_problem(z, t), g)
    return Outcome(result.passed, 1 + len(result.steps), "order", result.order)


# --- peers ------------------------------------------------------------------------------------------

def one_thread(torch: Any) -> Any:
    """Run torch on one intra-op thread (restored after): see :func:`thread_note`."""
    import contextlib

    @contextlib.contextmanager
    def scope() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


def _torch(fast: bool) -> Callable[..., Outcome]:
    def run(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
        torch = bc.optional("torch")
        with one_thread(torch):
            return _torch_check(torch, fast, z, t)

    return run


def _torch_check(torch: Any, fast: bool, z: np.ndarray, t: np.ndarray) -> Outcome:
    """torch.autograd.gradcheck of F.cross_entropy, capturing the numerical estimate it makes."""
    module = importlib.import_module("torch.autograd.gradcheck")  # the module, not the function
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t)
    calls = [0]

    def loss(x: Any) -> Any:
        calls[0] += 1
        return torch.nn.functional.cross_entropy(x, tt)

    # capture the numerical estimate torch computes (a pass-through wrapper; no extra work)
    name = "_get_numerical_vJu" if fast else "_get_numerical_jacobian"
    original = getattr(module, name)
    seen: list[Any] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        seen.append((args, out))
        return out

    setattr(module, name, capture)
    try:
        ok = bool(torch.autograd.gradcheck(loss, (zt,), fast_mode=fast, raise_exception=False))
    finally:
        setattr(module, name, original)
    args, out = seen[0]
    if not fast:
        return Outcome(ok, calls[0], "gradient", out[0][0].detach().numpy().reshape(z.shape))
    u, v = args[4][0], args[5][0]  # all_u, all_v: the input and output probe vectors
    ju = float(out[0][0]) / float(v)
    return Outcome(ok, calls[0], "directional", np.array([ju]),
                   lambda: u.detach().numpy().reshape(1, *z.shape))


def _jax(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
    jax = bc.optional("jax")
    import jax.numpy as jnp
    from jax._src import public_test_util
    from jax.test_util import check_grads

    calls = [0]
    original = public_test_util.numerical_jvp
    seen: list[Any] = []

    def capture(f: Any, primals: Any, tangents: Any, **kwargs: Any) -> Any:
        out = original(f, primals, tangents, **kwargs)
        seen.append((tangents, out))
        return out

    with jax.enable_x64(True):
        x = jnp.asarray(z)
        tj = jnp.asarray(t)

        def loss(v: Any) -> Any:
            calls[0] += 1
            return jnp.mean(jax.nn.logsumexp(v, axis=1) - jnp.take_along_axis(v, tj[:, None], axis=1)[:, 0])

        public_test_util.numerical_jvp = capture
        try:
            check_grads(loss, (x,), order=1, modes=("rev",))
            ok = True
        except AssertionError:
            ok = False
        finally:
            public_test_util.numerical_jvp = original
        tangents, out = seen[0]
        direction = np.asarray(tangents[0], dtype=np.float64)
        value = float(np.asarray(out))
    return Outcome(ok, calls[0], "directional", np.array([value]), lambda: direction.reshape(1, *z.shape))


def numpy_loss(z: np.ndarray, t: np.ndarray) -> float:
    """The mean cross-entropy in plain numpy: mean(logsumexp(z) - z[t])."""
    m = z.max(axis=1, keepdims=True)
    return float(np.mean(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)) - z[np.arange(len(t)), t]))


def _numdifftools(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
    nd = bc.optional("numdifftools")
    calls = [0]

    def f(x: np.ndarray) -> float:
        calls[0] += 1
        return numpy_loss(x.reshape(z.shape), t)

    est = np.asarray(nd.Gradient(f)(z.ravel())).reshape(z.shape)
    return Outcome(bool(np.allclose(est, g)), calls[0], "gradient", est)


def _scipy(z: np.ndarray, t: np.ndarray, g: np.ndarray) -> Outcome:
    sd = bc.optional("scipy.differentiate")
    n, k = z.shape
    points = [0]

    def f(xi: np.ndarray) -> np.ndarray:  # xi: (N K, ...) -> (1, ...), vectorized as jacobian requires
        tail = xi.shape[1:]
        x = xi.reshape(n, k, -1)
        points[0] += x.shape[2]
        m = x.max(axis=1, keepdims=True)
        e = x - m
        np.exp(e, out=e)
        rows = m[:, 0] + np.log(e.sum(axis=1)) - x[np.arange(n), t]
        return rows.mean(axis=0).reshape(1, *tail)

    res = sd.jacobian(f, z.ravel())
    est = np.asarray(res.df)[0].reshape(z.shape)
    return Outcome(bool(np.allclose(est, g)), points[0], "gradient", est)


def _torch_unit(z: np.ndarray, t: np.ndarray, threads: int | None = 1) -> Callable[[], Any]:
    torch = bc.optional("torch")
    zt, tt = torch.tensor(z), torch.tensor(t)

    def run() -> Any:
        if threads is None:
            return torch.nn.functional.cross_entropy(zt, tt)
        with one_thread(torch):
            return torch.nn.functional.cross_entropy(zt, tt)

    return run


def thread_note(settings: bc.Settings, z: np.ndarray, t: np.ndarray) -> str:
    """One F.cross_entropy forward at this shape on 1 thread and at torch's default, same run."""
    try:
        one = bc.measure(_torch_unit(z, t, 1), settings, repeats=21, warmup=True).median
        default = bc.measure(_torch_unit(z, t, None), settings, repeats=21, warmup=True).median
    except bc.Skip as note:
        return str(note)
    import torch

    return (f"torch runs on one intra-op thread in this section (`torch.set_num_threads(1)` around each check; "
            f"our structured checks are single-threaded numpy too). Measured in this run at {z.shape}: one "
            f"F.cross_entropy evaluation takes {bc.seconds(one)} on 1 thread and {bc.seconds(default)} at torch's "
            f"default {torch.get_num_threads()} threads (median of 21), so the default would shorten torch's "
            "times by that ratio and our speed-ups with them. One thread is used because the default is much "
            "slower whenever another process holds the second core (OpenMP barrier; seen while developing, "
            "not in this run); on one thread the comparison is per core.")


def _numpy_unit(z: np.ndarray, t: np.ndarray) -> Callable[[], Any]:
    return lambda: numpy_loss(z, t)


TOOLS = (
    Tool("ours: structured central difference (fd_central)", _structured("central"), 1.5,
         "full gradient, 2K+1 batched row-loss evaluations"),
    Tool("ours: structured complex step (fd_complex_step)", _structured("complex_step"), 1.5,
         "full gradient, K batched complex row-loss evaluations"),
    Tool("ours: directional check (8 probes)", _directional, 1.0, "8 directional derivatives vs grad . d"),
    Tool("ours: Taylor test", _taylor, 1.0, "remainder order along one direction (2 = right)"),
    Tool("torch.autograd.gradcheck slow", _torch(False), 2.0, "full numerical Jacobian, eps 1e-6",
         limit=240.0, unit=_torch_unit),
    Tool("torch.autograd.gradcheck fast", _torch(True), 1.0, "one v^T J u by central difference"),
    Tool("jax.test_util.check_grads (rev)", _jax, 1.0, "one directional derivative, eps 1e-4"),
    Tool("numdifftools.Gradient + np.allclose", _numdifftools, 2.0, "full gradient, Richardson",
         unit=_numpy_unit),
    Tool("scipy.differentiate.jacobian + np.allclose", _scipy, 2.0, "full gradient, adaptive order-8",
         memory=lambda n, k: 4 * 9 * 8.0 * (n * k) ** 2, unit=_numpy_unit),
)

MEMORY_LIMIT = 4e9  # bytes


def accuracy(outcome: Outcome, truth: np.ndarray) -> str:
    """Normwise relative error of the tool's numerical estimate against the truth."""
    if outcome.kind == "order":
        return f"order {outcome.estimate:.3f} (exact: 2)"
    if outcome.kind == "gradient":
        err = np.max(np.abs(np.asarray(outcome.estimate, dtype=np.float64) - truth)) / np.max(np.abs(truth))
        return f"{err:.2g} (gradient)"
    dirs = np.asarray(outcome.directions(), dtype=np.float64)
    exact = np.einsum("pnk,nk->p", dirs, truth)
    err = np.max(np.abs(np.asarray(outcome.estimate) - exact)) / np.max(np.abs(exact))
    return f"{err:.2g} (directional)"


def run(settings: bc.Settings, log: Callable[[str], None]) -> tuple[list[str], dict[str, float]]:
    """Measure every tool at every shape; returns the markdown lines and the headline figures."""
    rng = np.random.default_rng(0)
    rows: list[list[str]] = []
    notes: list[str] = []
    figures: dict[str, float] = {}
    last: dict[str, tuple[int, float, int]] = {}  # tool -> (N K, seconds, evaluations) at its last shape
    for number, (n, k) in enumerate(settings.shapes):
        z = rng.normal(scale=3.0, size=(n, k))
        t = rng.integers(0, k, size=n)
        g = gradcheck.cross_entropy_grad(z, t)
        if n * k <= settings.truth_limit:
            truth = gradcheck.exact_grad(z, t)
            reference = "exact_grad"
        else:
            bounded = gradcheck.cross_entropy_grad_bounded(z, t)
            truth = bounded.value
            rel = float(np.max(bounded.bound) / np.max(np.abs(truth)))
            reference = f"bounded oracle (rigorous bound {rel:.1g} normwise)"
            notes.append(f"At ({n}, {k}) accuracy is measured against `cross_entropy_grad_bounded`, whose "
                         f"rigorous error bound is {rel:.1g} of the largest element: far below every error shown.")
        times: dict[str, float] = {}
        for tool in TOOLS:
            label = f"({n}, {k})"
            try:
                limit = tool.limit or settings.skip_seconds
                if tool.memory is not None and tool.memory(n, k) > MEMORY_LIMIT:
                    raise bc.Skip(f"skipped: needs about {tool.memory(n, k) / 1e9:.0f} GB "
                                  f"((NK)^2 points per evaluation call)")
                if tool.name in last:
                    nk0, s0, e0 = last[tool.name]
                    if tool.unit is not None:
                        unit = bc.measure(tool.unit(z, t), settings, repeats=5, warmup=True).median
                        evals = e0 * n * k / nk0
                        predicted = evals * unit
                        how = f"{evals:.3g} evaluations x {bc.seconds(unit)} per loss evaluation at this shape"
                    else:
                        predicted = s0 * (n * k / nk0) ** tool.exponent
                        how = f"{bc.seconds(s0)} at N K = {nk0}, time ~ (N K)^{tool.exponent:g}"
                    if predicted > limit:
                        raise bc.Skip(f"skipped: predicted {predicted:.3g} s > {limit:.0f} s ({how})")
                timing = bc.measure(lambda: tool.run(z, t, g), settings, warmup=number == 0)
            except bc.Skip as note:
                rows.append([label, tool.name, str(note), "—", "—", "—", "—"])
                log(f"fullcheck {label} {tool.name}: {note}")
                continue
            out: Outcome = timing.value
            times[tool.name] = timing.median
            last[tool.name] = (n * k, timing.median, out.evaluations)
            rows.append([label, tool.name, f"{bc.seconds(timing.median)} (median of {timing.runs})",
                         str(out.evaluations), accuracy(out, truth), {True: "pass", False: "FAIL", None: "inconclusive"}[out.passed], ""])
            log(f"fullcheck {label} {tool.name}: {rows[-1][2]}, {out.evaluations} evaluations, {rows[-1][4]}")
        slow = times.get("torch.autograd.gradcheck slow")
        fast = times.get("torch.autograd.gradcheck fast")
        for row in rows:
            if row[0] == f"({n}, {k})" and row[6] == "":
                name = row[1]
                parts = [f"{slow / times[name]:.3g}× vs slow" if slow else "torch slow not measured",
                         f"{fast / times[name]:.3g}× vs fast" if fast else "torch fast not measured"]
                row[6] = "; ".join(parts)
        for key, name in (("central", "ours: structured central difference (fd_central)"),
                          ("complex_step", "ours: structured complex step (fd_complex_step)"),
                          ("directional", "ours: directional check (8 probes)")):
            if slow and name in times:
                figures[f"full_{key}_vs_torch_slow_{n}x{k}"] = slow / times[name]
                figures[f"evals_{key}_{n}x{k}"] = float(last[name][2])
        if slow:
            figures[f"evals_torch_slow_{n}x{k}"] = float(last["torch.autograd.gradcheck slow"][2])
        notes.append(f"({n}, {k}): accuracy against {reference}.")
        if (n, k) == min(settings.shapes, key=lambda s: abs(s[0] * s[1] - 128 * 1000)):
            notes.append(thread_note(settings, z, t))
    lines = ["## 1. Full-gradient verification cost", "",
             "Each tool checks a correct float64 gradient of the mean cross-entropy (class-index targets, logits "
             "~ N(0, 9), seed 0). *Evaluations*: loss evaluations at a point; ours count batched row-loss "
             "evaluations (one per perturbed column: every row moves at once), scipy counts points. *Accuracy*: "
             "normwise relative error (max |est - truth| / max |truth|) of the tool's own numerical estimate, "
             "the full gradient or its directional derivative(s). *Speed-up*: the peer's median time divided by "
             "this tool's, same shape, same run.", ""]
    lines += bc.table(["shape", "tool", "median time", "evaluations", "accuracy vs truth", "verdict",
                       "speed-up vs torch gradcheck"], rows)
    lines += [""] + [f"- {note}" for note in notes]
    lines += ["- What each tool computes: " + "; ".join(f"{tool.name}: {tool.what}" for tool in TOOLS) + "."]
    return lines, figures
