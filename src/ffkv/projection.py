"""Value vectors projected to the vocabulary: the tokens each memory's value promotes.

The positive face adds +v_i (m_i > 0) and promotes the top of v_i.E; the negative face adds -v_i
(m_i < 0) and promotes the top of -v_i.E, i.e. the bottom of v_i.E. Two projections: ``raw`` is the
paper's v.E; ``normed`` passes v through the final norm's gain (and centring, for LayerNorm) first, which
is what the model actually does to a direction before the unembedding.
"""

from __future__ import annotations

import torch

from .arch import ModelParts


@torch.inference_mode()
def project_values(parts: ModelParts, layer: int, n_top: int, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Top ``n_top`` token ids and logits per memory, for both faces and both projections."""
    values = parts.values(layer).detach().to(torch.float32)
    unembed = parts.unembedding.detach().to(torch.float32)
    n_top = min(n_top, unembed.shape[0])
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, values.shape[0], chunk):
        v = values[start: start + chunk]
        for kind, vecs in (("raw", v), ("normed", parts.through_final_norm(v))):
            logits = vecs @ unembed.T
            for face, signed in (("pos", logits), ("neg", -logits)):
                top = signed.topk(n_top, dim=1)
                out.setdefault(f"value_{kind}_{face}_ids", []).append(top.indices.to(torch.int32))
                out.setdefault(f"value_{kind}_{face}_logits", []).append(top.values)
    return {k: torch.cat(v).cpu().contiguous() for k, v in out.items()}
