"""The `gradcheck` command line: parse options, call the library, print."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from gradcheck.errors import require


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples' line breaks."""


def _err(message: str) -> None:
    print(f"gradcheck: error: {message}", file=sys.stderr)


def _unwritable(*paths: str | None) -> bool:
    """Whether an output path given cannot be written (checked before the work); prints why."""
    from gradcheck.report.jsonio import NotWritable, check_writable

    try:
        for path in paths:
            if path is not None:
                check_writable(path)
    except NotWritable as exc:
        _err(str(exc))
        return True
    return False


# --- selfcheck ----------------------------------------------------------------------------------


def _selfcheck(args: argparse.Namespace) -> int:
    require("rich", extra="report")
    from rich.console import Console
    from rich.table import Column, Table

    from gradcheck.study.selfcheck import self_check

    console = Console()
    console.print(f"gradcheck self-check: seed {args.seed}, {args.cases} cases per regime and dtype")
    rows = self_check(seed=args.seed, cases=args.cases, dtypes=tuple(args.dtypes))
    table = Table("dtype", "cases", "max ULP", "median ULP", "bound held", "seconds")
    table.columns.insert(0, Column("regime", no_wrap=True, min_width=len("smoothed_weighted")))
    for r in rows:
        table.add_row(r.regime, r.dtype, str(r.cases), f"{r.max_ulp:g}", f"{r.median_ulp:g}",
                      "yes" if r.bound_held else "NO", f"{r.seconds:.2f}")
    console.print(table)
    ok = all(r.bound_held for r in rows)
    console.print("fast path within its error bound everywhere" if ok else "[red]error bound violated[/red]")
    return 0 if ok else 1


