"""Training one TopK (or BatchTopK) SAE on one layer's residual rows, with one of two recipes.

"original" reproduces the original release's recipe as its model card gives it: Adam at lr 3e-4,
batch 4096, MSE reconstruction loss (mean over rows and dimensions), decoder rows projected back to
unit norm after every step, and every 5 epochs (never after the last) the revival of features that
have not fired for >= 500 steps. The card leaves the rest open; qsae initialises the decoder with
random unit rows and the encoder as their transpose, and revives a feature with a fresh random unit
vector as decoder row and encoder column, b_enc 0 and its Adam moments zeroed. This path computes
exactly what qsae's trainer computed before the modern recipe existed, bit for bit.

"modern" (the default) follows later TopK practice:
- encoder initialised as the decoder's transpose (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders", arXiv:2406.04093), scaled to column norm 1/sqrt(3): the norm EleutherAI sparsify's
  encoder starts at (torch's default Linear init, U(+-1/sqrt(d_in)); its decoder is the normalised
  copy). Against the unscaled transpose it reached a lower FVU for the same tokens on a planted
  dictionary (d_in 512, n 4096: 0.457 vs 0.494 after 6 epochs of 32,768 rows, 0.353 vs 0.382 after 20);
- decoder rows unit norm after every step, and the component of each decoder row's gradient
  parallel to that row removed before the step, so the update and the norm constraint do not fight
  (same paper);
- the AuxK loss instead of revival (same paper): the error e = x - x_hat (detached) is
  reconstructed by the top k_aux latents among the dead ones (silent for dead_after_steps steps),
  e_hat = their decoder rows weighted by their activations, without b_dec, and 1/32 of
  ||e - e_hat||^2 joins the loss. k_aux = d_in / 2, capped at n_features, and the term is scaled by
  min(n_dead / k_aux, 1), both as in EleutherAI sparsify (which takes d_in / 2 from the paper's
  appendix). Both terms are divided by B * v, with B the batch's rows and v = sum ||x - mean(x)||^2
  / N over the N training rows, so the main term is the batch's fraction of variance unexplained
  (sparsify divides by each batch's own total variance instead);
- b_dec initialised at the geometric median of up to 4096 training rows, by Weiszfeld's iteration
  from their mean (as in Bricken et al. 2023, "Towards Monosemanticity", and in EleutherAI's sae
  trainer that became sparsify; sparsify 1.3 starts from the first batch's mean instead);
- when `lr` is unset, lr = 3e-3 / sqrt(n_features / 2048): the 1 / sqrt(n) scaling of sparsify's
  Adam default (2e-4 / sqrt(n / 2**14), which it derives from how the best learning rate scales
  with the number of latents in Gao et al., Fig. 3), at about 5 times its level, constant and then
  falling linearly to 0 over the last fifth of the steps (`lr_decay_fraction`). sparsify's default
  goes with a 1000-step warm-up and long runs; in benchmarks/bench_train.py (n 2048, 2 epochs of
  500,000 rows, 245 steps) the modern recipe reached a held-out FVU of 0.281 at that default
  (5.7e-4), 0.126 at a constant 2e-3, and 0.119 at 3e-3 with the decay (a constant 5e-3: 0.127,
  with 9% of the latents silent on the held-out rows);
- no revival unless `revive_every_epochs` asks for it;
- the encoder matmul under bf16 autocast (`autocast_bf16`) by default where the device multiplies
  bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere: the top-k
  then picks from bf16 pre-activations, and everything after it runs in fp32. On the benchmark
  above it reached the same held-out FVU as fp32 (0.129 both at the earlier constant 2e-3) with
  the step 1.3-1.6 times as fast on an AVX512-BF16 CPU (the whole benchmark process 1.24 times);
- the encoder's backward pass through `TopKEncoder` (sae.py), which touches only the selected
  latents, and a fused Adam step.

`architecture = "batchtopk"` (modern recipe only; "topk", the default, is the original's and the
reproduction's) trains a BatchTopKSAE (sae.py; Bussmann et al. 2024, arXiv:2412.06410): each step
keeps the k x B largest ReLU'd pre-activations of the batch's B rows instead of k per row, so rows
that need more latents get more; a data-parallel worker selects k x (its rows) among its share of
the batch. Everything else is the modern recipe as above (AuxK per row over the dead latents,
sparse backward through `BatchTopKEncoder`). At inference a BatchTopK SAE keeps every latent whose
pre-activation exceeds a learned threshold theta. theta follows the smallest positive activation m
the step selected (over all workers): theta <- theta + 0.01 (m - theta) after every step, and
theta = m after the first. The average is SAELens's (BatchTopKTrainingSAE: rate 0.01 on the
minimum positive selected activation), so a batch encoded with theta keeps about the k x B latents
training kept; the start at the first m is dictionary_learning's (its BatchTopKTrainer starts
from that step's m, then averages at rate 0.001 from step 1000 on), where SAELens starts at 0 and
would pull theta toward 0 for the first few hundred steps of a short run. theta is a buffer of the SAE, so
checkpoints carry it and a resumed run continues it exactly. The release writes it as a fifth
tensor, `threshold` (sae.py for the SAELens layout; no sparsify layout).

Both draw the same stream of batches (store.shuffled_batches: a seeded shuffle buffer over chunks of
an array, a .npy memmap or the Arrow store). train_sae is a plain function; the distributed layer
wraps it (one Ray Train run per layer, data-parallel workers when asked) and reports and checkpoints
through `on_step`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from qsae.files import new_staging_dir, replace_directory
from qsae.sae import ARCHITECTURES, BatchTopKSAE, TopKSAE, load_weights_only, sae_class
from qsae.store import ArraySource, RowSource, StoreSource, prefetched, shuffled_batches

RECIPES = ("original", "modern")
ORIGINAL_LR = 3e-4  # the original card's Adam learning rate
ORIGINAL_REVIVE_EVERY_EPOCHS = 5  # the original card's revival period
MODERN_LR = 3e-3  # modern: Adam learning rate at 2048 latents, scaled by 1 / sqrt(n / 2048) (module docstring)
MODERN_LR_DECAY = 0.2  # modern: the last fifth of the steps lowers the learning rate linearly to 0
AUXK_ALPHA = 1 / 32  # Gao et al. 2024, weight of the AuxK term
GEOMETRIC_MEDIAN_ROWS = 4096  # rows sampled for the b_dec initialisation
ENCODER_INIT_NORM = 1 / math.sqrt(3)  # modern: initial encoder column norm (sparsify's; see the module docstring)
DEAD_RECHECK_STEPS = 50  # modern: steps between host copies of the dead-latent counters
WEISZFELD_ITERATIONS = 50  # at most; stops earlier once the estimate moves < 1e-5 of the spread
THRESHOLD_RATE = 0.01  # batchtopk: rate of the threshold's moving average (SAELens's; the module docstring)


@dataclass
class TrainConfig:
    recipe: str = "modern"  # "original" (the release's recipe, bit for bit) | "modern"; see the module docstring
    architecture: str = "topk"  # "topk" | "batchtopk" (top k x batch in training, a learned threshold after; modern only)
    n_features: int = 4096  # dictionary size n (latents per SAE)
    k: int = 32  # active latents per token
    epochs: int = 20  # full passes over the training rows
    batch_size: int = 4096  # rows per optimiser step
    lr: float | None = None  # Adam learning rate; None = the recipe's: 3e-4, or 3e-3 / sqrt(n / 2048) (modern)
    lr_decay_fraction: float | None = None  # last fraction of the steps over which lr falls linearly to 0; None = 0 | 0.2 (modern)
    revive_every_epochs: int | None = None  # revive dead features every R epochs, 0 = never; None = 5 | 0 (modern)
    dead_after_steps: int = 500  # a feature silent for at least this many steps is dead (revival, AuxK)
    autocast_bf16: bool | None = None  # modern only: encoder matmul under bf16 autocast; None = where the device has native bf16
    seed: int = 0  # seeds the initial weights, the per-epoch shuffles and the revival vectors
    shuffle_buffer_rows: int = 65536  # rows shuffled together; memory holds about three such buffers
    device: str = "cpu"  # torch device the SAE and each batch live on

    def learning_rate(self) -> float:
        """`lr`, or the recipe's default when it is unset."""
        if self.lr is not None:
            return self.lr
        return ORIGINAL_LR if self.recipe == "original" else MODERN_LR / math.sqrt(self.n_features / 2048)

    def decay_fraction(self) -> float:
        """`lr_decay_fraction`, or the recipe's default when it is unset (the original's lr is constant)."""
        if self.lr_decay_fraction is not None:
            return self.lr_decay_fraction
        return 0.0 if self.recipe == "original" else MODERN_LR_DECAY

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimiser step `step` (from 0) of `total_steps`: constant, then linear
        to 0 over the last decay_fraction() of the steps."""
        decay_steps = self.decay_fraction() * total_steps
        return self.learning_rate() * min(1.0, (total_steps - step) / decay_steps) if decay_steps else self.learning_rate()

    def uses_autocast(self) -> bool:
        """`autocast_bf16`, or, when it is unset, whether the modern recipe's device multiplies bf16 natively."""
        if self.autocast_bf16 is not None:
            return self.autocast_bf16
        return self.recipe == "modern" and native_bf16(self.device)

    def revival_period(self) -> int:
        """`revive_every_epochs`, or the recipe's default when it is unset; 0 = never."""
        if self.revive_every_epochs is not None:
            return self.revive_every_epochs
        return ORIGINAL_REVIVE_EVERY_EPOCHS if self.recipe == "original" else 0

    def resolved(self) -> TrainConfig:
        """A copy with the recipe defaults filled in (for metrics and model cards)."""
        return dataclasses.replace(self, lr=self.learning_rate(), revive_every_epochs=self.revival_period(),
                                   lr_decay_fraction=self.decay_fraction(), autocast_bf16=self.uses_autocast())

    def check_choices(self) -> None:
        """The recipe and the architecture are known names and go together."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPES)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.architecture != "topk" and self.recipe == "original":
            raise ValueError(f"architecture {self.architecture!r} needs the modern recipe: the original recipe is TopK")

    def check(self) -> None:
        """Every setting on its own and together: what can be checked before the data is seen."""
        self.check_choices()
        positive = {"n_features": self.n_features, "k": self.k, "epochs": self.epochs, "batch_size": self.batch_size,
                    "dead_after_steps": self.dead_after_steps, "shuffle_buffer_rows": self.shuffle_buffer_rows}
        if self.n_features > 0:  # the default lr scales with n
            positive["lr"] = self.learning_rate()
        bad = [f"{name}={value}" for name, value in positive.items() if not value > 0]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if not 0 <= self.decay_fraction() <= 1:
            raise ValueError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.revival_period() < 0:
            raise ValueError(f"revive_every_epochs must be >= 0 (0 = never), got {self.revive_every_epochs}")
        if self.k > self.n_features:
            raise ValueError(f"k={self.k} exceeds n_features={self.n_features}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.autocast_bf16 and self.recipe == "original":
            raise ValueError("autocast_bf16 belongs to the modern recipe; the original trains in fp32")
        if not math.isfinite(self.learning_rate()):
            raise ValueError(f"lr must be a finite number, got {self.lr}")

    def validate(self, d_in: int) -> None:
        """check(), and the width of the rows it will train on."""
        if not d_in > 0:
            raise ValueError(f"must be positive: d_in={d_in}")
        self.check()


def as_source(residuals: np.ndarray | Tensor | RowSource) -> RowSource:
    """Training input as a chunked row source: a store or array source as given, an array (or a
    memory-mapped .npy) wrapped without copying, a tensor copied to host memory."""
    if isinstance(residuals, (ArraySource, StoreSource)):
        return residuals
    if isinstance(residuals, Tensor):
        residuals = residuals.detach().cpu().numpy()
    residuals = residuals if isinstance(residuals, np.ndarray) else np.asarray(residuals)
    if residuals.ndim != 2:
        raise ValueError(f"residuals must be 2-D [rows, d_in], got shape {tuple(residuals.shape)}")
    if residuals.shape[0] == 0 or residuals.shape[1] == 0:
        raise ValueError(f"residuals are empty: shape {tuple(residuals.shape)}")
    if not np.issubdtype(residuals.dtype, np.floating):
        raise ValueError(f"residuals must be floating point, got {residuals.dtype}")
    return ArraySource(residuals)


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


def to_device(rows: np.ndarray, device: torch.device) -> Tensor:
    """A batch as fp32 on device, with a single host-to-device copy."""
    return torch.from_numpy(rows).to(device=device, dtype=torch.float32)


def auxk_size(sae: TopKSAE) -> int:
    """k_aux: d_in / 2 dead latents reconstruct the error (Gao et al. 2024, as sparsify sets it)."""
    return min(sae.d_in // 2, sae.n_features)


def reconstruction_losses(sae: TopKSAE, x: Tensor, dead: Tensor | None = None, aux_width: int | None = None,
                          autocast: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The modern recipe's two loss terms on a batch x [B, d_in], both sums over the batch:
    sum ||x - x_hat||^2, and the AuxK term min(n_dead / k_aux, 1) * sum ||e - e_hat||^2 with
    e = x - x_hat (detached) and e_hat the decoder rows of the top min(k_aux, n_dead) latents among
    `dead` [n] weighted by their ReLU'd pre-activations, without b_dec (k_aux = auxk_size).
    aux_width (default k_aux) is how many latents the AuxK top-k picks: any number >= min(k_aux,
    n_dead) gives the same term, since picks beyond the dead ones weigh 0. The AuxK term is 0 when
    dead is None or marks no latent. Also returns the selected (values, indices): top-k pairs, or
    BatchTopK's (sae.encode_for_training)."""
    k_aux = auxk_size(sae)
    width = 0 if dead is None else min(k_aux, k_aux if aux_width is None else aux_width)
    cast = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast:
        values, indices, aux_values, aux_indices = sae.encode_for_training(x, dead if width else None, width)
    x_hat = sae.decode_for_training(values, indices, len(x))
    sq_error = F.mse_loss(x_hat, x, reduction="sum")  # one fused pass each way, where (x - x_hat)^2 takes five
    if width == 0:
        return sq_error, sq_error.new_zeros(()), values, indices
    scale = (dead.sum() / k_aux).clamp(max=1.0)
    auxk = scale * F.mse_loss(sae.decoder_sum(aux_values, aux_indices), (x - x_hat).detach(), reduction="sum")
    return sq_error, auxk, values, indices


