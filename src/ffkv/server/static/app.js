// ffkv serve: the front end. Plain JavaScript, no dependencies; every request goes to this server's /api.
// All text from the atlas or the model is inserted with textContent (never as HTML).
"use strict";

(function () {
  const main = document.getElementById("main");

  // ---------------------------------------------------------------------------------------------------------
  // helpers
  // ---------------------------------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    };
    const res = await fetch(path, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
    return data;
  }

  function errorBox(err) {
    return el("p", {class: "error", role: "alert"}, String(err && err.message ? err.message : err));
  }

  function fmt(x, digits = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const a = Math.abs(x);
    if (a !== 0 && (a >= 1e4 || a < 1e-3)) return x.toExponential(2);
    return x.toFixed(digits);
  }
  const signed = (x, d = 3) => (x > 0 ? "+" : "") + fmt(x, d);
  const pct = (x, d = 1) => (x === null || x === undefined ? "–" : (100 * x).toFixed(d) + "%");

  const WS = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"};
  function tok(text, cls) {
    const span = el("span", {class: "tok" + (cls ? " " + cls : ""), title: JSON.stringify(text)});
    if (text === "") span.append(el("span", {class: "ws"}, "∅"));
    for (const part of text.split(/(\s+)/)) {
      if (!part) continue;
      if (/^\s+$/.test(part)) span.append(el("span", {class: "ws"}, part.replace(/[ \n\t\r]/g, (c) => WS[c])));
      else span.append(part);
    }
    return span;
  }
  const toks = (list, cls) => el("span", {class: "toks"}, (list || []).map((t) => tok(t, cls)));

  function faceBadge(face) {
    return el("span", {class: "badge " + face, title: face === "pos" ? "positive face: adds +v" : "negative face: adds −v"},
      face === "pos" ? "+v" : "−v");
  }
  function memLink(layer, key, face) {
    return el("span", {class: "row", style: null},
      el("a", {href: `/memory/${layer}/${key}`, class: "mono"}, `L${layer}:${key}`), face ? faceBadge(face) : null);
  }
  function bar(fraction, cls) {
    const inner = el("span");
    inner.style.width = Math.max(0, Math.min(1, fraction || 0)) * 100 + "%";
    return el("div", {class: "bar" + (cls ? " " + cls : "")}, inner);
  }
  function kv(pairs) {
    return el("dl", {class: "kv"}, pairs.filter((p) => p[1] !== undefined && p[1] !== null)
      .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }
  function panel(title, ...content) {
    return el("section", {class: "panel"}, title ? el("h3", {}, title) : null, ...content);
  }
  function table(headers, rows, attrs) {
    return el("table", attrs || {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", typeof h === "string" ? {} : h[1], typeof h === "string" ? h : h[0])))),
      el("tbody", {}, rows));
  }

  function phraseRegex(phrase) {
    const words = (phrase || "").match(/[\p{L}\p{N}]+/gu);
    if (!words) return null;
    const esc = words.map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
    return new RegExp(esc.join("[^\\p{L}\\p{N}]+"), "giu");
  }
  function marked(text, regex) {
    if (!regex) return [text];
    const out = [];
    let last = 0;
    regex.lastIndex = 0;
    for (const m of text.matchAll(regex)) {
      out.push(text.slice(last, m.index), el("mark", {class: "phrase"}, m[0]));
      last = m.index + m[0].length;
    }
    out.push(text.slice(last));
    return out;
  }
  function trigger(t, phrase, maxContext = 200) {
    const ctx = t.context.length > maxContext ? "…" + t.context.slice(-maxContext) : t.context;
    return el("div", {class: "trigger"},
      el("span", {class: "ctx"}, marked(ctx, phraseRegex(phrase))),
      el("mark", {class: "trig", title: "trigger token (the last token of the prefix)"}, t.trigger_token),
      el("span", {class: "next", title: "the token that follows in the corpus"}, "→ ",
        t.next_token === null || t.next_token === undefined ? el("i", {}, "end") : el("b", {}, t.next_token)));
  }

  function parseMemory(text) {
    const m = /^\s*(\d+)\s*[:/ ,.]\s*(\d+)\s*$/.exec(text || "");
    return m ? [Number(m[1]), Number(m[2])] : null;
  }

  function jumpBox(form) {
    const input = form.querySelector("input");
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const lk = parseMemory(input.value);
      if (!lk) {
        input.setCustomValidity("type layer:key, e.g. 12:345");
        input.reportValidity();
        return;
      }
      location.href = `/memory/${lk[0]}/${lk[1]}`;
    });
    input.addEventListener("input", () => input.setCustomValidity(""));
  }

  function searchForms(values) {
    values = values || {};
    const text = el("form", {class: "search", action: "/search", method: "get", id: "text-form"},
      el("label", {for: "text-q", title: "memories whose top trigger prefixes (or whose explanations) contain a word or phrase"}, "Triggers or explanations contain"),
      el("input", {type: "text", name: "text", id: "text-q", placeholder: "a word or phrase, e.g. river",
        value: values.text || "", required: true, maxlength: 200}),
      el("button", {type: "submit"}, "Search"));
    const proj = el("select", {name: "projection", id: "projection", title: "vocabulary projection of the value"},
      el("option", {value: "raw"}, "v·E (raw)"), el("option", {value: "normed"}, "through final norm"));
    proj.value = values.projection || "raw";
    const promotes = el("form", {class: "search", action: "/search", method: "get", id: "promotes-form"},
      el("label", {for: "promotes-q"}, "Value promotes token"),
      el("input", {type: "text", name: "promotes", id: "promotes-q", placeholder: "a token, e.g. Paris",
        value: values.promotes || "", required: true, maxlength: 200}),
      proj, el("button", {type: "submit"}, "Search"));
    const kind = el("select", {name: "kind", id: "concept-kind", title: "kind of the explanation"},
      el("option", {value: ""}, "any kind"), ["shallow", "semantic", "both", "none"].map((k) => el("option", {value: k}, k)));
    kind.value = values.kind || "";
    const concept = el("form", {class: "search", action: "/search", method: "get", id: "concept-form"},
      el("label", {for: "concept-q", title: "memories whose explanation is about this, by meaning (sentence embedder)"},
        "Explanation is about"),
      el("input", {type: "text", name: "concept", id: "concept-q", placeholder: "a concept, e.g. rivers and water",
        value: values.concept || "", required: true, maxlength: 200}),
      el("label", {for: "min-sim-corr", class: "muted small", title: "held-out correlation of the explanation's " +
        "simulated activation with the real one; faces below it are left out"}, "min. sim. corr."),
      el("input", {type: "number", name: "min_sim_corr", id: "min-sim-corr", min: -1, max: 1, step: "any",
        placeholder: "any", value: values.min_sim_corr || "", class: "score-filter"}),
      kind, el("button", {type: "submit"}, "Search"));
    return el("div", {},
      el("div", {class: "grid"}, panel(null, promotes), panel(null, text)),
      el("div", {class: "concept-row"}, panel(null, concept)));
  }

  // explanations (`ffkv explain`): a kind badge, scores beside their baselines
  function kindBadge(kind) {
    const titles = {shallow: "its triggers share surface patterns (tokens, classes)",
      semantic: "its triggers share meaning (topic, category of words, subjects)",
      both: "shallow and semantic patterns", none: "no significant pattern among its triggers"};
    return el("span", {class: "badge kind kind-" + kind, title: titles[kind] || ""}, kind);
  }
  function scoreCell(x, base) {
    const better = x !== null && x !== undefined && base.every((b) => b === null || b === undefined || x > b);
    return el("td", {class: "num" + (better ? " better" : ""), title: better ? "above both baselines" : null}, fmt(x));
  }

  // ---------------------------------------------------------------------------------------------------------
  // overview
  // ---------------------------------------------------------------------------------------------------------
  async function overview() {
    const d = await api("/api/overview");
    const m = d.model, c = d.corpus, s = d.scan, r = d.result || {};
    document.title = `${d.atlas} · ffkv`;
    const maxFrac = Math.max(...d.layer_summary.map((x) => x.frac_positive || 0), 1e-9);
    const maxRms = Math.max(...d.layer_summary.map((x) => x.mean_rms || 0), 1e-9);
    const rows = d.layer_summary.map((x) => el("tr", {},
      el("td", {class: "num"}, String(x.layer)),
      el("td", {}, el("div", {class: "row"}, bar(x.frac_positive / maxFrac), el("span", {class: "num small"}, pct(x.frac_positive)))),
      el("td", {}, el("div", {class: "row"}, bar(x.mean_rms / maxRms, "pos"), el("span", {class: "num small"}, fmt(x.mean_rms)))),
      el("td", {}, el("div", {class: "row"}, memLink(x.layer, x.max_key, "pos"), el("span", {class: "num small"}, signed(x.max, 2)))),
      el("td", {}, el("div", {class: "row"}, memLink(x.layer, x.min_key, "neg"), el("span", {class: "num small"}, signed(x.min, 2)))),
      el("td", {class: "num"}, fmt(x.value_norm))));

    const analysis = [];
    const an = d.analysis || {};
    if (an.present) {
      analysis.push(el("h2", {}, "Analyses"), el("p", {class: "muted small"}, "Per-layer results of ",
        el("code", {}, "ffkv analyze"), " (analysis.json); fractions in [0, 1], token removal as a relative change."));
      for (const t of an.tables) {
        const cell = (v) => el("td", {class: typeof v === "number" ? "num" : ""},
          v === null || v === undefined ? "–" : typeof v === "number" ? fmt(v) : Array.isArray(v) ? v.join(", ") : String(v));
        analysis.push(el("h3", {class: "mono"}, t.name,
          Object.keys(t.scalars).length ? el("span", {class: "muted small"}, "  " +
            Object.entries(t.scalars).map(([k, v]) => `${k}: ${typeof v === "number" ? fmt(v) : v}`).join(" · ")) : null),
          el("div", {class: "panel scroll"}, table(["layer", ...t.columns.map((c) => [c, {class: "num"}])],
            t.rows.map((row) => el("tr", {}, el("td", {class: "num"}, String(row.layer)), t.columns.map((c) => cell(row[c])))),
            {class: "analysis", "data-block": t.name})));
      }
      const missing = Object.entries(an.missing || {});
      if (missing.length) analysis.push(el("p", {class: "muted small"}, "Not in analysis.json: ",
        missing.map(([k, v]) => `${k} (${v})`).join("; ")));
      const defs = Object.entries(an.definitions || {});
      if (defs.length) analysis.push(el("details", {class: "panel"}, el("summary", {}, "Definitions"), kv(defs)));
    } else if (an.stale) {
      analysis.push(el("p", {class: "notice"}, an.stale));
    } else {
      analysis.push(el("p", {class: "muted small"}, "No analysis.json in this atlas: run ",
        el("code", {}, "ffkv analyze"), " to add the per-layer results of the paper's experiments here."));
    }

    main.replaceChildren(
      el("h1", {}, m.name === "default" ? "SmolLM2-135M-Instruct (default)" : m.name),
      el("p", {class: "muted"}, `Atlas ${d.atlas} · made ${d.created || "?"} with ffkv ${d.ffkv_version || "?"}`),
      el("div", {class: "grid"},
        panel("Model", kv([["architecture", `${m.architecture} (${m.class || ""})`],
          ["memories", `${m.n_layers} layers × ${m.d_ff} = ${(m.n_layers * m.d_ff).toLocaleString()}`],
          ["d_model", m.d_model], ["vocabulary", (m.vocab_size || 0).toLocaleString()],
          ["activation", `${m.activation}${m.gated ? ", gated (signed coefficients)" : ""}`],
          ["weights", el("span", {class: "mono small"}, m.weights_fingerprint)]])),
        panel("Corpus", kv([["name", c.corpus], ["units", `${(c.n_units || 0).toLocaleString()} ${c.unit}s`],
          ["documents", (c.n_documents || 0).toLocaleString()], ["tokens", (c.n_tokens || 0).toLocaleString()],
          ["max length", c.max_length]])),
        panel("Scan", kv([["scanned", `${(r.units_scanned || 0).toLocaleString()} units, ${(r.tokens_scanned || 0).toLocaleString()} prefixes`],
          ["layers", d.layers.length === d.n_layers ? `all ${d.n_layers}` : d.layers.join(", ")],
          ["faces", d.faces.join(", ")], ["top-k", s.top_k],
          ["explanations", d.explanations && d.explanations.present ?
            `${d.explanations.faces.toLocaleString()} faces (ffkv explain)${d.explanations.concept_search ? "" : "; no concept search"}` :
            el("span", {class: "muted small", id: "explanations-status"}, d.explanations ? d.explanations.message : "–")],
          ["time", r.seconds !== undefined ? `${Math.round(r.seconds)} s (${Math.round(r.tokens_per_second || 0)} tok/s)` : null]]))),
      el("h2", {}, "Find memories"),
      searchForms(),
      el("h2", {}, "Layers"),
      el("p", {class: "muted small"}, "Fires: mean over the layer's memories of the fraction of scanned prefixes with a " +
        "positive coefficient. RMS: mean root-mean-square coefficient. Strongest: the memory with the largest (most " +
        "negative) coefficient seen. ‖v‖: mean value norm."),
      el("div", {class: "panel"}, table(["layer", "fires > 0", "RMS coefficient", "strongest +", "strongest −", ["‖v‖", {class: "num"}]],
        rows, {id: "layers-table"})),
      ...analysis);
  }

  // ---------------------------------------------------------------------------------------------------------
  // memory page
  // ---------------------------------------------------------------------------------------------------------
  async function memory() {
    const [, , layer, key] = location.pathname.split("/");
    const params = new URLSearchParams(location.search);
    const n = Math.max(1, Math.min(1000, Number(params.get("n")) || 10));
    const d = await api(`/api/memory/${layer}/${key}?n=${n}`);
    document.title = `L${d.layer}:${d.key} · ffkv`;
    const st = d.stats;
    const pager = el("div", {class: "pager"},
      d.prev ? el("a", {href: `/memory/${d.prev.layer}/${d.prev.key}`, id: "prev", title: "previous key"}, `← L${d.prev.layer}:${d.prev.key}`) : null,
      d.next ? el("a", {href: `/memory/${d.next.layer}/${d.next.key}`, id: "next", title: "next key"}, `L${d.next.layer}:${d.next.key} →`) : null,
      el("a", {href: `/debug#iv=${d.layer}:${d.key}:off`, title: "open the prompt debugger with this memory switched off"}, "debug ↗"));
    const stat = (label, value) => el("div", {}, el("b", {}, value), el("span", {}, label));
    const ex = d.explanations || {present: false, faces: {}};
    const faces = Object.entries(d.faces).map(([face, f]) => {
      const e = ex.present ? ex.faces[face] : null;
      const cover = new Map(e ? e.triggers.map((t) => [t.rank, t]) : []);
      const maxAbs = Math.max(...f.triggers.map((t) => Math.abs(t.score || 0)), 1e-9);
      const rows = f.triggers.map((t) => {
        const c = cover.get(t.rank);
        const marks = c ? [c.shallow ? el("span", {class: "badge kind kind-shallow", title: "covered by a shallow pattern"}, "shallow") : null,
          c.semantic ? el("span", {class: "badge kind kind-semantic", title: "covered by a semantic pattern"}, "semantic") : null] : [];
        return el("tr", {},
          el("td", {class: "num"}, String(t.rank + 1)),
          el("td", {class: "num"}, el("div", {}, signed(t.score, 2)), bar(Math.abs(t.score) / maxAbs, face)),
          el("td", {}, trigger(t), el("div", {class: "src"}, marks, [t.title, t.topic].filter(Boolean).join(" · "))));
      });
      const more = n < d.top_k ? el("a", {href: `?n=${d.top_k}`}, `show all ${d.top_k} triggers`) :
        (n > 10 ? el("a", {href: "?"}, "show the top 10") : null);
      return el("section", {class: "face", id: `face-${face}`},
        el("h2", {}, faceBadge(face), face === "pos" ? "Positive face" : "Negative face",
          el("span", {class: "muted small"}, face === "pos" ? "largest coefficients; adds +v" : "most negative coefficients; adds −v")),
        ex.present ? explanationPanel(face, e) : null,
        el("div", {class: "cols"},
          el("div", {class: "panel"}, el("h3", {}, "Top triggers"),
            f.triggers.length ? table(["#", "coef.", "prefix → next token"], rows, {class: "triggers"}) :
              el("p", {class: "muted"}, "No triggers stored."), more),
          el("div", {class: "panel"}, el("h3", {}, "Value promotes"),
            el("p", {class: "muted small"}, face === "pos" ? "top of v·E" : "top of −v·E", " (raw)"),
            toks(f.value.top_tokens, face),
            el("p", {class: "muted small"}, "through the final norm"),
            toks(f.value_normed.top_tokens, face))));
    });
    function explanationPanel(face, e) {
      if (!e) return el("div", {class: "panel explanation", "data-face": face},
        el("p", {class: "muted"}, "This face is not in the atlas's explanations (ffkv explain ran on other keys)."));
      const patterns = e.patterns.length ? el("ul", {class: "patterns"}, e.patterns.map((p) => el("li", {},
        el("span", {class: "badge kind kind-" + p.class}, p.class), " ", el("b", {}, p.text),
        el("span", {class: "muted small"}, ` · ${p.support} unit(s) · p = ${p.p_value === null ? "–" : p.p_value.toPrecision(2)}` +
          ` · ${p.class} patterns cover trigger${p.triggers.length === 1 ? "" : "s"} ` +
          (p.triggers.length ? p.triggers.map((r) => r + 1).join(", ") : "none"))))) :
        el("p", {class: "muted small"}, `No significant pattern among its top ${e.triggers_read} triggers.`);
      const concept = (coherent, coherence) => coherent ? el("span", {class: "badge concept",
        title: `mean pairwise cosine ${fmt(coherence)}: more alike than random words (p < 0.05)`}, "one concept") :
        el("span", {class: "muted small", title: "mean pairwise cosine of the words"}, `coherence ${fmt(coherence)}`);
      const side = (title, list, coherent, coherence) => el("div", {class: "row"}, el("span", {class: "muted small side"}, title),
        toks(list.slice(0, 10), title === "promotes" ? face : (face === "pos" ? "neg" : "pos")), concept(coherent, coherence));
      let scores = el("p", {class: "muted small"}, "Not scored on held-out text.");
      if (e.scores) {
        const names = {sim_corr: "sim. corr.", f1: "F1", precision: "precision", recall: "recall"};
        scores = el("div", {}, table(["score", ["explanation", {class: "num"}], ["shuffled", {class: "num", title: "another key's explanation"}],
          ["last-token lookup", {class: "num", title: "a lookup table of the triggers' last tokens"}]],
        Object.entries(names).map(([k, label]) => {
          const s = e.scores[k];
          return el("tr", {}, el("td", {}, label), scoreCell(s.explanation, [s.shuffled, s.lookup]),
            el("td", {class: "num"}, fmt(s.shuffled)), el("td", {class: "num"}, fmt(s.lookup)));
        }), {class: "scores"}),
        el("p", {class: "muted small"}, `Held out: the face fires on ${e.heldout_fires === null ? "–" : e.heldout_fires} unseen prefix(es). ` +
          "Sim. corr.: correlation of the activation simulated from the explanation with the real one; F1 of its " +
          "“fires” (≥ half the top coefficient). Baselines: another key's explanation, and a last-token lookup."));
      }
      return el("div", {class: "panel explanation", "data-face": face},
        el("p", {class: "description"}, kindBadge(e.kind), " ", el("span", {class: "text"}, e.description)),
        el("div", {class: "cols"},
          el("div", {}, el("h3", {}, "Patterns of the top triggers"), patterns,
            el("h3", {}, "When it fires (through the final norm)"),
            side("promotes", e.promotes, e.promote_coherent, e.promote_coherence),
            side("suppresses", e.suppresses, e.suppress_coherent, e.suppress_coherence)),
          el("div", {}, el("h3", {}, "Held-out scores"), scores)));
    }
    const similar = d.similar.map((s) => el("tr", {},
      el("td", {}, memLink(s.layer, s.key)), el("td", {class: "num"}, fmt(s.cosine)), el("td", {}, toks(s.top_tokens, "pos"))));
    const shown = (k, v) => k === "patterns" ? el("ul", {class: "patterns"}, v.map((p) => el("li", {}, p))) :
      k === "top_tokens" ? toks(v) : Array.isArray(v) ? v.join(", ") : typeof v === "number" ? fmt(v) : String(v);
    const analysis = d.analysis.length ? [el("h2", {}, "From the analyses"), el("div", {class: "panel", id: "analysis"},
      d.analysis.map((rec) => el("div", {}, el("h3", {class: "mono small"}, rec.source, rec.face ? " " : null,
        rec.face ? faceBadge(rec.face) : null),
        kv(Object.entries(rec).filter(([k]) => !["source", "layer", "key", "face"].includes(k))
          .map(([k, v]) => [k, shown(k, v)])))))] : [];

    main.replaceChildren(
      el("div", {class: "row"}, el("h1", {}, `Layer ${d.layer} · memory ${d.key}`), el("span", {class: "spacer"}), pager),
      el("div", {class: "panel stats", id: "stats"},
        stat("fires > 0 on", pct(st.frac_positive)), stat("mean coef.", signed(st.mean)), stat("RMS", fmt(st.rms)),
        stat("min", signed(st.min, 2)), stat("max", signed(st.max, 2)), stat("‖v‖", fmt(st.value_norm)),
        stat("layer range", `${signed(st.layer_min, 1)} … ${signed(st.layer_max, 1)}`),
        stat("prefixes scanned", (st.count || 0).toLocaleString())),
      ...(ex.present ? [] : [el("p", {class: "notice", id: "explanations-missing"}, "Explanations are missing: " + ex.message)]),
      ...faces,
      el("h2", {}, "Similar values"),
      el("p", {class: "muted small"}, `Memories of layer ${d.layer} whose value vectors have the largest cosine with this one.`),
      el("div", {class: "panel"}, table(["memory", ["cosine", {class: "num"}], "value promotes (+v)"], similar, {id: "similar"})),
      ...analysis);
  }

  // ---------------------------------------------------------------------------------------------------------
  // search
  // ---------------------------------------------------------------------------------------------------------
  async function search() {
    const params = new URLSearchParams(location.search);
    const values = {text: params.get("text") || "", promotes: params.get("promotes") || "",
      projection: params.get("projection") || "raw", concept: params.get("concept") || "",
      min_sim_corr: params.get("min_sim_corr") || "", kind: params.get("kind") || ""};
    const results = el("div", {id: "search-results"});
    main.replaceChildren(el("h1", {}, "Search memories"), searchForms(values), results);
    if (!values.text && !values.promotes && !values.concept) {
      results.append(el("p", {class: "muted"}, "Find memories whose value promotes a token (its exact rank in the " +
        "value's vocabulary projection), whose top trigger prefixes (or explanations) contain a word or phrase, or " +
        "whose explanation is about a concept (by meaning, from ffkv explain)."));
      return;
    }
    results.append(el("p", {class: "muted"}, "Searching…"));
    let q;
    if (values.promotes) q = `promotes=${encodeURIComponent(values.promotes)}&projection=${values.projection}`;
    else if (values.text) q = `text=${encodeURIComponent(values.text)}`;
    else {
      q = `concept=${encodeURIComponent(values.concept)}`;
      if (values.min_sim_corr.trim()) q += `&min_sim_corr=${encodeURIComponent(values.min_sim_corr.trim())}`;
      if (values.kind) q += `&kind=${encodeURIComponent(values.kind)}`;
    }
    let d;
    try {
      d = await api(`/api/search?${q}&limit=50`);
    } catch (err) {
      results.replaceChildren(errorBox(err));
      return;
    }
    if (d.kind === "promotes") {
      const head = d.tokens.length ? el("p", {class: "muted"}, `Tokens matching ${JSON.stringify(d.query)}: `,
        toks(d.tokens.map((t) => t.token)), ` · ranks 0–${d.depth - 1} are indexed.`) : null;
      const rows = d.results.map((r, i) => el("tr", {},
        el("td", {class: "num"}, String(i + 1)), el("td", {}, memLink(r.layer, r.key, r.face)),
        el("td", {}, tok(r.token, r.face)), el("td", {class: "num"}, String(r.rank)), el("td", {class: "num"}, fmt(r.logit)),
        el("td", {}, toks(r.top_tokens, r.face))));
      results.replaceChildren(...[head, d.note ? el("p", {class: "notice"}, d.note) : null,
        d.results.length ? el("div", {class: "panel"}, table(["#", "memory", "token", ["rank", {class: "num"}],
          ["logit", {class: "num"}], "value promotes"], rows, {class: "results"})) :
          (d.note ? null : el("p", {class: "muted"}, "No memory ranks this token among its value's top tokens."))]
        .filter(Boolean));
    } else if (d.kind === "concept") {
      const rows = d.results.map((r, i) => el("tr", {},
        el("td", {class: "num"}, String(i + 1)), el("td", {}, memLink(r.layer, r.key, r.face)),
        el("td", {class: "num"}, fmt(r.cosine)), el("td", {}, kindBadge(r.kind)),
        el("td", {class: "description"}, r.description),
        scoreCell(r.sim_corr, [r.shuffled_sim_corr, r.lookup_sim_corr]),
        el("td", {class: "num muted small"}, `${fmt(r.shuffled_sim_corr, 2)} / ${fmt(r.lookup_sim_corr, 2)}`),
        scoreCell(r.f1, [r.shuffled_f1, r.lookup_f1])));
      const f = d.filters;
      const filters = [f.min_sim_corr !== null ? `sim. corr. ≥ ${f.min_sim_corr}` : null, f.min_f1 !== null ? `F1 ≥ ${f.min_f1}` : null,
        f.kind ? `kind ${f.kind}` : null].filter(Boolean);
      results.replaceChildren(
        el("p", {class: "muted"}, `Memory faces whose explanation is closest in meaning to ${JSON.stringify(d.query)}: the ` +
          "cosine of the query's sentence vector with each face's concept vector (its trigger words and the words it promotes). " +
          (filters.length ? `${d.faces_passing} of ${d.faces} explained faces pass ${filters.join(", ")}.` : `${d.faces} explained faces.`)),
        d.results.length ? el("div", {class: "panel scroll"}, table(["#", "memory", ["cosine", {class: "num"}], "kind", "description",
          ["sim. corr.", {class: "num"}], ["baselines", {class: "num", title: "shuffled / last-token lookup"}], ["F1", {class: "num"}]],
        rows, {class: "results", id: "concept-results"})) :
          el("p", {class: "muted"}, "No explained face passes these filters."));
    } else {
      const rows = d.results.map((r, i) => el("tr", {},
        el("td", {class: "num"}, String(i + 1)), el("td", {}, memLink(r.layer, r.key, r.face)),
        el("td", {class: "num"}, `${r.matches}/${r.triggers}`, bar(r.matches / Math.max(r.triggers, 1), r.face)),
        el("td", {}, trigger(r.example, d.query, 140), el("div", {class: "src"}, `trigger #${r.example.rank + 1} · ${signed(r.example.score, 2)}`)),
        el("td", {}, toks(r.top_tokens.slice(0, 4), r.face))));
      results.replaceChildren(
        el("p", {class: "muted"}, `${d.units_matched} corpus unit(s) with triggers contain ${JSON.stringify(d.query)}. ` +
          "Memories ranked by how many of their top triggers contain it."),
        d.note ? el("p", {class: "notice"}, d.note) : "",
        d.results.length ? el("div", {class: "panel"}, table(["#", "memory", ["triggers", {class: "num"}],
          "best trigger containing it", "value promotes"], rows, {class: "results"})) :
          el("p", {class: "muted"}, "No memory has a trigger containing this."));
      const ex = d.explanations || {};
      if (ex.present) {
        const drows = d.descriptions.map((r, i) => el("tr", {},
          el("td", {class: "num"}, String(i + 1)), el("td", {}, memLink(r.layer, r.key, r.face)), el("td", {}, kindBadge(r.kind)),
          el("td", {class: "description"}, marked(r.description, phraseRegex(d.query))),
          scoreCell(r.sim_corr, [r.shuffled_sim_corr, r.lookup_sim_corr]), scoreCell(r.f1, [r.shuffled_f1, r.lookup_f1])));
        results.append(el("h2", {}, "Explanations that mention it"),
          d.descriptions.length ? el("div", {class: "panel scroll"}, table(["#", "memory", "kind", "description",
            ["sim. corr.", {class: "num"}], ["F1", {class: "num"}]], drows, {class: "results", id: "description-results"})) :
            el("p", {class: "muted"}, "No explanation's description contains this."));
      } else {
        results.append(el("p", {class: "muted small"}, "Descriptions not searched: " + ex.message));
      }
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // prompt debugger
  // ---------------------------------------------------------------------------------------------------------
  function debug() {
    const state = {interventions: [], baseline: null, baselineKey: "", last: null, open: new Set(), seq: 0};
    const hash = new URLSearchParams(location.hash.slice(1));
    const prompt = el("textarea", {id: "prompt", maxlength: 2000, spellcheck: "false", "aria-label": "prompt"});
    prompt.value = hash.get("p") || "The capital of France is";
    for (const part of (hash.get("iv") || "").split(",").filter(Boolean)) {
      const [l, k, mode, v] = part.split(":");
      if (mode === "off" || (mode === "set" && v !== undefined && Number.isFinite(Number(v))))
        state.interventions.push({layer: Number(l), key: Number(k), mode, ...(mode === "set" ? {value: Number(v)} : {})});
    }
    const top = el("select", {id: "top", "aria-label": "rows per table"}, [5, 10, 20].map((x) => el("option", {value: x}, `top ${x}`)));
    top.value = "10";
    const maxNew = el("input", {type: "number", id: "max-new", min: 1, max: 64, value: 20, "aria-label": "tokens to generate"});
    const runBtn = el("button", {id: "run", type: "submit"}, "Run");
    const genBtn = el("button", {id: "generate", type: "button", class: "secondary"}, "Generate");
    const ivbar = el("div", {class: "ivbar", id: "interventions"});
    const status = el("div", {id: "status", role: "status", class: "muted small"});
    const prediction = el("div", {id: "prediction"}, el("p", {class: "muted"}, "Run a prompt to see the prediction."));
    const continuation = el("div", {id: "continuation", class: "continuation muted"}, "Generate a greedy continuation " +
      "under the current interventions.");
    const layersBox = el("div", {id: "layers"});
    const form = el("form", {id: "prompt-form"}, prompt,
      el("div", {class: "row"}, runBtn, genBtn, el("label", {for: "max-new", class: "muted small"}, "new tokens"), maxNew,
        top, el("span", {class: "spacer"}), status));
    main.replaceChildren(
      el("h1", {}, "Prompt debugger"),
      el("p", {class: "muted small"}, "For each layer: the memories contributing most at the last position " +
        "(|m|·‖v‖), and the logit lens (final norm, then unembedding) of the residual stream before the FFN, of the " +
        "FFN output and of their sum. Switch memories off or set their coefficient; the change applies at every position."),
      el("div", {class: "panel"}, form, el("div", {class: "row"}, el("b", {}, "Interventions:"), ivbar)),
      el("div", {class: "cols"},
        el("section", {}, el("h2", {}, "Next token"), el("div", {class: "panel"}, prediction)),
        el("section", {}, el("h2", {}, "Continuation"), el("div", {class: "panel"}, continuation))),
      el("h2", {}, "Layers"),
      el("div", {class: "lenshead"}, el("span", {}, ""), el("span", {}, "residual before FFN"), el("span", {}, "FFN output"),
        el("span", {}, "residual + FFN")),
      layersBox);

    function saveHash() {
      const p = new URLSearchParams();
      p.set("p", prompt.value);
      if (state.interventions.length)
        p.set("iv", state.interventions.map((iv) => [iv.layer, iv.key, iv.mode].concat(iv.mode === "set" ? [iv.value] : []).join(":")).join(","));
      history.replaceState(null, "", "#" + p.toString());
    }

    function renderInterventions() {
      ivbar.replaceChildren();
      if (!state.interventions.length) {
        ivbar.append(el("span", {class: "muted small"}, "none · use “off” or “set” on a memory below"));
        return;
      }
      for (const iv of state.interventions) {
        ivbar.append(el("span", {class: "ivchip"}, el("a", {href: `/memory/${iv.layer}/${iv.key}`, class: "mono"}, `L${iv.layer}:${iv.key}`),
          iv.mode === "off" ? " off" : ` = ${fmt(iv.value, 2)}`,
          el("button", {type: "button", title: "remove", "aria-label": `remove intervention on L${iv.layer}:${iv.key}`,
            onclick: () => { removeIv(iv.layer, iv.key); }}, "✕")));
      }
      ivbar.append(el("button", {type: "button", class: "secondary small", id: "clear-iv",
        onclick: () => { state.interventions = []; runNow(); }}, "clear all"));
    }
    function removeIv(layer, key) {
      state.interventions = state.interventions.filter((x) => !(x.layer === layer && x.key === key));
      runNow();
    }
    function addIv(iv) {
      state.interventions = state.interventions.filter((x) => !(x.layer === iv.layer && x.key === iv.key));
      state.interventions.push(iv);
      runNow();
    }

    function lensCell(list) {
      return el("span", {}, list.slice(0, 3).map((t) => tok(t.token)));
    }
    function lensList(title, list) {
      return el("div", {}, el("h3", {}, title), table(["token", ["p", {class: "num"}]],
        list.map((t) => el("tr", {}, el("td", {}, tok(t.token)), el("td", {class: "num"}, pct(t.prob, 2))))));
    }

    function renderPrediction(d) {
      const base = state.interventions.length && state.baseline ? new Map(state.baseline.next_token_top.map((t) => [t.id, t.prob])) : null;
      const maxP = Math.max(...d.next_token_top.map((t) => t.prob), 1e-9);
      const rows = d.next_token_top.map((t, i) => {
        const b = base ? base.get(t.id) : undefined;
        const delta = base ? (b === undefined ? null : t.prob - b) : undefined;
        return el("tr", {}, el("td", {class: "num"}, String(i + 1)), el("td", {}, tok(t.token)),
          el("td", {}, bar(t.prob / maxP)), el("td", {class: "num"}, pct(t.prob, 2)),
          base ? el("td", {class: "num delta " + (delta > 0 ? "up" : delta < 0 ? "down" : "")},
            delta === null ? "new" : (delta > 0 ? "+" : "") + (100 * delta).toFixed(2) + " pp") : null);
      });
      prediction.replaceChildren(table(["#", "token", "", ["p", {class: "num"}], base ? ["Δ vs. none", {class: "num"}] : null].filter((h) => h !== null),
        rows, {id: "prediction-table"}));
      const tokensLine = el("p", {class: "muted small"}, `${d.tokens.length} prompt token(s): `, toks(d.tokens));
      prediction.append(tokensLine);
    }

    function memoryRow(layer, m) {
      const value = el("input", {type: "number", step: "any", class: "setval", "aria-label": "coefficient",
        value: layer.coef_max !== null ? Number(layer.coef_max.toPrecision(4)) : 1});
      const maxC = Math.max(...layer.top_memories.map((x) => x.contribution), 1e-9);
      return el("tr", {class: m.intervened ? "intervened" : null},
        el("td", {}, layer.scanned ? memLink(layer.layer, m.key, m.face) :
          el("span", {class: "row", title: "this layer is not in the atlas"}, el("span", {class: "mono"}, `L${layer.layer}:${m.key}`), faceBadge(m.face)),
          m.intervened ? el("span", {class: "badge iv"}, "edited") : null),
        el("td", {class: "num"}, signed(m.coefficient, 2)),
        el("td", {}, bar(m.contribution / maxC, m.face), el("span", {class: "small muted num"}, fmt(m.contribution, 2))),
        el("td", {}, toks(m.top_tokens.slice(0, 4), m.face)),
        el("td", {}, el("div", {class: "row"},
          el("button", {type: "button", class: "small danger iv-off", "data-layer": layer.layer, "data-key": m.key,
            title: "set this memory's coefficient to 0 at every position",
            onclick: () => addIv({layer: layer.layer, key: m.key, mode: "off"})}, "off"),
          value,
          el("button", {type: "button", class: "small iv-set", "data-layer": layer.layer, "data-key": m.key,
            title: "set the coefficient to this value at every position (default: the layer's largest scanned coefficient)",
            onclick: () => {
              const v = Number(value.value);
              if (!Number.isFinite(v)) { value.setCustomValidity("a number"); value.reportValidity(); return; }
              addIv({layer: layer.layer, key: m.key, mode: "set", value: v});
            }}, "set"))));
    }

    function renderLayers(d) {
      const last = d.layers.length - 1;
      if (!state.last) state.open.add(last);
      layersBox.replaceChildren(...d.layers.map((L) => {
        const det = el("details", {class: "layer" + (L.top_memories.some((m) => m.intervened) ? " has-iv" : ""),
          "data-layer": L.layer, open: state.open.has(L.layer)},
          el("summary", {}, el("span", {class: "lname"}, `Layer ${L.layer}`), lensCell(L.residual_top), lensCell(L.ffn_top),
            lensCell(L.output_top)),
          el("div", {class: "body"},
            el("h3", {}, "Top memories at the last position"),
            table(["memory", ["coef.", {class: "num"}], "contribution", "value promotes", "intervene"],
              L.top_memories.map((m) => memoryRow(L, m)), {class: "memories"}),
            el("div", {class: "grid"}, lensList("Residual before FFN", L.residual_top), lensList("FFN output", L.ffn_top),
              lensList("Residual + FFN", L.output_top))));
        det.addEventListener("toggle", () => { if (det.open) state.open.add(L.layer); else state.open.delete(L.layer); });
        return det;
      }));
    }

    function busy(on, text) {
      runBtn.disabled = on;
      genBtn.disabled = on;
      status.textContent = text || "";
    }

    async function runNow() {
      renderInterventions();
      saveHash();
      const seq = ++state.seq;
      const body = {prompt: prompt.value, interventions: state.interventions, top: Number(top.value)};
      busy(true, "running…");
      const t0 = performance.now();
      try {
        const key = prompt.value + "\u0000" + top.value;
        if (state.interventions.length && state.baselineKey !== key) {
          state.baseline = await api("/api/run", {prompt: prompt.value, interventions: [], top: Number(top.value)});
          state.baselineKey = key;
        }
        const d = await api("/api/run", body);
        if (seq !== state.seq) return;
        if (!state.interventions.length) { state.baseline = d; state.baselineKey = key; }
        renderPrediction(d);
        renderLayers(d);
        state.last = d;
        busy(false, `ran in ${Math.round(performance.now() - t0)} ms`);
      } catch (err) {
        if (seq !== state.seq) return;
        prediction.replaceChildren(errorBox(err));
        busy(false, "");
      }
    }

    async function generateNow() {
      saveHash();
      busy(true, "generating…");
      const t0 = performance.now();
      try {
        const n = Math.max(1, Math.min(64, Number(maxNew.value) || 20));
        const d = await api("/api/generate", {prompt: prompt.value, interventions: state.interventions, max_new_tokens: n});
        continuation.classList.remove("muted");
        continuation.replaceChildren(prompt.value, el("b", {id: "continuation-text"}, d.text),
          el("div", {class: "muted small"}, `${d.token_ids.length} token(s), greedy, ` +
            `${state.interventions.length ? state.interventions.length + " intervention(s)" : "no interventions"}` +
            (d.stopped === "eos" ? ", stopped at end of text" : "")));
        busy(false, `generated in ${Math.round(performance.now() - t0)} ms`);
      } catch (err) {
        continuation.replaceChildren(errorBox(err));
        busy(false, "");
      }
    }

    form.addEventListener("submit", (ev) => { ev.preventDefault(); runNow(); });
    prompt.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runNow(); }
    });
    genBtn.addEventListener("click", generateNow);
    top.addEventListener("change", runNow);
    renderInterventions();
    runNow();
  }

  function notfound() {
    main.replaceChildren(el("h1", {}, "Not found"),
      el("p", {}, "There is no such page or memory in this atlas. ", el("a", {href: "/"}, "Back to the overview"), "."));
  }

  // ---------------------------------------------------------------------------------------------------------
  const page = document.body.dataset.page;
  for (const a of document.querySelectorAll("header nav a")) if (a.dataset.nav === page) a.classList.add("active");
  jumpBox(document.querySelector("form.jump"));
  const pages = {overview, memory, search, debug, notfound};
  Promise.resolve().then(() => (pages[page] || notfound)()).catch((err) => main.replaceChildren(errorBox(err)));
})();
