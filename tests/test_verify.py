"""verify / assert_gradient (gradcheck/checking/): verdicts, failure kinds, messages, shrinking, reproducibility,
argument checks. The adapters have tests/test_adapters.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gradcheck
from gradcheck import GradientMismatch, InvalidArgument, assert_gradient, verify
from gradcheck.checking.result import FailureKind
import gradcheck.checking.result
import gradcheck.tolerance
import zoo
from gradcheck.dtypes import float_format
from gradcheck.tolerance import grad_tolerance
from zoo import numpy_stable, sign_flipped


def test_correct_implementation_passes_and_reports_its_figures():
    result = verify(numpy_stable, dtype="float32", seed=5, max_examples=40)
    assert result.passed and result.failure is None
    assert result.examples == 40 and result.seed == 5 and result.dtype == "float32"
    assert 0 < result.worst_ratio <= 1 and result.worst_ulps >= 0
    assert result.reproduction == "gradcheck.verify(zoo.numpy_stable, dtype='float32', max_examples=40, seed=5)"
    assert "passed after 40 examples" in str(result)


def test_seed_is_chosen_recorded_and_replays():
    first = verify(numpy_stable, max_examples=15)
    again = verify(numpy_stable, max_examples=15, seed=first.seed)
    assert isinstance(first.seed, int) and f"seed={first.seed}" in first.reproduction
    assert (again.worst_ulps, again.worst_ratio) == (first.worst_ulps, first.worst_ratio)


def _oracle_plus(multiple):
    """The truth plus ``multiple`` tolerances on element (0, 0): the verdict must flip between 0.5 and 2."""

    def grad_fn(logits, targets, **options):
        problem = gradcheck.make_problem(logits, targets, **options)
        g = gradcheck.cross_entropy_grad(logits, targets, dtype="float64", **options)
        g[0, 0] += multiple * grad_tolerance(problem)[0, 0]
        return gradcheck.round_to_format(g, problem.format) if multiple < 1 else g.astype(logits.dtype)

    return grad_fn


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_verdict_flips_at_the_tolerance(dtype):
    assert verify(_oracle_plus(0.5), dtype=dtype, seed=1, max_examples=30, regimes=("moderate",)).passed
    failed = verify(_oracle_plus(3.0), dtype=dtype, seed=1, max_examples=30, regimes=("moderate",))
    assert not failed.passed and failed.failure.kind == "mismatch" and failed.failure.ratio > 2


def test_mismatch_message_and_shrinking():
    with pytest.raises(GradientMismatch) as info:
        assert_gradient(sign_flipped, dtype="float32", seed=3)
    message = str(info.value)
    for part in ("sign_flipped is wrong (mismatch)", "worst element", "expected", "got", "ULP", "x the tolerance",
                 "logits = np.array(", "targets = np.array(", "options = {}", "seed 3",
                 "gradcheck.verify(zoo.sign_flipped, dtype='float32', seed=3)"):
        assert part in message, part
    assert isinstance(info.value, AssertionError)
    result = verify(sign_flipped, dtype="float32", seed=3)
    case = result.failure.case
    assert case.logits.size <= 2  # shrunk to one row of at most two classes
    assert all(float(v) == round(float(v), 3) for v in case.logits.ravel())  # readable numbers
    f = result.failure
    truth = gradcheck.exact_grad(case.logits, case.targets)
    assert f.expected == float(truth[f.index]) and f.got == -f.expected


def _kind(fn, **kwargs):
    result = verify(fn, seed=0, max_examples=50, **kwargs)
    assert not result.passed
    return result.failure


def test_exception_is_reported_with_its_input():
    def crashes_on_single_class(logits, targets, **options):
        if logits.shape[1] == 1:
            raise ZeroDivisionError("one class")
        return numpy_stable(logits, targets, **options)

    failure = _kind(crashes_on_single_class)
    assert failure.kind == "exception" and "ZeroDivisionError: one class" in failure.message
    assert failure.case.logits.shape[1] == 1


def test_nonfinite_mutation_shape_dtype_nondeterminism_and_type():
    def nan_at_first(logits, targets, **options):
        g = numpy_stable(logits, targets, **options)
        g[0, 0] = np.nan
        return g

    def mutates_targets(logits, targets, **options):
        g = numpy_stable(logits, targets, **options)
        targets[:] = 0
        return g

    counter = iter(range(10**6))

    def flaky(logits, targets, **options):
        g = numpy_stable(logits, targets, **options)
        g[0, 0] += next(counter) * 2.0**-60
        return g

    assert _kind(nan_at_first).kind == "nonfinite"
    mutation = _kind(mutates_targets)
    assert mutation.kind == "mutation" and "targets argument in place" in mutation.message
    assert _kind(lambda z, t, **o: numpy_stable(z, t, **o).T).kind == "shape"
    assert _kind(lambda z, t, **o: numpy_stable(z, t, **o).astype(np.float32)).kind == "dtype"
    assert _kind(flaky).kind == "nondeterminism"


class _Unconvertible:
    def __array__(self, dtype=None, copy=None):
        raise TypeError("no array here")


@pytest.mark.parametrize("returned, kind, message", [
    # np.asarray(object()) is a 0-d object array: a wrong shape, found before the dtype is looked at
    (object(), "shape", "grad_fn returned shape () for logits of shape (1, 1)"),
    ([[1.0], [1.0, 2.0]], "type", "grad_fn returned list, not an array (setting an array element"),
    (_Unconvertible(), "type", "grad_fn returned _Unconvertible, not an array (no array here)"),
])
def test_a_result_that_is_not_a_gradient_array(returned, kind, message):
    failure = _kind(lambda z, t, **o: returned)
    assert failure.kind is FailureKind(kind) and failure.message.startswith(message)


def test_failure_kinds_are_strings_in_the_order_they_are_checked():
    assert [str(k) for k in FailureKind] == [
        "exception", "timeout", "mutation", "type", "shape", "dtype", "aliasing", "nondeterminism", "nonfinite",
        "mismatch"]
    kind = FailureKind.MISMATCH
    assert kind == "mismatch" and f"({kind})" == "(mismatch)" and json.dumps({"kind": kind}) == '{"kind": "mismatch"}'


def test_lists_are_accepted_when_exact():
    assert verify(lambda z, t, **o: numpy_stable(z, t, **o).tolist(), seed=0, max_examples=20).passed


def test_options_passed_are_exactly_the_non_default_ones():
    seen = []

    def spy(logits, targets, **options):
        seen.append(sorted(options))
        return numpy_stable(logits, targets, **options)

    verify(spy, dtype="float16", seed=0, max_examples=5, weighted=True, label_smoothing=0.1, reduction="sum",
           ignore_index=3)
    assert seen and all(s == ["ignore_index", "label_smoothing", "reduction", "weight"] for s in seen)
    seen.clear()
    verify(spy, seed=0, max_examples=5)
    assert all(s == [] for s in seen)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"targets": "soft"}, "targets must be 'index' or 'probs', got 'soft'"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"label_smoothing": 1.5}, r"label_smoothing must be a number in \[0, 1\], got 1.5"),
    ({"weighted": 1}, "weighted must be True or False"),
    ({"ignore_index": 1.0}, "ignore_index must be an integer or None"),
    ({"ignore_index": 3, "targets": "probs"}, "ignore_index applies to targets='index' only"),
    ({"max_examples": 0}, "max_examples must be a positive integer"),
    ({"seed": -1}, "seed must be a nonnegative integer or None"),
    ({"max_shape": (0, 3)}, r"max_shape must be \(N, K\)"),
    ({"regimes": ("calm",)}, "regimes must be a non-empty subset"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        verify(numpy_stable, **kwargs)
    with pytest.raises(InvalidArgument, match="grad_fn must be callable"):
        verify("numpy_stable")


def test_checking_does_not_import_torch_or_jax():
    code = ("import sys, gradcheck; gradcheck.verify; import gradcheck.checking.api; "
            "print(any(m in sys.modules for m in ('torch', 'jax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_passing_run_costs_two_calls_per_example():
    """Each example calls grad_fn twice (the second call checks it repeats) and nothing else calls it:
    the cost that the throughput benchmark (benchmarks/bench_throughput.py) times."""
    calls = []

    def counted(logits, targets, **options):
        calls.append(logits.shape)
        return numpy_stable(logits, targets, **options)

    result = verify(counted, seed=0, max_examples=100, max_shape=(8, 32))
    assert result.passed and result.examples == 100 and len(calls) == 2 * result.examples
    assert all(n <= 8 and k <= 32 for n, k in calls)


def test_gradcheck_verify_is_the_function_in_every_import_order():
    """No module is named like the function, so importing the checking modules first changes nothing."""
    code = ("import gradcheck; gradcheck.assert_gradient; import gradcheck.checking.api, gradcheck.checking.result; "
            "import inspect, pathlib, sys; sys.path.insert(0, 'tests'); "
            "from zoo import numpy_stable; r = gradcheck.verify(numpy_stable, seed=0, max_examples=3); "
            "print(r.passed, type(r).__name__, inspect.isfunction(gradcheck.verify), "
            "any(pathlib.Path(gradcheck.__file__).parent.glob('verify*')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True Verification True False"


# --- a checker that cannot be fooled (issue 15) ----------------------------------------------------


@pytest.mark.parametrize("leave", [lambda: sys.exit(0), lambda: sys.exit(), lambda: exit(), lambda: quit(3)],
                         ids=["sys.exit(0)", "sys.exit()", "exit()", "quit(3)"])
def test_sys_exit_in_grad_fn_is_a_failure_not_a_pass(leave, monkeypatch):
    """Issue 15, item 1: SystemExit from grad_fn used to end verify with the process's exit code (0: a pass)."""
    monkeypatch.setattr(sys, "stdin", None)  # exit() and quit() close stdin first

    def exits_on_two_rows_or_more(logits, targets, **options):
        if logits.shape[0] > 1:
            leave()
        return numpy_stable(logits, targets, **options)

    result = verify(exits_on_two_rows_or_more, seed=0, max_examples=20)
    assert not result.passed and result.failure.kind is FailureKind.EXCEPTION
    assert result.failure.case.logits.shape[0] == 2  # shrunk, like any exception
    assert result.failure.message.startswith("grad_fn raised SystemExit(") and "sys.exit() or exit()" in result.failure.message
    with pytest.raises(GradientMismatch, match="SystemExit"):
        assert_gradient(lambda z, t, **o: sys.exit(0), seed=0, max_examples=5)


