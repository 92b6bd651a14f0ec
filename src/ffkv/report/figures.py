"""One figure per experiment of Geva et al. (2021), as plotly.js specs (plain dicts), with the paper drawn beside ours.

Every figure plots our per-layer numbers against relative depth (layer+1)/n_layers, so a 30-layer model lines up
with the paper's 16 layers. Styles are the same in every figure:

- ours: solid line with dots (or bars), one colour per quantity; a variant of it (the mean beside a median,
  another active rule of the sweep): thin solid line, no dots; quantiles: a shaded band;
- our baselines: thin solid line, no dots;
- paper, interpolated from the shape of its figure (the ``_approx`` arrays of paper_reference.json): dashed,
  same colour as the matching quantity, labelled "paper (approx.)";
- paper, a number stated in its text: dotted line or a hollow diamond, labelled "paper".

Each trace carries ``meta = {"role": "ours" | "baseline" | "paper", "approx": bool, "face": "pos" | "neg"}`` so
tests (and readers of the JSON) can tell them apart. Signed models get one panel per face.

Two figures are not the paper's. Fig E1 (id ``explain``), the held-out scores of `ffkv explain`'s explanations beside
their baselines, with Neuron-to-Graph's published firing F1 (Foote et al. 2023, a 6-layer model) as its reference
curve: a number stated in that paper's text, drawn dotted on its own relative depth layer/6 and named in its label.
Fig C1 (id ``causal``), the causal check of what values do: memories switched off where they fired, beside controls;
what a causal reading of §4 expects, not a number of the paper, decides its verdict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..analysis.intervals import agree, wilson
from .compare import (
    Verdict,
    early,
    first_crossing,
    join_words,
    late,
    layer_ranges,
    mean_between,
    no_verdict,
    num,
    paper_points,
    pct,
    pct_span,
    points,
    spearman,
    verdict,
)
from .data import FACE_LABEL, PAPER_LAYERS, ReportInputs

FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
INK = "#1d2330"
GRID = "#e9ecf1"
COLORS = {
    "main": "#2563a8",      # the headline quantity of a figure
    "alt": "#6fa8dc",       # a variant of it (normed projection, positive-share rule)
    "last": "#c8414b",
    "first": "#1f9e89",
    "random": "#7b5ea7",
    "shallow": "#e0a030",
    "both": "#8fb356",
    "semantic": "#2563a8",
    "none": "#cfd3d8",
    "coverage": "#1d2330",
    "sim": "#2563a8",
    "f1": "#1f9e89",
    "sim_shuffled": "#9dbde3",
    "f1_shuffled": "#93d3c6",
    "sim_lookup": "#7b5ea7",
    "f1_lookup": "#e07b2a",
    "keys_semantic": "#b0307a",
    "freq": "#e07b2a",
    "uniform": "#8b919a",
    "stopword": "#e07b2a",
    "short": "#7b5ea7",
    "residual": "#4c78a8",
    "ffn": "#f58518",
    "agreement": "#54a24b",
    "composition": "#b279a2",
}
BAND_COLORS = {"last": "rgba(200,65,75,0.14)", "first": "rgba(31,158,137,0.14)", "random": "rgba(123,94,167,0.14)"}
"""Shaded 95 % intervals of the token-removal series (their line colours, light)."""
DEPTH_TITLE = "relative depth (layer+1)/L"
"""Start of the x-axis title of every figure drawn against relative depth."""
SWEEP_GREYS = ("#b3b9c2", "#8b919a", "#646b75", "#3d434c", "#1d2330")
"""Colours of the magnitude rules of the active-rule sweep, lowest threshold first (m > 0 is COLORS['alt'])."""


@dataclass
class Figure:
    id: str
    """html id and the name used by `python -m ffkv.report.screenshot --figure`: fig2 ... fig11"""
    number: str
    section: str
    title: str
    caption: str
    spec: dict | None = None
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)
    missing: str | None = None
    """Set when nothing could be drawn: the visible note that replaces the figure."""
    wide: bool = False


def spct(v):
    return pct(v, signed=True)


class Plot:
    """Accumulates traces over one or two panels (one per face) that share the y axis."""

    def __init__(self, inp: ReportInputs, faces: tuple[str, ...]):
        self.inp = inp
        self.L = inp.n_layers
        self.faces = faces
        self.data: list[dict] = []
        self._legend: set[str] = set()
        self.annotations: list[dict] = []
        self.missing_faces: list[tuple[str, str]] = []

    def axes(self, p: int) -> dict:
        return {"xaxis": "x", "yaxis": "y"} if p == 0 else {"xaxis": f"x{p + 1}", "yaxis": f"y{p + 1}"}

    def _show(self, name: str) -> bool:
        show = name not in self._legend
        self._legend.add(name)
        return show

    def _xs(self):
        return [round((i + 1) / self.L, 6) for i in range(self.L)]

    def _text(self, name, values, fmt):
        return [None if v is None else f"<b>{name}</b><br>layer {i} of {self.L} (depth {(i + 1) / self.L:.2f})"
                f"<br>{fmt(v)}" for i, v in enumerate(values)]

    def _add(self, p, name, text, *, role="ours", face="pos", approx=False, rank=None, legend=True, **fields):
        """Append one trace with the keys every trace shares (hover text, legend entry, meta, panel axes)."""
        trace = {"name": name, **fields, "text": text, "hovertemplate": "%{text}<extra></extra>", "legendgroup": name,
                 "legendrank": rank or (300 if role == "paper" else 100),
                 "showlegend": legend and self._show(name), "meta": {"role": role, "approx": approx, "face": face},
                 **self.axes(p)}
        self.data.append(trace)
        return trace

    def ours(self, p, name, values, color, fmt=pct, *, baseline=False, thin=False, face="pos", positive_only=False,
             legend=True):
        """One of our series: a thick line with dots; ``thin``: a variant of ours (thin line, no dots);
        ``baseline``: the same look, marked as a baseline."""
        if positive_only:
            values = [v if v is not None and v > 0 else None for v in values]
        plain = baseline or thin
        extra = {} if plain else {"marker": {"size": 5, "color": color}}
        return self._add(p, name, self._text(name, values, fmt), role="baseline" if baseline else "ours", face=face,
                         rank=200 if baseline else 150 if thin else 100, legend=legend, type="scatter",
                         mode="lines" if plain else "lines+markers", x=self._xs(), y=values, connectgaps=False,
                         line={"color": color, "width": 1.5 if plain else 2.4}, **extra)

    def band(self, p, name, lower, upper, color, fmt, face="pos"):
        """A shaded band between two of our series (e.g. quantiles)."""
        common = {"type": "scatter", "mode": "lines", "x": self._xs(), "line": {"width": 0, "color": color},
                  "connectgaps": False}
        self._add(p, name, self._text(name + " upper", upper, fmt), face=face, legend=False, **common, y=upper)
        self.data[-1].update(name=name + " (upper)", meta=dict(self.data[-1]["meta"], band="upper"))
        self._add(p, name, self._text(name + " lower", lower, fmt), face=face, **common, y=lower, fill="tonexty",
                  fillcolor=color)
        self.data[-1]["meta"]["band"] = "lower"

    def bars(self, p, name, values, color, fmt=pct, face="pos"):
        self._add(p, name, self._text(name, values, fmt), face=face, type="bar", x=self._xs(), y=values,
                  width=0.8 / self.L, marker={"color": color, "line": {"width": 0}}, textposition="none")

    def paper(self, p, what, arr, color, fmt=pct, approx=True):
        """A per-layer array of the paper, on its own relative depth (layer+1)/16."""
        name = f"paper (approx.): {what}" if approx else f"paper: {what}"
        n = len(arr)
        xs = [round((i + 1) / n, 6) for i in range(n)]
        self._add(p, name, [f"<b>{name}</b><br>paper layer {i + 1} of {n} (depth {x:.2f})<br>{fmt(v)}"
                            for i, (x, v) in enumerate(zip(xs, arr))], role="paper", approx=approx, type="scatter",
                  mode="lines", x=xs, y=list(arr), opacity=0.85,
                  line={"color": color, "width": 2, "dash": "dash" if approx else "dot"})

    def _paper_line(self, p, what, xs, ys, label, color):
        name = f"paper: {what}"
        self._add(p, name, [f"<b>{name}</b><br>{label}"] * 2, role="paper", type="scatter", mode="lines", x=xs, y=ys,
                  line={"color": color, "width": 1.8, "dash": "dot"})

    def paper_hline(self, p, what, y, color, fmt=pct, x0=0.0, x1=1.0):
        """A number stated in the paper's text, drawn as a dotted horizontal line across depth."""
        self._paper_line(p, what, [x0, x1], [y, y], fmt(y), color)

    def paper_vline(self, p, what, x, y0, y1, color):
        self._paper_line(p, what, [x, x], [y0, y1], f"depth {x:.2f}", color)

    def paper_point(self, p, what, x, y, color, fmt=pct):
        name = f"paper: {what}"
        self._add(p, name, [f"<b>{name}</b><br>{fmt(y)}"], role="paper", type="scatter", mode="markers", x=[x], y=[y],
                  marker={"symbol": "diamond-open", "size": 12, "color": color, "line": {"width": 2, "color": color}})

    def no_data(self, p, reason, face="pos"):
        """Panel ``p`` (face ``face``) has nothing to draw: a note on it, and under the figure."""
        self.missing_faces.append((face, reason))
        ax = self.axes(p)
        self.annotations.append({"text": "no data: " + reason, "xref": f"{ax['xaxis']} domain",
                                 "yref": f"{ax['yaxis']} domain", "x": 0.5, "y": 0.5, "showarrow": False,
                                 "font": {"color": "#a33", "size": 12}})

    def spec(self, ytitle, *, yformat=".0%", ylog=False, ylog_percent=False, ylog_decades=False, yrange=None,
             barmode=None,
             xtitle=None, xlog=False, xrange=None, xformat=".2f", height=None) -> dict:
        n = len(self.faces)
        if xtitle is None:
            xtitle = DEPTH_TITLE
            if n == 1:
                xtitle += f" · ours L={self.L}, paper L={PAPER_LAYERS}"
        xaxis = {"title": {"text": xtitle, "font": {"size": 12}}, "showline": True, "linecolor": "#9aa1ab",
                 "ticks": "outside", "gridcolor": GRID, "zeroline": False}
        if xlog:
            xaxis.update(type="log")
        else:
            xaxis.update(range=xrange or [0, 1.03], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=xformat)
        yaxis = {"title": {"text": ytitle, "font": {"size": 12}}, "showline": True, "linecolor": "#9aa1ab",
                 "ticks": "outside", "gridcolor": GRID, "zeroline": False}
        if ylog:
            yaxis["type"] = "log"
            if ylog_percent:
                yaxis.update(log_percent_ticks(self.data))
            elif ylog_decades:
                yaxis.update(dtick=1, tickformat="~s")
        else:
            yaxis["tickformat"] = yformat
        if yrange is not None:
            yaxis["range"] = yrange
        layout = {
            "height": height or legend_height(self.data, per_row=1 if n == 1 else 3),
            "margin": {"l": 70, "r": 18, "t": 10, "b": 50},
            "paper_bgcolor": "white", "plot_bgcolor": "white",
            "font": {"family": FONT, "size": 12, "color": INK},
            "hovermode": "closest", "hoverlabel": {"font": {"family": FONT, "size": 12}},
            "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom",
                       "font": {"size": 11}, "traceorder": "normal"},
            "xaxis": xaxis, "yaxis": yaxis,
        }
        if barmode:
            layout["barmode"] = barmode
            layout["bargap"] = 0
        if n > 1:
            gap = 0.07
            w = (1 - gap) / 2
            for p, (face, domain) in enumerate(zip(self.faces, ([0, w], [1 - w, 1]))):
                title = {"text": f"<b>{FACE_LABEL[face]}</b> · {xtitle}", "font": {"size": 12}}
                layout["xaxis" if p == 0 else "xaxis2"] = {**xaxis, "domain": domain, "anchor": "y" if p == 0 else
                                                           "y2", "title": title}
            layout["yaxis2"] = {**yaxis, "anchor": "x2", "matches": "y", "title": {"text": ""}}
        if self.annotations:
            layout["annotations"] = self.annotations
        return {"data": self.data, "layout": layout}


def legend_height(data: list[dict], per_row: int) -> int:
    """Plot height that leaves room for the legend above it (about ``per_row`` entries fit on a line)."""
    entries = sum(1 for t in data if t.get("showlegend"))
    return 330 + 18 * math.ceil(entries / per_row)


def log_percent_ticks(data: list[dict]) -> dict:
    """Decade ticks labelled as percentages, and a range that holds every positive y of ``data``."""
    vals = [v for t in data for v in (t.get("y") or []) if isinstance(v, (int, float)) and v > 0]
    if not vals:
        return {}
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    ticks = [10.0 ** k for k in range(lo, hi + 1)]
    return {"tickvals": ticks, "ticktext": [pct(t) for t in ticks], "range": [lo - 0.15, hi + 0.15]}


# -- helpers --------------------------------------------------------------------------------------------------
def _note_gaps(fig: Figure, inp: ReportInputs, label: str, values) -> None:
    """Note under the figure which scanned layers have no value in a series we draw."""
    if values is None:
        return
    scanned = set(inp.scanned_layers)
    gaps = [i for i, v in enumerate(values) if v is None and i in scanned]
    if gaps:
        fig.notes.append(f"{label}: no value at layer{'s' if len(gaps) > 1 else ''} {layer_ranges(gaps)} (null in "
                         "analysis.json)")


