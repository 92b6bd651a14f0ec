"""`ffkv report` on synthetic atlases: a manifest and an analysis.json that follow the contract of ffkv.analysis,
full, partial, malformed and absent. No model is needed. (The browser checks are in test_report_browser.py.)"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from ffkv.analysis.intervals import wilson
from ffkv.errors import FfkvError
from ffkv.report import FIGURE_IDS, build_figures, load_inputs, write_report
from ffkv.report.compare import layer_ranges, pct, tokens_text
from ffkv.report.data import load_paper_reference
from ffkv.report.html import TriggerSplitter

VOCAB = 49152


def _ramp(n, a, b):
    return [a + (b - a) * i / max(n - 1, 1) for i in range(n)]


def make_manifest(n_layers=12, signed=True, layers=None, name="default", **scan):
    layers = list(range(n_layers)) if layers is None else layers
    return {
        "format": "ffkv-atlas/1", "ffkv_version": "0.1.0", "created": "2026-11-28T12:00:00+00:00",
        "model": {"name": name, "architecture": "llama" if signed else "opt",
                  "class": "LlamaForCausalLM" if signed else "OPTForCausalLM", "n_layers": n_layers, "d_model": 64,
                  "d_ff": 128, "vocab_size": VOCAB, "activation": "silu" if signed else "relu", "gated": signed,
                  "signed": signed, "weights_fingerprint": "abc", "tokenizer_fingerprint": "def"},
        "corpus": {"corpus": "default", "corpus_hash": "x", "unit": "sentence", "max_length": 256,
                   "n_documents": 10033, "n_units": 51234, "n_tokens": 1050000, "content_hash": "y"},
        "scan": {"model": "default", "corpus": "default", "unit": "sentence", "top_k": 50, "max_tokens": 60000,
                 "layers": layers, "max_length": 256, "batch_tokens": 4096, "max_batch": 64, "device": "cpu",
                 "dtype": "float32", "seed": 0, "value_top": 20, "checkpoint_every": 120.0, "shard": None,
                 "faces": ["pos", "neg"] if signed else ["pos"], "world_size": 1, **scan},
        "result": {"units_scanned": 3000, "tokens_scanned": 60000, "positions_total": 60000, "batches": 20,
                   "seconds": 260.5, "tokens_per_second": 230.3},
    }


def _keys(n_layers, face):
    out = []
    for layer in range(n_layers):
        for j, key in enumerate((3 + layer, 40 + layer)):
            trig = [f"The film was shot in{' the' * (r % 3)} city of[[ Paris]]" for r in range(20)]
            trig[1] = "A <b>bold</b> & risky [[<script>]]"
            out.append({"layer": layer, "key": key, "face": face, "label": "both",
                        "description": f"ends with ' Paris' <i>(layer {layer} key {key})</i>; topic: geography",
                        "sim_corr": round(0.2 + 0.05 * layer - 0.1 * j, 4), "f1": round(0.3 + 0.02 * layer, 4),
                        "patterns": [{"kind": "shallow", "description": "ends with ' Paris'", "triggers": [0, 2, 3, 4],
                                      "p_value": 1e-6},
                                     {"kind": "semantic", "description": "topic: geography", "triggers": [5, 6, 7],
                                      "p_value": 2e-3}],
                        "triggers": trig})
    return out


def make_analysis(n_layers=12, signed=True, reproduce=True):
    """A full analysis.json whose numbers follow the paper's trends (or the opposite ones, reproduce=False)."""
    L = n_layers
    up = (lambda a, b: _ramp(L, a, b)) if reproduce else (lambda a, b: _ramp(L, b, a))

    def values(scale=1.0):
        return {
            "agreement_rate": [v * scale for v in up(0.0005, 0.04)],
            "agreement_rate_normed": [v * scale for v in up(0.0006, 0.05)],
            "random_baseline": [1 / VOCAB] * L,
            "frequency_baseline": [0.003] * L,
            "next_token_rank_median": up(15000, 600),
            "rank_quantiles": {"q10": up(2000, 5), "q25": up(6000, 60), "q50": up(15000, 600),
                               "q75": up(26000, 5000), "q90": up(40000, 20000)},
            "max_prob_vs_agreement": {"bin_edges": [0.0001, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0],
                                      "agreement": [0.0, 0.01, 0.05, 0.2, 0.5, 0.8] if reproduce else
                                      [0.6, 0.4, 0.3, 0.1, 0.05, 0.0], "count": [500, 400, 200, 80, 20, 0]},
            "top_memories": [{"layer": L - 1 - i % 3, "key": 7 * i, "face": "pos", "precision": 0.9 - 0.05 * i,
                              "top_tokens": [" the", " city", "\n", "<eos>"],
                              "triggers": ["He moved to the[[ city]]", "It is[[ a]]"]} for i in range(12)],
            "skipped": [3] * L,
            **values_intervals_and_suppression(L, up, scale, reproduce),
        }

    a = {
        "ffkv_version": "0.1.0", "created": "2026-11-28T13:00:00+00:00", "atlas": {}, "config": {"seed": 0},
        "definitions": {"active": "|m| > 0.1 × the layer's max |m| (ReLU: m > 0).",
                        "agreement": "argmax of v·E equals the next token of the key's top-1 trigger."},
        "n_layers": L, "layers": list(range(L)),
        "patterns": make_patterns(L, up, reproduce),
        "token_removal": {"first": [-0.1] * L, "last": up(-0.7, -0.2), "random": [-0.15] * L, "n_keys": [10] * L,
                          "skipped": [1] * L, "last_median": up(-0.6, -0.15), "last_n": [240] * L,
                          "last_ci": [[v - 0.05, v + 0.05] for v in up(-0.7, -0.2)],
                          "last_sign_change": up(0.2, 0.05), "last_sign_change_ci": [[0.0, 0.3]] * L},
        "values": values(),
        "aggregation": {"n_examples": 4000, "active_fraction_mean": [0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12, 0.14,
                                                                     0.16, 0.18, 0.2, 0.2][:L] + [0.2] * max(0, L - 12),
                        "active_fraction_positive_mean": [0.5] * L,
                        "no_single_memory_match": [0.8] * L, "match_is_stopword": [0.55] * L,
                        "match_prefix_short": [0.4] * L, "residual_matches_final": up(0.2, 0.95),
                        "residual_prob_of_final": up(0.0, 0.75),
                        "ffn_effect": {"residual": [0.7] * L, "ffn": [0.05] * L, "agreement": up(0.1, 0.15),
                                       "composition": up(0.15, 0.1)}},
        "missing": {},
    }
    add_aggregation_sweep(a["aggregation"], L, signed, up)
    a["causal"] = make_causal(L, reproduce)
    add_aggregation_intervals(a["aggregation"], L)
    if signed:
        a["causal_neg"] = make_causal(L, reproduce)
        a["patterns_neg"] = dict(copy.deepcopy(a["patterns"]), keys=_keys(L, "neg"))
        a["token_removal_neg"] = copy.deepcopy(a["token_removal"])
        a["values_neg"] = values(0.5)
        for m in a["values_neg"]["top_memories"]:
            m["face"] = "neg"
    return a


