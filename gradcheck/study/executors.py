"""Where a study's tasks run: in this process, on a local process pool, or on a Dask distributed cluster.

Each executor runs ``fn(arg)`` for every ``(fn, arg)`` task, calls ``progress(1)`` as each one finishes,
and returns the results in task order (whatever order they finished in) and a description of itself.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gradcheck.errors import require

Task = tuple[Callable, Any]


def run_local(tasks: list[Task], jobs: int, progress: Callable[[int], None]) -> tuple[list[Any], str]:
    """Run ``fn(arg)`` for every task on ``jobs`` processes (in this process when jobs == 1), in task order.

    Any exception while waiting (a task's, KeyboardInterrupt, or one a signal handler raises) cancels the
    queued tasks and terminates the worker processes before it propagates: nothing outlives the call.
    """
    if jobs == 1:
        results = []
        for fn, arg in tasks:
            results.append(fn(arg))
            progress(1)
        return results, "in-process"
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent may hold threads (JAX, rich), and fork would copy their locks
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_leave_signals_to_the_parent)
    futures: list[Any] = []
    try:
        with _signals_held():  # the workers start during submit: they inherit the held signals
            futures = [pool.submit(fn, arg) for fn, arg in tasks]
        for future in as_completed(futures):
            future.result()  # raise a worker's exception here
            progress(1)
        pool.shutdown()
    except BaseException:
        _stop(pool)
        raise
    return [f.result() for f in futures], f"processes:{jobs}"


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_HOLD = hasattr(signal, "pthread_sigmask")


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, where the OS allows it: they take effect then.

    A process started meanwhile inherits the held mask, so a Ctrl-C to the process group cannot reach a
    worker before :func:`_leave_signals_to_the_parent` has run in it. The mask is this thread's only:
    another thread of this process (JAX's, rich's, the pool's own) can still take the signal, and Python
    then runs the handler in the main thread, mid-block. A KeyboardInterrupt between starting a worker
    and sending it its task would leave the worker to die with a traceback ("EOFError: Ran out of
    input"). So in the main thread the handlers are replaced for the block too, by one that records
    the signal, and a recorded signal is raised again as the block ends, to the handler that was there.
    """
    import threading

    main = threading.current_thread() is threading.main_thread()
    came: list[int] = []
    handlers = {s: signal.getsignal(s) for s in _STOP_SIGNALS} if main else {}
    for s in handlers:
        signal.signal(s, lambda signum, frame: came.append(signum))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _HOLD else None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for s, handler in handlers.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(came):  # each signal once, in the order they came
            signal.raise_signal(s)


def _leave_signals_to_the_parent() -> None:
    """A worker's initializer: ignore Ctrl-C (the parent stops the pool), then take signals again.

    The parent terminates its workers (SIGTERM) when it is interrupted; a KeyboardInterrupt in a worker
    would only print a traceback and fail its task.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _HOLD:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _stop(pool: Any, grace: float = 0.5, timeout: float = 5.0) -> None:
    """Terminate the workers (killing any still alive after ``grace`` s) and shut the pool down without
    waiting for the tasks, the queued ones cancelled.

    The pool's private ``_processes`` and ``_executor_manager_thread``: there is no public way to stop
    the workers before Python 3.14 (``terminate_workers``). The manager thread, which notices the dead
    workers and closes the pool's pipes, is joined too: if it were still closing them at interpreter
    exit, concurrent.futures' exit hook would write to a closed pipe and print a traceback (seen with Python 3.11).
    """
    # The queued futures are cancelled by the pool's own thread (cancel_futures=True), never from here: a
    # future cancelled here can still be among the pool's pending items, and when the pool then sees its
    # workers die it sets BrokenProcessPool on it, which raises InvalidStateError in its thread (Python 3.11).
    processes = list((pool._processes or {}).values())
    manager = pool._executor_manager_thread
    for p in processes:
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for p in processes:  # a worker still starting holds SIGTERM until its initializer runs: kill it then
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout)
    if manager is not None:
        manager.join(timeout)


def run_dask(tasks: list[Task], address: str, progress: Callable[[int], None]) -> tuple[list[Any], str]:
    """Run the tasks on an existing Dask distributed cluster, in task order.

    An exception while waiting propagates through the client's closing, which releases this call's
    tasks on the cluster (the cluster itself is not ours to stop).
    """
    require("dask.distributed", extra="dask")
    from dask.distributed import Client, as_completed

    with Client(address) as client:
        futures = [client.submit(fn, arg, pure=False) for fn, arg in tasks]
        for future in as_completed(futures):
            future.result()
            progress(1)
        return client.gather(futures), f"dask:{address}"
