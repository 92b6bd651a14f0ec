"""The one forward pass with hooks. Every part of ffkv that runs the model and reads or edits its FFN memories
(the scan, token removal, the aggregation experiment, the prompt debugger) goes through ``Capture``; nothing else
registers a hook.

What is read, per hooked layer l, at the selected positions of a batch:

* ``m[l]``: the coefficients, the input of the FFN output projection ``parts.ffn_out(l)`` (after interventions);
* ``o[l]``: what the FFN adds to the residual stream, the output of ``parts.ffn_added(l)``: the MLP module (bias
  included), OPT's fc2, or the norm that post-normalises the FFN output (Gemma 3's ``post_feedforward_layernorm``);
* ``h[l]``: the block's output, the residual stream after the block; the residual *before* the FFN is
  ``r[l] = h[l] - o[l]`` (for parallel blocks, GPT-J and GPT-NeoX: the block input plus the attention output).

Batches are right-padded and run without an attention mask: with causal attention a position never sees the
padding after it, so every real position gets exactly its prefix's values. Positions are selected as flat indices
``row * T + column`` of the [B, T] batch, which also addresses OPT's FFN, whose input is flattened to [B * T, .].
The forward stops right after the last hook it needs (nothing of the model above it runs). Hooks are removed in
``finally``: nothing persists after the ``with`` block.

A forward may continue a KV cache (``run(..., cache=...)``): the batch is then the next tokens of the cached
prefixes, and flat positions index that batch only. A forward stopped early leaves the cache updated up to the layer
where it stopped, so pass a copy of a cache that is used again.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .arch import ModelParts, check_memory
from .errors import FfkvError


@dataclass(frozen=True)
class Intervention:
    """Set the coefficient of memory ``key`` of ``layer`` at every position, or only at the flat ``positions``
    (row * T + column) of the batch: ``off`` sets it to 0, ``set`` to ``value``."""

    layer: int
    key: int
    mode: str  # "off" | "set"
    value: float | None = None
    positions: tuple[int, ...] | None = None
    """Flat positions of the batch where the edit applies; None: every position."""

    @property
    def coefficient(self) -> float:
        return 0.0 if self.mode == "off" else float(self.value)


def check_interventions(parts: ModelParts, interventions: Sequence[Intervention], max_abs: float) -> None:
    """Raise FfkvError with a readable message for an intervention the model cannot take."""
    for i, iv in enumerate(interventions):
        where = f"interventions[{i}]"
        try:
            check_memory(iv.layer, iv.key, layers=range(parts.n_layers), d_ff=parts.d_ff, of="model")
        except FfkvError as exc:
            raise FfkvError(f"{where}: {exc}") from None
        if iv.mode not in ("off", "set"):
            raise FfkvError(f"{where}: mode must be 'off' or 'set'")
        if iv.mode == "set":
            if iv.value is None or not math.isfinite(iv.value) or abs(iv.value) > max_abs:
                raise FfkvError(f"{where}: mode 'set' needs a finite value with |value| <= {max_abs:g}")
        if iv.positions is not None and not all(isinstance(p, int) and p >= 0 for p in iv.positions):
            raise FfkvError(f"{where}: positions must be flat indices >= 0")


def cache_keyword(module: torch.nn.Module) -> str:
    """The name under which this transformers version's forward takes a KV cache (5.x renamed
    ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward with ``use_cache=True`` returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class StopForward(Exception):
    """Raised by the last hook a capture needs, so that the rest of the model does not run."""


