"""§5 of the paper: how the memories of a layer are aggregated, and what the FFN does to the residual stream
(Figs 7-11), on held-out prefixes (units the scan did not use).

Each example is a prefix ``tokens[unit.offset : position + 1]`` of a held-out unit (at least one token after
the special prefix). One capture pass per batch records, at each example's last position and for every layer, the
coefficients m, the FFN output o, the block output h and the residual before the FFN r = h - o (see ``capture``).
The model's prediction is the logit lens of the last block's output (final norm, then E), which is exactly
the model's own logits. Per layer:

* Fig 7 active memories: |m_i| > tau * max_j |m_j|, tau = 0 for ReLU FFNs (i.e. m_i > 0, the paper's rule)
  and ``active_threshold`` (default 0.1) for smooth activations, where almost every m_i is non-zero; the
  share with m_i > 0 is reported too (about one half for SiLU-gated FFNs, so it says little there). Per layer
  the mean over examples and, as the paper plots it, the median and quartiles.
* Fig 8 composition: the layer's own prediction is argmax((sum_i m_i v_i) . E), the raw projection (no final
  norm, no output bias) as in the paper; a memory's prediction is sign-aware, argmax(sign(m_i) v_i . E). The
  share of examples where no active memory predicts the layer's token; where one does, the share of those
  whose token is an English stop word and whose prefix has fewer than 5 tokens.
* Figs 7-8 under a sweep of active rules (``sweep``): m_i > 0 and |m_i| > tau * max_j |m_j| for each tau of
  ``SWEEP_TAUS``, from the same captured coefficients (a few reductions per layer, no extra forward).
* Figs 9-10: whether the logit lens of r already gives the final prediction, and the probability it gives it
  (mean, and the quartiles over examples: the paper reports the median).
* Fig 11: with a = top(lens(r)), b = top(lens(o)), c = top(lens(r + o)) = top(lens(h)): residual (c = a != b),
  ffn (c = b != a), agreement (a = b = c), composition (c != a and c != b); the four sum to 1.
* §5.2, which the paper did by hand (100 last-layer cases where the FFN changed the top token, 66 to a
  "semantically distant" word), automated with the independent sentence embedder (``ffkv.embedder``): among the
  examples where c != a, the cosine similarity of the embedded token strings of a and c (see ``ffn_change``).

Every share of a sample has a Wilson 95 % interval (``X_ci``), the headline means and medians over examples a
percentile-bootstrap one (``ffkv.analysis.intervals``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atlas import Atlas
from ..capture import Capture, last_positions, pack_sorted, pad_right
from ..errors import FfkvError
from ..projection import ResidualLens, value_extremes, work_dtype
from .intervals import bootstrap, wilson
from .words import STOP_WORDS

SHORT_PREFIX = 5
"""Prefixes of fewer than this many tokens (special prefix excluded) count as short (the paper's 43 % of
prefixes "shorter than 5 tokens")."""

SWEEP_TAUS = (0.05, 0.1, 0.25, 0.5)
"""The magnitude thresholds of the active-rule sweep (besides m > 0 and the configured threshold)."""

POSITIVE_RULE = "m>0"
QUANTILES = {"q25": 0.25, "q50": 0.5, "q75": 0.75}


def rule_name(tau: float | None) -> str:
    """Key of an active rule in ``sweep``: ``m>0`` (tau None) or ``tau=X`` (|m_i| > X * max_j |m_j|)."""
    return POSITIVE_RULE if tau is None else f"tau={tau:g}"


def active_rules(tau: float, signed: bool) -> tuple[list[tuple[str, float | None]], str]:
    """The sweep's rules as (name, tau or None for m > 0), and the name of the headline rule: m > 0 for ReLU
    FFNs, |m_i| > tau * max_j |m_j| for signed ones (added to the sweep when tau is not one of SWEEP_TAUS)."""
    taus = sorted(set(SWEEP_TAUS) | ({tau} if signed else set()))
    rules = [(POSITIVE_RULE, None)] + [(rule_name(t), t) for t in taus]
    return rules, rule_name(tau) if signed else POSITIVE_RULE


EFFECTS = ("residual", "ffn", "agreement", "composition")

RANDOM_PAIRS = 1000
"""Random pairs of vocabulary tokens whose embedding cosines are the reference of §5.2's "semantically distant"."""
DISTANT_QUANTILE = 0.95
"""A changed pair is semantically distant when its cosine is below this quantile of the random pairs' cosines."""

