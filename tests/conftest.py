"""Shared fixtures: tiny random models of every supported architecture, a test-time tokenizer and a small
corpus, all built locally (no downloads). Everything expensive is session-scoped and built on demand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ffkv
from ffkv.arch import ARCHITECTURES

# One thread: tiny models run fastest so, and on a 2-core machine shared with other jobs, two threads can
# make even the real default model's forwards 5-20x slower.
torch.set_num_threads(1)

HIDDEN = 32
D_FF = 64
VOCAB = 320
N_LAYERS = 3
MAX_POSITIONS = 256

# Architectures whose tiny tokenizer prepends a BOS token (exercises the special prefix / n_special).
BOS_ARCHS = {"llama", "mistral", "gemma3_text", "opt"}

DOCUMENTS = [
    {"title": "Cats", "topic": "animals",
     "text": "The cat sat on the mat. It watched the birds outside the window all afternoon. "
             "Cats sleep for most of the day."},
    {"title": "Paris", "topic": "places",
     "text": "Paris is the capital of France. The river Seine flows through the city."},
    {"title": "Dogs", "topic": "animals",
     "text": "Dogs bark at strangers. A loyal dog will follow its owner everywhere, even into the cold "
             "rain of a long winter evening."},
    {"title": "Coffee", "topic": "food",
     "text": "Dr. Smith paid $3.50 for a cup of coffee! Was it good? Yes."},
    {"title": "Rivers", "topic": "places",
     "text": "The Nile is one of the longest rivers in the world. It flows north into the sea."},
    {"title": "Music", "topic": "arts",
     "text": "She played the piano every morning before school. Her brother preferred the drums, which "
             "annoyed the neighbours. Music filled the small house."},
    {"title": "Rain", "topic": "weather", "text": "It rained."},
    {"title": "Bread", "topic": "food",
     "text": "Fresh bread smells wonderful. The baker wakes up at four in the morning to prepare the dough, "
             "shape the loaves and light the old stone oven."},
    {"title": "Stars", "topic": "science",
     "text": "On a clear night you can see thousands of stars. Some of them are much larger than the sun."},
    {"title": "Trains", "topic": "travel",
     "text": "The train left the station at noon. Passengers read books, slept, or looked at the green "
             "hills. It arrived late."},
    {"title": "Gardens", "topic": "nature",
     "text": "Tomatoes need plenty of sun and water. The gardener planted roses near the gate."},
    {"title": "Chess", "topic": "games",
     "text": "Chess is a game for two players. Each player starts with sixteen pieces. The queen is the "
             "most powerful piece on the board, and the king must be protected at all costs."},
    {"title": "Oceans", "topic": "nature",
     "text": "Whales sing songs that travel for many miles under the water. The ocean covers most of the "
             "planet. Deep below the surface, strange fish glow in the dark."},
    {"title": "Books", "topic": "arts",
     "text": "A good book can change the way you see the world."},
]

EXTRA_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Winter is cold and summer is warm.",
    "Children played in the park until the sun went down.",
    "The old man walked slowly to the market to buy apples and bread.",
    "Scientists study the stars, the oceans and the smallest living things.",
]


def tiny_config(arch: str, vocab_size: int = VOCAB, n_layers: int = N_LAYERS):
    """A tiny config of each supported architecture (bos/eos/pad ids inside the tiny vocabulary)."""
    import transformers as T

    ids = dict(bos_token_id=0, eos_token_id=0, vocab_size=vocab_size)
    decoder = dict(num_hidden_layers=n_layers, hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=D_FF, max_position_embeddings=MAX_POSITIONS, initializer_range=0.1, **ids)
    configs = {
        "gpt2": lambda: T.GPT2Config(n_layer=n_layers, n_embd=HIDDEN, n_head=2, n_inner=D_FF,
                                     n_positions=MAX_POSITIONS, initializer_range=0.1, **ids),
        "gpt_neo": lambda: T.GPTNeoConfig(num_layers=n_layers, hidden_size=HIDDEN, num_heads=2,
                                          max_position_embeddings=MAX_POSITIONS, intermediate_size=D_FF,
                                          attention_types=[[["global", "local"], n_layers // 2],
                                                           [["global"], n_layers % 2]],
                                          window_size=8, initializer_range=0.1, **ids),
        "gptj": lambda: T.GPTJConfig(n_layer=n_layers, n_embd=HIDDEN, n_head=2, n_inner=D_FF, rotary_dim=8,
                                     n_positions=MAX_POSITIONS, initializer_range=0.1, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=HIDDEN, num_attention_heads=2,
                                            intermediate_size=D_FF, max_position_embeddings=MAX_POSITIONS,
                                            initializer_range=0.1, **ids),
        "opt": lambda: T.OPTConfig(num_hidden_layers=n_layers, hidden_size=HIDDEN, num_attention_heads=2,
                                   ffn_dim=D_FF, max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=HIDDEN,
                                   init_std=0.1, pad_token_id=1, **ids),
        "llama": lambda: T.LlamaConfig(**decoder),
        "mistral": lambda: T.MistralConfig(**decoder),
        "qwen2": lambda: T.Qwen2Config(**decoder),
        "gemma3_text": lambda: T.Gemma3TextConfig(head_dim=16, sliding_window=8, **decoder),
    }
    if arch not in configs:
        raise KeyError(f"no tiny config for architecture {arch!r}: add one to tests/conftest.py")
    return configs[arch]()


def train_tokenizer(bos: bool, vocab_size: int = VOCAB):
    """Byte-level BPE trained on the test corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [d["text"] for d in DOCUMENTS] + EXTRA_TRAINING_TEXT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= vocab_size
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def build_tiny_model(arch: str, seed: int = 0, n_layers: int = N_LAYERS):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers=n_layers))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizers():
    return {"plain": train_tokenizer(bos=False), "bos": train_tokenizer(bos=True)}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizers):
    """arch -> directory holding a saved tiny random model and its tokenizer (built once per session)."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            d = tmp_path_factory.mktemp(f"model-{arch}")
            # a different seed per architecture: llama and mistral share a layout and would otherwise be
            # the very same weights
            build_tiny_model(arch, seed=sorted(ARCHITECTURES).index(arch)).save_pretrained(d)
            tokenizers["bos" if arch in BOS_ARCHS else "plain"].save_pretrained(d)
            cache[arch] = d
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """arch -> ffkv LoadedModel in float64, loaded from its directory through ``ffkv.load_model``."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = ffkv.load_model(str(tiny_model_dir(arch)), dtype="float64")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n".join(d["text"] for d in DOCUMENTS) + "\n\n")
    return path


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    lines = [json.dumps(d) for d in DOCUMENTS]
    lines.insert(3, "")  # blank lines are allowed
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def all_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


UNSUPPORTED = {
    "bloom": lambda T: T.BloomConfig(n_layer=2, hidden_size=HIDDEN, n_head=2, vocab_size=VOCAB),
    "falcon": lambda T: T.FalconConfig(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=2,
                                       vocab_size=VOCAB),
}


@pytest.fixture(scope="session")
def unsupported_model_dir(tmp_path_factory, tokenizers):
    """model_type -> directory of a saved tiny causal LM of an architecture ffkv does not support."""
    import transformers as T

    cache: dict[str, Path] = {}

    def get(model_type: str = "bloom") -> Path:
        if model_type not in cache:
            d = tmp_path_factory.mktemp(f"unsupported-{model_type}")
            torch.manual_seed(0)
            T.AutoModelForCausalLM.from_config(UNSUPPORTED[model_type](T)).save_pretrained(d)
            tokenizers["plain"].save_pretrained(d)
            cache[model_type] = d
        return cache[model_type]

    return get
