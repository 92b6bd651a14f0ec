"""The scan on tiny models of every architecture, against brute force (each unit run alone)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import BOS_ARCHS, DOCUMENTS
from helpers import brute_force_coefficients, brute_force_topk, unit_coefficients

import ffkv
from ffkv.arch import ARCHITECTURES
from ffkv.errors import FfkvError
from ffkv.topk import MemoryStats

ARCHS = sorted(ARCHITECTURES)
# GPT-Neo computes attention in float32 even in a float64 model, so a batched and a lone forward may differ
# in the last float32 bit; every other architecture is compared exactly.
SCORE_RTOL = {"gpt_neo": 1e-6}
BASE = ffkv.ScanConfig(dtype="float64", top_k=6, max_length=64, batch_tokens=200, max_batch=8, value_top=12,
                       checkpoint_every=1e9)


def _layer_files_equal(a: ffkv.Atlas, b: ffkv.Atlas, other_batches: bool = False, score_rtol: float = 0.0) -> None:
    """Every tensor of every layer file identical. ``other_batches``: the two scans used different batch
    plans, so the exact sums (of a float32 sum per batch, rounded once) may differ by float32 rounding;
    ``score_rtol``: for models whose forward is not batch-invariant in float64."""
    assert a.layers == b.layers
    for layer in a.layers:
        ta, tb = a.layer_tensors(layer), b.layer_tensors(layer)
        assert sorted(ta) == sorted(tb)
        largest = torch.maximum(ta["stat_max"].abs(), ta["stat_min"].abs()).double()
        bound = {"stat_sum_limbs": largest, "stat_sumsq_limbs": largest**2}
        sums = {}
        for t in (ta, tb):
            stats = MemoryStats(t["stat_sum_limbs"].shape[0])
            stats.load_state_dict({name: t[f"stat_{name}"] for name in MemoryStats.FIELDS})
            sums.setdefault("stat_sum_limbs", []).append(stats.sum.value())
            sums.setdefault("stat_sumsq_limbs", []).append(stats.sumsq.value())
        for name in ta:
            assert ta[name].dtype == tb[name].dtype, name
            if other_batches and name in bound:
                # a relative 1e-6 of the largest possible |sum|
                allowed = 1e-6 * int(ta["stat_count"]) * bound[name] + 1e-12
                assert ((sums[name][0] - sums[name][1]).abs() <= allowed).all(), (layer, name)
            elif score_rtol and ta[name].is_floating_point() and not name.startswith("value_"):
                torch.testing.assert_close(ta[name], tb[name], rtol=score_rtol, atol=1e-7, equal_nan=True)
            else:
                assert torch.equal(ta[name].nan_to_num(), tb[name].nan_to_num()), (layer, name)
                assert torch.equal(ta[name].isnan(), tb[name].isnan()), (layer, name)


@pytest.fixture(scope="session")
def standard_scan(tiny_model, corpus_jsonl, tmp_path_factory):
    """arch -> (atlas, loaded model) of one scan with BASE settings over the jsonl corpus (all layers)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            loaded = tiny_model(arch)
            out = tmp_path_factory.mktemp(f"atlas-{arch}") / "atlas"
            atlas = ffkv.scan(loaded, str(corpus_jsonl), out, BASE, progress=False)
            cache[arch] = (atlas, loaded)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def brute_force(standard_scan):
    """arch -> (layer -> coefficients [N, d_ff] float64, positions [N]) over every scored position."""
    cache = {}

    def get(arch):
        if arch not in cache:
            atlas, loaded = standard_scan(arch)
            units = np.arange(atlas.store.n_units)
            cache[arch] = brute_force_coefficients(loaded, atlas.store, units, atlas.layers)
        return cache[arch]

    return get


def _assert_topk_equals_brute_force(atlas, coefficients, positions, k, signed):
    rtol = SCORE_RTOL.get(atlas.manifest["model"]["architecture"], 0.0)
    assert atlas.faces == (["pos", "neg"] if signed else ["pos"])
    for layer in atlas.layers:
        t = atlas.layer_tensors(layer)
        for face in ("pos", "neg"):
            if face not in atlas.faces:
                assert f"{face}_scores" not in t
                continue
            want_v, want_p = brute_force_topk(coefficients[layer], positions, k, largest=face == "pos")
            assert torch.equal(t[f"{face}_positions"], want_p), (layer, face)
            # scores are float32 copies of the float64 coefficients
            torch.testing.assert_close(t[f"{face}_scores"], want_v, rtol=rtol, atol=rtol / 10, equal_nan=True,
                                       msg=f"layer {layer} face {face}")


