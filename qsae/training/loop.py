"""train_sae: one SAE trained on residual rows with a recipe (qsae.training.recipes), streamed from
an array, a memory-mapped .npy or the Arrow store through a seeded shuffle buffer (qsae.streaming).
A plain function: the Ray layer wraps it (one Ray Train run per layer, data-parallel workers when
asked) and reports and checkpoints through `on_step`.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from qsae.config import TrainConfig
from qsae.sae import TopKSAE
from qsae.streaming import RowSource, as_source, prefetched, shuffled_batches
from qsae.training.recipes import (
    RECIPES,
    THRESHOLD_RATE,
    StepInputs,
    TrainingLoss,
    autocast_supported,
    distributed_rank_and_world,
    to_device,
    train_step,
)
from qsae.training.state import (
    Progress,
    RunState,
    StepLog,
    check_resumable,
    checkpoint_state,
    end_epoch,
    new_run,
    restore_,
    run_key,
    step_metrics,
)


class UnusableRowsError(ValueError):
    """The training rows cannot train an SAE (NaN or inf, or no variance). Data-parallel workers
    decide it together, so every worker raises it at once."""


def scan_rows(source: RowSource, rank: int = 0, world: int = 1, device: str | torch.device = "cpu") -> float:
    """One pass over the rows, chunk by chunk (bounded memory): refuse NaN/inf, and return the pooled
    total variance sum ||x - mean(x)||^2 over all rows (float64), the FVU denominator. Data-parallel
    workers scan every world-th chunk and add up their sums on the training device (an NCCL group
    has no CPU backend)."""
    total, total_sq, bad = np.zeros(source.d_in), 0.0, ""
    for chunk in range(rank, len(source.chunk_sizes), world):
        rows = source.read_chunk(chunk).astype(np.float64)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = f"{source.describe_row(chunk, int(np.argmin(finite)))} contains NaN or inf"
            break
        total += rows.sum(axis=0)
        total_sq += float(np.square(rows).sum())
    if world > 1:
        sums = torch.from_numpy(np.concatenate([total, [total_sq, float(bool(bad))]])).to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
        total, total_sq = sums[:-2].numpy(), float(sums[-2])
        if sums[-1] and not bad:
            bad = "a row seen by another data-parallel worker contains NaN or inf"
    if bad:
        raise UnusableRowsError(f"residuals {bad}")
    variance = total_sq - float(np.square(total).sum()) / source.n_rows
    if source.n_rows < 2 or not variance > 1e-12 * total_sq:
        raise UnusableRowsError(f"the {source.n_rows} training row(s) do not vary (every row is the same), so an SAE "
                                "has nothing to learn and its FVU is undefined")
    return variance


def train_sae(residuals, cfg: TrainConfig, on_step: Callable[[Progress], None] | None = None,
              resume: dict | None = None) -> tuple[TopKSAE, dict]:
    """Train an SAE of cfg.architecture on residual rows with cfg.recipe. `residuals` is an array
    [rows, d_in] (np.memmap included: read a batch at a time), a tensor, or a RowSource over the
    Arrow store; rows are streamed through a seeded shuffle buffer of cfg.shuffle_buffer_rows rows,
    the next buffer read in the background while this one trains.

    Inside a torch process group of several workers (Ray Train with workers_per_layer > 1) each
    worker reads its share of every batch and DistributedDataParallel averages the gradients: the
    same run as one worker, up to floating-point order.

    history["loss"] per epoch is the MSE, mean over rows and dimensions; history["fvu"] per epoch is
    the pooled fraction of variance unexplained on that epoch's batches, sum ||x - x_hat||^2 /
    sum ||x - mean(x)||^2 (every epoch covers all rows); history["variance_explained"] is 1 - fvu;
    history["step_fvu"] per step is the batch's sum ||x - x_hat||^2 / (rows x the mean row variance).
    on_step(progress) runs after every step; `resume` is a progress.checkpoint() of an earlier run
    with the same config and rows, which it continues exactly from that step.
    """
    return train_saes(residuals, [cfg], on_step, resume)[0]


def train_saes(residuals, cfgs: list[TrainConfig], on_step: Callable[[Progress], None] | None = None,
               resume: dict | None = None) -> list[tuple[TopKSAE, dict]]:
    """train_sae of several SAEs (a sweep of shapes) in one pass over the rows: each batch is read
    and shuffled once and trains every SAE in turn, each exactly as train_sae would train it alone.
    The settings other than the shape (SHAPE) are the first's (sweep_settings_differ).
    Progress reports the first SAE's metrics and a checkpoint of them all (the others under "sweep")."""
    source = as_source(residuals)
    for cfg in cfgs:
        cfg.check()
    if differ := sweep_settings_differ(cfgs):
        raise ValueError(f"SAEs trained in one pass share every setting but their shape; these differ: {', '.join(differ)}")
    states = None if resume is None else [resume, *resume.get("sweep", [])]
    if states is not None:
        if len(states) != len(cfgs):
            raise ValueError(f"the checkpoint holds {len(states)} SAE(s), this run trains {len(cfgs)}")
        for state, cfg in zip(states, cfgs):
            check_resumable(state, cfg, source)
    loop = TrainingLoop(source, cfgs, on_step)
    loop.start(states)
    primary = loop.members[0].run
    bar = tqdm(total=loop.total_steps, initial=primary.history["steps"], desc="train", unit="step", disable=None)
    while primary.epoch <= loop.cfg.epochs:
        fvu = loop.epoch(bar)
        bar.set_postfix(epoch=primary.epoch - 1, fvu=f"{fvu:.4f}")
    bar.close()
    return [(member.run.sae, member.run.history) for member in loop.members]


