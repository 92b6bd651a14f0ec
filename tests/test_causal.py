"""The causal check (not in the paper): a memory switched off at its top-1 trigger's last position, beside a control
of its layer matched on |m|·‖v‖. Planted memories with known effects against a forward with the value zeroed in
the weights, every delta against a full forward edited by this file's own hook, the KV-cache continuations against
full forwards, the control matching, bad input, the analyze wiring and the report figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_saved_model, unit_coefficients
from test_report import make_analysis, make_atlas

import ffkv
from ffkv.analysis.causal import (
    CachedPrefixes,
    causal_experiment,
    nearest_control,
    value_roles,
)
from ffkv.analysis.run import AnalyzeConfig, analyze
from ffkv.capture import Capture, Intervention, check_interventions
from ffkv.cli import _print_analysis
from ffkv.errors import FfkvError
from ffkv.report import build_figures, load_inputs, write_report

SCAN = dict(dtype="float64", top_k=5, max_length=64, batch_tokens=400, max_batch=16, value_top=8,
            checkpoint_every=1e9)
AGREE_KEY, SUPPRESS_KEY, EARLY_KEY, NEGATIVE_KEY = 11, 23, 5, 30
"""Planted memories: of the last layer (agreeing, suppressing), of layer 0 (agreeing) and of layer 1 (agreeing on
the negative face)."""


def _scan(loaded, corpus, out):
    return ffkv.scan(loaded, str(corpus), out, ffkv.ScanConfig(**SCAN), progress=False)


def _equal_norm_unembedding(model) -> None:
    """Centre and normalise every unembedding row: then v = E[t] has t as its unique top token."""
    e = model.get_output_embeddings().weight
    e -= e.mean(dim=1, keepdim=True)
    e /= e.norm(dim=1, keepdim=True).clamp_min(1e-6)


@torch.inference_mode()
def reference_log_p(loaded, ids, target: int, off=()) -> float:
    """log p(target) after ``ids`` from one full forward (batch 1, no cache), with the memories ``off``
    ((layer, key) pairs) zeroed at the last position by hooks of this test, not by ffkv's Capture."""
    handles = []
    for layer, key in off:
        def zero_last(module, args, key=key):
            m = args[0].clone(memory_format=torch.contiguous_format)
            m.view(-1, m.shape[-1])[-1, key] = 0.0  # OPT flattens [B * T, d_ff]: the last row is the last position
            return (m, *args[1:])
        handles.append(loaded.parts.ffn_out(layer).register_forward_pre_hook(zero_last))
    try:
        logits = loaded.model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits.double().log_softmax(-1)[target])


@torch.inference_mode()
def _mlp_input(loaded, layer, ids) -> torch.Tensor:
    """The input of a Llama block's MLP at the last position of ``ids`` (what its keys read)."""
    seen = []
    handle = loaded.parts.blocks[layer].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1]))
    try:
        loaded.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    finally:
        handle.remove()
    return seen[0].clone()


@torch.no_grad()
def _plant(loaded, layer, key, ids, target, sign, face="pos") -> None:
    """Make gated memory ``key`` fire at the last position of ``ids`` (the gate reads 4 there and the up projection
    +-4: m = +-4 silu(4), the negative face's extreme with ``face='neg'``) and write sign * 10 * E[target] (on the
    positive face it agrees, or suppresses with sign -1; on the negative face, which adds -v, the reverse)."""
    x = _mlp_input(loaded, layer, ids)
    mlp = loaded.parts.blocks[layer].mlp
    mlp.gate_proj.weight[key] = 4.0 * x / x.dot(x)
    mlp.up_proj.weight[key] = (4.0 if face == "pos" else -4.0) * x / x.dot(x)
    loaded.parts.values(layer)[key] = sign * 10.0 * loaded.parts.unembedding[target]


@pytest.fixture(scope="module")
def planted(tokenizers, corpus_txt, tmp_path_factory):
    """(atlas, model, {name: (layer, key, position, target)}) of a tiny Llama with three planted memories, scanned
    after planting."""
    root = tmp_path_factory.mktemp("causal")
    loaded = build_saved_model("llama", tokenizers, root / "model", edit=_equal_norm_unembedding, seed=5)
    store = _scan(loaded, corpus_txt, root / "first").store
    units = [u for u in range(len(store.length)) if store.length[u] > 10]
    last = loaded.parts.n_layers - 1
    plan = {"early": (0, EARLY_KEY, int(store.offset[units[2]]) + 4, 1.0, "pos"),
            "negative": (1, NEGATIVE_KEY, int(store.offset[units[3]]) + 5, -1.0, "neg"),
            "agree": (last, AGREE_KEY, int(store.offset[units[0]]) + 6, 1.0, "pos"),
            "suppress": (last, SUPPRESS_KEY, int(store.offset[units[1]]) + 7, -1.0, "pos")}
    planted = {}
    for name, (layer, key, position, sign, face) in plan.items():  # lowest layer first: it changes what others read
        _, ids, target = store.prefix(position)
        _plant(loaded, layer, key, ids, target, sign, face)
        planted[name] = (layer, key, position, target)
    atlas = _scan(loaded, corpus_txt, root / "atlas")
    for name, (layer, key, position, _) in planted.items():
        face = plan[name][4]
        assert int(atlas.layer_tensors(layer)[f"{face}_positions"][key, 0]) == position  # its top-1 trigger
    return atlas, loaded, planted