def values_intervals_and_suppression(L, up, scale=1.0, reproduce=True):
    """The values keys added with intervals, suppression, normalised ranks and Fig 6's summary (absent from older
    files), for 1,536 memories with a target per layer."""
    n = 1536
    shares = {"agreement_rate": [v * scale for v in up(0.0005, 0.04)], "frequency_baseline": [0.003] * L,
              "suppression_rate": [v * scale for v in up(0.0004, 0.02)],
              "suppression_bottom10_rate": [v * scale for v in up(0.002, 0.06)],
              "suppression_frequency_baseline": [0.002] * L}
    median = [v / VOCAB for v in up(15000, 600)]
    out = {k: v for k, v in shares.items() if k.startswith("suppression")}
    out.update({f"{k}_ci": [wilson(round(v * n), n) for v in vals] for k, vals in shares.items()})
    out.update(n_targets=[n] * L, vocab_size=VOCAB, next_token_rank_median_normed=median,
               next_token_rank_median_normed_ci=[[v * 0.8, v * 1.2] for v in median],
               rank_quantiles_normed={q: [v / VOCAB for v in vals] for q, vals in
                                      {"q10": up(2000, 5), "q25": up(6000, 60), "q50": up(15000, 600),
                                       "q75": up(26000, 5000), "q90": up(40000, 20000)}.items()},
               top_max_prob={"n": 100, "upper_depth": 10 / 16, "k": 50, "upper": 95 if reproduce else 20,
                             "agree": 30, "agree_any": 44 if reproduce else 5,
                             **{f"{k}_ci": wilson(c, 100) for k, c in (("upper", 95 if reproduce else 20),
                                                                      ("agree", 30),
                                                                      ("agree_any", 44 if reproduce else 5))}})
    return out


def make_causal(L, reproduce=True):
    """The causal block as `ffkv.analysis.causal.causal_block` writes it: agreeing memories switched off lower
    log p of their trigger's next token, suppressing ones raise it, their controls barely move it
    (reproduce=False: no different from their controls)."""
    block, pooled = {}, {}
    for role, size in (("agree", -0.4), ("suppress", 0.25)):
        delta = _ramp(L, size / 4, size) if reproduce else [0.0] * L
        rows = {f"n_{role}": [8] * L, f"n_{role}_candidates": [20] * L, f"{role}_delta": delta,
                f"{role}_delta_ci": [[d - 0.05, d + 0.05] for d in delta], f"{role}_control_delta": [-0.01] * L,
                f"{role}_control_delta_ci": [[-0.04, 0.02]] * L,
                f"{role}_exceeds_control": [0.9 if reproduce else 0.5] * L,
                f"{role}_exceeds_control_ci": [[0.6, 0.98] if reproduce else [0.2, 0.8]] * L}
        block.update(rows)
        mean = sum(delta) / L
        if role == "agree":  # a layer without agreeing memories: nulls, n = 0
            block.update({k: [0 if k.startswith("n_") else None] + v[1:] for k, v in rows.items()})
        pooled.update({f"n_{role}": 8 * L, f"{role}_delta": mean, f"{role}_delta_ci": [mean - 0.02, mean + 0.02],
                       f"{role}_control_delta": -0.01, f"{role}_control_delta_ci": [-0.02, 0.0],
                       f"{role}_exceeds_control": 0.9 if reproduce else 0.5,
                       f"{role}_exceeds_control_ci": [0.85, 0.94] if reproduce else [0.43, 0.57]})
    block.update(all_layers=pooled, memories_per_layer=8, memories=[])
    return block


PATTERN_NEW_KEYS = ("keys_shallow", "keys_semantic", "keys_both", "keys_none", "n_keys", "sim_corr", "f1", "precision",
                    "recall", "shuffled_sim_corr", "shuffled_f1", "lookup_sim_corr", "lookup_f1", "scored_keys",
                    "definition")
"""Keys of the patterns block that `ffkv explain` added (absent from older files)."""


def make_patterns(L, up, reproduce=True):
    """The patterns block as `ffkv.analysis.explain.patterns_block` writes it: shallow ... none are shares of
    trigger examples, keys_* shares of keys, and the held-out scores of the explanations and their baselines
    (reproduce=False: explanations no better than the last-token lookup, well below Neuron-to-Graph)."""
    f1 = _ramp(L, 0.7, 0.45) if reproduce else [0.12] * L
    return {"shallow": up(0.6, 0.1), "semantic": up(0.1, 0.6), "both": [0.1] * L, "none": [0.2] * L,
            "keys_shallow": up(0.5, 0.1), "keys_semantic": up(0.1, 0.5), "keys_both": [0.3] * L,
            "keys_none": [0.1] * L, "patterns_per_key": [2.5] * L, "coverage": [0.8] * L, "n_keys": [128] * L,
            "sim_corr": _ramp(L, 0.5, 0.3) if reproduce else [0.1] * L, "f1": f1,
            "precision": [v + 0.05 for v in f1], "recall": [v - 0.05 for v in f1],
            "shuffled_sim_corr": [0.02] * L, "shuffled_f1": [0.03] * L,
            "lookup_sim_corr": _ramp(L, 0.3, 0.1) if reproduce else [0.2] * L,
            "lookup_f1": _ramp(L, 0.4, 0.2) if reproduce else [0.2] * L, "scored_keys": [100] * L,
            "definition": "shares of the top-25 trigger examples ...", "keys": _keys(L, "pos")}


def old_patterns(a: dict) -> dict:
    """An analysis.json whose patterns blocks were written before `ffkv explain`: shares of keys, no keys_*, no
    scores, keys without a description."""
    for name in ("patterns", "patterns_neg"):
        if name in a:
            for k in PATTERN_NEW_KEYS:
                a[name].pop(k, None)
            for key in a[name]["keys"]:
                for k in ("label", "description", "sim_corr", "f1"):
                    key.pop(k, None)
    return a


SWEEP_RULES = ("m>0", "tau=0.05", "tau=0.1", "tau=0.25", "tau=0.5")
AGGREGATION_NEW_KEYS = ("active_fraction_quantiles", "residual_prob_of_final_quantiles", "active_rule", "sweep")


