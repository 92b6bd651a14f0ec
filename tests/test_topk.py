"""The exact running top-k and statistics accumulators, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import brute_force_topk

from ffkv.errors import FfkvError
from ffkv.topk import EMPTY_KEY, MAX_POSITION, ExactSum, LayerState, MemoryStats, TopK, decode, encode

SPECIAL_VALUES = [-3.5, -0.0, 0.0, 1e-30, -1e-30, 2.5, float("inf"), float("-inf"), 3.4028234663852886e38,
                  -3.4028234663852886e38, 1.401298464324817e-45, 7.0, 7.0, -7.0]


def test_encode_decode_round_trip():
    values = torch.tensor(SPECIAL_VALUES, dtype=torch.float32)
    positions = torch.tensor([0, MAX_POSITION, 1, 2**31 - 2, 12345, 0, MAX_POSITION, 3, 4, 5, 6, 7, 8, 9])
    assert MAX_POSITION == 2**31 - 1
    keys = encode(values, positions)
    assert keys.dtype == torch.int64
    assert not (keys == EMPTY_KEY).any()
    got_values, got_positions = decode(keys)
    assert got_values.dtype == torch.float32
    assert torch.equal(got_values, values)  # -0.0 == 0.0 numerically; infinities survive
    assert torch.equal(got_positions, positions)


def test_encode_decode_2d_and_empty_slots():
    values = torch.tensor([[1.0, -2.0, 0.0], [float("inf"), -0.0, 5.5]])
    positions = torch.tensor([7, 0, MAX_POSITION])
    keys = encode(values, positions)
    assert keys.shape == (2, 3)
    v, p = decode(keys)
    assert torch.equal(v, values) and torch.equal(p, positions.expand(2, 3))
    v, p = decode(torch.tensor([EMPTY_KEY, keys[0, 0]]))
    assert torch.isnan(v[0]) and p[0] == -1
    assert v[1] == 1.0 and p[1] == 7


def test_key_order_is_value_desc_then_position_asc():
    values = [-2.0, -0.0, 0.0, 0.0, 1.0, 1.0, float("inf"), float("-inf"), 1e-38]
    positions = [5, 0, 3, 9, 2, MAX_POSITION, 0, 1, 4]
    keys = encode(torch.tensor(values), torch.tensor(positions)).tolist()
    for (ka, va, pa), (kb, vb, pb) in itertools.combinations(zip(keys, values, positions), 2):
        if (va, pa) == (vb, pb):
            continue
        a_first = va > vb or (va == vb and pa < pb)
        assert (ka > kb) == a_first, (va, pa, vb, pb)


def _data(kind: str, n: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "float":
        return torch.randn(n, rows, generator=g)
    if kind == "integers":  # many exact ties
        return torch.randint(-3, 4, (n, rows), generator=g).to(torch.float32)
    if kind == "relu":  # mostly zeros, of both signs (GELU-like activations give -0.0)
        x = torch.randint(-6, 3, (n, rows), generator=g).to(torch.float32)
        x = torch.where(x < -3, torch.full_like(x, -0.0), x.clamp(min=0))
        return x
    raise ValueError(kind)


def _batches(n: int, seed: int, n_batches: int = 5):
    """Random, non-contiguous global positions (including 0 and the largest) split into uneven batches."""
    rng = np.random.default_rng(seed)
    positions = rng.choice(10_000, size=n, replace=False)
    positions[0], positions[-1] = 0, MAX_POSITION
    positions = rng.permutation(positions)
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_batches - 1, replace=False))
    return torch.from_numpy(positions).to(torch.int64), np.split(np.arange(n), cuts)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["float", "integers", "relu"])
@pytest.mark.parametrize("k", [1, 6, 300])
def test_topk_add_matches_brute_force(kind, largest, k):
    n, rows = 240, 9
    values = _data(kind, n, rows, seed=k)
    positions, batches = _batches(n, seed=k + 1)
    tk = TopK(rows, k, largest=largest)
    for idx in batches:
        tk.add(values[idx], positions[idx])
    before = tk.keys.clone()
    tk.add(values[:0], positions[:0])  # an empty batch changes nothing
    assert torch.equal(tk.keys, before)
    got_v, got_p = tk.result()
    want_v, want_p = brute_force_topk(values, positions, k, largest=largest)
    assert torch.equal(got_p, want_p)
    assert torch.allclose(got_v, want_v, equal_nan=True, rtol=0, atol=0)
    if k > n:
        assert (got_p[:, n:] == -1).all() and torch.isnan(got_v[:, n:]).all()


@pytest.mark.parametrize("largest", [True, False])
def test_topk_add_returns_the_column_extreme(largest):
    values = _data("float", 120, 5, seed=3)
    positions, batches = _batches(120, seed=4)
    tk = TopK(5, 4, largest)
    for idx in batches:
        got = tk.add(values[idx], positions[idx])
        assert torch.equal(got, values[idx].amax(0) if largest else values[idx].amin(0))
    got = tk.add(values[:0], positions[:0])  # an empty batch changes nothing
    assert got.shape == (5,) and (got == (float("-inf") if largest else float("inf"))).all()


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["float", "integers", "relu"])
def test_topk_warm_state_with_uneven_batches(kind, largest):
    """Many positions, few kept: later batches only touch a few candidates (the sparse merge), in batch
    sizes around the filter's block size."""
    rows, k = 40, 3
    sizes = [1, 15, 16, 17, 33, 700, 2, 64, 500, 31]
    n = sum(sizes)
    values = _data(kind, n, rows, seed=41)
    rng = np.random.default_rng(42)
    positions = torch.from_numpy(rng.permutation(n) * 3 + 1).to(torch.int64)
    tk = TopK(rows, k, largest)
    start = 0
    for size in sizes:
        tk.add(values[start: start + size], positions[start: start + size])
        start += size
    want_v, want_p = brute_force_topk(values, positions, k, largest=largest)
    got_v, got_p = tk.result()
    assert torch.equal(got_p, want_p) and torch.equal(got_v, want_v)


