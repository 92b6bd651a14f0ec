"""§3 experiments: the trigger-pattern classifier on synthetic trigger sets with a known answer, and token
removal against an independent recomputation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import ffkv
from ffkv.analysis.keys import (
    Background,
    TriggerText,
    binomial_tail,
    classify,
    patterns_experiment,
    token_removal_experiment,
)
from ffkv.corpus import build_token_store, load_corpus

TOPICS = ["astronomy", "cooking", "football", "music", "law", "geology"]
FILLER = [f"w{i}" for i in range(400)]  # topic-neutral words


def _topic_words(topic: str) -> list[str]:
    return [f"{topic[:3]}{i}" for i in range(30)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A corpus of random sentences: each document has a topic whose words it mixes with neutral filler; a
    word-level tokenizer so that every word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    docs = []
    for d in range(600):
        topic = TOPICS[d % len(TOPICS)]
        words = [rng.choice(_topic_words(topic)) if rng.random() < 0.3 else rng.choice(FILLER)
                 for _ in range(rng.randint(8, 20))]
        docs.append({"text": " ".join(words) + ".", "topic": topic, "title": f"doc{d}"})
    root = tmp_path_factory.mktemp("keys")
    path = root / "synthetic.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in docs))
    vocab = {"<unk>": 0, ".": 1} | {w: i + 2 for i, w in enumerate(
        FILLER + [w for t in TOPICS for w in _topic_words(t)] + ["substitutes"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    store = build_token_store(load_corpus(str(path)), tokenizer, "document", 64, root / "store")
    return store, tokenizer, Background(store, tokenizer), docs


def _random_triggers(store, rng, n, topic_filter=None, ending=None):
    """n prefixes from n distinct random units (optionally of one topic / with a forced last token)."""
    units = [u for u in range(store.n_units) if topic_filter is None or store.columns["topic"][u] == topic_filter]
    out = []
    for u in rng.sample(units, n):
        ids = store.unit_tokens(u).tolist()
        end = rng.randint(2, len(ids) - 1)
        prefix = ids[:end]
        if ending is not None:
            prefix = prefix[:-1] + [ending]
        out.append(TriggerText(prefix, str(store.columns["topic"][u]), str(store.columns["title"][u]), u))
    return out


def test_binomial_tail_matches_direct_sum():
    assert binomial_tail(0, 10, 0.3) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # P(2) + P(3) = 3/8 + 1/8


def test_shared_ending_is_shallow(synthetic):
    store, tokenizer, bg, _ = synthetic
    rng = random.Random(1)
    ending = tokenizer.convert_tokens_to_ids("substitutes")
    triggers = _random_triggers(store, rng, 8, ending=ending) + _random_triggers(store, rng, 17)
    patterns = classify(triggers, bg)
    shallow = [p for p in patterns if p.kind == "shallow"]
    assert any("substitutes" in p.description and set(range(8)) <= set(p.triggers) for p in shallow)


def test_shared_topic_without_surface_is_semantic(synthetic):
    store, _, bg, _ = synthetic
    rng = random.Random(2)
    triggers = _random_triggers(store, rng, 20, topic_filter="geology")
    patterns = classify(triggers, bg)
    assert any(p.kind == "semantic" and "geology" in p.description for p in patterns)
    assert not any(p.kind == "shallow" and len(p.triggers) >= 10 for p in patterns)


def test_random_triggers_have_no_pattern(synthetic):
    store, _, bg, _ = synthetic
    rng = random.Random(3)
    found = [classify(_random_triggers(store, rng, 25), bg) for _ in range(40)]
    false_positive_rate = sum(bool(p) for p in found) / len(found)
    assert false_positive_rate <= 0.05, [x for x in found if x]


def test_same_unit_prefixes_are_not_independent_evidence(synthetic):
    store, _, bg, _ = synthetic
    ids = store.unit_tokens(5).tolist()
    # five prefixes of ONE unit ending in the same token would look significant if counted as five
    same = [TriggerText(ids[:k] + [ids[3]], "", "", 5) for k in range(3, 8)]
    assert classify(same, bg) == []


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_token_removal_matches_recomputation(arch, tiny_model, corpus_txt, tmp_path):
    loaded = tiny_model(arch)
    atlas = ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus_txt)), out=tmp_path / "a",
                      config=ffkv.ScanConfig(dtype="float64", top_k=4), progress=False)
    result = token_removal_experiment(atlas, loaded, "pos", keys_per_layer=3, n_triggers=4, seed=0)
    assert len(result["last"]) == atlas.n_layers
    layer = atlas.layers[-1]
    # independent recomputation of the "last" variant for this layer
    from ffkv.analysis.keys import sample_keys

    changes = []
    for key in sample_keys(atlas.d_ff, 3, 1, layer, "pos"):
        for t in atlas.triggers(layer, key, "pos", 4):
            skip = int(atlas.store.n_special[t.unit])
            if len(t.input_ids) - skip < 2 or t.score == 0:
                continue
            seen = {}
            handle = loaded.parts.ffn_out(layer).register_forward_pre_hook(
                lambda _m, a, seen=seen: seen.setdefault("m", a[0].detach().clone()))
            try:
                with torch.inference_mode():
                    loaded.model(input_ids=torch.tensor([t.input_ids[:-1]]), use_cache=False)
            finally:
                handle.remove()
            new = float(seen["m"].reshape(len(t.input_ids) - 1, -1)[-1, key])
            changes.append((new - t.score) / t.score)
    assert result["last"][layer] == pytest.approx(float(np.mean(changes)), rel=1e-6, abs=1e-9)
    assert result["skipped"][layer] >= 0 and result["n_keys"][layer] == 3


def test_patterns_experiment_shapes(tiny_model, corpus_jsonl, tmp_path):
    loaded = tiny_model("llama")
    atlas = ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus_jsonl)), out=tmp_path / "a",
                      config=ffkv.ScanConfig(dtype="float64", top_k=6, layers="1,2"), progress=False)
    bg = Background(atlas.store, atlas.tokenizer)
    result = patterns_experiment(atlas, bg, "neg", keys_per_layer=4, n_triggers=6)
    assert result["shallow"][0] is None  # layer 0 was not scanned
    for layer in (1, 2):
        total = sum(result[k][layer] for k in ("shallow", "semantic", "both", "none"))
        assert total == pytest.approx(1.0)
        assert 0 <= result["coverage"][layer] <= 1
    assert len(result["keys"]) == 8 and {k["face"] for k in result["keys"]} == {"neg"}


@pytest.mark.slow
def test_classifier_agrees_with_hand_labels(tmp_path):
    """45 keys of the default model labelled by hand (tests/data/hand_labels.json); the README reports
    the agreement. The floor asserted here is well above chance (kappa 0)."""
    from pathlib import Path

    from ffkv.analysis.keys import agreement_with_labels

    fixture = json.loads((Path(__file__).parent / "data" / "hand_labels.json").read_text())
    assert len(fixture["keys"]) >= 40
    model = ffkv.load_model("default")
    store = build_token_store(load_corpus("default"), model.tokenizer, fixture["unit"], fixture["max_length"],
                              tmp_path / "store")
    for entry in fixture["keys"][:3]:  # the fixture's token ids belong to this store's tokenizer
        t = entry["triggers"][0]
        start = int(store.offset[t["unit"]] + store.n_special[t["unit"]])
        assert store.tokens[start: start + len(t["input_ids"])].tolist() == t["input_ids"]
    bg = Background(store, model.tokenizer, model.model.get_input_embeddings().weight)
    result = agreement_with_labels(fixture["keys"], bg)
    print("classifier vs hand labels:", {k: v for k, v in result.items() if k != "predicted"})
    assert result["n"] == len(fixture["keys"])
    assert result["accuracy"] >= 0.45
    assert result["kappa"] >= 0.15
