import numpy as np
import pytest
import torch

from qsae.sae import TopKSAE
from qsae.train import TrainConfig, revive_dead_, split_rows, train_sae


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: one intra-op thread is faster than two, and avoids the OpenMP
    spin-waits that slow small ops down by an order of magnitude when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_dictionary(n_rows: int, d: int, n_atoms: int, active: int, seed: int) -> np.ndarray:
    """Rows that are sums of `active` unit atoms out of `n_atoms`, with positive coefficients:
    a TopK SAE with k = active can explain them almost fully."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    support = np.argsort(rng.random((n_rows, n_atoms)), axis=1)[:, :active]
    codes = np.zeros((n_rows, n_atoms))
    np.put_along_axis(codes, support, rng.uniform(0.5, 2.0, (n_rows, active)), axis=1)
    return (codes @ atoms).astype(np.float32)


def variance_explained(sae: TopKSAE, rows: np.ndarray) -> float:
    """Pooled: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x = torch.from_numpy(rows)
    with torch.no_grad():
        x_hat = sae(x)
    return 1.0 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


def small_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"n_features": 48, "k": 3, "epochs": 3, "batch_size": 128, "lr": 3e-3,
                          "revive_every_epochs": 1, "dead_after_steps": 5, **overrides})


@pytest.fixture(scope="module")
def small_rows() -> np.ndarray:
    return planted_dictionary(1500, 12, 24, 3, seed=3)


def test_planted_dictionary_is_learned():
    rows = planted_dictionary(20_000, 32, 64, 4, seed=0)
    train, held_out = split_rows(len(rows), 0.1, seed=0)
    cfg = TrainConfig(n_features=64, k=4, epochs=6, batch_size=256, lr=1e-2,
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


def test_dead_features_are_revived(small_rows):
    # Far more features than the data needs and a short patience: many never fire.
    cfg = small_cfg(n_features=256, k=2, dead_after_steps=3)
    seen = []

    def on_epoch(epoch, sae, metrics):
        with torch.no_grad():
            fresh = (sae.W_dec == sae.W_enc.T).all(dim=1) & (sae.b_enc == 0)
        seen.append((epoch, metrics["revived"], int(fresh.sum())))

    _, history = train_sae(small_rows, cfg, on_epoch=on_epoch)
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


def test_resume_matches_uninterrupted_run(small_rows):
    # Revival after epoch 3 only, so the resumed part replays a revival too.
    cfg = small_cfg(epochs=4, revive_every_epochs=3, dead_after_steps=2, n_features=96)
    checkpoints, epochs_seen = {}, []

    def on_epoch(epoch, sae, metrics):
        epochs_seen.append(epoch)
        checkpoints[epoch] = metrics["checkpoint"]()

    full, history = train_sae(small_rows, cfg, on_epoch=on_epoch)
    assert epochs_seen == [1, 2, 3, 4]
    assert history["revived"] > 0
    resumed, resumed_history = train_sae(small_rows, cfg, resume=checkpoints[2])
    for name, param in full.state_dict().items():
        assert torch.equal(param, resumed.state_dict()[name]), name
    assert resumed_history["loss"] == history["loss"]
    assert resumed_history["revived"] == history["revived"]
    assert resumed_history["steps"] == history["steps"]


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
])
def test_bad_config_raises(overrides, problem):
    with pytest.raises(ValueError, match=problem):
        small_cfg(**overrides).validate(d_in=16)


def test_split_rows():
    train, held_out = split_rows(1000, 0.2, seed=5)
    assert len(held_out) == 200 and len(train) == 800
    assert np.array_equal(np.sort(np.concatenate([train, held_out])), np.arange(1000))
    again = split_rows(1000, 0.2, seed=5)
    assert np.array_equal(train, again[0]) and np.array_equal(held_out, again[1])
    assert not np.array_equal(held_out, split_rows(1000, 0.2, seed=6)[1])
    tiny_train, tiny_held_out = split_rows(2, 0.01, seed=0)
    assert len(tiny_train) == 1 and len(tiny_held_out) == 1
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="holdout_fraction"):
            split_rows(10, fraction, seed=0)
    with pytest.raises(ValueError, match="n_rows"):
        split_rows(0, 0.1, seed=0)
