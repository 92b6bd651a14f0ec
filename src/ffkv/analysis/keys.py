"""§3 of the paper: what keys detect. Trigger patterns (Fig 2, Table 1) and token removal (Fig 3).

Patterns are found automatically, with a null model, where the paper used expert annotators:

* **shallow** (surface) candidates: the triggers share their last token, their last two tokens, or a token
  among their last three. Tokens are compared by their lower-cased, stripped text.
* **semantic** candidates: the triggers share a document topic or a document title (where the corpus has
  them), or a content word (not a stop word, >= 4 letters) in the context before the last three tokens, or
  their last words *mean* alike: a cluster of last tokens, of at least three different surface forms, whose
  (centred) input embeddings of the model itself have cosine > ``MEANING_COSINE`` with one of them (e.g.
  " km", " mi", " ft"; or " same", " similar", " different"), tested against the corpus share of tokens that
  close to it.
  A semantic candidate is tested only on the triggers that no shallow pattern covers, so a topic that merely
  follows from a shared n-gram does not count ("beyond what surface overlap explains").

A candidate needs >= 3 triggers (as in the paper) and a binomial tail probability, under the corpus
frequency of the feature, below ``alpha`` divided by the number of candidates tested for that key and family
(Bonferroni), so that frequent tokens ("the", ",") and big topics do not count as patterns.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from ..capture import last_position_coefficients
from ..corpus import TokenStore
from .words import STOP_WORDS

# Frequent words that say nothing about a topic, on top of the function words.
GENERIC_WORDS = frozenset("""
one two three four five also although however though within without since among including known called used
many much first well became become later often several part made make like another
""".split())
NOT_CONTENT = STOP_WORDS | GENERIC_WORDS

MIN_TRIGGERS = 3
MEANING_COSINE = 0.3
"""Centred token-embedding cosine above which two last tokens count as alike in meaning (random pairs of
the default model: 99th percentile 0.27; ' km'/' mi' 0.32, ' same'/' similar' 0.71)."""


def normalise(text: str) -> str:
    return text.strip().lower()


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact."""
    if k <= 0:
        return 1.0
    p = min(max(p, 1e-12), 1.0)
    return min(1.0, sum(math.comb(n, x) * p**x * (1 - p) ** (n - x) for x in range(k, n + 1)))


@dataclass
class TriggerText:
    """What the classifier sees of one trigger prefix."""

    ids: list[int]
    """Token ids of the prefix, without the special prefix (BOS)."""
    topic: str = ""
    title: str = ""
    unit: int = -1
    """Prefixes of one unit are not independent evidence: support is counted in distinct units."""


