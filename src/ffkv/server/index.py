"""The search index of `ffkv serve`: ``ATLAS/search.sqlite``, built once, atomically, on first serve.

Two searches, both answered from data prepared once:

* ``promotes=TOKEN`` -- memories whose value promotes a token. For every scanned layer, memory and face, the
  exact top-``PROMOTE_DEPTH`` tokens of the raw projection ``v.E`` over the full vocabulary (v as the model adds it,
  ``projection.value_vectors``) are computed once from the weights (one chunked matmul per layer); through the final
  norm, the atlas's stored top tokens are used. Both are stored inverted: token -> (memory face, rank, logit). Ranks are
  exact: rank r means r tokens have a larger logit in that face's projection (0 = the value's top token). Memories where
  the token ranks below the depth are not listed: their value does not promote it in any useful sense.
* ``text=PHRASE`` -- memories whose trigger prefixes contain a word or phrase. An SQLite FTS5 table holds the
  text of every corpus unit that holds at least one trigger, with the character offset where each token's
  prefix ends. A query finds the matching units (FTS5 phrase query), locates the phrase in each (a regex that
  follows FTS5's unicode61 word rules) and turns it into "prefixes ending at or after token j contain it";
  an in-memory inverted list of every stored trigger position then counts, per memory face, how many of its
  top triggers contain the phrase. Memories are ranked by that count, then by how high those triggers rank.

Nothing here touches the network or reads a path from a request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atlas import FACES, scan_id
from ..embedded import ffkv_home
from ..errors import FfkvError
from ..projection import KINDS, MEMORY_CHUNK, ProductBuffer, top_both_faces, unembedding, value_vectors

INDEX_FORMAT = "ffkv-search/2"
INDEX_NAME = "search.sqlite"
PROMOTE_DEPTH = 50
"""How many top tokens of each value face's projection the promotes index keeps (exact ranks 0..DEPTH-1)."""
PROJECTIONS = KINDS
_WORD = re.compile(r"[^\W_]+")
"""A word as FTS5's unicode61 tokenizer sees it: a run of letters and digits (the underscore separates)."""
MAX_PHRASE_WORDS = 16
MAX_TEXT_UNITS = 2000
"""Most corpus units one text query reads (in corpus order, a LIMIT in the SQL): a phrase found in more units is
counted over the first ones only, and the answer says so."""


def face_code(layer_index: int, key: int, face_index: int, d_ff: int) -> int:
    """(index of the layer in the atlas, key, face) -> one int (what the inverted lists store)."""
    return (layer_index * d_ff + key) * 2 + face_index


def decode_code(code: int, layers: list[int], d_ff: int) -> tuple[int, int, str]:
    memory, face_index = divmod(int(code), 2)
    layer_index, key = divmod(memory, d_ff)
    return layers[layer_index], key, FACES[face_index]


