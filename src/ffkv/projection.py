"""Where a value or a residual vector meets the vocabulary: the one place that multiplies by the unembedding E.

Values: the positive face of memory i adds +v_i and promotes the top of v_i.E; the negative face adds -v_i and promotes
the bottom. v_i here is the value *as the model adds it* (``ModelParts.as_added``: the weight's v_i, or gain * v_i after
Gemma 3's post-FFN norm). ``raw`` is the paper's v.E; ``normed`` is v.diag(gamma).E, v through the final norm's gain
(and centring, for LayerNorm), what the model does to a direction before the unembedding. Residuals: the logit lens
final_norm(x).E. Products go in chunks of memories and, for top-token lists, of the vocabulary; work is in float32
(float64 for a float64 model; 16-bit weights are widened first). Top-token lists read only the best blocks of each row
of logits, and equal the whole row's topk byte for byte (``_screened_top``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .arch import ModelParts

MEMORY_CHUNK = 256
"""Memories per vocabulary product."""
VOCAB_CHUNK = 65536
"""Vocabulary columns per product when only top tokens are kept (a 262k vocabulary takes four)."""
PRODUCT_LOGITS = 2**27
"""Most logits of one product in ``project_values`` on a CPU (512 MiB of float32)."""
SCREEN_BLOCK = 256
"""Widest vocabulary block of the top-token screen (see ``_screened_top``)."""
KINDS = ("raw", "normed")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unembedding(parts: ModelParts, dtype: torch.dtype | None = None) -> torch.Tensor:
    """E as [vocab, d_model], detached, in ``dtype`` (default: the work dtype of the model)."""
    e = parts.unembedding.detach()
    return e.to(dtype or work_dtype(e.dtype))


def value_vectors(parts: ModelParts, layer: int, keys: torch.Tensor | list[int] | None = None, *,
                  normed: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """v_i of ``keys`` (default: all) as the model adds them (``ModelParts.as_added``), rows [n, d_model]; through
    the final norm's gain with ``normed``."""
    v = parts.values(layer).detach()
    if keys is not None:
        v = v[torch.as_tensor(keys, dtype=torch.long, device=v.device)]
    v = parts.as_added(layer, v.to(dtype or work_dtype(v.dtype)))
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


