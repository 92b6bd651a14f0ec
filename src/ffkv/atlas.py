"""The atlas: the on-disk result of a scan, and its query API. The format is documented here only.

```
ATLAS/
  manifest.json            written last (atomically): an atlas without it is unfinished
  layers/layer_NNN.safetensors, one per scanned layer (0-based model layer index), with tensors
      pos_scores   [d_ff, k] float32   top-k coefficients, best first (NaN = empty slot)
      pos_positions[d_ff, k] int64     their global positions in store/tokens.u32 (-1 = empty)
      neg_scores / neg_positions       the k most negative coefficients (signed FFNs only)
      stat_count []  stat_count_positive, stat_nonfinite [d_ff] int64, stat_min, stat_max [d_ff] float32
      stat_sum_limbs, stat_sumsq_limbs [d_ff, limbs] int64   exact sums (see topk.ExactSum); memory i has
                                       stat_count - stat_nonfinite[i] finite coefficients (non-finite are skipped)
      value_{raw|normed}_{pos|neg}_{ids|logits} [d_ff, value_top]  tokens each face's value promotes
  store/                   token store: tokens.u32, units.parquet, store.json (see corpus.py)
  scanned_units.npy        ids of the units the scan covered (the rest are held out)
  tokenizer/               the model's tokenizer, so an atlas can be read without the model
  checkpoint/              only while a scan is unfinished
```
Ties between equal coefficients are broken by the smaller global position.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .arch import check_memory
from .corpus import TokenStore
from .errors import FfkvError
from .models import legacy_weights_fingerprint, same_weights
from .projection import project_values
from .topk import LayerState, MemoryStats, TopK
from .version import __version__

FORMAT = "ffkv-atlas/1"
FACES = ("pos", "neg")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_layer(out: Path, layer: int, state: LayerState, values: dict[str, torch.Tensor]) -> None:
    """One layer file (atomic): both faces' top-k, the statistics and the value projections."""
    tensors = {}
    faces = [("pos", state.pos)] + ([("neg", state.neg)] if state.neg is not None else [])
    for face, topk in faces:
        scores, positions = topk.result()
        tensors[f"{face}_scores"] = scores.cpu()
        tensors[f"{face}_positions"] = positions.cpu()
    tensors.update({f"stat_{k}": v.cpu() for k, v in state.stats.state_dict().items()})
    tensors.update(values)
    (out / "layers").mkdir(parents=True, exist_ok=True)
    tmp = out / "layers" / f"layer_{layer:03d}.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, out / "layers" / f"layer_{layer:03d}.safetensors")


def read_layer_state(t: dict[str, torch.Tensor]) -> LayerState:
    """The scan state a layer file was written from (``write_layer``'s inverse, value lists aside)."""
    d_ff, k = t["pos_scores"].shape
    state = LayerState(d_ff, k, signed="neg_scores" in t)
    state.pos = TopK.from_result(t["pos_scores"], t["pos_positions"], largest=True)
    if "neg_scores" in t:
        state.neg = TopK.from_result(t["neg_scores"], t["neg_positions"], largest=False)
    if "stat_sum_limbs" not in t:
        raise FfkvError("this layer file was written by an older ffkv (fixed-point sums): rescan to merge it")
    state.stats.load_state_dict({name: t[f"stat_{name}"] for name in MemoryStats.FIELDS})
    return state


def write_manifest(out: Path, manifest: dict) -> None:
    """Written last: its presence is what marks an atlas finished."""
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))


def write_atlas(out: Path, model, store: TokenStore, states: dict[int, LayerState], config, units: np.ndarray,
                shard: tuple[int, int], world: int, result: dict, progress: bool = True) -> None:
    parts = model.parts
    for layer, state in tqdm(states.items(), desc="write layers + value projections", disable=not progress,
                             dynamic_ncols=True):
        write_layer(out, layer, state, project_values(parts, layer, config.value_top))
    np.save(out / "scanned_units.npy", units.astype(np.int64))
    model.tokenizer.save_pretrained(out / "tokenizer")
    cfg = model.model.config
    write_manifest(out, {
        "format": FORMAT,
        "ffkv_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": model.name, "architecture": cfg.model_type, "class": type(model.model).__name__,
            "n_layers": parts.n_layers, "d_model": parts.d_model, "d_ff": parts.d_ff,
            "vocab_size": int(parts.unembedding.shape[0]), "activation": parts.spec.activation,
            "gated": parts.spec.gated, "signed": parts.signed,
            "weights_fingerprint": model.fingerprint(), "tokenizer_fingerprint": model.tokenizer_fingerprint(),
            "weights_sample": model.weights_sample(),
        },
        "corpus": dict({k: store.meta[k] for k in ("corpus", "corpus_hash", "unit", "max_length", "n_documents",
                                                    "n_units", "n_tokens", "content_hash")},
                       bos=store.meta["bos"], special_prefix=store.meta["special_prefix"],
                       special_prefix_tokens=model.tokenizer.convert_ids_to_tokens(store.meta["special_prefix"])),
        "scan": dict(asdict(config), layers=sorted(states), faces=list(FACES if parts.signed else ("pos",)),
                     shard=list(shard), world_size=world),
        "result": result,
    })


