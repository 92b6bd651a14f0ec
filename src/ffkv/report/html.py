"""The report page: one self-contained HTML file (plotly.js inlined once, no network), tables and text."""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
import re
from collections.abc import Callable

from ..analysis.run import AnalyzeConfig
from ..scan import ScanConfig
from ..version import __version__
from .compare import STATUS_BADGE, layer_ranges, pct
from .data import FACE_LABEL, PAPER_LAYERS, ReportInputs
from .figures import Figure

SECTIONS = (
    ("keys", "§3 Keys capture input patterns"),
    ("values", "§4 Values represent distributions over the output vocabulary"),
    ("aggregation", "§5 Aggregating memories"),
)

DEFAULT_DEFINITIONS = {
    "memory": "Row i of the FFN's input matrix (key k_i) together with row i of its output projection (value v_i). "
              "The memory coefficient m_i is the input of the output projection at position i, so the FFN output is "
              "the sum of m_i·v_i over the layer's memories.",
    "face": "For signed FFNs (gated or smooth activations) a memory has two faces: positive (largest m_i, adds +v_i) "
            "and negative (most negative m_i, adds −v_i). The paper's ReLU case is the positive face alone.",
    "trigger": "One of a memory face's top-k prefixes of the corpus by coefficient; its last token (highlighted) is "
               "the position whose coefficient was ranked, and → shows the token that follows it.",
    "relative depth": "(layer+1)/L for the 0-based layer index and L layers, so models of different depth line up: "
                      "the paper's layer j of 16 sits at j/16.",
    "paper (approx.)": "A per-layer curve interpolated from the shape the paper describes (endpoints and ranges), "
                       "not measured from its figure: read it as a trend, not as exact values.",
}

FIGURE_SHORT = {
    "fig2": "Shallow patterns in lower layers, semantic ones in upper layers",
    "explain": "Not in the paper: explanations predict held-out firing (Neuron-to-Graph: F1 0.74 → 0.42 over 6 "
               "layers) better than baselines",
    "fig3": "Removing the last token hurts most, less so with depth",
    "fig3b": "Not in the paper: removing a token can flip a signed coefficient",
    "fig4": "Values predict their keys' next token in upper layers",
    "fig4b": "Not in the paper: values that push their keys' next token to the bottom",
    "fig5": "The next token's rank under the value improves with depth",
    "fig6": "Confident values agree more",
    "causal": "Not in the paper: switching an agreeing memory off lowers its token's probability, a suppressing "
              "one raises it",
    "fig7": "10–50% of memories are active",
    "fig8": "The layer's prediction is a composition, not one memory",
    "fig9": "The residual settles the prediction in upper layers",
    "fig10": "The residual's probability of the final token rises with depth",
    "fig11": "The residual dominates; the FFN rarely overrides it",
    "fig11b": "Where the FFN changes the top token, mostly to a semantically distant word (66 of 100)",
}


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _compact(x):
    """Round floats to 6 significant digits (smaller page, same picture)."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, list):
        return [_compact(v) for v in x]
    if isinstance(x, dict):
        return {k: _compact(v) for k, v in x.items()}
    return x


def script_json(obj) -> str:
    """JSON safe to place inside a <script> element."""
    text = json.dumps(_compact(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


# -- triggers --------------------------------------------------------------------------------------------------
_LAST_PIECE = re.compile(r"(\s*[\w'’]+|\s*[^\w\s]|\s+)$")


class TriggerSplitter:
    """Splits a trigger text into (context, trigger token): "context[[token]]" as `ffkv analyze` writes it; a dict
    with "context" and "trigger_token" (as `ffkv show --json` and the Atlas API have them); or a plain string, whose
    last token is found with the atlas tokenizer (a regex for the last word if there is none)."""

    def __init__(self, inp: ReportInputs):
        self.inp = inp
        self._tok = None
        self._tried = False

    def _tokenizer(self):
        if not self._tried:
            self._tried = True
            path = self.inp.atlas_path / "tokenizer"
            if path.is_dir():
                from transformers import AutoTokenizer

                try:
                    self._tok = AutoTokenizer.from_pretrained(path)
                except Exception:  # the report must not depend on a loadable tokenizer
                    self._tok = None
        return self._tok

    def split_text(self, text: str) -> tuple[str, str]:
        if text.endswith("]]") and "[[" in text:  # analysis.json marks the trigger token: "context[[token]]"
            i = text.rindex("[[")
            return text[:i], text[i + 2:-2]
        tok = self._tokenizer()
        if tok is not None and text:
            try:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                last = tok.decode(ids[-1:]) if ids else ""
                if last and text.endswith(last):
                    return text[: len(text) - len(last)], last
            except Exception:
                pass
        m = _LAST_PIECE.search(text)
        return (text[: m.start()], m.group(0)) if m else (text, "")

    def parts(self, t) -> tuple[str, str, str | None] | None:
        """(context, trigger token, next token or None) of a trigger given as a string or a dict."""
        if isinstance(t, str):
            return (*self.split_text(t), None)
        if isinstance(t, dict):
            ctx, tok = t.get("context"), t.get("trigger_token")
            if not isinstance(ctx, str) or not isinstance(tok, str):
                ctx, tok = self.split_text(str(t.get("text", "")))
            nxt = t.get("next_token")
            return ctx, tok, nxt if isinstance(nxt, str) else None
        return None


def _visible(tok: str) -> str:
    """A token with its edge whitespace made visible."""
    tok = tok.replace("\n", "⏎")
    if tok.startswith(" "):
        tok = "␣" + tok[1:]
    return tok


def trigger_html(parts, max_context: int = 110) -> str:
    ctx, tok, nxt = parts
    ctx = ctx.replace("\n", " ")
    if len(ctx) > max_context:
        ctx = "…" + ctx[-max_context:]
    out = f'<span class="ctx">{esc(ctx)}</span><mark class="trig">{esc(tok.replace(chr(10), "⏎"))}</mark>'
    if nxt is not None:
        out += f'<span class="next" title="next token">→ {esc(_visible(nxt))}</span>'
    return out


# -- tables ----------------------------------------------------------------------------------------------------
def _depth(inp: ReportInputs, layer) -> str:
    if not isinstance(layer, int):
        return esc(layer)
    return f'{layer}<span class="depth">depth {(layer + 1) / inp.n_layers:.2f}</span>'


def _face_tag(face) -> str:
    face = face if face in FACE_LABEL else "pos"
    return f'<span class="face face-{face}">{"+v" if face == "pos" else "−v"}</span>'


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _score_text(v) -> str:
    return f"{v:.2f}" if _finite(v) else "n/a"


def _kind_tag(kind) -> str:
    kind = kind if kind in ("shallow", "semantic", "both", "none") else "other"
    return f'<span class="kind kind-{kind}">{esc(kind)}</span>'


def _has_description(keys) -> bool:
    return any(isinstance(k.get("description"), str) and k["description"] for k in keys)


def _description_cell(k) -> str:
    """A key's one-line explanation (ffkv explain), its kind and held-out scores."""
    desc = k.get("description")
    if not isinstance(desc, str) or not desc:
        return '<td class="desc muted">—</td>'
    scores = ""
    if any(isinstance(k.get(x), (int, float)) for x in ("sim_corr", "f1")):
        scores = (f'<span class="scores">sim. corr. {_score_text(k.get("sim_corr"))} · F1 '
                  f'{_score_text(k.get("f1"))}</span>')
    label = _kind_tag(k["label"]) if k.get("label") is not None else ""
    return f'<td class="desc">{label}{esc(desc)}{scores}</td>'


