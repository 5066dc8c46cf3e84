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

def exits(logits, targets, **options):
    import sys
    sys.exit(0)

def hangs(logits, targets, **options):
    while True:
        pass

def kernel(logits, targets, *, grad_output=None, **options):
    # a float64-inside kernel taking the kernel options and the upstream gradient (issue 12)
    from gradcheck import cross_entropy_grad
    w = options.pop("weight", None)
    g = None if grad_output is None else np.asarray(grad_output).astype(np.float64)
    return cross_entropy_grad(logits.astype(np.float64), targets, weight=None if w is None else w.astype(np.float64),
                              grad_output=g, **options).astype(logits.dtype)

def softcap_ignored(logits, targets, *, grad_output=None, **options):
    options.pop("softcap", None)
    return kernel(logits, targets, grad_output=grad_output, **options)
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


def test_report_takes_the_kernel_options_rows_among_its_regimes(tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["report", "--out", str(out), "--examples", "1", "--dtypes", "float32", "--regimes", "moderate", "saturated",
            "--methods", "closed_form", "--jobs", "1", "--max-classes", "0", "--no-vectors"]
    assert cli.main(args) == 0
    assert "closed form, saturated: max 0 ULP, bound held in 1 of 1 dtypes" in capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    assert doc["config"]["regimes"] == ["moderate"] and doc["config"]["optionRegimes"] == ["saturated"]
    assert [(r["regime"], r["cases"]) for r in doc["optionResults"]] == [("saturated", 1)]
    assert "## Kernel options: softcap and z-loss" in (out / "report.md").read_text()


def test_report_rejects_an_unknown_method(tmp_path, capsys):
    assert cli.main(["report", "--out", str(tmp_path), "--methods", "nope", "--jobs", "1"]) == 2
    assert "method must be one of" in capsys.readouterr().err


def test_vectors_write_and_check(tmp_path, capsys):
    path = tmp_path / "v.json"
    assert cli.main(["vectors", "--out", str(path)]) == 0
    assert "tests in 76 groups" in capsys.readouterr().out  # 44 plain groups, 32 kernel groups (issue 12)
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
    assert doc["runs"][0]["precision"] == "float32" and doc["runs"][0]["grade"] in ("exact", "float64", "float32")
    assert set(doc["runs"][0]["contractRatios"]) == {"exact", "float64", "float32"}
    assert f"grade {doc['runs'][0]['grade']}" in capsys.readouterr().out
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


KERNEL_FLAGS = ["--lse-square-scale", "1e-4", "--softcap", "30", "--label-smoothing", "0.1", "--weighted",
                "--ignore-index", "-100", "--reduction", "none", "--dtype", "bfloat16", "--max-examples", "30",
                "--seed", "1"]


def test_verify_with_the_kernel_options_end_to_end(project, capsys):
    """issue 12's "done when" call from the command line: the flags come from the option spec."""
    path, name = project
    assert cli.main(["verify", f"{name}:kernel", *KERNEL_FLAGS, "--json", "k.json"]) == 0, capsys.readouterr()
    run = json.loads((path / "k.json").read_text())["runs"][0]
    assert run["passed"] and run["upstream"] is True and run["dtype"] == "bfloat16"
    assert "lse_square_scale=0.0001" in run["reproduction"] and "softcap=30.0" in run["reproduction"]
    assert cli.main(["verify", f"{name}:softcap_ignored", *KERNEL_FLAGS]) == 1
    assert "mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--lse-square-scale", "-1", "lse_square_scale must be a number"),
    ("--softcap", "0", "softcap must be a number"),
    ("--softcap", "abc", "softcap"),
])
def test_bad_kernel_option_values_are_usage_errors(project, capsys, flag, value, message):
    _, name = project
    with pytest.raises(SystemExit) as exit:
        cli.main(["verify", f"{name}:kernel", flag, value])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_verify_against_the_kernel_vectors(project, capsys):
    from gradcheck.report import write_vectors
    from gradcheck.vectors import GROUPS, build_suite

    path, name = project
    kernel_groups = tuple(g for g in GROUPS if g.kernel and g.upstream and g.softcap)
    write_vectors(path / "k.json", build_suite(0, dtypes=("float32",), groups=kernel_groups))
    assert cli.main(["verify", f"{name}:kernel", "--vectors", "k.json", "--json", "ok.json"]) == 0, capsys.readouterr()
    doc = json.loads((path / "ok.json").read_text())
    assert doc["failures"] == [] and doc["upstreamSkipped"] == 0
    assert cli.main(["verify", f"{name}:softcap_ignored", "--vectors", "k.json"]) == 1
    assert "looks like: " in capsys.readouterr().err
    # a grad_fn without grad_output= cannot be checked on the upstream tests: said, and not a pass when
    # (as here) every test has an upstream gradient
    assert cli.main(["verify", f"{name}:grad", "--vectors", "k.json", "--json", "skip.json"]) == 1
    out = capsys.readouterr().out
    assert "tests with an upstream gradient (gradOutput) not run" in out and ".grad does not take grad_output=" in out
    doc = json.loads((path / "skip.json").read_text())
    assert doc["upstreamSkipped"] == doc["tests"] > 0 and doc["inputsRun"] == 0


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
    # six kinds (three plain, three with the kernel options; estimators helper, issue 12) for K = 1, 2
    assert out.count("[ proved]") == 12 and "d softmax_i / dz_j equals delta_ij p_i - p_i p_j" in out


