"""The two training recipes, each an object with its behaviour in it: how it starts the weights, what
loss it takes on a batch, and what it does to the gradient before a step.

`ORIGINAL` reproduces the original release's recipe as its model card gives it: Adam at lr 3e-4,
batch 4096, MSE reconstruction loss (mean over rows and dimensions), decoder rows projected back to
unit norm after every step, and every 5 epochs (never after the last) the revival of features that
have not fired for >= 500 steps. The card leaves the rest open; qsae initialises the decoder with
random unit rows and the encoder as their transpose, and revives a feature with a fresh random unit
vector as decoder row and encoder column, b_enc 0 and its Adam moments zeroed. This path is kept
bit for bit.

`MODERN` (the default) follows later TopK practice:
- encoder initialised as the decoder's transpose (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders", arXiv:2406.04093), scaled to column norm 1/sqrt(3), the norm EleutherAI sparsify's
  encoder starts at (torch's default Linear init U(+-1/sqrt(d_in)));
- decoder rows unit norm after every step, and the component of each decoder row's gradient
  parallel to that row removed before the step, so the update and the norm constraint do not fight;
- the AuxK loss instead of revival (same paper): the error e = x - x_hat (detached) is
  reconstructed by the top k_aux latents among the dead ones (silent for dead_after_steps steps),
  e_hat = their decoder rows weighted by their activations, without b_dec, and 1/32 of
  ||e - e_hat||^2 joins the loss. k_aux = d_in / 2, capped at n_features, and the term is scaled by
  min(n_dead / k_aux, 1), both as in sparsify. Both terms are divided by B * v, with B the batch's
  rows and v = sum ||x - mean(x)||^2 / N over the N training rows, so the main term is the batch's
  fraction of variance unexplained (sparsify divides by each batch's own total variance instead);
- b_dec initialised at the geometric median of up to 4096 training rows, by Weiszfeld's iteration
  from their mean (Bricken et al. 2023, "Towards Monosemanticity");
- lr = 3e-3 / sqrt(n / 2048) when unset (sparsify's 1 / sqrt(n) scaling, from Gao et al. Fig. 3, at
  about 5 times its level), falling linearly to 0 over the last fifth of the steps (qsae.config);
- the encoder matmul under bf16 autocast where the device multiplies bf16 natively (a CUDA GPU with
  bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere: the top-k picks from bf16 pre-activations,
  and everything after it runs in fp32;
- the encoder's backward pass through `TopKEncoder` (qsae.sae), which touches only the selected
  latents, and a fused Adam step.

A BatchTopK SAE (modern recipe only) keeps the k x B largest pre-activations of a batch of B rows;
its inference threshold theta follows the smallest positive activation m a step selected (over all
workers): theta <- theta + 0.01 (m - theta) after every step, theta = m after the first (SAELens's
rate; the start at the first m is dictionary_learning's, where SAELens starts at 0).
A Matryoshka BatchTopK SAE trains the same way, its reconstruction term the mean over its nested
prefixes of each one's sum ||x - x_hat_p||^2 (qsae.sae.MatryoshkaBatchTopKSAE); AuxK reconstructs
the whole dictionary's error, and the reported FVU is the whole dictionary's.
docs/training.md has the measurements behind the defaults.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from qsae.config import TrainConfig
from qsae.sae import BatchTopKSAE, TopKSAE
from qsae.streaming import RowSource, shuffled_batches

AUXK_ALPHA = 1 / 32  # Gao et al. 2024, weight of the AuxK term
GEOMETRIC_MEDIAN_ROWS = 4096  # rows sampled for the b_dec initialisation
ENCODER_INIT_NORM = 1 / math.sqrt(3)  # modern: initial encoder column norm (sparsify's)
DEAD_RECHECK_STEPS = 50  # steps between host copies of the dead-latent counters
WEISZFELD_ITERATIONS = 50  # at most; stops earlier once the estimate moves < 1e-5 of the spread
THRESHOLD_RATE = 0.01  # batchtopk: rate of the threshold's moving average


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch process group (Ray Train sets it up), or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_device(rows: np.ndarray, device: torch.device) -> Tensor:
    """A batch as fp32 on device, with a single host-to-device copy."""
    return torch.from_numpy(rows).to(device=device, dtype=torch.float32)


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


class Recipe:
    """The original recipe; ModernRecipe overrides what the modern one does differently."""

    name = "original"

    def uses_autocast(self, cfg: TrainConfig, device: str | torch.device) -> bool:
        """Whether the encoder matmul runs under bf16 autocast: never in the original recipe."""
        return False

    def optimizer(self, sae: TopKSAE, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
        return torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate())

    def init_(self, sae: TopKSAE, source: RowSource, cfg: TrainConfig, *, fresh: bool) -> None:
        """Changes to the SAE's initial weights (fresh: not about to be overwritten by a checkpoint)."""

    def dead_latents(self, bound: DeadLatentBound, step_in_epoch: int,
                     steps_since_fired: Tensor) -> tuple[Tensor | None, int | None]:
        """(the dead latents, how wide the AuxK top-k must be): the original recipe has no AuxK."""
        return None, None

    def loss(self, sae: TopKSAE, x: Tensor, step: StepInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, sum ||x - x_hat||^2 detached, selected values, selected indices): the MSE, mean over
        rows and dimensions, times step.scale."""
        values, indices = sae.encode_topk(x)
        x_hat = sae.decode_topk(values, indices)
        mse = F.mse_loss(x_hat, x) if len(x) else (x_hat - x).pow(2).sum()
        return mse * step.scale, mse.detach() * x.numel(), values, indices

    def before_step(self, sae: TopKSAE) -> None:
        """What happens to the gradients between backward and the optimiser step."""


class ModernRecipe(Recipe):
    name = "modern"

    def uses_autocast(self, cfg: TrainConfig, device: str | torch.device) -> bool:
        return native_bf16(device) if cfg.autocast_bf16 is None else cfg.autocast_bf16

    def optimizer(self, sae: TopKSAE, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
        # One fused kernel per step instead of a dozen passes over the parameters.
        fused = True if device.type in ("cpu", "cuda") else None
        return torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate(), fused=fused)

    def init_(self, sae: TopKSAE, source: RowSource, cfg: TrainConfig, *, fresh: bool) -> None:
        with torch.no_grad():
            sae.W_enc.mul_(ENCODER_INIT_NORM)
        if fresh:
            init_decoder_bias_(sae, source, cfg)

    def dead_latents(self, bound: DeadLatentBound, step_in_epoch: int,
                     steps_since_fired: Tensor) -> tuple[Tensor | None, int | None]:
        aux_width = bound.at(step_in_epoch, steps_since_fired)
        return (steps_since_fired >= bound.dead_after_steps if aux_width else None), aux_width

    def loss(self, sae: TopKSAE, x: Tensor, step: StepInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reconstruction + AUXK_ALPHA * AuxK) / (rows * row_variance), times step.scale."""
        sq_error, auxk, values, indices = reconstruction_losses(sae, x, step.dead, aux_width=step.aux_width,
                                                           autocast=step.autocast)
        reconstruction = sae.reconstruction_term(x, values, indices, sq_error)  # Matryoshka: over its prefixes
        loss = (reconstruction + AUXK_ALPHA * auxk) / (max(len(x), 1) * step.row_variance) * step.scale
        return loss, sq_error.detach(), values, indices

    def before_step(self, sae: TopKSAE) -> None:
        remove_parallel_grad_(sae)