def test_keyboard_interrupt_from_grad_fn_propagates():
    def interrupted(logits, targets, **options):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify(interrupted, seed=0, max_examples=5)


class _ReusedBuffer:
    """A kernel with one persistent output buffer per shape; with ``wrong_every`` = k it negates calls 1, 1 + k, ..."""

    def __init__(self, wrong_every: int = 0) -> None:
        self.buffers: dict = {}
        self.calls = 0
        self.wrong_every = wrong_every

    def __call__(self, logits, targets, **options):
        g = numpy_stable(logits, targets, **options)
        self.calls += 1
        out = self.buffers.setdefault((g.shape, g.dtype), np.empty_like(g))
        out[...] = -g if self.wrong_every and self.calls % self.wrong_every == 1 else g
        return out


def test_a_reused_output_buffer_cannot_hide_a_wrong_kernel():
    """Issue 15, item 2: wrong on every other call, it passed: the second call overwrote the first result."""
    result = verify(_ReusedBuffer(wrong_every=2), seed=0, max_examples=50)
    assert not result.passed and result.failure.kind is FailureKind.ALIASING
    assert result.failure.message.startswith("grad_fn returned the same buffer on two calls")


def test_a_reused_buffer_fails_even_with_right_values_and_results_are_copied():
    """Aliasing alone is a failure: a caller that keeps the first gradient would see it overwritten."""
    assert verify(_ReusedBuffer(), seed=0, max_examples=20).failure.kind is FailureKind.ALIASING
    kept = []

    def new_array_each_call_but_scribbles_on_the_last(logits, targets, **options):
        if kept:
            kept[-1][...] = 0.0  # the harness must have copied it already
        kept.append(numpy_stable(logits, targets, **options))
        return kept[-1]

    assert verify(new_array_each_call_but_scribbles_on_the_last, seed=0, max_examples=30).passed


