"""What `ffkv explain` adds to `ffkv serve`: per memory face its one-line description, kind, patterns (with the
triggers they cover), what it promotes and suppresses, and its held-out scores beside the two baselines; search
of the descriptions by words and by concept.

The data: ``ATLAS/explanations.parquet`` (one row per layer, key and face; ``ffkv.analysis.explain``) and
``ATLAS/explanation_vectors.npy`` (float16 [rows, 384], a concept vector per row in the space of the sentence
embedder ``ffkv.embedder.Embedder``). Both are read through ``read_explanations``, so a file written for another
scan of the folder is never shown; they are re-read when `ffkv explain` rewrites them while the server runs.
Concept search embeds the query with the same embedder (loaded on the first concept search, once, under a lock)
and ranks the faces by cosine with their concept vectors.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..analysis.explain import FILE, VECTORS, read_explanations
from ..analysis.patterns import SHALLOW_KINDS
from ..atlas import scan_id
from ..embedder import DIM, Embedder
from ..errors import FfkvError

KINDS = ("shallow", "semantic", "both", "none")
SCORES = ("sim_corr", "f1", "precision", "recall")
"""Held-out scores of an explanation; each also exists for the two baselines (``shuffled_*``, ``lookup_*``)."""
BASELINES = ("shuffled", "lookup")
REQUIRED = ("layer", "key", "face", "kind", "description", "patterns", "trigger_shallow", "trigger_semantic",
            "trigger_valid", "promotes", "suppresses")
VECTOR_CHUNK = 16384
"""Rows of the concept vectors turned into float32 at a time (the file stays float16 and memory-mapped)."""
MAX_CACHED_QUERIES = 4096
"""Query vectors the embedder keeps in memory; then it starts afresh (its cache grows with every new text)."""


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def missing_message(atlas_path: Path) -> str:
    return f"this atlas has no explanations: run `ffkv explain {atlas_path}` to add them"


def stale_message(atlas_path: Path) -> str:
    return (f"{atlas_path / FILE} was computed from another scan of this folder, so it is not shown: rerun "
            f"`ffkv explain {atlas_path}`")


@dataclass
class Explanations:
    """One reading of the explanation files. ``present`` False: none to show (``message`` says why)."""

    present: bool = False
    message: str | None = None
    table: pa.Table | None = None
    rows: dict[tuple[int, int, str], int] = field(default_factory=dict)
    layer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    face: list[str] = field(default_factory=list)
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    description: list[str] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """Score column -> float64 [rows] (NaN where undefined); empty when the explanations were not scored."""
    vectors: np.ndarray | None = None
    vectors_message: str | None = None
    """Why concept search is not available when ``vectors`` is None."""
    blob: str = ""
    """The lower-cased descriptions, one a line; ``starts`` where each begins in it."""
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n(self) -> int:
        return len(self.description)

    def status(self) -> dict:
        return {"present": self.present, "message": self.message, "faces": self.n,
                "scored": bool(self.scores), "concept_search": self.vectors is not None,
                "concept_message": None if self.vectors is not None else (self.vectors_message or self.message)}

    # -- one face --------------------------------------------------------------------------------------------
    def row(self, layer: int, key: int, face: str) -> dict | None:
        i = self.rows.get((layer, key, face))
        return None if i is None else self.table.slice(i, 1).to_pylist()[0]

    def face_doc(self, layer: int, key: int, face: str) -> dict | None:
        """What the memory page shows of one face, or None when the face was not explained."""
        r = self.row(layer, key, face)
        if r is None:
            return None
        valid = [bool(v) for v in r["trigger_valid"] or []]
        flags = {"shallow": [bool(v) for v in r["trigger_shallow"] or []],
                 "semantic": [bool(v) for v in r["trigger_semantic"] or []]}
        triggers = [{"rank": i, "shallow": i < len(flags["shallow"]) and flags["shallow"][i],
                     "semantic": i < len(flags["semantic"]) and flags["semantic"][i]}
                    for i, ok in enumerate(valid) if ok]
        patterns = []
        try:
            listed = json.loads(r["patterns"] or "[]")
        except ValueError:
            listed = []
        for p in listed if isinstance(listed, list) else []:
            if not isinstance(p, dict):
                continue
            cls = "shallow" if p.get("kind") in SHALLOW_KINDS else "semantic"
            patterns.append({"kind": p.get("kind"), "class": cls, "text": str(p.get("text", "")),
                             "support": p.get("support"), "p_value": _finite(p.get("p_value")),
                             "lift": _finite(p.get("lift")),
                             # the file records, per trigger, whether a shallow / a semantic pattern covers it
                             "triggers": [t["rank"] for t in triggers if t[cls]]})
        scores = None
        if all(name in r for name in SCORES):
            scores = {name: {"explanation": _finite(r.get(name)),
                             **{b: _finite(r.get(f"{b}_{name}")) for b in BASELINES}} for name in SCORES}
        fires = _finite(r.get("heldout_fires"))
        return {
            "kind": r["kind"], "description": r["description"], "n_units": r.get("n_units"),
            "patterns": patterns, "triggers": triggers, "triggers_read": len(valid),
            "promotes": list(r["promotes"] or []), "suppresses": list(r["suppresses"] or []),
            "promotes_raw": list(r.get("promotes_raw") or []), "suppresses_raw": list(r.get("suppresses_raw") or []),
            "promote_coherence": _finite(r.get("promote_coherence")),
            "promote_coherent": bool(r.get("promote_coherent")),
            "suppress_coherence": _finite(r.get("suppress_coherence")),
            "suppress_coherent": bool(r.get("suppress_coherent")),
            "scores": scores, "heldout_fires": None if fires is None else int(fires),
        }

    def summary(self, i: int) -> dict:
        """One search result: the face, its kind, description and scores."""
        out = {"layer": int(self.layer[i]), "key": int(self.key[i]), "face": self.face[i],
               "kind": str(self.kind[i]), "description": self.description[i]}
        for name in ("sim_corr", "f1", *(f"{b}_{s}" for b in BASELINES for s in ("sim_corr", "f1"))):
            out[name] = _finite(self.scores[name][i]) if name in self.scores else None
        return out

    # -- search ----------------------------------------------------------------------------------------------
    def text(self, words: list[str], limit: int) -> list[dict]:
        """Faces whose description contains the words as a phrase (whole words, case-insensitive, anything but
        letters and digits between them), best held-out ``sim_corr`` first."""
        phrase = re.compile(r"(?<![^\W_])" + r"[\W_]+".join(re.escape(w) for w in words) + r"(?![^\W_])",
                            re.IGNORECASE)
        # candidates: descriptions that contain the first word's letters at all (a plain substring scan of the
        # lower-cased descriptions, fast); the phrase is then checked on each
        first = re.compile(re.escape(words[0].lower()))
        found = np.array([m.start() for m in first.finditer(self.blob)], dtype=np.int64)
        candidates = np.unique(np.searchsorted(self.starts, found, side="right") - 1)
        hits = np.array([i for i in candidates.tolist() if phrase.search(self.description[i])], dtype=np.int64)
        if len(hits) == 0:
            return []
        sim = self.scores.get("sim_corr")
        quality = np.nan_to_num(sim[hits], nan=-np.inf) if sim is not None else np.zeros(len(hits))
        order = hits[np.lexsort((hits, -quality))][:limit]
        return [self.summary(int(i)) for i in order]

    def concept(self, query: np.ndarray, limit: int, min_sim_corr: float | None = None,
                min_f1: float | None = None, kind: str | None = None) -> tuple[list[dict], int]:
        """Faces whose concept vector has the largest cosine with the (unit) query vector, among those that pass
        the filters; also how many faces passed them."""
        mask = np.ones(self.n, dtype=bool)
        with np.errstate(invalid="ignore"):  # NaN scores never pass a minimum
            if min_sim_corr is not None:
                mask &= self.scores["sim_corr"] >= min_sim_corr
            if min_f1 is not None:
                mask &= self.scores["f1"] >= min_f1
        if kind is not None:
            mask &= self.kind == kind
        candidates = np.nonzero(mask)[0]
        cosine = np.full(self.n, -np.inf, dtype=np.float32)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        for start in range(0, len(candidates), VECTOR_CHUNK):
            idx = candidates[start: start + VECTOR_CHUNK]
            cosine[idx] = np.nan_to_num(np.asarray(self.vectors[idx], dtype=np.float32) @ q, nan=-np.inf)
        k = min(limit, len(candidates))
        if k == 0:
            return [], 0
        top = np.argpartition(-cosine, k - 1)[:k] if k < self.n else np.arange(self.n)
        top = top[np.lexsort((top, -cosine[top]))][:k]
        out = []
        for i in top.tolist():
            doc = self.summary(i)
            doc["cosine"] = _finite(cosine[i])
            out.append(doc)
        return out, len(candidates)


def load_explanations(atlas) -> Explanations:
    """Read the atlas's explanation files (never raises: what cannot be shown is said in ``message``)."""
    path = atlas.path / FILE
    if not path.is_file():
        return Explanations(message=missing_message(atlas.path))
    try:
        table = read_explanations(atlas)
    except (OSError, pa.ArrowException) as exc:
        return Explanations(message=f"cannot read {path}: {exc}; rerun `ffkv explain {atlas.path}`")
    if table is None:
        return Explanations(message=stale_message(atlas.path))
    absent = [c for c in REQUIRED if c not in table.column_names]
    if absent:
        return Explanations(message=f"{path} lacks the columns {', '.join(absent)} (written by another version of "
                                    f"ffkv?): rerun `ffkv explain {atlas.path}`")
    layer = np.asarray(table.column("layer").to_numpy(), dtype=np.int64)
    key = np.asarray(table.column("key").to_numpy(), dtype=np.int64)
    face = [str(f) for f in table.column("face").to_pylist()]
    if len(layer) and (not np.isin(layer, atlas.layers).all() or key.min() < 0 or key.max() >= atlas.d_ff
                       or not set(face) <= set(atlas.faces)):
        return Explanations(message=f"{path} names memories that are not in this atlas: rerun "
                                    f"`ffkv explain {atlas.path}`")
    description = [str(d or "") for d in table.column("description").to_pylist()]
    scores = {}
    if all(name in table.column_names for name in SCORES):
        for name in table.column_names:
            if any(name == s or name.endswith("_" + s) for s in SCORES):
                scores[name] = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
    lowered = [d.lower() for d in description]
    starts = np.zeros(len(lowered), dtype=np.int64)
    if lowered:
        starts[1:] = np.cumsum([len(d) + 1 for d in lowered[:-1]])
    e = Explanations(present=True, table=table, layer=layer, key=key, face=face,
                     kind=np.array([str(k) for k in table.column("kind").to_pylist()], dtype=object),
                     description=description, scores=scores, blob="\n".join(lowered), starts=starts,
                     rows={(int(a), int(b), f): i for i, (a, b, f) in enumerate(zip(layer, key, face))})
    vpath = atlas.path / VECTORS
    try:
        vectors = np.load(vpath, mmap_mode="r")
    except (OSError, ValueError) as exc:
        e.vectors_message = f"concept search needs {vpath} ({exc}): rerun `ffkv explain {atlas.path}`"
        return e
    if vectors.ndim != 2 or vectors.shape != (e.n, DIM) or not np.issubdtype(vectors.dtype, np.floating):
        e.vectors_message = (f"{vpath} has shape {tuple(vectors.shape)}, not one {DIM}-vector per row of {FILE} "
                             f"({e.n}): rerun `ffkv explain {atlas.path}`")
        return e
    e.vectors = vectors
    return e


