"""The Arrow activation store: one IPC file per (capture shard, layer), a manifest written last.

Layout of a store directory (a run's is <run>/activations, qsae.rundir):
    manifest.json
    layer=<L>/<shard>.arrow
A shard file is written under a temporary name and renamed when complete; it counts only once the
manifest lists it. A rerun skips listed shards, so every rollout is captured exactly once even when
workers die mid-shard (their temporary files are simply overwritten by the retry).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
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


@dataclass
class ShardRows:
    """One layer's rows of one capture shard, one entry per response token."""

    rollout_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    correct: np.ndarray
    residuals: np.ndarray  # [rows, d_model]
    special: np.ndarray | None = None  # special and chat-template tokens (None: none of them is)


def write_shard(store_dir: Path, layer: int, shard: str, rows: ShardRows, *, dtype: str) -> int:
    """Write one layer's rows of one capture shard; returns the row count."""
    residuals = rows.residuals
    n_rows, d_model = residuals.shape
    special = np.zeros(n_rows, dtype=bool) if rows.special is None else rows.special
    values = to_store_dtype(residuals, dtype)
    norm = np.linalg.norm(residuals.astype(np.float64), axis=1).astype(np.float32)
    table = pa.table(
        [
            pa.array(rows.rollout_id, pa.int64()),
            pa.array(rows.position, pa.int32()),
            pa.array(rows.token_id, pa.int32()),
            pa.array(rows.correct, pa.bool_()),
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


def new_manifest(model_id: str, model_revision: str | None, layers: list[int], d_model: int, *, dtype: str,
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
