"""The streaming reader: row sources over arrays and the Arrow store, the seeded shuffle buffer,
resuming mid-epoch, data-parallel shares, background prefetch, and training from a store."""
from __future__ import annotations

import itertools
import os
import threading

import numpy as np
import pytest
import torch
from test_store import build_store

from qsae.config import TrainConfig
from qsae.store import (
    ShardRows,
    StoreError,
    new_manifest,
    read_layer_table,
    residual_matrix,
    write_manifest,
    write_shard,
)
from qsae.streaming import (
    CHUNK_ROWS,
    ArraySource,
    StoreSource,
    epoch_windows,
    prefetched,
    shuffled_batches,
)
from qsae.training.loop import train_sae

LAYER = 2
# Shards that split into chunks of unequal sizes: 8192 + 1808, 5000, 8192 + 808, 4000 rows.
SHARD_SIZES = {"shard_00000": 10_000, "shard_00001": 5_000, "shard_00002": 9_000, "shard_00003": 4_000}
N_ROWS = sum(SHARD_SIZES.values())
BATCH = 700  # does not divide the row count or a chunk, so batches straddle buffers
BUFFERS = {"smaller than a chunk": 1_000, "between a chunk and all rows": 12_000, "all rows and more": 10**6}


def tagged_rows(first_row: int, n_rows: int, shard_number: int) -> np.ndarray:
    """Rows [global row id, shard number]: exact in float32, so every read can be traced back."""
    ids = np.arange(first_row, first_row + n_rows)
    return np.stack([ids, np.full(n_rows, shard_number)], axis=1).astype(np.float32)


def write_tagged_store(store_dir, shard_sizes: dict[str, int] = SHARD_SIZES) -> None:
    """One layer of tagged rows, shard by shard, then the manifest listing the shards (as capture does)."""
    manifest = new_manifest("test/model", None, [LAYER], 2, dtype="float32")
    first_row = 0
    for number, (shard, n_rows) in enumerate(sorted(shard_sizes.items())):
        written = write_shard(store_dir, LAYER, shard, ShardRows(rollout_id=np.zeros(n_rows, np.int64), position=np.arange(n_rows), token_id=np.zeros(n_rows, np.int32), correct=np.zeros(n_rows, bool), residuals=tagged_rows(first_row, n_rows, number)), dtype="float32")
        manifest["shards"][shard] = {"rollouts": 1, "rows": {str(LAYER): written}}
        first_row += n_rows
    write_manifest(store_dir, manifest)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("stream") / "activations"
    write_tagged_store(store_dir)
    return store_dir


@pytest.fixture(params=["array", "store"])
def make_source(request, store):
    """A factory of sources over the same tagged rows: an in-memory array, or the Arrow store."""
    if request.param == "array":
        return lambda rows=None: ArraySource(tagged_rows(0, N_ROWS, 0), rows)
    return lambda rows=None: StoreSource(store, LAYER, rows)


def epoch_ids(source, buffer_rows: int, seed: int = 0, epoch: int = 1, **kwargs) -> list[np.ndarray]:
    """The row ids of each batch of one epoch (batches of BATCH rows)."""
    batches = shuffled_batches(source, BATCH, buffer_rows, seed, epoch=epoch, **kwargs)
    return [batch[:, 0].astype(np.int64) for batch in batches]


def shard_of(row_ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(list(SHARD_SIZES.values())), row_ids, side="right")


SELECTION = np.sort(np.random.default_rng(7).choice(N_ROWS, size=9_001, replace=False))


# ---------------------------------------------------------------------------------------------
# One epoch


