"""The committed reports/ reproduce in `make report`'s pinned floating-point environment on any x86-64 CPU.

The cells below are the ones that moved between an AVX2 and an AVX-512 machine (numpy's exp/log
kernels for the finite differences, XLA's FP16 code for JAX in float16): each is recomputed in a
subprocess with the Makefile's REPORT_ENV and must equal the committed report.json cell.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOVED = [("fd_richardson", "ties", "float64"), ("fd_central", "masked", "float32"),
         ("jax_autodiff", "soft_unnormalized", "float16")]

SCRIPT = """
import json, sys
from gradcheck.report.json_report import _cell
from gradcheck.study import StudyConfig, run_study
method, regime, dtype = sys.argv[1:]
study, _ = run_study(StudyConfig(methods=(method,), regimes=(regime,), dtypes=(dtype,), proof_classes=0), jobs=1)
print(json.dumps(_cell(study.cells[0])))
"""


def report_env() -> dict[str, str]:
    """The REPORT_ENV assignments of the Makefile (the one definition of the environment)."""
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("REPORT_ENV :="))
    return dict(word.split("=", 1) for word in shlex.split(line.split(":=", 1)[1]))


def test_report_env_pins_numpy_and_xla():
    env = report_env()
    assert set(env) == {"NPY_DISABLE_CPU_FEATURES", "XLA_FLAGS"}
    assert "--xla_cpu_max_isa=AVX2" in env["XLA_FLAGS"]


@pytest.mark.parametrize("method,regime,dtype", MOVED, ids=["/".join(m) for m in MOVED])
def test_committed_cell_reproduces_in_the_pinned_environment(method, regime, dtype):
    committed = json.loads((ROOT / "reports" / "report.json").read_text())
    expected = next(c for c in committed["results"]
                    if (c["method"], c["regime"], c["dtype"]) == (method, regime, dtype))
    env = {k: v for k, v in os.environ.items() if k not in report_env()} | report_env()
    run = subprocess.run([sys.executable, "-c", SCRIPT, method, regime, dtype], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == expected