def _why(inp: ReportInputs, block: str, face: str, b: dict | None, what: str) -> str:
    """Why a face of a figure is not drawn: the block is missing, or it lacks the numbers."""
    if b is None:
        return inp.missing_reason(block, face)
    return f"analysis.json '{block if face == 'pos' else block + '_neg'}' has no {what}"


def _unscanned_note(inp: ReportInputs) -> str | None:
    scanned = inp.scanned_layers
    if len(scanned) == inp.n_layers:
        return None
    return f"only layers {layer_ranges(scanned)} of 0–{inp.n_layers - 1} were scanned; the others are blank"


def _face_clause(face_label: str, text: str) -> str:
    return f"; on the {face_label} {text}"


def _finish(fig: Figure, inp: ReportInputs, plot: Plot, drawn: bool, block: str, **spec_kw) -> Figure:
    if not drawn:
        fig.missing = inp.missing_reason(block) if inp.block(block) is None else \
            f"analysis.json '{block}' has no per-layer numbers for this figure"
        fig.spec = None
        return fig
    for face, reason in plot.missing_faces:
        fig.notes.append(f"{FACE_LABEL[face]}: {reason}")
    note = _unscanned_note(inp)
    if note:
        fig.notes.append(note)
    fig.notes += [f"analysis.json notes {r}" for r in inp.reasons_for(block)]
    fig.spec = plot.spec(**spec_kw)
    fig.wide = len(plot.faces) > 1
    return fig


# -- §3 keys ---------------------------------------------------------------------------------------------------
PATTERN_PARTS = ("shallow", "both", "semantic", "none")
PART_LABEL = {"shallow": "shallow only", "both": "shallow + semantic", "semantic": "semantic only",
              "none": "no pattern"}


def _keys_unit(b: dict | None) -> bool:
    """True for a patterns block written before `ffkv explain` (the old classifier): its shallow / semantic /
    both / none are shares of keys, and it has no keys_* entries. The current block's are shares of trigger
    examples, with the key shares under keys_*."""
    return isinstance(b, dict) and not any(f"keys_{k}" in b for k in PATTERN_PARTS)


def fig2(inp: ReportInputs) -> Figure:
    fig = Figure("fig2", "2", "keys", "Patterns of the keys' trigger examples, per layer",
                 "Bars: share of the top trigger examples of the analysed keys of each layer that are covered only by "
                 "shallow patterns of their key (surface: last token, last two tokens, token class …), by shallow "
                 "and semantic ones, only by semantic ones (topic, article, words or subjects alike in meaning), or "
                 "by none (ffkv explain; tests in Definitions): the paper's unit, whose experts labelled trigger "
                 "examples. Black line: share of trigger examples some pattern covers. Line: share of keys with at "
                 "least one semantic pattern (semantic only or both), the same split counted in keys.")
    ref = inp.paper["fig2_patterns"]
    plot = Plot(inp, inp.faces)
    summary = {}
    old_faces = []
    for p, face in enumerate(inp.faces):
        b = inp.block("patterns", face)
        parts = {k: inp.series(b, k) for k in PATTERN_PARTS}
        cov = inp.series(b, "coverage")
        if b is None or (all(v is None for v in parts.values()) and cov is None):
            plot.no_data(p, _why(inp, "patterns", face, b, "per-layer shares"), face)
            continue
        old = _keys_unit(b)
        if old:
            old_faces.append(face)
        unit = "keys" if old else "triggers"
        for k in PATTERN_PARTS:
            if parts[k] is not None:
                plot.bars(p, f"ours: {unit}, {PART_LABEL[k]}", parts[k], COLORS[k], face=face)
        if cov is not None:
            plot.ours(p, "ours: triggers covered by a pattern", cov, COLORS["coverage"], face=face)
            _note_gaps(fig, inp, f"{FACE_LABEL[face]} coverage", cov)
        ksem = None
        if not old:
            ks, kb = inp.series(b, "keys_semantic"), inp.series(b, "keys_both")
            if ks is not None or kb is not None:
                ksem = [None if x is None and y is None else (x or 0.0) + (y or 0.0)
                        for x, y in zip(ks or [None] * inp.n_layers, kb or [None] * inp.n_layers)]
                plot.ours(p, "ours: keys with a semantic pattern", ksem, COLORS["keys_semantic"], face=face)
        lo, hi = ref["coverage_range"]
        plot.paper_hline(p, f"{lo:.0%}–{hi:.0%} of triggers covered", lo, COLORS["coverage"])
        plot.paper_hline(p, f"{lo:.0%}–{hi:.0%} of triggers covered", hi, COLORS["coverage"])
        t = ref["transition_layer"]
        plot.paper_vline(p, f"shallow → semantic from layer {t} of {PAPER_LAYERS}", (t - 0.5) / PAPER_LAYERS, 0, 1,
                         COLORS["semantic"])
        ppk = inp.series(b, "patterns_per_key")
        summary[face] = _fig2_summary(parts, cov, ppk, ksem, old)
    if old_faces:
        faces = join_words([FACE_LABEL[f] for f in old_faces])
        fig.notes.append(f"{faces}: this analysis.json was written before `ffkv explain` (its patterns block has no "
                         "keys_* shares), so its bars are shares of keys, not of trigger examples; rerun "
                         f"`ffkv analyze {inp.atlas_path} --only patterns` for the paper's unit")
    if summary:
        fig.verdict = _fig2_verdict(inp, summary)
    unit = "keys / of triggers covered" if old_faces and len(old_faces) == len(summary) else \
        "trigger examples / of keys"
    return _finish(fig, inp, plot, bool(summary), "patterns", ytitle=f"share of {unit} (%)", yrange=[0, 1.02],
                   barmode="stack")


def _fig2_summary(parts, cov, ppk, ksem, old) -> dict:
    n = len(next(v for v in [*parts.values(), cov] if v is not None))
    sh, se, bo = (parts[k] or [None] * n for k in ("shallow", "semantic", "both"))
    shallow_share, semantic_share = [], []
    for a, b, c in zip(sh, se, bo):
        covered = sum(x for x in (a, b, c) if x is not None)
        ok = a is not None and b is not None and covered > 0
        shallow_share.append(a / covered if ok else None)
        semantic_share.append(b / covered if ok else None)
    ppk_pts = points(ppk)
    return {"shallow": points(shallow_share), "semantic": points(semantic_share), "coverage": points(cov),
            "ppk": sum(v for _, _, v in ppk_pts) / len(ppk_pts) if ppk_pts else None,
            "keys_semantic": points(ksem), "old": old}


def _fig2_verdict(inp, summary) -> Verdict:
    s = summary.get("pos") or next(iter(summary.values()))
    if len(s["shallow"]) < 2:
        return no_verdict("the shallow/semantic split needs at least two layers with patterns")
    e_sh, e_se, l_sh, l_se = early(s["shallow"]), early(s["semantic"]), late(s["shallow"]), late(s["semantic"])
    low_ok, high_ok = e_sh > e_se, l_se > l_sh
    status = "yes" if low_ok and high_ok else "partly" if low_ok or high_ok else "no"
    if s["old"]:
        claim = (f"of the keys with a pattern, {pct(e_sh)} have only shallow ones in the lowest third of layers and "
                 f"{pct(l_se)} only semantic ones in the top third (shares of keys: an analysis.json from before "
                 "ffkv explain)")
    else:
        claim = (f"of the covered trigger examples, {pct(e_sh)} are covered only by shallow patterns in the lowest "
                 f"third of layers and {pct(l_se)} only by semantic ones in the top third")
    cov = [v for _, _, v in s["coverage"]]
    if cov:
        claim += f"; {pct_span(min(cov), max(cov))} of triggers are covered"
    if s["ppk"] is not None:
        claim += f", {num(s['ppk'])} patterns per key"
    if s["keys_semantic"]:
        ks = s["keys_semantic"]
        claim += f"; {pct(early(ks))} of keys have a semantic pattern low and {pct(late(ks))} high"
    ref = inp.paper["fig2_patterns"]
    paper = (f"of covered triggers ≥{ref['shallow_share_of_covered_layer1_min']:.0%} shallow at layer 1, ≈"
             f"{ref['semantic_share_of_covered_layer16_approx']:.0%} semantic at layer 16, shallow → semantic from "
             f"layer {ref['transition_layer']}, {ref['coverage_range'][0]:.0%}–{ref['coverage_range'][1]:.0%} "
             f"covered, {ref['patterns_per_key']} patterns per key")
    extra = ""
    if "neg" in summary and len(summary["neg"]["semantic"]) >= 2:
        n = summary["neg"]
        extra = _face_clause("negative face", f"{pct(early(n['shallow']))} shallow low, {pct(late(n['semantic']))} "
                                              "semantic high")
    return verdict(inp, status, claim, paper, ("patterns", "corpus", "instruct"), extra)


SCORE_SERIES = (
    # key in the patterns block, legend name, colour, baseline?
    ("sim_corr", "ours: simulation correlation", "sim", False),
    ("f1", "ours: firing F1", "f1", False),
    ("shuffled_sim_corr", "ours: shuffled-explanation baseline, sim. corr.", "sim_shuffled", True),
    ("shuffled_f1", "ours: shuffled-explanation baseline, F1", "f1_shuffled", True),
    ("lookup_sim_corr", "ours: last-token lookup baseline, sim. corr.", "sim_lookup", True),
    ("lookup_f1", "ours: last-token lookup baseline, F1", "f1_lookup", True),
)


def _score(v):
    return "n/a" if v is None else f"{v:.2f}"


def fig_explain(inp: ReportInputs) -> Figure:
    fig = Figure("explain", "E1", "keys", "Explanation scores per layer",
                 "Not a figure of the paper: how well each memory face's explanation (ffkv explain: its patterns, "
                 "fitted on its top triggers) predicts the face's coefficient on held-out text. Simulation "
                 "correlation: Pearson correlation of the activation simulated from the explanation alone with the "
                 "coefficient, over the face's top and random held-out prefixes (mean over keys). Firing F1: the "
                 "explanation's prediction that the face fires (coefficient ≥ 0.5 × its top scanned coefficient) "
                 "against where it does, over every held-out prefix (mean over the keys that fired there). Thin lines: "
                 "the same scores of two baselines, another key's explanation (shuffled) and a last-token lookup table "
                 "fitted on the same triggers. Dotted: Neuron-to-Graph's firing F1 per layer of a 6-layer model "
                 "(Foote et al. 2023), on its relative depth layer/6.")
    ref = inp.paper["n2g_firing_f1"]
    plot = Plot(inp, inp.faces)
    per_face = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("patterns", face)
        s = {k: inp.series(b, k) for k, *_ in SCORE_SERIES}
        if b is None or (s["sim_corr"] is None and s["f1"] is None):
            why = _why(inp, "patterns", face, b, "explanation scores") + \
                (" (written before `ffkv explain`)" if _keys_unit(b) else "")
            plot.no_data(p, why, face)
            continue
        for key, name, color, baseline in SCORE_SERIES:
            if s[key] is not None:
                plot.ours(p, name, s[key], COLORS[color], _score, baseline=baseline, face=face)
        plot.paper(p, f"Neuron-to-Graph firing F1, {ref['n_layers']}-layer model (Foote et al. 2023)", ref["f1"],
                   COLORS["f1"], _score, approx=False)
        _note_gaps(fig, inp, f"{FACE_LABEL[face]} simulation correlation", s["sim_corr"])
        scored, nk = inp.series(b, "scored_keys"), inp.series(b, "n_keys")
        bits = []
        if scored:
            sc = [v for v in scored if v is not None]
            bits.append(f"F1 over {num(sum(sc) / len(sc))} keys per layer on average that fired on held-out text"
                        + (f" (of {num(_mean(points(nk)))} explained)" if nk else ""))
        prec, rec = (_mean(points(inp.series(b, k))) for k in ("precision", "recall"))
        if prec is not None and rec is not None:
            bits.append(f"mean precision {_score(prec)}, recall {_score(rec)}")
        if bits:
            fig.notes.append(f"{FACE_LABEL[face]}: " + "; ".join(bits))
        per_face[face] = {k: s[k] for k, *_ in SCORE_SERIES}
    if per_face:
        fig.verdict = _explain_verdict(inp, per_face)
    vals = [v for t in plot.data if t["meta"]["role"] != "paper" for v in t.get("y") or [] if v is not None]
    low = min([0.0, *vals])
    drawn = bool(per_face)
    fig = _finish(fig, inp, plot, drawn, "patterns", ytitle="score (mean over keys)", yformat=".1f",
                  yrange=[low - 0.05 if low < 0 else 0, 1.02])
    b = inp.block("patterns")
    if not drawn and b is not None:
        fig.missing = ("analysis.json 'patterns' has no explanation scores (written before `ffkv explain`): run "
                       f"`ffkv explain {inp.atlas_path}` and `ffkv analyze {inp.atlas_path} --only patterns`"
                       ) if _keys_unit(b) else (
            "analysis.json 'patterns' has no explanation scores (sim_corr and f1 are null: was `ffkv explain` run "
            f"with --no-score?): run `ffkv explain {inp.atlas_path}` and `ffkv analyze {inp.atlas_path} --only "
            "patterns`")
    return fig