class DeadLatentBound:
    """How many latents can be dead at a step, known on the host without a sync per step.

    A latent is dead once it has not fired for dead_after_steps steps, and its counter grows by at
    most 1 a step, so a copy of the counters taken `elapsed` steps ago bounds the dead count by
    #{counter >= dead_after_steps - elapsed}. The copy is refreshed every `recheck_steps` steps
    (one device-to-host copy of n integers). The AuxK top-k is sized by this bound: as wide as
    min(k_aux, n_dead) needs, and skipped while no latent can be dead.
    """

    def __init__(self, dead_after_steps: int, recheck_steps: int = DEAD_RECHECK_STEPS):
        self.dead_after_steps, self.recheck_steps = dead_after_steps, recheck_steps
        self.sorted_counters, self.taken_at = None, 0

    def at(self, step: int, steps_since_fired: Tensor) -> int:
        if self.sorted_counters is None or step - self.taken_at >= self.recheck_steps:
            self.sorted_counters = np.sort(steps_since_fired.cpu().numpy())
            self.taken_at = step
        threshold = self.dead_after_steps - (step - self.taken_at)
        return len(self.sorted_counters) - int(np.searchsorted(self.sorted_counters, threshold))


@torch.no_grad()
def remove_parallel_grad_(sae: TopKSAE) -> None:
    """Remove from each decoder row's gradient its component along that (unit-norm) row."""
    W_dec, grad = sae.W_dec, sae.W_dec.grad
    grad -= (grad * W_dec).sum(dim=1, keepdim=True) * W_dec


