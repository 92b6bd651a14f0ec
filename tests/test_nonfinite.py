"""Non-finite coefficients in a real scan: a NaN or an infinity is skipped and counted, never kept, and hides
nothing else. A test hook (registered before the scan's own, so it runs first) poisons one memory's coefficient
at every position whose token is a chosen id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import brute_force_coefficients, brute_force_topk

import ffkv

CONFIG = ffkv.ScanConfig(dtype="float64", top_k=5, max_length=64, batch_tokens=200, max_batch=8, value_top=4,
                         checkpoint_every=1e9, layers="0")
KEY = 3


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_poisoned_memory_keeps_its_finite_triggers_and_counts_the_rest(poison, tiny_model, corpus_jsonl, tmp_path,
                                                                       capsys):
    loaded = tiny_model("llama")
    clean = ffkv.scan(loaded, str(corpus_jsonl), tmp_path / "clean", CONFIG, progress=False)
    store = clean.store
    units = np.load(clean.path / "scanned_units.npy")
    values, positions = brute_force_coefficients(loaded, store, units, [0])
    token = int(np.bincount(np.asarray(store.tokens[positions.numpy()], dtype=np.int64)).argmax())
    current: dict[str, torch.Tensor] = {}

    def poison_hook(module, args):
        m = args[0].clone()
        m[..., KEY] = torch.where(current["ids"] == token, poison, m[..., KEY])
        return (m, *args[1:])

    def remember_ids(module, args, kwargs):
        current["ids"] = kwargs["input_ids"]

    handles = [loaded.parts.ffn_out(0).register_forward_pre_hook(poison_hook),
               loaded.parts.body.register_forward_pre_hook(remember_ids, with_kwargs=True)]
    try:
        capsys.readouterr()
        atlas = ffkv.scan(loaded, str(corpus_jsonl), tmp_path / "poisoned", CONFIG, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert "non-finite coefficients" in capsys.readouterr().out
    hit = torch.from_numpy(np.asarray(store.tokens[positions.numpy()], dtype=np.int64)) == token
    assert int(hit.sum()) > 0
    t, c = atlas.layer_tensors(0), clean.layer_tensors(0)
    assert t["stat_nonfinite"][KEY] == int(hit.sum()) and int(t["stat_nonfinite"].sum()) == int(hit.sum())
    assert atlas.manifest["result"]["nonfinite_coefficients"] == int(hit.sum())
    others = [k for k in range(loaded.parts.d_ff) if k != KEY]
    for name in t:  # every other memory exactly as in the clean scan
        if name.startswith("value_") or t[name].dim() == 0:
            continue
        assert torch.equal(t[name][others].nan_to_num(), c[name][others].nan_to_num()), name
    # the poisoned memory: the exact top-k of its finite values; statistics over the finite values
    finite = values[0][~hit, KEY:KEY + 1]
    for face, largest in (("pos", True), ("neg", False)):
        want_v, want_p = brute_force_topk(finite, positions[~hit], CONFIG.top_k, largest)
        assert torch.equal(t[f"{face}_positions"][KEY], want_p[0])
        assert torch.equal(t[f"{face}_scores"][KEY], want_v[0])
    st = atlas.stats(0)
    assert st["nonfinite"][KEY] == int(hit.sum())
    assert st["mean"][KEY] == pytest.approx(float(finite.mean()), rel=1e-6)
    assert st["max"][KEY] == pytest.approx(float(finite.max()), rel=1e-6)
    assert np.isfinite(st["mean_square"]).all()