@pytest.mark.parametrize("buffer_rows", BUFFERS.values(), ids=BUFFERS.keys())
@pytest.mark.parametrize("selected", [None, SELECTION], ids=["all rows", "selected rows"])
def test_every_selected_row_appears_once_per_epoch_in_full_batches(make_source, buffer_rows, selected):
    source = make_source(selected)
    wanted = np.arange(N_ROWS) if selected is None else selected
    batches = epoch_ids(source, buffer_rows)
    assert [len(batch) for batch in batches[:-1]] == [BATCH] * (len(batches) - 1)
    assert 0 < len(batches[-1]) <= BATCH and len(batches) == -(-len(wanted) // BATCH)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), wanted)


@pytest.mark.parametrize("buffer_rows", BUFFERS.values(), ids=BUFFERS.keys())
def test_order_is_reproducible_and_changes_with_epoch_and_seed(make_source, buffer_rows):
    source = make_source()
    order = np.concatenate(epoch_ids(source, buffer_rows, seed=3, epoch=2))
    np.testing.assert_array_equal(np.concatenate(epoch_ids(source, buffer_rows, seed=3, epoch=2)), order)
    assert not np.array_equal(np.concatenate(epoch_ids(source, buffer_rows, seed=3, epoch=3)), order)
    assert not np.array_equal(np.concatenate(epoch_ids(source, buffer_rows, seed=4, epoch=2)), order)


def test_a_buffer_of_all_rows_is_one_permutation_mixing_all_shards(store):
    batches = epoch_ids(StoreSource(store, LAYER), BUFFERS["all rows and more"])
    assert set(shard_of(batches[0])) == set(range(len(SHARD_SIZES)))  # the first batch draws from every shard
    # Rows from the first and the last stored chunk both appear in the first and in the last batch.
    for batch in (batches[0], batches[-1]):
        assert (batch < CHUNK_ROWS).any() and (batch >= N_ROWS - 4_000).any()


def test_a_small_buffer_still_reads_the_chunks_of_all_shards_in_a_shuffled_order(store):
    source = StoreSource(store, LAYER)
    chunk_of_row = np.concatenate([np.full(size, chunk) for chunk, size in enumerate(source.chunk_sizes)])
    read_orders = []
    for epoch in range(1, 7):
        order = np.concatenate(epoch_ids(source, BUFFERS["smaller than a chunk"], epoch=epoch))
        # A buffer holds about one chunk, so each chunk's rows sit together: order chunks by their median.
        positions = np.argsort(order)
        read_order = sorted(range(len(source.chunk_sizes)), key=lambda c: np.median(positions[chunk_of_row == c]))
        shards_read = [source.chunks[chunk][0][0] for chunk in read_order]  # its first piece's shard
        assert read_order != sorted(read_order) and shards_read != sorted(shards_read)
        read_orders.append(read_order)
        first_chunk = order[:source.chunk_sizes[read_order[0]]]
        assert not np.array_equal(first_chunk, np.sort(first_chunk))  # rows within a chunk are permuted too
    # Four chunks have 24 orders: six epochs draw several of them, not one order over and over.
    assert len({tuple(read_order) for read_order in read_orders}) >= 4


# ---------------------------------------------------------------------------------------------
# Resuming mid-epoch


class ReadCountingSource(ArraySource):
    """An ArraySource that records which chunks were read."""

    def __init__(self, array: np.ndarray):
        super().__init__(array)
        self.chunks_read: list[int] = []

    def read_chunk(self, chunk: int, local: np.ndarray | None = None) -> np.ndarray:
        self.chunks_read.append(chunk)
        return super().read_chunk(chunk, local)


@pytest.mark.parametrize("buffer_rows", [BUFFERS["smaller than a chunk"], BUFFERS["between a chunk and all rows"]])
def test_start_step_yields_the_rest_of_the_epoch_without_reading_earlier_buffers(buffer_rows):
    rows = tagged_rows(0, 5 * CHUNK_ROWS + 123, 0)
    full = epoch_ids(ArraySource(rows), buffer_rows, seed=1)
    windows = epoch_windows(ArraySource(rows).chunk_sizes, buffer_rows, seed=1, epoch=1)
    assert len(windows) > 2
    for start_step in (0, 1, 13, 30, len(full) - 1, len(full)):
        source = ReadCountingSource(rows)
        rest = epoch_ids(source, buffer_rows, seed=1, start_step=start_step)
        assert len(rest) == len(full) - start_step
        for resumed, uninterrupted in zip(rest, full[start_step:]):
            np.testing.assert_array_equal(resumed, uninterrupted)
        skipped = {chunk for window in windows if window.start + window.size <= start_step * BATCH
                   for chunk in window.chunks}
        assert not skipped & set(source.chunks_read)
        assert sorted(source.chunks_read) == sorted(set(source.chunks_read))  # each chunk read at most once
        if start_step == 30:
            assert skipped  # the check above covered buffers that were really skipped


# ---------------------------------------------------------------------------------------------
# Data-parallel shares


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("start_step", [0, 17])
def test_rank_shares_are_disjoint_and_interleave_back_into_each_batch(make_source, world, start_step):
    source = make_source(SELECTION)
    buffer_rows = BUFFERS["between a chunk and all rows"]
    batches = epoch_ids(source, buffer_rows, start_step=start_step)
    shares = [epoch_ids(source, buffer_rows, start_step=start_step, rank=rank, world=world) for rank in range(world)]
    assert all(len(share) == len(batches) for share in shares)  # every rank steps the same number of times
    for i, batch in enumerate(batches):
        parts = [share[i] for share in shares]
        for rank, part in enumerate(parts):  # row j of a batch belongs to rank j % world
            np.testing.assert_array_equal(part, batch[rank::world])
        assert len(np.unique(np.concatenate(parts))) == len(batch)


def test_a_batch_smaller_than_the_world_leaves_empty_shares_that_are_still_yielded():
    rows = tagged_rows(0, 9, 0)  # batches of 4, 4 and 1 rows
    world = 3
    shares = [list(shuffled_batches(ArraySource(rows), 4, 100, 0, epoch=1, rank=rank, world=world)) for rank in range(world)]
    assert [[len(part) for part in share] for share in shares] == [[2, 2, 1], [1, 1, 0], [1, 1, 0]]
    assert shares[2][-1].shape == (0, 2)
    ids = np.concatenate([part[:, 0] for share in shares for part in share])
    np.testing.assert_array_equal(np.sort(ids), np.arange(9))


# ---------------------------------------------------------------------------------------------
# StoreSource against the store's own reader


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("selected", [False, True], ids=["all rows", "selected rows"])
def test_store_source_reads_the_rows_the_store_holds(tmp_path, dtype, selected):
    store_dir = tmp_path / "activations"
    build_store(store_dir, dtype, {"shard_00000": CHUNK_ROWS + 500, "shard_00001": 300, "shard_00002": 40})
    n_rows = CHUNK_ROWS + 840
    rows = np.sort(np.random.default_rng(1).choice(n_rows, 4_000, replace=False)) if selected else None
    for layer in (3, 7):
        source = StoreSource(store_dir, layer, rows)
        expected = residual_matrix(read_layer_table(store_dir, layer, rows))
        assert source.n_rows == len(expected) and source.d_in == expected.shape[1] and source.dtype == np.dtype(dtype)
        chunks = [source.read_chunk(chunk) for chunk in range(len(source.chunk_sizes))]
        assert all(chunk.dtype == np.dtype(dtype) for chunk in chunks)
        np.testing.assert_array_equal(np.concatenate(chunks).astype(np.float32), expected)
        local = np.array([0, 5, source.chunk_sizes[0] - 1])
        np.testing.assert_array_equal(source.read_chunk(0, local).astype(np.float32), expected[local])


def test_store_source_errors(tmp_path):
    store_dir = tmp_path / "activations"
    with pytest.raises(StoreError, match="manifest.json is missing"):
        StoreSource(store_dir, LAYER)
    write_tagged_store(store_dir, {"shard_00000": 10})
    with pytest.raises(StoreError, match=r"layer 9 is not in the store .*layers: \[2\]"):
        StoreSource(store_dir, 9)
    with pytest.raises(StoreError, match="holds no rows for layer 2$"):
        StoreSource(store_dir, LAYER, rows=np.array([], dtype=np.int64))

    empty_shard = tmp_path / "empty_shard"
    write_tagged_store(empty_shard, {"shard_00000": 0})
    with pytest.raises(StoreError, match="holds no rows for layer 2$"):
        StoreSource(empty_shard, LAYER)

    no_shards = tmp_path / "no_shards"
    write_manifest(no_shards, new_manifest("test/model", None, [LAYER], 2, dtype="float32"))
    with pytest.raises(StoreError, match="holds no rows for layer 2 .*lists no shards"):
        StoreSource(no_shards, LAYER)


# ---------------------------------------------------------------------------------------------
# Background prefetch


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "qsae-prefetch"]


