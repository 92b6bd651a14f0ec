"""`ffkv analyze`: the experiments of Geva et al. (2021) §3-§5 on an atlas, generalised to GELU and gated FFNs.

Modules: ``explain`` with ``features``, ``patterns`` and ``simulate`` (`ffkv explain`: scored explanations of
every memory face in ``ATLAS/explanations.parquet``; §3's Fig 2 / Table 1 come from them), ``keys`` (§3: token
removal, Fig 3), ``values`` (§4: agreement,
ranks, precision, Figs 4-6 / Table 2), ``aggregation`` (§5: active memories and composition, Figs 7-11),
``causal`` (not in the paper: memories switched off where they fired, a causal check of §4, Fig C1), ``run`` (runs
them all and writes ``ATLAS/analysis.json``). Each experiment is a plain function returning
plain data (dataclasses / dicts of lists), so notebooks can call them one by one.

Per-layer arrays that are a share of a sample or a statistic over sampled items have a sibling ``X_ci``: one
``[low, high]`` 95 % interval (Wilson for shares, percentile bootstrap otherwise; see ``intervals``) or null per
layer.

``analysis.json`` contract (per-layer arrays have length ``n_layers``, indexed by the model's 0-based layer;
``null`` where a layer was not scanned or an experiment was skipped; fractions in [0, 1]; token removal as a
relative change, -0.65 meaning -65 %). Keys with the suffix ``_neg`` hold the same arrays for the negative
face (coefficients < 0, value -v) of signed (non-ReLU) models; they are absent for ReLU models.

    {"ffkv_version", "scan_id", "atlas": {...manifest summary: "model", "corpus" (with "bos", "special_prefix",
              "special_prefix_tokens": the ids fed, unscored, before every unit; absent in atlases before them),
              "scan", "result"...}, "config": {...sizes and seeds used...},
     "definitions": {"memory", "face", "active", "agreement", ...: one sentence each},
     "n_layers": int, "layers": [scanned layers],
     "patterns":  {"shallow", "semantic", "both", "none": [L] shares of trigger examples (the paper's unit),
                   "keys_shallow", "keys_semantic", "keys_both", "keys_none": [L] shares of keys,
                   "patterns_per_key", "coverage", "n_keys": [L],
                   "sim_corr", "f1", "precision", "recall", "shuffled_sim_corr", "shuffled_f1", "lookup_sim_corr",
                   "lookup_f1", "scored_keys": [L] (held-out scores; F1 over keys that fired on held-out text),
                   "keys": [{"layer", "key", "face", "label", "description", "sim_corr", "f1",
                             "patterns": [{"kind": "shallow"|"semantic", "description", "triggers": [ranks],
                                           "p_value"}], "triggers": [texts]}]},
     "token_removal": {"first", "last", "random": [L] mean relative change (the paper's statistic),
                       "X_median", "X_sign_change" (share of triggers whose coefficient changes sign), "X_n"
                       (triggers measured) for X in first / last / random: [L], "X_ci", "X_median_ci",
                       "X_sign_change_ci": [L] of [low, high] (95 %), "n_keys": [L], "skipped": [L]},
     "values": {"agreement_rate", "random_baseline", "frequency_baseline", "next_token_rank_median": [L],
                "agreement_rate_normed": [L], "rank_quantiles": {"q10","q25","q50","q75","q90": [L]},
                "n_targets": [L] (memories with a target: the denominator of every share), "vocab_size": |V|,
                "next_token_rank_median_normed": [L] (rank / |V|), "rank_quantiles_normed": {"q10",...,"q90": [L]},
                "suppression_rate", "suppression_bottom10_rate", "suppression_frequency_baseline": [L],
                "agreement_rate_ci", "agreement_rate_normed_ci", "frequency_baseline_ci", "suppression_rate_ci",
                "suppression_bottom10_rate_ci", "suppression_frequency_baseline_ci": [L] of [low, high] (Wilson),
                "next_token_rank_median_normed_ci": [L] of [low, high] (percentile bootstrap over memories),
                "max_prob_vs_agreement": {"bin_edges": [...], "agreement": [...], "count": [...],
                                          "agreement_ci": [[low, high] | null per bin]},
                "top_max_prob": {"n", "upper_depth", "k", "upper", "agree", "agree_any": int,
                                 "upper_share", "agree_share", "agree_any_share", "upper_ci", "agree_ci",
                                 "agree_any_ci", "layers", "keys", "max_prob": [n]} (Fig 6's summary),
                "top_memories": [{"layer","key","face","precision","top_tokens","triggers"}], "skipped": [L]},
     "aggregation": {"n_examples", "active_fraction_mean", "active_fraction_positive_mean",
                     "active_fraction_quantiles": {"q25", "q50", "q75", "q50_ci"},
                     "no_single_memory_match", "match_is_stopword", "match_prefix_short", "n_matches",
                     "residual_matches_final", "residual_prob_of_final",
                     "residual_prob_of_final_quantiles": {"q25", "q50", "q75", "q50_ci"},
                     "ffn_effect": {"residual", "ffn", "agreement", "composition", "residual_ci", ...}: [L],
                     "active_fraction_mean_ci", "active_fraction_positive_mean_ci", "no_single_memory_match_ci",
                     "match_is_stopword_ci", "match_prefix_short_ci", "residual_matches_final_ci",
                     "residual_prob_of_final_ci": [L] of [low, high] | null,
                     "active_threshold", "active_rule": "m>0" | "tau=X",
                     "sweep": {"m>0", "tau=0.05", "tau=0.1", "tau=0.25", "tau=0.5", ...: {
                               "active_fraction_mean", "active_fraction_quantiles": {"q25", "q50", "q75"},
                               "no_single_memory_match", "match_is_stopword", "match_prefix_short",
                               "n_matches", "no_single_memory_match_ci", "match_is_stopword_ci",
                               "match_prefix_short_ci": [L]}},
                     "ffn_change_n", "ffn_change_distant", "ffn_change_distant_ci", "ffn_change_shuffled_distant",
                     "ffn_change_shuffled_distant_ci", "ffn_change_cosine_mean", "ffn_change_cosine_mean_ci",
                     "ffn_change_content_n", "ffn_change_content_distant", "ffn_change_content_distant_ci": [L],
                     "random_pairs", "random_pair_cosine_mean", "random_pair_cosine_mean_ci": [low, high],
                     "random_pair_cosine_q95",
                     "missing": {"ffn_change": reason} (only when §5.2 could not be measured)},
     "causal": {"n_agree", "n_suppress": [L] memories checked, "n_agree_candidates", "n_suppress_candidates": [L],
                "agree_delta", "agree_control_delta", "suppress_delta", "suppress_control_delta": [L] mean deltas
                (nats), "agree_exceeds_control", "suppress_exceeds_control": [L] shares, each of these six with its
                "X_ci", "all_layers": {the same keys as numbers, over every layer}, "memories_per_layer": int,
                "memories": [{"layer", "key", "role": "agree"|"suppress", "position", "target", "coefficient",
                              "strength", "control", "control_strength", "log_p", "delta", "control_delta"}]},
     "patterns_neg", "token_removal_neg", "values_neg", "causal_neg": same shapes as above (signed models only),
     "missing": {experiment: reason}}

In ``aggregation`` the headline Fig 7-8 keys use the rule named by ``active_rule`` (m > 0 for ReLU FFNs,
|m_i| > active_threshold * max_j |m_j| otherwise); ``sweep`` repeats them under every rule, from the same forward
pass. ``*_quantiles`` are over examples (the paper plots medians). ``X_ci`` is X's 95 % interval
(``ffkv.analysis.intervals``): Wilson for shares (null where a share has no examples), percentile bootstrap over
examples for means and for the medians (``q50_ci``); the sweep's entry of the headline rule also carries the
bootstrap intervals (``active_fraction_mean_ci``, ``q50_ci``), the other rules only the Wilson ones. ``ffn_change*``
automate §5.2 with the sentence embedder: among examples where top(lens(r)) != top(lens(r + o)) (``ffn_change_n``
per layer), the share whose two token strings embed less alike than ``random_pair_cosine_q95``, the 95th
percentile of ``random_pairs`` random vocabulary pairs (the paper: 66 of 100 last-layer cases "semantically
distant"), and ``ffn_change_content*`` the same among changes between two content words; without the embedder
these keys are absent and the top-level ``missing`` has ``"aggregation.ffn_change"``. Files written before these
keys existed lack them, and ``ffkv report`` draws what is there.

In ``causal`` a memory face *agrees* when its value's top token (argmax of s * v . E, s = -1 on the negative face)
is the token t after its top-1 trigger, and *suppresses* when its bottom token (argmin) is t; up to
``memories_per_layer`` of each per layer (seeded draw, among those whose top-1 coefficient is finite and non-zero)
are switched off (m = 0) at the trigger's last position only, and ``delta`` = log p_off(t) - log p_clean(t) of the
full model. Each has a *control*: the other memory of its layer with the nearest |m| * ||v|| at that position (ties
drawn with the seed), switched off the same way. ``X_exceeds_control`` is the share with |delta| above the
control's |delta| (Wilson interval); the mean deltas have percentile-bootstrap intervals. ``memories`` lists every
checked memory, from which each per-layer number can be recomputed.

``scan_id`` is the analysed atlas's ``Atlas.scan_id`` (a hash of its manifest.json, so a new scan into the same
folder has another). ``ffkv report`` refuses an analysis.json whose ``scan_id`` differs from the atlas's (rerun
``ffkv analyze ATLAS``); files written before the key existed have none and are still read. ``ffkv analyze
--only X`` keeps the other blocks of an existing analysis.json only when it is of the same scan (same
``scan_id``, or for older files the same recorded atlas summary); otherwise it starts afresh, and ``missing``
says the other experiments were not run on this scan.
"""
