"""The Arrow activation store: shards, manifest, readers, and open_rows over a store or a .npy."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qsae.store
from qsae.store import (
    MANIFEST,
    STORE_FORMAT,
    ShardRows,
    StoreError,
    check_compatible,
    damaged_shards,
    new_manifest,
    read_layer_table,
    read_manifest,
    residual_matrix,
    sample_rows,
    shard_checksums,
    shard_path,
    to_store_dtype,
    verify_store,
    write_manifest,
    write_shard,
)
from qsae.streaming import ArraySource, StoreSource, open_rows

D_MODEL = 8
LAYERS = [3, 7]


def shard_rows(n_rows: int, first_rollout: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "rollout_id": np.repeat(np.arange(first_rollout, first_rollout + 2), [n_rows // 2, n_rows - n_rows // 2]),
        "position": rng.integers(0, 500, n_rows),
        "token_id": rng.integers(0, 30000, n_rows),
        "correct": rng.random(n_rows) < 0.5,
        "residuals": rng.standard_normal((n_rows, D_MODEL)).astype(np.float32) * 3,
        "special": rng.random(n_rows) < 0.2,
    }


def build_store(store_dir: Path, dtype: str = "float32", shards: dict[str, int] | None = None) -> dict:
    """Write shards for every layer (as capture does), then the manifest listing them.
    Returns {layer: {field: concatenated array in shard order}} for comparison."""
    shards = shards or {"shard_00000": 5, "shard_00001": 7}
    manifest = new_manifest("test/model", None, LAYERS, D_MODEL, dtype=dtype)
    expected: dict[int, dict[str, list]] = {layer: {} for layer in LAYERS}
    for i, (shard, n_rows) in enumerate(sorted(shards.items())):
        rows = {}
        for layer in LAYERS:
            data = shard_rows(n_rows, first_rollout=2 * i, seed=100 * i + layer)
            rows[str(layer)] = write_shard(store_dir, layer, shard, ShardRows(**data), dtype=dtype)
            for key, value in data.items():
                expected[layer].setdefault(key, []).append(value)
        manifest["shards"][shard] = {"rollouts": 2, "rows": rows}
    write_manifest(store_dir, manifest)
    return {layer: {key: np.concatenate(parts) for key, parts in fields.items()} for layer, fields in expected.items()}


# ---------------------------------------------------------------------------------------------
# Round trip


def test_write_shard_and_manifest_round_trip(tmp_path):
    store = tmp_path / "activations"
    expected = build_store(store)
    for layer in LAYERS:
        table = read_layer_table(store, layer)
        want = expected[layer]
        assert table.num_rows == 12
        np.testing.assert_array_equal(table.column("rollout_id").to_numpy(), want["rollout_id"])
        np.testing.assert_array_equal(table.column("position").to_numpy(), want["position"])
        np.testing.assert_array_equal(table.column("token_id").to_numpy(), want["token_id"])
        np.testing.assert_array_equal(table.column("correct").to_numpy(zero_copy_only=False), want["correct"])
        np.testing.assert_array_equal(table.column("special").to_numpy(zero_copy_only=False), want["special"])
        np.testing.assert_allclose(table.column("norm").to_numpy(), np.sqrt((want["residuals"] ** 2).sum(axis=1)),
                                   rtol=1e-6)
        matrix = residual_matrix(table)
        assert matrix.dtype == np.float32 and matrix.shape == (12, D_MODEL)
        np.testing.assert_array_equal(matrix, want["residuals"])


def test_manifest_records_the_run(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    manifest = read_manifest(store)
    assert manifest["model_id"] == "test/model"
    assert manifest["layers"] == LAYERS
    assert manifest["d_model"] == D_MODEL
    assert manifest["dtype"] == "float32"
    assert manifest["format"] == STORE_FORMAT
    assert manifest["shards"]["shard_00001"]["rows"] == {"3": 7, "7": 7}
    assert json.loads((store / MANIFEST).read_text()) == manifest


def test_shard_schema_types(tmp_path):
    import pyarrow as pa

    store = tmp_path / "activations"
    build_store(store, dtype="float16")
    schema = read_layer_table(store, 3).schema
    assert schema.field("rollout_id").type == pa.int64()
    assert schema.field("position").type == pa.int32()
    assert schema.field("token_id").type == pa.int32()
    assert schema.field("correct").type == pa.bool_()
    assert schema.field("special").type == pa.bool_()
    assert schema.field("norm").type == pa.float32()
    assert schema.field("act").type == pa.list_(pa.float16(), D_MODEL)


def all_rows(source) -> np.ndarray:
    return np.concatenate([source.read_chunk(chunk) for chunk in range(len(source.chunk_sizes))])


@pytest.mark.parametrize("given", ["run", "activations"])
def test_open_rows_from_run_dir_or_store_dir(tmp_path, given):
    expected = build_store(tmp_path / "activations")
    path = tmp_path if given == "run" else tmp_path / "activations"
    source = open_rows(path, 7)
    assert isinstance(source, StoreSource)
    assert (source.n_rows, source.d_in) == (12, D_MODEL)
    np.testing.assert_array_equal(all_rows(source), expected[7]["residuals"])


def test_open_rows_from_store_needs_a_layer(tmp_path):
    build_store(tmp_path / "activations")
    with pytest.raises(StoreError, match="which layer"):
        open_rows(tmp_path)


def test_open_rows_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_rows(tmp_path / "nowhere", 3)


def test_open_rows_store_without_rows(tmp_path):
    write_manifest(tmp_path, new_manifest("test/model", None, LAYERS, D_MODEL, dtype="float32"))
    with pytest.raises(StoreError, match="no rows for layer 3"):
        open_rows(tmp_path, 3)


# ---------------------------------------------------------------------------------------------
# float16


def test_float16_store_keeps_values_within_fp16_precision(tmp_path):
    store = tmp_path / "activations"
    expected = build_store(store, dtype="float16")
    got = residual_matrix(read_layer_table(store, 3))
    want = expected[3]["residuals"]
    # float16 has a 10-bit mantissa: relative rounding error at most 2**-11.
    np.testing.assert_allclose(got, want, rtol=2.0**-11, atol=2.0**-24)
    assert not np.array_equal(got, want)  # it really was rounded to float16


def test_to_store_dtype_float16_accepts_the_largest_finite_value():
    peak = float(np.finfo(np.float16).max)
    out = to_store_dtype(np.array([[peak, -peak, 1.0]], dtype=np.float32), "float16")
    assert out.dtype == np.float16
    assert np.isfinite(out).all()


@pytest.mark.filterwarnings("error")  # refused cleanly, without a numpy overflow warning on the way
@pytest.mark.parametrize("value", [7e4, -1e6])
def test_to_store_dtype_refuses_float16_overflow(value):
    residuals = np.ones((3, 4), dtype=np.float32)
    residuals[1, 2] = value
    with pytest.raises(OverflowError, match="float16"):
        to_store_dtype(residuals, "float16")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_to_store_dtype_refuses_non_finite_values(dtype, value):
    residuals = np.ones((3, 4), dtype=np.float32)
    residuals[2, 0] = value
    with pytest.raises(OverflowError, match="NaN or inf"):
        to_store_dtype(residuals, dtype)


def test_to_store_dtype_float32_and_unknown_dtype():
    residuals = np.full((2, 3), 1e6, dtype=np.float64)
    assert to_store_dtype(residuals, "float32").dtype == np.float32
    with pytest.raises(ValueError, match="bfloat16"):
        to_store_dtype(residuals, "bfloat16")


@pytest.mark.filterwarnings("error")
def test_float16_overflow_writes_no_shard(tmp_path):
    data = shard_rows(4, 0, seed=0)
    data["residuals"][2, 1] = 1e5
    with pytest.raises(OverflowError, match="float16"):
        write_shard(tmp_path, 3, "shard_00000", ShardRows(**data), dtype="float16")
    assert not shard_path(tmp_path, 3, "shard_00000").exists()
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Damaged or incomplete stores


def test_truncated_shard_is_a_store_error_naming_the_shard(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    path = shard_path(store, 7, "shard_00001")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="shard_00001"):
        read_layer_table(store, 7)
    read_layer_table(store, 3)  # the other layer's shards are intact


def test_corrupted_shard_is_a_store_error_naming_the_shard(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    path = shard_path(store, 3, "shard_00000")
    data = bytearray(path.read_bytes())
    data[:8] = b"garbage!"
    data[-8:] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard_00000"):
        read_layer_table(store, 3)


def test_missing_shard_file_is_a_store_error_naming_the_shard(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    shard_path(store, 3, "shard_00001").unlink()
    with pytest.raises(StoreError, match="shard_00001"):
        read_layer_table(store, 3)


def test_row_count_disagreeing_with_manifest_is_a_store_error(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    manifest = read_manifest(store)
    manifest["shards"]["shard_00000"]["rows"]["3"] += 1
    write_manifest(store, manifest)
    with pytest.raises(StoreError, match="rows"):
        read_layer_table(store, 3)


def test_no_manifest_means_capture_not_finished(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    (store / MANIFEST).unlink()
    with pytest.raises(StoreError, match="capture not finished"):
        read_layer_table(store, 3)
    with pytest.raises(StoreError, match="capture not finished"):
        read_manifest(store)


def test_layer_not_in_store(tmp_path):
    store = tmp_path / "activations"
    build_store(store)
    with pytest.raises(StoreError, match="layer 5"):
        read_layer_table(store, 5)
    with pytest.raises(StoreError, match="layer 5"):
        open_rows(tmp_path, 5)


def test_store_listing_no_shards(tmp_path):
    write_manifest(tmp_path, new_manifest("test/model", None, LAYERS, D_MODEL, dtype="float32"))
    with pytest.raises(StoreError, match="no shards"):
        read_layer_table(tmp_path, 3)


def test_unlisted_shard_is_not_read(tmp_path):
    """A shard file that the manifest does not list (a worker died before it was recorded) is ignored."""
    store = tmp_path / "activations"
    build_store(store, shards={"shard_00000": 5})
    write_shard(store, 3, "shard_00001", ShardRows(**shard_rows(9, 2, seed=1)), dtype="float32")
    assert read_layer_table(store, 3).num_rows == 5


# ---------------------------------------------------------------------------------------------
# Checksums: every stored byte is checked


def checksummed_store(store_dir: Path, shards: dict[str, int] | None = None, parts: Path | None = None) -> dict:
    """build_store, with the checksums capture records in the manifest (list_shard), and a rollout
    part per shard under `parts` where given; returns the manifest."""
    build_store(store_dir, shards=shards)
    manifest = read_manifest(store_dir)
    for shard, entry in manifest["shards"].items():
        part = None
        if parts is not None:
            part = parts / f"{shard}.parquet"
            part.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"rollout_id": [0, 1], "response": ["A", "B"]}), part)
        entry["checksums"] = shard_checksums(store_dir, shard, LAYERS, part)
    write_manifest(store_dir, manifest)
    return manifest


def zero_fill(path: Path, size: int = 8192) -> None:
    """`size` bytes of zeros written into the middle of a file, its length unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - size // 2
    data[start:start + size] = bytes(size)
    path.write_bytes(bytes(data))


