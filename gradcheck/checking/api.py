"""verify and assert_gradient: check any project's cross-entropy gradient against the truth.

Each example is a :class:`gradcheck.problem.Case` drawn by Hypothesis (:mod:`.search`). The
``grad_fn`` is called twice on private copies and its result judged against the truth
(:mod:`.judge`, docs/tolerance.md). A failure is shrunk by Hypothesis (regime, shape, seed), then its
values are simplified (rows and classes dropped, numbers rounded) while it keeps failing the same way
(:mod:`.shrink`); :mod:`.messages` says what is wrong.
"""

from __future__ import annotations

import inspect
import secrets
import time
from typing import Any, Callable

from gradcheck.checking.deadline import require_deadline
from gradcheck.checking.diagnose import diagnose
from gradcheck.checking.judge import finalize
from gradcheck.checking.messages import _name, describe
from gradcheck.checking.result import Verification
from gradcheck.checking.search import _search
from gradcheck.checking.shrink import simplify
from gradcheck.errors import GradientMismatch, InvalidArgument
from gradcheck.dtypes import float_format
from gradcheck.options import GENERATE, VERIFY
from gradcheck.tolerance import contracts, resolve_contract
from gradcheck.strategies import cases, shape_buckets


def verify(grad_fn: Callable[..., Any], *, progress: Callable[[int, int], None] | None = None,
           **options: Any) -> Verification:
    """Check ``grad_fn(logits, targets, **options)`` on Hypothesis-generated cases.

    Args:
        grad_fn: returns the gradient of ``torch.nn.functional.cross_entropy`` with respect to the
            logits (an array-like of the logits' shape and dtype: numpy, torch or jax). It receives
            numpy arrays of ``dtype`` and, as keywords, the options that differ from their defaults
            (``weight``, ``ignore_index``, ``label_smoothing``, ``reduction``, ``lse_square_scale``,
            ``softcap``). When its signature names a ``grad_output`` parameter (see
            :func:`takes_grad_output`), every example also passes an upstream gradient
            ``grad_output=`` (a scalar of ``dtype`` for "mean"/"sum", an ``(N,)`` array for "none")
            and the result must be the vector-Jacobian product ``grad_output * dL/dz`` (ignored rows
            0); otherwise it is checked as the gradient of the loss itself and the result says the
            upstream gradient was not exercised (``Verification.upstream``).
        progress: called as ``progress(done, max_examples)`` after each example (not while a failure
            is shrunk); None (the default) is quiet. ``gradcheck verify`` shows a rich bar on a
            terminal once a check has run for 2 s; the pytest plugin passes none.
        **options: the check options of :data:`gradcheck.options.VERIFY`, each checked by its one
            rule there (the same for the pytest marker and ``gradcheck verify``):

        dtype: "float64", "float32", "float16" or "bfloat16".
        targets: "index" (class indices, int64) or "probs" (probabilities of ``dtype``).
        reduction, label_smoothing: the options checked.
        weighted: pass class weights (``weight=``, an array of K values of ``dtype``).
        ignore_index: when set, passed to ``grad_fn`` and some rows take that target.
        max_examples: the number of examples Hypothesis generates.
        seed: the Hypothesis seed; a random one (recorded in the result) when None.
        max_shape: the largest ``(N, K)`` generated (default ``(64, 4096)``; "many_classes" reaches
            K = 32831 and "llm_vocab" K = 262145 when ``max_shape`` allows it, with up to 4096 rows at
            K = 32000, most of them ignored: :data:`gradcheck.regimes.CATALOGUE`'s ``max_elements`` and
            ``max_live_elements``). A ``grad_fn`` with
            ``compiles_per_shape = True`` (the JAX adapters) gets the few shapes of
            :data:`gradcheck.strategies.SHAPE_BUCKETS` within it instead (each compiled once).
        shapes: draw every regime at exactly these logits shapes (a list of tuples, e.g.
            ``[(8, 128256), (2, 1024, 32000)]``; replaces ``max_shape``); 3-D and larger shapes need
            ``class_axis``.
        class_axis: the class axis of those shapes: 1 for torch's layout ``(N, C, d1, ..., dk)``
            with targets ``(N, d1, ..., dk)``, -1 for the LLM layout ``(B, T, V)`` with targets
            ``(B, T)``; ``grad_fn`` gets the arrays in that layout and ``class_axis=`` among its options.
        regimes: the logits regimes drawn from (see :mod:`gradcheck.strategies`).
        precision: the contract checked, the narrowest working precision a correct implementation
            may use before rounding its result once to the dtype: "exact" (the correctly rounded
            truth), "float64", "float32", or the dtype itself (may compute in it). Default "float32"
            for float16 and bfloat16, the dtype itself otherwise; narrower than the dtype is refused.
            Whatever is asked, the result's ``grade`` says the tightest contract met on every
            example (docs/tolerance.md, "Precision contracts").
        inplace: "flag" (default): a ``grad_fn`` that writes to any argument fails (kind "mutation"),
            and one that returns a view of an argument too ("aliasing"); "allowed": it may write the
            gradient into its logits argument and return it, as Liger-Kernel's kernels do. verify
            always passes private copies, so the caller's arrays are never touched either way.
        timeout: seconds each ``grad_fn`` call may take (None, the default: no limit). A call that
            runs longer is interrupted and the verification fails with kind "timeout" on that case
            (unshrunk). It works by SIGALRM, so only on POSIX and on the main thread (elsewhere it is
            refused with InvalidArgument), and C code that does not return to Python (a long numpy
            or GPU call) is interrupted only when it does; see :mod:`gradcheck.checking.deadline`.

    A ``grad_fn`` that calls ``sys.exit()`` fails (kind "exception"); ``KeyboardInterrupt`` propagates.
    Each result is copied before the next call, and a result that shares memory with an argument or
    with the previous call's result fails (kind "aliasing") even when its values are right.

    Returns:
        A :class:`Verification`; it never raises because the gradient is wrong.

    Raises:
        InvalidArgument: a bad argument (named in the message), or a ``timeout`` that cannot be
            enforced here.
    """
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}.")
    o = VERIFY.validate(options, where="verify()")
    require_deadline(o["timeout"])
    fmt = float_format(o["dtype"])
    precision = resolve_contract(fmt, o["precision"], where=f"dtype={fmt.name!r}")
    arguments = {k: v for k, v in VERIFY.non_defaults(o).items() if k != "seed"}  # the seed is printed apart
    seed = secrets.randbits(32) if o["seed"] is None else o["seed"]
    upstream = takes_grad_output(grad_fn)  # inspected once, here
    drawn = GENERATE.non_defaults(o)
    if o["shapes"] is None and getattr(grad_fn, "compiles_per_shape", False):  # JAX: a few shapes, each compiled once
        drawn["shapes"] = shape_buckets(o["max_shape"])
    strategy = cases(upstream=upstream, **drawn)
    max_examples = o["max_examples"]
    start = time.perf_counter()
    stats = {"examples": 0, "ulps": 0.0, "ratio": 0.0, "failed": False}
    rules = {"timeout": o["timeout"], "precision": precision, "inplace": o["inplace"]}
    failure = _search(grad_fn, strategy, seed, max_examples, stats, progress=progress, **rules)
    if failure is not None:
        failure = diagnose(grad_fn, finalize(simplify(grad_fn, failure, **rules)), before=failure, **rules)
    met = stats.get("met", {})
    graded = not stats.get("ungraded") and stats["examples"] > 0
    grade = next((c for c in contracts(fmt) if met.get(c)), None) if graded else None
    ratios = {c: stats["ratios"][c] for c in contracts(fmt) if c in stats.get("ratios", {})}
    return Verification(
        passed=failure is None, examples=stats["examples"], worst_ulps=stats["ulps"], worst_ratio=stats["ratio"],
        seed=seed, dtype=o["dtype"], function=_name(grad_fn), arguments=arguments, failure=failure,
        elapsed=time.perf_counter() - start, precision=precision, grade=grade, contract_ratios=ratios,
        upstream=upstream,
    )


def takes_grad_output(grad_fn: Callable[..., Any]) -> bool:
    """Whether verify passes ``grad_fn`` an upstream gradient: its signature names ``grad_output``.

    A parameter called ``grad_output`` that can be given by keyword counts; ``**kwargs`` alone does
    not. A ``**kwargs`` function usually forwards its options to a function verify cannot see,
    which may drop an unknown keyword silently or raise on it; either way the result would be judged
    as a wrong VJP although the function never claimed to take one. Declare it to be checked:
    ``def grad_fn(logits, targets, *, grad_output=None, **options)``. A callable whose signature
    cannot be read (some builtins and C extensions) is taken not to accept it.
    """
    try:
        parameter = inspect.signature(grad_fn).parameters.get("grad_output")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)


def assert_gradient(grad_fn: Callable[..., Any], **kwargs: Any) -> None:
    """Like :func:`verify`, but raise on a failure.

    Raises:
        GradientMismatch: naming the worst element, expected and got, the error in ULPs and the
            tolerance, the minimal failing logits and targets, the seed and how to reproduce.
        InvalidArgument: a bad argument.
    """
    result = verify(grad_fn, **kwargs)
    if not result.passed:
        raise GradientMismatch(describe(result))

