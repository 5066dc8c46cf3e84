"""The vectors file: reproducible bytes, its schema, a round trip, and broken files rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradcheck.errors import InvalidArgument
from gradcheck.vectors import build_suite
from gradcheck.vectors.file import load_vectors, parse_vectors, render_vectors, schema

COMMITTED = Path(__file__).resolve().parent.parent / "reports" / "vectors.json"


@pytest.fixture(scope="module")
def text():
    return render_vectors(build_suite(0))


def test_committed_file_is_reproduced_byte_for_byte(text):
    if not COMMITTED.exists():
        pytest.skip("reports/vectors.json is not generated yet")
    assert COMMITTED.read_text(encoding="utf-8") == text, (
        "reports/vectors.json is stale: regenerate it with `gradcheck vectors --out reports/vectors.json`")


def test_file_matches_schema_and_round_trips(text):
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads(text)
    jsonschema.validate(doc, schema())
    assert doc["numberOfTests"] == sum(len(g["tests"]) for g in doc["testGroups"])
    assert [t["tcId"] for g in doc["testGroups"] for t in g["tests"]] == list(range(1, doc["numberOfTests"] + 1))
    assert render_vectors(parse_vectors(text)) == text


def test_parse_rejects_broken_files(text):
    with pytest.raises(InvalidArgument, match="not JSON"):
        parse_vectors(text[:-10])
    doc = json.loads(text)
    doc["schema"] = "something-else"
    with pytest.raises(InvalidArgument, match="must have schema 'gradcheck-vectors'"):
        parse_vectors(json.dumps(doc))
    doc = json.loads(text)
    doc["testGroups"][0]["tests"][0]["grad"]["repr"][0][0] = "12345.0"
    with pytest.raises(InvalidArgument, match="does not match hex"):
        parse_vectors(json.dumps(doc), validate=False)
    doc = json.loads(text)
    doc["numberOfTests"] += 1
    with pytest.raises(InvalidArgument, match="numberOfTests"):
        parse_vectors(json.dumps(doc), validate=False)


def _index_test(doc):
    return next(t for g in doc["testGroups"] if g["targetKind"] == "index" for t in g["tests"])


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("target, shown", [(10**6, "got 1000000"), (10**30, "got 1e[+]30"), (-7, "got -7")])
def test_an_out_of_range_target_is_a_clear_error_naming_the_test(text, validate, target, shown):
    doc = json.loads(text)
    _index_test(doc)["targets"][0] = target
    with pytest.raises(InvalidArgument, match=rf"testGroups\[\d+\]\.tests\[\d+\]\.targets must be class indices in "
                                              rf"\[0, \d+\) or ignore_index=-?\d+, {shown}\."):
        parse_vectors(json.dumps(doc), validate=validate)


def test_deep_nesting_and_bytes_that_are_not_utf8_are_clear_errors(tmp_path):
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        parse_vectors("[" * 100_000 + "]" * 100_000)
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"schema": "gradcheck-vectors", "comment": "caf\xe9"}')
    with pytest.raises(InvalidArgument, match=r"'.*latin1.json' is not UTF-8 text: byte 47 is b'.xe9'"):
        load_vectors(path)