class _Blobs:
    """numpy arrays kept as BLOB rows (name, dtype, shape, data) in the index file."""

    @staticmethod
    def put(db: sqlite3.Connection, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        db.execute("INSERT INTO blobs VALUES (?, ?, ?, ?)",
                   (name, array.dtype.str, json.dumps(list(array.shape)), array.tobytes()))

    @staticmethod
    def get(db: sqlite3.Connection, name: str) -> np.ndarray:
        row = db.execute("SELECT dtype, shape, data FROM blobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(name)
        return np.frombuffer(row[2], dtype=np.dtype(row[0])).reshape(json.loads(row[1]))


def _atlas_identity(atlas) -> dict:
    """What the index is built from; an index whose recorded identity differs (another scan of the folder, another
    index format) is rebuilt."""
    m = atlas.manifest
    return {"format": INDEX_FORMAT, "scan_id": scan_id(atlas.path), "atlas_created": m.get("created"),
            "weights_fingerprint": m["model"]["weights_fingerprint"], "layers": atlas.layers,
            "faces": atlas.faces, "content_hash": m["corpus"].get("content_hash"), "depth": PROMOTE_DEPTH}


# --------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _promote_tables(atlas, parts, progress: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per projection: the inverted top-k lists of every scanned value face, sorted by token.

    Raw v.E (the paper's projection) is computed from the weights to PROMOTE_DEPTH ranks, one chunked matmul per
    layer. For the projection through the final norm the atlas's stored top ``value_top`` tokens are used as they
    are (they are the exact top of the same full projection); so is the raw one when the atlas stores at least
    PROMOTE_DEPTH tokens. This keeps the one-time build to one matmul per layer."""
    unembed = unembedding(parts, torch.float32)
    vocab = unembed.shape[0]
    depth = min(PROMOTE_DEPTH, vocab)
    stored = int(atlas.manifest["scan"].get("value_top", 0))
    d_ff = atlas.d_ff
    faces = [(FACES.index(f), f) for f in atlas.faces]
    buffer = ProductBuffer()
    acc: dict[str, dict[str, list[np.ndarray]]] = {p: {"tok": [], "code": [], "rank": [], "logit": []}
                                                    for p in PROJECTIONS}

    def add(projection: str, li: int, start: int, fi: int, ids: np.ndarray, logits: np.ndarray) -> None:
        n, k = ids.shape
        a = acc[projection]
        a["tok"].append(ids.reshape(-1).astype(np.int32))
        keys = np.repeat(np.arange(start, start + n, dtype=np.int64), k)
        a["code"].append(((li * d_ff + keys) * 2 + fi).astype(np.int32))
        a["rank"].append(np.tile(np.arange(k, dtype=np.int16), n))
        a["logit"].append(logits.reshape(-1).astype(np.float32))

    for li, layer in enumerate(tqdm(atlas.layers, desc="search index: value projections", disable=not progress,
                                    dynamic_ncols=True)):
        t = atlas.layer_tensors(layer)
        for projection in PROJECTIONS:
            if projection == "normed" or stored >= depth:
                for fi, face in faces:
                    add(projection, li, 0, fi, t[f"value_{projection}_{face}_ids"].numpy(),
                        t[f"value_{projection}_{face}_logits"].numpy())
                continue
            values = value_vectors(parts, layer, dtype=torch.float32)
            for start in range(0, d_ff, MEMORY_CHUNK):
                # the logit each face adds: v.E for +v, -(v.E) for -v (the atlas's convention too)
                tops = top_both_faces(values[start: start + MEMORY_CHUNK], unembed, depth, buffer=buffer)
                for fi, face in faces:
                    ids, logits = tops[face]
                    add(projection, li, start, fi, ids.cpu().numpy(), logits.cpu().numpy())
    out = {}
    for projection, a in acc.items():
        tok = np.concatenate(a["tok"])
        order = np.argsort(tok, kind="stable")
        out[projection] = {
            "offsets": np.searchsorted(tok[order], np.arange(vocab + 1)).astype(np.int64),
            "code": np.concatenate(a["code"])[order],
            "rank": np.concatenate(a["rank"])[order],
            "logit": np.concatenate(a["logit"]).astype(np.float32)[order],
        }
    return out


def _unit_ends(tokenizer, token_texts: list[str], ids: list[int], text: str) -> np.ndarray:
    """Character offset in ``text`` where the prefix ending at each token ends. Exact: when the tokens' own
    texts do not concatenate to ``text`` (a character split across byte tokens, cleanup of spaces), every
    prefix is decoded."""
    pieces = [token_texts[i] for i in ids]
    if "".join(pieces) == text:
        return np.cumsum([len(p) for p in pieces]).astype(np.int32)
    return np.array([len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))], dtype=np.int32)


def build_index(path: Path, atlas, parts, token_texts: list[str], progress: bool = True) -> None:
    """Write the index to ``path`` atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    try:
        db.executescript("""
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE blobs (name TEXT PRIMARY KEY, dtype TEXT, shape TEXT, data BLOB);
            CREATE VIRTUAL TABLE unit_text USING fts5(text, tokenize = 'unicode61 remove_diacritics 0');
            CREATE TABLE unit_ends (unit INTEGER PRIMARY KEY, ends BLOB);
        """)
        for projection, arrays in _promote_tables(atlas, parts, progress).items():
            for name, array in arrays.items():
                _Blobs.put(db, f"promote_{projection}_{name}", array)

        store, tokenizer = atlas.store, atlas.tokenizer
        positions = np.concatenate([atlas.layer_tensors(layer)[f"{face}_positions"].reshape(-1).numpy()
                                    for layer in atlas.layers for face in atlas.faces])
        units = np.unique(store.unit_of(np.unique(positions[positions >= 0]))) if (positions >= 0).any() \
            else np.zeros(0, dtype=np.int64)
        batch = 2048
        for start in tqdm(range(0, len(units), batch), desc="search index: trigger text", disable=not progress,
                          dynamic_ncols=True):
            chunk = [int(u) for u in units[start: start + batch]]
            ids = [store.unit_tokens(u)[int(store.n_special[u]):].tolist() for u in chunk]
            texts = tokenizer.batch_decode(ids)
            db.executemany("INSERT INTO unit_text (rowid, text) VALUES (?, ?)", zip(chunk, texts))
            db.executemany("INSERT INTO unit_ends VALUES (?, ?)",
                           ((u, _unit_ends(tokenizer, token_texts, i, t).tobytes())
                            for u, i, t in zip(chunk, ids, texts)))
        db.execute("INSERT INTO unit_text (unit_text) VALUES ('optimize')")
        db.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(_atlas_identity(atlas)),))
        db.execute("INSERT INTO meta VALUES ('scan_id', ?)", (scan_id(atlas.path),))
        db.commit()
    except BaseException:
        db.close()
        tmp.unlink(missing_ok=True)
        raise
    db.close()
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# querying
# --------------------------------------------------------------------------------------------------------------
class SearchIndex:
    """Open (building it first if missing or stale) the index of an atlas; thread-safe queries."""

    def __init__(self, atlas, parts, token_texts: list[str], path: Path | None = None, progress: bool = True):
        self.atlas = atlas
        self.layers = atlas.layers
        self.d_ff = atlas.d_ff
        self.token_texts = token_texts
        self._by_text: dict[str, list[int]] = {}
        self._by_stripped: dict[str, list[int]] = {}
        for i, t in enumerate(token_texts):
            self._by_text.setdefault(t, []).append(i)
            self._by_stripped.setdefault(t.strip(), []).append(i)
        self.path = Path(path) if path is not None else atlas.path / INDEX_NAME
        if not self._fresh():
            if path is None and not os.access(atlas.path, os.W_OK):
                # a read-only atlas: keep its index in the ffkv cache, named by the atlas identity
                digest = hashlib.sha256(json.dumps(_atlas_identity(atlas)).encode()).hexdigest()[:16]
                self.path = ffkv_home() / "search" / f"{digest}.sqlite"
                self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._fresh():
            if progress:
                print(f"ffkv: building the search index {self.path} (once)", flush=True)
            try:
                build_index(self.path, atlas, parts, token_texts, progress)
            except (OSError, sqlite3.OperationalError) as exc:
                raise FfkvError(f"cannot write the search index {self.path}: {exc}")
        self._local = threading.local()
        db = self._db()
        self.promote = {p: {name: _Blobs.get(db, f"promote_{p}_{name}") for name in ("offsets", "code", "rank",
                                                                                      "logit")}
                        for p in PROJECTIONS}
        self._trigger_lists()

    def _fresh(self) -> bool:
        if not self.path.exists():
            return False
        try:
            db = sqlite3.connect(self._uri(), uri=True)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return False
        return row is not None and json.loads(row[0]) == json.loads(json.dumps(_atlas_identity(self.atlas)))

    def _uri(self) -> str:
        return self.path.resolve().as_uri() + "?mode=ro"  # read-only; as_uri escapes '?', '#', '%'

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._uri(), uri=True)
            self._local.db = db
        return db

    def _trigger_lists(self) -> None:
        """Every stored trigger (memory face, rank) sorted by its global position."""
        pos, code, rank = [], [], []
        for li, layer in enumerate(self.layers):
            t = self.atlas.layer_tensors(layer)
            for face in self.atlas.faces:
                p = t[f"{face}_positions"].numpy()
                valid = p >= 0
                keys, ranks = np.nonzero(valid)
                pos.append(p[valid])
                code.append(face_code(li, keys, FACES.index(face), self.d_ff).astype(np.int32))
                rank.append(ranks.astype(np.int16))
        pos_all = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        order = np.argsort(pos_all, kind="stable")
        self.t_pos = pos_all[order]
        self.t_code = np.concatenate(code)[order] if code else np.zeros(0, np.int32)
        self.t_rank = np.concatenate(rank)[order] if rank else np.zeros(0, np.int16)
        self.n_codes = len(self.layers) * self.d_ff * 2
        self.t_count = np.bincount(self.t_code, minlength=self.n_codes)

    # -- promotes ------------------------------------------------------------------------------------------
    def token_ids(self, token: str) -> list[int]:
        """Vocabulary ids whose text is ``token``; without surrounding spaces in the query, also the ids whose
        text is the token with spaces around it (so 'Paris' finds ' Paris' and 'Paris')."""
        exact = self._by_text.get(token, [])
        if token != token.strip():
            return list(exact)
        return exact + [i for i in self._by_stripped.get(token, []) if i not in exact]

    def promotes(self, token_ids: list[int], projection: str, limit: int) -> list[dict]:
        p = self.promote[projection]
        parts = [np.arange(p["offsets"][i], p["offsets"][i + 1]) for i in token_ids
                 if 0 <= i < len(p["offsets"]) - 1]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        toks = np.concatenate([np.full(len(a), i) for a, i in zip(parts, token_ids)]) if parts else idx
        order = np.lexsort((-p["logit"][idx], p["rank"][idx]))[:limit]
        out = []
        for j in order:
            layer, key, face = decode_code(p["code"][idx[j]], self.layers, self.d_ff)
            out.append({"layer": layer, "key": key, "face": face, "token_id": int(toks[j]),
                        "rank": int(p["rank"][idx[j]]), "logit": float(p["logit"][idx[j]])})
        return out

    # -- text ----------------------------------------------------------------------------------------------
    @staticmethod
    def phrase(query: str) -> tuple[list[str], re.Pattern]:
        """The query's words and a regex of the phrase (words in order, anything but letters and digits between
        them) that must start at a word start; whether it ends at a word end is checked by the caller."""
        words = _WORD.findall(query)
        if not words:
            raise ValueError("the text query has no words (letters or digits)")
        if len(words) > MAX_PHRASE_WORDS:
            raise ValueError(f"the text query has more than {MAX_PHRASE_WORDS} words")
        return words, re.compile(r"(?<![^\W_])" + r"[\W_]+".join(re.escape(w) for w in words), re.IGNORECASE)

    def text(self, query: str, limit: int, max_units: int = MAX_TEXT_UNITS) -> tuple[list[dict], int, bool]:
        """Memory faces ranked by how many of their stored triggers contain the phrase (as whole words in the
        trigger's prefix text); also the number of corpus units with such a trigger position, and whether the
        phrase is in more than ``max_units`` units (then only the first ``max_units`` were read and counted)."""
        words, pattern = self.phrase(query)
        # the last word as an FTS5 prefix token: a prefix cut inside "rivers" contains the word "river"
        fts = '"' + " ".join(words) + '" *'
        rows = self._db().execute(
            "SELECT unit_text.rowid, unit_text.text, unit_ends.ends FROM unit_text "
            "JOIN unit_ends ON unit_ends.unit = unit_text.rowid WHERE unit_text MATCH ? ORDER BY unit_text.rowid "
            "LIMIT ?", (fts, max_units + 1)).fetchall()
        truncated = len(rows) > max_units
        rows = rows[:max_units]
        store = self.atlas.store
        starts, stops = [], []
        units = 0
        for unit, text, blob in rows:
            ends = np.frombuffer(blob, dtype=np.int32)
            base = int(store.offset[unit]) + int(store.n_special[unit])
            before = len(starts)
            for m in pattern.finditer(text):
                e = m.end()
                j = int(np.searchsorted(ends, e, side="left"))
                if j >= len(ends):
                    break
                if e == len(text) or not _WORD.match(text[e]):
                    # a whole-word occurrence: every prefix ending at or after it contains it
                    starts.append(base + j)
                    stops.append(int(store.offset[unit] + store.length[unit]))
                    break
                if ends[j] == e:
                    # the phrase's last word continues ("river|s"): only the prefix cut exactly there has it
                    starts.append(base + j)
                    stops.append(base + j + 1)
            units += len(starts) > before
        if not starts:
            return [], 0, truncated
        lo = np.searchsorted(self.t_pos, np.asarray(starts), side="left")
        hi = np.searchsorted(self.t_pos, np.asarray(stops), side="left")
        lens = hi - lo
        total = int(lens.sum())
        if total == 0:
            return [], units, truncated
        idx = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)
        codes = self.t_code[idx]
        ranks = self.t_rank[idx]
        count = np.bincount(codes, minlength=self.n_codes)
        weight = np.bincount(codes, weights=1.0 / (1.0 + ranks), minlength=self.n_codes)
        candidates = np.nonzero(count)[0]
        top = candidates[np.lexsort((candidates, -weight[candidates], -count[candidates]))][:limit]
        wanted = np.zeros(self.n_codes, dtype=bool)
        wanted[top] = True
        chosen = wanted[codes]
        best: dict[int, tuple[int, int]] = {}
        for c, r, i in zip(codes[chosen].tolist(), ranks[chosen].tolist(), idx[chosen].tolist()):
            if c not in best or r < best[c][0]:
                best[c] = (r, int(self.t_pos[i]))
        out = []
        for c in top.tolist():
            layer, key, face = decode_code(c, self.layers, self.d_ff)
            rank, position = best[c]
            out.append({"layer": layer, "key": key, "face": face, "matches": int(count[c]),
                        "triggers": int(self.t_count[c]), "best_rank": rank, "best_position": position})
        return out, units, truncated
