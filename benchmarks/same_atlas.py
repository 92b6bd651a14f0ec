"""Are two atlases the same scan, byte for byte? Compares the sha256 of every layer file, the token store and
the list of scanned units (the manifest differs by date and timing, the tokenizer folder by library version).

    python benchmarks/same_atlas.py ATLAS_A ATLAS_B      # exit status 0 when identical, 1 otherwise
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def digests(atlas: Path) -> dict[str, str]:
    files = sorted([*atlas.glob("layers/*.safetensors"), *atlas.glob("store/*"), atlas / "scanned_units.npy"])
    return {str(f.relative_to(atlas)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    a, b = digests(args.a), digests(args.b)
    differ = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
    for name in sorted(a.keys() | b.keys()):
        print(f"{'same  ' if name not in differ else 'DIFFER'} {name} {a.get(name, '-')[:16]} {b.get(name, '-')[:16]}")
    print(f"{len(a.keys() | b.keys()) - len(differ)} files identical, {len(differ)} differ")
    return 1 if differ or not a else 0


if __name__ == "__main__":
    sys.exit(main())
