"""JUnit XML: a verify run as a test suite that CI systems display, one testcase per checked case."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def junit_xml(suite_name: str, cases: list[tuple[str, float, str | None]]) -> str:
    """A JUnit XML document: one testcase per (name, seconds, failure message or None).

    The failure's first line (at most 500 characters) is the ``message`` attribute, the whole
    message the element's text; ``time`` attributes have three decimals.
    """
    failures = sum(1 for _, _, f in cases if f)
    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)), failures=str(failures),
                          errors="0", time=f"{sum(s for _, s, _ in cases):.3f}")
    for name, seconds, failure in cases:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=name, time=f"{seconds:.3f}")
        if failure:
            node = ET.SubElement(case, "failure", message=failure.splitlines()[0][:500])
            node.text = failure
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
