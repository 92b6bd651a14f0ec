"""`ffkv compare` on synthetic atlases (the manifests and analysis.json of test_report.py: a gated 12-layer model and
a ReLU 6-layer one) and on two tiny random models scanned and analysed here. The browser checks are in
test_compare_browser.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import make_analysis, make_atlas, specs

import ffkv
from ffkv.analysis.run import AnalyzeConfig, analyze
from ffkv.cli import main
from ffkv.errors import FfkvError
from ffkv.report import FIGURE_IDS, build_figures, load_inputs, load_paper_reference, write_comparison
from ffkv.report.comparison import across, model_style

SCAN = dict(dtype="float64", top_k=5, max_length=64, batch_tokens=400, max_batch=16, value_top=8,
            checkpoint_every=1e9)


def third_means(values: list) -> list[float | None]:
    """Means over layers [0, n//3), [n//3, 2n//3), [2n//3, n) and the last layer, nulls skipped."""
    n = len(values)
    out = []
    for lo, hi in ((0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n), (n - 1, n)):
        present = [v for v in values[lo:hi] if v is not None]
        out.append(sum(present) / len(present) if present else None)
    return out


def six(y):
    """Numbers as the page writes them: 6 significant digits."""
    return y if y is None else [v if v is None else float(f"{v:.6g}") for v in y]


class Table(HTMLParser):
    """The findings table: per data-row, its label and cells (attributes and text); the header's columns."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.heads: list[dict] = []
        self.groups: dict[str, dict] = {}
        self._row = self._cell = None
        self._in = False
        self.feed(text[text.index('<table class="findings">'):text.index("</table>", text.index("findings"))])

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-row" in a:
            self._row = self.rows.setdefault(a["data-row"], {"label": "", "cells": [], "figure": a["data-figure"]})
        elif tag == "tr" and a.get("class") in ("finding-head", "verdicts"):
            self._row = self.groups.setdefault(f"{a['class']}:{a['data-figure']}", {"label": "", "cells": [], **a})
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {**a, "text": ""}
            self._row["cells"].append(self._cell)
        elif tag == "th" and "data-column" in a:
            self.heads.append(a)

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


@pytest.fixture(scope="module")
def atlases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {
        "llama": make_atlas(root / "llama", n_layers=12, signed=True, name="org/tiny-llama"),
        "opt": make_atlas(root / "opt", n_layers=6, signed=False, name="org/tiny-opt"),
        "opt-bad": make_atlas(root / "opt-bad", make_analysis(6, False, reproduce=False), n_layers=6, signed=False,
                              name="org/tiny-opt"),
        "bare": make_atlas(root / "bare", None, n_layers=9, signed=False, name="org/tiny-bare"),
    }


@pytest.fixture(scope="module")
def pair(atlases, tmp_path_factory):
    path = write_comparison([atlases["llama"], atlases["opt"]], tmp_path_factory.mktemp("out") / "pair.html")
    return path, path.read_text(encoding="utf-8")


def test_page_is_self_contained_and_small(pair, atlases):
    path, text = pair
    assert path.stat().st_size < 10 * 2**20
    assert text.count("plotly.js v") == 1, "plotly.js must be inlined exactly once"
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)\s*=\s*["\']?(https?:)?//', text, re.I)
    assert "<link" not in text
    ids = " ".join(load_inputs(atlases[k]).scan_id for k in ("llama", "opt"))
    assert f'<meta name="ffkv-scan-id" content="{ids}">' in text
    assert sorted(specs(text)) == sorted(FIGURE_IDS)


def test_every_figure_holds_both_models_traces_and_the_paper_once(pair, atlases):
    got = specs(pair[1])
    own = {k: {f.id: f for f in build_figures(load_inputs(atlases[k]))} for k in ("llama", "opt")}
    labels = {"llama": "tiny-llama", "opt": "tiny-opt"}
    for fid in FIGURE_IDS:
        data = got[fid]["data"]
        paper_names = set()
        for i, k in enumerate(("llama", "opt")):
            theirs = own[k][fid].spec["data"]
            expected = [f"{labels[k]}: {t['name'].removeprefix('ours: ')}" for t in theirs
                        if t["meta"]["role"] != "paper"]
            drawn = [t for t in data if t["meta"].get("model") == i]
            assert [t["name"] for t in drawn] == expected, fid
            assert all(t["meta"]["atlas"] == labels[k] for t in drawn)
            # the same numbers as its own report, at its own relative depth
            assert [t.get("y") for t in drawn] == [six(t.get("y")) for t in theirs if t["meta"]["role"] != "paper"]
            paper_names |= {t["name"] for t in theirs if t["meta"]["role"] == "paper"}
        paper = [t for t in data if t["meta"]["role"] == "paper"]
        assert "model" not in json.dumps([t["meta"] for t in paper])
        assert {t["name"] for t in paper} == paper_names, fid
        assert fid == "causal" or paper, f"{fid}: the paper is not drawn"
        keys = [(t["name"], t.get("xaxis"), json.dumps(t["x"]), json.dumps(t["y"])) for t in paper]
        assert len(keys) == len(set(keys)), f"{fid}: a paper trace is drawn twice"
        legend = [t["name"] for t in paper if t["showlegend"]]
        assert sorted(legend) == sorted(set(legend)) == sorted(paper_names), fid
    # the gated model's negative face stays on the right panel; the ReLU model has one face
    fig4 = got["fig4"]["data"]
    assert {t["xaxis"] for t in fig4 if t["meta"].get("model") == 0} == {"x", "x2"}
    assert {t["xaxis"] for t in fig4 if t["meta"].get("model") == 1} == {"x"}
    assert got["fig9"]["layout"]["xaxis"]["title"]["text"].endswith("tiny-llama L=12, tiny-opt L=6, paper L=16")


def test_models_are_told_apart_by_line_style(pair):
    got = specs(pair[1])
    assert model_style(0) != model_style(1)
    lines = {}
    for t in got["fig9"]["data"]:
        if t["meta"]["role"] == "ours" and t["type"] == "scatter" and "markers" in t["mode"]:
            lines[t["meta"]["model"]] = (t["line"].get("dash", "solid"), t["marker"].get("symbol", "circle"))
    assert lines[0] != lines[1] and "dash" not in lines.values() and "dot" not in lines.values()
    bars = [t for t in got["fig11"]["data"] if t["type"] == "bar"]
    assert {t["offsetgroup"] for t in bars} == {"0", "1"}  # one stack per model, side by side
    assert all("pattern" in t["marker"] for t in bars if t["meta"]["model"] == 1)


def test_findings_table_numbers_are_the_per_third_means(pair, atlases):
    table = Table(pair[1])
    assert [h["data-column"] for h in table.heads] == ["paper", "0", "1"]
    analyses = [json.loads((atlases[k] / "analysis.json").read_text()) for k in ("llama", "opt")]
    paths = {"Fig 3 remove last token": ("token_removal", "last"),
             "Fig 4 value agreement rate": ("values", "agreement_rate"),
             "Fig 5 median rank of next token / |V|": ("values", "next_token_rank_median_normed"),
             "Fig 9 residual top = final top": ("aggregation", "residual_matches_final"),
             "Fig 10 residual's p(final), median": ("aggregation", "residual_prob_of_final_quantiles", "q50"),
             "Fig 11 residual keeps its top": ("aggregation", "ffn_effect", "residual")}

    def get(a, path):
        for key in path:
            a = a[key]
        return a

    for name, path in paths.items():
        row = table.rows[name]
        for i, a in enumerate(analyses):
            cells = [c for c in row["cells"] if c.get("data-column") == str(i)]
            assert [c["data-part"] for c in cells] == ["low", "mid", "high", "last"], name
            assert [float(c["data-value"]) for c in cells] == pytest.approx(third_means(get(a, path))), (name, i)
    semantic = table.rows["Fig 2 triggers with semantic (or both)"]
    for i, a in enumerate(analyses):
        summed = [x + y for x, y in zip(a["patterns"]["semantic"], a["patterns"]["both"])]
        cells = [c for c in semantic["cells"] if c.get("data-column") == str(i)]
        assert [float(c["data-value"]) for c in cells] == pytest.approx(third_means(summed))
    # the paper's per-layer curves, per third of its 16 layers
    ref = load_paper_reference()
    paper = {"Fig 3 remove last token": ref["fig3_token_removal"]["last_approx"],
             "Fig 5 median rank of next token / |V|": [v / ref["model"]["vocab_approx"] for v in
                                                       ref["fig5_next_token_rank"]["median_approx"]],
             "Fig 9 residual top = final top": ref["fig9_residual_matches_final"]["approx"]}
    for name, arr in paper.items():
        cells = [c for c in table.rows[name]["cells"] if c.get("data-column") == "paper"]
        assert [float(c["data-value"]) for c in cells] == pytest.approx(third_means(arr)), name
        assert all(c["text"].startswith("≈") for c in cells)
    # no per-layer curve in the paper: one cell says so
    cells = [c for c in table.rows["Fig 4b value suppression rate"]["cells"] if c.get("data-column") == "paper"]
    assert len(cells) == 1 and cells[0]["colspan"] == "4"
    # the ReLU model has no -v face: named, not blank
    cells = [c for c in table.rows["Fig 4 agreement rate, -v face"]["cells"] if c.get("data-column") == "1"]
    assert len(cells) == 1 and "not in its analysis.json" in cells[0]["text"]
    # the last layer's 95% interval beside its number
    last = [c for c in table.rows["Fig 9 residual top = final top"]["cells"] if c.get("data-part") == "last"]
    assert "[92%, 98%]" in last[1]["text"]


def test_verdicts_per_model_and_across_models(pair, atlases, tmp_path):
    table = Table(pair[1])
    own = [{f.id: f for f in build_figures(load_inputs(atlases[k]))} for k in ("llama", "opt")]
    for fid in FIGURE_IDS:
        cells = [c for c in table.groups[f"verdicts:{fid}"]["cells"] if c.get("data-status")]
        assert [c["data-status"] for c in cells] == [o[fid].verdict.status for o in own], fid
        head = table.groups[f"finding-head:{fid}"]
        if all(o[fid].verdict.status == "yes" for o in own):
            assert "Holds in both models." in head["cells"][0]["text"] and head["data-status"] == "yes"
    # one model reproduces, the other not (and the same model name twice): the sentence names which
    text = write_comparison([atlases["opt"], atlases["opt-bad"], atlases["bare"]], tmp_path / "mixed.html").read_text()
    table = Table(text)
    head = table.groups["finding-head:fig9"]
    assert head["data-status"] == "mixed"
    sentence = head["cells"][0]["text"]
    assert "Holds in tiny-opt (opt)" in sentence and "tiny-opt (opt-bad)" in sentence
    assert "is not drawn for tiny-bare" in sentence
    assert "tiny-opt (opt): " in text and "tiny-opt (opt-bad): " in text  # trace names carry the folder
    # the atlas without analysis.json: named in the banner, every figure's note and the table
    assert 'data-missing="analysis"' in text and "run `ffkv analyze" in text
    assert text.count("tiny-bare: not drawn: no analysis.json") == len(FIGURE_IDS)
    cells = [c for c in table.rows["Fig 9 residual top = final top"]["cells"] if c.get("data-column") == "2"]
    assert len(cells) == 1 and cells[0]["text"] == "no analysis.json"


def test_across_sentences():
    assert across([("A", "yes"), ("B", "yes")]).text == "Holds in both models."
    assert across([("A", "yes"), ("B", "yes"), ("C", "yes")]).text == "Holds in all 3 models."
    assert across([("A", "no"), ("B", "no")]).text == "Does not hold in either model."
    v = across([("A", "yes"), ("B", "partly"), ("C", "no")])
    assert v.status == "mixed" and v.text == "Holds in A; partly holds in B; does not hold in C."
    v = across([("A", "yes"), ("B", "missing")])
    assert v.status == "yes" and v.text == "Holds in A; is not drawn for B."
    assert across([("A", "missing"), ("B", "missing")]).status == "na"


def test_header_per_atlas_and_the_command(pair, atlases):
    text = pair[1]
    for s in ("org/tiny-llama", "org/tiny-opt", "llama (LlamaForCausalLM)", "opt (OPTForCausalLM)", "12 × 128",
              "6 × 128", "silu, gated", "relu, not gated", "default (sentences)", "60,000",
              load_inputs(atlases["llama"]).scan_id, load_inputs(atlases["opt"]).scan_id):
        assert s in text, s
    assert f"ffkv compare {atlases['llama']} {atlases['opt']} -o {pair[0]}" in text
    assert f"ffkv analyze {atlases['opt']}" in text and "ffkv report" not in text.split('id="reproduce"')[1][:2000]


def test_models_from_the_same_folder_name_are_told_apart(tmp_path):
    a = make_atlas(tmp_path / "x" / "atlas", n_layers=6, signed=False)
    b = make_atlas(tmp_path / "y" / "atlas", n_layers=6, signed=False)
    text = write_comparison([a, b], tmp_path / "c.html").read_text()
    assert f"SmolLM2-135M-Instruct ({a})" in text and f"SmolLM2-135M-Instruct ({b})" in text


def test_python_api_bad_input(atlases, tmp_path):
    for one in ([atlases["opt"]], atlases["opt"], str(atlases["opt"])):
        with pytest.raises(FfkvError, match="at least two atlases, got 1"):
            write_comparison(one, tmp_path / "c.html")
    with pytest.raises(FfkvError, match="given twice"):
        write_comparison([atlases["opt"], atlases["opt"].parent / "." / "opt"], tmp_path / "c.html")
    with pytest.raises(FfkvError, match="is a directory"):
        write_comparison([atlases["opt"], atlases["llama"]], tmp_path)


def test_cli_writes_compare_html_and_refuses_bad_input(atlases, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(atlases["llama"]), str(atlases["bare"])]) == 0
    assert (tmp_path / "compare.html").stat().st_size > 1_000_000
    assert "wrote compare.html" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    a = str(atlases["opt"])
    for argv, message in ((["compare"], "at least two atlases, got 0"),
                          (["compare", a], "at least two atlases, got 1"),
                          (["compare", a, str(tmp_path / "nope")], "does not exist"),
                          (["compare", a, str(tmp_path / "empty")], "no manifest.json"),
                          (["compare", a, a], "given twice")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ffkv: error:") and err.count("\n") == 1 and message in err, (argv, err)
    with pytest.raises(SystemExit) as done:
        main(["compare", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "ATLAS ATLAS [ATLAS ...]" in out and "compare.html" in out


def test_two_tiny_models_scanned_and_analysed(tiny_model, corpus_txt, tmp_path):
    """Real atlases: a gated Llama and a GELU GPT-2, scanned and analysed here (values and token removal only)."""
    paths = []
    for arch in ("llama", "gpt2"):
        loaded = tiny_model(arch)
        atlas = ffkv.scan(loaded, str(corpus_txt), tmp_path / arch, ffkv.ScanConfig(**SCAN), progress=False)
        analyze(atlas.path, AnalyzeConfig(only="values,token_removal", removal_keys=2, removal_triggers=3),
                model=loaded, progress=False)
        paths.append(atlas.path)
    text = write_comparison(paths, tmp_path / "tiny.html").read_text()
    got = specs(text)
    assert {"fig3", "fig4", "fig5"} <= set(got) and "fig9" not in got  # aggregation was not run
    for fid in ("fig3", "fig4"):
        assert {t["meta"].get("model") for t in got[fid]["data"] if t["meta"]["role"] != "paper"} == {0, 1}
    assert "llama (LlamaForCausalLM)" in text and "gpt2 (GPT2LMHeadModel)" in text
    table = Table(text)
    for i, path in enumerate(paths):
        rate = json.loads((path / "analysis.json").read_text())["values"]["agreement_rate"]
        cells = [c for c in table.rows["Fig 4 value agreement rate"]["cells"] if c.get("data-column") == str(i)]
        assert [float(c["data-value"]) if "data-value" in c else None for c in cells] == \
            pytest.approx(third_means(rate))
    assert "not run" in text  # the experiments left out are named