def _key_rows(inp, keys, split: TriggerSplitter, n_triggers: int, describe: bool = False) -> str:
    rows = []
    for k in keys:
        patterns = [p for p in (k.get("patterns") or []) if isinstance(p, dict)]
        member: dict[int, list[int]] = {}
        pat_html = []
        for j, p in enumerate(patterns, 1):
            kind = p.get("kind") if p.get("kind") in ("shallow", "semantic") else "other"
            ranks = [r for r in (p.get("triggers") or []) if isinstance(r, int)]
            for r in ranks:
                member.setdefault(r, []).append(j)
            pv = p.get("p_value")
            pv = f' <span class="pv">p = {pv:.2g}</span>' if isinstance(pv, (int, float)) else ""
            pat_html.append(f'<li><span class="pnum">{j}</span><span class="kind kind-{kind}">{esc(kind)}</span> '
                            f'{esc(p.get("description", ""))} <span class="pv">{len(ranks)} triggers</span>{pv}</li>')
        trig_html = []
        for r, t in enumerate((k.get("triggers") or [])[:n_triggers]):
            parts = split.parts(t)
            if parts is None:
                continue
            refs = "".join(f'<span class="pnum">{j}</span>' for j in member.get(r, []))
            trig_html.append(f"<li>{trigger_html(parts)}{refs}</li>")
        more = len(k.get("triggers") or []) - n_triggers
        if more > 0:
            trig_html.append(f'<li class="more">… {more} more</li>')
        rows.append(
            f"<tr><td class=\"num\">{_depth(inp, k.get('layer'))}</td><td class=\"num\">{esc(k.get('key', '?'))}"
            f"{_face_tag(k.get('face', 'pos'))}</td>{_description_cell(k) if describe else ''}"
            f"<td><ol class=\"patterns\">"
            f"{''.join(pat_html) or '<li class=muted>no pattern found</li>'}</ol></td>"
            f"<td><ol class=\"triggers\">{''.join(trig_html)}</ol></td></tr>")
    return "".join(rows)


def _key_score(k) -> tuple:
    ps = [p for p in (k.get("patterns") or []) if isinstance(p, dict)]
    kinds = {p.get("kind") for p in ps}
    pvals = [p["p_value"] for p in ps if isinstance(p.get("p_value"), (int, float))]
    sim = k.get("sim_corr") if _finite(k.get("sim_corr")) else 0.0
    return (-len(kinds), -len(ps), -sim, min(pvals) if pvals else 1.0)


