"""Speed of the analyses against a bare forward of the same prefixes, in one process (this machine is shared
and noisy: read the ratios, not the seconds).

Token removal (Fig 3): the prefixes are the trigger variants (first / last / random token removed) of the
sampled keys. Three ways over the same variants:

* ``bare``: the model body on every variant prefix, no hooks, full depth (the floor of the naive method);
* ``per-prefix``: every variant prefix run on its own, packed by layer group and length, each batch stopping
  after its highest layer (ffkv before unit sharing);
* ``ffkv``: ``analysis.keys`` — one forward per unit serves every trigger of that unit (see its docstring).

Also checks that ``per-prefix`` and ``ffkv`` give the same coefficients (the same removed random positions).
Aggregation (Figs 7-11): the experiment against a bare forward of its held-out prefixes.

    python benchmarks/analyses.py ATLAS [--removal-keys 4] [--removal-triggers 8] [--examples 1000]
                                        [--only removal,aggregation]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ffkv.analysis.aggregation import aggregation_experiment, sample_prefixes
from ffkv.analysis.keys import removal_variants, run_variants, sample_triggers
from ffkv.atlas import Atlas
from ffkv.capture import last_position_coefficients, pack_sorted, pad_right
from ffkv.models import load_model


@torch.inference_mode()
def bare_forward(model, sequences, batch_tokens: int = 4096, max_batch: int = 64) -> float:
    """Seconds of the model body, full depth and no hooks, over ``sequences`` packed by length."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    t = time.perf_counter()
    for batch in pack_sorted([len(sequences[i]) for i in order], batch_tokens, max_batch):
        ids, _ = pad_right([sequences[order[j]] for j in batch])
        model.parts.body(input_ids=ids.to(model.device), use_cache=False)
    return time.perf_counter() - t


def explicit_prefixes(store, sample, dropped) -> tuple[list[list[int]], list[int], list[str]]:
    """Every removal as its own prefix (what ``removal_variants`` shares between the triggers of a unit)."""
    seqs, which, kinds = [], [], []
    for i in range(len(sample)):
        end = sample.end[i]
        if end < 1:
            continue
        tokens = store.unit_tokens(sample.unit[i]).tolist()
        skip = int(store.n_special[sample.unit[i]])
        special, content = tokens[:skip], tokens[skip: skip + end + 1]
        variants = [("first", special + content[1:]), ("last", special + content[:-1])]
        if i in dropped:
            r = dropped[i]
            variants.append(("random", special + content[:r] + content[r + 1:]))
        for kind, ids in variants:
            seqs.append(ids)
            which.append(i)
            kinds.append(kind)
    return seqs, which, kinds


def removal(atlas, model, keys: int, triggers: int, seed: int = 0) -> None:
    sample, _ = sample_triggers(atlas, atlas.faces, keys, triggers, seed)
    variants, dropped = removal_variants(atlas.store, sample, seed)
    seqs, which, kinds = explicit_prefixes(atlas.store, sample, dropped)
    layers = [sample.layer[i] for i in which]
    keys_of = [sample.key[i] for i in which]
    n_tokens = sum(len(s) for s in seqs)
    print(f"token removal: {keys} keys x {triggers} triggers per layer and face = {len(sample):,} triggers, "
          f"{len(seqs):,} variant prefixes ({n_tokens:,} tokens) in {len(set(sample.unit)):,} units; ffkv runs "
          f"{len(variants):,} sequences ({sum(len(v.ids) for v in variants):,} tokens)")
    bare = bare_forward(model, seqs)
    t = time.perf_counter()
    per_prefix = last_position_coefficients(model.parts, seqs, layers, keys_of, device=model.device).double().numpy()
    t_prefix = time.perf_counter() - t
    t = time.perf_counter()
    shared = run_variants(model, sample, variants)
    t_shared = time.perf_counter() - t
    ours = np.array([shared[k][i] for i, k in zip(which, kinds)])
    worst = float(np.max(np.abs(ours - per_prefix) / np.maximum(np.abs(per_prefix), 1e-6)))
    print(f"  {'way':<11} {'seconds':>8} {'prefixes/s':>11} {'vs bare':>8}")
    for name, sec in (("bare", bare), ("per-prefix", t_prefix), ("ffkv", t_shared)):
        print(f"  {name:<11} {sec:8.1f} {len(seqs) / sec:11.1f} {bare / sec:8.2f}")
    print(f"  same coefficients: largest relative difference per-prefix vs ffkv {worst:.1e}")


def aggregation(atlas, model, examples: int, seed: int = 0) -> None:
    positions = sample_prefixes(atlas, examples, seed)
    seqs = [atlas.store.prefix(int(p))[1] for p in positions]
    bare = bare_forward(model, seqs)
    t = time.perf_counter()
    aggregation_experiment(atlas, model, n_examples=examples, seed=seed, progress=False)
    sec = time.perf_counter() - t
    print(f"aggregation: {examples:,} held-out prefixes ({sum(len(s) for s in seqs):,} tokens): bare forward "
          f"{bare:.1f} s ({examples / bare:.1f} prefixes/s), experiment {sec:.1f} s ({examples / sec:.1f} "
          f"prefixes/s), ratio {bare / sec:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("atlas")
    ap.add_argument("--removal-keys", type=int, default=4)
    ap.add_argument("--removal-triggers", type=int, default=8)
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--only", default="removal,aggregation")
    args = ap.parse_args()
    atlas = Atlas.load(args.atlas)
    model = load_model(atlas.manifest["model"]["name"])
    atlas.check_model(model)
    only = set(args.only.split(","))
    if "removal" in only:
        removal(atlas, model, args.removal_keys, args.removal_triggers)
    if "aggregation" in only:
        aggregation(atlas, model, args.examples)


if __name__ == "__main__":
    main()
