"""A trained layer kept in the run directory (saes/layer=<L>/): its SAE in every release format, its
training history, and trained.json, which names the SAE file and records the settings it was
trained with, so that later stages read exactly what training wrote."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass

from qsae.config import TrainConfig
from qsae.files import replace_directory
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sae_files import hook_name, load_sae, save_sae

TRAINED_RECORD = "trained.json"
HISTORY = "history.json"


@dataclass
class TrainedSAE:
    """One layer's trained SAE, its training history and the resolved settings it was trained with."""

    sae: TopKSAE
    history: dict
    settings: dict  # TrainConfig fields with the recipe's defaults filled in (recipe_settings)


def recipe_settings(cfg: TrainConfig) -> dict:
    """The training settings with the recipe's defaults filled in, as the card's recipe table shows
    them."""
    return {**asdict(cfg), "lr": cfg.learning_rate(), "lr_decay_fraction": cfg.decay_fraction(),
            "revive_every_epochs": cfg.revival_period(), "encoder_matmul": cfg.encoder_precision()}


def save_trained(run: RunDir, layer: int, trained: TrainedSAE) -> None:
    """Keep a trained layer, assembled beside its folder and swapped in whole, so no file of an
    earlier training stays behind."""
    staging = run.new_trained_staging(layer)
    sae = trained.sae
    try:
        files = save_sae(sae, staging, layer, hook_name(layer))
        (staging / HISTORY).write_text(json.dumps(trained.history, indent=1))
        (staging / TRAINED_RECORD).write_text(json.dumps({
            "weights": files["safetensors"].name, "architecture": sae.architecture, "d_in": sae.d_in,
            "n_features": sae.n_features, "k": sae.k, "settings": trained.settings}, indent=1))
        replace_directory(staging, run.trained(layer))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_trained(run: RunDir, layer: int) -> TrainedSAE:
    """What save_trained kept for the layer, refused where the weights disagree with the record."""
    out = run.trained(layer)
    if not (out / TRAINED_RECORD).exists():
        raise FileNotFoundError(f"no trained SAE for layer {layer} in {out}: run the train stage first")
    try:
        record = json.loads((out / TRAINED_RECORD).read_text())
        history = json.loads((out / HISTORY).read_text())
        weights, settings = out / record["weights"], record["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{out} is not a trained layer qsae wrote ({err}); train the layer again") from None
    sae = load_sae(weights)
    found = {"architecture": sae.architecture, "d_in": sae.d_in, "n_features": sae.n_features, "k": sae.k}
    if any(record.get(key) != value for key, value in found.items()):
        raise ValueError(f"{weights} holds an SAE with {found}, not the one {out / TRAINED_RECORD} records")
    return TrainedSAE(sae, history, settings)
