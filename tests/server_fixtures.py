"""A tiny random Llama-architecture model with a byte-level BPE tokenizer trained here, and an atlas of it, for the
`ffkv serve` tests (no download, a few seconds on 2 CPU cores). Built once per test session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CORPUS = [
    "The river flows through the old city of Paris and past the cathedral.",
    "Paris is the capital of France. Its river is called the Seine.",
    "A small boat drifted down the river at night. The water was cold.",
    "Mountains rise above the valley, and snow covers the highest peaks in winter.",
    "The museum opened a new exhibition about ancient Egypt and the river Nile.",
    "Berlin is the capital of Germany. Many rivers cross the country.",
    "Cats sleep for most of the day, while dogs prefer to play outside.",
    "The orchestra played a symphony by Beethoven in the great hall.",
    "Rain fell on the city for three days, and the river rose quickly.",
    "Scientists measured the temperature of the ocean near the coast.",
    "The train to Rome leaves the station at seven in the morning.",
    "Football is the most popular sport in many countries of Europe.",
    "She wrote a long letter to her brother who lived in London.",
    "The computer program sorted a million numbers in under a second.",
    "Bread, cheese and wine were served at the small village festival.",
    "The bridge over the river was built of stone in the twelfth century.",
    "Madrid is the capital of Spain, and Lisbon is the capital of Portugal.",
    "Birds migrate south when the days become shorter in autumn.",
    "The library holds thousands of books about history and science.",
    "A strong wind blew across the harbour and the ships stayed in port.",
    "Children learned to count, to read and to write at the village school.",
    "The king of the old kingdom lived in a castle above the river.",
    "Coffee and tea are the most common drinks served in the morning.",
    "The doctor told the patient to rest for a week and drink water.",
]
TOKENIZER_VOCAB = 420
SPECIAL = "<|endoftext|>"
EXPLAINED_SCAN_TOKENS = 300
"""Token budget of the explained atlas's scan: about two thirds of the corpus; the rest is held out."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(atlas: Path, *args: str, host: str = "127.0.0.1", log: Path | None = None,
                   ready_headers: dict | None = None, timeout: float = 120):
    """`ffkv serve ATLAS --host HOST --port P ARGS...` in a subprocess; yields (base URL, log path) once
    /api/health answers 200; stops it afterwards."""
    import httpx

    port = free_port(host)
    log = log or Path(atlas).parent / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ffkv", "serve", str(atlas), "--host", host, "--port",
                                 str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://{host}:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ffkv serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(base + "/api/health", headers=ready_headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ffkv serve did not answer in {timeout:.0f} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_tiny_model(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL,
                                        unk_token=SPECIAL, pad_token=SPECIAL)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return directory


def build_tiny_atlas(base: Path) -> tuple[Path, Path]:
    """(model directory, atlas directory) under ``base``; reused when already there."""
    import ffkv

    model_dir, atlas_dir = base / "model", base / "atlas"
    if (atlas_dir / "manifest.json").exists():
        return model_dir, atlas_dir
    build_tiny_model(model_dir)
    corpus = base / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    config = ffkv.ScanConfig(model=str(model_dir), corpus=str(corpus), top_k=8, value_top=10, max_length=64,
                             batch_tokens=1024, checkpoint_every=1e9)
    ffkv.scan(model=ffkv.load_model(str(model_dir)), corpus=ffkv.load_corpus(str(corpus)), out=atlas_dir,
              config=config, progress=False)
    return model_dir, atlas_dir


def build_explained_atlas(base: Path) -> tuple[Path, Path]:
    """(model directory, atlas directory) of an atlas of the tiny model that scanned part of the corpus only (the
    rest is held out), with `ffkv explain`'s explanations.parquet and explanation_vectors.npy; reused when there."""
    import ffkv
    from ffkv.analysis.explain import FILE, explain
    from ffkv.analysis.patterns import ExplainConfig

    model_dir, _ = build_tiny_atlas(base)
    atlas_dir = base / "explained"
    if (atlas_dir / FILE).exists():
        return model_dir, atlas_dir
    corpus = base / "corpus.txt"
    config = ffkv.ScanConfig(model=str(model_dir), corpus=str(corpus), top_k=8, value_top=10, max_length=64,
                             batch_tokens=1024, checkpoint_every=1e9, max_tokens=EXPLAINED_SCAN_TOKENS)
    loaded = ffkv.load_model(str(model_dir))
    ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus)), out=atlas_dir, config=config, progress=False)
    explain(atlas_dir, ExplainConfig(triggers=8, heldout_tokens=120, heldout_random=40, heldout_top=5,
                                     null_sets=100), model=loaded, progress=False)
    return model_dir, atlas_dir
