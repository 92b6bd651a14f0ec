"""Corpora from Parquet files and `datasets` folders, and the --bos option (a BOS token fed before every unit)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DOCUMENTS
from helpers import brute_force_coefficients, brute_force_topk

import ffkv
from ffkv.cli import _print_summary, build_parser, main
from ffkv.corpus import Document, build_token_store, load_corpus, special_prefix
from ffkv.errors import FfkvError
from ffkv.merge import merge_atlases

# WikiText-103's shape: one row per line, blank rows, " = Heading = " rows, text with spaces around punctuation
WIKITEXT_ROWS = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : Unrecorded Chronicles is a "
                 "tactical role @-@ playing video game . It was released in January 2011 . \n", "",
                 " = = Gameplay = = \n", " The game 's battle system , the BliTZ system , is carried over . \n"]
CONFIG = ffkv.ScanConfig(dtype="float64", top_k=4, max_length=64, batch_tokens=128, max_batch=8, value_top=4,
                         checkpoint_every=1e9)


def _rows() -> dict[str, list]:
    """The test corpus (conftest.DOCUMENTS) as columns, with rows a corpus reader must skip mixed in."""
    text = [d["text"] for d in DOCUMENTS]
    title = [d["title"] for d in DOCUMENTS]
    topic = [d["topic"] for d in DOCUMENTS]
    for at, blank in ((0, ""), (5, "   \n"), (9, None)):
        text.insert(at, blank)
        title.insert(at, "skipped")
        topic.insert(at, "skipped")
    return {"text": text, "title": title, "topic": topic, "n_chars": [len(t or "") for t in text]}


def _expected() -> list[Document]:
    return [Document(d["text"], d["title"], d["topic"]) for d in DOCUMENTS]


@pytest.fixture(scope="module")
def corpus_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("parquet") / "small.parquet"
    pq.write_table(pa.table(_rows()), path, row_group_size=5)  # several row groups
    return path


@pytest.fixture(scope="module")
def corpus_datasets(tmp_path_factory):
    """A folder written by the `datasets` library itself, in three Arrow files, and a DatasetDict of it."""
    import datasets

    root = tmp_path_factory.mktemp("datasets")
    dataset = datasets.Dataset.from_dict(_rows())
    dataset.save_to_disk(str(root / "small"), num_shards=3)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(4))}).save_to_disk(str(root / "dict"))
    return root


# -- reading -------------------------------------------------------------------------------------------------


def test_parquet_rows_become_documents(corpus_parquet, corpus_jsonl):
    corpus = load_corpus(str(corpus_parquet))
    assert corpus.name == "small.parquet"
    assert corpus.documents == _expected()
    assert corpus.content_hash() == load_corpus(str(corpus_jsonl)).content_hash()


def test_datasets_folder_is_read_without_the_datasets_library(corpus_datasets, corpus_jsonl):
    state = json.loads((corpus_datasets / "small" / "state.json").read_text())
    assert len(state["_data_files"]) == 3  # the rows are spread over three files, read in state.json's order
    corpus = load_corpus(str(corpus_datasets / "small"))
    assert corpus.name == "small"
    assert corpus.documents == _expected()
    assert corpus.content_hash() == load_corpus(str(corpus_jsonl)).content_hash()


def test_datasets_split_and_dict(corpus_datasets):
    split = load_corpus(str(corpus_datasets / "dict" / "test"))
    assert split.name == "dict/test"
    assert split.documents == _expected()[:3]  # the first 4 rows hold one blank
    with pytest.raises(FfkvError, match=r"several splits \(train, test\).*--corpus .*dict/train"):
        load_corpus(str(corpus_datasets / "dict"))


def test_folder_of_parquet_files_in_name_order(tmp_path):
    rows = _rows()
    half = len(rows["text"]) // 2
    folder = tmp_path / "wiki"
    folder.mkdir()
    # written out of order: the reader sorts by name, as in the Hub's train-0000N-of-0000M.parquet
    pq.write_table(pa.table({k: v[half:] for k, v in rows.items()}), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({k: v[:half] for k, v in rows.items()}), folder / "train-00000-of-00002.parquet")
    corpus = load_corpus(str(folder))
    assert corpus.name == "wiki"
    assert corpus.documents == _expected()
    # a pattern picks one split out of a folder that holds several
    pq.write_table(pa.table({"text": ["A test row."]}), folder / "test-00000-of-00001.parquet")
    assert load_corpus(str(folder / "train-*.parquet")).documents == _expected()
    assert load_corpus(str(folder)).documents == [Document("A test row.")] + _expected()  # test-* sorts first
    with pytest.raises(FfkvError, match="must match .parquet files only, and at least one"):
        load_corpus(str(folder / "valid*.parquet"))
    (folder / "train-notes.txt").write_text("x\n")
    with pytest.raises(FfkvError, match="must match .parquet files only"):
        load_corpus(str(folder / "train-*"))


def test_wikitext_rows(tmp_path):
    path = tmp_path / "wiki.parquet"
    pq.write_table(pa.table({"text": WIKITEXT_ROWS}), path)
    corpus = load_corpus(str(path))
    assert [d.text for d in corpus.documents] == [r for r in WIKITEXT_ROWS if r.strip()]  # blank rows skipped
    assert all(d.title == "" and d.topic == "" for d in corpus.documents)


def test_text_column_flag(tmp_path, corpus_jsonl):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["First text.", "Second text."], "title": [7, None]}), path)
    corpus = load_corpus(str(path), text_column="body")
    # a non-text title is kept as text, a missing one is empty
    assert corpus.documents == [Document("First text.", "7"), Document("Second text.", "")]
    with pytest.raises(FfkvError, match=r"no column 'text' \(it has id, body, title\).*--text-column"):
        load_corpus(str(path))
    jsonl = tmp_path / "other.jsonl"
    jsonl.write_text(json.dumps({"body": "A text.", "title": "T"}) + "\n")
    assert load_corpus(str(jsonl), text_column="body").documents == [Document("A text.", "T")]
    with pytest.raises(FfkvError, match="only .jsonl, .parquet and datasets corpora have columns"):
        load_corpus(str(tmp_path / "x.txt"), text_column="body")


@pytest.mark.parametrize("table, message", [
    ({"text": [1, 2, 3]}, r"column 'text' holds int64, not text"),
    ({"text": [["a"], ["b"]]}, r"column 'text' holds list<.*string>, not text"),
    ({"text": ["", "  ", None]}, r"has no text \(3 documents, all empty\)"),
    ({"text": pa.array([], pa.string())}, r"has no text \(0 documents, all empty\)"),
    ({"text": ["a"], "title": [{"x": 1}]}, r"column 'title' holds struct<x: int64>, which has no text form"),
])
def test_bad_parquet_is_one_line(tmp_path, table, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(FfkvError, match=message) as exc:
        load_corpus(str(path))
    assert "\n" not in str(exc.value)


def test_bad_files_and_folders(tmp_path, corpus_datasets):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(FfkvError, match="not a readable Parquet file"):
        load_corpus(str(junk))
    with pytest.raises(FfkvError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.parquet"))
    with pytest.raises(FfkvError, match="does not exist"):
        load_corpus(str(tmp_path / "missing-folder"))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello\n")
    with pytest.raises(FfkvError, match="neither a `datasets` folder .* nor a folder of .parquet files"):
        load_corpus(str(plain))
    (plain / "notes.csv").write_text("text\nhello\n")
    with pytest.raises(FfkvError, match="expected 'default', a .txt file"):
        load_corpus(str(plain / "notes.csv"))

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (corpus_datasets / "small").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    first = json.loads((broken / "state.json").read_text())["_data_files"][0]["filename"]
    (broken / first).write_bytes(b"\x00" * 64)
    with pytest.raises(FfkvError, match=f"{first} is not a readable Arrow file"):
        load_corpus(str(broken))
    (broken / first).unlink()
    with pytest.raises(FfkvError, match=f"{first}, listed in state.json, is missing"):
        load_corpus(str(broken))
    (broken / "state.json").write_text("{}")
    with pytest.raises(FfkvError, match="state.json does not list the dataset's Arrow files"):
        load_corpus(str(broken))


def test_cli_bad_corpus_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    rc = main(["scan", "--model", "unused", "--corpus", str(path), "--out", str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "no column 'text'" in err


# -- the BOS option ----------------------------------------------------------------------------------------


def test_bos_flag_parses():
    parser = build_parser()
    for command in ("scan", "run"):
        assert parser.parse_args([command]).bos is False
        assert parser.parse_args([command, "--bos"]).bos is True
        assert parser.parse_args([command, "--bos", "--no-bos"]).bos is False
        assert parser.parse_args([command, "--text-column", "body"]).text_column == "body"


def test_special_prefix_choice(tokenizers):
    from transformers import PreTrainedTokenizerFast

    plain, bos = tokenizers["plain"], tokenizers["bos"]
    endoftext = plain.convert_tokens_to_ids("<|endoftext|>")
    assert special_prefix(plain) == [] and special_prefix(plain, bos=True) == [endoftext]
    # a tokenizer that prepends its BOS itself keeps exactly that one
    assert special_prefix(bos) == special_prefix(bos, bos=True) == [endoftext]
    eos_only = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, eos_token="<pad>")
    assert eos_only.bos_token_id is None
    assert special_prefix(eos_only, bos=True) == [plain.convert_tokens_to_ids("<pad>")]
    neither = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer)
    assert special_prefix(neither) == []
    with pytest.raises(FfkvError, match="neither a BOS nor an EOS token"):
        special_prefix(neither, bos=True)


def test_bos_is_part_of_the_store_recipe(tokenizers, corpus_jsonl, tmp_path):
    corpus = load_corpus(str(corpus_jsonl))
    directory = tmp_path / "store"
    # no sentence is longer than 63 tokens, so no unit is cut into windows, with or without the BOS
    plain = build_token_store(corpus, tokenizers["plain"], "sentence", 64, directory)
    assert (plain.columns["window"] == 0).all() and plain.length.max() < 64
    plain_tokens, plain_offset = np.asarray(plain.tokens).copy(), plain.offset.copy()
    assert plain.meta["bos"] is False and plain.meta["special_prefix"] == []
    with_bos = build_token_store(corpus, tokenizers["plain"], "sentence", 64, directory, bos=True)
    assert with_bos.meta["bos"] is True and with_bos.meta["special_prefix"] == [0]
    mtime = (directory / "store.json").stat().st_mtime_ns
    again = build_token_store(corpus, tokenizers["plain"], "sentence", 64, directory, bos=True)
    assert (directory / "store.json").stat().st_mtime_ns == mtime  # same recipe: reused
    # every unit gains the BOS id in front; its text tokens (and windows) are the same, one position later
    units = np.arange(again.n_units)
    assert again.n_units == len(plain_offset)
    assert (again.n_special == 1).all()
    assert np.array_equal(again.offset, plain_offset + units)
    assert np.asarray(again.tokens)[again.offset].tolist() == [0] * again.n_units
    keep = np.ones(again.n_tokens, bool)
    keep[again.offset] = False
    assert np.array_equal(np.asarray(again.tokens)[keep], plain_tokens)


@pytest.fixture(scope="module")
def bos_pair(tiny_model, corpus_jsonl, tmp_path_factory):
    """The same gated model (plain tokenizer: no BOS of its own) scanned without and with --bos."""
    loaded = tiny_model("qwen2")
    root = tmp_path_factory.mktemp("bos")
    plain = ffkv.scan(loaded, str(corpus_jsonl), root / "plain", CONFIG, progress=False)
    with_bos = ffkv.scan(loaded, str(corpus_jsonl), root / "bos", replace(CONFIG, bos=True), progress=False)
    return loaded, plain, with_bos


def test_bos_scan_feeds_but_never_scores_the_bos(bos_pair):
    loaded, plain, atlas = bos_pair
    bos_id = loaded.tokenizer.bos_token_id
    store = atlas.store
    assert bos_id == 0 and plain.store.n_special.sum() == 0
    assert plain.store.length.max() < CONFIG.max_length  # no unit cut into windows: the units correspond
    assert (store.n_special == 1).all()
    assert np.asarray(store.tokens)[store.offset].tolist() == [bos_id] * store.n_units
    assert np.array_equal(store.offset, plain.store.offset + np.arange(store.n_units))  # positions shift by one
    assert atlas.manifest["result"]["tokens_scanned"] == plain.manifest["result"]["tokens_scanned"]
    # exact top-k over every text position of the units run alone with their BOS, which is never a trigger
    coefficients, positions = brute_force_coefficients(loaded, store, np.arange(store.n_units), atlas.layers)
    assert len(positions) == plain.manifest["result"]["tokens_scanned"]
    assert not np.isin(store.offset, positions.numpy()).any()
    for layer in atlas.layers:
        tensors = atlas.layer_tensors(layer)
        for face, largest in (("pos", True), ("neg", False)):
            want_scores, want_positions = brute_force_topk(coefficients[layer], positions, CONFIG.top_k, largest)
            assert np.array_equal(tensors[f"{face}_positions"].numpy(), want_positions.numpy()), (layer, face)
            assert np.allclose(tensors[f"{face}_scores"].numpy(), want_scores.numpy(), rtol=0, atol=0, equal_nan=True)
            assert not np.isin(tensors[f"{face}_positions"].numpy(), store.offset).any()
        # the BOS changes what the model computes, so the top-k differ from the scan without it
        assert not np.array_equal(tensors["pos_scores"].numpy(), plain.layer_tensors(layer)["pos_scores"].numpy())
    trigger = atlas.triggers(atlas.layers[-1], 0, "pos", 1)[0]
    assert trigger.input_ids[0] == bos_id and trigger.input_ids.count(bos_id) == 1
    assert "<|endoftext|>" not in trigger.context + trigger.text


def test_bos_recorded_in_the_manifest(bos_pair, capsys):
    _, plain, atlas = bos_pair
    assert atlas.manifest["scan"]["bos"] is True and plain.manifest["scan"]["bos"] is False
    assert atlas.manifest["corpus"]["bos"] is True and plain.manifest["corpus"]["bos"] is False
    assert atlas.manifest["corpus"]["special_prefix"] == [0]
    assert atlas.manifest["corpus"]["special_prefix_tokens"] == ["<|endoftext|>"]
    assert plain.manifest["corpus"]["special_prefix"] == plain.manifest["corpus"]["special_prefix_tokens"] == []
    assert atlas.manifest["corpus"]["content_hash"] != plain.manifest["corpus"]["content_hash"]
    _print_summary(atlas)
    assert "each after <|endoftext|> (--bos; fed, not scored)" in capsys.readouterr().out


def test_resume_and_merge_refuse_mixing_bos(tiny_model, corpus_jsonl, tmp_path):
    loaded = tiny_model("qwen2")
    config = replace(CONFIG, bos=True, batch_tokens=64)
    out = tmp_path / "stopped"
    assert ffkv.scan(loaded, str(corpus_jsonl), out, config, progress=False, stop_after_batches=1) is None
    store_json = (out / "store" / "store.json").read_text()
    with pytest.raises(FfkvError, match=r"other settings \(bos\)"):
        ffkv.scan(loaded, str(corpus_jsonl), out, replace(config, bos=False), resume=True, progress=False)
    assert (out / "store" / "store.json").read_text() == store_json  # refused before the store was touched
    assert ffkv.scan(loaded, str(corpus_jsonl), out, config, resume=True, progress=False).manifest["scan"]["bos"]

    parts = [ffkv.scan(loaded, str(corpus_jsonl), tmp_path / f"part{i}", replace(config, shard=f"{i}/2", bos=bos),
                       progress=False).path for i, bos in ((0, True), (1, False))]
    with pytest.raises(FfkvError, match=r"part0 was scanned with --bos and .*part1 without"):
        merge_atlases(parts, tmp_path / "merged", progress=False)
