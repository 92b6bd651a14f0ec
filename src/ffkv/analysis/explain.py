"""`ffkv explain ATLAS`: one scored explanation per memory face, written to ``ATLAS/explanations.parquet``.

Stages: position features of the scanned units (``features``) → null rates → per layer and face the patterns of
the top triggers and the coherence of what the value promotes / suppresses (``patterns``) → one line per face →
scores on held-out units for the explanation and its two baselines, one model pass for all (``simulate``).
``explanation_vectors.npy`` (float16, one row per parquet row) holds a concept vector per face for search: the
mean embedder vector of its trigger words plus that of the words it promotes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..arch import check_memory
from ..atlas import Atlas
from ..embedder import DIM, Embedder
from ..errors import FfkvError
from .aggregation import held_out_units
from .features import CLUSTER_LEVELS, Vocabulary, position_features
from .patterns import (
    KINDS,
    SEMANTIC_MASK,
    SHALLOW_KINDS,
    SHALLOW_MASK,
    Coherence,
    CorpusNull,
    ExplainConfig,
    describe,
    explain_layer_face,
    face_kind,
    pattern_phrase,
)
from .simulate import Simulator, heldout_sample, score_explanations

FILE = "explanations.parquet"
VECTORS = "explanation_vectors.npy"
COHERENCE_SIZE = 10


def parse_keys(spec: str | None) -> list[tuple[int, int]] | None:
    """'15:455,3:17' -> [(15, 455), (3, 17)]."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        try:
            layer, key = part.split(":")
            out.append((int(layer), int(key)))
        except ValueError:
            raise FfkvError(f"--keys {spec!r}: expected LAYER:KEY pairs like 15:455,3:17")
    return out


def _faces(atlas: Atlas, face: str) -> list[str]:
    if face not in ("pos", "neg", "both"):
        raise FfkvError(f"--face {face!r}: choose pos, neg or both")
    faces = atlas.faces if face == "both" else [face]
    for f in faces:
        if f not in atlas.faces:
            raise FfkvError(f"face {f!r} is not in this atlas (faces: {', '.join(atlas.faces)})")
    return faces


