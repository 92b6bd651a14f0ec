"""On a GPU: scan throughput against a bare forward of the same model body (ratio), for the embedded model
and for a larger Llama-shaped config with random weights. Runs in a few minutes.

    python benchmarks/gpu_scan.py [--dtype bfloat16] [--tokens 60000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from scan_vs_forward import timed_rounds  # same directory

from ffkv.arch import ModelParts
from ffkv.corpus import build_token_store, load_corpus
from ffkv.models import LoadedModel, load_model
from ffkv.scan import plan_batches, select_units


def random_llama(tokenizer, dtype: torch.dtype, device: str) -> LoadedModel:
    """About 1.1B parameters (TinyLlama's shape), random weights: the hooks see realistic tensor sizes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, "random-llama-1.1b", ModelParts(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU path")
    dtype = getattr(torch, args.dtype)
    small = load_model("default", device="cuda", dtype=args.dtype)
    print(f"device {torch.cuda.get_device_name()}, dtype {args.dtype}, {args.tokens} tokens x {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        store = build_token_store(load_corpus("default"), small.tokenizer, "sentence", 256, tmp)
        units = select_units(store, args.tokens, seed=0)
        batches = plan_batches(store, units, args.batch_tokens, 512)
        for model in (small, random_llama(small.tokenizer, dtype, "cuda")):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            bare, scan, n = timed_rounds(model, store, batches, args.rounds, 50, sync=torch.cuda.synchronize)
            print(f"{model.name:>22}: bare {n * args.rounds / bare:10.0f} tok/s, scan {n * args.rounds / scan:10.0f} "
                  f"tok/s, ratio {bare / scan:.3f}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            del model


if __name__ == "__main__":
    main()
