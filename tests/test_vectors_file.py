"""The vectors file: reproducible bytes, its schema, a round trip, and broken files rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradcheck.errors import InvalidArgument
from gradcheck.vectors import build_suite
from gradcheck.vectors.file import parse_vectors, render_vectors, schema

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