def _full_top(logits: torch.Tensor, n: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, values) of the top ``n`` of ``logits`` (largest) or of ``-logits`` (not largest): the reference."""
    top = (logits if largest else -logits).topk(min(n, logits.shape[1]), dim=1)
    return top.indices, top.values


def _screened_top(logits: torch.Tensor, n: int, largest: bool, block: int,
                  redo: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_full_top`` byte for byte, reading about n + 1 blocks of ``block`` columns per row instead of the row,
    and whether each row's top holds a NaN.

    The n + 1 blocks with the best maxima (largest; else minima) hold n + 1 distinct elements at least as good as
    any element outside them. So when the top n + 1 of those blocks' elements are strictly ordered, every other
    element is strictly worse than the n-th: the top n is unique and any exact top-k returns it. Rows with a tie
    there, or ``redo`` (a NaN, which sorts as the largest), take the full row."""
    rows, width = logits.shape
    full = width // block * block
    blocks = logits[:, :full].unflatten(1, (-1, block))
    bounds = blocks.amax(dim=2) if largest else blocks.amin(dim=2)  # both propagate NaN
    chosen = bounds.topk(n + 1, dim=1, largest=largest).indices  # [rows, n + 1] block numbers
    cand = blocks[torch.arange(rows, device=logits.device)[:, None], chosen].flatten(1)
    if full < width:  # the ragged last columns are always candidates
        cand = torch.cat([cand, logits[:, full:]], dim=1)
    top = cand.topk(n + 1, dim=1, largest=largest)
    at, vals = top.indices, top.values
    inside = (n + 1) * block
    ids = torch.where(at < inside, chosen.gather(1, (at // block).clamp_max(n)) * block + at % block,
                      at - inside + full)
    nan = vals[:, 0].isnan()  # a NaN anywhere in the row is the largest: in its block's max, first here
    again = ~((vals[:, :-1] > vals[:, 1:]) if largest else (vals[:, :-1] < vals[:, 1:])).all(dim=1)
    again = again | nan if redo is None else again | redo
    ids, vals = ids[:, :n], vals[:, :n]
    if not largest:
        vals = -vals  # the negative face's logits are those of -v (negation is exact)
    if bool(again.any()):
        rows_again = again.nonzero().squeeze(1)
        ids[rows_again], vals[rows_again] = _full_top(logits[rows_again], n, largest)
    return ids, vals, nan


def _faces_top(logits: torch.Tensor, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both faces' top ``n`` (ids, logits) of one product [rows, width], equal to ``_full_top`` of each."""
    rows, width = logits.shape
    n = min(n, width)
    block = SCREEN_BLOCK
    while block > 16 and width // block < 4 * (n + 1):
        block //= 2
    if width // block < 4 * (n + 1) or rows == 0:
        return {"pos": _full_top(logits, n, True), "neg": _full_top(logits, n, False)}
    pos_ids, pos_vals, nan = _screened_top(logits, n, True, block)
    neg_ids, neg_vals, _ = _screened_top(logits, n, False, block, redo=nan)
    return {"pos": (pos_ids, pos_vals), "neg": (neg_ids, neg_vals)}


class ProductBuffer:
    """One reused block of memory for the products of ``top_both_faces``. A fresh product of a 262k vocabulary
    chunk is hundreds of MiB, which the allocator maps anew, and the kernel faults in page by page, every time
    (tens of millions of page faults over one atlas); written into this block, the pages stay mapped."""

    def __init__(self):
        self._flat: torch.Tensor | None = None

    def product(self, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        """a @ b_t as a contiguous [rows, cols] tensor in the buffer, valid until the next call."""
        size = a.shape[0] * b_t.shape[1]
        flat = self._flat
        if flat is None or flat.numel() < size or flat.dtype != a.dtype or flat.device != a.device:
            flat = self._flat = None  # free the old block first
            flat = self._flat = torch.empty(size, dtype=a.dtype, device=a.device)
        return torch.mm(a, b_t, out=flat[:size].view(a.shape[0], b_t.shape[1]))


def top_both_faces(vectors: torch.Tensor, e: torch.Tensor, n: int, vocab_chunk: int = VOCAB_CHUNK,
                   buffer: ProductBuffer | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Top ``n`` tokens of ``vectors @ e.T`` for each face: {'pos': (ids, logits), 'neg': (ids, logits)}, where
    the negative face's logits are those of -v (so both lists are best first). One product per vocabulary chunk
    serves both faces; ``buffer`` holds the products (pass one to reuse it across calls)."""
    vocab = e.shape[0]
    n = min(n, vocab)
    buffer = buffer or ProductBuffer()
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"pos": [], "neg": []}
    for start in range(0, vocab, vocab_chunk):
        logits = buffer.product(vectors, e[start: start + vocab_chunk].T)
        for face, (ids, vals) in _faces_top(logits, n).items():
            found[face].append((ids + start, vals))
    out = {}
    for face, chunks in found.items():  # several vocabulary chunks: the top n of their top n
        ids, vals = (torch.cat(x, dim=1) for x in zip(*chunks))
        top = vals.topk(n, dim=1) if len(chunks) > 1 else None
        out[face] = (ids, vals) if top is None else (ids.gather(1, top.indices), top.values)
    return out


def product_rows(n_memories: int, vocab: int, device: torch.device) -> int:
    """Memories per product in ``project_values``: on a CPU as many as ``PRODUCT_LOGITS`` allows, split evenly
    (fewer, larger products: the BLAS packs E once per product, and each pass over the logits has a fixed cost);
    elsewhere ``MEMORY_CHUNK``. A product's logits do not depend on how many rows it has (MKL; checked)."""
    if device.type != "cpu":
        return MEMORY_CHUNK
    most = max(MEMORY_CHUNK, PRODUCT_LOGITS // max(1, min(vocab, VOCAB_CHUNK)))
    products = max(1, -(-n_memories // most))
    return max(1, -(-n_memories // products))


@torch.inference_mode()
def project_values(parts: ModelParts, layer: int, n_top: int, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """The atlas's value lists: top ``n_top`` token ids and logits per memory, both faces, both projections
    (``value_{raw|normed}_{pos|neg}_{ids|logits}``, float32 logits). ``chunk``: memories per product (default
    ``product_rows``)."""
    values = value_vectors(parts, layer, dtype=torch.float32)
    e = unembedding(parts, torch.float32)
    chunk = chunk or product_rows(values.shape[0], e.shape[0], values.device)
    buffer = ProductBuffer()
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, values.shape[0], chunk):
        v = values[start: start + chunk]
        for kind, vecs in (("raw", v), ("normed", parts.through_final_norm(v))):
            for face, (ids, logits) in top_both_faces(vecs, e, n_top, buffer=buffer).items():
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


def soft_cap(parts: ModelParts, logits: torch.Tensor) -> torch.Tensor:
    """The model's logit soft-capping c * tanh(z / c), where its config sets one (``ModelParts.logit_softcap``)."""
    cap = parts.logit_softcap
    return logits if cap is None else torch.tanh(logits / cap) * cap


def logit_lens(parts: ModelParts, hidden: torch.Tensor) -> torch.Tensor:
    """Residual-stream states -> vocabulary logits through the final norm (the logit lens), in the model's dtype,
    soft-capped as the model caps its own."""
    return soft_cap(parts, parts.final_norm(hidden) @ parts.unembedding.T)


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
        return soft_cap(self.parts, out if self.beta_logits is None else out + self.beta_logits)

    def top(self, projected: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """argmax of the logits; without a norm bias the positive scale k cannot change it (nor can the
        monotone soft cap)."""
        if self.beta_logits is None:
            return projected.argmax(dim=1)
        return (projected * k + self.beta_logits).argmax(dim=1)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.parts, self.parts.final_norm(x).to(self.dtype) @ self.unembed_t)
