"""Package-level promises: a cheap import, the public names, the command line."""

from __future__ import annotations

import subprocess
import sys

import gradcheck as gc
from gradcheck import cli

HEAVY = ("jax", "sympy", "hypothesis", "torch", "scipy", "matplotlib", "jinja2", "rich", "_pytest", "pytest")


def test_import_is_cheap():
    code = "import sys, gradcheck; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own subprocess' repr of a list of names
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_public_contract_names():
    for name in ["softmax", "log_softmax", "cross_entropy", "cross_entropy_grad", "softmax_jacobian",
                 "cross_entropy_hessian", "exact_grad", "exact_loss", "ulp_distance", "compare",
                 "InvalidArgument", "GradientMismatch"]:
        assert callable(getattr(gc, name)), name


def test_selfcheck_command(capsys):
    assert cli.main(["selfcheck", "--cases", "2", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "seed 0" in out and "large_gap" in out and "within its error bound everywhere" in out


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "gradcheck", "selfcheck", "--help"], capture_output=True, text=True, check=True).stdout
    assert "example: gradcheck selfcheck" in out


def test_lazy_names_survive_any_import_order():
    code = (
        "import gradcheck, gradcheck.checking.api\n"
        "from gradcheck.checking.result import Verification\n"
        "import numpy as np\n"
        "r = gradcheck.verify(gradcheck.cross_entropy_grad, max_examples=3, seed=1)\n"
        "assert isinstance(r, Verification) and r.passed and callable(gradcheck.assert_gradient)\n"
        "assert gradcheck.strategies.__name__ == 'gradcheck.strategies'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
