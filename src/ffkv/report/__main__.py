"""`python -m ffkv.report ATLAS [--out FILE]`: the same as `ffkv report`."""

from __future__ import annotations

import argparse
import sys

from ..errors import FfkvError
from . import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffkv.report", description="write the HTML report of an atlas")
    parser.add_argument("atlas")
    parser.add_argument("--out", "-o", default=None, help="HTML file to write (default: ATLAS/report.html)")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.atlas, args.out))
    except FfkvError as exc:
        print(f"ffkv: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