def test_the_manifest_records_a_checksum_of_every_file(tmp_path):
    manifest = checksummed_store(tmp_path / "activations", parts=tmp_path / "rollouts")
    assert manifest["checksum"] == "sha256" and manifest["format"] == STORE_FORMAT
    for shard, entry in manifest["shards"].items():
        for layer in LAYERS:
            data = shard_path(tmp_path / "activations", layer, shard).read_bytes()
            assert entry["checksums"]["layers"][str(layer)] == hashlib.sha256(data).hexdigest()
        part = (tmp_path / "rollouts" / f"{shard}.parquet").read_bytes()
        assert entry["checksums"]["rollouts"] == hashlib.sha256(part).hexdigest()
    assert damaged_shards(tmp_path / "activations", manifest, lambda s: tmp_path / "rollouts" / f"{s}.parquet") == {}
    verify_store(tmp_path / "activations")


def test_a_zeroed_region_of_the_same_length_is_found_by_its_checksum(tmp_path):
    """8 KB of zeros in a shard: its Arrow file still reads, with the manifest's row count, and
    all-zero rows in it; only the checksum tells. A rerun captures it again; readers refuse it."""
    store = tmp_path / "activations"
    manifest = checksummed_store(store, shards={"shard_00000": 5, "shard_00001": 600})
    path = shard_path(store, 7, "shard_00001")
    size = path.stat().st_size
    zero_fill(path)
    assert path.stat().st_size == size
    table = read_layer_table(store, 7)  # the reader and the row count pass
    assert table.num_rows == 605 and (np.abs(residual_matrix(table)).sum(axis=1) == 0).sum() > 0
    [(shard, reason)] = damaged_shards(store, manifest).items()
    assert shard == "shard_00001" and reason.startswith(f"shard {path} does not match the sha256 checksum")
    with pytest.raises(StoreError, match=f"shard {path} does not match the sha256 checksum .* rerun capture"):
        verify_store(store)
    verify_store(store, [3])  # the other layer's shards are intact