def test_topk_equal_value_at_smaller_position_in_a_later_batch_wins():
    tk = TopK(1, 2)
    tk.add(torch.tensor([[5.0], [5.0], [1.0]]), torch.tensor([10, 11, 12]))
    tk.add(torch.tensor([[5.0], [4.0]]), torch.tensor([3, 4]))  # not above the threshold, but ties win on position
    v, p = tk.result()
    assert p.tolist() == [[3, 10]] and v.tolist() == [[5.0, 5.0]]


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["float", "integers", "relu"])
def test_topk_merge_is_associative_and_commutative(kind, largest):
    n, rows, k = 300, 6, 7
    values = _data(kind, n, rows, seed=11)
    positions, parts = _batches(n, seed=12, n_batches=3)

    def state(idx_list):
        s = TopK(rows, k, largest)
        for idx in idx_list:
            s.add(values[idx], positions[idx])
        return s

    one_shot = state([np.arange(n)])
    results = []
    for order in itertools.permutations(range(3)):
        a, b, c = (state([parts[i]]) for i in order)
        b.merge(c)  # a + (b + c)
        a.merge(b)
        results.append(a.keys)
        a, b, c = (state([parts[i]]) for i in order)
        a.merge(b)  # (a + b) + c
        a.merge(c)
        results.append(a.keys)
    for keys in results:
        assert torch.equal(keys, one_shot.keys)
    want_v, want_p = brute_force_topk(values, positions, k, largest=largest)
    got_v, got_p = one_shot.result()
    assert torch.equal(got_p, want_p) and torch.equal(got_v, want_v)


def test_topk_merge_with_empty_state_and_shape_mismatch():
    values = _data("float", 50, 4, seed=5)
    positions = torch.arange(50)
    a = TopK(4, 3)
    a.add(values, positions)
    before = a.keys.clone()
    a.merge(TopK(4, 3))
    assert torch.equal(a.keys, before)
    empty = TopK(4, 3)
    empty.merge(a)
    assert torch.equal(empty.keys, before)
    with pytest.raises(ValueError):
        a.merge(TopK(4, 5))


@pytest.mark.parametrize("largest", [True, False])
def test_topk_state_dict_round_trip_and_resume(largest):
    values = _data("integers", 200, 5, seed=21)
    positions, batches = _batches(200, seed=22)
    full = TopK(5, 8, largest)
    for idx in batches:
        full.add(values[idx], positions[idx])
    first = TopK(5, 8, largest)
    for idx in batches[:2]:
        first.add(values[idx], positions[idx])
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = TopK(5, 8, largest)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.keys, first.keys)
    assert torch.equal(resumed.threshold, first.threshold)  # the skip threshold is rebuilt, not stale
    for idx in batches[2:]:
        resumed.add(values[idx], positions[idx])
    assert torch.equal(resumed.keys, full.keys)
    with pytest.raises(ValueError):
        TopK(5, 9, largest).load_state_dict(state)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["float", "relu"])