def test_prefetched_yields_the_same_items(store):
    source = StoreSource(store, LAYER)
    plain = list(shuffled_batches(source, BATCH, 12_000, 0, epoch=1))
    ahead = list(prefetched(shuffled_batches(source, BATCH, 12_000, 0, epoch=1), depth=3))
    assert len(ahead) == len(plain)
    for a, b in zip(ahead, plain):
        np.testing.assert_array_equal(a, b)
    assert not prefetch_threads()


def test_an_error_in_the_producer_surfaces_in_the_consumer():
    def failing():
        yield 1
        yield 2
        raise RuntimeError("shard vanished")

    received = []
    with pytest.raises(RuntimeError, match="shard vanished"):
        for item in prefetched(failing(), depth=1):
            received.append(item)
    assert received == [1, 2]
    assert not prefetch_threads()


def test_closing_the_consumer_early_stops_the_producer_thread():
    consumer = prefetched(itertools.count(), depth=2)  # would produce forever
    assert [next(consumer) for _ in range(3)] == [0, 1, 2]
    assert len(prefetch_threads()) == 1
    consumer.close()
    assert not prefetch_threads()


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_training_on_a_store_equals_training_on_its_rows_in_memory(tmp_path, dtype):
    """A store's chunks are cut from its rows regardless of shard boundaries, so the batches (and
    the weights) are an in-memory array's, however capture split the rows into shards."""
    store_dir = tmp_path / "activations"
    build_store(store_dir, dtype, {"shard_00000": 5_000, "shard_00001": 2 * CHUNK_ROWS + 7, "shard_00002": 1_000})
    cfg = TrainConfig(n_features=32, k=4, epochs=2, batch_size=2048, shuffle_buffer_rows=CHUNK_ROWS, seed=5)
    from_store, store_history = train_sae(StoreSource(store_dir, 3), cfg)
    in_memory, memory_history = train_sae(residual_matrix(read_layer_table(store_dir, 3)), cfg)
    for name, weight in from_store.state_dict().items():
        assert torch.equal(weight, in_memory.state_dict()[name]), name
    assert store_history["fvu"] == memory_history["fvu"]


