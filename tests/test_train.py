import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import planted_rows, variance_explained

from qsae.cli import resolved_config
from qsae.config import TrainConfig
from qsae.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE, sae_class
from qsae.streaming import ArraySource, shuffled_batches
from qsae.training.loop import train_sae, train_saes
from qsae.training.recipes import (
    RECIPES,
    THRESHOLD_RATE,
    DeadLatentBound,
    StepInputs,
    TrainingLoss,
    auxk_size,
    geometric_median,
    reconstruction_losses,
    remove_parallel_grad_,
    revive_dead_,
    train_step,
)
from qsae.training.trained import recipe_settings


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: one intra-op thread is faster than two, and avoids the OpenMP
    spin-waits that slow small ops down by an order of magnitude when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"n_features": 48, "k": 3, "epochs": 3, "batch_size": 128, "lr": 3e-3,
                          "revive_every_epochs": 1, "dead_after_steps": 5, "autocast_bf16": False, **overrides})


@pytest.fixture(scope="module")
def small_rows() -> np.ndarray:
    return planted_rows(1500, 12, 24, 3, seed=3)


@pytest.mark.parametrize("recipe", ["original", "modern"])
def test_planted_dictionary_is_learned(recipe):
    rows = planted_rows(20_000, 32, 64, 4, seed=0)
    order = np.random.default_rng(0).permutation(len(rows))
    train, held_out = np.sort(order[2000:]), np.sort(order[:2000])
    cfg = TrainConfig(recipe=recipe, n_features=64, k=4, epochs=6, batch_size=256, lr=1e-2,
                      revive_every_epochs=2, dead_after_steps=50)
    sae, history = train_sae(rows[train], cfg)

    torch.manual_seed(cfg.seed)
    untrained = variance_explained(TopKSAE(32, 64, 4), rows[held_out])
    trained = variance_explained(sae, rows[held_out])
    assert trained > 0.8
    assert trained - untrained > 0.4
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)

    assert len(history["loss"]) == len(history["fvu"]) == cfg.epochs
    assert history["fvu"][-1] < history["fvu"][0]
    assert history["variance_explained"][-1] == pytest.approx(1 - history["fvu"][-1])
    assert history["steps"] == cfg.epochs * -(-len(train) // cfg.batch_size)
    assert history["tokens_seen"] == cfg.epochs * len(train)
    # Train FVU of the last epoch and held-out FVU measure the same thing on the same distribution.
    assert history["variance_explained"][-1] == pytest.approx(trained, abs=0.05)


@pytest.mark.parametrize("recipe", ["original", "modern"])
def test_dead_features_are_revived(small_rows, recipe):
    # Far more features than the data needs and a short patience: many never fire.
    cfg = small_cfg(recipe=recipe, n_features=256, k=2, dead_after_steps=3)
    seen = []

    def on_step(progress):
        if progress.epoch_done:
            sae = progress.sae
            with torch.no_grad():
                fresh = (sae.W_dec == sae.W_enc.T).all(dim=1) & (sae.b_enc == 0)
            seen.append((progress.epoch, progress.metrics()["revived"], int(fresh.sum())))

    _, history = train_sae(small_rows, cfg, on_step=on_step)
    assert history["revived"] > 0
    assert len(history["revived_per_event"]) == cfg.epochs - 1  # never after the last epoch
    assert sum(history["revived_per_event"]) == history["revived"]
    epoch, revived_so_far, fresh = seen[0]
    assert epoch == 1 and revived_so_far == history["revived_per_event"][0]
    # Each revived feature leaves the revival with decoder row == encoder column and b_enc == 0.
    assert fresh >= revived_so_far > 0


def test_revive_resets_weights_and_adam_state():
    torch.manual_seed(0)
    sae = TopKSAE(8, 16, 2)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae(torch.randn(64, 8)).pow(2).sum().backward()
    optimizer.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}

    assert revive_dead_(sae, optimizer, dead, np.random.default_rng(0)) == 3
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(3))
    assert torch.equal(sae.W_enc[:, dead], sae.W_dec[dead].T)
    assert not sae.b_enc[dead].any()
    assert not torch.equal(sae.W_dec[dead], before["W_dec"][dead])
    assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
    for param, moments_at in ((sae.W_dec, lambda t: t[dead]), (sae.W_enc, lambda t: t[:, dead]),
                              (sae.b_enc, lambda t: t[dead])):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert not moments_at(optimizer.state[param][moment]).any()
    assert optimizer.state[sae.W_dec]["exp_avg_sq"][~dead].any()


