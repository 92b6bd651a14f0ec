"""What `ffkv serve` knows and computes, independent of HTTP: the atlas, its model (checked to be the one the
atlas was made with), the search index, per-layer summaries and the prompt debugger. The FastAPI app in
``app.py`` only validates requests and calls this.

Concurrency: reads of the atlas and the index are safe from any thread; every use of the model holds its lock,
taken through ``queue`` (a ``ModelQueue``), so model runs are serialised and one client's interventions can never
reach another client's run; at most ``queue_size`` runs wait for it, each at most ``queue_timeout`` seconds, and
the others are refused (``Busy``, HTTP 503) instead of piling up. The model's tokenizer (its encoder is not
re-entrant) has a lock of its own, so searches never wait for a model run. The sentence embedder of concept search
(``explanations.QueryEmbedder``) is loaded on its first use and has a bounded queue of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

from ..atlas import Atlas, scan_id
from ..errors import FfkvError
from ..models import LoadedModel, check_dtype, load_model
from ..projection import face_top_tokens
from . import debugger
from .debugger import Intervention
from .explanations import KINDS as EXPLANATION_KINDS
from .explanations import ExplanationFiles, QueryEmbedder
from .index import MAX_TEXT_UNITS, PROJECTIONS, SearchIndex

MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 64
MAX_SET_VALUE = 1e4
MAX_INTERVENTIONS = 64
MAX_CONCEPT_CHARS = 200
MAX_CONCEPT_LIMIT = 200
MEMORY_TOKENS = 6
"""Value tokens shown next to a memory in lists (search results, debugger)."""
SIMILAR = 8
"""What `ffkv serve --dtype` runs the model in."""
QUEUE_SIZE = 16
"""Model runs (run, generate) that may wait while another one runs; one more is refused at once. (The server
answers from a pool of 40 threads: waiting runs hold one each, and the rest of the app keeps the others.)"""
QUEUE_TIMEOUT = 30.0
"""Seconds a model run may wait for the model before it is refused."""


class NotFound(Exception):
    """A layer or key that does not exist (HTTP 404)."""


class BadRequest(Exception):
    """A well-formed request the atlas or model cannot answer (HTTP 422)."""


class Busy(Exception):
    """The model is taken and its queue is full, or a run waited too long for it (HTTP 503)."""


class Unavailable(Exception):
    """Something a request needs cannot be loaded on this server (the sentence embedder; HTTP 503)."""


class ModelQueue:
    """The model's lock, taken in turn: at most ``size`` callers wait while one holds it, each at most
    ``timeout`` seconds; a caller beyond that, or one that waited too long, gets ``Busy``."""

    def __init__(self, size: int = QUEUE_SIZE, timeout: float = QUEUE_TIMEOUT):
        self.size = size
        self.timeout = timeout
        self.lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0

    @contextlib.contextmanager
    def turn(self):
        if not self.lock.acquire(blocking=False):
            with self._count:
                if self.waiting >= self.size:
                    raise Busy(f"the model is busy: {self.waiting} run(s) are already waiting for it (at most "
                               f"{self.size}); try again in a moment")
                self.waiting += 1
            try:
                acquired = self.lock.acquire(timeout=self.timeout)
            finally:
                with self._count:
                    self.waiting -= 1
            if not acquired:
                raise Busy(f"the model is busy: this run waited {self.timeout:g} s for earlier ones; try again in "
                           "a moment")
        try:
            yield
        finally:
            self.lock.release()


def finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_layer_array(v, n_layers: int) -> bool:
    return isinstance(v, list) and len(v) == n_layers and any(_is_number(x) for x in v) and \
        all(x is None or _is_number(x) for x in v)


def _show(v):
    """An analysis value as something a page can print: finite numbers, strings, short lists of those."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if _is_number(v):
        return finite(v) if isinstance(v, float) else v
    if isinstance(v, list) and len(v) <= 25 and all(x is None or isinstance(x, (int, float, str)) for x in v):
        return [_show(x) for x in v]
    return None