# ---------------------------------------------------------------------------------------------
# Memory: training follows the shuffle buffer, not the layer

STREAM_CHILD = """
import json, resource, sys
from qsae.config import TrainConfig
from qsae.streaming import StoreSource
from qsae.training.loop import train_sae

source = StoreSource(sys.argv[1], 0)
train_sae(source, TrainConfig(n_features=64, k=4, epochs=1, batch_size=4096, shuffle_buffer_rows=int(sys.argv[2])))
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rows": source.n_rows}))
"""


def peak_rss_of_one_epoch(store_dir, buffer_rows: int) -> dict:
    """One epoch in a fresh process. glibc's mmap threshold is fixed so that freed batches leave the
    process and the peak is the memory in use."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(store_dir), str(buffer_rows)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_store(store_dir, n_shards: int, shard_rows: int, d_model: int):
    manifest = new_manifest("synthetic", None, [0], d_model, dtype="float32")
    rng = np.random.default_rng(0)
    for shard in range(n_shards):
        written = write_shard(store_dir, 0, f"shard-{shard:05d}", ShardRows(np.full(shard_rows, shard), np.arange(shard_rows), np.zeros(shard_rows), np.zeros(shard_rows, bool), rng.standard_normal((shard_rows, d_model), dtype=np.float32)), dtype="float32")
        manifest["shards"][f"shard-{shard:05d}"] = {"questions": [], "rollouts": 1, "rows": {"0": written}}
    write_manifest(store_dir, manifest)
    return store_dir


def test_training_from_a_store_many_buffers_large_holds_a_few_buffers(tmp_path):
    """Peak resident memory of an epoch from stores of 4 and 24 buffers (32 and 192 MiB): streaming
    peaks alike, where a whole-layer load would add the 20 buffers between them. (The difference of
    two runs cancels what torch's first step maps: libraries, thread pools.)"""
    d_model, buffer_rows = 256, CHUNK_ROWS
    buffer_bytes = buffer_rows * d_model * 4
    peaks = {}
    for n_buffers in (4, 24):
        store = synthetic_store(tmp_path / f"store{n_buffers}", n_buffers // 4, 4 * buffer_rows, d_model)
        measured = peak_rss_of_one_epoch(store, buffer_rows)
        assert measured["rows"] == n_buffers * buffer_rows
        peaks[n_buffers] = measured["peak"]
    grown = peaks[24] - peaks[4]
    assert grown < 3 * buffer_bytes, f"6x the store added {grown / 2**20:.0f} MiB; a buffer is {buffer_bytes / 2**20:.0f} MiB"