def scan_id(path: Path) -> str:
    """Identifies the scan in an atlas folder: a hash of its manifest (written once, last, by the scan or merge).
    Every file derived from the atlas (analysis.json, report, search index) records it; a mismatch is refused."""
    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:16]


def read_manifest(path: Path) -> dict:
    """An atlas's manifest, checked: the folder exists, the manifest is there (the scan finished), is JSON and
    has this ffkv's format. Readers that need nothing else of the atlas (the report) use this alone."""
    path = Path(path)
    if not path.is_dir():
        raise FfkvError(f"atlas {path} does not exist")
    mf = path / "manifest.json"
    if not mf.exists():
        hint = " (an unfinished scan: resume it with --resume)" if (path / "checkpoint").exists() else ""
        raise FfkvError(f"{path} is not a finished ffkv atlas: no manifest.json{hint}")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FfkvError(f"{mf} is corrupt (not JSON)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise FfkvError(f"{path} has atlas format {found!r}; this ffkv reads {FORMAT}")
    if not isinstance(manifest.get("model"), dict):
        raise FfkvError(f"{mf} has no 'model' section: not an ffkv atlas manifest")
    return manifest


@dataclass
class Trigger:
    rank: int
    score: float
    unit: int
    position: int
    input_ids: list[int]
    text: str
    next_token_id: int | None
    next_token: str | None
    trigger_token: str
    """The text of the last token (the one whose coefficient is ``score``)."""
    context: str
    """The prefix text before the trigger token (special prefix tokens excluded)."""
    title: str
    topic: str


class Atlas:
    """A finished scan on disk. ``Atlas.load(path)``; then ``triggers``, ``value_tokens``, ``stats``."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.store = TokenStore(self.path / "store")
        self._layers: dict[int, dict[str, torch.Tensor]] = {}
        self._tokenizer = None

    @classmethod
    def load(cls, path: str | Path, model=None) -> Atlas:
        """Open an atlas; with ``model`` (a LoadedModel), refuse one made with another model."""
        path = Path(path)
        manifest = read_manifest(path)
        atlas = cls(path, manifest)
        if model is not None:
            atlas.check_model(model)
        return atlas

    def check_model(self, model) -> None:
        """FfkvError unless ``model`` is the checkpoint this atlas was scanned with (in any load dtype)."""
        m = self.manifest["model"]
        if "weights_sample" in m:
            same = model.fingerprint() == m["weights_fingerprint"] and same_weights(model.weights_sample(),
                                                                                   m["weights_sample"])
        else:  # an atlas of ffkv 0.1.0
            same = legacy_weights_fingerprint(model.model) == m["weights_fingerprint"]
        if not same or model.tokenizer_fingerprint() != m["tokenizer_fingerprint"]:
            raise FfkvError(f"atlas {self.path} was made with model {m['name']} ({m['architecture']}, weights "
                            f"{m['weights_fingerprint']}), not with {model.name} (weights {model.fingerprint()})")

    @property
    def scan_id(self) -> str:
        return scan_id(self.path)

    # -- shape -----------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["scan"]["layers"])

    @property
    def n_layers(self) -> int:
        return self.manifest["model"]["n_layers"]

    @property
    def d_ff(self) -> int:
        return self.manifest["model"]["d_ff"]

    @property
    def faces(self) -> list[str]:
        return list(self.manifest["scan"]["faces"])

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path / "tokenizer")
        return self._tokenizer

    def check(self, layer: int, key: int | None = None, face: str = "pos") -> None:
        """FfkvError unless (layer, key, face) is a memory face of this atlas."""
        check_memory(layer, key, face, layers=self.layers, d_ff=self.d_ff, faces=self.faces)

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        self.check(layer)
        if layer not in self._layers:
            self._layers[layer] = load_file(self.path / "layers" / f"layer_{layer:03d}.safetensors")
        return self._layers[layer]

    # -- queries ---------------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def trigger_at(self, position: int, rank: int = 0, score: float = float("nan")) -> Trigger:
        unit, ids, nxt = self.store.prefix(position)
        skip = int(self.store.n_special[unit])
        context = self.decode(ids[skip:-1])
        full = self.decode(ids[skip:])
        last = full[len(context):] if full.startswith(context) else self.decode(ids[-1:])
        return Trigger(rank=rank, score=score, unit=unit, position=position, input_ids=ids, text=full,
                       next_token_id=nxt, next_token=None if nxt is None else self.decode([nxt]),
                       trigger_token=last, context=context,
                       title=str(self.store.columns["title"][unit]), topic=str(self.store.columns["topic"][unit]))

    def triggers(self, layer: int, key: int, face: str = "pos", n: int | None = None) -> list[Trigger]:
        """The top trigger prefixes of one memory's face, best first (empty slots omitted)."""
        self.check(layer, key, face)
        t = self.layer_tensors(layer)
        scores, positions = t[f"{face}_scores"][key], t[f"{face}_positions"][key]
        out = []
        for rank, (s, p) in enumerate(zip(scores.tolist(), positions.tolist(), strict=False)):
            if p < 0 or (n is not None and rank >= n):
                break
            out.append(self.trigger_at(p, rank, s))
        return out

    def value_tokens(self, layer: int, key: int, face: str = "pos", normed: bool = False,
                     n: int | None = None) -> dict:
        """Tokens the memory's value promotes on this face (raw v.E, or through the final norm)."""
        # a ReLU atlas has no negative face's top-k, but its values still have a bottom
        check_memory(layer, key, face, layers=self.layers, d_ff=self.d_ff, faces=FACES)
        t = self.layer_tensors(layer)
        kind = "normed" if normed else "raw"
        ids = t[f"value_{kind}_{face}_ids"][key][:n].tolist()
        return {"top_tokens": [self.decode([i]) for i in ids], "top_token_ids": ids,
                "top_logits": [round(x, 5) for x in t[f"value_{kind}_{face}_logits"][key][:n].tolist()]}

    def stats(self, layer: int) -> dict[str, np.ndarray]:
        """Per-memory coefficient statistics over every scanned position of the layer (finite coefficients;
        ``nonfinite`` counts the skipped ones)."""
        t = self.layer_tensors(layer)
        if "stat_sum_limbs" in t:
            stats = MemoryStats(t["stat_sum_limbs"].shape[0])
            stats.load_state_dict({name: t[f"stat_{name}"] for name in MemoryStats.FIELDS})
            sums, sumsq, nonfinite = stats.sum.value(), stats.sumsq.value(), t["stat_nonfinite"]
        else:  # atlases of ffkv 0.1.0: int64 fixed point at 2**20 and 2**12
            sums, sumsq = t["stat_sum_fx"].double() / 2.0**20, t["stat_sumsq_fx"].double() / 2.0**12
            nonfinite = torch.zeros_like(t["stat_count_positive"])
        n = (int(t["stat_count"]) - nonfinite).clamp(min=1).double()
        return {
            "count": int(t["stat_count"]),
            "nonfinite": nonfinite.numpy(),
            "frac_positive": (t["stat_count_positive"].double() / n).numpy(),
            "mean": (sums / n).numpy(),
            "mean_square": (sumsq / n).numpy(),
            "min": t["stat_min"].numpy(), "max": t["stat_max"].numpy(),
        }

    def show(self, layer: int, key: int, face: str = "pos", n: int = 10, detail: bool = False) -> dict:
        """The `ffkv show --json` document of one memory face; ``detail`` adds each trigger's token, context,
        title and topic."""
        triggers = []
        for t in self.triggers(layer, key, face, n):
            doc = {"rank": t.rank, "score": t.score, "unit": t.unit, "position": t.position,
                   "input_ids": t.input_ids, "text": t.text, "next_token_id": t.next_token_id,
                   "next_token": t.next_token}
            if detail:
                doc.update(trigger_token=t.trigger_token, context=t.context, title=t.title, topic=t.topic)
            triggers.append(doc)
        return {"layer": layer, "key": key, "face": face, "triggers": triggers,
                "value": self.value_tokens(layer, key, face, n=n)}
