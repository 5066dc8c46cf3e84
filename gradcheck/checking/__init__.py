"""Checking a project's gradient against the truth: ``gradcheck.verify`` and ``gradcheck.assert_gradient``.

One idea per module, imports pointing down the list:

* :mod:`~gradcheck.checking.api`: ``verify`` and ``assert_gradient``, which compose the rest;
* :mod:`~gradcheck.checking.search`: the Hypothesis search for a failing case;
* :mod:`~gradcheck.checking.shrink`: simplifying a failing case's values;
* :mod:`~gradcheck.checking.diagnose`: naming the slipped convention a mismatching result matches;
* :mod:`~gradcheck.checking.judge`: checking one case (call, shape, dtype, mutation, aliasing, repeat, values);
* :mod:`~gradcheck.checking.deadline`: the per-call ``timeout`` (SIGALRM on the main thread);
* :mod:`~gradcheck.checking.messages`: the failure message and the arrays in it;
* :mod:`~gradcheck.checking.result`: ``Failure``, ``Verification`` and ``FailureKind``.

Nothing is imported here, so that using :mod:`~gradcheck.checking.judge` alone does not load the
search. No module is named ``verify``: the function alone has that name (``gradcheck.verify``).
"""
