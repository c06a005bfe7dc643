"""The Arrow activation store: one IPC file per (capture shard, layer), a manifest written last.

Layout (see DESIGN.md):
    <run>/activations/manifest.json
    <run>/activations/layer=<L>/<shard>.arrow
A shard file is written under a temporary name and renamed when complete; it counts only once the
manifest lists it. A rerun skips listed shards, so every rollout is captured exactly once even when
workers die mid-shard (their temporary files are simply overwritten by the retry).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from qsae.files import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
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
    """Bytes of one stored row: the residual plus rollout_id, position, token_id and correct."""
    return d_model * (2 if dtype == "float16" else 4) + 8 + 4 + 4 + 1


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
) -> int:
    """Write one layer's rows of one capture shard; returns the row count."""
    n_rows, d_model = residuals.shape
    values = to_store_dtype(residuals, dtype).reshape(-1)
    table = pa.table(
        [
            pa.array(rollout_id, pa.int64()),
            pa.array(position, pa.int32()),
            pa.array(token_id, pa.int32()),
            pa.array(correct, pa.bool_()),
            pa.FixedSizeListArray.from_arrays(pa.array(values), d_model),
        ],
        schema=shard_schema(d_model, dtype),
    )

    def write(tmp: str) -> None:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=65536)

    atomic_write(shard_path(store_dir, layer, shard), write)
    return n_rows


def new_manifest(model_id: str, model_revision: str | None, layers: list[int], d_model: int, dtype: str) -> dict:
    return {
        "model_id": model_id,
        "model_revision": model_revision,
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
    return json.loads(path.read_text())


def check_compatible(manifest: dict, model_id: str, layers: list[int], d_model: int, dtype: str) -> None:
    """A rerun must extend the same store, not mix models, layers or dtypes."""
    wanted = {"model_id": model_id, "layers": list(layers), "d_model": d_model, "dtype": dtype}
    clashes = {key: (manifest.get(key), value) for key, value in wanted.items() if manifest.get(key) != value}
    if clashes:
        details = ", ".join(f"{key}: store has {have!r}, run wants {want!r}" for key, (have, want) in clashes.items())
        raise StoreError(f"existing activation store does not match this run ({details}); use a new --out")


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


def residual_matrix(table: pa.Table) -> np.ndarray:
    """The `act` column as a [rows, d_model] float32 array."""
    column = table.column("act").combine_chunks()
    d_model = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, d_model).astype(np.float32, copy=False)


def sample_rows(n_rows: int, cap: int | None, seed: int) -> np.ndarray:
    """Seeded random subset of row indices (sorted), as the original's per-layer token cap."""
    if cap is None or cap >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=cap, replace=False))


def load_residuals(path: str | Path, layer: int | None = None) -> np.ndarray:
    """Residual rows from a store directory (needs `layer`) or a 2-D .npy file (memory-mapped)."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.exists():
            raise FileNotFoundError(f"activation file not found: {path}")
        residuals = np.load(path, mmap_mode="r")
        if residuals.ndim != 2 or not np.issubdtype(residuals.dtype, np.floating):
            raise StoreError(f"{path} must hold a 2-D float array (rows = tokens), got {residuals.dtype} {residuals.shape}")
        return residuals
    if not path.is_dir():
        raise FileNotFoundError(f"activation store not found: {path} (expected a store directory or a .npy file)")
    store_dir = path / "activations" if (path / "activations" / MANIFEST).exists() else path
    if layer is None:
        raise StoreError(f"{store_dir} is a store: say which layer to read ({read_manifest(store_dir)['layers']})")
    return residual_matrix(read_layer_table(store_dir, layer))