def table1(inp: ReportInputs, split: TriggerSplitter) -> tuple[str, str | None]:
    """Example keys per depth (Table 1 of the paper). Returns (html, missing note)."""
    b = inp.block("patterns")
    keys = [k for k in ((b or {}).get("keys") or []) if isinstance(k, dict)]
    for face in inp.faces[1:]:
        keys += [dict(k, face=k.get("face", face)) for k in ((inp.block("patterns", face) or {}).get("keys") or [])
                 if isinstance(k, dict)]
    if not keys:
        why = inp.missing_reason("patterns") if b is None else "analysis.json 'patterns' has no 'keys'"
        return "", why
    by_layer: dict = {}
    for k in keys:
        by_layer.setdefault(k.get("layer"), []).append(k)
    layers = sorted(x for x in by_layer if isinstance(x, int))
    if len(layers) > 6:
        layers = sorted({layers[round(i * (len(layers) - 1) / 5)] for i in range(6)})
    examples = []
    for layer in layers:
        for face in inp.faces:
            cands = [k for k in by_layer[layer] if k.get("face", "pos") == face]
            if cands:
                examples.append(min(cands, key=_key_score))
    describe = _has_description(keys)
    head = ("<thead><tr><th>Layer</th><th>Key</th>"
            + ("<th>Explanation (one line, ffkv explain)</th>" if describe else "")
            + "<th>Patterns (numbered)</th><th>Top trigger examples "
            "(trigger token highlighted, → next token; the numbers say which pattern a trigger shares)</th>"
            "</tr></thead>")
    out = [f'<div class="table-wrap"><table class="keys">{head}<tbody>'
           f'{_key_rows(inp, examples, split, 6, describe)}</tbody></table></div>']
    capped = sorted(keys, key=lambda k: (k.get("layer") if isinstance(k.get("layer"), int) else -1,
                                         k.get("face", "pos"), k.get("key") if isinstance(k.get("key"), int) else 0))
    limit = 400
    out.append(f'<details class="all-keys"><summary>All {len(keys)} analysed keys'
               f'{f" (first {limit} shown)" if len(keys) > limit else ""}, layers '
               f'{esc(layer_ranges(sorted({k["layer"] for k in keys if isinstance(k.get("layer"), int)})))}</summary>'
               f'<div class="table-wrap"><table class="keys">{head}<tbody>'
               f'{_key_rows(inp, capped[:limit], split, 10, describe)}</tbody></table></div></details>')
    return "".join(out), None


def table_best(inp: ReportInputs, limit: int = 20) -> tuple[str, str | None]:
    """The best-explained memories: the keys of the patterns block(s) by held-out simulation correlation, with
    their kind, one-line explanation and scores. Returns (html, missing note)."""
    keys = []
    for face in inp.faces:
        b = inp.block("patterns", face)
        keys += [dict(k, face=k.get("face", face)) for k in ((b or {}).get("keys") or []) if isinstance(k, dict)]
    scored = [k for k in keys if _finite(k.get("sim_corr")) and isinstance(k.get("description"), str)]
    if not scored:
        b = inp.block("patterns")
        if b is None:
            return "", inp.missing_reason("patterns")
        why = "analysis.json 'patterns' has no 'keys'" if not keys else \
            ("its keys have no explanations or held-out scores (analysis.json written before `ffkv explain`): run "
             f"`ffkv explain {inp.atlas_path}` and `ffkv analyze {inp.atlas_path} --only patterns`")
        return "", why
    scored.sort(key=lambda k: (-k["sim_corr"], -(k["f1"] if _finite(k.get("f1")) else -1)))
    rows = []
    for k in scored[:limit]:
        rows.append(f"<tr><td class=num>{_depth(inp, k.get('layer'))}</td><td class=num>{esc(k.get('key', '?'))}"
                    f"{_face_tag(k.get('face', 'pos'))}</td><td>{_kind_tag(k.get('label'))}</td>"
                    f"<td class=desc>{esc(k['description'])}</td>"
                    f"<td class=num>{_score_text(k['sim_corr'])}</td><td class=num>{_score_text(k.get('f1'))}</td>"
                    "</tr>")
    more = f'<p class="muted">{len(scored) - limit} more in analysis.json.</p>' if len(scored) > limit else ""
    table = ('<div class="table-wrap"><table class="best"><thead><tr><th>Layer</th><th>Key</th><th>Kind</th>'
             "<th>Explanation (one line)</th><th title=\"Pearson correlation of the simulated activation with the "
             "coefficient on held-out prefixes\">Sim. corr.</th><th title=\"firing F1 on held-out text "
             "(fires: coefficient ≥ 0.5 × its top scanned coefficient)\">F1</th></tr></thead><tbody>"
             f"{''.join(rows)}</tbody></table></div>{more}")
    return table, None


