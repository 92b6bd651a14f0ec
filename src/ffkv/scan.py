"""The streaming scan: run the model body over every unit once and keep, for every memory of every
scanned layer, the exact top-k prefixes of both faces and running coefficient statistics.

Exactness and determinism come from three choices:
* units are right-padded and run without an attention mask: with causal attention a position never sees
  the padding after it, so every valid position gets exactly its prefix's coefficients;
* the batch plan (which units go together) depends only on the corpus, the token budget, the seed and
  ``batch_tokens``: resuming, sharding (``--shard``, torchrun) and merging reuse the same batches;
* the accumulators in ``topk`` are exact and associative (see there).
Memory does not grow with the corpus: the state is O(layers x d_ff x k).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .arch import check_memory
from .atlas import Atlas, write_atlas
from .capture import Capture, pack_sorted, pad_right
from .corpus import TokenStore, build_token_store, load_corpus
from .errors import FfkvError
from .models import LoadedModel, load_model
from .topk import LayerState


@dataclass
class ScanConfig:
    """Settings of a scan; every field is also a flag of `ffkv scan` (underscores become dashes)."""

    model: str = field(default="default", metadata={"help": "'default' (SmolLM2-135M-Instruct), a model "
                       "directory, a .gguf file, or ORG/NAME from the local Hugging Face cache"})
    corpus: str = field(default="default", metadata={"help": "'default' (10,033 Wikipedia lead sections), "
                        "FILE.txt (one document per line), FILE.jsonl ({text, title?, topic?}), FILE.parquet, a "
                        "folder of them or a pattern ('DIR/train-*.parquet'), or a `datasets` folder "
                        "(Dataset.save_to_disk): one document per row"})
    text_column: str = field(default="text", metadata={"help": "the column (JSON key) of a .parquet, datasets "
                             "or .jsonl corpus that holds the text; optional 'title' and 'topic' columns are kept"})
    bos: bool = field(default=False, metadata={"help": "feed the tokenizer's BOS token (its EOS where it has no "
                      "BOS) before every unit, never scored, when the tokenizer does not prepend one itself: "
                      "position 0 then holds a special token, as in models trained with one"})
    unit: str = field(default="sentence", metadata={"help": "sentence: every prefix of every sentence (the "
                      "paper); document: every prefix of each document window"})
    top_k: int = field(default=50, metadata={"help": "trigger prefixes kept per memory and face"})
    max_tokens: int | None = field(default=None, metadata={"help": "token budget: scan a seeded random "
                                   "sample of units up to this many tokens (default: the whole corpus)"})
    layers: str | None = field(default=None, metadata={"help": "layers to scan, e.g. '0,5,10-12' "
                               "(0-based; default: all)"})
    max_length: int = field(default=256, metadata={"help": "longest unit in tokens; longer ones are cut "
                            "into consecutive windows, each its own unit"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward batch"})
    max_batch: int = field(default=64, metadata={"help": "most units per forward batch"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N (under torchrun, cuda = "
                        "cuda:LOCAL_RANK) or auto (layers spread over all GPUs with device_map)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or float64"})
    seed: int = field(default=0, metadata={"help": "seed of the unit sample under --max-tokens"})
    value_top: int = field(default=20, metadata={"help": "top vocabulary tokens kept per value and face"})
    checkpoint_every: float = field(default=120.0, metadata={"help": "seconds between checkpoints"})
    shard: str | None = field(default=None, metadata={"help": "scan only part i of n of the batches "
                              "('i/n', 0-based); combine the parts with `ffkv merge`"})

    def plan_key(self) -> dict:
        """The settings that decide what is computed; a checkpoint or a merge requires them equal."""
        d = asdict(self)
        for k in ("device", "checkpoint_every", "shard"):
            d.pop(k)
        return d


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    if spec is None or spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-")
                layers.update(range(int(a), int(b) + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise FfkvError(f"--layers {spec!r}: expected comma-separated layer numbers or ranges like 2-5")
    for layer in sorted(layers):
        check_memory(layer, layers=range(n_layers), d_ff=0, of="model")
    return sorted(layers)


def parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise FfkvError(f"--shard {spec!r}: expected i/n, e.g. 0/2")
    if not (n >= 1 and 0 <= i < n):
        raise FfkvError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def select_units(store: TokenStore, max_tokens: int | None, seed: int) -> np.ndarray:
    """Unit ids to scan: all, or a seeded random sample whose tokens fit in the budget (sorted)."""
    if max_tokens is None:
        return np.arange(store.n_units)
    if max_tokens <= 0:
        raise FfkvError("--max-tokens must be positive")
    order = np.random.default_rng(seed).permutation(store.n_units)
    cumulative = np.cumsum(store.length[order])
    chosen = order[cumulative <= max_tokens]
    if len(chosen) == 0:
        chosen = order[:1]
    return np.sort(chosen)


def plan_batches(store: TokenStore, units: np.ndarray, batch_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Group units of similar length (sorted by length, then id) into batches of bounded padded size."""
    order = units[np.lexsort((units, store.length[units]))]
    return [order[idx] for idx in pack_sorted(store.length[order], batch_tokens, max_batch)]


