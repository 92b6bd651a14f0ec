"""Running per-memory statistics with one protocol: add / merge / state_dict / load_state_dict.

Both accumulators are exact and associative, so a scan gives bit-identical results whatever the batch
order, the resumption point or the number of workers that split it:

* ``TopK`` packs (value, global position) into one int64 sort key: the float32 value mapped to an
  order-preserving int32 in the high bits, the *inverted* position in the low 31 bits. Larger key = larger
  value, then smaller position. Keys are unique, so ``torch.topk`` on them has no ties to break arbitrarily
  and the result is the deterministic top-k (value desc, position asc).
* ``MemoryStats`` keeps counts and min/max exactly and the sums in int64 fixed point (each batch's partial
  sum is rounded once), because float addition is not associative. The batch plan is fixed by the settings,
  so resuming and splitting over workers give bit-identical sums; a different ``--batch-tokens`` changes
  them at float32 precision only (top-k, counts, min and max do not change at all).
"""

from __future__ import annotations

import torch

POSITION_BITS = 31
MAX_POSITION = (1 << POSITION_BITS) - 1
EMPTY_KEY = torch.iinfo(torch.int64).min
SUM_SCALE = 2.0**20  # fixed-point resolution of the coefficient sums (|sum| < 8.7e12)
SUMSQ_SCALE = 2.0**12  # of the sums of squares (< 2.2e15)


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
        q = n // block
        pieces = []
        if q:
            head = values[: q * block].view(q, block, d)
            pieces.append(head.amax(1) if self.largest else head.amin(1))
        if n % block:
            tail = values[q * block:]
            pieces.append(tail.amax(0, keepdim=True) if self.largest else tail.amin(0, keepdim=True))
        block_extreme = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).to(torch.float32)
        column_extreme = block_extreme.amax(0) if self.largest else block_extreme.amin(0)
        signed_blocks = block_extreme if self.largest else -block_extreme  # [n_blocks, d], larger = better
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
        keep = signed >= bar[row_idx]
        pos_idx, row_idx, signed = pos_idx[keep], row_idx[keep], signed[keep]
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


class MemoryStats:
    """Per-memory count, count of positive coefficients, sum, sum of squares, min and max."""

    FIELDS = ("count", "count_positive", "sum_fx", "sumsq_fx", "min", "max")

    def __init__(self, n_rows: int, device: torch.device | str = "cpu"):
        z = dict(dtype=torch.int64, device=device)
        self.count = torch.zeros((), **z)
        self.count_positive = torch.zeros(n_rows, **z)
        self.sum_fx = torch.zeros(n_rows, **z)
        self.sumsq_fx = torch.zeros(n_rows, **z)
        self.min = torch.full((n_rows,), float("inf"), dtype=torch.float32, device=device)
        self.max = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=device)

    def add(self, values: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        """values [N, n_rows]; batch_min/max are its column extremes (computed once by the caller)."""
        self.count += values.shape[0]
        # Reductions over dim 0 with a dtype change are slow on CPU; these three are fast and exact
        # enough: 0/1 indicator sums are exact in float32, value sums are rounded to fixed point anyway.
        self.count_positive += values.sign().clamp_(min=0).sum(dim=0).to(torch.int64)
        s = values.sum(dim=0).double()
        q = values.square().sum(dim=0).double()
        self.sum_fx += torch.round(s * SUM_SCALE).to(torch.int64)
        self.sumsq_fx += torch.round(q * SUMSQ_SCALE).to(torch.int64)
        self.min = torch.minimum(self.min, batch_min.to(torch.float32))
        self.max = torch.maximum(self.max, batch_max.to(torch.float32))

    def merge(self, other: MemoryStats) -> None:
        for name in ("count", "count_positive", "sum_fx", "sumsq_fx"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(self.sum_fx.device))
        self.min = torch.minimum(self.min, other.min.to(self.min.device))
        self.max = torch.maximum(self.max, other.max.to(self.max.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.FIELDS:
            setattr(self, name, state[name].to(getattr(self, name).device).clone())


class LayerState:
    """What a scan keeps for one layer: the positive face, the negative face (signed FFNs only), statistics."""

    def __init__(self, d_ff: int, k: int, signed: bool, device: torch.device | str = "cpu"):
        self.pos = TopK(d_ff, k, largest=True, device=device)
        self.neg = TopK(d_ff, k, largest=False, device=device) if signed else None
        self.stats = MemoryStats(d_ff, device=device)

    def add(self, coefficients: torch.Tensor, positions: torch.Tensor) -> None:
        high = self.pos.add(coefficients, positions)
        low = self.neg.add(coefficients, positions) if self.neg is not None else coefficients.amin(dim=0)
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