def test_a_result_that_is_a_view_of_an_input_is_aliasing():
    failure = _kind(lambda z, t, **o: z[...])
    assert failure.kind is FailureKind.ALIASING and failure.message == (
        "grad_fn returned a view of its logits argument; return a new array")


def test_a_list_result_is_taken_only_when_every_value_is_exact_in_the_dtype():
    """Issue 15, item 14: a list skipped the dtype check (float64 values were rounded to float32 silently)."""
    def float64_list(logits, targets, **options):
        return numpy_stable(logits.astype(np.float64), targets).tolist()

    failure = _kind(float64_list, dtype="float32")
    assert failure.kind is FailureKind.DTYPE
    assert failure.message.startswith("grad_fn returned a list whose value ") and failure.message.endswith(
        "is not exact in float32; return an array of dtype float32")
    exact = verify(lambda z, t, **o: numpy_stable(z, t, **o).tolist(), dtype="float32", seed=0, max_examples=20)
    assert exact.passed


def test_none_is_reported_as_none():
    """Issue 15, item 14: a grad_fn without a return statement was reported as "shape ()"."""
    failure = _kind(lambda z, t, **o: None)
    assert failure.kind is FailureKind.TYPE and failure.message.startswith("grad_fn returned None")


def _hangs_on_more_than_two_rows(logits, targets, **options):
    if logits.shape[0] > 2:
        while True:  # pure Python: only a signal stops it
            pass
    return numpy_stable(logits, targets, **options)


