"""Package-level promises: a cheap import, the public names, the command line."""

from __future__ import annotations

import subprocess
import sys

import gradcheck as gc
from gradcheck import cli

HEAVY = ("numpy", "ml_dtypes", "mpmath", "jax", "sympy", "hypothesis", "torch", "scipy", "matplotlib", "jinja2", "rich", "_pytest", "pytest")


def test_import_is_cheap():
    code = "import sys, gradcheck; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own subprocess' repr of a list of names
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_every_public_name_imports_lazily_and_is_listed():
    code = (
        "import sys, gradcheck\n"
        "names = gradcheck.__all__\n"
        "assert 'numpy' not in sys.modules and set(names) <= set(dir(gradcheck))\n"
        "for name in names:\n"
        "    exec(f'from gradcheck import {name}')\n"
        "assert 'numpy' in sys.modules and 'hypothesis' in sys.modules\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == len(gc.__all__) >= 30
    assert not hasattr(gc, "no_such_name")


def test_functions_named_like_their_module_stay_functions():
    # `import gradcheck.compare` binds the submodule onto the package; the function must win.
    code = (
        "import gradcheck.compare, gradcheck.verify, gradcheck.compare as c\n"
        "import gradcheck\n"
        "assert gradcheck.compare is c is gradcheck.compare.__globals__['compare'], gradcheck.compare\n"
        "assert callable(gradcheck.verify) and gradcheck.verify.__name__ == 'verify'\n"
        "import numpy as np\n"
        "assert gradcheck.compare(np.ones(2), np.ones(2)).max_ulp == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
        "import gradcheck, gradcheck.verify\n"
        "from gradcheck.verify import Verification\n"
        "import numpy as np\n"
        "r = gradcheck.verify(gradcheck.cross_entropy_grad, max_examples=3, seed=1)\n"
        "assert isinstance(r, Verification) and r.passed and callable(gradcheck.assert_gradient)\n"
        "assert gradcheck.strategies.__name__ == 'gradcheck.strategies'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
