"""The input and output side of `ffkv explain`: patterns of a face's triggers, what its value promotes, one line.

**Input side: patterns shared by a face's top triggers** (``ExplainConfig.triggers``, 25 by default). Thirteen
pattern kinds, each tested on *all* triggers (so a key can be shallow and semantic at once):

* shallow: ``last`` (the same last token), ``bigram`` (the same last two tokens), ``near`` (the same token one or
  two before the last), ``wordclass`` (a closed word class of the last word: a preposition, a determiner, an
  auxiliary verb..., ``words.WORD_CLASSES``, shared by >= 3 different words), and the token classes
  ``number``, ``punct``, ``piece``, ``first``, ``capital`` (``analysis.features.CLASSES``);
* semantic: ``topic`` and ``article`` (the corpus's topic / title, where it has them), ``category`` (trigger words
  in one cluster of the corpus's words under the independent sentence embedder, ``features.word_clusters``: it
  needs >= 3 *different* words (by their first letters, ``features.STEM_CHARS``), so a repeated word or the forms
  of one are not a meaning) and ``subject`` (prefixes whose subjects
  are alike; one item per unit).

Support counts distinct units (prefixes of one sentence are one piece of evidence). The null is the corpus: a
token / class / topic kind is tested with a binomial tail at its rate among the scanned positions (the class
rates matched to each trigger's position in its unit, so that e.g. "capitalised" is not rewarded for sentence
starts; "first token" itself at its overall rate); a
meaning kind is tested against random sets of the same size drawn from the scanned positions (the statistic:
the largest group of items with cosine >= the kind's threshold to one of them). A kind is significant when it
has >= 3 units of support and p < ``alpha`` / 13 (Bonferroni over the kinds tested, one candidate per kind).

For a kind with many candidates (tokens, bigrams, topics, titles, word clusters) the candidate is the *least
likely* one under the null: each value v shared by s_v >= 3 of the key's n units has the tail
t_v = P(Binomial(n, rate_v) >= s_v), and the statistic is t = min_v t_v.
Its p-value is the union bound over every value the corpus has,
p = sum_v P(t_v <= t) (see ``CorpusNull.scan_p``), so trying every candidate is paid for, while a rare word
repeated in 3 units (" deals") counts and a common one (" to") does not: asking only whether the *most shared*
value is shared more often than some value would be at random misses the first.

**Output side**: what the face promotes and what it suppresses, i.e. the top and the bottom of its value's
projection on the vocabulary (raw v·E and through the final norm; the negative face adds −v, so its lists are
swapped), and whether each list forms one concept: the mean pairwise cosine of its words under the embedder,
against random vocabulary words (``coherent`` when p < ``alpha``).

**Kind** of a face: shallow / semantic / both / none from its significant patterns; each trigger is covered by
shallow / semantic / both / no pattern (Fig 2's unit). Scores on held-out text: ``analysis.simulate``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import binom

from ..embedder import DIM, Embedder
from ..errors import FfkvError
from .features import CLASSES, PositionFeatures, Vocabulary
from .words import WORD_CLASSES

SHALLOW_KINDS = ("last", "bigram", "near", "wordclass", *CLASSES)
SEMANTIC_KINDS = ("topic", "article", "category", "subject")
KINDS = SHALLOW_KINDS + SEMANTIC_KINDS
KIND_BIT = {k: 1 << i for i, k in enumerate(KINDS)}
SHALLOW_MASK = sum(KIND_BIT[k] for k in SHALLOW_KINDS)
SEMANTIC_MASK = sum(KIND_BIT[k] for k in SEMANTIC_KINDS)
MIN_SUPPORT = 3
CLASS_WORDS = {"number": "a number or year", "punct": "punctuation", "piece": "a piece continuing a word",
               "first": "the first token of a sentence", "capital": "a capitalised word"}
OFFSET_BUCKETS = np.array([0, 1, 2, 4, 8, 16, 32])
NULL_POSITIONS = 2000
"""Random scanned positions on which a meaning group's corpus rate (the base of its lift) is measured."""


