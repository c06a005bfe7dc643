"""Analysis stage: fidelity, feature statistics, feature data, charts and the model card."""
from __future__ import annotations

import dataclasses
import json
import struct
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from by_hand import question_bootstrap_ve
from planted import planted_rows
from sklearn.metrics import roc_auc_score

from qsae.analysis import charts
from qsae.analysis.card import render_model_card
from qsae.analysis.facts import ReleaseFacts
from qsae.analysis.feature_data import (
    FeatureStream,
    SampleCodes,
    TokenTable,
    final_norm_gain,
    keep_best,
    layer_features,
    logit_tables,
)
from qsae.analysis.features import (
    HEALTHY_RANGE,
    UndefinedAUROCError,
    auroc_direction,
    auroc_per_feature,
    density_summary,
    feature_health,
    fire_counts,
    fire_rates,
    max_decoder_cosine,
)
from qsae.analysis.fidelity import (
    bootstrap_ci,
    mean_l0,
    variance_explained,
    variance_explained_ci,
)
from qsae.analysis.layer import (
    LayerInputs,
    StatisticsSettings,
    analyze_layer,
    encode_sample,
    rollout_labels,
    sample_rows_of,
)
from qsae.config import PipelineConfig, load_config
from qsae.rollout import Rollout
from qsae.sae import TopKSAE
from qsae.sample import RowRules, select_rows, split_by_question
from qsae.store import (
    ShardRows,
    new_manifest,
    read_layer_table,
    residual_matrix,
    write_manifest,
    write_shard,
)
from qsae.streaming import CHUNK_ROWS, StoreSource


def random_codes(seed: int, n_rows: int, n_features: int, k: int, n_silent: int = 0):
    """Top-k codes with distinct ids per row, values on a coarse grid (many ties) and some zeros.

    The last n_silent features never appear, so they never fire.
    """
    rng = np.random.default_rng(seed)
    live = n_features - n_silent
    indices = np.argsort(rng.random((n_rows, live)), axis=1)[:, :k].astype(np.int64)
    values = (rng.integers(0, 6, (n_rows, k)) * 0.5).astype(np.float32)  # 0 = not firing
    return indices, values


def dense_codes(indices, values, n_features):
    dense = np.zeros((len(indices), n_features), dtype=np.float64)
    np.put_along_axis(dense, indices, values.astype(np.float64), axis=1)
    return dense


# fidelity


