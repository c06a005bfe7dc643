"""Analysis stage: fidelity, feature statistics, contexts, charts and the model card."""
from __future__ import annotations

import json
import struct
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from planted import planted_rows

from qsae.analysis import charts
from qsae.analysis.card import render_model_card
from qsae.analysis.contexts import describe_contexts, top_activating_rows
from qsae.analysis.features import (
    HEALTHY_RANGE,
    UndefinedAUROCError,
    auroc_direction,
    auroc_per_feature,
    bootstrap_auroc_ci,
    feature_health,
    fire_counts,
    fire_rates,
    stratified_resamples,
)
from qsae.analysis.fidelity import bootstrap_ci, mean_l0, variance_explained, variance_explained_ci
from qsae.config import PipelineConfig
from qsae.release import analyze_layer, encode_layer_sample, encode_sample
from qsae.sae import TopKSAE
from qsae.store import (CHUNK_ROWS, StoreSource, new_manifest, read_layer_table, residual_matrix, write_manifest,
                        write_shard)
from qsae.train import sampled_split


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


def test_bootstrap_ci_brackets_estimate_and_streaming_version_agrees():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 16))
    x_hat = x + rng.normal(0, 0.6, size=x.shape)
    estimate = variance_explained(x, x_hat)
    low, high = bootstrap_ci(variance_explained, x, x_hat, n_boot=50, seed=3)
    assert low < estimate < high
    assert high - low < 0.05
    assert bootstrap_ci(variance_explained, x, x_hat, n_boot=50, seed=3) == (low, high)
    # 50 replicates span more than one batch of the streaming version
    assert variance_explained_ci(x, x_hat, n_boot=50, seed=3) == pytest.approx((low, high), rel=1e-9)
    assert bootstrap_ci(variance_explained, x, x_hat, n_boot=50, seed=4) != (low, high)


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


def test_auroc_direction():
    assert auroc_direction(np.array([0.6, 0.4, 0.5])) == ["correct↑", "wrong↑", "none"]


def test_bootstrap_auroc_ci_matches_resampled_sklearn():
    n_features = 12
    indices, values = random_codes(7, n_rows=200, n_features=n_features, k=4)
    labels = np.random.default_rng(8).random(200) < 0.5
    chosen = np.array([3, 0, 9])
    got = bootstrap_auroc_ci(indices, values, labels, chosen, n_features, n_boot=30, seed=11)
    dense = dense_codes(indices, values, n_features)
    replicates = np.array([
        [roc_auc_score(labels[rows], dense[rows, f]) for f in chosen]
        for rows in stratified_resamples(labels, 30, 11)
    ])
    np.testing.assert_allclose(got, np.quantile(replicates, [0.025, 0.975], axis=0).T, atol=1e-12)
    assert (got[:, 0] <= got[:, 1]).all()


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


# contexts


def test_top_activating_rows_matches_brute_force():
    n_features = 30
    indices, values = random_codes(3, n_rows=250, n_features=n_features, k=4, n_silent=3)
    dense = dense_codes(indices, values, n_features)
    got = top_activating_rows(indices, values, n_features, top=5)
    expected = {}
    for f in range(n_features):
        firing = [(row, dense[row, f]) for row in range(len(dense)) if dense[row, f] > 0]
        if firing:
            expected[f] = sorted(firing, key=lambda pair: (-pair[1], pair[0]))[:5]
    assert got == expected
    assert all(f < n_features - 3 for f in got)


def test_describe_contexts_is_json_ready():
    tokens = ["The", " cat", " sat"]
    top = {7: [(2, 1.5), (0, 0.25)]}
    described = describe_contexts(top, tokens, lambda row: ("".join(tokens[:row]), tokens[row]))
    assert described == {"7": [
        {"row": 2, "token": " sat", "left": "The cat", "activation": 1.5},
        {"row": 0, "token": "The", "left": "", "activation": 0.25},
    ]}
    json.dumps(described)


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
        charts.plot_auroc({3: rng.uniform(0.45, 0.55, 200), 5: None}, tmp_path),
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


def test_chart_rejects_value_outside_interval(tmp_path):
    with pytest.raises(ValueError, match="inside its interval"):
        charts.plot_variance_explained({1: (0.5, 0.6, 0.7)}, tmp_path)


# model card


