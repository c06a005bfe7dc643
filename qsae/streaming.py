"""Training rows as a stream: a row source (a 2-D array or .npy memmap, or one layer of the Arrow
store) read in chunks, drawn through a seeded shuffle buffer, so that training needs memory for the
buffer only, never for the whole store; and a background prefetch of the next buffer.
"""
from __future__ import annotations

import ctypes
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from qsae.store import MANIFEST, StoreError, open_shard, read_manifest, residual_matrix, shard_path

def open_rows(path: str | Path, layer: int | None = None) -> RowSource:
    """Training rows, streamed: a 2-D float .npy (memory-mapped) as an ArraySource, or one layer of a
    store (a run directory or its activations/) as a StoreSource. Neither reads the rows up front."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.exists():
            raise FileNotFoundError(f"activation file not found: {path}")
        try:
            residuals = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise StoreError(f"{path} is not a readable .npy array ({err})") from None
        if not isinstance(residuals, np.ndarray):
            raise StoreError(f"{path} is not a .npy array")
        if residuals.ndim != 2 or not np.issubdtype(residuals.dtype, np.floating):
            raise StoreError(f"{path} must hold a 2-D float array (rows = tokens), got {residuals.dtype} {residuals.shape}")
        if 0 in residuals.shape:
            raise StoreError(f"{path} holds no residuals: shape {residuals.shape}")
        return ArraySource(residuals)
    if not path.is_dir():
        raise FileNotFoundError(f"activation store not found: {path} (expected a store directory or a .npy file)")
    store_dir = path / "activations" if (path / "activations" / MANIFEST).exists() else path
    if layer is None:
        raise StoreError(f"{store_dir} is a store: say which layer to read ({read_manifest(store_dir)['layers']})")
    return StoreSource(store_dir, layer)


CHUNK_ROWS = 8192  # rows per read: the unit whose order the shuffle permutes


def _chunked(rows: np.ndarray, size: int = CHUNK_ROWS) -> list[np.ndarray]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


class ArraySource:
    """Selected rows of a 2-D array (in memory or a memory-mapped .npy), in chunks of CHUNK_ROWS.
    A read touches only the rows it asks for, so a memmap is never loaded whole."""

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None):
        if array.ndim != 2:
            raise ValueError(f"residuals must be 2-D [rows, d_in], got shape {tuple(array.shape)}")
        self.array = array
        self.d_in = array.shape[1]
        self.dtype = array.dtype
        self.chunks = _chunked(np.arange(array.shape[0]) if rows is None else np.asarray(rows))
        self.chunk_sizes = [len(chunk) for chunk in self.chunks]
        self.n_rows = sum(self.chunk_sizes)

    def read_chunk(self, chunk: int, local: np.ndarray | None = None) -> np.ndarray:
        """The chunk's rows (or its sorted `local` subset) as a [rows, d_in] array."""
        rows = self.chunks[chunk] if local is None else self.chunks[chunk][local]
        return np.asarray(self.array[rows])

    def describe_row(self, chunk: int, index: int) -> str:
        where = getattr(self.array, "filename", None)  # a memory-mapped .npy knows its file
        return f"row {self.chunks[chunk][index]}" + (f" of {where}" if where else "")


