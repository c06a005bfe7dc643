"""A training run's state, and its checkpoints: what changes as training goes on, how it is saved,
read back (by torch's weights-only loader: a planted file is refused, never run) and continued."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from qsae.config import MATRYOSHKA, TrainConfig
from qsae.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE, sae_class
from qsae.sae_files import load_weights_only
from qsae.streaming import RowSource
from qsae.training.recipes import RECIPES, DeadLatentBound, revive_dead_


def new_history() -> dict:
    return {"loss": [], "fvu": [], "variance_explained": [], "step_fvu": [], "revived": 0,
            "revived_per_event": [], "steps": 0, "tokens_seen": 0, "seconds": 0.0, "resumed_at_steps": []}


@dataclass
class RunState:
    """What changes as training goes on: what a checkpoint saves and a resumed run restores."""

    sae: TopKSAE
    optimizer: torch.optim.Optimizer
    steps_since_fired: Tensor  # per latent
    history: dict
    dead_bound: DeadLatentBound  # how many latents can be dead (AuxK), this epoch
    epoch: int = 1  # the epoch in progress, from 1
    step_in_epoch: int = 0  # its steps done
    epoch_sq_error: Tensor | None = None  # sum ||x - x_hat||^2 over those steps (this worker's rows)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, 0
        self.epoch_sq_error = torch.zeros((), device=self.steps_since_fired.device)
        # A fresh bound each epoch, so a run resumed at an epoch boundary makes the same choices.
        self.dead_bound = DeadLatentBound(self.dead_bound.dead_after_steps)


def new_run(source: RowSource, cfg: TrainConfig, device: torch.device, *, fresh: bool) -> RunState:
    """Seeded initial weights (without touching the caller's RNG), Adam, and the recipe's changes to
    the weights (fresh: the run does not resume from a checkpoint)."""
    recipe = RECIPES[cfg.recipe]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = new_sae(cfg, source.d_in)
    sae.to(device)
    optimizer = recipe.optimizer(sae, cfg, device)
    recipe.init_(sae, source, cfg, fresh=fresh)
    run = RunState(sae, optimizer, torch.zeros(cfg.n_features, dtype=torch.long, device=device), new_history(),
                   DeadLatentBound(cfg.dead_after_steps))
    run.start_epoch(1)
    return run


def new_sae(cfg: TrainConfig, d_in: int) -> TopKSAE:
    """A freshly initialised SAE of cfg's architecture and shape (a Matryoshka one with its prefixes)."""
    cls = sae_class(cfg.architecture)
    if issubclass(cls, MatryoshkaBatchTopKSAE):
        return cls(d_in, cfg.n_features, cfg.k, cfg.prefixes())
    return cls(d_in, cfg.n_features, cfg.k)


def training_memory(cfgs: list[TrainConfig], d_in: int) -> int:
    """Bytes one trainer holds, about, for the SAEs it trains in one pass: the fp32 weights of each,
    their gradients and two Adam moments (four copies of 2 n d + n + d numbers), a batch's
    pre-activations (two [batch, n] fp32 tensors) and a Matryoshka SAE's reconstructions of each
    prefix (three [batch, prefixes, d] ones), of the largest SAE (they train one after another), and
    three shuffle buffers of rows (shared)."""
    parameters = sum(2 * cfg.n_features * d_in + cfg.n_features + d_in for cfg in cfgs)
    prefixes = lambda cfg: len(cfg.prefixes()) if cfg.architecture == MATRYOSHKA else 0  # noqa: E731
    step = max(2 * cfg.batch_size * cfg.n_features + 3 * cfg.batch_size * prefixes(cfg) * d_in for cfg in cfgs)
    return 4 * (4 * parameters + step + 3 * cfgs[0].shuffle_buffer_rows * d_in)


def check_training_memory(cfgs: list[TrainConfig], d_in: int, budget: tuple[int, str]) -> None:
    """Refuse, before allocating, SAEs whose training would not fit the trainer's memory `budget`
    (bytes, and what they are)."""
    needed, (capacity, described) = training_memory(cfgs, d_in), budget
    if needed > capacity:
        widths = " + ".join(f"{cfg.n_features:,}" for cfg in cfgs)
        raise ValueError(f"training {'an SAE' if len(cfgs) == 1 else f'{len(cfgs)} SAEs'} of n_features = {widths} "
                         f"on rows of d_in = {d_in:,} (batch {cfgs[0].batch_size:,}, shuffle buffer "
                         f"{cfgs[0].shuffle_buffer_rows:,} rows) needs about {needed / 2**30:,.1f} GiB, but a trainer "
                         f"has {described}; lower n_features, batch_size or shuffle_buffer_rows"
                         + (", or sweep fewer SAEs" if len(cfgs) > 1 else ""))


def run_key(cfg: TrainConfig) -> dict:
    """Every setting that shapes a training run (all but the device), as a checkpoint records it."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "device"}


def checkpoint_state(run: RunState, cfg: TrainConfig, source: RowSource, world: int) -> dict:
    """Everything a resumed run needs, copied to CPU so that later steps cannot change it. Data
    parallel: a collective (the epoch's error so far is summed over the workers)."""
    epoch_sq_error = run.epoch_sq_error.detach().clone()
    if world > 1:
        dist.all_reduce(epoch_sq_error)
    return {"config": run_key(cfg), "d_in": source.d_in, "n_rows": source.n_rows,
            "epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "epoch_sq_error": epoch_sq_error.cpu(),
            "dead_bound": (run.dead_bound.sorted_counters, run.dead_bound.taken_at),
            "sae_state": {name: t.detach().cpu().clone() for name, t in run.sae.state_dict().items()},
            "optimizer_state": _to_cpu(copy.deepcopy(run.optimizer.state_dict())),
            "steps_since_fired": run.steps_since_fired.cpu().clone(),
            "history": copy.deepcopy(run.history)}


def load_training_state(path: str | Path) -> dict:
    """A checkpoint_state saved with torch.save, read by torch's weights_only loader, which admits
    tensors and plain containers only (and, here, the numpy integer array the state holds): a file
    planted in a run directory is refused, never run. Raises ValueError naming the file."""
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy's array unpickler, wherever this numpy keeps it
    try:
        state = load_weights_only(path, [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.int64))])
    except ValueError as err:
        raise ValueError(f"checkpoint {err}") from None
    if not isinstance(state, dict) or "sae_state" not in state:
        raise ValueError(f"checkpoint {path} is not a qsae training checkpoint")
    return state


