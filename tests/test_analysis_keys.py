"""§3 token removal (Fig 3) against an independent recomputation. The trigger patterns (Fig 2) are tested in
test_explain.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ffkv
from ffkv.analysis.keys import token_removal_experiment


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_token_removal_matches_recomputation(arch, tiny_model, corpus_txt, tmp_path):
    loaded = tiny_model(arch)
    atlas = ffkv.scan(model=loaded, corpus=ffkv.load_corpus(str(corpus_txt)), out=tmp_path / "a",
                      config=ffkv.ScanConfig(dtype="float64", top_k=4), progress=False)
    result = token_removal_experiment(atlas, loaded, "pos", keys_per_layer=3, n_triggers=4, seed=0)
    assert len(result["last"]) == atlas.n_layers
    layer = atlas.layers[-1]
    # independent recomputation of the "last" variant for this layer
    from ffkv.analysis.keys import sample_keys

    changes = []
    for key in sample_keys(atlas.d_ff, 3, 1, layer, "pos"):
        for t in atlas.triggers(layer, key, "pos", 4):
            skip = int(atlas.store.n_special[t.unit])
            if len(t.input_ids) - skip < 2 or t.score == 0:
                continue
            seen = {}
            handle = loaded.parts.ffn_out(layer).register_forward_pre_hook(
                lambda _m, a, seen=seen: seen.setdefault("m", a[0].detach().clone()))
            try:
                with torch.inference_mode():
                    loaded.model(input_ids=torch.tensor([t.input_ids[:-1]]), use_cache=False)
            finally:
                handle.remove()
            new = float(seen["m"].reshape(len(t.input_ids) - 1, -1)[-1, key])
            changes.append((new - t.score) / t.score)
    assert result["last"][layer] == pytest.approx(float(np.mean(changes)), rel=1e-6, abs=1e-9)
    assert result["skipped"][layer] >= 0 and result["n_keys"][layer] == 3
