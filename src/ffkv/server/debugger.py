"""The prompt debugger of `ffkv serve`: one forward pass with every layer's memories exposed, interventions on
memory coefficients, and greedy generation under the same interventions.

Definitions, the same for every architecture (all at the last prompt position):

* coefficient m_i: the input of the FFN output projection ``parts.ffn_out(layer)``, after interventions;
  contribution of memory i: |m_i| * ||v_i||, the norm of what it adds to the FFN output.
* FFN output o: what the FFN adds to the residual stream -- the output of ``parts.ffn_added(layer)``: the MLP
  module (its output projection, bias included), OPT's fc2, or, for blocks that normalise the FFN output before
  adding it (Gemma 3's ``post_feedforward_layernorm``), the output of that norm.
* block output h: the hidden state the decoder block returns, i.e. the residual stream after the block.
* residual r = h - o: the residual stream just before the FFN output is added (for blocks with parallel
  attention, GPT-J and GPT-NeoX, that is the block input plus the attention output).

Each of r, o and h is read through the logit lens: the final norm, then the unembedding (``parts.logit_lens``).
h of the last layer therefore gives the model's own next-token ranking.

An intervention sets the coefficient of one memory at every position of the sequence: ``off`` sets it to 0,
``set`` to a given value. It is a forward pre-hook on the output projection that edits a copy of its input;
every hook is removed in ``finally``, so nothing persists after the call. Callers serialise calls (one model).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ModelParts


@dataclass(frozen=True)
class Intervention:
    layer: int
    key: int
    mode: str  # "off" | "set"
    value: float | None = None

    @property
    def coefficient(self) -> float:
        return 0.0 if self.mode == "off" else float(self.value)


def check_interventions(parts: ModelParts, interventions: list[Intervention], max_abs: float) -> None:
    """Raise ValueError with a readable message for an intervention the model cannot take."""
    for i, iv in enumerate(interventions):
        where = f"interventions[{i}]"
        if not 0 <= iv.layer < parts.n_layers:
            raise ValueError(f"{where}: layer {iv.layer} out of range: the model has layers 0-{parts.n_layers - 1}")
        if not 0 <= iv.key < parts.d_ff:
            raise ValueError(f"{where}: key {iv.key} out of range: layers have keys 0-{parts.d_ff - 1}")
        if iv.mode not in ("off", "set"):
            raise ValueError(f"{where}: mode must be 'off' or 'set'")
        if iv.mode == "set":
            if iv.value is None or not math.isfinite(iv.value) or abs(iv.value) > max_abs:
                raise ValueError(f"{where}: mode 'set' needs a finite value with |value| <= {max_abs:g}")


def _edits_by_layer(interventions: list[Intervention]) -> dict[int, dict[int, float]]:
    edits: dict[int, dict[int, float]] = {}
    for iv in interventions:  # a later intervention on the same memory wins
        edits.setdefault(iv.layer, {})[iv.key] = iv.coefficient
    return edits


def _last_position(output) -> torch.Tensor:
    """The last position's vector of a module's output or input, batch of one: [1, T, d] or, for modules that
    see flattened positions (OPT's fc1/fc2), [T, d]."""
    t = output[0] if isinstance(output, (tuple, list)) else output
    return t.reshape(-1, t.shape[-1])[-1].detach().float().clone()


class Hooks:
    """Context manager: coefficient edits on every intervened layer and, with ``capture=True``, the last
    position's coefficients, FFN output and block output of every layer. Always removes its hooks."""

    def __init__(self, parts: ModelParts, interventions: list[Intervention], capture: bool = False):
        self.parts = parts
        self.edits = _edits_by_layer(interventions)
        self.capture = capture
        self.coefficients: dict[int, torch.Tensor] = {}
        self.ffn: dict[int, torch.Tensor] = {}
        self.block: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def _pre_hook(self, layer: int):
        edits = self.edits.get(layer)
        keys = torch.tensor(sorted(edits)) if edits else None
        values = torch.tensor([edits[k] for k in sorted(edits)]) if edits else None

        def hook(module, args):
            m = args[0]
            if keys is not None:
                m = m.clone()
                m[..., keys.to(m.device)] = values.to(device=m.device, dtype=m.dtype)
            if self.capture:
                self.coefficients[layer] = _last_position(m)
            return (m, *args[1:]) if keys is not None else None
        return hook

    def _store(self, where: dict, layer: int):
        def hook(module, args, output):
            where[layer] = _last_position(output)
        return hook

    def __enter__(self) -> Hooks:
        try:
            for layer in range(self.parts.n_layers):
                if self.capture or layer in self.edits:
                    out = self.parts.ffn_out(layer)
                    self.handles.append(out.register_forward_pre_hook(self._pre_hook(layer)))
                if self.capture:
                    block = self.parts.blocks[layer]
                    self.handles.append(self.parts.ffn_added(layer).register_forward_hook(
                        self._store(self.ffn, layer)))
                    self.handles.append(block.register_forward_hook(self._store(self.block, layer)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _top(logits: torch.Tensor, k: int, token_texts: list[str]) -> list[dict]:
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]))
    return [{"token": token_texts[i] if i < len(token_texts) else f"<{i}>", "id": i, "prob": p,
             "logit": float(logits[i])}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.inference_mode()
def run_prompt(model: nn.Module, parts: ModelParts, input_ids: torch.Tensor, interventions: list[Intervention],
               top: int, value_norms: torch.Tensor, token_texts: list[str],
               memory_info: Callable[[int, int, float], dict]) -> dict:
    """One forward pass under ``interventions``; per layer the top memories by contribution and the logit lens
    of the residual before the FFN, the FFN output and their sum; the model's next-token distribution.
    ``memory_info(layer, key, coefficient)`` adds what is known of a memory (its top tokens, extremes)."""
    device = next(model.parameters()).device
    with Hooks(parts, interventions, capture=True) as hooks:
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0, -1]
    n = parts.n_layers
    h = torch.stack([hooks.block[layer] for layer in range(n)])
    o = torch.stack([hooks.ffn[layer] for layer in range(n)])
    r = h - o
    dtype = parts.unembedding.dtype
    lens = parts.logit_lens(torch.cat([r, o, h]).to(device=device, dtype=dtype)).float().cpu()
    intervened = _edits_by_layer(interventions)
    layers = []
    for layer in range(n):
        m = hooks.coefficients[layer].cpu()
        contribution = m.abs() * value_norms[layer]
        top_keys = contribution.topk(min(top, len(m))).indices.tolist()
        extra = [k for k in sorted(intervened.get(layer, {})) if k not in top_keys]
        memories = []
        for key in top_keys + extra:
            c = float(m[key])
            memories.append({"key": key, "coefficient": c, "contribution": float(contribution[key]),
                             "intervened": key in intervened.get(layer, {}), **memory_info(layer, key, c)})
        layers.append({"layer": layer, "top_memories": memories,
                       "residual_top": _top(lens[layer], top, token_texts),
                       "ffn_top": _top(lens[n + layer], top, token_texts),
                       "output_top": _top(lens[2 * n + layer], top, token_texts)})
    return {"layers": layers, "next_token_top": _top(logits.cpu(), top, token_texts)}


@torch.inference_mode()
def generate(model: nn.Module, parts: ModelParts, input_ids: torch.Tensor, interventions: list[Intervention],
             max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], str]:
    """Greedy continuation under ``interventions`` (they apply to the new tokens too). Returns the new token ids
    and why it stopped ('eos' or 'length')."""
    device = next(model.parameters()).device
    # transformers renamed past_key_values to cache (5.x); use whichever this version's forward takes
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    new: list[int] = []
    with Hooks(parts, interventions):
        out = model(input_ids=input_ids.to(device), use_cache=True)
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            if nxt in eos_ids:
                return new, "eos"
            if len(new) == max_new_tokens:
                break
            cache = getattr(out, "cache", None) if cache_arg == "cache" else out.past_key_values
            out = model(input_ids=torch.tensor([[nxt]], device=device), use_cache=True, **{cache_arg: cache})
    return new, "length"
