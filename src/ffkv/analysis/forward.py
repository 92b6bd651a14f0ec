"""Re-running the model on chosen prefixes: the coefficients of one layer at each prefix's last position."""

from __future__ import annotations

import torch

from ..models import LoadedModel


class _Stop(Exception):
    pass


@torch.inference_mode()
def last_position_coefficients(model: LoadedModel, sequences: list[list[int]], layer: int,
                               batch_size: int = 64) -> torch.Tensor:
    """[len(sequences), d_ff] float32: the FFN coefficients of ``layer`` at the last token of each sequence.

    Sequences are sorted by length and right-padded (causal attention: padding after a position never
    affects it); the forward stops right after the hooked layer.
    """
    parts = model.parts
    out = torch.empty(len(sequences), parts.d_ff, dtype=torch.float32)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args):
        captured["m"] = args[0]
        raise _Stop

    handle = parts.ffn_out(layer).register_forward_pre_hook(hook)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            lengths = torch.tensor([len(sequences[i]) for i in idx])
            ids = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            try:
                parts.body(input_ids=ids.to(model.device), use_cache=False)
            except _Stop:
                pass
            m = captured.pop("m").reshape(ids.shape[0], ids.shape[1], -1)  # OPT hands its FFN [B*T, d_ff]
            rows = torch.arange(len(idx))
            out[torch.tensor(idx)] = m[rows, (lengths - 1).to(m.device)].float().cpu()
    finally:
        handle.remove()
    return out