def add_aggregation_sweep(agg: dict, L: int, signed: bool, up) -> None:
    """The aggregation keys of the active-rule sweep and the per-layer quartiles (absent from older files): the
    headline rule's entry holds the headline numbers, a higher threshold fewer active memories and more
    prefixes with no single matching memory."""

    def quartiles(values):
        return {"q25": [v * 0.8 for v in values], "q50": [v * 0.95 for v in values], "q75": [v * 1.2 for v in values]}

    head = "tau=0.1" if signed else "m>0"
    agg.update(active_threshold=0.1 if signed else 0.0, active_rule=head,
               active_fraction_quantiles=quartiles(agg["active_fraction_mean"]),
               residual_prob_of_final_quantiles={"q25": up(0.0, 0.4), "q50": up(0.0, 0.7), "q75": up(0.02, 0.9)})
    agg["sweep"] = {}
    for i, rule in enumerate(SWEEP_RULES):
        shift = i - SWEEP_RULES.index(head)
        mean = agg["active_fraction_mean"]
        active = [0.5] * L if rule == "m>0" and signed else [v * (1 - 0.15 * shift) for v in mean]
        agg["sweep"][rule] = {"active_fraction_mean": active, "active_fraction_quantiles": quartiles(active),
                              "no_single_memory_match": [v + 0.05 * shift for v in agg["no_single_memory_match"]],
                              "match_is_stopword": [v - 0.02 * shift for v in agg["match_is_stopword"]],
                              "match_prefix_short": [v - 0.02 * shift for v in agg["match_prefix_short"]],
                              "n_matches": [1000 - 50 * shift] * L}
        if rule == head:
            agg["sweep"][rule].update({k: agg[k] for k in ("active_fraction_mean", "active_fraction_quantiles",
                                                           "no_single_memory_match", "match_is_stopword",
                                                           "match_prefix_short")})


def _around(values, half=0.03):
    return [[max(0.0, v - half), min(1.0, v + half)] for v in values]


def add_aggregation_intervals(agg: dict, L: int) -> None:
    """The 95 % intervals (X_ci) and §5.2's semantic-change keys of the aggregation block (absent from older
    files): the last layer's distant share 70% (paper: 66 of 100)."""
    for key in ("no_single_memory_match", "match_is_stopword", "match_prefix_short", "residual_matches_final",
                "residual_prob_of_final", "active_fraction_mean"):
        agg[key + "_ci"] = _around(agg[key])
    for key in ("active_fraction_quantiles", "residual_prob_of_final_quantiles"):
        agg[key]["q50_ci"] = _around(agg[key]["q50"], 0.01)
    for kind in list(agg["ffn_effect"]):
        agg["ffn_effect"][kind + "_ci"] = _around(agg["ffn_effect"][kind])
    for entry in agg["sweep"].values():
        entry["no_single_memory_match_ci"] = _around(entry["no_single_memory_match"])
    agg.update(ffn_change_n=[300] * L, ffn_change_distant=[0.8] * (L - 1) + [0.7],
               ffn_change_shuffled_distant=[0.9] * L, ffn_change_cosine_mean=[0.25] * L,
               ffn_change_cosine_mean_ci=_around([0.25] * L, 0.01), random_pairs=1000, random_pair_cosine_mean=0.21,
               random_pair_cosine_mean_ci=[0.2, 0.22], random_pair_cosine_q95=0.33)
    agg.update(ffn_change_content_n=[100] * L, ffn_change_content_distant=[0.75] * L,
               ffn_change_content_distant_ci=_around([0.75] * L, 0.08))
    agg["ffn_change_distant_ci"] = _around(agg["ffn_change_distant"], 0.05)
    agg["ffn_change_shuffled_distant_ci"] = _around(agg["ffn_change_shuffled_distant"], 0.05)