class TrainingLoss(nn.Module):
    """A recipe's loss on one batch, as a module: DistributedDataParallel averages the gradients of
    what its module's forward computes, so data-parallel training wraps this."""

    def __init__(self, sae: TopKSAE, recipe: str, row_variance: float = 1.0, autocast: bool = False):
        super().__init__()
        self.sae, self.recipe, self.row_variance, self.autocast = sae, recipe, row_variance, autocast

    def forward(self, x: Tensor, dead: Tensor | None = None, aux_width: int | None = None,
                scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, sum ||x - x_hat||^2 detached, top-k values, top-k indices). Original: the MSE, mean
        over rows and dimensions. Modern: (reconstruction + AUXK_ALPHA * AuxK) / (rows * row_variance),
        AuxK over `dead` (None when no latent can be dead). `scale` is rows(x) * workers / rows(batch)
        for a data-parallel worker's share of a batch (1 otherwise), so that averaging the workers'
        gradients gives the gradient of the whole batch's loss."""
        if self.recipe == "original":
            values, indices = self.sae.encode_topk(x)
            x_hat = self.sae.decode_topk(values, indices)
            mse = F.mse_loss(x_hat, x) if len(x) else (x_hat - x).pow(2).sum()
            return mse * scale, mse.detach() * x.numel(), values, indices
        sq_error, auxk, values, indices = reconstruction_losses(self.sae, x, dead, aux_width, self.autocast)
        loss = (sq_error + AUXK_ALPHA * auxk) / (max(len(x), 1) * self.row_variance) * scale
        return loss, sq_error.detach(), values, indices


