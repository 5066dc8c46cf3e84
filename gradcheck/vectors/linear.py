"""The golden vectors of the fused linear family: seeded cases with certified (d_hidden, d_weight, d_bias) and modeled bugs.

Each group is one dtype and one set of options, with a bias or without. Every *valid* test carries
the three gradients correctly rounded to the dtype (:func:`gradcheck.exact_linear_grad`); every
*invalid* test repeats a valid test's inputs with the gradients a shipped bug produces (the bugs of
issue 13: Liger-Kernel #968/#1298, #243, cut-cross-entropy #52, and a missing 1/N). An invalid test is
kept only where ``verify_linear``'s judge rejects it (on some inputs a bug is harmless: with one row,
a missing 1/N is no bug), and a valid one only where the judge accepts it, so the file is also a test
of the checker. The inputs are the strategies' own draw (:func:`gradcheck.checking.linear.draw_case`,
values exact in every dtype), with shapes off the chunk and block sizes and D from 1.

The file (:func:`render_linear_vectors`) is deterministic JSON: floats bit-exact as in vectors.json
(:func:`gradcheck.report.floats.encode_floats`), the same bytes on every machine for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcheck.checking.linear import LinearCase, check_linear, compare_linear, draw_case
from gradcheck.checking.result import Failure
from gradcheck.dtypes import DTYPE_NAMES, float_format
from gradcheck.linear import LinearGrad
from gradcheck.linear_exact import certified_linear_grad, exact_linear_grad

SCHEMA_NAME = "gradcheck-linear-vectors"
SCHEMA_VERSION = "1.0.0"
DEFAULT_SEED = 0

# (N, V, D, regime): N off the chunk sizes (4, 8, 16), V off the block sizes (16, 64), D from 1
SHAPES: tuple[tuple[int, int, int, str], ...] = (
    (1, 1, 1, "moderate"), (3, 5, 1, "moderate"), (5, 17, 4, "moderate"), (9, 33, 3, "large"),
    (7, 15, 8, "dominant_row"), (4, 65, 2, "tiny_hidden"),
)


@dataclass(frozen=True)
class LinearGroupSpec:
    """The options shared by a group: as for :func:`gradcheck.verify_linear` (``upstream``: a drawn grad_output)."""

    name: str
    bias: bool
    reduction: str = "mean"
    label_smoothing: float = 0.0
    weighted: bool = False
    ignore_index: int | None = None
    upstream: bool = False


LINEAR_GROUPS: tuple[LinearGroupSpec, ...] = (
    LinearGroupSpec("linear", bias=False),
    LinearGroupSpec("linear_bias", bias=True),
    LinearGroupSpec("linear_bias_sum_upstream", bias=True, reduction="sum", upstream=True),
    LinearGroupSpec("linear_bias_none_upstream", bias=True, reduction="none", upstream=True),
    LinearGroupSpec("linear_smoothed_weighted_ignored", bias=False, label_smoothing=0.1, weighted=True, ignore_index=-100),
)


def _oracle(case: LinearCase, **changes: Any) -> LinearGrad:
    """The certified truth, correctly rounded to the dtype, on the case's inputs with some options changed (a
    bug's gradient). Not the float64 oracle: its last bits follow numpy's SIMD exp and log, so the file would
    differ between CPUs (README, "Reproducing the report")."""
    lp = case.problem
    options = {**case.options(), **({} if case.grad_output is None else {"grad_output": case.grad_output}), **changes}
    return exact_linear_grad(lp.hidden, lp.weight, case.targets, bias=lp.bias, **options)


def _upstream_first(case: LinearCase) -> tuple:
    """Liger-Kernel #968/#1298: under reduction="none", dW and db scaled by grad_output[0] for every row."""
    right = _oracle(case)
    first = _oracle(case, grad_output=np.full_like(case.grad_output, case.grad_output[0]))
    return (right.hidden, first.weight, first.bias)


def _smoothing_dropped(case: LinearCase) -> tuple:
    """Liger-Kernel #243: the fused path silently drops label smoothing."""
    return tuple(_oracle(case, label_smoothing=0.0))


def _bias_dropped(case: LinearCase) -> tuple:
    """A bias-path bug (cut-cross-entropy #52): the bias gets no gradient."""
    g = _oracle(case)
    return (g.hidden, g.weight, np.zeros_like(g.bias))


def _missing_mean(case: LinearCase) -> tuple:
    """The gradient of the sum returned for reduction="mean" (the 1/N is missing)."""
    return tuple(_oracle(case, reduction="sum"))