def make_atlas(root: Path, analysis="full", n_layers=12, signed=True, **manifest_kw) -> Path:
    """An atlas directory with a manifest and (unless analysis is None) an analysis.json:
    'full', 'partial', 'broken', a dict, or None."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(make_manifest(n_layers, signed, **manifest_kw)))
    if analysis is None:
        return root
    if analysis == "full":
        a = make_analysis(n_layers, signed)
    elif analysis == "partial":
        a = make_partial(n_layers, signed)
    elif analysis == "broken":
        a = make_analysis(n_layers, signed)
        a["values"]["max_prob_vs_agreement"] = {"bin_edges": [0, 1], "agreement": [0.1, 0.2, 0.3]}
        a["token_removal"]["last"] = ["x"] * n_layers
        a["token_removal"]["first"] = "not a list"
        a["patterns"]["keys"] = [{"layer": 0, "triggers": [None, 3, {"text": "abc"}]}, "junk"]
        a["aggregation"]["ffn_effect"] = [1, 2]
        a["values"]["rank_quantiles"] = None
    else:
        a = analysis
    (root / "analysis.json").write_text(json.dumps(a))
    return root


def make_partial(n_layers=12, signed=True):
    """Missing blocks (token_removal, values_neg), null layers, a missing sub-block (ffn_effect), no keys."""
    a = make_analysis(n_layers, signed)
    del a["token_removal"], a["token_removal_neg"]
    a.pop("values_neg", None)
    for i in (2, 3, 7):
        a["values"]["agreement_rate"][i] = None
    del a["aggregation"]["ffn_effect"]
    del a["patterns"]["keys"]
    a.get("patterns_neg", {}).pop("keys", None)
    a["missing"] = {"token_removal": "not run (use --only to add it)"}
    return a


def specs(html_text: str) -> dict[str, dict]:
    return {m.group(1): json.loads(m.group(2).replace("<\\/", "</")) for m in re.finditer(
        r'<script type="application/json" class="figure-spec" data-figure="(\w+)">(.*?)</script>', html_text, re.S)}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    atlas = make_atlas(tmp_path_factory.mktemp("full") / "atlas")
    path = write_report(atlas)
    return path, path.read_text(encoding="utf-8")


def test_full_report_is_self_contained_and_complete(full_report):
    path, text = full_report
    assert path.name == "report.html" and path.parent.name == "atlas"
    assert path.stat().st_size < 10 * 2**20
    assert text.count("plotly.js v") == 1, "plotly.js must be inlined exactly once"
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)\s*=\s*["\']?(https?:)?//', text, re.I)
    assert "<link" not in text
    got = specs(text)
    assert sorted(got) == sorted(FIGURE_IDS)
    assert text.count('data-state="drawn"') == len(FIGURE_IDS) and 'data-state="missing"' not in text
    for fid, spec in got.items():
        ours = [t for t in spec["data"] if t["meta"]["role"] == "ours"]
        assert ours and all(any(v is not None for v in t["y"]) for t in ours), fid
    # header facts and the reproduce command
    for s in ("SmolLM2-135M-Instruct", "llama", "silu, gated", "60,000", "230 tokens/s", "top-k triggers",
              "ffkv scan --max-tokens 60000 --out", "ffkv analyze", "ffkv report", "Definitions", "Table 1",
              "Table 2", "instruct-tuned"):
        assert s in text, s
    # the analysis's own definitions are shown
    assert "0.1 × the layer" in text


def test_specs_are_valid_plotly(full_report):
    go = pytest.importorskip("plotly.graph_objects")
    for fid, spec in specs(full_report[1]).items():
        go.Figure(data=spec["data"], layout=spec["layout"])  # raises on an invalid property
        assert spec["layout"]["xaxis"]["title"]["text"] and spec["layout"]["yaxis"]["title"]["text"], fid


def test_paper_beside_ours_dashed_when_approx(full_report):
    paper = load_paper_reference()
    got = specs(full_report[1])
    approx_arrays = {(k, name): v for k, block in paper.items() if isinstance(block, dict)
                     for name, v in block.items() if name.endswith("approx") and isinstance(v, list)}
    drawn = [t for s in got.values() for t in s["data"] if t["meta"]["role"] == "paper"]
    assert drawn
    for t in drawn:
        if t["meta"]["approx"]:
            assert t["line"]["dash"] == "dash" and t["name"].startswith("paper (approx.)"), t["name"]
            n = len(t["x"])
            assert t["x"] == pytest.approx([(i + 1) / n for i in range(n)], abs=1e-5)  # paper on its relative depth
        else:
            assert t["line"].get("dash") != "dash" if "line" in t else True
            assert t["name"].startswith("paper:")
    ys = [t["y"] for t in drawn if t["meta"]["approx"]]
    vocab = paper["model"]["vocab_approx"]
    for key, arr in approx_arrays.items():
        if key == ("fig5_next_token_rank", "median_approx"):  # Fig 5 draws ranks as a share of the vocabulary
            arr = [v / vocab for v in arr]
        assert any(y == pytest.approx(arr, rel=1e-5) for y in ys), f"paper array {key} is not drawn"  # 6 digits
    # ours is plotted on our relative depth
    fig4 = got["fig4"]["data"][0]
    assert fig4["meta"]["role"] == "ours" and fig4["x"] == pytest.approx([(i + 1) / 12 for i in range(12)], abs=1e-5)


def test_signed_model_has_both_faces(full_report, tmp_path):
    got = specs(full_report[1])
    for fid in ("fig2", "explain", "fig3", "fig4", "fig5", "fig6"):
        faces = {t["meta"]["face"] for t in got[fid]["data"] if t["meta"]["role"] == "ours"}
        assert faces == {"pos", "neg"}, fid
        assert "xaxis2" in got[fid]["layout"]
    assert 'class="face face-neg"' in full_report[1]
    relu = write_report(make_atlas(tmp_path / "relu", signed=False), tmp_path / "relu.html").read_text()
    for fid, spec in specs(relu).items():
        assert "xaxis2" not in spec["layout"], fid
        assert {t["meta"]["face"] for t in spec["data"]} == {"pos"}


def test_verdicts_follow_the_numbers(tmp_path):
    good = build_figures(load_inputs(make_atlas(tmp_path / "good", signed=False)))
    bad = build_figures(load_inputs(make_atlas(tmp_path / "bad", make_analysis(12, False, reproduce=False),
                                               signed=False)))
    good, bad = {f.id: f for f in good}, {f.id: f for f in bad}
    for fid in ("fig2", "explain", "fig3", "fig4", "fig5", "fig6", "fig9", "fig10"):
        assert good[fid].verdict.status == "yes", (fid, good[fid].verdict.text)
        assert bad[fid].verdict.status in ("no", "partly"), (fid, bad[fid].verdict.text)
        assert good[fid].verdict.text != bad[fid].verdict.text
    for f in good.values():
        assert f.verdict.text.count(".") >= 1 and "(paper: " in f.verdict.text
    # the sentence carries our numbers: top-quarter agreement of the synthetic ramp
    a = make_analysis(12, False)["values"]["agreement_rate"]
    assert pct(sum(a[9:]) / 3) in good["fig4"].verdict.text
    # and names what differs in the setting (here: a 60k-token scan, an instruct model, its vocabulary)
    assert "60k tokens" in good["fig4"].verdict.text and "instruct" in good["fig4"].verdict.text



def test_embedded_models_name_their_quantisation(tmp_path):
    """Each embedded model's shipped quantisation is a difference of setting; Gemma 3 270M is a base model."""
    atlas = make_atlas(tmp_path / "gemma")
    manifest = json.loads((atlas / "manifest.json").read_text())
    for name, quant, instruct in (("default", "Q4_1", True), ("gemma3-270m", "Q4_K_M", False)):
        manifest["model"].update(name=name, **{"class": "X"})
        (atlas / "manifest.json").write_text(json.dumps(manifest))
        traits = load_inputs(atlas).traits
        assert traits["quantised"].startswith(quant) and traits["instruct"] is instruct


@pytest.mark.parametrize("signed", [True, False])
def test_fig2_bars_are_trigger_shares_with_the_key_share_line(tmp_path, signed):
    a = make_analysis(12, signed)
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a, signed=signed)))}["fig2"]
    for face in ("pos", "neg") if signed else ("pos",):
        b = a["patterns" if face == "pos" else "patterns_neg"]
        traces = {t["name"]: t for t in fig.spec["data"] if t["meta"]["face"] == face and t["meta"]["role"] == "ours"}
        for k, label in (("shallow", "shallow only"), ("both", "shallow + semantic"), ("semantic", "semantic only"),
                         ("none", "no pattern")):
            bar = traces[f"ours: triggers, {label}"]
            assert bar["type"] == "bar" and bar["y"] == b[k], (face, k)
        line = traces["ours: keys with a semantic pattern"]
        assert line["type"] == "scatter" and line["y"] == pytest.approx(
            [x + y for x, y in zip(b["keys_semantic"], b["keys_both"])])
        assert traces["ours: triggers covered by a pattern"]["y"] == b["coverage"]
    assert "trigger examples" in fig.caption and "share of keys with at least one semantic pattern" in fig.caption
    assert "trigger examples" in fig.spec["layout"]["yaxis"]["title"]["text"]
    assert "of the covered trigger examples" in fig.verdict.text and "of keys have a semantic pattern" in \
        fig.verdict.text
    assert not any("before `ffkv explain`" in n for n in fig.notes)


