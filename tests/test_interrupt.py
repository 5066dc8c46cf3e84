"""Interrupting the command line: SIGINT and SIGTERM exit 130 or 143 with one line, and leave the output
as it was (no temporary file, no file replaced).

Every test runs the command in a subprocess in its own process group, bounds every wait, and kills
whatever is left of that group in a ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

OLD = '{"an": "old report"}\n'


def _start(args: list[str], cwd, code: str | None = None) -> subprocess.Popen:
    """The command in its own session and process group (pgid == pid), its output in cwd/stdout, cwd/stderr
    (files, not pipes: workers that outlive it would hold a pipe open)."""
    command = [sys.executable, "-m", "gradcheck", *args] if code is None else [sys.executable, "-c", code, *args]
    with open(cwd / "stdout", "w") as stdout, open(cwd / "stderr", "w") as stderr:
        return subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True)


def _kill_group(proc: subprocess.Popen, started: list) -> None:
    """Kill the command's process group and every process seen under it, whatever state they are in."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


# The command, run with os.fsync patched to signal the process itself once: the signal arrives while
# the atomic writer holds its complete temporary file, before the rename (deterministically).
SIGNAL_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys

    signum = getattr(signal, sys.argv.pop(1))
    real_fsync = os.fsync

    def fsync(fd):
        os.fsync = real_fsync
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
    proc = _start([signum.name, "vectors", "--out", str(path)], tmp_path, code=SIGNAL_WHILE_WRITING)
    try:
        proc.wait(timeout=120)
        stderr = (tmp_path / "stderr").read_text()
        assert proc.returncode == 128 + signum, (proc.returncode, stderr)
        assert stderr.splitlines() == [f"gradcheck: stopped by {signum.name}"], stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr", "stdout", "vectors.json"]  # no *.tmp
        assert path.read_text() == OLD
    finally:
        _kill_group(proc, [])