@pytest.mark.parametrize("damage", ["truncated", "deleted", "zeroed"])
def test_a_damaged_rollout_part_damages_its_shard(tmp_path, damage):
    store = tmp_path / "activations"
    manifest = checksummed_store(store, parts=tmp_path / "rollouts")
    part = tmp_path / "rollouts" / "shard_00000.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    elif damage == "deleted":
        part.unlink()
    else:
        zero_fill(part, 64)
    damaged = damaged_shards(store, manifest, lambda shard: tmp_path / "rollouts" / f"{shard}.parquet")
    problem = "is missing" if damage == "deleted" else "does not match the sha256 checksum"
    assert list(damaged) == ["shard_00000"] and damaged["shard_00000"].startswith(f"rollout part {part} {problem}")


def test_a_missing_shard_file_is_refused_by_verify_store(tmp_path):
    store = tmp_path / "activations"
    checksummed_store(store)
    shard_path(store, 3, "shard_00001").unlink()
    with pytest.raises(StoreError, match="shard .*layer=3/shard_00001.arrow is missing"):
        verify_store(store)


def test_a_process_reads_a_file_for_its_checksum_once(tmp_path, monkeypatch):
    """verify_store twice reads each file once; a file written since (same length) is read again."""
    monkeypatch.setattr(qsae.store, "SETTLED_NS", 200_000_000)
    store = tmp_path / "activations"
    checksummed_store(store)
    time.sleep(0.3)  # the files settle: a write from now on changes their times
    reads = []
    new_hash = hashlib.new
    monkeypatch.setattr(qsae.store.hashlib, "new", lambda name: reads.append(name) or new_hash(name))
    verify_store(store)
    assert len(reads) == 4  # two shards of two layers
    verify_store(store)
    verify_store(store, [3])
    assert len(reads) == 4
    zero_fill(shard_path(store, 3, "shard_00000"), 16)
    with pytest.raises(StoreError, match="shard_00000.arrow does not match"):
        verify_store(store)
    assert len(reads) == 5


