"""PNG of a report, or of one of its figures, rendered by headless Chromium (for a README).

    python -m ffkv.report.screenshot ATLAS/report.html --figure fig4 -o docs/fig4.png
    python -m ffkv.report.screenshot ATLAS/report.html -o docs/report.png          # the whole page
    python -m ffkv.report.screenshot compare.html --figure fig9 -o docs/compare-fig9.png   # `ffkv compare`'s page
    python -m ffkv.report.screenshot compare.html --figure findings -o docs/findings.png

Needs the Python ``playwright`` package and a Chromium binary: Debian's ``chromium`` (/usr/bin/chromium, install
with ``apt-get install chromium``) is used; ``--chromium`` or $FFKV_CHROMIUM point elsewhere. Playwright's own
browser download is never used.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import FfkvError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path(explicit: str | None = None) -> str:
    path = explicit or os.environ.get("FFKV_CHROMIUM") or CHROMIUM
    if not Path(path).exists():
        raise FfkvError(f"no Chromium at {path}: apt-get install chromium, or pass --chromium PATH")
    return path


def launch(playwright, chromium: str | None = None):
    """A headless Chromium through playwright, with the flags that keep it off the network."""
    return playwright.chromium.launch(executable_path=chromium_path(chromium), args=CHROMIUM_ARGS, headless=True)


def wait_ready(page, timeout_ms: int = 60_000) -> None:
    """Wait until every figure of the report has been drawn (the page sets window.ffkvReady)."""
    page.wait_for_function("window.ffkvReady === true || !document.querySelector('script.figure-spec')",
                           timeout=timeout_ms)


def screenshot(report: str | Path, out: str | Path, figure: str | None = None, width: int = 1400,
               scale: float = 2.0, chromium: str | None = None) -> Path:
    """Render ``report`` and save a PNG of the element ``#figure`` (e.g. fig4, table1) or of the full page."""
    report, out = Path(report), Path(out)
    if not report.is_file():
        raise FfkvError(f"report {report} does not exist")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise FfkvError("screenshots need the playwright package: pip install playwright (its browser download "
                        "is not needed: Debian's chromium is used)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000}, device_scale_factor=scale)
            page.goto(report.resolve().as_uri())
            wait_ready(page)
            if figure:
                el = page.query_selector(f"#{figure}")
                if el is None:
                    ids = page.eval_on_selector_all("article[id]", "els => els.map(e => e.id)")
                    raise FfkvError(f"no figure {figure!r} in {report} (there are: {', '.join(ids)})")
                el.scroll_into_view_if_needed()
                el.screenshot(path=str(out))
            else:
                page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffkv.report.screenshot",
                                     description="PNG of an ffkv report or of one figure, via headless Chromium")
    parser.add_argument("report", help="the report's HTML file")
    parser.add_argument("--figure", "-f", default=None, help="fig2 ... fig11, table1, table2; on an `ffkv compare` "
                        "page fig2 ... fig11 or findings (default: whole page)")
    parser.add_argument("--out", "-o", required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1400, help="viewport width in CSS pixels (default 1400)")
    parser.add_argument("--scale", type=float, default=2.0, help="device pixel ratio (default 2)")
    parser.add_argument("--chromium", default=None, help=f"Chromium binary (default $FFKV_CHROMIUM or {CHROMIUM})")
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.report, args.out, args.figure, args.width, args.scale, args.chromium))
    except FfkvError as exc:
        print(f"ffkv: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