@pytest.mark.parametrize("signed", [True, False])
def test_explanation_scores_figure(tmp_path, signed):
    a = make_analysis(12, signed)
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a, signed=signed)))}["explain"]
    assert fig.section == "keys" and fig.missing is None and fig.spec is not None
    faces = ("pos", "neg") if signed else ("pos",)
    assert ("xaxis2" in fig.spec["layout"]) == signed
    n2g = load_paper_reference()["n2g_firing_f1"]
    assert n2g["f1"] == [0.74, 0.64, 0.6, 0.48, 0.46, 0.42] and n2g["source"].startswith("Foote et al. 2023")
    for face in faces:
        b = a["patterns" if face == "pos" else "patterns_neg"]
        traces = {t["name"]: t for t in fig.spec["data"] if t["meta"]["face"] == face}
        for name, key, role in (("ours: simulation correlation", "sim_corr", "ours"), ("ours: firing F1", "f1", "ours"),
                                ("ours: shuffled-explanation baseline, sim. corr.", "shuffled_sim_corr", "baseline"),
                                ("ours: shuffled-explanation baseline, F1", "shuffled_f1", "baseline"),
                                ("ours: last-token lookup baseline, sim. corr.", "lookup_sim_corr", "baseline"),
                                ("ours: last-token lookup baseline, F1", "lookup_f1", "baseline")):
            t = traces[name]
            assert t["y"] == b[key] and t["meta"]["role"] == role, name
            assert t["x"] == pytest.approx([(i + 1) / 12 for i in range(12)], abs=1e-5)  # our relative depth
    paper = [t for t in fig.spec["data"] if t["meta"]["role"] == "paper"]
    assert len(paper) == len(faces) and all("Neuron-to-Graph" in t["name"] and t["name"].startswith("paper:")
                                            for t in paper)
    assert paper[0]["y"] == n2g["f1"] and paper[0]["x"] == pytest.approx([(i + 1) / 6 for i in range(6)], abs=1e-5)
    assert not paper[0]["meta"]["approx"] and paper[0]["line"]["dash"] == "dot"
    v = fig.verdict
    assert v.status == "yes" and "N2G" in v.text and "shuffled explanation" in v.text and "lookup" in v.text
    assert "0.69 in the lowest third → 0.44 in the top third" in v.text  # N2G on relative depth
    assert ("negative face" in v.text) == signed
    assert any("fired on held-out text" in n for n in fig.notes)
    # below N2G and below the lookup table: not a 'yes', and the sentence says why
    bad = {f.id: f for f in build_figures(load_inputs(make_atlas(
        tmp_path / "bad", make_analysis(12, signed, reproduce=False), signed=signed)))}["explain"]
    assert bad.verdict.status == "partly" and bad.verdict.text.startswith("Below N2G's level")
    assert "the last-token lookup in 0 of 12 layers on F1" in bad.verdict.text


def test_best_explained_table_and_table1_descriptions(full_report):
    text = full_report[1]
    best = text[text.index('<article class="table-block" id="best">'):]
    best = best[:best.index("</article>")]
    rows = re.findall(r"<tr><td class=num>(\d+)<span", best)
    assert len(rows) == 20  # the 20 best of 2 faces × 12 layers × 2 keys
    a = make_analysis(12, True)
    keys = a["patterns"]["keys"] + a["patterns_neg"]["keys"]
    top = sorted(keys, key=lambda k: -k["sim_corr"])[:20]
    sims = [float(x) for x in re.findall(r"<td class=num>(-?\d\.\d\d)</td><td class=num>-?\d\.\d\d</td></tr>", best)]
    assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(top[0]["sim_corr"], abs=0.005)
    assert "ends with &#x27; Paris&#x27; &lt;i&gt;(layer 11 key 14)&lt;/i&gt;" in best and "<i>" not in best
    assert '<span class="kind kind-both">both</span>' in best and "28 more in analysis.json" in best
    assert 'href="#best"' in text
    # Table 1: each key's one line, kind and scores
    t1 = text[text.index('<article class="table-block" id="table1">'):]
    t1 = t1[:t1.index("</article>")]
    assert "Explanation (one line" in t1 and "&lt;i&gt;(layer 0 key 3)&lt;/i&gt;" in t1
    assert "sim. corr. 0.20 · F1 0.30" in t1
    # order on the page: Fig 2, Table 1, Fig E1, best-explained, Fig 3
    order = [text.index(f'id="{x}"') for x in ("fig2", "table1", "explain", "best", "fig3")]
    assert order == sorted(order)


@pytest.mark.parametrize("signed", [True, False])
def test_old_patterns_block_still_renders(tmp_path, signed):
    """An analysis.json written before `ffkv explain`: Fig 2 draws its key shares and says so, Fig E1 and the
    best-explained table say what is missing, Table 1 has no explanation column; the rest is drawn."""
    a = old_patterns(make_analysis(12, signed))
    atlas = make_atlas(tmp_path / "atlas", a, signed=signed)
    text = write_report(atlas).read_text()
    got = specs(text)
    assert set(got) == set(FIGURE_IDS) - {"explain"}
    assert 'data-missing="explain"' in text and "no explanation scores" in text
    assert 'data-missing="best"' in text
    names = {t["name"] for t in got["fig2"]["data"]}
    assert "ours: keys, shallow only" in names and "ours: keys with a semantic pattern" not in names
    assert not any(n.startswith("ours: triggers,") for n in names)
    assert "shares of keys, not of trigger examples" in text
    assert "Explanation (one line" not in text and '<mark class="trig"> Paris</mark>' in text
    fig2 = {f.id: f for f in build_figures(load_inputs(atlas))}["fig2"]
    assert fig2.verdict.status == "yes" and "shares of keys" in fig2.verdict.text
    # a patterns block with only the key shares of the new format still draws Fig 2
    b = make_analysis(12, signed)
    for name in ("patterns", "patterns_neg"):
        if name in b:
            for k in ("sim_corr", "f1"):
                del b[name][k]
    figs = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "half", b, signed=signed)))}
    assert figs["fig2"].spec is not None and figs["explain"].spec is None  # baselines alone are not drawn
    assert "--no-score" in figs["explain"].missing
    # one face scored, the other not: the scored face is drawn, the other named
    if signed:
        c = make_analysis(12, signed)
        for k in ("sim_corr", "f1"):
            del c["patterns_neg"][k]
        fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "one", c, signed=signed)))}["explain"]
        assert fig.spec is not None and {t["meta"]["face"] for t in fig.spec["data"]} == {"pos"}
        assert any(n.startswith("negative face (−v): analysis.json 'patterns_neg' has no explanation scores")
                   for n in fig.notes), fig.notes


def test_partial_analysis_renders_what_exists(tmp_path):
    atlas = make_atlas(tmp_path / "atlas", "partial")
    text = write_report(atlas).read_text()
    got = specs(text)
    assert "fig3" not in got and 'data-missing="fig3"' in text
    assert "not run (use --only to add it)" in text
    assert "fig11" not in got and 'data-missing="fig11"' in text
    assert {"fig2", "fig4", "fig5", "fig7", "fig9"} <= set(got)
    assert "Partial analysis" in text
    # null layers are gaps, and said so
    assert got["fig4"]["data"][0]["y"][2] is None
    assert "no value at layers 2–3, 7" in text
    # the signed model's missing negative face is named
    assert "negative face (−v): analysis.json has no &#x27;values_neg&#x27; block" in text
    assert 'data-missing="table1"' in text