def explain(atlas_path: str | Path, config: ExplainConfig | None = None, layers: list[int] | None = None,
            keys: list[tuple[int, int]] | None = None, face: str = "both", model=None, progress: bool = True,
            score: bool = True) -> Path:
    """Explain (and score) the chosen memory faces; returns the parquet file's path."""
    cfg = config or ExplainConfig()
    t0 = time.time()
    atlas = Atlas.load(atlas_path)
    faces = _faces(atlas, face)
    top_k = atlas.manifest["scan"]["top_k"]
    cfg = cfg.for_top_k(top_k)
    for layer in layers or []:
        atlas.check(layer)
    for layer, key in keys or []:
        check_memory(layer, key, layers=atlas.layers, d_ff=atlas.d_ff)
    chosen: dict[int, np.ndarray] = {}
    if keys:
        for layer, key in keys:
            chosen[layer] = np.union1d(chosen.get(layer, np.zeros(0, np.int64)), [key]).astype(np.int64)
    else:
        for layer in layers or atlas.layers:
            chosen[layer] = np.arange(atlas.d_ff)
    held = held_out_units(atlas) if score else np.zeros(0, np.int64)
    if score and len(held) == 0:
        heldout_sample(atlas.store, held, cfg.heldout_tokens, cfg.seed)  # raises the one-line error
    embedder = Embedder(cache_dir=atlas.path / "explain_cache")
    if score and model is None:
        from ..models import load_model

        model = load_model(atlas.manifest["model"]["name"], dtype=atlas.manifest["scan"].get("dtype", "float32"))
    if model is not None:
        atlas.check_model(model)
    vocab = Vocabulary(atlas.tokenizer)
    scanned = np.load(atlas.path / "scanned_units.npy")
    feats = position_features(atlas.store, scanned, vocab, embedder, progress=progress, seed=cfg.seed)
    null = CorpusNull(feats, vocab, cfg)
    coherence = Coherence(vocab, embedder, COHERENCE_SIZE, cfg.null_sets, cfg.seed)
    timings = {"features": round(time.time() - t0, 1)}
    t = time.time()
    explanations, rows, vectors = [], [], []
    bar = tqdm(total=sum(len(k) for k in chosen.values()) * len(faces), desc="explaining", unit="face",
               disable=not progress, dynamic_ncols=True)
    for layer, layer_keys in chosen.items():
        tensors = atlas.layer_tensors(layer)
        lists = {}
        for proj in ("normed", "raw"):
            for sign in ("pos", "neg"):
                lists[proj, sign] = tensors[f"value_{proj}_{sign}_ids"][layer_keys].numpy()
        texts = {key: [[vocab.text[int(x)] for x in row] for row in ids] for key, ids in lists.items()}
        coh = {sign: coherence.score([[t.strip() for t in row] for row in texts["normed", sign]])
               for sign in ("pos", "neg")}
        for f in faces:
            other = "neg" if f == "pos" else "pos"
            positions = tensors[f"{f}_positions"][layer_keys, : cfg.triggers].numpy()
            e = explain_layer_face(layer, f, layer_keys, positions, feats, null, vocab, cfg)
            explanations.append(e)
            trig_rows = feats.rows(positions)
            e.fire_threshold, e.lookup_threshold = Simulator(e, feats, vocab.n_codes, null.last).fit_thresholds(
                trig_rows)
            # concept vectors live in the embedder's own (uncentred) space, where search queries are embedded
            trig_vec = _raw_word_vectors(embedder, feats, trig_rows).sum(1)
            concept = _unit(trig_vec) + _unit(coh[f][2])
            vectors.append(_unit(concept).astype(np.float16))
            found = {k: np.nonzero(e.significant[k])[0] for k in KINDS}
            sig_kinds: list[list[str]] = [[] for _ in layer_keys]
            for k in KINDS:
                for i in found[k].tolist():
                    sig_kinds[i].append(k)
            shallow = ((e.cover >= 0) & (e.cover & SHALLOW_MASK > 0)).tolist()
            semantic = ((e.cover >= 0) & (e.cover & SEMANTIC_MASK > 0)).tolist()
            valid = (e.cover >= 0).tolist()
            for i, key in enumerate(layer_keys.tolist()):
                p_ok, s_ok = bool(coh[f][1][i] < cfg.alpha), bool(coh[other][1][i] < cfg.alpha)
                phrases = {k: pattern_phrase(k, e, i, vocab, feats) for k in sig_kinds[i]}
                rows.append({
                    "layer": layer, "key": key, "face": f, "kind": face_kind(e.significant, i),
                    "description": describe(e, i, vocab, feats, texts["normed", f][i], texts["normed", other][i],
                                            p_ok, s_ok, phrases),
                    "n_units": int(e.n_units[i]),
                    "patterns": json.dumps([{"kind": k, "text": phrases[k], "support": int(e.support[k][i]),
                                             "p_value": float(e.p_value[k][i]), "lift": round(float(e.lift[k][i]), 4)}
                                            for k in sig_kinds[i]]),
                    "trigger_shallow": shallow[i], "trigger_semantic": semantic[i], "trigger_valid": valid[i],
                    "last_tokens": json.dumps({vocab.code_text[c]: n for c, n in sorted(
                        e.last_codes[i].items(), key=lambda x: -x[1])}, ensure_ascii=False),
                    "promotes": texts["normed", f][i], "suppresses": texts["normed", other][i],
                    "promotes_raw": texts["raw", f][i], "suppresses_raw": texts["raw", other][i],
                    "promote_coherence": float(coh[f][0][i]), "promote_coherent": p_ok,
                    "suppress_coherence": float(coh[other][0][i]), "suppress_coherent": s_ok,
                })
            bar.update(len(layer_keys))
    bar.close()
    timings["patterns"] = round(time.time() - t, 1)
    table = pa.Table.from_pylist(rows)
    if score:
        t = time.time()
        units = heldout_sample(atlas.store, held, cfg.heldout_tokens, cfg.seed)
        held_feats = position_features(atlas.store, units, vocab, embedder, centre=feats.centre,
                                        clusters=feats.clusters)
        face_max = {}
        for e in explanations:
            top = atlas.layer_tensors(e.layer)[f"{e.face}_scores"][e.keys, 0].numpy()
            face_max[e.layer, e.face] = np.abs(np.nan_to_num(top, nan=np.inf))
        scores = score_explanations(model, atlas.store, explanations, held_feats, face_max, vocab.n_codes,
                                    null.last, cfg, progress=progress)
        columns: dict[str, list] = {}
        for e in explanations:
            for name, arr in scores[e.layer, e.face].items():
                columns.setdefault(name, []).extend(np.asarray(arr, dtype=np.float64).tolist())
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, pa.float64()))
        timings["scoring"] = round(time.time() - t, 1)
        timings["heldout_tokens"] = len(held_feats)
    meta = {"scan_id": atlas.scan_id, "config": json.dumps(cfg.__dict__), "timings": json.dumps(timings),
            "scored": json.dumps(score)}
    table = table.replace_schema_metadata({k.encode(): str(v).encode() for k, v in meta.items()})
    out = atlas.path / FILE
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    np.save(atlas.path / "explanation_vectors.tmp.npy", np.concatenate(vectors) if vectors else np.zeros((0, 384)))
    os.replace(atlas.path / "explanation_vectors.tmp.npy", atlas.path / VECTORS)
    os.replace(tmp, out)
    return out