def test_timeout_fails_the_call_that_hangs_and_names_its_case():
    """Issue 15, item 15: verify had no per-call timeout; a hanging grad_fn hung verify."""
    before, threads = signal.getsignal(signal.SIGALRM), threading.active_count()
    start = time.monotonic()
    result = verify(_hangs_on_more_than_two_rows, seed=0, max_examples=50, timeout=0.2)
    assert time.monotonic() - start < 10  # one hung call, not shrunk
    f = result.failure
    assert not result.passed and f.kind is FailureKind.TIMEOUT
    assert f.message == "grad_fn did not return within the timeout of 0.2 s" and f.case.logits.shape[0] > 2
    assert "timeout=0.2" in result.reproduction and "minimal failing input" in str(result)
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert threading.active_count() == threads  # nothing left behind
    assert verify(numpy_stable, seed=0, max_examples=20, timeout=5).passed


def test_timeout_is_checked_by_its_rule_and_refused_off_the_main_thread():
    for bad in (0, -1, float("nan"), "1", True):
        with pytest.raises(InvalidArgument, match="^timeout must be a number > 0"):
            verify(numpy_stable, timeout=bad)
    errors = []

    def in_a_thread():
        try:
            verify(numpy_stable, timeout=1.0, max_examples=2)
        except InvalidArgument as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=in_a_thread, name="side")
    worker.start()
    worker.join()
    assert errors and errors[0].startswith("timeout works on the main thread only")


# ---- precision contracts and grades (issue 11) -----------------------------------------------------

def _truth(logits, targets, **options):
    """The certified truth, correctly rounded: the one function that keeps the "exact" contract."""
    if options.get("weight") is not None:
        options["weight"] = np.asarray(options["weight"]).astype(np.float64)
    return gradcheck.exact_grad(logits, targets, **options)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_the_correctly_rounded_truth_gets_grade_exact(dtype):
    result = verify(_truth, dtype=dtype, precision="exact", max_examples=25, seed=4, max_shape=(8, 32))
    assert result.passed and result.grade == "exact", str(result)
    assert list(result.contract_ratios) == list(gradcheck.tolerance.contracts(float_format(dtype)))
    assert "grade exact" in str(result) and "(exact contract" in str(result)


def test_the_default_contract_of_half_dtypes_is_float32_and_in_dtype_code_grades_as_the_dtype():
    from zoo import numpy_stable

    result = verify(numpy_stable, dtype="bfloat16", max_examples=50, seed=3)
    assert result.precision == "float32" and not result.passed
    assert result.grade == "bfloat16"
    message = str(result)
    assert "contract precision='float32': a correct implementation computes in float32 (or wider)" in message
    assert "it reached grade 'bfloat16'" in message and "check it with precision='bfloat16'" in message
    asked = verify(numpy_stable, dtype="bfloat16", precision="bfloat16", max_examples=50, seed=3)
    assert asked.passed and asked.grade == "bfloat16"
    assert verify(numpy_stable, dtype="float32", max_examples=20, seed=3).precision == "float32"