@pytest.mark.parametrize("signed", [True, False])
def test_token_removal_draws_interval_median_and_sign_changes(tmp_path, signed):
    atlas = make_atlas(tmp_path / "atlas", signed=signed)
    got = specs(write_report(atlas).read_text())
    traces = _traces(got["fig3"])
    band = traces["ours: last token removed, 95% interval"]
    assert band["meta"]["band"] == "lower" and band["y"][0] == pytest.approx(-0.75)
    assert traces["ours: last token removed, 95% interval (upper)"]["y"][0] == pytest.approx(-0.65)
    assert traces["ours: last token removed, median"]["y"][0] == pytest.approx(-0.6)
    sign = _traces(got["fig3b"], "ours")
    assert sign["ours: last token removed"]["y"][0] == pytest.approx(0.2)
    assert "ours: first token removed" not in sign  # absent keys are not drawn
    # an analysis.json from before the sign-change keys: Fig 3b says why it is missing, Fig 3 still draws
    a = json.loads((atlas / "analysis.json").read_text())
    for face in ("", "_neg") if signed else ("",):
        for k in [k for k in a["token_removal" + face] if "sign_change" in k]:
            del a["token_removal" + face][k]
    (atlas / "analysis.json").write_text(json.dumps(a))
    text = write_report(atlas).read_text()
    assert "fig3" in specs(text) and 'data-missing="fig3b"' in text


def _traces(spec, role=None):
    return {t["name"]: t for t in spec["data"] if role is None or t["meta"]["role"] == role}


@pytest.mark.parametrize("signed", [True, False])
def test_active_rule_sweep_and_quartiles_are_drawn(tmp_path, signed):
    a = make_analysis(12, signed)
    agg = a["aggregation"]
    figs = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a, signed=signed)))}
    head = "|m| > 0.1·max|m|" if signed else "m > 0"
    others = [r for r in ("m > 0", "|m| > 0.05·max|m|", "|m| > 0.1·max|m|", "|m| > 0.25·max|m|", "|m| > 0.5·max|m|")
              if r != head]
    # Fig 7: the median with its 25–75% band (as the paper plots it), the mean, one thin line per other rule
    f7 = _traces(figs["fig7"].spec)
    assert f7[f"ours: median active memories, {head}"]["y"] == agg["active_fraction_quantiles"]["q50"]
    bands = [t for t in figs["fig7"].spec["data"] if t["meta"].get("band")]
    assert sorted(t["meta"]["band"] for t in bands) == ["lower", "upper"]
    assert {tuple(t["y"]) for t in bands} == {tuple(agg["active_fraction_quantiles"][q]) for q in ("q25", "q75")}
    assert f7["ours: mean active memories"]["y"] == agg["active_fraction_mean"]
    for rule in others:
        assert f"ours: {rule} (median)" in f7, rule
    assert f7["ours: |m| > 0.5·max|m| (median)"]["y"] == agg["sweep"]["tau=0.5"]["active_fraction_quantiles"]["q50"]
    assert f"Headline rule: {head}" in figs["fig7"].caption
    assert ("not the paper's m > 0" in figs["fig7"].caption) == signed
    # Fig 8: one line per rule, the headline thick, and the rule in the caption and the verdict
    f8 = _traces(figs["fig8"].spec, "ours")
    assert f8[f"ours: no single memory matches, {head}"]["y"] == agg["no_single_memory_match"]
    assert "marker" in f8[f"ours: no single memory matches, {head}"]
    for rule in others:
        name = f"ours: no single memory matches, {rule}"
        assert name in f8 and "marker" not in f8[name], rule
    key = {"m > 0": "m>0", "|m| > 0.25·max|m|": "tau=0.25"}
    for rule, k in key.items():
        if rule != head:
            assert f8[f"ours: no single memory matches, {rule}"]["y"] == agg["sweep"][k]["no_single_memory_match"]
    assert f"under {head}" in figs["fig8"].verdict.text and "under |m| > 0.5·max|m|" in figs["fig8"].verdict.text
    assert f"Headline rule: {head}" in figs["fig8"].caption and "< 5 tokens" in figs["fig8"].caption
    assert any(n.startswith("mean over layers per active rule") and f"{head} (headline)" in n
               for n in figs["fig8"].notes)
    # Fig 10: the median with its band beside the paper's median curve, the mean thin; the verdict on the median
    f10 = _traces(figs["fig10"].spec)
    assert f10["ours: median probability of the final token"]["y"] == agg["residual_prob_of_final_quantiles"]["q50"]
    assert f10["ours: mean probability of the final token"]["y"] == agg["residual_prob_of_final"]
    assert {tuple(t["y"]) for t in figs["fig10"].spec["data"] if t["meta"].get("band")} == \
        {tuple(agg["residual_prob_of_final_quantiles"][q]) for q in ("q25", "q75")}
    assert "paper (approx.): median probability of the final token" in f10
    assert "the median probability" in figs["fig10"].verdict.text


def test_fig10_verdict_follows_the_median(tmp_path):
    """A mean that rises like the paper's median, over a median that stays near 0: the verdict reads the median."""
    a = make_analysis(12, False)
    a["aggregation"]["residual_prob_of_final_quantiles"] = {"q25": [0.0] * 12, "q50": [0.001] * 12,
                                                            "q75": [0.01] * 12}
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "median", a, signed=False)))}["fig10"]
    assert fig.verdict.status == "no" and "0.1%" in fig.verdict.text
    del a["aggregation"]["residual_prob_of_final_quantiles"]
    old = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "mean", a, signed=False)))}["fig10"]
    assert old.verdict.status == "yes"


def _error_bars(trace) -> list:
    """[low, high] per layer from a trace's error bars."""
    e = trace["error_y"]
    return [None if y is None or up is None else [y - down, y + up]
            for y, up, down in zip(trace["y"], e["array"], e["arrayminus"])]