def test_training_is_reproducible(small_rows):
    rng_state = torch.get_rng_state()
    first, history_a = train_sae(small_rows, small_cfg())
    second, history_b = train_sae(small_rows, small_cfg())
    other, _ = train_sae(small_rows, small_cfg(seed=1))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    for name, param in first.state_dict().items():
        assert torch.equal(param, second.state_dict()[name])
    assert history_a["loss"] == history_b["loss"]
    assert history_a["revived_per_event"] == history_b["revived_per_event"]
    assert not torch.equal(first.W_dec, other.W_dec)


@pytest.mark.parametrize("recipe, revive_every_epochs, architecture",
                         [("original", 3, "topk"), ("modern", 3, "topk"), ("modern", None, "topk"),
                          ("modern", None, "batchtopk"), ("modern", None, "matryoshka-batchtopk")])
def test_resume_matches_uninterrupted_run(small_rows, recipe, revive_every_epochs, architecture):
    # Original: revival after epoch 3 only, so the resumed part replays a revival too. Modern:
    # features die within the first epochs, so the resumed part replays AuxK steps. BatchTopK: the
    # threshold (in the state dict compared below) continues its moving average; Matryoshka's
    # prefixes are in the state dict too.
    cfg = small_cfg(recipe=recipe, epochs=4, revive_every_epochs=revive_every_epochs, dead_after_steps=2,
                    n_features=96, architecture=architecture)
    checkpoints, ends_of_epochs = {}, []

    def on_step(progress):
        checkpoints[progress.step] = progress.checkpoint()
        if progress.epoch_done:
            ends_of_epochs.append((progress.epoch, progress.step))

    full, history = train_sae(small_rows, cfg, on_step=on_step)
    assert type(full) is sae_class(architecture)
    assert architecture == "topk" or full.threshold > 0
    steps_per_epoch = -(-len(small_rows) // cfg.batch_size)
    assert ends_of_epochs == [(epoch, epoch * steps_per_epoch) for epoch in range(1, 5)]
    assert sorted(checkpoints) == list(range(1, 4 * steps_per_epoch + 1))
    if cfg.revival_period():
        assert history["revived"] > 0
    else:
        assert history["revived_per_event"] == []
    # From an epoch boundary and from the middle of an epoch, after latents have died.
    for step in (2 * steps_per_epoch, 2 * steps_per_epoch + 5):
        assert checkpoints[step]["steps_since_fired"].max() >= cfg.dead_after_steps  # dead latents to replay
        resumed, resumed_history = train_sae(small_rows, cfg, resume=checkpoints[step])
        for name, param in full.state_dict().items():
            assert torch.equal(param, resumed.state_dict()[name]), (step, name)
        assert architecture == "topk" or torch.equal(resumed.threshold, full.threshold), step
        for key in ("loss", "fvu", "step_fvu", "revived", "steps", "tokens_seen"):
            assert resumed_history[key] == history[key], (step, key)


def test_memmap_float16_and_tensor_inputs_agree(small_rows, tmp_path):
    half = small_rows.astype(np.float16)
    path = tmp_path / "residuals.npy"
    np.save(path, half)
    cfg = small_cfg(epochs=1)
    from_memmap, _ = train_sae(np.load(path, mmap_mode="r"), cfg)
    from_tensor, _ = train_sae(torch.from_numpy(half.astype(np.float32)), cfg)
    assert torch.equal(from_memmap.W_dec, from_tensor.W_dec)


@pytest.mark.parametrize("bad, problem", [
    (np.zeros((4,), np.float32), "2-D"),
    (np.zeros((0, 8), np.float32), "empty"),
    (np.zeros((10, 8), np.int64), "floating"),
])
def test_bad_shapes_and_types_raise(bad, problem):
    with pytest.raises(ValueError, match=problem):
        train_sae(bad, small_cfg())


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_rows_raise(small_rows, value):
    rows = small_rows.copy()
    rows[7, 2] = value
    with pytest.raises(ValueError, match="row 7"):
        train_sae(rows, small_cfg())
    with pytest.raises(ValueError, match="row 7"):
        train_sae(torch.from_numpy(rows), small_cfg())


@pytest.mark.parametrize("overrides, problem", [
    ({"k": 64, "n_features": 32}, "exceeds"),
    ({"lr": 0.0}, "lr"),
    ({"batch_size": -1}, "batch_size"),
    ({"epochs": 0}, "epochs"),
    ({"recipe": "anthropic"}, "recipe"),
    ({"revive_every_epochs": -1}, "revive_every_epochs"),
    ({"recipe": "original", "autocast_bf16": True}, "autocast_bf16"),
    ({"architecture": "gated"}, "unknown architecture 'gated'; expected one of topk, batchtopk"),
    ({"recipe": "original", "architecture": "batchtopk"}, "needs the modern recipe: the original recipe is TopK"),
    ({"recipe": "original", "architecture": "matryoshka-batchtopk"}, "needs the modern recipe"),
    ({"matryoshka_prefixes": [8, 16]}, "matryoshka_prefixes belongs to architecture 'matryoshka-batchtopk', not 'topk'"),
    ({"architecture": "matryoshka-batchtopk", "matryoshka_prefixes": [16, 8]}, "strictly increasing"),
    ({"architecture": "matryoshka-batchtopk", "matryoshka_prefixes": [8, 8]}, "strictly increasing"),
    ({"architecture": "matryoshka-batchtopk", "matryoshka_prefixes": [0, 8]}, "positive"),
    ({"architecture": "matryoshka-batchtopk", "matryoshka_prefixes": [8, 64]}, r"go beyond n_features=48"),
])
def test_bad_config_raises(overrides, problem):
    with pytest.raises(ValueError, match=problem):
        small_cfg(**overrides).check()


def original_recipe_reference(rows: np.ndarray, cfg: TrainConfig) -> tuple[TopKSAE, list[float], int]:
    """The original recipe written out op by op as qsae computed it before the modern recipe
    existed: seeded init, batches from the seeded shuffle buffer, top-k + ReLU, decoder rows
    summed by embedding_bag, MSE, Adam, unit-norm projection, and revival after every 5th epoch."""
    n_rows, d_in = rows.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = TopKSAE(d_in, cfg.n_features, cfg.k)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4)
    silent = torch.zeros(cfg.n_features, dtype=torch.long)
    losses, revived = [], 0
    for epoch in range(1, cfg.epochs + 1):
        sq_error = torch.zeros(())
        for batch in shuffled_batches(ArraySource(rows), cfg.batch_size, cfg.shuffle_buffer_rows, cfg.seed, epoch=epoch):
            x = torch.from_numpy(batch)
            values, indices = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).topk(cfg.k, dim=-1)
            values = F.relu(values)
            x_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec
            loss = F.mse_loss(x_hat, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps))
            fires = torch.zeros(cfg.n_features).scatter_add_(0, indices.flatten(), (values > 0).flatten().float())
            silent = torch.where(fires > 0, 0, silent + 1)
            sq_error += loss.detach() * x.numel()
        losses.append(sq_error.item() / (n_rows * d_in))
        if epoch % 5 == 0 and epoch < cfg.epochs:
            dead = silent >= cfg.dead_after_steps
            idx = dead.nonzero().flatten()
            rng = np.random.default_rng([cfg.seed, epoch, 1])
            fresh = torch.from_numpy(rng.standard_normal((len(idx), d_in), dtype=np.float32))
            fresh = fresh / fresh.norm(dim=1, keepdim=True)
            with torch.no_grad():
                sae.W_dec[idx], sae.W_enc[:, idx], sae.b_enc[idx] = fresh, fresh.T, 0.0
            for param, index in ((sae.W_dec, idx), (sae.W_enc, (slice(None), idx)), (sae.b_enc, idx)):
                for moment in ("exp_avg", "exp_avg_sq"):
                    optimizer.state[param][moment][index] = 0.0
            silent[dead] = 0
            revived += len(idx)
    return sae, losses, revived


