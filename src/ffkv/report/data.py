"""What the report reads: the atlas manifest, ``analysis.json`` (optional, possibly partial) and the paper's numbers.

Everything here is tolerant: a block, an array or a layer that is missing or ``null`` becomes ``None`` and the
report says so, instead of failing. Nothing here needs the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..atlas import read_manifest, scan_id
from ..errors import FfkvError

PAPER_LAYERS = 16
WIKITEXT103_TRAIN_TOKENS = 103_227_021
"""Size of the paper's corpus (WikiText-103 training split), to say how much smaller a scan is."""

FACES = ("pos", "neg")
FACE_LABEL = {"pos": "positive face (+v)", "neg": "negative face (−v)"}


def load_paper_reference() -> dict:
    """The paper's numbers, as shipped inside the package (a copy of the project's shared reference file)."""
    return json.loads((Path(__file__).with_name("paper_reference.json")).read_text(encoding="utf-8"))


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class ReportInputs:
    atlas_path: Path
    manifest: dict
    analysis: dict | None
    analysis_note: str | None = None
    """Why there is no analysis (no file), shown in every figure's missing note."""
    scan_id: str | None = None
    """The atlas's scan id (``Atlas.scan_id``), recorded in the page."""
    paper: dict = field(default_factory=load_paper_reference)

    # -- shape -----------------------------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.manifest.get("model") or {}

    @property
    def n_layers(self) -> int:
        n = self.model.get("n_layers") or (self.analysis or {}).get("n_layers")
        if not isinstance(n, int) or n < 1:
            raise FfkvError(f"{self.atlas_path}: manifest.json has no model.n_layers")
        return n

    @property
    def signed(self) -> bool:
        if "signed" in self.model:
            return bool(self.model["signed"])
        return "neg" in ((self.manifest.get("scan") or {}).get("faces") or [])

    @property
    def faces(self) -> tuple[str, ...]:
        return FACES if self.signed else ("pos",)

    @property
    def scanned_layers(self) -> list[int]:
        layers = (self.analysis or {}).get("layers") or (self.manifest.get("scan") or {}).get("layers")
        if isinstance(layers, list) and all(isinstance(x, int) for x in layers):
            return sorted(layers)
        return list(range(self.n_layers))

    # -- access to analysis.json -----------------------------------------------------------------------
    def block(self, name: str, face: str = "pos") -> dict | None:
        """A top-level block of analysis.json for a face (``values`` / ``values_neg``), or None."""
        if self.analysis is None:
            return None
        b = self.analysis.get(name if face == "pos" else f"{name}_neg")
        return b if isinstance(b, dict) else None

    def series(self, block: dict | None, *path: str) -> list[float | None] | None:
        """A per-layer array from a block (``path`` descends into nested dicts), padded/cut to n_layers with
        None for null, non-numeric or non-finite entries; None if absent or entirely empty."""
        x = block
        for key in path:
            if not isinstance(x, dict):
                return None
            x = x.get(key)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            x = [x] * self.n_layers  # a scalar given for every layer (e.g. a constant baseline)
        if not isinstance(x, list):
            return None
        out = [_number(v) for v in x[: self.n_layers]]
        out += [None] * (self.n_layers - len(out))
        return out if any(v is not None for v in out) else None

    def intervals(self, block: dict | None, *path: str) -> list[list[float] | None] | None:
        """A per-layer 95 % interval array ``X_ci`` (``path`` descends to it): one [low, high] or None per layer,
        padded/cut to n_layers; None if absent or entirely empty. Malformed entries (not two finite numbers in
        order) are None."""
        x = block
        for key in path:
            x = x.get(key) if isinstance(x, dict) else None
        if not isinstance(x, list):
            return None
        out = []
        for v in x[: self.n_layers]:
            pair = [_number(u) for u in v] if isinstance(v, list) and len(v) == 2 else None
            out.append(pair if pair and None not in pair and pair[0] <= pair[1] else None)
        out += [None] * (self.n_layers - len(out))
        return out if any(v is not None for v in out) else None

    def scalar(self, block: dict | None, *path: str) -> float | None:
        x = block
        for key in path:
            if not isinstance(x, dict):
                return None
            x = x.get(key)
        return _number(x)

    def missing_reason(self, name: str, face: str = "pos") -> str:
        """Why a block is absent: the analysis's own reason where it gives one."""
        if self.analysis is None:
            return self.analysis_note or "no analysis.json"
        reasons = self.analysis.get("missing") or {}
        key = name if face == "pos" else f"{name}_neg"
        if isinstance(reasons, dict):
            for k in (key, name):
                if reasons.get(k):
                    return f"analysis.json has no '{key}' block: {reasons[k]}"
        return f"analysis.json has no '{key}' block"

    def reasons_for(self, name: str) -> list[str]:
        """Entries of analysis.json 'missing' that concern a block (e.g. partial layers)."""
        reasons = (self.analysis or {}).get("missing") or {}
        if not isinstance(reasons, dict):
            return []
        return [f"{k}: {v}" for k, v in reasons.items() if str(k).split(".")[0].split("/")[0] in (name, f"{name}_neg")
                and v]

    # -- facts about the setting (used to explain differences from the paper) --------------------------
    @cached_property
    def traits(self) -> dict:
        m, c, s, r = self.model, self.manifest.get("corpus") or {}, self.manifest.get("scan") or {}, \
            self.manifest.get("result") or {}
        name = str(m.get("name", "?"))
        text = " ".join(str(x) for x in (name, m.get("class", ""), m.get("quantization", "")))
        default = name == "default"
        instruct = default or bool(re.search(r"instruct|chat|(^|[-_/])it($|[-_/.])|sft|rlhf|dpo", text, re.I))
        from ..models import EMBEDDED_MODELS

        quant = None
        if name in EMBEDDED_MODELS:
            quant = EMBEDDED_MODELS[name].quantization
        elif m.get("quantization"):
            quant = str(m["quantization"])
        else:
            q = re.search(r"(q\d(_k)?(_[0-9a-z]+)?|gguf|gptq|awq|int[48]|bnb|[48]bit)", text, re.I)
            if q:
                quant = q.group(0)
        tokens = r.get("tokens_scanned") or c.get("n_tokens")
        return {
            "name": name,
            "display_name": "SmolLM2-135M-Instruct (embedded default)" if default else name,
            # legends of `ffkv compare` repeat it on every trace: a path is cut to its last component
            "short_name": "SmolLM2-135M-Instruct" if default else (Path(name).name.removesuffix(".gguf") or name),
            "activation": str(m.get("activation", "?")),
            "gated": bool(m.get("gated", False)),
            "signed": self.signed,
            "relu": str(m.get("activation", "")).lower() == "relu" and not m.get("gated", False),
            "instruct": instruct,
            "quantised": quant,
            "dtype": s.get("dtype"),
            "tokens": int(tokens) if isinstance(tokens, (int, float)) else None,
            "unit": c.get("unit") or s.get("unit"),
            "vocab": m.get("vocab_size"),
            "n_layers": self.n_layers,
            "corpus": c.get("corpus") or s.get("corpus"),
        }


