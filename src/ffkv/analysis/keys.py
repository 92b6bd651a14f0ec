"""§3 of the paper: token removal (Fig 3). The trigger patterns of Fig 2 and Table 1 come from `ffkv explain`
(``analysis.explain``).

For each sampled key (``removal_keys`` per layer and face) and each of its top ``removal_triggers`` triggers, the
first, the last or a random inner token of the trigger prefix is removed and the coefficient is read again at
the prefix's new last position. Three statistics per layer: the paper's mean relative change (new - old) / old,
the median, and the share of triggers whose coefficient changes sign — SiLU/GELU coefficients can cross zero, so
a mean can fall below -100 %, which ReLU's cannot.

Cost: prefixes of one unit share their forward passes. With causal attention a prefix's coefficient at its last
position is the coefficient at that position of any longer sequence that starts with the same tokens, so

* "last": one forward of the unit (cut after its longest trigger) gives, at position p - 1, the coefficient of
  every trigger ending at p with its last token removed;
* "first": one forward of the unit without its first content token does the same for every trigger;
* "random": a trigger ending at p loses a token drawn uniformly from its inner positions 1 .. p-1. Per unit, one
  position r is drawn uniformly from 1 .. P-1 (P the longest pending trigger's end); the forward of the unit without
  r serves every pending trigger with p > r, for which r is uniform on 1 .. p-1 (a uniform draw conditioned on
  r < p), exactly the per-trigger distribution; triggers with p <= r wait for the next draw (P shrinks to theirs).
  Triggers of one unit may share a removed position; the intervals still resample triggers.

A shared sequence runs as deep as the deepest layer it serves and as long as its longest trigger; where running
the triggers' own prefixes, each as deep as its own layer, costs fewer token-layers, they run on their own (same
removed positions, so the same numbers). Sequences are packed by depth group, then length: each batch stops
after its highest layer. Special prefix tokens (BOS) are kept and never removed; positions are counted after them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import Capture, pack_sorted, pad_right
from .intervals import bootstrap, wilson

KINDS = ("first", "last", "random")


def sample_keys(d_ff: int, n: int, seed: int, layer: int, face: str) -> list[int]:
    rng = random.Random(f"{seed}-{layer}-{face}")
    return sorted(rng.sample(range(d_ff), min(n, d_ff)))


@dataclass
class RemovalSample:
    """The triggers of the sampled keys, one entry per trigger (parallel arrays)."""

    face: list[str] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    key: list[int] = field(default_factory=list)
    unit: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    """Index of the trigger's last token among the unit's content tokens (after the special prefix)."""
    score: list[float] = field(default_factory=list)

    def add(self, face, layer, key, unit, end, score):
        for name, v in zip(("face", "layer", "key", "unit", "end", "score"), (face, layer, key, unit, end, score)):
            getattr(self, name).append(v)

    def __len__(self) -> int:
        return len(self.layer)


def sample_triggers(atlas, faces, keys_per_layer: int, n_triggers: int, seed: int) -> tuple[RemovalSample, dict]:
    """The triggers of ``keys_per_layer`` keys per layer and face (seeded), and per (face, layer) the number
    of keys and of triggers skipped (a zero coefficient, whose relative change is undefined, or none left)."""
    sample = RemovalSample()
    stats = {}
    store = atlas.store
    for face in faces:
        for layer in atlas.layers:
            t = atlas.layer_tensors(layer)
            keys = sample_keys(atlas.d_ff, keys_per_layer, seed + 1, layer, face)
            skipped = 0
            for key in keys:
                scores = t[f"{face}_scores"][key][:n_triggers].double().tolist()
                positions = t[f"{face}_positions"][key][:n_triggers].tolist()
                for s, pos in zip(scores, positions):
                    if pos < 0:
                        break
                    if s == 0:
                        skipped += 1
                        continue
                    unit = int(store.unit_of(np.array([pos]))[0])
                    end = pos - int(store.offset[unit]) - int(store.n_special[unit])
                    sample.add(face, layer, key, unit, end, s)
            stats[face, layer] = {"n_keys": len(keys), "skipped": skipped}
    return sample, stats


@dataclass
class Variant:
    """One sequence to run and what to read from it: sample index, kind, sequence index of the new last token."""

    ids: list[int]
    reads: list[tuple[int, str, int]]


def removal_variants(store, sample: RemovalSample, seed: int, share: bool | None = None
                     ) -> tuple[list[Variant], dict[int, int]]:
    """The sequences of every removal (see the module docstring), and the content index of the token each random
    removal dropped (sample index -> index), for tests and audits. ``share``: True / False forces one sequence
    per unit and removal / one per trigger; None (default) takes whichever costs fewer token-layers."""
    by_unit: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(sample.unit):
        by_unit[u].append(i)
    variants, dropped = [], {}

    def emit(special: list[int], content: list[int], kind: str, served: list[int], r: int = 0) -> None:
        skip = len(special)

        def ids_upto(end: int) -> list[int]:
            """The removal's sequence, cut after the token that was at content index ``end``."""
            kept = content[:end] if kind == "last" else content[1: end + 1] if kind == "first" else \
                content[:r] + content[r + 1: end + 1]
            return special + kept

        top = max(sample.end[i] for i in served)
        shared_cost = (skip + top) * (max(sample.layer[i] for i in served) + 1)
        own_cost = sum((skip + sample.end[i]) * (sample.layer[i] + 1) for i in served)
        if share or (share is None and shared_cost <= own_cost):
            variants.append(Variant(ids_upto(top), [(i, kind, skip + sample.end[i] - 1) for i in served]))
        else:
            variants.extend(Variant(ids_upto(sample.end[i]), [(i, kind, skip + sample.end[i] - 1)]) for i in served)

    for unit in sorted(by_unit):
        tokens = store.unit_tokens(unit).tolist()
        skip = int(store.n_special[unit])
        special, content = tokens[:skip], tokens[skip:]
        members = [i for i in by_unit[unit] if sample.end[i] >= 1]  # a one-token prefix has nothing to remove
        if not members:
            continue
        emit(special, content, "last", members)
        emit(special, content, "first", members)
        rng = random.Random(f"{seed}-random-{unit}")
        pending = [i for i in members if sample.end[i] >= 2]
        while pending:
            top = max(sample.end[i] for i in pending)
            r = rng.randint(1, top - 1)
            served = [i for i in pending if sample.end[i] > r]
            emit(special, content, "random", served, r)
            dropped.update({i: r for i in served})
            pending = [i for i in pending if sample.end[i] <= r]
    return variants, dropped


