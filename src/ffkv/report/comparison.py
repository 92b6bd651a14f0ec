"""`ffkv compare`: one self-contained page comparing several atlases with each other and with the paper.

Each atlas's figures are built exactly as `ffkv report` builds them; the page merges them per figure id: one plot
whose traces are every atlas's own (named after its model, one line dash and marker symbol per model, colours
still one per quantity) with the paper's traces once. A table gives each finding's verdict per model and its
headline numbers per third of the layers (the rows of :mod:`ffkv.report.findings`) beside the paper's.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FfkvError
from ..version import __version__
from .compare import STATUS_BADGE, Verdict, join_words
from .data import PAPER_LAYERS, ReportInputs, load_inputs
from .figures import DEPTH_TITLE, FIGURE_INFO, FIGURES, Figure, build_figures, legend_height, log_percent_ticks
from .findings import THIRDS, Row, fmt_value, rows, thirds
from .html import (
    CSS,
    DEFAULT_DEFINITIONS,
    FIGURE_SHORT,
    JS,
    SECTIONS,
    TEMPLATE,
    _dl,
    _fmt_int,
    _shell,
    esc,
    reproduce_command,
    script_json,
)

MODEL_DASHES = ("solid", "dashdot", "longdashdot", "6px,2px,2px,2px,2px,2px")
"""Line dash of each model's traces, in atlas order; the paper keeps 'dash' (approx.) and 'dot' (stated)."""
MODEL_SYMBOLS = ("circle", "square", "triangle-up", "diamond")
MODEL_PATTERNS = ("", "/", "x", ".", "\\")
"""Hatching of each model's bars (side by side, one stack per model)."""

PAPER_TEXT = {"fig2": "fig2_patterns", "explain": "n2g_firing_f1", "fig3": "fig3_token_removal",
              "fig4": "fig4_agreement_rate", "fig5": "fig5_next_token_rank", "fig6": "fig6_agreement_vs_max_prob",
              "fig7": "fig7_active_memories", "fig8": "fig8_no_single_memory_match",
              "fig9": "fig9_residual_matches_final", "fig10": "fig10_residual_prob_of_final",
              "fig11": "fig11_ffn_effect", "fig11b": "fig11_ffn_effect"}
"""The block of paper_reference.json whose 'text' states what the paper found for a figure."""

BADGE = {**STATUS_BADGE, "mixed": "mixed", "missing": "missing"}