def _pattern_text(p: dict) -> str:
    text = f"{p.get('kind', '?')}: {p.get('description', '')}"
    if _is_number(p.get("p_value")):
        text += f" (p = {p['p_value']:.2g})"
    if isinstance(p.get("triggers"), list):
        text += f", triggers {', '.join(str(r + 1) if isinstance(r, int) else str(r) for r in p['triggers'][:12])}"
    return text


def _memory_records(obj, path: str = "", depth: int = 0):
    """Every object in a JSON document (nested up to depth 5) that names a layer and a key, with its path."""
    if depth > 5:
        return
    if isinstance(obj, dict):
        if all(_is_number(obj.get(k)) for k in ("layer", "key")):
            yield path, obj
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                yield from _memory_records(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)):
                yield from _memory_records(v, path, depth + 1)


def stale_analysis_message(atlas_path: Path) -> str:
    return (f"{atlas_path / 'analysis.json'} was computed from another scan of this folder: rerun "
            f"`ffkv analyze {atlas_path}`")


class Analyses:
    """What ATLAS/analysis.json (written by `ffkv analyze`; contract in ``ffkv.analysis``) adds to the pages:
    per experiment block, its per-layer arrays as a table (one row per layer) and its scalars; per memory, the
    records that name it (trigger patterns, top memories by precision). Tolerant of partial files. A file that
    records a ``scan_id`` other than the atlas's (computed from an earlier scan of the folder) is not shown:
    ``stale`` then says why. Files without a ``scan_id`` (older ones) are shown."""

    def __init__(self, path: Path, n_layers: int, atlas_scan_id: str | None = None):
        self.present = False
        self.stale: str | None = None
        self.tables: list[dict] = []
        self.per_memory: dict[tuple[int, int], list[dict]] = {}
        self.definitions: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        if not path.is_file():
            return
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(doc, dict):
            return
        if atlas_scan_id is not None and doc.get("scan_id") is not None and doc["scan_id"] != atlas_scan_id:
            self.stale = stale_analysis_message(path.parent)
            return
        self.present = True
        n = int(doc.get("n_layers") or n_layers)
        self.definitions = {k: v for k, v in (doc.get("definitions") or {}).items() if isinstance(v, str)}
        self.missing = {k: str(v) for k, v in (doc.get("missing") or {}).items()}
        for name, block in doc.items():
            if not isinstance(block, dict) or name in ("atlas", "config", "definitions", "missing", "timings"):
                continue
            columns: dict[str, list] = {}
            scalars = {}
            for k, v in block.items():
                if _is_layer_array(v, n):
                    columns[k] = v
                elif isinstance(v, dict):
                    columns.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if _is_layer_array(v2, n)})
                elif _is_number(v) or isinstance(v, str):
                    scalars[k] = _show(v)
            if columns:
                rows = [{"layer": layer, **{c: _show(columns[c][layer]) for c in columns}} for layer in range(n)
                        if any(columns[c][layer] is not None for c in columns)]
                self.tables.append({"name": name, "columns": list(columns), "rows": rows, "scalars": scalars})
        for source, rec in _memory_records(doc):
            shown = {"source": source}
            for k, v in rec.items():
                if k == "patterns" and isinstance(v, list):
                    shown[k] = [_pattern_text(p) for p in v if isinstance(p, dict)] or ["none found"]
                elif k != "triggers" and _show(v) is not None:
                    shown[k] = _show(v)
            self.per_memory.setdefault((int(rec["layer"]), int(rec["key"])), []).append(shown)


