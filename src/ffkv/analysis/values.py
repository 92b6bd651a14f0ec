"""§4 of the paper: what values predict. Agreement with the trigger's next token (Fig 4), its rank (Fig 5),
agreement against the value's confidence (Fig 6) and high-precision values (Table 2).

For memory i of a layer and a face with sign s (+1 for the positive face, which adds +v_i; -1 for the
negative face of signed FFNs, which adds -v_i), the value's distribution over the vocabulary is
p_i = softmax(s * v_i . E) (the paper's raw projection, no final norm). The memory's *target* is the token
that follows its top-1 trigger prefix in the corpus. Memories whose top-1 slot is empty, or whose top-1
trigger ends its unit (no next token), have no target: they are counted in ``skipped`` and left out.

* agreement rate: share of memories with argmax p_i == target; ``agreement_rate_normed`` does the same with
  the value passed through the final norm's gain (and centring, for LayerNorm) first, which is what the model
  does to a direction before the unembedding (the argmax stored in the atlas at scan time).
* baselines: 1/|V| (the paper's), and a frequency-matched one: each memory's argmax against the target of a
  random *other* memory of the same layer (a random derangement), averaged over seeded permutations. Frequent
  next tokens ("the", ",") make the first misleadingly small.
* rank of the target under p_i (0 = top), exact: the number of tokens with a strictly larger logit;
  ``*_normed`` divides it by |V| (the unembedding's rows), so models with different vocabularies line up and
  chance is about 0.5.
* suppression (beyond the paper; the mirror of agreement): share of memories with argmin p_i == target, the
  value pushing its own trigger's next token to the very bottom; ``suppression_bottom10_rate``: the target among
  the 10 lowest tokens (fewer than 10 tokens with a strictly smaller logit). Baselines as for agreement: 1/|V|
  (10/|V| for the bottom 10) and each memory's argmin against another memory's target.
* top_max_prob (Fig 6's summary): of the ``top_max_prob_n`` values of a face with the highest max p_i over all
  scanned layers, how many sit in the upper layers, at relative depth (layer+1)/L > 10/16 (the paper's layers
  11-16 of 16), how many agree with their top-1 trigger (Fig 4's rule) and how many with at least one of their
  top-k triggers (the paper's rule for its 46 of 100).
* intervals: shares have Wilson 95 % intervals, the median normalised rank a percentile-bootstrap one
  (``ffkv.analysis.intervals``).
* precision@k: share of a memory's (filled) top-k trigger slots whose next token equals argmax p_i; a trigger
  that ends its unit has no next token and counts as a miss.

The vocabulary projection is done once per layer, in chunks of memories, for both faces at once (the
negative face's logits are the positive face's negated); nothing of size [d_ff, vocab] is kept.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atlas import Atlas
from ..corpus import TokenStore
from ..errors import FfkvError
from ..projection import value_logits
from .intervals import bootstrap, wilson, wilson_per_layer

QUANTILES = {"q10": 0.10, "q25": 0.25, "q50": 0.50, "q75": 0.75, "q90": 0.90}
BOTTOM_N = 10
"""Suppression in the wider sense: the target among this many lowest tokens of the value's projection."""
PAPER_UPPER_DEPTH = 10 / 16
"""The paper's upper layers, 11-16 of 16, as a relative-depth cut: (layer+1)/L above it."""

