"""JUnit XML: the document parses, counts its cases and failures, and carries each failure's message intact."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gradcheck.report.junit import junit_xml


def _suite(text: str) -> ET.Element:
    root = ET.fromstring(text.encode("utf-8"))  # bytes: the document carries an encoding declaration
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return suite


def test_counts_names_and_times():
    cases = [("float32-index", 0.25, None), ("float32-probs", 1.5, "wrong at (0, 1)\ndetails"), ("bf16", 0.0, None)]
    suite = _suite(junit_xml("gradcheck.verify[m:f]", cases))
    assert (suite.get("name"), suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "gradcheck.verify[m:f]", "3", "1", "0")
    assert suite.get("time") == "1.750"
    testcases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name"), c.get("time")) for c in testcases] == [
        ("gradcheck.verify[m:f]", "float32-index", "0.250"), ("gradcheck.verify[m:f]", "float32-probs", "1.500"),
        ("gradcheck.verify[m:f]", "bf16", "0.000")]
    assert [len(c.findall("failure")) for c in testcases] == [0, 1, 0]


def test_failure_message_is_the_first_line_and_the_text_is_all_of_it():
    message = "grad[0, 1] = <-0.5> & expected \"0.5\"\n" + "x" * 40 + "\nreproduce with: verify(...)"
    (failure,) = _suite(junit_xml("s", [("case", 0.0, message)])).iter("failure")
    assert failure.get("message") == 'grad[0, 1] = <-0.5> & expected "0.5"'
    assert failure.text == message


def test_a_long_first_line_is_cut_to_500_characters_in_the_attribute_only():
    message = "y" * 700
    (failure,) = _suite(junit_xml("s", [("case", 0.0, message)])).iter("failure")
    assert failure.get("message") == "y" * 500 and failure.text == message


def test_an_empty_message_is_no_failure_and_no_cases_is_an_empty_suite():
    suite = _suite(junit_xml("s", [("case", 0.0, "")]))
    assert suite.get("failures") == "0" and suite.find("testcase/failure") is None
    empty = _suite(junit_xml("s", []))
    assert (empty.get("tests"), empty.get("failures"), empty.get("time")) == ("0", "0", "0.000")


def test_the_document_declares_itself_and_ends_with_a_newline():
    text = junit_xml("s", [("case", 0.0, None)])
    assert text.startswith("<?xml version='1.0' encoding='utf-8'?>") and text.endswith("</testsuites>\n")