def pad_right(rows: Sequence[Sequence[int] | np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """Right-padded input ids [B, T] (pad id 0: causal attention never lets a real position see it) and the
    lengths of the rows."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : lengths[i]] = r
    return torch.from_numpy(ids), lengths


def last_positions(lengths: np.ndarray, width: int) -> torch.Tensor:
    """Flat indices (row * width + column) of each row's last real position."""
    return torch.from_numpy(np.arange(len(lengths)) * width + lengths - 1)


def pack_sorted(lengths, batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Greedy batches over items sorted by ascending length: a batch closes when one more item would pad
    it past ``batch_tokens`` (rows x longest) or ``max_batch`` rows. Returns lists of item indices."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i, length in enumerate(lengths):
        if current and ((len(current) + 1) * int(length) > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Capture:
    """Hooks on the FFNs of ``layers``: a context manager; ``run`` does one body forward with early exit.

    Kept per layer, [selected positions, width] in the model's dtype: ``m``, and ``o`` / ``h`` with ``ffn_output`` /
    ``block_output``. With ``on_coefficients(layer, m)`` the coefficients go to that callback as soon as they exist
    instead of being kept (the scan streams them into its statistics).
    ``interventions`` edit coefficients of every forward run inside the block, including forwards the caller runs
    itself (full model, generation); pass ``stop=False`` for those. Edits at given positions are applied after the
    edits at every position; a later intervention on the same memory (and position) wins."""

    def __init__(self, parts: ModelParts, layers: Iterable[int] = (), *, ffn_output: bool = False,
                 block_output: bool = False,
                 on_coefficients: Callable[[int, torch.Tensor], None] | None = None,
                 interventions: Iterable[Intervention] = (), stop: bool = True):
        self.parts = parts
        self.layers = sorted(set(layers))
        self.want_o, self.want_h = ffn_output, block_output
        self.on_coefficients = on_coefficients
        self.edits: dict[int, dict[int, float]] = {}  # layer -> key -> coefficient at every position
        self.point_edits: dict[int, dict[tuple[int, int], float]] = {}  # layer -> (flat position, key) -> coefficient
        for iv in interventions:  # a later intervention on the same memory wins
            if iv.positions is None:
                self.edits.setdefault(iv.layer, {})[iv.key] = iv.coefficient
            else:
                for position in iv.positions:
                    self.point_edits.setdefault(iv.layer, {})[(position, iv.key)] = iv.coefficient
        last = self.layers[-1] if self.layers and stop else None
        # the hook that runs last in the last layer ends the forward
        self._stop_at = (last, "h" if block_output else "o" if ffn_output else "m") if last is not None else None
        self.m, self.o, self.h = {}, {}, {}  # layer -> tensor, renewed by every run
        self._select: torch.Tensor | None = None
        self._select_on: dict[torch.device, torch.Tensor] = {}
        self._handles: list = []

    # -- selection ---------------------------------------------------------------------------------------
    def select(self, flat_index: torch.Tensor | None) -> None:
        """Keep only these flat positions (row * T + column) of the next forwards; None keeps all."""
        self._select = flat_index
        self._select_on = {}

    def _pick(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self._select is None:
            return flat
        index = self._select_on.get(flat.device)
        if index is None:  # layers may sit on several GPUs (device_map)
            index = self._select_on[flat.device] = self._select.to(flat.device)
        return flat.index_select(0, index)

    # -- hooks -------------------------------------------------------------------------------------------
    def _coefficient_hook(self, layer: int):
        edits = self.edits.get(layer)
        keys = torch.tensor(sorted(edits)) if edits else None
        values = torch.tensor([edits[k] for k in sorted(edits)]) if edits else None
        points = self.point_edits.get(layer)
        if points:
            point_rows = torch.tensor([p for p, _ in points])
            point_keys = torch.tensor([k for _, k in points])
            point_values = torch.tensor(list(points.values()))
        read = layer in self.layers
        stop = self._stop_at == (layer, "m")
        edit = keys is not None or bool(points)

        def hook(module, args):
            m = args[0]
            if edit:
                m = m.clone(memory_format=torch.contiguous_format)
            if keys is not None:
                m[..., keys.to(m.device)] = values.to(device=m.device, dtype=m.dtype)
            if points:
                flat = m.view(-1, m.shape[-1])  # a view: writes into m
                if int(point_rows.max()) >= flat.shape[0]:
                    raise FfkvError(f"an intervention at flat position {int(point_rows.max())} of layer {layer}, "
                                    f"but the batch has {flat.shape[0]} positions")
                flat[point_rows.to(m.device), point_keys.to(m.device)] = point_values.to(device=m.device,
                                                                                         dtype=m.dtype)
            if read:
                picked = self._pick(m)
                if self.on_coefficients is not None:
                    self.on_coefficients(layer, picked)
                else:
                    self.m[layer] = picked
            if stop:
                raise StopForward
            return (m, *args[1:]) if edit else None
        return hook

    def _output_hook(self, name: str, layer: int, stop: bool):
        def hook(module, args, output):  # looks ``self.o`` / ``self.h`` up per call: ``run`` renews them
            getattr(self, name)[layer] = self._pick(output[0] if isinstance(output, (tuple, list)) else output)
            if stop:
                raise StopForward
        return hook

    def __enter__(self) -> Capture:
        parts = self.parts
        try:
            for layer in sorted(set(self.layers) | set(self.edits) | set(self.point_edits)):
                self._handles.append(parts.ffn_out(layer).register_forward_pre_hook(self._coefficient_hook(layer)))
                if layer not in self.layers:
                    continue
                if self.want_o:
                    self._handles.append(parts.ffn_added(layer).register_forward_hook(
                        self._output_hook("o", layer, self._stop_at == (layer, "o"))))
                if self.want_h:
                    self._handles.append(parts.blocks[layer].register_forward_hook(
                        self._output_hook("h", layer, self._stop_at == (layer, "h"))))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- running -----------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, select: torch.Tensor | None = None, cache=None) -> Capture:
        """One forward of the model body on right-padded ``input_ids`` [B, T], stopping after the last hook
        needed; keeps the flat positions ``select`` (None = all). With ``cache`` (the KV cache of B prefixes,
        updated in place) ``input_ids`` continue those prefixes. Returns self (read ``m``, ``o``, ``h``)."""
        self.select(select)
        self.m, self.o, self.h = {}, {}, {}
        body = self.parts.body
        with_cache = {} if cache is None else {cache_keyword(body): cache}
        try:
            body(input_ids=input_ids, use_cache=cache is not None, **with_cache)
        except StopForward:
            pass
        return self


@torch.inference_mode()
def last_position_coefficients(parts: ModelParts, sequences: Sequence[Sequence[int]], layers: Sequence[int],
                               keys: Sequence[int], batch_tokens: int = 2048, max_batch: int = 64,
                               layer_group: int = 5, device=None) -> torch.Tensor:
    """[len(sequences)] float32: the coefficient of memory ``keys[i]`` of layer ``layers[i]`` at the last token of
    ``sequences[i]``. The sequences of all layers share one pass: within groups of ``layer_group`` consecutive
    layers they are sorted by length and packed into batches of at most ``batch_tokens`` padded tokens and
    ``max_batch`` rows; each batch stops after the highest layer it needs (so little padding, little extra depth)."""
    out = torch.empty(len(sequences), dtype=torch.float32)
    device = device if device is not None else parts.unembedding.device
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i)):
        groups.setdefault(layers[i] // layer_group, []).append(i)
    for members in groups.values():
        for batch in pack_sorted([len(sequences[i]) for i in members], batch_tokens, max_batch):
            idx = [members[j] for j in batch]
            ids, lengths = pad_right([sequences[i] for i in idx])
            with Capture(parts, {layers[i] for i in idx}) as cap:
                cap.run(ids.to(device), last_positions(lengths, ids.shape[1]))
            for row, i in enumerate(idx):
                out[i] = cap.m[layers[i]][row, keys[i]].float().cpu()
    return out