@dataclass
class ExplainConfig:
    """Settings of `ffkv explain`; every field is also a flag."""

    triggers: int | None = field(default=None, metadata={"help": "top triggers per face read for patterns "
                                 "(default: 25 as in the paper, or the atlas's top-k where smaller)"})
    alpha: float = field(default=0.05, metadata={"help": "family-wise significance level over the 13 pattern kinds"})
    subject_cosine: float = field(default=0.25, metadata={"help": "centred embedder cosine above which two prefixes "
                                  "have alike subjects (subject patterns; tuned on the development labels)"})
    null_sets: int = field(default=1000, metadata={"help": "random sets per size in the null of the meaning tests"})
    heldout_tokens: int = field(default=6000, metadata={"help": "held-out tokens the explanations are scored on"})
    heldout_random: int = field(default=300, metadata={"help": "random held-out prefixes in the simulation score"})
    heldout_top: int = field(default=20, metadata={"help": "top held-out prefixes per face in the simulation score"})
    seed: int = field(default=0, metadata={"help": "seed of every sample"})

    def for_top_k(self, top_k: int) -> ExplainConfig:
        """This config with ``triggers`` set (25, or ``top_k`` where smaller); FfkvError if it cannot be read."""
        triggers = self.triggers if self.triggers is not None else min(25, top_k)
        if not 3 <= triggers <= top_k:
            raise FfkvError(f"--triggers must be between 3 and the atlas's top-k {top_k}")
        return dataclasses.replace(self, triggers=triggers)


@dataclass
class LayerFaceExplanation:
    """Input-side patterns of every key of one layer and face (arrays over keys)."""

    layer: int
    face: str
    keys: np.ndarray
    n_units: np.ndarray
    significant: dict[str, np.ndarray]
    """kind -> [K] bool."""
    support: dict[str, np.ndarray]
    p_value: dict[str, np.ndarray]
    lift: dict[str, np.ndarray]
    """kind -> [K] log(share of triggers / null rate): the weight of the kind in the simulation."""
    value: dict[str, np.ndarray]
    """The candidate of each kind: a code (last, near), a bigram code, a class flag, a topic / title id."""
    centroid: dict[str, np.ndarray]
    """subject -> [K, DIM] unit centroid of the group; radius the lowest member cosine to it (a category is matched
    by its word cluster, ``value``, instead)."""
    radius: dict[str, np.ndarray]
    group: dict[str, np.ndarray]
    """category / subject -> [K, T] feature rows of one trigger per group member, closest to the centroid first
    (-1 after the last member): the description names their words / article titles."""
    cover: np.ndarray
    """[K, T] int: bit mask of the significant kinds covering each trigger (-1: empty trigger slot)."""
    last_codes: list[dict[int, int]]
    """Per key: code of the last token -> units of support (the last-token lookup baseline is fitted on it)."""
    fire_threshold: np.ndarray | None = None
    """[K] where the simulation predicts firing, and the same for the lookup baseline (``simulate``)."""
    lookup_threshold: np.ndarray | None = None