DEFINITIONS = {
    "agreement": "share of memories (per face) whose value's top token, argmax of softmax(s * v_i . E) with "
                 "s = +1 for the positive and -1 for the negative face (raw projection, as in the paper), is "
                 "the token that follows the memory's top-1 trigger prefix; memories whose top-1 trigger is "
                 "empty or ends its unit are skipped (counted in 'skipped').",
    "agreement_normed": "the agreement rate with each value passed through the final norm's gain (and "
                        "centring, for LayerNorm) before the unembedding.",
    "frequency_baseline": "agreement of each memory's top token with the top-1 trigger's next token of a "
                          "random other memory of the same layer and face (a random derangement), averaged "
                          "over seeded permutations: the agreement that frequent next tokens alone give.",
    "next_token_rank": "rank (0 = top) of the top-1 trigger's next token under the value's distribution: the "
                       "number of vocabulary tokens with a strictly larger logit.",
    "precision_at_k": "share of a memory's top-k trigger prefixes (filled slots) whose next token is the "
                      "value's top token; a trigger that ends its unit counts as a miss.",
    "max_prob": "the largest probability of softmax(s * v_i . E), the value's confidence (Fig 6 bins it on a "
                "log scale from 1/|V| to 1).",
    "next_token_rank_normed": "the rank of the top-1 trigger's next token divided by |V|, the number of "
                              "unembedding rows (0 = top, about 0.5 for a random value); its median per layer has a "
                              "percentile-bootstrap 95% interval over memories.",
    "suppression": "share of memories (per face) whose value's bottom token, argmin of s * v_i . E, is the token "
                   "that follows the memory's top-1 trigger: the value pushes down what its trigger predicts (the "
                   "mirror of agreement); same memories and baselines as agreement.",
    "suppression_bottom10": f"share of memories whose top-1 trigger's next token is among the {BOTTOM_N} lowest "
                            f"tokens of s * v_i . E (fewer than {BOTTOM_N} tokens with a strictly smaller logit); "
                            f"uniform baseline {BOTTOM_N}/|V|.",
    "suppression_frequency_baseline": "suppression of each memory's bottom token against the top-1 trigger's next "
                                      "token of a random other memory of the layer, as for agreement.",
    "top_max_prob": "of the n values of a face with the highest max probability over all scanned layers: how many "
                    "are at relative depth (layer+1)/L above upper_depth = 10/16 (the paper's layers 11-16), how "
                    "many agree with their top-1 trigger's next token, and how many with the next token of at "
                    "least one of their top-k triggers (agree_any, the paper's rule); a value without a target "
                    "counts as not agreeing; Wilson 95% intervals.",
}


def next_token_ids(store: TokenStore, positions: np.ndarray) -> np.ndarray:
    """Global prefix-end positions (any shape, -1 = empty slot) -> id of the token after each prefix in its
    unit, or -1 where the slot is empty or the prefix ends its unit."""
    positions = np.asarray(positions, dtype=np.int64)
    flat = positions.reshape(-1)
    out = np.full(flat.shape, -1, dtype=np.int64)
    filled = np.nonzero(flat >= 0)[0]
    if len(filled):
        pos = flat[filled]
        units = store.unit_of(pos)
        end = store.offset[units] + store.length[units]
        has_next = pos + 1 < end
        out[filled[has_next]] = np.asarray(store.tokens[pos[has_next] + 1], dtype=np.int64)
    return out.reshape(positions.shape)


@dataclass
class MemoryValues:
    """Per-memory results for one layer and face (arrays of length d_ff, indexed by key)."""

    layer: int
    face: str
    prediction: np.ndarray
    """argmax of p_i (raw projection)."""
    prediction_normed: np.ndarray
    """argmax through the final norm."""
    target: np.ndarray
    """Next token of the top-1 trigger; -1 where skipped."""
    rank: np.ndarray
    """Rank of the target under p_i (0 = top); -1 where skipped."""
    bottom: np.ndarray
    """argmin of p_i (raw projection): the token the value pushes down most."""
    bottom_n: np.ndarray
    """Whether fewer than ``BOTTOM_N`` tokens have a strictly smaller logit than the target; False where skipped."""
    max_prob: np.ndarray
    """max_j p_i[j]."""
    precision: np.ndarray
    """precision@k; NaN where the memory has no trigger."""
    n_triggers: np.ndarray
    """Filled trigger slots among the top k (the denominator of precision)."""
    k: int

    @property
    def valid(self) -> np.ndarray:
        return self.target >= 0

    @property
    def agree(self) -> np.ndarray:
        return self.valid & (self.prediction == self.target)

    @property
    def agree_normed(self) -> np.ndarray:
        return self.valid & (self.prediction_normed == self.target)

    @property
    def agree_any(self) -> np.ndarray:
        """At least one of the top-k triggers is followed by the value's top token."""
        return self.precision > 0  # NaN (no trigger) compares False

    @property
    def suppress(self) -> np.ndarray:
        return self.valid & (self.bottom == self.target)

    @property
    def suppress_bottom(self) -> np.ndarray:
        """The target among the value's ``BOTTOM_N`` lowest tokens."""
        return self.valid & self.bottom_n