DEFINITIONS = {
    "examples": "prefixes of units the scan did not use (held out), sampled with a seed: one random prefix end "
                "per unit (several when there are fewer units than examples, or when asked for); the model's "
                "prediction at the last position is the logit lens of the last block's output, i.e. the "
                "model's own logits.",
    "active": "a memory is active at an example when |m_i| > tau * max_j |m_j| over its layer: tau = 0 for ReLU "
              "FFNs (m_i > 0, the paper's rule), tau = the active threshold (default 0.1) for smooth or gated "
              "activations, because there m_i > 0 says little: almost every m_i is non-zero, and about half of "
              "a SiLU-gated FFN's coefficients are positive whatever the input; 'active_fraction_positive_mean' "
              "is the share with m_i > 0. 'active_rule' names the rule of the headline keys.",
    "active_fraction_quantiles": "per layer, the 25th, 50th and 75th percentiles (q25, q50, q75; linear "
                                 "interpolation) over examples of the share of the layer's memories that are "
                                 "active; the paper plots the median and quartiles.",
    "sweep": "Figs 7-8 under each active rule, from the same forward pass: 'm>0' (m_i > 0, the paper's literal "
             "rule) and 'tau=X' (|m_i| > X * max_j |m_j|) for X in " + ", ".join(f"{t:g}" for t in SWEEP_TAUS) +
             " (and the configured threshold); per rule the same keys as the headline (active_fraction_mean, "
             "active_fraction_quantiles, no_single_memory_match, match_is_stopword, match_prefix_short, "
             "n_matches). The headline keys equal the entry named by 'active_rule'; for ReLU FFNs that is 'm>0'.",
    "no_single_memory_match": "share of examples where the layer's top token, argmax((sum_i m_i v_i) . E) (raw, "
                              "no final norm, no output bias), is the sign-aware top token argmax(sign(m_i) "
                              "v_i . E) of no active memory.",
    "match_is_stopword": "among examples where some active memory predicts the layer's top token, the share "
                         "whose token is an English stop word (a fixed list).",
    "match_prefix_short": f"among those examples, the share whose prefix has fewer than {SHORT_PREFIX} tokens "
                          "(special prefix excluded).",
    "residual_matches_final": "share of examples where the logit lens of the residual before the FFN (r = block "
                              "output - FFN output) has the model's final top token as its top token.",
    "residual_prob_of_final": "mean probability that softmax(logit lens of r) gives the model's final top token.",
    "residual_prob_of_final_quantiles": "per layer, the 25th, 50th and 75th percentiles (q25, q50, q75; linear "
                                        "interpolation) over examples of that probability; the paper reports "
                                        "the 50th.",
    "ffn_effect": "with a = top(lens(r)), b = top(lens(o)) for the FFN output o, c = top(lens(r + o)): residual "
                  "c = a != b; ffn c = b != a; agreement a = b = c; composition c != a and c != b.",
    "ffn_change": "§5.2 automated: among the examples where the FFN changes the residual's top token "
                  "(top(r) != top(r + o), 'ffn_change_n' per layer), the cosine similarity of the sentence "
                  "embedder's (all-MiniLM-L6-v2) vectors of the two tokens' strings (stripped, lower-cased: the "
                  "embedder is uncased); 'ffn_change_distant' is the share whose cosine is below the "
                  f"{DISTANT_QUANTILE:.0%} quantile of the cosines of {RANDOM_PAIRS} random pairs of distinct "
                  "vocabulary tokens ('random_pair_cosine_q95'), i.e. no more alike than 95 % of unrelated pairs; "
                  "'ffn_change_shuffled_distant' the same with top(r + o) taken from another changed example of "
                  "the layer, a random cycle over them (what an FFN that moved to one of its usual targets at "
                  "random would score); 'ffn_change_content_distant' the share among the changes between two "
                  "content words (a letter, not a stop word; 'ffn_change_content_n'), because the embedder finds "
                  "any two function words or punctuation marks alike. The "
                  "paper read 100 last-layer cases: 66 moved to a semantically distant word.",
    "intervals": "X_ci beside a per-layer X: its 95 % interval per layer, [low, high] or null; Wilson score for "
                 "shares, percentile bootstrap over examples (1000 resamples, seed 0) for means and medians "
                 "(q50_ci inside a quantile block).",
}


