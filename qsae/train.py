"""Training one TopK SAE on one layer's residual rows: the original release's recipe.

Adam, shuffled mini-batches, MSE reconstruction loss, decoder rows projected to unit norm after
each step, and periodic revival of features that stopped firing. A plain function over an array;
the distributed layer wraps it (one call per layer) and checkpoints through `on_epoch`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from qsae.sae import TopKSAE
from qsae.store import layer_row_count, read_layer_table, read_manifest, residual_matrix, sample_rows

# Rows per chunk when scanning the input for NaN/inf and its variance (bounded memory on memmaps).
SCAN_ROWS = 8192


@dataclass
class TrainConfig:
    n_features: int = 4096  # dictionary size n (latents per SAE)
    k: int = 32  # active latents per token
    epochs: int = 20  # full passes over the training rows
    batch_size: int = 4096  # rows per optimiser step
    lr: float = 3e-4  # Adam learning rate
    revive_every_epochs: int = 5  # revive dead features at the end of every this many epochs (not the last)
    dead_after_steps: int = 500  # a feature silent for at least this many steps is dead
    seed: int = 0  # seeds the initial weights, the per-epoch shuffles and the revival vectors
    device: str = "cpu"  # torch device the SAE and each batch live on

    def validate(self, d_in: int) -> None:
        positive = {"d_in": d_in, "n_features": self.n_features, "k": self.k, "epochs": self.epochs,
                    "batch_size": self.batch_size, "lr": self.lr,
                    "revive_every_epochs": self.revive_every_epochs,
                    "dead_after_steps": self.dead_after_steps}
        bad = [f"{name}={value}" for name, value in positive.items() if not value > 0]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if self.k > self.n_features:
            raise ValueError(f"k={self.k} exceeds n_features={self.n_features}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def split_rows(n_rows: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of row indices into (train, held_out), each sorted (sequential reads
    on memory-mapped arrays). The held-out part has at least one row when n_rows >= 2, and
    training keeps at least one row."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n_held = min(max(round(n_rows * holdout_fraction), 1), n_rows - 1)
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def scan_residuals(residuals: np.ndarray | Tensor) -> float:
    """Check residuals are a non-empty 2-D float array without NaN/inf; return the pooled total
    variance sum ||x - mean(x)||^2 over all rows (float64), the FVU denominator."""
    if residuals.ndim != 2:
        raise ValueError(f"residuals must be 2-D [rows, d_in], got shape {tuple(residuals.shape)}")
    if residuals.shape[0] == 0 or residuals.shape[1] == 0:
        raise ValueError(f"residuals are empty: shape {tuple(residuals.shape)}")
    is_float = residuals.is_floating_point() if isinstance(residuals, Tensor) \
        else np.issubdtype(residuals.dtype, np.floating)
    if not is_float:
        raise ValueError(f"residuals must be floating point, got {residuals.dtype}")
    total = np.zeros(residuals.shape[1])
    total_sq = 0.0
    for start in range(0, residuals.shape[0], SCAN_ROWS):
        chunk = residuals[start:start + SCAN_ROWS]
        chunk = (chunk.detach().to("cpu", torch.float64).numpy() if isinstance(chunk, Tensor)
                 else np.asarray(chunk, dtype=np.float64))
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            raise ValueError(f"residuals row {start + int(np.argmin(finite))} contains NaN or inf")
        total += chunk.sum(axis=0)
        total_sq += float(np.square(chunk).sum())
    n_rows = residuals.shape[0]
    return total_sq - float(np.square(total).sum()) / n_rows


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Row indices of each mini-batch of one epoch: a fresh permutation seeded by (seed, epoch),
    so a resumed run sees the same batches as an uninterrupted one. Each batch is sorted, which
    only changes the order of rows inside it (the loss is a mean) and keeps memmap reads local."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    for start in range(0, n_rows, batch_size):
        yield np.sort(order[start:start + batch_size])


def fetch_batch(residuals: np.ndarray | Tensor, rows: np.ndarray, device: torch.device) -> Tensor:
    """Gather rows as fp32 on device, with a single host-to-device copy."""
    if isinstance(residuals, Tensor):
        batch = residuals[torch.from_numpy(rows).to(residuals.device)]
    else:
        batch = torch.from_numpy(np.ascontiguousarray(residuals[rows]))
    return batch.to(device=device, dtype=torch.float32)


def train_step(sae: TopKSAE, optimizer: torch.optim.Optimizer, x: Tensor) -> tuple[Tensor, Tensor]:
    """One Adam step on MSE (mean over rows and dimensions), then the unit-norm projection.
    Returns the batch's summed squared error (a device scalar, no sync) and per-feature fire counts."""
    values, indices = sae.encode_topk(x)
    x_hat = sae.decode_topk(values, indices)
    loss = F.mse_loss(x_hat, x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sae.normalize_decoder_()
    fires = torch.zeros(sae.n_features, device=x.device).scatter_add_(
        0, indices.flatten(), (values > 0).flatten().float())
    return loss.detach() * x.numel(), fires


def train_epoch(sae: TopKSAE, optimizer: torch.optim.Optimizer, residuals: np.ndarray | Tensor,
                cfg: TrainConfig, epoch: int, steps_since_fired: Tensor) -> tuple[float, Tensor]:
    """One pass over all rows. Returns the summed squared error over the epoch and the updated
    count of steps since each feature last fired."""
    device = steps_since_fired.device
    sq_error = torch.zeros((), device=device)
    for rows in epoch_batches(residuals.shape[0], cfg.batch_size, cfg.seed, epoch):
        batch_sq_error, fires = train_step(sae, optimizer, fetch_batch(residuals, rows, device))
        sq_error += batch_sq_error
        steps_since_fired = torch.where(fires > 0, 0, steps_since_fired + 1)
    return sq_error.item(), steps_since_fired


@torch.no_grad()
def revive_dead_(sae: TopKSAE, optimizer: torch.optim.Optimizer, dead: Tensor,
                 rng: np.random.Generator) -> int:
    """Re-initialise dead features in place: decoder row a random unit vector, encoder column the
    same vector, b_enc 0, and their Adam moments zeroed. Returns how many were revived."""
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    fresh = torch.from_numpy(rng.standard_normal((idx.numel(), sae.d_in), dtype=np.float32))
    fresh = (fresh / fresh.norm(dim=1, keepdim=True)).to(sae.W_dec.device)
    sae.W_dec[idx] = fresh
    sae.W_enc[:, idx] = fresh.T
    sae.b_enc[idx] = 0.0
    for param, index in ((sae.W_dec, idx), (sae.W_enc, (slice(None), idx)), (sae.b_enc, idx)):
        state = optimizer.state.get(param, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                state[moment][index] = 0.0
    return idx.numel()


def checkpoint_state(epoch: int, sae: TopKSAE, optimizer: torch.optim.Optimizer,
                     steps_since_fired: Tensor, history: dict) -> dict:
    """Everything `train_sae(resume=...)` needs to continue after `epoch` completed epochs,
    copied to CPU so later training steps cannot change it."""
    return {"epoch": epoch,
            "sae_state": {name: t.detach().cpu().clone() for name, t in sae.state_dict().items()},
            "optimizer_state": _to_cpu(copy.deepcopy(optimizer.state_dict())),
            "steps_since_fired": steps_since_fired.cpu().clone(),
            "history": copy.deepcopy(history)}


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(value) for value in obj]
    return obj


def _new_history() -> dict:
    return {"loss": [], "fvu": [], "variance_explained": [], "revived": 0, "revived_per_event": [],
            "steps": 0, "tokens_seen": 0, "seconds": 0.0}


def _is_revival_epoch(epoch: int, cfg: TrainConfig) -> bool:
    """After epochs R, 2R, ... (1-based), never after the last: 5, 10, 15 of 20 in the recipe."""
    return epoch % cfg.revive_every_epochs == 0 and epoch < cfg.epochs


def train_sae(residuals: np.ndarray | Tensor, cfg: TrainConfig,
              on_epoch: Callable[[int, TopKSAE, dict], None] | None = None,
              resume: dict | None = None) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE on residuals [rows, d_in] (numpy array, np.memmap or torch tensor).

    Loss: MSE, mean over rows and dimensions. history["fvu"] per epoch is the pooled fraction of
    variance unexplained on that epoch's batches, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    (every epoch covers all rows), and history["variance_explained"] is 1 - fvu.
    on_epoch(epoch, sae, metrics) runs after each epoch (epoch counts completed epochs, from 1);
    metrics holds that epoch's scalars plus metrics["checkpoint"], a function returning the dict to
    pass back as `resume` (a function, so epochs that are not checkpointed copy nothing).
    """
    if not isinstance(residuals, (np.ndarray, Tensor)):
        residuals = np.asarray(residuals)
    total_variance = scan_residuals(residuals)
    n_rows, d_in = residuals.shape
    cfg.validate(d_in)
    device = torch.device(cfg.device)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        sae = TopKSAE(d_in, cfg.n_features, cfg.k)
    sae.to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps_since_fired = torch.zeros(cfg.n_features, dtype=torch.long, device=device)
    history, start_epoch = _new_history(), 0
    if resume is not None:
        sae.load_state_dict(resume["sae_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        steps_since_fired = resume["steps_since_fired"].to(device)
        history, start_epoch = copy.deepcopy(resume["history"]), resume["epoch"]

    started = time.perf_counter()
    for epoch in tqdm(range(start_epoch + 1, cfg.epochs + 1), desc="epochs", initial=start_epoch,
                      total=cfg.epochs, disable=None):
        sq_error, steps_since_fired = train_epoch(sae, optimizer, residuals, cfg, epoch,
                                                  steps_since_fired)
        history["steps"] += math.ceil(n_rows / cfg.batch_size)
        history["tokens_seen"] += n_rows
        fvu = sq_error / total_variance if total_variance > 0 else float("nan")
        history["loss"].append(sq_error / (n_rows * d_in))
        history["fvu"].append(fvu)
        history["variance_explained"].append(1.0 - fvu)

        if _is_revival_epoch(epoch, cfg):
            dead = steps_since_fired >= cfg.dead_after_steps
            # Its own stream per (seed, epoch), independent of the shuffle's, so resume replays it.
            revived = revive_dead_(sae, optimizer, dead, np.random.default_rng([cfg.seed, epoch, 1]))
            steps_since_fired[dead] = 0
            history["revived"] += revived
            history["revived_per_event"].append(revived)

        history["seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        if on_epoch is not None:
            metrics = {"epoch": epoch, "loss": history["loss"][-1], "fvu": fvu,
                       "variance_explained": 1.0 - fvu, "revived": history["revived"],
                       "dead_fraction": (steps_since_fired >= cfg.dead_after_steps).float().mean().item(),
                       "steps": history["steps"], "tokens_seen": history["tokens_seen"],
                       "checkpoint": functools.partial(checkpoint_state, epoch, sae, optimizer,
                                                       steps_since_fired, history)}
            on_epoch(epoch, sae, metrics)
    return sae, history


@dataclass
class LayerSample:
    """The rows of one layer used for training and analysis: the same rows at every layer."""

    residuals: np.ndarray  # [N, d_model] float32
    rollout_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    correct: np.ndarray  # bool [N], the rollout's correctness for every token
    train_rows: np.ndarray
    heldout_rows: np.ndarray


def layer_sample(store_dir: Path, layer: int, max_rows: int | None, holdout_fraction: float, seed: int) -> LayerSample:
    """Seeded cap, then seeded train/held-out split: deterministic, so the trainers and the analysis
    agree on which rows are held out without passing index files around."""
    n_rows = layer_row_count(read_manifest(store_dir), layer)
    table = read_layer_table(store_dir, layer, sample_rows(n_rows, max_rows, seed))
    train_rows, heldout_rows = split_rows(table.num_rows, holdout_fraction, seed)
    return LayerSample(
        residuals=residual_matrix(table),
        rollout_id=table.column("rollout_id").to_numpy(),
        position=table.column("position").to_numpy(),
        token_id=table.column("token_id").to_numpy(),
        correct=table.column("correct").to_numpy(zero_copy_only=False),
        train_rows=train_rows,
        heldout_rows=heldout_rows,
    )


def save_trained(run_dir: Path, layer: int, sae: TopKSAE, history: dict) -> None:
    """Keep a trained layer in the run directory, so `qsae analyze` can rebuild the release from it."""
    out = Path(run_dir) / "saes" / f"layer={layer}"
    sae.save_release(out, layer, f"blocks.{layer}.hook_resid_post")
    (out / "history.json").write_text(json.dumps(history, indent=1))


def load_trained(run_dir: Path, layer: int) -> tuple[TopKSAE, dict]:
    out = Path(run_dir) / "saes" / f"layer={layer}"
    weights = sorted(out.glob(f"sae_L{layer}_n*_k*.safetensors"))
    if not weights or not (out / "history.json").exists():
        raise FileNotFoundError(f"no trained SAE for layer {layer} in {out}: run the train stage first")
    return TopKSAE.load(weights[0]), json.loads((out / "history.json").read_text())
