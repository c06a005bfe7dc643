"""The Arrow activation store: one IPC file per (capture shard, layer), a manifest written last.

Layout (see DESIGN.md):
    <run>/activations/manifest.json
    <run>/activations/layer=<L>/<shard>.arrow
A shard file is written under a temporary name and renamed when complete; it counts only once the
manifest lists it. A rerun skips listed shards, so every rollout is captured exactly once even when
workers die mid-shard (their temporary files are simply overwritten by the retry).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from qsae.files import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
STORE_FORMAT = 3  # 2: rows carry `special` and `norm`; 3: the manifest records the rollout settings
HOOK_CONVENTION = "output of decoder layer L (= hidden_states[L + 1]): the residual stream after block L"
TOKEN_SELECTION = "response tokens: positions n_prompt .. n_prompt + n_response - 1 of prompt+response"


class StoreError(ValueError):
    """The activation store is missing, incomplete, or does not match what was asked of it."""


class DiskSpaceError(OSError):
    """The store would not fit on its disk."""


def shard_schema(d_model: int, dtype: str) -> pa.Schema:
    value_type = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.schema(
        [
            ("rollout_id", pa.int64()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
            ("correct", pa.bool_()),
            ("special", pa.bool_()),  # a special or chat-template token (the tokenizer's added tokens)
            ("norm", pa.float32()),  # the residual's L2 norm, computed before the cast to the store dtype
            ("act", pa.list_(value_type, d_model)),
        ]
    )


def to_store_dtype(residuals: np.ndarray, dtype: str) -> np.ndarray:
    """Cast residuals to the store dtype, refusing NaN/inf and float16 overflow (never store inf)."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"store dtype must be float16 or float32, got {dtype!r}")
    if not np.isfinite(residuals).all():
        raise OverflowError("residuals contain NaN or inf (the model overflowed?); capture with model.dtype float32")
    if dtype == "float32":
        return residuals.astype(np.float32, copy=False)
    peak = float(np.abs(residuals).max(initial=0.0))
    if peak > float(np.finfo(np.float16).max):  # a Python float: comparing with a float16 scalar would cast peak to float16
        raise OverflowError(f"residual magnitude {peak:.3g} overflows float16; capture with dtype float32")
    return residuals.astype(np.float16)


def row_bytes(d_model: int, dtype: str) -> int:
    """Bytes of one stored row: the residual plus rollout_id, position, token_id, correct, special, norm."""
    return d_model * (2 if dtype == "float16" else 4) + 8 + 4 + 4 + 1 + 1 + 4