def check_resumable(state: dict, cfg: TrainConfig, source: RowSource) -> None:
    """A checkpoint continues only the run it came from: same settings, same input width and rows."""
    if state.get("d_in") != source.d_in:
        raise ValueError(f"the checkpoint's SAE has d_in {state.get('d_in')} but the activations have "
                         f"{source.d_in} values per row")
    mine, theirs = run_key(cfg), state.get("config", {})
    differ = [f"{key} {theirs.get(key)!r} -> {value!r}" for key, value in mine.items() if theirs.get(key) != value]
    if differ:
        raise ValueError(f"the checkpoint comes from another training config ({', '.join(differ)}); "
                         "train from scratch or resume with the config it was made with")
    if state.get("n_rows") != source.n_rows:
        raise ValueError(f"the checkpoint was trained on {state.get('n_rows')} rows, these activations "
                         f"have {source.n_rows}")


def restore_(run: RunState, state: dict, rank: int) -> None:
    """Continue from a checkpoint_state: the run picks up at the step after it."""
    device = run.steps_since_fired.device
    run.sae.load_state_dict(state["sae_state"])
    run.optimizer.load_state_dict(state["optimizer_state"])
    run.steps_since_fired = state["steps_since_fired"].to(device)
    run.history = copy.deepcopy(state["history"])
    run.history["resumed_at_steps"].append(run.history["steps"])
    run.epoch, run.step_in_epoch = state["epoch"], state["step_in_epoch"]
    # The epoch's error so far is the sum over all workers: one worker carries it on.
    run.epoch_sq_error = state["epoch_sq_error"].to(device) if rank == 0 else torch.zeros((), device=device)
    run.dead_bound.sorted_counters, run.dead_bound.taken_at = state["dead_bound"]


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(value) for value in obj]
    return obj