@torch.inference_mode()
def layer_values(atlas: Atlas, model, layer: int, faces: list[str] | None = None, precision_k: int | None = None,
                 chunk: int = 256) -> dict[str, MemoryValues]:
    """Per-memory value results of one scanned layer, for each face (one vocabulary projection for all)."""
    faces = list(atlas.faces if faces is None else faces)
    for face in faces:
        atlas.check(layer, face=face)
    tensors = atlas.layer_tensors(layer)
    top_k = int(tensors["pos_positions"].shape[1])
    k = top_k if precision_k is None else int(precision_k)
    if not 1 <= k <= top_k:
        raise FfkvError(f"precision k {k} must be between 1 and the atlas's top-k {top_k}")
    parts = model.parts
    d_ff = parts.d_ff

    positions = {f: tensors[f"{f}_positions"][:, :k].numpy() for f in faces}
    nexts = {f: next_token_ids(atlas.store, positions[f]) for f in faces}
    targets = {f: nexts[f][:, 0].copy() for f in faces}
    # an empty top-1 slot means no trigger at all: next_token_ids already gives -1 there
    results = {f: {"prediction": np.empty(d_ff, np.int64), "rank": np.full(d_ff, -1, np.int64),
                   "bottom": np.empty(d_ff, np.int64), "bottom_n": np.zeros(d_ff, bool),
                   "max_prob": np.empty(d_ff, np.float64)} for f in faces}
    for start, logits in value_logits(parts, layer, chunk=chunk):  # [c, vocab], the positive face's logits
        stop = start + logits.shape[0]
        for face in sorted(faces, key=lambda f: f != "pos"):  # pos first: the neg face negates in place
            if face == "neg":
                logits.neg_()
            best, pred = logits.max(dim=1)
            lse = torch.logsumexp(logits, dim=1)
            res = results[face]
            res["prediction"][start:stop] = pred.cpu().numpy()
            # the BOTTOM_N lowest logits: the bottom token, and the bar a target must not exceed to be among them
            low = logits.topk(min(BOTTOM_N, logits.shape[1]), dim=1, largest=False)
            res["bottom"][start:stop] = low.indices[:, 0].cpu().numpy()
            res["max_prob"][start:stop] = torch.exp(best - lse).double().cpu().numpy()
            tgt = torch.from_numpy(targets[face][start:stop]).to(logits.device)
            ok = tgt >= 0
            if bool(ok.any()):
                at = logits.gather(1, tgt.clamp(min=0)[:, None])  # [c, 1]
                rank = (logits > at).sum(dim=1, dtype=torch.int32).long()
                res["rank"][start:stop] = torch.where(ok, rank, torch.full_like(rank, -1)).cpu().numpy()
                # fewer than BOTTOM_N tokens lie strictly below the target iff it is <= the BOTTOM_N-th lowest
                res["bottom_n"][start:stop] = (ok & (at[:, 0] <= low.values[:, -1])).cpu().numpy()
        del logits

    out = {}
    for face in faces:
        key = f"value_normed_{face}_ids"
        if key in tensors:
            pred_normed = tensors[key][:, 0].to(torch.int64).numpy()
        else:  # an atlas without stored projections: compute the argmax through the final norm
            sign = 1.0 if face == "pos" else -1.0
            pred_normed = np.concatenate([(sign * logits).argmax(dim=1).cpu().numpy()
                                          for _, logits in value_logits(parts, layer, normed=True, chunk=chunk)])
        res = results[face]
        filled = positions[face] >= 0
        hits = (nexts[face] == res["prediction"][:, None]) & (nexts[face] >= 0)
        n_trig = filled.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(n_trig > 0, hits.sum(axis=1) / np.maximum(n_trig, 1), np.nan)
        out[face] = MemoryValues(layer=layer, face=face, prediction=res["prediction"],
                                 prediction_normed=pred_normed, target=targets[face], rank=res["rank"],
                                 bottom=res["bottom"], bottom_n=res["bottom_n"],
                                 max_prob=res["max_prob"], precision=precision, n_triggers=n_trig, k=k)
    return out


def frequency_baseline(prediction: np.ndarray, target: np.ndarray, n_permutations: int = 5,
                       seed: int | list[int] = 0) -> float | None:
    """Mean agreement of each prediction with the target of a random *other* memory: for each seeded
    permutation, memory order[j] is paired with the target of order[j + 1] (cyclically), so no memory is
    paired with itself. None with fewer than two memories."""
    prediction, target = np.asarray(prediction), np.asarray(target)
    n = len(target)
    if n < 2 or n_permutations < 1:
        return None
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(n_permutations):
        order = rng.permutation(n)
        other = np.empty_like(target)
        other[order] = target[np.roll(order, -1)]
        rates.append(float(np.mean(prediction == other)))
    return float(np.mean(rates))


