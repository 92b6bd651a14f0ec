"""Running per-memory statistics with one protocol: add / merge / state_dict / load_state_dict.

Both accumulators are exact and associative, so a scan gives bit-identical results whatever the batch
order, the resumption point or the number of workers that split it:

* ``TopK`` packs (value, global position) into one int64 sort key: the float32 value mapped to an
  order-preserving int32 in the high bits, the *inverted* position in the low 31 bits. Larger key = larger
  value, then smaller position. Keys are unique, so ``torch.topk`` on them has no ties to break arbitrarily
  and the result is the deterministic top-k (value desc, position asc).
* ``MemoryStats`` keeps counts and min/max exactly and each batch's partial sums (rounded once) in an
  ``ExactSum``: integers of 30-bit limbs wide enough for every float32 number and its square, so adding the
  partials is exact and associative with no overflow and no rounding away of small values. The batch plan is
  fixed by the settings, so resuming and splitting over workers give bit-identical sums; a different
  ``--batch-tokens`` changes them at float32 precision only (top-k, counts, min and max do not change at all).

Non-finite coefficients (NaN, +-inf: a float16 overflow, a broken checkpoint) are never kept: the top-k and the
statistics cover the finite values, and ``MemoryStats.nonfinite`` counts the skipped ones per memory. Finding
them costs nothing on clean batches: a non-finite value makes its column's extreme or sum non-finite, and only
then is the batch masked.
"""

from __future__ import annotations

import math

import torch

from .errors import FfkvError

POSITION_BITS = 31
MAX_POSITION = (1 << POSITION_BITS) - 1
EMPTY_KEY = torch.iinfo(torch.int64).min