def free_bytes(path: str | Path) -> int:
    """Free space on the disk that holds `path` (or would hold it, if it does not exist yet)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def remove_stale_temporaries(run_dir: str | Path) -> int:
    """Delete temporary files that a killed writer left behind; call only while no writer runs."""
    stale = [p for p in Path(run_dir).rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def shard_path(store_dir: Path, layer: int, shard: str) -> Path:
    return Path(store_dir) / f"layer={layer}" / f"{shard}.arrow"


def write_shard(
    store_dir: Path,
    layer: int,
    shard: str,
    rollout_id: np.ndarray,
    position: np.ndarray,
    token_id: np.ndarray,
    correct: np.ndarray,
    residuals: np.ndarray,
    dtype: str,
    *,
    special: np.ndarray | None = None,
) -> int:
    """Write one layer's rows of one capture shard; returns the row count. `special` marks special and
    chat-template tokens (None: none of them is)."""
    n_rows, d_model = residuals.shape
    special = np.zeros(n_rows, dtype=bool) if special is None else special
    values = to_store_dtype(residuals, dtype)
    norm = np.linalg.norm(residuals.astype(np.float64), axis=1).astype(np.float32)
    table = pa.table(
        [
            pa.array(rollout_id, pa.int64()),
            pa.array(position, pa.int32()),
            pa.array(token_id, pa.int32()),
            pa.array(correct, pa.bool_()),
            pa.array(special, pa.bool_()),
            pa.array(norm, pa.float32()),
            pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), d_model),
        ],
        schema=shard_schema(d_model, dtype),
    )

    def write(tmp: str) -> None:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=65536)

    atomic_write(shard_path(store_dir, layer, shard), write)
    return n_rows


def new_manifest(model_id: str, model_revision: str | None, layers: list[int], d_model: int, dtype: str, *,
                 generated_with: dict | None = None) -> dict:
    """An empty store's manifest. `generated_with` holds the rollout settings that shape its rows
    (model dtype, engine, prompt settings), so that a rerun under others is refused."""
    return {
        "format": STORE_FORMAT,
        "model_id": model_id,
        "model_revision": model_revision,
        "generated_with": generated_with or {},
        "layers": list(layers),
        "d_model": d_model,
        "dtype": dtype,
        "hook": HOOK_CONVENTION,
        "token_selection": TOKEN_SELECTION,
        "shards": {},  # shard name -> {"questions": [uuid, ...], "rollouts": n, "rows": {layer: n}}
    }


def write_manifest(store_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(store_dir) / MANIFEST, manifest)


def read_manifest(store_dir: str | Path) -> dict:
    path = Path(store_dir) / MANIFEST
    if not path.exists():
        raise StoreError(f"no activation store at {store_dir}: {MANIFEST} is missing (capture not finished?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path} is damaged ({err}); capture again into a new --out") from None
    check_manifest_shape(manifest, path)
    return manifest


def check_manifest_shape(manifest, path: Path) -> None:
    """The fields every reader relies on, with the types they expect."""
    shapes = {"layers": list, "d_model": int, "dtype": str, "shards": dict}
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(k), t) for k, t in shapes.items()):
        raise StoreError(f"{path} is not an activation store manifest (expected an object with "
                         f"{', '.join(f'{k!r}' for k in shapes)}); capture again into a new --out")
    for name, entry in manifest["shards"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("rows"), dict)
                and all(isinstance(entry["rows"].get(str(layer)), int) for layer in manifest["layers"])):
            raise StoreError(f"{path}: shard {name!r} does not list its rows per layer; capture again into a new --out")


# What makes two runs' rows comparable; a store holds rows of one such run only.
IDENTITY = ("format", "model_id", "model_revision", "generated_with", "layers", "d_model", "dtype")


def check_compatible(manifest: dict, this_run: dict) -> None:
    """A rerun may extend a store only with rows made the same way (this_run: its new_manifest)."""
    clashes = [key for key in IDENTITY if manifest.get(key) != this_run[key]]
    if clashes:
        details = ", ".join(f"{key}: store has {manifest.get(key)!r}, run wants {this_run[key]!r}" for key in clashes)
        raise StoreError(f"the activation store was captured differently ({details}); extending it would mix rows "
                         "of two runs: use a new --out, or the settings it was captured with")


def open_shard(path: Path, expected_rows: int) -> pa.Table:
    """A shard, memory-mapped (rows are read only when used), checked against its manifest row count."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise StoreError(f"shard {path} is unreadable or corrupted: {err}") from err
    if table.num_rows != expected_rows:
        raise StoreError(f"shard {path} has {table.num_rows} rows, the manifest says {expected_rows}")
    return table


def layer_row_count(manifest: dict, layer: int) -> int:
    return sum(entry["rows"][str(layer)] for entry in manifest["shards"].values())


def read_layer_table(store_dir: str | Path, layer: int, rows: np.ndarray | None = None) -> pa.Table:
    """One layer's listed shards in shard order, or only the sorted global `rows` of them: a sample
    reads just its own rows, so a store far larger than memory can still be sampled."""
    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir)
    if layer not in manifest["layers"]:
        raise StoreError(f"layer {layer} is not in the store at {store_dir} (layers: {manifest['layers']})")
    if not manifest["shards"]:
        raise StoreError(f"the activation store at {store_dir} lists no shards")
    tables, offset = [], 0
    for shard in sorted(manifest["shards"]):
        n_rows = manifest["shards"][shard]["rows"][str(layer)]
        table = open_shard(shard_path(store_dir, layer, shard), n_rows)
        if rows is not None:
            local = rows[(rows >= offset) & (rows < offset + n_rows)] - offset
            table = table.take(pa.array(local))
        tables.append(table)
        offset += n_rows
    return pa.concat_tables(tables)


def damaged_shards(store_dir: str | Path, manifest: dict) -> dict[str, str]:
    """Listed shards whose file is missing, unreadable or of the wrong length, with the reason."""
    damaged = {}
    for shard, entry in sorted(manifest["shards"].items()):
        for layer, n_rows in entry["rows"].items():
            try:
                open_shard(shard_path(Path(store_dir), int(layer), shard), n_rows)
            except StoreError as err:
                damaged[shard] = str(err)
                break
    return damaged


def residual_matrix(table: pa.Table, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The `act` column as a [rows, d_model] array (float32 unless another dtype is asked for)."""
    column = table.column("act").combine_chunks()
    d_model = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, d_model).astype(dtype, copy=False)


def sample_rows(n_rows: int, cap: int | None, seed: int) -> np.ndarray:
    """Seeded random subset of row indices (sorted), as the original's per-layer token cap."""
    if cap is None or cap >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=cap, replace=False))


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


# ----------------------------------------------------------------------------------------------
# Streaming: rows in chunks, drawn through a seeded shuffle buffer, so that training needs memory
# for the buffer only, never for the whole store.

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
    A shard is memory-mapped only while a chunk of it is read."""

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


def shuffled_batches(source: RowSource, batch_size: int, buffer_rows: int, seed: int, epoch: int,
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
