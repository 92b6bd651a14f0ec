"""§5 of the paper: how the memories of a layer are aggregated, and what the FFN does to the residual stream
(Figs 7-11), on held-out prefixes (units the scan did not use).

Each example is a prefix ``tokens[unit.offset : position + 1]`` of a held-out unit (at least one token after
the special prefix). One forward of the model body per batch (right-padded, no attention mask: with causal
attention a position never sees the padding after it) records, at each example's last position and for every
layer l:

* m: the coefficients, the input of the FFN output projection (forward pre-hook);
* o: what the FFN adds to the residual stream (the output of ``parts.ffn_added(l)``);
* h: the block's output; the residual *before* the FFN is r = h - o (sequential and parallel blocks alike).

The model's prediction is the logit lens of the last block's output (final norm, then E), which is exactly
the model's own logits. Per layer:

* Fig 7 active memories: |m_i| > tau * max_j |m_j|, tau = 0 for ReLU FFNs (i.e. m_i > 0, the paper's rule)
  and ``active_threshold`` (default 0.1) for smooth activations, where almost every m_i is non-zero; the
  share with m_i > 0 is reported too (about one half for SiLU-gated FFNs, so it says little there).
* Fig 8 composition: the layer's own prediction is argmax((sum_i m_i v_i) . E), the raw projection (no final
  norm, no output bias) as in the paper; a memory's prediction is sign-aware, argmax(sign(m_i) v_i . E). The
  share of examples where no active memory predicts the layer's token; where one does, the share of those
  whose token is an English stop word and whose prefix has at most 5 tokens.
* Figs 9-10: whether the logit lens of r already gives the final prediction, and the probability it gives it.
* Fig 11: with a = top(lens(r)), b = top(lens(o)), c = top(lens(r + o)) = top(lens(h)): residual (c = a != b),
  ffn (c = b != a), agreement (a = b = c), composition (c != a and c != b); the four sum to 1.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atlas import Atlas
from ..errors import FfkvError

SHORT_PREFIX = 5
"""Prefixes of at most this many tokens (special prefix excluded) count as short (the paper's 43 %)."""

# A small fixed list of English function words (lower case); a token counts as a stop word when its decoded
# text, stripped and lower-cased, is in it.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves
""".split())

EFFECTS = ("residual", "ffn", "agreement", "composition")

DEFINITIONS = {
    "examples": "prefixes of units the scan did not use (held out), sampled with a seed: one random prefix end "
                "per unit (several when there are fewer units than examples); the model's prediction at the "
                "last position is the logit lens of the last block's output, i.e. the model's own logits.",
    "active": "a memory is active at an example when |m_i| > tau * max_j |m_j| over its layer: tau = 0 for ReLU "
              "FFNs (m_i > 0, the paper's rule), tau = the active threshold (default 0.1) for smooth "
              "activations; 'active_fraction_positive_mean' is the share with m_i > 0.",
    "no_single_memory_match": "share of examples where the layer's top token, argmax((sum_i m_i v_i) . E) (raw, "
                              "no final norm, no output bias), is the sign-aware top token argmax(sign(m_i) "
                              "v_i . E) of no active memory.",
    "match_is_stopword": "among examples where some active memory predicts the layer's top token, the share "
                         "whose token is an English stop word (a fixed list).",
    "match_prefix_short": f"among those examples, the share whose prefix has at most {SHORT_PREFIX} tokens.",
    "residual_matches_final": "share of examples where the logit lens of the residual before the FFN (r = block "
                              "output - FFN output) has the model's final top token as its top token.",
    "residual_prob_of_final": "mean probability that softmax(logit lens of r) gives the model's final top token.",
    "ffn_effect": "with a = top(lens(r)), b = top(lens(o)) for the FFN output o, c = top(lens(r + o)): residual "
                  "c = a != b; ffn c = b != a; agreement a = b = c; composition c != a and c != b.",
}


def held_out_units(atlas: Atlas) -> np.ndarray:
    """Units of the atlas's token store that the scan did not use and that have a token after the special
    prefix (sorted)."""
    store = atlas.store
    scanned = np.load(atlas.path / "scanned_units.npy")
    held = np.setdiff1d(np.arange(store.n_units), scanned)
    return held[store.length[held] > store.n_special[held]]


def sample_prefixes(atlas: Atlas, n_examples: int = 4000, seed: int = 0) -> np.ndarray:
    """Global end positions of ``n_examples`` held-out prefixes (seeded): one random end per unit of a random
    sample of held-out units, or, with fewer held-out units than examples, a random sample of all their
    prefix ends (several per unit). Raises FfkvError when there are no held-out units or too few prefixes."""
    if n_examples < 1:
        raise FfkvError("the number of examples must be positive")
    store = atlas.store
    held = held_out_units(atlas)
    if len(held) == 0:
        raise FfkvError(f"atlas {atlas.path} has no held-out units: its scan covered the whole corpus, so the "
                        "aggregation experiment (§5) has no unseen prefixes; scan with --max-tokens to leave "
                        "part of the corpus out")
    first = store.offset[held] + store.n_special[held]  # first scorable position of each unit
    count = store.length[held] - store.n_special[held]
    rng = np.random.default_rng(seed)
    if len(held) >= n_examples:
        pick = rng.choice(len(held), size=n_examples, replace=False)
        return first[pick] + rng.integers(0, count[pick])
    available = int(count.sum())
    if n_examples > available:
        raise FfkvError(f"asked for {n_examples} examples but the {len(held)} held-out units of atlas "
                        f"{atlas.path} have only {available} prefixes; ask for fewer examples or leave more of "
                        "the corpus out of the scan (--max-tokens)")
    flat = rng.choice(available, size=n_examples, replace=False)
    unit_idx = np.searchsorted(np.cumsum(count), flat, side="right")
    within = flat - (np.cumsum(count) - count)[unit_idx]
    return first[unit_idx] + within


def _batches(lengths: np.ndarray, batch_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Example indices grouped by similar length, each batch at most ``batch_tokens`` padded tokens."""
    order = np.argsort(lengths, kind="stable")
    batches, current = [], []
    for i in order:
        longest = int(lengths[i])
        if current and ((len(current) + 1) * longest > batch_tokens or len(current) >= max_batch):
            batches.append(np.array(current))
            current = []
        current.append(int(i))
    if current:
        batches.append(np.array(current))
    return batches


class LastPositionCapture:
    """Hooks that record, for every layer, m (input of the FFN output projection), o (output of the module
    whose output the FFN adds to the residual) and h (block output) at one position per row. A context
    manager: the hooks are always removed."""

    def __init__(self, model):
        self.parts = model.parts
        self.flat_index: torch.Tensor | None = None
        self.m: dict[int, torch.Tensor] = {}
        self.o: dict[int, torch.Tensor] = {}
        self.h: dict[int, torch.Tensor] = {}
        self.handles = []

    def _pick(self, x: torch.Tensor) -> torch.Tensor:
        # OPT hands its FFN a flattened [B * T, .]; others [B, T, .]: flat row b * T + t either way
        return x.reshape(-1, x.shape[-1]).index_select(0, self.flat_index)

    def __enter__(self):
        parts = self.parts
        try:
            for layer in range(parts.n_layers):
                self.handles.append(parts.ffn_out(layer).register_forward_pre_hook(
                    lambda _mod, args, layer=layer: self.m.__setitem__(layer, self._pick(args[0]))))
                self.handles.append(parts.ffn_added(layer).register_forward_hook(
                    lambda _mod, _args, out, layer=layer: self.o.__setitem__(layer, self._pick(out))))
                self.handles.append(parts.blocks[layer].register_forward_hook(
                    lambda _mod, _args, out, layer=layer: self.h.__setitem__(
                        layer, self._pick(out[0] if isinstance(out, tuple) else out))))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """Forward the body on right-padded ``input_ids`` [B, T]; record row b at position lengths[b] - 1."""
        width = input_ids.shape[1]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        self.flat_index = rows * width + (lengths.to(input_ids.device) - 1)
        self.m.clear()
        self.o.clear()
        self.h.clear()
        self.parts.body(input_ids=input_ids, use_cache=False)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.inference_mode()
def capture_last_positions(model, sequences: list[list[int]]) -> dict:
    """Run right-padded ``sequences`` as one batch; per layer l: ``m[l]`` [B, d_ff], ``o[l]``, ``h[l]``,
    ``r[l]`` = h - o [B, d], and ``final_logits`` [B, vocab] (the logit lens of the last block's output),
    all at each sequence's last position. For notebooks and tests; the experiment streams instead."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s)
    with LastPositionCapture(model) as cap:
        cap.run(ids.to(model.device), lengths)
        out = {"m": dict(cap.m), "o": dict(cap.o), "h": dict(cap.h)}
    out["r"] = {layer: out["h"][layer] - out["o"][layer] for layer in out["h"]}
    last = out["h"][model.parts.n_layers - 1]
    wd = _work_dtype(last.dtype)
    out["final_logits"] = model.parts.final_norm(last).to(wd) @ model.parts.unembedding.detach().to(wd).T
    return out


@torch.inference_mode()
def memory_predictions(atlas: Atlas, model, layer: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each memory's own top token when it adds +v_i (argmax v_i.E) and when it adds -v_i (argmin): from the
    atlas where the layer was scanned, else computed (chunked)."""
    if layer in atlas.layers:
        t = atlas.layer_tensors(layer)
        return t["value_raw_pos_ids"][:, 0].long(), t["value_raw_neg_ids"][:, 0].long()
    values = model.parts.values(layer).detach()
    wd = _work_dtype(values.dtype)
    values, unembed = values.to(wd), model.parts.unembedding.detach().to(wd)
    pos, neg = [], []
    for start in range(0, values.shape[0], chunk):
        logits = values[start: start + chunk] @ unembed.T
        pos.append(logits.argmax(dim=1).cpu())
        neg.append(logits.argmin(dim=1).cpu())
    return torch.cat(pos), torch.cat(neg)


def _is_stop_word(text: str) -> bool:
    return text.strip().lower() in STOP_WORDS


def aggregation_experiment(atlas: Atlas, model, n_examples: int = 4000, *, active_threshold: float = 0.1,
                           seed: int = 0, batch_tokens: int = 2048, max_batch: int = 64,
                           progress: bool = True) -> dict:
    """The ``aggregation`` block of ``analysis.json`` (every per-layer array has length ``n_layers``).

    ``active_threshold`` is tau for smooth activations (ReLU FFNs always use m > 0); ``batch_tokens`` and
    ``max_batch`` bound each forward batch (padded tokens, rows)."""
    if not 0.0 <= active_threshold < 1.0:
        raise FfkvError("the active threshold must be in [0, 1)")
    parts = model.parts
    store = atlas.store
    n_layers = parts.n_layers
    if atlas.n_layers != n_layers:
        raise FfkvError(f"atlas {atlas.path} has {atlas.n_layers} layers, the model {n_layers}")
    tau = active_threshold if parts.signed else 0.0
    positions = sample_prefixes(atlas, n_examples, seed)
    units = store.unit_of(positions)
    starts = store.offset[units]
    lengths = positions - starts + 1  # model input length (special prefix included)
    n_text = positions - starts - store.n_special[units] + 1  # prefix length without the special prefix

    device = model.device
    wd = _work_dtype(parts.unembedding.dtype)
    unembed_t = parts.unembedding.detach().to(wd).T  # [d, vocab]
    values = {layer: parts.values(layer).detach().to(wd) for layer in range(n_layers)}
    preds = {}
    for layer in range(n_layers):
        pos, neg = memory_predictions(atlas, model, layer)
        preds[layer] = (pos.to(device), neg.to(device))
    decoded: dict[int, bool] = {}

    def stop_word(token: int) -> bool:
        if token not in decoded:
            decoded[token] = _is_stop_word(atlas.decode([token]))
        return decoded[token]

    def lens(x: torch.Tensor) -> torch.Tensor:
        return parts.final_norm(x).to(wd) @ unembed_t

    acc = {name: np.zeros(n_layers) for name in (
        "active", "positive", "no_match", "match", "match_stop", "match_short", "res_final", "res_prob")}
    effects = np.zeros((n_layers, len(EFFECTS)))
    batches = _batches(lengths, batch_tokens, max_batch)
    bar = tqdm(total=len(positions), desc=f"aggregation ({len(positions)} held-out prefixes)", unit="ex",
               disable=not progress, dynamic_ncols=True)
    try:
        with LastPositionCapture(model) as cap, torch.inference_mode():
            for batch in batches:
                blen = lengths[batch]
                ids = np.zeros((len(batch), int(blen.max())), dtype=np.int64)
                for row, i in enumerate(batch):
                    ids[row, : blen[row]] = store.tokens[starts[i]: positions[i] + 1]
                cap.run(torch.from_numpy(ids).to(device), torch.from_numpy(blen))
                short = torch.from_numpy(n_text[batch] <= SHORT_PREFIX).to(device)
                final_top = lens(cap.h[n_layers - 1]).argmax(dim=1)
                for layer in range(n_layers):
                    m, o, h = cap.m[layer], cap.o[layer], cap.h[layer]
                    r = h - o
                    # Fig 7
                    mag = m.abs()
                    active = mag > tau * mag.amax(dim=1, keepdim=True)
                    acc["active"][layer] += active.to(wd).mean(dim=1).sum().item()
                    acc["positive"][layer] += (m > 0).to(wd).mean(dim=1).sum().item()
                    # Fig 8: the layer's raw prediction vs. each active memory's own (sign-aware) prediction
                    mw = m.to(wd)
                    layer_top = ((mw @ values[layer]) @ unembed_t).argmax(dim=1)
                    pos_pred, neg_pred = preds[layer]
                    own = torch.where(mw > 0, pos_pred[None, :], neg_pred[None, :])
                    matched = (active & (own == layer_top[:, None])).any(dim=1)
                    n_match = int(matched.sum())
                    acc["no_match"][layer] += len(batch) - n_match
                    acc["match"][layer] += n_match
                    if n_match:
                        acc["match_short"][layer] += int((matched & short).sum())
                        acc["match_stop"][layer] += sum(stop_word(int(t)) for t in layer_top[matched].tolist())
                    # Figs 9-11
                    lr = lens(r)
                    a = lr.argmax(dim=1)
                    b = lens(o).argmax(dim=1)
                    c = lens(h).argmax(dim=1)
                    acc["res_final"][layer] += int((a == final_top).sum())
                    logp = lr.gather(1, final_top[:, None])[:, 0] - torch.logsumexp(lr, dim=1)
                    acc["res_prob"][layer] += logp.exp().sum().item()
                    kinds = torch.stack([(c == a) & (a != b), (c == b) & (b != a), (a == b) & (b == c),
                                         (c != a) & (c != b)], dim=1)
                    effects[layer] += kinds.sum(dim=0).cpu().numpy()
                bar.update(len(batch))
    finally:
        bar.close()

    n = len(positions)

    def share(num: np.ndarray, den) -> list:
        den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
        return [float(x / d) if d > 0 else None for x, d in zip(num, den)]

    return {
        "n_examples": n,
        "active_fraction_mean": share(acc["active"], n),
        "active_fraction_positive_mean": share(acc["positive"], n),
        "no_single_memory_match": share(acc["no_match"], n),
        "match_is_stopword": share(acc["match_stop"], acc["match"]),
        "match_prefix_short": share(acc["match_short"], acc["match"]),
        "n_matches": [int(x) for x in acc["match"]],
        "residual_matches_final": share(acc["res_final"], n),
        "residual_prob_of_final": share(acc["res_prob"], n),
        "ffn_effect": {name: share(effects[:, j], n) for j, name in enumerate(EFFECTS)},
        "active_threshold": tau,
        "held_out_units": int(len(held_out_units(atlas))),
        "units_used": int(len(np.unique(units))),
        "mean_prefix_tokens": float(np.mean(n_text)),
        "seed": seed,
        "definitions": dict(DEFINITIONS),
    }
