"""Build the blind test set of the explain validation: 64 keys of odd layers, both faces, shuffled.

Writes ``NAME`` (default ``hand_labels_test.json``: the keys with their top-25 triggers; labels are added by
the raters) and a rater packet (the trigger texts only: no layer, key or face) to label from. Run once per set,
before the explainer has seen its keys; a later set (``--seed``, ``--name``) leaves out the keys of the earlier
sets in this folder:

    python tests/data/make_test_labels.py ATLAS PACKET.md [SEED NAME [controls|table|table:400 [DECOYS]]]

With ``controls`` (the third set on), each item also shows 25 control prefixes: random positions of the scanned
units with the same prefix lengths as the triggers, and the rule (``RULE_WITH_CONTROLS``) puts a number on
"more often than random text": the rater counts a feature in both lists. The first two sets' raters had no
such number and called most keys "both". With ``table`` (set 5), "rarer" is the explainer's own level: the count
a feature needs among the triggers for its count among the controls (``ffkv.analysis.explain.count_table``). With
``table:400`` (set 9), 400 controls per key, the table for that many, and a JSON twin of the packet
(PACKET.json) for the raters to count in; the label file then keeps each control as its unit and length. A sixth
argument adds that many decoys (set 12): items whose list A is 25 random prefixes of distinct units, not a key's
triggers, so that the raters' rate of finding a pattern in chance can be read beside the explainer's.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from ffkv.analysis.explain import count_table
from ffkv.atlas import Atlas

N_TRIGGERS = 25
RULE = (
    "Each item lists the top-25 trigger prefixes of one FFN key: the text ends at the token where the key fires, "
    "marked [[...]]; each line gives the unit (sentence) the prefix comes from, and the topic and article title "
    "of its source. A pattern is a feature a reader would name that at least 3 triggers from distinct units "
    "share, more often than 25 random Wikipedia prefixes would (triggers of the same unit count once). "
    "Shallow = surface form: the same last token or last n-gram; the same token among the last three; the same "
    "kind of last token (a number or year, punctuation, a piece that continues a word, a capitalised word, the "
    "first token of a sentence). Semantic = meaning: the same topic, article or subject; a category of the "
    "last word or phrase (units of length, family relations, time words, nationalities...); a relation or "
    "situation the prefixes describe. Repeats of one word are shallow, not semantic, unless different words "
    "share that meaning too. Label: shallow (only shallow patterns), semantic (only semantic), both (at least "
    "one of each), none (no pattern). Also give has_shallow, has_semantic and a short note naming the patterns."
)
RULE_WITH_CONTROLS = (
    "Each item shows two lists of 25 text prefixes of Wikipedia sentences. Each prefix ends at a token marked "
    "[[...]]; each line gives the unit (sentence) it comes from and the topic / article title of its source. "
    "List A: the top-25 trigger prefixes of one FFN key (where it fires most). List B: 25 control prefixes, "
    "random positions of the same text with the same prefix lengths. A pattern is a feature a reader would name "
    "that (1) at least 3 prefixes of list A from distinct units share (prefixes of one unit count once) and "
    "(2) is clearly rarer in list B: A's count is at least three times B's and at least B's plus 3 (3 vs 0, "
    "4 vs 1, 6 vs 2, 9 vs 3 count; 4 vs 2 or 5 vs 3 do not). "
    "Shallow = surface form: the same marked token or the same last two tokens; the same token among the last "
    "three; the same kind of marked token (a number or year, punctuation, a piece that continues a word, a "
    "capitalised word, the first token of a sentence). Semantic = meaning: the same topic or article title; a "
    "category of the marked word or short phrase (units of length, family relations, time words, "
    "nationalities, animals...); a subject or situation the prefixes describe. Repeats of one word are shallow, "
    "not semantic: a category of marked words needs at least 3 different words. Label: shallow (only shallow "
    "patterns), semantic (only semantic), both (at least one of each), none (no feature meets (1) and (2)). "
    "Give has_shallow, has_semantic and a note naming each pattern with its counts in A and B "
    "(e.g. 'marked token \" the\": A 9, B 2; topic History: A 12, B 3')."
)


def rule_with_table(n_controls: int = 25) -> str:
    """Set 5 on: set 3's rule, with condition (2) replaced by the count table. Set 9 on: ``n_controls`` controls
    per key (400), so that the controls' count is close to the feature's rate in the corpus: with 25, two draws of
    controls give the same reader labels that agree at kappa about 0.46 (benchmarks/explain.py --control-noise),
    below the target the labels are for; with 400, about 0.82."""
    table = count_table(n_controls, max_controls=12 if n_controls == 25 else None)
    if n_controls == 25:
        pairs = "; ".join(f"B {b} -> A at least {a}" for b, a in table.items())
    else:
        ranges: dict[int, list[int]] = {}
        for b, a in table.items():
            ranges.setdefault(a, []).append(b)
        pairs = "; ".join(f"B {bs[0]}-{bs[-1]} -> A at least {a}" for a, bs in ranges.items())
    rule = RULE_WITH_CONTROLS.replace(
        "(2) is clearly rarer in list B: A's count is at least three times B's and at least B's plus 3 (3 vs 0, "
        "4 vs 1, 6 vs 2, 9 vs 3 count; 4 vs 2 or 5 vs 3 do not). ",
        "(2) reaches, in list A, the count this table gives for its count in list B (B counted the same way; a "
        f"feature more common than that in B never counts): {pairs}. ")
    if n_controls != 25:
        rule = rule.replace("two lists of 25 text prefixes", "two lists of text prefixes")
        rule = rule.replace(
            "List B: 25 control prefixes, random positions of the same text with the same prefix lengths.",
            f"List B: {n_controls} control prefixes, random positions of the same text with the prefix lengths of "
            "list A (each length used in turn), so that a feature's count in B is close to its rate in the text; "
            "count B with care (the packet's JSON twin lists every prefix with its marked token).")
        assert str(n_controls) in rule
    return rule


KEYS_PER_LAYER_FACE = 2
EXTRA = 4  # four more keys on random odd layers and faces: 64 in all
PACKET_CHARS = 160  # the end of each prefix is what a key reads most; raters see the last 160 characters


def control_prefixes(atlas: Atlas, triggers, rng: random.Random, n: int | None = None) -> list:
    """One random scanned position per trigger (``n``: that many, the triggers taken in turn), at the same offset
    in a unit long enough to hold it."""
    store = atlas.store
    units = np.load(atlas.path / "scanned_units.npy")
    out = []
    for i in range(len(triggers) if n is None else n):
        t = triggers[i % len(triggers)]
        offset = t.position - int(store.offset[t.unit])
        fits = units[store.length[units] > offset]
        unit = int(fits[rng.randrange(len(fits))])
        out.append(atlas.trigger_at(int(store.offset[unit]) + offset))
    return out


def _packet_line(t: dict) -> str:
    text = t["text"] if len(t["text"]) <= PACKET_CHARS else "…" + t["text"][-PACKET_CHARS:]
    return f"- (unit {t['unit']}, {t['topic']} / {t['title']}) {text}"


def _twin(t: dict) -> dict:
    """A prefix as the packet's JSON twin gives it: where it comes from, its text and its marked token."""
    return {"unit": t["unit"], "topic": t["topic"], "title": t["title"], "text": t["text"][-PACKET_CHARS - 4:],
            "marked": t["text"][t["text"].rindex("[[") + 2: -2]}


