"""Numbers → words: formatting, depth-aligned summaries and the one-sentence verdict of each figure.

A verdict compares trends and endpoints of our per-layer series with the paper's, both placed on relative depth
(layer+1)/n_layers, and names the differences of setting (gated, signed, instruct-tuned, quantised, corpus size,
vocabulary, depth) that bear on that experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .data import PAPER_LAYERS, WIKITEXT103_TRAIN_TOKENS, ReportInputs

STATUS_WORD = {"yes": "Reproduces", "partly": "Partly reproduces", "no": "Does not reproduce",
               "na": "Cannot compare"}
STATUS_BADGE = {"yes": "reproduces", "partly": "partly", "no": "differs", "na": "n/a"}


@dataclass
class Verdict:
    status: str
    """yes | partly | no | na"""
    text: str


# -- formatting ---------------------------------------------------------------------------------------------
def pct(v: float | None, signed: bool = False) -> str:
    """A fraction as a percentage with about two significant digits: 0.035 → 3.5%, 4e-6 → 0.0004%."""
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v) * 100
    if a == 0:
        s = "0"
    elif a >= 10:
        s = f"{a:.0f}"
    elif a >= 1:
        s = f"{a:.1f}".rstrip("0").rstrip(".")
    else:
        digits = min(8, 1 - int(math.floor(math.log10(a))))
        s = f"{a:.{digits}f}".rstrip("0").rstrip(".")
    sign = "−" if v < 0 and s != "0" else ("+" if signed and v > 0 else "")
    return f"{sign}{s}%"


def pct_span(lo: float, hi: float) -> str:
    """'12%–40%', or one number when both ends print the same."""
    a, b = pct(lo), pct(hi)
    return a if a == b else f"{a}–{b}"


def num(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2g}"


def tokens_text(n: int) -> str:
    """Three significant digits and a unit, rounded before the unit is chosen (999,973 is "1M", not "1e+03k")."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        value = float(f"{n / div:.3g}")
        if value >= 1:
            return f"{value:g}{unit}"
    return str(n)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0–2, 5, 7–8'."""
    out, start, prev = [], None, None
    for x in sorted(layers):
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}–{prev}" if prev > start else str(start))
            start = prev = x
    if start is not None:
        out.append(f"{start}–{prev}" if prev > start else str(start))
    return ", ".join(out)


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# -- depth-aligned summaries ----------------------------------------------------------------------------------
def points(values: list[float | None] | None) -> list[tuple[float, int, float]]:
    """(relative depth, layer, value) for every layer with a value."""
    if not values:
        return []
    n = len(values)
    return [((i + 1) / n, i, v) for i, v in enumerate(values) if v is not None]


def mean_between(pts, lo: float, hi: float, fallback: str | None = None) -> float | None:
    """Mean over lo < depth ≤ hi; if that depth band is empty, the nearest point ('first' / 'last')."""
    vals = [v for x, _, v in pts if lo < x <= hi]
    if vals:
        return float(np.mean(vals))
    if fallback and pts:
        return pts[0][2] if fallback == "first" else pts[-1][2]
    return None


def early(pts) -> float | None:
    return mean_between(pts, 0, 1 / 3, "first")


def late(pts) -> float | None:
    return mean_between(pts, 2 / 3, 1, "last")


def paper_points(arr: list[float]) -> list[tuple[float, int, float]]:
    return [((i + 1) / len(arr), i, float(v)) for i, v in enumerate(arr)]


def first_crossing(pts, level: float) -> tuple[float, int] | None:
    """Relative depth and layer where the series first reaches ``level`` and stays at or above it."""
    for j, (x, layer, _) in enumerate(pts):
        if all(v >= level for _, _, v in pts[j:]):
            return x, layer
    return None


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# -- differences of setting ------------------------------------------------------------------------------------
def factors(inp: ReportInputs, *aspects: str) -> list[str]:
    """Phrases naming how this setting differs from the paper's, for the aspects relevant to one figure."""
    t = inp.traits
    out = []
    for a in aspects:
        if a == "gated" and t["gated"]:
            out.append(f"a gated {t['activation']} FFN whose coefficients are signed (the paper's is ReLU)")
        elif a == "gated" and not t["relu"]:
            out.append(f"a {t['activation']} FFN (smooth and signed, the paper's is ReLU)")
        elif a == "instruct" and t["instruct"]:
            out.append("an instruct-tuned model (the paper's is a base LM)")
        elif a == "quantised" and t["quantised"]:
            out.append(f"quantised weights ({t['quantised']})")
        elif a == "corpus" and t["tokens"] and t["tokens"] < WIKITEXT103_TRAIN_TOKENS / 5:
            ratio = WIKITEXT103_TRAIN_TOKENS / t["tokens"]
            out.append(f"a scan of {tokens_text(t['tokens'])} tokens vs ≈103M in the paper ({ratio:,.0f}× fewer "
                       "candidate triggers)")
        elif a == "unit" and t["unit"] == "document":
            out.append("document prefixes (longer contexts than the paper's sentences)")
        elif a == "vocab" and isinstance(t["vocab"], int):
            pv = inp.paper["model"].get("vocab_approx", 267744)
            if abs(t["vocab"] - pv) / pv > 0.2:
                out.append(f"a vocabulary of {t['vocab']:,} tokens vs ≈{pv / 1000:.0f}k")
        elif a == "depth" and t["n_layers"] != PAPER_LAYERS:
            out.append(f"{t['n_layers']} layers vs {PAPER_LAYERS}")
        elif a == "patterns":
            out.append("patterns found by statistical tests here, by expert annotators in the paper")
    return out


def verdict(inp: ReportInputs, status: str, claim: str, paper: str, aspects: tuple[str, ...] = (),
            extra: str = "") -> Verdict:
    """'Reproduces: <claim> (paper: <paper>)<extra>; it holds despite / the setting differs in: <factors>.'

    The factors are differences of setting, not measured causes: the report cannot test them (the README's "what
    differs" table says which were measured, with which result), so it names them without calling them reasons."""
    text = f"{STATUS_WORD[status]}: {claim} (paper: {paper}){extra}"
    fs = factors(inp, *aspects)
    if fs:
        text += ("; it holds despite " if status == "yes"
                 else "; the setting differs from the paper's (untested here as causes) in ") + join_words(fs)
    return Verdict(status, text + ".")


def no_verdict(reason: str) -> Verdict:
    return Verdict("na", f"Cannot compare: {reason}.")