def test_intervals_are_drawn_and_read_by_the_verdicts(tmp_path):
    a = make_analysis(12, True)
    agg = a["aggregation"]
    figs = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a)))}
    head = "|m| > 0.1·max|m|"
    drawn = {("fig7", f"ours: median active memories, {head}"): agg["active_fraction_quantiles"]["q50_ci"],
             ("fig8", f"ours: no single memory matches, {head}"): agg["no_single_memory_match_ci"],
             ("fig8", "ours: matched token is a stop word"): agg["match_is_stopword_ci"],
             ("fig9", "ours: residual top = final top"): agg["residual_matches_final_ci"],
             ("fig10", "ours: median probability of the final token"):
                 agg["residual_prob_of_final_quantiles"]["q50_ci"],
             ("fig11", "ours: residual"): agg["ffn_effect"]["residual_ci"],
             ("fig11b", "ours: changed to a distant word"): agg["ffn_change_distant_ci"]}
    for (fid, name), ci in drawn.items():
        trace = _traces(figs[fid].spec)[name]
        assert trace["meta"]["ci"] and _error_bars(trace) == [pytest.approx(c) for c in ci], (fid, name)
        assert "95% interval" in trace["text"][0] and any("95% intervals" in n for n in figs[fid].notes), fid
    assert "95% interval" in figs["fig8"].verdict.text and "95% interval" in figs["fig9"].verdict.text
    # Fig 9: a lower third far from the paper's "about a third" with a clear rise is half a reproduction
    low = [0.05] * 4 + [0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.9, 0.92]
    agg.update(residual_matches_final=low, residual_matches_final_ci=_around(low, 0.015))
    fig9 = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "fig9", a)))}["fig9"]
    assert fig9.verdict.status == "partly"
    assert "not about a third" in fig9.verdict.text and "5% (95% interval 3.5–6.5%)" in fig9.verdict.text
    assert "rises with depth, to 92% (95% interval 90–94%)" in fig9.verdict.text


def test_fig8_verdict_names_the_rules_where_the_paper_floor_holds(tmp_path):
    """>= 68% in every layer holds for a rule when every layer's interval reaches 68%."""
    a = make_analysis(12, True)
    sweep = a["aggregation"]["sweep"]
    for rule, v in (("m>0", 0.55), ("tau=0.05", 0.66)):
        sweep[rule]["no_single_memory_match"] = [0.8] * 11 + [v]
        sweep[rule]["no_single_memory_match_ci"] = _around(sweep[rule]["no_single_memory_match"], 0.03)
    fig8 = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a)))}["fig8"]
    text = fig8.verdict.text
    assert fig8.verdict.status == "yes"
    assert ("holds under |m| > 0.05·max|m|, |m| > 0.1·max|m|, |m| > 0.25·max|m| and |m| > 0.5·max|m|, not under "
            "m > 0") in text  # 66% ± 3% reaches 68%, 55% ± 3% does not
    assert "about half of all coefficients are positive" in text
    for rule in ("tau=0.05", "tau=0.1", "tau=0.25", "tau=0.5"):
        sweep[rule]["no_single_memory_match"] = [0.5] * 12
        sweep[rule]["no_single_memory_match_ci"] = _around([0.5] * 12)
    a["aggregation"].update({k: sweep["tau=0.1"][k] for k in ("no_single_memory_match", "no_single_memory_match_ci")})
    fig8 = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "low", a)))}["fig8"]
    assert fig8.verdict.status == "partly" and "holds under none of the rules" in fig8.verdict.text


def test_semantic_change_figure(tmp_path):
    a = make_analysis(12, False)
    a["aggregation"]["ffn_change_shuffled_distant"][-1] = 0.4  # the control below the measured share
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a, signed=False)))}["fig11b"]
    traces = _traces(fig.spec)
    assert traces["ours: changed to a distant word"]["y"] == a["aggregation"]["ffn_change_distant"]
    assert traces["ours: shuffled new tokens (control)"]["meta"]["role"] == "baseline"
    assert traces["ours: between two content words"]["y"] == a["aggregation"]["ffn_change_content_distant"]
    paper = [t for t in fig.spec["data"] if t["meta"]["role"] == "paper"]
    assert any(t["x"] == [1.0] and t["y"] == [0.66] for t in paper)
    # the last layer's 70% ± 5% meets the paper's 66 of 100 (95% interval 56–75%)
    assert fig.verdict.status == "yes" and "70% (95% interval 65–75%)" in fig.verdict.text
    assert "56%–75%" not in fig.verdict.text and "interval 56–75%" in fig.verdict.text
    assert any("random vocabulary pairs: 0.21" in n and "0.33" in n for n in fig.notes)
    assert any("300 / 300 / 300; of them between two content words: 100 / 100 / 100" in n for n in fig.notes)
    # the same share below its shuffled control shows nothing about distance: not a reproduction
    a["aggregation"]["ffn_change_shuffled_distant"][-1] = 0.9
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "control", a, signed=False)))}["fig11b"]
    assert fig.verdict.status == "partly" and "not above this control" in fig.verdict.text
    a["aggregation"]["ffn_change_distant"][-1] = 0.9
    a["aggregation"]["ffn_change_distant_ci"][-1] = [0.88, 0.92]
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "far", a, signed=False)))}["fig11b"]
    assert fig.verdict.status == "partly" and "outside the paper's interval" in fig.verdict.text
    assert "between two content words 75% (95% interval 67–83%), within it;" in fig.verdict.text  # meets 56–75%
    a["aggregation"]["ffn_change_distant"][-1] = 0.3
    a["aggregation"]["ffn_change_distant_ci"][-1] = [0.25, 0.35]
    a["aggregation"]["ffn_change_content_distant_ci"][-1] = [0.8, 0.9]
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "near", a, signed=False)))}["fig11b"]
    assert fig.verdict.status == "no" and "also outside it" in fig.verdict.text
    # not measured: the figure says why
    for key in [k for k in a["aggregation"] if k.startswith(("ffn_change", "random_pair"))]:
        del a["aggregation"][key]
    a["missing"]["aggregation.ffn_change"] = "not measured: the sentence embedder is missing"
    fig = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "none", a, signed=False)))}["fig11b"]
    assert fig.spec is None and "the sentence embedder is missing" in fig.missing


@pytest.mark.parametrize("signed", [True, False])
def test_aggregation_without_the_sweep_keys_still_draws(tmp_path, signed):
    """An analysis.json written before the sweep and the quartiles: Figs 7, 8 and 10 draw the old series."""
    a = make_analysis(12, signed)
    for key in AGGREGATION_NEW_KEYS:
        del a["aggregation"][key]
    a["definitions"]["residual_prob_of_final"] = "mean probability that the residual gives the final top token."
    figs = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path / "atlas", a, signed=signed)))}
    for fid in ("fig7", "fig8", "fig10"):
        assert figs[fid].spec is not None and figs[fid].missing is None, fid
        assert not any(t["meta"].get("band") for t in figs[fid].spec["data"]), fid
        assert "Headline rule" not in figs[fid].caption
    f7 = _traces(figs["fig7"].spec)
    assert f7["ours: active memories (rule in Definitions)"]["y"] == a["aggregation"]["active_fraction_mean"]
    assert f7["ours: coefficient > 0"]["y"] == a["aggregation"]["active_fraction_positive_mean"]
    assert list(_traces(figs["fig8"].spec, "ours")) == ["ours: no single memory matches",
                                                         "ours: matched token is a stop word",
                                                         "ours: matched prefix < 5 tokens"]
    assert "ours: mean probability of the final token" in _traces(figs["fig10"].spec)
    assert "Ours is the mean over prefixes, the paper's the median." in figs["fig10"].caption
    assert figs["fig10"].verdict.status == "yes"
    text = write_report(make_atlas(tmp_path / "written", a, signed=signed)).read_text()
    assert {"fig7", "fig8", "fig10"} <= set(specs(text))