# flag: (description, applies to the group, the bug's gradients)
LINEAR_BUGS: dict[str, tuple[str, Callable[[LinearGroupSpec], bool], Callable[[LinearCase], tuple]]] = {
    "UpstreamFirstElement": ("dW and db scaled by grad_output[0] under reduction='none' (Liger-Kernel #968, #1298)",
                             lambda s: s.reduction == "none" and s.upstream, _upstream_first),
    "LabelSmoothingDropped": ("label smoothing dropped by the fused path (Liger-Kernel #243)",
                              lambda s: s.label_smoothing > 0, _smoothing_dropped),
    "BiasGradientDropped": ("the bias gets a zero gradient (a bias-path bug, cut-cross-entropy #52)",
                            lambda s: s.bias, _bias_dropped),
    "MissingMeanDivisor": ("the gradients of the sum returned for reduction='mean'",
                           lambda s: s.reduction == "mean", _missing_mean),
}


@dataclass(frozen=True, eq=False)
class LinearVector:
    """One test: the inputs (a :class:`LinearCase`), the gradients, valid or the modeled bug's."""

    tc_id: int
    case: LinearCase
    grad: tuple[np.ndarray, ...]
    result: str
    bug: str | None = None


@dataclass(frozen=True, eq=False)
class LinearVectorGroup:
    dtype: str
    spec: LinearGroupSpec
    tests: tuple[LinearVector, ...]


def _gradients(g: Any, bias: bool) -> tuple[np.ndarray, ...]:
    g = tuple(g)
    return g[:3] if bias else g[:2]


def build_linear_suite(seed: int = DEFAULT_SEED, *, dtypes: tuple[str, ...] = DTYPE_NAMES) -> tuple[LinearVectorGroup, ...]:
    """Every group in every dtype: the valid tests (certified truth) and the bugs the judge rejects."""
    groups, tc_id = [], 0
    for dtype in dtypes:
        fmt = float_format(dtype)
        for g, spec in enumerate(LINEAR_GROUPS):
            tests = []
            for s, (n, v, d, regime) in enumerate(SHAPES):
                rng = np.random.default_rng([seed, DTYPE_NAMES.index(fmt.name), g, s])
                case = draw_case(rng, n, v, d, regime, fmt, bias=spec.bias, targets="index", weighted=spec.weighted,
                                 ignore_index=spec.ignore_index, ignored="some" if spec.ignore_index is not None else "none",
                                 grad_output="drawn" if spec.upstream else "none", reduction=spec.reduction,
                                 label_smoothing=spec.label_smoothing, lse_square_scale=0.0, softcap=None)
                truth = _gradients(certified_linear_grad(case.problem, fmt), spec.bias)
                if isinstance(compare_linear(truth, case), Failure):
                    raise AssertionError(f"the judge rejects the certified truth of {case!r}")  # a checker defect
                tc_id += 1
                tests.append(LinearVector(tc_id, case, truth, "valid"))
                for flag, (_, applies, bug) in LINEAR_BUGS.items():
                    if not applies(spec):
                        continue
                    wrong = _gradients(bug(case), spec.bias)
                    if isinstance(compare_linear(wrong, case), Failure):  # harmless on these inputs: not a test
                        tc_id += 1
                        tests.append(LinearVector(tc_id, case, wrong, "invalid", flag))
            groups.append(LinearVectorGroup(fmt.name, spec, tuple(tests)))
    return tuple(groups)


@dataclass(frozen=True)
class LinearVectorOutcome:
    """One test checked: ``classified``: the judge accepts a valid test's gradients and rejects an invalid
    one's; ``implementation_ok``: the implementation passed (valid tests only; None for invalid ones)."""

    tc_id: int
    result: str
    classified: bool
    implementation_ok: bool | None
    message: str = ""


def check_linear_vectors(grad_fn: Callable[..., Any] | None,
                         groups: tuple[LinearVectorGroup, ...]) -> list[LinearVectorOutcome]:
    """Check the judge on every test and, when given, ``grad_fn`` on every valid test's inputs
    (the whole of verify_linear's judgement: hygiene, shape, dtype, values)."""
    outcomes = []
    for group in groups:
        for t in group.tests:
            rejected = isinstance(compare_linear(t.grad, t.case), Failure)
            classified = rejected == (t.result == "invalid")
            ok, message = None, ""
            if grad_fn is not None and t.result == "valid":
                verdict = check_linear(grad_fn, t.case)
                ok = not isinstance(verdict, Failure)
                message = "" if ok else f"tcId {t.tc_id} ({group.dtype}, {group.spec.name}): {verdict.message}"
            outcomes.append(LinearVectorOutcome(t.tc_id, t.result, classified, ok, message))
    return outcomes


