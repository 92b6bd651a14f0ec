"""How fast and how good are the explanations of `ffkv explain`?

    python benchmarks/explain.py ATLAS                 # per-layer score table of ATLAS/explanations.parquet, and
                                                       # memory faces explained and scored per CPU-minute
    python benchmarks/explain.py ATLAS --labels FILE   # agreement with hand labels (kappa, bootstrap 95 % CI);
                                                       # several files: each, then all their keys pooled;
                                                       # --cluster-levels / --seed: the same with other settings
    python benchmarks/explain.py ATLAS --raters FILE   # agreement among the raters of a blind label file
    python benchmarks/explain.py ATLAS --labels FILES --control-noise DRAWS [--n-controls N]
                                                       # the raters' rule applied to the explainer's own features,
                                                       # against the packet's 25 controls and fresh draws of N
    python benchmarks/explain.py ATLAS --random-sets N # the explainer on N random trigger sets (false positives)

Speed comes from the timings the parquet records (``ffkv explain`` / ``ffkv run`` measure every stage) and the CPU
count, so it reads as faces per CPU-minute. The score table sits beside Neuron-to-Graph's published firing F1 of a
6-layer model on relative depth (N2G: 0.74, 0.64, 0.60, 0.48, 0.46, 0.42 for its layers 1..6).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

N2G_F1 = [0.74, 0.64, 0.60, 0.48, 0.46, 0.42]


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def n2g_at(depth: float) -> float:
    """N2G's F1 at relative depth (layer + 1) / n_layers, interpolated between its six layers."""
    return float(np.interp(depth, [(i + 1) / 6 for i in range(6)], N2G_F1))


def scores(atlas: Path) -> None:
    table = pq.read_table(atlas / "explanations.parquet")
    meta = table.schema.metadata or {}
    timings = json.loads(meta.get(b"timings", b"{}"))
    rows = table.to_pylist()
    n_layers = json.loads((atlas / "manifest.json").read_text())["model"]["n_layers"]
    seconds = sum(v for k, v in timings.items() if k in ("features", "patterns", "scoring"))
    cpus = os.cpu_count() or 1
    print(f"{len(rows)} memory faces explained and scored in {seconds:.0f} s on {cpus} CPUs "
          f"({timings}) -> {len(rows) / max(seconds * cpus / 60, 1e-9):.0f} faces per CPU-minute")
    if "sim_corr" not in rows[0]:
        print("(not scored: run ffkv explain without --no-score)")
        return
    print(f"{'layer':>5} {'depth':>5} {'kinds sh/se/both/none':>22} {'corr':>6} {'shuf':>6} {'lookup':>6} "
          f"{'F1':>6} {'shuf':>6} {'lookup':>6} {'fired':>6} {'N2G F1':>7}")
    for layer in sorted({r["layer"] for r in rows}):
        rs = [r for r in rows if r["layer"] == layer]
        fired = [r for r in rs if (r["heldout_fires"] or 0) > 0]
        kinds = "/".join(f"{sum(r['kind'] == k for r in rs) / len(rs):.2f}" for k in ("shallow", "semantic", "both",
                                                                                          "none"))
        depth = (layer + 1) / n_layers
        print(f"{layer:>5} {depth:>5.2f} {kinds:>22} {_mean(r['sim_corr'] for r in rs):>6.3f} "
              f"{_mean(r['shuffled_sim_corr'] for r in rs):>6.3f} {_mean(r['lookup_sim_corr'] for r in rs):>6.3f} "
              f"{_mean(r['f1'] for r in fired):>6.3f} {_mean(r['shuffled_f1'] for r in fired):>6.3f} "
              f"{_mean(r['lookup_f1'] for r in fired):>6.3f} {len(fired):>6} {n2g_at(depth):>7.2f}")
    fired = [r for r in rows if (r["heldout_fires"] or 0) > 0]
    layers = sorted({r["layer"] for r in rows})

    def layer_mean(name, layer):
        return _mean(r[name] for r in (fired if name.endswith("f1") else rows) if r["layer"] == layer)

    above = {name: sum(layer_mean(name, layer) > layer_mean("lookup_" + name, layer) for layer in layers)
             for name in ("sim_corr", "f1")}
    print(f"layers where the explanation beats the last-token lookup: correlation {above['sim_corr']} of "
          f"{len(layers)}, F1 {above['f1']} of {len(layers)}")

    def m(name, rs):
        return _mean(r[name] for r in rs)

    print(f"all: corr {m('sim_corr', rows):.3f} (shuffled {m('shuffled_sim_corr', rows):.3f}, lookup "
          f"{m('lookup_sim_corr', rows):.3f}); F1 {m('f1', fired):.3f} (shuffled {m('shuffled_f1', fired):.3f}, "
          f"lookup {m('lookup_f1', fired):.3f}) over {len(fired)} faces that fired on held-out text; "
          f"faces with corr >= 0.8: {sum((r['sim_corr'] or 0) >= 0.8 for r in rows)}")