def _records(block) -> dict:
    return {(m["layer"], m["key"], m["role"]): m for m in block["memories"]}


def test_a_planted_memory_switched_off_changes_log_p_as_zeroing_its_value_does(planted):
    atlas, loaded, plan = planted
    blocks = causal_experiment(atlas, loaded, per_layer=64, progress=False)
    records = _records(blocks["pos"])
    values = loaded.parts.values(atlas.n_layers - 1)
    for name, role in (("agree", "agree"), ("suppress", "suppress")):
        layer, key, position, target = plan[name]
        record = records[(layer, key, role)]
        assert record["target"] == target and record["position"] == position
        _, ids, _ = atlas.store.prefix(position)
        clean = reference_log_p(loaded, ids, target)
        saved = values[key].detach().clone()
        with torch.no_grad():
            values[key] = 0.0  # the last layer: zeroing the value everywhere only changes each position's own output
        try:
            zeroed = reference_log_p(loaded, ids, target)
        finally:
            with torch.no_grad():
                values[key] = saved
        assert record["log_p"] == pytest.approx(clean, abs=1e-9)
        assert record["delta"] == pytest.approx(zeroed - clean, abs=1e-9)
        assert (record["delta"] < -1.0) if role == "agree" else (record["delta"] > 1.0)
        assert abs(record["delta"]) > abs(record["control_delta"])
    layer, key, _, _ = plan["early"]
    assert (layer, key, "agree") in records
    layer, key, _, _ = plan["negative"]
    assert (layer, key, "agree") in _records(blocks["neg"])


def test_every_delta_and_control_against_full_forwards(planted):
    """Each memory and control delta equals two full forwards of its trigger prefix (one with this test's own hook);
    the control is the nearest |m|·‖v‖ of its layer at that position; per-layer numbers follow from the records."""
    atlas, loaded, _ = planted
    blocks = causal_experiment(atlas, loaded, per_layer=64, seed=3, progress=False)
    for face, block in blocks.items():
        assert block["memories"], face
        for m in block["memories"]:
            _, ids, nxt = atlas.store.prefix(m["position"])
            assert nxt == m["target"]
            clean = reference_log_p(loaded, ids, m["target"])
            assert m["log_p"] == pytest.approx(clean, abs=1e-9)
            assert m["delta"] == pytest.approx(
                reference_log_p(loaded, ids, m["target"], [(m["layer"], m["key"])]) - clean, abs=1e-9)
            assert m["control_delta"] == pytest.approx(
                reference_log_p(loaded, ids, m["target"], [(m["layer"], m["control"])]) - clean, abs=1e-9)
            coefficients = unit_coefficients(loaded, ids, [m["layer"]])[m["layer"]][-1].double()
            strength = (coefficients.abs() * loaded.parts.values(m["layer"]).detach().double().norm(dim=1)).numpy()
            top1 = float(atlas.layer_tensors(m["layer"])[f"{face}_scores"][m["key"], 0])
            assert m["coefficient"] == pytest.approx(top1)
            assert m["strength"] == pytest.approx(strength[m["key"]], rel=1e-9)
            gaps = np.abs(strength - strength[m["key"]])
            gaps[m["key"]] = np.inf
            assert m["control"] != m["key"] and gaps[m["control"]] == pytest.approx(gaps.min(), abs=1e-12)
        for layer in atlas.layers:
            for role in ("agree", "suppress"):
                mine = [m for m in block["memories"] if m["layer"] == layer and m["role"] == role]
                assert block[f"n_{role}"][layer] == len(mine) == min(64, block[f"n_{role}_candidates"][layer])
                if not mine:
                    assert block[f"{role}_delta"][layer] is None and block[f"{role}_delta_ci"][layer] is None
                    continue
                delta = np.mean([m["delta"] for m in mine])
                assert block[f"{role}_delta"][layer] == pytest.approx(delta)
                low, high = block[f"{role}_delta_ci"][layer]
                assert low <= delta + 1e-12 and delta <= high + 1e-12
                assert block[f"{role}_control_delta"][layer] == pytest.approx(np.mean([m["control_delta"]
                                                                                      for m in mine]))
                exceeds = np.mean([abs(m["delta"]) > abs(m["control_delta"]) for m in mine])
                assert block[f"{role}_exceeds_control"][layer] == pytest.approx(exceeds)
        n_all = sum(v or 0 for v in block["n_agree"])
        assert block["all_layers"]["n_agree"] == n_all


