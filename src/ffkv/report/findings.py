"""The headline numbers of analysis.json per third of the layers: the rows `ffkv analyze` prints (and the README
quotes) and the table of `ffkv compare`, one definition for both.

Thirds are taken over layer indices (lowest, middle, highest third, then the last layer), so a 30-layer model
and the paper's 16 layers are summarised the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def thirds(values: list) -> list[float | None]:
    """Means over the lowest, middle and highest third of the layers (missing layers skipped), and the last
    layer: how the README and the report compare a 30-layer model with the paper's 16."""
    n = len(values)
    parts = [values[: n // 3], values[n // 3: 2 * n // 3], values[2 * n // 3:], values[-1:]]
    out = []
    for part in parts:
        present = [v for v in part if v is not None]
        out.append(sum(present) / len(present) if present else None)
    return out


THIRDS = ("low", "mid", "high", "last")
"""Names of the four numbers of :func:`thirds`."""


def _get(d, path: tuple[str, ...]):
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


@dataclass(frozen=True)
class Row:
    """One headline number: a per-layer array of analysis.json, its figure and how it prints."""

    figure: str
    """Id of the report figure whose verdict the number belongs to."""
    name: str
    """Label as `ffkv analyze` prints it (indented: a detail of the row above)."""
    path: tuple[str, ...]
    """Block, nested keys, then the array's key; its 95 % intervals sit beside it under the key + '_ci'."""
    fmt: str
    plus: tuple[str, ...] | None = None
    """A second array added to the first, layer by layer (no 95 % interval then)."""
    paper: Callable[[dict], list[float]] | None = None
    """The paper's per-layer array (from paper_reference.json) this number is compared with, if it has one."""
    paper_label: str = "≈"
    """How the paper's numbers are marked: '≈' for the arrays interpolated from the paper's figures."""
    key: str | None = None
    """Identifies the row across atlases where its printed name varies (the headline rule of the sweep)."""
    printed: bool = True
    """False: `ffkv analyze` leaves it out (`ffkv explain` prints it from its own file)."""

    @property
    def id(self) -> str:
        return self.key or self.name

    def values(self, analysis: dict | None) -> list | None:
        values = _get(analysis, self.path)
        if self.plus is None:
            return values if isinstance(values, list) and values else None
        other = _get(analysis, self.plus)
        if not (isinstance(values, list) and values and isinstance(other, list) and other):
            return None
        return [None if x is None or y is None else x + y for x, y in zip(values, other)]

    def intervals(self, analysis: dict | None) -> list | None:
        if self.plus is not None:
            return None
        ci = _get(analysis, (*self.path[:-1], self.path[-1] + "_ci"))
        return ci if isinstance(ci, list) else None

    def last_interval(self, analysis: dict | None) -> list[float] | None:
        """The last layer's 95 % interval, where the last layer has a number."""
        values, ci = self.values(analysis), self.intervals(analysis)
        if not values or values[-1] is None or not ci:
            return None
        last = ci[-1]
        return last if isinstance(last, list) and len(last) == 2 and None not in last else None


def _ref(*path: str, per_vocab: bool = False) -> Callable[[dict], list[float]]:
    def get(ref: dict) -> list[float]:
        arr = _get(ref, path)
        return [v / ref["model"]["vocab_approx"] for v in arr] if per_vocab else list(arr)
    return get


ROWS: tuple[Row, ...] = (
    Row("fig2", "Fig 2 triggers with only shallow patterns", ("patterns", "shallow"), "{:.2f}"),
    Row("fig2", "Fig 2 triggers with semantic (or both)", ("patterns", "semantic"), "{:.2f}",
        plus=("patterns", "both")),
    Row("explain", "Fig E1 explanation: simulation corr.", ("patterns", "sim_corr"), "{:.2f}", printed=False),
    Row("explain", "  last-token lookup", ("patterns", "lookup_sim_corr"), "{:.2f}", key="E1 lookup sim",
        printed=False),
    Row("explain", "Fig E1 explanation: firing F1", ("patterns", "f1"), "{:.2f}", paper=_ref("n2g_firing_f1", "f1"),
        paper_label="N2G", printed=False),
    Row("explain", "  last-token lookup", ("patterns", "lookup_f1"), "{:.2f}", key="E1 lookup F1", printed=False),
    Row("fig3", "Fig 3 remove first token", ("token_removal", "first"), "{:+.0%}",
        paper=_ref("fig3_token_removal", "first_approx")),
    Row("fig3", "Fig 3 remove last token", ("token_removal", "last"), "{:+.0%}",
        paper=_ref("fig3_token_removal", "last_approx")),
    Row("fig3", "Fig 3 remove random token", ("token_removal", "random"), "{:+.0%}",
        paper=_ref("fig3_token_removal", "random_approx")),
    Row("fig3", "Fig 3 remove last token, median", ("token_removal", "last_median"), "{:+.0%}"),
    Row("fig3b", "Fig 3 remove last token, sign flips", ("token_removal", "last_sign_change"), "{:.0%}"),
    Row("fig4", "Fig 4 value agreement rate", ("values", "agreement_rate"), "{:.2%}",
        paper=_ref("fig4_agreement_rate", "approx")),
    Row("fig4", "Fig 4 frequency-matched baseline", ("values", "frequency_baseline"), "{:.2%}"),
    Row("fig4b", "Fig 4b value suppression rate", ("values", "suppression_rate"), "{:.2%}"),
    Row("fig4b", "Fig 4b suppression, frequency baseline", ("values", "suppression_frequency_baseline"), "{:.2%}"),
    Row("fig4b", "Fig 4b next token in the bottom 10", ("values", "suppression_bottom10_rate"), "{:.2%}"),
    Row("fig4b", "Fig 4b suppression rate, -v face", ("values_neg", "suppression_rate"), "{:.2%}"),
    Row("fig4", "Fig 4 agreement rate, -v face", ("values_neg", "agreement_rate"), "{:.2%}"),
    Row("fig5", "Fig 5 median rank of next token / |V|", ("values", "next_token_rank_median_normed"), "{:.1%}",
        paper=_ref("fig5_next_token_rank", "median_approx", per_vocab=True)),
    Row("causal", "Causal: agreeing memory off, Δlog p", ("causal", "agree_delta"), "{:+.3f}"),
    Row("causal", "  its control, Δlog p", ("causal", "agree_control_delta"), "{:+.3f}", key="agree control"),
    Row("causal", "  |Δ| above the control's", ("causal", "agree_exceeds_control"), "{:.0%}", key="agree exceeds"),
    Row("causal", "Causal: suppressing memory off, Δlog p", ("causal", "suppress_delta"), "{:+.3f}"),
    Row("causal", "  its control, Δlog p", ("causal", "suppress_control_delta"), "{:+.3f}", key="suppress control"),
    Row("causal", "  |Δ| above the control's", ("causal", "suppress_exceeds_control"), "{:.0%}",
        key="suppress exceeds"),
    Row("fig7", "Fig 7 active memories", ("aggregation", "active_fraction_mean"), "{:.0%}"),
    Row("fig7", "Fig 7 active memories, median", ("aggregation", "active_fraction_quantiles", "q50"), "{:.0%}",
        paper=_ref("fig7_active_memories", "median_fraction_approx")),
    Row("fig8", "Fig 8 no single memory matches", ("aggregation", "no_single_memory_match"), "{:.0%}",
        paper=_ref("fig8_no_single_memory_match", "approx")),
    Row("fig9", "Fig 9 residual top = final top", ("aggregation", "residual_matches_final"), "{:.0%}",
        paper=_ref("fig9_residual_matches_final", "approx")),
    Row("fig10", "Fig 10 residual's p(final), median", ("aggregation", "residual_prob_of_final_quantiles", "q50"),
        "{:.0%}", paper=_ref("fig10_residual_prob_of_final", "median_approx")),
    Row("fig11", "Fig 11 residual keeps its top", ("aggregation", "ffn_effect", "residual"), "{:.0%}"),
    Row("fig11", "Fig 11 FFN overrides it", ("aggregation", "ffn_effect", "ffn"), "{:.0%}"),
    Row("fig11b", "§5.2 FFN changes it to a distant word", ("aggregation", "ffn_change_distant"), "{:.0%}"),
    Row("fig11b", "§5.2   between two content words", ("aggregation", "ffn_change_content_distant"), "{:.0%}"),
    Row("fig11b", "§5.2   new tokens shuffled (control)", ("aggregation", "ffn_change_shuffled_distant"), "{:.0%}"),
    Row("fig11b", "§5.2   mean cosine old / new token", ("aggregation", "ffn_change_cosine_mean"), "{:.2f}"),
)


def rows(analysis: dict | None) -> list[Row]:
    """Every row for this analysis, in print order: the fixed ones, with one row per active rule of the sweep
    (its headline rule marked) before Fig 9."""
    agg = _get(analysis, ("aggregation",))
    sweep = _get(agg, ("sweep",))
    sweep = sweep if isinstance(sweep, dict) else {}
    agg = agg if isinstance(agg, dict) else {}
    out = list(ROWS)
    at = next((i for i, r in enumerate(out) if r.figure == "fig9"), len(out))
    out[at:at] = [Row("fig8", f"Fig 8   under {rule}{' (headline)' if rule == agg.get('active_rule') else ''}",
                      ("aggregation", "sweep", rule, "no_single_memory_match"), "{:.0%}",
                      key=f"Fig 8   under {rule}") for rule in sweep]
    return out


def fmt_value(row: Row, value: float | None) -> str:
    return "-" if value is None else row.fmt.format(value)