def card_info(auroc_defined: bool = True) -> dict:
    per_layer = {
        "4": {"variance_explained": 0.9137, "ve_ci": [0.9071, 0.9188], "l0": 15.84, "dead": 7, "healthy": 1843,
              "dense": 212, "rare": 1986, "revived": 4321, "max_auroc": 0.5614, "max_auroc_feature": 1777,
              "max_auroc_fire_rate": 0.0734, "max_auroc_direction": "correct↑"},
        "6": {"variance_explained": 0.8426, "ve_ci": [0.8352, 0.8491], "l0": 14.27, "dead": 19, "healthy": 2517,
              "dense": 98, "rare": 1414, "revived": 657, "max_auroc": 0.5239, "max_auroc_feature": 903,
              "max_auroc_fire_rate": 0.4182, "max_auroc_direction": "correct↑"},
    }
    if not auroc_defined:
        for stats in per_layer.values():
            stats.update(max_auroc=None, max_auroc_feature=None, max_auroc_fire_rate=None, max_auroc_direction=None)
    return {
        "model_id": "org/tiny-model", "model_revision": "0123abcd", "layers": [4, 6], "d_model": 64,
        "n_features": 4048, "k": 16,
        "hook": "residual stream = output of decoder layer L = hidden_states[L+1]",
        "questions": {"source": "bundled-sample", "n": 37, "seed": 913,
                      "n_correct": 23 if auroc_defined else 0, "n_wrong": 14 if auroc_defined else 37},
        "tokens": {"total_response_tokens": 81234, "per_layer_train": 60417, "per_layer_heldout": 6713},
        "recipe": {"optimizer": "Adam", "lr": 0.00031, "batch_size": 1024, "epochs": 17,
                   "revive_every_epochs": 3, "dead_after_steps": 377},
        "per_layer": per_layer, "auroc_defined": auroc_defined,
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


def test_card_reports_every_per_layer_number():
    info = card_info()
    card = render_model_card(info)
    for layer, s in info["per_layer"].items():
        assert table_cells(card, f"L{layer}", "## Per-layer metrics") == [
            f"L{layer}", f"{s['variance_explained']:.3f}", f"[{s['ve_ci'][0]:.3f}, {s['ve_ci'][1]:.3f}]",
            f"{s['l0']:.1f}", f"{s['dead']:,}", f"{s['rare']:,}", f"{s['healthy']:,}", f"{s['dense']:,}",
            f"{s['revived']:,}",
        ]
        assert table_cells(card, f"L{layer}", "## Correctness statistics") == [
            f"L{layer}", f"{s['max_auroc']:.3f}", f"f{s['max_auroc_feature']}", f"{s['max_auroc_fire_rate']:.2%}",
            s["max_auroc_direction"],
        ]
    for text in ("org/tiny-model", "0123abcd", "4,048", "bundled-sample", "913", "81,234", "60,417", "6,713",
                 "0.00031", "377", "4,568", "9.8.7", "sae_L4_n4048_k16.pt", 'load_from_disk("sparsify/layers.4")',
                 'load_from_disk("saelens/blocks.4.hook_resid_post")', "hidden_states[L+1]"):
        assert text in card, text
    assert "undefined" not in card


def test_card_says_statistics_undefined_for_one_class():
    card = render_model_card(card_info(auroc_defined=False))
    assert "Correctness statistics are undefined" in card
    assert "0 correct, 37 wrong" in card
    assert "max AUROC" not in card


def test_card_front_matter():
    card = render_model_card(card_info())
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


def test_card_accepts_int_layer_keys_and_names_missing_keys():
    info = card_info()
    info["per_layer"] = {int(layer): stats for layer, stats in info["per_layer"].items()}
    assert "0.914" in render_model_card(info)
    del info["recipe"]
    with pytest.raises(ValueError, match="recipe"):
        render_model_card(info)
    info = card_info()
    del info["per_layer"]["6"]["l0"]
    with pytest.raises(ValueError, match="l0"):
        render_model_card(info)


# the analysis of a store, streamed

LAYER, D_MODEL, TOKENS_PER_ROLLOUT = 5, 16, 40
SHARD_ROWS = {"shard_00000": 9_000, "shard_00001": 3_000, "shard_00002": 7_000}  # chunks of unequal sizes
CAP = 15_000  # sampled rows: several chunks, and not every stored row


def write_rollout_store(store_dir, dtype: str) -> None:
    """One layer of planted rows, TOKENS_PER_ROLLOUT tokens per rollout, every third rollout correct."""
    manifest = new_manifest("test/model", None, [LAYER], D_MODEL, dtype)
    first = 0
    for shard, n_rows in SHARD_ROWS.items():
        row = np.arange(first, first + n_rows)
        rollout_id = row // TOKENS_PER_ROLLOUT
        written = write_shard(store_dir, LAYER, shard, rollout_id=rollout_id, position=row % TOKENS_PER_ROLLOUT + 7,
                              token_id=np.zeros(n_rows, np.int32), correct=rollout_id % 3 == 0,
                              residuals=planted_rows(n_rows, D_MODEL, 48, 3, seed=first, atom_seed=0) * 5, dtype=dtype)
        manifest["shards"][shard] = {"rollouts": n_rows // TOKENS_PER_ROLLOUT, "rows": {str(LAYER): written}}
        first += n_rows
    write_manifest(store_dir, manifest)


def analysis_config(export: bool = False) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.capture.max_tokens_per_layer = CAP
    cfg.train.seed, cfg.train.holdout_fraction = 3, 0.1
    cfg.release.bootstrap, cfg.release.top_contexts, cfg.release.export_activations = 40, 3, export
    return cfg


def store_sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(D_MODEL, 64, 4)


def context_of(rollout_id: int, position: int) -> tuple[str, str]:
    """Names the token, so the contexts show which rows the analysis attributed them to."""
    return f"rollout {rollout_id}", f"position {position}"


@pytest.fixture(scope="module", params=["float16", "float32"])
def rollout_store(request, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp(f"analysis-{request.param}") / "activations"
    write_rollout_store(store_dir, request.param)
    return store_dir


def sample_in_memory(store_dir, cfg) -> SimpleNamespace:
    """The reference: the whole sample read into memory as float32, with its metadata and split."""
    sampled, train_rows, heldout_rows = sampled_split(store_dir, LAYER, CAP, cfg.train.holdout_fraction,
                                                      cfg.train.seed)
    table = read_layer_table(store_dir, LAYER, sampled)
    return SimpleNamespace(residuals=residual_matrix(table), train_rows=train_rows, heldout_rows=heldout_rows,
                           **{name: table.column(name).to_numpy(zero_copy_only=False)
                              for name in ("rollout_id", "position", "correct")})


def test_streamed_analysis_gives_the_statistics_of_the_sample_in_memory(rollout_store):
    torch.set_num_threads(1)
    cfg, sae = analysis_config(), store_sae()
    got = analyze_layer(LAYER, sae, encode_layer_sample(rollout_store, LAYER, sae, cfg), {"revived": 0}, cfg,
                        context_of)

    # as before: the whole sample in memory as float32, encoded at once
    ref = sample_in_memory(rollout_store, cfg)
    held = ref.heldout_rows
    with torch.no_grad():
        values, indices = (t.numpy() for t in sae.encode_topk(torch.tensor(ref.residuals)))
        x_hat = sae.decode_topk(torch.from_numpy(values[held]), torch.from_numpy(indices[held])).numpy()
    ve = variance_explained(ref.residuals[held], x_hat)
    assert 0 < ref.correct.mean() < 1, "both classes, so the AUROC is compared"
    summary = got["summary"]
    assert summary["variance_explained"] == pytest.approx(ve, rel=1e-6)
    assert summary["ve_ci"] == pytest.approx(variance_explained_ci(ref.residuals[held], x_hat, 40, 3), rel=1e-6)
    assert summary["l0"] == pytest.approx(mean_l0(values[held]))
    assert (summary["train_rows"], summary["heldout_rows"]) == (len(ref.train_rows), len(held))
    assert summary["train_rows"] + summary["heldout_rows"] == CAP
    np.testing.assert_array_equal(got["rates"], fire_rates(indices, values, 64))
    np.testing.assert_allclose(got["auroc"], auroc_per_feature(indices, values, ref.correct, 64), atol=1e-12)
    top = top_activating_rows(indices, values, 64, 3)
    expected = describe_contexts(top, {row: f"position {ref.position[row]}" for row in range(CAP)},
                                 lambda row: (f"rollout {ref.rollout_id[row]}", ""))
    assert got["contexts"] == expected


class CountingSource(StoreSource):
    """A store source that records how many rows each read returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def read_chunk(self, chunk: int, local: np.ndarray | None = None) -> np.ndarray:
        rows = super().read_chunk(chunk, local)
        self.reads.append(len(rows))
        return rows


@pytest.mark.parametrize("export", [False, True])
def test_streamed_analysis_reads_chunks_and_keeps_only_the_heldout_residuals(rollout_store, export):
    cfg, sae = analysis_config(export), store_sae()
    sampled, train_rows, heldout_rows = sampled_split(rollout_store, LAYER, CAP, cfg.train.holdout_fraction,
                                                      cfg.train.seed)
    source = CountingSource(rollout_store, LAYER, sampled)
    sample = encode_sample(sae, source, train_rows, heldout_rows, keep_residuals=export)
    # every sampled row read once, never more than a chunk at a time
    assert sum(source.reads) == CAP and max(source.reads) <= CHUNK_ROWS and len(source.reads) > 1
    ref = sample_in_memory(rollout_store, cfg)
    assert sample.heldout_residuals.dtype == source.dtype  # kept in the store dtype
    np.testing.assert_array_equal(sample.heldout_residuals.astype(np.float32), ref.residuals[heldout_rows])
    if export:
        np.testing.assert_array_equal(sample.residuals.astype(np.float32), ref.residuals)
    else:
        assert sample.residuals is None
    assert sample.values.shape == sample.indices.shape == (CAP, 4)
    for name in ("rollout_id", "position", "correct"):
        np.testing.assert_array_equal(getattr(sample.rows, name), getattr(ref, name))