class Background:
    """Corpus frequencies for the null model: per normalised token text, per normalised bigram, per topic,
    per title, and the share of units containing each content word."""

    def __init__(self, store: TokenStore, tokenizer, embeddings=None):
        """``embeddings``: the model's input embedding matrix [vocab, d], for the meaning test (optional)."""
        vocab = len(tokenizer)
        # decode each id alone, once, so that surface forms compare ("Ġfilm", "film" and "Film" are one)
        self.norm = [normalise(t) for t in tokenizer.batch_decode([[i] for i in range(vocab)])]
        index: dict[str, int] = {}
        self.norm_code = np.array([index.setdefault(t, len(index)) for t in self.norm], dtype=np.int64)
        n_codes = len(index)
        scored = np.ones(store.n_tokens, dtype=bool)
        for u in np.nonzero(store.n_special)[0]:  # drop special prefix tokens (BOS)
            scored[store.offset[u]: store.offset[u] + store.n_special[u]] = False
        content = np.asarray(store.tokens)[scored]
        unit_of = np.repeat(np.arange(store.n_units), store.length)[scored]
        codes = self.norm_code[content.astype(np.int64)]
        self.n_positions = len(content)
        self.token_freq = np.bincount(codes, minlength=n_codes) / self.n_positions
        same_unit = unit_of[1:] == unit_of[:-1]
        pairs = codes[:-1][same_unit] * n_codes + codes[1:][same_unit]
        uniq, counts = np.unique(pairs, return_counts=True)
        self.n_codes = n_codes
        self.bigram_freq = dict(zip(uniq.tolist(), (counts / self.n_positions).tolist()))
        unit_code = np.unique(unit_of * n_codes + codes) % n_codes
        self.unit_share = np.bincount(unit_code, minlength=n_codes) / store.n_units
        self.id_freq = np.bincount(content.astype(np.int64), minlength=vocab)[:vocab] / self.n_positions
        self.embeddings = None
        if embeddings is not None:
            import torch

            e = embeddings.detach().float().cpu()[:vocab]
            self.embeddings = torch.nn.functional.normalize(e - e.mean(0), dim=1)
        weights = store.length - store.n_special
        self.topic_share = _shares(store.columns.get("topic"), weights)
        self.title_share = _shares(store.columns.get("title"), weights)

    def is_content_word(self, token_id: int) -> bool:
        w = self.norm[token_id]
        return len(w) >= 2 and w.isalpha() and w not in NOT_CONTENT

    def alike(self, token_id: int, others: list[int]) -> tuple[list[bool], float]:
        """Which of ``others`` are close in meaning to ``token_id``, and the corpus share of such tokens."""
        import torch

        sims = self.embeddings @ self.embeddings[token_id]
        close = sims > MEANING_COSINE
        share = float(torch.from_numpy(self.id_freq).to(sims.dtype)[close].sum())
        return [bool(close[o]) for o in others], max(share, 1 / self.n_positions)

    def freq(self, code: int) -> float:
        return max(float(self.token_freq[code]), 1 / self.n_positions)

    def bigram(self, a: int, b: int) -> float:
        return self.bigram_freq.get(a * self.n_codes + b, 1 / self.n_positions)

    def code(self, token_id: int) -> int:
        return int(self.norm_code[token_id])

    def text(self, token_id: int) -> str:
        return self.norm[token_id]


def _shares(column, weights) -> dict[str, float]:
    if column is None:
        return {}
    totals: Counter = Counter()
    for value, w in zip(column.tolist(), weights.tolist()):
        if value:
            totals[value] += w
    total = sum(totals.values()) or 1
    return {k: v / total for k, v in totals.items()}


@dataclass
class Pattern:
    kind: str
    """'shallow' or 'semantic'."""
    description: str
    triggers: list[int]
    """Ranks (0-based) of the triggers that share the feature."""
    p_value: float


@dataclass
class KeyPatterns:
    layer: int
    key: int
    face: str
    patterns: list[Pattern] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        kinds = {p.kind for p in self.patterns}
        if kinds == {"shallow", "semantic"}:
            return "both"
        return kinds.pop() if kinds else "none"

    def coverage(self, n: int) -> float:
        covered = {t for p in self.patterns for t in p.triggers}
        return len(covered) / max(n, 1)


def _test_family(candidates: dict, triggers: list[TriggerText], ranks: list[int], alpha: float, kind: str,
                 describe) -> list[Pattern]:
    """candidates: name -> (trigger ranks sharing it, null probability per trigger). Support and sample
    size count distinct units; Bonferroni over every candidate of the family, even those too rare to pass
    (the candidates are chosen by looking at the triggers, so all of them are hypotheses tested)."""
    if not candidates:
        return []
    n = len({triggers[r].unit for r in ranks})
    threshold = alpha / len(candidates)
    found = []
    for name, (sharing, p) in candidates.items():
        support = len({triggers[r].unit for r in sharing})
        if support < MIN_TRIGGERS:
            continue
        pv = binomial_tail(support, n, p)
        if pv < threshold:
            found.append(Pattern(kind, describe(name), sorted(sharing), pv))
    return found


