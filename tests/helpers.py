"""Reference computations for the tests, written independently of ffkv's scan code."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch


def activation_name(config) -> str:
    """The FFN non-linearity as the model's config spells it."""
    for attr in ("hidden_activation", "hidden_act", "activation_function"):
        value = getattr(config, attr, None)
        if isinstance(value, str):
            return value
    raise AssertionError(f"no activation in config {type(config).__name__}")


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "relu": lambda x: torch.clamp(x, min=0),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
}


@torch.inference_mode()
def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W + b for nn.Linear (weight [out, in]) and GPT-2's Conv1D (weight [in, out])."""
    w = module.weight
    y = x @ (w.T if isinstance(module, torch.nn.Linear) else w)
    return y if module.bias is None else y + module.bias


@contextmanager
def capture_coefficients(parts, layers):
    """Record the input of every listed layer's FFN output projection, per forward call."""
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [parts.ffn_out(layer).register_forward_pre_hook(
        lambda _m, args, layer=layer: seen[layer].append(args[0].detach().clone())) for layer in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def unit_coefficients(loaded, ids, layers) -> dict[int, torch.Tensor]:
    """Run one token sequence alone (batch 1) through the full model: layer -> coefficients [T, d_ff]."""
    with capture_coefficients(loaded.parts, layers) as seen:
        loaded.model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], use_cache=False)
    n = len(ids)  # OPT hands its FFN a flattened [B * T, d_ff]
    return {layer: seen[layer][0].reshape(n, -1) for layer in layers}


def brute_force_coefficients(loaded, store, units, layers):
    """Every scored position of ``units`` (special prefix excluded): (layer -> float64 [N, d_ff], positions [N])."""
    values: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    positions = []
    for u in units:
        start, length, skip = int(store.offset[u]), int(store.length[u]), int(store.n_special[u])
        ids = np.asarray(store.tokens[start: start + length])
        coeffs = unit_coefficients(loaded, ids, layers)
        for layer in layers:
            values[layer].append(coeffs[layer][skip:].to(torch.float64))
        positions.append(np.arange(start + skip, start + length))
    return ({layer: torch.cat(v) for layer, v in values.items()},
            torch.from_numpy(np.concatenate(positions)).to(torch.int64))


def brute_force_topk(values: torch.Tensor, positions: torch.Tensor, k: int, largest: bool = True):
    """Exact top-k per column of ``values`` [N, d_ff] (float32 as the atlas stores them), ordered by value
    (desc, or asc for ``largest=False``) then position asc, padded with (nan, -1). Plain Python sort."""
    v32 = values.to(torch.float32).numpy()
    pos = positions.numpy()
    n_rows = v32.shape[1]
    out_v = np.full((n_rows, k), np.nan, dtype=np.float32)
    out_p = np.full((n_rows, k), -1, dtype=np.int64)
    for row in range(n_rows):
        col = v32[:, row]
        sign = -1.0 if largest else 1.0
        order = sorted(range(len(col)), key=lambda i: (sign * float(col[i]), int(pos[i])))[:k]
        out_v[row, :len(order)] = col[order]
        out_p[row, :len(order)] = pos[order]
    return torch.from_numpy(out_v), torch.from_numpy(out_p)


def build_saved_model(arch: str, tokenizers, directory, edit=None, seed: int = 0, **config_overrides):
    """Save a tiny random model (config overrides applied, optionally edited in place) with its test
    tokenizer, and load it back through ``ffkv.load_model`` in float64."""
    from conftest import BOS_ARCHS, tiny_config
    from transformers import AutoModelForCausalLM

    import ffkv

    config = tiny_config(arch)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(directory)
    tokenizers["bos" if arch in BOS_ARCHS else "plain"].save_pretrained(directory)
    return ffkv.load_model(str(directory), dtype="float64")


def randomise_norm_gains(model: torch.nn.Module, seed: int) -> None:
    """Every norm weight random in [0.5, 1.5) (biases random too): Gemma's norms start at gain 1 (weight 0), which
    would make a post-FFN norm's gain, and any mistake about it, invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
