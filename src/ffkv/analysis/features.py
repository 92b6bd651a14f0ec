"""What the explainer sees of a corpus position: token classes, n-gram codes, topic and article, and two meaning
vectors from the independent sentence embedder (``ffkv.embedder``).

* **word** of a position: the whole word the token is part of, e.g. " Berz" + "elius" → "Berzelius" at both
  pieces (a key that fires on the first piece of a name is read as firing on that name, as a reader of the
  prefix would guess it; a word-start fragment alone — "ext", "aut" — means nothing to an embedder); its vector
  is the embedder's vector of that word (lower-cased; words without a letter have none). This is the
  "category" view: units of length, family relations, time words.
* **word clusters**: the distinct content words of the scanned positions, clustered by their vectors (spherical
  k-means at ``CLUSTER_LEVELS`` granularities, fitted once on the scanned positions and reused for held-out
  text). A cluster is a category the corpus itself offers (time words, place names, groups of people), so a
  category can be counted among the triggers and tested against its own corpus rate, like a token.
* **subject** of a position: the mean of the vectors of the complete content words before the current word,
  within the last ``SUBJECT_WINDOW`` tokens of the same unit (a bag-of-words subject of the prefix, built from
  the same word vectors, so no extra embedder call per prefix). Prefixes with no content word have none.

Tokens are compared by their lower-cased, stripped text (" Film", "film" are one code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..corpus import TokenStore
from ..embedder import DIM, Embedder
from .words import STOP_WORDS, WORD_CLASSES

CLASSES = ("number", "punct", "piece", "first", "capital")
"""Token classes of a position: a number or year, punctuation, a piece continuing a word, the first token of
the unit, a capitalised word."""
SUBJECT_WINDOW = 48
CLUSTER_LEVELS = (16, 64, 256, 1024)
"""Numbers of word clusters, coarse to fine: a category may be broad ("a place") or narrow ("a month")."""
KMEANS_ITERATIONS = 25
STEM_CHARS = 5


class Vocabulary:
    """Per token id: its text decoded alone, its code (lower-cased stripped text) and its surface classes."""

    def __init__(self, tokenizer):
        vocab = len(tokenizer)
        self.text = tokenizer.batch_decode([[i] for i in range(vocab)])
        norm = [t.strip().lower() for t in self.text]
        index: dict[str, int] = {}
        self.code = np.array([index.setdefault(t, len(index)) for t in norm], dtype=np.int64)
        self.code_text = list(index)
        self.n_codes = len(index)
        stripped = [t.strip() for t in self.text]
        # a word start: the token decodes with a leading space, or (SentencePiece / byte-level BPE, whose single
        # tokens may decode without it) its piece carries the space marker
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
        self.space = np.array([t[:1].isspace() or (isinstance(p, str) and p[:1] in ("\u2581", "\u0120"))
                               for t, p in zip(self.text, pieces)])
        self.alpha = np.array([any(c.isalpha() for c in s) for s in stripped])
        self.number = np.array([any(c.isdigit() for c in s) and not any(c.isalpha() for c in s) for s in stripped])
        self.punct = np.array([bool(s) and not any(c.isalnum() for c in s) for s in stripped])
        self.empty = np.array([not s for s in stripped])
        self.capital = np.array([s[:1].isupper() for s in stripped])


@dataclass
class PositionFeatures:
    """Features of every content position of a set of units, in store order (``pos`` sorted)."""

    pos: np.ndarray
    unit: np.ndarray
    offset: np.ndarray
    """Index of the position within its unit's content (0 = first token after any special prefix)."""
    code: np.ndarray
    prev: np.ndarray
    """Code of the token before (-1 at the first position); ``prev2`` the one before that."""
    prev2: np.ndarray
    classes: np.ndarray
    """[N, len(CLASSES)] bool."""
    topic: np.ndarray
    """Topic / article ids (-1: none), shared over the store (``topics`` / ``titles`` name them)."""
    title: np.ndarray
    word: list[str]
    word_id: np.ndarray
    """Index of ``word`` among the distinct words of these positions."""
    stem_id: np.ndarray
    """Index of the word's first ``STEM_CHARS`` letters: "supply", "supplied", "supplying" are one stem, so that
    a category needs different words, not forms of one."""
    category_word: np.ndarray
    """Whether ``word`` can be a category member: a content word (function words all look alike to an embedder)
    with a vector."""
    word_vec: np.ndarray
    """[N, DIM] float32 unit vectors (zero rows: no word vector)."""
    subject_vec: np.ndarray
    has_word_vec: np.ndarray
    has_subject: np.ndarray
    topics: list[str]
    titles: list[str]
    centre: tuple[np.ndarray, np.ndarray]
    """The mean word and subject vectors these features were centred on."""
    word_class: np.ndarray
    """Index in ``WORD_CLASSES`` of the position's word (-1: none), at the first token of the word."""
    word_cluster: np.ndarray
    """[N, len(CLUSTER_LEVELS)] cluster of the position's word at each level, numbered across levels (-1: not a
    category word)."""
    clusters: list[np.ndarray]
    """Per level, the [k, DIM] unit centroids of its clusters (numbered in level order, then within a level)."""

    @property
    def centroids(self) -> np.ndarray:
        """[all clusters, DIM]: every level's centroids, in the numbering of ``word_cluster``."""
        return np.concatenate(self.clusters) if self.clusters else np.zeros((0, DIM), np.float32)

    @property
    def n_clusters(self) -> int:
        return sum(len(c) for c in self.clusters)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Row of each flat store position (-1 where the position is not covered)."""
        positions = np.asarray(positions)
        r = np.searchsorted(self.pos, positions).clip(0, max(len(self.pos) - 1, 0))
        ok = (len(self.pos) > 0) & (self.pos[r] == positions) & (positions >= 0)
        return np.where(ok, r, -1)

    def __len__(self) -> int:
        return len(self.pos)


def _ids(column, n: int) -> tuple[np.ndarray, list[str]]:
    if column is None:
        return np.full(n, -1, dtype=np.int64), []
    values = [str(v) if v is not None else "" for v in column.tolist()]
    names = sorted({v for v in values if v})
    index = {v: i for i, v in enumerate(names)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64), names


def position_features(store: TokenStore, units: np.ndarray, vocab: Vocabulary, embedder: Embedder,
                      progress: bool = False, centre: tuple[np.ndarray, np.ndarray] | None = None,
                      clusters: list[np.ndarray] | None = None, cluster_levels: tuple[int, ...] = CLUSTER_LEVELS,
                      seed: int = 0) -> PositionFeatures:
    """Features of all content positions of ``units`` (any order; duplicates ignored).

    Word and subject vectors are centred (the mean over these positions subtracted, then made unit-length again):
    sentence-embedder vectors share a large common direction, so that uncentred, any two Wikipedia prefixes
    look alike. Pass ``centre`` and ``clusters`` (another set's ``PositionFeatures.centre`` and ``.clusters``) to
    centre on the same means and assign words to the same clusters, as held-out features must be read like the
    scanned ones; otherwise the words are clustered here (``word_clusters`` at ``cluster_levels``, seeded by
    ``seed``)."""
    units = np.unique(np.asarray(units, dtype=np.int64))
    pos, unit = store.content_positions(units)
    n = len(pos)
    offset = pos - store.offset[unit] - store.n_special[unit]
    tok = np.asarray(store.tokens[pos] if n else np.zeros(0, np.uint32)).astype(np.int64)
    code = vocab.code[tok]
    first = offset == 0
    prev = np.where(first, -1, np.roll(code, 1))
    prev2 = np.where(offset <= 1, -1, np.roll(code, 2))
    prev_punct = np.where(first, True, np.roll(vocab.punct[tok], 1))
    word_start = first | vocab.space[tok] | vocab.punct[tok] | prev_punct | vocab.empty[tok]
    piece = ~word_start & vocab.alpha[tok]
    classes = np.stack([vocab.number[tok], vocab.punct[tok], piece, first,
                        vocab.capital[tok] & word_start & vocab.alpha[tok]], axis=1)
    # the word each position ends so far, and where complete words end
    words: list[str] = []
    current = ""
    for i in range(n):
        piece_text = vocab.text[tok[i]]
        current = piece_text.strip() if word_start[i] else current + piece_text
        words.append(current.strip().lower())
    ends_word = np.ones(n, dtype=bool)
    if n:
        ends_word[:-1] = word_start[1:] | (unit[1:] != unit[:-1])
        # every piece of a word gets the whole word: the word of the next position that ends one
        word_end = np.minimum.accumulate(np.where(ends_word, np.arange(n), n)[::-1])[::-1]
        words = [words[j] for j in word_end.tolist()]
    has_letter = vocab.alpha[tok]
    wanted = sorted({w for w, ok in zip(words, has_letter) if ok and w})
    vecs = embedder.encode(wanted, progress=progress) if wanted else np.zeros((0, DIM), np.float32)
    where = {w: i for i, w in enumerate(wanted)}
    word_vec = np.zeros((n, DIM), dtype=np.float32)
    rows = [i for i in range(n) if has_letter[i] and words[i]]
    if rows:
        word_vec[rows] = vecs[[where[words[i]] for i in rows]]
    content = np.array([ends_word[i] and has_letter[i] and len(words[i]) >= 3 and words[i] not in STOP_WORDS
                        for i in range(n)], dtype=bool)
    subject_vec = _subject_vectors(word_vec * content[:, None], word_start, offset)
    if centre is None:
        centre = tuple(_mean_of_nonzero(v) for v in (word_vec, subject_vec))
    word_vec, subject_vec = (_centred(v, mu) for v, mu in zip((word_vec, subject_vec), centre))
    category_word = np.array([bool(word_vec[i].any()) and len(w) >= 3 and w not in STOP_WORDS
                              for i, w in enumerate(words)], dtype=bool)
    if clusters is None:
        clusters = word_clusters(_distinct_rows(word_vec, words, category_word), cluster_levels, seed)
    word_cluster = _assign(word_vec, category_word, clusters)
    topic_ids, topics = _ids(store.columns.get("topic"), store.n_units)
    title_ids, titles = _ids(store.columns.get("title"), store.n_units)
    return PositionFeatures(pos=pos, unit=unit, offset=offset, code=code, prev=prev, prev2=prev2, classes=classes,
                            topic=topic_ids[unit], title=title_ids[unit], word=words,
                            word_id=_index_of(words), stem_id=_index_of([w[:STEM_CHARS] for w in words]),
                            category_word=category_word, word_vec=word_vec,
                            subject_vec=subject_vec, has_word_vec=np.abs(word_vec).sum(1) > 0,
                            has_subject=np.abs(subject_vec).sum(1) > 0, topics=topics, titles=titles,
                            centre=centre, word_cluster=word_cluster, clusters=clusters,
                            word_class=_word_classes(words, word_start))


def _word_classes(words: list[str], word_start: np.ndarray) -> np.ndarray:
    class_of = {w: i for i, members in enumerate(WORD_CLASSES.values()) for w in members}
    return np.array([class_of.get(w, -1) if start else -1 for w, start in zip(words, word_start.tolist())],
                    dtype=np.int64)


def _index_of(names: list[str]) -> np.ndarray:
    """Index of each name among the distinct names."""
    if not names:
        return np.zeros(0, np.int64)
    return np.unique(np.array(names, dtype=object), return_inverse=True)[1].astype(np.int64).reshape(-1)


def _distinct_rows(vectors: np.ndarray, words: list[str], keep: np.ndarray) -> np.ndarray:
    """The vector of each distinct kept word, once (clusters are of word types, not of their frequencies)."""
    first: dict[str, int] = {}
    for i in np.nonzero(keep)[0].tolist():
        first.setdefault(words[i], i)
    return vectors[sorted(first.values())]


def word_clusters(vectors: np.ndarray, levels: tuple[int, ...] = CLUSTER_LEVELS, seed: int = 0) -> list[np.ndarray]:
    """Per level, [k, DIM] unit centroids: spherical k-means of the unit ``vectors`` (k at most a third of the
    words, so that a tiny corpus still has clusters of several words; no level when that is below 1)."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
    out = []
    gen = torch.Generator().manual_seed(seed)
    for k in levels:
        k = min(k, len(x) // 3)
        if k < 1:
            continue
        c = x[torch.randperm(len(x), generator=gen)[:k]].clone()
        for _ in range(KMEANS_ITERATIONS):
            assign = (x @ c.T).argmax(1)
            summed = torch.zeros_like(c).index_add_(0, assign, x)
            empty = summed.norm(dim=1) < 1e-9
            summed[empty] = c[empty]  # an empty cluster keeps its centroid
            c = summed / summed.norm(dim=1, keepdim=True)
        out.append(c.numpy())
    return out


def _assign(word_vec: np.ndarray, category_word: np.ndarray, clusters: list[np.ndarray]) -> np.ndarray:
    """[N, levels] nearest centroid of each category word at each level, numbered across levels (-1 elsewhere)."""
    out = np.full((len(word_vec), max(len(clusters), 1)), -1, np.int64)
    rows = np.nonzero(category_word)[0]
    first = 0
    for j, c in enumerate(clusters):
        if len(rows):
            out[rows, j] = first + (torch.from_numpy(word_vec[rows]) @ torch.from_numpy(c).T).argmax(1).numpy()
        first += len(c)
    return out


def _mean_of_nonzero(v: np.ndarray) -> np.ndarray:
    rows = np.abs(v).sum(1) > 0
    return v[rows].mean(0) if rows.any() else np.zeros(v.shape[1], np.float32)


def _centred(v: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Unit vectors of v - mu for the rows that have a vector (zero rows stay zero)."""
    rows = np.abs(v).sum(1) > 0
    out = np.zeros_like(v)
    c = v[rows] - mu
    out[rows] = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return out


def _subject_vectors(contrib: np.ndarray, word_start: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Unit-length mean of the content-word vectors ending before the current word, within SUBJECT_WINDOW
    tokens of the same unit."""
    n = len(contrib)
    if n == 0:
        return contrib
    csum = np.concatenate([np.zeros((1, contrib.shape[1]), np.float64), np.cumsum(contrib, axis=0, dtype=np.float64)])
    # start of the current word: the last word start at or before each position
    idx = np.where(word_start, np.arange(n), 0)
    current_word = np.maximum.accumulate(idx)
    unit_start = np.arange(n) - offset
    lo = np.maximum(unit_start, np.arange(n) - SUBJECT_WINDOW)
    hi = np.maximum(current_word, lo)
    sub = csum[hi] - csum[lo]
    norm = np.linalg.norm(sub, axis=1, keepdims=True)
    return np.where(norm > 1e-9, sub / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