class ExplanationFiles:
    """The explanations of a served atlas, re-read when the files (or the atlas's scan) change."""

    def __init__(self, atlas):
        self.atlas = atlas
        self._lock = threading.Lock()
        self._cached: tuple[tuple, Explanations] | None = None

    def _stamp(self) -> tuple:
        out = []
        for name in (FILE, VECTORS):
            try:
                st = (self.atlas.path / name).stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        try:
            out.append(scan_id(self.atlas.path))
        except OSError:
            out.append(None)
        return tuple(out)

    def get(self) -> Explanations:
        stamp = self._stamp()
        cached = self._cached
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with self._lock:
            cached = self._cached
            if cached is None or cached[0] != stamp:
                cached = (stamp, load_explanations(self.atlas))
                self._cached = cached
        return cached[1]


class QueryEmbedder:
    """The sentence embedder of concept search, loaded on first use, once; every use holds ``queue`` (a bounded
    lock, like the model's), so queries are embedded one at a time and callers beyond the queue are refused."""

    def __init__(self, queue, factory=None):
        self.queue = queue
        self.factory = factory or (lambda: Embedder(cache_dir=None))
        self._embedder = None
        self.loads = 0

    def encode(self, text: str) -> np.ndarray:
        """The unit vector of ``text`` (FfkvError when the embedder cannot be loaded)."""
        with self.queue.turn():
            if self._embedder is None:
                self.loads += 1
                self._embedder = self.factory()
            embedder = self._embedder
            vector = np.asarray(embedder.encode([text])[0], dtype=np.float32)
            if len(getattr(embedder, "index", ())) > MAX_CACHED_QUERIES:
                # the embedder keeps every text it has seen: start its in-memory cache afresh (as it does with a
                # broken disk cache), not the model
                embedder.index, embedder.vectors = {}, np.zeros((0, DIM), dtype=np.float32)
        if vector.shape != (DIM,) or not np.isfinite(vector).all():
            raise FfkvError("the sentence embedder returned an unusable vector")
        return vector
