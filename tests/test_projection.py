"""The one projection module: top tokens over vocabulary chunks, and those of the block screen, equal those of the
whole product; the atlas's value lists equal a brute-force recomputation from the weights."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from helpers import randomise_norm_gains

from ffkv.arch import ModelParts
from ffkv.projection import (
    PRODUCT_LOGITS,
    ProductBuffer,
    _faces_top,
    face_top_tokens,
    product_rows,
    project_values,
    top_both_faces,
    value_extremes,
    value_logits,
)


def _reference_top_both_faces(vectors, e, n):
    """The whole product's topk of v.E and of -(v.E): what the screened top lists must equal byte for byte."""
    logits = vectors @ e.T
    n = min(n, e.shape[0])
    return {face: tuple(signed.topk(n, dim=1)[::-1]) for face, signed in (("pos", logits), ("neg", -logits))}


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
    randomise_norm_gains(model, seed=1)  # Gemma 3's post-FFN norm scales every value by its gain
    parts = ModelParts(model)
    layer, n = parts.n_layers - 1, 5
    with torch.inference_mode():
        values = parts.values(layer).detach().double()
        if arch == "gemma3_text":
            values = values * (1 + parts.blocks[layer].post_feedforward_layernorm.weight.detach().double())
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("vocab", "n"), [(5000, 20), (4099, 7), (3000, 1), (1500, 30), (300, 20)])
def test_screened_top_lists_equal_the_whole_products_byte_for_byte(dtype, vocab, n):
    """The block screen returns the whole row's topk exactly: ids, logits and order, also with ties (duplicate
    rows of E, +0.0 and -0.0), NaN and infinities, a ragged last block and vocabularies too small to screen."""
    g = torch.Generator().manual_seed(vocab + n)
    vectors, e = torch.randn(40, 16, generator=g, dtype=dtype), torch.randn(vocab, 16, generator=g, dtype=dtype)
    best = (vectors[0] @ e.T).topk(3).indices
    e[-1] = e[best[0]]  # a tie at the top of row 0 (a duplicate token embedding), in the ragged last block
    e[-2] = e[(vectors[0] @ e.T).topk(n + 1).indices[-1]]  # a tie just below the cut
    vectors[1] = 0.0  # every logit +0.0: all tied
    vectors[2, 0] = float("nan")  # every logit NaN
    vectors[3, 1] = float("inf")  # +-inf, and NaN in column 5
    e[5, :] = 0.0  # column 5: +0.0 or -0.0 logits
    vectors[4] = -vectors[5]
    got = top_both_faces(vectors, e, n)
    want = _reference_top_both_faces(vectors, e, n)
    for face in ("pos", "neg"):
        for a, b in zip(got[face], want[face], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), face


@pytest.mark.parametrize("n", [1, 5, 20])
def test_screened_top_lists_of_crafted_logits(n):
    """Rows with one NaN, infinities, ties inside and across blocks: each face equals the whole row's topk."""
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(12, 3000, generator=g)
    logits[0, 2999] = float("nan")  # one NaN, in the ragged tail
    logits[1, 17] = float("nan")  # one NaN inside a block
    logits[2, [3, 900]] = float("inf")  # two tied +inf; and -inf below
    logits[2, [4, 1900]] = float("-inf")
    logits[3, [10, 11]] = 9.0  # a tie inside one block at the top; and at the bottom
    logits[3, [12, 13]] = -9.0
    logits[4, :] = logits[4, :1500].repeat(2)  # every value twice, in other blocks
    logits[5, [100, 2000]] = torch.tensor([0.0, -0.0])  # +0.0 and -0.0 at the top
    logits[5, 2500:] = -5.0
    logits[6] = logits[6].abs()  # no negative logits; the bottom is near 0
    logits[7] = torch.arange(3000.0).flip(0)  # sorted rows: the best block first, or last
    logits[8] = torch.arange(3000.0)
    logits[9, :] = 1.0  # one value throughout
    got = _faces_top(logits, n)
    for face, signed in (("pos", logits), ("neg", -logits)):
        want = signed.topk(n, dim=1)
        for a, b in zip(got[face], (want.indices, want.values), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), face


def test_product_rows_split_a_layer_evenly_within_the_memory_cap():
    cpu = torch.device("cpu")
    assert product_rows(1536, 49152, cpu) == 1536  # the default model: one product per layer and projection
    rows = product_rows(11008, 32000, cpu)
    assert rows * 32000 <= PRODUCT_LOGITS and -(-11008 // rows) == -(-11008 * 32000 // PRODUCT_LOGITS)
    assert product_rows(6912, 262144, cpu) * 65536 <= PRODUCT_LOGITS  # per vocabulary chunk
    assert product_rows(64, 100, cpu) == 64 and product_rows(0, 100, cpu) == 1
    assert product_rows(1536, 49152, torch.device("meta")) == 256  # off the CPU: the chunk the atlas always used


def test_a_reused_product_buffer_changes_no_result():
    """Products of several sizes through one buffer (growing, shrinking, a ragged last vocabulary chunk) give the
    lists of fresh products, and no returned list is a view of the buffer (a later product leaves it unchanged)."""
    g = torch.Generator().manual_seed(11)
    e = torch.randn(1000, 16, generator=g)
    buffer = ProductBuffer()
    kept = []
    for rows, chunk in ((3, 300), (40, 1000), (7, 128), (40, 97)):
        vectors = torch.randn(rows, 16, generator=g)
        got = top_both_faces(vectors, e, 9, vocab_chunk=chunk, buffer=buffer)
        want = top_both_faces(vectors, e, 9, vocab_chunk=chunk)
        for face in ("pos", "neg"):
            assert torch.equal(got[face][0], want[face][0]) and torch.equal(got[face][1], want[face][1])
        kept.append((got, {f: tuple(t.clone() for t in got[f]) for f in got}))
    for got, copy in kept:
        for face in ("pos", "neg"):
            assert torch.equal(got[face][0], copy[face][0]) and torch.equal(got[face][1], copy[face][1])
