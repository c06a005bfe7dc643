"""Model and tokenizer loading, decoder-layer lookup, and the memory a replica needs.

Real checkpoints load from a local directory or a hub id; "tiny" and "tiny-dense" name the built-in
test models (qsae.tiny), built on first use.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsae.files import first_line
from qsae.tiny import TINY_DENSE_MODEL, TINY_DENSE_RECIPE, TINY_MODEL, tiny_model_path


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded from the given name or path."""


def dtype_from_name(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """"tiny" / "tiny-dense" -> the cached tiny model (built on first use); a path -> checked to exist;
    else a hub id."""
    if name == TINY_MODEL:
        return str(tiny_model_path(cache_dir))
    if name == TINY_DENSE_MODEL:
        return str(tiny_model_path(cache_dir, TINY_DENSE_RECIPE))
    expanded = os.path.expanduser(name)
    looks_like_path = expanded.startswith((os.sep, ".")) or os.path.exists(expanded) or name.count("/") != 1
    if looks_like_path and not os.path.isdir(expanded):
        raise ModelLoadError(f"model path does not exist or is not a directory: {name}")
    if not looks_like_path:
        check_hub_reachable(name)
    return expanded if looks_like_path else name


def check_hub_reachable(repo_id: str, timeout_s: float = 5.0) -> None:
    """A hub id the local cache does not hold needs the hub: say so in seconds when it cannot be
    reached, rather than after the hub client's retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"model {repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                             "download it first, or give a local directory")
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise ModelLoadError(f"model {repo_id!r} is not in the local hub cache and the hub at {endpoint.geturl()} "
                             f"cannot be reached ({err}); download it first, or give a local directory") from None


def check_weights(model_path: str) -> None:
    """A local checkpoint directory holds weight files, and its safetensors headers read (which finds
    a truncated or foreign file without loading a weight); a hub id is checked when it downloads."""
    weights = [path for pattern in ("*.safetensors", "*.bin") for path in Path(model_path).glob(pattern)]
    if os.path.isdir(model_path) and not weights:
        raise ModelLoadError(f"model directory {model_path} holds no weights (no *.safetensors or *.bin file)")
    parameter_count(model_path)


def weights_identity(model_path: str) -> dict:
    """A local checkpoint's weight files as the store records them ({name: [bytes, modification time
    in ns]}), so that weights replaced in place are noticed on rerun; {} for a hub id (its revision
    names it)."""
    if not os.path.isdir(model_path):
        return {}
    files = [p for pattern in ("*.safetensors", "*.bin") for p in Path(model_path).glob(pattern)]
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(files)}


def context_length(name_or_path: str, revision: str | None = None) -> int | None:
    """The longest sequence the model's config admits (max_position_embeddings), if it says."""
    return getattr(load_config(name_or_path, revision).get_text_config(), "max_position_embeddings", None)


def model_class_for(config) -> type:
    """Qwen3.5/3.6 checkpoints are vision-language models: load them whole, as their own class expects."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM


def load_config(name_or_path: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path), revision=revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the config of model {name_or_path!r}: {err}") from err


def model_dims(name_or_path: str, revision: str | None = None) -> tuple[int, int]:
    """(number of decoder layers, residual width) from the config alone, without loading weights."""
    text_config = load_config(name_or_path, revision).get_text_config()
    return text_config.num_hidden_layers, text_config.hidden_size


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), revision=revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of model {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Qwen3.5's Gated-DeltaNet layers run transformers' reference loops unless these import (the `gpu` extra).
FAST_LINEAR_ATTENTION_KERNELS = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


def has_linear_attention(config) -> bool:
    """Whether the model has linear-attention (Gated DeltaNet) layers, as Qwen3.5 hybrids do."""
    return "linear_attention" in (getattr(config.get_text_config(), "layer_types", None) or [])


def missing_fast_kernels(config, device: str) -> list[str]:
    """PyPI names of the fast linear-attention kernels a hybrid model would run without on `device`:
    none on CPU (the kernels are CUDA/Triton) or for a model without linear-attention layers."""
    if not resolve_device(device).startswith("cuda") or not has_linear_attention(config):
        return []
    return [name for module, name in FAST_LINEAR_ATTENTION_KERNELS.items() if importlib.util.find_spec(module) is None]


def load_model(name_or_path: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer) in eval mode, the weights straight onto `device` where accelerate is
    installed (never a full copy in host memory first), else through host memory; errors name the
    model that failed."""
    path = resolve_model_path(name_or_path)
    config = load_config(path, revision)
    tokenizer = load_tokenizer(path, revision)
    device = resolve_device(device)
    if missing := missing_fast_kernels(config, device):
        warnings.warn(f"{name_or_path}: linear-attention layers will use transformers' slow reference kernels; "
                      f"install {' and '.join(missing)} (pip install -e '.[gpu]') for the fast ones", stacklevel=2)
    # transformers places weights on a device as it reads them only through accelerate (device_map);
    # without it (a machine with torch and transformers alone) the model loads on the CPU and moves after.
    direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
    try:
        model, loading = model_class_for(config).from_pretrained(
            path, revision=revision, dtype=dtype_from_name(dtype), device_map=device if direct else None,
            output_loading_info=True)
        if device != "cpu" and not direct:
            model = model.to(device)
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: shapes that do not fit, or out of memory
        reason = first_line(err)
        raise ModelLoadError(f"could not load the weights of model {name_or_path!r}: {reason}") from None
    check_weights_cover(loading, name_or_path)
    return model.eval(), tokenizer