def test_a_failed_verification_counts_the_failing_example():
    # it reported worst_ratio 0.0 and worst_ulps 0.0: the failing example was left out of the statistics
    result = verify(zoo.sign_flipped, dtype="float32", seed=3, max_examples=20)
    assert not result.passed and result.worst_ratio > 1 and result.worst_ulps > 0


@pytest.mark.parametrize("dtype,precision", [("float32", "bfloat16"), ("float64", "float32"), ("float16", "bfloat16")])
def test_a_precision_narrower_than_the_dtype_is_refused(dtype, precision):
    with pytest.raises(InvalidArgument, match=rf"precision must be one of .* for dtype='{dtype}', got '{precision}'"):
        verify(_truth, dtype=dtype, precision=precision)


def test_an_unknown_precision_is_refused():
    with pytest.raises(InvalidArgument, match=r"precision must be one of \('exact', 'float64'"):
        verify(_truth, precision="float8")


def test_a_failure_before_the_values_grades_nothing():
    result = verify(zoo.squeezes_rows, dtype="float32", seed=0, max_examples=10)
    assert not result.passed and result.grade is None and "grade none" in str(result)


def _in_place(logits, targets, **options):
    """Liger-Kernel's way: the gradient written into the logits buffer, which is returned."""
    logits[...] = numpy_stable(logits, targets, **options)
    return logits


def test_an_in_place_kernel_is_flagged_by_default_and_accepted_when_allowed():
    flagged = verify(_in_place, dtype="float32", seed=1, max_examples=10)
    assert not flagged.passed and flagged.failure.kind == FailureKind.MUTATION
    allowed = verify(_in_place, dtype="float32", seed=1, max_examples=30, inplace="allowed")
    assert allowed.passed, str(allowed)
    assert "inplace='allowed'" in allowed.reproduction


def test_allowed_in_place_still_guards_targets_and_weights():
    def scribbles_on_weight(logits, targets, *, weight, **options):
        weight *= 2
        return numpy_stable(logits, targets, weight=weight, **options)

    result = verify(scribbles_on_weight, dtype="float32", weighted=True, seed=1, max_examples=10, inplace="allowed")
    assert not result.passed and result.failure.kind == FailureKind.MUTATION and "weight" in result.failure.message
    with pytest.raises(InvalidArgument, match=r"inplace must be 'flag' or 'allowed', got 'yes'"):
        verify(_in_place, inplace="yes")


def test_exact_in_float64_is_decided_by_the_certified_truth_where_the_reference_cannot():
    # after cancellation the float64 reference's band exceeds half an ULP: a value one ULP off passed
    # the "exact" contract when only the band decided it
    z = np.array([[30.0, 0.0, -1.0, 0.5]])
    truth = gradcheck.exact_grad(z, np.array([0]))

    def one_ulp_off(logits, targets, **options):
        g = gradcheck.exact_grad(logits, targets, **options)
        g[0, 0] = np.nextafter(g[0, 0], 0.0)
        return g

    case = gradcheck.Case.make(z, np.array([0]))
    from gradcheck.checking.judge import compare_values

    grades: dict = {}
    assert not isinstance(compare_values(truth, case, precision="exact", grades=grades), gradcheck.checking.result.Failure)
    assert grades["exact"][1] and grades["exact"][0] <= 1
    outcome = compare_values(one_ulp_off(z, np.array([0])), case, precision="exact", grades=grades)
    assert outcome.kind == FailureKind.MISMATCH and not grades["exact"][1] and grades["float64"][1]


# ---- the upstream gradient (issue 12): grad_output= for a grad_fn that names it ------------------

from gradcheck.adapters import torch_grad_fn, torch_loss_grad  # noqa: E402
from gradcheck.checking.api import takes_grad_output  # noqa: E402
from gradcheck.checking.messages import describe  # noqa: E402


