import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qsae.sae import TopKSAE

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
    paths = sae.save_release(tmp_path, layer=7, hook_name="model.layers.7")
    assert paths["pt"].name == f"sae_L7_n{N_FEATURES}_k{K}.pt"
    assert paths["safetensors"].name == f"sae_L7_n{N_FEATURES}_k{K}.safetensors"
    expected = sae.encode(x)
    for fmt, path in _release_paths(paths).items():
        loaded = TopKSAE.load(path)
        assert loaded.k == K, fmt
        assert torch.equal(loaded.encode(x), expected), fmt
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_release_files_follow_the_contract(sae, tmp_path):
    paths = sae.save_release(tmp_path, layer=7, hook_name="blocks.7.hook_resid_post")
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
    sae.save_release(tmp_path, layer=1, hook_name="h")
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    paths = sae.save_release(tmp_path, layer=1, hook_name="h")
    assert torch.equal(TopKSAE.load(paths["pt"]).encode(x), sae.encode(x))


def test_load_k_override_and_missing_k(sae, x, tmp_path):
    paths = sae.save_release(tmp_path, layer=2, hook_name="h")
    assert TopKSAE.load(paths["pt"], k=2).encode(x).count_nonzero(dim=-1).max() <= 2
    renamed = tmp_path / "weights.pt"
    paths["pt"].rename(renamed)
    with pytest.raises(ValueError, match="k"):
        TopKSAE.load(renamed)
    assert TopKSAE.load(renamed, k=K).k == K


def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        TopKSAE.load(tmp_path / "missing.pt")
    other = tmp_path / "weights.npy"
    other.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="unrecognised"):
        TopKSAE.load(other)
    with pytest.raises(ValueError, match="cfg.json"):
        TopKSAE.load(tmp_path)
    torch.save({"W_enc": torch.zeros(3, 4)}, tmp_path / "partial_k2.pt")
    with pytest.raises(ValueError, match="expected tensors"):
        TopKSAE.load(tmp_path / "partial_k2.pt")


def test_bad_hook_name(sae, tmp_path):
    for hook_name in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="hook_name"):
            sae.save_release(tmp_path, layer=0, hook_name=hook_name)


def test_saelens_loads_release(sae, x, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    paths = sae.save_release(tmp_path, layer=3, hook_name="blocks.3.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(str(paths["saelens"]))
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.allclose(theirs.encode(x), codes, atol=1e-5)
        assert torch.allclose(theirs.decode(codes), sae.decode(codes), atol=1e-5)


def test_sparsify_loads_release(sae, x, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    paths = sae.save_release(tmp_path, layer=3, hook_name="blocks.3.hook_resid_post")
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
    assert torch.allclose(sae.decoder_sum(values, indices) + sae.b_dec, sae.decode_topk(values, indices))


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
