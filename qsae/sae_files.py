"""An SAE's files: the release formats qsae writes and reads back.

- `sae_L<L>_n<n>_k<k>.pt`: the tensors as torch.save writes them (the original release's format);
- `.safetensors`: the same tensors, with d_in, n, k, layer, hook and architecture in its metadata;
- SAELens (`saelens/<hook>/cfg.json + sae_weights.safetensors`), which `SAE.load_from_disk` reads: a TopK
  SAE as SAELens's TopK layout, a BatchTopK SAE as the JumpReLU inference layout SAELens's own
  BatchTopK trainer saves (the threshold repeated per latent);
- sparsify (`sparsify/layers.<L>/cfg.json + sae.safetensors`), which `Sae.load_from_disk` reads, for
  TopK only: sparsify has no thresholded architecture.
Every file is read without unpickling anything (load_weights_only).
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from qsae.files import atomic_write, atomic_write_json, first_line
from qsae.sae import THRESHOLD, TopKSAE

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
# SAELens treats a cfg without a version marker as pre-6.0 and drops the nested metadata;
# this marks the cfg as written in the 6.x layout.
SAELENS_FORMAT_VERSION = "6.0.0"


def hook_name(layer: int) -> str:
    """The hook point of a layer's residual stream, in SAELens's naming."""
    return f"blocks.{layer}.hook_resid_post"


# Names of the residual stream after block L (what qsae's layer L holds): SAELens's (TransformerLens's)
# resid_post of block L, equal to resid_pre of block L + 1; and the output of a `layers.L` module,
# the naming of transformers' modules and of sparsify's hookpoints (e.g. `model.layers.L`).
RESIDUAL_HOOKS = ((re.compile(r"blocks\.(\d+)\.hook_resid_post"), 0), (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), -1),
                  (re.compile(r"(?:[\w.]+\.)?layers\.(\d+)"), 0))


def hook_layer(hook: str) -> int | None:
    """The layer whose residual-stream output `hook` names (RESIDUAL_HOOKS), or None where it names
    another point (an MLP's or attention's output, the embeddings)."""
    for pattern, shift in RESIDUAL_HOOKS:
        if match := pattern.fullmatch(hook):
            layer = int(match.group(1)) + shift
            return layer if layer >= 0 else None
    return None


def recorded_hook(path: str | Path) -> str | None:
    """The hook point an SAE's files name: a SAELens cfg's hook_name (6.x: in its metadata), a
    sparsify layer directory's own name (its hookpoint), qsae's .safetensors metadata or .pt file
    name; None where they name none. For files load_sae has read."""
    path = Path(path)
    path = path.parent if path.name == SAELENS_CFG else path
    if path.is_dir() and (path / SAELENS_WEIGHTS).is_file():
        cfg = json.loads((path / SAELENS_CFG).read_text())
        return (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if path.is_dir():
        return path.name
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("hook_name")
    match = re.fullmatch(r"sae_L(\d+)_n\d+_k\d+", path.stem)
    return hook_name(int(match.group(1))) if match else None


def weights_stem(layer: int, n_features: int, k: int) -> str:
    return f"sae_L{layer}_n{n_features}_k{k}"


def release_tensors(sae: TopKSAE) -> dict[str, Tensor]:
    """The SAE's tensors (tensor_names) as contiguous fp32 CPU tensors, detached from autograd."""
    return {name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous() for name in sae.tensor_names()}


def topk_saelens_cfg(sae: TopKSAE, hook: str) -> dict:
    """cfg.json for SAELens' `SAE.load_from_disk` (its TopKSAEConfig fields)."""
    return {"architecture": "topk", "d_in": sae.d_in, "d_sae": sae.n_features, "k": sae.k,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {"hook_name": hook, "sae_lens_version": SAELENS_FORMAT_VERSION}}


def jumprelu_saelens_cfg(sae: TopKSAE, hook: str) -> dict:
    """cfg.json of the JumpReLU inference SAE that SAELens's own BatchTopK trainer saves
    (BatchTopKTrainingSAEConfig's inference config is JumpReLUSAEConfig): its fields, and the
    training architecture and k in the metadata, where SAELens records them."""
    return {"architecture": "jumprelu", "d_in": sae.d_in, "d_sae": sae.n_features,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": hook, "sae_lens_version": SAELENS_FORMAT_VERSION,
                         "training_architecture": "batchtopk",
                         "training_architecture_details": {"k": sae.k}}}


