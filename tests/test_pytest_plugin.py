"""The pytest plugin, tested the way another project uses it: small projects run with pytester."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gradcheck import dtypes, pytest_plugin
from gradcheck.pytest_plugin import check_seed

pytest_plugins = ["pytester"]

# The checked functions of every example project: a correct gradient and one that forgot the 1/N.
GRADS = '''
import numpy as np
import pytest
from gradcheck import GradientMismatch


def _softmax_minus_onehot(logits, targets):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(targets)), targets] -= 1.0
    return p


def good_grad(logits, targets, **options):
    assert not options, options
    return (_softmax_minus_onehot(logits, targets) / len(targets)).astype(logits.dtype)


def sum_grad(logits, targets, reduction="mean"):
    assert reduction == "sum", reduction
    return _softmax_minus_onehot(logits, targets).astype(logits.dtype)


def forgot_mean(logits, targets, **options):
    return _softmax_minus_onehot(logits, targets).astype(logits.dtype)  # no 1/N for reduction="mean"


BAD = dict(max_examples=20)  # enough to meet a case with N > 1 rows (N = 1 hides a missing 1/N)
'''

PASSING = GRADS + '''

def test_good(gradcheck):
    gradcheck.assert_gradient(good_grad)
'''

FAILING = GRADS + '''

def test_bad(gradcheck):
    gradcheck.assert_gradient(forgot_mean, **BAD)
'''

# A project with passing and failing checks over several dtypes, for the report and for xdist.
MIXED = GRADS + '''

@pytest.mark.gradcheck(dtypes=["float64", "float32", "float16", "bfloat16"])
def test_good(gradcheck):
    gradcheck.assert_gradient(good_grad)


@pytest.mark.gradcheck(reduction="sum")
def test_sum(gradcheck):
    gradcheck.assert_gradient(sum_grad)


def test_bad(gradcheck):
    gradcheck.assert_gradient(forgot_mean, **BAD)


def test_two_checks(gradcheck):
    assert gradcheck.verify(good_grad).passed
    assert not gradcheck.verify(forgot_mean, **BAD).passed
'''


def header_seed(result: pytest.RunResult) -> int:
    match = re.search(r"^gradcheck: seed (\d+) \(repeat with --gradcheck-seed \1\)$", result.stdout.str(), re.M)
    assert match, result.stdout.str()
    return int(match.group(1))


def usage_error(result: pytest.RunResult, message: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.ret
    assert message in result.stderr.str(), result.stderr.str()


# ---- a passing and a failing project -------------------------------------------------------------


def test_passing_project(pytester):
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("--gradcheck-max-examples=5", "--gradcheck-seed=1", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*::test_good[[]float64[]] PASSED*"])
    header_seed(result)


def test_failing_check_is_an_ordinary_failure_with_the_mismatch_text(pytester):
    pytester.makepyfile(FAILING)
    result = pytester.runpytest("--gradcheck-seed=1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_bad[[]float64[]] _*",
        ">       gradcheck.assert_gradient(forgot_mean, **BAD)",
        "E       gradcheck.errors.GradientMismatch: *forgot_mean is wrong (mismatch): *",
        "E         worst element (*): expected *, got *; error * x the tolerance * (absolute error *, * ULP; *",
        "E         contract precision='float64': a correct implementation may compute in float64 itself.",
        "E           logits = np.array(*",
        "E         seed *; reproduce with:",
        "E           gradcheck.verify(*forgot_mean, max_examples=20, seed=*)",
        "test_failing_check_is_an_ordinary_failure_with_the_mismatch_text.py:*: GradientMismatch",
    ])
    output = result.stdout.str()
    assert "gradcheck/pytest_plugin" not in output and "verify.py" not in output, output  # no harness frames


def test_fixture_message_is_the_api_message_and_verify_never_raises(pytester):
    pytester.makepyfile(GRADS + '''
import gradcheck as api


def test_same_text(gradcheck):
    with pytest.raises(GradientMismatch) as from_fixture:
        gradcheck.assert_gradient(forgot_mean, **BAD)
    seed = gradcheck.results[0].seed
    with pytest.raises(GradientMismatch) as from_api:
        api.assert_gradient(forgot_mean, **BAD, seed=seed)
    assert str(from_fixture.value) == str(from_api.value)


def test_verify(gradcheck, gradcheck_dtype):
    result = gradcheck.verify(forgot_mean, **BAD)
    assert not result.passed and result.failure.kind == "mismatch"
    assert result.dtype == gradcheck.dtype == gradcheck_dtype == "float64"
    assert gradcheck.results == [result]
    assert gradcheck.verify(good_grad, max_examples=5).seed != result.seed  # each check its own seed
''')
    pytester.runpytest("--gradcheck-seed=2").assert_outcomes(passed=2)


# ---- options and ini settings --------------------------------------------------------------------

EXAMPLES = GRADS + '''

def test_examples(gradcheck):
    assert gradcheck.verify(good_grad).examples == {expected}
'''


@pytest.mark.parametrize(
    ("args", "ini", "expected"),
    [
        (["--gradcheck-max-examples=3"], None, 3),
        ([], "gradcheck_max_examples = 4", 4),
        (["--gradcheck-max-examples", "2"], "gradcheck_max_examples = 4", 2),  # the command line wins
    ],
)
def test_max_examples_option_and_ini(pytester, args, ini, expected):
    pytester.makepyfile(EXAMPLES.format(expected=expected))
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.runpytest(*args, "--gradcheck-seed=3").assert_outcomes(passed=1)


def test_max_examples_from_pyproject_and_explicit_arguments_win(pytester):
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\ngradcheck_max_examples = "4"\n')
    pytester.makepyfile(GRADS + '''

def test_examples(gradcheck):
    assert gradcheck.verify(good_grad).examples == 4
    assert gradcheck.verify(good_grad, max_examples=2).examples == 2
''')
    pytester.runpytest("--gradcheck-seed=3").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--gradcheck-max-examples=0"], None, "--gradcheck-max-examples: max_examples must be a positive integer, got 0."),
        ([], "gradcheck_seed = abc", "ini gradcheck_seed: seed must be a nonnegative integer or None, got 'abc'."),
        (["--gradcheck-dtypes=float32,float8"], None,
         "--gradcheck-dtypes must name dtypes among float64, float32, float16, bfloat16, got 'float32,float8'"),
        ([], "gradcheck_dtypes = half", "ini gradcheck_dtypes must name dtypes among"),
    ],
)
def test_bad_option_values_are_usage_errors(pytester, args, ini, message):
    pytester.makepyfile(PASSING)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    usage_error(pytester.runpytest(*args), message)


def test_seed_option_ini_and_header(pytester):
    pytester.makepyfile(PASSING)
    assert header_seed(pytester.runpytest("--gradcheck-seed=42", "--collect-only")) == 42
    pytester.makeini("[pytest]\ngradcheck_seed = 7\n")
    assert header_seed(pytester.runpytest("--collect-only")) == 7
    assert header_seed(pytester.runpytest("--collect-only", "--gradcheck-seed", "9")) == 9


def test_random_seed_without_option(pytester):
    pytester.makepyfile(PASSING)
    seeds = {header_seed(pytester.runpytest("--collect-only")) for _ in range(3)}
    assert len(seeds) == 3


def report_of(pytester: pytest.Pytester, *args: str, name: str = "report") -> dict:
    """Run with --gradcheck-report and return the JSON document."""
    pytester.runpytest(*args, f"--gradcheck-report={name}")
    return json.loads((pytester.path / f"{name}.json").read_text())


def test_session_seed_fixes_every_check_and_one_test_rerun_reproduces(pytester):
    pytester.makepyfile(test_mixed=MIXED)
    args = ("--gradcheck-max-examples=3", "--gradcheck-seed=42")
    first = report_of(pytester, *args)
    again = report_of(pytester, *args)
    other = report_of(pytester, "--gradcheck-max-examples=3", "--gradcheck-seed=43")
    one = report_of(pytester, *args, "test_mixed.py::test_two_checks")

    def seeds(doc):
        return {(c["test"], c["call"]): c["seed"] for c in doc["checks"]}

    assert first["seed"] == 42 and len(first["checks"]) == 8
    assert len(set(seeds(first).values())) == 8  # every check its own seed
    assert seeds(again) == seeds(first)
    assert [c["examples"] for c in again["checks"]] == [c["examples"] for c in first["checks"]]
    assert set(seeds(other).values()).isdisjoint(seeds(first).values())
    assert seeds(one).items() <= seeds(first).items() and len(seeds(one)) == 2
    assert all(seed == check_seed(42, test, call) for (test, call), seed in seeds(first).items())


def test_dtypes_option_and_ini_parametrize_the_fixture(pytester):
    pytester.makepyfile(GRADS + '''

def test_good(gradcheck, gradcheck_dtype):
    result = gradcheck.verify(good_grad, max_examples=2)
    assert result.passed and result.dtype == gradcheck_dtype
''')
    result = pytester.runpytest("--gradcheck-dtypes=float32,bfloat16", "--gradcheck-seed=3", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_good[[]float32[]] PASSED*", "*::test_good[[]bfloat16[]] PASSED*"])
    pytester.makeini("[pytest]\ngradcheck_dtypes = float16 float64\n")
    result = pytester.runpytest("--gradcheck-seed=3", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_good[[]float16[]] PASSED*", "*::test_good[[]float64[]] PASSED*"])


# ---- the marker ----------------------------------------------------------------------------------


def test_marker_runs_once_per_dtype_with_readable_ids(pytester):
    pytester.makepyfile(GRADS + '''

@pytest.mark.gradcheck(dtypes=["float32", "bfloat16"])
def test_grad(gradcheck):
    assert gradcheck.verify(good_grad, max_examples=2).dtype == gradcheck.dtype


@pytest.mark.gradcheck(dtypes="float16")
def test_without_fixture(gradcheck_dtype):
    assert gradcheck_dtype == "float16"


@pytest.mark.gradcheck(reduction="sum", max_examples=3)
class TestSum:
    def test_sum(self, gradcheck):
        result = gradcheck.verify(sum_grad)
        assert result.passed and result.examples == 3 and result.arguments["reduction"] == "sum"
''')
    # --strict-markers: the marker is registered; --gradcheck-dtypes applies to tests whose marker names none
    result = pytester.runpytest("--strict-markers", "-W", "error", "--gradcheck-dtypes=float64,float32", "--gradcheck-seed=3", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines([
        "*::test_grad[[]float32[]] PASSED*",
        "*::test_grad[[]bfloat16[]] PASSED*",
        "*::test_without_fixture[[]float16[]] PASSED*",
        "*::TestSum::test_sum[[]float64[]] PASSED*",
        "*::TestSum::test_sum[[]float32[]] PASSED*",
    ])
    pytester.runpytest("--markers").stdout.fnmatch_lines(["@pytest.mark.gradcheck(dtypes=None, **options): *"])


KERNEL = '''
import numpy as np
import pytest


def kernel(logits, targets, *, grad_output=None, **options):
    from gradcheck import cross_entropy_grad
    w = options.pop("weight", None)
    g = None if grad_output is None else np.asarray(grad_output).astype(np.float64)
    return cross_entropy_grad(logits.astype(np.float64), targets, weight=None if w is None else w.astype(np.float64),
                              grad_output=g, **options).astype(logits.dtype)


def softcap_ignored(logits, targets, *, grad_output=None, **options):
    options.pop("softcap", None)
    return kernel(logits, targets, grad_output=grad_output, **options)


@pytest.mark.gradcheck(dtypes=["float32", "bfloat16"], lse_square_scale=1e-4, softcap=30.0, reduction="none",
                       label_smoothing=0.1, weighted=True, max_examples=15)
def test_kernel(gradcheck):
    result = gradcheck.verify(kernel)
    assert result.passed and result.upstream, result


@pytest.mark.gradcheck(softcap=30.0, max_examples=15)
def test_softcap_ignored(gradcheck):
    gradcheck.assert_gradient(softcap_ignored)
'''


@pytest.mark.parametrize(("marker", "message"), [
    ("softcap=-1.0", "InvalidArgument: softcap must be a number > 0, got -1.0."),
    ("lse_square_scale=-0.5", "InvalidArgument: lse_square_scale must be a number >= 0, got -0.5."),
])
def test_a_bad_kernel_option_value_fails_the_test_with_the_options_message(pytester, marker, message):
    pytester.makepyfile(KERNEL + f'''

@pytest.mark.gradcheck({marker})
def test_bad_value(gradcheck):
    gradcheck.assert_gradient(kernel)
''')
    result = pytester.runpytest("-k", "test_bad_value")
    result.assert_outcomes(failed=1)
    assert message in result.stdout.str(), result.stdout.str()


def test_marker_takes_the_kernel_options(pytester):
    """issue 12: lse_square_scale= and softcap= are marker keywords (from the option spec) and reach verify."""
    pytester.makepyfile(KERNEL)
    result = pytester.runpytest("--gradcheck-seed=1", "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*::test_kernel[[]bfloat16[]] PASSED*", "*::test_softcap_ignored[[]float64[]] FAILED*"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('dtype="float32"', "@pytest.mark.gradcheck got unknown options ['dtype']"),
        ("max_exmples=3", "@pytest.mark.gradcheck got unknown options ['max_exmples']"),
        ('"float32"', "@pytest.mark.gradcheck takes keywords only, got ('float32',)"),
        ('dtypes=["float8"]', "@pytest.mark.gradcheck(dtypes=...) must name dtypes among"),
    ],
)
def test_bad_marker_is_a_collection_error(pytester, marker, message):
    pytester.makepyfile(GRADS + f'''

@pytest.mark.gradcheck({marker})
def test_grad(gradcheck):
    gradcheck.assert_gradient(good_grad)
''')
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    assert message in result.stdout.str(), result.stdout.str()


def test_disabled_with_p_no_gradcheck(pytester):
    pytester.makepyfile(PASSING)
    result = pytester.runpytest("-p", "no:gradcheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'gradcheck' not found*"])
    assert "gradcheck: seed" not in result.stdout.str()
    usage_error(pytester.runpytest("-p", "no:gradcheck", "--gradcheck-seed=1"), "unrecognized arguments: --gradcheck-seed=1")


# ---- terminal summary and report -----------------------------------------------------------------


def test_terminal_summary_and_report_files(pytester):
    pytester.makepyfile(test_mixed=MIXED)
    result = pytester.runpytest("--gradcheck-max-examples=3", "--gradcheck-seed=5", "--gradcheck-report=out/gc.json")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines([
        "*= gradcheck =*",
        "test_mixed.forgot_mean: FAILED 2 of 2 checks (float64), * examples, worst * x tolerance (* ULP); grade none (float64)",
        "test_mixed.good_grad: passed 5 checks (bfloat16, float16, float32, float64), 15 examples, worst *",
        "test_mixed.sum_grad: passed 1 check (float64), 3 examples, worst *",
        "seed 5 (repeat with --gradcheck-seed 5); report: out/gc.json, out/gc.md",
    ])
    doc = json.loads((pytester.path / "out" / "gc.json").read_text())
    assert (doc["seed"], doc["checks_run"], doc["passed"], doc["failed"]) == (5, 8, 6, 2)
    assert [(f["function"], f["verdict"], f["checks"]) for f in doc["functions"]] == [
        ("test_mixed.forgot_mean", "failed", 2), ("test_mixed.good_grad", "passed", 5),
        ("test_mixed.sum_grad", "passed", 1),
    ]
    checks = {(c["test"], c["call"]): c for c in doc["checks"]}
    assert list(checks) == sorted(checks)  # a fixed order, whichever process ran which check
    good = checks["test_mixed.py::test_good[bfloat16]", 0]
    assert (good["function"], good["dtype"], good["options"], good["max_examples"], good["examples"],
            good["verdict"], good["failure"]) == ("test_mixed.good_grad", "bfloat16", {}, 3, 3, "passed", None)
    assert 0 <= good["worst_ratio"] <= 1 and good["worst_ulps"] >= 0
    assert checks["test_mixed.py::test_sum[float64]", 0]["options"] == {"reduction": "sum"}
    bad = checks["test_mixed.py::test_bad[float64]", 0]
    assert bad["verdict"] == "failed" and bad["failure"]["kind"] == "mismatch" and bad["worst_ratio"] > 1
    assert bad["failure"]["message"] in result.stdout.str().replace("\nE         ", "\n  ").replace("\nE           ", "\n    ")
    assert bad["reproduction"] == f"gradcheck.verify(test_mixed.forgot_mean, max_examples=20, seed={bad['seed']})"
    assert checks["test_mixed.py::test_two_checks[float64]", 1]["verdict"] == "failed"

    md = (pytester.path / "out" / "gc.md").read_text()
    assert "8 checks of 3 functions: 6 passed, 2 failed. Session seed 5: repeat with `pytest --gradcheck-seed 5`." in md
    assert "| `test_mixed.good_grad` | passed | 5 | bfloat16, float16, float32, float64 | 15 |" in md
    assert re.search(r"^\| `test_mixed.py::test_sum\[float64\]` \| `test_mixed.sum_grad` \| float64 \| "
                     r"reduction='sum' \| 3 \| float64 \| \S+ \| \S+ \| (exact|float64) \| passed \|$", md, re.M), md
    assert "### `test_mixed.py::test_bad[float64]`" in md and bad["failure"]["message"] in md


def test_no_summary_without_checks(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "= gradcheck =" not in result.stdout.str()


# ---- pytest-xdist (subprocesses) -----------------------------------------------------------------


def test_xdist_report_is_the_same_as_a_single_process_one(pytester):
    pytester.makepyfile(test_mixed=MIXED)
    base = ("--gradcheck-max-examples=3", "--gradcheck-seed=11")
    single = pytester.runpytest_subprocess(*base, "-p", "no:xdist", "--gradcheck-report=single")
    single.assert_outcomes(passed=6, failed=1)
    parallel = pytester.runpytest_subprocess(*base, "-n", "2", "--gradcheck-report=parallel")
    parallel.assert_outcomes(passed=6, failed=1)
    assert "2 workers [7 items]" in parallel.stdout.str()
    parallel.stdout.fnmatch_lines(["*= gradcheck =*", "test_mixed.good_grad: passed 5 checks *"])

    def without_time(name):
        doc = json.loads((pytester.path / f"{name}.json").read_text())
        for check in doc["checks"]:
            del check["elapsed"]
        return doc

    assert without_time("parallel") == without_time("single")
    assert (pytester.path / "parallel.md").read_text() == (pytester.path / "single.md").read_text()


def test_xdist_workers_use_the_controllers_random_seed(pytester):
    pytester.makepyfile(test_mixed=MIXED)
    result = pytester.runpytest_subprocess("--gradcheck-max-examples=2", "-n", "2", "--gradcheck-report=r")
    seed = header_seed(result)
    doc = json.loads((pytester.path / "r.json").read_text())
    assert doc["seed"] == seed and doc["checks_run"] == 8
    assert all(c["seed"] == check_seed(seed, c["test"], c["call"]) for c in doc["checks"])


# ---- import cost ---------------------------------------------------------------------------------

HEAVY = ("numpy", "ml_dtypes", "mpmath", "jax", "sympy", "hypothesis", "torch", "gradcheck.checking.api",
         "gradcheck.strategies")
CHEAP = {"gradcheck"}  # the plugin adds gradcheck (its package, errors, the session report) and the stdlib
NUMERIC = ("numpy", "mpmath", "ml_dtypes", "hypothesis")


def _loaded_after(code: str) -> list[str]:
    """Which of NUMERIC a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {NUMERIC!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.replace("'", '"'))