def _raw_word_vectors(embedder: Embedder, feats, rows: np.ndarray) -> np.ndarray:
    """[*rows.shape, DIM] the embedder's vectors of the words at ``rows`` (zero where -1 or no vector)."""
    ok = (rows >= 0) & feats.has_word_vec[np.maximum(rows, 0)]
    out = np.zeros((*rows.shape, DIM), np.float32)
    if ok.any():
        out[ok] = embedder.encode([feats.word[int(r)] for r in rows[ok]])
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- agreement with hand labels ------------------------------------------------------------------------------
def cohen_kappa(a: list, b: list) -> float:
    """Agreement of two labelings beyond chance (1 = perfect, 0 = chance level)."""
    labels = sorted(set(a) | set(b), key=str)
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((a.count(lab) / n) * (b.count(lab) / n) for lab in labels)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def _bootstrap(truth: list, predicted: list, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(truth), len(truth))
        t, p = [truth[i] for i in idx], [predicted[i] for i in idx]
        values.append(cohen_kappa(t, p))
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return round(float(lo), 3), round(float(hi), 3)


def label_agreement(atlas_path: str | Path, labelled: list[dict], config: ExplainConfig | None = None,
                    cluster_levels: tuple[int, ...] = CLUSTER_LEVELS) -> dict:
    """The explainer's kinds against hand labels. ``labelled``: entries {"label", "triggers": [{"unit",
    "input_ids"}]} of the atlas's corpus (the ids without the special prefix); each trigger is found in the atlas's
    token store. Returns the 4-class and the binary (has-shallow, has-semantic) kappas with bootstrap 95 %
    intervals (``kappas``), and the predictions. ``cluster_levels`` (and ``config.seed``, which also seeds the
    word clusters) are there to measure how the agreement depends on them."""
    atlas = Atlas.load(atlas_path)
    positions = labelled_positions(atlas, [entry["triggers"] for entry in labelled])
    e, _, cfg = explain_labelled(atlas, positions, config, cluster_levels)
    predicted = [face_kind(e.significant, i) for i in range(len(labelled))]
    out = kappas([entry["label"] for entry in labelled], predicted, seed=cfg.seed)
    out["patterns"] = [[k for k in KINDS if e.significant[k][i]] for i in range(len(labelled))]
    return out


def labelled_positions(atlas: Atlas, prefixes: list[list[dict]]) -> np.ndarray:
    """[entries, max prefixes] flat store positions of the last token of each prefix {"unit", "input_ids"} (or
    {"unit", "length"}: a control prefix of a label file that keeps only where it is; -1: no prefix); FfkvError
    where a prefix is not in the atlas's token store."""
    store = atlas.store
    positions = np.full((len(prefixes), max(map(len, prefixes), default=0)), -1, np.int64)
    for i, entry in enumerate(prefixes):
        for j, t in enumerate(entry):
            u = int(t["unit"])
            start = int(store.offset[u] + store.n_special[u])
            length = len(t["input_ids"]) if "input_ids" in t else int(t["length"])
            found = u < store.n_units and 0 < length <= store.length[u] - store.n_special[u] and (
                "input_ids" not in t or store.tokens[start: start + length].tolist() == list(t["input_ids"]))
            if not found:
                raise FfkvError(f"hand-labelled prefix of unit {u} is not in this atlas's token store (another "
                                "corpus, unit or tokenizer)")
            positions[i, j] = start + length - 1
    return positions