def test_original_recipe_is_unchanged(small_rows):
    # Recipe defaults (lr 3e-4, revival every 5 epochs), so epoch 5 revives.
    cfg = TrainConfig(recipe="original", n_features=96, k=3, epochs=6, batch_size=128, dead_after_steps=4)
    reference, losses, revived = original_recipe_reference(small_rows, cfg)
    sae, history = train_sae(small_rows, cfg)
    assert revived > 0 and history["revived"] == revived
    for name, param in reference.state_dict().items():
        assert torch.equal(sae.state_dict()[name], param), name
    assert history["loss"] == losses


def test_recipe_defaults():
    assert TrainConfig().recipe == "modern"
    assert TrainConfig().architecture == "topk"
    original, modern = TrainConfig(recipe="original"), TrainConfig(recipe="modern", n_features=4096)
    assert original.learning_rate() == 3e-4
    assert modern.learning_rate() == pytest.approx(3e-3 / math.sqrt(4096 / 2048))
    assert TrainConfig(recipe="modern", n_features=2048).learning_rate() == pytest.approx(3e-3)
    assert TrainConfig(recipe="modern", lr=1e-3).learning_rate() == 1e-3
    assert (original.revival_period(), modern.revival_period()) == (5, 0)
    assert TrainConfig(recipe="modern", revive_every_epochs=2).revival_period() == 2
    assert (original.decay_fraction(), modern.decay_fraction()) == (0.0, 0.2)
    assert RECIPES["original"].uses_autocast(original, "cpu") is False
    assert RECIPES["modern"].uses_autocast(TrainConfig(recipe="modern", autocast_bf16=False), "cpu") is False
    resolved = recipe_settings(modern)
    assert (resolved["lr"], resolved["revive_every_epochs"], resolved["lr_decay_fraction"]) == (modern.learning_rate(), 0, 0.2)
    assert modern.lr is None and modern.autocast_bf16 is None  # resolving leaves the config alone


