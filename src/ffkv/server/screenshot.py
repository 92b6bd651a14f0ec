"""PNGs of the web app for a README: a memory page and the prompt debugger with one memory switched off.

    python -m ffkv.server.screenshot ATLAS --memory 15:929 --prompt "The capital of France is" -o docs/

Starts `ffkv serve ATLAS` on a free loopback port, drives Debian's Chromium with playwright, stops the server.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..report.screenshot import launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ffkv serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("ffkv serve did not become ready in time")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas")
    ap.add_argument("--memory", default=None, help="LAYER:KEY of the memory page (default: the overview's jump)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--off-layer", type=int, default=None, help="layer whose top memory is switched off "
                    "(default: the last)")
    ap.add_argument("-o", "--out", default="docs", help="directory for memory.png and debugger.png")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ffkv", "serve", args.atlas, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(base, proc)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = launch(p)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(120_000)
                layer, key = (args.memory or "0:0").split(":")
                page.goto(f"{base}/memory/{int(layer)}/{int(key)}")
                page.wait_for_selector("#face-pos table.triggers tbody tr")
                page.screenshot(path=str(out / "memory.png"), full_page=True)

                page.goto(base + "/debug")
                page.wait_for_selector("#prediction-table")
                page.fill("#prompt", args.prompt)
                page.evaluate("document.getElementById('status').textContent = ''")
                page.click("#run")
                page.wait_for_selector("#status:has-text('ran in')")
                layers = page.locator("details.layer").evaluate_all("els => els.map(e => e.dataset.layer)")
                off_layer = str(args.off_layer) if args.off_layer is not None else layers[-1]
                page.evaluate("document.getElementById('status').textContent = ''")
                page.locator(f'details.layer[data-layer="{off_layer}"] button.iv-off').first.click()
                page.wait_for_selector("#status:has-text('ran in')")
                page.wait_for_selector("#prediction-table th:has-text('Δ')")
                page.evaluate("window.scrollTo(0, 0)")  # the prompt and the prediction table with its Δ column
                page.screenshot(path=str(out / "debugger.png"), full_page=False)
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {out / 'memory.png'} and {out / 'debugger.png'}")


if __name__ == "__main__":
    main()
