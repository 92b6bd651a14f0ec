"""Every architecture quirk ffkv knows, in one table.

A *memory* is one hidden unit of an FFN layer: its key is what the input projection(s) compare the
residual stream with, its coefficient m_i is the i-th input of the FFN **output projection**, and its
value v_i is the matching row/column of that projection's weight, so that FFN(x) = sum_i m_i v_i (+ bias).
Hooking the input of the output projection gives the right coefficient for every FFN flavour: ReLU and
GELU FFNs (m_i = f(k_i.x)) as well as gated ones (m_i = act(g_i.x) * (u_i.x), which is signed). Hooking the
activation module would be wrong for gated FFNs (it sees act(g_i.x) only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import FfkvError


@dataclass(frozen=True)
class ArchSpec:
    """How to find the FFN memories and the unembedding in one model family."""

    body: str
    """Attribute path of the transformer body (run without the lm_head)."""
    layers: str
    """Attribute path, from the top-level model, of the list of decoder blocks."""
    ffn_out: str
    """Path inside a block of the FFN output projection; its input is the coefficient vector m."""
    ffn_in: tuple[str, ...]
    """Paths inside a block of the input projection(s) (key; gate and up for gated FFNs)."""
    activation: str
    """Name of the FFN non-linearity, as the model config spells it (reported, not used to compute)."""
    gated: bool
    """True for GLU-style FFNs, whose coefficients are signed."""
    final_norm: str
    """Path of the norm applied before the unembedding."""
    ffn_added: str = "mlp"
    """Path inside a block of the module whose output is exactly what the FFN adds to the residual stream
    (the MLP module; OPT has none, so its fc2; Gemma 3 post-normalises the MLP output first)."""
    unembed: str = "lm_head"
    """Path of the unembedding (a Linear whose weight is [vocab, d_model])."""
    conv1d: bool = False
    """GPT-2 stores projections as Conv1D with weight [in, out]: value i is a ROW, not a column."""
    norm_kind: str = "layernorm"
    """'layernorm' (centres, then scales by weight), 'rmsnorm' (scales by weight) or
    'rmsnorm_plus1' (Gemma: scales by 1 + weight); the kind of the final norm and of ``post_ffn_norm``."""
    post_ffn_norm: str | None = None
    """Path inside a block of an RMS norm between the FFN output projection and the residual stream (Gemma 3's
    post_feedforward_layernorm); None where the FFN's output joins the residual as it is."""


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer", "transformer.h", "mlp.c_proj", ("mlp.c_fc",), "gelu_new", False,
                     "transformer.ln_f", conv1d=True),
    "gpt_neo": ArchSpec("transformer", "transformer.h", "mlp.c_proj", ("mlp.c_fc",), "gelu_new", False,
                        "transformer.ln_f"),
    "gptj": ArchSpec("transformer", "transformer.h", "mlp.fc_out", ("mlp.fc_in",), "gelu_new", False,
                     "transformer.ln_f"),
    "gpt_neox": ArchSpec("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), "gelu",
                         False, "gpt_neox.final_layer_norm"),  # transformers 5 renamed embed_out to lm_head
    "opt": ArchSpec("model", "model.decoder.layers", "fc2", ("fc1",), "relu", False,
                    "model.decoder.final_layer_norm", ffn_added="fc2"),
    "llama": ArchSpec("model", "model.layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), "silu", True,
                      "model.norm", norm_kind="rmsnorm"),
    "mistral": ArchSpec("model", "model.layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), "silu",
                        True, "model.norm", norm_kind="rmsnorm"),
    "qwen2": ArchSpec("model", "model.layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), "silu", True,
                      "model.norm", norm_kind="rmsnorm"),
    "gemma3_text": ArchSpec("model", "model.layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"),
                            "gelu_pytorch_tanh", True, "model.norm", norm_kind="rmsnorm_plus1",
                            ffn_added="post_feedforward_layernorm", post_ffn_norm="post_feedforward_layernorm"),
}


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise FfkvError(f"unsupported architecture {model_type!r}; supported: {supported()}")
    return ARCHITECTURES[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class ModelParts:
    """Typed access to the pieces of a causal LM that the memory view needs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.spec = spec_for(model)
        cfg = model.config
        if cfg.model_type == "opt" and getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) != cfg.hidden_size:
            raise FfkvError("OPT models with project_in/project_out (e.g. opt-350m) are not supported")
        self.blocks = get_path(model, self.spec.layers)
        self.n_layers = len(self.blocks)
        w = self.ffn_out(0).weight
        self.d_ff = w.shape[0] if self.spec.conv1d else w.shape[1]
        self.d_model = w.shape[1] if self.spec.conv1d else w.shape[0]

    @property
    def body(self) -> nn.Module:
        return get_path(self.model, self.spec.body)

    @property
    def signed(self) -> bool:
        """Whether coefficients can be negative enough to matter (everything but ReLU)."""
        return self.spec.activation != "relu"

    def ffn_out(self, layer: int) -> nn.Module:
        return get_path(self.blocks[layer], self.spec.ffn_out)

    def ffn_added(self, layer: int) -> nn.Module:
        """The module whose output is what the FFN adds to the residual stream. With o its output and h
        the block's output, the residual *before* the FFN is h - o, for sequential blocks (GPT-2, Llama)
        and parallel ones (GPT-J, Pythia) alike."""
        return get_path(self.blocks[layer], self.spec.ffn_added)

    def values(self, layer: int) -> torch.Tensor:
        """The value vectors of a layer as a [d_ff, d_model] matrix (row i is v_i)."""
        w = self.ffn_out(layer).weight
        return w if self.spec.conv1d else w.T

    def ffn_out_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(self.ffn_out(layer), "bias", None)

    def post_ffn_norm(self, layer: int) -> nn.Module | None:
        return None if self.spec.post_ffn_norm is None else get_path(self.blocks[layer], self.spec.post_ffn_norm)

    def as_added(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """Value vectors [n, d_model] of ``layer`` -> what each adds to the residual stream per unit of coefficient.

        The identity, except where the FFN's output y = sum_i m_i v_i passes an RMS norm before it joins the
        residual (Gemma 3): that adds s(y) * gain * y = s(y) * sum_i m_i (gain * v_i), so memory i adds
        m_i * (gain * v_i) times s(y) = 1 / rms(y), one positive scale shared by all memories of the example
        (``added_scale``). Projections, contributions and searches use gain * v_i; the shared scale cannot change
        which memory adds more, nor any token ranking."""
        norm = self.post_ffn_norm(layer)
        if norm is None:
            return vectors
        return vectors * self._gain(norm).detach().to(device=vectors.device, dtype=vectors.dtype)

    def added_values(self, layer: int) -> torch.Tensor:
        """``values`` as they are added to the residual stream (``as_added``), rows [d_ff, d_model]."""
        return self.as_added(layer, self.values(layer).detach())

    def added_scale(self, layer: int, ffn_output: torch.Tensor) -> torch.Tensor:
        """The scale [..., 1] shared by all memories of an example: what the layer adds to the residual is
        ``added_scale(y) * sum_i m_i added_value_i`` (plus the output bias), y = sum_i m_i v_i the output
        projection's output. 1 without a post-FFN norm; 1 / sqrt(mean(y^2) + eps) after one, computed as the
        norm computes it (in float32)."""
        norm = self.post_ffn_norm(layer)
        if norm is None:
            return torch.ones_like(ffn_output[..., :1])
        y = ffn_output.float()
        return torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps).to(ffn_output.dtype)

    @property
    def final_norm(self) -> nn.Module:
        return get_path(self.model, self.spec.final_norm)

    @property
    def unembedding(self) -> torch.Tensor:
        """E as [vocab, d_model]."""
        return get_path(self.model, self.spec.unembed).weight

    def _gain(self, norm: nn.Module) -> torch.Tensor:
        """A norm's per-dimension gain (what multiplies a normalised direction): Gemma stores it as gain - 1."""
        return norm.weight + 1.0 if self.spec.norm_kind == "rmsnorm_plus1" else norm.weight

    def norm_gain(self) -> torch.Tensor:
        """The final norm's per-dimension gain gamma."""
        return self._gain(self.final_norm)

    @property
    def logit_softcap(self) -> float | None:
        """c where the model's logits are c * tanh(z / c) of the unembedding's z (Gemma 2 family; the config may
        set it for Gemma 3): monotone, so no top token changes, but probabilities do."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def through_final_norm(self, vectors: torch.Tensor) -> torch.Tensor:
        """v -> the direction the final norm maps v to, ignoring the (positive) per-token scale:
        LayerNorm centres then scales by gamma; RMSNorm only scales by gamma."""
        if self.spec.norm_kind == "layernorm":
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return vectors * self.norm_gain().detach().to(vectors.dtype)


def check_memory(layer: int, key: int | None = None, face: str | None = None, *, layers, d_ff: int,
                 faces=("pos", "neg"), of: str = "atlas") -> None:
    """The one check of a (layer, key, face) address: FfkvError with a one-line message unless it is one of
    ``layers`` x ``range(d_ff)`` x ``faces``. ``of`` names what ``layers`` are: the 'atlas' (the scanned
    layers) or the 'model' (all of its layers)."""
    layers = list(layers)
    if layer not in layers:
        contiguous = bool(layers) and layers == list(range(layers[0], layers[-1] + 1))
        span = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))
        if of == "model":
            raise FfkvError(f"layer {layer} out of range: the model has layers {span}")
        raise FfkvError(f"layer {layer} is not in this atlas (layers {span})")
    if key is not None and not 0 <= key < d_ff:
        raise FfkvError(f"key {key} out of range: layers have keys 0-{d_ff - 1}")
    if face is not None and face not in faces:
        raise FfkvError(f"face {face!r} not in this atlas (faces: {', '.join(faces)})")