def explain_labelled(atlas: Atlas, positions: np.ndarray, config: ExplainConfig | None = None,
                     cluster_levels: tuple[int, ...] = CLUSTER_LEVELS):
    """The explainer run on the trigger sets ``positions`` [keys, T] (flat store positions, -1 = none) as one layer
    and face: (its explanation, the position features it read, the config). The features are those of the scanned
    units, with the triggers' own units added where they lie outside the scan."""
    store = atlas.store
    cfg = dataclasses.replace(config or ExplainConfig(), triggers=positions.shape[1])
    embedder = Embedder(cache_dir=atlas.path / "explain_cache")
    vocab = Vocabulary(atlas.tokenizer)
    scanned = np.load(atlas.path / "scanned_units.npy")
    feats = position_features(store, scanned, vocab, embedder, cluster_levels=cluster_levels, seed=cfg.seed)
    null = CorpusNull(feats, vocab, cfg)
    outside = np.setdiff1d(store.unit_of(positions[positions >= 0]), scanned)
    if len(outside):  # read like the scanned units: same centre, same clusters
        feats = position_features(store, np.union1d(scanned, outside), vocab, embedder, centre=feats.centre,
                                   clusters=feats.clusters)
    e = explain_layer_face(-1, "pos", np.arange(len(positions)), positions, feats, null, vocab, cfg)
    return e, feats, cfg


def count_table(n_controls: int = 25, alpha: float = 0.05 / 13, n: int = 25,
                max_controls: int | None = None) -> dict[int, int]:
    """The blind label sets' count table: per count B of a feature among ``n_controls`` control prefixes, the
    smallest count A (>= 3) among the ``n`` triggers with P(Binomial(n, (B + 0.5) / (n_controls + 0.5)) >= A) <
    alpha, the explainer's per-kind level (0.05 / 13; sets 5-7 used 0.05 / 12, one kind fewer), as a number a rater
    can look up. It runs up to B = ``max_controls`` (the 25-control packets stop at 12), or to the last B that some
    A passes."""
    from scipy.stats import binom

    table = {}
    for b in range(n_controls + 1 if max_controls is None else max_controls + 1):
        a = next((a for a in range(3, n + 1) if binom.sf(a - 1, n, (b + 0.5) / (n_controls + 0.5)) < alpha), None)
        if a is None:
            break
        table[b] = a
    return table


def kappas(truth: list[str], predicted: list[str], seed: int = 0) -> dict:
    """Agreement of predicted kinds with labelled ones: accuracy, the 4-class kappa and the binary kappas of
    has-shallow and has-semantic, each with its bootstrap 95 % interval (``*_ci95``)."""
    out = {"n": len(truth), "predicted": list(predicted),
           "accuracy": round(sum(a == b for a, b in zip(truth, predicted)) / len(truth), 3)}
    for name, f in (("kappa", lambda x: x), ("kappa_shallow", lambda x: x in ("shallow", "both")),
                    ("kappa_semantic", lambda x: x in ("semantic", "both"))):
        t, p = [f(x) for x in truth], [f(x) for x in predicted]
        out[name] = round(cohen_kappa(t, p), 3)
        out[name + "_ci95"] = _bootstrap(t, p, seed=seed)
    return out


# -- what analysis.json keeps of the explanations --------------------------------------------------------------
def read_explanations(atlas: Atlas) -> pa.Table | None:
    """The atlas's explanations.parquet, or None when it is missing or belongs to an earlier scan."""
    path = atlas.path / FILE
    if not path.is_file():
        return None
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    return table if meta.get(b"scan_id", b"").decode() == atlas.scan_id else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


BLOCK_COLUMNS = ("layer", "key", "face", "kind", "description", "patterns", "trigger_shallow", "trigger_semantic",
                 "trigger_valid", "sim_corr", "f1", "precision", "recall", "heldout_fires", "shuffled_sim_corr",
                 "shuffled_f1", "lookup_sim_corr", "lookup_f1")