def labels(atlas: Path, paths: list[Path], cluster_levels: tuple[int, ...] | None = None, seed: int = 0) -> None:
    """The explainer (run once over every file's keys) against each file's labels, then, for several files, their
    keys pooled and the mean of the files' 4-class kappas."""
    from ffkv.analysis.explain import ExplainConfig, kappas, label_agreement
    from ffkv.analysis.features import CLUSTER_LEVELS
    from ffkv.atlas import Atlas

    docs = [(path.name, json.loads(path.read_text())["keys"]) for path in paths]
    every = [k for _, ks in docs for k in ks]
    predicted = label_agreement(atlas, every, ExplainConfig(seed=seed), cluster_levels or CLUSTER_LEVELS)["predicted"]
    n_layers = Atlas.load(atlas).n_layers
    per_file, start = [], 0
    for name, ks in docs:
        real = [i for i in range(start, start + len(ks)) if not every[i].get("decoy")]
        per_file.append(report(name, [every[i] for i in real], [predicted[i] for i in real], n_layers, kappas, seed))
        start += len(ks)
    real = [i for i, k in enumerate(every) if not k.get("decoy")]
    if len(docs) > 1:
        report("pooled " + " + ".join(name for name, _ in docs), [every[i] for i in real],
               [predicted[i] for i in real], n_layers, kappas, seed)
        print(f"mean 4-class kappa over the {len(docs)} files: {np.mean(per_file):+.3f}")
    decoys = [i for i, k in enumerate(every) if k.get("decoy")]
    if decoys:
        kinds = ("shallow", "semantic", "both", "none")

        def shares(labels):
            return ", ".join(f"{kind} {labels.count(kind)}" for kind in kinds) + (
                f" (a semantic pattern in {sum(x in ('semantic', 'both') for x in labels)} of {len(labels)})")

        print(f"decoys (25 random prefixes of distinct units, not a key's triggers): n = {len(decoys)}")
        print("  raters' majority: " + shares([every[i]["label"] for i in decoys]))
        for r in range(len(every[decoys[0]]["raters"])):
            print(f"  rater {r + 1}:         " + shares([every[i]["raters"][r]["label"] for i in decoys]))
        print("  explainer:        " + shares([predicted[i] for i in decoys]))


def parse_count_table(rule: str) -> dict[int, int] | None:
    """The count table a label file's rule gives ("B 0 -> A at least 4; ..."), or None (sets 3-4: "A at least
    three times B and at least B + 3")."""
    table = {}
    for lo, hi, a in re.findall(r"B (\d+)(?:-(\d+))? -> A at least (\d+)", rule):  # "B 3", or a range "B 5-10"
        table.update({b: int(a) for b in range(int(lo), int(hi or lo) + 1)})
    return table or None


def passes(a: int, b: int, table: dict[int, int] | None) -> bool:
    """Condition (1) and (2) of the raters' rule: a of the triggers' units, b of the controls'."""
    if a < 3:
        return False
    if table is None:
        return a >= 3 * b and a >= b + 3
    return b in table and a >= table[b]