def _entry_text(atlas: Atlas, t) -> dict:
    return {"input_ids": t.input_ids[int(atlas.store.n_special[t.unit]):], "unit": t.unit, "topic": t.topic,
            "title": t.title, "text": t.context[-300:] + "[[" + t.trigger_token + "]]"}


def random_prefixes(atlas: Atlas, rng: random.Random, n: int = N_TRIGGERS) -> list:
    """``n`` random content positions of the scanned units, one per unit: a decoy "key" that no memory picked."""
    store = atlas.store
    units = rng.sample(sorted(np.load(atlas.path / "scanned_units.npy").tolist()), n)
    return [atlas.trigger_at(int(store.offset[u]) + rng.randrange(int(store.n_special[u]), int(store.length[u])))
            for u in units]


def main(atlas_dir: str, packet: str, seed: str = "20261202", name: str = "hand_labels_test.json",
         controls: str = "", decoys: str = "0") -> None:
    n_controls = int(controls.split(":")[1]) if controls.startswith("table:") else 25
    with_controls = controls in ("controls", "table") or controls.startswith("table:")
    rule = rule_with_table(n_controls) if controls.startswith("table") else RULE_WITH_CONTROLS if with_controls \
        else RULE
    atlas = Atlas.load(atlas_dir)
    rng = random.Random(int(seed))
    earlier = {(k["layer"], k["key"], k["face"]) for f in Path(__file__).parent.glob("hand_labels*.json")
               if f.name != name for k in json.loads(f.read_text())["keys"]}
    odd = [layer for layer in atlas.layers if layer % 2 == 1]
    picks = [(layer, face) for layer in odd for face in ("pos", "neg") for _ in range(KEYS_PER_LAYER_FACE)]
    picks += [(rng.choice(odd), rng.choice(["pos", "neg"])) for _ in range(EXTRA)]
    chosen: set[tuple[int, int, str]] = set()
    entries = []

    def item(triggers) -> dict:
        """An item's trigger texts and, with controls, its control texts."""
        out = {"triggers": [_entry_text(atlas, t) for t in triggers]}
        if with_controls:
            out["controls"] = [_entry_text(atlas, t) for t in control_prefixes(atlas, triggers, rng, n_controls)]
        return out

    for layer, face in picks:
        while True:
            key = rng.randrange(atlas.d_ff)
            triggers = atlas.triggers(layer, key, face, N_TRIGGERS)
            if (layer, key, face) not in chosen | earlier and len(triggers) == N_TRIGGERS:
                break
        chosen.add((layer, key, face))
        entries.append(dict(layer=layer, key=key, face=face, **item(triggers)))
    for _ in range(int(decoys)):  # random trigger sets among the keys: how often a rater finds a pattern in chance
        entries.append(dict(layer=None, key=None, face=None, decoy=True, **item(random_prefixes(atlas, rng))))
    rng.shuffle(entries)
    for item, entry in enumerate(entries, 1):
        entry["item"] = item
    doc = {"description": "Blind test set of the explain validation: 64 keys of odd layers, both faces, "
                          + (f"and {decoys} decoys (25 random prefixes of distinct units, marked \"decoy\" here, "
                             "not in the packet), " if int(decoys) else "") + "shuffled; "
                          "labelled by independent raters who saw only the trigger texts (no layer, key or face) "
                          "and the rule" + (f", beside {n_controls} control prefixes of the same lengths per key."
                                            if with_controls else "."), "rule": rule,
           "atlas": {"model": atlas.manifest["model"]["name"], "corpus": atlas.manifest["scan"]["corpus"],
                     "unit": atlas.manifest["scan"]["unit"], "max_tokens": atlas.manifest["scan"]["max_tokens"],
                     "seed": atlas.manifest["scan"]["seed"], "max_length": atlas.manifest["scan"]["max_length"]},
           "keys": entries}
    if n_controls != 25:
        # the raters read the texts from the packet's JSON twin; the label file keeps where each control is
        Path(packet).with_suffix(".json").write_text(json.dumps(
            [{"item": e["item"], "A": [_twin(t) for t in e["triggers"]], "B": [_twin(t) for t in e["controls"]]}
             for e in entries], indent=0, ensure_ascii=False))
        for entry in entries:
            entry["controls"] = [{"unit": t["unit"], "length": len(t["input_ids"])} for t in entry["controls"]]
    Path(__file__).with_name(name).write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    lines = []
    for entry in entries:
        lines.append(f"## Item {entry['item']}\n")
        if with_controls:
            lines.append("List A (triggers):\n")
        lines += [_packet_line(t) for t in entry["triggers"]]
        if with_controls:
            lines.append("\nList B (controls):\n")
            lines += [_packet_line(t) for t in entry["controls"]] if n_controls == 25 else [
                f"({n_controls} prefixes: see the JSON twin of this packet, item {entry['item']}, list \"B\")"]
        lines.append("")
    Path(packet).write_text("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