def render_linear_vectors(groups: tuple[LinearVectorGroup, ...], seed: int = DEFAULT_SEED) -> str:
    """The suite as deterministic JSON (bit-exact floats)."""
    from gradcheck.report.floats import encode_floats
    from gradcheck.report.jsonio import dumps

    def test(t: LinearVector) -> dict[str, Any]:
        c = t.case
        n, v, d = c.problem.shape
        options = c.options()
        if c.grad_output is not None:
            options["grad_output"] = c.grad_output
        return {
            "tcId": t.tc_id, "result": t.result, "flags": [t.bug] if t.bug else [], "regime": c.regime,
            "shape": [n, v, d], "hidden": encode_floats(c.hidden), "weight": encode_floats(c.weight),
            **({"bias": encode_floats(c.bias)} if c.bias is not None else {}),
            "targets": [int(x) for x in c.targets],
            **({"ceWeight": encode_floats(options["ce_weight"])} if "ce_weight" in options else {}),
            **({"gradOutput": encode_floats(np.asarray(options["grad_output"]))} if "grad_output" in options else {}),
            "dHidden": encode_floats(t.grad[0]), "dWeight": encode_floats(t.grad[1]),
            **({"dBias": encode_floats(t.grad[2])} if len(t.grad) == 3 else {}),
        }

    document = {
        "schema": SCHEMA_NAME, "schemaVersion": SCHEMA_VERSION, "seed": seed,
        "numberOfTests": sum(len(g.tests) for g in groups),
        "notes": {flag: description for flag, (description, _, _) in LINEAR_BUGS.items()},
        "testGroups": [{
            "name": g.spec.name, "dtype": g.dtype, "bias": g.spec.bias, "reduction": g.spec.reduction,
            "labelSmoothing": g.spec.label_smoothing, "weighted": g.spec.weighted,
            "ignoreIndex": g.spec.ignore_index, "upstream": g.spec.upstream,
            "tests": [test(t) for t in g.tests],
        } for g in groups],
    }
    return dumps(document)


def parse_linear_vectors(text: str) -> tuple[LinearVectorGroup, ...]:
    """The groups of a file written by :func:`render_linear_vectors` (floats from their hex, bit for bit).

    Raises:
        InvalidArgument: not such a file (not JSON, another schema, a malformed test), naming what is wrong.
    """
    import json

    from gradcheck.errors import InvalidArgument
    from gradcheck.report.floats import decode_floats

    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"a linear vectors file must be JSON, got a parse error: {exc}.") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA_NAME:
        got = document.get("schema") if isinstance(document, dict) else type(document).__name__
        raise InvalidArgument(f"a linear vectors file must have schema {SCHEMA_NAME!r}, got {got!r} (write one with "
                              "render_linear_vectors or `gradcheck vectors --linear`).")
    groups = []
    try:
        for g in document["testGroups"]:
            spec = LinearGroupSpec(g["name"], bool(g["bias"]), g["reduction"], float(g["labelSmoothing"]),
                                   bool(g["weighted"]), g["ignoreIndex"], bool(g["upstream"]))
            tests = []
            for t in g["tests"]:
                where = f"tcId {t['tcId']}"
                options: dict[str, Any] = {"reduction": spec.reduction, "label_smoothing": spec.label_smoothing}
                if spec.ignore_index is not None:
                    options["ignore_index"] = spec.ignore_index
                if "ceWeight" in t:
                    options["ce_weight"] = decode_floats(t["ceWeight"], where=f"{where}.ceWeight")
                if "gradOutput" in t:
                    options["grad_output"] = decode_floats(t["gradOutput"], where=f"{where}.gradOutput")
                case = LinearCase.make(decode_floats(t["hidden"], where=f"{where}.hidden"),
                                       decode_floats(t["weight"], where=f"{where}.weight"),
                                       np.array(t["targets"], dtype=np.int64),
                                       bias=decode_floats(t["bias"], where=f"{where}.bias") if "bias" in t else None,
                                       regime=t["regime"], **options)
                keys = ("dHidden", "dWeight", "dBias") if spec.bias else ("dHidden", "dWeight")
                grad = tuple(decode_floats(t[k], where=f"{where}.{k}") for k in keys)
                flags = t["flags"]
                tests.append(LinearVector(int(t["tcId"]), case, grad, t["result"], flags[0] if flags else None))
            groups.append(LinearVectorGroup(g["dtype"], spec, tuple(tests)))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"a malformed linear vectors file: {type(exc).__name__}: {exc}.") from None
    return tuple(groups)