def rule_kinds(e, feats, n_codes: int, trig: np.ndarray, ctrl: np.ndarray, tables: list) -> list[str]:
    """The raters' rule applied to the explainer's features: per key, every candidate value of every kind that >= 3
    trigger units share (>= 3 different words for a category or word class) is counted among the triggers' and the
    controls' units and kept where the table lets it pass; the subject kind counts the explainer's group and the
    controls whose subject is as close to its centroid. ``trig`` / ``ctrl``: [keys, 25] feature rows (-1: none);
    ``tables``: each key's count table (None: sets 3-4's "three times and plus 3")."""
    from ffkv.analysis.features import CLASSES
    from ffkv.analysis.patterns import KINDS, face_kind

    def values(kind, row):
        if kind == "last":
            return {int(feats.code[row])}
        if kind == "bigram":
            return {int(feats.prev[row]) * n_codes + int(feats.code[row])} if feats.prev[row] >= 0 else set()
        if kind == "near":
            return {int(v) for v in (feats.prev[row], feats.prev2[row]) if v >= 0}
        if kind in CLASSES:
            return {0} if feats.classes[row, CLASSES.index(kind)] else set()
        column = {"wordclass": feats.word_class, "topic": feats.topic, "article": feats.title}.get(kind)
        if column is not None:
            return {int(column[row])} if column[row] >= 0 else set()
        return {int(v) for v in feats.word_cluster[row] if v >= 0}  # category

    K = trig.shape[0]
    sig = {kind: np.zeros(K, bool) for kind in KINDS}
    for i, table in enumerate(tables):
        t_rows, c_rows = trig[i][trig[i] >= 0], ctrl[i][ctrl[i] >= 0]
        for kind in KINDS:
            if kind == "subject":
                c = e.centroid["subject"][i]
                near_c = feats.subject_vec[c_rows] @ c >= e.radius["subject"][i]
                b = len(set(feats.unit[c_rows[near_c & feats.has_subject[c_rows]]].tolist()))
                sig[kind][i] = passes(int(e.support["subject"][i]), b, table)
                continue
            units, names, b_units = {}, {}, {}
            for row in t_rows.tolist():
                for v in values(kind, row):
                    units.setdefault(v, set()).add(int(feats.unit[row]))
                    names.setdefault(v, set()).add(int(feats.stem_id[row]))
            for row in c_rows.tolist():
                for v in values(kind, row):
                    b_units.setdefault(v, set()).add(int(feats.unit[row]))
            named = kind in ("category", "wordclass")
            sig[kind][i] = any(passes(len(u), len(b_units.get(v, ())), table) and (not named or len(names[v]) >= 3)
                               for v, u in units.items())
    return [face_kind(sig, i) for i in range(K)]