def model_style(i: int) -> tuple[str, str, str]:
    """(line dash, marker symbol, bar hatching) of the i-th atlas: distinct for the first 16 models."""
    return (MODEL_DASHES[i % len(MODEL_DASHES)], MODEL_SYMBOLS[(i + i // len(MODEL_DASHES)) % len(MODEL_SYMBOLS)],
            MODEL_PATTERNS[i % len(MODEL_PATTERNS)])


@dataclass
class Entry:
    """One atlas on the page."""

    inp: ReportInputs
    arg: str
    """The atlas as given (how the page's commands name it)."""
    label: str
    """Its model's short name; with the atlas folder (or path) added where two atlases share a model."""
    figures: dict[str, Figure]


@dataclass
class Merged:
    """One figure id over every atlas."""

    figure: Figure
    states: list[tuple[Entry, str, str]] = field(default_factory=list)
    """(atlas, status, its verdict sentence or why the figure is missing); status: yes | partly | no | na | missing"""
    across: Verdict | None = None


# -- inputs ----------------------------------------------------------------------------------------------------
def load_entries(atlases: Sequence[str | Path]) -> list[Entry]:
    """Read every atlas (manifest required, analysis.json optional) and build its figures; one-line errors."""
    # one path given where a list is expected would otherwise be read as one atlas per character
    args = [str(atlases)] if isinstance(atlases, (str, Path)) else [str(a) for a in atlases]
    if len(args) < 2:
        raise FfkvError(f"`ffkv compare` needs at least two atlases, got {len(args)}"
                        + (f" ({args[0]})" if args else "") + "; for one atlas use `ffkv report`")
    seen: dict[Path, str] = {}
    for a in args:
        key = Path(a).resolve()
        if key in seen:
            same = "" if seen[key] == a else f" (as {seen[key]} and {a})"
            raise FfkvError(f"atlas {a} is given twice{same}: give each atlas once")
        seen[key] = a
    inputs = [load_inputs(a) for a in args]
    labels = _labels(inputs, args)
    return [Entry(inp, a, label, {f.id: f for f in build_figures(inp)}) for inp, a, label in zip(inputs, args, labels)]


def _labels(inputs: list[ReportInputs], args: list[str]) -> list[str]:
    """Model short names, made unique by the atlas folder's name, then by the atlas path as given."""
    names = [inp.traits["short_name"] for inp in inputs]
    labels = list(names)
    for extra in (lambda i: inputs[i].atlas_path.resolve().name, lambda i: args[i]):
        clash = {x for x in labels if labels.count(x) > 1}
        if not clash:
            break
        labels = [f"{names[i]} ({extra(i)})" if x in clash else x for i, x in enumerate(labels)]
    return labels


# -- figures ---------------------------------------------------------------------------------------------------
def _prefixed(label: str, name: str) -> str:
    return f"{label}: {name.removeprefix('ours: ')}"


def _ours(trace: dict, i: int, label: str) -> dict:
    """A trace of atlas i, named after its model and drawn in its style."""
    t = copy.deepcopy(trace)
    t["legendgroup"] = _prefixed(label, t.get("legendgroup") or t["name"])
    t["name"] = _prefixed(label, t["name"])
    # legend: one block per model in atlas order, the paper after them
    t["legendrank"] = (i + 1) * 1000 + t.get("legendrank", 100)
    t["meta"] = {**t.get("meta", {}), "model": i, "atlas": label}
    if isinstance(t.get("text"), list):
        t["text"] = [None if x is None else f"<b>{esc(label)}</b><br>{x}" for x in t["text"]]
    dash, symbol, pattern = model_style(i)
    if t.get("type") == "bar":
        # stacks per model, the models' stacks side by side; plotly sizes them from the closest layers of all
        t["offsetgroup"] = str(i)
        t.pop("width", None)
        if pattern:
            t["marker"] = {**t.get("marker", {}), "pattern": {"shape": pattern, "fillmode": "overlay",
                                                              "fgcolor": "white", "size": 6}}
        return t
    line = t.get("line")
    if isinstance(line, dict) and line.get("width", 1) > 0 and not line.get("dash"):
        line["dash"] = dash
    if "markers" in str(t.get("mode", "")):
        t["marker"] = {**t.get("marker", {}), "symbol": symbol}
    return t


def _paper_key(t: dict) -> tuple:
    return (t.get("name"), t.get("xaxis"), t.get("yaxis"), json.dumps(t.get("x")), json.dumps(t.get("y")))


def _extend_range(axis: dict, ys: list[float]) -> None:
    """Widen a fixed linear range that would cut another model's numbers off (never narrow it)."""
    r = axis.get("range")
    if axis.get("type") == "log" or not (isinstance(r, list) and len(r) == 2) or not ys:
        return
    lo, hi = min(ys), max(ys)
    pad = 0.03 * ((max(hi, r[1]) - min(lo, r[0])) or 1)
    axis["range"] = [min(r[0], lo - pad) if lo < r[0] else r[0], max(r[1], hi + pad) if hi > r[1] else r[1]]


def merge_figure(fid: str, entries: list[Entry]) -> Merged:
    """One figure id over every atlas: their traces in one plot, the paper's once, their notes named."""
    number, section, title = FIGURE_INFO[fid]
    merged = Merged(Figure(fid, number, section, title, "", wide=True))
    fig = merged.figure
    drawn = []
    for i, e in enumerate(entries):
        f = e.figures.get(fid)
        if f is None or f.missing or f.spec is None:
            why = f.missing if f is not None and f.missing else "not drawn"
            merged.states.append((e, "missing", why))
            fig.notes.append(f"{e.label}: not drawn: {why}")
            continue
        merged.states.append((e, f.verdict.status if f.verdict else "na", f.verdict.text if f.verdict else ""))
        drawn.append((i, e, f))
        fig.notes += [f"{e.label}: {n}" for n in f.notes]
    merged.across = across([(e.label, status) for e, status, _ in merged.states])
    captions = list(dict.fromkeys(f.caption for _, _, f in drawn if f.caption))
    fig.caption = captions[0] if len(captions) == 1 else " ".join(
        f"{e.label}: {f.caption}" for _, e, f in drawn if f.caption)
    if not drawn:
        fig.missing = "not drawn for any model: " + "; ".join(f"{e.label}: {why}" for e, _, why in merged.states)
        fig.notes = []
        return merged
    base = max(drawn, key=lambda d: "xaxis2" in d[2].spec["layout"])[2]
    layout = copy.deepcopy(base.spec["layout"])
    data: list[dict] = []
    paper: dict[tuple, dict] = {}
    in_legend: set[str] = set()
    for i, e, f in drawn:
        for t in f.spec["data"]:
            if (t.get("meta") or {}).get("role") == "paper":
                key = _paper_key(t)
                if key not in paper:
                    paper[key] = copy.deepcopy(t)
                    paper[key]["legendrank"] = (len(entries) + 1) * 1000 + t.get("legendrank", 300)
                    data.append(paper[key])
                if t.get("showlegend"):
                    in_legend.add(t["name"])
            else:
                data.append(_ours(t, i, e.label))
    shown: set[str] = set()
    for t in paper.values():  # a paper curve that several atlases draw keeps one legend entry
        t["showlegend"] = t["name"] in in_legend and t["name"] not in shown
        if t["showlegend"]:
            shown.add(t["name"])
    _merge_layout(layout, data, drawn)
    fig.spec = {"data": data, "layout": layout}
    return merged


def _merge_layout(layout: dict, data: list[dict], drawn: list[tuple[int, Entry, Figure]]) -> None:
    axes = [k for k in ("xaxis", "xaxis2") if k in layout]
    if len(axes) == 1:
        title = layout["xaxis"].get("title") or {}
        if str(title.get("text", "")).startswith(DEPTH_TITLE):
            depths = ", ".join(f"{e.label} L={e.inp.n_layers}" for _, e, _ in drawn)
            title["text"] = f"{DEPTH_TITLE} · {depths}, paper L={PAPER_LAYERS}"
    ys = [v for t in data for v in (t.get("y") or []) if isinstance(v, (int, float))
          and not isinstance(v, bool) and t.get("type") != "bar"]
    for key in ("yaxis", "yaxis2"):
        axis = layout.get(key)
        if not axis:
            continue
        if axis.get("type") == "log" and "tickvals" in axis:
            axis.update(log_percent_ticks(data))
        else:
            _extend_range(axis, ys)
    layout["height"] = legend_height(data, per_row=2)
    if len({t["offsetgroup"] for t in data if t.get("type") == "bar"}) > 1:
        layout["bargap"] = 0.25  # lets the eye find where one layer's stacks end and the next layer's begin
    notes = {}
    for _, e, f in drawn:  # a panel another model draws on needs no "no data" note in its middle
        for ann in f.spec["layout"].get("annotations") or []:
            axis = str(ann.get("xref", "")).split(" ")[0]
            if any(t.get("xaxis") == axis and (t.get("meta") or {}).get("role") != "paper" for t in data):
                continue
            text = f"{esc(e.label)}: {ann.get('text', '')}"
            if axis in notes:
                notes[axis]["text"] += "<br>" + text
            else:
                notes[axis] = dict(ann, text=text)
    layout.pop("annotations", None)
    if notes:
        layout["annotations"] = list(notes.values())


def across(states: list[tuple[str, str]]) -> Verdict:
    """Whether a finding holds across models, from each model's status (yes | partly | no | na | missing):
    status 'mixed' where they differ."""
    n = len(states)
    kinds = [s for _, s in states]
    both = "both models" if n == 2 else f"all {n} models"
    either = "either model" if n == 2 else f"any of the {n} models"
    if len(set(kinds)) == 1:
        k = kinds[0]
        text = {"yes": f"Holds in {both}", "partly": f"Partly holds in {both}", "no": f"Does not hold in {either}",
                "na": f"Cannot be compared with the paper in {either}", "missing": f"Not drawn for {either}"}[k]
        return Verdict("na" if k == "missing" else k, text + ".")
    phrase = {"yes": "holds in", "partly": "partly holds in", "no": "does not hold in",
              "na": "cannot be compared in", "missing": "is not drawn for"}
    parts = [f"{phrase[k]} {join_words([label for label, s in states if s == k])}"
             for k in phrase if k in kinds]
    text = "; ".join(parts)
    # a model without the figure says nothing against the others: their common status stands
    drawn = {k for k in kinds if k != "missing"}
    return Verdict(drawn.pop() if len(drawn) == 1 else "mixed", text[0].upper() + text[1:] + ".")


# -- the findings table ----------------------------------------------------------------------------------------
def _num_cells(row: Row, values: list, column: str, start: bool, ci: list | None = None, mark: str = "") -> str:
    out = []
    for j, (part, v) in enumerate(zip(THIRDS, thirds(values))):
        cls = "num start" if start and j == 0 else "num"
        text = esc(fmt_value(row, v))
        if v is not None and mark:
            text = f'<span class="mark">{esc(mark)}</span> {text}'
        if part == "last" and ci is not None:
            text += f'<span class="ci">[{esc(row.fmt.format(ci[0]))}, {esc(row.fmt.format(ci[1]))}]</span>'
        value = "" if v is None else f' data-value="{v!r}"'
        out.append(f'<td class="{cls}" data-column="{column}" data-part="{part}"{value}>{text}</td>')
    return "".join(out)


def _gap(text: str, column: str) -> str:
    return f'<td class="muted start gap" colspan="4" data-column="{column}">{esc(text)}</td>'


def _row_html(row: Row, entries: list[Entry], paper: dict) -> str:
    label = row.name.removesuffix(" (headline)")
    sub = label.startswith(" ") or "   " in label
    out = [f'<tr data-row="{esc(row.id)}" data-figure="{row.figure}"><th scope="row" class="row-name'
           f'{" sub" if sub else ""}">{esc(" ".join(label.split()))}</th>']
    if row.paper is not None:
        out.append(_num_cells(row, row.paper(paper), "paper", True, mark=row.paper_label))
    else:
        out.append(_gap("—", "paper"))
    for i, e in enumerate(entries):
        values = row.values(e.inp.analysis)
        if values is None:
            why = "no analysis.json" if e.inp.analysis is None else "not in its analysis.json"
            out.append(_gap(why, str(i)))
        else:
            out.append(_num_cells(row, values, str(i), True, row.last_interval(e.inp.analysis)))
    return "".join(out) + "</tr>"


def findings_table(entries: list[Entry], merged: dict[str, Merged]) -> str:
    """Per finding: what the paper found and each model's verdict, then its headline numbers per third of the
    layers (the paper's beside them where it gives a per-layer curve)."""
    paper = entries[0].inp.paper
    per_entry = [rows(e.inp.analysis) for e in entries]
    width = 1 + 4 * (len(entries) + 1)
    part_titles = {"low": "mean over the lowest third of the layers", "mid": "mean over the middle third",
                   "high": "mean over the highest third", "last": "the last layer (its 95% interval below)"}
    head = ['<thead><tr><th rowspan="2">Finding</th>'
            f'<th colspan="4" class="start" data-column="paper">Paper ({PAPER_LAYERS} layers)</th>']
    head += [f'<th colspan="4" class="start" data-column="{i}">{esc(e.label)} ({e.inp.n_layers} layers)</th>'
             for i, e in enumerate(entries)]
    head.append("</tr><tr>")
    for _ in range(len(entries) + 1):
        head += [f'<th class="{"num start" if j == 0 else "num"}" title="{part_titles[p]}">{p}</th>'
                 for j, p in enumerate(THIRDS)]
    head.append("</tr></thead>")
    body = []
    for fid in FIGURES:
        m = merged[fid]
        f = m.figure
        ref = paper.get(PAPER_TEXT.get(fid, ""), {})
        ptext = ref.get("text") if isinstance(ref, dict) else None
        body.append(f'<tr class="finding-head" id="finding-{fid}" data-figure="{fid}" data-status="{m.across.status}">'
                    f'<th colspan="{width}"><a href="#{fid}">Fig {esc(f.number)}</a> '
                    f'{esc(FIGURE_SHORT.get(fid, f.title))} <span class="badge badge-{m.across.status}">'
                    f'{BADGE[m.across.status]}</span> <span class="across">{esc(m.across.text)}</span>'
                    f'<span class="paper-text">Paper: {esc(ptext or "not in the paper.")}</span></th></tr>')
        cells = [f'<tr class="verdicts" data-figure="{fid}"><th scope="row" class="row-name">verdict</th>'
                 '<td colspan="4" class="start muted gap" data-column="paper">—</td>']
        for i, (_, status, text) in enumerate(m.states):
            # the sentence is under the figure (and on hover): the table stays one line per finding
            cells.append(f'<td colspan="4" class="start verdict-cell" data-column="{i}" data-status="{status}" '
                         f'title="{esc(text)}"><a href="#{fid}"><span class="badge badge-{status}">{BADGE[status]}'
                         "</span></a></td>")
        body.append("".join(cells) + "</tr>")
        done: set[str] = set()
        for rs in per_entry:
            for row in rs:
                if row.figure != fid or row.id in done:
                    continue
                done.add(row.id)
                if any(row.values(e.inp.analysis) is not None for e in entries):
                    body.append(_row_html(row, entries, paper))
    return ('<section id="findings"><h2>Findings across models</h2><p class="muted">Per finding of the paper: its '
            "statement and each model's verdict (as in each model's own report), whether it holds across models, "
            "then the headline numbers as means over the lowest, middle and highest third of the layers and at "
            "the last layer (as `ffkv analyze` prints them), the paper's beside them where it gives a per-layer "
            "curve (≈: interpolated from its figure; N2G: Neuron-to-Graph's stated numbers).</p>"
            f'<div class="table-wrap"><table class="findings">{"".join(head)}<tbody>{"".join(body)}</tbody>'
            "</table></div></section>")


# -- page parts ------------------------------------------------------------------------------------------------
_SVG_DASH = {"solid": "", "dashdot": "9 3 3 3", "longdashdot": "15 6 3 6", "6px,2px,2px,2px,2px,2px": "6 2 2 2 2 2"}


def _swatch(i: int) -> str:
    """The model's line and marker, as the legend draws them."""
    dash, symbol, _ = model_style(i)
    d = f' stroke-dasharray="{_SVG_DASH[dash]}"' if _SVG_DASH[dash] else ""
    mark = {"circle": '<circle cx="21" cy="6" r="3.5" fill="#2563a8"/>',
            "square": '<rect x="17.5" y="2.5" width="7" height="7" fill="#2563a8"/>',
            "triangle-up": '<polygon points="21,1.5 25,9.5 17,9.5" fill="#2563a8"/>',
            "diamond": '<polygon points="21,1.5 25.5,6 21,10.5 16.5,6" fill="#2563a8"/>'}[symbol]
    return (f'<svg width="42" height="12" aria-hidden="true"><line x1="1" y1="6" x2="41" y2="6" stroke="#2563a8" '
            f'stroke-width="2.4"{d}/>{mark}</svg>')


def style_key(entries: list[Entry]) -> str:
    def paper(dash):
        return (f'<svg width="42" height="12" aria-hidden="true"><line x1="1" y1="6" x2="41" y2="6" stroke="#6b7280" '
                f'stroke-width="2" stroke-dasharray="{dash}"/></svg>')
    items = [(_swatch(i), f"{e.label}" + (", bars hatched" if model_style(i)[2] else ""))
             for i, e in enumerate(entries)]
    items += [(paper("6 4"), "paper (approx.): trend interpolated from the paper's figure"),
              (paper("2 3"), "paper: a number stated in its text")]
    return ('<ul class="style-key">' + "".join(f"<li>{a} {esc(b)}</li>" for a, b in items)
            + "<li>colour: one per quantity, the same for every model and for the paper</li></ul>")


def atlas_card(i: int, e: Entry) -> str:
    inp, t = e.inp, e.inp.traits
    m, c, r = inp.model, inp.manifest.get("corpus") or {}, inp.manifest.get("result") or {}
    d_ff = m.get("d_ff")
    analysis = inp.analysis
    facts = _dl([
        ("model", esc(t["display_name"])),
        ("architecture", esc(f"{m.get('architecture', '?')}" + (f" ({m['class']})" if m.get("class") else ""))),
        ("layers × d_ff", f"{_fmt_int(inp.n_layers)} × {_fmt_int(d_ff) if d_ff is not None else '?'}"),
        ("activation", esc(m.get("activation", "?")) + (", gated" if m.get("gated") else ", not gated")),
        ("faces", "positive and negative" if inp.signed else "positive only"),
        ("instruct-tuned", "yes" if t["instruct"] else None),
        ("quantised", esc(t["quantised"]) if t["quantised"] else None),
        ("corpus", esc(f"{c.get('corpus', '?')} ({c.get('unit', '?')}s)")),
        ("tokens scanned", _fmt_int(r.get("tokens_scanned") if r.get("tokens_scanned") is not None else t["tokens"])),
        ("top-k triggers", _fmt_int((inp.manifest.get("scan") or {}).get("top_k"))),
        ("scan id", f"<code>{esc(inp.scan_id)}</code>" if inp.scan_id else None),
        ("analysis", esc(f"ffkv {analysis.get('ffkv_version', '?')}") if analysis is not None
         else f'<span class="muted">{esc(inp.analysis_note)}</span>'),
        ("atlas", f"<code>{esc(e.arg)}</code>"),
    ])
    return (f'<div class="card" data-atlas="{i}" data-scan-id="{esc(inp.scan_id or "")}"><h3>{_swatch(i)} '
            f"{esc(e.label)}</h3>{facts}</div>")


def compare_command(entries: list[Entry], out_arg: str | None) -> str:
    lines = []
    for e in entries:
        lines.append(f"# {e.label}")
        lines += [x for x in reproduce_command(e.inp, e.arg, report=False).splitlines()
                  if e.inp.analysis is not None or not x.startswith("ffkv analyze")]
    out = f" -o {_shell(out_arg)}" if out_arg else ""
    lines.append("ffkv compare " + " ".join(_shell(e.arg) for e in entries) + out)
    return "\n".join(lines)


def header(entries: list[Entry], out_arg: str | None) -> str:
    cards = "".join(atlas_card(i, e) for i, e in enumerate(entries))
    return (f'<section id="overview"><h2>Atlases</h2><div class="cards atlases">{cards}</div>'
            f'<h3 id="reproduce">How to reproduce</h3><pre class="cmd"><code>{esc(compare_command(entries, out_arg))}'
            "</code></pre></section>")


def figure_html(m: Merged) -> str:
    f = m.figure
    head = f'<h3><span class="fignum">Fig {esc(f.number)}</span> {esc(f.title)}</h3>'
    across_html = (f'<p class="verdict verdict-{m.across.status}"><span class="badge badge-{m.across.status}">'
                   f"{BADGE[m.across.status]}</span> {esc(m.across.text)}</p>")
    verdicts = "".join(f'<li data-atlas="{i}" data-status="{status}"><span class="badge badge-{status}">'
                       f"{BADGE[status]}</span> <strong>{esc(e.label)}</strong>: {esc(text)}</li>"
                       for i, (e, status, text) in enumerate(m.states) if status != "missing")
    verdicts = f'<ul class="model-verdicts">{verdicts}</ul>' if verdicts else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in f.notes)
    notes = f'<ul class="notes">{notes}</ul>' if notes else ""
    if f.missing:
        return (f'<article class="figure wide" id="{f.id}" data-figure="{f.id}" data-state="missing">{head}'
                f'<div class="missing" data-missing="{f.id}"><strong>Not drawn.</strong> {esc(f.missing)}</div>'
                f"{across_html}</article>")
    return (f'<article class="figure wide" id="{f.id}" data-figure="{f.id}" data-state="drawn">{head}'
            f'<div class="plot" id="plot-{f.id}" role="img" aria-label="{esc(f.title)}"></div>'
            f'<script type="application/json" class="figure-spec" data-figure="{f.id}">{script_json(f.spec)}'
            f'</script>{across_html}{verdicts}<p class="caption">{esc(f.caption)}</p>{notes}</article>')


def definitions_html(entries: list[Entry]) -> str:
    """The report's definitions, with each analysis's own; where two analyses define a term differently, both."""
    defs: dict[str, dict[str, list[str]]] = {k: {v: []} for k, v in DEFAULT_DEFINITIONS.items()}
    for e in entries:
        given = (e.inp.analysis or {}).get("definitions")
        if isinstance(given, dict):
            for k, v in given.items():
                if v:
                    texts = defs.setdefault(str(k), {})
                    if set(texts) == {DEFAULT_DEFINITIONS.get(str(k))}:
                        texts.clear()
                    texts.setdefault(str(v), []).append(e.label)
    items = []
    for k, texts in defs.items():
        if len(texts) == 1:
            items.append(f"<dt>{esc(k)}</dt><dd>{esc(next(iter(texts)))}</dd>")
        else:
            items.append(f"<dt>{esc(k)}</dt><dd>" + " ".join(f"{esc(join_words(who))}: {esc(v)}"
                                                           for v, who in texts.items()) + "</dd>")
    return f'<section id="definitions"><h2>Definitions</h2><dl class="defs">{"".join(items)}</dl></section>'


CSS_COMPARE = """
.cards.atlases{grid-template-columns:repeat(auto-fit,minmax(min(100%,320px),1fr))}
.cards.atlases .card h3{text-transform:none;letter-spacing:0;font-size:15px;color:var(--ink)}
.card h3 svg{vertical-align:middle;margin-right:4px}
.badge-mixed{background:var(--partly)}.verdict-mixed{border-color:var(--partly)}.dot-mixed{background:var(--partly)}
table.findings{font-size:13px}
table.findings th,table.findings td{padding:5px 7px}
table.findings tbody th{position:static;background:none;font-weight:400;color:var(--ink);font-size:13px}
table.findings .start{border-left:1px solid var(--line)}
table.findings td.num{text-align:right}
table.findings tr.finding-head th{background:#f4f6f9;font-weight:600;padding-top:9px;border-top:2px solid var(--line)}
table.findings .across{font-weight:400;color:var(--ink);margin-left:4px}
table.findings .row-name{white-space:nowrap}table.findings .row-name.sub{padding-left:22px;color:var(--muted)}
table.findings .paper-text{display:block;font-weight:400;font-size:12px;color:var(--muted);margin-top:2px}
table.findings .gap{text-align:center}
.mark{color:var(--paper);font-size:11px}
.ci{display:block;color:var(--muted);font-size:11px}
ul.model-verdicts{list-style:none;margin:8px 0 0;padding:0;font-size:13.5px}
ul.model-verdicts li{margin:5px 0}
"""


def page(entries: list[Entry], merged: dict[str, Merged], plotly_js: str, out_arg: str | None = None) -> str:
    """The whole comparison page."""
    labels = [e.label for e in entries]
    bare = [e for e in entries if e.inp.analysis is None]
    banner = ""
    if bare:
        banner = ('<div class="banner missing" data-missing="analysis">'
                  + "; ".join(f"{esc(e.label)}: {esc(e.inp.analysis_note)}" for e in bare)
                  + ". Every figure is drawn from the other models and names what is missing.</div>")
    toc = ['<li><a href="#overview">Atlases</a><ul><li><a href="#reproduce">How to reproduce</a></li></ul></li>'
           '<li><a href="#findings">Findings across models</a></li>']
    body = []
    for sid, stitle in SECTIONS:
        ms = [m for m in merged.values() if m.figure.section == sid]
        sub = "".join(f'<li><a href="#{m.figure.id}">Fig {esc(m.figure.number)}</a> <span class="dot '
                      f'dot-{"missing" if m.figure.missing else m.across.status}"></span> <span class="toc-short">'
                      f'{esc(FIGURE_SHORT.get(m.figure.id, ""))}</span></li>' for m in ms)
        toc.append(f'<li><a href="#{sid}">{esc(stitle)}</a><ul>{sub}</ul></li>')
        body.append(f'<section id="{sid}"><h2>{esc(stitle)}</h2><div class="grid">'
                    f'{"".join(figure_html(m) for m in ms)}</div></section>')
    toc.append('<li><a href="#definitions">Definitions</a></li><li><a href="#about">About this page</a></li>')
    paper = entries[0].inp.paper
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    about = (f'<section id="about"><h2>About this page</h2><p>Written by <code>ffkv compare</code> {esc(__version__)} '
             f"({esc(when)}) from the manifest and analysis.json of {len(entries)} atlases; each model's figures and "
             "verdicts are those of its own `ffkv report`. The paper's numbers come from the copy of its reference "
             f"data shipped with ffkv ({esc(paper.get('source', ''))}); paper curves are placed at relative depth "
             f"(layer+1)/{PAPER_LAYERS}, ours at (layer+1)/L of each model. The page is self-contained: plotly.js is "
             "embedded once and nothing is fetched from the network.</p></section>")
    title = "ffkv compare — " + " vs ".join(labels)
    sizes = ", ".join(f"{e.label} ({e.inp.n_layers} layers × {e.inp.model.get('d_ff', '?')})" for e in entries)
    return TEMPLATE.format(
        title=esc(title), css=CSS + CSS_COMPARE, h1=esc(title),
        subtitle=esc("Transformer feed-forward layers are key-value memories (Geva et al., 2021), reproduced on "
                     f"{len(entries)} models: {sizes}"),
        banner=banner, toc="".join(toc), header=header(entries, out_arg),
        summary=findings_table(entries, merged), style_key=style_key(entries), body="".join(body),
        definitions=definitions_html(entries), about=about, plotly=plotly_js, js=JS,
        scan_id=esc(" ".join(e.inp.scan_id or "" for e in entries)))


def build(atlases: Sequence[str | Path], plotly_js: str, out_arg: str | None = None) -> str:
    entries = load_entries(atlases)
    merged = {fid: merge_figure(fid, entries) for fid in FIGURES}
    return page(entries, merged, plotly_js, out_arg)
