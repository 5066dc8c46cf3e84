"""The report's section on the fused linear family's golden vectors: Markdown from a built suite, computing nothing.

Input: the groups of :func:`gradcheck.vectors.linear.build_linear_suite` and, optionally, the outcomes of
:func:`gradcheck.vectors.linear.check_linear_vectors` (an implementation checked against them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from gradcheck.report.jsonio import markdown_code, markdown_table


def linear_vectors_markdown(groups: Any, outcomes: Any = None, *, file_name: str = "linear_vectors.json") -> list[str]:
    """The section's Markdown lines: one row per group and dtype (valid tests, each modeled bug's tests),
    and, with ``outcomes``, how many the checker classified right and the implementation passed."""
    from gradcheck.vectors.linear import LINEAR_BUGS

    bugs = list(LINEAR_BUGS)
    total = sum(len(g.tests) for g in groups)
    lines = [
        "## Golden vectors of the fused linear family",
        "",
        f"{total} tests in {len(groups)} groups ({markdown_code(file_name)}): hidden states, classifier and bias "
        "with their certified gradients (d_hidden, d_weight, d_bias) correctly rounded to the dtype (valid), or "
        "a shipped bug's gradients (invalid), kept only where verify_linear's judge rejects them.",
        "",
    ]
    by_id = {o.tc_id: o for o in outcomes} if outcomes is not None else {}
    header = ["group", "dtype", "bias", "valid", *bugs]
    if outcomes is not None:
        header += ["classified", "implementation passed"]
    rows = []
    for g in groups:
        kinds = Counter(t.bug for t in g.tests if t.result == "invalid")
        row: list[Any] = [markdown_code(g.spec.name), g.dtype, "yes" if g.spec.bias else "no",
                          sum(t.result == "valid" for t in g.tests), *(kinds.get(b, "") for b in bugs)]
        if outcomes is not None:
            mine = [by_id[t.tc_id] for t in g.tests]
            ran = [o for o in mine if o.implementation_ok is not None]
            row += [f"{sum(o.classified for o in mine)}/{len(mine)}",
                    f"{sum(o.implementation_ok for o in ran)}/{len(ran)}" if ran else ""]
        rows.append(row)
    lines += markdown_table(header, rows)
    lines += ["", "Modeled bugs:", ""]
    lines += [f"- {markdown_code(flag)}: {description}" for flag, (description, _, _) in LINEAR_BUGS.items()]
    return lines