class Service:
    def __init__(self, atlas_path: str | Path, loaded: LoadedModel | None = None, model: str | None = None,
                 device: str = "cpu", progress: bool = True, index_path: str | Path | None = None,
                 queue_size: int = QUEUE_SIZE, queue_timeout: float = QUEUE_TIMEOUT, dtype: str = "float32"):
        """``dtype``: what the model is loaded and runs in (one of ``DTYPES``), when it is loaded here (not for
        ``loaded``); the atlas's check of the weights holds in any load dtype."""
        check_dtype(dtype)
        self.atlas = Atlas.load(atlas_path)
        self._analyses: tuple[int | None, Analyses] | None = None
        if self.analyses.stale:  # before the model loads: a one-line error at once
            raise FfkvError(self.analyses.stale)
        manifest_model = self.atlas.manifest["model"]
        if loaded is None:
            name = model or manifest_model["name"]
            try:
                loaded = load_model(name, device=device, dtype=dtype)
            except FfkvError as exc:
                raise FfkvError(f"{exc} (the atlas names model {manifest_model['name']!r}; pass --model to load "
                                "the same weights from elsewhere)")
        self.atlas.check_model(loaded)
        self.loaded = loaded
        self.model = loaded.model
        self.parts = loaded.parts
        self.queue = ModelQueue(queue_size, queue_timeout)
        self.tokenizer_lock = threading.Lock()
        self.layers = self.atlas.layers
        self.d_ff = self.atlas.d_ff
        self.top_k = int(self.atlas.manifest["scan"]["top_k"])
        self.max_text_units = MAX_TEXT_UNITS

        tok = self.atlas.tokenizer  # decodes only (the model's tokenizer encodes, under its own lock)
        vocab = int(self.parts.unembedding.shape[0])
        known = min(vocab, len(tok))
        self.token_texts: list[str] = tok.batch_decode([[i] for i in range(known)]) + \
            [f"<{i}>" for i in range(known, vocab)]
        eos = getattr(loaded.tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

        self.stats = {layer: self.atlas.stats(layer) for layer in self.layers}  # also loads every layer file
        self.index = SearchIndex(self.atlas, self.parts, self.token_texts,
                                 path=Path(index_path) if index_path else None, progress=progress)
        self._unit_values: dict[int, torch.Tensor] = {}
        self.value_norms = debugger.added_value_norms(self.parts)
        self._overview = self._make_overview()
        self.explanations = ExplanationFiles(self.atlas)
        self.explanations.get()  # read once now: the first page does not wait for it
        self.query_embedder = QueryEmbedder(ModelQueue(queue_size, queue_timeout))

    # -- overview ------------------------------------------------------------------------------------------
    @property
    def analyses(self) -> Analyses:
        """analysis.json, re-read when `ffkv analyze` rewrites it while the server runs (not shown when it comes
        from another scan of the folder)."""
        path = self.atlas.path / "analysis.json"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = None
        cached = self._analyses
        if cached is None or cached[0] != mtime:
            cached = (mtime, Analyses(path, self.atlas.n_layers, scan_id(self.atlas.path)))
            self._analyses = cached
        return cached[1]

    def _make_overview(self) -> dict:
        m = self.atlas.manifest
        rows = []
        for layer in self.layers:
            s = self.stats[layer]
            rms = np.sqrt(np.maximum(s["mean_square"], 0))
            rows.append({"layer": layer, "count": s["count"],
                         "frac_positive": finite(s["frac_positive"].mean()),
                         "mean_rms": finite(rms.mean()),
                         "max": finite(s["max"].max()), "max_key": int(s["max"].argmax()),
                         "min": finite(s["min"].min()), "min_key": int(s["min"].argmin()),
                         "value_norm": finite(self.value_norms[layer].mean())})
        return {"atlas": self.atlas.path.name, "created": m.get("created"), "ffkv_version": m.get("ffkv_version"),
                "model": m["model"], "corpus": m["corpus"], "scan": m["scan"], "result": m.get("result", {}),
                "layers": self.layers, "faces": self.atlas.faces, "d_ff": self.d_ff,
                "n_layers": self.parts.n_layers, "layer_summary": rows}

    def overview(self) -> dict:
        a = self.analyses
        return dict(self._overview, analysis={"present": a.present, "stale": a.stale, "tables": a.tables,
                                              "definitions": a.definitions, "missing": a.missing},
                    explanations=self.explanations.get().status())

    # -- memories ------------------------------------------------------------------------------------------
    def check_memory(self, layer: int, key: int) -> None:
        try:
            self.atlas.check(layer, key)
        except FfkvError as exc:
            raise NotFound(str(exc))

    def value_tokens(self, layer: int, key: int, face: str, n: int = MEMORY_TOKENS) -> list[str]:
        """Top tokens of one value face (raw v.E): stored in the atlas, or computed for an unscanned layer."""
        if layer in self.layers:
            ids = self.atlas.layer_tensors(layer)[f"value_raw_{face}_ids"][key][:n].tolist()
            return [self.token_texts[i] for i in ids]
        ids, _ = face_top_tokens(self.parts, layer, [key], face, n)
        return [self.token_texts[i] for i in ids[0].tolist()]

    def _normalised_values(self, layer: int) -> torch.Tensor:
        u = self._unit_values.get(layer)
        if u is None:
            with torch.inference_mode():
                u = torch.nn.functional.normalize(self.parts.added_values(layer).float(), dim=1).cpu()
            self._unit_values[layer] = u
        return u

    def similar(self, layer: int, key: int, n: int = SIMILAR) -> list[dict]:
        """Memories of the same layer whose value vectors have the largest cosine with this one's."""
        u = self._normalised_values(layer)
        cos = u @ u[key]
        cos[key] = -math.inf
        top = cos.topk(min(n, len(cos) - 1))
        return [{"layer": layer, "key": k, "cosine": finite(c), "top_tokens": self.value_tokens(layer, k, "pos", 4)}
                for c, k in zip(top.values.tolist(), top.indices.tolist())]

    def _neighbour(self, layer: int, key: int, step: int) -> dict | None:
        key += step
        i = self.layers.index(layer)
        if key < 0:
            if i == 0:
                return None
            return {"layer": self.layers[i - 1], "key": self.d_ff - 1}
        if key >= self.d_ff:
            if i == len(self.layers) - 1:
                return None
            return {"layer": self.layers[i + 1], "key": 0}
        return {"layer": layer, "key": key}

    def memory(self, layer: int, key: int, n: int = 10) -> dict:
        """The `ffkv show --json` document of every face (triggers with their highlighted parts, raw and normed
        value tokens), coefficient statistics, neighbours, similar memories, analysis records and, per face, the
        explanation of `ffkv explain` (None for a face it did not explain; all None when there are none)."""
        self.check_memory(layer, key)
        n = max(1, min(n, self.top_k))
        faces = {}
        for face in self.atlas.faces:
            doc = self.atlas.show(layer, key, face, n, detail=True)
            for t in doc["triggers"]:
                t["score"] = finite(t["score"])
            doc["value_normed"] = self.atlas.value_tokens(layer, key, face, normed=True, n=n)
            faces[face] = doc
        s = self.stats[layer]
        stats = {"count": s["count"], "frac_positive": finite(s["frac_positive"][key]),
                 "mean": finite(s["mean"][key]), "rms": finite(math.sqrt(max(float(s["mean_square"][key]), 0.0))),
                 "min": finite(s["min"][key]), "max": finite(s["max"][key]),
                 "layer_min": finite(s["min"].min()), "layer_max": finite(s["max"].max()),
                 "value_norm": finite(self.value_norms[layer][key])}
        return {"layer": layer, "key": key, "d_ff": self.d_ff, "layers": self.layers, "top_k": self.top_k,
                "faces": faces, "stats": stats,
                "prev": self._neighbour(layer, key, -1), "next": self._neighbour(layer, key, 1),
                "similar": self.similar(layer, key),
                "analysis": self.analyses.per_memory.get((layer, key), [])[:50],
                "explanations": self._explanations_of(layer, key)}

    def _explanations_of(self, layer: int, key: int) -> dict:
        e = self.explanations.get()
        return {"present": e.present, "message": e.message,
                "faces": {face: e.face_doc(layer, key, face) if e.present else None for face in self.atlas.faces}}

    # -- search --------------------------------------------------------------------------------------------
    def _example(self, layer: int, key: int, face: str, rank: int, position: int) -> dict:
        score = float(self.atlas.layer_tensors(layer)[f"{face}_scores"][key][rank])
        t = self.atlas.trigger_at(position, rank, score)
        return {"rank": rank, "score": finite(score), "context": t.context, "trigger_token": t.trigger_token,
                "next_token": t.next_token, "title": t.title}

    def search_promotes(self, token: str, projection: str, limit: int) -> dict:
        if projection not in PROJECTIONS:
            raise BadRequest(f"projection must be one of {', '.join(PROJECTIONS)}")
        ids = self.index.token_ids(token)
        results = self.index.promotes(ids, projection, limit)
        for r in results:
            r["token"] = self.token_texts[r["token_id"]]
            r["logit"] = finite(r["logit"])
            r["top_tokens"] = self.value_tokens(r["layer"], r["key"], r["face"])
        note = None
        if not ids:
            with self.tokenizer_lock:
                pieces = self.loaded.tokenizer(token, add_special_tokens=False).input_ids[:12]
            note = (f"{token!r} is not one token of the vocabulary; it is tokenised as "
                    + " + ".join(repr(self.token_texts[i]) for i in pieces) + ". Search for one of those.")
        return {"kind": "promotes", "query": token, "projection": projection,
                "tokens": [{"id": i, "token": self.token_texts[i]} for i in ids[:20]],
                "depth": int(self.index.promote[projection]["rank"].max(initial=-1)) + 1,
                "results": results, "note": note}

    def search_text(self, text: str, limit: int) -> dict:
        """Memories whose triggers contain the phrase, and (``descriptions``) the faces whose explanation's
        description contains it."""
        try:
            words, _ = self.index.phrase(text)
            results, units, truncated = self.index.text(text, limit, self.max_text_units)
        except ValueError as exc:
            raise BadRequest(str(exc))
        e = self.explanations.get()
        descriptions = e.text(words, limit) if e.present else []
        for r in results:
            r["example"] = self._example(r["layer"], r["key"], r["face"], r.pop("best_rank"), r.pop("best_position"))
            r["top_tokens"] = self.value_tokens(r["layer"], r["key"], r["face"])
        note = (f"{text!r} is in more than {self.max_text_units} corpus units: only the first {self.max_text_units} "
                "were read, so the counts are partial; a longer phrase is counted in full") if truncated else None
        return {"kind": "text", "query": text, "units_matched": units, "truncated": truncated,
                "units_limit": self.max_text_units, "results": results, "note": note,
                "descriptions": descriptions, "explanations": {"present": e.present, "message": e.message}}

    def search_concept(self, query: str, limit: int, min_sim_corr: float | None = None, min_f1: float | None = None,
                       kind: str | None = None) -> dict:
        """Memory faces whose concept vector (``explanation_vectors.npy``) is closest to the embedded query, among
        those whose held-out scores reach the given minimums (and of the given kind)."""
        query = query.strip()
        if not query:
            raise BadRequest("the concept query is empty")
        if len(query) > MAX_CONCEPT_CHARS:
            raise BadRequest(f"the concept query is longer than {MAX_CONCEPT_CHARS} characters")
        if not 1 <= limit <= MAX_CONCEPT_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_CONCEPT_LIMIT}")
        for name, value, lo in (("min_sim_corr", min_sim_corr, -1.0), ("min_f1", min_f1, 0.0)):
            if value is not None and not (math.isfinite(value) and lo <= value <= 1.0):
                raise BadRequest(f"{name} must be a number between {lo:g} and 1")
        if kind is not None and kind not in EXPLANATION_KINDS:
            raise BadRequest(f"kind must be one of {', '.join(EXPLANATION_KINDS)}")
        e = self.explanations.get()
        if not e.present:
            raise BadRequest(f"concept search needs the explanations: {e.message}")
        if e.vectors is None:
            raise BadRequest(e.vectors_message)
        if (min_sim_corr is not None or min_f1 is not None) and not e.scores:
            raise BadRequest("these explanations were not scored (`ffkv explain` without scores): drop min_sim_corr "
                             "and min_f1, or rerun `ffkv explain` with scoring")
        try:
            vector = self.query_embedder.encode(query)
        except FfkvError as exc:
            raise Unavailable(f"concept search is not available on this server: {exc}")
        results, passed = e.concept(vector, limit, min_sim_corr, min_f1, kind)
        for r in results:
            r["top_tokens"] = self.value_tokens(r["layer"], r["key"], r["face"])
        return {"kind": "concept", "query": query, "filters": {"min_sim_corr": min_sim_corr, "min_f1": min_f1,
                                                               "kind": kind},
                "faces_passing": passed, "faces": e.n, "results": results}

    # -- prompt debugger -----------------------------------------------------------------------------------
    def _encode(self, prompt: str) -> torch.Tensor:
        if not prompt.strip():
            raise BadRequest("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        with self.tokenizer_lock:
            ids = self.loaded.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise BadRequest("the prompt has no tokens")
        if ids.shape[1] > MAX_PROMPT_TOKENS:
            raise BadRequest(f"the prompt has {ids.shape[1]} tokens; at most {MAX_PROMPT_TOKENS} are allowed")
        return ids

    def _interventions(self, interventions: list[Intervention]) -> None:
        if len(interventions) > MAX_INTERVENTIONS:
            raise BadRequest(f"at most {MAX_INTERVENTIONS} interventions")
        try:
            debugger.check_interventions(self.parts, interventions, MAX_SET_VALUE)
        except FfkvError as exc:
            raise BadRequest(str(exc))

    def _memory_info(self, layer: int, key: int, coefficient: float) -> dict:
        face = "pos" if coefficient >= 0 else "neg"
        info = {"face": face, "top_tokens": self.value_tokens(layer, key, face)}
        if layer in self.stats:
            info.update(min=finite(self.stats[layer]["min"][key]), max=finite(self.stats[layer]["max"][key]))
        return info

    def run(self, prompt: str, interventions: list[Intervention], top: int) -> dict:
        self._interventions(interventions)
        ids = self._encode(prompt)
        with self.queue.turn():
            doc = debugger.run_prompt(self.model, self.parts, ids, interventions, top, self.value_norms,
                                      self.token_texts, self._memory_info)
        for layer in doc["layers"]:
            s = self.stats.get(layer["layer"])
            layer["coef_max"] = finite(s["max"].max()) if s is not None else None
            layer["coef_min"] = finite(s["min"].min()) if s is not None else None
            layer["scanned"] = s is not None
        ids_list = ids[0].tolist()
        return {"tokens": [self.token_texts[i] for i in ids_list], "token_ids": ids_list,
                "interventions": [iv.__dict__ for iv in interventions], **doc}

    def generate(self, prompt: str, interventions: list[Intervention], max_new_tokens: int) -> dict:
        self._interventions(interventions)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise BadRequest(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}")
        ids = self._encode(prompt)
        with self.queue.turn():
            new, stop = debugger.generate(self.model, self.parts, ids, interventions, max_new_tokens, self.eos_ids)
        return {"text": self.atlas.tokenizer.decode(new), "token_ids": new, "stopped": stop,
                "interventions": [iv.__dict__ for iv in interventions]}
