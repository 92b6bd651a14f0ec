"""The real embedded default model (SmolLM2-135M-Instruct) on a small corpus slice, against plain forwards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DOCUMENTS
from helpers import brute_force_coefficients, unit_coefficients

import ffkv

pytestmark = pytest.mark.slow

LAYERS = [0, 15, 29]


@pytest.fixture(scope="module")
def default_scan(tmp_path_factory):
    loaded = ffkv.load_model("default")
    corpus = tmp_path_factory.mktemp("integration") / "slice.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DOCUMENTS) + "\n")
    config = ffkv.ScanConfig(model="default", corpus=str(corpus), layers=",".join(map(str, LAYERS)), top_k=5,
                             batch_tokens=1024, value_top=10)
    atlas = ffkv.scan(loaded, str(corpus), tmp_path_factory.mktemp("integration") / "atlas", config, progress=False)
    return loaded, atlas


def test_default_model_is_the_embedded_smollm2(default_scan):
    loaded, atlas = default_scan
    m = atlas.manifest["model"]
    assert (m["architecture"], m["n_layers"], m["d_model"], m["d_ff"]) == ("llama", 30, 576, 1536)
    assert m["gated"] and m["signed"] and atlas.faces == ["pos", "neg"]
    assert atlas.layers == LAYERS
    assert loaded.model.dtype == torch.float32
    assert atlas.manifest["result"]["tokens_scanned"] == atlas.stats(0)["count"] > 300


def test_trigger_scores_reproduce_with_a_lone_forward(default_scan):
    loaded, atlas = default_scan
    checked = 0
    for layer in LAYERS:
        for key in (0, 777, 1535):
            for face in atlas.faces:
                for t in atlas.triggers(layer, key, face, n=2):
                    alone = unit_coefficients(loaded, t.input_ids, [layer])[layer][-1, key]
                    np.testing.assert_allclose(float(alone), t.score, rtol=1e-4, atol=1e-5)
                    checked += 1
    assert checked == len(LAYERS) * 3 * 2 * 2


def test_top1_trigger_is_the_maximum_of_a_plain_forward(default_scan):
    loaded, atlas = default_scan
    store = atlas.store
    units = np.load(atlas.path / "scanned_units.npy")
    coefficients, positions = brute_force_coefficients(loaded, store, units, LAYERS)
    for layer in LAYERS:
        c = coefficients[layer].to(torch.float32)  # [N, d_ff]
        t = atlas.layer_tensors(layer)
        for face, extreme in (("pos", c.max(0)), ("neg", c.min(0))):
            top_scores, top_positions = t[f"{face}_scores"][:, 0], t[f"{face}_positions"][:, 0]
            torch.testing.assert_close(top_scores, extreme.values, rtol=1e-4, atol=1e-4)
            # same position wherever the runner-up is not within float32 noise of the winner
            ordered = c.sort(0, descending=face == "pos").values
            gap = (ordered[0] - ordered[1]).abs()
            clear = gap > 1e-4 * ordered[0].abs() + 1e-4
            assert clear.float().mean() > 0.9
            assert torch.equal(top_positions[clear], positions[extreme.indices][clear])
        s = atlas.stats(layer)
        assert s["count"] == len(positions)
        np.testing.assert_allclose(s["mean"], c.double().mean(0).numpy(), rtol=1e-3, atol=1e-4)


def test_default_corpus_loads_offline_from_the_cached_wheel():
    corpus = ffkv.load_corpus("default")
    assert len(corpus.documents) > 10_000
    assert all(d.text.strip() for d in corpus.documents)
    assert sum(bool(d.title) for d in corpus.documents) > 0.99 * len(corpus.documents)


def test_analyze_and_report_on_a_real_atlas(tmp_path):
    """`ffkv analyze` + `ffkv report` end to end on a small atlas of the embedded model over the default
    corpus (two layers, small sizes): the analysis.json contract and sane values."""
    from ffkv.analysis.run import AnalyzeConfig, analyze
    from ffkv.report import write_report

    loaded = ffkv.load_model("default")
    config = ffkv.ScanConfig(max_tokens=2500, layers="1,28", top_k=10, value_top=5)
    atlas = ffkv.scan(loaded, "default", tmp_path / "atlas", config, progress=False)
    result = analyze(atlas.path, AnalyzeConfig(removal_keys=2, removal_triggers=3, examples=40), model=loaded,
                     progress=False)
    on_disk = json.loads((atlas.path / "analysis.json").read_text())
    assert on_disk["layers"] == [1, 28] and on_disk["n_layers"] == 30
    for block in ("patterns", "patterns_neg", "token_removal", "token_removal_neg", "values", "values_neg",
                  "aggregation"):
        assert block in on_disk, block
    assert on_disk["missing"] == {}
    for layer in (1, 28):
        shares = [result["patterns"][k][layer] for k in ("shallow", "semantic", "both", "none")]
        assert sum(shares) == pytest.approx(1.0)
        assert 0 <= result["values"]["agreement_rate"][layer] <= 1
        effect = result["aggregation"]["ffn_effect"]
        assert sum(effect[k][layer] for k in ("residual", "ffn", "agreement", "composition")) == pytest.approx(1)
        assert -1.5 < result["token_removal"]["last"][layer] < 1.5
    assert result["patterns"]["shallow"][0] is None  # layer 0 was not scanned
    assert result["aggregation"]["n_examples"] == 40
    html = write_report(atlas.path).read_text()
    from ffkv.report import FIGURE_IDS

    for fig in FIGURE_IDS:  # every figure drawn from this real analysis, none reported missing
        assert f'id="{fig}" data-figure="{fig}" data-state="drawn"' in html, fig
