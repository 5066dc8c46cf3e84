"""Where a study's tasks run: in this process, on a local process pool, or on a Dask distributed cluster.

Each executor runs ``fn(arg)`` for every ``(fn, arg)`` task, calls ``progress(1)`` as each one finishes,
and returns the results in task order (whatever order they finished in) and a description of itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradcheck.errors import require

Task = tuple[Callable, Any]


def run_local(tasks: list[Task], jobs: int, progress: Callable[[int], None]) -> tuple[list[Any], str]:
    """Run ``fn(arg)`` for every task on ``jobs`` processes (in this process when jobs == 1), in task order."""
    if jobs == 1:
        results = []
        for fn, arg in tasks:
            results.append(fn(arg))
            progress(1)
        return results, "in-process"
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent may hold threads (JAX, rich), and fork would copy their locks
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, arg) for fn, arg in tasks]
        for future in as_completed(futures):
            future.result()  # raise a worker's exception here
            progress(1)
        return [f.result() for f in futures], f"processes:{jobs}"


def run_dask(tasks: list[Task], address: str, progress: Callable[[int], None]) -> tuple[list[Any], str]:
    """Run the tasks on an existing Dask distributed cluster, in task order."""
    require("dask.distributed", extra="dask")
    from dask.distributed import Client, as_completed

    with Client(address) as client:
        futures = [client.submit(fn, arg, pure=False) for fn, arg in tasks]
        for future in as_completed(futures):
            future.result()
            progress(1)
        return client.gather(futures), f"dask:{address}"
