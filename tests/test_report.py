"""The renderers: the float encoding, deterministic JSON, atomic writes, and the four files of a report."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from gradcheck.report import render_all, write_report
from gradcheck.report.floats import decode_floats, encode_floats, shortest_reprs
from gradcheck.report.json_report import comparable, schema
from gradcheck.report.jsonio import dumps, write_atomic
from gradcheck.study import StudyConfig, run_study
from gradcheck.vectors import GROUPS, build_suite

SPECIAL = [0.0, -0.0, np.inf, -np.inf, 1.0, -2.5, 0.1, 1e-45]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
def test_floats_round_trip_bit_exactly(dtype):
    info = ml_dtypes.finfo(dtype)
    x = np.array(SPECIAL + [float(info.smallest_subnormal), -float(info.smallest_subnormal), float(info.max),
                            float(info.tiny), np.nan], dtype=dtype).reshape(13, 1)
    enc = encode_floats(x)
    back = decode_floats(json.loads(json.dumps(enc)))
    assert back.dtype == x.dtype and back.shape == x.shape
    bits = x.view(f"u{x.itemsize}")
    assert np.array_equal(back.view(f"u{x.itemsize}")[:-1], bits[:-1])  # NaN: canonical quiet NaN
    assert np.isnan(back[-1, 0].astype(np.float64)) and enc["repr"][-1] == ["nan"]
    assert enc["repr"][1] == ["-0.0"] and enc["repr"][2] == ["inf"]


def test_documented_float32_example():
    enc = encode_floats(np.array([[1.0, -0.0, 1e-45], [np.inf, -np.inf, 0.1]], dtype=np.float32))
    assert enc == {"dtype": "float32", "shape": [2, 3],
                   "hex": [["3f800000", "80000000", "00000001"], ["7f800000", "ff800000", "3dcccccd"]],
                   "repr": [["1.0", "-0.0", "1e-45"], ["inf", "-inf", "0.1"]]}
    scalar = encode_floats(np.float64(0.1))
    assert scalar["hex"] == "3fb999999999999a" and scalar["shape"] == []


def test_shortest_repr_is_shortest():
    assert shortest_reprs(np.array([0.1, 1 / 3], dtype=np.float16)) == ["0.1", "0.3333"]
    assert shortest_reprs(np.array([0.1], dtype=ml_dtypes.bfloat16)) == ["0.1"]


def test_decode_rejects_a_repr_that_disagrees_with_its_hex():
    enc = encode_floats(np.array([1.0, 2.0], dtype=np.float32))
    enc["repr"][1] = "2.5"
    with pytest.raises(ValueError, match=r"repr '2.5' does not match hex '40000000'"):
        decode_floats(enc, where="grad")


def test_dumps_is_sorted_compact_and_strict():
    text = dumps({"b": [1, 2], "a": {"m": [[1, 2], [3, 4]]}})
    assert text == '{\n "a": {\n  "m": [\n   [1, 2],\n   [3, 4]\n  ]\n },\n "b": [1, 2]\n}\n'
    assert json.loads(text) == {"a": {"m": [[1, 2], [3, 4]]}, "b": [1, 2]}
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})


def test_write_atomic_replaces_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.json"
    write_atomic(target, "old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) == "0o644"

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "half")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]  # the temporary file is gone


CONFIG = StudyConfig(seed=1, examples=2, dtypes=("float64", "float16"), regimes=("moderate", "masked"),
                     methods=("closed_form", "fd_forward", "jax_autodiff_x64"), shapes=((2, 3),), proof_classes=1)


@pytest.fixture(scope="module")
def rendered():
    study, _ = run_study(CONFIG, jobs=1)
    suite = build_suite(1, dtypes=("float32",), groups=GROUPS[:2])
    texts, document = render_all(study, suite, timing={"totalSeconds": 1.0})
    return study, suite, texts, document


def test_report_json_matches_its_schema(rendered):
    jsonschema = pytest.importorskip("jsonschema")
    _, _, texts, document = rendered
    doc = json.loads(texts["report.json"])
    jsonschema.validate(doc, schema())
    assert doc == json.loads(json.dumps(document))
    assert doc["seed"] == 1 and set(doc["environment"]["packages"]) >= {"numpy", "jax", "sympy", "mpmath", "hypothesis"}
    assert len(doc["results"]) == 3 * 2 * 2 and doc["vectors"]["numberOfTests"] == rendered[1].number_of_tests
    fd16 = [r for r in doc["results"] if r["method"] == "fd_forward" and r["dtype"] == "float16"]
    assert all(r["unsupported"] == r["cases"] and r["worstCase"] is None for r in fd16)


def test_report_json_is_deterministic_but_for_environment_and_timing(rendered):
    study, suite, texts, _ = rendered
    again, _ = run_study(CONFIG, jobs=1)
    texts2, doc2 = render_all(again, suite, timing={"totalSeconds": 2.0})
    assert comparable(json.loads(texts2["report.json"])) == comparable(json.loads(texts["report.json"]))
    assert texts2["vectors.json"] == texts["vectors.json"]


def test_markdown_has_the_tables_and_the_explanations(rendered):
    md = rendered[2]["report.md"]
    for heading in ("## The math", "## What each method proves", "## Summary: every regime", "## float16 by regime",
                    "## Worst cases", "## SymPy proofs", "## Golden vectors", "## Environment and timing"):
        assert heading in md
    assert "| `closed_form` | bound |" in md and "unsupported" in md


def test_html_is_self_contained_with_both_plots(rendered):
    html = rendered[2]["report.html"]
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html.replace("https://json-schema", "") and "https://" not in html
    assert "<script" not in html and "Error against logit gap" in html and "ULP-error histograms per dtype" in html


def test_write_report_writes_four_files_and_rewrites_cleanly(tmp_path, rendered):
    study, suite, _, _ = rendered
    first = write_report(tmp_path, study, suite)
    second = write_report(tmp_path, study, suite)
    assert [w.path.name for w in first] == ["vectors.json", "report.json", "report.md", "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md", "vectors.json"]
    assert first[0].size == second[0].size and first[1].size == second[1].size  # the same data, replaced