def held_out_units(atlas: Atlas) -> np.ndarray:
    """Units of the atlas's token store that the scan did not use and that have a token after the special
    prefix (sorted)."""
    store = atlas.store
    scanned = np.load(atlas.path / "scanned_units.npy")
    held = np.setdiff1d(np.arange(store.n_units), scanned)
    return held[store.length[held] > store.n_special[held]]


def sample_prefixes(atlas: Atlas, n_examples: int = 4000, seed: int = 0, per_unit: int = 1) -> np.ndarray:
    """Global end positions of ``n_examples`` distinct held-out prefixes (seeded).

    ``per_unit`` = 1 (default): one random prefix end per unit of a random sample of held-out units
    (independent examples); with fewer held-out units than examples, a uniform sample of all their prefix
    ends instead (several per unit). ``per_unit`` = k > 1: up to k random prefix ends per unit, units in
    random order (a forward of a unit serves all its examples, so this costs far fewer forward tokens).
    Raises FfkvError when there are no held-out units or fewer prefixes than examples."""
    if n_examples < 1:
        raise FfkvError("the number of examples must be positive")
    if per_unit < 1:
        raise FfkvError("prefixes per unit must be at least 1")
    store = atlas.store
    held = held_out_units(atlas)
    if len(held) == 0:
        raise FfkvError(f"atlas {atlas.path} has no held-out units: its scan covered the whole corpus, so the "
                        "aggregation experiment (§5) has no unseen prefixes; scan with --max-tokens to leave "
                        "part of the corpus out")
    first = store.offset[held] + store.n_special[held]  # first scorable position of each unit
    count = store.length[held] - store.n_special[held]
    available = int(count.sum())
    if n_examples > available:
        raise FfkvError(f"asked for {n_examples} examples but the {len(held)} held-out units of atlas "
                        f"{atlas.path} have only {available} prefixes; ask for fewer examples or leave more of "
                        "the corpus out of the scan (--max-tokens)")
    rng = np.random.default_rng(seed)
    if per_unit == 1 and len(held) >= n_examples:
        pick = rng.choice(len(held), size=n_examples, replace=False)
        return first[pick] + rng.integers(0, count[pick])
    if per_unit > 1 and int(np.minimum(count, per_unit).sum()) >= n_examples:
        out: list[np.ndarray] = []
        n = 0
        for u in rng.permutation(len(held)):
            take = min(per_unit, int(count[u]), n_examples - n)
            out.append(first[u] + np.sort(rng.choice(int(count[u]), size=take, replace=False)))
            n += take
            if n == n_examples:
                break
        return np.concatenate(out)
    cumulative = np.cumsum(count)
    flat = rng.choice(available, size=n_examples, replace=False)
    unit_idx = np.searchsorted(cumulative, flat, side="right")
    return first[unit_idx] + flat - (cumulative - count)[unit_idx]


