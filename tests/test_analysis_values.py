"""§4 values experiment on tiny models (ReLU OPT, GELU GPT-2, gated Llama): constructed values with known
answers, and every per-layer number against an independent computation from the atlas's trigger API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_saved_model

import ffkv
from ffkv.analysis.values import frequency_baseline, layer_values, next_token_ids, values_experiment
from ffkv.errors import FfkvError

ARCHS = ["opt", "gpt2", "llama"]
CASES = [("opt", "pos"), ("gpt2", "pos"), ("gpt2", "neg"), ("llama", "pos"), ("llama", "neg")]
SCAN = dict(dtype="float64", top_k=5, max_length=64, batch_tokens=400, max_batch=16, value_top=8,
            checkpoint_every=1e9)


_build = build_saved_model


def _scan(loaded, corpus, out, **kw):
    return ffkv.scan(loaded, str(corpus), out, ffkv.ScanConfig(**dict(SCAN, **kw)), progress=False)


@pytest.fixture(scope="module")
def random_scan(tokenizers, corpus_txt, tmp_path_factory):
    """arch -> (atlas, model) of a plain tiny random model scanned over the small corpus."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"values-{arch}")
            loaded = _build(arch, tokenizers, root / "model", seed=7)
            cache[arch] = (_scan(loaded, corpus_txt, root / "atlas"), loaded)
        return cache[arch]

    return get


def _equal_norm_unembedding(model) -> None:
    """Centre and normalise every unembedding row: then v = E[t] has t as its unique top token, both raw and
    through the final norm (gain 1 at init; LayerNorm's centring leaves a zero-mean row unchanged)."""
    e = model.get_output_embeddings().weight
    e -= e.mean(dim=1, keepdim=True)
    e /= e.norm(dim=1, keepdim=True).clamp_min(1e-6)  # OPT's padding row is zero and stays zero


def _independent(atlas, loaded, layer, face):
    """Per memory: (target or None, argmax, rank of target, trigger next tokens) from the public trigger API and
    a float64 projection of the whole layer."""
    sign = 1.0 if face == "pos" else -1.0
    logits = sign * (loaded.parts.values(layer).detach().double() @ loaded.parts.unembedding.detach().double().T)
    rows = []
    for key in range(atlas.d_ff):
        triggers = atlas.triggers(layer, key, face)
        target = triggers[0].next_token_id if triggers else None
        row = logits[key]
        rank = None if target is None else int((row > row[target]).sum())
        rows.append((target, int(row.argmax()), rank, [t.next_token_id for t in triggers], float(row.softmax(0).max())))
    return rows


