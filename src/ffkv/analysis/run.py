"""Run the experiments on an atlas and write ``ATLAS/analysis.json`` (contract: ``ffkv.analysis``)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..atlas import Atlas
from ..errors import FfkvError
from ..models import DTYPES, check_dtype
from ..version import __version__

EXPERIMENTS = ("patterns", "token_removal", "values", "aggregation", "causal")


REMOVAL_TRIGGERS = 25
"""Triggers per key for token removal when not set: the paper's Fig 2 annotation size (its Fig 3 used 50)."""


@dataclass
class AnalyzeConfig:
    """Sizes of the experiments; every field is also a flag of `ffkv analyze`."""

    removal_keys: int = field(default=10, metadata={"help": "keys per layer and face for token removal "
                              "(Fig 3; paper: 100)"})
    removal_triggers: int | None = field(default=None, metadata={"help": "triggers per key for token removal "
                                         f"(default: {REMOVAL_TRIGGERS}, or the atlas's top-k when smaller; "
                                         "paper: 50)"})
    examples: int = field(default=4000, metadata={"help": "held-out prefixes for §5 (Figs 7-11; paper: 4000)"})
    active_threshold: float = field(default=0.1, metadata={"help": "smooth activations: a memory is active "
                                    "when |m| > this x the layer's max |m| (ReLU: m > 0)"})
    top_memories: int = field(default=10, metadata={"help": "memories listed by precision (Table 2)"})
    causal_memories: int = field(default=8, metadata={"help": "causal check (not in the paper): agreeing and "
                                 "suppressing memories switched off per layer, face and kind"})
    seed: int = field(default=0, metadata={"help": "seed of every sample"})
    only: str | None = field(default=None, metadata={"help": "comma-separated subset of "
                             f"{','.join(EXPERIMENTS)} (others kept from an existing analysis.json)"})
    dtype: str | None = field(default=None, metadata={"help": f"{', '.join(DTYPES)}: the dtype the model is "
                              "loaded in (default: the scan's dtype, float32 unless set at scan time; the atlas's "
                              "weight fingerprint may not match a model loaded in a lower precision)"})

    def __post_init__(self):
        if self.dtype is not None:
            check_dtype(self.dtype)

    def model_dtype(self, manifest: dict) -> str:
        """The dtype to load the atlas's model in: ``dtype``, else the one the atlas was scanned in."""
        return self.dtype or (manifest.get("scan") or {}).get("dtype") or "float32"


DEFINITIONS = {
    "memory": "one hidden unit i of an FFN layer: key = what its input projection(s) compare the residual "
              "with, coefficient m_i = the i-th input of the output projection, value v_i = the matching "
              "row/column of that projection; the FFN output is sum_i m_i v_i.",
    "face": "pos: the largest coefficients, which add +v_i; neg (signed FFNs only): the most negative ones, "
            "which add -v_i. ReLU FFNs have only the positive face (the paper's case).",
    "trigger": "a prefix of a unit (sentence or document window) whose last position gives one of the "
               "top-k coefficients of a memory face.",
    "pattern": "one of 12 kinds shared by >= 3 of a face's top-25 triggers from distinct units, tested on all "
               "triggers against the scanned corpus (Bonferroni over the kinds): shallow = same last token, last "
               "two tokens, token before the last, or token class (number, punctuation, word piece, first token, "
               "capitalised); semantic = same topic or article, trigger words alike in meaning, or alike subjects "
               "(an independent sentence embedder). See `ffkv explain` and explanations.parquet.",
    "token_removal": "relative change (new - old) / old of the coefficient when the first, the last or a "
                     "random inner token of a trigger prefix is removed, read at the new last position; mean (the "
                     "paper's), median, and the share of triggers whose coefficient changes sign.",
}


def _check_sizes(atlas: Atlas, cfg: AnalyzeConfig) -> AnalyzeConfig:
    """FfkvError for a size the atlas cannot take; returns the config with the removal triggers resolved."""
    top_k = atlas.manifest["scan"]["top_k"]
    if cfg.removal_triggers is None:
        cfg = dataclasses.replace(cfg, removal_triggers=min(REMOVAL_TRIGGERS, top_k))
    elif not 1 <= cfg.removal_triggers <= top_k:
        raise FfkvError(f"--removal-triggers {cfg.removal_triggers} must be between 1 and the atlas's top-k {top_k}")
    for name in ("removal_keys",):
        if not 1 <= getattr(cfg, name) <= atlas.d_ff:
            raise FfkvError(f"--{name.replace('_', '-')} must be between 1 and d_ff = {atlas.d_ff}")
    if cfg.examples < 1:
        raise FfkvError("--examples must be positive")
    if cfg.causal_memories < 1:
        raise FfkvError("--causal-memories must be positive")
    return cfg


def _read_previous(path: Path) -> dict:
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = None
    if not isinstance(previous, dict):
        raise FfkvError(f"{path} is corrupt (not a JSON object): run `ffkv analyze` without --only to rewrite it")
    return previous


