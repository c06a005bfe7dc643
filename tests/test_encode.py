"""The encode pass: every response token's codes, pooled per rollout and streamed per feature, against a
brute force over a full-token store of the same rollouts, and shard by shard merged exactly."""
from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch

from qsae.capture import capture_residuals, capture_shard, special_token_ids
from qsae.encode import EncodeSettings, encode_rollouts, merge_encodings
from qsae.engines.hf_engine import HFEngine
from qsae.questions import BUNDLED_QUESTIONS, load_questions
from qsae.rollout import run_rollouts
from qsae.sae import TopKSAE
from qsae.store import residual_matrix, shard_path

LAYERS = [3, 7]
N_FEATURES, K, TOP, WIDTH = 24, 4, 5, 2


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """Rollouts, SAEs, settings that leave out special tokens and the highest norms, the codes the
    pass keeps, and the full-token store of the same rollouts (capture with no sampling rule)."""
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, max_new_tokens=30, batch_size=6)
    rollouts = run_rollouts(engine, tokenizer, load_questions(BUNDLED_QUESTIONS)[:6], 0, thinking=False, seed=0)
    torch.manual_seed(4)
    saes = {layer: TopKSAE(64, N_FEATURES, K) for layer in LAYERS}
    residuals_of = partial(capture_residuals, model, batch_size=1)
    path = tmp_path_factory.mktemp("full")
    capture_shard(residuals_of, rollouts, LAYERS, path, shard="s", dtype="float32")
    store = {}
    for layer in LAYERS:
        table = pa.ipc.open_file(str(shard_path(path, layer, "s"))).read_all()
        store[layer] = {"x": residual_matrix(table), **{name: table.column(name).to_numpy(zero_copy_only=False)
                                                       for name in ("rollout_id", "position", "token_id", "norm")}}
    limits = {layer: float(np.quantile(store[layer]["norm"], 0.9)) for layer in LAYERS}
    settings = EncodeSettings(top=TOP, width=WIDTH, seed=3, special_ids=frozenset(special_token_ids(tokenizer)),
                              norm_limits=limits, reservoir=7)
    return rollouts, saes, residuals_of, settings, store


def brute_force(store: dict, saes: dict, settings: EncodeSettings) -> dict[int, dict]:
    """Per layer: the kept tokens' dense codes, written out from the stored rows."""
    first = store[LAYERS[0]]
    kept = ~np.isin(first["token_id"], list(settings.special_ids))
    for layer in LAYERS:
        kept &= store[layer]["norm"] <= settings.norm_limits[layer]
    out = {}
    for layer in LAYERS:
        sae, x = saes[layer], torch.from_numpy(store[layer]["x"][kept])
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        values, indices = pre.topk(K, dim=-1)
        dense = torch.zeros(len(x), N_FEATURES).scatter_(1, indices, torch.relu(values)).detach().numpy()
        out[layer] = {"dense": dense, "rollout_id": first["rollout_id"][kept], "position": first["position"][kept]}
    return out


def test_pools_top_activations_and_windows_equal_a_brute_force_over_every_token(run):
    rollouts, saes, residuals_of, settings, store = run
    encoded = encode_rollouts(residuals_of, saes, rollouts, settings)
    expected = brute_force(store, saes, settings)
    assert len(expected[LAYERS[0]]["dense"]) < len(store[LAYERS[0]]["x"])  # some tokens left out
    for layer in LAYERS:
        got, e = encoded[layer], expected[layer]
        dense, rollout_id, position = e["dense"], e["rollout_id"], e["position"]
        ids = sorted(set(rollout_id.tolist()))
        np.testing.assert_array_equal(got.pool.rollout_ids, ids)
        for i, r in enumerate(ids):
            mine = dense[rollout_id == r]
            assert got.pool.n_tokens[i] == len(mine)
            np.testing.assert_allclose(got.pool.max[i], mine.max(axis=0), rtol=1e-6)
            np.testing.assert_allclose(got.pool.mean[i], mine.mean(axis=0), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got.pool.fire_fraction[i], (mine > 0).mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(got.stream.fire_count, (dense > 0).sum(axis=0))
        np.testing.assert_array_equal(got.stream.counts.sum(axis=1), (dense > 0).sum(axis=0))
        keys = (rollout_id.astype(np.int64) << 32) | position.astype(np.int64)
        top = got.stream.top
        for f in range(N_FEATURES):
            firing = np.flatnonzero(dense[:, f] > 0)
            best = sorted(firing, key=lambda i: (-dense[i, f], keys[i]))[:TOP]
            part = top.of(f)
            np.testing.assert_array_equal(top.row[part], keys[best])
            np.testing.assert_allclose(top.activation[part], dense[best, f], rtol=1e-6)
            # Each top entry's window: the feature's activation at each kept token around it, 0 elsewhere.
            windows = got.windows(np.full(len(best), f), keys[best])
            for window, i in zip(windows, best):
                for offset, act in zip(range(-WIDTH, WIDTH + 1), window):
                    at = np.flatnonzero((rollout_id == rollout_id[i]) & (position == position[i] + offset))
                    assert act == pytest.approx(dense[at[0], f] if len(at) else 0.0, abs=1e-6)


def test_shards_encoded_apart_merge_into_the_encoding_of_all(run):
    rollouts, saes, residuals_of, settings, _ = run
    whole = encode_rollouts(residuals_of, saes, rollouts, settings)
    parts = [encode_rollouts(residuals_of, saes, rollouts[i:i + 2], settings) for i in (4, 0, 2)]  # any order
    for layer in LAYERS:
        merged, one = merge_encodings([p[layer] for p in parts]), whole[layer]
        np.testing.assert_array_equal(merged.pool.rollout_ids, one.pool.rollout_ids)
        for name in ("max", "mean", "fire_fraction", "n_tokens"):
            np.testing.assert_array_equal(getattr(merged.pool, name), getattr(one.pool, name))
        for a, b in ((merged.stream.top, one.stream.top), (merged.stream.sample, one.stream.sample)):
            for x, y in zip(a.astuple(), b.astuple()):
                np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(merged.stream.counts, one.stream.counts)
        np.testing.assert_array_equal(merged.stream.fire_count, one.stream.fire_count)
        assert merged.stream.rows == one.stream.rows
        kept = (one.stream.sample.feature, one.stream.sample.row)
        np.testing.assert_array_equal(merged.windows(*kept), one.windows(*kept))
    with pytest.raises(ValueError, match="disjoint"):
        merge_encodings([parts[0][LAYERS[0]], parts[0][LAYERS[0]]])