# --- progress -----------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on a terminal; silent otherwise. With ``delay`` it appears only once that many
    seconds have passed (a quick check prints nothing but its result)."""

    def __init__(self, console: Any, description: str, total: int, delay: float = 0.0) -> None:
        self._bar = None
        self._delay, self._started, self._shown = delay, time.perf_counter(), delay <= 0
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None and self._shown:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None and self._shown:
            self._bar.stop()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            if not self._shown and time.perf_counter() - self._started >= self._delay:
                self._shown = True
                self._bar.start()
            self._bar.advance(self._task, n)

    def update(self, done: int, total: int) -> None:
        """A ``progress(done, total)`` callback (verify's)."""
        self.advance(done - int(self._bar.tasks[0].completed) if self._bar is not None else 0)


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 10240 else f"{n} B"


# --- report -------------------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    import datetime as dt

    from gradcheck.report import FILES

    if _unwritable(*(os.path.join(args.out, name) for name in FILES)):
        return 2
    require("rich", extra="report")
    from rich.console import Console

    from gradcheck.errors import InvalidArgument
    from gradcheck.report import render_all, write_texts
    from gradcheck.study import StudyConfig, run_study, task_count
    from gradcheck.vectors import build_suite
    from gradcheck.vectors.linear import build_linear_suite

    console = Console(soft_wrap=True)
    started = dt.datetime.now(dt.timezone.utc)
    start = time.perf_counter()
    default = StudyConfig()
    asked = tuple(args.regimes or ())  # plain regimes and the kernel options' rows, told apart here
    config = StudyConfig(seed=args.seed, examples=args.examples, dtypes=tuple(args.dtypes),
                         regimes=tuple(r for r in asked if r in default.regimes) if asked else default.regimes,
                         option_regimes=tuple(r for r in asked if r in default.option_regimes) if asked
                         else default.option_regimes,
                         methods=tuple(args.methods or ()), proof_classes=args.max_classes)
    extra = [] if args.no_vectors else [(build_suite, args.seed), (build_linear_suite, args.seed)]
    try:
        with _Progress(console, "study", task_count(config) + len(extra)) as bar:
            study, extras = run_study(config, jobs=args.jobs, scheduler=args.scheduler, progress=bar.advance,
                                      extra=extra)
    except InvalidArgument as exc:
        _err(str(exc))
        return 2
    suite = extras[0] if extras else None
    linear = (extras[1], args.seed) if extras else None
    texts, _ = render_all(study, suite, started=started, timing={"totalSeconds": round(time.perf_counter() - start, 3)},
                          linear=linear)
    with _stops_deferred():  # the four files as a set: a stop now comes once they are written
        written = write_texts(args.out, texts)
    seconds = time.perf_counter() - start
    console.print(f"gradcheck report: {len(study.cases)} cases x {len(study.methods)} methods, seed {args.seed}, "
                  f"{study.workers}, {seconds:.1f} s")
    for w in written:
        console.print(f"  wrote {w.path} ({_size(w.size)})")
    closed = [c for c in study.totals if c.method == "closed_form" and c.usable]
    held = all(c.within_share == 1 for c in closed)
    proofs_ok = all(p.status == "proved" for p in study.proofs)
    for c in closed:
        console.print(f"  closed form, {c.dtype}: max {c.max_ulp:g} ULP, median {c.median_ulp:g} ULP, "
                      f"bound held in {100 * c.within_share:.0f}% of {c.usable} cases")
    kernel = [c for c in study.option_cells if c.method == "closed_form" and c.usable]  # (helper vectors)
    held = held and all(c.within_share == 1 for c in kernel)
    for regime in study.config.option_regimes:
        cells = [c for c in kernel if c.regime == regime]
        if cells:
            console.print(f"  closed form, {regime}: max {max(c.max_ulp for c in cells):g} ULP, bound held in "
                          f"{sum(c.within_share == 1 for c in cells)} of {len(cells)} dtypes")
    if study.proofs:
        console.print(f"  SymPy: {sum(p.status == 'proved' for p in study.proofs)} of {len(study.proofs)} identities proved")
    if suite is not None:
        valid = sum(t.result == "valid" for g in suite.groups for t in g.tests)
        console.print(f"  vectors: {suite.number_of_tests} tests ({valid} valid, {suite.number_of_tests - valid} invalid) "
                      f"in {len(suite.groups)} groups")
    if linear is not None:
        tests = [t for g in linear[0] for t in g.tests]
        console.print(f"  linear vectors: {len(tests)} tests ({sum(t.result == 'valid' for t in tests)} valid) "
                      f"in {len(linear[0])} groups")
    if not held:
        _err("the closed form's rigorous error bound failed on some case (see report.md)")
    if not proofs_ok:
        _err("a SymPy proof did not succeed (see report.md)")
    return 0 if held and proofs_ok else 1


# --- vectors ------------------------------------------------------------------------------------


def _check_current(path: str, text: str, what: str, regenerate: str, summary: str) -> int:
    """``--check``: 0 when the file at ``path`` is ``text``, 1 (saying how to regenerate it) when it differs,
    2 when it cannot be read."""
    from pathlib import Path

    try:
        current = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        _err(f"cannot read {path}: {exc.strerror}")
        return 2
    if current != text:
        _err(f"{path} differs from {what}; regenerate it with `{regenerate}`")
        return 1
    print(f"{path} is up to date ({summary})")
    return 0


def _linear_vectors(args: argparse.Namespace) -> int:
    """``gradcheck vectors --linear``: the fused linear family's golden vectors (gradcheck.vectors.linear)."""
    from gradcheck.report.jsonio import write_atomic
    from gradcheck.vectors.linear import build_linear_suite, render_linear_vectors

    out = args.out if args.out is not None else os.path.join("reports", "linear_vectors.json")
    if not args.check and _unwritable(out):
        return 2
    start = time.perf_counter()
    groups = build_linear_suite(args.seed)
    text = render_linear_vectors(groups, args.seed)
    tests = sum(len(g.tests) for g in groups)
    if args.check:
        return _check_current(out, text, f"the linear vectors generated with seed {args.seed}",
                              f"gradcheck vectors --linear --out {out}", f"{tests} tests, seed {args.seed}")
    path = write_atomic(out, text)
    print(f"wrote {path} ({_size(path.stat().st_size)}): {tests} tests in {len(groups)} groups, seed {args.seed}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def _vectors(args: argparse.Namespace) -> int:
    if getattr(args, "linear", False):
        return _linear_vectors(args)

    from gradcheck.report import write_vectors
    from gradcheck.vectors import build_suite, render_vectors

    if args.out is None:
        args.out = os.path.join("reports", "vectors.json")
    if not args.check and _unwritable(args.out):
        return 2
    start = time.perf_counter()
    suite = build_suite(args.seed)
    if args.check:
        return _check_current(args.out, render_vectors(suite), f"the vectors generated with seed {args.seed}",
                              f"gradcheck vectors --out {args.out}", f"{suite.number_of_tests} tests, seed {args.seed}")
    written = write_vectors(args.out, suite)
    print(f"wrote {written.path} ({_size(written.size)}): {suite.number_of_tests} tests in {len(suite.groups)} groups, "
          f"seed {args.seed}, {time.perf_counter() - start:.1f} s")
    return 0


# --- verify -------------------------------------------------------------------------------------


# what verify runs on: imported before the user's folder is on sys.path, so that a hypothesis.py or
# rich.py there cannot stand in for them (optional ones may be missing: verify says so where it needs them)
DEPENDENCIES = ("numpy", "ml_dtypes", "mpmath", "hypothesis", "rich.console", "rich.progress", "jsonschema",
                "gradcheck.options", "gradcheck.checking.api", "gradcheck.checking.messages", "gradcheck.strategies",
                "gradcheck.vectors", "gradcheck.report.jsonio", "gradcheck.report.junit", "gradcheck.checking.linear")


def import_dependencies() -> None:
    """Import :data:`DEPENDENCIES` with the current folder off sys.path (``python -m`` puts it first)."""
    import importlib

    cwd, saved = os.getcwd(), list(sys.path)
    sys.path[:] = [p for p in saved if p not in ("", ".", cwd)]
    try:
        for name in DEPENDENCIES:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    finally:
        sys.path[:] = saved


def load_function(spec: str) -> Any:
    """Import ``MODULE:FUNC`` (FUNC may be dotted) from the current directory, like ``python -m`` would.

    The current directory is first on sys.path only while MODULE is imported (call
    :func:`import_dependencies` before, so that it shadows none of gradcheck's own imports).

    Raises:
        ValueError: a malformed spec, an import error (``sys.exit()`` on import included) or a missing
            attribute (the message says which).
    """
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNC (e.g. mykernels.ce:grad), got {spec!r}")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except SystemExit as exc:  # the module called sys.exit() on import: not a pass, an unusable module
        raise ValueError(f"cannot import module {module_name!r} from {cwd}: it called sys.exit({exc.code!r}) on "
                         "import") from None
    except Exception as exc:  # noqa: BLE001 - any import failure is a usage error
        raise ValueError(f"cannot import module {module_name!r} from {cwd}: {type(exc).__name__}: {exc}") from None
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)  # the first occurrence: the one inserted above
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{spec} is not callable (got {type(obj).__name__})")
    return obj


def _finite(x: float | None) -> float | None:
    import math

    return x if x is None or math.isfinite(x) else None


def _verify(args: argparse.Namespace) -> int:
    if _unwritable(args.json, args.junit_xml):
        return 2
    import_dependencies()
    try:
        fn = load_function(args.function)
    except ValueError as exc:
        _err(str(exc))
        return 2
    linear = getattr(args, "linear", False)
    if args.vectors:
        return _verify_linear_vectors(args, fn) if linear else _verify_vectors(args, fn)
    from gradcheck.errors import InvalidArgument
    from gradcheck.checking.api import verify
    from gradcheck.checking.messages import describe

    from gradcheck.options import VERIFY

    if linear:  # issue 13: a fused linear cross-entropy grad_fn(hidden, weight, targets, **options)
        from gradcheck.checking.linear import LINEAR_VERIFY as VERIFY  # noqa: N811 - the same role, its table
        from gradcheck.checking.linear import describe_linear as describe
        from gradcheck.checking.linear import verify_linear as verify
    options = {k: v for k, v in vars(args).items() if k in VERIFY and k not in MANY}
    runs, cases = [], []
    for dtype in args.dtype or [VERIFY["dtype"].default]:
        for targets in args.targets or [VERIFY["targets"].default]:
            bar = None
            try:
                from rich.console import Console  # the report extra; without it verify runs quiet

                bar = _Progress(Console(stderr=True), f"verify {dtype} {targets}",
                                options.get("max_examples", 100), delay=2.0)
            except ImportError:
                pass
            try:
                if bar is None:
                    result = verify(fn, dtype=dtype, targets=targets, **options)
                else:
                    with bar:
                        result = verify(fn, dtype=dtype, targets=targets, progress=bar.update, **options)
            except InvalidArgument as exc:
                _err(str(exc))
                return 2
            print(str(result).splitlines()[0])
            if not result.passed:
                print(describe(result), file=sys.stderr)
            runs.append({
                "dtype": dtype, "targets": targets, "passed": result.passed, "examples": result.examples,
                "worstUlps": _finite(result.worst_ulps), "worstRatio": _finite(result.worst_ratio), "seed": result.seed,
                "precision": result.precision, "grade": result.grade,
                "contractRatios": {c: _finite(r) for c, r in result.contract_ratios.items()},
                "upstream": result.upstream,  # the grad_fn took grad_output= (issue 12)
                "reproduction": result.reproduction, "failure": None if result.passed else describe(result),
            })
            cases.append((f"{dtype}-{targets}", result.elapsed, None if result.passed else describe(result)))
    passed = all(r["passed"] for r in runs)
    _outputs(args, {"mode": "linear" if linear else "property", "function": args.function, "passed": passed,
                    "runs": runs}, cases)
    return 0 if passed else 1


def _verify_vectors(args: argparse.Namespace, fn: Any) -> int:
    require("rich", extra="report")
    from rich.console import Console

    from gradcheck.errors import InvalidArgument
    from gradcheck.vectors import check_vectors, load_vectors

    try:
        suite = load_vectors(args.vectors)
    except InvalidArgument as exc:
        _err(str(exc))
        return 2
    dtypes = tuple(args.dtype) if args.dtype else None
    targets = tuple(args.targets) if args.targets else None
    total = sum(len(g.tests) for g in suite.groups
                if (not dtypes or g.dtype in dtypes) and (not targets or g.targets in targets))
    start = time.perf_counter()
    try:
        with _Progress(Console(stderr=True), "vectors", total) as bar:
            result = check_vectors(fn, suite, dtypes=dtypes, targets=targets, precision=getattr(args, "precision", None),
                               progress=bar.advance)
    except InvalidArgument as exc:  # no test to run (an empty file, or none of the asked dtype/targets)
        _err(f"{args.vectors}: {exc}")
        return 2
    elapsed = time.perf_counter() - start
    failures = result.implementation_failures
    ran = sum(o.implementation_ok is not None for o in result.outcomes)
    for o in failures:
        hint = f" (looks like: {', '.join(o.resembles)})" if o.resembles else ""
        print(f"FAIL {o.message}{hint}", file=sys.stderr)
    for o in result.misclassified:
        print(f"CHECKER {o.message}", file=sys.stderr)
    print(f"verify({result.function}) against {args.vectors}: {'passed' if result.passed else 'FAILED'}; "
          f"{len(result.outcomes)} tests, {ran} distinct inputs run, {len(failures)} failed, "
          f"{len(result.misclassified)} misclassified by the checker; {elapsed:.1f} s")
    if result.upstream_skipped:  # (helper vectors) the kernel groups' upstream gradients
        print(f"note: {result.upstream_skipped} tests with an upstream gradient (gradOutput) not run: "
              f"{result.function} does not take grad_output= (declare it to be checked as a VJP)")
    document = {
        "mode": "vectors", "function": args.function, "file": str(args.vectors), "passed": result.passed,
        "tests": len(result.outcomes), "inputsRun": ran, "upstreamSkipped": result.upstream_skipped,
        "failures": [{"tcId": o.tc_id, "message": o.message, "resembles": list(o.resembles)} for o in failures],
        "misclassified": [{"tcId": o.tc_id, "result": o.expected, "message": o.message} for o in result.misclassified],
    }
    cases = [(f"tcId {o.tc_id}", 0.0, o.message or None) for o in result.outcomes
             if o.implementation_ok is not None or not o.classified]
    _outputs(args, document, cases)
    return 0 if result.passed else 1


def _verify_linear_vectors(args: argparse.Namespace, fn: Any) -> int:
    """``gradcheck verify --linear FUNC --vectors FILE``: FUNC on every valid test's inputs, and the checker on
    every test (valid gradients accepted, invalid ones rejected)."""
    from pathlib import Path

    from gradcheck.errors import InvalidArgument
    from gradcheck.vectors.linear import check_linear_vectors, parse_linear_vectors

    try:
        groups = parse_linear_vectors(Path(args.vectors).read_text(encoding="utf-8"))
    except OSError as exc:
        _err(f"cannot read {args.vectors}: {exc.strerror}")
        return 2
    except InvalidArgument as exc:
        _err(f"{args.vectors}: {exc}")
        return 2
    if args.dtype:
        groups = tuple(g for g in groups if g.dtype in args.dtype)
    if not any(g.tests for g in groups):
        _err(f"{args.vectors} has no test{' of dtype ' + ', '.join(args.dtype) if args.dtype else ''}: zero tests "
             "checked is not a pass")
        return 2
    start = time.perf_counter()
    outcomes = check_linear_vectors(fn, groups)
    failures = [o for o in outcomes if o.implementation_ok is False]
    misclassified = [o for o in outcomes if not o.classified]
    for o in failures:
        print(f"FAIL {o.message}", file=sys.stderr)
    for o in misclassified:
        print(f"CHECKER tcId {o.tc_id} ({o.result}) is misjudged by verify_linear's judge", file=sys.stderr)
    passed = not failures and not misclassified
    ran = sum(o.implementation_ok is not None for o in outcomes)
    print(f"verify_linear({args.function}) against {args.vectors}: {'passed' if passed else 'FAILED'}; "
          f"{len(outcomes)} tests, {ran} inputs run, {len(failures)} failed, {len(misclassified)} misclassified by "
          f"the checker; {time.perf_counter() - start:.1f} s")
    document = {"mode": "linear-vectors", "function": args.function, "file": str(args.vectors), "passed": passed,
                "tests": len(outcomes), "inputsRun": ran,
                "failures": [{"tcId": o.tc_id, "message": o.message} for o in failures],
                "misclassified": [{"tcId": o.tc_id, "result": o.result} for o in misclassified]}
    _outputs(args, document, [(f"tcId {o.tc_id}", 0.0, o.message or None) for o in outcomes
                              if o.implementation_ok is not None])
    return 0 if passed else 1


def _outputs(args: argparse.Namespace, document: dict[str, Any], cases: list[tuple[str, float, str | None]]) -> None:
    from gradcheck.report.jsonio import dumps, write_atomic
    from gradcheck.report.junit import junit_xml

    if args.json:
        write_atomic(args.json, dumps({"schema": "gradcheck-verify", "schemaVersion": "1.0.0", **document}))
    if args.junit_xml:
        write_atomic(args.junit_xml, junit_xml(f"gradcheck.verify[{args.function}]", cases))


# --- prove --------------------------------------------------------------------------------------


def _prove(args: argparse.Namespace) -> int:
    from gradcheck.estimators.sympy_proofs import KINDS, prove

    kinds = tuple(args.kinds or KINDS)
    print(f"SymPy proofs for K = 1 .. {args.max_classes}: after differentiation the difference with the closed "
          "form is rational in E_j = exp(z_j), and cancel() reduces it to 0 (a decision procedure); with the "
          "kernel options tanh(z_j/c), exp and log(sum E) become symbols first (a zero proves the identity, "
          "a nonzero value at a rational witness point refutes it).")
    ok = True
    for k in range(1, args.max_classes + 1):
        for kind in kinds:
            p = prove(kind, k, timeout=args.timeout, use_cache=not args.no_cache)
            ok &= p.proved
            note = "cached" if p.cached else f"{p.seconds:.2f} s"
            print(f"  [{p.status:>7}] {p.statement} ({note})")
    print("all identities proved" if ok else "some identities were NOT proved")
    return 0 if ok else 1


# --- parser -------------------------------------------------------------------------------------


def _integer_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive = _integer_at_least(1, "a positive integer")
_nonnegative = _integer_at_least(0, "a nonnegative integer")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number of seconds, got {text!r}")
    return value


def build_parser(*, linear: bool = False) -> argparse.ArgumentParser:
    """The ``gradcheck`` parser: one subcommand per builder below, each setting ``run`` to its handler.

    ``linear``: ``verify``'s check options are verify_linear's (``--bias``, ``--max-shape N,V,D``,
    ``--precision``; no ``--regimes``), for ``gradcheck verify --linear MODULE:FUNC``.
    """
    parser = argparse.ArgumentParser(
        prog="gradcheck",
        description="Reference oracle and verification harness for the softmax cross-entropy gradient.",
        epilog="examples:\n  gradcheck report --out reports/\n  gradcheck verify mykernel:ce_grad --dtype float32\n"
               "  gradcheck verify mykernel:ce_grad --vectors reports/vectors.json\n  gradcheck prove --max-classes 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_selfcheck, _add_report, _add_vectors, _add_verify, _add_prove):
        add(sub, linear=linear) if add is _add_verify else add(sub)
    return parser


def _add_selfcheck(sub: Any) -> None:
    from gradcheck.dtypes import DTYPE_NAMES

    p = sub.add_parser(
        "selfcheck", formatter_class=_Formatter,
        help="compare the fast oracle with the certified truth in every regime",
        description="Compare the fast float64 oracle with the certified (mpmath) truth on seeded cases in "
        "every regime, print the ULP errors, and check the oracle's running error bound.",
        epilog="example: gradcheck selfcheck --cases 50 --seed 1",
    )
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of the generated cases (default 0)")
    p.add_argument("--cases", type=_positive, default=20, help="cases per regime and dtype (default 20)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=DTYPE_NAMES, metavar="DTYPE",
                   help="formats to check: float64 float32 float16 bfloat16 (default float64 float32)")
    p.set_defaults(run=_selfcheck)


def _add_report(sub: Any) -> None:
    from gradcheck.dtypes import DTYPE_NAMES
    from gradcheck.regimes import OPTION_REGIMES, REGIMES
    from gradcheck.study import DEFAULT_EXAMPLES, PROOF_CLASSES

    p = sub.add_parser(
        "report", formatter_class=_Formatter,
        help="run the study and write report.json, report.md, report.html and vectors.json",
        description="Run every registered gradient method (closed form, finite differences, JAX, SymPy) on "
        "seeded cases in every regime and dtype, compare each with the certified truth, and write "
        "report.json (versioned schema), report.md, report.html (self-contained, with plots) and "
        "vectors.json (the golden vectors) into OUT, each atomically. Cases run on JOBS local processes, or "
        "on a Dask distributed cluster with --scheduler; the results are the same either way. Exit 1 when "
        "the closed form's rigorous bound or a SymPy proof failed.",
        epilog="examples:\n  gradcheck report --out reports/\n  gradcheck report --examples 50 --jobs 8 --dtypes float32 bfloat16\n"
               "  gradcheck report --scheduler tcp://10.0.0.5:8786 --examples 1000",
    )
    p.add_argument("--out", default="reports", help="output directory (default reports)")
    p.add_argument("--examples", type=_positive, default=DEFAULT_EXAMPLES, help=f"cases per regime and dtype (default {DEFAULT_EXAMPLES})")
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of the cases and the vectors (default 0)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPE_NAMES), choices=DTYPE_NAMES, metavar="DTYPE",
                   help="formats to study (default: all four)")
    p.add_argument("--regimes", nargs="+", choices=REGIMES + OPTION_REGIMES, metavar="REGIME",
                   help=f"regimes to study, of {', '.join(REGIMES)} and the kernel options' rows "
                        f"{', '.join(OPTION_REGIMES)} (default: all)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="registered methods to run (default: all)")
    p.add_argument("--jobs", type=_positive, default=None, help="local worker processes (default: CPU count)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on this Dask distributed scheduler instead")
    p.add_argument("--max-classes", type=_nonnegative, default=PROOF_CLASSES,
                   help=f"SymPy proofs for K = 1 .. this, 0 for none (default {PROOF_CLASSES})")
    p.add_argument("--no-vectors", action="store_true", help="do not generate vectors.json")
    p.set_defaults(run=_report)


def _add_vectors(sub: Any) -> None:
    p = sub.add_parser(
        "vectors", formatter_class=_Formatter,
        help="write the golden vectors (Wycheproof-like JSON)",
        description="Write the golden vectors: test groups by dtype and options, each test with logits, "
        "targets, the correctly rounded loss and gradient, flags, and result valid, or invalid for the "
        "gradient of a modeled bug. The file is the same byte for byte on every machine for a seed. "
        "Format and float encoding: docs/vectors.md.",
        epilog="examples:\n  gradcheck vectors --out reports/vectors.json\n"
               "  gradcheck vectors --out reports/vectors.json --check   # exit 1 if the file is stale",
    )
    p.add_argument("--out", default=None, help="the file to write (default reports/vectors.json; with --linear "
                   "reports/linear_vectors.json)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of the vectors (default 0)")
    p.add_argument("--check", action="store_true", help="compare with OUT byte for byte instead of writing")
    p.add_argument("--linear", action="store_true", help="the fused linear family's vectors (hidden, weight, bias "
                   "and their certified gradients) instead")
    p.set_defaults(run=_vectors)


def _add_verify(sub: Any, *, linear: bool = False) -> None:
    p = sub.add_parser(
        "verify", formatter_class=_Formatter,
        help="check an implementation MODULE:FUNC against the truth or a vectors file",
        description="Import FUNC from MODULE (found from the current directory, like python -m) and check "
        "FUNC(logits, targets, **options) on Hypothesis-generated cases, or on every test of a vectors "
        "file with --vectors (which also checks that the file's valid gradients are accepted and its "
        "invalid ones rejected). Exit 0 when it passes, 1 when it does not (a FUNC that raises, calls "
        "sys.exit(), hangs past --timeout or reuses its output buffer does not pass), 2 for a usage or import "
        "error, or a vectors file with no test of the asked dtype and targets (zero tests is not a pass).",
        epilog="examples:\n  gradcheck verify mykernel:ce_grad --dtype float32 bfloat16 --max-examples 200\n"
               "  gradcheck verify mykernel:ce_grad --targets probs --label-smoothing 0.1 --junit-xml out.xml\n"
               "  gradcheck verify mykernel:ce_grad --vectors reports/vectors.json --json result.json\n"
               "  gradcheck verify --linear mykernel:flce_grad --bias --dtype bfloat16 --max-shape 64,4096,256",
    )
    p.add_argument("function", metavar="MODULE:FUNC", help="the gradient function, e.g. mykernel:ce_grad")
    p.add_argument("--vectors", metavar="FILE", help="check against this vectors file instead")
    p.add_argument("--linear", action="store_true",
                   help="FUNC is a fused linear cross-entropy gradient FUNC(hidden, weight, targets, **options) "
                   "returning (d_hidden, d_weight) or, with --bias, (d_hidden, d_weight, d_bias); checked by "
                   "verify_linear, whose options then apply: --bias, --max-shape N,V,D, --precision (no --regimes); with "
                   "--vectors, FILE is a linear vectors file (gradcheck vectors --linear)")
    _add_verify_options(p, linear=linear)
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--junit-xml", metavar="PATH", help="write the result as JUnit XML")
    p.set_defaults(run=_verify)


# verify's options that the command runs once per value given (a check per dtype and target kind)
MANY = ("dtype", "targets")


def _add_verify_options(p: argparse.ArgumentParser, *, linear: bool = False) -> None:
    """One flag per check option of :data:`gradcheck.options.VERIFY` (``linear``: of verify_linear's
    :data:`gradcheck.checking.linear.LINEAR_VERIFY`), generated from it.

    Each value goes through the option's one rule (``Option.from_text``), so a bad value gets the
    message the Python API gives, as a usage error (exit 2). Flags not given are left out of the
    namespace, and ``verify`` applies its defaults.
    """
    from gradcheck.options import VERIFY
    from gradcheck.regimes import drawn_by

    if linear:
        from gradcheck.checking.linear import LINEAR_VERIFY as VERIFY  # noqa: N811 - the same role, its table
    for o in VERIFY.values():
        if o.is_flag:
            p.add_argument(o.flag, action="store_true", default=argparse.SUPPRESS, help=o.help)
            continue
        names = o.choices or (drawn_by("verify") if o.name == "regimes" else ())
        choices = f" ({', '.join(map(str, names))})" if names and not all(repr(c) in o.help for c in names) else ""
        default = "" if o.default is None else f" (default {o.default})"
        if o.name in MANY:
            p.add_argument(o.flag, nargs="+", type=_from_text(o), default=None, metavar=o.metavar, choices=o.choices,
                           help=f"{o.help}{choices}; one check each (default {o.default}; with --vectors: all)")
        else:
            p.add_argument(o.flag, type=_from_text(o), default=argparse.SUPPRESS, metavar=o.metavar, choices=o.choices,
                           help=f"{o.help}{choices}{default}")


def _from_text(option: Any) -> Callable[[str], Any]:
    from gradcheck.errors import InvalidArgument

    def parse(text: str) -> Any:
        try:
            return option.from_text(text)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.name  # argparse names the type in some messages
    return parse


def _add_prove(sub: Any) -> None:
    p = sub.add_parser(
        "prove", formatter_class=_Formatter,
        help="print the SymPy proofs of the gradient and softmax-Jacobian closed forms",
        description="Prove with SymPy, for K = 1 .. MAX_CLASSES, that the derivative of the textbook and of "
        "the log-sum-exp cross-entropy (with weights, soft targets and smoothing) equals p_i S - w_i y_i, "
        "and that the softmax Jacobian is delta_ij p_i - p_i p_j; and, with softcap c, z-loss lambda and an "
        "upstream factor g as symbols, the kernel gradient g ((p_i S - w_i y_i)/D + 2 lambda lse p_i/D_z) "
        "(1 - tanh^2(z_i/c)), the softcapped softmax Jacobian and the kernel Hessian. Results are cached on "
        "disk. Exit 1 when an identity is not proved.",
        epilog="example: gradcheck prove --max-classes 6",
    )
    p.add_argument("--max-classes", type=_positive, default=4, help="largest K (default 4)")
    p.add_argument("--kinds", nargs="+", choices=["gradient", "jacobian", "lse_gradient", "kernel_gradient",
                                                  "kernel_jacobian", "kernel_hessian"],
                   help="identities (default: all)")
    p.add_argument("--timeout", type=_positive_seconds, default=120.0, help="seconds per proof (default 120)")
    p.add_argument("--no-cache", action="store_true", help="redo the proofs instead of reading the cache")
    p.set_defaults(run=_prove)


# --- signals ------------------------------------------------------------------------------------


class _Stopped(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM, so that every ``finally`` runs (the executors stop
    their workers, the atomic writer removes its temporary file). Not an Exception, so nothing catches it
    by accident; not a SystemExit, so no check takes it for one raised by user code."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_signals() -> list[Any]:
    import signal

    return [getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)]


_deferred: list[int] | None = None  # inside _stops_deferred: the signals that came meanwhile


def _raise_stopped(signum: int, frame: Any) -> None:
    import signal

    for s in _stop_signals():  # a second Ctrl-C must not break off the clean-up after the first
        signal.signal(s, signal.SIG_IGN)
    if _deferred is not None:
        _deferred.append(signum)
        return
    raise _Stopped(signum)


@contextmanager
def _stops_deferred() -> Iterator[None]:
    """A block that SIGINT and SIGTERM do not break off: a stop that comes meanwhile is raised at its end."""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield
    finally:
        came, _deferred = _deferred, outer
        if came:
            raise _Stopped(came[0])


def _run_stoppable(run: Callable[[], int]) -> int:
    """``run()`` with SIGINT and SIGTERM raised as :class:`_Stopped` (in the main thread, the only one
    where Python handles signals). A stop prints one line and returns 128 + the signal's number (130,
    143), the shell's convention. The previous handlers are back on return."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return run()
    previous = {s: signal.getsignal(s) for s in _stop_signals()}

    def stopped(stop: _Stopped) -> int:
        print(f"gradcheck: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    code = 1
    try:
        for s in previous:
            signal.signal(s, _raise_stopped)
        code = run()
    except _Stopped as stop:
        code = stopped(stop)
    finally:
        try:
            restore()
        except _Stopped as stop:  # the signal came as run() returned: it is still a stop
            restore()
            code = stopped(stop)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    linear = "verify" in argv and "--linear" in argv  # verify's flags are then verify_linear's
    if linear:
        import_dependencies()  # the linear table imports numpy: not from the user's folder
    parser = build_parser(linear=linear)
    args = parser.parse_args(argv)
    return _run_stoppable(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