def block_rows(table: pa.Table) -> list[dict]:
    """The rows ``patterns_block`` reads, converted once for all faces (the token lists are left out)."""
    return table.select([c for c in BLOCK_COLUMNS if c in table.column_names]).to_pylist()


def patterns_block(atlas: Atlas, rows: list[dict], face: str, examples_per_layer: int = 2) -> dict:
    """Fig 2 / Table 1 for one face from the explanations: per layer the share of trigger examples covered by
    shallow only / semantic only / both / no pattern (the paper's unit; ``shallow`` ... ``none``), the share of
    keys of each kind (``keys_shallow`` ...), patterns per key, the held-out scores, and the best-explained keys."""
    rows = [r for r in rows if r["face"] == face]
    n = atlas.n_layers
    names = ("shallow", "semantic", "both", "none")
    out: dict = {k: [None] * n for k in (*names, *(f"keys_{k}" for k in names), "coverage", "patterns_per_key",
                                          "n_keys", "sim_corr", "f1", "precision", "recall", "shuffled_sim_corr",
                                          "shuffled_f1", "lookup_sim_corr", "lookup_f1", "scored_keys")}
    by_layer: dict[int, list[dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    keys_out = []
    for layer, rs in sorted(by_layer.items()):
        cover = {k: 0 for k in names}
        total = 0
        for r in rs:
            for sh, se, ok in zip(r["trigger_shallow"], r["trigger_semantic"], r["trigger_valid"]):
                if ok:
                    total += 1
                    cover["both" if sh and se else "shallow" if sh else "semantic" if se else "none"] += 1
        for k in names:
            out[k][layer] = cover[k] / max(total, 1)
            out[f"keys_{k}"][layer] = sum(r["kind"] == k for r in rs) / len(rs)
        out["coverage"][layer] = 1 - cover["none"] / max(total, 1)
        out["patterns_per_key"][layer] = float(np.mean([len(json.loads(r["patterns"])) for r in rs]))
        out["n_keys"][layer] = len(rs)
        if "sim_corr" in rs[0]:
            fired = [r for r in rs if (r.get("heldout_fires") or 0) > 0]
            for name in ("sim_corr", "shuffled_sim_corr", "lookup_sim_corr"):
                out[name][layer] = _mean(r[name] for r in rs)
            for name in ("f1", "precision", "recall", "shuffled_f1", "lookup_f1"):
                out[name][layer] = _mean(r[name] for r in fired)
            out["scored_keys"][layer] = len(fired)
        best = sorted((r for r in rs if r["kind"] != "none"),
                      key=lambda r: -(r.get("sim_corr") if r.get("sim_corr") is not None else 0))
        for r in best[:examples_per_layer]:
            keys_out.append(_example(atlas, r))
    out["keys"] = keys_out
    out["definition"] = ("shares of the top-25 trigger examples (counted per trigger, as the paper's experts did) "
                         "covered by significant shallow / semantic patterns of their key (ffkv explain); keys_* are "
                         "shares of keys by kind; scores on held-out units (see explanations.parquet)")
    return out


def _example(atlas: Atlas, r: dict) -> dict:
    """One Table 1 row: the key, its patterns (with the trigger ranks each covers), description and triggers."""
    triggers = atlas.triggers(r["layer"], r["key"], r["face"], len(r["trigger_valid"]))
    patterns = []
    for p in json.loads(r["patterns"]):
        kind = "shallow" if p["kind"] in SHALLOW_KINDS else "semantic"
        flags = r["trigger_shallow"] if kind == "shallow" else r["trigger_semantic"]
        patterns.append({"kind": kind, "description": p["text"], "p_value": p["p_value"],
                         "triggers": [i for i, f in enumerate(flags) if f]})
    return {"layer": r["layer"], "key": r["key"], "face": r["face"], "label": r["kind"],
            "description": r["description"], "sim_corr": r.get("sim_corr"), "f1": r.get("f1"),
            "patterns": patterns, "triggers": [f"{t.context}[[{t.trigger_token}]]" for t in triggers]}