def threshold_per_latent(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens's JumpReLU layout: the threshold once per latent ([n])."""
    n_features = tensors["W_enc"].shape[1]
    return {**tensors, THRESHOLD: tensors[THRESHOLD].expand(n_features).contiguous()}


def sparsify_cfg(sae: TopKSAE) -> dict:
    """cfg.json for sparsify's `Sae.load_from_disk`: SparseCoderConfig fields plus d_in.
    num_latents > 0 overrides expansion_factor, which keeps sparsify's default."""
    return {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
            "num_latents": sae.n_features, "k": sae.k, "multi_topk": False,
            "skip_connection": False, "transcode": False, "d_in": sae.d_in}


@dataclass(frozen=True)
class Layout:
    """How one architecture is written for the other libraries."""

    saelens_cfg: Callable[[TopKSAE, str], dict]
    saelens_tensors: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    sparsify: bool  # whether sparsify can load it


LAYOUTS = {
    "topk": Layout(topk_saelens_cfg, lambda tensors: tensors, sparsify=True),
    "batchtopk": Layout(jumprelu_saelens_cfg, threshold_per_latent, sparsify=False),
}


def saelens_cfg(sae: TopKSAE, hook: str) -> dict:
    return LAYOUTS[sae.architecture].saelens_cfg(sae, hook)


def save_sae(sae: TopKSAE, out_dir: str | Path, layer: int, hook: str) -> dict[str, Path]:
    """Write the SAE in every release format under out_dir (.pt, .safetensors, SAELens, and sparsify
    where its architecture has that layout), each file by atomic rename; returns the path of each."""
    _check_hook_name(hook)
    out_dir, layout = Path(out_dir), LAYOUTS[sae.architecture]
    stem = weights_stem(layer, sae.n_features, sae.k)
    tensors = release_tensors(sae)
    broken = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if broken:
        raise ValueError(f"the SAE's {', '.join(broken)} hold NaN or inf: no file of it is written")
    metadata = {"d_in": str(sae.d_in), "n_features": str(sae.n_features), "k": str(sae.k),
                "layer": str(layer), "hook_name": hook, "architecture": sae.architecture}
    paths = {"pt": out_dir / f"{stem}.pt", "safetensors": out_dir / f"{stem}.safetensors",
             "saelens": out_dir / "saelens" / hook}
    atomic_write(paths["pt"], lambda tmp: torch.save(tensors, tmp))
    atomic_write(paths["safetensors"], lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(paths["saelens"] / SAELENS_WEIGHTS, lambda tmp: save_file(layout.saelens_tensors(tensors), tmp))
    atomic_write_json(paths["saelens"] / SAELENS_CFG, layout.saelens_cfg(sae, hook))
    if layout.sparsify:
        paths["sparsify"] = out_dir / "sparsify" / f"layers.{layer}"
        atomic_write(paths["sparsify"] / SPARSIFY_WEIGHTS, lambda tmp: save_file(_sparsify_tensors(tensors), tmp))
        atomic_write_json(paths["sparsify"] / SAELENS_CFG, sparsify_cfg(sae))
    return paths


def load_sae(path: str | Path, k: int | None = None, device: str | torch.device = "cpu",
             expected: type[TopKSAE] = TopKSAE) -> TopKSAE:
    """Load from a release `.pt` or `.safetensors` file, a SAELens hook directory (or its cfg.json),
    or a sparsify layer directory. An explicit k overrides the stored one. The architecture is the
    stored one (TopKSAE.from_tensors); `expected` refuses any other (BatchTopKSAE: a TopK file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}")
    if path.is_file() and path.name == SAELENS_CFG:
        path = path.parent
    try:
        tensors, k_stored, architecture = _read_any(path)
    except ValueError:
        raise
    except Exception as err:  # torch's unpickler and safetensors raise their own kinds
        raise ValueError(f"{path} is not a readable SAE file ({first_line(err)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise ValueError(f"{path} holds a {type(tensors).__name__}, not an SAE's dict of tensors")
    k = k if k is not None else k_stored
    if k is None:
        raise ValueError(f"k is not stored with {path}; pass k explicitly")
    broken = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise ValueError(f"{path}: {', '.join(sorted(broken))} hold NaN or inf")
    try:
        return expected.from_tensors(tensors, k, architecture).to(device)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _read_any(path: Path) -> tuple[dict, int | None, str | None]:
    """(tensors, k or None, architecture or None where the file does not say) of any format."""
    if path.is_dir():
        return _read_dir(path)
    if path.suffix == ".pt":
        match = re.search(r"_k(\d+)$", path.stem)
        return load_weights_only(path), int(match.group(1)) if match else None, None
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        return tensors, stored_k(meta.get("k"), path, text=True), meta.get("architecture")
    raise ValueError(f"unrecognised SAE format: {path} (expected .pt, .safetensors, "
                     "a SAELens hook directory or a sparsify layer directory)")


def _check_hook_name(hook_name: str) -> None:
    # The hook name becomes a directory name under saelens/.
    if not hook_name or hook_name in (".", "..") or "/" in hook_name or "\\" in hook_name:
        raise ValueError(f"hook_name must be a single path component, got {hook_name!r}")


def _sparsify_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # sparsify keeps the encoder as nn.Linear: weight [n, d_in] = W_enc.T.
    return {"encoder.weight": tensors["W_enc"].T.contiguous(), "encoder.bias": tensors["b_enc"],
            "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}


def load_weights_only(path: str | Path, allowed: list = ()):
    """torch.load with torch's weights-only unpickler (tensors, plain containers and the `allowed`
    globals): a file holding anything else is refused with a ValueError naming it, never run."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects besides tensors, which qsae never unpickles") from None
    except (RuntimeError, EOFError, OSError) as err:
        reason = first_line(err)
        raise ValueError(f"{path} is unreadable ({reason})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}


def _read_dir(path: Path) -> tuple[dict[str, Tensor], int | None, str]:
    """Tensors, k and architecture from a SAELens hook directory or a sparsify layer directory."""
    cfg_path = path / SAELENS_CFG
    if not cfg_path.is_file():
        raise ValueError(f"{path} has no {SAELENS_CFG}; not a SAELens or sparsify SAE directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{cfg_path} is not a readable cfg.json ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} holds a {type(cfg).__name__}, not an SAE config object")
    if (path / SAELENS_WEIGHTS).is_file():
        tensors, _ = _read_safetensors(path / SAELENS_WEIGHTS)
        _check_saelens_cfg(cfg_path, cfg, tensors)
        if cfg.get("architecture") == "topk":
            return tensors, stored_k(cfg.get("k"), cfg_path), "topk"
        if cfg.get("architecture") == "jumprelu" and THRESHOLD in tensors:
            return _saelens_batchtopk(cfg_path, cfg, tensors)
        raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is neither 'topk' nor "
                         "'jumprelu' (the layout of a BatchTopK SAE)")
    if (path / SPARSIFY_WEIGHTS).is_file():
        if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
            raise ValueError(f"{cfg_path}: only plain TopK sparse autoencoders load as TopKSAE")
        raw, _ = _read_safetensors(path / SPARSIFY_WEIGHTS)
        missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(raw)
        if missing:
            raise ValueError(f"{path / SPARSIFY_WEIGHTS} lacks tensors {sorted(missing)}")
        tensors = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"],
                   "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        _check_widths(cfg_path, tensors, d_in=cfg.get("d_in"), n_features=cfg.get("num_latents") or None)
        return tensors, stored_k(cfg.get("k"), cfg_path), "topk"
    raise ValueError(f"{path} has neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify)")