def control_noise(atlas: Path, paths: list[Path], draws: int, seed: int = 0, n_controls: int | None = None,
                  cluster_levels: tuple[int, ...] | None = None) -> None:
    """How much of the gap between the explainer and the raters is the rule's single draw of 25 controls, which
    the three raters of a set share: the rule applied to the explainer's own features against the packet's
    controls, and against ``draws`` fresh draws of controls (random scanned positions at the triggers' offsets, as
    the packets drew them). With ``n_controls`` other than the files' the fresh draws hold that many controls,
    judged by the table for that many (``count_table``): how far a larger control list would steady the rule."""
    from ffkv.analysis.explain import ExplainConfig, count_table, explain_labelled, kappas, labelled_positions
    from ffkv.analysis.features import CLUSTER_LEVELS, Vocabulary
    from ffkv.analysis.patterns import face_kind
    from ffkv.atlas import Atlas

    docs = [json.loads(path.read_text()) for path in paths]
    for doc in docs:
        doc["keys"] = [k for k in doc["keys"] if not k.get("decoy")]
    if not all("controls" in k for doc in docs for k in doc["keys"]):
        raise SystemExit("--control-noise needs label files with control prefixes (sets 3 on)")
    keys = [k for doc in docs for k in doc["keys"]]
    tables = [parse_count_table(doc["rule"]) for doc in docs for _ in doc["keys"]]
    in_files = {len(k["controls"]) for k in keys}
    if len(in_files) > 1 and n_controls is None:
        raise SystemExit("these label files hold different numbers of controls: give --n-controls")
    same_as_files = n_controls is None or in_files == {n_controls}
    n_controls = n_controls or in_files.pop()
    a = Atlas.load(atlas)
    positions = labelled_positions(a, [k["triggers"] for k in keys])
    e, feats, cfg = explain_labelled(a, positions, ExplainConfig(seed=seed), cluster_levels or CLUSTER_LEVELS)
    n_codes = Vocabulary(a.tokenizer).n_codes
    trig = feats.rows(positions)
    packet = feats.rows(labelled_positions(a, [k["controls"] for k in keys]))
    truth = [k["label"] for k in keys]
    explainer = [face_kind(e.significant, i) for i in range(len(keys))]
    on_packet = rule_kinds(e, feats, n_codes, trig, packet, tables)
    fresh_tables = tables if same_as_files else [count_table(n_controls)] * len(keys)
    scanned = np.load(a.path / "scanned_units.npy")
    scanned_rows = np.nonzero(np.isin(feats.unit, scanned))[0]
    by_offset = {o: scanned_rows[feats.offset[scanned_rows] == o] for o in np.unique(feats.offset[trig[trig >= 0]])}
    rng = np.random.default_rng(seed)
    fresh = []
    for _ in range(draws):
        ctrl = np.full((len(keys), n_controls), -1, np.int64)
        for i in range(len(keys)):
            offsets = np.resize(feats.offset[trig[i][trig[i] >= 0]], n_controls)  # the triggers' offsets, cycled
            for j, o in enumerate(offsets.tolist()):
                pool = by_offset[int(o)]
                ctrl[i, j] = pool[rng.integers(len(pool))]
        fresh.append(rule_kinds(e, feats, n_codes, trig, ctrl, fresh_tables))

    def k(x, y):
        return kappas(x, y, seed=seed)["kappa"]

    print(f"{' + '.join(p.name for p in paths)}: n = {len(keys)}; 4-class kappa")
    print(f"  explainer (corpus rates) vs raters:                       {k(truth, explainer):+.3f}")
    print(f"  rule on the explainer's features, the packet's controls:  {k(truth, on_packet):+.3f} vs raters, "
          f"{k(explainer, on_packet):+.3f} vs the explainer")
    vs_truth = [k(truth, f) for f in fresh]
    vs_packet = [k(on_packet, f) for f in fresh]
    label = f"  the same, {draws} fresh draws of {n_controls} controls:".ljust(60)
    print(label + f"{np.mean(vs_truth):+.3f} vs raters ({min(vs_truth):+.3f} .. {max(vs_truth):+.3f}), "
          f"{np.mean(vs_packet):+.3f} vs the packet's draw ({min(vs_packet):+.3f} .. {max(vs_packet):+.3f})")
    pairs = [k(x, y) for x, y in itertools.combinations(fresh, 2)]
    print(f"  two fresh draws against each other:                       {np.mean(pairs):+.3f} "
          f"({min(pairs):+.3f} .. {max(pairs):+.3f})")


def random_sets(atlas: Path, n_sets: int, seed: int = 0) -> None:
    """The explainer on ``n_sets`` random trigger sets (25 random scanned positions of distinct units, tested
    against the same corpus null): each kind's actual false-positive rate beside its level alpha / 13, and the
    share of random sets given each kind of explanation."""
    from ffkv.analysis.explain import ExplainConfig, explain_labelled
    from ffkv.analysis.patterns import KINDS, face_kind
    from ffkv.atlas import Atlas

    a = Atlas.load(atlas)
    pos, unit = a.store.content_positions(np.load(a.path / "scanned_units.npy"))
    rng = np.random.default_rng(seed + 1)  # not the null's own draws
    positions = np.empty((n_sets, 25), np.int64)
    for s in range(n_sets):
        rows = rng.permutation(len(pos))[:200]
        _, first = np.unique(unit[rows], return_index=True)  # one position per unit
        positions[s] = pos[rows[np.sort(first)[:25]]]
    e, _, cfg = explain_labelled(a, positions, ExplainConfig(seed=seed))
    level = cfg.alpha / len(KINDS)
    print(f"{n_sets} random trigger sets of 25 prefixes (distinct units): false-positive rate of each kind at "
          f"alpha / {len(KINDS)} = {level:.4f}")
    print("  " + ", ".join(f"{kind} {np.mean(e.p_value[kind] < level):.4f}" for kind in KINDS))
    kinds = [face_kind(e.significant, i) for i in range(n_sets)]
    print("  kinds given: " + ", ".join(f"{k} {kinds.count(k) / n_sets:.1%}" for k in ("shallow", "semantic", "both",
                                                                                         "none")))


