"""The report in a real browser: Debian's headless Chromium (/usr/bin/chromium) through the Python playwright package
(`make install-test` installs both; playwright's own browser download is never used). Opened from disk (file://),
it must draw every figure with data, log no console error and make no network request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

from test_report import make_atlas  # noqa: E402

from ffkv.report import FIGURE_IDS, write_report  # noqa: E402
from ffkv.report.screenshot import CHROMIUM, launch, wait_ready  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (make install-test installs it)")

# per figure: number of plotly traces, and of drawn marks (line paths, bar paths) with data
FIGURE_STATE = """
() => Array.from(document.querySelectorAll('article.figure[data-state="drawn"]')).map(a => {
  const plot = a.querySelector('.plot');
  const data = plot.data || [];
  return {
    id: a.id,
    traces: data.length,
    oursWithData: data.filter(t => t.meta && t.meta.role !== 'paper' && (t.y || []).some(v => v !== null)).length,
    paper: data.filter(t => t.meta && t.meta.role === 'paper').length,
    lines: plot.querySelectorAll('.scatterlayer path.js-line').length,
    bars: plot.querySelectorAll('.barlayer .point path').length,
    legend: plot.querySelectorAll('.legend .traces').length,
    width: plot.getBoundingClientRect().width,
  };
})
"""


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


def _open(browser, path: Path):
    """Open a report from disk; return (page, console errors, failed or external requests)."""
    errors: list[str] = []
    requests: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: requests.append(f"failed {r.url}: {r.failure}"))
    page.on("request", lambda r: None if r.url == path.resolve().as_uri() else requests.append(f"request {r.url}"))
    page.goto(path.resolve().as_uri())
    wait_ready(page)
    return page, errors, requests


def test_full_report_renders_every_figure(browser, tmp_path_factory):
    atlas = make_atlas(tmp_path_factory.mktemp("browser") / "atlas")
    path = write_report(atlas)
    page, errors, requests = _open(browser, path)
    try:
        state = {f["id"]: f for f in page.evaluate(FIGURE_STATE)}
        assert sorted(state) == sorted(FIGURE_IDS)
        for fid, f in state.items():
            assert f["traces"] > 0 and f["oursWithData"] > 0, f
            # Fig C1, the causal check, tests what the paper only inferred: it has nothing of the paper to draw
            assert f["paper"] > 0 or fid == "causal", f"{fid}: the paper is not drawn beside ours"
            assert f["lines"] + f["bars"] > 0, f"{fid}: nothing drawn in the SVG: {f}"
            assert f["legend"] > 0 and f["width"] > 300, f
        assert state["fig2"]["bars"] >= 12 * 4 and state["fig11"]["bars"] >= 12 * 4  # stacked bars per layer
        # the dashed paper curves really are dashed in the SVG
        dashed = page.evaluate("() => Array.from(document.querySelectorAll('#plot-fig4 .scatterlayer path.js-line'))"
                               ".filter(p => (p.style.strokeDasharray || '').length > 0).length")
        assert dashed >= 2
        # Fig 8 draws one line per active rule of the sweep; Figs 7 and 10 their 25–75% band as a filled area
        rules = page.evaluate("() => document.getElementById('plot-fig8').data.filter(t => t.name.startsWith("
                              "'ours: no single memory matches')).length")
        assert rules == 5 and state["fig8"]["lines"] >= rules + 2 + 3, state["fig8"]
        for fid in ("fig7", "fig8", "fig9", "fig10", "fig11", "fig11b"):  # 95% intervals as error bars per layer
            bars = page.evaluate(f"() => document.querySelectorAll('#plot-{fid} path.yerror').length")
            assert bars >= 12, f"{fid}: {bars} error bars drawn"
        for fid in ("fig7", "fig10"):
            fills = page.evaluate(f"() => Array.from(document.querySelectorAll('#plot-{fid} .scatterlayer "
                                  "path.js-fill')).filter(p => (p.getAttribute('d') || '').length > 10).length")
            assert fills >= 1, f"{fid}: the quartile band is not drawn"
        # Fig E1, the explanation scores: per face 2 scores + 4 baselines + Neuron-to-Graph's dotted F1 curve
        explain = state["explain"]
        assert explain["traces"] == 2 * 7 and explain["paper"] == 2 and explain["lines"] >= 2 * 7, explain
        drawn = page.evaluate("() => Array.from(document.querySelectorAll('#plot-explain .scatterlayer path.js-line'))"
                              ".filter(p => (p.getAttribute('d') || '').length > 10).length")
        assert drawn >= 2 * 7
        dotted = page.evaluate("() => Array.from(document.querySelectorAll('#plot-explain .scatterlayer path.js-line'))"
                               ".filter(p => (p.style.strokeDasharray || '').length > 0).length")
        assert dotted == 2  # N2G on each face's panel
        assert page.locator("#plot-explain").get_attribute("data-rendered") == "14"
        assert "N2G" in page.locator("#explain .verdict").inner_text()
        assert page.locator("#plot-fig2 .scatterlayer path.js-line").count() >= 2 * 2  # coverage + key-share line
        # the best-explained memories and Table 1's one-line explanations
        assert page.locator("#best table.best tbody tr").count() == 20
        assert page.locator("#table1 td.desc").first.is_visible()
        # hover works (plotly's hover layer shows our text)
        box = page.locator("#plot-fig9 .nsewdrag").first.bounding_box()
        assert box is not None
        page.locator("#table1 mark.trig").first.wait_for()
        assert page.locator("#table2 table.values tbody tr").count() >= 10
        assert page.locator(".verdict").count() == len(FIGURE_IDS)
        shot = Path(os.environ.get("FFKV_REPORT_SCREENSHOT", tmp_path_factory.getbasetemp() / "report_full.png"))
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 50_000
        assert errors == [], errors
        assert requests == [], requests
    finally:
        page.close()


def test_partial_report_shows_notes_and_no_errors(browser, tmp_path):
    path = write_report(make_atlas(tmp_path / "atlas", "partial"))
    page, errors, requests = _open(browser, path)
    try:
        state = {f["id"]: f for f in page.evaluate(FIGURE_STATE)}
        assert "fig3" not in state and "fig11" not in state and "fig4" in state
        for fid in ("fig3", "fig11", "table1"):
            note = page.locator(f'[data-missing="{fid}"]')
            assert note.is_visible(), fid
        assert "not run" in page.locator('[data-missing="fig3"]').inner_text()
        assert page.locator(".banner.partial").is_visible()
        assert errors == [] and requests == [], (errors, requests)
    finally:
        page.close()
    # no analysis.json at all: the page still opens cleanly, every figure says why it is missing
    bare = write_report(make_atlas(tmp_path / "bare", None))
    page, errors, requests = _open(browser, bare)
    try:
        assert page.locator("article.figure .missing").count() == len(FIGURE_IDS)
        assert errors == [] and requests == [], (errors, requests)
    finally:
        page.close()


def test_screenshot_command(tmp_path):
    """The documented README command: python -m ffkv.report.screenshot REPORT --figure fig4 -o PNG."""
    path = write_report(make_atlas(tmp_path / "atlas", signed=False))
    png = tmp_path / "docs" / "fig4.png"
    run = subprocess.run([sys.executable, "-m", "ffkv.report.screenshot", str(path), "--figure", "fig4", "-o",
                          str(png), "--scale", "1"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width = int.from_bytes(data[16:20], "big")
    assert 400 < width < 1400  # the figure's card, not the whole page
    run = subprocess.run([sys.executable, "-m", "ffkv.report.screenshot", str(path), "--figure", "fig99", "-o",
                          str(tmp_path / "x.png")], capture_output=True, text=True, timeout=180)
    assert run.returncode == 2 and "no figure 'fig99'" in run.stderr