# Per-atlas, per-model cache of layer results, so that calling values_experiment once per face projects each
# layer once. Keys are weak: the cache goes with the atlas or the model.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_layer_values(atlas: Atlas, model, layer: int, precision_k: int | None, chunk: int) -> dict:
    per_model = _CACHE.setdefault(atlas, weakref.WeakKeyDictionary())
    per_layer = per_model.setdefault(model.model, {})
    key = (layer, precision_k)
    if key not in per_layer:
        per_layer[key] = layer_values(atlas, model, layer, atlas.faces, precision_k, chunk)
    return per_layer[key]


def _none_list(n: int) -> list:
    return [None] * n


def top_max_prob_summary(layers: dict[int, MemoryValues], n_layers: int, n: int = 100,
                         upper_depth: float = PAPER_UPPER_DEPTH) -> dict:
    """Fig 6's summary for one face: of the ``n`` values with the highest max probability over ``layers`` (ties
    by layer, then key), how many are at relative depth (layer+1)/n_layers above ``upper_depth``, agree with their
    top-1 trigger, or with at least one of their top-k triggers; with Wilson intervals of the three shares."""
    candidates = []  # (max_prob, layer, key): each layer's own top n holds every one of its members of the top n
    for layer, mv in layers.items():
        keys = np.argsort(-mv.max_prob, kind="stable")[:n]
        candidates += [(float(mv.max_prob[k]), layer, int(k)) for k in keys]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen = candidates[:n]
    upper = [(layer + 1) / n_layers > upper_depth for _, layer, _ in chosen]
    agree = [bool(layers[layer].agree[key]) for _, layer, key in chosen]
    agree_any = [bool(layers[layer].agree_any[key]) for _, layer, key in chosen]
    total = len(chosen)
    out = {"n": total, "upper_depth": upper_depth, "k": next(iter(layers.values())).k if layers else None}
    for name, flags in (("upper", upper), ("agree", agree), ("agree_any", agree_any)):
        hits = int(sum(flags))
        out[name] = hits
        out[f"{name}_share"] = hits / total if total else None
        out[f"{name}_ci"] = wilson(hits, total)
    out.update(layers=[layer for _, layer, _ in chosen], keys=[key for _, _, key in chosen],
               max_prob=[p for p, _, _ in chosen])
    return out