def check_weights_cover(loading: dict, model: str) -> None:
    """transformers leaves a parameter its checkpoint lacks at random init and skips a weight its model
    lacks, with a report only: a config of one model over the weights of another would run, on
    garbage. Refused instead, naming what does not match."""
    missing, unexpected = sorted(loading.get("missing_keys") or []), sorted(loading.get("unexpected_keys") or [])
    mismatched = sorted(str(key[0] if isinstance(key, tuple) else key) for key in loading.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                 (("missing from the weights", missing), ("in the weights but not the model", unexpected),
                  ("of another shape", mismatched)) if keys]
        raise ModelLoadError(f"the weights of model {model!r} do not fit the model its config.json describes: "
                             f"parameters {'; '.join(parts)}")


def parameter_count(model_path: str) -> int | None:
    """Parameters in a local checkpoint's safetensors files, read from their headers (no weights
    loaded); None for a hub id, whose files are known only after download."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors")) if os.path.isdir(model_path) else []
    count = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                count += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
        except Exception as err:  # safetensors raises its own error type
            raise ModelLoadError(f"model weights {path} are unreadable ({err})") from None
    return count or None


def memory_budget(device: str) -> tuple[int, str]:
    """(bytes a replica may fill, what they are): every visible GPU's memory, or available host RAM."""
    if resolve_device(device).startswith("cuda"):
        n_gpus = torch.cuda.device_count()
        total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(n_gpus))
        return total, f"{n_gpus} GPU(s) with {total / 2**30:.1f} GiB in all"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    return available, f"{available / 2**30:.1f} GiB of available host memory"


def check_fits(model_name: str, n_parameters: int | None, dtype: str, budget: tuple[int, str]) -> None:
    """Refuse a replica whose weights, in the dtype it runs in, exceed the memory it is given."""
    if n_parameters is None:
        return
    needed = n_parameters * dtype_from_name(dtype).itemsize
    capacity, described = budget
    if needed > capacity:
        raise ModelLoadError(
            f"model {model_name!r} needs about {needed / 2**30:.1f} GiB for its weights in {dtype}, but a replica "
            f"has {described}: give each replica more GPUs (capture.gpus_per_actor and rollout.tensor_parallel_size)"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ForConditionalGeneration (model.model.language_model.layers) or a
    ForCausalLM (model.model.layers)."""
    inner = getattr(model, "model", model)
    for owner in (getattr(inner, "language_model", None), inner):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def expand_layers(layers: list[int] | str, n_layers: int) -> list[int]:
    """capture.layers as the decoder layers it names: "all" is every one of the model's."""
    if layers == "all":
        return list(range(n_layers))
    check_layers(layers, n_layers)
    return list(layers)


def check_layers(layers: list[int], n_layers: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {layers}")


def attention_layer_indices(config) -> list[int]:
    text_config = getattr(config, "text_config", config)
    return [i for i, kind in enumerate(getattr(text_config, "layer_types", [])) if kind == "full_attention"]