@torch.inference_mode()
def run_variants(model, sample: RemovalSample, variants: list[Variant], batch_tokens: int = 4096,
                 max_batch: int = 64, layer_group: int = 5, progress=None) -> dict[str, np.ndarray]:
    """Per kind, [len(sample)] float64 new coefficients (NaN where a trigger has no such removal). Variants are
    grouped by the deepest layer they serve (groups of ``layer_group`` layers), sorted by length and packed; each
    batch reads its positions as soon as a layer's coefficients exist and stops after the highest layer it needs."""
    new = {k: np.full(len(sample), np.nan) for k in KINDS}
    layer_of, key_of = np.asarray(sample.layer), np.asarray(sample.key)
    groups: dict[int, list[int]] = defaultdict(list)
    for v in sorted(range(len(variants)), key=lambda v: (len(variants[v].ids), v)):
        groups[max(layer_of[i] for i, _, _ in variants[v].reads) // layer_group].append(v)
    batches = [[order[j] for j in batch] for _, order in sorted(groups.items())
               for batch in pack_sorted([len(variants[v].ids) for v in order], batch_tokens, max_batch)]
    for batch in batches:
        members = [variants[v] for v in batch]
        ids, _ = pad_right([v.ids for v in members])
        width = ids.shape[1]
        rows, cols, which, kinds = [], [], [], []
        for row, v in enumerate(members):
            for i, kind, col in v.reads:
                rows.append(row)
                cols.append(col)
                which.append(i)
                kinds.append(kind)
        which = np.asarray(which)
        flat = np.asarray(rows) * width + np.asarray(cols)
        positions, slot = np.unique(flat, return_inverse=True)
        layers = layer_of[which]
        per_layer = {int(layer): np.flatnonzero(layers == layer) for layer in np.unique(layers)}

        def read(layer, m, per_layer=per_layer, slot=slot, which=which, kinds=kinds):
            idx = per_layer[layer]
            got = m[torch.from_numpy(slot[idx]), torch.from_numpy(key_of[which[idx]])].double().cpu().numpy()
            for j, value in zip(idx, got):
                new[kinds[j]][which[j]] = value

        with Capture(model.parts, per_layer, on_coefficients=read) as cap:
            cap.run(ids.to(model.device), torch.from_numpy(positions))
        if progress is not None:
            progress.update(len(batch))
    return new


def removal_statistics(old: np.ndarray, new: np.ndarray, seed: int = 0) -> dict:
    """Mean / median relative change and sign-change share of one layer's triggers, with 95 % intervals."""
    ok = np.isfinite(new)
    old, new = old[ok], new[ok]
    if old.size == 0:
        return {"n": 0}
    change = (new - old) / old  # old < 0 on the neg face: the same sign logic
    flips = int(np.count_nonzero(np.sign(new) * np.sign(old) < 0))
    return {"n": int(old.size), "mean": float(change.mean()), "median": float(np.median(change)),
            "sign_change": flips / old.size, "mean_ci": bootstrap(change, "mean", seed=seed),
            "median_ci": bootstrap(change, "median", seed=seed), "sign_change_ci": wilson(flips, old.size)}


def token_removal_experiment(atlas, model, faces=("pos",), keys_per_layer: int = 10, n_triggers: int = 10,
                             seed: int = 0, progress=None) -> dict[str, dict]:
    """Fig 3 for every face in one pass: {face: block} with per-layer arrays (length n_layers, None where a layer
    was not scanned): ``first``, ``last``, ``random`` (mean relative change, the paper's statistic), ``X_median``,
    ``X_sign_change`` (share of triggers whose coefficient changes sign), ``X_ci`` / ``X_median_ci`` /
    ``X_sign_change_ci`` (95 %), ``X_n`` (triggers measured), ``n_keys``, ``skipped`` (zero coefficients)."""
    faces = [faces] if isinstance(faces, str) else list(faces)
    sample, stats = sample_triggers(atlas, faces, keys_per_layer, n_triggers, seed)
    variants, _ = removal_variants(atlas.store, sample, seed)
    if progress is not None and hasattr(progress, "reset"):
        progress.reset(total=len(variants))
    new = run_variants(model, sample, variants, progress=progress)
    L = atlas.n_layers
    names = [f"{k}{s}" for k in KINDS for s in ("", "_median", "_sign_change", "_ci", "_median_ci",
                                                  "_sign_change_ci", "_n")]
    out = {face: {name: [None] * L for name in names + ["n_keys", "skipped"]} for face in faces}
    face_of, layer_of, score = np.asarray(sample.face), np.asarray(sample.layer), np.asarray(sample.score)
    for (face, layer), st in stats.items():
        block = out[face]
        block["n_keys"][layer], block["skipped"][layer] = st["n_keys"], st["skipped"]
        mask = (face_of == face) & (layer_of == layer)
        for kind in KINDS:
            s = removal_statistics(score[mask], new[kind][mask], seed=seed)
            block[f"{kind}_n"][layer] = s["n"]
            if s["n"]:
                block[kind][layer], block[f"{kind}_ci"][layer] = s["mean"], s["mean_ci"]
                for stat in ("median", "sign_change"):
                    block[f"{kind}_{stat}"][layer] = s[stat]
                    block[f"{kind}_{stat}_ci"][layer] = s[f"{stat}_ci"]
    return out