def test_candidates_follow_the_value_projection(planted):
    """Agreeing / suppressing memories counted from the trigger API and a float64 projection of the weights."""
    atlas, loaded, _ = planted
    blocks = causal_experiment(atlas, loaded, per_layer=1, progress=False)
    e = loaded.parts.unembedding.detach().double()
    for face, block in blocks.items():
        sign = 1.0 if face == "pos" else -1.0
        for layer in atlas.layers:
            logits = sign * (loaded.parts.values(layer).detach().double() @ e.T)
            agree = suppress = 0
            for key in range(atlas.d_ff):
                triggers = atlas.triggers(layer, key, face, 1)
                if not triggers or triggers[0].next_token_id is None or triggers[0].score == 0:
                    continue
                agree += int(logits[key].argmax()) == triggers[0].next_token_id
                suppress += int(logits[key].argmin()) == triggers[0].next_token_id
            assert block["n_agree_candidates"][layer] == agree
            assert block["n_suppress_candidates"][layer] == suppress
            assert block["n_agree"][layer] == min(1, agree) and block["n_suppress"][layer] == min(1, suppress)
        assert block["memories_per_layer"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3_text", "gpt_neox"])
def test_cache_continuations_equal_full_forwards(arch, tiny_model):
    """Several prefixes of one length (longer than Gemma 3's sliding window of 8), each continued clean and with
    memories off at the last token, against full forwards; the cache is reused unchanged."""
    loaded = tiny_model(arch)
    rng = np.random.default_rng(1)
    prefixes = [rng.integers(2, 300, 12).tolist() for _ in range(3)]
    cached = CachedPrefixes(loaded, prefixes)
    rows = [0, 0, 1, 2, 2, 2]
    off = [(), ((1, 3),), ((0, 5), (2, 7)), (), ((2, 1),), ((1, 3), (1, 4))]
    targets = [5, 5, 9, 11, 11, 40]
    for _ in range(2):
        got = cached.log_probs(rows, off, targets)
        want = [reference_log_p(loaded, prefixes[r], t, o) for r, o, t in zip(rows, off, targets)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    clean = cached.coefficients([0, 2])
    for b, ids in enumerate(prefixes):
        full = unit_coefficients(loaded, ids, [0, 2])
        for layer in (0, 2):
            torch.testing.assert_close(clean[layer][b], full[layer][-1], rtol=0, atol=1e-10)
    single = CachedPrefixes(loaded, [[7], [9]])  # one-token prefixes: nothing to cache
    np.testing.assert_allclose(single.log_probs([1, 0], [((1, 2),), ()], [3, 4]),
                               [reference_log_p(loaded, [9], 3, [(1, 2)]), reference_log_p(loaded, [7], 4)], atol=1e-9)


def test_positioned_interventions_edit_only_their_positions(tiny_model):
    """Capture's flat positions (row * T + column): Llama's [B, T, d_ff] and OPT's flattened FFN input alike."""
    for arch in ("llama", "opt"):
        loaded = tiny_model(arch)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        with Capture(loaded.parts, [1], interventions=[Intervention(1, 3, "off", positions=(2, 5)),
                                                       Intervention(1, 4, "set", 2.5, positions=(7,))]) as cap:
            edited = cap.run(ids).m[1]
        with Capture(loaded.parts, [1]) as cap:
            plain = cap.run(ids).m[1]
        expected = plain.clone()
        expected[[2, 5], 3] = 0.0
        expected[7, 4] = 2.5
        torch.testing.assert_close(edited, expected, rtol=0, atol=0)


def test_control_matching_picks_the_nearest_strength():
    strength = np.array([1.0, 5.0, 2.9, 3.1, 3.0, np.nan])
    drawn = {nearest_control(strength, 4, np.random.default_rng(seed)) for seed in range(40)}
    assert drawn == {2, 3}  # a tie at 0.1 either side, drawn with the seed; never the key, never NaN
    assert nearest_control(strength, 4, np.random.default_rng(7)) == nearest_control(strength, 4,
                                                                                      np.random.default_rng(7))
    assert nearest_control(np.array([3.0, 3.0, 9.0]), 0, np.random.default_rng(0)) == 1
    assert nearest_control(np.array([0.0, 0.5, 2.0, 1.9]), 2, np.random.default_rng(0)) == 3
    with pytest.raises(FfkvError, match="at least two memories"):
        nearest_control(np.array([1.0]), 0, np.random.default_rng(0))


def test_value_roles():
    promoted, demoted, target = np.array([4, 5, 6, 7]), np.array([1, 2, 3, 9]), np.array([4, 2, -1, 8])
    agree, suppress = value_roles(promoted, demoted, target)
    assert agree.tolist() == [True, False, False, False] and suppress.tolist() == [False, True, False, False]
    agree, suppress = value_roles(np.array([-1]), np.array([-1]), np.array([-1]))
    assert not agree.any() and not suppress.any()


def test_bad_input_is_a_one_line_error(planted, tiny_model):
    atlas, loaded, _ = planted
    for bad in (0, -2, True, 2.5):
        with pytest.raises(FfkvError, match="positive integer"):
            causal_experiment(atlas, loaded, per_layer=bad, progress=False)
    with pytest.raises(FfkvError, match="--causal-memories must be positive"):
        analyze(atlas.path, AnalyzeConfig(only="causal", causal_memories=0, removal_triggers=2), model=loaded,
                progress=False)
    for prefixes in ([], [[]], [[1, 2], [3]]):
        with pytest.raises(FfkvError, match="one length"):
            CachedPrefixes(loaded, prefixes)
    cached = CachedPrefixes(loaded, [[4, 5, 6]])
    with pytest.raises(FfkvError, match="indices of the 1 cached"):
        cached.log_probs([1], [()], [3])
    with pytest.raises(FfkvError, match="one entry per continuation"):
        cached.log_probs([0, 0], [()], [3, 4])
    with pytest.raises(FfkvError, match=r"interventions\[0\]: positions"):
        check_interventions(loaded.parts, [Intervention(0, 1, "off", positions=(-1,))], max_abs=10)
    with pytest.raises(FfkvError, match="flat position 99"):
        with Capture(loaded.parts, [0], interventions=[Intervention(0, 1, "off", positions=(99,))]) as cap:
            cap.run(torch.tensor([[4, 5, 6]]))


def test_analyze_writes_both_faces_and_prints_the_rows(planted, capsys):
    atlas, loaded, plan = planted
    config = AnalyzeConfig(only="causal", causal_memories=2, removal_triggers=2)  # the atlas's top-k is 5
    result = analyze(atlas.path, config, model=loaded, progress=False)
    assert {"causal", "causal_neg"} <= set(result) and "causal" not in result["missing"]
    assert result["config"]["causal_memories"] == 2 and result["timings"]["causal"] >= 0
    assert "causal_delta" in result["definitions"] and "suppress" in result["definitions"]
    assert result["causal"]["memories_per_layer"] == 2
    layer = plan["agree"][0]
    assert result["causal"]["agree_delta"][layer] is not None
    _print_analysis(result)
    out = capsys.readouterr().out
    for row in ("Causal: agreeing memory off", "Causal: suppressing memory off", "  its control"):
        assert row in out


# -- the report figure ------------------------------------------------------------------------------------------
def _figure(tmp_path, analysis, signed=True):
    figures = {f.id: f for f in build_figures(load_inputs(make_atlas(tmp_path, analysis, signed=signed)))}
    return figures["causal"]


@pytest.mark.parametrize("signed", [True, False])
def test_report_draws_the_causal_figure(tmp_path, signed):
    a = make_analysis(12, signed)
    fig = _figure(tmp_path / "atlas", a, signed)
    assert fig.missing is None and fig.section == "values"
    traces = {(t["name"], t["meta"]["face"]): t for t in fig.spec["data"]}
    b = a["causal"]
    agree = traces[("ours: agreeing memories off", "pos")]
    assert agree["y"] == b["agree_delta"]
    assert agree["error_y"]["array"][3] == pytest.approx(b["agree_delta_ci"][3][1] - b["agree_delta"][3])
    assert agree["error_y"]["arrayminus"][3] == pytest.approx(b["agree_delta"][3] - b["agree_delta_ci"][3][0])
    control = traces[("ours: their controls (agreeing)", "pos")]
    assert control["y"] == b["agree_control_delta"] and control["meta"]["role"] == "baseline"
    assert traces[("ours: suppressing memories off", "pos")]["y"] == b["suppress_delta"]
    assert ("ours: agreeing memories off", "neg") in traces if signed else len(fig.spec["data"]) == 4
    assert fig.verdict.status == "yes" and "agreeing" in fig.verdict.text
    assert "positive face (+v): no agreeing memory at layer 0" in fig.notes
    text = write_report(make_atlas(tmp_path / "written", a, signed=signed)).read_text()
    assert 'id="causal" data-figure="causal" data-state="drawn"' in text


def test_causal_verdict_and_missing_block(tmp_path):
    a = make_analysis(12, True, reproduce=False)
    assert _figure(tmp_path / "reversed", a).verdict.status == "no"
    del a["causal"], a["causal_neg"]
    a["missing"] = {"causal": "not run (use --only to add it)"}
    fig = _figure(tmp_path / "missing", a)
    assert fig.spec is None and "not run (use --only to add it)" in fig.missing
