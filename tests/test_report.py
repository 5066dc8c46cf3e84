"""The renderers: the float encoding, deterministic JSON, atomic writes, and the four files of a report."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

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
    # the kernel options' rows: cells of their own (method x option regime x dtype), not in the totals
    assert doc["config"]["optionRegimes"] == ["saturated", "large_lse"]
    assert [(r["method"], r["regime"], r["dtype"]) for r in doc["optionResults"]] == [
        (m, r, d) for m in CONFIG.methods for r in ("saturated", "large_lse") for d in CONFIG.dtypes]
    assert all(t["cases"] == CONFIG.examples * len(CONFIG.regimes) for t in doc["totals"])
    worst = next(r["worstCase"] for r in doc["optionResults"] if r["regime"] == "large_lse" and r["worstCase"])
    assert worst["options"]["lseSquareScale"] > 0
    fd16 = [r for r in doc["results"] if r["method"] == "fd_forward" and r["dtype"] == "float16"]
    assert all(r["unsupported"] == r["cases"] and r["worstCase"] is None for r in fd16)


def test_the_vectors_summary_describes_the_kernel_groups(rendered):
    jsonschema = pytest.importorskip("jsonschema")
    from gradcheck.report.markdown import render_markdown

    study = rendered[0]
    kernel = next(g for g in GROUPS if g.kernel and g.lse_square_scale and g.softcap and g.upstream)
    suite = build_suite(1, dtypes=("float32",), groups=(GROUPS[0], kernel))
    texts, document = render_all(study, suite, timing={"totalSeconds": 1.0})
    jsonschema.validate(json.loads(texts["report.json"]), schema())
    plain, ours = document["vectors"]["groups"]
    assert not {"lseSquareScale", "softcap", "upstream"} & set(plain)  # the plain groups read as before
    assert (ours["lseSquareScale"], ours["softcap"], ours["upstream"]) == (kernel.lse_square_scale, kernel.softcap, True)
    md = render_markdown(study, document, {"report.md": "tables"})
    assert f"lambda={kernel.lse_square_scale:g}, c={kernel.softcap:g}, grad_output" in md
    assert f"lambda={kernel.lse_square_scale:g}, c={kernel.softcap:g}, grad_output" in texts["report.html"]


def test_report_json_is_deterministic_but_for_environment_and_timing(rendered):
    study, suite, texts, _ = rendered
    again, _ = run_study(CONFIG, jobs=1)
    texts2, doc2 = render_all(again, suite, timing={"totalSeconds": 2.0})
    assert comparable(json.loads(texts2["report.json"])) == comparable(json.loads(texts["report.json"]))
    assert texts2["vectors.json"] == texts["vectors.json"]


def test_markdown_has_the_tables_and_the_explanations(rendered):
    md = rendered[2]["report.md"]
    for heading in ("## The math", "## What each method proves", "## Summary: every regime", "## float16 by regime",
                    "## Worst cases", "## SymPy proofs", "## Golden vectors", "## Environment and timing",
                    "## Kernel options: softcap and z-loss"):
        assert heading in md
    assert "| method | saturated float64 | saturated float16 | large_lse float64 | large_lse float16 |" in md
    assert "| `closed_form` | bound |" in md and "unsupported" in md


def test_html_is_self_contained_with_both_plots(rendered):
    html = rendered[2]["report.html"]
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html.replace("https://json-schema", "") and "https://" not in html
    assert "<script" not in html and "Error against logit gap" in html and "ULP-error histograms per dtype" in html
    assert '<h2 id="options">Kernel options: softcap and z-loss</h2>' in html and ">large_lse float16</th>" in html


def test_write_report_writes_four_files_and_rewrites_cleanly(tmp_path, rendered):
    study, suite, _, _ = rendered
    first = write_report(tmp_path, study, suite)
    second = write_report(tmp_path, study, suite)
    assert [w.path.name for w in first] == ["vectors.json", "report.json", "report.md", "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md", "vectors.json"]
    assert first[0].size == second[0].size and first[1].size == second[1].size  # the same data, replaced


# ---- escaping: every user-controlled string in report.html is text, never markup -----------------

HOSTILE_METHOD = '<script>document.title="PWNED"</script>&amp;"\'m'
HOSTILE_SUMMARY = "<img src=x onerror=\"document.title='PWNED'\"> & summary"
HOSTILE_STRINGS = {
    "method": HOSTILE_METHOD, "summary": HOSTILE_SUMMARY, "file": "<em>out</em>/v&.json", "path": "</code><i>p</i>",
    "description": "<u>desc</u>", "platform": "<h1>linux</h1>", "executor": "dask:tcp://<x>:1\"",
    "package": "<s>9</s>",
}


class _Page(HTMLParser):
    """The element names, attribute values and text of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [v for _, v in attrs if v is not None]

    def handle_data(self, data):
        self.text.append(data)