def _same_scan(previous: dict, scan_id: str, summary: dict) -> bool:
    """Whether an existing analysis.json is of this very scan: its scan_id, or (files written before scan ids)
    the atlas summary it recorded, which includes the scan's timing."""
    if "scan_id" in previous:
        return previous["scan_id"] == scan_id
    return previous.get("atlas") == json.loads(json.dumps(summary))


def analyze(atlas_path: str | Path, config: AnalyzeConfig | None = None, model=None, progress: bool = True) -> dict:
    """Run the experiments and write ``analysis.json`` next to the atlas; returns its content.

    With ``config.only``, the other experiments' blocks are kept from an existing analysis.json of the same scan
    (same ``scan_id``); one of an earlier scan of the folder (``scan --force``) is discarded, not merged."""
    from ..models import load_model
    from .aggregation import aggregation_experiment, held_out_units
    from .causal import causal_experiment
    from .explain import block_rows, explain, patterns_block, read_explanations
    from .keys import token_removal_experiment
    from .values import values_experiment

    cfg = config or AnalyzeConfig()
    atlas = Atlas.load(atlas_path)
    cfg = _check_sizes(atlas, cfg)
    wanted = EXPERIMENTS if cfg.only is None else tuple(x.strip() for x in cfg.only.split(","))
    unknown = [x for x in wanted if x not in EXPERIMENTS]
    if unknown:
        raise FfkvError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    out_path = atlas.path / "analysis.json"
    m = atlas.manifest
    summary = {"model": m["model"], "corpus": m["corpus"], "scan": {k: m["scan"][k] for k in
               ("top_k", "unit", "max_tokens", "layers", "faces", "dtype")}, "result": m["result"]}
    result, not_run = {}, "not run (use --only to add it)"
    if cfg.only and out_path.exists():
        previous = _read_previous(out_path)
        if _same_scan(previous, atlas.scan_id, summary):
            result = previous
        else:
            not_run = ("not run on this scan (analysis.json held an earlier scan's results, which --only "
                       "discarded; use --only to add it)")
    if model is None:
        model = load_model(atlas.manifest["model"]["name"], dtype=cfg.model_dtype(atlas.manifest))
    atlas.check_model(model)
    # the dtype the experiments ran in: a model passed in (`ffkv run`, `analyze --model`) may have another
    dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")
    faces = atlas.faces
    timings = result.get("timings", {})

    def suffix(face: str) -> str:
        return "" if face == "pos" else "_neg"

    if "patterns" in wanted:
        t = time.time()
        table = read_explanations(atlas)
        if table is None:  # explain is a stage of its own (`ffkv explain`); run it here when it has not run
            # scores need held-out units; Fig 2 does not: an atlas of the whole corpus gets unscored explanations
            explain(atlas.path, model=model, progress=progress, score=len(held_out_units(atlas)) > 0)
            table = read_explanations(atlas)
        rows = block_rows(table)
        for face in faces:
            result["patterns" + suffix(face)] = patterns_block(atlas, rows, face)
        timings["patterns"] = round(time.time() - t, 1)
    if "token_removal" in wanted:
        t = time.time()
        with tqdm(desc="token removal (sequences)", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
            blocks = token_removal_experiment(atlas, model, faces, cfg.removal_keys, cfg.removal_triggers,
                                              cfg.seed, bar)
        for face in faces:
            result["token_removal" + suffix(face)] = blocks[face]
        timings["token_removal"] = round(time.time() - t, 1)
    if "values" in wanted:
        t = time.time()
        for face in faces:
            result["values" + suffix(face)] = values_experiment(atlas, model, face, top_n=cfg.top_memories,
                                                                seed=cfg.seed, progress=progress)
        timings["values"] = round(time.time() - t, 1)
    if "aggregation" in wanted:
        t = time.time()
        result["aggregation"] = aggregation_experiment(atlas, model, n_examples=cfg.examples,
                                                       active_threshold=cfg.active_threshold, seed=cfg.seed,
                                                       progress=progress)
        timings["aggregation"] = round(time.time() - t, 1)
    if "causal" in wanted:
        t = time.time()
        for face, block in causal_experiment(atlas, model, cfg.causal_memories, cfg.seed, progress).items():
            result["causal" + suffix(face)] = block
        timings["causal"] = round(time.time() - t, 1)

    result.update({
        "ffkv_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "scan_id": atlas.scan_id,
        "atlas": summary,
        "config": dict(result.get("config", {}), **dict(asdict(cfg), dtype=dtype)),
        "definitions": dict(result.get("definitions", {}), **DEFINITIONS),
        "n_layers": atlas.n_layers,
        "layers": atlas.layers,
        "timings": timings,
    })
    for block in ("values", "aggregation", "causal"):
        defs = (result.get(block) or {}).get("definitions")
        if defs:
            result["definitions"].update(defs)
    result["missing"] = {x: not_run for x in EXPERIMENTS if x not in result}
    for x in EXPERIMENTS:  # a part of a block that could not be measured (e.g. §5.2 without the embedder)
        for part, reason in ((result.get(x) or {}).get("missing") or {}).items():
            result["missing"][f"{x}.{part}"] = reason
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, out_path)
    return result