def make_batch(store: TokenStore, units: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor, int]:
    """Right-padded input ids [B, T]; flat indices of the scored positions (None = all); their global
    positions; the number of scored positions. Special prefix tokens (BOS) are fed but not scored."""
    ids, lengths = pad_right([store.tokens[int(store.offset[u]): int(store.offset[u]) + int(store.length[u])]
                              for u in units])
    width = ids.shape[1]
    flat, positions = [], []
    for row, u in enumerate(units):
        start, length, skip = int(store.offset[u]), int(lengths[row]), int(store.n_special[u])
        flat.append(row * width + np.arange(skip, length))
        positions.append(start + np.arange(skip, length))
    flat_idx = np.concatenate(flat)
    all_valid = len(flat_idx) == ids.numel()
    return (ids.to(device), None if all_valid else torch.from_numpy(flat_idx).to(device),
            torch.from_numpy(np.concatenate(positions)).to(device), len(flat_idx))


class Streamer:
    """Feeds each batch's coefficients, as soon as a layer's exist, to that layer's state (float32), with the
    batch's global positions on the layer's device (layers may sit on several GPUs with device_map)."""

    def __init__(self, states: dict[int, LayerState]):
        self.states = states
        self.positions: dict[torch.device, torch.Tensor] = {}

    def batch(self, positions: torch.Tensor) -> None:
        self.positions = {positions.device: positions}

    def __call__(self, layer: int, coefficients: torch.Tensor) -> None:
        device = coefficients.device
        if device not in self.positions:
            self.positions[device] = next(iter(self.positions.values())).to(device)
        self.states[layer].add(coefficients.to(torch.float32), self.positions[device])


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA), with a timeout so a dead rank
    fails the job instead of hanging it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get("FFKV_DIST_TIMEOUT", "600")))
    torch.distributed.init_process_group(backend, timeout=timeout)


def resolve_device(device: str) -> str:
    """'cuda' means this rank's GPU under torchrun; refuse CUDA where there is none."""
    if device.startswith("cuda") or device == "auto":
        if not torch.cuda.is_available():
            raise FfkvError(f"--device {device}: CUDA is not available on this machine")
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def estimate_memory(parts, config: ScanConfig, n_layers: int) -> dict[str, int]:
    """Bytes the scan needs on its device: weights, one batch's activations, the top-k state."""
    weight_bytes = sum(p.numel() * p.element_size() for p in parts.model.parameters())
    elem = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
    t = config.batch_tokens
    heads = getattr(parts.model.config, "num_attention_heads", 1) or 1
    longest = min(config.max_length, t)
    # live at once within a layer: a few d_model-wide states, the FFN's 3 d_ff-wide tensors, eager attention
    # scores (batch x heads x T x T), plus the scan's float32 copy of the coefficients and its masks
    activations = t * (6 * parts.d_model + 3 * parts.d_ff) * elem + (t // longest) * heads * longest**2 * 4 \
        + t * parts.d_ff * (4 + 4 + 1)
    faces = 2 if parts.signed else 1
    state = n_layers * parts.d_ff * (faces * (config.top_k * 8 + 4) + 6 * 8)
    return {"weights": weight_bytes, "activations": activations, "topk_state": state,
            "total": weight_bytes + activations + state}


def _check_fits(parts, config: ScanConfig, n_layers: int, device: str, rank: int, progress: bool) -> None:
    est = estimate_memory(parts, config, n_layers)
    gib = {k: v / 2**30 for k, v in est.items()}
    if rank == 0 and progress:
        print(f"ffkv: memory estimate: {gib['total']:.2f} GiB (weights {gib['weights']:.2f}, batch activations "
              f"{gib['activations']:.2f}, top-k state {gib['topk_state']:.2f})", flush=True)
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if est["total"] > free:
            raise FfkvError(f"the scan needs about {gib['total']:.1f} GiB on {device} but {free / 2**30:.1f} GiB "
                            "are free: lower --batch-tokens, use --dtype bfloat16, scan fewer --layers, or "
                            "spread the model with --device auto")


def _gather_merge(states: dict[int, LayerState], rank: int, world: int) -> None:
    """Merge every rank's state into rank 0's, layer by layer, in rank order."""
    dist = torch.distributed
    for _layer, state in states.items():
        sd = state.state_dict()
        gathered = {}
        for name, tensor in sd.items():
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous())
            gathered[name] = parts
        if rank == 0:
            for r in range(1, world):
                other = LayerState(state.pos.keys.shape[0], state.pos.k, state.neg is not None,
                                   state.pos.keys.device)
                other.load_state_dict({name: parts[r] for name, parts in gathered.items()})
                state.merge(other)


