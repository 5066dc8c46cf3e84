"""report.html: one self-contained page (inline CSS, plots as base64 PNG, no network) with tables and plots."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradcheck.errors import require
from gradcheck.report.text import KERNEL, MATH, PROVES, REGIMES, TRUTH, ULP_NOTE, cell_text, fmt_ulp, kernel_options
from gradcheck.study import Cell, Study

if TYPE_CHECKING:
    from markupsafe import Markup

BUCKETS = ((0, 0, "0"), (1, 1, "1"), (2, 3, "2-3"), (4, 15, "4-15"), (16, 255, "16-255"),
           (256, 65535, "256-65535"), (65536, np.inf, ">=65536"))
GAP_TICKS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # log10(1 + gap)
GAP_LABELS = {0.0: "0", 1.0: "9", 2.0: "1e2", 3.0: "1e3", 10.0: "1e10", 30.0: "1e30", 100.0: "1e100", 300.0: "1e300"}
DTYPE_COLORS = {"float64": "#1f77b4", "float32": "#ff7f0e", "float16": "#2ca02c", "bfloat16": "#d62728"}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(study: Study) -> list[Any]:
    """The cases of the plain regimes (the plots; the kernel options' rows have their own table)."""
    plain = set(study.config.regimes)
    return [c for c in study.cases if c.regime in plain]


def _gap_plot(study: Study) -> str:
    """Max ULP error per case against the case's largest logit gap, one panel per method, colored by dtype."""
    require("matplotlib", extra="report")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = [m.name for m in study.methods]
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharex=True)
    for ax, (m, name) in zip(axes.ravel(), enumerate(names)):
        for dtype in study.config.dtypes:
            pts = [(c.gap, c.outcomes[m].max_ulp) for c in _plain(study)
                   if c.dtype == dtype and c.outcomes[m].max_ulp is not None]
            if pts:
                gap, y = np.array(pts).T
                with np.errstate(over="ignore"):
                    x = np.log10(1.0 + np.minimum(gap, np.finfo(np.float64).max))
                ax.scatter(x, y, s=9, alpha=0.6, color=DTYPE_COLORS.get(dtype), label=dtype, linewidths=0)
        # a double-log gap axis: gaps from 0 to 1e308 (linear below a gap of 9)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(-0.05, 400)
        ax.set_xticks(GAP_TICKS, [GAP_LABELS[t] for t in GAP_TICKS])
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(-0.3, max(10.0, ax.get_ylim()[1]))
        ax.yaxis.set_major_locator(ticker.SymmetricalLogLocator(linthresh=1.0, base=1000))
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_ylabel("max ULP error", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("largest logit gap in a row (max z - min z)", fontsize=8)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _histograms(study: Study) -> str:
    """Per dtype: for each method, the share of elements in each ULP-error bucket (a histogram per row)."""
    require("matplotlib", extra="report")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    dtypes = study.config.dtypes
    names = [m.name for m in study.methods]
    cols = min(2, len(dtypes))
    rows = -(-len(dtypes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 0.42 * len(names) * rows + 1.4 * rows), squeeze=False)
    labels = [b[2] for b in BUCKETS] + ["n/a"]
    for ax, dtype in zip(axes.ravel(), dtypes):
        grid = np.zeros((len(names), len(labels)))
        for m in range(len(names)):
            ulps = [c.outcomes[m].ulps for c in _plain(study) if c.dtype == dtype]
            flat = np.concatenate(ulps) if ulps else np.zeros(0)
            missing = sum(c.shape[0] * c.shape[1] for c in _plain(study)
                          if c.dtype == dtype and c.outcomes[m].max_ulp is None)
            total = flat.size + missing
            for b, (lo, hi, _) in enumerate(BUCKETS):
                grid[m, b] = np.count_nonzero((flat >= lo) & (flat <= hi))
            grid[m, -1] = missing
            if total:
                grid[m] /= total
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(f"{dtype}: share of elements by ULP error", fontsize=10)
        for (i, j), v in np.ndenumerate(grid):
            if v > 0:
                ax.text(j, i, f"{100 * v:.0f}%" if v >= 0.005 else "<1%", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
    for ax in axes.ravel()[len(dtypes):]:
        ax.axis("off")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _cell_html(c: Cell) -> Markup:
    """A table cell's content: the max ULP error, then the median and the share within estimate, small."""
    from markupsafe import Markup, escape

    if c.usable == 0:
        return escape(cell_text(c))
    extra = f", {c.cases - c.usable} n/a" if c.usable < c.cases else ""
    share = "-" if c.within_share is None else f"{100 * c.within_share:.0f}%"
    return Markup(f"{escape(fmt_ulp(c.max_ulp))}<br><span class=\"sub\">med {escape(fmt_ulp(c.median_ulp))} · "
                  f"{share}{escape(extra)}</span>")


def _grade(c: Cell) -> str:
    """A CSS class for a cell: how close the method came to the truth."""
    if c.usable == 0:
        return "na"
    if c.within_share is not None and c.within_share < 1:
        return "miss"
    if c.max_ulp == 0:
        return "exact"
    if c.max_ulp <= 1:
        return "ulp"
    if c.max_ulp <= 1024:
        return "near"
    return "far"


def render_html(study: Study, document: dict[str, Any], files: dict[str, str]) -> str:
    """The HTML report (one file; needs nothing else to display).

    Every value put into the page is HTML-escaped (method names and summaries, file names, the
    environment, prose); only :func:`_cell_html`'s cells, built from escaped parts, are markup.
    """
    require("jinja2", extra="report")
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
        autoescape=True,  # every value is escaped (select_autoescape(["html"]) missed "report.html.j2")
        trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    cfg = study.config
    summary = [(m, [next(c for c in study.totals if c.method == m.name and c.dtype == d) for d in cfg.dtypes])
               for m in study.methods]
    by_dtype = [(d, [(m, [next(c for c in study.cells if c.method == m.name and c.regime == r and c.dtype == d)
                          for r in cfg.regimes]) for m in study.methods]) for d in cfg.dtypes]
    options = [(m, [next(c for c in study.option_cells if c.method == m.name and c.regime == r and c.dtype == d)
                    for r in cfg.option_regimes for d in cfg.dtypes]) for m in study.methods]
    worst = []
    for m in study.methods:
        cells = [c for c in study.cells if c.method == m.name and c.worst is not None]
        worst.append((m, max(cells, key=lambda c: c.max_ulp or 0.0).worst if cells else None))
    return env.get_template("report.html.j2").render(
        study=study, cfg=cfg, doc=document, files=files, math=MATH, truth=TRUTH, proves=PROVES, regimes=REGIMES,
        ulp_note=ULP_NOTE, summary=summary, by_dtype=by_dtype, worst=worst, cell_text=_cell_html, grade=_grade,
        options=options, kernel=KERNEL, kernel_options=kernel_options,
        fmt_ulp=fmt_ulp, gap_png=_gap_plot(study), hist_png=_histograms(study),
    )