def test_bf16_autocast_by_default_where_the_cpu_multiplies_bf16():
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = bool(flags & {"avx512_bf16", "amx_tile"})
    assert RECIPES["modern"].uses_autocast(TrainConfig(recipe="modern", device="cpu"), "cpu") is native
    assert resolved_config(TrainConfig(recipe="modern", device="cpu"))["autocast_bf16"] is native
    assert RECIPES["original"].uses_autocast(TrainConfig(recipe="original", device="cpu"), "cpu") is False


@pytest.mark.parametrize("recipe", ["original", "modern"])
def test_training_uses_the_recipe_learning_rate_schedule(small_rows, recipe):
    cfg = small_cfg(recipe=recipe, lr=None, epochs=2)
    seen = []
    train_sae(small_rows, cfg, on_step=lambda progress: seen.append(progress.checkpoint()))
    lrs = [state["optimizer_state"]["param_groups"][0]["lr"] for state in seen]
    steps = len(lrs)
    assert steps == 2 * math.ceil(len(small_rows) / cfg.batch_size)
    base = 3e-4 if recipe == "original" else 3e-3 / math.sqrt(48 / 2048)
    # modern: constant, then linear to 0 over the last fifth of the steps; original: constant
    expected = [base * (min(1.0, (steps - s) / (0.2 * steps)) if recipe == "modern" else 1.0) for s in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    if recipe == "modern":
        assert lrs[-1] < lrs[0] / 2


def test_parallel_gradient_removal_leaves_gradients_orthogonal_to_decoder_rows(small_rows):
    torch.manual_seed(0)
    sae = TopKSAE(12, 48, 3)
    x = torch.from_numpy(small_rows[:256])
    sq_error, _, _, _ = reconstruction_losses(sae, x)
    sq_error.backward()
    before = sae.W_dec.grad.clone()
    assert (before * sae.W_dec).sum(dim=1).abs().max() > 1e-3  # there was a parallel part to remove
    remove_parallel_grad_(sae)
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-6 * before.norm(dim=1).max()
    # Only the parallel part went: the orthogonal part is unchanged.
    rows = sae.W_dec.detach()
    assert torch.allclose(sae.W_dec.grad, before - (before * rows).sum(1, keepdim=True) * rows, atol=1e-7)

    # train_step applies it: with lr 0 the decoder stays put, so its gradient must be orthogonal.
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.0)
    train_step(TrainingLoss(sae, RECIPES["modern"]), sae, optimizer, x, step=StepInputs())
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-6 * sae.W_dec.grad.norm(dim=1).max()


def test_auxk_is_zero_without_dead_latents_and_trains_only_dead_ones(small_rows):
    torch.manual_seed(0)
    sae = TopKSAE(12, 48, 3)
    x = torch.from_numpy(small_rows[:256])
    none_dead = torch.zeros(48, dtype=torch.bool)
    assert reconstruction_losses(sae, x)[1].item() == 0.0
    assert reconstruction_losses(sae, x, none_dead)[1].item() == 0.0

    dead = torch.zeros(48, dtype=torch.bool)
    dead[::4] = True
    sq_error, auxk, _, _ = reconstruction_losses(sae, x, dead)
    assert auxk.item() > 0
    with torch.no_grad():  # the formula written densely: top k_aux = 6 of the 12 dead latents
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        error = x - sae(x)
        values, indices = pre.masked_fill(~dead, -torch.inf).topk(6, dim=-1)
        e_hat = torch.einsum("bj,bjd->bd", values.relu(), sae.W_dec[indices])  # no b_dec
        assert auxk.item() == pytest.approx(min(12 / 6, 1.0) * (e_hat - error).pow(2).sum().item(), rel=1e-5)
        assert sq_error.item() == pytest.approx(error.pow(2).sum().item(), rel=1e-5)
    auxk.backward()
    # The AuxK term reaches the dead latents' decoder rows and encoder columns, and no live ones.
    assert sae.W_dec.grad[dead].abs().sum(dim=1).min() > 0
    assert not sae.W_dec.grad[~dead].any()
    assert not sae.W_enc.grad[:, ~dead].any() and sae.W_enc.grad[:, dead].any()

    # Fewer dead latents than k_aux = d_in / 2: any top-k width >= n_dead gives the same term,
    # scaled by n_dead / k_aux.
    assert auxk_size(sae) == 6 and dead.sum() == 12
    few = torch.zeros(48, dtype=torch.bool)
    few[[3, 17, 40]] = True
    exact = reconstruction_losses(sae, x, few, aux_width=3)[1]
    assert reconstruction_losses(sae, x, few, aux_width=6)[1].item() == pytest.approx(exact.item(), rel=1e-6)
    assert exact.item() > 0