def train_step(model: nn.Module, sae: TopKSAE, optimizer: torch.optim.Optimizer, x: Tensor,
               dead: Tensor | None = None, aux_width: int | None = None, scale: float = 1.0,
               threshold_rate: float = THRESHOLD_RATE) -> tuple[Tensor, Tensor]:
    """One Adam step on `model`'s loss (a TrainingLoss over sae, or its DDP wrapper); modern: the
    gradient parallel to decoder rows removed first; then decoder rows back to unit norm, and a
    BatchTopK SAE's threshold moved by threshold_rate (update_threshold_). Returns the batch's summed
    squared error and per-feature fire counts (device tensors, no host sync)."""
    loss, sq_error, values, indices = model(x, dead, aux_width, scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if getattr(model, "module", model).recipe == "modern":  # DDP keeps the wrapped module in .module
        remove_parallel_grad_(sae)
    optimizer.step()
    sae.normalize_decoder_()
    if isinstance(sae, BatchTopKSAE):
        update_threshold_(sae, values, threshold_rate)
    return sq_error, sae.fire_counts(values, indices)


@torch.no_grad()
def update_threshold_(sae: BatchTopKSAE, values: Tensor, rate: float) -> None:
    """threshold <- threshold + rate * (m - threshold), m the smallest positive value among the
    activations this step selected (`values`), over all data-parallel workers (a collective), so
    they keep one threshold; unchanged when none was positive. No host sync."""
    none = values.new_full((1,), float("inf"))
    smallest = torch.cat([values.flatten().masked_fill(values.flatten() <= 0, float("inf")), none]).min()
    if distributed_rank_and_world()[1] > 1:
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    moved = torch.lerp(sae.threshold, smallest.to(sae.threshold.dtype), rate)
    sae.threshold.copy_(torch.where(smallest.isfinite(), moved, sae.threshold))


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 autocast still runs, but far slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def autocast_supported(device: torch.device) -> bool:
    """bf16 autocast works on CPU in torch, and on CUDA devices that support bf16."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def geometric_median(points: Tensor, iterations: int = WEISZFELD_ITERATIONS, tolerance: float = 1e-5) -> Tensor:
    """argmin_m sum_i ||points_i - m|| by Weiszfeld's iteration from the mean: each step is the
    mean weighted by 1 / distance. Stops when a step moves less than tolerance x the mean distance."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        distances = torch.linalg.vector_norm(points - median, dim=1)
        weights = 1.0 / distances.clamp_min(torch.finfo(points.dtype).eps)
        moved_to = weights @ points / weights.sum()
        step = torch.linalg.vector_norm(moved_to - median)
        median = moved_to
        if step <= tolerance * distances.mean():
            break
    return median


@torch.no_grad()
def init_decoder_bias_(sae: TopKSAE, source: RowSource, cfg: TrainConfig) -> None:
    """b_dec = geometric median of GEOMETRIC_MEDIAN_ROWS training rows: the first batch of a shuffle
    of its own (epoch 0; training epochs count from 1), read like any batch."""
    rows = next(shuffled_batches(source, GEOMETRIC_MEDIAN_ROWS, cfg.shuffle_buffer_rows, cfg.seed, epoch=0))
    sae.b_dec.copy_(geometric_median(to_device(rows, sae.b_dec.device)))


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


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(value) for value in obj]
    return obj


