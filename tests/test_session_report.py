"""The plugin's session report: records rendered as Markdown that a renderer shows as text, whatever the names."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from gradcheck.pytest_plugin import session_report
from gradcheck.report import jsonio

markdown_it = pytest.importorskip("markdown_it")

# user-controlled text that breaks out of naive code spans, fences, tables or inline Markdown
HOSTILE = [
    "test_x.py::test_a[`<script>alert(1)</script>`]",
    "```\n<h1>big</h1>\n```",
    "a`b``c```d",
    "`leading and trailing`",
    " padded ",
    "pipe | in \\| it \\\\| and \\",
    "*em* _em_ __strong__ **strong** ~~del~~ [link](http://x) ![img](x.png) <http://auto> &amp; &#60;",
    "# heading\n> quote\n- item\n1. item\n---\n<div>block</div>",
    "line\r\nbreaks\rand\u2028more\n\n",
    "\\`escaped backtick\\`",
    "<img src=x onerror=alert(1)>",
    "closed_form fd_forward d/dz_i w_c y_c",
]


def _renderer():
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])


class _Tags(HTMLParser):
    """The tags of a rendered page, and the text of every <td>, <th>, <h3> and <code> in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.texts: dict[str, list[str]] = {"td": [], "th": [], "h3": [], "code": [], "pre": []}
        self._open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._open.append(tag)
        if tag in self.texts:
            self.texts[tag].append("")

    def handle_endtag(self, tag):
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data):
        for tag in set(self._open) & set(self.texts):
            self.texts[tag][-1] += data


def _parse(markdown: str) -> _Tags:
    parser = _Tags()
    parser.feed(_renderer().render(markdown))
    return parser


def _flat(text: str) -> str:
    return " ".join(text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").split("\n"))


@pytest.mark.parametrize("text", HOSTILE)
def test_a_cell_renders_as_exactly_its_text(text):
    table = "\n".join([f"| {jsonio.markdown_cell(text)} | {jsonio.markdown_cell(jsonio.markdown_code(text))} |", "|---|---|"])
    page = _parse(table)
    assert set(page.tags) <= {"table", "thead", "tr", "th", "code"}, page.tags
    plain, code = page.texts["th"]
    assert plain == _flat(text).strip()  # a cell's outer spaces are not its text
    assert page.texts["code"] == [_flat(text)] or (not text.strip(" ") and page.texts["code"] == [])


@pytest.mark.parametrize("text", HOSTILE)
def test_text_and_fences_outside_tables(text):
    page = _parse("### " + jsonio.markdown_code(text) + "\n\n" + "\n".join(jsonio.markdown_fence(text)) + "\n\nx " + jsonio.markdown_text(text))
    assert set(page.tags) <= {"h3", "code", "pre", "p"}, page.tags
    assert page.texts["pre"] == [text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n") + "\n"] or "\u2028" in text


def test_plain_names_stay_as_they_are():
    assert jsonio.markdown_cell("closed_form") == "closed_form" and jsonio.markdown_code("fd_forward") == "`fd_forward`"
    assert jsonio.markdown_cell("d/dz_i of -sum_c w_c y_c (z_c - logsumexp z)") == "d/dz_i of -sum_c w_c y_c (z_c - logsumexp z)"
    assert jsonio.markdown_cell("1 / 0 (100%, 2 n/a)") == "1 / 0 (100%, 2 n/a)"


def _record(test: str, function: str, message: str | None) -> dict:
    failed = message is not None
    return {"test": test, "call": 0, "function": function, "dtype": "float64", "options": {"reduction": "sum|<b>"},
            "max_examples": 3, "examples": 3, "worst_ulps": 2.0, "worst_ratio": 1.5 if failed else 0.5, "seed": 1,
            "precision": "float64", "grade": None if failed else "float64",
            "contract_ratios": {"exact": 9.0, "float64": 1.5 if failed else 0.5},
            "verdict": "failed" if failed else "passed",
            "failure": {"kind": "mismatch", "message": message, "ulps": 2.0, "ratio": 1.5} if failed else None,
            "reproduction": "gradcheck.verify(...)", "elapsed": 0.1}


def test_hostile_names_and_messages_render_as_text_not_html_or_structure():
    test = "t.py::test_x[`<script>alert(1)</script>`]"
    function = "m.```\n<h1>owned</h1>\n```"
    message = "wrong\n```\n<h1>owned</h1>\n```\n<script>alert(2)</script>"
    doc = session_report.build([_record(test, function, message), _record("t.py::ok", "m.*ok*", None)], 7, "0")
    page = _parse(session_report.markdown(doc))
    assert not {"script", "em", "strong", "a", "img", "b"} & set(page.tags), page.tags
    assert page.tags.count("h1") == 1 and page.tags.count("h2") == 3 and page.tags.count("table") == 2 and page.tags.count("pre") == 1
    assert page.texts["h3"] == [test]
    assert page.texts["pre"] == [message + "\n"]
    codes = page.texts["code"]
    assert test in codes and _flat(function) in codes and "m.*ok*" in codes
    assert "reduction='sum|<b>'" in page.texts["td"]


def test_report_paths_and_summary_line():
    assert [p.name for p in session_report.report_paths("out/gc.json")] == ["gc.json", "gc.md"]
    summary = session_report.summarize([_record("t::a", "f", None)])[0]
    assert session_report.summary_line(summary) == (
        "f: passed 1 check (float64), 3 examples, worst 0.5 x tolerance (2 ULP); grade float64 (float64)")


def test_a_functions_grade_per_dtype_is_the_loosest_of_its_checks():
    records = [dict(_record("t::a", "f", None), dtype="bfloat16", grade="float32"),
               dict(_record("t::b", "f", None), dtype="bfloat16", grade="bfloat16"),
               dict(_record("t::c", "f", None), dtype="float32", grade="exact"),
               dict(_record("t::d", "g", None), dtype="float16", grade=None)]
    f, g = session_report.summarize(records)
    assert f["grades"] == {"bfloat16": "bfloat16", "float32": "exact"} and g["grades"] == {"float16": None}
    assert session_report.summary_line(g).endswith("grade none (float16)")
    page = session_report.markdown(session_report.build(records, 1, "0"))
    assert "bfloat16 (bfloat16), exact (float32)" in page
