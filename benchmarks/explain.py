"""How fast and how good are the explanations of `ffkv explain`?

    python benchmarks/explain.py ATLAS                 # per-layer score table of ATLAS/explanations.parquet, and
                                                       # memory faces explained and scored per CPU-minute
    python benchmarks/explain.py ATLAS --labels FILE   # agreement with hand labels (kappa, bootstrap 95 % CI);
                                                       # several files: each, then all their keys pooled;
                                                       # --cluster-levels / --seed: the same with other settings
    python benchmarks/explain.py ATLAS --raters FILE   # agreement among the raters of a blind label file

Speed comes from the timings the parquet records (``ffkv explain`` / ``ffkv run`` measure every stage) and the CPU
count, so it reads as faces per CPU-minute. The score table sits beside Neuron-to-Graph's published firing F1 of a
6-layer model on relative depth (N2G: 0.74, 0.64, 0.60, 0.48, 0.46, 0.42 for its layers 1..6).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
    keys = [k for _, ks in docs for k in ks]
    predicted = label_agreement(atlas, keys, ExplainConfig(seed=seed), cluster_levels or CLUSTER_LEVELS)["predicted"]
    n_layers = Atlas.load(atlas).n_layers
    start, per_file = 0, []
    for name, ks in docs:
        per_file.append(report(name, ks, predicted[start: start + len(ks)], n_layers, kappas, seed))
        start += len(ks)
    if len(docs) > 1:
        report("pooled " + " + ".join(name for name, _ in docs), keys, predicted, n_layers, kappas, seed)
        print(f"mean 4-class kappa over the {len(docs)} files: {np.mean(per_file):+.3f}")


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

    keys = json.loads(path.read_text())["keys"]
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
    ap.add_argument("--seed", type=int, default=0, help="explainer seed for --labels (word clusters, null samples)")
    args = ap.parse_args()
    if args.raters:
        raters(args.raters)
    if args.atlas and args.labels:
        levels = tuple(int(x) for x in args.cluster_levels.split(",")) if args.cluster_levels else None
        labels(args.atlas, args.labels, levels, args.seed)
    elif args.atlas:
        scores(args.atlas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