def _interp(pts_x: list[float], pts_y: list[float], x: float) -> float:
    """Linear interpolation on a curve given on increasing x, held constant beyond its ends."""
    if x <= pts_x[0]:
        return pts_y[0]
    for (x0, y0), (x1, y1) in zip(zip(pts_x, pts_y), zip(pts_x[1:], pts_y[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts_y[-1]


def _beats(ours, base) -> tuple[int, int]:
    """(layers where ours is above the baseline, layers with both)."""
    if ours is None or base is None:
        return 0, 0
    both = [(a, b) for a, b in zip(ours, base) if a is not None and b is not None]
    return sum(a > b for a, b in both), len(both)


def _explain_verdict(inp, per_face) -> Verdict:
    s = per_face.get("pos") or next(iter(per_face.values()))
    f1, sim = points(s["f1"]), points(s["sim_corr"])
    ref = inp.paper["n2g_firing_f1"]
    n2g = paper_points(ref["f1"])
    n2g_text = (f"Neuron-to-Graph, Foote et al. 2023: firing F1 {_score(early(n2g))} in the lowest third → "
                f"{_score(late(n2g))} in the top third of a {ref['n_layers']}-layer model")
    if not f1 and not sim:
        return no_verdict("no explanation scores")
    bits = []
    gap = None
    if f1:
        xs, ys = [x for x, _, _ in n2g], [v for _, _, v in n2g]
        gap = float(sum(v - _interp(xs, ys, x) for x, _, v in f1) / len(f1))
        bits.append(f"our explanations' firing F1 is {_score(early(f1))} in the lowest third of layers and "
                    f"{_score(late(f1))} in the top third ({'+' if gap >= 0 else '−'}{abs(gap):.2f} against N2G at "
                    "the same relative depth, on average)")
    if sim:
        bits.append(f"their simulation correlation {_score(_mean(sim))} on average")
    wins, base_bits = {}, []
    for base, label in (("shuffled", "the shuffled explanation"), ("lookup", "the last-token lookup")):
        w = {m: _beats(s[m], s[f"{base}_{m}"]) for m in ("f1", "sim_corr")}
        wins[base] = (sum(a for a, _ in w.values()), sum(n for _, n in w.values()))
        said = [f"{a} of {n} layers on {what}" for m, what in (("f1", "F1"), ("sim_corr", "simulation correlation"))
                for a, n in [w[m]] if n]
        if said:
            base_bits.append(f"{label} in {join_words(said)}")
    claim = "; ".join(bits)
    if base_bits:
        claim += "; they beat " + "; ".join(base_bits)
    share = {b: (w / n if n else None) for b, (w, n) in wins.items()}
    beat_all = all(v is not None and v >= 0.8 for v in share.values())
    beat_shuffled = share["shuffled"] is not None and share["shuffled"] >= 0.5
    at_n2g = gap is not None and gap >= -0.1
    status = "yes" if beat_all and at_n2g else "partly" if beat_shuffled else "no"
    level = "no F1 to set beside N2G's" if gap is None else "above N2G's level" if gap > 0.1 else \
        "at N2G's level" if at_n2g else "below N2G's level"
    lead = level + \
        (", above both baselines" if beat_all else ", above the shuffled explanation" if beat_shuffled else
         ", not above the shuffled explanation")
    extra = ""
    if "neg" in per_face and points(per_face["neg"]["f1"]):
        n = per_face["neg"]
        extra = _face_clause("negative face", f"F1 {_score(_mean(points(n['f1'])))} and simulation correlation "
                                              f"{_score(_mean(points(n['sim_corr'])))} on average")
    text = f"{lead[0].upper()}{lead[1:]}: {claim} (paper: {n2g_text}){extra}."
    return Verdict(status, text)


def fig3(inp: ReportInputs) -> Figure:
    fig = Figure("fig3", "3", "keys", "Relative change of the memory coefficient when a token is removed",
                 "For each analysed key, its top triggers are re-run with the first, the last or a random token "
                 "removed; the plot shows the mean relative change of the coefficient (−50% = halved; the paper's "
                 "statistic) with its 95% bootstrap interval, and the median as a thin line. Signed (gated) "
                 "coefficients can cross zero, so a mean can pass −100%; Fig 3b counts those crossings.")
    ref = inp.paper["fig3_token_removal"]
    plot = Plot(inp, inp.faces)
    per_face = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("token_removal", face)
        s = {k: inp.series(b, k) for k in ("last", "first", "random")}
        if b is None or all(v is None for v in s.values()):
            plot.no_data(p, _why(inp, "token_removal", face, b, "per-layer changes"), face)
            continue
        for k, label in (("last", "last token removed"), ("first", "first token removed"),
                         ("random", "random token removed")):
            if s[k] is not None:
                ci = inp.intervals(b, f"{k}_ci")
                if ci is not None:
                    plot.band(p, f"ours: {label}, 95% interval", *_edges(ci), BAND_COLORS[k], spct, face=face)
                plot.ours(p, f"ours: {label}", s[k], COLORS[k], spct, face=face)
                median = inp.series(b, f"{k}_median")
                if median is not None:
                    plot.ours(p, f"ours: {label}, median", median, COLORS[k], spct, face=face, thin=True)
            plot.paper(p, label, ref[f"{k}_approx"], COLORS[k], spct)
        _note_gaps(fig, inp, f"{FACE_LABEL[face]}, last token", s["last"])
        nk, sk = inp.series(b, "n_keys"), inp.series(b, "skipped")
        n_last = inp.series(b, "last_n")
        if nk or sk or n_last:
            bits = []
            if nk:
                bits.append(f"{num(sum(v for v in nk if v is not None) / len([v for v in nk if v is not None]))} "
                            "keys per layer on average")
            if n_last:
                present = [v for v in n_last if v is not None]
                bits.append(f"{num(sum(present) / len(present))} triggers per layer measured")
            if sk:
                bits.append(f"{sum(v for v in sk if v is not None):,.0f} triggers skipped in all (zero coefficient "
                            "or undefined removal)")
            fig.notes.append(f"{FACE_LABEL[face]}: " + ", ".join(bits))
        per_face[face] = {k: points(v) for k, v in s.items()}
        per_face[face]["last_ci"] = inp.intervals(b, "last_ci")
    if per_face:
        fig.verdict = _fig3_verdict(inp, per_face)
    return _finish(fig, inp, plot, bool(per_face), "token_removal", ytitle="relative change of coefficient (%)",
                   yformat=".0%")


def fig3_sign(inp: ReportInputs) -> Figure:
    fig = Figure("fig3b", "3b", "keys", "Share of triggers whose coefficient changes sign when a token is removed",
                 "Not in the paper (its ReLU coefficients cannot change sign): for the triggers of Fig 3, the share "
                 "whose coefficient crosses zero when the first, the last or a random token is removed, with 95% "
                 "Wilson intervals. A crossing is a relative change below −100%, which pulls Fig 3's mean down.")
    plot = Plot(inp, inp.faces)
    drawn = False
    shares = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("token_removal", face)
        s = {k: inp.series(b, f"{k}_sign_change") for k in ("last", "first", "random")}
        if b is None or all(v is None for v in s.values()):
            plot.no_data(p, _why(inp, "token_removal", face, b, "sign-change shares (an analysis.json from "
                                 "before they were recorded)"), face)
            continue
        drawn = True
        for k, label in (("last", "last token removed"), ("first", "first token removed"),
                         ("random", "random token removed")):
            if s[k] is None:
                continue
            ci = inp.intervals(b, f"{k}_sign_change_ci")
            if ci is not None:
                plot.band(p, f"ours: {label}, 95% interval", *_edges(ci), BAND_COLORS[k], pct, face=face)
            plot.ours(p, f"ours: {label}", s[k], COLORS[k], pct, face=face)
        plot.paper_hline(p, "none (ReLU coefficients cannot change sign)", 0.0, COLORS["uniform"])
        shares[face] = s
    if drawn:
        s = shares.get("pos") or next(iter(shares.values()))
        if s["last"]:
            pts = points(s["last"])
            claim = (f"removing the last token flips the coefficient's sign for {pct(early(pts))} of triggers in the "
                     f"lowest third of layers and {pct(late(pts))} in the top third")
            fig.verdict = Verdict("na", claim[0].upper() + claim[1:] + " (paper: no such number; its ReLU "
                                  "coefficients cannot change sign).")
    return _finish(fig, inp, plot, drawn, "token_removal", ytitle="share of triggers", yformat=".0%")


def _edges(intervals) -> tuple[list, list]:
    """Per-layer intervals [low, high] | None -> (lows, highs), the edges of a shaded band."""
    return [c[0] if c else None for c in intervals], [c[1] if c else None for c in intervals]


def _mean(pts):
    return sum(v for _, _, v in pts) / len(pts) if pts else None


def _fig3_verdict(inp, per_face) -> Verdict:
    s = per_face.get("pos") or next(iter(per_face.values()))
    if not s["last"]:
        return no_verdict("no last-token removal numbers")
    e_last, l_last = early(s["last"]), late(s["last"])
    m_last, m_first, m_rand = _mean(s["last"]), _mean(s["first"]), _mean(s["random"])
    others = [m for m in (m_first, m_rand) if m is not None]
    ordering = bool(others) and m_last < min(others)
    trend = len(s["last"]) >= 2 and l_last - e_last > 0.05
    r = inp.paper["fig3_token_removal"]["ranges"]
    # the level: the last layer's interval must reach the paper's last-layer value (−20%) for a full "yes"
    ci = s.get("last_ci")
    last_layer = max((i for i, v in enumerate(ci) if v is not None), default=None) if ci else None
    level = last_layer is not None and agree(ci[last_layer], r["last_layer16"])
    status = "yes" if ordering and trend and (level or ci is None) else "partly" if ordering or trend else "no"
    claim = (f"removing the last token changes the coefficient by {spct(e_last)} in the lowest third of layers and "
             f"{spct(l_last)} in the top third")
    if last_layer is not None:
        claim += (f" ({spct(s['last'][-1][2]) if s['last'] else ''} at the last layer, 95% interval "
                  f"{spct(ci[last_layer][0])} to {spct(ci[last_layer][1])})")
    if others:
        claim += f", against {spct(m_first)} for the first token and {spct(m_rand)} for a random one"
    paper = (f"last ≈{spct(sum(r['last_layer1']) / 2)} at layer 1 rising to {spct(r['last_layer16'])} at layer 16, "
             f"first {spct(r['first'][0])} to {spct(r['first'][1])}, random {spct(r['random'][0])} to "
             f"{spct(r['random'][1])}")
    extra = ""
    n = per_face.get("neg")
    if n and n["last"] and "pos" in per_face:
        extra = _face_clause("negative face", f"removing the last token gives {spct(early(n['last']))} low and "
                                              f"{spct(late(n['last']))} high")
    return verdict(inp, status, claim, paper, ("gated", "unit", "corpus"), extra)


# -- §4 values -------------------------------------------------------------------------------------------------
def _error_y(values, intervals, color) -> dict:
    """plotly asymmetric error bars from per-layer values and their [low, high] intervals (None: no bar)."""
    intervals = intervals or [None] * len(values)
    plus = [None if v is None or ci is None else max(0.0, ci[1] - v) for v, ci in zip(values, intervals)]
    minus = [None if v is None or ci is None else max(0.0, v - ci[0]) for v, ci in zip(values, intervals)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "color": color, "thickness": 1,
            "width": 2}


def _error_bars(trace: dict, values, intervals, fmt) -> None:
    """Draw a series' 95% intervals as error bars on its trace, and name them in its hover text."""
    if not intervals:
        return
    trace["error_y"] = _error_y(values, intervals, (trace.get("line") or {}).get("color", INK))
    trace["text"] = [t if t is None or ci is None else f"{t}<br>95% interval {fmt(ci[0])}–{fmt(ci[1])}"
                     for t, ci in zip(trace["text"], intervals)]
    trace["meta"]["interval"] = "95%"


def _envelope(intervals, lo: float, hi: float) -> list[float] | None:
    """[lowest low, highest high] of the per-layer intervals with lo < relative depth ≤ hi: the range every
    layer's 95% interval there falls in."""
    if not intervals:
        return None
    n = len(intervals)
    inside = [ci for i, ci in enumerate(intervals) if ci is not None and lo < (i + 1) / n <= hi]
    return [min(c[0] for c in inside), max(c[1] for c in inside)] if inside else None


def _span(interval, fmt=pct, what="per-layer 95% intervals") -> str:
    return "" if interval is None else f" ({what} {fmt(interval[0])}–{fmt(interval[1])})"


def _pooled(rates, totals, lo: float, hi: float) -> tuple[float, list[float], int] | None:
    """(share, Wilson 95% interval, memories) of a per-layer share pooled over the layers with
    lo < relative depth ≤ hi: the hits (rate × total, whole numbers) and totals summed. None without totals."""
    if not rates or not totals:
        return None
    n_layers = len(rates)
    pairs = [(r, t) for i, (r, t) in enumerate(zip(rates, totals)) if r is not None and t
             and lo < (i + 1) / n_layers <= hi]
    if not pairs:
        return None
    hits, total = sum(round(r * t) for r, t in pairs), sum(t for _, t in pairs)
    return hits / total, wilson(hits, total), int(total)


def _pooled_text(pooled) -> str:
    share, ci, total = pooled
    return f"{pct(share)} (95% interval {pct(ci[0])}–{pct(ci[1])}, pooled over its {total:,} memories)"


def _separated(ours, base, lo: float = 0.0, hi: float = 1.0) -> tuple[int, int]:
    """(layers where ours' interval lies wholly above the baseline's, layers with both) for lo < depth ≤ hi."""
    if not ours or not base:
        return 0, 0
    n = len(ours)
    both = [(a, b) for i, (a, b) in enumerate(zip(ours, base)) if a is not None and b is not None
            and lo < (i + 1) / n <= hi]
    return sum(a[0] > b[1] for a, b in both), len(both)


def _paper_range(arr, lo: float, hi: float) -> tuple[float, float]:
    """Smallest and largest value of a paper curve with lo < relative depth ≤ hi."""
    vals = [v for x, _, v in paper_points(arr) if lo < x <= hi]
    return min(vals), max(vals)


def fig4(inp: ReportInputs) -> Figure:
    fig = Figure("fig4", "4", "values", "Agreement rate: a value's top token is its key's top-1 trigger's next token",
                 "Per layer, the share of memories whose value's argmax token (v·E) equals the next token after the "
                 "key's top-1 trigger; with the same value projected through the final norm, a frequency-matched "
                 "baseline (the top-1 trigger of another memory of the layer) and the uniform baseline 1/|V|. Error "
                 "bars: Wilson 95% intervals over the layer's memories. Log axis.")
    ref = inp.paper["fig4_agreement_rate"]
    plot = Plot(inp, inp.faces)
    per_face = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("values", face)
        ag = inp.series(b, "agreement_rate")
        if b is None or ag is None:
            plot.no_data(p, _why(inp, "values", face, b, "agreement_rate"), face)
            continue
        normed, freq, rnd = (inp.series(b, k) for k in ("agreement_rate_normed", "frequency_baseline",
                                                       "random_baseline"))
        ag_ci, freq_ci = inp.intervals(b, "agreement_rate_ci"), inp.intervals(b,
                                                                                        "frequency_baseline_ci")
        trace = plot.ours(p, "ours: agreement (v·E)", ag, COLORS["main"], face=face, positive_only=True)
        _error_bars(trace, trace["y"], ag_ci, pct)
        if normed is not None:
            plot.ours(p, "ours: agreement (through final norm)", normed, COLORS["alt"], face=face,
                      positive_only=True)
        if freq is not None:
            trace = plot.ours(p, "ours: frequency-matched baseline", freq, COLORS["freq"], face=face, baseline=True,
                              positive_only=True)
            _error_bars(trace, trace["y"], freq_ci, pct)
        if rnd is not None:
            plot.ours(p, "ours: uniform baseline 1/|V|", rnd, COLORS["uniform"], face=face, baseline=True,
                      positive_only=True)
        plot.paper(p, "agreement rate", ref["approx"], COLORS["main"])
        plot.paper_hline(p, f"uniform baseline {pct(ref['random_baseline'])}", ref["random_baseline"],
                         COLORS["uniform"])
        zeros = [i for i, v in enumerate(ag) if v is not None and v <= 0]
        if zeros:
            fig.notes.append(f"{FACE_LABEL[face]}: agreement is 0 at layer{'s' if len(zeros) > 1 else ''} "
                             f"{layer_ranges(zeros)} (not drawn on the log axis)")
        _note_gaps(fig, inp, FACE_LABEL[face], ag)
        per_face[face] = {"ag": points(ag), "freq": points(freq), "rnd": points(rnd), "ag_ci": ag_ci,
                          "freq_ci": freq_ci, "pooled": _pooled(ag, inp.series(b, "n_targets"), 0.75, 1)}
    if per_face:
        fig.verdict = _fig4_verdict(inp, per_face)
    return _finish(fig, inp, plot, bool(per_face), "values", ytitle="agreement rate (%, log scale)", ylog=True,
                   ylog_percent=True)


def _fig4_verdict(inp, per_face) -> Verdict:
    s = per_face.get("pos") or next(iter(per_face.values()))
    ag = s["ag"]
    if len(ag) < 2:
        return no_verdict("the agreement trend needs at least two layers")
    low = mean_between(ag, 0, 0.5, "first")
    top = mean_between(ag, 0.75, 1, "last")
    peak = max(ag, key=lambda t: t[2])
    freq_top = mean_between(s["freq"], 0.75, 1, "last") if s["freq"] else None
    rnd = _mean(s["rnd"]) if s["rnd"] else None
    ref = inp.paper["fig4_agreement_rate"]
    rising = top > 2 * low and top - low > 0.002
    above, compared = _separated(s.get("ag_ci"), s.get("freq_ci"), 0.75, 1)
    if compared:  # the intervals decide: most top-quarter layers clear of their baseline
        above_base = above > compared / 2
    else:
        above_base = freq_top is None or top > freq_top
    pooled = s.get("pooled")
    top_env = None if pooled else _envelope(s.get("ag_ci"), 0.75, 1)
    paper_top = _paper_range(ref["approx"], 0.75, 1)
    interval = pooled[1] if pooled else top_env
    # "reproduces" needs the paper's top-quarter level inside our interval (a file without intervals: our number
    # itself inside the paper's range)
    level = agree(interval, *paper_top) if interval is not None else paper_top[0] <= top <= paper_top[1]
    status = "yes" if rising and above_base and level else \
        "partly" if rising or (above_base and top > 0.005) else "no"
    top_text = _pooled_text(pooled) if pooled else f"{pct(top)}{_span(top_env)}"
    claim = (f"agreement is {pct(low)} in the lower half of layers and {top_text} in the top quarter"
             f" (peak {pct(peak[2])} at layer {peak[1]})")
    if freq_top is not None and freq_top > 0:
        claim += f", {top / freq_top:.1f}× the frequency-matched baseline ({pct(freq_top)})"
    if compared:
        claim += f"; its interval lies above the baseline's in {above} of {compared} top-quarter layers"
    if rnd:
        claim += f"; {top / rnd:,.0f}× uniform 1/|V| ({pct(rnd)})"
    paper = (f"≈0 up to layer 10 of 16, rising to {pct(ref['approx'][-1])} at layer 16 ({pct_span(*paper_top)} in "
             f"its top quarter); uniform {pct(ref['random_baseline'])}")
    extra = ""
    n = per_face.get("neg")
    if n and len(n["ag"]) >= 2 and "pos" in per_face:
        extra = _face_clause("negative face", f"agreement is {pct(mean_between(n['ag'], 0, 0.5, 'first'))} low and "
                                              f"{pct(mean_between(n['ag'], 0.75, 1, 'last'))} high")
    return verdict(inp, status, claim, paper, ("corpus", "vocab", "instruct", "quantised"), extra)


def fig4b(inp: ReportInputs) -> Figure:
    fig = Figure("fig4b", "4b", "values", "Suppression: a value's bottom token is its key's top-1 trigger's next token",
                 "Not a figure of the paper, the mirror of Fig 4: per layer, the share of memories whose value "
                 "pushes the next token after the key's top-1 trigger to the very bottom of its projection (argmin "
                 "of v·E; of −v·E on the negative face), and the share with it among the 10 lowest tokens; against "
                 "a frequency-matched baseline (each value's bottom token against another memory's trigger) and the "
                 "uniform 1/|V|. Thin: Fig 4's agreement for comparison; dashed: the paper's agreement rate (the "
                 "paper does not measure suppression). Error bars: Wilson 95% intervals of the two suppression shares "
                 "(the baseline's enter the verdict). Log axis.")
    ref = inp.paper["fig4_agreement_rate"]
    plot = Plot(inp, inp.faces)
    per_face = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("values", face)
        sup = inp.series(b, "suppression_rate")
        if b is None or sup is None:
            plot.no_data(p, _why(inp, "values", face, b, "suppression_rate (written before it was measured: "
                                 f"rerun `ffkv analyze {inp.atlas_path} --only values`)"), face)
            continue
        bottom, freq, ag, rnd = (inp.series(b, k) for k in ("suppression_bottom10_rate",
                                                           "suppression_frequency_baseline", "agreement_rate",
                                                           "random_baseline"))
        cis = {k: inp.intervals(b, f"{k}_ci") for k in ("suppression_rate", "suppression_bottom10_rate",
                                                               "suppression_frequency_baseline")}
        trace = plot.ours(p, "ours: suppression (bottom token)", sup, COLORS["last"], face=face, positive_only=True)
        _error_bars(trace, trace["y"], cis["suppression_rate"], pct)
        if bottom is not None:
            trace = plot.ours(p, "ours: next token in the bottom 10", bottom, COLORS["random"], face=face,
                              positive_only=True)
            _error_bars(trace, trace["y"], cis["suppression_bottom10_rate"], pct)
        if freq is not None:
            plot.ours(p, "ours: suppression, frequency-matched baseline", freq, COLORS["freq"], face=face,
                      baseline=True, positive_only=True)
        if rnd is not None:
            plot.ours(p, "ours: uniform baseline 1/|V|", rnd, COLORS["uniform"], face=face, baseline=True,
                      positive_only=True)
        if ag is not None:
            plot.ours(p, "ours: agreement (Fig 4)", ag, COLORS["main"], face=face, thin=True, positive_only=True)
        plot.paper(p, "agreement rate (no suppression measured)", ref["approx"], COLORS["main"])
        zeros = [i for i, v in enumerate(sup) if v is not None and v <= 0]
        if zeros:
            fig.notes.append(f"{FACE_LABEL[face]}: suppression is 0 at layer{'s' if len(zeros) > 1 else ''} "
                             f"{layer_ranges(zeros)} (not drawn on the log axis)")
        _note_gaps(fig, inp, FACE_LABEL[face], sup)
        totals = inp.series(b, "n_targets")
        per_face[face] = {"sup": points(sup), "ag": points(ag), "freq": points(freq), "bottom": points(bottom),
                          "sup_ci": cis["suppression_rate"], "freq_ci": cis["suppression_frequency_baseline"],
                          "pooled": _pooled(sup, totals, 2 / 3, 1), "ag_pooled": _pooled(ag, totals, 2 / 3, 1)}
    if per_face:
        fig.verdict = _fig4b_verdict(per_face, ref["approx"])
    return _finish(fig, inp, plot, bool(per_face), "values", ytitle="share of memories (%, log scale)", ylog=True,
                   ylog_percent=True)


def _fig4b_verdict(per_face, paper_agreement) -> Verdict:
    """Not the paper's: says where suppression stands against its baseline and against agreement; status 'na'
    (nothing of the paper to reproduce)."""
    bits = []
    for face, s in per_face.items():
        sup = s["sup"]
        if not sup:
            continue
        low, top = early(sup), late(sup)
        top_text = _pooled_text(s["pooled"]) if s["pooled"] else f"{pct(top)}{_span(_envelope(s['sup_ci'], 2 / 3, 1))}"
        bit = f"on the {FACE_LABEL[face]}, suppression is {pct(low)} in the lowest third of layers and {top_text} " \
              "in the top third"
        if s["ag_pooled"] or s["ag"]:
            bit += f" (agreement {pct(s['ag_pooled'][0] if s['ag_pooled'] else late(s['ag']))})"
        _, last_layer, last = sup[-1]
        last_ci = s["sup_ci"][last_layer] if s["sup_ci"] else None
        bit += f", {pct(last)}{_span(last_ci, what='95% interval')} at layer {last_layer}"
        ag_last = [v for _, layer, v in s["ag"] if layer == last_layer]
        if ag_last:
            bit += f" (agreement {pct(ag_last[0])})"
        above, compared = _separated(s["sup_ci"], s["freq_ci"], 2 / 3, 1)
        if compared:
            bit += (f"; its interval lies above its frequency-matched baseline's ({pct(late(s['freq']))}) in "
                    f"{above} of {compared} top-third layers")
        if s["bottom"]:
            bit += f"; the next token is among the 10 lowest in {pct(late(s['bottom']))} there"
        bits.append(bit)
    if not bits:
        return no_verdict("no suppression numbers")
    return Verdict("na", "Not in the paper: " + "; ".join(bits) + f" (paper: suppression not measured; agreement, "
                   f"its mirror, reaches {pct(paper_agreement[-1])} at layer 16).")


def fig5(inp: ReportInputs) -> Figure:
    fig = Figure("fig5", "5", "values", "Rank of the trigger's next token under the value's distribution",
                 "Per layer, the distribution over memories of the rank (0 = top) of the key's top-1 trigger's next "
                 "token in the value's vocabulary distribution softmax(v·E), divided by the vocabulary size |V| so "
                 "that models with different vocabularies line up: median (error bars: bootstrap 95% interval), "
                 "25–75% and 10–90% bands. A random value gives a median near 50%; the paper's median ranks are "
                 "divided by its |V|. Log axis.")
    ref = inp.paper["fig5_next_token_rank"]
    paper_vocab = inp.paper["model"].get("vocab_approx", 267744)
    vocab = inp.traits["vocab"]
    plot = Plot(inp, inp.faces)
    per_face = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("values", face)
        med = inp.series(b, "next_token_rank_median_normed")
        q = {k: inp.series(b, "rank_quantiles_normed", k) for k in QUANTILE_KEYS}
        med_ci = inp.intervals(b, "next_token_rank_median_normed_ci")
        if med is None and isinstance(vocab, int) and vocab > 0:  # written before the normalised keys
            med = _scaled(inp.series(b, "next_token_rank_median"), vocab)
            q = {k: _scaled(inp.series(b, "rank_quantiles", k), vocab) for k in QUANTILE_KEYS}
            med = med or q["q50"]
            if med is not None:
                fig.notes.append(f"{FACE_LABEL[face]}: ranks divided by the manifest's vocabulary size {vocab:,} "
                                 "(analysis.json predates the normalised ranks; no interval)")
        if b is None or (med is None and all(v is None for v in q.values())):
            plot.no_data(p, _why(inp, "values", face, b, "rank numbers"), face)
            continue
        if q["q10"] is not None and q["q90"] is not None:
            plot.band(p, "ours: 10–90% of memories", _positive(q["q10"]), _positive(q["q90"]), "rgba(37,99,168,0.12)",
                      pct, face)
        if q["q25"] is not None and q["q75"] is not None:
            plot.band(p, "ours: 25–75% of memories", _positive(q["q25"]), _positive(q["q75"]), "rgba(37,99,168,0.25)",
                      pct, face)
        if med is not None:
            trace = plot.ours(p, "ours: median rank / |V|", med, COLORS["main"], pct, face=face, positive_only=True)
            _error_bars(trace, trace["y"], med_ci, pct)
        plot.ours(p, "ours: random value (median ≈ 50%)", [0.5] * inp.n_layers, COLORS["uniform"], pct, face=face,
                  baseline=True)
        plot.paper(p, f"median rank / its |V| ≈ {paper_vocab:,}", [v / paper_vocab for v in ref["median_approx"]],
                   COLORS["main"], pct)
        _note_gaps(fig, inp, FACE_LABEL[face], med)
        zeros = [i for i, v in enumerate(med or []) if v is not None and v <= 0]
        if zeros:
            fig.notes.append(f"{FACE_LABEL[face]}: the median rank is 0 at layer{'s' if len(zeros) > 1 else ''} "
                             f"{layer_ranges(zeros)} (not drawn on the log axis)")
        per_face[face] = {"med": points(med), "ci": med_ci}
    if per_face:
        fig.verdict = _fig5_verdict(inp, per_face)
    return _finish(fig, inp, plot, bool(per_face), "values", ytitle="rank of the next token / |V| (log scale)",
                   ylog=True, ylog_percent=True)


QUANTILE_KEYS = ("q10", "q25", "q50", "q75", "q90")


def _scaled(values, by: float):
    return None if values is None else [None if v is None else v / by for v in values]


def _positive(values):
    """What a log axis can draw: values ≤ 0 become gaps."""
    return None if values is None else [v if v is not None and v > 0 else None for v in values]

CHANCE_RANK = 0.25
"""A median normalised rank above this (a random value's is 0.5) is called near chance."""


def _fig5_verdict(inp, per_face) -> Verdict:
    s = per_face.get("pos") or next(iter(per_face.values()))
    med = s["med"]
    if len(med) < 2:
        return no_verdict("the rank trend needs at least two layers")
    lo, hi = early(med), late(med)
    env_lo, env_hi = _envelope(s["ci"], 0, 1 / 3), _envelope(s["ci"], 2 / 3, 1)
    pv = inp.paper["model"].get("vocab_approx", 267744)
    ref = [v / pv for v in inp.paper["fig5_next_token_rank"]["median_approx"]]
    p_lo, p_hi = early(paper_points(ref)), late(paper_points(ref))
    paper_top = _paper_range(ref, 2 / 3, 1)
    ratio = lo / max(hi, 1e-12)
    fell = env_lo[0] > env_hi[1] if env_lo and env_hi else ratio >= 1.25
    at_paper = agree(env_hi, *paper_top) if env_hi else hi <= paper_top[1]
    status = "yes" if ratio >= 3 and at_paper else "partly" if fell and ratio >= 1.25 else "no"
    where = "near chance (a random value's median is 50%)" if hi >= CHANCE_RANK else "well below chance (50%)"
    claim = (f"the median rank of the next token is {pct(lo)} of |V|{_span(env_lo)} in the lowest third of layers "
             f"and {pct(hi)}{_span(env_hi)} in the top third: {where}, {ratio:.1f}× lower"
             + ("" if fell or not env_lo else ", within the intervals' overlap"))
    paper = (f"{pct(p_lo)} of its |V| ≈ {pv / 1000:.0f}k falling to {pct(p_hi)} in its top third "
             f"({pct_span(*paper_top)}), {p_lo / p_hi:.0f}× lower")
    extra = ""
    n = per_face.get("neg")
    if n and len(n["med"]) >= 2 and "pos" in per_face:
        extra = _face_clause("negative face", f"{pct(early(n['med']))} to {pct(late(n['med']))}")
    return verdict(inp, status, claim, paper, ("vocab", "corpus", "instruct"), extra)


def fig6(inp: ReportInputs) -> Figure:
    fig = Figure("fig6", "6", "values", "Agreement rate against the value's maximal probability",
                 "Memories binned by the largest probability of their value's distribution softmax(v·E); per bin, "
                 "the share whose top token agrees with the key's top-1 trigger's next token (error bars: Wilson "
                 "95% intervals). Log x axis; hover for the number of memories per bin. Below: the paper's count of "
                 "the 100 most confident values in the upper layers (relative depth above 10/16, its layers 11–16) "
                 "and agreeing with their triggers.")
    ref = inp.paper["fig6_agreement_vs_max_prob"]
    plot = Plot(inp, inp.faces)
    per_face = {}
    for p, face in enumerate(inp.faces):
        b = inp.block("values", face)
        d = (b or {}).get("max_prob_vs_agreement")
        bins = _bins(d)
        if not bins:
            plot.no_data(p, _why(inp, "values", face, b, "usable max_prob_vs_agreement"), face)
            continue
        name = "ours: agreement per max-probability bin"
        trace = plot._add(p, name, [f"<b>{name}</b><br>max p in [{lo:.3g}, {hi:.3g})<br>agreement {pct(a)}<br>"
                                    f"{n:,.0f} memories" for _, lo, hi, a, n, _ in bins], face=face, type="scatter",
                          mode="lines+markers", x=[c for c, *_ in bins], y=[a for _, _, _, a, _, _ in bins],
                          line={"color": COLORS["main"], "width": 2.4}, marker={"size": 7, "color": COLORS["main"]})
        _error_bars(trace, trace["y"], [ci for *_, ci in bins], pct)
        plot.paper_point(p, f"≈{pct(ref['top_bin_agreement'])} in its highest bin (max p ≈ "
                         f"{ref['bins_max_prob'][-1]:g}, |V| ≈ 268k)", ref["bins_max_prob"][-1],
                         ref["top_bin_agreement"], COLORS["main"])
        summary = _top_max_prob(b)
        if summary:
            fig.notes.append(f"{FACE_LABEL[face]}: {_top_max_prob_text(summary, ref)}")
        per_face[face] = {"bins": bins, "top": summary}
    if per_face:
        fig.verdict = _fig6_verdict(inp, per_face)
    return _finish(fig, inp, plot, bool(per_face), "values", ytitle="agreement rate (%)", yrange=[0, 1.02],
                   xtitle="maximal probability of the value's distribution (log scale)", xlog=True)


def _bins(d) -> list[tuple[float, float, float, float, float, tuple[float, float] | None]]:
    """(centre, lo, hi, agreement, count, 95% interval or None) of the non-empty bins."""
    if not isinstance(d, dict):
        return []
    edges, agree_, count, cis = d.get("bin_edges"), d.get("agreement"), d.get("count"), d.get("agreement_ci")
    if not isinstance(edges, list) or not isinstance(agree_, list) or len(edges) != len(agree_) + 1:
        return []
    count = count if isinstance(count, list) and len(count) == len(agree_) else [None] * len(agree_)
    cis = cis if isinstance(cis, list) and len(cis) == len(agree_) else [None] * len(agree_)
    out = []
    for i, a in enumerate(agree_):
        lo, hi, n, ci = edges[i], edges[i + 1], count[i], cis[i]
        if not isinstance(a, (int, float)) or not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
            continue
        if n is not None and n <= 0:
            continue
        centre = math.sqrt(lo * hi) if lo > 0 and hi > 0 else (lo + hi) / 2
        if centre <= 0:
            continue
        ok = isinstance(ci, list) and len(ci) == 2 and all(isinstance(e, (int, float)) for e in ci)
        out.append((centre, float(lo), float(hi), float(a), float(n) if n is not None else float("nan"),
                    (float(ci[0]), float(ci[1])) if ok else None))
    return out


def _top_max_prob(b: dict | None) -> dict | None:
    """The values block's Fig 6 summary when it is usable."""
    t = (b or {}).get("top_max_prob")
    if not isinstance(t, dict) or not isinstance(t.get("n"), int) or t["n"] < 1:
        return None
    need = ("upper", "agree", "agree_any")
    if not all(isinstance(t.get(k), int) for k in need):
        return None
    return t


def _count_ci(t: dict, key: str) -> str:
    ci = t.get(f"{key}_ci")
    if not (isinstance(ci, list) and len(ci) == 2):
        return ""
    return f" (95% interval {ci[0] * t['n']:.0f}–{ci[1] * t['n']:.0f})"


def _top_max_prob_text(t: dict, ref: dict) -> str:
    depth = t.get("upper_depth", 10 / 16)
    k = t.get("k")
    return (f"of the {t['n']} values with the highest max probability, {t['upper']}{_count_ci(t, 'upper')} are in "
            f"the upper layers (relative depth above {depth:.3g}, as the paper's layers 11–16 of 16; paper: "
            f"{ref['top100_in_upper_layers']} of 100), {t['agree']}{_count_ci(t, 'agree')} agree with their top-1 "
            f"trigger and {t['agree_any']}{_count_ci(t, 'agree_any')} with at least one of their top-"
            f"{k if k else 'k'} triggers (paper: {ref['top100_with_agreeing_trigger']} of 100, at least one of its "
            "top-50)")


def _fig6_verdict(inp, per_face) -> Verdict:
    s = per_face.get("pos") or next(iter(per_face.values()))
    bins, top = s["bins"], s["top"]
    if len(bins) < 2 and top is None:
        return no_verdict("only one non-empty max-probability bin")
    ref = inp.paper["fig6_agreement_vs_max_prob"]
    first, last = bins[0], bins[-1]
    rho = spearman([b[0] for b in bins], [b[3] for b in bins])
    trend = len(bins) >= 2
    rising = trend and last[3] - first[3] > 0.1 and (rho is None or rho > 0.5)
    grows = trend and last[3] > first[3]
    high = last[3] >= 0.5 if last[5] is None else agree(last[5], ref["top_bin_agreement"])
    if top is None:
        status = "yes" if rising and high else "partly" if rising or grows else "no"
    else:  # the paper's two counts as shares, each inside our Wilson interval
        upper_ok = agree(top.get("upper_ci"), ref["top100_in_upper_layers"] / 100)
        agree_ok = agree(top.get("agree_any_ci"), ref["top100_with_agreeing_trigger"] / 100)
        status = "yes" if rising and high and upper_ok and agree_ok else \
            "partly" if rising or grows or upper_ok or agree_ok else "no"
    if trend:
        size = "" if math.isnan(last[4]) else f", {last[4]:,.0f} memories"
        claim = (f"agreement goes from {pct(first[3])} in the lowest bin (max p ≈ {first[0]:.2g}) to "
                 f"{pct(last[3])}{_span(last[5], what='95% interval')} in the highest (max p ≈ {last[0]:.2g}{size})")
    else:
        claim = f"all values fall in one max-probability bin (agreement {pct(last[3])}), so there is no trend"
    if rho is not None:
        claim += f", rank correlation {rho:+.2f} across {len(bins)} bins"
    if top is not None:
        claim += f"; {_top_max_prob_text(top, ref)}"
    paper = (f"agreement grows with max probability, ≈{pct(ref['top_bin_agreement'])} in the highest bin"
             if top is not None else
             "agreement grows with max probability, ≈95% in the highest bin; 97 of the 100 most confident values "
             "are in layers 11–16")
    extra = ""
    n = per_face.get("neg")
    if n and n["bins"] and "pos" in per_face:
        extra = _face_clause("negative face", f"agreement {pct(n['bins'][0][3])} to {pct(n['bins'][-1][3])}")
        if n["top"] is not None:
            extra += (f", {n['top']['upper']} of its {n['top']['n']} most confident values in the upper layers, "
                      f"{n['top']['agree_any']} agreeing with a trigger")
    return verdict(inp, status, claim, paper, ("vocab", "corpus"), extra)


# -- not in the paper: the causal check of the values ----------------------------------------------------------
CAUSAL_ROLES = (("agree", "agreeing", COLORS["main"], "#9dbde3"),
                ("suppress", "suppressing", COLORS["last"], "#e8a3a8"))
"""(role, its word, colour of its memories, colour of their controls)."""


def _signed(v: float) -> str:
    return f"{v:+.3f}".replace("-", "−")


def _nats(v):
    return "n/a" if v is None else f"{_signed(v)} nats"


def fig_causal(inp: ReportInputs) -> Figure:
    fig = Figure("causal", "C1", "values", "Switching a memory off where it fired: change of its trigger's next-token "
                 "log-probability",
                 "Not in the paper, which reads values from correlations only. For memories whose value's top token "
                 "(argmax of s·v·E, s = −1 on the negative face) is the token t that follows their key's top-1 "
                 "trigger (agreeing) or whose bottom token is t (suppressing), the coefficient is set to 0 at the "
                 "trigger's last position only and Δ = log p_off(t) − log p_clean(t) of the full model is read there; "
                 "each beside a control: the memory of the same layer with the nearest |m|·‖v‖ at that position, "
                 "switched off the same way. Per layer: mean Δ with its 95% bootstrap interval (controls shifted "
                 "right). Expected if values do what their projection says: agreeing memories below their controls "
                 "and below 0, suppressing ones above both.")
    plot = Plot(inp, inp.faces)
    dodge = 0.3 / inp.n_layers
    per_face = {}
    cap = None
    for p, face in enumerate(inp.faces):
        b = inp.block("causal", face)
        means = {role: inp.series(b, f"{role}_delta") for role, *_ in CAUSAL_ROLES}
        if b is None or all(v is None for v in means.values()):
            plot.no_data(p, _why(inp, "causal", face, b, "per-layer deltas"), face)
            continue
        cap = cap or inp.scalar(b, "memories_per_layer")
        for role, word, color, control_color in CAUSAL_ROLES:
            if means[role] is not None:
                t = plot.ours(p, f"ours: {word} memories off", means[role], color, _nats, face=face)
                t["error_y"] = _error_y(means[role], inp.intervals(b, f"{role}_delta_ci"), color)
            control = inp.series(b, f"{role}_control_delta")
            if control is not None:
                t = plot.ours(p, f"ours: their controls ({word})", control, control_color, _nats, face=face,
                              baseline=True)
                t.update(mode="lines+markers", x=[round(x + dodge, 6) for x in t["x"]],
                         marker={"size": 5, "color": control_color, "symbol": "circle-open"},
                         error_y=_error_y(control, inp.intervals(b, f"{role}_control_delta_ci"), control_color))
            counts = inp.series(b, f"n_{role}") or []
            empty = [i for i, n in enumerate(counts) if n == 0]
            if empty:
                fig.notes.append(f"{FACE_LABEL[face]}: no {word} memory at layer{'s' if len(empty) > 1 else ''} "
                                 f"{layer_ranges(empty)}")
        per_face[face] = b
    if cap:
        fig.caption += f" Up to {cap:.0f} memories per layer, face and kind, drawn with the seed."
    if per_face:
        fig.verdict = _causal_verdict(per_face)
    fig = _finish(fig, inp, plot, bool(per_face), "causal", ytitle="Δ log p(next token), nats", yformat=".2f")
    if fig.spec is not None:
        for axis in ("yaxis", "yaxis2"):
            if axis in fig.spec["layout"]:
                fig.spec["layout"][axis].update(zeroline=True, zerolinecolor="#9aa1ab", zerolinewidth=1)
    return fig


def _causal_span(ci) -> str:
    ok = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ok else "[n/a]"


def _role_clause(s: dict, role: str, word: str) -> str:
    n = s.get(f"n_{role}")
    if not n:
        return f"no {word} memories were found"
    return (f"switching off {word} memories changes log p of the next token by {_nats(s.get(f'{role}_delta'))} "
            f"{_causal_span(s.get(f'{role}_delta_ci'))} (n = {n:.0f}), their controls by "
            f"{_nats(s.get(f'{role}_control_delta'))} {_causal_span(s.get(f'{role}_control_delta_ci'))}, with |Δ| "
            f"above the control's for {pct(s.get(f'{role}_exceeds_control'))}")


def _causal_separated(s: dict, role: str) -> bool | None:
    """None without memories of the role; else whether its interval lies wholly on the expected side of 0 and of
    its controls' interval (below for agreeing memories, above for suppressing ones)."""
    if not s.get(f"n_{role}"):
        return None
    ci, control = s.get(f"{role}_delta_ci"), s.get(f"{role}_control_delta_ci")
    if not ci or not control:
        return False
    if role == "agree":
        return ci[1] < 0 and ci[1] < control[0]
    return ci[0] > 0 and ci[0] > control[1]


def _causal_verdict(per_face) -> Verdict:
    face = "pos" if "pos" in per_face else next(iter(per_face))
    s = per_face[face].get("all_layers")
    if not isinstance(s, dict):
        return no_verdict("analysis.json 'causal' has no all_layers summary")
    held = [ok for ok in (_causal_separated(s, "agree"), _causal_separated(s, "suppress")) if ok is not None]
    if not held:
        return no_verdict("no agreeing or suppressing memories to switch off")
    status = "yes" if all(held) else "partly" if any(held) else "no"
    word = {"yes": "Confirmed", "partly": "Partly confirmed", "no": "Not confirmed"}[status]
    text = (f"{word}: over all layers, {_role_clause(s, 'agree', 'agreeing')}; "
            f"{_role_clause(s, 'suppress', 'suppressing')} (paper: not tested, it reads values from correlations "
            "only; expected if values do what their projection says: agreeing memories below 0 and below their "
            "controls, suppressing ones above both, 95% intervals apart)")
    n = per_face.get("neg", {}).get("all_layers") if face == "pos" else None
    if isinstance(n, dict) and (n.get("n_agree") or n.get("n_suppress")):
        text += _face_clause("negative face", f"agreeing memories give {_nats(n.get('agree_delta'))} (controls "
                                              f"{_nats(n.get('agree_control_delta'))}) and suppressing ones "
                                              f"{_nats(n.get('suppress_delta'))} (controls "
                                              f"{_nats(n.get('suppress_control_delta'))})")
    return Verdict(status, text + ".")


# -- §5 aggregation --------------------------------------------------------------------------------------------
ABOUT_A_THIRD = (0.25, 0.40)
"""The paper's "about a third of predictions are determined in the bottom layers" (Fig 9), read as 25–40%."""


def _agg_note(inp, fig):
    b = inp.block("aggregation")
    n = inp.scalar(b, "n_examples")
    if n is None:
        ns = inp.series(b, "n_examples")
        n = max((v for v in ns or [] if v is not None), default=None)
    if n is not None:
        fig.notes.append(f"over {n:,.0f} held-out prefixes (paper: 4,000 validation prefixes)")


CI_NOTE = ("error bars: 95% intervals (Wilson for shares of prefixes, percentile bootstrap over prefixes for "
           "medians)")


def _noted_error_bars(fig: Figure, trace: dict, ci: list | None, color: str) -> None:
    """Draw 95% intervals as error bars on one of our traces, in its hover text, and say so under the figure."""
    if ci is None:
        return
    trace["error_y"] = _error_y(trace["y"], ci, color)
    trace["text"] = [t if t is None or c is None else f"{t}<br>95% interval {_interval(c)}"
                     for t, c in zip(trace["text"], ci)]
    trace["meta"]["ci"] = True
    if CI_NOTE not in fig.notes:
        fig.notes.append(CI_NOTE)


def _interval(ci: list) -> str:
    """'10–14%'."""
    return f"{pct(ci[0]).removesuffix('%')}–{pct(ci[1])}"


def _with_ci(value: float | None, ci: list | None) -> str:
    """'12% (95% interval 10–14%)'."""
    return pct(value) + (f" (95% interval {_interval(ci)})" if ci is not None else "")


def _at(ci: list | None, layer: int) -> list | None:
    return None if ci is None else ci[layer]


def _holds(value: float | None, ci: list | None, low: float, high: float) -> bool:
    """Whether a number meets [low, high]: its interval overlaps it (``agree``), or without an interval the number
    lies in it."""
    if ci is not None:
        return agree(ci, low, high)
    return value is not None and low <= value <= high


def _single_series_fig(inp, fig, key, label, paper_arr, paper_label) -> tuple:
    """Common body of figures with one headline aggregation series (with its intervals) and one paper curve."""
    plot = Plot(inp, ("pos",))
    b = inp.block("aggregation")
    s = inp.series(b, key)
    if s is not None:
        trace = plot.ours(0, f"ours: {label}", s, COLORS["main"])
        _noted_error_bars(fig, trace, inp.intervals(b, key + "_ci"), COLORS["main"])
        plot.paper(0, paper_label, paper_arr, COLORS["main"])
        _note_gaps(fig, inp, label, s)
        _agg_note(inp, fig)
    return plot, s


def _quartiles(inp: ReportInputs, b: dict | None, key: str) -> dict | None:
    """{q25, q50, q75, q50_ci} per-layer series of a quantile block of aggregation, or None without a median."""
    q = {k: inp.series(b, key, k) for k in ("q25", "q50", "q75")}
    q["q50_ci"] = inp.intervals(b, key, "q50_ci")
    return q if q["q50"] is not None else None


def _band_and_median(fig: Figure, plot: Plot, q: dict, label: str) -> None:
    """The 25–75% band over prefixes and the median line with its interval (the headline of Figs 7 and 10)."""
    if q["q25"] is not None and q["q75"] is not None:
        plot.band(0, "ours: 25–75% of prefixes", q["q25"], q["q75"], "rgba(37,99,168,0.18)", pct)
    trace = plot.ours(0, f"ours: median {label}", q["q50"], COLORS["main"])
    _noted_error_bars(fig, trace, q["q50_ci"], COLORS["main"])


def _rule_label(name) -> str:
    """'m>0' → 'm > 0'; 'tau=0.1' → '|m| > 0.1·max|m|' (a name of analysis.json's aggregation sweep)."""
    name = str(name)
    if name.replace(" ", "") == "m>0":
        return "m > 0"
    m = re.fullmatch(r"tau=(.+)", name)
    return f"|m| > {m.group(1)}·max|m|" if m else name


def _headline_rule(inp: ReportInputs) -> str | None:
    rule = (inp.block("aggregation") or {}).get("active_rule")
    return rule if isinstance(rule, str) and rule else None


def _sweep(inp: ReportInputs) -> list[tuple[str, dict, str]]:
    """The active-rule sweep of the aggregation block as (rule, entry, colour), m > 0 first, then by threshold."""
    sweep = (inp.block("aggregation") or {}).get("sweep")
    if not isinstance(sweep, dict):
        return []
    entries = [(k, v) for k, v in sweep.items() if isinstance(v, dict)]

    def tau(name):
        m = re.fullmatch(r"tau=(.+)", str(name))
        try:
            return float(m.group(1)) if m else -1.0
        except ValueError:
            return math.inf
    entries.sort(key=lambda kv: tau(kv[0]))
    out, grey = [], 0
    for name, entry in entries:
        if tau(name) < 0:
            color = COLORS["alt"]
        else:
            color = SWEEP_GREYS[min(grey, len(SWEEP_GREYS) - 1)]
            grey += 1
        out.append((name, entry, color))
    return out


def _rule_why(inp: ReportInputs) -> str:
    """Why the headline uses its active rule, in a clause (empty when analysis.json does not name the rule)."""
    rule = _headline_rule(inp)
    if rule is None:
        return ""
    if _rule_label(rule) == "m > 0":
        return "the paper's rule for its ReLU FFN"
    return ("the documented magnitude rule, because the paper's ReLU rule m > 0 says nothing for a smooth or gated "
            "FFN, where about half of all coefficients are positive whatever the input")


def _rule_caption(inp: ReportInputs) -> str:
    """Which active rule the headline uses, and why."""
    rule = _headline_rule(inp)
    if rule is None:
        return ""
    if _rule_label(rule) == "m > 0":
        text = " Headline rule: m > 0, the paper's."
    else:
        text = (f" Headline rule: {_rule_label(rule)}, not the paper's m > 0, which says little for smooth or gated "
                "FFNs (almost every coefficient is non-zero and about half are positive whatever the input).")
    if len(_sweep(inp)) > 1:
        text += (" Thin lines: the same under the other active rules, from the same forward pass (light blue: "
                 "m > 0; grey: |m| above a share of the layer's max |m|, darker for a higher share).")
    return text


def fig7(inp: ReportInputs) -> Figure:
    fig = Figure("fig7", "7", "aggregation", "Active memories per layer",
                 "Per layer, the share of the layer's memories that are active at a prefix.")
    ref = inp.paper["fig7_active_memories"]
    plot = Plot(inp, ("pos",))
    b = inp.block("aggregation")
    rule = _headline_rule(inp)
    label = f"active memories, {_rule_label(rule)}" if rule else "active memories (rule in Definitions)"
    q = _quartiles(inp, b, "active_fraction_quantiles")
    mean = inp.series(b, "active_fraction_mean")
    if rule is None:  # an analysis.json that does not name its rule
        fig.caption += (" ReLU: coefficient > 0 (the paper's rule). Smooth or gated FFNs: the magnitude rule in "
                        "Definitions (blue); the light line is the share with a positive coefficient, which is ≈50% "
                        "for SiLU/GELU gating.")
    if q is not None:
        fig.caption += (" Blue: the median over prefixes with its 25–75% band, as the paper plots it, and its 95% "
                        "interval; thin blue: the mean.")
        _band_and_median(fig, plot, q, label)
        if mean is not None:
            plot.ours(0, "ours: mean active memories", mean, COLORS["main"], thin=True)
    elif mean is not None:
        fig.caption += " Ours is the mean over prefixes, the paper's the median."
        _noted_error_bars(fig, plot.ours(0, f"ours: {label}", mean, COLORS["main"]),
                          inp.intervals(b, "active_fraction_mean_ci"), COLORS["main"])
    head = q["q50"] if q is not None else mean
    head_ci = q["q50_ci"] if q is not None else inp.intervals(b, "active_fraction_mean_ci")
    if head is not None:
        plot.paper(0, "active memories (median)", ref["median_fraction_approx"], COLORS["main"])
        _note_gaps(fig, inp, label, head)
        _agg_note(inp, fig)
    fig.caption += _rule_caption(inp)
    sweep = _sweep(inp)
    pos = inp.series(b, "active_fraction_positive_mean")
    drawn_rules = []  # (rule, median or mean per layer)
    for name, entry, color in sweep:
        if name == rule:
            continue
        sq = _quartiles(inp, entry, "active_fraction_quantiles")
        series = sq["q50"] if sq is not None else inp.series(entry, "active_fraction_mean")
        if series is not None:
            stat = "median" if sq is not None else "mean"
            plot.ours(0, f"ours: {_rule_label(name)} ({stat})", series, color, thin=True)
            drawn_rules.append((name, series))
    if not sweep and pos is not None:
        plot.ours(0, "ours: coefficient > 0", pos, COLORS["alt"])
    drawn = head is not None or pos is not None or bool(drawn_rules)
    if drawn:
        stat = "median" if q is not None else "mean"
        fig.verdict = _fig7_verdict(inp, head if head is not None else pos, head_ci if head is not None else None,
                                    pos, drawn_rules, stat)
    return _finish(fig, inp, plot, drawn, "aggregation", ytitle="active memories (% of the layer)",
                   yrange=[0, 1.02])


def _fig7_verdict(inp, series, ci, pos, others, stat="mean") -> Verdict:
    pts = points(series)
    if not pts:
        return no_verdict("no active-memory numbers")
    vals = [v for _, _, v in pts]
    lo, hi = min(vals), max(vals)
    dip = min(pts, key=lambda t: t[2])
    # the paper's 10–50%: every layer's number (its interval where there is one) meets the range
    in_range = all(_holds(v, _at(ci, layer), 0.10, 0.50) for _, layer, v in pts)
    dip_mid = 0.3 <= dip[0] <= 0.9 and len(pts) >= 3 and dip[2] < max(pts[0][2], pts[-1][2])
    status = "yes" if in_range and dip_mid else "partly" if in_range or dip_mid else "no"
    why = _rule_why(inp)
    under = f" under {_rule_label(_headline_rule(inp))}, the headline rule: {why}" if why else ""
    claim = f"{pct_span(lo, hi)} of memories are active ({stat} over prefixes{under})"
    claim += f"; lowest at layer {dip[1]} (depth {dip[0]:.2f})"
    if ci is not None:
        claim += f", {_with_ci(dip[2], ci[dip[1]])}"
    spans = [f"{pct_span(min(v for v in s if v is not None), max(v for v in s if v is not None))} under "
             f"{_rule_label(name)}" for name, s in others]
    if spans:
        claim += "; the other rules give " + join_words(spans)
    pp = points(pos)
    if pp:
        claim += f"; {pct(_mean(pp))} have a positive coefficient on average"
    paper = "10–50% active (positive, median), dropping towards layer 10 of 16 (depth 0.62)"
    return verdict(inp, status, claim, paper, ("gated", "instruct"))


def fig8(inp: ReportInputs) -> Figure:
    fig = Figure("fig8", "8", "aggregation", "The layer's prediction is not any single memory's",
                 "Per layer, the share of prefixes where the top token of the layer's output (projected to the "
                 "vocabulary) equals the top token of none of the active memories; and, where one memory does "
                 "match, how often the token is a stop word and how often the prefix is short (< 5 tokens).")
    ref = inp.paper["fig8_no_single_memory_match"]
    rule = _headline_rule(inp)
    label = f"no single memory matches, {_rule_label(rule)}" if rule else "no single memory matches"
    plot, s = _single_series_fig(inp, fig, "no_single_memory_match", label, ref["approx"],
                                 "no single memory matches")
    fig.caption += _rule_caption(inp)
    b = inp.block("aggregation")
    sw, sh = inp.series(b, "match_is_stopword"), inp.series(b, "match_prefix_short")
    if sw is not None:
        _noted_error_bars(fig, plot.ours(0, "ours: matched token is a stop word", sw, COLORS["stopword"]),
                    inp.intervals(b, "match_is_stopword_ci"), COLORS["stopword"])
    if sh is not None:
        _noted_error_bars(fig, plot.ours(0, "ours: matched prefix < 5 tokens", sh, COLORS["short"]),
                    inp.intervals(b, "match_prefix_short_ci"), COLORS["short"])
    swept = []  # (rule, mean no-match, mean stop-word share, mean short share, whether >= 68% holds in every layer)
    floor = min(ref["approx"])
    for name, entry, color in _sweep(inp):
        no_match = inp.series(entry, "no_single_memory_match")
        if no_match is None:
            continue
        ci = inp.intervals(entry, "no_single_memory_match_ci")
        if name != rule:
            plot.ours(0, f"ours: no single memory matches, {_rule_label(name)}", no_match, color, thin=True)
        holds = all(_holds(v, _at(ci, layer), floor, 1.0) for _, layer, v in points(no_match))
        swept.append((name, _mean(points(no_match)), *(_mean(points(inp.series(entry, k)))
                                                       for k in ("match_is_stopword", "match_prefix_short")), holds))
    if s is not None or sw is not None or sh is not None:
        plot.paper_hline(0, f"{ref['stop_word_share_when_matched']:.0%} stop words when matched (all layers)",
                         ref["stop_word_share_when_matched"], COLORS["stopword"])
        plot.paper_hline(0, f"{ref['short_prefix_share_when_matched']:.0%} short prefixes when matched (all layers)",
                         ref["short_prefix_share_when_matched"], COLORS["short"])
    if len(swept) > 1:
        fig.notes.append("mean over layers per active rule (no single memory matches / matched token is a stop "
                         "word / matched prefix < 5 tokens): " + "; ".join(
                             f"{_rule_label(n)}{' (headline)' if n == rule else ''}: {pct(a)} / {pct(w)} / {pct(h)}"
                             for n, a, w, h, _ in swept))
    if s is not None:
        fig.verdict = _fig8_verdict(inp, s, inp.intervals(b, "no_single_memory_match_ci"), sw, sh, swept)
    return _finish(fig, inp, plot, s is not None or sw is not None or sh is not None, "aggregation",
                   ytitle="share of prefixes (%)", yrange=[0, 1.02])


def _fig8_verdict(inp, s, ci, sw, sh, swept) -> Verdict:
    ref = inp.paper["fig8_no_single_memory_match"]
    floor = min(ref["approx"])
    rule = _headline_rule(inp)
    pts = points(s)
    vals = [v for _, _, v in pts]
    low = min(pts, key=lambda t: t[2])
    holds = all(_holds(v, _at(ci, layer), floor, 1.0) for _, layer, v in pts)
    held_by = [n for n, *_, ok in swept if ok]
    status = "yes" if holds else "partly" if held_by or _mean(pts) >= 0.5 else "no"
    claim = (f"no single memory gives the layer's top token in {_with_ci(low[2], _at(ci, low[1]))} (layer "
             f"{low[1]}) to {pct(max(vals))} of prefixes") if pct(low[2]) != pct(max(vals)) else \
        f"no single memory gives the layer's top token in {pct(low[2])} of prefixes in every layer"
    why = _rule_why(inp)
    if why:
        claim += f" under {_rule_label(rule)} (the headline rule: {why})"
    others = [(n, a) for n, a, _, _, _ in swept if n != rule and a is not None]
    if others:
        claim += " (on average " + ", ".join(f"{pct(a)} under {_rule_label(n)}" for n, a in others) + ")"
    if len(swept) > 1:
        failed = [n for n, *_, ok in swept if not ok]
        claim += (f"; ≥{pct(floor)} in every layer (within the 95% interval) holds under "
                  f"{join_words([_rule_label(n) for n in held_by]) if held_by else 'none of the rules'}")
        if held_by and failed:
            claim += f", not under {join_words([_rule_label(n) for n in failed])}"
    extra_bits = []
    if sw is not None:
        extra_bits.append(f"{pct(_mean(points(sw)))} of matched tokens are stop words")
    if sh is not None:
        extra_bits.append(f"{pct(_mean(points(sh)))} of matched prefixes are short")
    if extra_bits:
        claim += "; " + " and ".join(extra_bits)
    paper = (f"≥{pct(floor)} in every layer under m > 0; {pct(ref['stop_word_share_when_matched'])} stop words, "
             f"{pct(ref['short_prefix_share_when_matched'])} short prefixes")
    return verdict(inp, status, claim, paper, ("gated", "instruct"))


def _rise_verdict(inp, s, ref_arr, what, final_ok, early_max, aspects, ci=None) -> Verdict:
    pts = points(s)
    if len(pts) < 2:
        return no_verdict(f"the trend of {what} needs at least two layers")
    e, final = early(pts), pts[-1]
    pe, pfinal = early(paper_points(ref_arr)), ref_arr[-1]
    rise = final[2] - e
    status = "yes" if _holds(final[2], _at(ci, final[1]), final_ok, 1.0) and e <= early_max and rise > 0.2 else \
        "partly" if rise > 0.1 else "no"
    claim = (f"{what} is {pct(e)} in the lowest third of layers and {_with_ci(final[2], _at(ci, final[1]))} at the "
             f"last (layer {final[1]})")
    cross, pcross = first_crossing(pts, 0.5), first_crossing(paper_points(ref_arr), 0.5)
    if cross:
        claim += f", above 50% from depth {cross[0]:.2f} (layer {cross[1]})"
    paper = f"{pct(pe)} in the lowest third, {pct(pfinal)} at layer 16"
    if pcross:
        paper += f", above 50% from depth {pcross[0]:.2f}"
    return verdict(inp, status, claim, paper, aspects)


def fig9(inp: ReportInputs) -> Figure:
    fig = Figure("fig9", "9", "aggregation", "The residual's top token is already the model's final prediction",
                 "Per layer, the share of prefixes where the top token of the residual stream (before the layer's "
                 "FFN adds its output, projected through the final norm and unembedding: the logit lens) equals the "
                 "model's final top token.")
    ref = inp.paper["fig9_residual_matches_final"]
    plot, s = _single_series_fig(inp, fig, "residual_matches_final", "residual top = final top", ref["approx"],
                                 "residual top = final top")
    if s is not None:
        fig.verdict = _fig9_verdict(inp, s, inp.intervals(inp.block("aggregation"), "residual_matches_final_ci"))
    return _finish(fig, inp, plot, s is not None, "aggregation", ytitle="share of prefixes (%)", yrange=[0, 1.02])


def _fig9_verdict(inp, s, ci) -> Verdict:
    """Two claims of the paper: about a third of predictions are decided in the bottom layers (read at the top of
    the lowest third of layers), and the share rises with depth (to ≈95% at the last layer)."""
    pts = points(s)
    if len(pts) < 2:
        return no_verdict("the trend of the match needs at least two layers")
    ref = inp.paper["fig9_residual_matches_final"]["approx"]
    lower = [p for p in pts if p[0] <= 1 / 3 + 1e-9] or pts[:1]
    x, layer, v = lower[-1]
    final = pts[-1]
    third_ok = _holds(v, _at(ci, layer), *ABOUT_A_THIRD)
    low_ci, final_ci = _at(ci, layer), _at(ci, final[1])
    # the rise is real when the last layer's interval lies above the lower third's (the points without intervals)
    rises = final_ci[0] > low_ci[1] if low_ci is not None and final_ci is not None else final[2] > v
    status = "yes" if third_ok and rises else "partly" if third_ok or rises else "no"
    claim = (f"at layer {layer} (depth {x:.2f}, the top of the lowest third) the residual already gives the final "
             f"token in {_with_ci(v, low_ci)} of prefixes: "
             f"{'about a third' if third_ok else 'not about a third'}; ")
    claim += (f"it {'rises' if rises else 'does not rise clearly'} with depth, to {_with_ci(final[2], final_ci)} at "
              f"the last layer ({final[1]})")
    cross = first_crossing(pts, 0.5)
    if cross:
        claim += f", above 50% from depth {cross[0]:.2f} (layer {cross[1]})"
    k = max(i for i in range(len(ref)) if (i + 1) / len(ref) <= 1 / 3 + 1e-9)  # the paper's top of the lowest third
    paper = (f"about a third of predictions decided in the bottom layers (read as {_interval(ABOUT_A_THIRD)}; its "
             f"curve: {pct(ref[k])} at depth {(k + 1) / len(ref):.2f}), rising from layer 10 to {pct(ref[-1])} at "
             "layer 16")
    return verdict(inp, status, claim, paper, ("depth", "instruct", "quantised"))


def _stat_word(inp: ReportInputs, key: str) -> str:
    """'mean' or 'median' as analysis.json defines a quantity ('' when it does not say)."""
    text = str(((inp.analysis or {}).get("definitions") or {}).get(key, "")).lower()
    return "median" if "median" in text else "mean" if "mean" in text else ""


def fig10(inp: ReportInputs) -> Figure:
    fig = Figure("fig10", "10", "aggregation", "Probability the residual gives to the final prediction",
                 "Per layer, the probability that the residual stream (logit lens, before the layer's FFN) assigns "
                 "to the token the model finally predicts.")
    ref = inp.paper["fig10_residual_prob_of_final"]
    b = inp.block("aggregation")
    q = _quartiles(inp, b, "residual_prob_of_final_quantiles")
    ci = None
    if q is None:  # an analysis.json without the quantiles: its one series, mean or median as it says
        stat = _stat_word(inp, "residual_prob_of_final")
        plot, s = _single_series_fig(inp, fig, "residual_prob_of_final",
                                     f"{stat} probability of the final token".strip(), ref["median_approx"],
                                     "median probability of the final token")
        if stat == "mean":
            fig.caption += " Ours is the mean over prefixes, the paper's the median."
        what = "the probability"
        ci = inp.intervals(b, "residual_prob_of_final_ci")
    else:
        plot = Plot(inp, ("pos",))
        s, ci = q["q50"], q["q50_ci"]
        _band_and_median(fig, plot, q, "probability of the final token")
        mean = inp.series(b, "residual_prob_of_final")
        if mean is not None:
            plot.ours(0, "ours: mean probability of the final token", mean, COLORS["main"], thin=True)
        plot.paper(0, "median probability of the final token", ref["median_approx"], COLORS["main"])
        _note_gaps(fig, inp, "median probability", s)
        _agg_note(inp, fig)
        fig.caption += (" Ours: the median over prefixes, as the paper reports, with its 25–75% band and its 95% "
                        "interval; thin: the mean, which differs a lot from the median where most prefixes give the "
                        "final token almost nothing.")
        what = "the median probability"
    if s is not None:
        fig.verdict = _rise_verdict(inp, s, ref["median_approx"], what, 0.5, 0.15,
                                    ("depth", "instruct", "quantised"), ci=ci)
    return _finish(fig, inp, plot, s is not None, "aggregation", ytitle="probability (%)", yrange=[0, 1.02])


EFFECT_KINDS = ("residual", "ffn", "agreement", "composition")


def fig11(inp: ReportInputs) -> Figure:
    fig = Figure("fig11", "11", "aggregation", "How the FFN output changes the residual's top token",
                 "Per layer, how adding the FFN output o to the residual r changes the top token: residual "
                 "(top(r+o) = top(r) ≠ top(o)), ffn (top(r+o) = top(o) ≠ top(r)), agreement (all three equal), "
                 "composition (neither).")
    ref = inp.paper["fig11_ffn_effect"]
    plot = Plot(inp, ("pos",))
    b = inp.block("aggregation")
    parts = {k: inp.series(b, "ffn_effect", k) for k in EFFECT_KINDS}
    cis = {k: inp.intervals(b, "ffn_effect", f"{k}_ci") for k in EFFECT_KINDS}
    drawn = any(v is not None for v in parts.values())
    if drawn:
        for k, v in parts.items():
            if v is not None:
                plot.bars(0, f"ours: {k}", v, COLORS[k])
                _noted_error_bars(fig, plot.data[-1], cis[k], INK)
        lo, hi = ref["residual_range"]
        plot.paper_hline(0, f"residual in {lo:.0%}–{hi:.0%} of examples", lo, COLORS["residual"])
        plot.paper_hline(0, f"residual in {lo:.0%}–{hi:.0%} of examples", hi, COLORS["residual"])
        _note_gaps(fig, inp, "residual", parts["residual"])
        _agg_note(inp, fig)
        fig.verdict = _fig11_verdict(inp, parts, cis["residual"])
    return _finish(fig, inp, plot, drawn, "aggregation", ytitle="share of prefixes (%)", yrange=[0, 1.02],
                   barmode="stack")


def _fig11_verdict(inp, parts, ci=None) -> Verdict:
    res = points(parts["residual"])
    if not res:
        return no_verdict("no 'residual' share")
    layers = [layer for _, layer, _ in res]
    dominant = [layer for layer in layers
                if all(parts[k] is None or parts[k][layer] is None or parts[k][layer] <= parts["residual"][layer]
                       for k in ("ffn", "agreement", "composition"))]
    share = len(dominant) / len(layers)
    comp, ffn = (_mean(points(parts[k])) if parts[k] is not None else None for k in ("composition", "ffn"))
    vals = [v for _, _, v in res]
    lo, hi = inp.paper["fig11_ffn_effect"]["residual_range"]
    in_range = [layer for _, layer, v in res if _holds(v, _at(ci, layer), lo, hi)]
    comp_gt = comp is None or ffn is None or comp > ffn
    status = "yes" if share >= 0.8 and len(in_range) >= len(layers) / 2 and comp_gt else \
        "partly" if share >= 0.5 or in_range else "no"
    claim = (f"the residual keeps its top token in {pct_span(min(vals), max(vals))} of prefixes and dominates in "
             f"{len(dominant)} of {len(layers)} layers; it meets the paper's {pct(lo)}–{pct(hi)} in "
             f"{len(in_range)} of {len(layers)} layers{' (within the 95% interval)' if ci is not None else ''}")
    bits = []
    if comp is not None:
        bits.append(f"composition {pct(comp)}")
    if ffn is not None:
        bits.append(f"ffn {pct(ffn)}")
    if bits:
        claim += f"; on average {join_words(bits)}"
    paper = f"residual {pct(lo)}–{pct(hi)}, ffn very small, composition small but above ffn"
    return verdict(inp, status, claim, paper, ("gated", "instruct"))


def fig11b(inp: ReportInputs) -> Figure:
    fig = Figure("fig11b", "11b", "aggregation", "Where the FFN changes the top token: to a semantically distant word?",
                 "§5.2 of the paper, automated. Per layer, among the prefixes where adding the FFN output changes the "
                 "residual's top token (top(r) ≠ top(r+o)), the share where the new token is semantically distant "
                 "from the old: the cosine of the two token strings under an independent sentence embedder "
                 "(all-MiniLM-L6-v2) is below the 95th percentile of the cosines of random pairs of vocabulary "
                 "tokens, i.e. no more alike than 95% of unrelated pairs (so random pairs score 95% by "
                 "construction). Green: the same among the changes between two content words (a letter, not a "
                 "stop word), since the embedder finds any two function words or punctuation marks alike. Thin: a "
                 "control pairing each old token with the new token of another changed prefix of the same layer. "
                 "The paper read 100 last-layer cases by hand: 66 distant.")
    ref = inp.paper["fig11_ffn_effect"]
    plot = Plot(inp, ("pos",))
    b = inp.block("aggregation")
    s = inp.series(b, "ffn_change_distant")
    ci = inp.intervals(b, "ffn_change_distant_ci")
    if s is not None:
        _noted_error_bars(fig, plot.ours(0, "ours: changed to a distant word", s, COLORS["main"]), ci, COLORS["main"])
        content = inp.series(b, "ffn_change_content_distant")
        if content is not None:
            _noted_error_bars(fig, plot.ours(0, "ours: between two content words", content, COLORS["first"]),
                        inp.intervals(b, "ffn_change_content_distant_ci"), COLORS["first"])
        shuffled = inp.series(b, "ffn_change_shuffled_distant")
        if shuffled is not None:
            _noted_error_bars(fig, plot.ours(0, "ours: shuffled new tokens (control)", shuffled, COLORS["random"],
                                       baseline=True), inp.intervals(b, "ffn_change_shuffled_distant_ci"),
                        COLORS["random"])
        plot.ours(0, "random vocabulary pairs (95% by construction)", [0.95] * inp.n_layers, COLORS["uniform"],
                  baseline=True)
        share, n = ref["semantic_change_distant"], ref["semantic_change_read"]
        p_ci = wilson(share * n, n)
        plot.paper_point(0, f"{share * n:.0f} of {n} last-layer changes distant", 1.0, share, COLORS["main"])
        plot.paper_vline(0, f"{share * n:.0f} of {n}: its 95% interval", 1.0, p_ci[0], p_ci[1], COLORS["main"])
        _note_gaps(fig, inp, "distant share", s)
        _agg_note(inp, fig)
        counts = inp.series(b, "ffn_change_n")
        cos, rnd = inp.series(b, "ffn_change_cosine_mean"), inp.scalar(b, "random_pair_cosine_mean")
        threshold = inp.scalar(b, "random_pair_cosine_q95")
        if counts is not None:
            words = inp.series(b, "ffn_change_content_n")
            fig.notes.append("prefixes where the FFN changes the top token, per layer, mean per third of the layers "
                             "(low / mid / high): " + " / ".join(_third(counts, lambda v: f"{v:,.0f}")) +
                             ("; of them between two content words: " + " / ".join(
                                 _third(words, lambda v: f"{v:,.0f}")) if words is not None else ""))
        if cos is not None and rnd is not None:
            fig.notes.append("mean cosine of the old and new token per third: " + " / ".join(
                _third(cos, lambda v: f"{v:.2f}")) + f"; random vocabulary pairs: {rnd:.2f}" +
                (f", their 95th percentile (the 'distant' threshold) {threshold:.2f}" if threshold is not None else ""))
        fig.verdict = _fig11b_verdict(inp, s, ci, shuffled, cos, rnd, content,
                                      inp.intervals(b, "ffn_change_content_distant_ci"))
    fig = _finish(fig, inp, plot, s is not None, "aggregation", ytitle="share of changed prefixes (%)",
                  yrange=[0, 1.02])
    reason = ((inp.analysis or {}).get("missing") or {}).get("aggregation.ffn_change")
    if fig.missing and isinstance(reason, str) and b is not None:
        fig.missing = f"analysis.json has no §5.2 numbers: {reason}"
    return fig


def _third(values: list, fmt) -> list[str]:
    """Per third of the layers, the mean of a per-layer series, formatted."""
    n = len(values)
    out = []
    for part in (values[: n // 3], values[n // 3: 2 * n // 3], values[2 * n // 3:]):
        present = [v for v in part if v is not None]
        out.append(fmt(sum(present) / len(present)) if present else "n/a")
    return out


def _fig11b_verdict(inp, s, ci, shuffled, cos, rnd, content=None, content_ci=None) -> Verdict:
    pts = points(s)
    if not pts:
        return no_verdict("no share of changed prefixes")
    ref = inp.paper["fig11_ffn_effect"]
    share, n = ref["semantic_change_distant"], ref["semantic_change_read"]
    p_ci = wilson(share * n, n)
    _, layer, v = pts[-1]
    last_ci = _at(ci, layer)
    ok = _holds(v, last_ci, *p_ci)
    words_ok = content is not None and content[layer] is not None and \
        _holds(content[layer], _at(content_ci, layer), *p_ci)
    status = "yes" if ok else "partly" if words_ok or v > 0.5 else "no"
    # "distant" means something only against the shuffled control (random new tokens under the same embedder): a
    # share not above it does not show that the FFN moves the top token to a distant word
    control = shuffled[layer] if shuffled is not None and shuffled[layer] is not None else None
    above_control = control is None or (last_ci[0] if last_ci else v) > control
    if status == "yes" and not above_control:
        status = "partly"
    outside = "" if ok else ", outside the paper's interval"
    claim = (f"at the last layer (layer {layer}) {_with_ci(v, last_ci)} of the changes go to a semantically distant "
             f"word{outside}; {pct_span(min(p[2] for p in pts), max(p[2] for p in pts))} across layers")
    if content is not None and content[layer] is not None:
        claim += (f"; between two content words {_with_ci(content[layer], _at(content_ci, layer))}"
                  f"{', within it' if words_ok else ', also outside it'}")
    if control is not None:
        claim += f"; with the new tokens shuffled, {pct(control)} at the last layer" + (
            "" if above_control else ": not above this control, so the changes are no more distant than random "
            "new tokens under the embedder")
    if cos is not None and cos[layer] is not None and rnd is not None:
        claim += f"; mean cosine {cos[layer]:.2f} against {rnd:.2f} for random vocabulary pairs"
    paper = (f"{share * n:.0f} of {n} last-layer changes read by hand were semantically distant (95% interval "
             f"{_interval(p_ci)})")
    return verdict(inp, status, claim, paper, ("gated", "instruct"))


FIGURE_INFO = {
    "fig2": ("2", "keys", "Patterns of the keys' trigger examples, per layer"),
    "explain": ("E1", "keys", "Explanation scores per layer"),
    "fig3": ("3", "keys", "Relative change of the memory coefficient when a token is removed"),
    "fig3b": ("3b", "keys", "Share of triggers whose coefficient changes sign when a token is removed"),
    "fig4": ("4", "values", "Agreement rate: a value's top token is its key's top-1 trigger's next token"),
    "fig4b": ("4b", "values", "Suppression: a value's bottom token is its key's top-1 trigger's next token"),
    "fig5": ("5", "values", "Rank of the trigger's next token under the value's distribution"),
    "fig6": ("6", "values", "Agreement rate against the value's maximal probability"),
    "causal": ("C1", "values", "Switching a memory off where it fired: change of its trigger's next-token "
               "log-probability"),
    "fig7": ("7", "aggregation", "Active memories per layer"),
    "fig8": ("8", "aggregation", "The layer's prediction is not any single memory's"),
    "fig9": ("9", "aggregation", "The residual's top token is already the model's final prediction"),
    "fig10": ("10", "aggregation", "Probability the residual gives to the final prediction"),
    "fig11": ("11", "aggregation", "How the FFN output changes the residual's top token"),
    "fig11b": ("11b", "aggregation", "Where the FFN changes the top token: to a semantically distant word?"),
}
"""Number, section and title of each figure by id (also used when a figure fails to draw)."""

FIGURES = {"fig2": fig2, "explain": fig_explain, "fig3": fig3, "fig3b": fig3_sign,
           "fig4": fig4, "fig4b": fig4b, "fig5": fig5, "fig6": fig6, "causal": fig_causal,
           "fig7": fig7, "fig8": fig8, "fig9": fig9, "fig10": fig10, "fig11": fig11, "fig11b": fig11b}


def build_figures(inp: ReportInputs) -> list[Figure]:
    """Every figure; a figure whose inputs are missing comes back with ``missing`` set instead of a spec."""
    out = []
    for fid, make in FIGURES.items():
        try:
            out.append(make(inp))
        except Exception as exc:  # a malformed block must not cost the rest of the report
            n, section, title = FIGURE_INFO[fid]
            out.append(Figure(fid, n, section, title, "", missing=f"could not draw it from analysis.json "
                              f"({type(exc).__name__}: {exc})"))
    return out
