"""`ffkv serve` end to end: the real command in a subprocess on a free localhost port, driven by headless Chromium
(Debian's /usr/bin/chromium through the Python playwright package; `make install-test` installs it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")

from server_fixtures import build_tiny_atlas, running_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _, atlas_dir = build_tiny_atlas(tmp_path_factory.getbasetemp() / "ffkv_server_tiny")
    with running_server(atlas_dir, log=tmp_path_factory.mktemp("serve") / "serve.log") as (base, _):
        yield base


def _probabilities(page) -> list[str]:
    return page.locator("#prediction-table tbody tr td:nth-child(4)").all_inner_texts()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (make install-test installs it)")
def test_browse_search_and_debug_in_chromium(server, tmp_path):
    console_errors: list[str] = []
    failed: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("request", lambda r: None if r.url.startswith(server) else failed.append(f"external {r.url}"))

            # overview
            page.goto(server + "/")
            page.wait_for_selector("#layers-table tbody tr")
            assert page.locator("#layers-table tbody tr").count() == 2
            assert page.locator("dl.kv dt").count() >= 10
            assert "[object" not in page.inner_text("main")

            # a memory page, via the jump box, then the next key
            page.fill("#jump-box", "1:3")
            page.press("#jump-box", "Enter")
            page.wait_for_url(re.compile(r"/memory/1/3$"))
            page.wait_for_selector("#face-pos table.triggers tbody tr")
            assert page.inner_text("h1") == "Layer 1 · memory 3"
            assert page.locator("#face-neg table.triggers tbody tr").count() > 0
            assert page.locator("#face-pos mark.trig").count() > 0
            assert page.locator("#similar tbody tr").count() > 0
            assert "[object" not in page.inner_text("main")
            page.click("#next")
            page.wait_for_url(re.compile(r"/memory/1/4$"))
            page.wait_for_selector("#face-pos table.triggers")
            page.screenshot(path=str(tmp_path / "memory.png"), full_page=True)

            # search: triggers containing a word, then values promoting a token
            page.goto(server + "/search")
            page.fill("#text-q", "river")
            page.press("#text-q", "Enter")
            page.wait_for_selector("#search-results table.results tbody tr")
            assert page.locator("#search-results mark.phrase").count() > 0
            page.fill("#promotes-q", "river")
            page.press("#promotes-q", "Enter")
            page.wait_for_url(re.compile(r"promotes=river"))
            page.wait_for_selector("#search-results table.results tbody tr")
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

            # prompt debugger: run a prompt, switch the top memory of the last layer off, see the prediction move
            page.goto(server + "/debug")
            page.wait_for_selector("#prediction-table")
            page.fill("#prompt", "The river flows through the old")
            page.evaluate("document.getElementById('status').textContent = ''")
            page.click("#run")
            page.wait_for_selector("#status:has-text('ran in')")
            before = _probabilities(page)
            assert len(before) == 10
            off = page.locator('details.layer[data-layer="1"] button.iv-off').first
            off.click()
            page.wait_for_selector("#interventions .ivchip")
            page.wait_for_selector("#status:has-text('ran in')")
            page.wait_for_selector("#prediction-table th:has-text('Δ')")
            after = _probabilities(page)
            assert after != before
            assert page.locator("details.layer[data-layer='1'] .badge.iv").count() == 1
            page.click("#generate")
            page.wait_for_selector("#continuation-text")
            assert "[object" not in page.inner_text("main")
            assert "1 intervention" in page.inner_text("#continuation")
            page.screenshot(path=str(tmp_path / "debugger.png"), full_page=True)

            # removing the intervention restores the original prediction
            page.evaluate("document.getElementById('status').textContent = ''")
            page.click("#clear-iv")
            page.wait_for_selector("#status:has-text('ran in')")
            assert _probabilities(page) == before
        finally:
            browser.close()
    assert (tmp_path / "debugger.png").stat().st_size > 10_000
    assert not console_errors, console_errors
    assert not failed, failed


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (make install-test installs it)")
def test_a_server_with_a_token_works_in_chromium_after_the_first_page(tmp_path_factory, tmp_path):
    """Opened once with ?token=, the browser keeps the cookie: the pages' own API calls and a model run work."""
    from server_fixtures import running_server

    _, atlas_dir = build_tiny_atlas(tmp_path_factory.getbasetemp() / "ffkv_server_tiny")
    token = "browser-token-0123456789"
    bad: list[str] = []
    with running_server(atlas_dir, "--token", token, log=tmp_path / "serve.log",
                        ready_headers={"authorization": f"Bearer {token}"}) as (base, _log):
        assert httpx.get(base + "/", timeout=30).status_code == 401
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)
                page.goto(f"{base}/search?text=river&token={token}")
                assert page.url == f"{base}/search?text=river"  # the token left the address bar
                page.wait_for_selector("#search-results table.results tbody tr")
                page.goto(base + "/debug")
                page.fill("#prompt", "The river flows through the old")
                page.click("#run")
                page.wait_for_selector("#status:has-text('ran in')")
                assert len(_probabilities(page)) == 10
            finally:
                browser.close()
    assert not bad, bad


