"""The study: every method against the truth, the same results for any executor and worker count."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck.errors import InvalidArgument
from gradcheck.study import CHUNK, StudyConfig, run_case, run_study, task_count
from gradcheck.study.executors import run_local
from gradcheck.study.run import chunks

TINY = StudyConfig(seed=3, examples=2, dtypes=("float32", "bfloat16"), regimes=("moderate", "large_gap"),
                   option_regimes=(), methods=("closed_form", "fd_central", "sympy_mpmath"), shapes=((2, 3),),
                   proof_classes=1)


def _fingerprint(study):
    """Everything except timing and the executor, as plain data."""
    cells = [(c.method, c.regime, c.dtype, c.cases, c.usable, c.unsupported, c.non_finite, c.max_ulp, c.median_ulp,
              c.within_share, None if c.worst is None else (c.worst.seed, c.worst.index, c.worst.got)) for c in study.cells]
    cases = [(c.dtype, c.regime, c.index, c.seed, c.gap, [(o.method, o.status, o.ulps.tolist(), o.within)
                                                          for o in c.outcomes]) for c in study.cases]
    return cells, cases, [(p.kind, p.k, p.status) for p in study.proofs]


@pytest.fixture(scope="module")
def serial():
    study, _ = run_study(TINY, jobs=1)
    return study


def test_grid_order_and_counts(serial):
    assert [(c.dtype, c.regime, c.index) for c in serial.cases] == [
        (d, r, i) for d in TINY.dtypes for r in TINY.regimes for i in range(TINY.examples)]
    assert len(serial.cells) == 3 * 2 * 2 and len(serial.totals) == 3 * 2
    assert [p.status for p in serial.proofs] == ["proved"] * 3


def test_truth_methods_are_exact_and_bounds_hold(serial):
    for c in serial.cells:
        if c.method in ("closed_form", "sympy_mpmath"):
            assert c.max_ulp == 0, c  # rounded once from float64/adaptive precision: correctly rounded here
            assert c.within_share == 1.0, c
        if c.method == "fd_central" and c.dtype == "bfloat16":
            assert c.unsupported == c.cases and c.usable == 0 and c.max_ulp is None


def test_worst_case_reproduces(serial):
    from gradcheck.estimators import gradient
    from gradcheck.regimes import make_case

    cell = next(c for c in serial.cells if c.method == "fd_central" and c.dtype == "float32" and c.regime == "moderate")
    w = cell.worst
    z, t, opts = make_case(w.seed, w.regime, w.dtype, n=2, k=3)
    assert np.array_equal(z, w.logits)
    assert float(gradient(z, t, method="fd_central", **opts).grad[w.index]) == w.got


def test_same_results_on_processes(serial):
    parallel, _ = run_study(TINY, jobs=2)
    assert parallel.workers == "processes:2"
    assert _fingerprint(parallel) == _fingerprint(serial)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_same_results_on_dask(serial):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        ticks = []
        study, extra = run_study(TINY, scheduler=cluster.scheduler_address, progress=ticks.append,
                                 extra=[(sum, [1, 2])])
    assert study.workers.startswith("dask:")
    assert extra == [3]
    assert sum(ticks) == task_count(TINY) + 1
    assert _fingerprint(study) == _fingerprint(serial)


def test_totals_pool_the_regimes_of_each_method_and_dtype(serial):
    for total in serial.totals:
        cells = [c for c in serial.cells if c.method == total.method and c.dtype == total.dtype]
        assert total.regime == "all" and [c.regime for c in cells] == list(TINY.regimes)
        assert total.cases == sum(c.cases for c in cells) and total.usable == sum(c.usable for c in cells)
        assert total.max_ulp == max((c.max_ulp for c in cells if c.max_ulp is not None), default=None)


def test_chunks_cover_the_grid_once_in_tasks_of_one_dtype_and_one_shape():
    config = StudyConfig(examples=40, dtypes=("float64", "float16"), regimes=("moderate", "ties", "huge"))
    parts = chunks(config, ("closed_form",))
    assert all(0 < len(c.items) <= CHUNK and c.methods == ("closed_form",) for c in parts)
    assert all(len({config.shape(i, r) for r, i in c.items}) == 1 for c in parts)
    assert {config.shape(i, r) for c in parts for r, i in c.items if r in config.option_regimes} == {(3, 8)}
    covered = sorted((c.dtype, r, i) for c in parts for r, i in c.items)
    regimes = config.regimes + config.option_regimes  # the kernel options' rows run too
    assert config.option_regimes == ("saturated", "large_lse")
    assert covered == sorted((d, r, i) for d in config.dtypes for r in regimes for i in range(40))
    assert task_count(config) == len(parts) + 1  # and one task for the proofs


def test_in_process_executor_keeps_task_order_and_ticks_once_per_task():
    ticks = []
    results, workers = run_local([(abs, -3), (len, "ab"), (sorted, [3, 1])], 1, ticks.append)
    assert results == [3, 2, [1, 3]] and workers == "in-process" and ticks == [1, 1, 1]


def test_run_case_records_every_method():
    case = run_case(TINY, ("closed_form", "fd_central"), "float32", "moderate", 0)
    assert case.shape == (2, 3) and [o.method for o in case.outcomes] == ["closed_form", "fd_central"]
    assert case.outcomes[0].ulps.shape == (6,) and case.outcomes[0].within is True


@pytest.mark.parametrize("changes, match", [
    ({"examples": 0}, "examples must be a positive integer"),
    ({"dtypes": ("float8",)}, "dtypes must be a non-empty subset"),
    ({"regimes": ()}, "regimes must be a non-empty subset"),
    ({"option_regimes": ("moderate",)}, r"option_regimes must be distinct regimes of \('saturated', 'large_lse'\)"),
    ({"option_regimes": ("saturated", "saturated")}, "option_regimes must be distinct"),
    ({"option_regimes": ("saturated",), "option_shapes": ()}, "option_shapes must name at least one"),
    ({"methods": ("nope",)}, "method must be one of"),
])
def test_bad_configuration(changes, match):
    from dataclasses import replace

    with pytest.raises(InvalidArgument, match=match):
        run_study(replace(TINY, **changes), jobs=1)


def test_bad_jobs():
    with pytest.raises(InvalidArgument, match="jobs must be a positive integer"):
        run_study(TINY, jobs=0)


def test_an_interrupt_stops_the_local_workers_at_once():
    import multiprocessing
    import time

    def interrupt(_n):
        raise KeyboardInterrupt  # as Ctrl-C would, once the first task is done

    tasks = [(time.sleep, 0.0)] + [(time.sleep, 15.0)] * 4  # 30 s of queued work on two workers
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_local(tasks, 2, interrupt)
    assert time.monotonic() - start < 12  # spawning the two workers and stopping them, not the queued sleeps
    assert multiprocessing.active_children() == []


# --- the kernel options' rows (issue 12) -------------------------------------------------------------

WITH_OPTIONS = StudyConfig(seed=3, examples=2, dtypes=("float32", "bfloat16"), regimes=("moderate", "large_gap"),
                           methods=("closed_form", "fd_central"), shapes=((2, 3),), proof_classes=0)


@pytest.fixture(scope="module")
def with_options():
    study, _ = run_study(WITH_OPTIONS, jobs=1)
    return study


def test_option_rows_are_cells_of_their_own_and_leave_the_plain_study_alone(with_options):
    from dataclasses import replace

    study = with_options
    assert [(c.method, c.regime, c.dtype) for c in study.option_cells] == [
        (m, r, d) for m in WITH_OPTIONS.methods for r in ("saturated", "large_lse") for d in WITH_OPTIONS.dtypes]
    assert all(c.cases == WITH_OPTIONS.examples for c in study.option_cells)
    assert {c.regime for c in study.cells} == set(WITH_OPTIONS.regimes)
    assert {c.regime for c in study.cases} == {*WITH_OPTIONS.regimes, "saturated", "large_lse"}
    # the plain cells and totals are those of the same study without the option rows
    plain, _ = run_study(replace(WITH_OPTIONS, option_regimes=()), jobs=1)
    assert _fingerprint(plain)[0] == _fingerprint(study)[0]
    assert [(c.method, c.dtype, c.cases, c.max_ulp) for c in plain.totals] == [
        (c.method, c.dtype, c.cases, c.max_ulp) for c in study.totals]


def test_option_rows_set_their_option_and_the_closed_form_bound_holds(with_options):
    from gradcheck.regimes import make_case

    for case in (c for c in with_options.cases if c.regime in ("saturated", "large_lse")):
        _, _, options = make_case(case.seed, case.regime, case.dtype, n=case.shape[0], k=case.shape[1])
        key = "softcap" if case.regime == "saturated" else "lse_square_scale"
        assert options[key] > 0
    for c in with_options.option_cells:
        if c.method == "closed_form":
            assert c.usable == c.cases and c.within_share == 1.0, c


def test_stopping_a_pool_with_queued_tasks_raises_nothing_in_its_thread():
    """The pool's own thread must not fail while it stops (it did, about one stop in ten, when the queued
    futures were cancelled from here: InvalidStateError from BrokenProcessPool set on a cancelled future)."""
    import multiprocessing
    import threading
    import time
    from concurrent.futures import ProcessPoolExecutor

    from gradcheck.study.executors import _stop

    errors: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(f"{args.exc_type.__name__}: {args.exc_value}")
    try:
        for _ in range(12):
            pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(6):
                pool.submit(time.sleep, 5.0)
            time.sleep(0.5)  # the workers start and take the first tasks; the rest stay queued
            _stop(pool)
    finally:
        threading.excepthook = previous
    assert errors == []


def test_a_stop_signal_taken_by_another_thread_waits_for_the_workers_start():
    """SIGINT taken by another thread of the process (its mask is not the main thread's) while the workers
    are being started: the block runs to its end, then the signal takes effect (KeyboardInterrupt). Before,
    Python raised it mid-block, where a worker could be left without its task and die with a traceback."""
    import signal
    import threading

    from gradcheck.study.executors import _signals_held

    go, done = threading.Event(), threading.Event()

    def other() -> None:  # started before the block: SIGINT is not held in this thread
        go.wait(10)
        signal.raise_signal(signal.SIGINT)
        done.set()

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # (an xdist worker may ignore SIGINT)
    try:
        thread = threading.Thread(target=other)
        thread.start()
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                go.set()
                assert done.wait(10)
                for i in range(200000):  # bytecode boundaries, where a pending Python handler would run
                    steps.append(i)
                steps.append("end")
        thread.join(10)
        assert steps[-1] == "end"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    finally:
        signal.signal(signal.SIGINT, outer)