def values_experiment(atlas: Atlas, model, face: str = "pos", *, precision_k: int | None = None, top_n: int = 10,
                      n_trigger_texts: int = 5, n_permutations: int = 5, seed: int = 0, n_bins: int = 12,
                      top_max_prob_n: int = 100, chunk: int = 256, progress: bool = True) -> dict:
    """The ``values`` block of ``analysis.json`` for one face (store the negative face's under
    ``values_neg``). Per-layer arrays have length ``n_layers`` (None where a layer was not scanned).

    ``precision_k``: triggers per memory for precision (default: the atlas's top-k); ``top_n``: memories listed
    by precision (only those with precision > 0); ``n_trigger_texts``: trigger texts shown per listed memory;
    ``n_permutations``/``seed``: the frequency baselines and the bootstrap; ``n_bins``: log-spaced
    max-probability bins (Fig 6); ``top_max_prob_n``: values in Fig 6's summary (the paper's 100).
    """
    if face not in atlas.faces:  # the atlas's own check, on any of its layers
        atlas.check(atlas.layers[0], face=face)
    if top_n < 0 or n_bins < 1 or n_permutations < 1 or top_max_prob_n < 1:
        raise FfkvError("top_n must be >= 0, n_bins, n_permutations and top_max_prob_n >= 1")
    n_layers = atlas.n_layers
    vocab = int(model.parts.unembedding.shape[0])
    face_seed = 0 if face == "pos" else 1
    names = ("agreement_rate", "agreement_rate_normed", "random_baseline", "frequency_baseline",
             "next_token_rank_median", "skipped", "precision_mean", "n_targets", "next_token_rank_median_normed",
             "next_token_rank_median_normed_ci", "suppression_rate", "suppression_bottom10_rate",
             "suppression_frequency_baseline")
    block: dict = {name: _none_list(n_layers) for name in names}
    counts = {name: _none_list(n_layers) for name in ("agreement_rate", "agreement_rate_normed", "frequency_baseline",
                                                      "suppression_rate", "suppression_bottom10_rate",
                                                      "suppression_frequency_baseline")}
    quantiles = {q: _none_list(n_layers) for q in QUANTILES}
    quantiles_normed = {q: _none_list(n_layers) for q in QUANTILES}
    edges = np.logspace(math.log10(1.0 / vocab), 0.0, n_bins + 1)
    bin_agree = np.zeros(n_bins, np.int64)
    bin_count = np.zeros(n_bins, np.int64)
    ranking = []  # (precision, n_triggers, layer, key)
    per_layer: dict[int, MemoryValues] = {}
    k_used = None
    for layer in tqdm(atlas.layers, desc=f"values ({face} face)", disable=not progress, dynamic_ncols=True):
        mv = _cached_layer_values(atlas, model, layer, precision_k, chunk)[face]
        per_layer[layer] = mv
        k_used = mv.k
        valid = mv.valid
        n_valid = int(valid.sum())
        block["skipped"][layer] = int(len(valid) - n_valid)
        block["n_targets"][layer] = n_valid
        block["random_baseline"][layer] = 1.0 / vocab
        has_trig = mv.n_triggers > 0
        if has_trig.any():
            block["precision_mean"][layer] = float(np.mean(mv.precision[has_trig]))
        for key in np.nonzero(has_trig & (mv.precision > 0))[0]:
            ranking.append((float(mv.precision[key]), int(mv.n_triggers[key]), layer, int(key)))
        if n_valid == 0:
            continue
        layer_seed = [seed, layer, face_seed]
        hits = {"agreement_rate": mv.agree.sum(), "agreement_rate_normed": mv.agree_normed.sum(),
                "suppression_rate": mv.suppress.sum(), "suppression_bottom10_rate": mv.suppress_bottom.sum()}
        for name, hit in hits.items():
            block[name][layer] = float(hit / n_valid)
            counts[name][layer] = float(hit)
        for name, pred in (("frequency_baseline", mv.prediction), ("suppression_frequency_baseline", mv.bottom)):
            rate = frequency_baseline(pred[valid], mv.target[valid], n_permutations, seed=layer_seed)
            block[name][layer] = rate
            counts[name][layer] = None if rate is None else rate * n_valid  # a share of n_valid pairs
        ranks = mv.rank[valid].astype(np.float64)
        for target, values in ((quantiles, ranks), (quantiles_normed, ranks / vocab)):
            for name, value in zip(QUANTILES, np.quantile(values, list(QUANTILES.values()))):
                target[name][layer] = float(value)
        block["next_token_rank_median"][layer] = float(np.median(ranks))
        block["next_token_rank_median_normed"][layer] = float(np.median(ranks / vocab))
        block["next_token_rank_median_normed_ci"][layer] = bootstrap(ranks / vocab, "median", seed=layer_seed)
        idx = np.clip(np.searchsorted(edges, mv.max_prob[valid], side="right") - 1, 0, n_bins - 1)
        bin_count += np.bincount(idx, minlength=n_bins)
        bin_agree += np.bincount(idx, weights=mv.agree[valid], minlength=n_bins).astype(np.int64)
    for name, hit in counts.items():
        block[f"{name}_ci"] = wilson_per_layer(hit, block["n_targets"])
    block["rank_quantiles"] = quantiles
    block["rank_quantiles_normed"] = quantiles_normed
    block["vocab_size"] = vocab
    block["max_prob_vs_agreement"] = {
        "bin_edges": [float(x) for x in edges],
        "agreement": [float(a / c) if c else None for a, c in zip(bin_agree, bin_count)],
        "count": [int(c) for c in bin_count],
        "agreement_ci": [wilson(int(a), int(c)) for a, c in zip(bin_agree, bin_count)],
    }
    block["top_max_prob"] = top_max_prob_summary(per_layer, n_layers, top_max_prob_n)
    ranking.sort(key=lambda r: (-r[0], -r[1], r[2], r[3]))
    top = []
    for precision, n_trig, layer, key in ranking[:top_n]:
        triggers = atlas.triggers(layer, key, face, n_trigger_texts)
        top.append({"layer": layer, "key": key, "face": face, "precision": precision, "n_triggers": n_trig,
                     "top_tokens": atlas.value_tokens(layer, key, face, n=10)["top_tokens"],
                     "triggers": [t.text for t in triggers],
                     "trigger_next_tokens": [t.next_token for t in triggers]})
    block["top_memories"] = top
    block["precision_k"] = k_used
    block["definitions"] = dict(DEFINITIONS)
    return block