class StoreSource:
    """Selected rows of one layer of the Arrow store in chunks of CHUNK_ROWS rows, cut from the rows
    in store order regardless of shard boundaries (a chunk may span shards), so the stream depends
    on the rows alone, not on how capture split them, and equals an ArraySource over the same rows.
    A shard is memory-mapped only while a chunk of it is read. Reads check row counts, not checksums:
    `qsae train` and the analysis call store.verify_store once before reading (a check at every chunk
    read would read every byte again for every epoch), and a capture rerun checks every file."""

    def __init__(self, store_dir: str | Path, layer: int, rows: np.ndarray | None = None):
        self.store_dir = Path(store_dir)
        manifest = read_manifest(self.store_dir)
        if layer not in manifest["layers"]:
            raise StoreError(f"layer {layer} is not in the store at {store_dir} (layers: {manifest['layers']})")
        self.layer, self.d_in = layer, manifest["d_model"]
        self.dtype = np.dtype(manifest["dtype"])
        # Each chunk is a list of pieces (shard, its row count, local rows in it).
        self.chunks: list[list[tuple[str, int, np.ndarray]]] = [[]]
        room, offset = CHUNK_ROWS, 0
        for shard in sorted(manifest["shards"]):
            n_rows = manifest["shards"][shard]["rows"][str(layer)]
            local = np.arange(n_rows) if rows is None else \
                rows[np.searchsorted(rows, offset):np.searchsorted(rows, offset + n_rows)] - offset
            while len(local):
                if room == 0:
                    self.chunks.append([])
                    room = CHUNK_ROWS
                self.chunks[-1].append((shard, n_rows, local[:room]))
                room, local = room - len(local[:room]), local[room:]
            offset += n_rows
        self.chunk_sizes = [sum(len(rows) for _, _, rows in chunk) for chunk in self.chunks]
        self.n_rows = sum(self.chunk_sizes)
        if self.n_rows == 0:
            raise StoreError(f"the activation store at {store_dir} holds no rows for layer {layer}"
                             + ("" if manifest["shards"] else " (it lists no shards: capture not run?)"))

    def read_columns(self, chunk: int, columns: list[str], local: np.ndarray | None = None) -> pa.Table:
        """Columns of the chunk's rows (or of its sorted `local` subset); other columns are not read."""
        tables, offset = [], 0
        for shard, n_rows, rows in self.chunks[chunk]:
            part = rows if local is None else rows[local[(local >= offset) & (local < offset + len(rows))] - offset]
            offset += len(rows)
            if len(part):
                table = open_shard(shard_path(self.store_dir, self.layer, shard), n_rows).select(columns)
                tables.append(table.take(pa.array(part)))
        return pa.concat_tables(tables)

    def read_chunk(self, chunk: int, local: np.ndarray | None = None) -> np.ndarray:
        column = self.read_columns(chunk, ["act"], local).column("act")
        if column.type.list_size != self.d_in:
            raise StoreError(f"a shard of layer {self.layer} in {self.store_dir} has rows of {column.type.list_size} "
                             f"values, the manifest says d_model {self.d_in}")
        return residual_matrix(pa.table({"act": column}), self.dtype)

    def describe_row(self, chunk: int, index: int) -> str:
        for shard, _, rows in self.chunks[chunk]:
            if index < len(rows):
                return f"row {rows[index]} of {shard} (layer {self.layer})"
            index -= len(rows)
        raise IndexError(index)


RowSource = ArraySource | StoreSource


def as_source(residuals) -> RowSource:
    """Training input as a chunked row source: a store or array source as given, an array (or a
    memory-mapped .npy) wrapped without copying, a tensor copied to host memory."""
    if isinstance(residuals, (ArraySource, StoreSource)):
        return residuals
    if hasattr(residuals, "detach"):  # a torch tensor
        residuals = residuals.detach().cpu().numpy()
    residuals = residuals if isinstance(residuals, np.ndarray) else np.asarray(residuals)
    if residuals.ndim != 2:
        raise ValueError(f"residuals must be 2-D [rows, d_in], got shape {tuple(residuals.shape)}")
    if residuals.shape[0] == 0 or residuals.shape[1] == 0:
        raise ValueError(f"residuals are empty: shape {tuple(residuals.shape)}")
    if not np.issubdtype(residuals.dtype, np.floating):
        raise ValueError(f"residuals must be floating point, got {residuals.dtype}")
    return ArraySource(residuals)


@dataclasses.dataclass(frozen=True)
class Window:
    """Consecutive chunks (in an epoch's shuffled chunk order) that the buffer holds at once."""

    index: int
    chunks: list[int]
    start: int  # position of its first row in the epoch's order
    size: int


