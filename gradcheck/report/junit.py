"""JUnit XML: a verify run as a test suite that CI systems display, one testcase per checked case."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # colour codes and other escape sequences
# what XML 1.0 cannot hold: C0 controls but tab, line feed and carriage return; surrogates; U+FFFE, U+FFFF
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """``text`` that an XML 1.0 document can hold: ANSI escape sequences removed, every other character
    XML forbids written out as ``\\xNN`` or ``\\uNNNN`` (so a NUL in a message stays visible)."""
    def spell(m: re.Match) -> str:
        code = ord(m.group(0))
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _NOT_XML.sub(spell, _ANSI.sub("", text))


def junit_xml(suite_name: str, cases: list[tuple[str, float, str | None]]) -> str:
    """A JUnit XML document: one testcase per (name, seconds, failure message or None).

    The failure's first line (at most 500 characters) is the ``message`` attribute, the whole
    message the element's text; ``time`` attributes have three decimals. Names and messages go
    through :func:`xml_text`, so the document is well-formed whatever they hold.
    """
    suite_name = xml_text(suite_name)
    failures = sum(1 for _, _, f in cases if f)
    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)), failures=str(failures),
                          errors="0", time=f"{sum(s for _, s, _ in cases):.3f}")
    for name, seconds, failure in cases:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=xml_text(name), time=f"{seconds:.3f}")
        if failure:
            text = xml_text(failure)
            node = ET.SubElement(case, "failure", message=(text.splitlines() or [""])[0][:500])
            node.text = text
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