def test_only_a_named_grad_output_parameter_counts_as_taking_the_upstream_gradient():
    def keyword(logits, targets, *, grad_output=None, **options): ...

    def positional(logits, targets, grad_output=None): ...

    def forwards(logits, targets, **options): ...  # forwards to what verify cannot see: not counted

    def positional_only(logits, targets, grad_output, /): ...

    class Unreadable:
        __signature__ = "not a signature"  # inspect.signature raises TypeError

        def __call__(self, logits, targets, **options): ...

    assert takes_grad_output(keyword) and takes_grad_output(positional)
    assert not takes_grad_output(forwards) and not takes_grad_output(positional_only)
    assert not takes_grad_output(Unreadable())
    assert takes_grad_output(torch_grad_fn(keyword)) and not takes_grad_output(torch_grad_fn(forwards))
    assert takes_grad_output(torch_loss_grad())  # the torch loss adapter always passes it to backward


def test_a_grad_fn_without_grad_output_is_checked_as_before_and_told_so():
    result = verify(numpy_stable, dtype="float32", seed=5, max_examples=20)
    assert result.passed and not result.upstream
    assert "upstream gradient NOT exercised (grad_fn takes no grad_output= parameter" in str(result)
    failed = verify(sign_flipped, dtype="float32", seed=3)
    assert "upstream gradient NOT exercised" in describe(failed)


def _recording(calls, fail=lambda logits, grad_output: True):
    """Records its calls; raises where ``fail`` says, else returns the oracle's VJP rounded to the dtype."""
    def grad_fn(logits, targets, *, grad_output=None, **options):
        calls.append((logits.shape, options.get("reduction", "mean"), grad_output))
        if fail(logits, grad_output):
            raise ZeroDivisionError("planted")
        return gradcheck.cross_entropy_grad(logits, targets, grad_output=grad_output, dtype=logits.dtype, **options)

    return grad_fn


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_example_passes_an_upstream_gradient_of_the_dtype(dtype, reduction):
    calls = []
    result = verify(_recording(calls), dtype=dtype, reduction=reduction, seed=2, max_examples=30)
    assert not result.passed and result.upstream and result.failure.kind == "exception"
    fmt = float_format(dtype)
    for shape, _, g in calls:
        assert g is not None and g.dtype == fmt.dtype
        if reduction == "none":
            assert isinstance(g, np.ndarray) and g.shape == (shape[0],)
        else:
            assert np.ndim(g) == 0 and not isinstance(g, np.ndarray)  # a numpy scalar of the dtype
    assert "upstream gradient exercised (grad_output= on every example)" in str(result)


def test_the_shrunk_case_keeps_its_upstream_gradient_simplified_towards_one_and_prints_it():
    calls = []
    fails_on_two_rows = _recording(calls, fail=lambda logits, g: logits.shape[0] >= 2)
    result = verify(fails_on_two_rows, dtype="float32", reduction="none", seed=4, max_examples=60)
    case = result.failure.case
    assert case.logits.shape[0] == 2 and case.grad_output.shape == (2,)
    assert np.all(case.grad_output == 1.0)  # the failure does not depend on it: simplified to ones
    message = describe(result)
    assert "grad_output = np.array([1.0, 1.0], dtype=np.float32)" in message
    assert "(logits, targets, grad_output=grad_output, **options) with the arrays above" in message
    scalar = verify(_recording([]), dtype="bfloat16", seed=4, max_examples=5)
    assert "grad_output = ml_dtypes.bfloat16(1.0)" in describe(scalar)


def test_writing_to_grad_output_is_a_mutation():
    def zeroes_upstream(logits, targets, *, grad_output=None, **options):
        grad_output[...] = 0
        return np.zeros_like(logits)

    failure = verify(zeroes_upstream, reduction="none", seed=0, max_examples=10).failure
    assert failure.kind == "mutation" and "grad_fn modified its grad_output argument in place" in failure.message


