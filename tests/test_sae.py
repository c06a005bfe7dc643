import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qsae.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from qsae.sae_files import load_sae, release_tensors, save_sae, threshold_per_latent

D_IN, N_FEATURES, K = 24, 80, 6


@pytest.fixture
def sae() -> TopKSAE:
    """An SAE with non-trivial biases and a non-transposed encoder, so every term of the
    formula matters."""
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, N_FEATURES, K)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(50, D_IN, generator=torch.Generator().manual_seed(1))


def test_parameters_match_release_contract():
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, N_FEATURES, K)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (D_IN, N_FEATURES), "b_enc": (N_FEATURES,),
                      "W_dec": (N_FEATURES, D_IN), "b_dec": (D_IN,)}
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N_FEATURES))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()


@pytest.mark.parametrize("sizes", [(4, 8, 9), (0, 8, 2), (4, 0, 1), (4, 8, 0)])
def test_bad_sizes_raise(sizes):
    with pytest.raises(ValueError):
        TopKSAE(*sizes)


def test_encode_is_sparse_and_nonnegative(sae, x):
    z = sae.encode(x)
    assert z.shape == (50, N_FEATURES)
    assert ((z != 0).sum(dim=-1) <= K).all()
    assert (z >= 0).all()
    assert (z > 0).any()


def test_encode_matches_design_formula(sae, x):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = torch.zeros_like(pre)
    for row in range(x.shape[0]):
        order = pre[row].argsort(descending=True)[:K]
        expected[row, order] = pre[row, order].clamp_min(0)
    assert torch.allclose(sae.encode(x), expected)


def test_encode_keeps_leading_dims(sae, x):
    batched = x.reshape(5, 10, D_IN)
    assert torch.allclose(sae.encode(batched).reshape(50, -1), sae.encode(x))
    assert torch.allclose(sae(batched).reshape(50, -1), sae(x), atol=1e-5)


def test_decode_topk_equals_dense_decode(sae, x):
    values, indices = sae.encode_topk(x)
    assert torch.allclose(sae.decode_topk(values, indices), sae.decode(sae.encode(x)), atol=1e-5)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-5)


def test_normalize_decoder(sae):
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N_FEATURES, 1) * 5 + 0.1)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N_FEATURES), atol=1e-6)


def _release_paths(paths: dict[str, Path]) -> dict[str, Path]:
    return {"pt": paths["pt"], "safetensors": paths["safetensors"],
            "saelens": paths["saelens"], "saelens cfg.json": paths["saelens"] / "cfg.json",
            "sparsify": paths["sparsify"]}