def test_importing_the_plugin_loads_no_numerics():
    assert _loaded_after("import gradcheck.pytest_plugin") == []
    # the control: the same probe sees them once the plugin's fixture object runs one check
    after_a_check = _loaded_after(
        "import gradcheck.pytest_plugin as p\n"
        "settings = p.Settings(seed=0, dtypes=('float64',), defaults={}, report=None)\n"
        "checker = p.GradientChecker('t', settings, 'float64', {'max_examples': 2})\n"
        "import gradcheck\n"
        "assert checker.verify(gradcheck.cross_entropy_grad).passed and len(settings.records) == 1"
    )
    assert after_a_check == sorted(NUMERIC)


def test_the_plugins_dtype_names_are_gradchecks():
    assert pytest_plugin.DTYPE_NAMES == dtypes.DTYPE_NAMES


def test_loading_the_plugin_imports_nothing_heavy(pytester):
    pytester.makepyfile('''
import json
import sys


def _dump(name):
    with open(name, "w") as handle:
        json.dump(sorted(sys.modules), handle)


def test_1_before_any_check():
    _dump("before.json")


def test_2_after_a_check(gradcheck):
    import gradcheck as api

    gradcheck.verify(api.cross_entropy_grad, max_examples=2)
    _dump("after.json")
''')
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)
    before = set(json.loads((pytester.path / "before.json").read_text()))
    after = set(json.loads((pytester.path / "after.json").read_text()))
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:gradcheck", "-k", "before")
    without_plugin = set(json.loads((pytester.path / "before.json").read_text()))

    assert "gradcheck.pytest_plugin" in before and "gradcheck.pytest_plugin" not in without_plugin
    added = {m.split(".")[0] for m in before - without_plugin} - set(sys.stdlib_module_names)
    assert added <= CHEAP, added - CHEAP
    assert [m for m in HEAVY if m in before] == []
    assert {"hypothesis", "gradcheck.checking.api"} <= after  # the same probe sees a check's imports


