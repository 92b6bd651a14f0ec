"""Gemma 3 specifics on a tiny random Gemma 3 with non-trivial norm gains: the post-FFN norm's gain in every use of
a value (debugger contributions), logit soft-capping in the logit lens."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from helpers import randomise_norm_gains

from ffkv.arch import ModelParts
from ffkv.projection import ResidualLens, logit_lens
from ffkv.server import debugger

ARCH = "gemma3_text"


def _tiny_gemma(seed: int = 0, **config) -> tuple[torch.nn.Module, ModelParts]:
    model = build_tiny_model(ARCH, seed=seed).to(torch.float64)
    for name, value in config.items():
        setattr(model.config, name, value)
    randomise_norm_gains(model, seed=seed + 1)
    return model, ModelParts(model)


def _ids(seed: int, length: int = 11) -> torch.Tensor:
    return torch.randint(2, 300, (1, length), generator=torch.Generator().manual_seed(seed))


def test_debugger_contribution_is_the_norm_of_what_a_memory_adds_to_the_residual():
    """Per layer, the listed memories are the top |m_i| * ||gain * v_i|| * s, and each contribution is the norm of
    m_i * (gain * v_i) * s, where s = ||o|| / ||m @ (gain * V)|| is read off the post-FFN norm's own output o."""
    model, parts = _tiny_gemma()
    ids = _ids(1)
    seen = {}
    handles = []
    for layer in range(parts.n_layers):
        handles.append(parts.ffn_out(layer).register_forward_pre_hook(
            lambda _m, args, layer=layer: seen.__setitem__((layer, "m"), args[0][0, -1].detach().clone())))
        handles.append(parts.blocks[layer].post_feedforward_layernorm.register_forward_hook(
            lambda _m, args, out, layer=layer: seen.__setitem__((layer, "o"), out[0, -1].detach().clone())))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    norms = debugger.added_value_norms(parts)
    top = 6
    doc = debugger.run_prompt(model, parts, ids, [], top, norms, [f"t{i}" for i in range(320)],
                              lambda layer, key, c: {})
    for layer_doc in doc["layers"]:
        layer = layer_doc["layer"]
        m, o = seen[(layer, "m")], seen[(layer, "o")]
        gain = 1 + parts.blocks[layer].post_feedforward_layernorm.weight.detach()
        added = parts.values(layer).detach() * gain  # row i: gain * v_i
        s = o.norm() / (m @ added).norm()
        torch.testing.assert_close(s * (m @ added), o, rtol=1e-6, atol=1e-6)  # o is s times the sum
        want = (m.abs() * added.norm(dim=1) * s).float()
        ranked = want.topk(top)
        got = layer_doc["top_memories"]
        assert [x["key"] for x in got] == ranked.indices.tolist()
        assert [x["contribution"] for x in got] == pytest.approx(ranked.values.tolist(), rel=1e-5)
        # the raw ||v_i|| would rank the memories otherwise somewhere: the gain is not a detail
    raw_rank = {layer: (seen[(layer, "m")].abs() * parts.values(layer).detach().norm(dim=1)).topk(top).indices
                for layer in range(parts.n_layers)}
    assert any(raw_rank[d["layer"]].tolist() != [x["key"] for x in d["top_memories"]] for d in doc["layers"])


@pytest.mark.parametrize("cap", [None, 3.0])
def test_logit_lens_applies_the_models_soft_cap(cap):
    """With final_logit_softcapping set, the model's logits are cap * tanh(z / cap): the logit lens of the final
    norm's input, and the split lens, reproduce them."""
    model, parts = _tiny_gemma(seed=2, final_logit_softcapping=cap)
    assert parts.logit_softcap == cap
    captured = {}
    h = parts.final_norm.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))
    try:
        with torch.inference_mode():
            logits = model(input_ids=_ids(3), use_cache=False).logits[0]
    finally:
        h.remove()
    x = captured["x"][0]
    if cap is not None:
        with torch.inference_mode():
            uncapped = parts.final_norm(x) @ parts.unembedding.T
        assert logits.abs().max() < cap and (uncapped - logits).abs().max() > 1e-3
    with torch.inference_mode():
        torch.testing.assert_close(logit_lens(parts, x), logits, rtol=1e-9, atol=1e-9)
        lens = ResidualLens(parts, torch.float64)
        torch.testing.assert_close(lens.full(x), logits, rtol=1e-9, atol=1e-9)
        t, k = lens.split(x)
        projected = t @ lens.unembed_t
        torch.testing.assert_close(lens.logits(projected, k), logits, rtol=1e-6, atol=1e-6)
        assert torch.equal(lens.top(projected, k), logits.argmax(dim=1))