def classify(triggers: list[TriggerText], bg: Background, alpha: float = 0.01) -> list[Pattern]:
    """The significant shallow and semantic patterns among one key's triggers."""
    n = len(triggers)
    if len({t.unit for t in triggers}) < MIN_TRIGGERS:
        return []
    last: dict[int, list[int]] = {}
    bigram: dict[tuple[int, int], list[int]] = {}
    near: dict[int, list[int]] = {}
    for r, t in enumerate(triggers):
        codes = [bg.code(i) for i in t.ids]
        if bg.text(t.ids[-1]):  # whitespace-only tokens are not a pattern anyone would name
            last.setdefault(codes[-1], []).append(r)
        if len(codes) >= 2:
            bigram.setdefault((codes[-2], codes[-1]), []).append(r)
        for i in set(t.ids[-3:]):
            if bg.text(i):
                near.setdefault(bg.code(i), []).append(r)
    text_of = {bg.code(i): bg.text(i) for t in triggers for i in t.ids}
    shallow = _test_family(
        {("last", c): (r, bg.freq(c)) for c, r in last.items()}
        | {("bigram", c): (r, bg.bigram(*c)) for c, r in bigram.items()}
        | {("near", c): (r, min(1.0, 3 * bg.freq(c))) for c, r in near.items()},
        triggers, list(range(n)), alpha, "shallow",
        lambda name: {"last": lambda c: f"ends with {text_of[c]!r}",
                      "bigram": lambda c: f"ends with {text_of[c[0]]!r} {text_of[c[1]]!r}",
                      "near": lambda c: f"{text_of[c]!r} among the last 3 tokens"}[name[0]](name[1]))
    shallow = _dedupe(shallow)
    covered = {r for p in shallow for r in p.triggers}
    rest = [r for r in range(n) if r not in covered]
    semantic: list[Pattern] = []
    if len({triggers[r].unit for r in rest}) >= MIN_TRIGGERS:
        topics: dict[str, list[int]] = {}
        titles: dict[str, list[int]] = {}
        words: dict[int, list[int]] = {}
        for r in rest:
            t = triggers[r]
            if t.topic:
                topics.setdefault(t.topic, []).append(r)
            if t.title:
                titles.setdefault(t.title, []).append(r)
            for c in {bg.code(i) for i in t.ids[:-3]}:
                w = text_of[c]
                if len(w) >= 4 and w.isalpha() and w not in NOT_CONTENT:
                    words.setdefault(c, []).append(r)
        semantic = _test_family(
            {("topic", k): (v, bg.topic_share.get(k, 1.0)) for k, v in topics.items()}
            | {("title", k): (v, bg.title_share.get(k, 1.0)) for k, v in titles.items()}
            | {("word", c): (v, float(bg.unit_share[c])) for c, v in words.items()},
            triggers, rest, alpha, "semantic",
            lambda name: {"topic": lambda k: f"topic {k!r}", "title": lambda k: f"from the article {k!r}",
                          "word": lambda c: f"about {text_of[c]!r}"}[name[0]](name[1]))
    semantic += _meaning_clusters(triggers, bg, alpha)
    return shallow + _dedupe(semantic)


def _meaning_clusters(triggers: list[TriggerText], bg: Background, alpha: float) -> list[Pattern]:
    """Triggers whose last tokens mean alike (see the module docstring); one candidate per content-word
    trigger, Bonferroni over them."""
    if bg.embeddings is None:
        return []
    lasts = [t.ids[-1] for t in triggers]
    centres = [r for r, i in enumerate(lasts) if bg.is_content_word(i)]
    found = []
    for r in centres:
        close, share = bg.alike(lasts[r], lasts)
        members = [j for j in range(len(triggers)) if close[j] and bg.is_content_word(lasts[j])]
        forms = {bg.text(lasts[j]) for j in members}
        units = {triggers[j].unit for j in members}
        if len(forms) < 3 or len(units) < MIN_TRIGGERS:
            continue
        n_units = len({t.unit for t in triggers})
        pv = binomial_tail(len(units) - 1, n_units - 1, share)  # the centre itself is given
        if pv < alpha / len(centres):
            found.append(Pattern("semantic", "last words alike: " + ", ".join(sorted(forms)[:6]), members, pv))
    return found