def test_save_release_round_trips_every_format(sae, x, tmp_path):
    paths = save_sae(sae, tmp_path, layer=7, hook="model.layers.7")
    assert paths["pt"].name == f"sae_L7_n{N_FEATURES}_k{K}.pt"
    assert paths["safetensors"].name == f"sae_L7_n{N_FEATURES}_k{K}.safetensors"
    expected = sae.encode(x)
    for fmt, path in _release_paths(paths).items():
        loaded = load_sae(path)
        assert loaded.k == K, fmt
        assert torch.equal(loaded.encode(x), expected), fmt
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_release_files_follow_the_contract(sae, tmp_path):
    paths = save_sae(sae, tmp_path, layer=7, hook="blocks.7.hook_resid_post")
    state = torch.load(paths["pt"], weights_only=True)
    fresh = TopKSAE(D_IN, N_FEATURES, K)
    fresh.load_state_dict(state)
    for name, param in sae.named_parameters():
        assert torch.equal(getattr(fresh, name), param)

    saelens_cfg = json.loads((paths["saelens"] / "cfg.json").read_text())
    assert (saelens_cfg["architecture"], saelens_cfg["d_in"], saelens_cfg["d_sae"], saelens_cfg["k"]) \
        == ("topk", D_IN, N_FEATURES, K)
    assert saelens_cfg["metadata"]["hook_name"] == "blocks.7.hook_resid_post"
    with safe_open(str(paths["saelens"] / "sae_weights.safetensors"), "pt") as f:
        assert f.get_tensor("W_enc").shape == (D_IN, N_FEATURES)

    sparsify_cfg = json.loads((paths["sparsify"] / "cfg.json").read_text())
    assert (sparsify_cfg["activation"], sparsify_cfg["num_latents"], sparsify_cfg["k"],
            sparsify_cfg["d_in"]) == ("topk", N_FEATURES, K, D_IN)
    assert paths["sparsify"].name == "layers.7"
    with safe_open(str(paths["sparsify"] / "sae.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("encoder.weight"), sae.W_enc.detach().T)

    with safe_open(str(paths["safetensors"]), "pt") as f:
        assert f.metadata()["k"] == str(K)


def test_save_release_replaces_existing_files(sae, x, tmp_path):
    save_sae(sae, tmp_path, layer=1, hook="h")
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    paths = save_sae(sae, tmp_path, layer=1, hook="h")
    assert torch.equal(load_sae(paths["pt"]).encode(x), sae.encode(x))


def test_load_k_override_and_missing_k(sae, x, tmp_path):
    paths = save_sae(sae, tmp_path, layer=2, hook="h")
    assert load_sae(paths["pt"], k=2).encode(x).count_nonzero(dim=-1).max() <= 2
    renamed = tmp_path / "weights.pt"
    paths["pt"].rename(renamed)
    with pytest.raises(ValueError, match="k"):
        load_sae(renamed)
    assert load_sae(renamed, k=K).k == K


def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing.pt")
    other = tmp_path / "weights.npy"
    other.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="unrecognised"):
        load_sae(other)
    with pytest.raises(ValueError, match="cfg.json"):
        load_sae(tmp_path)
    torch.save({"W_enc": torch.zeros(3, 4)}, tmp_path / "partial_k2.pt")
    with pytest.raises(ValueError, match="expected tensors"):
        load_sae(tmp_path / "partial_k2.pt")


def test_bad_hook_name(sae, tmp_path):
    for hook_name in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="hook_name"):
            save_sae(sae, tmp_path, layer=0, hook=hook_name)


def test_saelens_loads_release(sae, x, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    paths = save_sae(sae, tmp_path, layer=3, hook="blocks.3.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(str(paths["saelens"]))
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.allclose(theirs.encode(x), codes, atol=1e-5)
        assert torch.allclose(theirs.decode(codes), sae.decode(codes), atol=1e-5)


def test_sparsify_loads_release(sae, x, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    paths = save_sae(sae, tmp_path, layer=3, hook="blocks.3.hook_resid_post")
    theirs = sparsify.Sae.load_from_disk(paths["sparsify"])
    with torch.no_grad():
        out = theirs.encode(x)
        codes = torch.zeros(x.shape[0], N_FEATURES).scatter_(-1, out.top_indices, out.top_acts)
        assert torch.allclose(codes, sae.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(out.top_acts, out.top_indices), sae(x), atol=1e-5)


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(*values.shape[:-1], n, dtype=values.dtype).scatter(-1, indices, values)


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_encoder_gradients_match_autograd(with_dead):
    """The sparse backward of TopKEncoder against autograd through the dense formula (float64)."""
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, N_FEATURES, K).double()
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, D_IN, dtype=torch.float64, requires_grad=True)
    dead = (torch.arange(N_FEATURES) % 3 == 0) if with_dead else None
    k_aux = 9
    weights = torch.randn(50, N_FEATURES, dtype=torch.float64)

    def grads(objective):
        for tensor in (*sae.parameters(), x):
            tensor.grad = None
        objective.backward()
        return [tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                for tensor in (sae.W_enc, sae.b_enc, sae.b_dec, x)]

    values, indices, aux_values, aux_indices = sae.encode_for_training(x, dead, k_aux)
    ours = dense_codes(values, indices, N_FEATURES)
    ours_aux = dense_codes(aux_values, aux_indices, N_FEATURES)
    fast = grads((ours * weights).sum() + ours_aux.pow(2).sum())

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top_values, top_indices = pre.topk(K, dim=-1)
    expected = dense_codes(top_values.relu(), top_indices, N_FEATURES)
    objective = (expected * weights).sum()
    if with_dead:
        aux_top, aux_top_indices = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1)
        expected_aux = dense_codes(aux_top.relu(), aux_top_indices, N_FEATURES)
        objective = objective + expected_aux.pow(2).sum()
        assert torch.allclose(ours_aux, expected_aux)
        assert dead[aux_indices].all()  # more dead latents than k_aux: every pick is dead
    else:
        assert aux_indices.shape == (50, 0)
    assert torch.allclose(ours, expected)
    for name, got, want in zip(("W_enc", "b_enc", "b_dec", "x"), fast, grads(objective)):
        assert torch.allclose(got, want, atol=1e-10), name


