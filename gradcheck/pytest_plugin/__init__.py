"""The pytest plugin: the ``gradcheck`` fixture and marker, ``--gradcheck-*`` options, seed header, session report.

Registered under the ``pytest11`` entry point as ``gradcheck`` (``pytest -p no:gradcheck`` turns it
off). Loading it imports pytest and the standard library only: numpy, ml_dtypes, mpmath and
Hypothesis load with :func:`gradcheck.verify` when a test first runs a check (as with Hypothesis's own
plugin). This module holds the hooks and fixtures; ``checker.py`` the object the fixture yields,
``session_report.py`` the report of every check.

    def test_my_gradient(gradcheck):
        gradcheck.assert_gradient(my_grad, reduction="sum")

Every test that uses the fixture or the marker runs once per dtype, a separate item each
(``test_my_gradient[float32]``): the marker's ``dtypes=``, else ``--gradcheck-dtypes``, else float64.
Each check's Hypothesis seed is derived from the session seed (printed in the header) and the test id,
so ``pytest --gradcheck-seed N path::test[float32]`` repeats one check exactly.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import pytest

from gradcheck.errors import InvalidArgument
from gradcheck.options import VERIFY
from gradcheck.pytest_plugin import session_report
from gradcheck.pytest_plugin.checker import GradientChecker, Settings, check_seed

__all__ = ["CHECK_OPTIONS", "DTYPE_NAMES", "GradientChecker", "Settings", "check_seed"]

DTYPE_NAMES = VERIFY["dtype"].choices
DEFAULT_DTYPES = (VERIFY["dtype"].default,)
CHECK_OPTIONS = tuple(VERIFY)  # the keywords of gradcheck.verify after grad_fn, from the one option spec
# the options a session may set for every check (the dtype has --gradcheck-dtypes, the seed is the session's)
SESSION_OPTIONS = tuple(o for o in VERIFY.values() if o.parse is not None and o.name not in ("dtype", "seed"))
MARKER = (
    "gradcheck(dtypes=None, **options): run the test once per dtype (default: --gradcheck-dtypes, "
    "else float64); the options (targets=, reduction=, max_examples=, ...) become the defaults of "
    "the gradcheck fixture's checks in this test."
)


_SETTINGS = pytest.StashKey[Settings]()
_WRITTEN = pytest.StashKey[tuple]()  # the report's (json, md) paths, once written
_SENT = pytest.StashKey[int]()  # an xdist worker: how many of its records its reports have carried
_CRASHED = pytest.StashKey[list]()  # the xdist controller: the workers that went down with an error
_RECORDS = "gradcheck_records"  # the attribute of an xdist worker's report that carries them


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradcheck: cross-entropy gradient checks")
    for option in SESSION_OPTIONS:  # generated from the one option spec: a flag and an ini setting each
        group.addoption(
            f"--gradcheck-{option.name.replace('_', '-')}", metavar=option.metavar, default=None,
            help=f"default of every check's {option.name}= unless a test says otherwise: {option.help} "
            f"(default: ini gradcheck_{option.name}, else {option.default}).",
        )
        parser.addini(f"gradcheck_{option.name}", f"default of --gradcheck-{option.name.replace('_', '-')}",
                      default=None)
    group.addoption(
        "--gradcheck-seed", metavar="N", default=None,
        help="session seed from which every check's seed is derived (default: ini gradcheck_seed, else random; "
        "printed in the header).",
    )
    group.addoption(
        "--gradcheck-dtypes", metavar="LIST", default=None,
        help="comma-separated dtypes that tests using the gradcheck fixture run over, unless their marker names "
        f"dtypes (default: ini gradcheck_dtypes, else float64). Known: {', '.join(DTYPE_NAMES)}.",
    )
    group.addoption(
        "--gradcheck-device", metavar="DEVICE", default=None,
        help="the device tests pass to gradcheck's torch and jax adapters as gradcheck.device "
        "(cpu, cuda, cuda:1, ...; default: ini gradcheck_device, else None: the CPU).",
    )
    group.addoption(
        "--gradcheck-report", metavar="PATH", default=None,
        help="write a report of every check of the session to PATH.json and PATH.md.",
    )
    group.addoption(
        "--gradcheck-progress", action="store_true", default=None,
        help="write a progress line (test, examples done, seconds) every 2 s while a check runs longer than 2 s "
        "(default: ini gradcheck_progress, else quiet). Not shown by xdist workers (-n): they have no terminal.",
    )
    parser.addini("gradcheck_progress", "default of --gradcheck-progress (true/false)", type="bool", default=False)
    parser.addini("gradcheck_seed", "default of --gradcheck-seed", default=None)
    parser.addini("gradcheck_device", "default of --gradcheck-device", default=None)
    parser.addini("gradcheck_dtypes", "default of --gradcheck-dtypes (comma- or space-separated)", default=None)


def _setting(config: pytest.Config, name: str) -> tuple[str, str | None]:
    """(where it came from, raw value): the command line wins over the ini file."""
    value = config.getoption(name)
    if value is not None:
        return f"--{name.replace('_', '-')}", str(value)
    value = config.getini(name)
    return f"ini {name}", (str(value).strip() or None) if value is not None else None


def _option(config: pytest.Config, name: str, option: str) -> Any:
    """A setting read as the check option ``option``, by that option's one rule (None when unset)."""
    where, raw = _setting(config, name)
    if raw is None:
        return None
    try:
        return VERIFY[option].from_text(raw)
    except InvalidArgument as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None


