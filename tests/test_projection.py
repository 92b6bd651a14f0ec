"""The one projection module: top tokens over vocabulary chunks equal those of the whole product; the atlas's
value lists equal a brute-force recomputation from the weights."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from ffkv.arch import ModelParts
from ffkv.projection import face_top_tokens, project_values, top_both_faces, value_extremes, value_logits


@pytest.mark.parametrize("vocab_chunk", [1, 97, 128, 1000, 65536])
def test_vocabulary_chunks_give_the_top_of_the_whole_product(vocab_chunk):
    g = torch.Generator().manual_seed(0)
    vectors, e = torch.randn(7, 16, generator=g, dtype=torch.float64), torch.randn(1000, 16, generator=g,
                                                                                  dtype=torch.float64)
    got = top_both_faces(vectors, e, 20, vocab_chunk=vocab_chunk)
    full = vectors @ e.T
    for face, logits in (("pos", full), ("neg", -full)):
        want = logits.topk(20, dim=1)
        assert torch.equal(got[face][0], want.indices)  # values: same up to the rounding of a smaller product
        torch.testing.assert_close(got[face][1], want.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_value_lists_equal_brute_force(arch):
    model = build_tiny_model(arch)
    parts = ModelParts(model)
    layer, n = parts.n_layers - 1, 5
    with torch.inference_mode():
        values = parts.values(layer).detach().double()
        e = model.get_output_embeddings().weight.detach().double()
        raw = values @ e.T
        normed = parts.through_final_norm(values) @ e.T
    stored = project_values(parts, layer, n, chunk=3)  # chunks that do not divide d_ff
    for kind, logits in (("raw", raw), ("normed", normed)):
        for face, signed in (("pos", logits), ("neg", -logits)):
            want = signed.topk(n, dim=1)
            assert torch.equal(stored[f"value_{kind}_{face}_ids"].long(), want.indices)
            torch.testing.assert_close(stored[f"value_{kind}_{face}_logits"].double(), want.values, rtol=1e-5,
                                       atol=1e-6)
    ids, _ = face_top_tokens(parts, layer, [2, 0], "neg", n)
    assert torch.equal(ids, (-raw[[2, 0]]).topk(n, dim=1).indices)
    pos, neg = value_extremes(parts, layer, chunk=5)
    assert torch.equal(pos, raw.argmax(dim=1)) and torch.equal(neg, raw.argmin(dim=1))
    chunks = list(value_logits(parts, layer, chunk=4))
    assert [s for s, _ in chunks] == list(range(0, parts.d_ff, 4))
    torch.testing.assert_close(torch.cat([c for _, c in chunks]).double(), raw)