def test_dead_latent_bound_never_undercounts():
    torch.manual_seed(0)
    counters = torch.randint(0, 12, (200,))
    bound = DeadLatentBound(dead_after_steps=10, recheck_steps=7)
    for step in range(30):
        n_dead = int((counters >= 10).sum())
        upper = bound.at(step, counters)
        assert upper >= n_dead
        if step % 7 == 0:  # a fresh copy: exact
            assert upper == n_dead
        fired = torch.rand(200) < 0.3
        counters = torch.where(fired, 0, counters + 1)


def sum_of_distances(points: torch.Tensor, center: torch.Tensor) -> float:
    return torch.linalg.vector_norm(points - center, dim=1).sum().item()


def reference_geometric_median(points: torch.Tensor) -> torch.Tensor:
    """Minimise sum ||x_i - m|| directly (float64 L-BFGS from the coordinate-wise median), a
    different method from Weiszfeld's."""
    points = points.double()
    median = points.median(dim=0).values.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([median], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = torch.linalg.vector_norm(points - median, dim=1).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return median.detach()


def skewed_cloud(seed: int = 0) -> np.ndarray:
    """A Gaussian cloud plus 10% far outliers on one side: mean and geometric median disagree."""
    rng = np.random.default_rng(seed)
    bulk = rng.standard_normal((900, 8)) + 3.0
    outliers = rng.standard_normal((100, 8)) * 0.5 + 40.0
    return np.concatenate([bulk, outliers]).astype(np.float32)


def test_geometric_median_matches_a_direct_minimisation():
    points = torch.from_numpy(skewed_cloud())
    ours, reference = geometric_median(points), reference_geometric_median(points)
    mean = points.mean(0)
    assert sum_of_distances(points, ours) <= sum_of_distances(points, reference.float()) * (1 + 1e-5)
    assert torch.linalg.vector_norm(ours.double() - reference) < 1e-2
    assert torch.linalg.vector_norm(mean.double() - reference) > 1.0  # the test tells them apart


def test_modern_recipe_starts_b_dec_at_the_geometric_median():
    rows = skewed_cloud()
    reference = reference_geometric_median(torch.from_numpy(rows))
    # A learning rate too small to move b_dec: what comes out is the initialisation.
    sae, _ = train_sae(rows, TrainConfig(recipe="modern", n_features=16, k=2, epochs=1, batch_size=500,
                                         lr=1e-12))
    assert torch.linalg.vector_norm(sae.b_dec.detach().double() - reference) < 1e-2
    original, _ = train_sae(rows, TrainConfig(recipe="original", n_features=16, k=2, epochs=1,
                                              batch_size=500, lr=1e-12))
    assert original.b_dec.abs().max() < 1e-6  # the original recipe starts at zero
    # The encoder starts as the decoder's transpose: scaled to column norm 1/sqrt(3) in the modern
    # recipe, unscaled in the original.
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T / math.sqrt(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(original.W_enc, original.W_dec.T, atol=1e-6, rtol=0)


def test_bf16_autocast_trains(small_rows):
    cfg = small_cfg(revive_every_epochs=None, epochs=6)
    fp32, fp32_history = train_sae(small_rows, cfg)
    bf16, bf16_history = train_sae(small_rows, small_cfg(revive_every_epochs=None, epochs=6, autocast_bf16=True))
    assert not torch.equal(fp32.W_enc, bf16.W_enc)  # the encoder matmul did run in bf16
    assert bf16.W_enc.dtype == torch.float32
    assert bf16_history["fvu"][-1] < 0.6 * bf16_history["fvu"][0]
    assert bf16_history["fvu"][-1] == pytest.approx(fp32_history["fvu"][-1], abs=0.02)


def batchtopk_step_reference(sae: TopKSAE, x: np.ndarray, k: int) -> tuple[np.ndarray, float | None]:
    """What a BatchTopK training step selects, written out in float64 numpy: fire counts per latent
    of the k x B largest pre-activations of the batch that are positive, and the smallest of those."""
    W_enc, b_enc, b_dec = (getattr(sae, name).detach().double().numpy() for name in ("W_enc", "b_enc", "b_dec"))
    pre = (x.astype(np.float64) - b_dec) @ W_enc + b_enc
    chosen = np.argsort(-pre, axis=None)[:k * len(x)]
    values = pre.flat[chosen]
    fires = np.bincount(chosen[values > 0] % pre.shape[1], minlength=pre.shape[1])
    return fires, float(values[values > 0].min()) if (values > 0).any() else None


def test_batchtopk_step_selects_k_times_batch_and_moves_the_threshold(small_rows):
    torch.manual_seed(0)
    sae = BatchTopKSAE(12, 48, 3)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    model = TrainingLoss(sae, RECIPES["modern"])
    expected, rows_per_batch = 0.0, 100
    for step in range(5):
        x = small_rows[step * rows_per_batch:(step + 1) * rows_per_batch]
        fires, smallest = batchtopk_step_reference(sae, x, 3)
        rate = 1.0 if step == 0 else THRESHOLD_RATE  # as train_sae passes it: the first step sets it
        expected += rate * (smallest - expected)
        _, got = train_step(model, sae, optimizer, torch.from_numpy(x), step=StepInputs(), threshold_rate=rate)
        np.testing.assert_array_equal(got.numpy(), fires)  # k x B latents of the batch, any number per row
        assert sae.threshold.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    values, positions, _, _ = sae.encode_for_training(torch.from_numpy(small_rows[:rows_per_batch]))
    per_row = torch.bincount(positions // 48, minlength=rows_per_batch)
    assert len(values) == 3 * rows_per_batch and per_row.min() < 3 < per_row.max()


def test_batchtopk_threshold_starts_at_the_first_batch_then_averages(small_rows):
    """train_sae's schedule: theta = m after step 1, then theta + rate (m - theta). A learning rate of
    1e-30 leaves the weights as they start, so the reference can recompute each step's m from them."""
    cfg = small_cfg(architecture="batchtopk", epochs=1, lr=1e-30, revive_every_epochs=None)
    seen = []
    sae, _ = train_sae(small_rows, cfg, on_step=lambda progress: seen.append(progress.sae.threshold.item()))
    batches = shuffled_batches(ArraySource(small_rows), cfg.batch_size, cfg.shuffle_buffer_rows, cfg.seed, epoch=1)
    expected = []
    for batch in batches:
        _, smallest = batchtopk_step_reference(sae, batch, cfg.k)
        expected.append(smallest if not expected else expected[-1] + THRESHOLD_RATE * (smallest - expected[-1]))
    assert len(seen) == len(expected) > 5
    assert seen == pytest.approx(expected, rel=1e-5)


def test_batchtopk_learns_the_dictionary_and_a_threshold_that_keeps_about_k():
    rows = planted_rows(20_000, 32, 64, 4, seed=0)
    held_out = torch.from_numpy(rows[:2000])
    cfg = TrainConfig(architecture="batchtopk", n_features=64, k=4, epochs=6, batch_size=256, lr=1e-2,
                      dead_after_steps=50)
    reported = []
    sae, history = train_sae(rows[2000:], cfg, on_step=lambda p: reported.append(p.metrics()["threshold"])
                             if p.epoch_done else None)
    assert type(sae) is BatchTopKSAE
    assert variance_explained(sae, rows[:2000]) > 0.8
    assert reported[-1] == sae.threshold.item() > 0
    with torch.no_grad():
        l0 = (sae.encode(held_out) > 0).sum(dim=1).float()
        assert 2 <= l0.mean() <= 8  # about k = 4 a token, as training kept on average
        assert l0.min() < l0.max()  # a threshold, not k per row
        sae.threshold.zero_()
        assert (sae.encode(held_out) > 0).sum(dim=1).float().mean() > 2 * l0.mean()  # the threshold did the work


class Payload:
    """Unpickling this runs a shell command: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_checkpoint_is_refused_and_never_run(tmp_path):
    """Checkpoints (Ray Train's and `qsae train`'s) are read by load_training_state: a pickle that runs
    code when loaded is refused with the file's name, and the code does not run; a real one loads."""
    from qsae.training.state import checkpoint_state, load_training_state, new_run

    marker = tmp_path / "ran"
    planted = tmp_path / "train_state.pt"
    torch.save({"sae_state": {}, "history": Payload(marker)}, planted)
    with pytest.raises(ValueError, match=f"checkpoint {planted} holds Python objects besides tensors"):
        load_training_state(planted)
    assert not marker.exists()
    # the payload is live: an unrestricted load runs it
    torch.load(planted, weights_only=False)
    assert marker.exists()

    cfg = TrainConfig(n_features=16, k=2, epochs=1, batch_size=32)
    source = ArraySource(planted_rows(64, 8, 16, 2, seed=0))
    run = new_run(source, cfg, torch.device("cpu"), fresh=True)
    real = tmp_path / "real.pt"
    state = checkpoint_state(run, cfg, source, world=1)
    torch.save(state, real)
    loaded = load_training_state(real)
    assert loaded["config"] == state["config"] and loaded["n_rows"] == 64
    torch.testing.assert_close(loaded["sae_state"]["W_enc"], state["sae_state"]["W_enc"])
    np.testing.assert_array_equal(loaded["steps_since_fired"], state["steps_since_fired"])


def test_no_module_loads_a_pickle_unrestricted():
    """The guard for the above: nothing in qsae calls torch.load with weights_only=False."""
    from pathlib import Path

    sources = Path(__file__).resolve().parent.parent / "qsae"
    assert not [p for p in sources.rglob("*.py") if "weights_only=False" in p.read_text()]


def test_a_layer_keeps_only_the_sae_its_last_training_wrote(tmp_path):
    """Trained again at another width and architecture into the same run: the record names the new
    SAE, no file of the old one is left (its sparsify folder included), and load_trained gives it."""
    from qsae.rundir import RunDir
    from qsae.training.trained import TrainedSAE, load_trained, save_trained

    run = RunDir(tmp_path)
    save_trained(run, 7, TrainedSAE(TopKSAE(8, 32, 4), {"revived": 0}, recipe_settings(TrainConfig())))
    newer = BatchTopKSAE(8, 16, 2)
    settings = recipe_settings(TrainConfig(architecture="batchtopk", n_features=16, k=2))
    save_trained(run, 7, TrainedSAE(newer, {"revived": 1}, settings))
    out = tmp_path / "saes" / "layer=7"
    assert not list(out.glob("sae_L7_n32_*")) and not (out / "sparsify").exists()
    trained = load_trained(run, 7)
    sae, history = trained.sae, trained.history
    assert isinstance(sae, BatchTopKSAE) and (sae.n_features, sae.k) == (16, 2) and history == {"revived": 1}
    assert trained.settings == settings
    torch.testing.assert_close(sae.W_dec, newer.W_dec)
    assert [p.name for p in (tmp_path / "saes").iterdir()] == ["layer=7"]  # no staging left
    # a record without its weights key, or none at all: said, not a traceback
    record = json.loads((out / "trained.json").read_text())
    del record["weights"]
    (out / "trained.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not a trained layer qsae wrote"):
        load_trained(run, 7)
    (out / "trained.json").unlink()
    with pytest.raises(FileNotFoundError, match="no trained SAE for layer 7"):
        load_trained(run, 7)


@pytest.mark.parametrize("recipe", ["original", "modern"])
def test_saes_trained_in_one_pass_are_each_the_sae_trained_alone(small_rows, recipe):
    """A sweep: three shapes (two widths, two k, one BatchTopK) trained on each batch in turn equal,
    bit for bit, each trained alone with the same settings (the same shuffle, seeds and schedule);
    a checkpoint of the pass, taken mid-epoch, resumes all three exactly."""
    shapes = [{"n_features": 48, "k": 3}, {"n_features": 96, "k": 3}, {"n_features": 48, "k": 6}]
    if recipe == "modern":
        shapes.append({"n_features": 48, "k": 3, "architecture": "batchtopk"})
    cfgs = [small_cfg(recipe=recipe, dead_after_steps=2, **shape) for shape in shapes]
    checkpoints = {}
    together = train_saes(small_rows, cfgs, on_step=lambda p: checkpoints.setdefault(p.step, p.checkpoint()))
    for cfg, (sae, history) in zip(cfgs, together):
        alone, alone_history = train_sae(small_rows, cfg)
        assert (sae.n_features, sae.k, sae.architecture) == (cfg.n_features, cfg.k, cfg.architecture)
        for name, param in alone.state_dict().items():
            assert torch.equal(param, sae.state_dict()[name]), (cfg.n_features, cfg.k, name)
        for key in ("loss", "fvu", "step_fvu", "revived", "steps", "tokens_seen"):
            assert history[key] == alone_history[key], key
    steps_per_epoch = -(-len(small_rows) // cfgs[0].batch_size)
    resumed = train_saes(small_rows, cfgs, resume=checkpoints[steps_per_epoch + 4])
    for (sae, _), (again, _) in zip(together, resumed):
        for name, param in sae.state_dict().items():
            assert torch.equal(param, again.state_dict()[name]), name


@pytest.mark.parametrize("other, problem", [
    ({"lr": 1e-3}, "these differ: lr"),
    ({"epochs": 2, "seed": 4}, "these differ: epochs, seed"),
])
def test_saes_of_one_pass_must_share_all_but_their_shape(small_rows, other, problem):
    with pytest.raises(ValueError, match=problem):
        train_saes(small_rows, [small_cfg(), small_cfg(n_features=96, **other)])


def prefix_fvus(sae: TopKSAE, rows: np.ndarray, k: int, prefixes: list[int]) -> np.ndarray:
    """Each prefix's FVU on rows, in plain torch: the codes are BatchTopK's selection over all the
    rows (their k x rows largest pre-activations, ReLU'd), decoded from the first p latents only."""
    x = torch.from_numpy(rows)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        kept = pre.flatten().topk(k * len(x)).indices
        codes = torch.zeros(pre.numel()).index_put((kept,), pre.flatten()[kept].relu()).view_as(pre)
        total = (x - x.mean(0)).pow(2).sum()
        return np.array([((x - codes[:, :p] @ sae.W_dec[:p] - sae.b_dec).pow(2).sum() / total).item()
                         for p in prefixes])


def test_matryoshka_training_teaches_every_prefix_to_reconstruct():
    """Trained on planted rows, each prefix of a Matryoshka SAE reconstructs held-out rows better
    than before training, and every prefix short of the whole dictionary far better than the same
    prefix of a BatchTopK SAE trained alike (which puts no weight on its first latents)."""
    from qsae.streaming import ArraySource
    from qsae.training.state import new_run

    rows = planted_rows(8000, 24, 48, 3, seed=5)
    train, held_out = rows[1000:], rows[:1000]
    cfg = TrainConfig(architecture="matryoshka-batchtopk", n_features=64, k=3, epochs=4, batch_size=256, lr=1e-2,
                      dead_after_steps=50, autocast_bf16=False)
    prefixes = cfg.prefixes()
    assert prefixes == [4, 8, 16, 32, 64]
    before = prefix_fvus(new_run(ArraySource(train), cfg, torch.device("cpu"), fresh=True).sae, held_out, 3, prefixes)
    sae, history = train_sae(train, cfg)
    assert type(sae) is MatryoshkaBatchTopKSAE and sae.prefixes.tolist() == prefixes and sae.threshold > 0
    after = prefix_fvus(sae, held_out, 3, prefixes)
    assert (after < before - 0.1).all(), (before, after)
    assert (np.diff(after) < 0).all()  # each wider prefix adds to the narrower one's reconstruction
    assert history["fvu"][-1] < 0.5
    batchtopk, _ = train_sae(train, dataclasses.replace(cfg, architecture="batchtopk"))
    plain = prefix_fvus(batchtopk, held_out, 3, prefixes)
    assert (after[:-1] < plain[:-1] - 0.1).all(), (after, plain)


def test_a_sweep_member_of_another_width_takes_its_own_default_prefixes(small_rows):
    from qsae.config import TrainStageConfig

    stage = TrainStageConfig(architecture="matryoshka-batchtopk", n_features=48, k=3, sweep={"n_features": [48, 96]})
    stage.check_stage()
    cfgs = [dataclasses.replace(c, epochs=1, batch_size=256, autocast_bf16=False) for c in stage.trainers()]
    assert [c.prefixes() for c in cfgs] == [[3, 6, 12, 24, 48], [6, 12, 24, 48, 96]]
    saes = [sae for sae, _ in train_saes(small_rows, cfgs)]
    assert [sae.prefixes.tolist() for sae in saes] == [c.prefixes() for c in cfgs]
    # Prefixes given explicitly are every member's, n appended where it is wider.
    wider = dataclasses.replace(stage, matryoshka_prefixes=[8, 24], sweep={"n_features": [96]}).trainers()
    assert [c.prefixes() for c in wider] == [[8, 24, 48], [8, 24, 96]]


def test_memory_estimate_counts_a_matryoshka_sae_s_prefix_reconstructions():
    from qsae.training.state import training_memory

    plain = TrainConfig(architecture="batchtopk", n_features=4096, k=32, batch_size=1024)
    nested = dataclasses.replace(plain, architecture="matryoshka-batchtopk")
    # three fp32 [batch, 5 prefixes, d_in] tensors more
    assert training_memory([nested], 512) - training_memory([plain], 512) == 4 * 3 * 1024 * 5 * 512


def test_analyze_refuses_a_matryoshka_sae_trained_with_other_prefixes():
    from qsae.analyze import check_trained_matches
    from qsae.training.trained import TrainedSAE

    cfg = TrainConfig(architecture="matryoshka-batchtopk", n_features=64, k=4)
    trained = {3: TrainedSAE(MatryoshkaBatchTopKSAE(8, 64, 4), {}, recipe_settings(cfg))}
    check_trained_matches(cfg, trained, 8)  # the default prefixes, as trained
    with pytest.raises(ValueError, match=r"layer 3: the trained SAE has matryoshka prefixes \[4, 8, 16, 32, 64\], "
                                         r"but the config asks for \[16, 64\]"):
        check_trained_matches(dataclasses.replace(cfg, matryoshka_prefixes=[16]), trained, 8)
