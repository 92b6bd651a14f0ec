"""Fold the raters' answers into a blind label file: per key, every rater's answer and the majority label.

    python tests/data/merge_rater_labels.py hand_labels_test3.json rater_1.json rater_2.json rater_3.json

Each rater file is a JSON list of {"item", "label", "has_shallow", "has_semantic", "note"} for every item of the
packet. The key's label is built from the majority of has_shallow and the majority of has_semantic (an odd number
of raters), so it is one of shallow / semantic / both / none even when no two raters gave the same 4-class label.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KINDS = {(True, False): "shallow", (False, True): "semantic", (True, True): "both", (False, False): "none"}


def main(label_file: str, *rater_files: str) -> None:
    if len(rater_files) % 2 == 0:
        raise SystemExit("give an odd number of rater files (the label is a majority)")
    path = Path(label_file)
    if not path.is_absolute():
        path = Path(__file__).with_name(label_file)
    doc = json.loads(path.read_text())
    answers = []
    for f in rater_files:
        by_item = {int(a["item"]): a for a in json.loads(Path(f).read_text())}
        missing = sorted({k["item"] for k in doc["keys"]} - set(by_item))
        if missing:
            raise SystemExit(f"{f}: no answer for items {missing}")
        answers.append(by_item)
    for key in doc["keys"]:
        rs = [a[key["item"]] for a in answers]
        for r in rs:
            if KINDS[bool(r["has_shallow"]), bool(r["has_semantic"])] != r["label"]:
                print(f"item {key['item']}: a rater's label {r['label']!r} disagrees with its own has_* answers; "
                      "the has_* answers count", file=sys.stderr)
        key["raters"] = [{k: r[k] for k in ("label", "has_shallow", "has_semantic", "note")} for r in rs]
        key["has_shallow"] = sum(bool(r["has_shallow"]) for r in rs) * 2 > len(rs)
        key["has_semantic"] = sum(bool(r["has_semantic"]) for r in rs) * 2 > len(rs)
        key["label"] = KINDS[key["has_shallow"], key["has_semantic"]]
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    print(f"{path.name}: {len(doc['keys'])} keys, labels " + ", ".join(
        f"{k} {sum(e['label'] == k for e in doc['keys'])}" for k in KINDS.values()))


if __name__ == "__main__":
    main(*sys.argv[1:])