@pytest.fixture(scope="module")
def explained_server(tmp_path_factory):
    from server_fixtures import build_explained_atlas

    _, atlas_dir = build_explained_atlas(tmp_path_factory.getbasetemp() / "ffkv_server_tiny")
    with running_server(atlas_dir, log=tmp_path_factory.mktemp("serve") / "serve.log") as (base, _):
        yield base


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (make install-test installs it)")
def test_explanations_and_concept_search_in_chromium(explained_server, tmp_path):
    """A memory page shows each face's description, patterns and scores; a concept search from the search form
    (with a minimum score) lists described memories."""
    server = explained_server
    memory = next(r for r in httpx.get(server + "/api/search", params={"concept": "the", "limit": 200},
                                       timeout=60).json()["results"] if r["kind"] != "none")
    bad: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda m: bad.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: bad.append(str(e)))
            page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)

            page.goto(f"{server}/memory/{memory['layer']}/{memory['key']}")
            panel = page.locator(f"#face-{memory['face']} .explanation")
            panel.wait_for()
            assert panel.locator("p.description .text").inner_text() == memory["description"]
            assert panel.locator(f".badge.kind-{memory['kind']}").count() >= 1
            assert panel.locator("ul.patterns li").count() >= 1
            assert panel.locator("table.scores tbody tr").count() == 4
            assert page.locator(f"#face-{memory['face']} table.triggers .badge.kind").count() >= 1  # covered triggers
            assert page.locator("#explanations-missing").count() == 0
            assert "[object" not in page.inner_text("main") and "null" not in page.inner_text("main")
            page.screenshot(path=str(tmp_path / "memory.png"), full_page=True)

            page.goto(server + "/search")
            page.fill("#concept-q", "the")
            page.fill("#min-sim-corr", "0.3")
            page.press("#concept-q", "Enter")
            page.wait_for_url(re.compile(r"concept=the"))
            page.wait_for_selector("#concept-results tbody tr")
            descriptions = page.locator("#concept-results td.description").all_inner_texts()
            assert descriptions and all(d.strip() for d in descriptions)
            assert "pass sim. corr. ≥ 0.3" in page.inner_text("#search-results")
            sims = [float(x) for x in page.locator("#concept-results tbody tr td:nth-child(6)").all_inner_texts()]
            assert all(s >= 0.3 for s in sims)
            page.screenshot(path=str(tmp_path / "concept.png"), full_page=True)

            # text search lists the explanations that mention the phrase
            page.fill("#text-q", "ends with")
            page.press("#text-q", "Enter")
            page.wait_for_selector("#description-results tbody tr")
            assert page.locator("#description-results mark.phrase").count() > 0
        finally:
            browser.close()
    assert not bad, bad


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (make install-test installs it)")
def test_a_memory_page_says_when_explanations_are_missing(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server + "/memory/1/3")
            page.wait_for_selector("#face-pos table.triggers tbody tr")
            assert "ffkv explain" in page.inner_text("#explanations-missing")
            assert page.locator(".explanation").count() == 0
        finally:
            browser.close()
