"""One checkpoint, any load dtype: a scan in bfloat16 or float16 is analysed and served by a float32 load of the
same weights, and another checkpoint (or a slightly changed one) is still refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, train_tokenizer

import ffkv
from ffkv.cli import main
from ffkv.errors import FfkvError
from ffkv.models import same_weights

DTYPES = ("float32", "bfloat16", "float16", "float64")


@pytest.fixture(scope="module")
def float32_checkpoint(tmp_path_factory):
    """A float32 checkpoint whose values bfloat16 does not hold exactly (the case that broke the old check)."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    build_tiny_model("llama", seed=3).to(torch.float32).save_pretrained(path)
    train_tokenizer(bos=True).save_pretrained(path)
    return path


def test_the_fingerprint_and_sample_agree_across_load_dtypes(float32_checkpoint):
    loaded = {d: ffkv.load_model(str(float32_checkpoint), dtype=d) for d in DTYPES}
    assert len({m.fingerprint() for m in loaded.values()}) == 1
    ref = loaded["float32"].weights_sample()
    assert len(ref) >= 512
    assert not all(torch.tensor(ref, dtype=torch.bfloat16).float().tolist()[i] == ref[i] for i in range(len(ref)))
    for d, m in loaded.items():
        assert same_weights(m.weights_sample(), ref), d


def test_another_or_a_changed_checkpoint_is_refused(float32_checkpoint, tmp_path):
    base = ffkv.load_model(str(float32_checkpoint), dtype="float32")
    other = ffkv.load_model(str(float32_checkpoint), dtype="float32")
    with torch.no_grad():  # a "fine-tune": one weight matrix scaled by 1 %
        other.parts.ffn_out(1).weight.mul_(1.01)
    assert other.fingerprint() == base.fingerprint()
    assert not same_weights(other.weights_sample(), base.weights_sample())


@pytest.mark.parametrize("scan_dtype", ["bfloat16", "float16"])
def test_a_16_bit_scan_is_analysed_and_served_in_float32(scan_dtype, float32_checkpoint, corpus_jsonl, tmp_path,
                                                         capsys):
    from ffkv.server import Service

    out = tmp_path / "atlas"
    assert main(["scan", "--model", str(float32_checkpoint), "--corpus", str(corpus_jsonl), "--out", str(out),
                 "--max-length", "64", "--top-k", "25", "--max-tokens", "600", "--quiet", "--dtype", scan_dtype]) == 0
    atlas = ffkv.Atlas.load(out)
    assert atlas.manifest["scan"]["dtype"] == scan_dtype
    assert atlas.manifest["result"]["nonfinite_coefficients"] == 0
    assert main(["analyze", str(out), "--only", "values", "--dtype", "float32", "--quiet"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["config"]["dtype"] == "float32" and "values" in result
    service = Service(out, model=str(float32_checkpoint), progress=False)  # serve's default load: float32
    assert service.loaded.model.dtype == torch.float32
    doc = service.memory(atlas.layers[0], 0)
    assert doc["faces"]["pos"]["triggers"]
    other = ffkv.load_model(str(float32_checkpoint), dtype="float32")
    with torch.no_grad():
        other.parts.ffn_out(0).weight.mul_(-1.0)
    with pytest.raises(FfkvError, match="was made with model"):
        atlas.check_model(other)
