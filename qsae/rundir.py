"""The run directory: the interface between the stages. Each stage reads what the one before wrote
here and writes what the next reads; this is the one place that knows where.

    <run>/
      run.log                        other libraries' log lines (the console shows qsae's own)
      timings.json                   wall-clock seconds of each stage
      rollouts.parquet               every rollout (qsae.rollout); rollouts/<shard>.parquet its parts
      activations/                   the Arrow activation store (qsae.store owns its inside)
      checkpoints/                   Ray Train checkpoints, one folder per layer's training run
      saes/split.json                the train/held-out split and the row rules (qsae.sample)
      saes/layer=<L>/                a trained SAE, its history and trained.json (qsae.training.trained)
      analysis/selection.safetensors the sampled rows every later stage reads (qsae.sample)
      analysis/layer=<L>/            a layer's statistics and feature data (qsae.analyze)
      analysis/fidelity.json         the fidelity in the model's loss (qsae.evaluate)
      analysis/logits/layer=<L>.*    the decoder directions' logit tables (qsae.evaluate)
      analysis/causal.json           the causal check (qsae.causal)
      release/                       the release (qsae.release), swapped in whole
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from qsae.files import atomic_write_json, new_staging_dir

RELEASE_STAGING = ".release-"  # the release is assembled in <run>/.release-XXXX, then swapped in


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts.parquet"

    def rollout_part(self, shard: str) -> Path:
        return self.root / "rollouts" / f"{shard}.parquet"

    @property
    def store(self) -> Path:
        return self.root / "activations"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def unusable_rows_note(self, layer: int) -> Path:
        """Where a trainer leaves the reason its rows cannot train (the run directory is on storage
        every node mounts), instead of failing in a way Ray Train would retry."""
        return self.checkpoints / f"layer={layer}.unusable.txt"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def split(self) -> Path:
        return self.saes / "split.json"

    def trained(self, layer: int) -> Path:
        return self.saes / f"layer={layer}"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def selection(self) -> Path:
        return self.analysis / "selection.safetensors"

    def layer_analysis(self, layer: int) -> Path:
        return self.analysis / f"layer={layer}"

    @property
    def fidelity(self) -> Path:
        return self.analysis / "fidelity.json"

    def logits(self, layer: int) -> Path:
        return self.analysis / "logits" / f"layer={layer}.safetensors"

    @property
    def causal(self) -> Path:
        return self.analysis / "causal.json"

    @property
    def release(self) -> Path:
        return self.root / "release"

    def new_release_staging(self) -> Path:
        """A fresh folder to assemble the release in, after removing what a killed run left."""
        for stale in self.root.glob(f"{RELEASE_STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
        return new_staging_dir(self.root, RELEASE_STAGING)

    def new_trained_staging(self, layer: int) -> Path:
        self.saes.mkdir(parents=True, exist_ok=True)
        return new_staging_dir(self.saes, f".layer={layer}-")

    def read_timings(self) -> dict[str, float]:
        return json.loads(self.timings.read_text()) if self.timings.exists() else {}

    def record_timing(self, stage: str, seconds: float) -> None:
        atomic_write_json(self.timings, {**self.read_timings(), stage: seconds})