def test_topk_from_result_rebuilds_the_state(kind, largest):
    values = _data(kind, 40, 5, seed=31)
    positions, batches = _batches(40, seed=32)
    for k in (3, 60):  # full, and with empty slots
        tk = TopK(5, k, largest)
        for idx in batches:
            tk.add(values[idx], positions[idx])
        rebuilt = TopK.from_result(*tk.result(), largest=largest)
        assert torch.equal(rebuilt.keys, tk.keys)
        extra_v, extra_p = _data(kind, 10, 5, seed=33), torch.arange(20_000, 20_010)
        tk.add(extra_v, extra_p)
        rebuilt.add(extra_v, extra_p)
        assert torch.equal(rebuilt.keys, tk.keys)


def _stats_batches():
    g = torch.Generator().manual_seed(0)
    n, rows = 3000, 8
    values = torch.randn(n, rows, generator=g) * torch.linspace(0.1, 20.0, rows) + torch.linspace(-5, 5, rows)
    values[::7, 0] = 0.0
    cuts = [0, 400, 1100, 1101, 2500, n]
    return values, [values[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _add(stats: MemoryStats, batch: torch.Tensor) -> None:
    low, high = batch.aminmax(dim=0)
    stats.add(batch, low, high)


def _state_equal(a: MemoryStats, b: MemoryStats) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_memory_stats_merge_is_exact():
    values, batches = _stats_batches()
    sequential = MemoryStats(values.shape[1])
    for b in batches:
        _add(sequential, b)
    for order in ([0, 2, 4], [1, 3]), ([4, 3], [2, 1, 0]), ([0], [1], [2], [3], [4]):
        groups = []
        for group in order:
            s = MemoryStats(values.shape[1])
            for i in group:
                _add(s, batches[i])
            groups.append(s)
        merged = groups[-1]
        for s in groups[:-1]:
            merged.merge(s)
        assert _state_equal(merged, sequential), order
    # against adding everything in one batch: counts and extremes exact, sums equal up to float32 batch sums
    one_shot = MemoryStats(values.shape[1])
    _add(one_shot, values)
    for name in ("count", "count_positive", "min", "max"):
        assert torch.equal(getattr(one_shot, name), getattr(sequential, name)), name
    scale = values.abs().double().sum(0)
    assert ((one_shot.sum.value() - sequential.sum.value()).abs() <= 1e-6 * scale + 1e-5).all()
    scale = values.double().square().sum(0)
    assert ((one_shot.sumsq.value() - sequential.sumsq.value()).abs() <= 1e-6 * scale + 1e-3).all()


def test_memory_stats_state_dict_round_trip():
    values, batches = _stats_batches()
    a = MemoryStats(values.shape[1])
    for b in batches[:3]:
        _add(a, b)
    b = MemoryStats(values.shape[1])
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert _state_equal(a, b)
    for batch in batches[3:]:
        _add(a, batch)
        _add(b, batch)
    assert _state_equal(a, b)


def test_memory_stats_match_numpy():
    """The exact sums give the mean and mean square."""
    values, batches = _stats_batches()
    s = MemoryStats(values.shape[1])
    for b in batches:
        _add(s, b)
    x = values.double().numpy()
    n = int(s.count)
    assert n == x.shape[0]
    assert np.array_equal(s.count_positive.numpy(), (x > 0).sum(0))
    np.testing.assert_allclose(s.sum.value().numpy() / n, x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.sumsq.value().numpy() / n, (x**2).mean(0), rtol=1e-6, atol=1e-6)
    assert np.array_equal(s.min.numpy(), x.min(0).astype(np.float32))
    assert np.array_equal(s.max.numpy(), x.max(0).astype(np.float32))


# -- non-finite coefficients and the range of the sums -----------------------------------------------------------
def test_topk_never_keeps_a_non_finite_value_and_nothing_hides_behind_one():
    """A NaN next to a 100.0 in one block of positions: the 100.0 still enters; NaN and +-inf never do."""
    n, rows = 64, 3
    values = torch.zeros(n, rows)
    values[5, 0], values[6, 0] = float("nan"), 100.0  # same block of 16 positions
    values[7, 1], values[9, 1] = float("inf"), 3.0
    values[3, 2], values[4, 2] = float("-inf"), -7.0
    positions = torch.arange(n)
    for largest in (True, False):
        t = TopK(rows, 4, largest=largest)
        extreme = t.add(values, positions)
        scores, pos = t.result()
        assert torch.isfinite(scores).all() and torch.isfinite(extreme).all()
        clean = values.masked_fill(~torch.isfinite(values), 0.0)
        ref_keys = encode(clean.T if largest else -clean.T, positions)
        ref_keys[~torch.isfinite(values.T)] = EMPTY_KEY  # the non-finite positions are not candidates
        want = ref_keys.topk(4, dim=1).values
        want_scores, want_pos = decode(want)
        assert torch.equal(pos, want_pos)
        assert torch.equal(scores, want_scores if largest else -want_scores)
    t = TopK(rows, 2)
    t.add(values, positions)
    assert t.result()[0][0, 0] == 100.0 and t.result()[1][0, 0] == 6


def test_memory_stats_skip_and_count_non_finite_values():
    values = torch.tensor([[1.0, float("nan"), 2.0], [3.0, 4.0, float("inf")], [float("-inf"), 5.0, 6.0]])
    state = LayerState(3, 2, signed=True)
    state.add(values, torch.arange(3))
    st = state.stats
    assert st.nonfinite.tolist() == [1, 1, 1] and int(st.count) == 3
    assert st.sum.value().tolist() == [4.0, 9.0, 8.0]
    assert st.sumsq.value().tolist() == [10.0, 41.0, 40.0]
    assert st.min.tolist() == [1.0, 4.0, 2.0] and st.max.tolist() == [3.0, 5.0, 6.0]
    assert st.count_positive.tolist() == [2, 2, 2]
    relu = LayerState(3, 2, signed=False)  # no negative face: the minimum is computed by the statistics
    relu.add(values, torch.arange(3))
    assert relu.stats.min.tolist() == [1.0, 4.0, 2.0]


@pytest.mark.parametrize("scale", [1e-30, 1e-4, 1.0, 1e15, 1e30, 3e38])
def test_sums_are_exact_at_both_ends_of_the_float32_range(scale):
    """Batches of huge or tiny coefficients: the sums equal a float64 (exact rational) recomputation and do not
    depend on how the batches are grouped. The old int64 fixed point overflowed above ~8.7e12 and rounded
    sums of squares below ~1.2e-4 to 0."""
    g = torch.Generator().manual_seed(1)
    values = ((torch.rand(600, 4, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(torch.float32)
    assert torch.isfinite(values).all()
    batches = [values[i: i + 100] for i in range(0, 600, 100)]
    forward, backward = MemoryStats(4), MemoryStats(4)
    for b in batches:
        _add(forward, b)
    for b in reversed(batches):
        _add(backward, b)
    assert _state_equal(forward, backward)
    # each batch's partial is a float32 (or float64) sum, rounded once; the accumulation adds nothing to that
    wide = values.double()
    for got, want, size in ((forward.sum.value(), wide.sum(0), wide.abs().sum(0)),
                            (forward.sumsq.value(), wide.square().sum(0), wide.square().sum(0))):
        assert ((got - want).abs() <= 1e-6 * size).all(), (got, want)
    mean_square = forward.sumsq.value() / 600
    assert (mean_square > 0).all() and torch.isfinite(mean_square).all()
    np.testing.assert_allclose(mean_square.numpy(), values.double().square().mean(0).numpy(), rtol=1e-5)


def test_ten_to_the_ninth_positions_of_the_largest_bfloat16_value_do_not_overflow():
    big = torch.finfo(torch.bfloat16).max
    s = ExactSum(2, *MemoryStats.SUM_RANGE)
    q = ExactSum(2, *MemoryStats.SUMSQ_RANGE)
    per_batch = torch.tensor([big * 4096, -big * 4096], dtype=torch.float64)
    for _ in range(3):  # 3 batches, then the same state merged with itself up to 2**18 batches (> 1e9 positions)
        s.add(per_batch)
        q.add(per_batch.square())
    for _ in range(17):
        s.merge(s)
        q.merge(q)
    n = 3 * 2**17 * 4096
    assert n > 1e9
    torch.testing.assert_close(s.value(), torch.tensor([big * n, -big * n], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.isfinite(q.value()).all() and q.value()[0] == pytest.approx(big**2 * 4096**2 * 3 * 2**17)


def test_exact_sum_refuses_what_it_cannot_hold():
    s = ExactSum(1, -10, 40)
    with pytest.raises(FfkvError, match="exactly"):
        s.add(torch.tensor([2.0**-20], dtype=torch.float64))
    with pytest.raises(FfkvError, match="exceeds"):
        s.add(torch.tensor([2.0**100], dtype=torch.float64))
    s.add(torch.tensor([-3.0 * 2**-10], dtype=torch.float64))
    s.add(torch.tensor([2.0**35], dtype=torch.float64))
    assert s.value().item() == 2.0**35 - 3.0 * 2**-10