def table2(inp: ReportInputs, split: TriggerSplitter) -> tuple[str, str | None]:
    """Values whose top token agrees with many of their key's triggers (Table 2 of the paper)."""
    mems = []
    blocks = [(face, inp.block("values", face)) for face in inp.faces]
    for face, b in blocks:
        mems += [dict(m, face=m.get("face", face)) for m in ((b or {}).get("top_memories") or [])
                 if isinstance(m, dict)]
    paper_rows = "".join(
        f"<tr><td class=num>{r['layer']}</td><td class=num>{r['key']}</td><td><code>{esc(r['prediction'])}</code>"
        f"</td><td class=num>{pct(r['precision_at_50'])}</td></tr>" for r in inp.paper["table2_precision_at_50"])
    paper = ('<details class="paper-table" open><summary>The paper\'s examples (Table 2; 1-based layers of 16, '
             'precision@50)</summary><table class="compact"><thead><tr><th>Layer</th><th>Key</th><th>Prediction</th>'
             f"<th>Precision@50</th></tr></thead><tbody>{paper_rows}</tbody></table></details>")
    if not mems:
        b = blocks[0][1]
        why = inp.missing_reason("values") if b is None else "analysis.json 'values' has no 'top_memories'"
        return paper, why
    k = (blocks[0][1] or {}).get("precision_k")
    k = f"@{k}" if isinstance(k, int) else ""
    mems.sort(key=lambda m: -(m.get("precision") if isinstance(m.get("precision"), (int, float)) else -1))
    rows = []
    for m in mems[:20]:
        prec = m.get("precision")
        bar = (f'<span class="bar"><span style="width:{max(0.0, min(1.0, prec)) * 100:.0f}%"></span></span>'
               f"{pct(prec)}") if isinstance(prec, (int, float)) else "n/a"
        toks = "".join(f"<code class=tok>{esc(_visible(str(t)))}</code>" for t in (m.get("top_tokens") or [])[:8])
        texts = (m.get("triggers") or [])[:3]
        nexts = m.get("trigger_next_tokens") if isinstance(m.get("trigger_next_tokens"), list) else []
        trig = ""
        for i, t in enumerate(texts):
            parts = split.parts(t)
            if parts is None:
                continue
            if parts[2] is None and i < len(nexts) and isinstance(nexts[i], str):
                parts = (parts[0], parts[1], nexts[i])
            trig += f"<li>{trigger_html(parts)}</li>"
        rows.append(f"<tr><td class=num>{_depth(inp, m.get('layer'))}</td><td class=num>{esc(m.get('key', '?'))}"
                    f"{_face_tag(m.get('face', 'pos'))}</td><td class=prec>{bar}</td><td>{toks}</td>"
                    f"<td><ol class=triggers>{trig}</ol></td></tr>")
    more = f'<p class="muted">{len(mems) - 20} more in analysis.json.</p>' if len(mems) > 20 else ""
    table = ('<div class="table-wrap"><table class="values"><thead><tr><th>Layer</th><th>Key</th>'
             f"<th title=\"share of the key's top triggers whose next token is the value's top token\">"
             f"Precision{k}</th>"
             "<th>Value's top tokens</th><th>Top triggers</th></tr></thead><tbody>"
             f"{''.join(rows)}</tbody></table></div>{more}")
    return table + paper, None


# -- page parts ------------------------------------------------------------------------------------------------
def _dl(items) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items if v not in (None, "")) + "</dl>"


def _fmt_int(x) -> str:
    return f"{x:,}" if isinstance(x, int) else esc(x) if x is not None else ""


def reproduce_command(inp: ReportInputs, atlas_arg: str, report: bool = True) -> str:
    """The commands that remake this report: scan flags that differ from their defaults, then analyze and (with
    ``report``) report."""
    scan = inp.manifest.get("scan") or {}
    fields = {f.name: f.default for f in dataclasses.fields(ScanConfig)}
    skip = {"checkpoint_every", "shard", "layers", "device", "batch_tokens", "max_batch"}
    args = []
    for name, default in fields.items():
        if name in skip or name not in scan or scan[name] == default or scan[name] is None:
            continue
        args.append(f"--{name.replace('_', '-')} {_shell(scan[name])}")
    layers = scan.get("layers")
    if isinstance(layers, list) and layers and sorted(layers) != list(range(inp.n_layers)):
        args.append(f"--layers {layer_ranges(layers).replace('–', '-').replace(' ', '')}")
    lines = []
    if isinstance(scan.get("world_size"), int) and scan["world_size"] > 1:
        lines.append(f"# scanned on {scan['world_size']} ranks (torchrun); one process gives the same atlas")
    lines.append("ffkv scan " + " ".join(args + [f"--out {_shell(atlas_arg)}"]))
    lines.append(" ".join(["ffkv analyze", *_analyze_flags(inp), _shell(atlas_arg)]))
    if report:
        lines.append(f"ffkv report {_shell(atlas_arg)}")
    return "\n".join(lines)


def _analyze_flags(inp: ReportInputs) -> list[str]:
    """`ffkv analyze` flags for the analysis settings (analysis.json "config") that differ from the defaults."""
    cfg = (inp.analysis or {}).get("config")
    if not isinstance(cfg, dict):
        return []
    defaults = {f.name: f.default for f in dataclasses.fields(AnalyzeConfig)}
    return [f"--{k.replace('_', '-')} {_shell(v)}" for k, v in cfg.items()
            if k in defaults and k != "only" and v is not None and v != defaults[k]]