# -- null rates from the scanned positions ---------------------------------------------------------------
class CorpusNull:
    """Rates of every feature among the scanned positions, and null distributions of the meaning statistics."""

    def __init__(self, feats: PositionFeatures, vocab: Vocabulary, cfg: ExplainConfig):
        n = max(len(feats), 1)
        self.n = n
        self.last = np.bincount(feats.code, minlength=vocab.n_codes) / n
        bigram = feats.prev * vocab.n_codes + feats.code
        uniq, counts = np.unique(bigram[feats.prev >= 0], return_counts=True)
        self.bigram_codes, self.bigram_rates = uniq, counts / n
        near = np.unique(np.concatenate([np.stack([np.arange(len(feats)), feats.prev], 1),
                                         np.stack([np.arange(len(feats)), feats.prev2], 1)]), axis=0)
        near = near[near[:, 1] >= 0]
        self.near = np.bincount(near[:, 1], minlength=vocab.n_codes) / n
        bucket = np.searchsorted(OFFSET_BUCKETS, feats.offset, side="right") - 1
        self.class_rate = np.zeros((len(CLASSES), len(OFFSET_BUCKETS)))
        for b in range(len(OFFSET_BUCKETS)):
            sel = bucket == b
            if sel.any():
                self.class_rate[:, b] = feats.classes[sel].mean(0)
        self.first_rate = float(feats.classes[:, CLASSES.index("first")].mean()) if len(feats) else 1.0
        self.topic = np.bincount(feats.topic[feats.topic >= 0], minlength=len(feats.topics)) / n
        self.title = np.bincount(feats.title[feats.title >= 0], minlength=len(feats.titles)) / n
        self.word_class = np.bincount(feats.word_class[feats.word_class >= 0], minlength=len(WORD_CLASSES)) / n
        # a position's word is in one cluster per level, numbered apart: each cluster's share of positions
        self.cluster = np.bincount(feats.word_cluster[feats.word_cluster >= 0], minlength=feats.n_clusters) / n
        rng = np.random.default_rng(cfg.seed)
        has_subject = np.abs(feats.subject_vec).sum(1) > 0
        pick = rng.permutation(np.nonzero(has_subject)[0])
        _, first = np.unique(feats.unit[pick], return_index=True)  # one random prefix per unit
        self.subject_pool = feats.subject_vec[pick[first]]
        sample = rng.choice(len(feats), min(len(feats), NULL_POSITIONS), replace=False)
        self.subject_positions = feats.subject_vec[sample]
        self.group_null = {
            "subject": _null_group_sizes(self.subject_pool, cfg.subject_cosine, cfg.triggers, cfg.null_sets, rng),
        }

    def bigram_rate(self, codes: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.bigram_codes, codes).clip(0, max(len(self.bigram_codes) - 1, 0))
        if len(self.bigram_codes) == 0:
            return np.full(len(codes), 1.0 / self.n)
        return np.where(self.bigram_codes[i] == codes, self.bigram_rates[i], 1.0 / self.n)

    def rates_of(self, kind: str, values: np.ndarray) -> np.ndarray:
        """Corpus rate of each candidate value of a many-candidate kind (values >= 0)."""
        if kind == "bigram":
            return self.bigram_rate(values)
        table = self.value_rates(kind)
        return table[values] if len(table) else np.ones(len(values))

    def value_rates(self, kind: str) -> np.ndarray:
        """The corpus rate of every value of a many-candidate kind (bigrams: of those the corpus has)."""
        return {"last": self.last, "near": self.near, "bigram": self.bigram_rates, "topic": self.topic,
                "article": self.title, "category": self.cluster, "wordclass": self.word_class}[kind]

    def scan_p(self, kind: str, t: np.ndarray, n: np.ndarray) -> np.ndarray:
        """p-value of the statistic t = min_v P(Binomial(n, rate_v) >= s_v) over the candidates v with s_v >= 3:
        sum over every value v of the corpus of P(the tail of v reaches t or below) = sum_v T_v(s*_v), where
        T_v(s) = P(Binomial(n, rate_v) >= s) and s*_v the smallest s >= 3 with T_v(s) <= t (the union bound,
        exact for one candidate). Values of the same rate are summed as one, so a table per (kind, n) has a few
        thousand rows; t >= 1 (no candidate) gives 1."""
        out = np.ones(len(t))
        for n_ in np.unique(n[t < 1.0]).tolist():
            sel = (n == n_) & (t < 1.0)
            levels, cumulative = self._scan_table(kind, int(n_))
            i = np.searchsorted(levels, t[sel] * (1 + 1e-9), side="right") - 1  # t itself is one of the levels
            out[sel] = np.minimum(1.0, np.where(i >= 0, cumulative[np.maximum(i, 0)], 0.0))
        return out

    def _scan_table(self, kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For one kind and n: every tail level T_v(s) (s >= 3) in increasing order, and the sum over values of
        the largest T_v(s) at or below each level. As the level grows past T_v(s), value v's term moves up from
        T_v(s + 1) to T_v(s): the increments, summed in level order, give the sum at every level."""
        if not hasattr(self, "_scan_tables"):
            self._scan_tables: dict = {}
        key = (kind, n)
        if key not in self._scan_tables:
            rates = self.value_rates(kind)
            rates, weight = np.unique(rates[rates > 0], return_counts=True)
            s = np.arange(MIN_SUPPORT, n + 1)
            if len(s) == 0 or len(rates) == 0:
                self._scan_tables[key] = (np.zeros(0), np.zeros(0))
            else:
                tails = binom.sf(s[None, :] - 1, n, rates[:, None])  # [rates, s], falling with s
                below = np.concatenate([tails[:, 1:], np.zeros((len(rates), 1))], axis=1)
                levels = tails.ravel()
                order = np.argsort(levels, kind="stable")
                increments = ((tails - below) * weight[:, None]).ravel()[order]
                self._scan_tables[key] = (levels[order], np.cumsum(increments))
        return self._scan_tables[key]

    def class_rates(self, offsets: np.ndarray) -> np.ndarray:
        """[len(CLASSES), *offsets.shape] rate of each class at these within-unit offsets."""
        bucket = np.searchsorted(OFFSET_BUCKETS, offsets, side="right") - 1
        return self.class_rate[:, bucket]


def _gram(vectors: np.ndarray) -> np.ndarray:
    """[S, M, M] dot products of each set's vectors (a batched matrix product)."""
    v = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
    return torch.bmm(v, v.transpose(1, 2)).numpy()


def _largest_groups(vectors: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """vectors [S, M, D], mask [S, M] -> (size of the largest group [S], its members [S, M] bool): the items with
    cosine >= threshold to the item that has most such neighbours."""
    sims = _gram(vectors)
    adj = (sims >= threshold) & mask[:, :, None] & mask[:, None, :]
    neighbours = adj.sum(2)
    seed = neighbours.argmax(1)
    members = adj[np.arange(len(adj)), seed]
    return neighbours.max(1) if adj.shape[1] else np.zeros(len(adj), int), members


def _null_group_sizes(pool: np.ndarray, threshold: float, max_items: int, n_sets: int,
                      rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Set size m -> largest-group sizes of ``n_sets`` random sets of m distinct pool items."""
    out: dict[int, np.ndarray] = {}
    if len(pool) < MIN_SUPPORT:
        return out
    for m in range(MIN_SUPPORT, max_items + 1):
        m_eff = min(m, len(pool))
        idx = np.argsort(rng.random((n_sets, len(pool))), axis=1)[:, :m_eff] if len(pool) <= 4096 else \
            np.stack([rng.choice(len(pool), m_eff, replace=False) for _ in range(n_sets)])
        sizes, _ = _largest_groups(pool[idx], np.ones(idx.shape, bool), threshold)
        out[m] = np.sort(sizes)
    return out


def _empirical_p(null: dict[int, np.ndarray], m: np.ndarray, observed: np.ndarray) -> np.ndarray:
    p = np.ones(len(m))
    for i, (mi, obs) in enumerate(zip(m.tolist(), observed.tolist())):
        dist = null.get(mi)
        if dist is None or obs < MIN_SUPPORT:
            continue
        p[i] = (1 + len(dist) - np.searchsorted(dist, obs, side="left")) / (len(dist) + 1)
    return p


# -- the input side ----------------------------------------------------------------------------------------
def _rank(x: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inverse = np.unique(x, return_inverse=True)
    return inverse.reshape(-1), len(uniq)


def _distinct_triples(k: np.ndarray, values: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct (k, value, unit) triples, sorted by k then value (1-D sorts of one int64 code: fast)."""
    v_rank, nv = _rank(values)
    u_rank, nu = _rank(units)
    code = np.unique((k.astype(np.int64) * nv + v_rank) * nu + u_rank)
    kv = code // nu
    v_of = np.zeros(nv, values.dtype)
    v_of[v_rank] = values
    return kv // nv, v_of[kv % nv], kv


def _least_likely(values: np.ndarray, units: np.ndarray, valid: np.ndarray, n_units: np.ndarray,
                  rates_of, names: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: among the values shared by >= MIN_SUPPORT distinct units (and, with ``names``, >= MIN_SUPPORT
    distinct names: the words of a category), the one least likely under the null (smallest binomial tail at
    its corpus rate ``rates_of(values)``; ties: more units, then the smaller value), its units of support and
    its tail (-1, 0 and 1 where no value qualifies)."""
    rows = values.shape[0]
    best, support, tail = np.full(rows, -1, np.int64), np.zeros(rows, np.int64), np.ones(rows)
    k_idx = np.broadcast_to(np.arange(rows)[:, None], values.shape)
    sel = valid & (values >= 0)
    if not sel.any():
        return best, support, tail
    ks, vs, kv = _distinct_triples(k_idx[sel], values[sel], units[sel])
    kv, start, counts = np.unique(kv, return_index=True, return_counts=True)
    ks, vs = ks[start], vs[start]
    keep = counts >= MIN_SUPPORT
    if names is not None:  # the same (row, value) codes, counted over distinct names instead of units
        _, _, kv_named = _distinct_triples(k_idx[sel], values[sel], names[sel])
        named, n_names = np.unique(kv_named, return_counts=True)
        keep &= np.isin(kv, named[n_names >= MIN_SUPPORT])
    ks, vs, counts = ks[keep], vs[keep], counts[keep]
    if len(ks) == 0:
        return best, support, tail
    tails = binom.sf(counts - 1, n_units[ks], np.clip(rates_of(vs), 1e-12, 1.0))
    order = np.lexsort((vs, -counts, tails, ks))
    ks, vs, counts, tails = ks[order], vs[order], counts[order], tails[order]
    first = np.r_[True, ks[1:] != ks[:-1]]
    best[ks[first]], support[ks[first]], tail[ks[first]] = vs[first], counts[first], tails[first]
    return best, support, tail


def _units_where(flag: np.ndarray, units: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row: distinct units among the triggers where ``flag`` holds."""
    sel = flag & valid
    k_idx = np.broadcast_to(np.arange(flag.shape[0])[:, None], flag.shape)
    if not sel.any():
        return np.zeros(flag.shape[0], np.int64)
    u_rank, nu = _rank(units[sel])
    pairs = np.unique(k_idx[sel].astype(np.int64) * nu + u_rank)
    return np.bincount(pairs // nu, minlength=flag.shape[0])


def _binomial_p(support: np.ndarray, n: np.ndarray, rate: np.ndarray) -> np.ndarray:
    rate = np.clip(rate, 1e-9, 1.0)
    p = binom.sf(support - 1, n, rate)
    return np.where(support >= MIN_SUPPORT, p, 1.0)


def explain_layer_face(layer: int, face: str, keys: np.ndarray, positions: np.ndarray, feats: PositionFeatures,
                       null: CorpusNull, vocab: Vocabulary, cfg: ExplainConfig) -> LayerFaceExplanation:
    """Patterns of the triggers ``positions`` [K, T] (flat store positions, -1 = empty) of ``keys``."""
    rows = feats.rows(positions)
    valid = rows >= 0
    r = np.where(valid, rows, 0)
    units = np.where(valid, feats.unit[r], -1)
    K, T = positions.shape
    n_units = _units_where(np.ones_like(valid), units, valid)
    threshold = cfg.alpha / len(KINDS)
    sig, sup, pv, lift, val = {}, {}, {}, {}, {}
    covers = {}

    def record(kind, value, support, rate, covered, tail=None):
        p = _binomial_p(support, n_units, rate) if tail is None else null.scan_p(kind, tail, n_units)
        sig[kind], sup[kind], pv[kind], val[kind] = p < threshold, support, p, value
        share = support / np.maximum(n_units, 1)
        lift[kind] = np.log(np.maximum(share, 1e-9) / np.clip(rate, 1e-9, 1.0))
        covers[kind] = covered

    def candidate(kind, values, in_units=units, in_valid=valid, names=None):
        return _least_likely(values, in_units, in_valid, n_units, lambda v: null.rates_of(kind, v), names)

    code = np.where(valid, feats.code[r], -1)
    best, support, tail = candidate("last", code)
    record("last", best, support, null.last[np.maximum(best, 0)], code == best[:, None], tail)
    bigram = np.where(valid & (feats.prev[r] >= 0), feats.prev[r] * vocab.n_codes + feats.code[r], -1)
    best, support, tail = candidate("bigram", bigram)
    record("bigram", best, support, null.bigram_rate(best), (bigram == best[:, None]) & (best[:, None] >= 0), tail)
    near_codes = np.concatenate([np.where(valid, feats.prev[r], -1), np.where(valid, feats.prev2[r], -1)], axis=1)
    best, support, tail = candidate("near", near_codes, np.concatenate([units, units], 1),
                                    np.concatenate([valid, valid], 1))
    near_cover = (near_codes[:, :T] == best[:, None]) | (near_codes[:, T:] == best[:, None])
    record("near", best, support, null.near[np.maximum(best, 0)], near_cover & (best[:, None] >= 0), tail)
    word_class = np.where(valid, feats.word_class[r], -1)
    best, support, tail = candidate("wordclass", word_class, names=feats.stem_id[r])
    record("wordclass", best, support, null.rates_of("wordclass", np.maximum(best, 0)) if K else np.ones(0),
           (word_class == best[:, None]) & (best[:, None] >= 0), tail)
    offsets = np.where(valid, feats.offset[r], 0)
    rates = null.class_rates(offsets)  # [C, K, T]
    for c, name in enumerate(CLASSES):
        flag = valid & feats.classes[r, c]
        if name == "first":  # matching the offset would make the first position its own null: not a test
            rate = np.full(K, null.first_rate)
        else:
            rate = np.where(valid, rates[c], 0).sum(1) / np.maximum(valid.sum(1), 1)
        record(name, np.full(K, c), _units_where(flag, units, valid), rate, flag)
    for kind, column in (("topic", feats.topic), ("article", feats.title)):
        ids = np.where(valid, column[r], -1)
        best, support, tail = candidate(kind, ids)
        rate = null.rates_of(kind, np.maximum(best, 0)) if K else np.ones(0)
        record(kind, best, support, np.where(best >= 0, rate, 1.0), (ids == best[:, None]) & (best[:, None] >= 0),
               tail)
    centroid, radius, group = {}, {}, {}
    clusters = np.where(valid[:, :, None], feats.word_cluster[r], -1)  # [K, T, levels]: one candidate per level
    V = clusters.shape[2]
    stems = np.repeat(feats.stem_id[r], V, axis=1)  # the word behind each candidate, for ">= 3 different words"
    best, support, tail = candidate("category", clusters.reshape(K, -1), np.repeat(units, V, axis=1),
                                    np.repeat(valid, V, axis=1), stems)
    members = (clusters == best[:, None, None]).any(2) & (best[:, None] >= 0)
    record("category", best, support, null.rates_of("category", np.maximum(best, 0)) if K else np.ones(0), members,
           tail)
    group["category"] = _cluster_members(feats, r, members, best)
    c, rad, g, members_cover, support, m, size = _subject_groups(feats, r, valid, units, cfg)
    p = _empirical_p(null.group_null["subject"], m, size)
    p = np.where(support >= MIN_SUPPORT, p, 1.0)
    # add-one smoothing: a group no null prefix matches gets a rate of 1 / (pool + 1), not 0
    rate = (((null.subject_positions @ c.T) >= rad[None, :]).sum(0) + 1) / (len(null.subject_positions) + 1)
    sig["subject"], sup["subject"], pv["subject"], val["subject"] = p < threshold, support, p, np.full(K, -1)
    lift["subject"] = np.log(np.maximum(support / np.maximum(n_units, 1), 1e-9) / np.clip(rate, 1e-9, 1.0))
    covers["subject"] = members_cover
    centroid["subject"], radius["subject"], group["subject"] = c, rad, g
    cover = np.zeros((K, T), np.int64)
    for kind in KINDS:
        cover |= np.where(covers[kind] & sig[kind][:, None] & valid, KIND_BIT[kind], 0)
    cover = np.where(valid, cover, -1)
    last_codes: list[dict[int, int]] = [{} for _ in range(K)]
    if valid.any():
        k_idx = np.broadcast_to(np.arange(K)[:, None], (K, T))
        ks, vs, kv = _distinct_triples(k_idx[valid], code[valid], units[valid])
        _, start, counts = np.unique(kv, return_index=True, return_counts=True)
        for k, c, n in zip(ks[start].tolist(), vs[start].tolist(), counts.tolist()):
            last_codes[k][c] = n
    return LayerFaceExplanation(layer, face, np.asarray(keys), n_units, sig, sup, pv, lift, val, centroid, radius,
                                group, cover, last_codes)


def _cluster_members(feats: PositionFeatures, r: np.ndarray, members: np.ndarray, best: np.ndarray) -> np.ndarray:
    """[K, T] feature rows of the category's member triggers, one per stem, closest to the cluster's centroid
    first (-1 after the last): the words the description names."""
    K, T = r.shape
    centroids = feats.centroids
    c = centroids[np.maximum(best, 0)] if len(centroids) else np.zeros((K, DIM), np.float32)
    cos = np.einsum("ktd,kd->kt", feats.word_vec[r], c)
    group = np.full((K, T), -1, np.int64)
    for k in np.nonzero(members.any(1))[0].tolist():
        seen: dict[int, int] = {}
        for t in np.argsort(-np.where(members[k], cos[k], -np.inf)).tolist():
            if members[k, t]:
                seen.setdefault(int(feats.stem_id[r[k, t]]), int(r[k, t]))
        group[k, :len(seen)] = list(seen.values())
    return group


def _subject_groups(feats, r, valid, units, cfg):
    """The largest group of alike subjects per key: items = distinct units (the mean subject vector of the unit's
    triggers), a group = the items with cosine >= ``cfg.subject_cosine`` to the item with most such neighbours."""
    K, T = r.shape
    vec_all, threshold = feats.subject_vec, cfg.subject_cosine
    usable = valid & feats.has_subject[r]
    name = units
    k_idx = np.broadcast_to(np.arange(K)[:, None], (K, T))
    items = np.zeros((K, T, vec_all.shape[1]), np.float32)
    mask = np.zeros((K, T), bool)
    item_of = np.full((K, T), -1)
    first_trigger = np.zeros((K, T), np.int64)
    if usable.any():
        n_rank, nn = _rank(name[usable])
        code, first, inverse = np.unique(k_idx[usable].astype(np.int64) * nn + n_rank, return_index=True,
                                         return_inverse=True)
        inverse = inverse.reshape(-1)
        uniq = np.stack([code // nn, code % nn], 1)
        start = np.searchsorted(uniq[:, 0], np.arange(K))
        slot = np.arange(len(uniq)) - start[uniq[:, 0]]  # item index within its key
        trig_k, trig_t = np.nonzero(usable)
        item_of[trig_k, trig_t] = slot[inverse]
        mask[uniq[:, 0], slot] = True
        first_trigger[uniq[:, 0], slot] = trig_t[first]
        # the mean over the unit's triggers, made unit-length again
        flat = torch.from_numpy(items.reshape(K * T, -1))  # shares memory with ``items``
        flat.index_add_(0, torch.from_numpy(trig_k * T + slot[inverse]), torch.from_numpy(vec_all[r[trig_k, trig_t]]))
        items /= np.maximum(np.linalg.norm(items, axis=2, keepdims=True), 1e-12)
    size, members = _largest_groups(items, mask, threshold)
    m = mask.sum(1)
    c = (items * members[:, :, None]).sum(1)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    member_cos = np.einsum("kmd,kd->km", items, c)
    rad = np.where(members, member_cos, np.inf).min(1)
    rad = np.where(np.isfinite(rad), np.maximum(rad, 0.2), 1.0)
    cover = (item_of >= 0) & np.take_along_axis(members, np.maximum(item_of, 0), 1)
    support = _units_where(cover, units, valid)
    order = np.argsort(-np.where(members, member_cos, -np.inf), axis=1)
    group = np.where(np.take_along_axis(members, order, 1), np.take_along_axis(r, np.take_along_axis(
        first_trigger, order, 1), 1), -1)  # feature rows of the members, closest to the centroid first
    return c.astype(np.float32), rad.astype(np.float32), group, cover, support, m, size


# -- the output side --------------------------------------------------------------------------------------
def _token_words(vocab: Vocabulary, ids: np.ndarray) -> list[str]:
    return [vocab.text[int(i)].strip() for i in ids]


class Coherence:
    """Whether a list of tokens forms one concept: mean pairwise embedder cosine of their words against random
    word tokens of the vocabulary (the null of the same size)."""

    def __init__(self, vocab: Vocabulary, embedder: Embedder, size: int, n_sets: int, seed: int):
        rng = np.random.default_rng(seed)
        words = np.nonzero(vocab.alpha & ~vocab.empty)[0]
        sample = rng.choice(words, min(2000, len(words)), replace=False)
        pool = embedder.encode(sorted({vocab.text[int(i)].strip().lower() for i in sample}))
        self.size = size
        idx = np.stack([rng.choice(len(pool), size, replace=False) for _ in range(n_sets)])
        self.null = np.sort(_mean_pair_cos(pool[idx], np.ones(idx.shape, bool)))
        self.embedder = embedder

    def score(self, token_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean pairwise cosine, p-value, mean vector) per list (words without a letter are left out)."""
        cleaned = [[w.lower() for w in ws if any(ch.isalpha() for ch in w)][: self.size] for ws in token_lists]
        vocab = sorted({w for ws in cleaned for w in ws})
        vecs = self.embedder.encode(vocab) if vocab else np.zeros((0, DIM), np.float32)
        where = {w: i for i, w in enumerate(vocab)}
        arr = np.zeros((len(cleaned), self.size, DIM), np.float32)
        mask = np.zeros((len(cleaned), self.size), bool)
        for i, ws in enumerate(cleaned):
            for j, w in enumerate(dict.fromkeys(ws)):
                arr[i, j], mask[i, j] = vecs[where[w]], True
        cos = _mean_pair_cos(arr, mask)
        p = (1 + len(self.null) - np.searchsorted(self.null, cos, side="left")) / (len(self.null) + 1)
        mean = arr.sum(1) / np.maximum(mask.sum(1), 1)[:, None]
        return cos, np.where(mask.sum(1) >= 3, p, 1.0), mean


def _mean_pair_cos(vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    sims = _gram(vectors)
    pair = mask[:, :, None] & mask[:, None, :] & ~np.eye(mask.shape[1], dtype=bool)[None]
    return (sims * pair).sum((1, 2)) / np.maximum(pair.sum((1, 2)), 1)


# -- descriptions ------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    return '"' + text.strip() + '"'


def pattern_phrase(kind: str, e: LayerFaceExplanation, i: int, vocab: Vocabulary, feats: PositionFeatures) -> str:
    v = int(e.value[kind][i])
    if kind == "last":
        common = sorted(e.last_codes[i].items(), key=lambda x: -x[1])
        forms = [vocab.code_text[c] for c, n in common if n >= 2][:3] or [vocab.code_text[v]]
        return "ends with " + " / ".join(_quote(f) for f in forms)
    if kind == "bigram":
        return "ends with " + _quote(vocab.code_text[v // vocab.n_codes] + " " + vocab.code_text[v % vocab.n_codes])
    if kind == "near":
        return "after " + _quote(vocab.code_text[v])
    if kind in CLASS_WORDS:
        return CLASS_WORDS[kind]
    if kind == "wordclass":
        return list(WORD_CLASSES)[v]
    if kind == "topic":
        return f"topic {feats.topics[v]}"
    if kind == "article":
        return f"article {_quote(feats.titles[v])}"
    if kind == "category":
        return "words like " + " / ".join(feats.word[row] for row in e.group["category"][i][:4] if row >= 0)
    titles = [feats.titles[feats.title[row]] for row in e.group["subject"][i] if row >= 0 and feats.title[row] >= 0]
    titles = list(dict.fromkeys(titles))[:3]
    return "subjects like " + " / ".join(_quote(t) for t in titles) if titles else "alike subjects"


def face_kind(sig: dict[str, np.ndarray], i: int) -> str:
    shallow = any(sig[k][i] for k in SHALLOW_KINDS)
    semantic = any(sig[k][i] for k in SEMANTIC_KINDS)
    return "both" if shallow and semantic else "shallow" if shallow else "semantic" if semantic else "none"


def describe(e: LayerFaceExplanation, i: int, vocab: Vocabulary, feats: PositionFeatures, promotes: list[str],
             suppresses: list[str], promote_coherent: bool, suppress_coherent: bool,
             phrases: dict[str, str] | None = None) -> str:
    """One line: the significant patterns, strongest first (``phrases``: their texts, when already made); then
    what firing promotes and suppresses."""
    found = sorted((k for k in KINDS if e.significant[k][i]), key=lambda k: e.p_value[k][i])
    parts = [phrases[k] if phrases is not None else pattern_phrase(k, e, i, vocab, feats) for k in found[:4]]
    fires = "; ".join(parts) if parts else "no shared pattern"
    promotes, suppresses = _distinct_words(promotes), _distinct_words(suppresses)
    out = [f"promotes {' / '.join(_quote(t) for t in promotes[:3])}" + (" (one concept)" if promote_coherent else "")]
    if suppress_coherent or not promote_coherent:
        out.append(f"suppresses {' / '.join(_quote(t) for t in suppresses[:3])}"
                   + (" (one concept)" if suppress_coherent else ""))
    return f"{fires} → " + "; ".join(out)


def _distinct_words(tokens: list[str]) -> list[str]:
    """Tokens with distinct lower-cased stripped text, in order (" French", "French" are one)."""
    seen: dict[str, str] = {}
    for t in tokens:
        key = t.strip().lower()
        if key and key not in seen:
            seen[key] = t.strip()
    return list(seen.values())
