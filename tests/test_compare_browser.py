"""The `ffkv compare` page in a real browser (Debian's headless Chromium through playwright, as
test_report_browser.py): opened from disk, every figure draws every model's traces, with no console error and no
network request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

from test_report import make_atlas  # noqa: E402
from test_report_browser import _open  # noqa: E402

from ffkv.report import FIGURE_IDS, write_comparison  # noqa: E402
from ffkv.report.screenshot import CHROMIUM, launch  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (make install-test installs it)")

FIGURE_STATE = """
() => Array.from(document.querySelectorAll('article.figure')).map(a => {
  const plot = a.querySelector('.plot');
  const data = (plot && plot.data) || [];
  return {
    id: a.id, state: a.dataset.state,
    traces: data.length, rendered: plot ? plot.getAttribute('data-rendered') : null,
    models: Array.from(new Set(data.filter(t => t.meta && t.meta.role !== 'paper').map(t => t.meta.model))).sort(),
    paper: data.filter(t => t.meta && t.meta.role === 'paper').length,
    marks: plot ? plot.querySelectorAll('.scatterlayer path.js-line, .barlayer .point path').length : 0,
  };
})
"""


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-browser")
    atlases = [make_atlas(root / "llama", n_layers=12, signed=True, name="org/tiny-llama"),
               make_atlas(root / "opt", n_layers=6, signed=False, name="org/tiny-opt"),
               make_atlas(root / "bare", None, n_layers=8, signed=False, name="org/tiny-bare")]
    return write_comparison(atlases, root / "compare.html")


def test_every_figure_draws_every_model(comparison):
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page, errors, requests = _open(browser, comparison)
            state = page.evaluate(FIGURE_STATE)
            assert sorted(f["id"] for f in state) == sorted(FIGURE_IDS)
            assert page.locator(".js-plotly-plot").count() == len(FIGURE_IDS)
            for f in state:
                assert f["state"] == "drawn" and f["rendered"] == str(f["traces"]), f
                assert f["models"] == [0, 1], f  # the atlas without analysis.json draws nothing
                assert f["marks"] > 0 and (f["paper"] > 0 or f["id"] == "causal"), f
            # the findings table: a group per figure, a column group per model and the paper
            assert page.locator("table.findings tr.finding-head").count() == len(FIGURE_IDS)
            assert page.locator("table.findings thead th[data-column]").count() == 4
            assert page.locator("#findings").is_visible()
            assert page.locator(".banner.missing").is_visible()
            assert errors == [], errors
            assert requests == [], requests
        finally:
            browser.close()


def test_screenshot_of_a_comparison_figure(comparison, tmp_path):
    png = tmp_path / "fig9.png"
    run = subprocess.run([sys.executable, "-m", "ffkv.report.screenshot", str(comparison), "--figure", "fig9", "-o",
                          str(png), "--scale", "1"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
