"""A run with a bounded store: its release's rollout pools and top activations come from every response
token (the encode pass), equal to a brute force over a full-token store of the same rollouts that
the test captures itself; and with release.every_token off, from the stored sample."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.numpy import load_file

from qsae.capture import capture_residuals, capture_shard
from qsae.rollout import read_rollouts
from qsae.sae_files import load_sae
from qsae.store import residual_matrix, shard_path
from small_run import build_run

LAYERS = (3, 7, 11)
BOUNDED = ["rollout.num_questions=12", "capture.keep_per_rollout=6", "train.epochs=2", "train.n_features=64",
           "train.k=4", "release.bootstrap=20", "release.permutations=50", "release.top_contexts=4",
           "release.context_tokens=3", "causal.enabled=false"]


@pytest.fixture(scope="module")
def bounded_run(tiny_path, tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("bounded") / "run", BOUNDED)


@pytest.fixture(scope="module")
def every_token(bounded_run, tiny, tmp_path_factory) -> dict[int, dict[str, np.ndarray]]:
    """The run's rollouts captured again here at every response position, each layer's rows encoded by
    the released SAE (dense), keeping the tokens the run's rules keep (not special, norm within the
    split's limits at every layer)."""
    model, _ = tiny
    rollouts = read_rollouts(bounded_run.rollouts)
    path = tmp_path_factory.mktemp("full")
    capture_shard(partial(capture_residuals, model, batch_size=1), rollouts, list(LAYERS), path, shard="all",
                  dtype="float32")
    tables = {layer: pa.ipc.open_file(str(shard_path(path, layer, "all"))).read_all() for layer in LAYERS}
    limits = json.loads(bounded_run.split.read_text())["rows"]["norm_threshold"]
    kept = ~tables[LAYERS[0]].column("special").to_numpy(zero_copy_only=False)
    for layer in LAYERS:
        kept &= tables[layer].column("norm").to_numpy() <= limits[str(layer)]
    out = {}
    for layer in LAYERS:
        sae = load_sae(bounded_run.release / f"sae_L{layer}_n64_k4.pt")
        with torch.no_grad():
            codes = sae.encode(torch.from_numpy(residual_matrix(tables[layer])[kept])).numpy()
        out[layer] = {"codes": codes, "rollout_id": tables[layer].column("rollout_id").to_numpy()[kept],
                      "position": tables[layer].column("position").to_numpy()[kept]}
    return out


def test_the_store_is_bounded_and_the_pools_are_over_every_token(bounded_run, every_token):
    rollouts = {r.rollout_id: r for r in read_rollouts(bounded_run.rollouts)}
    split = json.loads(bounded_run.split.read_text())
    assert split["rows"]["stored"] == sum(min(r.n_response_tokens, 6) for r in rollouts.values())
    pooled = load_file(str(bounded_run.release / "rollout_features.safetensors"))
    summary = json.loads((bounded_run.release / "final_summary.json").read_text())["layers"]
    more_than_stored = 0
    for layer in LAYERS:
        e = every_token[layer]
        expected = np.stack([e["codes"][e["rollout_id"] == r].max(axis=0) for r in pooled["rollout_id"].tolist()])
        np.testing.assert_allclose(pooled[f"L{layer}"], expected, rtol=1e-5, atol=1e-6)
        assert summary[str(layer)]["rollout_level"]["pooled_over"] == "every response token"
        more_than_stored += int((e["codes"].shape[0]) > split["rows"]["stored"])
    assert more_than_stored == len(LAYERS)  # more tokens pooled than the store holds
    assert "every response token of every rollout" in (bounded_run.release / "README.md").read_text()


def test_top_activations_are_the_largest_over_every_token(bounded_run, every_token):
    contexts = json.loads((bounded_run.release / "feature_characterization.json").read_text())["layers"]
    for layer in LAYERS:
        e = every_token[layer]
        codes, keys = e["codes"], e["rollout_id"].astype(np.int64) * 100_000 + e["position"]
        features = contexts[str(layer)]
        assert set(map(int, features)) == set(np.flatnonzero((codes > 0).any(axis=0)).tolist())
        for f, top in features.items():
            f = int(f)
            firing = np.flatnonzero(codes[:, f] > 0)
            best = sorted(firing, key=lambda i: (-codes[i, f], keys[i]))[:4]
            assert [(t["rollout"], t["position"]) for t in top] == \
                [(int(e["rollout_id"][i]), int(e["position"][i])) for i in best]
            np.testing.assert_allclose([t["activation"] for t in top], codes[best, f], atol=1e-4)


def test_without_the_encode_pass_the_pools_are_over_the_sample(tiny_path, tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("sampled") / "run", [*BOUNDED, "release.every_token=false"])
    summary = json.loads((run.release / "final_summary.json").read_text())["layers"]
    assert all(summary[str(layer)]["rollout_level"]["pooled_over"] == "the sampled tokens" for layer in LAYERS)
    assert not run.encoded.exists()
    card = (run.release / "README.md").read_text()
    assert "over the stored sample" in card and "every response token of every rollout" not in card