def _plan(store, positions: np.ndarray, batch_tokens: int, max_batch: int):
    """Group the examples by unit (one forward row per unit, up to its last example) and the rows into
    batches of similar length, each at most ``batch_tokens`` padded tokens or ``max_batch`` rows.
    Returns a list of batches, each a list of (unit start, row length, example indices)."""
    units = store.unit_of(positions)
    rows = []
    for u in np.unique(units):
        idx = np.nonzero(units == u)[0]
        start = int(store.offset[u])
        rows.append((start, int(positions[idx].max()) - start + 1, idx))
    rows.sort(key=lambda r: (r[1], r[0]))
    return [[rows[i] for i in idx] for idx in pack_sorted([r[1] for r in rows], batch_tokens, max_batch)]


@torch.inference_mode()
def capture_last_positions(model, sequences: list[list[int]]) -> dict:
    """Run right-padded ``sequences`` as one batch; per layer l: ``m[l]`` [B, d_ff], ``o[l]``, ``h[l]``,
    ``r[l]`` = h - o [B, d], and ``final_logits`` [B, vocab] (the logit lens of the last block's output),
    all at each sequence's last position. For notebooks and tests; the experiment streams instead."""
    parts = model.parts
    ids, lengths = pad_right(sequences)
    with Capture(parts, range(parts.n_layers), ffn_output=True, block_output=True) as cap:
        cap.run(ids.to(model.device), last_positions(lengths, ids.shape[1]))
    out = {"m": cap.m, "o": cap.o, "h": cap.h, "r": {layer: cap.h[layer] - cap.o[layer] for layer in cap.h}}
    last = out["h"][parts.n_layers - 1]
    out["final_logits"] = ResidualLens(parts, work_dtype(last.dtype)).full(last)
    return out