def test_decoder_sum_is_decode_without_bias(sae, x):
    values, indices = sae.encode_topk(x)
    assert torch.equal(sae.decoder_sum(values, indices, dense=False) + sae.b_dec, sae.decode_topk(values, indices))


@pytest.mark.parametrize("k", [4, 40])  # 4 x 32 < 512 latents: gathered rows; 40 x 32 >= 512: one dense matmul
def test_decoder_sum_gathers_or_multiplies_to_the_same_sum_and_gradients(k):
    """The AuxK term's decoder_sum chooses its path by k; decode_topk always gathers (the original
    recipe's sums stay bit for bit)."""
    # sum_j values[j] W_dec[indices[j]], written out here, and its gradients, on either path.
    torch.manual_seed(3)
    sae = TopKSAE(24, 512, 8).double()
    values = torch.rand(6, k, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(512)[:k] for _ in range(6)])
    got = sae.decoder_sum(values, indices)
    expected = torch.stack([(values[i, :, None] * sae.W_dec[indices[i]]).sum(dim=0) for i in range(6)])
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(got)
    ours = torch.autograd.grad((got * weights).sum(), (values, sae.W_dec))
    theirs = torch.autograd.grad((expected * weights).sum(), (values, sae.W_dec))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_encode_for_training_under_bf16_autocast(sae, x):
    values, indices = sae.encode_topk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_values, cast_indices, _, _ = sae.encode_for_training(x)
    assert cast_values.dtype == torch.float32
    # Same latents up to near-ties, values to bf16 precision.
    overlap = (dense_codes(cast_values, cast_indices, N_FEATURES) > 0) & (sae.encode(x) > 0)
    assert overlap.sum() >= 0.9 * (values > 0).sum()
    assert torch.allclose(dense_codes(cast_values, cast_indices, N_FEATURES)[overlap],
                          sae.encode(x)[overlap], rtol=0.05, atol=0.05)


# BatchTopK

THRESHOLD = 12.0  # with the fixture's weights about K latents a row are above it: some rows more, some fewer


@pytest.fixture
def batchtopk() -> BatchTopKSAE:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_IN, N_FEATURES, K)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.threshold.fill_(THRESHOLD)
    return sae


def numpy_pre(sae: TopKSAE, x: torch.Tensor) -> np.ndarray:
    """The encoder's pre-activations, written out in float64 numpy."""
    W_enc, b_enc, b_dec = (getattr(sae, name).detach().double().numpy() for name in ("W_enc", "b_enc", "b_dec"))
    return (x.double().numpy() - b_dec) @ W_enc + b_enc


def test_batchtopk_encode_keeps_what_exceeds_the_threshold(batchtopk, x):
    pre = numpy_pre(batchtopk, x)
    expected = np.where(pre > THRESHOLD, pre, 0.0)
    codes = batchtopk.encode(x).detach()
    assert not (np.abs(pre - THRESHOLD) < 1e-4).any()  # no entry so near the threshold that rounding decides
    np.testing.assert_array_equal(codes.numpy() > 0, expected > 0)
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-4)
    active = (expected > 0).sum(axis=1)
    assert active.min() < K < active.max()  # not k per row: the threshold decides
    assert torch.allclose(batchtopk(x), batchtopk.decode(codes), atol=1e-5)  # forward is dense: never truncated
    # Until trained the threshold is 0: every positive pre-activation (ReLU).
    fresh = BatchTopKSAE(D_IN, N_FEATURES, K)
    np.testing.assert_array_equal(fresh.encode(x).detach().numpy() > 0, numpy_pre(fresh, x) > 0)