def _dtypes(where: str, raw: Any) -> tuple[str, ...]:
    names = re.split(r"[,\s]+", raw.strip()) if isinstance(raw, str) else list(raw)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in DTYPE_NAMES]
    if unknown or not names:
        raise ValueError(
            f"{where} must name dtypes among {', '.join(DTYPE_NAMES)}, got {raw!r}; "
            "for example dtypes=['float32', 'bfloat16']."
        )
    return tuple(dict.fromkeys(names))


def _session_defaults(config: pytest.Config) -> dict[str, Any]:
    """The check options set for the whole session, each read by its one rule."""
    values = {o.name: _option(config, f"gradcheck_{o.name}", o.name) for o in SESSION_OPTIONS}
    return {name: value for name, value in values.items() if value is not None}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "gradcheck_seed" in workerinput:
        seed = workerinput["gradcheck_seed"]  # an xdist worker uses the controller's seed
    else:
        seed = _option(config, "gradcheck_seed", "seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
    where, raw = _setting(config, "gradcheck_dtypes")
    try:
        dtypes = DEFAULT_DTYPES if raw is None else _dtypes(where, raw)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    report = config.getoption("gradcheck_report")
    if report and workerinput is None:  # checked now: a failed write at the end would lose pytest's summary
        from gradcheck.report.jsonio import NotWritable, check_writable

        try:
            for path in session_report.report_paths(report):
                check_writable(path)
        except NotWritable as exc:
            raise pytest.UsageError(f"--gradcheck-report: {exc}") from None
    config.stash[_SETTINGS] = Settings(
        seed=seed, dtypes=dtypes, defaults=_session_defaults(config),
        report=report, device=_setting(config, "gradcheck_device")[1],
        progress=_progress_writer(config),
    )


def _progress_writer(config: pytest.Config) -> Any:
    """``write(line)`` to the terminal past pytest's output capture, when progress is asked; else None."""
    asked = config.getoption("gradcheck_progress")
    if not (asked if asked is not None else config.getini("gradcheck_progress")):
        return None
    if hasattr(config, "workerinput"):  # an xdist worker: its output never reaches a terminal
        return None

    def write(line: str) -> None:
        capman = config.pluginmanager.getplugin("capturemanager")
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is None:
            return
        if capman is None:
            reporter.write_line(line)
            return
        with capman.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(line)

    return write


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist controller: every worker checks with the session seed chosen here."""
    node.workerinput["gradcheck_seed"] = node.config.stash[_SETTINGS].seed


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.stash[_SETTINGS].seed
    return f"gradcheck: seed {seed} (repeat with --gradcheck-seed {seed})"


def _marker_options(node: pytest.Item) -> tuple[tuple[str, ...] | None, dict[str, Any]]:
    """The marker's (dtypes, other options), validated; (None, {}) without a marker."""
    marker = node.get_closest_marker("gradcheck")
    if marker is None:
        return None, {}
    if marker.args:
        raise ValueError(f"@pytest.mark.gradcheck takes keywords only, got {marker.args!r}; "
                         "for example @pytest.mark.gradcheck(dtypes=['float32', 'bfloat16']).")
    options = dict(marker.kwargs)
    dtypes = options.pop("dtypes", None)
    unknown = sorted(set(options) - set(CHECK_OPTIONS) - {"dtype"})
    if unknown or "dtype" in options:
        bad = unknown or ["dtype"]
        raise ValueError(f"@pytest.mark.gradcheck got unknown options {bad}; it takes dtypes= and the keywords "
                         f"of gradcheck.verify except dtype: {', '.join(o for o in CHECK_OPTIONS if o != 'dtype')}.")
    return (None if dtypes is None else _dtypes("@pytest.mark.gradcheck(dtypes=...)", dtypes)), options


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that uses the fixture or the marker once per dtype, with the dtype as its id."""
    marked = metafunc.definition.get_closest_marker("gradcheck") is not None
    if not marked and "gradcheck_dtype" not in metafunc.fixturenames:
        return
    try:
        dtypes, _ = _marker_options(metafunc.definition)
    except ValueError as exc:
        pytest.fail(f"{metafunc.definition.nodeid}: {exc}", pytrace=False)
    if dtypes is None:
        dtypes = metafunc.config.stash[_SETTINGS].dtypes
    if "gradcheck_dtype" not in metafunc.fixturenames:
        metafunc.fixturenames.append("gradcheck_dtype")  # a marked test that does not use the fixture
    metafunc.parametrize("gradcheck_dtype", dtypes, ids=list(dtypes), scope="function")


@pytest.fixture
def gradcheck_dtype(request: pytest.FixtureRequest) -> str:
    """The dtype this test item checks (the test runs once per dtype, this is its id)."""
    return getattr(request, "param", None) or request.config.stash[_SETTINGS].dtypes[0]


@pytest.fixture
def gradcheck(request: pytest.FixtureRequest, gradcheck_dtype: str) -> Iterator[GradientChecker]:
    """An object with ``verify(grad_fn, **options)`` and ``assert_gradient(grad_fn, **options)``.

    They take the arguments of :func:`gradcheck.verify`; the defaults come from this item's dtype,
    ``--gradcheck-<option>`` (or ini ``gradcheck_<option>``, for every option of verify but the dtype
    and the seed, e.g. ``--gradcheck-max-examples``, ``--gradcheck-precision``), the marker's options, and a seed
    derived from the session seed and the test id.
    """
    settings = request.config.stash[_SETTINGS]
    defaults = dict(settings.defaults)
    _, marker_options = _marker_options(request.node)
    defaults.update(marker_options)
    yield GradientChecker(request.node.nodeid, settings, gradcheck_dtype, defaults)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[Any]:
    """pytest-xdist worker: each report carries the records of the checks made since the previous one,
    so that the controller has every record of a finished phase even if this worker dies later."""
    report = yield
    config = item.config
    if hasattr(config, "workerinput"):
        records, sent = config.stash[_SETTINGS].records, config.stash.get(_SENT, 0)
        if len(records) > sent:
            setattr(report, _RECORDS, json.dumps(records[sent:]))
            config.stash[_SENT] = len(records)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_report_from_serializable(config: pytest.Config, data: Any) -> Iterator[Any]:
    """pytest-xdist controller: take the records a worker's report carries (see above)."""
    records = data.pop(_RECORDS, None) if isinstance(data, dict) else None
    report = yield
    if records:
        config.stash[_SETTINGS].records.extend(json.loads(records))
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    settings = config.stash[_SETTINGS]
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller merges and writes
        unsent = settings.records[config.stash.get(_SENT, 0):]  # checks made outside any test phase
        config.workeroutput["gradcheck_records"] = json.dumps(unsent)
        return
    if settings.report:
        from gradcheck import __version__

        paths = session_report.write(settings.report, settings.records, settings.seed, __version__)
        config.stash[_WRITTEN] = paths


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist controller: collect the records a finished worker had not sent with a report (once:
    xdist calls this twice for a worker stopped by Ctrl-C); note a worker that went down with an error
    (a crash: the checks of the test it was running are lost with it)."""
    records = getattr(node, "workeroutput", {}).pop("gradcheck_records", None)
    if records:
        node.config.stash[_SETTINGS].records.extend(json.loads(records))
    if error:
        worker = getattr(getattr(node, "gateway", None), "id", "?")
        node.config.stash.setdefault(_CRASHED, []).append(f"{worker} went down ({error})")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    settings = config.stash[_SETTINGS]
    written = config.stash.get(_WRITTEN, None)
    crashed = config.stash.get(_CRASHED, [])
    if not settings.records and not written and not crashed:
        return
    terminalreporter.section("gradcheck")
    for down in crashed:
        terminalreporter.line(f"incomplete: xdist worker {down}; the checks of the test it was running are "
                              "missing from the records", red=True)
    for summary in session_report.summarize(settings.records):
        terminalreporter.line(session_report.summary_line(summary))
    tail = f"seed {settings.seed} (repeat with --gradcheck-seed {settings.seed})"
    if written:
        tail += f"; report: {written[0]}, {written[1]}"
    terminalreporter.line(tail)