def epoch_windows(chunk_sizes: list[int], buffer_rows: int, seed: int, epoch: int) -> list[Window]:
    """The chunks in a seeded order for this epoch, grouped into windows of at least buffer_rows rows
    (the last may be smaller). Each window's rows are then permuted by window_order."""
    windows, current, size, start = [], [], 0, 0
    for chunk in np.random.default_rng([seed, epoch]).permutation(len(chunk_sizes)):
        current.append(int(chunk))
        size += chunk_sizes[chunk]
        if size >= buffer_rows:
            windows.append(Window(len(windows), current, start, size))
            current, start, size = [], start + size, 0
    if current:
        windows.append(Window(len(windows), current, start, size))
    return windows


def window_order(window: Window, seed: int, epoch: int) -> np.ndarray:
    """The permutation of a window's rows (indices into its chunks' concatenated rows): its own
    stream per (seed, epoch, window), so any window can be drawn without the ones before it."""
    return np.random.default_rng([seed, epoch, window.index]).permutation(window.size)


def read_window_rows(source: RowSource, window: Window, wanted: np.ndarray) -> np.ndarray:
    """Rows `wanted` (indices into the window's concatenated chunks), in that order; each chunk
    is read once, only for the rows wanted from it, straight into its places in the result."""
    order = np.argsort(wanted, kind="stable")
    ranked = wanted[order]
    out = np.empty((len(wanted), source.d_in), dtype=source.dtype)
    offset = 0
    for chunk in window.chunks:
        size = source.chunk_sizes[chunk]
        lo, hi = np.searchsorted(ranked, [offset, offset + size])
        if hi > lo:
            out[order[lo:hi]] = source.read_chunk(chunk, ranked[lo:hi] - offset)
        offset += size
    return out


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed since the last call back to the system (glibc; elsewhere a no-op). Batch-sized
    blocks freed between training steps otherwise stay resident in the allocator's heaps, and the
    process grows with every step of an epoch instead of staying within its buffers."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def shuffled_batches(source: RowSource, batch_size: int, buffer_rows: int, seed: int, *, epoch: int,
                     start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[np.ndarray]:
    """One epoch of mini-batches over every row of `source`, reproducible from (seed, epoch): chunks
    in a shuffled order fill a buffer of about buffer_rows rows, whose rows are permuted and cut into
    batches (a batch may span two buffers). With buffer_rows >= the row count, one permutation of all
    rows. Starts at batch `start_step` without reading the buffers before it (resuming mid-epoch).
    With world > 1, yields rank's share of every batch (row i of a batch goes to rank i % world; a
    share may be empty), so data-parallel workers read disjoint rows and step together."""
    n_rows, first = source.n_rows, start_step * batch_size
    pending = []
    for window in epoch_windows(source.chunk_sizes, buffer_rows, seed, epoch):
        lo, hi = max(window.start, first), window.start + window.size
        if hi <= lo:
            continue
        release_freed_memory()  # once a buffer: the last one's batches are mostly trained and freed
        positions = np.arange(lo, hi)
        if world > 1:
            positions = positions[(positions % batch_size) % world == rank]
        order = window_order(window, seed, epoch)
        rows = read_window_rows(source, window, order[positions - window.start])
        for batch in range(lo // batch_size, (hi - 1) // batch_size + 1):
            a, z = np.searchsorted(positions, [batch * batch_size, (batch + 1) * batch_size])
            pending.append(rows[a:z])
            if hi >= min((batch + 1) * batch_size, n_rows):  # the batch is complete
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending = []


def prefetched(batches: Iterator, depth: int) -> Iterator:
    """Run `batches` in a background thread, up to `depth` items ahead: reading and shuffling the
    next buffer overlaps training on this one. Errors surface in the consumer."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    thread = threading.Thread(target=produce, name="qsae-prefetch", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