def report(name: str, keys: list[dict], predicted: list[str], n_layers: int, kappas, seed: int) -> float:
    truth = [e["label"] for e in keys]
    r = kappas(truth, predicted, seed=seed)
    print(f"{name}: n = {r['n']}, accuracy {r['accuracy']:.3f}")
    for kappa in ("kappa", "kappa_shallow", "kappa_semantic"):
        lo, hi = r[kappa + "_ci95"]
        print(f"  {kappa:<15} {r[kappa]:+.3f}  (95 % bootstrap CI {lo:+.3f} .. {hi:+.3f})")
    confusion = {}
    for t, p in zip(truth, predicted):
        confusion[t, p] = confusion.get((t, p), 0) + 1
    kinds = ("shallow", "semantic", "both", "none")
    print("  shares, labels:    " + ", ".join(f"{k} {truth.count(k) / len(truth):.0%}" for k in kinds))
    print("  shares, explainer: " + ", ".join(f"{k} {predicted.count(k) / len(truth):.0%}" for k in kinds))
    print("  confusion (label -> explainer):", ", ".join(f"{t}->{p}: {n}" for (t, p), n in sorted(confusion.items())))
    thirds = [[e for e in keys if third * n_layers <= 3 * e["layer"] < (third + 1) * n_layers] for third in range(3)]
    print("  labelled semantic (or both), per third of the layers: " + ", ".join(
        f"{sum(e['label'] in ('semantic', 'both') for e in t)} of {len(t)}" for t in thirds))
    return r["kappa"]


def raters(path: Path) -> None:
    from ffkv.analysis.explain import cohen_kappa

    keys = [k for k in json.loads(path.read_text())["keys"] if not k.get("decoy")]  # decoys: see --labels
    n = len(keys[0]["raters"])
    for name, f in (("4-class", lambda x: x["label"]), ("has_shallow", lambda x: x["has_shallow"]),
                    ("has_semantic", lambda x: x["has_semantic"])):
        pairs = [cohen_kappa([f(k["raters"][i]) for k in keys], [f(k["raters"][j]) for k in keys])
                 for i, j in itertools.combinations(range(n), 2)]
        print(f"{path.name}: rater-pair kappa {name:<12} " + ", ".join(f"{x:.3f}" for x in pairs)
              + f"  (mean {np.mean(pairs):.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas", type=Path, nargs="?")
    ap.add_argument("--labels", type=Path, nargs="+", help="hand-label files (tests/data/hand_labels*.json)")
    ap.add_argument("--raters", type=Path, help="blind label file with per-rater labels")
    ap.add_argument("--cluster-levels", help="word-cluster levels for --labels, e.g. 32,128,512 (default: the "
                    "explainer's)")
    ap.add_argument("--control-noise", type=int, metavar="DRAWS", help="with --labels (sets 3 on): the raters' rule "
                    "applied to the explainer's features against the packet's controls and against DRAWS fresh draws")
    ap.add_argument("--n-controls", type=int, help="with --control-noise: controls per fresh draw, judged by the "
                    "count table for that many (default: as many as the label files hold)")
    ap.add_argument("--random-sets", type=int, metavar="N", help="the explainer on N random trigger sets: each "
                    "kind's false-positive rate and the kinds given")
    ap.add_argument("--seed", type=int, default=0, help="explainer seed for --labels (word clusters, null samples)")
    args = ap.parse_args()
    if args.raters:
        raters(args.raters)
    if args.atlas and args.labels:
        levels = tuple(int(x) for x in args.cluster_levels.split(",")) if args.cluster_levels else None
        if args.control_noise:
            control_noise(args.atlas, args.labels, args.control_noise, args.seed, args.n_controls, levels)
        else:
            labels(args.atlas, args.labels, levels, args.seed)
    elif args.atlas and args.random_sets:
        random_sets(args.atlas, args.random_sets, args.seed)
    elif args.atlas:
        scores(args.atlas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
