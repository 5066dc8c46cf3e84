"""A time limit on one ``grad_fn`` call (verify's ``timeout=``), by SIGALRM on the main thread.

A thread cannot stop pure Python code and a subprocess would have to pickle the ``grad_fn``, so the
limit is a POSIX interval timer (``signal.setitimer``): when it fires, its handler raises
:class:`Hung` inside the call. That leaves no thread or process behind, with these limits:

* POSIX only, and only on the main thread (Python runs signal handlers there): elsewhere
  :func:`require_deadline` refuses ``timeout`` rather than ignore it;
* Python code is interrupted between bytecodes; a C extension (a numpy call, a GPU kernel launch)
  is interrupted only when it returns to Python or checks for signals;
* during the call the timer and the SIGALRM handler are verify's: the previous handler is restored
  afterwards and a previously armed timer re-armed with the time it had left (minus the call's).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

from gradcheck.errors import InvalidArgument


class Hung(BaseException):
    """Raised inside a call whose time is up; a BaseException so that the call's ``except Exception`` cannot swallow it."""


def require_deadline(timeout: float | None) -> None:
    """Check that a ``timeout`` can be enforced here (nothing to check when None).

    Raises:
        InvalidArgument: no SIGALRM on this platform, or not on the main thread.
    """
    if timeout is None:
        return
    if not hasattr(signal, "setitimer"):
        raise InvalidArgument(f"timeout needs SIGALRM (POSIX), which this platform lacks, got timeout={timeout!r}; "
                              "pass timeout=None.")
    if threading.current_thread() is not threading.main_thread():
        raise InvalidArgument(f"timeout works on the main thread only (signals are delivered there), got a call "
                              f"from thread {threading.current_thread().name!r}; pass timeout=None.")


def call_with_deadline(fn: Callable[..., Any], timeout: float | None, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, raising :class:`Hung` when it runs longer than ``timeout`` seconds (None: no limit)."""
    if timeout is None:
        return fn(*args, **kwargs)

    def expire(signum: int, frame: Any) -> None:
        raise Hung

    previous = signal.signal(signal.SIGALRM, expire)
    outer, outer_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    start = time.monotonic()
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # someone else's timer was running: give it back what it had left
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-6), outer_interval)
