"""`ffkv report`: one self-contained HTML page with every experiment of Geva et al. (2021), the paper beside ours.

It reads ``ATLAS/manifest.json`` and ``ATLAS/analysis.json`` (the contract in :mod:`ffkv.analysis`), never the
model. Whatever is missing (no analysis.json, a missing block, ``null`` layers) is drawn around and named on the
page. plotly.js is embedded once; the page makes no network request and opens from disk.

    from ffkv.report import write_report
    path = write_report("atlas")                  # -> atlas/report.html
    path = write_report("atlas", out="r.html")

A figure as PNG (for a README), with the same headless Chromium the tests use:

    python -m ffkv.report.screenshot atlas/report.html --figure fig4 -o docs/fig4.png
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FfkvError
from .data import ReportInputs, load_inputs, load_paper_reference
from .figures import FIGURES, Figure, build_figures
from .html import TriggerSplitter, page, table1, table2, table_best

FIGURE_IDS = tuple(FIGURES)
"""Figure ids, also the html ids and the names `ffkv.report.screenshot --figure` takes (plus table1, table2 and
best, the best-explained memories). Not figures of the paper: ``explain`` (Fig E1, the explanation scores),
``fig3b`` (sign changes under token removal), ``fig4b`` (suppression, the mirror of Fig 4) and ``causal`` (Fig C1,
the causal check of the values); ``fig11b`` automates an analysis the paper did by hand (§5.2: is the FFN's new
top token semantically distant from the residual's?)."""


def plotly_js() -> str:
    """The plotly.js bundle shipped with the plotly package, to inline once."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise FfkvError("`ffkv report` needs the plotly package (for its bundled plotly.js): pip install plotly")
    return get_plotlyjs()


def build_report(atlas_path: str | Path, atlas_arg: str | None = None) -> str:
    """The report page as a string. ``atlas_arg`` is how the atlas is named in the 'how to reproduce' commands
    (default: the path as given)."""
    inp = load_inputs(atlas_path)
    figures = build_figures(inp)
    split = TriggerSplitter(inp)

    def tables():
        return table1(inp, split), table2(inp, split), table_best(inp)

    return page(inp, figures, atlas_arg or str(atlas_path), plotly_js(), tables)


def write_report(atlas_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of an atlas to ``out`` (default ``ATLAS/report.html``) and return its path.

    Raises :class:`ffkv.FfkvError` (one line, for exit code 2) when the atlas does not exist, has no manifest, or
    its manifest / analysis.json is not valid JSON, or when analysis.json records another scan id than the atlas's
    (the folder was scanned again since `ffkv analyze`). A missing or partial analysis.json is not an error: the
    report shows what exists and says what is missing. The page records the atlas's scan id in a
    ``<meta name="ffkv-scan-id">`` tag."""
    text = build_report(atlas_path)
    out = Path(out) if out is not None else Path(atlas_path) / "report.html"
    if out.is_dir():
        raise FfkvError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    if not out.parent.exists():
        raise FfkvError(f"--out {out}: directory {out.parent} does not exist")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FfkvError(f"cannot write {out}: {exc.strerror or exc}")
    return out


__all__ = ["FIGURE_IDS", "Figure", "ReportInputs", "build_figures", "build_report", "load_inputs",
           "load_paper_reference", "write_report"]
