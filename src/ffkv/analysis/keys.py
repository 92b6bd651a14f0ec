"""§3 of the paper: token removal (Fig 3). The trigger patterns of Fig 2 and Table 1 come from `ffkv explain`
(``analysis.explain``)."""

from __future__ import annotations

import random

import numpy as np

from ..capture import last_position_coefficients


def sample_keys(d_ff: int, n: int, seed: int, layer: int, face: str) -> list[int]:
    rng = random.Random(f"{seed}-{layer}-{face}")
    return sorted(rng.sample(range(d_ff), min(n, d_ff)))


def token_removal_experiment(atlas, model, face: str, keys_per_layer: int = 10, n_triggers: int = 10,
                             seed: int = 0, progress=None) -> dict:
    """Fig 3 for one face: mean relative change of the memory coefficient when the first, the last or a
    random token of each trigger prefix is removed (the coefficient is read at the new last position).
    Triggers with fewer than 2 content tokens (3 for 'random', which removes an inner token) are skipped and
    counted."""
    n_layers = atlas.n_layers
    result = {k: [None] * n_layers for k in ("first", "last", "random", "n_keys", "skipped")}
    rng = random.Random(seed)
    kinds = ("first", "last", "random")
    variants: dict[str, list[list[int]]] = {k: [] for k in kinds}
    refs: dict[str, list[tuple[int, int, float]]] = {k: [] for k in kinds}  # (layer, key, old coefficient)
    for layer in atlas.layers:
        skipped = 0
        keys = sample_keys(atlas.d_ff, keys_per_layer, seed + 1, layer, face)
        for key in keys:
            for t in atlas.triggers(layer, key, face, n_triggers):
                skip = int(atlas.store.n_special[t.unit])
                special, content = t.input_ids[:skip], t.input_ids[skip:]
                if len(content) < 2 or t.score == 0:
                    skipped += 1
                    continue
                variants["first"].append(special + content[1:])
                variants["last"].append(special + content[:-1])
                refs["first"].append((layer, key, t.score))
                refs["last"].append((layer, key, t.score))
                if len(content) >= 3:
                    drop = rng.randrange(1, len(content) - 1)
                    variants["random"].append(special + content[:drop] + content[drop + 1:])
                    refs["random"].append((layer, key, t.score))
        result["n_keys"][layer] = len(keys)
        result["skipped"][layer] = skipped
    # one pass per removal kind over the prefixes of every layer (sorted by layer, each batch stops early)
    for kind in kinds:
        if not variants[kind]:
            continue
        layers, keys, old = (list(x) for x in zip(*refs[kind]))
        new = last_position_coefficients(model.parts, variants[kind], layers, keys, device=model.device)
        change = (new.double().numpy() - np.array(old)) / np.array(old)  # old < 0 on the neg face: same sign logic
        layers = np.array(layers)
        for layer in np.unique(layers):
            result[kind][int(layer)] = float(np.mean(change[layers == layer]))
        if progress is not None:
            progress.update(1)
    return result
