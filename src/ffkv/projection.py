"""Where a value or a residual vector meets the vocabulary: the one place that multiplies by the unembedding E.

Values: the positive face of memory i adds +v_i and promotes the top of v_i.E; the negative face adds -v_i and
promotes the bottom. ``raw`` is the paper's v.E; ``normed`` is v.diag(gamma).E, v through the final norm's gain (and
centring, for LayerNorm), what the model does to a direction before the unembedding. Residuals: the logit lens
final_norm(x).E. Products go in chunks of memories and, for top-token lists, of the vocabulary; work is in float32
(float64 for a float64 model; 16-bit weights are widened first).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .arch import ModelParts

MEMORY_CHUNK = 256
"""Memories per vocabulary product."""
VOCAB_CHUNK = 65536
"""Vocabulary columns per product when only top tokens are kept (a 262k vocabulary takes four)."""
KINDS = ("raw", "normed")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unembedding(parts: ModelParts, dtype: torch.dtype | None = None) -> torch.Tensor:
    """E as [vocab, d_model], detached, in ``dtype`` (default: the work dtype of the model)."""
    e = parts.unembedding.detach()
    return e.to(dtype or work_dtype(e.dtype))


def value_vectors(parts: ModelParts, layer: int, keys: torch.Tensor | list[int] | None = None, *,
                  normed: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """v_i of ``keys`` (default: all) as rows [n, d_model]; through the final norm's gain with ``normed``."""
    v = parts.values(layer).detach()
    if keys is not None:
        v = v[torch.as_tensor(keys, dtype=torch.long, device=v.device)]
    v = v.to(dtype or work_dtype(v.dtype))
    return parts.through_final_norm(v) if normed else v


def value_logits(parts: ModelParts, layer: int, *, normed: bool = False,
                 chunk: int = MEMORY_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """(first key of the chunk, v.E [chunk, vocab]) over all memories of a layer: the positive face's logits
    (the negative face's are their negation)."""
    values = value_vectors(parts, layer)
    e = unembedding(parts, values.dtype)
    for start in range(0, values.shape[0], chunk):
        v = values[start: start + chunk]
        yield start, (parts.through_final_norm(v) if normed else v) @ e.T


def top_both_faces(vectors: torch.Tensor, e: torch.Tensor, n: int,
                   vocab_chunk: int = VOCAB_CHUNK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Top ``n`` tokens of ``vectors @ e.T`` for each face: {'pos': (ids, logits), 'neg': (ids, logits)}, where
    the negative face's logits are those of -v (so both lists are best first). One product per vocabulary chunk
    serves both faces."""
    vocab = e.shape[0]
    n = min(n, vocab)
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"pos": [], "neg": []}
    for start in range(0, vocab, vocab_chunk):
        logits = vectors @ e[start: start + vocab_chunk].T
        for face, signed in (("pos", logits), ("neg", -logits)):
            top = signed.topk(min(n, signed.shape[1]), dim=1)
            found[face].append((top.indices + start, top.values))
    out = {}
    for face, chunks in found.items():  # several vocabulary chunks: the top n of their top n
        ids, vals = (torch.cat(x, dim=1) for x in zip(*chunks))
        top = vals.topk(n, dim=1) if len(chunks) > 1 else None
        out[face] = (ids, vals) if top is None else (ids.gather(1, top.indices), top.values)
    return out


@torch.inference_mode()
def project_values(parts: ModelParts, layer: int, n_top: int, chunk: int = MEMORY_CHUNK) -> dict[str, torch.Tensor]:
    """The atlas's value lists: top ``n_top`` token ids and logits per memory, both faces, both projections
    (``value_{raw|normed}_{pos|neg}_{ids|logits}``, float32 logits)."""
    values = value_vectors(parts, layer, dtype=torch.float32)
    e = unembedding(parts, torch.float32)
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, values.shape[0], chunk):
        v = values[start: start + chunk]
        for kind, vecs in (("raw", v), ("normed", parts.through_final_norm(v))):
            for face, (ids, logits) in top_both_faces(vecs, e, n_top).items():
                out.setdefault(f"value_{kind}_{face}_ids", []).append(ids.to(torch.int32))
                out.setdefault(f"value_{kind}_{face}_logits", []).append(logits)
    return {k: torch.cat(v).cpu().contiguous() for k, v in out.items()}


@torch.inference_mode()
def face_top_tokens(parts: ModelParts, layer: int, keys: list[int], face: str, n: int,
                    normed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n`` (ids, logits) of one face for a few memories, computed from the weights."""
    vecs = value_vectors(parts, layer, keys, normed=normed)
    return top_both_faces(vecs, unembedding(parts, vecs.dtype), n)[face]


@torch.inference_mode()
def value_extremes(parts: ModelParts, layer: int, chunk: int = MEMORY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each memory's own top token when it adds +v_i (argmax v_i.E) and when it adds -v_i (argmin), raw."""
    pos, neg = [], []
    for _, logits in value_logits(parts, layer, chunk=chunk):
        pos.append(logits.argmax(dim=1).cpu())
        neg.append(logits.argmin(dim=1).cpu())
    return torch.cat(pos), torch.cat(neg)


def logit_lens(parts: ModelParts, hidden: torch.Tensor) -> torch.Tensor:
    """Residual-stream states -> vocabulary logits through the final norm (the logit lens), in the model's dtype."""
    return parts.final_norm(hidden) @ parts.unembedding.T


class ResidualLens:
    """The logit lens, split so that lens(r), lens(o) and lens(r + o) cost two vocabulary projections.

    Every supported final norm is y = k(x) * t(x) + beta, with t linear (``parts.through_final_norm``: centring
    for LayerNorm, times the gain), k(x) > 0 a per-vector scale and beta the norm's bias. So
    lens(x) = k(x) * (t(x) @ E.T) + beta @ E.T, and t(r + o) @ E.T = t(r) @ E.T + t(o) @ E.T."""

    def __init__(self, parts: ModelParts, dtype: torch.dtype):
        self.parts = parts
        self.dtype = dtype
        self.unembed_t = unembedding(parts, dtype).T  # [d, vocab]
        zero = torch.zeros(1, parts.d_model, dtype=parts.unembedding.dtype, device=parts.unembedding.device)
        self.beta = parts.final_norm(zero).to(dtype)[0]
        self.beta_logits = self.beta @ self.unembed_t if bool(self.beta.any()) else None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t(x) in the work dtype, k(x) [B, 1])."""
        t = self.parts.through_final_norm(x.to(self.dtype))  # linear: in the work dtype (bf16 loses bits)
        y = self.parts.final_norm(x).to(self.dtype) - self.beta  # the module itself, in the model's dtype
        tt = (t * t).sum(dim=1, keepdim=True)
        k = torch.where(tt > 0, (y * t).sum(dim=1, keepdim=True) / tt.clamp_min(torch.finfo(self.dtype).tiny),
                        torch.zeros_like(tt))
        return t, k

    def logits(self, projected: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = projected * k
        return out if self.beta_logits is None else out + self.beta_logits

    def top(self, projected: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """argmax of the logits; without a norm bias the positive scale k cannot change it."""
        return projected.argmax(dim=1) if self.beta_logits is None else self.logits(projected, k).argmax(dim=1)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.final_norm(x).to(self.dtype) @ self.unembed_t