class StepLog:
    """Each step's squared error stays on the device until the log is flushed: one host copy (and,
    data parallel, one all-reduce) for many steps, appended to history["step_fvu"] as
    sum ||x - x_hat||^2 / (batch rows x mean row variance)."""

    def __init__(self, history: dict, row_variance: float, world: int):
        self.history, self.row_variance, self.world = history, row_variance, world
        self.sq_errors: list[Tensor] = []
        self.rows: list[int] = []
        self.reported = len(history["step_fvu"])

    def add(self, sq_error: Tensor, rows: int) -> None:
        self.sq_errors.append(sq_error)
        self.rows.append(rows)

    def flush(self) -> None:
        if self.sq_errors:
            sums = torch.stack(self.sq_errors)
            if self.world > 1:
                dist.all_reduce(sums)
            fvu = sums.double().cpu().numpy() / (np.array(self.rows) * self.row_variance)
            self.history["step_fvu"] += fvu.tolist()
            self.sq_errors.clear()
            self.rows.clear()

    def since_last_report(self) -> list[float]:
        self.flush()
        recent = self.history["step_fvu"][self.reported:]
        self.reported = len(self.history["step_fvu"])
        return recent


def step_metrics(run: RunState, log: StepLog, cfg: TrainConfig, epoch: int) -> dict:
    """Scalars for a progress report; the FVU of every step since the previous report."""
    recent = log.since_last_report()
    return {"epoch": epoch, "step": run.history["steps"], "tokens_seen": run.history["tokens_seen"],
            "fvu": float(np.mean(recent)) if recent else float("nan"), "step_fvu": recent,
            "dead_fraction": (run.steps_since_fired >= cfg.dead_after_steps).float().mean().item(),
            "revived": run.history["revived"],
            **({"threshold": run.sae.threshold.item()} if isinstance(run.sae, BatchTopKSAE) else {})}


def is_revival_epoch(epoch: int, cfg: TrainConfig) -> bool:
    """After epochs R, 2R, ... (1-based), never after the last: 5, 10, 15 of 20 in the original
    recipe; never when R = 0 (the modern recipe's default)."""
    period = cfg.revival_period()
    return period > 0 and epoch % period == 0 and epoch < cfg.epochs


def end_epoch(run: RunState, cfg: TrainConfig, n_rows: int, total_variance: float, *, world: int) -> float:
    """The epoch's loss and pooled FVU into the history, then revival where the recipe asks for it.
    Returns the FVU."""
    if world > 1:
        dist.all_reduce(run.epoch_sq_error)
    sq_error = run.epoch_sq_error.item()
    fvu = sq_error / total_variance if total_variance > 0 else float("nan")
    history = run.history
    history["loss"].append(sq_error / (n_rows * run.sae.d_in))
    history["fvu"].append(fvu)
    history["variance_explained"].append(1.0 - fvu)
    if is_revival_epoch(run.epoch, cfg):
        dead = run.steps_since_fired >= cfg.dead_after_steps
        # Its own stream per (seed, epoch), independent of the shuffle's, so resume replays it.
        revived = revive_dead_(run.sae, run.optimizer, dead, np.random.default_rng([cfg.seed, run.epoch, 1]))
        run.steps_since_fired[dead] = 0
        history["revived"] += revived
        history["revived_per_event"].append(revived)
    return fvu


@dataclass
class Progress:
    """What train_sae tells `on_step` after every optimiser step. Reading `metrics()` costs one host
    sync (and, data-parallel, one collective: call it at the same steps on every worker);
    `checkpoint()` returns the state to pass back as `resume`."""

    epoch: int  # the epoch this step belongs to (from 1)
    step: int  # optimiser steps done since the start of training
    step_in_epoch: int  # steps done in this epoch
    steps_per_epoch: int
    total_steps: int
    sae: TopKSAE
    metrics: Callable[[], dict]
    checkpoint: Callable[[], dict]

    @property
    def epoch_done(self) -> bool:
        return self.step_in_epoch == self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.step == self.total_steps