def _new_history() -> dict:
    return {"loss": [], "fvu": [], "variance_explained": [], "step_fvu": [], "revived": 0,
            "revived_per_event": [], "steps": 0, "tokens_seen": 0, "seconds": 0.0, "resumed_at_steps": []}


def _is_revival_epoch(epoch: int, cfg: TrainConfig) -> bool:
    """After epochs R, 2R, ... (1-based), never after the last: 5, 10, 15 of 20 in the original
    recipe; never when R = 0 (the modern recipe's default)."""
    period = cfg.revival_period()
    return period > 0 and epoch % period == 0 and epoch < cfg.epochs


def run_key(cfg: TrainConfig) -> dict:
    """Every setting that shapes a training run (all but the device), as a checkpoint records it.
    The architecture is left out while it is the default "topk", so the checkpoints and Ray Train
    run names of runs made before the setting existed still match theirs."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name != "device" and not (f.name == "architecture" and cfg.architecture == "topk")}


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


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch process group (Ray Train sets it up), or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class RunState:
    """What changes as training goes on: what a checkpoint saves and a resumed run restores."""

    sae: TopKSAE
    optimizer: torch.optim.Optimizer
    steps_since_fired: Tensor  # per latent
    history: dict
    epoch: int = 1  # the epoch in progress, from 1
    step_in_epoch: int = 0  # its steps done
    epoch_sq_error: Tensor | None = None  # sum ||x - x_hat||^2 over those steps (this worker's rows)
    dead_bound: DeadLatentBound | None = None  # modern: how many latents can be dead, this epoch

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, 0
        self.epoch_sq_error = torch.zeros((), device=self.steps_since_fired.device)
        # A fresh bound each epoch, so a run resumed at an epoch boundary makes the same choices.
        self.dead_bound = DeadLatentBound(self.dead_bound.dead_after_steps)


def new_run(source: RowSource, cfg: TrainConfig, device: torch.device, init_bias: bool) -> RunState:
    """Seeded initial weights (without touching the caller's RNG), Adam, b_dec at the geometric
    median for the modern recipe when init_bias."""
    modern = cfg.recipe == "modern"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = sae_class(cfg.architecture)(source.d_in, cfg.n_features, cfg.k)
    sae.to(device)
    # Modern: one fused kernel per step instead of a dozen passes over the parameters.
    fused = True if modern and device.type in ("cpu", "cuda") else None
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate(), fused=fused)
    if modern:
        with torch.no_grad():
            sae.W_enc.mul_(ENCODER_INIT_NORM)
        if init_bias:
            init_decoder_bias_(sae, source, cfg)
    run = RunState(sae, optimizer, torch.zeros(cfg.n_features, dtype=torch.long, device=device), _new_history(),
                   dead_bound=DeadLatentBound(cfg.dead_after_steps))
    run.start_epoch(1)
    return run


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


def end_epoch(run: RunState, cfg: TrainConfig, n_rows: int, total_variance: float, world: int) -> float:
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
    if _is_revival_epoch(run.epoch, cfg):
        dead = run.steps_since_fired >= cfg.dead_after_steps
        # Its own stream per (seed, epoch), independent of the shuffle's, so resume replays it.
        revived = revive_dead_(run.sae, run.optimizer, dead, np.random.default_rng([cfg.seed, run.epoch, 1]))
        run.steps_since_fired[dead] = 0
        history["revived"] += revived
        history["revived_per_event"].append(revived)
    return fvu


def train_sae(residuals: np.ndarray | Tensor | RowSource, cfg: TrainConfig,
              on_step: Callable[[Progress], None] | None = None,
              resume: dict | None = None) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE (BatchTopK with cfg.architecture) on residual rows with cfg.recipe (module docstring). `residuals` is an array
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
    source = as_source(residuals)
    rank, world = distributed_rank_and_world()
    cfg.validate(source.d_in)
    if resume is not None:
        check_resumable(resume, cfg, source)
    device = torch.device(cfg.device)
    total_variance = scan_rows(source, rank, world, device)
    n_rows, batch_size = source.n_rows, cfg.batch_size
    modern = cfg.recipe == "modern"
    autocast = modern and cfg.uses_autocast() and autocast_supported(device)
    if modern and cfg.autocast_bf16 and not autocast:
        warnings.warn(f"bf16 autocast is not supported on {device}; training in fp32", stacklevel=2)

    run = new_run(source, cfg, device, init_bias=resume is None)
    if resume is not None:
        restore_(run, resume, rank)
    # The modern loss is a fraction of variance unexplained; constant rows leave it a plain sum.
    row_variance = total_variance / n_rows if total_variance > 0 else 1.0
    model = TrainingLoss(run.sae, cfg.recipe, row_variance, autocast)
    if world > 1:
        model = DistributedDataParallel(model)  # also broadcasts rank 0's weights
    log = StepLog(run.history, row_variance, world)
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total_steps = cfg.epochs * steps_per_epoch

    def checkpoint() -> dict:
        log.flush()  # so that the saved history has every step so far
        return checkpoint_state(run, cfg, source, world)

    def report(epoch: int, step_in_epoch: int) -> None:
        if on_step is not None:
            on_step(Progress(epoch, run.history["steps"], step_in_epoch, steps_per_epoch, total_steps,
                             run.sae, functools.partial(step_metrics, run, log, cfg, epoch),
                             checkpoint))

    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=run.history["steps"], desc="train", unit="step", disable=None)
    while run.epoch <= cfg.epochs:
        batches = shuffled_batches(source, batch_size, cfg.shuffle_buffer_rows, cfg.seed, run.epoch,
                                   run.step_in_epoch, rank, world)
        # Up to one buffer of batches ahead, so that reading the next buffer overlaps training.
        for rows in prefetched(batches, cfg.shuffle_buffer_rows // batch_size + 1):
            batch_rows = min(batch_size, n_rows - run.step_in_epoch * batch_size)
            dead, aux_width = None, None
            if modern:
                aux_width = run.dead_bound.at(run.step_in_epoch, run.steps_since_fired)
                dead = run.steps_since_fired >= cfg.dead_after_steps if aux_width else None
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.lr_at(run.history["steps"], total_steps)
            sq_error, fires = train_step(model, run.sae, run.optimizer, to_device(rows, device), dead, aux_width,
                                         len(rows) * world / batch_rows,
                                         threshold_rate=1.0 if run.history["steps"] == 0 else THRESHOLD_RATE)
            if world > 1:
                dist.all_reduce(fires)  # every worker tracks the same dead latents
            run.steps_since_fired = torch.where(fires > 0, 0, run.steps_since_fired + 1)
            run.epoch_sq_error += sq_error
            log.add(sq_error, batch_rows)
            run.step_in_epoch += 1
            run.history["steps"] += 1
            run.history["tokens_seen"] += batch_rows
            bar.update(1)
            if run.step_in_epoch < steps_per_epoch:
                report(run.epoch, run.step_in_epoch)
        log.flush()
        fvu = end_epoch(run, cfg, n_rows, total_variance, world)
        run.history["seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        bar.set_postfix(epoch=run.epoch, fvu=f"{fvu:.4f}")
        finished = run.epoch
        run.start_epoch(finished + 1)  # a checkpoint taken now resumes at the next epoch
        report(finished, steps_per_epoch)
    bar.close()
    return run.sae, run.history


TRAINED_RECORD = "trained.json"  # names the layer's SAE file, so analyze reads exactly the one written


def save_trained(run_dir: Path, layer: int, sae: TopKSAE, history: dict) -> None:
    """Keep a trained layer in the run directory, so `qsae analyze` can rebuild the release from it:
    assembled beside it and swapped in whole, so no file of an earlier training stays behind."""
    out = Path(run_dir) / "saes" / f"layer={layer}"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(out.parent, f".layer={layer}-")
    try:
        files = sae.save_release(staging, layer, f"blocks.{layer}.hook_resid_post")
        (staging / "history.json").write_text(json.dumps(history, indent=1))
        (staging / TRAINED_RECORD).write_text(json.dumps({
            "weights": files["safetensors"].name, "architecture": sae.architecture, "d_in": sae.d_in,
            "n_features": sae.n_features, "k": sae.k}, indent=1))
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_trained(run_dir: Path, layer: int) -> tuple[TopKSAE, dict]:
    """The SAE and history save_trained recorded for the layer (trained.json), refused where the
    weights disagree with the record."""
    out = Path(run_dir) / "saes" / f"layer={layer}"
    if not (out / "history.json").exists():
        raise FileNotFoundError(f"no trained SAE for layer {layer} in {out}: run the train stage first")
    if not (out / TRAINED_RECORD).exists():  # written before the record existed: its one SAE file, if one
        weights = sorted(out.glob(f"sae_L{layer}_n*_k*.safetensors"))
        if len(weights) != 1:
            raise FileNotFoundError(f"{out} has no {TRAINED_RECORD} and {len(weights)} SAE files "
                                    f"({', '.join(p.name for p in weights)}): train the layer again")
        sae = TopKSAE.load(weights[0])
        return sae, json.loads((out / "history.json").read_text())
    record = json.loads((out / TRAINED_RECORD).read_text())
    sae = TopKSAE.load(out / record["weights"])
    found = {"architecture": sae.architecture, "d_in": sae.d_in, "n_features": sae.n_features, "k": sae.k}
    if any(record[key] != value for key, value in found.items()):
        raise ValueError(f"{out / record['weights']} holds an SAE with {found}, not the {record} of {out / TRAINED_RECORD}")
    return sae, json.loads((out / "history.json").read_text())
