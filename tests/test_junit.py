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


def test_control_characters_and_colour_codes_leave_the_document_well_formed(tmp_path):
    message = "\x1b[31mmismatch\x1b[0m at (0, 1):\x00 got \x07\x1b 1.0\ud800\n\x0bsecond \x1b[1;32mline\x1b[m\ufffe"
    text = junit_xml("gradcheck.verify[k\x00:\x1b[1mgrad]", [("float32-\x01index", 0.5, message),
                                                         ("colour only", 0.1, "\x1b[0m")])
    path = tmp_path / "r.xml"
    path.write_bytes(text.encode("utf-8"))
    suite = ET.parse(path).getroot().find("testsuite")  # a file, as CI reads it
    assert suite.get("name") == "gradcheck.verify[k\\x00:grad]" and suite.get("failures") == "2"
    first, second = suite.findall("testcase")
    assert first.get("name") == "float32-\\x01index"
    failure = first.find("failure")
    assert failure.get("message") == "mismatch at (0, 1):\\x00 got \\x07\\x1b 1.0\\ud800"
    assert failure.text == "mismatch at (0, 1):\\x00 got \\x07\\x1b 1.0\\ud800\n\\x0bsecond line\\ufffe"
    assert second.find("failure") is not None  # a message that was only colour is still a failure
