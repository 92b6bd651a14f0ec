"""Scan throughput against a bare forward of the same model body, in one process, over the same units and
batches (interleaved rounds, so machine noise hits both alike). Prints the ratio; the goal is >= 0.95.

Then, in fresh subprocesses, the peak resident memory of whole scans at growing token budgets: it must
stay flat (the scan's state is layers x d_ff x k, independent of the corpus).

Then, per layer, what the atlas's value lists cost (``projection.project_values``: both projections, both faces,
top ``--value-top`` tokens, in vocabulary chunks) against the matmul floor (the same products, nothing kept), with
the peak resident memory each adds: with a 262k vocabulary (Gemma 3) this is most of an atlas's writing time.

    python benchmarks/scan_vs_forward.py [--model default] [--tokens 6000] [--rounds 3] [--projection-layers 0,9]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

import torch

from ffkv.capture import Capture
from ffkv.corpus import build_token_store, load_corpus
from ffkv.models import load_model
from ffkv.projection import VOCAB_CHUNK, ProductBuffer, product_rows, project_values, unembedding, value_vectors
from ffkv.scan import Streamer, make_batch, plan_batches, select_units
from ffkv.topk import LayerState


def timed_rounds(model, store, batches, rounds: int, top_k: int, sync=lambda: None) -> tuple[float, float, int]:
    """Seconds of the bare body forward and of the scan over the same batches, interleaved per round."""
    parts = model.parts
    inputs = [make_batch(store, b, model.device) for b in batches]
    n_tokens = sum(x[3] for x in inputs)
    bare = scan = 0.0
    with torch.inference_mode():
        parts.body(input_ids=inputs[0][0], use_cache=False)  # warm-up
        for _ in range(rounds):
            sync()
            t = time.perf_counter()
            for ids, _, _, _ in inputs:
                parts.body(input_ids=ids, use_cache=False)
            sync()
            bare += time.perf_counter() - t
            states = {layer: LayerState(parts.d_ff, top_k, parts.signed, model.device)
                      for layer in range(parts.n_layers)}
            sync()
            t = time.perf_counter()
            streamer = Streamer(states)
            with Capture(parts, states, on_coefficients=streamer) as capture:
                for ids, valid, positions, _ in inputs:
                    streamer.batch(positions)
                    capture.run(ids, valid)
            sync()
            scan += time.perf_counter() - t
    return bare, scan, n_tokens


def peak_rss_mb(model: str, budget: int) -> float:
    code = (
        "import tempfile, ffkv\n"
        f"ffkv.scan(model={model!r}, out=tempfile.mkdtemp(), progress=False, "
        f"config=ffkv.ScanConfig(max_tokens={budget}, value_top=1))\n"
        # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's image
        "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def measured(fn, *args) -> tuple[float, float, int]:
    """(seconds, MB of resident memory above the start at the peak, minor page faults) of ``fn(*args)``; Linux
    resets the peak (VmHWM) when 5 is written to /proc/self/clear_refs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds, (_status_kb("VmHWM") - before) / 1024, faults


@torch.inference_mode()
def matmul_floor(parts, layer: int) -> None:
    """The products ``project_values`` makes (same chunks and shapes), results dropped: its lower bound."""
    e = unembedding(parts, torch.float32)
    buffer = ProductBuffer()
    for normed in (False, True):
        values = value_vectors(parts, layer, normed=normed, dtype=torch.float32)
        rows = product_rows(values.shape[0], e.shape[0], values.device)
        for start in range(0, values.shape[0], rows):
            for col in range(0, e.shape[0], VOCAB_CHUNK):
                buffer.product(values[start: start + rows], e[col: col + VOCAB_CHUNK].T)


def projection_costs(model, layers: list[int], value_top: int) -> None:
    parts = model.parts
    vocab = parts.unembedding.shape[0]
    print(f"value lists per layer: {parts.d_ff} memories x {vocab} tokens, raw and normed, top {value_top} of "
          f"both faces, vocabulary chunks of {VOCAB_CHUNK}")
    print("  layer   floor s  lists s  lists/floor  floor peak MB  lists peak MB  lists page faults")
    matmul_floor(parts, layers[0])  # warm-up
    for layer in layers:
        floor_s, floor_mb, _ = measured(matmul_floor, parts, layer)
        lists_s, lists_mb, faults = measured(project_values, parts, layer, value_top)
        print(f"  {layer:>5}  {floor_s:8.2f} {lists_s:8.2f}  {lists_s / floor_s:11.2f}  {floor_mb:13.0f}  "
              f"{lists_mb:13.0f}  {faults:17d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=20000, help="tokens per round (a whole scan from a cold state)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--memory-budgets", default="8000,32000",
                    help="token budgets for the peak-memory check ('' to skip)")
    ap.add_argument("--projection-layers", default="0",
                    help="layers whose value lists are timed against the matmul floor ('' to skip)")
    ap.add_argument("--value-top", type=int, default=20)
    ap.add_argument("--no-scan", action="store_true", help="skip the scan throughput and memory checks")
    args = ap.parse_args()

    model = load_model(args.model)
    if args.projection_layers:
        projection_costs(model, [int(x) for x in args.projection_layers.split(",")], args.value_top)
    if args.no_scan:
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = build_token_store(load_corpus("default"), model.tokenizer, "sentence", 256, tmp)
        units = select_units(store, args.tokens, seed=0)
        batches = plan_batches(store, units, args.batch_tokens, 64)
        bare, scan, n = timed_rounds(model, store, batches, args.rounds, args.top_k)
    print(f"model {args.model}: {n} tokens x {args.rounds} rounds, {len(batches)} batches, "
          f"{torch.get_num_threads()} threads")
    print(f"bare body forward : {n * args.rounds / bare:8.1f} tok/s")
    print(f"scan (all layers) : {n * args.rounds / scan:8.1f} tok/s")
    print(f"ratio scan/forward: {bare / scan:.3f}  (goal >= 0.95)")

    if args.memory_budgets:
        print("peak RSS of a whole scan (fresh process) by token budget:")
        for budget in (int(b) for b in args.memory_budgets.split(",")):
            print(f"  {budget:>8} tokens: {peak_rss_mb(args.model, budget):8.0f} MB")
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