def test_every_dtype_option_offers_the_formats_of_gradcheck_dtypes():
    from gradcheck.dtypes import DTYPE_NAMES

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = {(name, o.dest): tuple(o.choices) for name, p in sub.choices.items() for o in p._actions
             if o.dest in ("dtype", "dtypes")}
    assert found == {(name, dest): DTYPE_NAMES for name, dest in [("selfcheck", "dtypes"), ("report", "dtypes"),
                                                                   ("verify", "dtype")]}


# --- a checker that cannot be fooled (issue 15) ----------------------------------------------------


def test_sys_exit_in_grad_fn_exits_1_with_a_message(project):
    """Issue 15, item 1: `gradcheck verify k:exits` printed nothing and exited 0."""
    path, name = project
    run = subprocess.run([sys.executable, "-m", "gradcheck", "verify", f"{name}:exits", "--max-examples", "3",
                          "--seed", "2"], cwd=path, capture_output=True, text=True)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "FAILED" in run.stdout and "is wrong (exception): grad_fn raised SystemExit(0)" in run.stderr


def test_a_module_that_exits_on_import_is_a_usage_error(project):
    path, _ = project
    (path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    run = subprocess.run([sys.executable, "-m", "gradcheck", "verify", "exits_on_import:grad"], cwd=path,
                         capture_output=True, text=True)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.strip().splitlines() == [
        f"gradcheck: error: cannot import module 'exits_on_import' from {path}: it called sys.exit(0) on import"]


def _write_suite(path, groups):
    from gradcheck.report import write_vectors
    from gradcheck.vectors import GROUPS, build_suite

    suite = build_suite(0, dtypes=("float32",), groups=GROUPS[:2])
    write_vectors(path, type(suite)(suite.seed, suite.generator, groups(suite.groups)))


def test_verify_against_a_file_without_the_asked_tests_exits_2(project, capsys):
    """Issue 15, item 3: a schema-valid file with zero tests said "passed; 0 tests" and exited 0."""
    path, name = project
    _write_suite(path / "empty.json", lambda groups: ())
    assert cli.main(["verify", f"{name}:wrong", "--vectors", "empty.json"]) == 2
    assert "empty.json: the vectors file has no tests" in capsys.readouterr().err
    _write_suite(path / "f32.json", lambda groups: groups)
    assert cli.main(["verify", f"{name}:wrong", "--vectors", "f32.json", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "the vectors file has no test of dtype float16: it holds float32/index" in err
    assert cli.main(["verify", f"{name}:wrong", "--vectors", "f32.json", "--dtype", "float32", "float16"]) == 2
    assert cli.main(["verify", f"{name}:grad", "--vectors", "f32.json", "--dtype", "float32"]) == 0


def test_timeout_flag_fails_a_hanging_function(project, capsys):
    """Issue 15, item 15: the flag comes from the option table; the failure names the case that hung."""
    _, name = project
    assert cli.main(["verify", f"{name}:hangs", "--timeout", "0.2", "--seed", "0"]) == 1
    err = capsys.readouterr().err
    assert "is wrong (timeout): grad_fn did not return within the timeout of 0.2 s" in err and "logits = " in err
    assert "timeout=0.2" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify", f"{name}:grad", "--timeout", "-1"])
    assert exc.value.code == 2 and "timeout must be a number > 0" in capsys.readouterr().err


# ---- issue 15: the user's folder shadows none of gradcheck's imports; exit 2 with a message, before the work


POISON = "import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('ran')\nraise RuntimeError('poisoned {name}')\n"


def test_verify_does_not_import_gradchecks_dependencies_from_the_users_folder(project):
    path, name = project
    from gradcheck.report import write_vectors
    from gradcheck.vectors import GROUPS, build_suite

    write_vectors(path / "v.json", build_suite(0, dtypes=("float32",), groups=GROUPS[:1]))
    for module in ("hypothesis", "rich", "numpy", "mpmath", "jsonschema", "ml_dtypes"):
        (path / f"{module}.py").write_text(POISON.format(name=module))
    # -P: the folder is not on sys.path at start, as with the installed `gradcheck` script
    for python, extra in (["-P"], []), (["-P"], ["--vectors", "v.json"]), ([], ["--vectors", "v.json"]):
        if not python:  # python -m puts the folder first before gradcheck runs: numpy and ml_dtypes load from it
            for module in ("numpy", "ml_dtypes", "mpmath"):
                (path / f"{module}.py").unlink()
        run = subprocess.run([sys.executable, *python, "-m", "gradcheck", "verify", f"{name}:grad", "--max-examples",
                              "3", "--seed", "2", *extra], cwd=path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert sorted(p.name for p in path.glob("*.ran")) == [], (python, extra)
        assert "poisoned" not in run.stderr


def test_load_function_puts_the_folder_on_sys_path_only_while_importing(project):
    path, name = project
    before = list(sys.path)
    assert callable(cli.load_function(f"{name}:grad"))
    assert sys.path == before


@pytest.fixture
def outputs(project):
    """Output paths that cannot be written: a folder, a path under a file, a path where no file can be created."""
    path, _ = project
    (path / "afile").write_text("")
    (path / "adir").mkdir()
    return {"adir": "it is a directory", "afile/out.json": "'afile' is not a directory",
            "/proc/gradcheck/out.json": "cannot write '/proc/gradcheck/out.json'"}


def _no_work(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran although an output path cannot be written")

    monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("flag", ["--json", "--junit-xml"])
def test_verify_checks_its_output_paths_before_the_work(project, outputs, capsys, monkeypatch, flag):
    import gradcheck.checking.api

    _, name = project
    _no_work(monkeypatch, gradcheck.checking.api, "verify")
    for out, message in outputs.items():
        assert cli.main(["verify", f"{name}:grad", "--max-examples", "2", flag, out]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""


def test_report_and_vectors_check_their_output_paths_before_the_work(project, outputs, capsys, monkeypatch):
    import gradcheck.study
    import gradcheck.vectors

    _no_work(monkeypatch, gradcheck.study, "run_study")
    _no_work(monkeypatch, gradcheck.vectors, "build_suite")
    (project[0] / "reports" / "report.md").mkdir(parents=True)
    cases = [(["report", "--out", "afile"], "cannot write 'afile/report.json': 'afile' is not a directory."),
             (["report", "--out", "reports"], "cannot write 'reports/report.md': it is a directory."),
             (["report", "--out", "/proc/gradcheck"], "cannot write '/proc/gradcheck/report.json'")]
    cases += [(["vectors", "--out", out], message) for out, message in outputs.items()]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"schema": "caf\xe9"}', "is not UTF-8 text"),
    ("target", "targets must be class indices in [0, 4) or ignore_index=-100, got 1000000."),
])
def test_verify_unreadable_vectors_exit_2_with_one_line(project, capsys, content, message):
    from gradcheck.report import write_vectors
    from gradcheck.vectors import GROUPS, build_suite

    path, name = project
    if content == "target":
        write_vectors(path / "v.json", build_suite(0, dtypes=("float32",), groups=GROUPS[:1]))
        doc = json.loads((path / "v.json").read_text())
        doc["testGroups"][0]["tests"][0]["targets"][0] = 10**6
        content = json.dumps(doc).encode()
    (path / "v.json").write_bytes(content)
    assert cli.main(["verify", f"{name}:grad", "--vectors", "v.json"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["verify", "m:f", "--max-examples", "abc"], "max_examples must be a positive integer"),
    (["prove", "--timeout", "-1"], "must be a positive finite number of seconds, got '-1'"),
    (["prove", "--timeout", "nan"], "must be a positive finite number of seconds, got 'nan'"),
])
def test_bad_numbers_are_usage_errors_with_the_options_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "_positive" not in err, err



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