def test_batchtopk_sparse_view_is_the_dense_codes_up_to_its_width(batchtopk, x):
    assert batchtopk.sparse_width == min(N_FEATURES, 4 * K)
    values, indices = batchtopk.encode_topk(x)
    assert values.shape == indices.shape == (len(x), batchtopk.sparse_width)
    dense = batchtopk.encode(x)
    assert torch.equal(dense_codes(values, indices, N_FEATURES), dense)  # no row has 4k latents above the threshold
    assert torch.allclose(batchtopk.decode_topk(values, indices), batchtopk(x), atol=1e-5)
    # With the threshold at 0 about half the latents are active: the view keeps each row's largest.
    with torch.no_grad():
        batchtopk.threshold.zero_()
    values, indices = batchtopk.encode_topk(x)
    dense = batchtopk.encode(x)
    assert ((dense > 0).sum(dim=1) > batchtopk.sparse_width).all()
    assert torch.equal(values, dense.topk(batchtopk.sparse_width, dim=-1).values)


def top_pairs(pre: np.ndarray, count: int) -> set[tuple[int, int]]:
    """The (row, latent) pairs of the `count` largest entries of pre, by a full sort in numpy."""
    flat = np.argsort(-pre, axis=None, kind="stable")[:count]
    return {(int(i) // pre.shape[1], int(i) % pre.shape[1]) for i in flat}


@pytest.mark.parametrize("case", ["candidates", "one row dominates"])
def test_batchtopk_training_selects_k_times_batch_over_the_batch(batchtopk, x, case):
    x = x.clone()
    if case == "one row dominates":  # row 0 holds more than the 4k candidates per row: the exact fallback
        x[0] *= 40
    pre = numpy_pre(batchtopk, x)
    values, positions, _, _ = (t.detach() for t in batchtopk.encode_for_training(x))
    assert values.shape == positions.shape == (K * len(x),)
    assert torch.equal(positions, positions.sort().values)
    pairs = {(int(p) // N_FEATURES, int(p) % N_FEATURES) for p in positions}
    assert pairs == top_pairs(pre, K * len(x))
    rows, latents = positions // N_FEATURES, positions % N_FEATURES
    np.testing.assert_allclose(values.numpy(), np.maximum(pre[rows.numpy(), latents.numpy()], 0), atol=1e-4)
    per_row = torch.bincount(rows, minlength=len(x))
    assert per_row.min() < K < per_row.max()
    if case == "one row dominates":
        assert per_row[0] > batchtopk.sparse_width
    # The reconstruction of those codes: one bag of decoder rows per batch row, b_dec for a row without any.
    dense = torch.zeros(len(x), N_FEATURES).index_put_((rows, latents), values)
    assert torch.allclose(batchtopk.decode_for_training(values, positions, len(x)), batchtopk.decode(dense),
                          atol=1e-4)
    assert torch.equal(batchtopk.fire_counts(values, positions), (dense > 0).sum(dim=0).float())


@pytest.mark.parametrize("with_dead", [False, True])
def test_batchtopk_encoder_gradients_match_autograd(with_dead):
    """BatchTopKEncoder's sparse backward against autograd through the dense formula (float64)."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_IN, N_FEATURES, K).double()
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, D_IN, dtype=torch.float64, requires_grad=True)
    dead = (torch.arange(N_FEATURES) % 3 == 0) if with_dead else None
    k_aux, weights = 9, torch.randn(50, N_FEATURES, dtype=torch.float64)

    def grads(objective):
        for tensor in (*sae.parameters(), x):
            tensor.grad = None
        objective.backward()
        return [tensor.grad for tensor in (sae.W_enc, sae.b_enc, sae.b_dec, x)]

    values, positions, aux_values, aux_indices = sae.encode_for_training(x, dead, k_aux)
    ours = torch.zeros(50 * N_FEATURES, dtype=torch.float64).index_put((positions,), values).reshape(50, N_FEATURES)
    objective = (ours * weights).sum()
    if with_dead:
        objective = objective + dense_codes(aux_values, aux_indices, N_FEATURES).pow(2).sum()
    fast = grads(objective)

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    kept = pre.flatten().topk(K * 50).indices
    expected = torch.zeros(50 * N_FEATURES, dtype=torch.float64).index_put(
        (kept,), pre.flatten()[kept].relu()).reshape(50, N_FEATURES)
    objective = (expected * weights).sum()
    if with_dead:
        aux_top, aux_top_indices = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1)
        objective = objective + dense_codes(aux_top.relu(), aux_top_indices, N_FEATURES).pow(2).sum()
    assert torch.allclose(ours, expected)
    for name, got, want in zip(("W_enc", "b_enc", "b_dec", "x"), fast, grads(objective)):
        assert torch.allclose(got, want, atol=1e-10), name


def test_batchtopk_release_round_trips_every_format(batchtopk, x, tmp_path):
    paths = save_sae(batchtopk, tmp_path, layer=7, hook="blocks.7.hook_resid_post")
    assert set(paths) == {"pt", "safetensors", "saelens"}  # sparsify has no thresholded architecture
    assert not (tmp_path / "sparsify").exists()
    expected = batchtopk.encode(x)
    for fmt, path in {"pt": paths["pt"], "safetensors": paths["safetensors"], "saelens": paths["saelens"],
                      "saelens cfg.json": paths["saelens"] / "cfg.json"}.items():
        for cls in (TopKSAE, BatchTopKSAE):  # the stored architecture decides, whichever class loads it
            loaded = load_sae(path, expected=cls)
            assert type(loaded) is BatchTopKSAE and loaded.k == K, fmt
            assert loaded.threshold.item() == pytest.approx(THRESHOLD), fmt
            assert torch.equal(loaded.encode(x), expected), fmt
    # The training state dict, as distributed.train_layers rebuilds the SAE from a checkpoint.
    rebuilt = TopKSAE.from_tensors(batchtopk.state_dict(), K, "batchtopk")
    assert type(rebuilt) is BatchTopKSAE and torch.equal(rebuilt.encode(x), expected)
    with pytest.raises(ValueError, match="recorded as 'topk'"):
        TopKSAE.from_tensors(batchtopk.state_dict(), K, "topk")


def test_batchtopk_release_files_follow_the_contract(batchtopk, tmp_path):
    paths = save_sae(batchtopk, tmp_path, layer=7, hook="blocks.7.hook_resid_post")
    state = torch.load(paths["pt"], weights_only=True)
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert state["threshold"].shape == () and state["threshold"].item() == pytest.approx(THRESHOLD)
    with safe_open(str(paths["safetensors"]), "pt") as f:
        assert (f.metadata()["architecture"], f.metadata()["k"]) == ("batchtopk", str(K))
        assert f.get_tensor("threshold").item() == pytest.approx(THRESHOLD)
    # SAELens's own BatchTopK trainer saves for inference as a JumpReLU SAE: cfg of JumpReLUSAEConfig,
    # the threshold repeated per latent, training architecture and k in the metadata.
    cfg = json.loads((paths["saelens"] / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", D_IN, N_FEATURES)
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    assert cfg["metadata"]["training_architecture_details"]["k"] == K
    with safe_open(str(paths["saelens"] / "sae_weights.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("threshold"), torch.full((N_FEATURES,), THRESHOLD))


def test_load_refuses_mismatched_architectures(sae, batchtopk, tmp_path):
    topk_paths = save_sae(sae, tmp_path / "topk", layer=1, hook="h")
    with pytest.raises(ValueError, match="topk SAE, not a batchtopk one"):
        load_sae(topk_paths["pt"], expected=BatchTopKSAE)
    paths = save_sae(batchtopk, tmp_path / "batchtopk", layer=1, hook="h")
    tensors = release_tensors(batchtopk)
    save_file(tensors, tmp_path / "mislabelled_k6.safetensors", metadata={"k": str(K), "architecture": "topk"})
    with pytest.raises(ValueError, match="recorded as 'topk'"):
        load_sae(tmp_path / "mislabelled_k6.safetensors")
    save_file(tensors, tmp_path / "unknown_k6.safetensors", metadata={"k": str(K), "architecture": "gated"})
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'; expected one of topk, batchtopk"):
        load_sae(tmp_path / "unknown_k6.safetensors")
    # A JumpReLU SAE with per-latent thresholds is not a BatchTopK one.
    weights = paths["saelens"] / "sae_weights.safetensors"
    save_file({**threshold_per_latent(tensors), "threshold": torch.rand(N_FEATURES)}, weights)
    with pytest.raises(ValueError, match="thresholds differ between latents"):
        load_sae(paths["saelens"])


def test_saelens_loads_batchtopk_release(batchtopk, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(2))
    paths = save_sae(batchtopk, tmp_path, layer=3, hook="blocks.3.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(str(paths["saelens"]))
    assert theirs.cfg.architecture() == "jumprelu"
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    with torch.no_grad():
        ours, codes = batchtopk.encode(x), theirs.encode(x)
        assert ((ours > 0).sum(dim=1) != K).any()  # thresholded codes, not k per row
        assert torch.equal(codes > 0, ours > 0)  # the same latents
        assert torch.allclose(codes, ours, atol=1e-5)
        assert torch.allclose(theirs.decode(codes), batchtopk(x), atol=1e-4)


@pytest.mark.parametrize("n, k, dtype", [(2048, 32, torch.float32), (4096, 32, torch.float32),
                                         (2048, 32, torch.bfloat16), (512, 4, torch.float64)])
def test_row_topk_selects_each_rows_k_largest(n, k, dtype):
    """The two-pass top-k (used where n is a multiple of its 256 groups) against a sort of each row
    in numpy; bf16 rows have many ties, where any k largest will do, so values are compared as sets."""
    from qsae.sae import row_topk

    torch.manual_seed(1)
    pre = (torch.randn(300, n) * torch.rand(300, 1) * 4).to(dtype)
    pre[7] = pre[7].abs() * 0 + 1  # a row of ties
    values, indices = row_topk(pre, k)
    rows = pre.float().numpy()
    expected = -np.sort(-rows, axis=1)[:, :k]
    np.testing.assert_array_equal(-np.sort(-values.float().numpy(), axis=1), expected)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row)) == k for row in indices.tolist())  # k distinct latents per row


def test_topk_encoder_selects_the_top_k_with_the_two_pass_top_k():
    torch.manual_seed(2)
    sae = TopKSAE(16, 512, 4)
    x = torch.randn(64, 16)
    values, indices, _, _ = sae.encode_for_training(x)
    reference_values, reference_indices = sae.encode_topk(x)
    assert torch.equal(indices.sort(dim=1).values, reference_indices.sort(dim=1).values)
    torch.testing.assert_close(values.sort(dim=1).values, reference_values.sort(dim=1).values)


# Matryoshka BatchTopK

PREFIXES = [10, 20, 40, 80]  # N_FEATURES / 8 up to N_FEATURES


@pytest.fixture
def matryoshka(batchtopk) -> MatryoshkaBatchTopKSAE:
    """The BatchTopK fixture's weights and threshold, with nested prefixes."""
    sae = MatryoshkaBatchTopKSAE(D_IN, N_FEATURES, K, PREFIXES[:-1])  # the last, n, is appended
    sae.load_state_dict({**batchtopk.state_dict(), "prefixes": sae.prefixes})
    return sae


def dense_prefix_sq_errors(sae: TopKSAE, x: torch.Tensor, codes: torch.Tensor, prefixes: list[int]) -> torch.Tensor:
    """sum ||x - x_hat_p||^2 for each prefix width p, x_hat_p from the first p latents of dense codes [B, n]."""
    return torch.stack([(x - (codes[:, :p] @ sae.W_dec[:p] + sae.b_dec)).pow(2).sum() for p in prefixes])


def training_codes(sae: TopKSAE, values: torch.Tensor, positions: torch.Tensor, rows: int) -> torch.Tensor:
    """encode_for_training's (values, positions) as dense codes [rows, n], differentiable in values."""
    return torch.zeros(rows * sae.n_features, dtype=values.dtype).index_put((positions,), values).view(rows, -1)


def test_matryoshka_prefixes_default_to_doubling_and_end_at_n():
    assert MatryoshkaBatchTopKSAE(D_IN, 4096, K).prefixes.tolist() == [256, 512, 1024, 2048, 4096]
    assert MatryoshkaBatchTopKSAE(D_IN, N_FEATURES, K).prefixes.tolist() == [5, 10, 20, 40, 80]
    assert MatryoshkaBatchTopKSAE(D_IN, 8, 2).prefixes.tolist() == [1, 2, 4, 8]  # n / 16 < 1 left out
    assert MatryoshkaBatchTopKSAE(D_IN, N_FEATURES, K, [16, 80]).prefixes.tolist() == [16, 80]
    for bad, problem in (([20, 10], "strictly increasing"), ([10, 10], "strictly increasing"),
                         ([0, 10], "positive"), ([10, 81], "beyond n_features=80")):
        with pytest.raises(ValueError, match=problem):
            MatryoshkaBatchTopKSAE(D_IN, N_FEATURES, K, bad)


def test_matryoshka_encodes_exactly_as_batchtopk(matryoshka, batchtopk, x):
    assert matryoshka.prefixes.tolist() == PREFIXES
    assert torch.equal(matryoshka.encode(x), batchtopk.encode(x))
    assert torch.equal(matryoshka(x), batchtopk(x))
    for ours, theirs in zip(matryoshka.encode_for_training(x), batchtopk.encode_for_training(x)):
        assert torch.equal(ours, theirs)


def test_matryoshka_prefix_losses_match_a_dense_reference(matryoshka, x):
    """prefix_sq_errors and the loss's reconstruction term against dense codes truncated to each
    prefix, in plain torch, on BatchTopK's selection (rows with more and fewer than k latents)."""
    from qsae.sae import prefix_sq_errors

    with torch.no_grad():
        values, positions, _, _ = matryoshka.encode_for_training(x)
        codes = training_codes(matryoshka, values, positions, len(x))
        expected = dense_prefix_sq_errors(matryoshka, x, codes, PREFIXES)
        rows, latents = positions // N_FEATURES, positions % N_FEATURES
        got = prefix_sq_errors(x, values, rows, latents, matryoshka.prefixes, matryoshka.W_dec, matryoshka.b_dec)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
        # Every group of latents between two prefixes holds some selected ones: the prefixes differ.
        assert len(set(torch.bucketize(latents, matryoshka.prefixes, right=True).tolist())) == len(PREFIXES)
        full = (x - matryoshka.decode_for_training(values, positions, len(x))).pow(2).sum()
        term = matryoshka.reconstruction_term(x, values, positions, full)
        torch.testing.assert_close(term, expected.mean(), rtol=1e-5, atol=1e-3)
    # A prefix no selected latent falls in reconstructs with b_dec alone.
    first = prefix_sq_errors(x, values[:0], rows[:0], latents[:0], matryoshka.prefixes[:1], matryoshka.W_dec,
                             matryoshka.b_dec)
    torch.testing.assert_close(first, (x - matryoshka.b_dec).pow(2).sum().reshape(1))


def test_matryoshka_loss_gradients_match_autograd(matryoshka, x):
    """The reconstruction term's gradients (through BatchTopKEncoder's sparse backward and the
    per-prefix bags) against autograd through the dense formula, in float64."""
    sae = matryoshka.double()
    x = x.double()

    def grads(objective):
        for p in sae.parameters():
            p.grad = None
        objective.backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters()}

    values, positions, _, _ = sae.encode_for_training(x)
    full = (x - sae.decode_for_training(values, positions, len(x))).pow(2).sum()
    fast = grads(sae.reconstruction_term(x, values, positions, full))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    kept = pre.flatten().topk(K * len(x)).indices
    codes = torch.zeros(len(x) * N_FEATURES, dtype=torch.float64).index_put(
        (kept,), pre.flatten()[kept].relu()).view(len(x), N_FEATURES)
    reference = grads(dense_prefix_sq_errors(sae, x, codes, PREFIXES).mean())
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-9, atol=1e-9, msg=name)


def test_matryoshka_release_round_trips_every_format(matryoshka, x, tmp_path):
    paths = save_sae(matryoshka, tmp_path, layer=7, hook="blocks.7.hook_resid_post")
    assert set(paths) == {"pt", "safetensors", "saelens"}  # sparsify has no thresholded architecture
    expected = matryoshka.encode(x)
    for fmt, path in {"pt": paths["pt"], "safetensors": paths["safetensors"], "saelens": paths["saelens"]}.items():
        for cls in (TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE):
            loaded = load_sae(path, expected=cls)
            assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.k == K, fmt
            assert loaded.prefixes.tolist() == PREFIXES and loaded.threshold.item() == pytest.approx(THRESHOLD), fmt
            assert torch.equal(loaded.encode(x), expected), fmt
    state = torch.load(paths["pt"], weights_only=True)
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "prefixes"}
    assert state["prefixes"].dtype == torch.int64 and state["W_enc"].dtype == torch.float32
    with safe_open(str(paths["safetensors"]), "pt") as f:
        assert f.metadata()["architecture"] == "matryoshka-batchtopk"
    # SAELens's Matryoshka BatchTopK trainer saves a JumpReLU SAE too, its widths in the training details.
    cfg = json.loads((paths["saelens"] / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["metadata"]["training_architecture"]) == ("jumprelu", "matryoshka_batchtopk")
    assert cfg["metadata"]["training_architecture_details"] == {"k": K, "matryoshka_widths": PREFIXES}
    with safe_open(str(paths["saelens"] / "sae_weights.safetensors"), "pt") as f:
        assert set(f.keys()) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    # The training state dict, as distributed.train_layers rebuilds the SAE from a checkpoint.
    rebuilt = TopKSAE.from_tensors(matryoshka.state_dict(), K, "matryoshka-batchtopk")
    assert type(rebuilt) is MatryoshkaBatchTopKSAE and rebuilt.prefixes.tolist() == PREFIXES
    with pytest.raises(ValueError, match="recorded as 'batchtopk'"):
        TopKSAE.from_tensors(matryoshka.state_dict(), K, "batchtopk")
    with pytest.raises(ValueError, match="must end at n_features=80"):
        TopKSAE.from_tensors({**matryoshka.state_dict(), "prefixes": torch.tensor([10, 20])}, K)


def test_saelens_loads_matryoshka_release(matryoshka, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(2))
    paths = save_sae(matryoshka, tmp_path, layer=3, hook="blocks.3.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(str(paths["saelens"]))
    assert theirs.cfg.architecture() == "jumprelu"
    assert theirs.cfg.metadata.training_architecture == "matryoshka_batchtopk"
    assert theirs.cfg.metadata.training_architecture_details["matryoshka_widths"] == PREFIXES
    with torch.no_grad():
        ours, codes = matryoshka.encode(x), theirs.encode(x)
        assert torch.equal(codes > 0, ours > 0)  # the same latents
        assert torch.allclose(codes, ours, atol=1e-5)
        assert torch.allclose(theirs.decode(codes), matryoshka(x), atol=1e-4)