@pytest.mark.parametrize("arch,face", CASES)
def test_values_set_to_the_next_tokens_unembedding_agree_with_rank_zero(arch, face, tokenizers, corpus_txt,
                                                                         tmp_path):
    loaded = _build(arch, tokenizers, tmp_path / "model", edit=_equal_norm_unembedding)
    atlas = _scan(loaded, corpus_txt, tmp_path / "before")
    layer = loaded.parts.n_layers - 1  # its values feed nothing the scan measures: triggers stay the same
    targets = next_token_ids(atlas.store, atlas.layer_tensors(layer)[f"{face}_positions"][:, 0].numpy())
    assert (targets >= 0).sum() > atlas.d_ff // 2
    sign = 1.0 if face == "pos" else -1.0
    with torch.no_grad():
        values = loaded.parts.values(layer)  # a view of the output projection's weight
        unembed = loaded.parts.unembedding
        for key, target in enumerate(targets):
            if target >= 0:
                values[key] = sign * 3.0 * unembed[target]
    after = _scan(loaded, corpus_txt, tmp_path / "after")
    assert torch.equal(after.layer_tensors(layer)[f"{face}_positions"], atlas.layer_tensors(layer)[f"{face}_positions"])

    block = values_experiment(after, loaded, face, progress=False)
    n_skipped = int((targets < 0).sum())
    assert block["skipped"][layer] == n_skipped
    assert block["agreement_rate"][layer] == 1.0
    assert block["agreement_rate_normed"][layer] == 1.0
    assert block["next_token_rank_median"][layer] == 0.0
    assert all(block["rank_quantiles"][q][layer] == 0.0 for q in block["rank_quantiles"])
    mv = layer_values(after, loaded, layer, [face])[face]
    np.testing.assert_array_equal(mv.target, targets)
    assert (mv.rank[targets >= 0] == 0).all() and (mv.rank[targets < 0] == -1).all()
    assert (mv.prediction[targets >= 0] == targets[targets >= 0]).all()

    # precision@k by hand: triggers whose next token is the value's top token, over the filled slots
    for key, (_, top, _, nexts, _) in enumerate(_independent(after, loaded, layer, face)):
        assert mv.n_triggers[key] == len(nexts)
        expected = sum(n == top for n in nexts) / len(nexts) if nexts else np.nan
        np.testing.assert_equal(mv.precision[key], expected)
        if targets[key] >= 0:
            assert mv.precision[key] >= 1 / len(nexts)  # the top-1 trigger itself is a hit
    listed = block["top_memories"]
    assert listed and all(m["face"] == face for m in listed)
    assert [m["precision"] for m in listed] == sorted((m["precision"] for m in listed), reverse=True)
    for m in listed:
        assert m["precision"] == mv.precision[m["key"]] if m["layer"] == layer else m["precision"] > 0
        assert len(m["triggers"]) == min(5, m["n_triggers"]) and m["top_tokens"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_number_matches_an_independent_computation(arch, random_scan):
    atlas, loaded = random_scan(arch)
    vocab = int(loaded.parts.unembedding.shape[0])
    assert atlas.faces == (["pos"] if arch == "opt" else ["pos", "neg"])
    for face in atlas.faces:
        block = values_experiment(atlas, loaded, face, precision_k=3, n_permutations=4, seed=1, progress=False)
        assert block["precision_k"] == 3
        agree_all, count_all = 0, 0
        for layer in range(atlas.n_layers):
            rows = _independent(atlas, loaded, layer, face)
            valid = [r for r in rows if r[0] is not None]
            ranks = np.array([r[2] for r in valid], dtype=np.float64)
            agree = sum(r[0] == r[1] for r in valid)
            agree_all += agree
            count_all += len(valid)
            assert block["skipped"][layer] == len(rows) - len(valid)
            assert block["agreement_rate"][layer] == pytest.approx(agree / len(valid))
            assert block["random_baseline"][layer] == pytest.approx(1 / vocab)
            assert block["next_token_rank_median"][layer] == pytest.approx(np.median(ranks))
            assert block["rank_quantiles"]["q10"][layer] == pytest.approx(np.quantile(ranks, 0.1))
            assert block["rank_quantiles"]["q90"][layer] == pytest.approx(np.quantile(ranks, 0.9))
            assert 0.0 <= block["frequency_baseline"][layer] <= 1.0
            assert 0.0 <= block["agreement_rate_normed"][layer] <= 1.0
            hand = [sum(n == r[1] for n in r[3][:3]) / len(r[3][:3]) for r in rows if r[3]]
            assert block["precision_mean"][layer] == pytest.approx(np.mean(hand))
        fig6 = block["max_prob_vs_agreement"]
        assert len(fig6["bin_edges"]) == len(fig6["count"]) + 1 == len(fig6["agreement"]) + 1
        assert fig6["bin_edges"][0] == pytest.approx(1 / vocab) and fig6["bin_edges"][-1] == pytest.approx(1.0)
        assert sum(fig6["count"]) == count_all
        assert sum(a * c for a, c in zip(fig6["agreement"], fig6["count"]) if c) == pytest.approx(agree_all)
        assert all(a is None for a, c in zip(fig6["agreement"], fig6["count"]) if c == 0)
        assert "agreement" in block["definitions"]


def test_max_prob_of_each_memory(random_scan):
    atlas, loaded = random_scan("llama")
    for face in atlas.faces:
        mv = layer_values(atlas, loaded, 1, [face], chunk=7)[face]  # odd chunk: the chunking must not matter
        expected = np.array([r[4] for r in _independent(atlas, loaded, 1, face)])
        np.testing.assert_allclose(mv.max_prob, expected, rtol=1e-5)


def test_frequency_baseline_on_known_cases():
    # every value predicts the one token every memory's trigger is followed by: any other memory agrees too
    assert frequency_baseline(np.full(20, 7), np.full(20, 7), n_permutations=3) == 1.0
    # all targets distinct and every memory predicts its own: another memory's target never matches
    ids = np.arange(50)
    assert frequency_baseline(ids, ids, n_permutations=5, seed=3) == 0.0
    # half the targets are token 1, predictions all 1: a random other memory has target 1 with p = 24/49 or 25/49
    target = np.array([1] * 25 + list(range(100, 125)))
    rate = frequency_baseline(np.ones(50, dtype=int), target, n_permutations=50, seed=0)
    assert rate == pytest.approx(0.5, abs=1e-9)  # exactly half: every memory takes exactly one target
    assert frequency_baseline(np.array([1]), np.array([1])) is None
    assert frequency_baseline(ids, ids, seed=9) == frequency_baseline(ids, ids, seed=9)


def test_next_token_ids_and_layer_cache(random_scan):
    atlas, loaded = random_scan("gpt2")
    store = atlas.store
    positions = atlas.layer_tensors(0)["pos_positions"].numpy()
    nexts = next_token_ids(store, positions)
    for p, n in zip(positions.reshape(-1)[:200], nexts.reshape(-1)[:200]):
        expected = -1 if p < 0 else store.prefix(int(p))[2]
        assert n == (-1 if expected is None else expected)
    a = values_experiment(atlas, loaded, "neg", progress=False)
    b = values_experiment(atlas, loaded, "neg", progress=False)  # second call: cached projections
    assert a == b


def test_bad_input_is_a_clear_error(random_scan):
    atlas, loaded = random_scan("opt")
    with pytest.raises(FfkvError, match="face 'neg' not in this atlas"):
        values_experiment(atlas, loaded, "neg", progress=False)
    with pytest.raises(FfkvError, match="precision k 6"):
        values_experiment(atlas, loaded, "pos", precision_k=6, progress=False)
    with pytest.raises(FfkvError, match="precision k 0"):
        layer_values(atlas, loaded, 0, precision_k=0)


def test_normed_prediction_without_stored_projections(random_scan):
    """The argmax through the final norm, recomputed when an atlas lacks the stored projections, equals the
    stored one."""
    atlas, loaded = random_scan("gpt2")
    stored = {face: layer_values(atlas, loaded, 2)[face].prediction_normed for face in atlas.faces}
    bare = ffkv.Atlas.load(atlas.path)
    tensors = bare.layer_tensors(2)
    for face in bare.faces:
        del tensors[f"value_normed_{face}_ids"]
    for face, mv in layer_values(bare, loaded, 2).items():
        np.testing.assert_array_equal(mv.prediction_normed, stored[face])