def _checkpoint_path(out: Path, rank: int, world: int, shard: tuple[int, int]) -> Path:
    return out / "checkpoint" / f"part{shard[0]}of{shard[1]}-rank{rank}of{world}.safetensors"


def _save_checkpoint(path: Path, states: dict[int, LayerState], next_batch: int, meta: dict) -> None:
    tensors = {f"layer{layer}.{k}": v.detach().cpu().contiguous()
               for layer, s in states.items() for k, v in s.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"meta": json.dumps(dict(meta, next_batch=next_batch))})
    os.replace(tmp, path)


def _checkpoint_meta(path: Path, plan_key: dict) -> dict:
    """A checkpoint's metadata, refused unless it was made with the settings ``plan_key``."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    # a setting added after the checkpoint was written is taken at its default, which the scan then had
    plan = {**ScanConfig().plan_key(), **(meta.get("plan") or {})}
    if plan != plan_key:
        diff = sorted(k for k in plan_key.keys() | plan.keys() if plan.get(k) != plan_key.get(k))
        raise FfkvError(f"the checkpoint in {path.parent} was made with other settings ({', '.join(diff)}); use "
                        "the same settings to resume, or --force to start over")
    return meta


def _load_checkpoint(path: Path, states: dict[int, LayerState], plan_key: dict) -> tuple[int, dict]:
    meta = _checkpoint_meta(path, plan_key)
    tensors = load_file(path)
    for layer, s in states.items():
        prefix = f"layer{layer}."
        s.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return int(meta["next_batch"]), meta


@dataclass
class ScanPlan:
    """What a scan (or one rank or shard of it) covers: decided by the corpus and the settings alone."""

    layers: list[int]
    units: np.ndarray  # units scanned by the whole job (the rest of the store is held out)
    batches: list[np.ndarray]  # units of each forward batch, for the whole job
    mine: list[int]  # indices of the batches this process runs
    n_positions: int  # scored positions of the whole job


def _prepare_out(out: Path, config: ScanConfig, resume: bool, force: bool, rank: int) -> None:
    """Refuse to overwrite a finished atlas or an unfinished scan unless asked; with ``force``, clear them."""
    if (out / "manifest.json").exists() and not force:
        raise FfkvError(f"{out} already holds a finished atlas; use --force to overwrite it")
    ckpt_dir = out / "checkpoint"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not (resume or force):
        raise FfkvError(f"{out} holds an unfinished scan; add --resume to continue it or --force to start over")
    if config.top_k < 1:
        raise FfkvError("--top-k must be at least 1")
    if rank == 0 and force and out.exists():
        (out / "manifest.json").unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def plan_scan(store: TokenStore, config: ScanConfig, n_layers: int, worker: int, n_workers: int) -> ScanPlan:
    units = select_units(store, config.max_tokens, config.seed)
    batches = plan_batches(store, units, config.batch_tokens, config.max_batch)
    return ScanPlan(layers=parse_layers(config.layers, n_layers), units=units, batches=batches,
                    mine=list(range(worker, len(batches), n_workers)),
                    n_positions=int((store.length[units] - store.n_special[units]).sum()))


def run_batches(model: LoadedModel, store: TokenStore, plan: ScanPlan, states: dict[int, LayerState], ckpt: Path,
                meta: dict, start: int, checkpoint_every: float, progress: bool, label: str,
                stop_after_batches: int | None = None) -> dict | None:
    """Run this process's batches from ``start`` through the one capture pass, checkpointing every
    ``checkpoint_every`` seconds. Returns the final ``meta`` (tokens, seconds), or None when stopped early."""
    store_positions = store.length - store.n_special
    my_positions = sum(int(store_positions[plan.batches[b]].sum()) for b in plan.mine)
    bar = tqdm(total=my_positions, initial=meta["tokens"], unit="tok", unit_scale=True, smoothing=0.05, desc=label,
               disable=not progress, dynamic_ncols=True)
    began, last_ckpt = time.time(), time.time()
    seconds_before, tokens = meta["seconds"], meta["tokens"]
    streamer = Streamer(states)
    try:
        with Capture(model.parts, states, on_coefficients=streamer) as capture, torch.inference_mode():
            for i in range(start, len(plan.mine)):
                ids, valid, positions, n = make_batch(store, plan.batches[plan.mine[i]], model.device)
                streamer.batch(positions)
                capture.run(ids, valid)
                tokens += n
                bar.update(n)
                done = i + 1
                stop = stop_after_batches is not None and done - start >= stop_after_batches
                if time.time() - last_ckpt >= checkpoint_every or (stop and done < len(plan.mine)):
                    meta = dict(meta, seconds=seconds_before + time.time() - began, tokens=tokens)
                    _save_checkpoint(ckpt, states, done, meta)
                    last_ckpt = time.time()
                if stop and done < len(plan.mine):
                    return None
    finally:
        bar.close()
    return dict(meta, seconds=seconds_before + time.time() - began, tokens=tokens)


def scan(model: LoadedModel | str | None = None, corpus=None, out: str | Path = "atlas",
         config: ScanConfig | None = None, resume: bool = False, force: bool = False,
         progress: bool = True, stop_after_batches: int | None = None) -> Atlas | None:
    """Scan ``corpus`` with ``model`` and write an atlas to ``out``; returns the ``Atlas`` (on rank 0).

    ``model``/``corpus`` may be loaded objects or the strings the CLI takes (default: from ``config``).
    ``stop_after_batches`` stops early after a checkpoint, as a kill would (used to test resumption).
    Stages: prepare the output, load, plan, run (resumable), gather the ranks, write.
    """
    config = config or ScanConfig()
    out = Path(out)
    init_distributed(config.device)
    rank, world = _dist_info()
    device = resolve_device(config.device)
    shard = parse_shard(config.shard)
    if world > 1 and shard != (0, 1):
        raise FfkvError("--shard and torchrun are two ways to split a scan; use one")
    _prepare_out(out, config, resume, force, rank)

    ckpt = _checkpoint_path(out, rank, world, shard)
    if resume and ckpt.exists():  # before the token store is rebuilt for other settings
        _checkpoint_meta(ckpt, config.plan_key())
    if corpus is None or isinstance(corpus, str):  # before the model: a bad corpus fails fast
        corpus = load_corpus(corpus or config.corpus, config.text_column)
    if model is None or isinstance(model, str):
        model = load_model(model or config.model, device=device, dtype=config.dtype)
    parts = model.parts
    parse_layers(config.layers, parts.n_layers)  # a bad --layers fails before the token store is built

    # Rank 0 builds the token store; the others wait for it and read the same files.
    if rank == 0:
        store = build_token_store(corpus, model.tokenizer, config.unit, config.max_length, out / "store",
                                  bos=config.bos)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        store = TokenStore(out / "store")
    worker, n_workers = (rank, world) if world > 1 else shard
    plan = plan_scan(store, config, parts.n_layers, worker, n_workers)

    _check_fits(parts, config, len(plan.layers), str(model.device), rank, progress)
    # each layer's state lives where that layer runs (one device, or several with --device auto)
    states = {layer: LayerState(parts.d_ff, config.top_k, parts.signed, parts.ffn_out(layer).weight.device)
              for layer in plan.layers}
    meta = {"plan": config.plan_key(), "seconds": 0.0, "tokens": 0}
    start = 0
    if resume and ckpt.exists():
        start, meta = _load_checkpoint(ckpt, states, meta["plan"])
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    label = f"scan {len(plan.layers)} layers" + (f" ({world} ranks, rank 0 shown)" if world > 1 else "")
    meta = run_batches(model, store, plan, states, ckpt, meta, start, config.checkpoint_every,
                       progress and rank == 0, label, stop_after_batches)
    if meta is None:
        return None
    tokens, seconds = meta["tokens"], meta["seconds"]
    my_units = sum(len(plan.batches[b]) for b in plan.mine)

    if world > 1:
        totals = torch.tensor([tokens, seconds, my_units], dtype=torch.float64, device=model.device)
        torch.distributed.all_reduce(totals)
        _gather_merge(states, rank, world)
        tokens, seconds, my_units = int(totals[0]), float(totals[1]) / world, int(totals[2])
        if rank != 0:
            torch.distributed.barrier()
            return None
    nonfinite = {layer: int(state.stats.nonfinite.sum()) for layer, state in states.items()}
    if any(nonfinite.values()):
        worst = max(nonfinite, key=nonfinite.get)
        key = int(states[worst].stats.nonfinite.argmax())
        print(f"ffkv: warning: {sum(nonfinite.values())} non-finite coefficients (NaN or inf) were skipped, in "
              f"{sum(1 for v in nonfinite.values() if v)} layers (most in layer {worst}, e.g. key {key}); the top-k "
              f"and statistics cover the finite ones (try --dtype float32)", flush=True)
    if config.top_k > plan.n_positions:
        print(f"ffkv: warning: --top-k {config.top_k} exceeds the {plan.n_positions} positions scanned; "
              "memories keep what there is (empty slots have position -1)")
    write_atlas(out, model, store, states, config, plan.units, shard=shard, world=world,
                result={"units_scanned": my_units, "tokens_scanned": int(tokens),
                        "positions_total": plan.n_positions, "batches": len(plan.batches),
                        "seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
                        "nonfinite_coefficients": sum(nonfinite.values())},
                progress=progress)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return Atlas.load(out)
