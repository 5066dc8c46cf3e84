"""The command line: help with examples, report, vectors, verify (exit codes 0/1/2, JSON, JUnit) and prove."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from gradcheck import cli

GOOD = """
import numpy as np

def grad(logits, targets, **options):
    from gradcheck import cross_entropy_grad
    w = options.pop("weight", None)
    return cross_entropy_grad(logits.astype(np.float64), targets, weight=None if w is None else w.astype(np.float64),
                              **options).astype(logits.dtype)

def wrong(logits, targets, **options):
    return -grad(logits, targets, **options)
"""


@pytest.mark.parametrize("command", ["selfcheck", "report", "vectors", "verify", "prove"])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"gradcheck {command}" in out


def test_help_stays_cheap():
    code = ("import sys; from gradcheck import cli; cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'sympy', 'matplotlib', 'jinja2', "
            "'rich', 'dask', 'hypothesis'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_writes_the_files_and_names_them(tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["report", "--out", str(out), "--examples", "1", "--dtypes", "float32", "--regimes", "moderate", "ties",
            "--methods", "closed_form", "fd_central", "--jobs", "1", "--max-classes", "1", "--no-vectors"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    for name in ("report.json", "report.md", "report.html"):
        assert str(out / name) in text
    assert "bound held in 100%" in text and "SymPy: 3 of 3 identities proved" in text
    assert not (out / "vectors.json").exists()
    assert cli.main(args) == 0  # a re-run over the folder replaces it cleanly
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["config"]["regimes"] == ["moderate", "ties"]


def test_report_rejects_an_unknown_method(tmp_path, capsys):
    assert cli.main(["report", "--out", str(tmp_path), "--methods", "nope", "--jobs", "1"]) == 2
    assert "method must be one of" in capsys.readouterr().err


def test_vectors_write_and_check(tmp_path, capsys):
    path = tmp_path / "v.json"
    assert cli.main(["vectors", "--out", str(path)]) == 0
    assert "tests in 44 groups" in capsys.readouterr().out
    assert cli.main(["vectors", "--out", str(path), "--check"]) == 0
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 1', 1))
    assert cli.main(["vectors", "--out", str(path), "--check"]) == 1
    assert "differs" in capsys.readouterr().err


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory with an implementation module, as the current directory."""
    name = f"impl_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(GOOD))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path, name


def test_verify_passes_and_writes_json_and_junit(project, capsys):
    path, name = project
    code = cli.main(["verify", f"{name}:grad", "--dtype", "float32", "--max-examples", "5", "--seed", "1",
                     "--json", "r.json", "--junit-xml", "r.xml"])
    assert code == 0, capsys.readouterr()
    doc = json.loads((path / "r.json").read_text())
    assert doc["passed"] and doc["runs"][0]["dtype"] == "float32" and doc["runs"][0]["examples"] == 5
    suite = ET.parse(path / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "0"


def test_verify_fails_with_exit_1_and_says_why(project, capsys):
    _, name = project
    assert cli.main(["verify", f"{name}:wrong", "--max-examples", "5", "--seed", "1", "--junit-xml", "f.xml"]) == 1
    err = capsys.readouterr().err
    assert "is wrong (mismatch)" in err and "reproduce with" in err
    assert ET.parse("f.xml").getroot().find("testsuite").get("failures") == "1"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:grad", "cannot import module 'no_such_module_xyz'"),
    ("{name}:missing", "has no attribute 'missing'"),
    ("just_a_module", "expected MODULE:FUNC"),
])
def test_verify_usage_errors_exit_2(project, capsys, spec, message):
    _, name = project
    assert cli.main(["verify", spec.format(name=name)]) == 2
    assert message in capsys.readouterr().err


def test_verify_against_vectors(project, capsys):
    from gradcheck.report import write_vectors
    from gradcheck.vectors import GROUPS, build_suite

    path, name = project
    write_vectors(path / "v.json", build_suite(0, dtypes=("float32",), groups=GROUPS[:2]))
    assert cli.main(["verify", f"{name}:grad", "--vectors", "v.json", "--json", "ok.json"]) == 0
    assert json.loads((path / "ok.json").read_text())["failures"] == []
    assert cli.main(["verify", f"{name}:wrong", "--vectors", "v.json", "--junit-xml", "bad.xml"]) == 1
    err = capsys.readouterr().err
    assert "FAIL tcId" in err and "looks like: SignFlip" in err
    assert int(ET.parse(path / "bad.xml").getroot().find("testsuite").get("failures")) > 0
    (path / "broken.json").write_text("{")
    assert cli.main(["verify", f"{name}:grad", "--vectors", "broken.json"]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_verify_imports_from_the_current_directory_in_a_subprocess(project):
    path, name = project
    run = subprocess.run([sys.executable, "-m", "gradcheck", "verify", f"{name}:grad", "--max-examples", "3",
                          "--seed", "2"], cwd=path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "gradcheck", "verify", "nowhere:f"], cwd=path, capture_output=True,
                         text=True)
    assert run.returncode == 2 and "cannot import module 'nowhere'" in run.stderr


def test_prove_prints_the_proofs(capsys):
    assert cli.main(["prove", "--max-classes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[ proved]") == 6 and "d softmax_i / dz_j equals delta_ij p_i - p_i p_j" in out


def test_every_dtype_option_offers_the_formats_of_gradcheck_dtypes():
    from gradcheck.dtypes import DTYPE_NAMES

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = {(name, o.dest): tuple(o.choices) for name, p in sub.choices.items() for o in p._actions
             if o.dest in ("dtype", "dtypes")}
    assert found == {(name, dest): DTYPE_NAMES for name, dest in [("selfcheck", "dtypes"), ("report", "dtypes"),
                                                                   ("verify", "dtype")]}



def test_a_command_takes_sigterm_as_a_stop_and_gives_the_handlers_back(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import gradcheck.vectors

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    path = tmp_path / "v.json"
    render = gradcheck.vectors.render_vectors

    def render_then_terminate(suite):
        # as `kill PID` would while the command works (never with the default handler: it would end pytest)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler"
        os.kill(os.getpid(), signal.SIGTERM)
        return render(suite)

    monkeypatch.setattr(gradcheck.vectors, "render_vectors", render_then_terminate)
    assert cli.main(["vectors", "--out", str(path)]) == 143
    assert capsys.readouterr().err.splitlines() == ["gradcheck: stopped by SIGTERM"]
    assert list(tmp_path.iterdir()) == []
    assert {s: signal.getsignal(s) for s in before} == before
    monkeypatch.undo()
    assert cli.main(["vectors", "--out", str(path)]) == 0 and path.exists()  # uninterrupted, as before