@torch.inference_mode()
def memory_predictions(atlas: Atlas, model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each memory's own top token when it adds +v_i (argmax v_i.E) and when it adds -v_i (argmin): from the
    atlas where the layer was scanned, else computed."""
    if layer in atlas.layers:
        t = atlas.layer_tensors(layer)
        return t["value_raw_pos_ids"][:, 0].long(), t["value_raw_neg_ids"][:, 0].long()
    return value_extremes(model.parts, layer)


def aggregation_experiment(atlas: Atlas, model, n_examples: int = 4000, *, active_threshold: float = 0.1,
                           seed: int = 0, per_unit: int = 1, batch_tokens: int = 2048, max_batch: int = 64,
                           embed: Callable[[list[str]], np.ndarray] | None = None, progress: bool = True) -> dict:
    """The ``aggregation`` block of ``analysis.json`` (every per-layer array has length ``n_layers``).

    ``active_threshold`` is tau for smooth activations (ReLU FFNs always use m > 0) in the headline keys; the
    ``sweep`` holds Figs 7-8 under every rule of ``active_rules``. ``per_unit``: prefixes taken per held-out
    unit (see ``sample_prefixes``); ``batch_tokens`` and ``max_batch`` bound each forward batch (padded tokens,
    rows). ``embed`` maps texts to vectors for §5.2 (``ffn_change``); by default the sentence embedder, with the
    explanations' cache of the atlas; without it installed the §5.2 keys are left out and ``missing`` says why."""
    if not 0.0 <= active_threshold < 1.0:
        raise FfkvError("the active threshold must be in [0, 1)")
    parts = model.parts
    store = atlas.store
    n_layers = parts.n_layers
    if atlas.n_layers != n_layers:
        raise FfkvError(f"atlas {atlas.path} has {atlas.n_layers} layers, the model {n_layers}")
    tau = active_threshold if parts.signed else 0.0
    rules, headline = active_rules(tau, parts.signed)
    n_rules = len(rules)  # m > 0 first, then the thresholds in increasing order
    positions = sample_prefixes(atlas, n_examples, seed, per_unit)
    units = store.unit_of(positions)
    n_text = positions - store.offset[units] - store.n_special[units] + 1  # prefix tokens, special excluded
    total = len(positions)

    device = model.device
    wd = work_dtype(parts.unembedding.dtype)
    lens = ResidualLens(parts, wd)
    # values as the model adds them (gain * v_i after Gemma 3's post-FFN norm; its shared scale keeps the argmax)
    values = {layer: parts.added_values(layer).to(wd) for layer in range(n_layers)}
    preds = {}
    for layer in range(n_layers):
        pos, neg = memory_predictions(atlas, model, layer)
        preds[layer] = (pos.to(device), neg.to(device))

    @functools.cache
    def thresholds_of(dtype: torch.dtype) -> torch.Tensor:
        """The sweep's thresholds [rules - 1, 1, 1] in ``dtype`` (at least float32), on the model's device."""
        dtype = torch.promote_types(dtype, torch.float32)
        return torch.tensor([t for _, t in rules[1:]], dtype=dtype).to(device)[:, None, None]

    @functools.cache
    def stop_word(token: int) -> bool:
        return atlas.decode([token]).strip().lower() in STOP_WORDS

    # per rule (axis 0) and layer: sums over examples, and the per-example active shares for the quantiles
    rule_acc = {name: np.zeros((n_rules, n_layers)) for name in ("active", "match", "match_stop", "match_short")}
    active_share = np.zeros((n_rules, total, n_layers), dtype=np.float32)
    res_prob = np.zeros((total, n_layers), dtype=np.float32)
    top_r = np.zeros((total, n_layers), dtype=np.int64)  # §5.2: top(lens(r)) and top(lens(r + o)) per example
    top_h = np.zeros((total, n_layers), dtype=np.int64)
    acc = {name: np.zeros(n_layers) for name in ("res_final", "res_prob")}
    effects = np.zeros((n_layers, len(EFFECTS)))
    batches = _plan(store, positions, batch_tokens, max_batch)
    forward_tokens = sum(row[1] for batch in batches for row in batch)
    bar = tqdm(total=total, desc=f"aggregation ({total} held-out prefixes)", unit="ex",
               disable=not progress, dynamic_ncols=True)
    try:
        with Capture(parts, range(n_layers), ffn_output=True, block_output=True) as cap, torch.inference_mode():
            for batch in batches:
                ids, _ = pad_right([store.tokens[start: start + length] for start, length, _ in batch])
                flat, examples = [], []
                for j, (start, _, idx) in enumerate(batch):
                    flat += (j * ids.shape[1] + positions[idx] - start).tolist()
                    examples += idx.tolist()
                cap.run(ids.to(device), torch.tensor(flat))
                n = len(examples)
                examples = np.asarray(examples)
                short = n_text[examples] < SHORT_PREFIX
                final_top = lens.full(cap.h[n_layers - 1]).argmax(dim=1)
                for layer in range(n_layers):
                    m, o, h = cap.m[layer], cap.o[layer], cap.h[layer]
                    # one projection for lens(r), lens(o), lens(h) and the layer's raw output sum_i m_i v_i
                    mw = m.to(wd)
                    t_r, k_r = lens.split(h - o)
                    t_o, k_o = lens.split(o)
                    _, k_h = lens.split(h)
                    projected = torch.cat([t_r, t_o, mw @ values[layer]]) @ lens.unembed_t
                    p_r, p_o, raw = projected[:n], projected[n: 2 * n], projected[2 * n:]
                    # Figs 7-8 under every active rule: the layer's raw prediction vs. each active memory's own
                    # (sign-aware) prediction
                    layer_top = raw.argmax(dim=1)
                    pos_pred, neg_pred = preds[layer]
                    own = torch.where(mw > 0, pos_pred[None, :], neg_pred[None, :])
                    hit = own == layer_top[:, None]
                    mag = m.abs()
                    limit = mag.amax(dim=1, keepdim=True)
                    positive = m > 0
                    # under |m_i| > t * max_j |m_j| some active memory predicts the layer's token iff the largest
                    # |m_i| among the memories that predict it passes the threshold
                    best_hit = torch.where(hit, mag, -1.0).amax(dim=1, keepdim=True)
                    thresholds = thresholds_of(m.dtype) * limit  # [rules - 1, n, 1]
                    counts = torch.cat([positive.sum(dim=1)[None], (mag > thresholds).sum(dim=2)])
                    matched = torch.cat([(positive & hit).any(dim=1)[None], (best_hit > thresholds)[:, :, 0]])
                    on_host = torch.cat([counts, matched.long()]).cpu().numpy()
                    shares_np, matched_np = on_host[:n_rules] / m.shape[1], on_host[n_rules:] > 0
                    rule_acc["active"][:, layer] += shares_np.sum(axis=1)
                    active_share[:, examples, layer] = shares_np
                    rule_acc["match"][:, layer] += matched_np.sum(axis=1)
                    rule_acc["match_short"][:, layer] += (matched_np & short).sum(axis=1)
                    if matched_np.any():
                        stop = np.fromiter((stop_word(int(x)) for x in layer_top.tolist()), dtype=bool, count=n)
                        rule_acc["match_stop"][:, layer] += (matched_np & stop).sum(axis=1)
                    # Figs 9-11
                    lr = lens.logits(p_r, k_r)
                    a = lr.argmax(dim=1)
                    acc["res_final"][layer] += int((a == final_top).sum())
                    logp = lr.gather(1, final_top[:, None])[:, 0] - torch.logsumexp(lr, dim=1)
                    prob = logp.exp().cpu().numpy()
                    acc["res_prob"][layer] += prob.sum(dtype=np.float64)
                    res_prob[examples, layer] = prob
                    del lr
                    b = lens.top(p_o, k_o)
                    c = lens.top(p_r.add_(p_o), k_h)
                    kinds = torch.stack([(c == a) & (a != b), (c == b) & (b != a), (a == b) & (b == c),
                                         (c != a) & (c != b)], dim=1)
                    effects[layer] += kinds.sum(dim=0).cpu().numpy()
                    top_r[examples, layer] = a.cpu().numpy()
                    top_h[examples, layer] = c.cpu().numpy()
                bar.update(n)
    finally:
        bar.close()

    def share(num: np.ndarray, den) -> list:
        den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
        return [float(x / d) if d > 0 else None for x, d in zip(num, den)]

    def share_ci(num: np.ndarray, den) -> list:
        den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
        return [wilson(float(x), float(d)) for x, d in zip(num, den)]

    def quantiles(per_example: np.ndarray, median_ci: bool = False) -> dict:
        q = np.quantile(per_example.astype(np.float64), list(QUANTILES.values()), axis=0)
        out = {name: [float(x) for x in row] for name, row in zip(QUANTILES, q)}
        if median_ci:
            out["q50_ci"] = per_layer_bootstrap(per_example, "median")
        return out

    sweep = {}
    for j, (name, _) in enumerate(rules):
        matches = rule_acc["match"][j]
        entry = {
            "active_fraction_mean": share(rule_acc["active"][j], total),
            "active_fraction_quantiles": quantiles(active_share[j], median_ci=name == headline),
            "no_single_memory_match": share(total - matches, total),
            "no_single_memory_match_ci": share_ci(total - matches, total),
            "match_is_stopword": share(rule_acc["match_stop"][j], matches),
            "match_is_stopword_ci": share_ci(rule_acc["match_stop"][j], matches),
            "match_prefix_short": share(rule_acc["match_short"][j], matches),
            "match_prefix_short_ci": share_ci(rule_acc["match_short"][j], matches),
            "n_matches": [int(x) for x in matches],
        }
        if name == headline:  # bootstrap costs ~15-40 ms a layer: the headline rule only
            entry["active_fraction_mean_ci"] = per_layer_bootstrap(active_share[j], "mean")
        sweep[name] = entry
    main = sweep[headline]
    positive = rules.index((POSITIVE_RULE, None))
    block = {
        "n_examples": total,
        "active_fraction_mean": main["active_fraction_mean"],
        "active_fraction_mean_ci": main["active_fraction_mean_ci"],
        "active_fraction_quantiles": main["active_fraction_quantiles"],
        "active_fraction_positive_mean": sweep[POSITIVE_RULE]["active_fraction_mean"],
        "active_fraction_positive_mean_ci": main["active_fraction_mean_ci"] if headline == POSITIVE_RULE else
        per_layer_bootstrap(active_share[positive], "mean"),
        **{key: main[key] for key in ("no_single_memory_match", "no_single_memory_match_ci", "match_is_stopword",
                                      "match_is_stopword_ci", "match_prefix_short", "match_prefix_short_ci",
                                      "n_matches")},
        "residual_matches_final": share(acc["res_final"], total),
        "residual_matches_final_ci": share_ci(acc["res_final"], total),
        "residual_prob_of_final": share(acc["res_prob"], total),
        "residual_prob_of_final_ci": per_layer_bootstrap(res_prob, "mean"),
        "residual_prob_of_final_quantiles": quantiles(res_prob, median_ci=True),
        "ffn_effect": {**{name: share(effects[:, j], total) for j, name in enumerate(EFFECTS)},
                       **{f"{name}_ci": share_ci(effects[:, j], total) for j, name in enumerate(EFFECTS)}},
        "active_threshold": tau,
        "active_rule": headline,
        "sweep": sweep,
        "held_out_units": int(len(held_out_units(atlas))),
        "units_used": int(len(np.unique(units))),
        "prefixes_per_unit": per_unit,
        "mean_prefix_tokens": float(np.mean(n_text)),
        "forward_tokens": int(forward_tokens),
        "seed": seed,
        "definitions": dict(DEFINITIONS, active=DEFINITIONS["active"] + f" Used here: tau = {tau:g}."),
    }
    if embed is None:
        try:
            from ..embedder import Embedder

            embed = Embedder(cache_dir=atlas.path / "explain_cache").encode
        except FfkvError as exc:
            block["missing"] = {"ffn_change": f"not measured: {exc}"}
    if embed is not None:
        vocab = min(len(atlas.tokenizer), parts.unembedding.shape[0])
        block.update(ffn_change(top_r, top_h, token_text(atlas), embed, vocab, seed))
    return block


def per_layer_bootstrap(per_example: np.ndarray, statistic: str) -> list:
    """The bootstrap interval of ``statistic`` over examples (rows), for each layer (column)."""
    return [bootstrap(per_example[:, layer], statistic) for layer in range(per_example.shape[1])]


def token_text(atlas: Atlas) -> Callable[[int], str]:
    """A token's string as §5.2 embeds it: decoded alone, stripped and lower-cased (the embedder is uncased and
    ignores surrounding whitespace; lower-cased words are what the explanations' cache already holds)."""

    @functools.cache
    def text(token: int) -> str:
        return atlas.decode([token]).strip().lower()

    return text


def _content_word(text: str) -> bool:
    """A token string (stripped, lower-cased) with a letter that is not a stop word."""
    return any(ch.isalpha() for ch in text) and text not in STOP_WORDS


def _derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of range(n) that moves every index (a random cycle), for n >= 2; identity below."""
    order = rng.permutation(n)
    partner = np.arange(n)
    partner[order] = np.roll(order, -1)
    return partner


def ffn_change(top_r: np.ndarray, top_h: np.ndarray, text: Callable[[int], str],
               embed: Callable[[list[str]], np.ndarray], vocab_size: int, seed: int = 0,
               random_pairs: int = RANDOM_PAIRS) -> dict:
    """§5.2 automated: the ``ffn_change*`` and ``random_pair*`` keys of the aggregation block.

    ``top_r`` and ``top_h`` [examples, layers] are the top tokens of lens(r) and lens(r + o); ``text`` gives a
    token's string, ``embed`` the vectors of a list of strings (normalised here). The reference is
    ``random_pairs`` seeded pairs of distinct token ids below ``vocab_size``: random tokens are almost never
    related, so a pair is "semantically distant" when it is no more alike than 95 % of them (cosine below their
    95th percentile; a pair above it is as alike as the top 5 % of unrelated pairs, which a related pair such as
    'later' / 'earlier' is). Each token string is embedded once. The ``ffn_change_content*`` keys repeat the share
    for the pairs of two content words (a letter, not a stop word): a sentence embedder finds any two function
    words or punctuation marks alike, so there "related" says little about meaning."""
    if vocab_size < 2:
        raise FfkvError("§5.2 needs a vocabulary of at least two tokens")
    n_layers = top_r.shape[1]
    changed = top_r != top_h
    rng = np.random.default_rng(seed)
    first = rng.integers(0, vocab_size, size=random_pairs)
    second = (first + rng.integers(1, vocab_size, size=random_pairs)) % vocab_size  # distinct from first
    shuffled = [_derangement(rng, int(changed[:, layer].sum())) for layer in range(n_layers)]
    tokens = np.unique(np.concatenate([top_r[changed], top_h[changed], first, second]))
    vectors = np.asarray(embed([text(int(t)) for t in tokens]), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)

    content = np.array([_content_word(text(int(t))) for t in tokens])

    def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (vectors[np.searchsorted(tokens, x)] * vectors[np.searchsorted(tokens, y)]).sum(axis=-1)

    def both_content(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return content[np.searchsorted(tokens, x)] & content[np.searchsorted(tokens, y)]

    reference = cosine(first, second)
    threshold = float(np.quantile(reference, DISTANT_QUANTILE))
    n, distant, shuffled_distant, mean, mean_ci, content_n, content_distant = [], [], [], [], [], [], []
    for layer in range(n_layers):
        rows = changed[:, layer]
        cos = cosine(top_r[rows, layer], top_h[rows, layer])
        n.append(int(rows.sum()))
        distant.append(int((cos < threshold).sum()))
        words = both_content(top_r[rows, layer], top_h[rows, layer])
        content_n.append(int(words.sum()))
        content_distant.append(int((cos[words] < threshold).sum()))
        shuffled_distant.append(int((cosine(top_r[rows, layer], top_h[rows, layer][shuffled[layer]]) < threshold)
                                    .sum()))
        mean.append(float(cos.mean()) if len(cos) else None)
        mean_ci.append(bootstrap(cos, "mean"))
    return {
        "ffn_change_n": n,
        "ffn_change_distant": [d / k if k else None for d, k in zip(distant, n)],
        "ffn_change_distant_ci": [wilson(d, k) for d, k in zip(distant, n)],
        "ffn_change_shuffled_distant": [d / k if k else None for d, k in zip(shuffled_distant, n)],
        "ffn_change_shuffled_distant_ci": [wilson(d, k) for d, k in zip(shuffled_distant, n)],
        "ffn_change_cosine_mean": mean,
        "ffn_change_cosine_mean_ci": mean_ci,
        "ffn_change_content_n": content_n,
        "ffn_change_content_distant": [d / k if k else None for d, k in zip(content_distant, content_n)],
        "ffn_change_content_distant_ci": [wilson(d, k) for d, k in zip(content_distant, content_n)],
        "random_pairs": int(random_pairs),
        "random_pair_cosine_mean": float(reference.mean()),
        "random_pair_cosine_mean_ci": bootstrap(reference, "mean"),
        "random_pair_cosine_q95": threshold,
    }
