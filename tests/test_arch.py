"""The architecture table: every supported family's coefficients, values, unembedding and final norm,
checked against recomputations from the weights on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import D_FF, HIDDEN, N_LAYERS, UNSUPPORTED, build_tiny_model, tiny_config
from helpers import ACTIVATIONS, activation_name, capture_coefficients, linear, randomise_norm_gains

import ffkv
from ffkv.arch import ARCHITECTURES, ModelParts, get_path
from ffkv.capture import Capture
from ffkv.errors import FfkvError
from ffkv.projection import logit_lens

ARCHS = sorted(ARCHITECTURES)


def _random_ids(n_rows: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 300, (n_rows, length), generator=g)


def test_every_architecture_has_a_tiny_test_model():
    for arch in ARCHS:
        assert tiny_config(arch).model_type == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_table_match_the_model(arch, tiny_model):
    loaded = tiny_model(arch)
    parts = loaded.parts
    cfg = loaded.model.config
    assert loaded.model.dtype == torch.float64
    assert not loaded.model.training
    assert parts.n_layers == N_LAYERS
    assert (parts.d_ff, parts.d_model) == (D_FF, HIDDEN)
    for layer in range(parts.n_layers):
        assert tuple(parts.values(layer).shape) == (D_FF, HIDDEN)
    # the activation the table reports is the one the config uses; gated <=> two input projections
    assert parts.spec.activation == activation_name(cfg)
    assert parts.spec.gated == (len(parts.spec.ffn_in) == 2)
    assert parts.signed == (activation_name(cfg) != "relu")
    # the unembedding is the model's output embedding
    assert parts.unembedding is loaded.model.get_output_embeddings().weight
    assert tuple(parts.unembedding.shape) == (cfg.vocab_size, HIDDEN)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_coefficients_equal_recomputation_from_weights(arch, tiny_model):
    """(a) m = act(k.x) (or act(g.x) * (u.x)) from the FFN's input, with the activation applied here."""
    loaded = tiny_model(arch)
    parts = loaded.parts
    act = ACTIVATIONS[activation_name(loaded.model.config)]
    layers = list(range(parts.n_layers))
    ids = _random_ids()

    ffn_inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        first_in = get_path(parts.blocks[layer], parts.spec.ffn_in[0])
        handles.append(first_in.register_forward_pre_hook(
            lambda _m, args, layer=layer: ffn_inputs[layer].append(args[0].detach().clone())))

    class Recorder:  # stands in for a scan's LayerState
        def __init__(self):
            self.seen = []

        def add(self, coefficients, positions):
            self.seen.append((coefficients.clone(), positions.clone()))

    recorders = {layer: Recorder() for layer in layers}
    positions = torch.arange(ids.numel())
    try:
        def stream(layer, m):  # what the scan hands to its accumulators
            recorders[layer].add(m.to(torch.float32), positions)

        with capture_coefficients(parts, layers) as raw, Capture(parts, layers, on_coefficients=stream) as hooks, \
                torch.inference_mode():
            hooks.run(ids, None)
    finally:
        for h in handles:
            h.remove()

    for layer in layers:
        x = ffn_inputs[layer][0]
        block = parts.blocks[layer]
        if parts.spec.gated:
            gate, up = (get_path(block, p) for p in parts.spec.ffn_in)
            expected = act(linear(gate, x)) * linear(up, x)
        else:
            expected = act(linear(get_path(block, parts.spec.ffn_in[0]), x))
        got = raw[layer][0]
        assert got.shape[-1] == D_FF and got.numel() == ids.numel() * D_FF  # OPT flattens [B, T] first
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        # what the scan's hook hands to the accumulators: flattened [positions, d_ff] float32
        ((coefficients, pos),) = recorders[layer].seen
        assert coefficients.dtype == torch.float32
        assert torch.equal(pos, positions)
        torch.testing.assert_close(coefficients, expected.reshape(-1, D_FF).float(), rtol=1e-6, atol=1e-7)
        if not parts.signed:
            assert (got >= 0).all()
        else:
            assert (got < 0).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_ffn_output_is_sum_of_coefficient_weighted_values(arch, tiny_model):
    """(b) sum_i m_i v_i (+ bias) equals the output projection's output."""
    loaded = tiny_model(arch)
    parts = loaded.parts
    seen = {}
    handles = [parts.ffn_out(layer).register_forward_hook(
        lambda _m, args, out, layer=layer: seen.__setitem__(layer, (args[0].detach(), out.detach())))
        for layer in range(parts.n_layers)]
    try:
        with torch.inference_mode():
            loaded.model(input_ids=_random_ids(seed=1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(parts.n_layers))
    for layer, (m, out) in seen.items():
        with torch.inference_mode():
            v = parts.values(layer)
            bias = parts.ffn_out_bias(layer)
            recomposed = sum(m[..., i, None] * v[i] for i in range(D_FF)) + (0 if bias is None else bias)
            torch.testing.assert_close(recomposed, out, rtol=1e-10, atol=1e-12)
            # memory by memory: v_i is what unit i adds per unit of coefficient
            i = int(m.reshape(-1, D_FF)[-1].abs().argmax())
            m_one = torch.zeros_like(m)
            m_one[..., i] = m[..., i]
            single = parts.ffn_out(layer)(m_one)
            expected = m[..., i, None] * v[i] + (0 if bias is None else bias)
            torch.testing.assert_close(single, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_values_as_added_rebuild_what_the_ffn_adds_to_the_residual(arch):
    """sum_i m_i a_i (a_i = ``as_added`` of v_i) times the example's shared scale (+ the output bias) is exactly
    what the layer adds to the residual stream; the scale is 1 and a_i = v_i but after a post-FFN norm."""
    model = build_tiny_model(arch, seed=5).to(torch.float64)
    randomise_norm_gains(model, seed=6)
    parts = ModelParts(model)
    seen = {}
    handles = []
    for layer in range(parts.n_layers):
        handles.append(parts.ffn_out(layer).register_forward_hook(
            lambda _m, args, out, layer=layer: seen.__setitem__((layer, "m"), (args[0].detach(), out.detach()))))
        handles.append(parts.ffn_added(layer).register_forward_hook(
            lambda _m, args, out, layer=layer: seen.__setitem__((layer, "added"), out.detach())))
    try:
        with torch.inference_mode():
            model(input_ids=_random_ids(seed=7), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    post_norm = parts.spec.post_ffn_norm is not None
    assert post_norm == (arch == "gemma3_text")
    for layer in range(parts.n_layers):
        (m, y), added = seen[(layer, "m")], seen[(layer, "added")]
        with torch.inference_mode():
            a = parts.added_values(layer)
            bias = parts.ffn_out_bias(layer)
            scale = parts.added_scale(layer, y)
            rebuilt = scale * (m @ a) + (0 if bias is None else bias)
        assert tuple(a.shape) == (D_FF, HIDDEN)
        assert (scale > 0).all()
        if not post_norm:
            assert torch.equal(a, parts.values(layer)) and (scale == 1).all()
            torch.testing.assert_close(rebuilt, added, rtol=1e-10, atol=1e-12)
            continue
        assert bias is None  # a bias before the norm would be scaled with the memories; no such model here
        # Gemma's RMSNorm computes in float32, hence the tolerance; the scale is 1 / rms(y), one per example
        torch.testing.assert_close(rebuilt, added, rtol=1e-6, atol=1e-6)
        rms = y.pow(2).mean(-1, keepdim=True).sqrt()
        torch.testing.assert_close(scale, 1 / rms, rtol=1e-5, atol=0)
        # the raw values, with the best shared scale per example, do not rebuild it: the gain matters
        raw = m @ parts.values(layer).detach()
        best = (raw * added).sum(-1, keepdim=True) / (raw * raw).sum(-1, keepdim=True)
        assert (best * raw - added).abs().max() > 1e-2 * added.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_final_norm_and_logit_lens(arch):
    """logit_lens reproduces the model's logits from the final norm's input, and through_final_norm is the
    direction the final norm maps a vector to (up to a positive per-row scale and the norm's bias)."""
    model = build_tiny_model(arch, seed=3).to(torch.float64)
    parts = ModelParts(model)
    norm = parts.final_norm
    with torch.no_grad():  # a non-trivial gain (Gemma's is stored as gain - 1), so the norm kind matters
        g = torch.Generator().manual_seed(4)
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g, dtype=torch.float64) + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=torch.float64))
    captured = {}
    h = norm.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))
    try:
        with torch.inference_mode():
            logits = model(input_ids=_random_ids(seed=2), use_cache=False).logits
    finally:
        h.remove()
    x = captured["x"]
    with torch.inference_mode():
        torch.testing.assert_close(logit_lens(parts, x), logits, rtol=1e-9, atol=1e-9)
        normed = norm(x)
        bias = getattr(norm, "bias", None)
        if bias is not None:
            normed = normed - bias
        direction = parts.through_final_norm(x)
    scale = (normed * direction).sum(-1) / (direction * direction).sum(-1)
    assert (scale > 0).all()
    # RMSNorms compute in float32 internally, hence the tolerance (a wrong norm kind is off by O(1))
    torch.testing.assert_close(direction * scale[..., None], normed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_architecture_is_refused_with_the_supported_list(model_type, unsupported_model_dir):
    with pytest.raises(FfkvError) as info:
        ffkv.load_model(str(unsupported_model_dir(model_type)))
    message = str(info.value)
    assert model_type in message
    for arch in ARCHS:
        assert arch in message
    assert "\n" not in message


def test_opt_with_embedding_projection_is_refused():
    import transformers as T

    cfg = T.OPTConfig(num_hidden_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_dim=D_FF, vocab_size=64,
                      word_embed_proj_dim=16, max_position_embeddings=64)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(FfkvError, match="project_in"):
        ModelParts(model)
