"""`ffkv merge`: combine atlases scanned as disjoint shards (`ffkv scan --shard i/n`) into the atlas a
single scan would have written. The running statistics merge exactly (see topk.py), so the result's
tensors are bit-identical to an unsharded scan with the same settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file
from tqdm.auto import tqdm

from .atlas import Atlas, read_layer_state, write_layer, write_manifest
from .errors import FfkvError

# Settings that may differ between shards without changing what is computed.
_FREE = ("device", "checkpoint_every", "shard", "world_size", "model", "corpus")


def _check_compatible(atlases: list[Atlas]) -> tuple[int, list[int]]:
    first = atlases[0].manifest
    for a in atlases[1:]:
        m = a.manifest
        if {k: v for k, v in m["model"].items() if k != "name"} != \
                {k: v for k, v in first["model"].items() if k != "name"}:
            raise FfkvError(f"cannot merge: {a.path} was made with another model or tokenizer than {atlases[0].path}")
        if m["scan"].get("bos", False) != first["scan"].get("bos", False):
            with_bos, without = (a, atlases[0]) if m["scan"].get("bos") else (atlases[0], a)
            raise FfkvError(f"cannot merge: {with_bos.path} was scanned with --bos and {without.path} without "
                            "(their units differ)")
        if m["corpus"] != first["corpus"]:
            raise FfkvError(f"cannot merge: {a.path} was made from another corpus or token store")
        settings = {k: v for k, v in m["scan"].items() if k not in _FREE}
        first_settings = {k: v for k, v in first["scan"].items() if k not in _FREE}
        if settings != first_settings:
            diff = sorted(k for k in settings if settings.get(k) != first_settings.get(k))
            raise FfkvError(f"cannot merge: {a.path} was scanned with other settings ({', '.join(diff)})")
    shards = [tuple(a.manifest["scan"]["shard"]) for a in atlases]
    n = shards[0][1]
    if n == 1 or any(s[1] != n for s in shards) or sorted(s[0] for s in shards) != list(range(n)):
        raise FfkvError(f"cannot merge shards {', '.join(f'{i}/{m}' for i, m in shards)}: give each part "
                        "i/n of one `ffkv scan --shard` split exactly once")
    return n, list(first["scan"]["layers"])


def _check_output_apart(paths: list[Path], out: Path) -> None:
    """The output folder, which --force deletes, must be neither an input nor contain one nor lie in one."""
    target = out.resolve()
    for p in paths:
        source = p.resolve()
        if target == source:
            raise FfkvError(f"--out {out} is the input {p}: give a new directory for the merged atlas")
        if source.is_relative_to(target):
            raise FfkvError(f"--out {out} contains the input {p}: give a directory apart from the inputs")
        if target.is_relative_to(source):
            raise FfkvError(f"--out {out} lies inside the input {p}: give a directory apart from the inputs")


def merge_atlases(paths: list[str | Path], out: str | Path, force: bool = False, progress: bool = True) -> Atlas:
    """Merge the shard atlases ``paths`` into a new atlas ``out`` (``force``: replace an existing ``out``, which
    must not be, contain or lie inside an input)."""
    out = Path(out)
    _check_output_apart([Path(p) for p in paths], out)
    atlases = [Atlas.load(p) for p in paths]
    n, layers = _check_compatible(atlases)
    if out.exists() and not force:
        raise FfkvError(f"{out} exists; use --force to overwrite it")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for layer in tqdm(layers, desc="merge layers", disable=not progress, dynamic_ncols=True):
        tensors = [load_file(a.path / "layers" / f"layer_{layer:03d}.safetensors") for a in atlases]
        state = read_layer_state(tensors[0])
        for t in tensors[1:]:
            state.merge(read_layer_state(t))
        values = {k: v for k, v in tensors[0].items() if k.startswith("value_")}
        write_layer(out, layer, state, values)
    first = atlases[0].path
    shutil.copytree(first / "store", out / "store")
    shutil.copytree(first / "tokenizer", out / "tokenizer")
    shutil.copy2(first / "scanned_units.npy", out / "scanned_units.npy")
    manifest = json.loads(json.dumps(atlases[0].manifest))
    manifest["scan"]["shard"] = [0, 1]
    results = [a.manifest["result"] for a in atlases]
    tokens = sum(r["tokens_scanned"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    manifest["result"] = dict(results[0], units_scanned=sum(r["units_scanned"] for r in results),
                              tokens_scanned=tokens, seconds=round(seconds, 2),
                              tokens_per_second=round(tokens / max(seconds, 1e-9), 1), merged_from=n)
    write_manifest(out, manifest)
    return Atlas.load(out)
