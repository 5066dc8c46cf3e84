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


def test_no_public_function_shares_its_name_with_a_submodule():
    # Python binds an imported submodule onto its package, so a function named like one would be
    # hidden by it (the old gradcheck.verify and gradcheck.compare): no public name may be a submodule's.
    import pkgutil

    from gradcheck import _LAZY

    submodules = {m.name for m in pkgutil.iter_modules(gc.__path__)}
    assert not {name for name, (_, attribute) in _LAZY.items() if attribute is not None} & submodules
    code = (
        "import gradcheck, gradcheck.ulps, gradcheck.checking.api, gradcheck.estimators\n"
        "import numpy as np\n"
        "assert gradcheck.compare(np.ones(2), np.ones(2)).max_ulp == 0\n"
        "assert callable(gradcheck.verify) and gradcheck.verify.__name__ == 'verify'\n"
        "import types; assert callable(gradcheck.methods) and type(gradcheck) is types.ModuleType\n"
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
        "import gradcheck, gradcheck.checking.api\n"
        "from gradcheck.checking.result import Verification\n"
        "import numpy as np\n"
        "r = gradcheck.verify(gradcheck.cross_entropy_grad, max_examples=3, seed=1)\n"
        "assert isinstance(r, Verification) and r.passed and callable(gradcheck.assert_gradient)\n"
        "assert gradcheck.strategies.__name__ == 'gradcheck.strategies'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