def test_a_store_of_an_older_format_is_refused_by_readers_and_reruns(tmp_path):
    """A store written before the manifest recorded checksums (format 3): verify_store refuses it, and a
    rerun may not extend it (no checksum to check its shards against)."""
    store = tmp_path / "activations"
    build_store(store)
    old = read_manifest(store)
    old["format"] = 3
    del old["checksum"], old["kept_positions"]
    write_manifest(store, old)
    with pytest.raises(StoreError, match=f"is of format 3, this qsae reads format {STORE_FORMAT}"):
        verify_store(store)
    with pytest.raises(StoreError, match=f"captured differently \\(format: store has 3, run wants {STORE_FORMAT}, "
                                         "checksum: store has None, run wants 'sha256', kept_positions: store has None"):
        check_compatible(read_manifest(store), new_manifest("test/model", None, LAYERS, D_MODEL, dtype="float32"))


def test_a_manifest_with_a_checksum_of_the_wrong_shape_is_refused(tmp_path):
    store = tmp_path / "activations"
    manifest = checksummed_store(store)
    manifest["shards"]["shard_00000"]["checksums"]["layers"]["7"] = 12
    write_manifest(store, manifest)
    with pytest.raises(StoreError, match="shard 'shard_00000' does not list a checksum per layer"):
        read_manifest(store)