def _float_to_ordered_int(x: torch.Tensor) -> torch.Tensor:
    # + 0.0 turns -0.0 into +0.0: the two are equal values and must tie (then the smaller position wins);
    # GELU-family activations give -0.0 for very negative inputs.
    bits = (x.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _ordered_int_to_float(i: torch.Tensor) -> torch.Tensor:
    return (i ^ ((i >> 31) & 0x7FFFFFFF)).view(torch.float32)


def encode(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [..., N] float, positions [N] int64 (< 2**31) -> int64 keys [..., N]."""
    high = _float_to_ordered_int(values).to(torch.int64) << POSITION_BITS
    return high | (MAX_POSITION - positions)


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 values, int64 positions); empty slots give (nan, -1)."""
    empty = keys == EMPTY_KEY
    values = _ordered_int_to_float((keys >> POSITION_BITS).to(torch.int32))
    positions = MAX_POSITION - (keys & MAX_POSITION)
    return values.masked_fill(empty, float("nan")), positions.masked_fill(empty, -1)


class TopK:
    """The k largest (or, with ``largest=False``, smallest) values per row (memory) seen so far, with
    their global positions. The smallest values are kept as the largest of the negated values.

    ``add`` takes a batch as ``values [N, n_rows]`` (positions along dim 0, as the hooks produce it) and
    ``positions [N]``. Once the state is warm, most memories have no value in a batch above their current
    k-th value; only the rows that do are merged.
    """

    def __init__(self, n_rows: int, k: int, largest: bool = True, device: torch.device | str = "cpu"):
        self.k = k
        self.largest = largest
        self.keys = torch.full((n_rows, k), EMPTY_KEY, dtype=torch.int64, device=device)
        self.threshold = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=device)

    BLOCK = 16
    """Positions per block in the candidate filter (fewer in batches of under 32k positions)."""
    SPARSE_FRACTION = 0.05
    """Up to this share of elements in passing blocks, only those blocks are read again; above it (a young
    state), one comparison over the whole batch finds the candidates."""

    def add(self, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Merge a batch ``values [N, n_rows]`` at global ``positions [N]``; returns the batch's column
        max (column min for ``largest=False``), which the caller can reuse.

        Candidate filter: nothing below a row's bar can enter its top-k, where the bar is the larger of its
        current k-th value and the k-th largest of the batch's block maxima (k distinct elements of the batch
        reach it). Blocks of BLOCK positions whose max is below the bar are skipped; of the rest, only the
        elements >= the bar (an equal value can still win on position) are encoded and merged.
        """
        n, d = values.shape
        if n == 0:  # nothing to merge; the extreme of no values is -inf (+inf for the smallest)
            return torch.full((d,), float("-inf") if self.largest else float("inf"), dtype=values.dtype,
                              device=values.device)
        # smaller blocks for small batches, so that there are >= 2k of them and the batch's bar exists
        block = max(1, min(self.BLOCK, n // (2 * self.k)))
        block_extreme, column_extreme = self._extremes(values, block)
        if not bool(torch.isfinite(column_extreme).all()) and bool((bad := ~torch.isfinite(values)).any()):
            # a NaN or an infinity made a column's extreme non-finite (and would hide its block): every non-finite
            # value becomes one that never enters (an infinity on the wrong side, dropped below)
            values = values.masked_fill(bad, float("-inf") if self.largest else float("inf"))
            block_extreme, column_extreme = self._extremes(values, block)
        signed_blocks = block_extreme if self.largest else -block_extreme  # [n_blocks, d], larger = better
        return self._merge_candidates(values, positions, block, signed_blocks, column_extreme)

    def _extremes(self, values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block of ``block`` positions and per column: the max (min for ``largest=False``), float32."""
        n, d = values.shape
        q = n // block
        pieces = []
        if q:
            head = values[: q * block].view(q, block, d)
            pieces.append(head.amax(1) if self.largest else head.amin(1))
        if n % block:
            tail = values[q * block:]
            pieces.append(tail.amax(0, keepdim=True) if self.largest else tail.amin(0, keepdim=True))
        block_extreme = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).to(torch.float32)
        return block_extreme, block_extreme.amax(0) if self.largest else block_extreme.amin(0)

    def _merge_candidates(self, values, positions, block, signed_blocks, column_extreme) -> torch.Tensor:
        n, d = values.shape
        bar = self.threshold
        if signed_blocks.shape[0] >= self.k:
            bar = torch.maximum(bar, signed_blocks.T.topk(self.k, dim=1, sorted=False).values.amin(dim=1))
        hit_block, hit_row = torch.nonzero(signed_blocks >= bar, as_tuple=True)
        if hit_row.numel() == 0:
            return column_extreme
        if hit_row.numel() * block <= self.SPARSE_FRACTION * n * d:
            offsets = torch.arange(block, device=values.device)
            pos_idx = (hit_block[:, None] * block + offsets).flatten()
            row_idx = hit_row.repeat_interleave(block)
            inside = pos_idx < n
            pos_idx, row_idx = pos_idx[inside], row_idx[inside]
        else:
            mask = values >= bar if self.largest else values <= -bar
            pos_idx, row_idx = torch.nonzero(mask, as_tuple=True)
        signed = values[pos_idx, row_idx].to(torch.float32)
        signed = signed if self.largest else -signed
        keep = (signed >= bar[row_idx]) & (signed > float("-inf"))  # -inf: a masked non-finite value
        pos_idx, row_idx, signed = pos_idx[keep], row_idx[keep], signed[keep]
        if row_idx.numel() == 0:
            return column_extreme
        keys = encode(signed, positions[pos_idx])
        # lay the candidates out as a ragged [rows, max candidates] matrix padded with EMPTY_KEY
        order = torch.argsort(row_idx, stable=True)
        row_idx, keys = row_idx[order], keys[order]
        rows, inverse, counts = torch.unique_consecutive(row_idx, return_inverse=True, return_counts=True)
        slot = torch.arange(len(row_idx), device=values.device) - (torch.cumsum(counts, 0) - counts)[inverse]
        dense = torch.full((len(rows), int(counts.max())), EMPTY_KEY, dtype=torch.int64, device=values.device)
        dense[inverse, slot] = keys
        self._merge(rows, dense)
        return column_extreme

    def _merge(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        merged = torch.cat([self.keys.index_select(0, rows), keys], dim=1).topk(self.k, dim=1).values
        self.keys.index_copy_(0, rows, merged)
        self._refresh_threshold(rows)

    def _refresh_threshold(self, rows: torch.Tensor | None = None) -> None:
        kth = self.keys[:, -1] if rows is None else self.keys.index_select(0, rows)[:, -1]
        vals, _ = decode(kth)
        vals = vals.masked_fill(kth == EMPTY_KEY, float("-inf"))
        if rows is None:
            self.threshold = vals
        else:
            self.threshold.index_copy_(0, rows, vals)

    def merge(self, other: TopK) -> None:
        if other.keys.shape != self.keys.shape:
            raise ValueError(f"cannot merge top-k states of shapes {other.keys.shape} and {self.keys.shape}")
        self.keys = torch.cat([self.keys, other.keys.to(self.keys.device)], 1).topk(self.k, dim=1).values
        self._refresh_threshold()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n_rows, k] float32, positions [n_rows, k] int64), best first; empty = (nan, -1)."""
        values, positions = decode(self.keys)
        return (values if self.largest else -values), positions

    @classmethod
    def from_result(cls, values: torch.Tensor, positions: torch.Tensor, largest: bool = True) -> TopK:
        """Rebuild the state from a ``result()`` (as stored in an atlas)."""
        topk = cls(values.shape[0], values.shape[1], largest=largest, device=values.device)
        keys = encode(values if largest else -values, positions.clamp(min=0))
        topk.keys = keys.masked_fill(positions < 0, EMPTY_KEY)
        topk._refresh_threshold()
        return topk

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        keys = state["keys"].to(self.keys.device)
        if keys.shape != self.keys.shape:
            raise ValueError(f"top-k state has shape {tuple(keys.shape)}, expected {tuple(self.keys.shape)}")
        self.keys = keys.clone()
        self._refresh_threshold()


class ExactSum:
    """Per-row sums of float numbers kept exactly: integers in base 2**30 (int64 limbs) from 2**``low`` up, so
    that addition is exact and associative. Canonical after every operation (limbs below the top in
    [0, 2**30), the top one signed), so equal sums have equal states whatever the order they were added in.
    ``low`` must divide every number added (float32 numbers: -149; squares of float32 numbers: -298) and
    ``bits`` bound the magnitude (2**(low + bits)); a number outside is refused, not rounded."""

    LIMB = 30

    def __init__(self, n_rows: int, low: int, bits: int, device: torch.device | str = "cpu"):
        self.low = low
        self.limbs = torch.zeros(n_rows, math.ceil(bits / self.LIMB) + 1, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add x [n_rows] (float64, finite) to each row."""
        mantissa, exponent = torch.frexp(x.to(torch.float64))
        m = (mantissa * 2.0**53).to(torch.int64)  # exact: x = m * 2**(exponent - 53)
        shift = (exponent.to(torch.int64) - 53 - self.low).masked_fill(m == 0, 0)
        low_bits = (-shift).clamp(min=0)
        if bool((m.abs() & ((1 << low_bits) - 1)).any()):
            raise FfkvError(f"a statistic below 2**{self.low} cannot be added exactly")
        m, shift = m.abs() >> low_bits, shift.clamp(min=0)  # drop trailing zero bits below 2**low
        limb, r = shift // self.LIMB, shift % self.LIMB
        if bool((limb + 2 >= self.limbs.shape[1]).any()):
            raise FfkvError(f"a statistic of magnitude {float(x.abs().max()):.3g} exceeds the exact accumulator")
        sign = torch.sign(mantissa).to(torch.int64)
        mask = (1 << self.LIMB) - 1
        rest = m >> (self.LIMB - r)
        for i, chunk in enumerate(((m & ((1 << (self.LIMB - r)) - 1)) << r, rest & mask, rest >> self.LIMB)):
            self.limbs.scatter_add_(1, (limb + i)[:, None], (sign * chunk)[:, None])
        self._carry()

    def merge(self, other: ExactSum) -> None:
        self.limbs += other.limbs.to(self.limbs.device)
        self._carry()

    def _carry(self) -> None:
        for i in range(self.limbs.shape[1] - 1):
            carry = self.limbs[:, i] >> self.LIMB  # floor: negative limbs borrow from the next
            self.limbs[:, i] -= carry << self.LIMB
            self.limbs[:, i + 1] += carry

    def value(self) -> torch.Tensor:
        """The sums as float64 (rounded once per limb, from the top)."""
        out = torch.zeros(self.limbs.shape[0], dtype=torch.float64, device=self.limbs.device)
        for i in reversed(range(self.limbs.shape[1])):
            out += self.limbs[:, i].to(torch.float64) * 2.0 ** (self.low + self.LIMB * i)
        return out