def load_inputs(atlas_path: str | Path) -> ReportInputs:
    """Read ``ATLAS/manifest.json`` (required) and ``ATLAS/analysis.json`` (optional). An analysis.json of an
    earlier scan of the folder (its ``scan_id`` differs from the atlas's) is refused; one without ``scan_id``
    (written before the key existed) is read."""
    path = Path(atlas_path)
    manifest = read_manifest(path)
    sid = scan_id(path)
    af = path / "analysis.json"
    analysis, note = None, None
    if not af.exists():
        note = f"no analysis.json in {path}: run `ffkv analyze {path}` first"
    else:
        try:
            analysis = json.loads(af.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FfkvError(f"{af} is corrupt (not JSON): rerun `ffkv analyze {path}`")
        if not isinstance(analysis, dict):
            raise FfkvError(f"{af} is not a JSON object: rerun `ffkv analyze {path}`")
        recorded = analysis.get("scan_id")
        if recorded is not None and recorded != sid:
            raise FfkvError(f"{af} is of an earlier scan (scan id {recorded}; the atlas is now scan {sid}): "
                            f"rerun `ffkv analyze {path}`")
    inputs = ReportInputs(atlas_path=path, manifest=manifest, analysis=analysis, analysis_note=note, scan_id=sid)
    inputs.n_layers  # noqa: B018 - fail early with a clear message
    return inputs
