"""§3 token removal (Fig 3) against an independent recomputation. The trigger patterns (Fig 2) are tested in
test_explain.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import ffkv
from ffkv.analysis.keys import (
    RemovalSample,
    removal_statistics,
    removal_variants,
    run_variants,
    sample_triggers,
    token_removal_experiment,
)


def _coefficient(loaded, layer: int, key: int, ids: list[int]) -> float:
    """The coefficient of (layer, key) at the last token of ``ids``: one full forward of the model, batch 1."""
    seen = {}
    handle = loaded.parts.ffn_out(layer).register_forward_pre_hook(
        lambda _m, a: seen.setdefault("m", a[0].detach().clone()))
    try:
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return float(seen["m"].reshape(len(ids), -1)[-1, key])


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_token_removal_matches_recomputation(arch, tiny_model, corpus_txt, tmp_path):
    loaded = tiny_model(arch)
    atlas = ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus_txt)), out=tmp_path / "a",
                      config=ffkv.ScanConfig(dtype="float64", top_k=6), progress=False)
    faces = atlas.faces
    result = token_removal_experiment(atlas, loaded, faces, keys_per_layer=3, n_triggers=6, seed=0)
    sample, _ = sample_triggers(atlas, faces, 3, 6, 0)
    _, dropped = removal_variants(atlas.store, sample, 0)
    face, layer = faces[-1], atlas.layers[-1]
    block = result[face]
    assert len(block["last"]) == atlas.n_layers and block["n_keys"][layer] == 3
    changes = {"first": [], "last": [], "random": []}
    for i in range(len(sample)):
        if sample.face[i] != face or sample.layer[i] != layer or sample.end[i] < 1:
            continue
        unit, end, old = sample.unit[i], sample.end[i], sample.score[i]
        tokens = atlas.store.unit_tokens(unit).tolist()
        skip = int(atlas.store.n_special[unit])
        special, content = tokens[:skip], tokens[skip: skip + end + 1]
        # the atlas stores scores as float32
        assert old == pytest.approx(_coefficient(loaded, layer, sample.key[i], special + content), rel=1e-6)
        variants = {"first": special + content[1:], "last": special + content[:-1]}
        if end >= 2:
            r = dropped[i]
            assert 1 <= r <= end - 1
            variants["random"] = special + content[:r] + content[r + 1:]
        for kind, ids in variants.items():
            changes[kind].append((_coefficient(loaded, layer, sample.key[i], ids) - old) / old)
    assert changes["last"], "no trigger of the last layer was measured"
    # one shared sequence per unit and removal, or one per trigger: the same coefficients
    forced = [run_variants(loaded, sample, removal_variants(atlas.store, sample, 0, share=share)[0])
              for share in (True, False)]
    for kind in ("first", "last", "random"):
        np.testing.assert_allclose(forced[0][kind], forced[1][kind], rtol=1e-9, atol=1e-12)
    for kind, values in changes.items():
        if not values:
            continue
        v = np.array(values)
        assert block[kind][layer] == pytest.approx(v.mean(), rel=1e-6, abs=1e-9)
        assert block[f"{kind}_median"][layer] == pytest.approx(np.median(v), rel=1e-6, abs=1e-9)
        assert block[f"{kind}_n"][layer] == len(v)
        assert block[f"{kind}_sign_change"][layer] == pytest.approx(np.mean(v < -1))  # crossing zero: change < -100%
        low, high = block[f"{kind}_ci"][layer]
        assert low <= v.mean() <= high


def test_removal_statistics_on_a_constructed_case():
    old = np.array([2.0, 2.0, 2.0, -1.0, 4.0])
    new = np.array([1.0, -2.0, 2.0, 0.5, np.nan])  # -50 %, -200 % (crosses zero), 0 %, -150 % (crosses), missing
    s = removal_statistics(old, new)
    assert s["n"] == 4
    assert s["mean"] == pytest.approx((-0.5 - 2.0 + 0.0 - 1.5) / 4)
    assert s["median"] == pytest.approx(-1.0)
    assert s["sign_change"] == pytest.approx(0.5)
    assert s["median_ci"][0] <= s["median"] <= s["median_ci"][1]
    assert removal_statistics(np.array([1.0]), np.array([np.nan])) == {"n": 0}


class _Store:
    """One unit of 14 content tokens after a one-token special prefix."""

    n_special = np.array([1])

    def unit_tokens(self, unit):
        return np.arange(100, 115)


def test_random_removal_is_uniform_over_each_triggers_inner_positions():
    sample = RemovalSample()
    ends = (2, 5, 9, 13)
    for end in ends:
        sample.add("pos", 0, 0, 0, end, 1.0)
    counts = {end: Counter() for end in ends}
    runs = 3000
    for seed in range(runs):
        variants, dropped = removal_variants(_Store(), sample, seed)
        assert variants[0].ids == list(range(100, 114))  # "last": the unit cut after the longest trigger's end - 1
        assert variants[1].ids[0] == 100 and variants[1].ids[1] == 102  # "first": special kept, first content dropped
        for i, end in enumerate(ends):
            counts[end][dropped[i]] += 1
        for v in variants[2:]:  # each random variant drops one token and serves only triggers that contain it inside
            for i, kind, col in v.reads:
                assert kind == "random" and col == 1 + sample.end[i] - 1
    for end in ends:
        assert set(counts[end]) == set(range(1, end))
        expected = runs / (end - 1)
        chi2 = sum((c - expected) ** 2 / expected for c in counts[end].values())
        assert chi2 < 3 * (end - 1) + 10, (end, counts[end])  # far above a chi-square's mean (df = end - 2)
