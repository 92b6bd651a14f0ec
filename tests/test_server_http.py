"""`ffkv serve` over real HTTP: the command in a subprocess (uvicorn) on a loopback address other than
127.0.0.1, driven with httpx."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from server_fixtures import build_tiny_atlas, running_server  # noqa: E402

from ffkv.server.app import MAX_BODY_BYTES  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _, atlas_dir = build_tiny_atlas(tmp_path_factory.getbasetemp() / "ffkv_server_tiny")
    with running_server(atlas_dir, host="127.0.0.2", log=tmp_path_factory.mktemp("serve") / "serve.log") as (base, _):
        yield base


def test_serve_on_another_loopback_address_answers(server):
    """127.0.0.0/8 is loopback: a server bound to 127.0.0.2 answers requests addressed to it, and only those."""
    assert server.startswith("http://127.0.0.2:")
    r = httpx.get(server + "/api/overview", timeout=30)
    assert r.status_code == 200 and r.json()["d_ff"] == 64
    assert httpx.get(server + "/api/health", headers={"host": "attacker.example"}, timeout=30).status_code == 400


def test_a_streamed_body_is_cut_at_the_limit(server):
    """No Content-Length (chunked transfer): the server stops at MAX_BODY_BYTES, whatever follows."""
    sent = []

    def chunks():
        for _ in range(64):  # 4 MiB in all, if it were all read
            sent.append(1)
            yield b"x" * 65536

    try:
        r = httpx.post(server + "/api/run", content=chunks(), headers={"content-type": "application/json"},
                       timeout=30)
    except httpx.HTTPError:  # the server may close the connection before the client has sent everything
        r = None
    if r is not None:
        assert r.status_code == 413 and f"{MAX_BODY_BYTES} bytes" in r.json()["error"]
    ok = httpx.post(server + "/api/run", json={"prompt": "The river flows"}, timeout=60)
    assert ok.status_code == 200  # the server is still there and answers normally


def test_a_large_declared_body_is_refused(server):
    r = httpx.post(server + "/api/run", content=b"{" + b" " * MAX_BODY_BYTES + b"}",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]
