"""The run directory: the interface between the stages. Each stage reads what the one before wrote
here and writes what the next reads; this is the one place that knows where.

    <run>/
      .qsae.lock                     the driver working on the run (pid, host): one at a time
      run.log                        other libraries' log lines (the console shows qsae's own)
      timings.json                   wall-clock seconds of each stage
      rollouts.parquet               every rollout (qsae.rollout); rollouts/<shard>.parquet its parts
      activations/                   the Arrow activation store (qsae.store owns its inside)
      checkpoints/                   Ray Train checkpoints, one folder per layer's training run
      saes/split.json                the train/held-out split and the row rules (qsae.sample)
      saes/layer=<L>/                a trained SAE, its history and trained.json (qsae.training.trained)
      encoded/                       the encode pass: per layer and shard, every token's pools and
                                     feature data, and manifest.json listing the shards done (qsae.encode)
      analysis/selection.safetensors the sampled rows every later stage reads (qsae.sample)
      analysis/layer=<L>/            a layer's statistics and feature data (qsae.analyze)
      analysis/fidelity.json         the fidelity in the model's loss (qsae.evaluate)
      analysis/logits/layer=<L>.*    the decoder directions' logit tables (qsae.evaluate)
      analysis/causal.json           the causal check (qsae.causal)
      analysis/autointerp.json       features' explanations and their scores (qsae.autointerp)
      release/                       the release (qsae.release), swapped in whole
      evaluations/layer=<L>/<name>/  another SAE's statistics on the same rows (qsae evaluate)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qsae.files import new_staging_dir

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
    def encoded(self) -> Path:
        return self.root / "encoded"

    @property
    def encoded_manifest(self) -> Path:
        return self.encoded / "manifest.json"

    def encoded_part(self, layer: int, shard: str) -> Path:
        return self.encoded / f"layer={layer}" / f"{shard}.safetensors"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def selection(self) -> Path:
        return self.analysis / "selection.safetensors"

    def layer_analysis(self, layer: int) -> Path:
        return self.analysis / f"layer={layer}"

    def sweep_analysis(self, layer: int, shape: str) -> Path:
        """A sweep SAE's analysis (qsae.analysis.frontier), shape n=<n>-k=<k>."""
        return self.layer_analysis(layer) / "sweep" / shape

    @property
    def fidelity(self) -> Path:
        return self.analysis / "fidelity.json"

    def logits(self, layer: int) -> Path:
        return self.analysis / "logits" / f"layer={layer}.safetensors"

    @property
    def causal(self) -> Path:
        return self.analysis / "causal.json"

    @property
    def autointerp(self) -> Path:
        return self.analysis / "autointerp.json"

    @property
    def release(self) -> Path:
        return self.root / "release"

    def evaluation(self, layer: int, name: str) -> Path:
        return self.root / "evaluations" / f"layer={layer}" / name

    def new_release_staging(self) -> Path:
        """A fresh folder to assemble the release in, after removing what a killed run left."""
        for stale in self.root.glob(f"{RELEASE_STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
        return new_staging_dir(self.root, RELEASE_STAGING)

    def new_trained_staging(self, layer: int) -> Path:
        self.saes.mkdir(parents=True, exist_ok=True)
        return new_staging_dir(self.saes, f".layer={layer}-")

    @property
    def lock(self) -> Path:
        return self.root / ".qsae.lock"

    @contextmanager
    def driver_lock(self):
        """Within the block this process is the run's one driver: a second is refused (ValueError
        naming the holder); a lock whose process is gone (a killed driver's) is taken over."""
        me = driver_identity(os.getpid())
        while True:
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.clear_stale_lock()
                continue
            with os.fdopen(fd, "w") as lock:
                json.dump(me, lock)
            break
        try:
            yield
        finally:
            if read_lock(self.lock) == me:
                self.lock.unlink(missing_ok=True)

    def clear_stale_lock(self) -> None:
        holder = read_lock(self.lock)
        if holder is not None and holder.get("host") != socket.gethostname():
            raise ValueError(f"run directory {self.root} is in use by a qsae driver on host {holder.get('host')} "
                             f"(pid {holder.get('pid')}); wait for it to end, or remove {self.lock} if it is gone")
        if holder is not None and driver_identity(holder.get("pid", -1)) == holder:
            raise ValueError(f"run directory {self.root} is in use by another qsae driver (pid {holder['pid']} on "
                             f"this host); wait for it to end, or stop it (the same command resumes)")
        self.lock.unlink(missing_ok=True)  # its process is gone (or the file is not a lock)

    def read_timings(self) -> dict[str, float]:
        return json.loads(self.timings.read_text()) if self.timings.exists() else {}


def driver_identity(pid: int) -> dict | None:
    """A process as a lock records it: pid, host and start time (a reused pid has another)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):  # no /proc: alive or not is all there is to know
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        started = None
    return {"pid": pid, "host": socket.gethostname(), "started": started}


def read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