@pytest.mark.parametrize("arch", ARCHS)
def test_scan_topk_equals_brute_force(arch, standard_scan, brute_force):
    atlas, loaded = standard_scan(arch)
    coefficients, positions = brute_force(arch)
    assert atlas.layers == list(range(loaded.parts.n_layers))
    assert atlas.manifest["model"]["architecture"] == arch
    # the special prefix (BOS) is fed but never scored
    n_special = (atlas.store.n_special > 0).any()
    assert n_special == (arch in BOS_ARCHS)
    assert len(positions) == int((atlas.store.length - atlas.store.n_special).sum())
    assert not np.isin(atlas.store.offset[atlas.store.n_special > 0], positions.numpy()).any()
    assert atlas.manifest["result"]["batches"] >= 3  # several batches were merged
    _assert_topk_equals_brute_force(atlas, coefficients, positions, BASE.top_k, loaded.parts.signed)


@pytest.mark.parametrize("arch", ARCHS)
def test_scan_stats_equal_brute_force(arch, standard_scan, brute_force):
    atlas, _ = standard_scan(arch)
    coefficients, positions = brute_force(arch)
    for layer in atlas.layers:
        x = coefficients[layer].to(torch.float32).double().numpy()
        s = atlas.stats(layer)
        assert s["count"] == len(positions)
        np.testing.assert_array_equal(s["frac_positive"], (x > 0).mean(0))
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s["mean_square"], (x**2).mean(0), rtol=1e-6, atol=1e-6)
        rtol = SCORE_RTOL.get(arch, 0.0)
        np.testing.assert_allclose(s["min"], x.min(0).astype(np.float32), rtol=rtol, atol=rtol / 10)
        np.testing.assert_allclose(s["max"], x.max(0).astype(np.float32), rtol=rtol, atol=rtol / 10)
        t = atlas.layer_tensors(layer)
        assert int(t["stat_count"]) == len(positions)
        assert np.array_equal(t["stat_count_positive"].numpy(), (x > 0).sum(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_scan_does_not_depend_on_batching(arch, standard_scan, corpus_jsonl, tmp_path):
    atlas, loaded = standard_scan(arch)
    config = replace(BASE, batch_tokens=64, max_batch=3)
    other = ffkv.scan(loaded, str(corpus_jsonl), tmp_path / "atlas", config, progress=False)
    assert other.manifest["result"]["batches"] > atlas.manifest["result"]["batches"]
    _layer_files_equal(atlas, other, other_batches=True, score_rtol=SCORE_RTOL.get(arch, 0.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_document_units_are_windows_of_one_document(arch, tiny_model, corpus_jsonl, tmp_path):
    loaded = tiny_model(arch)
    max_length = 16
    config = replace(BASE, unit="document", max_length=max_length, layers="0", top_k=3)
    atlas = ffkv.scan(loaded, str(corpus_jsonl), tmp_path / "atlas", config, progress=False)
    store = atlas.store
    prefix = [0] if arch in BOS_ARCHS else []  # the tiny tokenizer's BOS is id 0
    assert (store.length <= max_length).all()
    assert (store.n_special == len(prefix)).all()
    docs = store.columns["doc"]
    assert sorted(set(docs.tolist())) == list(range(len(DOCUMENTS)))
    multi = 0
    for d, doc in enumerate(DOCUMENTS):
        units = np.flatnonzero(docs == d)
        windows = store.columns["window"][units]
        assert sorted(windows.tolist()) == list(range(len(units)))
        units = units[np.argsort(windows)]
        pieces = [store.unit_tokens(u).tolist() for u in units]
        assert all(p[:len(prefix)] == prefix for p in pieces)
        assert all(len(p) == max_length for p in pieces[:-1])  # only the last window is short
        joined = [t for p in pieces for t in p[len(prefix):]]
        assert joined == loaded.tokenizer(doc["text"], add_special_tokens=False).input_ids
        assert all(store.columns["title"][u] == doc["title"] for u in units)
        multi += len(units) > 1
    assert multi >= len(DOCUMENTS) // 2
    coefficients, positions = brute_force_coefficients(loaded, store, np.arange(store.n_units), [0])
    _assert_topk_equals_brute_force(atlas, coefficients, positions, 3, loaded.parts.signed)


@pytest.mark.parametrize("arch", ARCHS)
def test_max_tokens_budget(arch, tiny_model, corpus_jsonl, tmp_path):
    loaded = tiny_model(arch)
    budget = 150
    runs = {}
    for seed in (0, 1):
        config = replace(BASE, max_tokens=budget, seed=seed, layers="1", top_k=4)
        atlas = ffkv.scan(loaded, str(corpus_jsonl), tmp_path / f"atlas{seed}", config, progress=False)
        store = atlas.store
        units = np.load(atlas.path / "scanned_units.npy")
        assert 0 < len(units) < store.n_units
        assert store.length[units].sum() <= budget
        scored = int((store.length[units] - store.n_special[units]).sum())
        assert atlas.manifest["result"]["units_scanned"] == len(units)
        assert atlas.manifest["result"]["tokens_scanned"] == scored
        assert atlas.stats(1)["count"] == scored
        coefficients, positions = brute_force_coefficients(loaded, store, units, [1])
        _assert_topk_equals_brute_force(atlas, coefficients, positions, 4, loaded.parts.signed)
        runs[seed] = units
    assert not np.array_equal(runs[0], runs[1])  # the sample depends on the seed


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_top_k_larger_than_positions_keeps_what_exists(arch, tiny_model, tmp_path, capsys):
    loaded = tiny_model(arch)
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("It rained. The cat sat.\n")
    config = replace(BASE, top_k=100, layers="0,2")
    atlas = ffkv.scan(loaded, str(corpus), tmp_path / "atlas", config, progress=False)
    captured = capsys.readouterr()
    assert "warning" in (captured.out + captured.err).lower()
    store = atlas.store
    scored = np.concatenate([np.arange(o + s, o + n) for o, s, n in zip(store.offset, store.n_special,
                                                                        store.length, strict=True)])
    assert 0 < len(scored) < 100
    for layer in (0, 2):
        t = atlas.layer_tensors(layer)
        for face in atlas.faces:
            p, v = t[f"{face}_positions"], t[f"{face}_scores"]
            assert (p[:, len(scored):] == -1).all() and v[:, len(scored):].isnan().all()
            assert not v[:, :len(scored)].isnan().any()
            for row in p[:, :len(scored)].numpy():  # every scored position is kept by every memory
                assert np.array_equal(np.sort(row), scored)
        assert len(atlas.triggers(layer, 0, "pos")) == len(scored)


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_gives_identical_atlas(arch, standard_scan, corpus_jsonl, tmp_path):
    atlas, loaded = standard_scan(arch)
    out = tmp_path / "atlas"
    assert ffkv.scan(loaded, str(corpus_jsonl), out, BASE, progress=False, stop_after_batches=2) is None
    assert not (out / "manifest.json").exists()
    assert any((out / "checkpoint").iterdir())
    with pytest.raises(FfkvError, match="unfinished"):
        ffkv.scan(loaded, str(corpus_jsonl), out, BASE, progress=False)
    with pytest.raises(FfkvError, match="resume"):
        ffkv.Atlas.load(out)
    with pytest.raises(FfkvError, match="other settings"):
        ffkv.scan(loaded, str(corpus_jsonl), out, replace(BASE, top_k=7), resume=True, progress=False)
    # resume, stop again, resume to the end
    assert ffkv.scan(loaded, str(corpus_jsonl), out, BASE, resume=True, progress=False,
                     stop_after_batches=1) is None
    resumed = ffkv.scan(loaded, str(corpus_jsonl), out, BASE, resume=True, progress=False)
    assert resumed is not None and (out / "manifest.json").exists()
    assert not (out / "checkpoint").exists()
    _layer_files_equal(atlas, resumed)
    for key in ("units_scanned", "tokens_scanned", "positions_total", "batches"):
        assert resumed.manifest["result"][key] == atlas.manifest["result"][key]
    assert (np.load(out / "scanned_units.npy") == np.load(atlas.path / "scanned_units.npy")).all()


def test_finished_atlas_is_not_overwritten_without_force(standard_scan, corpus_jsonl, tmp_path):
    atlas, loaded = standard_scan("gpt2")
    out = tmp_path / "atlas"
    shutil.copytree(atlas.path, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(FfkvError, match="--force"):
        ffkv.scan(loaded, str(corpus_jsonl), out, BASE, progress=False)
    assert (out / "manifest.json").read_text() == before
    again = ffkv.scan(loaded, str(corpus_jsonl), out, replace(BASE, top_k=2), force=True, progress=False)
    assert again.layer_tensors(0)["pos_scores"].shape == (loaded.parts.d_ff, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_atlas_of_another_model_is_refused(arch, standard_scan, tiny_model):
    atlas, loaded = standard_scan(arch)
    other = tiny_model(ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)])
    assert ffkv.Atlas.load(atlas.path, model=loaded).manifest == atlas.manifest
    with pytest.raises(FfkvError, match="was made with model"):
        ffkv.Atlas.load(atlas.path, model=other)


@pytest.mark.parametrize("arch", ARCHS)
def test_show_json(arch, standard_scan):
    atlas, loaded = standard_scan(arch)
    store = atlas.store
    parts = loaded.parts
    unembed = loaded.model.get_output_embeddings().weight.detach()
    n = 4
    for layer in atlas.layers:
        logits = parts.values(layer).detach() @ unembed.T  # [d_ff, vocab], float64
        for key in (0, parts.d_ff // 2, parts.d_ff - 1):
            for face in atlas.faces:
                doc = json.loads(json.dumps(atlas.show(layer, key, face, n=n)))
                assert set(doc) == {"layer", "key", "face", "triggers", "value"}
                assert (doc["layer"], doc["key"], doc["face"]) == (layer, key, face)
                assert len(doc["triggers"]) == n
                scores = atlas.layer_tensors(layer)[f"{face}_scores"][key]
                for rank, t in enumerate(doc["triggers"]):
                    assert set(t) == {"rank", "score", "unit", "position", "input_ids", "text",
                                      "next_token_id", "next_token"}
                    assert t["rank"] == rank and t["score"] == float(scores[rank])
                    unit, pos = t["unit"], t["position"]
                    start, end = int(store.offset[unit]), int(store.offset[unit] + store.length[unit])
                    assert start + int(store.n_special[unit]) <= pos < end
                    assert t["input_ids"] == [int(x) for x in store.tokens[start: pos + 1]]
                    # the prefix alone reproduces the score at its last position
                    alone = unit_coefficients(loaded, t["input_ids"], [layer])[layer][-1, key]
                    assert abs(float(alone) - t["score"]) <= 1e-6 * max(1.0, abs(t["score"]))
                    if pos + 1 < end:
                        assert t["next_token_id"] == int(store.tokens[pos + 1])
                        assert t["next_token"] == loaded.tokenizer.decode([t["next_token_id"]])
                    else:
                        assert t["next_token_id"] is None and t["next_token"] is None
                    # the text is the scored prefix of the unit's document
                    doc_text = DOCUMENTS[int(store.columns["doc"][unit])]["text"]
                    assert t["text"] and t["text"] in doc_text
                    skip = int(store.n_special[unit])
                    assert t["text"] == loaded.tokenizer.decode(t["input_ids"][skip:])
                if face == "pos":
                    assert [t["score"] for t in doc["triggers"]] == sorted((t["score"] for t in doc["triggers"]),
                                                                           reverse=True)
                else:
                    assert [t["score"] for t in doc["triggers"]] == sorted(t["score"] for t in doc["triggers"])
                value = doc["value"]
                assert set(value) == {"top_tokens", "top_token_ids", "top_logits"}
                signed = logits[key] if face == "pos" else -logits[key]
                top = signed.topk(n)
                assert value["top_token_ids"] == top.indices.tolist()
                np.testing.assert_allclose(value["top_logits"], top.values.numpy(), rtol=0, atol=1e-4)
                assert value["top_tokens"] == [loaded.tokenizer.decode([i]) for i in top.indices.tolist()]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trigger_at_unit_end_and_metadata(arch, standard_scan):
    atlas, loaded = standard_scan(arch)
    store = atlas.store
    for unit in (0, store.n_units - 1):
        last = int(store.offset[unit] + store.length[unit] - 1)
        t = atlas.trigger_at(last)
        assert t.unit == unit and t.next_token_id is None and t.next_token is None
        doc = DOCUMENTS[int(store.columns["doc"][unit])]
        assert (t.title, t.topic) == (doc["title"], doc["topic"])
        assert t.context + t.trigger_token == t.text
        first = int(store.offset[unit] + store.n_special[unit])
        t = atlas.trigger_at(first)
        assert t.context == "" and t.next_token_id == int(store.tokens[first + 1])


def test_show_rejects_out_of_range_queries(standard_scan):
    atlas, loaded = standard_scan("opt")
    with pytest.raises(FfkvError, match="layer"):
        atlas.show(99, 0)
    with pytest.raises(FfkvError, match="key"):
        atlas.show(0, loaded.parts.d_ff)
    with pytest.raises(FfkvError, match="face"):
        atlas.show(0, 0, "neg")  # ReLU: no negative face