@pytest.mark.parametrize(("report", "message"), [
    ("afile/gc", "--gradcheck-report: cannot write 'afile/gc.json': 'afile' is not a directory."),
    ("taken", "--gradcheck-report: cannot write 'taken.json': it is a directory."),
    ("/proc/gradcheck/gc", "--gradcheck-report: cannot write '/proc/gradcheck/gc.json': "),
])
def test_an_unwritable_report_path_is_a_usage_error_before_any_test_runs(pytester, report, message):
    pytester.makepyfile(test_mixed=MIXED)
    (pytester.path / "afile").write_text("")
    (pytester.path / "taken.json").mkdir()
    result = pytester.runpytest("--gradcheck-max-examples=2", f"--gradcheck-report={report}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "passed" not in result.stdout.str() and "Traceback" not in result.stderr.str()



# Four tests on two workers: pytest-xdist's load scheduling sends each worker two consecutive tests,
# so the worker that crashes in test_4_crash has finished test_3 (two checks) first.
CRASHING = GRADS + '''
import os


def test_1(gradcheck):
    assert gradcheck.verify(good_grad).passed


def test_2(gradcheck):
    assert gradcheck.verify(good_grad).passed


def test_3(gradcheck):
    assert gradcheck.verify(good_grad).passed
    assert gradcheck.verify(good_grad).passed


def test_4_crash(gradcheck):
    assert gradcheck.verify(good_grad).passed
    os._exit(1)  # the worker dies: no sessionfinish, no workeroutput
'''


def test_xdist_a_crashed_worker_keeps_the_records_of_its_finished_tests(pytester):
    pytester.makepyfile(test_crashing=CRASHING)
    result = pytester.runpytest_subprocess("--gradcheck-max-examples=2", "--gradcheck-seed=5", "-n", "2",
                                           "--dist", "load", "--gradcheck-report=r")
    result.assert_outcomes(passed=3, failed=1)  # the crash is test_4_crash's failure
    worker = re.search(r"worker '(gw\d)' crashed while running 'test_crashing.py::test_4_crash", result.stdout.str())
    assert worker, result.stdout.str()
    doc = json.loads((pytester.path / "r.json").read_text())
    ran = [(c["test"].split("::")[1], c["call"]) for c in doc["checks"]]
    assert ran == [("test_1[float64]", 0), ("test_2[float64]", 0), ("test_3[float64]", 0), ("test_3[float64]", 1)]
    assert doc["checks_run"] == 4  # test_4_crash's one check died with its worker, and the summary says so:
    result.stdout.fnmatch_lines([f"incomplete: xdist worker {worker.group(1)} went down (*); the checks of the test "
                                 "it was running are missing from the records"])


@pytest.mark.parametrize(("args", "ini", "expected"), [
    ([], None, None), (["--gradcheck-device=cpu"], None, "cpu"), ([], "gradcheck_device = cuda:1", "cuda:1"),
    (["--gradcheck-device", "cpu"], "gradcheck_device = cuda:1", "cpu"),  # the command line wins
])
def test_device_option_reaches_the_fixture(pytester, args, ini, expected):
    pytester.makepyfile(f'''
def test_device(gradcheck):
    assert gradcheck.device == {expected!r}
''')
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.runpytest(*args).assert_outcomes(passed=1)


def test_every_check_option_is_a_session_flag_and_ini_setting(pytester):
    from gradcheck.options import VERIFY
    from gradcheck.pytest_plugin import SESSION_OPTIONS

    assert {o.name for o in SESSION_OPTIONS} == {n for n, o in VERIFY.items() if o.parse} - {"dtype", "seed"}
    pytester.makepyfile(GRADS + '''

def test_defaults(gradcheck):
    result = gradcheck.verify(good_grad)
    assert (result.precision, result.arguments["reduction"], result.arguments["max_examples"]) == ("exact", "sum", 3)
''')
    pytester.makeini("[pytest]\ngradcheck_precision = exact\ngradcheck_reduction = sum\n")
    pytester.runpytest("--gradcheck-max-examples=3", "--gradcheck-seed=1").assert_outcomes(passed=1)
    result = pytester.runpytest("--gradcheck-precision=float64", "--gradcheck-max-examples=3", "--gradcheck-seed=1")
    result.assert_outcomes(failed=1)  # the command line wins over the ini file
    result.stdout.fnmatch_lines(["*('float64', 'sum', 3) == ('exact', 'sum', 3)*"])
    bad = pytester.runpytest("--gradcheck-precision=float8")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--gradcheck-precision: precision must be one of*got 'float8'*"])


PROGRESS = GRADS + '''
import gradcheck.pytest_plugin.checker as checker


@pytest.fixture(autouse=True)
def every_example_writes(monkeypatch):  # a line per example: the test needs no slow check
    monkeypatch.setattr(checker, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(checker, "PROGRESS_EVERY", 0.0)


def test_slow(gradcheck):
    gradcheck.assert_gradient(good_grad, max_examples=3)


def test_own_callback_wins(gradcheck):
    seen = []
    gradcheck.assert_gradient(good_grad, max_examples=3, progress=lambda done, total: seen.append(done))
    assert seen == [1, 2, 3]
'''


@pytest.mark.parametrize("args, ini, shown", [
    ((), None, False),  # quiet under pytest unless asked
    (("--gradcheck-progress",), None, True),
    ((), "[pytest]\ngradcheck_progress = true\n", True),
    (("--gradcheck-progress", "-p", "no:terminal"), None, False),  # no terminal: nothing to write to, no error
])
def test_progress_lines_only_when_asked(pytester, args, ini, shown):
    pytester.makepyfile(PROGRESS)
    if ini:
        pytester.makeini(ini)
    result = pytester.runpytest(*args, "--gradcheck-seed=4")
    if "no:terminal" not in args:
        result.assert_outcomes(passed=2)
    else:
        assert result.ret == 0
    lines = [line for line in result.outlines if line.startswith("gradcheck: test_progress_lines")]
    if shown:
        assert "gradcheck: test_progress_lines_only_when_asked.py::test_slow[float64]: verify 3/3 examples" in \
            "\n".join(lines)
        assert not any("test_own_callback_wins" in line for line in lines)
    else:
        assert lines == []


def test_progress_lines_wait_and_space_themselves():
    from gradcheck.pytest_plugin.checker import progress_lines

    now, written = [0.0], []
    progress = progress_lines(written.append, "t.py::x", "verify", clock=lambda: now[0])
    for t in (0.5, 1.9, 2.0, 2.5, 3.9, 4.0, 9.0):
        now[0] = t
        progress(int(t * 10), 100)
    assert written == ["gradcheck: t.py::x: verify 20/100 examples, 2.0 s",
                       "gradcheck: t.py::x: verify 40/100 examples, 4.0 s",
                       "gradcheck: t.py::x: verify 90/100 examples, 9.0 s"]
