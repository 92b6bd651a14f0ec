"""Scores of the explanations on held-out text.

**Held-out set.** A seeded random sample of the atlas's held-out units (units of the token store the scan did
not use) with at least ``ExplainConfig.heldout_tokens`` content tokens in all; every content position of those
units is a held-out prefix. The model runs once over them for all memories (one forward per batch, every layer
read, nothing stored per memory but running sums and a top-k).

**Predictor (the simulation).** From an explanation alone, without the model: the simulated activation of a face at
a prefix x is a(x) = lift of x's last token among the face's trigger tokens, where positive, plus the sum of lift_j
over the face's significant patterns j that match x (0 when nothing matches), where lift = log(share of the face's
triggers with the token / pattern j / its rate in the scanned corpus) is fitted on the triggers. The token part is
the explanation's list of trigger tokens (``last_tokens``); the lookup baseline below is that list alone, so the
difference between the two is what the patterns add. A pattern matches x when x has the same last two tokens / token
one or two before the last, the word class, the class, the topic or the article; a category matches when x's word
falls in the category's word cluster (nearest centroid, at the cluster's level), a subject when the embedder vector
of x's subject has cosine >= the group's radius with the group's centroid. The explanation predicts that the face
fires where a(x) >= its firing threshold: the median of a over the face's own triggers (also fitted on the triggers
only).

**Scores** per face, with s(x) = m(x) on the positive face and -m(x) on the negative one:

* ``sim_corr``: Pearson correlation of a(x) and s(x) over the face's top ``heldout_top`` held-out prefixes and
  ``heldout_random`` random held-out prefixes (the automated-interpretability score; 0 when a is constant);
* ``precision`` / ``recall`` / ``f1``: of "fires" = s(x) >= 0.5 × the face's top coefficient in the scan, over
  every held-out prefix (N2G's measure).

The same scores for two baselines in the same pass: ``shuffled`` (another key's explanation of the same layer and
face, a fixed random derangement) and ``lookup`` (a last-token lookup table fitted on the same triggers: a(x) =
log(share of triggers ending with x's last token / its corpus rate), firing where that reaches its median over the
triggers).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..capture import Capture, pack_sorted, pad_right
from ..errors import FfkvError
from ..topk import TopK
from .features import CLASSES, PositionFeatures
from .patterns import KINDS, LayerFaceExplanation

PREDICTORS = ("explanation", "shuffled", "lookup")


def heldout_sample(store, held: np.ndarray, n_tokens: int, seed: int) -> np.ndarray:
    """Held-out units (sorted) drawn at random until they hold ``n_tokens`` content tokens."""
    if len(held) == 0:
        raise FfkvError("the atlas has no held-out units (its scan covered the whole corpus), so the explanations "
                        "cannot be scored on unseen text; scan with --max-tokens to leave part of the corpus out")
    order = np.random.default_rng(seed).permutation(held)
    counts = store.length[order] - store.n_special[order]
    take = int(np.searchsorted(np.cumsum(counts), n_tokens) + 1)
    return np.sort(order[:take])


class Simulator:
    """Evaluates the predictor of one layer and face for every key, at rows of ``feats``."""

    def __init__(self, e: LayerFaceExplanation, feats: PositionFeatures, n_codes: int, corpus_last_rate: np.ndarray):
        self.e, self.f = e, feats
        self.n_codes = n_codes
        K = len(e.keys)
        self.weight = {k: np.where(e.significant[k], np.maximum(e.lift[k], 1e-3), 0.0).astype(np.float32)
                       for k in KINDS}
        self.significant_cols = {k: np.nonzero(e.significant[k])[0] for k in KINDS}
        # last-token tables over the codes present in ``feats`` (last row: any other code): the lookup baseline
        # (every last token of the triggers, at its lift); the explanation keeps the tokens that are more common
        # among the triggers than in the corpus (lift > 0), which is the token list it names
        codes = np.unique(feats.code)
        self.code_index = np.full(n_codes, len(codes), np.int64)
        self.code_index[codes] = np.arange(len(codes))
        self.lookup = np.zeros((len(codes) + 1, K), np.float32)
        self.last = np.zeros((len(codes) + 1, K), np.float32)
        for k, table in enumerate(e.last_codes):
            n = max(int(e.n_units[k]), 1)
            for c, units in table.items():
                i = self.code_index[c]
                if i < len(codes):
                    lift = np.log((units / n) / max(corpus_last_rate[c], 1e-9))
                    self.lookup[i, k] = lift
                    self.last[i, k] = max(lift, 0.0)

    def evaluate(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """a(x) of each key's own rows: ``rows`` [K', J] (rows of the features) with ``cols`` [K', 1] (key
        indices). ``dense`` computes the same sums for every key at once."""
        f, e, w = self.f, self.e, self.weight
        rows, cols = np.asarray(rows), np.asarray(cols)
        a = self.last[self.code_index[f.code[rows]], cols].astype(np.float32)

        def take(kind, match):
            a[...] += np.where(match, w[kind][cols], 0.0)

        code, prev, prev2 = f.code[rows], f.prev[rows], f.prev2[rows]
        bigram, near = e.value["bigram"][cols], e.value["near"][cols]
        take("bigram", (prev >= 0) & (prev * self.n_codes + code == bigram))
        take("near", (near >= 0) & ((prev == near) | (prev2 == near)))
        word_class = e.value["wordclass"][cols]
        take("wordclass", (word_class >= 0) & (f.word_class[rows] == word_class))
        for c, name in enumerate(CLASSES):
            take(name, f.classes[rows, c])
        for kind, column in (("topic", f.topic), ("article", f.title)):
            v = e.value[kind][cols]
            take(kind, (v >= 0) & (column[rows] == v))
        category = e.value["category"][cols]
        take("category", (category >= 0) & (f.word_cluster[rows] == category[..., None]).any(-1))
        sims = np.einsum("kjd,kd->kj", f.subject_vec[rows], e.centroid["subject"][cols[:, 0]])
        take("subject", sims >= e.radius["subject"][cols])
        return a

    def dense(self, rows: np.ndarray) -> np.ndarray:
        """a(x) [len(rows), K] for every key: the same sums as ``evaluate``, each kind computed only for the keys
        where it is significant (most kinds hold for few keys)."""
        f, e, w = self.f, self.e, self.weight
        a = self.last[self.code_index[f.code[rows]]]
        code, prev, prev2 = f.code[rows][:, None], f.prev[rows][:, None], f.prev2[rows][:, None]
        for kind in KINDS:
            cols = self.significant_cols[kind]
            if kind == "last" or len(cols) == 0:
                continue
            if kind == "bigram":
                match = (prev >= 0) & (prev * self.n_codes + code == e.value[kind][cols][None, :])
            elif kind == "near":
                v = e.value[kind][cols][None, :]
                match = (prev == v) | (prev2 == v)
            elif kind == "wordclass":
                match = f.word_class[rows][:, None] == e.value[kind][cols][None, :]
            elif kind in CLASSES:
                match = f.classes[rows, CLASSES.index(kind)][:, None]
            elif kind in ("topic", "article"):
                match = (f.topic if kind == "topic" else f.title)[rows][:, None] == e.value[kind][cols][None, :]
            elif kind == "category":  # the position's word is in the category's word cluster
                match = (f.word_cluster[rows][:, :, None] == e.value[kind][cols][None, None, :]).any(1)
            else:
                match = f.subject_vec[rows] @ e.centroid[kind][cols].T >= e.radius[kind][cols][None, :]
            a[:, cols] += np.where(match, w[kind][cols][None, :], np.float32(0))
        return a

    def pairs(self, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """a of key ``keys[k]``'s explanation at rows[k, j] (-1: 0)."""
        out = self.evaluate(np.maximum(rows, 0), np.asarray(keys)[:, None])
        return np.where(rows >= 0, out, 0.0)

    def lookup_at(self, rows: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """The lookup baseline: dense [P, K] for rows [P]; per key for rows [K', J] with ``keys`` [K']."""
        idx = self.code_index[self.f.code[np.maximum(rows, 0)]]
        return self.lookup[idx] if keys is None else self.lookup[idx, np.asarray(keys)[:, None]]

    def fit_thresholds(self, trigger_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Firing thresholds of the explanation and of the lookup table: the median of each over the face's own
        triggers ``trigger_rows`` [K, T] (rows of this simulator's features, -1 = empty)."""
        K = len(self.e.keys)
        valid = trigger_rows >= 0
        a = np.where(valid, self.pairs(trigger_rows, np.arange(K)), np.nan)
        look = np.where(valid, self.lookup_at(trigger_rows, np.arange(K)), np.nan)
        with np.errstate(all="ignore"):
            med_a, med_l = np.nanmedian(a, axis=1), np.nanmedian(look, axis=1)
        # a threshold of 0 would let every prefix fire: firing needs at least one matching pattern
        return np.maximum(np.nan_to_num(med_a, nan=np.inf), 1e-6), np.maximum(np.nan_to_num(med_l, nan=np.inf), 1e-6)


class FaceScores:
    """Running sums of one layer and face: counts for precision / recall, Pearson sums over the random
    prefixes, and the top held-out prefixes (added to the Pearson sums at the end)."""

    def __init__(self, K: int, top: int):
        self.counts = np.zeros((len(PREDICTORS), 3, K))  # tp, fp, fn
        self.sums = np.zeros((len(PREDICTORS), 5, K))  # n, sum a, sum s, sum a^2, sum s^2 ... and a*s below
        self.cross = np.zeros((len(PREDICTORS), K))
        self.top = TopK(K, top, largest=True)

    def add_counts(self, p: int, predicted: np.ndarray, fires_at: tuple[np.ndarray, np.ndarray],
                   n_fires: np.ndarray) -> None:
        """``fires_at``: (rows, keys) where the face fires (rare), ``n_fires`` their count per key."""
        tp = np.bincount(fires_at[1][predicted[fires_at]], minlength=predicted.shape[1])
        self.counts[p, 0] += tp
        self.counts[p, 1] += predicted.sum(0) - tp
        self.counts[p, 2] += n_fires - tp

    def add_pearson(self, p: int, a: np.ndarray, s: np.ndarray) -> None:
        a, s = a.astype(np.float64), s.astype(np.float64)
        self.sums[p] += np.stack([np.ones_like(a).sum(0), a.sum(0), s.sum(0), (a * a).sum(0), (s * s).sum(0)])
        self.cross[p] += (a * s).sum(0)

    def result(self) -> dict[str, np.ndarray]:
        out = {}
        for p, name in enumerate(PREDICTORS):
            tp, fp, fn = self.counts[p]
            precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
            recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
            f1 = np.where(np.isnan(recall), np.nan, f1)
            n, sa, ss, saa, sss = self.sums[p]
            cov = self.cross[p] - sa * ss / np.maximum(n, 1)
            va, vs = saa - sa * sa / np.maximum(n, 1), sss - ss * ss / np.maximum(n, 1)
            corr = np.where((va > 1e-12) & (vs > 1e-12), cov / np.sqrt(np.maximum(va * vs, 1e-300)), 0.0)
            prefix = "" if name == "explanation" else name + "_"
            out |= {f"{prefix}sim_corr": corr, f"{prefix}precision": precision, f"{prefix}recall": recall,
                    f"{prefix}f1": f1, **({"heldout_fires": tp + fn} if name == "explanation" else {})}
        return out


def derangement(n: int, seed: int) -> np.ndarray:
    """A fixed permutation with no fixed point (n >= 2): key i is scored with key perm[i]'s explanation."""
    if n < 2:
        return np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]


@torch.inference_mode()
def score_explanations(model, store, explanations: list[LayerFaceExplanation], feats: PositionFeatures,
                       face_max: dict[tuple[int, str], np.ndarray], n_codes: int, corpus_last_rate: np.ndarray,
                       cfg, batch_tokens: int = 4096, max_batch: int = 64, progress: bool = True) -> dict:
    """Scores (see the module docstring) per (layer, face): dict of arrays over the explanation's keys."""
    sims = {(e.layer, e.face): Simulator(e, feats, n_codes, corpus_last_rate) for e in explanations}
    states = {(e.layer, e.face): FaceScores(len(e.keys), cfg.heldout_top) for e in explanations}
    perms = {(e.layer, e.face): derangement(len(e.keys), cfg.seed + e.layer) for e in explanations}
    rng = np.random.default_rng(cfg.seed)
    random_rows = np.zeros(len(feats), bool)
    random_rows[rng.choice(len(feats), min(cfg.heldout_random, len(feats)), replace=False)] = True
    layers = sorted({e.layer for e in explanations})
    units = np.unique(feats.unit)
    lengths = store.length[units]
    order = np.argsort(lengths, kind="stable")
    batches = pack_sorted(lengths[order].tolist(), batch_tokens, max_batch)
    device = model.parts.unembedding.device
    with tqdm(total=int(len(feats)), desc="scoring on held-out text", unit="tok", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in batches:
            us = units[order[batch]]
            ids, lens = pad_right([store.unit_tokens(u) for u in us])
            width = ids.shape[1]
            special = store.n_special[us]
            flat = np.concatenate([r * width + np.arange(special[r], lens[r]) for r in range(len(us))])
            positions = np.concatenate([store.offset[u] + np.arange(store.n_special[u], store.length[u]) for u in us])
            rows = feats.rows(positions)
            with Capture(model.parts, layers) as cap:
                cap.run(ids.to(device), torch.from_numpy(flat))
            for e in explanations:
                key = (e.layer, e.face)
                m = cap.m[e.layer][:, torch.from_numpy(e.keys)].float().cpu().numpy()
                s = m if e.face == "pos" else -m
                sim, st = sims[key], states[key]
                a = sim.dense(rows)
                predictions = (a, a[:, perms[key]], sim.lookup_at(rows))
                thresholds = (e.fire_threshold, e.fire_threshold[perms[key]], e.lookup_threshold)
                fires = s >= 0.5 * face_max[key][None, :]
                fires_at, n_fires = np.nonzero(fires), fires.sum(0)
                rnd = random_rows[rows]
                for p, pred in enumerate(predictions):
                    st.add_counts(p, pred >= thresholds[p][None, :], fires_at, n_fires)
                    if rnd.any():
                        st.add_pearson(p, pred[rnd], s[rnd])
                st.top.add(torch.from_numpy(s), torch.from_numpy(rows.astype(np.int64)))
            bar.update(len(rows))
    out = {}
    for e in explanations:
        key = (e.layer, e.face)
        sim, st = sims[key], states[key]
        values, rows = (t.numpy() for t in st.top.result())
        keep = (rows >= 0) & ~random_rows[np.maximum(rows, 0)]  # random prefixes are already in the sums
        rows_k = np.where(keep, rows, -1)
        K = len(e.keys)
        values = np.where(keep, values, 0.0).astype(np.float64)
        for p in range(len(PREDICTORS)):
            if p == 0:
                a = sim.pairs(rows_k, np.arange(K))
            elif p == 1:
                a = sim.pairs(rows_k, perms[key])
            else:
                a = sim.lookup_at(rows_k, np.arange(K))
            a = np.where(keep, a, 0.0).astype(np.float64)
            st.sums[p] += np.stack([keep.sum(1), a.sum(1), values.sum(1), (a * a).sum(1), (values * values).sum(1)])
            st.cross[p] += (a * values).sum(1)
        out[key] = st.result()
    return out