def test_a_shard_listed_without_its_checksums_is_damaged_and_refused(tmp_path):
    store = tmp_path / "activations"
    manifest = checksummed_store(store)
    del manifest["shards"]["shard_00001"]["checksums"]
    write_manifest(store, manifest)
    assert "records no sha256 checksum" in damaged_shards(store, manifest)["shard_00001"]
    with pytest.raises(StoreError, match="records no sha256 checksum of shard .*shard_00001"):
        verify_store(store)


# ---------------------------------------------------------------------------------------------
# Reruns


def test_check_compatible_passes_on_the_same_run(tmp_path):
    build_store(tmp_path)
    check_compatible(read_manifest(tmp_path), new_manifest("test/model", None, list(LAYERS), D_MODEL, dtype="float32"))


GENERATED = {"model_dtype": "float32", "engine": "transformers", "thinking": False, "max_new_tokens": 64}


@pytest.mark.parametrize(
    "field, change",
    [
        ("model_id", {"model_id": "other/model"}),
        ("model_revision", {"model_revision": "abc123"}),
        ("layers", {"layers": [3, 11]}),
        ("d_model", {"d_model": 16}),
        ("dtype", {"dtype": "float16"}),
        ("format", {"format": 2}),  # a store written before the manifest recorded the rollout settings
        *[("generated_with", {"generated_with": {**GENERATED, key: value}})
          for key, value in [("model_dtype", "bfloat16"), ("engine", "vllm"), ("thinking", True),
                             ("max_new_tokens", 65)]],
    ],
)
def test_check_compatible_refuses_a_different_run(tmp_path, field, change):
    build_store(tmp_path)
    manifest = read_manifest(tmp_path)
    manifest["generated_with"] = GENERATED
    this_run = {**manifest, **{key: value for key, value in change.items() if key != "format"}}
    if "format" in change:
        manifest["format"] = change["format"]
    check_compatible(manifest, {**manifest})  # unchanged: compatible
    with pytest.raises(StoreError, match=f"{field}: store has"):
        check_compatible(manifest, this_run)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    build_store(tmp_path / "activations")
    assert not list(tmp_path.rglob("*.tmp"))
    assert sorted(p.name for p in (tmp_path / "activations" / "layer=3").iterdir()) == [
        "shard_00000.arrow", "shard_00001.arrow"]




# ---------------------------------------------------------------------------------------------
# .npy input


def test_open_rows_npy_is_memory_mapped(tmp_path):
    rows = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    np.save(tmp_path / "acts.npy", rows)
    source = open_rows(tmp_path / "acts.npy")
    assert isinstance(source, ArraySource) and isinstance(source.array, np.memmap)
    assert (source.n_rows, source.d_in) == (20, 6)
    np.testing.assert_array_equal(all_rows(source), rows)


@pytest.mark.parametrize(
    "array", [np.zeros(10, dtype=np.float32), np.zeros((4, 3), dtype=np.int64), np.zeros((2, 3, 4), dtype=np.float32)]
)
def test_open_rows_npy_rejects_non_2d_float(tmp_path, array):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(StoreError, match="2-D float"):
        open_rows(tmp_path / "bad.npy")


@pytest.mark.parametrize("shape", [(0, 6), (5, 0)])
def test_open_rows_npy_rejects_an_empty_array(tmp_path, shape):
    np.save(tmp_path / "empty.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(StoreError, match="no residuals"):
        open_rows(tmp_path / "empty.npy")


def test_open_rows_npy_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        open_rows(tmp_path / "missing.npy")


# ---------------------------------------------------------------------------------------------
# sample_rows


def test_sample_rows_is_seeded_sorted_and_unique():
    first = sample_rows(1000, 100, seed=3)
    assert len(first) == 100
    assert np.array_equal(first, sample_rows(1000, 100, seed=3))
    assert not np.array_equal(first, sample_rows(1000, 100, seed=4))
    assert np.all(np.diff(first) > 0)  # strictly increasing: sorted, no duplicates
    assert first.min() >= 0 and first.max() < 1000


@pytest.mark.parametrize("cap", [None, 50, 80])
def test_sample_rows_returns_all_rows_without_a_binding_cap(cap):
    np.testing.assert_array_equal(sample_rows(50, cap, seed=0), np.arange(50))