def _oracle_vjp(slip=None):
    def grad_fn(logits, targets, *, grad_output=None, **options):
        g = np.asarray(grad_output, dtype=np.float64)
        if slip == "ignored":
            g = np.ones_like(g)
        elif slip == "first_row":
            g = np.full_like(g, g.reshape(-1)[0])
        return gradcheck.cross_entropy_grad(logits, targets, grad_output=g, dtype=logits.dtype, **options)

    grad_fn.__name__ = grad_fn.__qualname__ = f"vjp_{slip}"
    return grad_fn


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_correct_vjp_passes_and_a_mishandled_upstream_gradient_is_caught_and_named(reduction):
    good = verify(_oracle_vjp(), dtype="float32", reduction=reduction, ignore_index=-100, seed=11, max_examples=60)
    assert good.passed and good.upstream, str(good)
    bad = verify(_oracle_vjp("ignored"), dtype="float32", reduction=reduction, ignore_index=-100, seed=11)
    assert not bad.passed and bad.failure.kind == "mismatch"
    assert "it matches the loss's own gradient: grad_output was ignored" in bad.failure.diagnosis
    assert "diagnosis: it matches the loss's own gradient" in describe(bad)
    if reduction == "none":
        first = verify(_oracle_vjp("first_row"), dtype="float32", reduction=reduction, seed=11)
        assert not first.passed and "grad_output[0] for every row" in first.failure.diagnosis, str(first)
        assert first.failure.case.logits.shape[0] >= 2  # it takes two rows to tell


def test_the_diagnosis_variants_apply_only_where_they_differ():
    from gradcheck.checking.diagnose import variants
    from gradcheck.problem import Case

    z, t = np.zeros((2, 3)), np.array([0, 1])
    assert variants(Case.make(z, t)) == []
    ones = variants(Case.make(z, t, reduction="none", grad_output=np.ones(2)))
    assert ones == []  # ones: nothing to tell apart from an ignored upstream gradient
    texts = [text for text, _ in variants(Case.make(z, t, reduction="none", grad_output=np.array([2.0, -1.0]),
                                                    lse_square_scale=1e-4, softcap=3.0, label_smoothing=0.1,
                                                    weight=np.ones(3)))]
    assert len(texts) == 7 and any("grad_output[0]" in x for x in texts)
    scalar = [text for text, _ in variants(Case.make(z, t, grad_output=np.array(-1.0)))]
    assert len(scalar) == 2 and "twice" in scalar[1]  # a scalar has no rows to confuse


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_torch_adapters_pass_the_upstream_gradient(reduction):
    pytest.importorskip("torch")
    z, t = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]]), np.array([2, 0])
    g = np.array([2.0, -0.5]) if reduction == "none" else np.array(-3.0)
    want = gradcheck.cross_entropy_grad(z, t, reduction=reduction, grad_output=g)
    got = torch_loss_grad()(z, t, reduction=reduction, grad_output=g)  # loss.backward(grad_output)
    assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert np.allclose(torch_loss_grad()(z, t, reduction=reduction),
                       gradcheck.cross_entropy_grad(z, t, reduction=reduction), rtol=1e-12, atol=0)
    seen = []

    def grad(logits, targets, *, grad_output=None, reduction="mean"):
        seen.append((type(grad_output).__name__, tuple(grad_output.shape), grad_output.dtype))
        return logits * 0  # only the conversion is checked here

    torch_grad_fn(grad)(z.astype(np.float32), t, reduction=reduction, grad_output=g.astype(np.float32))
    import torch

    assert seen == [("Tensor", g.shape, torch.float32)]  # a 0-d tensor stays 0-d


def test_a_contract_without_an_error_model_is_not_met_and_refused_when_asked():
    """bfloat16 arithmetic under softcap=30: the perturbation of z' = 30 tanh(z / 30) alone is about
    6 ULP * 30 ~ 0.7, so the in-dtype error model is vacuous (docs/tolerance.md)."""
    from zoo_kernel import kernel_native

    result = verify(kernel_native, dtype="bfloat16", softcap=30.0, seed=3, max_examples=30)
    assert result.passed and result.grade in ("exact", "float64", "float32"), str(result)
    assert result.contract_ratios["bfloat16"] == float("inf")
    with pytest.raises(InvalidArgument, match=r"precision='bfloat16' cannot be checked on this case .*softcap=30.0.*"
                       r"check a wider contract \(precision='float32'\)"):
        verify(kernel_native, dtype="bfloat16", softcap=30.0, precision="bfloat16", seed=3, max_examples=30)
