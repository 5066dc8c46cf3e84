"""Interrupting the command line: SIGINT and SIGTERM stop `gradcheck report`'s workers promptly, exit
130 or 143 with one line, and leave the output folder as it was (no temporary file, no file replaced).

Every test runs the command in a subprocess in its own process group, bounds every wait, and kills
whatever is left of that group in a ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

OLD = '{"an": "old report"}\n'
STARTUP = 180  # seconds to wait for the workers to exist (two spawned interpreters importing the study)
PROMPT = 10  # seconds from the signal to the exit that count as prompt (the study runs for minutes)


def _start(args: list[str], cwd, code: str | None = None) -> subprocess.Popen:
    """The command in its own session and process group (pgid == pid), its output in cwd/stdout, cwd/stderr
    (files, not pipes: workers that outlive it would hold a pipe open)."""
    command = [sys.executable, "-m", "gradcheck", *args] if code is None else [sys.executable, "-c", code, *args]
    with open(cwd / "stdout", "w") as stdout, open(cwd / "stderr", "w") as stderr:
        return subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True)


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """The pool's worker processes under ``parent`` (the resource tracker is not one)."""
    out = []
    for child in parent.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _cpu(p: psutil.Process) -> float:
    try:
        times = p.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def _wait_for_workers(proc: subprocess.Popen, count: int, cpu_seconds: float) -> None:
    """Until ``count`` workers exist and each has run ``cpu_seconds`` (past its imports: at work)."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gradcheck exited early ({proc.returncode})"
        workers = _workers(parent)
        if len(workers) >= count and all(_cpu(w) >= cpu_seconds for w in workers):
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not start (and run {cpu_seconds} CPU s) within {STARTUP} s")


def _kill_group(proc: subprocess.Popen, started: list[psutil.Process]) -> None:
    """Kill the command's process group and every process seen under it, whatever state they are in."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    psutil.wait_procs(started, timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group, cpu_seconds", [
    (signal.SIGINT, True, 0.0),    # Ctrl-C (the terminal signals the whole process group) as the workers start
    (signal.SIGINT, True, 5.0),    # Ctrl-C while they work
    (signal.SIGTERM, False, 5.0),  # kill PID (the command alone) while they work
], ids=["SIGINT-group-starting", "SIGINT-group-working", "SIGTERM-working"])
def test_a_signal_stops_the_report_and_its_workers_promptly(tmp_path, signum, to_group, cpu_seconds):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "report.json").write_text(OLD)
    proc = _start(["report", "--out", str(out), "--examples", "200", "--jobs", "2"], tmp_path)
    seen: list[psutil.Process] = []
    try:
        _wait_for_workers(proc, 2, cpu_seconds)
        seen = psutil.Process(proc.pid).children(recursive=True)  # the workers and the resource tracker
        (os.killpg if to_group else os.kill)(proc.pid, signum)
        sent = time.monotonic()
        try:
            proc.wait(timeout=PROMPT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gradcheck report still running {PROMPT} s after {signum.name}")
        took = time.monotonic() - sent
        gone, alive = psutil.wait_procs(seen, timeout=10)
        stderr = (tmp_path / "stderr").read_text()
        assert alive == [], f"left running after {signum.name}: {[p.pid for p in alive]}"
        assert proc.returncode == 128 + signum, (proc.returncode, stderr)
        assert stderr.splitlines() == [f"gradcheck: stopped by {signum.name}"], stderr
        assert took < PROMPT
        assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no *.tmp, nothing new
        assert (out / "report.json").read_text() == OLD
        print(f"{signum.name}: exited {took:.2f} s after the signal")
    finally:
        _kill_group(proc, seen)


# The command, run with os.fsync patched to signal the process itself at the N-th call: the signal
# arrives while the atomic writer holds a complete temporary file, before its rename (deterministically).
SIGNAL_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys

    signum, at = getattr(signal, sys.argv.pop(1)), int(sys.argv.pop(1))
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        real_fsync(fd)

    os.fsync = fsync
    from gradcheck.cli import main

    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, signum):
    path = tmp_path / "vectors.json"
    path.write_text(OLD)
    proc = _start([signum.name, "1", "vectors", "--out", str(path)], tmp_path, code=SIGNAL_WHILE_WRITING)
    try:
        proc.wait(timeout=120)
        stderr = (tmp_path / "stderr").read_text()
        assert proc.returncode == 128 + signum, (proc.returncode, stderr)
        assert stderr.splitlines() == [f"gradcheck: stopped by {signum.name}"], stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr", "stdout", "vectors.json"]  # no *.tmp
        assert path.read_text() == OLD
    finally:
        _kill_group(proc, [])


def test_a_signal_while_writing_the_report_lets_it_finish_the_set(tmp_path):
    """report writes four files; a stop after the first must not leave a new vectors.json beside the old
    report.json (whose digest names the old vectors): the set is written, then the stop is taken."""
    out = tmp_path / "reports"
    out.mkdir()
    (out / "report.json").write_text(OLD)
    args = ["report", "--out", str(out), "--examples", "1", "--dtypes", "float32", "--regimes", "moderate",
            "--methods", "closed_form", "--jobs", "1", "--max-classes", "1"]
    proc = _start(["SIGTERM", "1", *args], tmp_path, code=SIGNAL_WHILE_WRITING)
    try:
        proc.wait(timeout=300)
        stderr = (tmp_path / "stderr").read_text()
        assert proc.returncode == 143, (proc.returncode, stderr)
        assert stderr.splitlines() == ["gradcheck: stopped by SIGTERM"], stderr
        assert sorted(p.name for p in out.iterdir()) == ["linear_vectors.json", "report.html", "report.json", "report.md",
                                                         "vectors.json"]
        document = json.loads((out / "report.json").read_text())
        digest = hashlib.sha256((out / "vectors.json").read_bytes()).hexdigest()
        assert digest in json.dumps(document["vectors"])  # report.json describes the vectors.json beside it
    finally:
        _kill_group(proc, [])
