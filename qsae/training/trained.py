"""A trained layer kept in the run directory (saes/layer=<L>/): its SAE in every release format, its
training history, and trained.json, which names the SAE file and records the settings it was
trained with, so that later stages read exactly what training wrote. A sweep's other SAEs of the
layer (train.sweep) are kept the same way in its sweep/n=<n_features>-k=<k>/ subfolders."""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qsae.config import MATRYOSHKA, TrainConfig
from qsae.files import replace_directory
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sae_files import hook_name, load_sae, save_sae

TRAINED_RECORD = "trained.json"
HISTORY = "history.json"
SWEEP = "sweep"


@dataclass
class TrainedSAE:
    """One layer's trained SAE, its training history and the resolved settings it was trained with."""

    sae: TopKSAE
    history: dict
    settings: dict  # TrainConfig fields with the recipe's defaults filled in (recipe_settings)
    sweep: list[TrainedSAE] = field(default_factory=list)  # the layer's other SAEs (train.sweep), same pass

    @property
    def shape_name(self) -> str:
        return sweep_member_name(self.sae.n_features, self.sae.k)


def sweep_member_name(n_features: int, k: int) -> str:
    return f"n={n_features}-k={k}"


def recipe_settings(cfg: TrainConfig) -> dict:
    """The training settings with the recipe's defaults filled in, as the card's recipe table shows
    them."""
    return {**asdict(cfg), "lr": cfg.learning_rate(), "lr_decay_fraction": cfg.decay_fraction(),
            "revive_every_epochs": cfg.revival_period(), "encoder_matmul": cfg.encoder_precision(),
            **({"matryoshka_prefixes": cfg.prefixes()} if cfg.architecture == MATRYOSHKA else {})}


def save_trained(run: RunDir, layer: int, trained: TrainedSAE) -> None:
    """Keep a trained layer, assembled beside its folder and swapped in whole, so no file of an
    earlier training stays behind."""
    staging = run.new_trained_staging(layer)
    try:
        write_trained(staging, layer, trained)
        for member in trained.sweep:
            write_trained(staging / SWEEP / member.shape_name, layer, member)
        replace_directory(staging, run.trained(layer))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_trained(out: Path, layer: int, trained: TrainedSAE) -> None:
    sae = trained.sae
    files = save_sae(sae, out, layer, hook_name(layer))
    (out / HISTORY).write_text(json.dumps(trained.history, indent=1))
    (out / TRAINED_RECORD).write_text(json.dumps({
        "weights": files["safetensors"].name, "architecture": sae.architecture, "d_in": sae.d_in,
        "n_features": sae.n_features, "k": sae.k, "settings": trained.settings}, indent=1))


def load_trained(run: RunDir, layer: int) -> TrainedSAE:
    """What save_trained kept for the layer, refused where the weights disagree with the record."""
    out = run.trained(layer)
    if not (out / TRAINED_RECORD).exists():
        raise FileNotFoundError(f"no trained SAE for layer {layer} in {out}: run the train stage first")
    sweep = [read_trained(folder) for folder in sorted((out / SWEEP).glob("n=*-k=*"))]
    return dataclasses.replace(read_trained(out), sweep=sweep)


def read_trained(out: Path) -> TrainedSAE:
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