def _shell(x) -> str:
    s = str(x)
    return s if re.fullmatch(r"[\w./:,@%+=-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def _special_prefix(c: dict) -> str | None:
    """What every unit starts with: the special tokens fed (never scored) before its text, or its first text token;
    None for atlases from before the manifest recorded it."""
    if "special_prefix_tokens" not in c and "bos" not in c:
        return None
    tokens = c.get("special_prefix_tokens") or []
    how = " (--bos)" if c.get("bos") else " (the tokenizer's)"
    return esc(" ".join(tokens) + how) + ", fed, not scored" if tokens else esc("the unit's first text token (no BOS)")


def header(inp: ReportInputs, atlas_arg: str) -> str:
    m, c = inp.model, inp.manifest.get("corpus") or {}
    s, r = inp.manifest.get("scan") or {}, inp.manifest.get("result") or {}
    t = inp.traits
    a = inp.analysis or {}
    tps = r.get("tokens_per_second")
    model = _dl([
        ("name", esc(t["display_name"])),
        ("architecture", esc(f"{m.get('architecture', '?')}" + (f" ({m['class']})" if m.get("class") else ""))),
        ("layers", _fmt_int(m.get("n_layers"))),
        ("d_model", _fmt_int(m.get("d_model"))),
        ("d_ff (memories / layer)", _fmt_int(m.get("d_ff"))),
        ("memories in all", _fmt_int(m["n_layers"] * m["d_ff"]) if isinstance(m.get("d_ff"), int) else None),
        ("activation", esc(m.get("activation", "?")) + (", gated" if m.get("gated") else ", not gated")),
        ("faces", "positive and negative (signed coefficients)" if inp.signed else "positive only"),
        ("vocabulary", _fmt_int(m.get("vocab_size"))),
        ("instruct-tuned", "yes" if t["instruct"] else None),
        ("quantised", esc(t["quantised"]) if t["quantised"] else None),
    ])
    corpus = _dl([
        ("corpus", esc(c.get("corpus", "?"))),
        ("unit", esc(c.get("unit", "?"))),
        ("units", _fmt_int(c.get("n_units"))),
        ("tokens", _fmt_int(c.get("n_tokens"))),
        ("documents", _fmt_int(c.get("n_documents"))),
        ("max length", _fmt_int(c.get("max_length"))),
        ("position 0", _special_prefix(c)),
    ])
    scan = _dl([
        ("tokens scanned", _fmt_int(r.get("tokens_scanned"))),
        ("units scanned", _fmt_int(r.get("units_scanned"))),
        ("top-k triggers", _fmt_int(s.get("top_k"))),
        ("layers", esc(layer_ranges(inp.scanned_layers))),
        ("throughput", f"{tps:,.0f} tokens/s" if isinstance(tps, (int, float)) else None),
        ("time", f"{r['seconds']:,.0f} s" if isinstance(r.get("seconds"), (int, float)) else None),
        ("dtype / device", esc(f"{s.get('dtype', '?')} / {s.get('device', '?')}")),
    ])
    versions = _dl([
        ("scanned with", esc(f"ffkv {inp.manifest.get('ffkv_version', '?')}")),
        ("scan date", esc(inp.manifest.get("created", "?"))),
        ("scan id", f"<code>{esc(inp.scan_id)}</code>" if inp.scan_id else None),
        ("analysed with", esc(f"ffkv {a['ffkv_version']}") if a.get("ffkv_version") else "not analysed"),
        ("report", esc(f"ffkv {__version__}, "
                       f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")),
    ])
    cmd = reproduce_command(inp, atlas_arg)
    cfg = a.get("config")
    cfg_html = (f"<details><summary>analysis settings (analysis.json \"config\")</summary><pre>"
                f"{esc(json.dumps(cfg, indent=1, ensure_ascii=False))}</pre></details>") if cfg else ""
    return (f'<section id="overview"><h2>Overview</h2><div class="cards">'
            f'<div class="card"><h3>Model</h3>{model}</div><div class="card"><h3>Corpus</h3>{corpus}</div>'
            f'<div class="card"><h3>Scan</h3>{scan}</div><div class="card"><h3>Versions</h3>{versions}</div></div>'
            f'<h3 id="reproduce">How to reproduce</h3><pre class="cmd"><code>{esc(cmd)}</code></pre>{cfg_html}'
            "</section>")


def style_key() -> str:
    def svg(dash, marker, width=2.4):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        dot = '<circle cx="21" cy="6" r="3" fill="#2563a8"/>' if marker else ""
        return (f'<svg width="42" height="12" aria-hidden="true"><line x1="1" y1="6" x2="41" y2="6" '
                f'stroke="#2563a8" stroke-width="{width}"{d}/>{dot}</svg>')
    items = [(svg("", True), "ours (this model), one colour per quantity"),
             (svg("", False, 1.5), "our baselines"),
             (svg("6 4", False, 2), "paper (approx.): trend interpolated from the paper's figure"),
             (svg("2 3", False, 2), "paper: a number stated in its text")]
    return '<ul class="style-key">' + "".join(f"<li>{a} {esc(b)}</li>" for a, b in items) + "</ul>"


def summary_table(figures: list[Figure]) -> str:
    rows = []
    for f in figures:
        if f.missing:
            badge, text = '<span class="badge badge-na">missing</span>', esc(f.missing)
        elif f.verdict:
            badge = f'<span class="badge badge-{f.verdict.status}">{STATUS_BADGE[f.verdict.status]}</span>'
            text = esc(f.verdict.text)
        else:
            badge, text = '<span class="badge badge-na">n/a</span>', ""
        rows.append(f'<tr><td><a href="#{f.id}">Fig {f.number}</a></td><td>{esc(FIGURE_SHORT.get(f.id, f.title))}'
                    f"</td><td>{badge}</td><td class=small>{text}</td></tr>")
    return ('<section id="summary"><h2>Does it reproduce?</h2><p class="muted">One line per experiment, generated '
            "from the numbers below (trends and endpoints compared on relative depth).</p><div class=table-wrap>"
            '<table class="summary"><thead><tr><th>Figure</th><th>Finding in the paper</th><th>Here</th>'
            f"<th>Why</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>")


def figure_html(f: Figure) -> str:
    cls = "figure wide" if f.wide else "figure"
    head = f'<h3><span class="fignum">Fig {f.number}</span> {esc(f.title)}</h3>'
    if f.missing:
        return (f'<article class="{cls}" id="{f.id}" data-figure="{f.id}" data-state="missing">{head}'
                f'<div class="missing" data-missing="{f.id}"><strong>Not drawn.</strong> {esc(f.missing)}</div>'
                f'<p class="caption">{esc(f.caption)}</p></article>')
    verdict = ""
    if f.verdict:
        verdict = f'<p class="verdict verdict-{f.verdict.status}">{esc(f.verdict.text)}</p>'
    notes = "".join(f'<li>{esc(n)}</li>' for n in f.notes)
    notes = f'<ul class="notes">{notes}</ul>' if notes else ""
    return (f'<article class="{cls}" id="{f.id}" data-figure="{f.id}" data-state="drawn">{head}'
            f'<div class="plot" id="plot-{f.id}" role="img" aria-label="{esc(f.title)}"></div>'
            f'<script type="application/json" class="figure-spec" data-figure="{f.id}">{script_json(f.spec)}'
            f"</script>{verdict}<p class=\"caption\">{esc(f.caption)}</p>{notes}</article>")


def table_html(tid: str, title: str, body: str, missing: str | None, intro: str) -> str:
    note = f'<div class="missing" data-missing="{tid}"><strong>Not shown.</strong> {esc(missing)}</div>' \
        if missing else ""
    return f'<article class="table-block" id="{tid}"><h3>{esc(title)}</h3><p class="caption">{esc(intro)}</p>' \
        f"{note}{body}</article>"


def definitions_html(inp: ReportInputs) -> str:
    defs = dict(DEFAULT_DEFINITIONS)
    given = (inp.analysis or {}).get("definitions")
    if isinstance(given, dict):
        defs.update({str(k): str(v) for k, v in given.items() if v})
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in defs.items())
    return f'<section id="definitions"><h2>Definitions</h2><dl class="defs">{items}</dl></section>'


def page(inp: ReportInputs, figures: list[Figure], atlas_arg: str, plotly_js: str,
         table_fn: Callable[[], tuple[tuple[str, str | None], ...]]) -> str:
    """The whole page. ``table_fn`` gives (html, missing note) of Table 1, Table 2 and, where it gives a third, the
    best-explained memories."""
    (t1, t1_missing), (t2, t2_missing), *rest = table_fn()
    tb, tb_missing = rest[0] if rest else (None, None)
    by_section: dict[str, list[Figure]] = {}
    for f in figures:
        by_section.setdefault(f.section, []).append(f)
    t = inp.traits
    banner = ""
    if inp.analysis is None:
        banner = f'<div class="banner missing" data-missing="analysis">{esc(inp.analysis_note)}. Each figure ' \
                 "below says what it needs.</div>"
    else:
        gone = [f"Fig {f.number}" for f in figures if f.missing]
        if gone or t1_missing or t2_missing or tb_missing:
            parts = gone + (["Table 1"] if t1_missing else []) + (["Table 2"] if t2_missing else []) + \
                (["best-explained memories"] if tb_missing else [])
            banner = (f'<div class="banner partial">Partial analysis: {esc(", ".join(parts))} could not be drawn; '
                      "each says why below.</div>")
    toc_items = ['<li><a href="#overview">Overview</a><ul><li><a href="#reproduce">How to reproduce</a></li></ul>'
                 '</li><li><a href="#summary">Does it reproduce?</a></li>']
    body = []
    for sid, stitle in SECTIONS:
        figs = by_section.get(sid, [])
        sub = []
        blocks = []
        for f in figs:
            state = "missing" if f.missing else (f.verdict.status if f.verdict else "na")
            sub.append(f'<li><a href="#{f.id}">Fig {f.number}</a> <span class="dot dot-{state}"></span> '
                       f'<span class="toc-short">{esc(FIGURE_SHORT.get(f.id, ""))}</span></li>')
            blocks.append(figure_html(f))
        extra = best = ""
        if sid == "keys":
            sub.insert(1, '<li><a href="#table1">Table 1</a> <span class="toc-short">example keys</span></li>')
            if tb is not None:
                sub.insert(3 if any(f.id == "explain" for f in figs) else 2,
                           '<li><a href="#best">Best-explained memories</a> <span class="toc-short">held-out scores'
                           "</span></li>")
            extra = table_html("table1", "Table 1 — example keys per depth, with their patterns", t1, t1_missing,
                               "For a few layers spread over depth, of the keys analysis.json lists (with ffkv "
                               "explain: the best-explained of each layer), the one with the most distinct pattern "
                               "kinds (per face), with its one-line explanation, patterns and top trigger examples; "
                               "all listed keys below.")
            best = "" if tb is None else table_html(
                "best", "Best-explained memories", tb, tb_missing,
                "Of the keys analysis.json lists (the best-explained of each layer and face), those whose explanation "
                "best predicts their coefficient on held-out text (simulation correlation), with its kind (which "
                "patterns it has), its one line and its firing F1.")
        if sid == "values":
            sub.append('<li><a href="#table2">Table 2</a> <span class="toc-short">top values</span></li>')
            extra = table_html("table2", "Table 2 — values that predict their keys' next token", t2, t2_missing,
                               "Memories whose value's top token is the next token of the largest share of their "
                               "key's top triggers (precision), with the tokens the value promotes (v·E) and the "
                               "key's top triggers.")
        toc_items.append(f'<li><a href="#{sid}">{esc(stitle)}</a><ul>{"".join(sub)}</ul></li>')
        grid = "".join(blocks)
        if sid == "keys":
            by_id = {f.id: b for f, b in zip(figs, blocks)}
            others = "".join(b for fid, b in by_id.items() if fid not in ("fig2", "explain"))
            content = (f'<div class="grid">{by_id.get("fig2", "")}</div>{extra}<div class="grid">'
                       f'{by_id.get("explain", "")}</div>{best}<div class="grid">{others}</div>')
        else:
            content = f'<div class="grid">{grid}</div>{extra}'
        body.append(f'<section id="{sid}"><h2>{esc(stitle)}</h2>{content}</section>')
    toc_items.append('<li><a href="#definitions">Definitions</a></li><li><a href="#about">About this report</a></li>')
    about = (f'<section id="about"><h2>About this report</h2><p>Written by <code>ffkv report</code> {esc(__version__)}'
             f" from <code>{esc(inp.atlas_path / 'manifest.json')}</code> and <code>analysis.json</code>; the paper's "
             f"numbers come from the copy of its reference data shipped with ffkv ({esc(inp.paper.get('source', ''))})"
             f"; the Neuron-to-Graph reference of Fig E1 is {esc(inp.paper.get('n2g_firing_f1', {}).get('source', ''))}"
             f". Paper curves are placed at relative depth (layer+1)/{PAPER_LAYERS}. The page is self-contained: "
             "plotly.js is embedded once and nothing is fetched from the network.</p></section>")
    title = f"ffkv report — {t['display_name']}"
    return TEMPLATE.format(
        title=esc(title), css=CSS, h1=esc(title),
        subtitle=esc(f"Transformer feed-forward layers are key-value memories (Geva et al., 2021), reproduced on "
                     f"{t['display_name']}: {inp.n_layers} layers × {inp.model.get('d_ff', '?')} memories"),
        banner=banner, toc="".join(toc_items), header=header(inp, atlas_arg), summary=summary_table(figures),
        style_key=style_key(), body="".join(body), definitions=definitions_html(inp), about=about,
        plotly=plotly_js, js=JS, scan_id=esc(inp.scan_id or ""))


CSS = """
:root{--ink:#1d2330;--muted:#5b6472;--line:#e3e6eb;--bg:#f7f8fa;--accent:#2563a8;--paper:#6b7280;
--yes:#1f8a4c;--partly:#b7791f;--no:#c0392b;--na:#7b8494}
*{box-sizing:border-box}
html{scroll-behavior:smooth}
body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.88em}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.layout{display:grid;grid-template-columns:260px minmax(0,1fr);gap:0;max-width:1700px;margin:0 auto}
nav.toc{position:sticky;top:0;align-self:start;height:100vh;overflow:auto;padding:24px 16px 24px 20px;
border-right:1px solid var(--line);background:#fff;font-size:13.5px}
nav.toc h2{font-size:12px;letter-spacing:.08em;text-transform:uppercase;color:var(--muted);margin:0 0 8px}
nav.toc ul{list-style:none;margin:0;padding:0}nav.toc ul ul{padding-left:12px;margin:4px 0 8px}
nav.toc li{margin:3px 0}.toc-short{display:block;color:var(--muted);font-size:12px;line-height:1.3}
main{padding:28px 36px 60px;min-width:0}
header.top h1{font-size:26px;margin:0 0 4px;letter-spacing:-.01em}
header.top p{margin:0;color:var(--muted)}
h2{font-size:21px;margin:36px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:16px;margin:0 0 8px}
.cards{display:grid;grid-template-columns:minmax(0,1.4fr) repeat(3,minmax(0,1fr));gap:14px}
@media (max-width:1300px){.cards{grid-template-columns:repeat(2,minmax(0,1fr))}}
@media (max-width:700px){.cards{grid-template-columns:1fr}}
#reproduce{margin-top:20px}
.card,.figure,.table-block{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 18px}
.card h3{font-size:13px;text-transform:uppercase;letter-spacing:.06em;color:var(--muted)}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:3px 12px;margin:0;font-size:14px}
dt{color:var(--muted)}dd{margin:0;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
dl.defs{grid-template-columns:minmax(120px,max-content) 1fr;gap:8px 18px;background:#fff;padding:16px 18px;
border:1px solid var(--line);border-radius:10px}dl.defs dt{font-weight:600;color:var(--ink)}
pre.cmd{background:#0f172a;color:#e2e8f0;padding:12px 14px;border-radius:8px;overflow:auto;line-height:1.6}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,480px),1fr));gap:16px;margin:12px 0}
.figure.wide{grid-column:1/-1}
.plot{width:100%;min-height:380px}
.caption{color:var(--muted);font-size:13.5px;margin:6px 0 0}
.verdict{margin:8px 0 0;font-size:14px;padding:8px 10px;border-radius:6px;background:#f4f6f9;
border-left:4px solid var(--na)}
.verdict-yes{border-color:var(--yes)}.verdict-partly{border-color:var(--partly)}.verdict-no{border-color:var(--no)}
.badge{display:inline-block;font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.05em;
padding:1px 7px;border-radius:10px;color:#fff;background:var(--na);vertical-align:1px}
.badge-yes{background:var(--yes)}.badge-partly{background:var(--partly)}.badge-no{background:var(--no)}
.dot{display:inline-block;width:8px;height:8px;border-radius:50%;background:var(--na)}
.dot-yes{background:var(--yes)}.dot-partly{background:var(--partly)}.dot-no{background:var(--no)}
.dot-missing{background:#fff;border:1.5px solid var(--no)}
.fignum{color:var(--accent);margin-right:4px}
.notes{margin:6px 0 0;padding-left:18px;font-size:12.5px;color:var(--muted)}
.missing{border:1px dashed #d99;background:#fff6f5;color:#8a2d22;border-radius:8px;padding:12px 14px;margin:8px 0;
font-size:14px}
.banner{margin:16px 0 0;padding:10px 14px;border-radius:8px;font-size:14px}
.banner.partial{background:#fff8e6;border:1px solid #f0d38a;color:#7a5200}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{text-align:left;vertical-align:top;padding:7px 9px;border-bottom:1px solid var(--line)}
th{font-size:12px;color:var(--muted);font-weight:600;background:#fafbfc;position:sticky;top:0}
td.num{white-space:nowrap;font-variant-numeric:tabular-nums}
td.small{font-size:13px}
.depth{display:block;color:var(--muted);font-size:11.5px}
.face{display:inline-block;margin-left:5px;font-size:11px;padding:0 5px;border-radius:4px;background:#e8f0fb;
color:#1d4f8a}.face-neg{background:#fbe9e9;color:#8a1d1d}
ol.triggers,ol.patterns{margin:0;padding-left:18px}ol.triggers li{margin:2px 0;line-height:1.4}
.ctx{color:#3d4452}
mark.trig{background:#ffe58a;color:#1d2330;padding:0 2px;border-radius:3px;font-weight:600;white-space:pre-wrap}
.next{color:var(--muted);margin-left:6px;font-size:12.5px;white-space:pre}
.pnum{display:inline-block;min-width:16px;text-align:center;font-size:10.5px;margin-left:4px;border-radius:8px;
background:#eef1f5;color:#44506a}
ol.patterns .pnum{margin:0 6px 0 0}
ol.patterns{list-style:none;padding-left:0}
.kind{font-size:11px;font-weight:600;padding:0 6px;border-radius:4px;margin-right:4px}
.kind-shallow{background:#fcefd6;color:#7a5000}.kind-semantic{background:#dde9f7;color:#1d4f8a}
.kind-both{background:#e6f0d8;color:#3d5a1a}.kind-none,.kind-other{background:#eee;color:#444}
td.desc{min-width:220px}td.desc .kind{margin-right:6px}
.scores{display:block;color:var(--muted);font-size:12px;font-variant-numeric:tabular-nums}
.pv{color:var(--muted);font-size:12px;margin-left:4px}
code.tok{display:inline-block;background:#f1f3f6;border:1px solid var(--line);border-radius:4px;padding:0 4px;
margin:1px 3px 1px 0;white-space:pre}
.bar{display:inline-block;width:70px;height:8px;background:#eef1f5;border-radius:4px;margin-right:6px;
vertical-align:1px;overflow:hidden}.bar span{display:block;height:100%;background:var(--accent)}
td.prec{white-space:nowrap}
table.values td:last-child{min-width:320px}
details{margin:10px 0}summary{cursor:pointer;color:var(--accent);font-size:14px}
table.compact{width:auto}
.table-block{margin:16px 0}
.style-key{list-style:none;display:flex;flex-wrap:wrap;gap:6px 22px;padding:10px 14px;margin:14px 0 0;
background:#fff;border:1px solid var(--line);border-radius:8px;font-size:13px;color:var(--muted)}
.style-key svg{vertical-align:middle}
.muted{color:var(--muted)}
@media (max-width:900px){.layout{grid-template-columns:1fr}nav.toc{position:static;height:auto;
border-right:0;border-bottom:1px solid var(--line)}main{padding:18px}}
@media print{nav.toc{display:none}.layout{display:block}.figure{break-inside:avoid}}
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="ffkv-scan-id" content="{scan_id}">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; \
style-src 'unsafe-inline'; img-src data: blob:; font-src data:">
<title>{title}</title>
<style>{css}</style>
</head><body>
<div class="layout">
<nav class="toc" aria-label="Contents"><h2>Contents</h2><ul>{toc}</ul></nav>
<main>
<header class="top"><h1>{h1}</h1><p>{subtitle}</p>{banner}</header>
{header}
{summary}
{style_key}
{body}
{definitions}
{about}
<noscript><p class="missing">The figures need JavaScript (plotly.js is embedded in this file).</p></noscript>
</main></div>
<script>{plotly}</script>
<script>{js}</script>
</body></html>
"""

JS = """
(function () {
  var config = {displaylogo: false, responsive: true,
    toImageButtonOptions: {format: 'png', scale: 2}};
  var jobs = [];
  document.querySelectorAll('script.figure-spec').forEach(function (node) {
    var id = node.getAttribute('data-figure');
    var el = document.getElementById('plot-' + id);
    try {
      var spec = JSON.parse(node.textContent);
      var cfg = Object.assign({}, config, {toImageButtonOptions: {format: 'png', scale: 2, filename: id}});
      jobs.push(Plotly.newPlot(el, spec.data, spec.layout, cfg).then(function () {
        el.setAttribute('data-rendered', String(spec.data.length));
      }));
    } catch (e) {
      el.textContent = 'This figure could not be drawn: ' + e;
      console.error('ffkv report: figure ' + id + ': ' + e);
    }
  });
  Promise.all(jobs).then(function () {
    window.ffkvReady = true;
    document.body.setAttribute('data-ready', '1');
  }, function (e) { console.error('ffkv report: ' + e); });
})();
"""