def _dedupe(patterns: list[Pattern]) -> list[Pattern]:
    """Drop a pattern whose triggers are those of a stronger one (e.g. 'ends with x' and 'x among the last 3')."""
    kept: list[Pattern] = []
    for p in sorted(patterns, key=lambda p: (p.p_value, -len(p.triggers))):
        if not any(set(p.triggers) <= set(q.triggers) for q in kept):
            kept.append(p)
    return kept


def sample_keys(d_ff: int, n: int, seed: int, layer: int, face: str) -> list[int]:
    rng = random.Random(f"{seed}-{layer}-{face}")
    return sorted(rng.sample(range(d_ff), min(n, d_ff)))


def key_triggers(atlas, layer: int, key: int, face: str, n: int) -> list[TriggerText]:
    out = []
    for t in atlas.triggers(layer, key, face, n):
        skip = int(atlas.store.n_special[t.unit])
        out.append(TriggerText(t.input_ids[skip:], t.topic, t.title, t.unit))
    return out


def patterns_experiment(atlas, bg: Background, face: str, keys_per_layer: int = 10, n_triggers: int = 25,
                        seed: int = 0, alpha: float = 0.01) -> dict:
    """Fig 2 / Table 1 for one face: per layer the share of keys with shallow / semantic / both / no
    patterns, patterns per key, share of triggers covered; and the patterns of every sampled key."""
    n_layers = atlas.n_layers
    shares = {k: [None] * n_layers for k in ("shallow", "semantic", "both", "none", "patterns_per_key",
                                             "coverage")}
    keys_out = []
    for layer in atlas.layers:
        results = []
        for key in sample_keys(atlas.d_ff, keys_per_layer, seed, layer, face):
            triggers = atlas.triggers(layer, key, face, n_triggers)
            texts = key_triggers(atlas, layer, key, face, n_triggers)
            kp = KeyPatterns(layer, key, face, classify(texts, bg, alpha),
                             [f"{t.context}[[{t.trigger_token}]]" for t in triggers])
            results.append((kp, len(texts)))
        labels = Counter(kp.label for kp, _ in results)
        for lab in ("shallow", "semantic", "both", "none"):
            shares[lab][layer] = labels[lab] / len(results)
        shares["patterns_per_key"][layer] = float(np.mean([len(kp.patterns) for kp, _ in results]))
        shares["coverage"][layer] = float(np.mean([kp.coverage(n) for kp, n in results]))
        keys_out += [dict(asdict(kp), label=kp.label) for kp, _ in results]
    return dict(shares, keys=keys_out)


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


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Agreement of two labelings beyond chance (1 = perfect, 0 = chance level)."""
    labels = sorted(set(a) | set(b))
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((a.count(lab) / n) * (b.count(lab) / n) for lab in labels)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def agreement_with_labels(labelled: list[dict], bg: Background, alpha: float = 0.01) -> dict:
    """The classifier against hand labels: entries {"label", "triggers": [{"input_ids", "topic", "title",
    "unit"}]}; returns accuracy, Cohen's kappa, the confusion counts and per-entry predictions."""
    predicted = []
    for entry in labelled:
        triggers = [TriggerText(t["input_ids"], t.get("topic", ""), t.get("title", ""), t.get("unit", -1))
                    for t in entry["triggers"]]
        kp = KeyPatterns(entry.get("layer", -1), entry.get("key", -1), entry.get("face", "pos"),
                         classify(triggers, bg, alpha))
        predicted.append(kp.label)
    truth = [e["label"] for e in labelled]
    confusion = Counter(zip(truth, predicted))
    return {"n": len(truth), "accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
            "kappa": cohen_kappa(truth, predicted), "predicted": predicted,
            "confusion": {f"{t}->{p}": c for (t, p), c in sorted(confusion.items())}}