RECIPES = {recipe.name: recipe for recipe in (Recipe(), ModernRecipe())}


@dataclass(frozen=True)
class StepInputs:
    """What a step's loss needs besides the batch."""

    dead: Tensor | None = None  # the dead latents for AuxK [n] bool; None: none can be dead
    aux_width: int | None = None  # how many latents the AuxK top-k picks
    scale: float = 1.0  # rows(x) x workers / rows(batch): a data-parallel worker's share of the batch
    row_variance: float = 1.0  # the mean row variance the modern loss divides by
    autocast: bool = False  # the encoder matmul under bf16 autocast


class TrainingLoss(nn.Module):
    """A recipe's loss on one batch, as a module: DistributedDataParallel averages the gradients of
    what its module's forward computes, so data-parallel training wraps this."""

    def __init__(self, sae: TopKSAE, recipe: Recipe):
        super().__init__()
        self.sae, self.recipe = sae, recipe

    def forward(self, x: Tensor, step: StepInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.recipe.loss(self.sae, x, step)


def auxk_size(sae: TopKSAE) -> int:
    """k_aux: d_in / 2 dead latents reconstruct the error (Gao et al. 2024, as sparsify sets it)."""
    return min(sae.d_in // 2, sae.n_features)


def reconstruction_losses(sae: TopKSAE, x: Tensor, dead: Tensor | None = None, *, aux_width: int | None = None,
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


def train_step(model: nn.Module, sae: TopKSAE, optimizer: torch.optim.Optimizer, x: Tensor, *,
               step: StepInputs, threshold_rate: float = THRESHOLD_RATE) -> tuple[Tensor, Tensor]:
    """One Adam step on `model`'s loss (a TrainingLoss over sae, or its DDP wrapper): the recipe's
    change to the gradients first, then decoder rows back to unit norm, and a BatchTopK SAE's
    threshold moved by threshold_rate (update_threshold_). Returns the batch's summed squared error
    and per-feature fire counts (device tensors, no host sync)."""
    loss, sq_error, values, indices = model(x, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    getattr(model, "module", model).recipe.before_step(sae)  # DDP keeps the wrapped module in .module
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
