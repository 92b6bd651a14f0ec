"""`ffkv report`: one self-contained HTML page with every experiment of Geva et al. (2021), the paper beside ours.

It reads ``ATLAS/manifest.json`` and ``ATLAS/analysis.json`` (the contract in :mod:`ffkv.analysis`), never the
model. Whatever is missing (no analysis.json, a missing block, ``null`` layers) is drawn around and named on the
page. plotly.js is embedded once; the page makes no network request and opens from disk.

    from ffkv.report import write_report
    path = write_report("atlas")                  # -> atlas/report.html
    path = write_report("atlas", out="r.html")

Several atlases on one page (`ffkv compare`): each figure with every model's curves and the paper's, and each
finding's verdict and per-third numbers per model:

    from ffkv.report import write_comparison
    path = write_comparison(["atlas-smollm2", "atlas-gemma3"], out="compare.html")

A figure as PNG (for a README), with the same headless Chromium the tests use (a comparison page too):

    python -m ffkv.report.screenshot atlas/report.html --figure fig4 -o docs/fig4.png
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    return _write(text, Path(out) if out is not None else Path(atlas_path) / "report.html", "report.html")


def build_comparison(atlases: Sequence[str | Path], out_arg: str | None = None) -> str:
    """The comparison page as a string. ``out_arg`` is the output file as the 'how to reproduce' command names it
    (None: the default)."""
    from .comparison import build

    return build(atlases, plotly_js(), out_arg)


def write_comparison(atlases: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write one HTML page comparing two or more atlases to ``out`` (default ``compare.html`` in the current
    directory) and return its path.

    Every figure merges the atlases' curves on relative depth with the paper's; a table gives, per finding, each
    model's verdict, whether it holds across models and the headline numbers per third of the layers. Atlases
    without analysis.json are drawn around and named. Raises :class:`ffkv.FfkvError` (one line, for exit code 2)
    for fewer than two atlases, an atlas given twice, a missing atlas or manifest, and the errors of
    :func:`write_report`. The ``<meta name="ffkv-scan-id">`` tag holds the atlases' scan ids, space-separated, in
    the order given."""
    text = build_comparison(atlases, None if out is None else str(out))
    return _write(text, Path("compare.html") if out is None else Path(out), "compare.html")


def _write(text: str, out: Path, name: str) -> Path:
    """Write a page atomically, with one-line errors for an output that cannot be a file."""
    if out.is_dir():
        raise FfkvError(f"--out {out} is a directory; give a file name such as {out / name}")
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


__all__ = ["FIGURE_IDS", "Figure", "ReportInputs", "build_comparison", "build_figures", "build_report", "load_inputs",
           "load_paper_reference", "write_comparison", "write_report"]
