"""The prompt debugger of `ffkv serve`: one forward pass with every layer's memories exposed, interventions on
memory coefficients, and greedy generation under the same interventions.

At the last prompt position, per layer: the coefficients m, the FFN output o, the block output h and the residual before
the FFN r = h - o, as ``capture`` defines them; the contribution of memory i is the norm of what it adds to the residual
stream, |m_i| * ||a_i|| * s with a_i its value as added and s the scale the example's memories share
(``ModelParts.as_added``, ``added_scale``: ||v_i|| and 1 but for Gemma 3's post-FFN norm). r, o and h are read through
the logit lens (``projection.logit_lens``), so h of the last layer gives the model's own next-token ranking.
Interventions are ``capture.Intervention``s; callers serialise calls (one model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..arch import ModelParts
from ..capture import Capture, Intervention, cache_keyword, check_interventions, returned_cache
from ..projection import logit_lens

__all__ = ["Intervention", "added_value_norms", "check_interventions", "generate", "run_prompt"]


def _top(logits: torch.Tensor, k: int, token_texts: list[str]) -> list[dict]:
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]))
    return [{"token": token_texts[i] if i < len(token_texts) else f"<{i}>", "id": i, "prob": p,
             "logit": float(logits[i])}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.inference_mode()
def added_value_norms(parts: ModelParts) -> torch.Tensor:
    """||a_i|| of every memory, [layers, d_ff] float32 on the CPU: the norms of the values as the model adds them."""
    return torch.stack([parts.added_values(layer).float().norm(dim=1) for layer in range(parts.n_layers)]).cpu()


@torch.inference_mode()
def run_prompt(model: nn.Module, parts: ModelParts, input_ids: torch.Tensor, interventions: list[Intervention],
               top: int, value_norms: torch.Tensor, token_texts: list[str],
               memory_info: Callable[[int, int, float], dict]) -> dict:
    """One forward pass under ``interventions``; per layer the top memories by contribution and the logit lens
    of the residual before the FFN, the FFN output and their sum; the model's next-token distribution.
    ``value_norms``: ``added_value_norms(parts)``. ``memory_info(layer, key, coefficient)`` adds what is known of
    a memory (its top tokens, extremes)."""
    device = next(model.parameters()).device
    n = parts.n_layers
    with Capture(parts, range(n), ffn_output=True, block_output=True, interventions=interventions,
                 stop=False) as capture:
        capture.select(torch.tensor([input_ids.shape[1] - 1]))  # the last position (batch of one)
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0, -1]
    h = torch.cat([capture.h[layer] for layer in range(n)]).float()
    o = torch.cat([capture.o[layer] for layer in range(n)]).float()
    r = h - o
    dtype = parts.unembedding.dtype
    lens = logit_lens(parts, torch.cat([r, o, h]).to(device=device, dtype=dtype)).float().cpu()
    intervened: dict[int, set[int]] = {}
    for iv in interventions:
        intervened.setdefault(iv.layer, set()).add(iv.key)
    layers = []
    for layer in range(n):
        values = parts.values(layer)
        scale = float(parts.added_scale(layer, capture.m[layer][0].to(values.dtype) @ values))
        m = capture.m[layer][0].float().cpu()
        contribution = m.abs() * value_norms[layer] * scale
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
    cache_arg = cache_keyword(model)
    new: list[int] = []
    with Capture(parts, interventions=interventions, stop=False):
        out = model(input_ids=input_ids.to(device), use_cache=True)
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            if nxt in eos_ids:
                return new, "eos"
            if len(new) == max_new_tokens:
                break
            cache = returned_cache(out)
            out = model(input_ids=torch.tensor([[nxt]], device=device), use_cache=True, **{cache_arg: cache})
    return new, "length"