def test_variance_explained_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = x + np.array([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    # mean row (3, 5); sum of squared deviations 4+9 + 0+1 + 4+16 = 34; squared error 1 + 1 = 2
    assert variance_explained(x, x_hat) == pytest.approx(1 - 2 / 34)


def test_variance_explained_perfect_and_mean():
    x = np.random.default_rng(0).normal(size=(500, 12)).astype(np.float32)
    assert variance_explained(x, x) == pytest.approx(1.0)
    assert variance_explained(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(0.0, abs=1e-6)


def test_variance_explained_chunked_float16_matches_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(20_000, 8)).astype(np.float16)  # more rows than one chunk
    x_hat = (x.astype(np.float64) + rng.normal(0, 0.5, size=x.shape)).astype(np.float32)
    x64, x_hat64 = x.astype(np.float64), x_hat.astype(np.float64)
    expected = 1 - ((x64 - x_hat64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert variance_explained(x, x_hat) == pytest.approx(expected, rel=1e-12)


def test_variance_explained_rejects_bad_input():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="zero variance"):
        variance_explained(x, x)
    with pytest.raises(ValueError, match="equal shape"):
        variance_explained(np.zeros((4, 3)), np.zeros((4, 2)))
    noisy = np.arange(12.0).reshape(4, 3)
    noisy[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        variance_explained(noisy, np.zeros((4, 3)))


def test_mean_l0_counts_positive_values():
    values = np.array([[0.5, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    assert mean_l0(values) == pytest.approx((2 + 0 + 3) / 3)


def test_bootstrap_ci_brackets_the_estimate_and_repeats_with_its_seed():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 16))
    x_hat = x + rng.normal(0, 0.6, size=x.shape)
    estimate = variance_explained(x, x_hat)
    low, high = bootstrap_ci(variance_explained, x, x_hat, n_boot=50, seed=3)
    assert low < estimate < high
    assert high - low < 0.05
    assert bootstrap_ci(variance_explained, x, x_hat, n_boot=50, seed=3) == (low, high)
    assert bootstrap_ci(variance_explained, x, x_hat, n_boot=50, seed=4) != (low, high)


def test_question_bootstrap_interval_equals_one_written_here():
    """The interval resamples whole questions with a studentized bootstrap: one written here from the
    rows (tests/test_release.py), drawing the same questions, gives the same interval."""
    rng = np.random.default_rng(5)
    groups = np.repeat(rng.permutation(30), rng.integers(5, 40, 30))  # questions of unequal length
    x = rng.normal(size=(len(groups), 6)) + groups[:, None] * 0.1
    x_hat = x + rng.normal(0, 0.5, size=x.shape) * (1 + groups[:, None] % 3)
    got = variance_explained_ci(x, x_hat, groups, n_boot=60, seed=9)  # 60: more than one batch of replicates
    assert got == pytest.approx(question_bootstrap_ve(x, x_hat, groups, 60, 9), rel=1e-9)
    assert got[0] < variance_explained(x, x_hat) < got[1]
    # resampling questions, not tokens: wider than the same interval with every row its own question
    token_low, token_high = variance_explained_ci(x, x_hat, np.arange(len(x)), n_boot=60, seed=9)
    assert got[1] - got[0] > token_high - token_low


def test_bootstrap_ci_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="row counts"):
        bootstrap_ci(variance_explained, np.zeros((5, 2)), np.zeros((4, 2)))


# features


def test_fire_rates_match_dense_loop():
    indices, values = random_codes(0, n_rows=400, n_features=50, k=6, n_silent=5)
    counts = np.zeros(50, dtype=np.int64)
    for row in range(len(indices)):
        for j in range(indices.shape[1]):
            if values[row, j] > 0:
                counts[indices[row, j]] += 1
    got = fire_counts(indices, values, 50)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, counts)
    np.testing.assert_allclose(fire_rates(indices, values, 50), counts / 400)
    assert (fire_rates(indices, values, 50)[-5:] == 0).all()


def test_feature_health_boundaries():
    low, high = HEALTHY_RANGE
    rates = np.array([0.0, 0.0, low / 2, low, (low + high) / 2, high, high + 0.01, 1.0])
    assert feature_health(rates) == {"dead": 2, "rare": 1, "healthy": 3, "dense": 2}
    assert feature_health(rates, healthy=(0.6, 0.9)) == {"dead": 2, "rare": 5, "healthy": 0, "dense": 1}
    with pytest.raises(ValueError, match="rates in"):
        feature_health(np.array([0.5, 1.5]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_matches_sklearn_per_feature(seed):
    n_features = 40
    indices, values = random_codes(seed, n_rows=300, n_features=n_features, k=5, n_silent=4)
    labels = np.random.default_rng(100 + seed).random(300) < 0.35
    dense = dense_codes(indices, values, n_features)
    expected = np.array([roc_auc_score(labels, dense[:, f]) for f in range(n_features)])
    got = auroc_per_feature(indices, values, labels, n_features)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got[-4:], 0.5)  # never fire
    np.testing.assert_allclose(auroc_per_feature(indices, values, labels.astype(int), n_features), got)


def test_auroc_one_class_is_undefined():
    indices, values = random_codes(0, n_rows=20, n_features=10, k=3)
    for label in (True, False):
        with pytest.raises(UndefinedAUROCError, match=f"AUROC undefined: all labels are {label}"):
            auroc_per_feature(indices, values, np.full(20, label), 10)
    assert issubclass(UndefinedAUROCError, ValueError)


def test_auroc_memory_grows_with_k_not_n_features():
    n_rows, n_features, k = 50_000, 4096, 32
    rng = np.random.default_rng(5)
    # distinct ids per row: a random offset plus k steps that never wrap onto each other
    indices = (rng.integers(0, n_features, (n_rows, 1)) + np.arange(k) * 127) % n_features
    values = rng.exponential(1.0, (n_rows, k)).astype(np.float32)
    labels = rng.random(n_rows) < 0.6
    tracemalloc.start()
    auroc = auroc_per_feature(indices, values, labels, n_features)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dense_bytes = n_rows * n_features * 8  # one dense float64 score matrix
    assert peak < dense_bytes / 8
    for f in (0, 1234, 4095):
        score = np.where(indices == f, values, 0).sum(axis=1)
        assert auroc[f] == pytest.approx(roc_auc_score(labels, score), abs=1e-12)


def test_density_summary_counts_against_thresholds_written_here():
    rates = np.array([0.0, 0.0, 1e-5, 0.004, 0.011, 0.05, 0.2, 0.5])
    got = density_summary(rates)
    assert got["share_above_1pct"] == 4 / 8 and got["share_above_10pct"] == 2 / 8
    counts, edges = got["log10_density_histogram"]["counts"], got["log10_density_histogram"]["edges"]
    assert sum(counts) == 6  # the live features
    assert counts[int(np.searchsorted(edges, np.log10(0.05), side="right")) - 1] == 1


def test_max_decoder_cosine_finds_the_closest_pair():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 16))
    w[217] = w[41] * 3 + rng.normal(0, 0.05, 16)  # nearly the same direction, another norm
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -2)
    value, pair = max_decoder_cosine(torch.tensor(w, dtype=torch.float32), block=64)
    assert value == pytest.approx(sims.max(), abs=1e-5) and sorted(pair) == [41, 217]


def test_auroc_direction():
    assert auroc_direction(np.array([0.6, 0.4, 0.5])) == ["correct↑", "wrong↑", "none"]


@pytest.mark.parametrize(
    "indices, values, match",
    [
        (np.array([[0, 10]]), np.array([[1.0, 1.0]]), r"\[0, 4\)"),
        (np.array([[0, 1]]), np.array([[1.0, -1.0]]), ">= 0"),
        (np.array([[2, 2]]), np.array([[1.0, 0.5]]), "more than once"),
        (np.array([[0, 1]]), np.array([[1.0, 1.0, 1.0]]), "shape"),
    ],
)
def test_bad_codes_are_rejected(indices, values, match):
    with pytest.raises(ValueError, match=match):
        fire_counts(indices, values, 4)


def test_repeated_id_is_allowed_when_not_firing():
    counts = fire_counts(np.array([[2, 2, 1]]), np.array([[1.0, 0.0, 0.5]]), 4)
    np.testing.assert_array_equal(counts, [0, 1, 1, 0])


# feature data


def test_keep_best_keeps_each_features_largest_scores():
    rng = np.random.default_rng(0)
    feature, score, row = rng.integers(0, 7, 300), rng.integers(0, 5, 300).astype(float), rng.permutation(300)
    kept = keep_best(feature, score, row, 4)
    for f in range(7):
        mine = np.flatnonzero(feature == f)
        expected = sorted(mine, key=lambda i: (-score[i], row[i]))[:4]
        assert [i for i in kept if feature[i] == f] == expected


def test_feature_stream_state_does_not_grow_with_the_rows():
    """Bounded memory: after 2 and after 20 chunks the kept entries and counts are the same size."""
    stream, sizes = FeatureStream(n_features=64, top=5, reservoir=20, seed=0), []
    for chunk in range(20):
        indices, values = random_codes(chunk, n_rows=2000, n_features=64, k=4)
        stream.add(values, indices)
        if chunk in (1, 19):
            sizes.append(sum(a.nbytes for a in (*stream.top.astuple(), *stream.sample.astuple(), stream.counts)))
    assert sizes[0] == sizes[1] <= 64 * (5 + 20) * 32 + stream.counts.nbytes


def test_feature_data_matches_brute_force():
    """Top rows, fire counts, histogram totals, quantile bins and windows against a dense reference."""
    n_features, k, width = 40, 4, 3
    indices, values = random_codes(5, n_rows=3000, n_features=n_features, k=k, n_silent=4)
    values = values * np.random.default_rng(1).uniform(0.5, 1.5, values.shape).astype(np.float32)  # fewer ties
    rollout = np.repeat(np.arange(30), 100)
    position = np.tile(np.arange(100), 30) * 2 + 9  # every other token of each rollout is sampled
    tokens = TokenTable({r: list(range(1000 * r, 1000 * r + 220)) for r in range(30)})
    W_dec = torch.randn(n_features, 8)
    data = layer_features(W_dec, SampleCodes(values, indices, rollout, position), tokens, top=6, width=width, per_bin=3,
                          seed=2)
    dense = dense_codes(indices, values, n_features)
    np.testing.assert_array_equal(data.live, np.flatnonzero((dense > 0).any(axis=0)))
    stats = {"token_auroc": [0.25] * n_features}
    for f in data.live[:: 5].tolist():
        record = data.record(f, stats, token_text=lambda t: f"<{t}>", outcome_of=lambda r: f"outcome {r}", logits=None)
        firing = np.flatnonzero(dense[:, f] > 0)
        assert record["fire_count"] == len(firing) == sum(record["histogram"]["counts"])
        assert record["max_activation"] == pytest.approx(dense[firing, f].max())
        expected_top = sorted(firing, key=lambda i: (-dense[i, f], i))[:6]
        assert [e["position"] for e in record["top"]] == [int(position[i]) for i in expected_top]
        for e, i in zip(record["top"], expected_top):
            r, p = int(rollout[i]), int(position[i])
            assert e["rollout"] == r and e["outcome"] == f"outcome {r}" and e["activation"] == pytest.approx(dense[i, f], abs=1e-4)
            lo = max(0, p - width)
            assert e["tokens"] == [f"<{1000 * r + t}>" for t in range(lo, p + width + 1)] and e["at"] == p - lo
            for t, act in zip(range(lo, p + width + 1), e["acts"]):  # sampled tokens carry the feature's value
                j = np.flatnonzero((rollout == r) & (position == t))
                assert act == pytest.approx(dense[j[0], f] if len(j) else 0.0, abs=1e-4)
        samples = [e for b in record["quantiles"] for e in b["examples"]]
        assert 0 < len(samples) <= 5 * 3 and len(record["quantiles"]) == 5
        for b in record["quantiles"]:
            assert all(b["low"] - 1e-4 <= e["activation"] <= b["high"] + 1e-4 for e in b["examples"])
        sims = torch.nn.functional.normalize(W_dec, dim=1) @ torch.nn.functional.normalize(W_dec, dim=1).T
        sims.fill_diagonal_(-2)
        assert [i for i, _ in record["similar"]] == sims[f].topk(5).indices.tolist()
        assert record["token_auroc"] == 0.25 and record["logits"] is None
        json.dumps(record, allow_nan=False)


def test_a_layer_without_live_features_gets_empty_feature_data(tmp_path):
    from qsae.browser import LayerPages

    indices, values = random_codes(0, n_rows=50, n_features=16, k=2)
    tokens = TokenTable({0: list(range(60))})
    codes = SampleCodes(np.zeros_like(values), indices, np.zeros(50, np.int64), np.arange(50))
    data = layer_features(torch.randn(16, 4), codes, tokens, top=3, width=2, per_bin=2, seed=0)
    assert len(data.live) == 0 and data.fire_count.sum() == 0
    assert LayerPages(tmp_path, 5, 16).close() == 0
    assert '"rows":[]' in (tmp_path / "data" / "layer_5.js").read_text()


def test_logit_tables_rank_the_unembedded_direction_through_the_norm_gain():
    torch.manual_seed(0)
    d, vocab = 16, 50
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    head = torch.nn.Linear(d, vocab, bias=False)
    W_dec = torch.randn(7, d)
    gain = final_norm_gain(norm, d)
    np.testing.assert_allclose(gain.numpy(), norm.weight.detach().numpy(), rtol=1e-5)
    tables = logit_tables(W_dec, gain, head, top=3, block=2, bins=6)
    expected = (W_dec * norm.weight.detach()) @ head.weight.detach().T
    for f in range(7):
        assert tables["promoted_ids"][f].tolist() == expected[f].topk(3).indices.tolist()
        assert tables["suppressed_ids"][f].tolist() == expected[f].topk(3, largest=False).indices.tolist()
        np.testing.assert_allclose(tables["promoted_values"][f].numpy(), expected[f].topk(3).values.numpy(), rtol=1e-4)
        counts, edges = np.histogram(expected[f].numpy(), bins=6)
        assert tables["histogram_heights"][f].tolist() == counts.tolist()
        np.testing.assert_allclose(tables["histogram_values"][f].numpy(), (edges[:-1] + edges[1:]) / 2, rtol=1e-4)


# charts


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_charts_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    layers = [3, 5]
    history = {"loss": [1.0, 0.5, 0.4, 0.35], "fvu": [0.6, 0.3, 0.25, 0.2], "revived_per_event": [12]}
    written = [
        charts.plot_variance_explained({3: (0.9, 0.88, 0.92), 5: (0.7, 0.66, 0.73)}, tmp_path),
        charts.plot_fire_rates({layer: np.concatenate([np.zeros(9), rng.uniform(0, 0.5, 200)]) for layer in layers},
                               tmp_path),
        charts.plot_auroc({3: (rng.uniform(-0.05, 0.05, 200), 0.04), 5: None}, tmp_path),
        charts.plot_training({layer: history for layer in layers}, tmp_path, revive_every_epochs=2),
        charts.plot_feature_health({layer: {"dead": 3, "rare": 10, "healthy": 50, "dense": 1} for layer in layers},
                                   tmp_path / "health.png"),
    ]
    names = [path.name for path in written]
    assert names == [charts.VARIANCE_EXPLAINED_PNG, charts.FIRE_RATES_PNG, charts.FEATURE_AUROC_PNG,
                     charts.TRAINING_CURVES_PNG, "health.png"]
    for path in written:
        width, height = png_size(path)
        assert width >= 400 and height >= 300
        assert path.stat().st_size > 5000


def test_chart_draws_an_interval_that_leaves_out_its_value_and_rejects_a_reversed_one(tmp_path):
    # A percentile bootstrap over two held-out questions can give exactly that: it is drawn, not refused.
    assert png_size(charts.plot_variance_explained({1: (0.5, 0.6, 0.7)}, tmp_path))[0] >= 400
    with pytest.raises(ValueError, match="ci_low <= ci_high"):
        charts.plot_variance_explained({1: (0.5, 0.7, 0.6)}, tmp_path)


# model card


def rollout_level(max_abs: float, band: float, n_q: int, probe: float | None, auroc: float, feature: int) -> dict:
    return {"max_abs_auroc": max_abs, "auroc": auroc, "null_centre": 0.5, "feature": feature,
            "direction": "correct↑" if auroc > 0.5 else "wrong↑", "chance_band_95": band,
            "westfall_young_p": 0.0123 if max_abs > band else 0.4567, "n_q_below_0_05": n_q,
            "length_auroc": 0.5432, "length_auroc_ci": [0.4711, 0.6122], "probe_auroc": probe,
            "probe_auroc_ci": None if probe is None else [0.5501, 0.7702],
            "probe_reason": None if probe else "training fold 2 of 5 holds one class only", "n_rollouts_labelled": 31}


def card_info(correctness: bool = True) -> dict:
    def layer(ve, ci, l0, dead, rollout):
        return {"variance_explained": ve, "ve_ci": ci, "l0": l0, "heldout_questions": 7, "dead": dead,
                "healthy": 1843, "dense": 212, "rare": 1986, "revived": 4321, "share_above_1pct": 0.4123,
                "share_above_10pct": 0.0456, "dead_over_tokens": 66_713, "max_decoder_cosine": 0.8766,
                "token_level": {"max_auroc": 0.5614, "feature": 1777, "fire_rate": 0.0734, "direction": "correct↑"},
                "rollout_level": rollout}
    per_layer = {
        "4": layer(0.9137, [0.9071, 0.9188], 15.84, 7, rollout_level(0.2101, 0.1499, 3, 0.6612, 0.7101, 1777)),
        "6": layer(0.8426, None, 14.27, 19, rollout_level(0.0951, 0.1388, 0, None, 0.4049, 903)),
    }
    if not correctness:
        for stats in per_layer.values():
            stats["rollout_level"] = {"reason": "all 37 labelled rollouts are wrong", "n_rollouts_labelled": 37}
            stats["token_level"] = dict.fromkeys(("max_auroc", "feature", "fire_rate", "direction"))
    fidelity = {"4": {"ce_clean": 1.2345, "ce_spliced": 1.3456, "ce_zero": 4.5678, "ce_mean": 3.4567,
                      "delta_ce": 0.1111, "delta_ce_ci": [0.0987, 0.1234], "ce_loss_recovered": 0.9667,
                      "ce_loss_recovered_ci": [0.95, 0.97], "kl": 0.0789, "kl_ci": [0.0701, 0.0866],
                      "n_tokens": 12_345, "n_rollouts": 17}, "6": None}
    return {
        "model_id": "org/tiny-model", "model_revision": "0123abcd", "layers": [4, 6], "d_model": 64,
        "n_features": 4048, "k": 16, "architecture": "topk",
        "hook": "residual stream = output of decoder layer L = hidden_states[L+1]",
        "questions": {"source": "bundled-sample", "seed": 913, "thinking": True, "max_new_tokens": 4096},
        "outcomes": {"n": 41, "correct": 23 if correctness else 0, "wrong": 8 if correctness else 31,
                     "truncated": 6, "no_answer": 4, "unscored_rollouts": "exclude", "finish_reason_length": 6},
        "tokens": {"total_response_tokens": 81234, "per_layer_train": 60417, "per_layer_heldout": 6713},
        "rows": {"stored": 81234, "special": 321, "special_excluded": True, "high_norm": {"4": 11, "6": 13},
                 "median_norm": {"4": 12.5, "6": 40.25}, "norm_threshold": {"4": 125.0, "6": 402.5},
                 "high_norm_any_layer": 17, "excluded": 338, "sampled": 67130, "train": 60417, "heldout": 6713,
                 "max_norm_multiple": 10.0, "max_tokens_per_layer": 67130,
                 "stored_positions": "every response position"},
        "split": {"holdout_fraction": 0.1, "seed": 5, "heldout_rollouts": 7},
        "recipe": {"optimizer": "Adam", "lr": 0.00031, "batch_size": 1024, "epochs": 17,
                   "revive_every_epochs": 3, "dead_after_steps": 377},
        "statistics": {"bootstrap": 200, "permutations": 1000},
        "per_layer": per_layer, "fidelity": fidelity,
        "files": ["sae_L4_n4048_k16.pt", "saelens/blocks.4.hook_resid_post/cfg.json",
                  "sparsify/layers.4/sae.safetensors", "feature_stats.json"],
        "charts": [charts.VARIANCE_EXPLAINED_PNG, charts.FEATURE_HEALTH_PNG],
        "wall_clock": {"rollout": 123.4, "train": 4567.8},
        "engine": "hf", "qsae_version": "9.8.7",
    }


def table_cells(card: str, first_cell: str, after: str) -> list[str]:
    """Cells of the table row that starts with first_cell, in the section that starts at `after`."""
    section = card[card.index(after):]
    row = next(line for line in section.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_card_reports_every_number_with_its_interval_or_null():
    info = card_info()
    card = render_model_card(ReleaseFacts.from_dict(info))
    f = info["fidelity"]["4"]
    assert table_cells(card, "L4", "## Reconstruction") == [
        "L4", "0.914", "[0.907, 0.919]", "15.8", "1.2345", "1.3456", "0.1111 [0.0987, 0.1234]", "0.967 [0.950, 0.970]",
        "0.0789 [0.0701, 0.0866]", "4.5678", "3.4567", "12,345 / 17"]
    assert f["n_tokens"] == 12_345
    # no interval with a single held-out question, no fidelity for L6: said, not left blank
    assert table_cells(card, "L6", "## Reconstruction")[:3] == ["L6", "0.843", "not computable"]
    assert table_cells(card, "L6", "## Reconstruction")[4:8] == ["n/a"] * 4
    assert table_cells(card, "L4", "## Feature health") == [
        "L4", "7 (over 66,713 tokens)", "1,986", "1,843", "212", "41.2%", "4.6%", "0.877", "4,321"]
    assert table_cells(card, "L4", "**Rollout level**") == [
        "L4", "31", "0.210 (AUROC 0.710, centre 0.500)", "f1777 correct↑", "0.150", "0.0123", "3", "0.543 [0.471, 0.612]",
        "0.661 [0.550, 0.770]"]
    assert table_cells(card, "L6", "**Rollout level**")[8] == "n/a (training fold 2 of 5 holds one class only)"
    assert table_cells(card, "L4", "**Token level**") == ["L4", "0.561", "f1777", "7.34%", "correct↑"]
    for text in ("org/tiny-model", "0123abcd", "4,048", "bundled-sample", "913", "81,234", "60,417", "6,713",
                 "0.00031", "377", "4,568", "9.8.7", "sae_L4_n4048_k16.pt", 'load_from_disk("sparsify/layers.4")',
                 'load_from_disk("saelens/blocks.4.hook_resid_post")', "hidden_states[L+1]",
                 "23 correct, 8 wrong, 6 truncated (hit the token limit), 4 without a parsable answer letter",
                 "321 special or chat-template tokens", "L4 11 above 125.0 (median 12.5)", "338 tokens left out",
                 "17 tokens whose residual norm exceeds 10× the layer's median",
                 "1,000 permutations", "200 bootstrap replicates", "studentized bootstrap (bootstrap-t) over held-out questions"):
        assert text in card, text


def test_card_shows_the_summary_intervals_and_says_when_ce_recovered_is_at_its_ceiling():
    info = card_info()
    card = render_model_card(ReleaseFacts.from_dict(info))
    assert "L4 0.1111 [0.0987, 0.1234] / L6 n/a not computable" in card  # ΔCE in the summary table
    assert "at its ceiling" not in card  # 0.967 still separates reconstructions
    assert "The intervals over held-out questions rest on few of them (L4 7, L6 7; fewer than 30), so they are nominal" in card
    for stats in info["per_layer"].values():
        stats["heldout_questions"] = 30
    assert "so they are nominal" not in render_model_card(ReleaseFacts.from_dict(info))
    info["fidelity"]["4"].update(ce_clean=0.07, ce_spliced=0.0712, ce_zero=9.13, ce_loss_recovered=0.9999)
    card = render_model_card(ReleaseFacts.from_dict(info))
    assert ("CE loss recovered sits at its ceiling here (L4 1.000: CE zero-ablated 9.13 against clean 0.07 nats)"
            in card) and "ΔCE and KL carry the information" in card


def test_card_gives_the_fdr_counts_of_every_pooling_and_the_length_adjusted_test():
    info = card_info()
    info["per_layer"]["4"]["rollout_level"].update(
        n_q_below_0_05_mean=2, n_q_below_0_05_fire_fraction=0, length_adjusted_null_centre=0.6123,
        length_adjusted_p=0.0456, n_q_below_0_05_length_adjusted=1, probe_p=0.0312, probe_null_mean=0.4487)
    card = render_model_card(ReleaseFacts.from_dict(info))
    assert ("with p 0.0312 against the probe refitted on permuted labels (whose AUROC averages 0.449)" in card
            and table_cells(card, "L4", "**Rollout level**")[8] == "0.661 [0.550, 0.770], p 0.0312 (null mean 0.449)")
    assert ("3 features pass FDR 5% (q < 0.05) (2 pooled by mean, 0 by firing fraction); within response-length "
            "deciles f1777's centre is 0.612 and its p 0.0456, and 1 feature passes FDR 5% there") in card


def test_card_sentences_follow_the_numbers():
    card = render_model_card(ReleaseFacts.from_dict(card_info()))
    # L4: 0.210 beyond its band of 0.150; the probe (0.661: 0.161 from chance) is no further than 0.210
    assert "L4: the largest |AUROC − null centre| is 0.210 (f1777, AUROC 0.710, centre 0.500, correct↑), beyond its chance band (0.150)" in card
    assert "3 features pass FDR 5% (q < 0.05)" in card
    assert "the probe on mean residuals reaches AUROC 0.661 out of fold, not above the best single feature's 0.710" \
        in card
    # L6: 0.095 inside its band of 0.139, the headline is a wrong↑ feature
    assert "L6: the largest |AUROC − null centre| is 0.095 (f903, AUROC 0.405, centre 0.500, wrong↑), inside its chance band (0.139): " \
           "no feature is distinguishable from chance" in card
    assert "0 features pass FDR 5%" in card and "the probe on mean residuals was not computable" in card
    info = card_info()
    info["per_layer"]["4"]["rollout_level"]["probe_auroc"] = 0.2  # far from 0.5, but the probe chose its direction
    assert "reaches AUROC 0.200 out of fold: it learns its own direction, so below 0.5 it predicts nothing" in \
        render_model_card(ReleaseFacts.from_dict(info))
    info["per_layer"]["4"]["rollout_level"]["probe_auroc"] = 0.75
    assert "reaches AUROC 0.750 out of fold, above the best single feature's 0.710" in \
        render_model_card(ReleaseFacts.from_dict(info))


def test_card_says_correctness_statistics_are_not_computable():
    card = render_model_card(ReleaseFacts.from_dict(card_info(correctness=False)))
    assert "L4: not computable (all 37 labelled rollouts are wrong)." in card
    assert "0 correct and 31 wrong rollouts (10 unscored rollouts left out)" in card
    assert table_cells(card, "L4", "**Token level**") == ["L4", "n/a", "n/a", "n/a", "n/a"]


def test_card_front_matter():
    card = render_model_card(ReleaseFacts.from_dict(card_info()))
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    fields = dict(line.split(": ", 1) for line in lines[1:end])
    assert fields["library_name"] == "qsae"
    assert fields["license"] == "apache-2.0"
    assert json.loads(fields["base_model"]) == "org/tiny-model"
    assert "sparse-autoencoder" in fields["tags"]
    assert "bundled-sample" in fields["datasets"]
    assert lines[end + 2].startswith("# ")


def test_card_names_a_matryoshka_sae_and_its_prefixes():
    info = card_info()
    prefixes = [253, 506, 1012, 2024, 4048]
    info.update(architecture="matryoshka-batchtopk", recipe={**info["recipe"], "matryoshka_prefixes": prefixes})
    for stats in info["per_layer"].values():
        stats.update(threshold=0.25, sparse_width=64, tokens_at_sparse_width=0, prefixes=prefixes)
    card = render_model_card(ReleaseFacts.from_dict(info))
    assert "# Matryoshka BatchTopK sparse autoencoders for org/tiny-model" in card
    assert "matryoshka-batchtopk-sae" in card.split("---")[1]
    architecture = table_cells(card, "architecture", "| property |")[1]
    assert architecture.startswith("Matryoshka BatchTopK SAE, 4,048 features")
    assert "nested prefixes (the first 253, 506, 1012, 2024, 4048 features)" in architecture
    assert "learned threshold θ (L4 0.2500 / L6 0.2500)" in architecture
    assert "load as a `MatryoshkaBatchTopKSAE`" in card and "Matryoshka: the reconstruction term" in card
    assert table_cells(card, "Matryoshka prefixes (nested widths, each trained to reconstruct)", "## ")[1] \
        == str(prefixes)
    assert "Matryoshka" not in render_model_card(ReleaseFacts.from_dict(card_info()))


def test_card_accepts_int_layer_keys_and_names_missing_keys():
    info = card_info()
    info["per_layer"] = {int(layer): stats for layer, stats in info["per_layer"].items()}
    assert "0.914" in render_model_card(ReleaseFacts.from_dict(info))
    del info["recipe"]
    with pytest.raises(ValueError, match="recipe"):
        render_model_card(ReleaseFacts.from_dict(info))
    info = card_info()
    del info["per_layer"]["6"]["l0"]
    with pytest.raises(ValueError, match="l0"):
        render_model_card(ReleaseFacts.from_dict(info))


# the analysis of a store, streamed

LAYER, D_MODEL, TOKENS_PER_ROLLOUT = 5, 16, 40
SHARD_ROWS = {"shard_00000": 9_000, "shard_00001": 3_000, "shard_00002": 7_000}  # chunks of unequal sizes
CAP = 15_000  # sampled rows: several chunks, and not every stored row
N_ROLLOUTS = sum(SHARD_ROWS.values()) // TOKENS_PER_ROLLOUT


def store_rollouts() -> dict[int, Rollout]:
    """Every third rollout correct, every seventh truncated, two rollouts per question."""
    def rollout(rid: int) -> Rollout:
        outcome = "truncated" if rid % 7 == 0 else "correct" if rid % 3 == 0 else "wrong"
        return Rollout(rollout_id=rid, question_id=f"q{rid // 2}", prompt="", response="", predicted_letter="A",
                       letter_from_final_line=True, answer_letter="A", finish_reason="stop", outcome=outcome,
                       correct=outcome == "correct", n_prompt_tokens=7, n_response_tokens=TOKENS_PER_ROLLOUT,
                       engine="test", seed=0, sample=0, generation_seed=None, prompt_token_ids=[], response_token_ids=[])
    return {rid: rollout(rid) for rid in range(N_ROLLOUTS)}


def write_rollout_store(store_dir, dtype: str) -> None:
    """One layer of planted rows, TOKENS_PER_ROLLOUT tokens per rollout."""
    manifest = new_manifest("test/model", None, [LAYER], D_MODEL, dtype=dtype)
    first = 0
    for shard, n_rows in SHARD_ROWS.items():
        row = np.arange(first, first + n_rows)
        rollout_id = row // TOKENS_PER_ROLLOUT
        rows = ShardRows(rollout_id=rollout_id, position=row % TOKENS_PER_ROLLOUT + 7, token_id=np.zeros(n_rows, np.int32),
                         correct=rollout_id % 3 == 0,
                         residuals=planted_rows(n_rows, D_MODEL, 48, 3, seed=first, atom_seed=0) * 5)
        written = write_shard(store_dir, LAYER, shard, rows, dtype=dtype)
        manifest["shards"][shard] = {"rollouts": n_rows // TOKENS_PER_ROLLOUT, "rows": {str(LAYER): written}}
        first += n_rows
    write_manifest(store_dir, manifest)


def analysis_config() -> PipelineConfig:
    return load_config(None, [f"capture.max_tokens_per_layer={CAP}", "capture.max_norm_multiple=0",
                              "train.split_seed=3", "train.holdout_fraction=0.2", "release.bootstrap=40",
                              "release.top_contexts=3", "release.permutations=200"])


def layer_inputs(cfg: PipelineConfig, selection, rollouts, unscored: str = "exclude") -> LayerInputs:
    labels = rollout_labels(rollouts, unscored)
    return LayerInputs(sample_rows_of(selection, rollouts, labels), rollouts, labels, StatisticsSettings(cfg.release.bootstrap, cfg.release.permutations,
                                                          cfg.train.split_seed))


def store_split(cfg):
    question_of = {r.rollout_id: r.question_id for r in store_rollouts().values()}
    return split_by_question(question_of, RowRules.from_config(cfg))


def store_selection(store_dir, cfg):
    return select_rows(store_dir, [LAYER], store_split(cfg))


def store_sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(D_MODEL, 64, 4)


@pytest.fixture(scope="module", params=["float16", "float32"])
def rollout_store(request, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp(f"analysis-{request.param}") / "activations"
    write_rollout_store(store_dir, request.param)
    return store_dir


def sample_in_memory(store_dir, selection) -> SimpleNamespace:
    """The reference: the whole sample read into memory as float32, with its metadata."""
    table = read_layer_table(store_dir, LAYER, selection.rows)
    return SimpleNamespace(residuals=residual_matrix(table),
                           **{name: table.column(name).to_numpy(zero_copy_only=False)
                              for name in ("rollout_id", "position")})


def test_streamed_analysis_gives_the_statistics_of_the_sample_in_memory(rollout_store):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        streamed_analysis_matches_in_memory(rollout_store)
    finally:
        torch.set_num_threads(threads)


def streamed_analysis_matches_in_memory(rollout_store):
    cfg, sae, rollouts = analysis_config(), store_sae(), store_rollouts()
    selection = store_selection(rollout_store, cfg)
    sample = encode_sample(sae, StoreSource(rollout_store, LAYER, selection.rows), selection)
    got = analyze_layer(LAYER, sae, sample, layer_inputs(cfg, selection, rollouts))

    # as before: the whole sample in memory as float32, encoded at once
    ref = sample_in_memory(rollout_store, selection)
    held = np.flatnonzero(np.isin(ref.rollout_id, store_split(cfg).heldout_rollout_ids))
    with torch.no_grad():
        values, indices = (t.numpy() for t in sae.encode_topk(torch.tensor(ref.residuals)))
        x_hat = sae.decode_topk(torch.from_numpy(values[held]), torch.from_numpy(indices[held])).numpy()
    ve = variance_explained(ref.residuals[held], x_hat)
    questions = np.array([rollouts[r].question_id for r in ref.rollout_id[held]])
    summary = got.summary
    assert summary["variance_explained"] == pytest.approx(ve, rel=1e-6)
    assert summary["ve_ci"] == pytest.approx(
        question_bootstrap_ve(ref.residuals[held], x_hat, questions, 40, 3), rel=1e-6)
    assert summary["l0"] == pytest.approx(mean_l0(values[held]))
    assert (summary["train_rows"], summary["heldout_rows"]) == (CAP - len(held), len(held))
    np.testing.assert_array_equal(got.fire_rate, fire_rates(indices, values, 64))
    # token level over the labelled tokens: truncated rollouts (every seventh) are left out
    outcome = np.array([rollouts[r].outcome for r in ref.rollout_id])
    labelled = outcome != "truncated"
    assert (~labelled).any()
    np.testing.assert_allclose(got.feature_stats["token_auroc"], auroc_per_feature(
        indices[labelled], values[labelled], outcome[labelled] == "correct", 64), atol=1e-12)
    # rollout level: max over each rollout's sampled tokens, AUROC against sklearn
    stats = got.feature_stats
    dense = dense_codes(indices, values, 64)
    ids = np.unique(ref.rollout_id[labelled])
    pooled = np.stack([dense[ref.rollout_id == r].max(axis=0) for r in ids])
    label = np.array([rollouts[r].outcome == "correct" for r in ids])
    for f in np.flatnonzero(pooled.any(axis=0))[:8]:
        assert stats["rollout_auroc"][f] == pytest.approx(roc_auc_score(label, pooled[:, f]), abs=1e-12)
    assert got.summary["rollout_level"]["n_rollouts_labelled"] == len(ids)
    np.testing.assert_array_equal(got.rollout_ids, ids)
    np.testing.assert_array_equal(got.rollout_max, pooled)
    # the training rows' mean, for the mean ablation
    train = np.setdiff1d(np.arange(CAP), held)
    np.testing.assert_allclose(got.train_mean, ref.residuals[train].astype(np.float64).mean(axis=0), rtol=1e-6)


class CountingSource(StoreSource):
    """A store source that records how many rows each read returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def read_chunk(self, chunk: int, local: np.ndarray | None = None) -> np.ndarray:
        rows = super().read_chunk(chunk, local)
        self.reads.append(len(rows))
        return rows


def test_streamed_analysis_reads_chunks_and_keeps_only_the_heldout_residuals(rollout_store):
    cfg, sae = analysis_config(), store_sae()
    selection = store_selection(rollout_store, cfg)
    source = CountingSource(rollout_store, LAYER, selection.rows)
    sample = encode_sample(sae, source, selection)
    # every sampled row read once, never more than a chunk at a time
    assert sum(source.reads) == CAP and max(source.reads) <= CHUNK_ROWS and len(source.reads) > 1
    ref = sample_in_memory(rollout_store, selection)
    assert sample.heldout_residuals.dtype == source.dtype  # kept in the store dtype
    np.testing.assert_array_equal(sample.heldout_residuals.astype(np.float32), ref.residuals[selection.heldout])
    assert sample.values.shape == sample.indices.shape == (CAP, 4)
    np.testing.assert_array_equal(sample.position, ref.position)
    ids = np.unique(ref.rollout_id)
    expected_sums = np.stack([ref.residuals[ref.rollout_id == r].astype(np.float64).sum(axis=0) for r in ids])
    np.testing.assert_allclose(sample.rollout_sum, expected_sums, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("outcome, reason", [("wrong", "are wrong"), ("truncated", "no labelled rollouts")])
def test_correctness_statistics_are_not_computable_without_both_labels(rollout_store, outcome, reason):
    cfg, sae = analysis_config(), store_sae()
    rollouts = {rid: dataclasses.replace(r, outcome=outcome, correct=False) for rid, r in store_rollouts().items()}
    selection = store_selection(rollout_store, cfg)
    sample = encode_sample(sae, StoreSource(rollout_store, LAYER, selection.rows), selection)
    got = analyze_layer(LAYER, sae, sample, layer_inputs(cfg, selection, rollouts))
    level = got.summary["rollout_level"]
    assert reason in level["reason"] and level["max_abs_auroc"] is None
    assert got.feature_stats["rollout_auroc"] is None and got.feature_stats["token_auroc"] is None
    text = json.dumps({"summary": got.summary, "stats": got.feature_stats}, allow_nan=False)  # never a NaN
    assert "NaN" not in text
    # counted as wrong, truncated rollouts become labels: still one class, still said so
    if outcome == "truncated":
        again = analyze_layer(LAYER, sae, sample, layer_inputs(cfg, selection, rollouts, "wrong"))
        assert "are wrong" in again.summary["rollout_level"]["reason"]


@pytest.mark.parametrize("settings, expected", [
    ({"recipe": "original"}, "fp32"),
    ({"recipe": "modern", "autocast_bf16": False}, "fp32"),
    ({"recipe": "modern", "autocast_bf16": True}, "bf16 (autocast)"),
    ({"recipe": "modern"}, "bf16 where the training device has native bf16, else fp32"),
])
def test_the_card_states_the_encoder_precision_the_config_sets(settings, expected):
    from qsae.config import TrainConfig

    assert TrainConfig(**settings).encoder_precision() == expected


def test_feature_pages_stream_out_a_block_at_a_time(tmp_path):
    """Browser blocks and Neuronpedia batches are written as soon as the next one starts, each with
    exactly its own live features, so only one block of pages is ever held; close() writes the rest."""
    from qsae.analysis.ecosystem import NEURONPEDIA_BATCH, NeuronpediaLayer
    from qsae.browser import BLOCK_SIZE, LayerPages

    n_features = 600
    indices, values = random_codes(7, n_rows=4000, n_features=n_features, k=4, n_silent=50)
    rollout, position = np.repeat(np.arange(40), 100), np.tile(np.arange(100), 40)
    tokens = TokenTable({r: list(range(100)) for r in range(40)})
    sae = TopKSAE(8, n_features, 4)
    data = layer_features(sae.W_dec.detach(), SampleCodes(values, indices, rollout, position), tokens, top=3, width=2,
                          per_bin=1, seed=0)
    live = data.live.tolist()
    info = ReleaseFacts.from_dict({**card_info(), "model_id": "tiny", "model_revision": None, "architecture": "topk",
                                   "n_features": n_features, "outcomes": {"n": 40}})
    pages = LayerPages(tmp_path / "browser", 3, n_features)
    neuronpedia = NeuronpediaLayer(tmp_path / "neuronpedia", info, PipelineConfig().release, layer=3, sae=sae,
                                   logits=None)
    block_file = lambda b: tmp_path / "browser" / "data" / f"layer_3_block_{b}.js"
    (folder,) = (tmp_path / "neuronpedia").iterdir()
    for feature in live:
        block, batch = feature // BLOCK_SIZE, feature // NEURONPEDIA_BATCH
        record = data.record(feature, {}, token_text=str, outcome_of=str, logits=None)
        pages.add(record)
        neuronpedia.add(record)
        assert not block_file(block).exists() and not (folder / f"batch-{batch}.json").exists()
        assert {int(f) // BLOCK_SIZE for f in pages.pages} == {block}
        assert all(b // NEURONPEDIA_BATCH == batch for b in (r["feature"] for r in neuronpedia.batch))
        if block:
            assert block_file(block - 1).exists()
        if batch:
            assert (folder / f"batch-{batch - 1}.json").exists()
    assert pages.close() == len(live)
    neuronpedia.close()

    def block_features(b):
        text = block_file(b).read_text()
        return [int(f) for f in json.loads(text[text.index("{"):text.rindex("}") + 1])["features"]]

    assert [f for b in range(3) for f in block_features(b)] == live
    batches = [json.loads((folder / f"batch-{b}.json").read_text()) for b in range(5)]
    assert [f["feature_index"] for b in batches for f in b["features"]] == live
    skipped = json.loads((folder / "skipped_indexes.json").read_text())["skipped_indexes"]
    assert skipped == [f for f in range(n_features) if f not in set(live)] and len(skipped) >= 50


def test_card_says_what_the_causal_check_could_detect_and_adjusts_its_p():
    from qsae.causal import detectable

    base = SimpleNamespace(correct=np.array([1, 1, 0, 0, 0, 0, 0, 0], bool))
    arm = {"name": "L4 feature f9 ablate", "group": "feature", "accuracy_change": -0.125,
           "accuracy_change_ci": [-0.4711, 0.2345], "mcnemar_p": 1.0, "mcnemar_p_holm": 1.0, "answers_changed": 0.25,
           "length_change": 3.5, "length_change_ci": [-1.25, 8.25]}
    info = card_info()
    info["causal"] = {
        "skipped": None, "unscored": "exclude", "detectable": detectable(base, n_arms=15),
        "length_change_nominal_below": 100,
        "baseline": {"n_questions": 8, "accuracy": 0.25, "reproduces_original_responses": 1.0},
        "layers": {"4": {"skipped": None, "note": None, "arms": [arm], "selected": [
            {"feature": 9, "train_auroc": 0.7123, "train_null_centre": 0.5, "train_p": 0.0123,
             "train_westfall_young_p": 0.2134}]}}}
    card = render_model_card(ReleaseFacts.from_dict(info))
    assert ("the smallest McNemar p any arm could reach is 0.5 for a drop in accuracy and 0.0312 for a rise; "
            "p < 0.05 needs at least no drop (too few answers to flip) or a rise of 0.750 in accuracy, and after "
            "Holm over the 15 arms no drop (too few answers to flip) or no rise (too few answers to flip)") in card
    assert ("f9 (training AUROC 0.712, centre 0.500, p 0.0123, Westfall–Young p 0.213)" in card
            and "only the questions both answered with a parsable letter in time count" in card
            and "Student's t interval, nominal at fewer than 100 questions" in card)
    assert table_cells(card, "L4 feature f9 ablate", "## Causal check") == [
        "L4 feature f9 ablate", "-0.125", "[-0.471, 0.234]", "1", "1", "25%", "+3.5 [-1.2, +8.2]"]


def test_card_counts_the_tokens_left_out_beyond_float16():
    info = card_info()
    assert "float16" not in render_model_card(ReleaseFacts.from_dict(info)).split("- Rows:")[1].split("\n")[0]
    info["rows"]["beyond_float16"] = 3
    assert ("- Rows: 81,234 response tokens stored per layer (every response position); 3 more were left out at "
            "capture, their residual beyond float16's range (massive activations).") in \
        render_model_card(ReleaseFacts.from_dict(info))