def test_unscanned_layers_and_subset_command(tmp_path):
    a = make_analysis(12, True)
    a["config"] = {"removal_keys": 4, "examples": 4000, "only": "values", "seed": 0}
    a["layers"] = [0, 1, 2, 3, 5]
    for block in ("values", "values_neg"):
        a[block]["agreement_rate"] = [v if i in a["layers"] else None for i, v in enumerate(a[block]["agreement_rate"])]
    atlas = make_atlas(tmp_path / "atlas", a, layers=[0, 1, 2, 3, 5], unit="document")
    text = write_report(atlas).read_text()
    assert "only layers 0–3, 5 of 0–11 were scanned" in text
    assert "--layers 0-3,5" in text and "--unit document" in text
    assert "ffkv analyze --removal-keys 4 " in text and "--examples" not in text and "--only" not in text


def test_no_analysis_at_all(tmp_path):
    atlas = make_atlas(tmp_path / "atlas", None)
    text = write_report(atlas).read_text()
    assert specs(text) == {}
    assert text.count('data-state="missing"') == len(FIGURE_IDS)
    assert f"run `ffkv analyze {atlas}` first" in text
    assert "How to reproduce" in text


def test_malformed_blocks_do_not_crash(tmp_path):
    text = write_report(make_atlas(tmp_path / "atlas", "broken")).read_text()
    got = specs(text)
    assert "fig4" in got and "fig3" in got  # fig3 still has 'random' and the neg face
    assert 'data-missing="fig11"' in text or "fig11" not in got


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FfkvError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FfkvError, match="no manifest.json"):
        write_report(tmp_path / "empty")
    atlas = make_atlas(tmp_path / "atlas", None)
    (atlas / "analysis.json").write_text("{not json")
    with pytest.raises(FfkvError, match="corrupt"):
        write_report(atlas)
    (atlas / "analysis.json").unlink()
    with pytest.raises(FfkvError, match="is a directory"):
        write_report(atlas, out=tmp_path)
    with pytest.raises(FfkvError, match="does not exist"):
        write_report(atlas, out=tmp_path / "no" / "r.html")
    out = write_report(atlas, out=tmp_path / "custom.html")
    assert out == tmp_path / "custom.html" and out.exists() and not (atlas / "report.html").exists()


def test_trigger_tokens_highlighted_and_escaped(full_report, tmp_path):
    text = full_report[1]
    assert '<mark class="trig"> Paris</mark>' in text
    assert "&lt;script&gt;" in text and "<script>]]" not in text and "<b>bold" not in text
    split = TriggerSplitter(load_inputs(make_atlas(tmp_path / "a", None)))
    assert split.parts("so it[[ goes]]") == ("so it", " goes", None)
    assert split.parts({"context": "a b", "trigger_token": " c", "next_token": " d"}) == ("a b", " c", " d")
    assert split.parts("plain text here") == ("plain text", " here", None)
    assert split.parts(None) is None


def test_header_names_what_sits_at_position_0(tmp_path):
    atlas = make_atlas(tmp_path / "bos")
    manifest = json.loads((atlas / "manifest.json").read_text())
    assert "position 0" not in write_report(atlas).read_text()  # an atlas from before the setting was recorded
    manifest["corpus"].update(bos=True, special_prefix=[1], special_prefix_tokens=["<|im_start|>"])
    (atlas / "manifest.json").write_text(json.dumps(manifest))
    assert "position 0</dt><dd>&lt;|im_start|&gt; (--bos), fed, not scored" in write_report(atlas).read_text()
    manifest["corpus"].update(bos=False, special_prefix=[], special_prefix_tokens=[])
    (atlas / "manifest.json").write_text(json.dumps(manifest))
    assert "position 0</dt><dd>the unit&#x27;s first text token (no BOS)" in write_report(atlas).read_text()


def test_report_command(tmp_path, capsys):
    from ffkv.cli import main

    atlas = make_atlas(tmp_path / "atlas", "partial")
    assert main(["report", str(atlas), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffkv: error:") and err.count("\n") == 1
    # --verdicts prints each drawn figure's verdict, the same sentence the page shows
    full = make_atlas(tmp_path / "full")
    assert main(["report", str(full), "--verdicts"]) == 0
    out = capsys.readouterr().out.splitlines()
    figures = {f.number: f for f in build_figures(load_inputs(full)) if f.verdict is not None}
    printed = {line.split(" [")[0].removeprefix("Fig "): line for line in out if line.startswith("Fig ")}
    assert set(printed) == set(figures) and "4b" in printed
    assert all(printed[n].endswith(f.verdict.text.split(": ", 1)[-1]) for n, f in figures.items())
    # --rows prints what `ffkv analyze` printed when it wrote analysis.json
    from ffkv.cli import _print_analysis

    _print_analysis(json.loads((full / "analysis.json").read_text()))
    expected = capsys.readouterr().out
    assert main(["report", str(full), "--rows"]) == 0
    out = capsys.readouterr().out
    assert "per third of the layers" in expected and out.startswith(expected)


def test_formatting():
    assert pct(0.035) == "3.5%" and pct(4e-6) == "0.0004%" and pct(0.675) == "68%" and pct(-0.2) == "−20%"
    assert pct(None) == "n/a" and pct(0) == "0%"
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"
    assert [tokens_text(n) for n in (999_973, 40_000, 1_050_760, 1_234, 999)] == ["1M", "40k", "1.05M", "1.23k", "999"]
    assert tokens_text(12) == "12"


def test_analysis_of_another_scan_is_refused(tmp_path):
    from ffkv.report.data import scan_id

    atlas = make_atlas(tmp_path / "atlas", None)
    sid = scan_id(atlas)
    assert re.fullmatch(r"[0-9a-f]{16}", sid)
    a = make_analysis()
    for recorded in (sid, None):  # this scan's id, or none (an analysis.json older than scan ids)
        if recorded is None:
            a.pop("scan_id")
        else:
            a["scan_id"] = recorded
        (atlas / "analysis.json").write_text(json.dumps(a))
        text = write_report(atlas).read_text()
        assert f'<meta name="ffkv-scan-id" content="{sid}">' in text
        assert specs(text)  # the analysis was read
    a["scan_id"] = "feedfacefeedface"
    (atlas / "analysis.json").write_text(json.dumps(a))
    with pytest.raises(FfkvError, match=r"feedfacefeedface.*rerun `ffkv analyze"):
        load_inputs(atlas)
    # a rewritten manifest (a new scan into the folder) is another scan id
    (atlas / "manifest.json").write_text(json.dumps(make_manifest(), indent=2))
    assert scan_id(atlas) != sid