def _page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


@pytest.fixture(scope="module")
def hostile_html(rendered):
    """report.html of a study with a registered method named like an attack, and hostile file names and environment."""
    from gradcheck import estimators
    from gradcheck.report.html import render_html

    patch = pytest.MonkeyPatch()
    patch.setitem(estimators._REGISTRY, HOSTILE_METHOD, dataclasses.replace(
        estimators.spec("closed_form"), name=HOSTILE_METHOD, summary=HOSTILE_SUMMARY))
    try:
        config = dataclasses.replace(CONFIG, methods=(HOSTILE_METHOD, "closed_form"), dtypes=("float64",))
        study, _ = run_study(config, jobs=1)
    finally:
        patch.undo()
    s = HOSTILE_STRINGS
    document = copy.deepcopy(rendered[3])
    document["vectors"]["file"] = s["file"]
    document["environment"].update(platform=s["platform"], executor=s["executor"])
    document["environment"]["packages"]["numpy"] = s["package"]
    document["timing"]["methodSeconds"] = {HOSTILE_METHOD: 1.0}
    return render_html(study, document, {s["path"]: s["description"]})


def test_html_escapes_every_user_controlled_string(hostile_html):
    page = _page(hostile_html)
    assert not {"script", "em", "i", "u", "s", "x"} & set(page.tags), sorted(set(page.tags))
    assert page.tags.count("h1") == 1 and page.tags.count("title") == 1 and page.tags.count("img") == 2
    text = "".join(page.text)
    for name, value in HOSTILE_STRINGS.items():
        assert value in text, name  # shown as written: escaped, not dropped
    assert HOSTILE_STRINGS["executor"] not in page.attributes and "PWNED" not in "".join(page.attributes)


def test_escaping_changes_no_text_of_the_committed_kind_of_report(rendered):
    page = _page(rendered[2]["report.html"])
    assert "Ziv's loop" in "".join(page.text) and "-inf logits" in page.attributes


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs a headless Chromium (Debian: apt-get install chromium)")
def test_html_escapes_every_user_controlled_string_in_a_real_browser(hostile_html, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(hostile_html, encoding="utf-8")
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "</html>" in run.stdout, run.stderr[-2000:]
    dom = _page(run.stdout)
    assert not {"script", "em", "i", "u", "s", "x"} & set(dom.tags), sorted(set(dom.tags))
    assert dom.tags.count("h1") == 1 and dom.tags.count("img") == 2
    text = "".join(dom.text)
    assert "PWNED" not in text.replace(HOSTILE_METHOD, "").replace(HOSTILE_SUMMARY, "")  # no script ran
    for name, value in HOSTILE_STRINGS.items():
        assert value in text, name


def test_the_linear_vectors_are_written_beside_the_others_with_their_section(tmp_path, rendered):
    from gradcheck.report import render_all, write_texts
    from gradcheck.vectors.linear import build_linear_suite, render_linear_vectors

    study, suite, _, _ = rendered
    groups = build_linear_suite(3, dtypes=("float32",))
    texts, _ = render_all(study, suite, linear=(groups, 3))
    assert texts["linear_vectors.json"] == render_linear_vectors(groups, 3)
    assert "## Golden vectors of the fused linear family" in texts["report.md"]
    assert "linear_vectors.json" in texts["report.md"]
    written = write_texts(tmp_path, texts)
    assert [w.path.name for w in written] == ["vectors.json", "linear_vectors.json", "report.json", "report.md",
                                              "report.html"]
    plain, _ = render_all(study, suite)
    assert "linear_vectors.json" not in plain and "fused linear family" not in plain["report.md"]