SHAPE = ("n_features", "k", "architecture", "matryoshka_prefixes")


def sweep_settings_differ(cfgs: list[TrainConfig]) -> list[str]:
    """The settings besides the SAE's shape that differ between SAEs meant to train together."""
    first = run_key(cfgs[0])
    return sorted({key for cfg in cfgs[1:] for key, value in run_key(cfg).items()
                   if key not in SHAPE and value != first[key]})


@dataclass
class Member:
    """One SAE of the pass: its settings, state, loss module (DDP-wrapped when data parallel) and log."""

    cfg: TrainConfig
    run: RunState
    model: torch.nn.Module
    log: StepLog


class TrainingLoop:
    """What stays fixed over one training run (the rows, the recipe, the device, the process group)
    and the state of each SAE it advances, an epoch at a time."""

    def __init__(self, source: RowSource, cfgs: list[TrainConfig], on_step: Callable[[Progress], None] | None):
        self.source, self.cfgs, self.cfg, self.on_step = source, cfgs, cfgs[0], on_step
        cfg = self.cfg
        self.recipe = RECIPES[cfg.recipe]
        self.rank, self.world = distributed_rank_and_world()
        self.device = torch.device(cfg.device)
        self.autocast = self.recipe.uses_autocast(cfg, self.device) and autocast_supported(self.device)
        if cfg.autocast_bf16 and not self.autocast:
            warnings.warn(f"bf16 autocast is not supported on {self.device}; training in fp32", stacklevel=3)
        self.steps_per_epoch = math.ceil(source.n_rows / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch

    def start(self, resume: list[dict] | None) -> None:
        """Check the rows, then fresh runs or the ones `resume` saved."""
        self.total_variance = scan_rows(self.source, self.rank, self.world, self.device)
        # The modern loss is a fraction of variance unexplained; constant rows leave it a plain sum.
        self.row_variance = self.total_variance / self.source.n_rows if self.total_variance > 0 else 1.0
        self.members = [self.new_member(cfg, None if resume is None else resume[i]) for i, cfg in enumerate(self.cfgs)]
        self.started = time.perf_counter()

    def new_member(self, cfg: TrainConfig, state: dict | None) -> Member:
        run = new_run(self.source, cfg, self.device, fresh=state is None)
        if state is not None:
            restore_(run, state, self.rank)
        model = TrainingLoss(run.sae, self.recipe)
        if self.world > 1:
            model = DistributedDataParallel(model)  # also broadcasts rank 0's weights
        return Member(cfg, run, model, StepLog(run.history, self.row_variance, self.world))

    def epoch(self, bar: tqdm) -> float:
        """The rest of the current epoch; returns the first SAE's FVU."""
        run, cfg = self.members[0].run, self.cfg
        batches = shuffled_batches(self.source, cfg.batch_size, cfg.shuffle_buffer_rows, cfg.seed, epoch=run.epoch,
                                   start_step=run.step_in_epoch, rank=self.rank, world=self.world)
        # Up to one buffer of batches ahead, so that reading the next buffer overlaps training.
        for rows in prefetched(batches, cfg.shuffle_buffer_rows // cfg.batch_size + 1):
            self.step(rows)
            bar.update(1)
            if run.step_in_epoch < self.steps_per_epoch:
                self.report(run.epoch, run.step_in_epoch)
        seconds = time.perf_counter() - self.started
        fvus = []
        for member in self.members:
            member.log.flush()
            fvus.append(end_epoch(member.run, member.cfg, self.source.n_rows, self.total_variance, world=self.world))
            member.run.history["seconds"] += seconds  # the pass's wall time: its SAEs train together
        self.started = time.perf_counter()
        finished = run.epoch
        for member in self.members:
            member.run.start_epoch(finished + 1)  # a checkpoint taken now resumes at the next epoch
        self.report(finished, self.steps_per_epoch)
        return fvus[0]

    def step(self, rows: np.ndarray) -> None:
        x = to_device(rows, self.device)
        for member in self.members:
            self.member_step(member, x)

    def member_step(self, member: Member, x: torch.Tensor) -> None:
        run, cfg = member.run, member.cfg
        batch_rows = min(cfg.batch_size, self.source.n_rows - run.step_in_epoch * cfg.batch_size)
        dead, aux_width = self.recipe.dead_latents(run.dead_bound, run.step_in_epoch, run.steps_since_fired)
        for group in run.optimizer.param_groups:
            group["lr"] = cfg.lr_at(run.history["steps"], self.total_steps)
        inputs = StepInputs(dead=dead, aux_width=aux_width, scale=len(x) * self.world / batch_rows,
                            row_variance=self.row_variance, autocast=self.autocast)
        sq_error, fires = train_step(member.model, run.sae, run.optimizer, x, step=inputs,
                                     threshold_rate=1.0 if run.history["steps"] == 0 else THRESHOLD_RATE)
        if self.world > 1:
            dist.all_reduce(fires)  # every worker tracks the same dead latents
        run.steps_since_fired = torch.where(fires > 0, 0, run.steps_since_fired + 1)
        run.epoch_sq_error += sq_error
        member.log.add(sq_error, batch_rows)
        run.step_in_epoch += 1
        run.history["steps"] += 1
        run.history["tokens_seen"] += batch_rows

    def checkpoint(self) -> dict:
        """The first SAE's checkpoint_state, the others' under "sweep"."""
        states = []
        for member in self.members:
            member.log.flush()  # so that the saved history has every step so far
            states.append(checkpoint_state(member.run, member.cfg, self.source, self.world))
        return {**states[0], "sweep": states[1:]} if len(states) > 1 else states[0]

    def report(self, epoch: int, step_in_epoch: int) -> None:
        if self.on_step is not None:
            first = self.members[0]
            metrics = functools.partial(step_metrics, first.run, first.log, first.cfg, epoch)
            self.on_step(Progress(epoch, first.run.history["steps"], step_in_epoch, self.steps_per_epoch,
                                  self.total_steps, first.run.sae, metrics, self.checkpoint))