# SAELens cfg settings that change what the encoder computes, and the values that leave it qsae's
# (x - b_dec) @ W_enc + b_enc on raw residuals; any other value would be evaluated as another SAE.
SAELENS_PLAIN = {"apply_b_dec_to_input": (True,), "normalize_activations": (None, "none"),
                 "reshape_activations": (None, "none"), "rescale_acts_by_decoder_norm": (None, False),
                 "hook_head_index": (None,)}


def _check_saelens_cfg(cfg_path: Path, cfg: dict, tensors: dict[str, Tensor]) -> None:
    """Refuse a SAELens cfg whose encoder qsae does not compute (SAELENS_PLAIN), or whose widths are
    not its tensors'."""
    other = [f"{key} = {cfg[key]!r}" for key, plain in SAELENS_PLAIN.items() if key in cfg and cfg[key] not in plain]
    if other:
        raise ValueError(f"{cfg_path}: {', '.join(other)}: qsae encodes raw residuals as (x - b_dec) @ W_enc + b_enc "
                         "and supports no other input handling")
    _check_widths(cfg_path, tensors, d_in=cfg.get("d_in"), n_features=cfg.get("d_sae"))


def _check_widths(cfg_path: Path, tensors: dict[str, Tensor], *, d_in, n_features) -> None:
    """The widths a cfg records (None: not recorded) are those of its encoder [d_in, n]."""
    W_enc = tensors.get("W_enc")
    if W_enc is None or W_enc.ndim != 2:
        return  # from_tensors names what is missing or misshapen
    for name, recorded, actual in (("d_in", d_in, W_enc.shape[0]), ("the latents", n_features, W_enc.shape[1])):
        if recorded is not None and recorded != actual:
            raise ValueError(f"{cfg_path} gives {name} as {recorded!r}, but the encoder's weights have {actual}")


def _saelens_batchtopk(cfg_path: Path, cfg: dict, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], int | None, str]:
    """A SAELens JumpReLU directory as a BatchTopK SAE: one threshold shared by every latent (as
    SAELens's BatchTopK trainer and qsae write it), k from the metadata's training details."""
    threshold = tensors[THRESHOLD].reshape(-1)
    if len(threshold) == 0 or not (threshold == threshold[0]).all():
        raise ValueError(f"{cfg_path}: the JumpReLU thresholds differ between latents; only a BatchTopK SAE, "
                         "with one threshold for all latents, loads as BatchTopKSAE")
    k = ((cfg.get("metadata") or {}).get("training_architecture_details") or {}).get("k")
    return {**tensors, THRESHOLD: threshold[0].clone()}, stored_k(k, cfg_path), "batchtopk"


def stored_k(value, where: Path, *, text: bool = False) -> int | None:
    """k as a file records it: a whole positive number (its text, where `text`: safetensors metadata
    holds strings only), or None where the file does not say."""
    if value is None:
        return None
    number = int(value) if isinstance(value, float) and value.is_integer() else value
    if text and isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{where}: k = {value!r} is not a whole positive number of latents")
    return number
