"""The token store belongs to one tokenizer: a store made by another tokenizer is rebuilt, never reused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import build_tiny_model, train_tokenizer

import ffkv
from ffkv.corpus import TokenStore, build_token_store, load_corpus
from ffkv.models import tokenizer_fingerprint

CONFIG = ffkv.ScanConfig(dtype="float32", top_k=3, max_length=64, batch_tokens=256, checkpoint_every=1e9)


@pytest.fixture(scope="module")
def two_tokenizers():
    """Two tokenizers with the same special tokens (no BOS) but other merges, so other ids for the same text."""
    return train_tokenizer(bos=False), train_tokenizer(bos=False, vocab_size=290)


def _encode(store: TokenStore, tokenizer, corpus) -> list[int]:
    """Every unit's ids, re-encoded independently from the unit table (document units, no special prefix)."""
    assert (store.n_special == 0).all()
    ids = []
    for doc in store.columns["doc"][store.columns["window"] == 0]:
        ids += tokenizer(corpus.documents[int(doc)].text, add_special_tokens=False).input_ids
    return ids


def test_the_two_tokenizers_differ(two_tokenizers, corpus_jsonl):
    a, b = two_tokenizers
    text = load_corpus(str(corpus_jsonl)).documents[0].text
    assert a(text).input_ids != b(text).input_ids
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


def test_store_of_another_tokenizer_is_rebuilt(two_tokenizers, corpus_jsonl, tmp_path):
    a, b = two_tokenizers
    corpus = load_corpus(str(corpus_jsonl))
    directory = tmp_path / "store"
    first = build_token_store(corpus, a, "document", 64, directory)
    assert first.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(a)
    assert first.tokens.tolist() == _encode(first, a, corpus)
    mtime = (directory / "store.json").stat().st_mtime_ns

    again = build_token_store(corpus, a, "document", 64, directory)  # same tokenizer: reused as it is
    assert (directory / "store.json").stat().st_mtime_ns == mtime
    assert again.tokens.tolist() == first.tokens.tolist()

    second = build_token_store(corpus, b, "document", 64, directory)
    assert second.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(b)
    assert second.tokens.tolist() == _encode(second, b, corpus)
    assert second.tokens.tolist() != first.tokens.tolist()
    reread = TokenStore(directory)
    assert reread.tokens.tolist() == second.tokens.tolist()


def test_scan_force_with_another_tokenizer_rebuilds_the_store(two_tokenizers, corpus_jsonl, tmp_path):
    """`scan --force` into an atlas of another model keeps store/; its ids must be the new tokenizer's."""
    dirs = []
    for i, tok in enumerate(two_tokenizers):
        d = tmp_path / f"model{i}"
        build_tiny_model("gpt2", seed=i).save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    out = tmp_path / "atlas"
    config = replace(CONFIG, unit="document")
    first = ffkv.scan(str(dirs[0]), str(corpus_jsonl), out, config, progress=False)
    old_tokens = np.asarray(first.store.tokens).copy()
    model = ffkv.load_model(str(dirs[1]))
    atlas = ffkv.scan(model, str(corpus_jsonl), out, config, force=True, progress=False)
    corpus = load_corpus(str(corpus_jsonl))
    tokens = atlas.store.tokens.tolist()
    assert tokens == _encode(atlas.store, two_tokenizers[1], corpus)
    assert tokens != old_tokens.tolist()
    assert atlas.store.meta["tokenizer_fingerprint"] == model.tokenizer_fingerprint()
    assert atlas.manifest["corpus"]["n_tokens"] == len(tokens)
    # the triggers shown are the ones the new model scored: decoded with the atlas's (new) tokenizer
    t = atlas.triggers(atlas.layers[0], 0, "pos", 1)[0]
    assert t.input_ids == tokens[atlas.store.offset[t.unit]: t.position + 1]