class MemoryStats:
    """Per-memory count, count of positive coefficients, count of non-finite (skipped) coefficients, exact sum
    and sum of squares, min and max. ``count`` is the number of positions; memory i has ``count - nonfinite[i]``
    finite coefficients."""

    FIELDS = ("count", "count_positive", "nonfinite", "sum_limbs", "sumsq_limbs", "min", "max")
    SUM_RANGE = (-149, 340)
    """(lowest bit, bits) of the sums: every float32 value, summed over 2**60 positions."""
    SUMSQ_RANGE = (-298, 620)
    """Of the sums of squares: every square of a float32 value (computed in float64 where float32 would not
    hold it), summed over 2**60 positions."""

    def __init__(self, n_rows: int, device: torch.device | str = "cpu"):
        z = dict(dtype=torch.int64, device=device)
        self.count = torch.zeros((), **z)
        self.count_positive = torch.zeros(n_rows, **z)
        self.nonfinite = torch.zeros(n_rows, **z)
        self.sum = ExactSum(n_rows, *self.SUM_RANGE, device=device)
        self.sumsq = ExactSum(n_rows, *self.SUMSQ_RANGE, device=device)
        self.min = torch.full((n_rows,), float("inf"), dtype=torch.float32, device=device)
        self.max = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=device)

    def add(self, values: torch.Tensor, batch_min: torch.Tensor | None, batch_max: torch.Tensor) -> None:
        """values [N, n_rows]; batch_min/max are the column extremes of its finite values (computed once by the
        caller's top-k; ``batch_min`` None: computed here)."""
        self.count += values.shape[0]
        if batch_min is None:
            batch_min = values.amin(dim=0)
            if not bool(torch.isfinite(batch_min).all()):
                batch_min = values.masked_fill(~torch.isfinite(values), float("inf")).amin(dim=0)
        # Reductions over dim 0 with a dtype change are slow on CPU: sums in float32, widened only for the rare
        # batch whose float32 sum of squares overflows or loses precision (|values| > ~1e19 or < ~1e-15)
        s, q = values.sum(dim=0), values.square().sum(dim=0)
        if not bool(torch.isfinite(s).all() and torch.isfinite(q).all()):
            bad = ~torch.isfinite(values)
            self.nonfinite += bad.sum(dim=0)
            values = values.masked_fill(bad, 0.0)
            s, q = values.sum(dim=0), values.square().sum(dim=0)
        nonzero = batch_max != 0 if batch_min is None else (batch_max != 0) | (batch_min != 0)
        if not bool(torch.isfinite(s).all() and torch.isfinite(q).all() and ((q > 2.0**-100) | ~nonzero).all()):
            wide = values.to(torch.float64)  # its sums are multiples of 2**-149 and 2**-298 too: still exact
            s, q = wide.sum(dim=0), wide.square().sum(dim=0)
        self.count_positive += values.sign().clamp_(min=0).sum(dim=0).to(torch.int64)
        self.sum.add(s)
        self.sumsq.add(q)
        self.min = torch.minimum(self.min, batch_min.to(torch.float32))
        self.max = torch.maximum(self.max, batch_max.to(torch.float32))

    def merge(self, other: MemoryStats) -> None:
        for name in ("count", "count_positive", "nonfinite"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(self.count.device))
        self.sum.merge(other.sum)
        self.sumsq.merge(other.sumsq)
        self.min = torch.minimum(self.min, other.min.to(self.min.device))
        self.max = torch.maximum(self.max, other.max.to(self.max.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {name: getattr(self, name) for name in ("count", "count_positive", "nonfinite", "min", "max")}
        return dict(d, sum_limbs=self.sum.limbs, sumsq_limbs=self.sumsq.limbs)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("count", "count_positive", "nonfinite", "min", "max"):
            setattr(self, name, state[name].to(getattr(self, name).device).clone())
        self.sum.limbs = state["sum_limbs"].to(self.sum.limbs.device).clone()
        self.sumsq.limbs = state["sumsq_limbs"].to(self.sumsq.limbs.device).clone()



class LayerState:
    """What a scan keeps for one layer: the positive face, the negative face (signed FFNs only), statistics."""

    def __init__(self, d_ff: int, k: int, signed: bool, device: torch.device | str = "cpu"):
        self.pos = TopK(d_ff, k, largest=True, device=device)
        self.neg = TopK(d_ff, k, largest=False, device=device) if signed else None
        self.stats = MemoryStats(d_ff, device=device)

    def add(self, coefficients: torch.Tensor, positions: torch.Tensor) -> None:
        high = self.pos.add(coefficients, positions)
        low = self.neg.add(coefficients, positions) if self.neg is not None else None
        self.stats.add(coefficients, low, high)

    def merge(self, other: LayerState) -> None:
        self.pos.merge(other.pos)
        if self.neg is not None:
            self.neg.merge(other.neg)
        self.stats.merge(other.stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {f"pos.{k}": v for k, v in self.pos.state_dict().items()}
        if self.neg is not None:
            d.update({f"neg.{k}": v for k, v in self.neg.state_dict().items()})
        d.update({f"stats.{k}": v for k, v in self.stats.state_dict().items()})
        return d

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def sub(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.pos.load_state_dict(sub("pos."))
        if self.neg is not None:
            self.neg.load_state_dict(sub("neg."))
        self.stats.load_state_dict(sub("stats."))
