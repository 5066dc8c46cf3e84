"""The exceptions, and ``require``'s message for a missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradcheck.errors import GradcheckError, MissingExtra, require


def test_require_returns_the_module():
    import json.decoder

    assert require("json.decoder", extra="unused") is json.decoder


def test_missing_extra_names_the_install_line():
    with pytest.raises(MissingExtra, match=r"^no_such_pkg_xyz is not installed; gradcheck installs it with the "
                       r"extra 'jax': pip install 'gradcheck\[jax\]'$") as info:
        require("no_such_pkg_xyz.numpy", extra="jax")
    assert isinstance(info.value, ImportError) and isinstance(info.value, GradcheckError)
    assert info.value.name == "no_such_pkg_xyz" and info.value.extra == "jax"
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_broken_installation_is_not_called_a_missing_extra(tmp_path, monkeypatch):
    # the package is there but imports something absent: that error propagates unchanged
    (tmp_path / "half_installed_xyz").mkdir()
    (tmp_path / "half_installed_xyz" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(ModuleNotFoundError) as info:
        require("half_installed_xyz", extra="jax")
    assert not isinstance(info.value, MissingExtra) and info.value.name == "no_such_dependency_xyz"
    monkeypatch.delitem(sys.modules, "half_installed_xyz", raising=False)


@pytest.mark.parametrize(("blocked", "method", "extra"), [
    ("jax", "jax_autodiff", "jax"),
    ("sympy", "sympy_numpy", "proofs"),
])
def test_a_method_whose_extra_is_missing_says_how_to_install_it(blocked, method, extra):
    # a fresh interpreter in which the package cannot be imported (None in sys.modules blocks it)
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "import numpy as np, gradcheck\n"
        "try:\n"
        f"    gradcheck.gradient(np.zeros((1, 2)), np.array([0]), method={method!r})\n"
        "except gradcheck.MissingExtra as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == f"{blocked} is not installed; gradcheck installs it with the extra {extra!r}: " \
                  f"pip install 'gradcheck[{extra}]'\n"
