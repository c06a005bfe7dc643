"""The Arrow activation store: one IPC file per (capture shard, layer), a manifest written last.

Layout of a store directory (a run's is <run>/activations, qsae.rundir):
    manifest.json
    layer=<L>/<shard>.arrow
A shard file is written under a temporary name and renamed when complete; it counts only once the
manifest lists it. A rerun skips listed shards, so every rollout is captured exactly once even when
workers die mid-shard (their temporary files are simply overwritten by the retry).

The manifest records a checksum of every file a shard owns (its Arrow files and its rollout part), so
damage that leaves a file readable and of the right length (a region zeroed by the disk or a copy)
is found: a rerun captures such a shard again (damaged_shards), and the trainers and the analysis
refuse the store (verify_store). Each file is read for its checksum once per process (file_checksum).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from qsae.files import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
STORE_FORMAT = 5  # 2: rows carry `special` and `norm`; 3: the manifest records the rollout settings;
# 4: the manifest records every file's checksum; 5: and which response positions it keeps (KeptPositions)
CHECKSUM = "sha256"  # hashlib's name for it; sha256 (SHA-NI) outran blake2b here, 1.4 against 0.9 GB/s
CHECK_THREADS = min(8, os.cpu_count() or 1)  # files checksummed at once (hashlib lets go of the GIL)
HOOK_CONVENTION = ("output of decoder layer L: the residual stream after block L (transformers' hidden_states[L + 1], "
                   "but for the last layer, whose hidden_states entry is final-normed)")
TOKEN_SELECTION = "response tokens: positions n_prompt .. n_prompt + n_response - 1 of prompt+response"


@dataclass(frozen=True)
class KeptPositions:
    """Which response positions of a rollout the store keeps: all of them, or a seeded sample of
    `per_rollout` of them or of a `fraction` of them (rounded up, so a non-empty response keeps one).
    The sample depends only on (seed, rollout id, response length), so a retried shard keeps the same
    positions and a rerun reproduces the store."""

    per_rollout: int | None = None
    fraction: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.per_rollout is not None and self.fraction is not None:
            raise ValueError("keep either a count or a fraction of each rollout's positions, not both")
        if (self.per_rollout is not None and self.per_rollout < 1) or (
                self.fraction is not None and not 0 < self.fraction <= 1):
            raise ValueError(f"a position rule must keep something: per_rollout >= 1 or 0 < fraction <= 1, got {self}")

    @property
    def keeps_all(self) -> bool:
        return self.per_rollout is None and self.fraction is None

    def count(self, n_response: int) -> int:
        """How many of n_response positions are kept."""
        if self.per_rollout is not None:
            return min(self.per_rollout, n_response)
        if self.fraction is not None:
            return min(math.ceil(round(self.fraction * n_response, 9)), n_response)  # round: 0.1 x 30 is 3.0000000000000004
        return n_response

    def choose(self, rollout_id: int, n_response: int) -> np.ndarray:
        """The kept response offsets (0 = the first response token), sorted."""
        if self.keeps_all:
            return np.arange(n_response)
        rng = np.random.default_rng([self.seed, rollout_id])
        return np.sort(rng.choice(n_response, size=self.count(n_response), replace=False))

    def to_json(self) -> dict:
        return {"per_rollout": self.per_rollout, "fraction": self.fraction, "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict | None) -> KeptPositions:
        return cls(**(data or {}))

    def describe(self) -> str:
        if self.per_rollout is not None:
            return f"a seeded sample of {self.per_rollout} response positions per rollout (seed {self.seed})"
        if self.fraction is not None:
            return f"a seeded sample of {self.fraction:g} of each rollout's response positions, rounded up (seed {self.seed})"
        return "every response position"


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


FLOAT16_MAX = float(np.finfo(np.float16).max)  # a Python float: comparing with a float16 scalar would cast to float16


def beyond_float16(residuals: np.ndarray) -> np.ndarray:
    """bool [N]: rows with a value outside float16's range (a model's massive activations on a few
    tokens can reach it); NaN and inf are not counted here (to_store_dtype refuses them)."""
    with np.errstate(invalid="ignore"):
        return (np.abs(np.nan_to_num(residuals, nan=0.0, posinf=0.0, neginf=0.0)) > FLOAT16_MAX).any(axis=1)


def to_store_dtype(residuals: np.ndarray, dtype: str) -> np.ndarray:
    """Cast residuals to the store dtype, refusing NaN/inf and float16 overflow (never store inf)."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"store dtype must be float16 or float32, got {dtype!r}")
    if not np.isfinite(residuals).all():
        raise OverflowError("residuals contain NaN or inf (the model overflowed?); capture with model.dtype float32")
    if dtype == "float32":
        return residuals.astype(np.float32, copy=False)
    peak = float(np.abs(residuals).max(initial=0.0))
    if peak > FLOAT16_MAX:
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


# (algorithm, device, inode, size, mtime, ctime) of a file as it was read -> its digest: a process
# reads a file for its checksum once, however often it asks (a capture rerun, then the analysis).
_CHECKED: dict[tuple, str] = {}
# A file changed less than this before it was read is not remembered: file times are coarse (a clock
# tick, a second on some file systems), so a write just after might leave them as they were.
SETTLED_NS = 2_000_000_000


def _stat_key(algorithm: str, stat: os.stat_result) -> tuple:
    return algorithm, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def file_checksum(path: str | Path, algorithm: str = CHECKSUM) -> str:
    """The hex digest of the file's bytes, read in blocks; remembered for the file as it is (a file
    written since, even to the same length, has another ctime and is read again)."""
    with open(path, "rb") as file:
        stat = os.fstat(file.fileno())
        key = _stat_key(algorithm, stat)
        if (digest := _CHECKED.get(key)) is not None:
            return digest
        started = time.time_ns()
        hasher = hashlib.new(algorithm)
        block = bytearray(1 << 20)
        view = memoryview(block)
        while size := file.readinto(block):
            hasher.update(view[:size])
        digest = hasher.hexdigest()
        settled = started - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS
        if settled and _stat_key(algorithm, os.fstat(file.fileno())) == key:  # and not written while read
            _CHECKED[key] = digest
    return digest


def _checksums(paths: Iterable[Path], algorithm: str) -> dict[Path, str]:
    """file_checksum of each file, on CHECK_THREADS threads; a file that cannot be read is left out."""
    def one(path: Path) -> tuple[Path, str | None]:
        try:
            return path, file_checksum(path, algorithm)
        except OSError:
            return path, None

    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        return {path: digest for path, digest in pool.map(one, paths) if digest is not None}


def _check_file(path: Path, expected: str | None, digests: dict[Path, str], *, algorithm: str, what: str) -> None:
    """Raise a StoreError naming the file if it is missing, has no checksum in the manifest
    (`expected` None), or does not match it (`digests`: _checksums)."""
    if not path.is_file():
        raise StoreError(f"{what} {path} is missing")
    if expected is None:
        raise StoreError(f"the manifest records no {algorithm} checksum of {what} {path}")
    if path not in digests:
        raise StoreError(f"{what} {path} is unreadable")
    if digests[path] != expected:
        raise StoreError(f"{what} {path} does not match the {algorithm} checksum the manifest records for it "
                         "(damaged since capture)")


def shard_checksums(store_dir: Path, shard: str, layers: Iterable[int], rollout_part: Path | None = None) -> dict:
    """What a manifest entry records of a written shard's files (list_shard): {"layers": {layer:
    checksum of its Arrow file}, "rollouts": checksum of its rollout part}."""
    sums: dict = {"layers": {str(layer): file_checksum(shard_path(store_dir, layer, shard)) for layer in layers}}
    if rollout_part is not None:
        sums["rollouts"] = file_checksum(rollout_part)
    return sums


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
                 generated_with: dict | None = None, weights: dict | None = None,
                 kept: KeptPositions = KeptPositions()) -> dict:
    """An empty store's manifest. `generated_with` holds the rollout settings that shape its rows
    (model dtype, engine, prompt settings) and `weights` the model's weight files (models.weights_identity),
    so that a rerun under others, or with weights changed in place, is refused."""
    return {
        "format": STORE_FORMAT,
        "model_id": model_id,
        "model_revision": model_revision,
        "weights": weights or {},
        "generated_with": generated_with or {},
        "layers": list(layers),
        "d_model": d_model,
        "dtype": dtype,
        "hook": HOOK_CONVENTION,
        "token_selection": TOKEN_SELECTION,
        "kept_positions": kept.to_json(),  # KeptPositions: of those, every one or a seeded sample per rollout
        "checksum": CHECKSUM,  # the algorithm of every shard's "checksums"
        # shard name -> {"questions": [uuid, ...], "question_digests": [...], "rollouts": n, "rows": {layer: n},
        #                "checksums": {"rollouts": hex digest, "layers": {layer: hex digest}}}
        "shards": {},
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
        sums = entry.get("checksums")
        if sums is not None and not (isinstance(sums, dict) and isinstance(sums.get("layers"), dict)
                                     and all(isinstance(sums["layers"].get(str(layer)), str) for layer in manifest["layers"])
                                     and isinstance(sums.get("rollouts", ""), str)):
            raise StoreError(f"{path}: shard {name!r} does not list a checksum per layer; capture again into a new --out")


# What makes two runs' rows comparable; a store holds rows of one such run only.
IDENTITY = ("format", "checksum", "model_id", "model_revision", "weights", "generated_with", "layers", "d_model",
            "dtype", "kept_positions")


EXTENDING = "extending it would mix rows of two runs: use a new --out, or the settings it was captured with"


def check_compatible(manifest: dict, this_run: dict, refusal: str = EXTENDING) -> None:
    """A rerun may extend a store only with rows made the same way (this_run: its new_manifest); other
    uses of the store say why in `refusal`."""
    clashes = [key for key in IDENTITY if manifest.get(key) != this_run[key]]
    if clashes:
        details = ", ".join(weights_change(manifest.get(key), this_run[key]) if key == "weights" else
                            f"{key}: store has {manifest.get(key)!r}, run wants {this_run[key]!r}" for key in clashes)
        raise StoreError(f"the activation store was captured differently ({details}); {refusal}")


def weights_change(stored, now: dict) -> str:
    """Which weight files differ between the store's record and the model's now (size, time or name)."""
    stored = stored if isinstance(stored, dict) else {}
    changed = sorted(name for name in set(stored) | set(now) if stored.get(name) != now.get(name))
    return f"weights: {', '.join(changed)} changed since the store was captured (size or modification time)"


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


def damaged_shards(store_dir: str | Path, manifest: dict,
                   rollout_part: Callable[[str], Path] | None = None) -> dict[str, str]:
    """Listed shards with a file missing, unreadable, of the wrong length or not matching its
    checksum, with the reason: their Arrow files, and their rollout parts where `rollout_part` says
    where a shard's part is (a shard's rollouts and rows are captured together, so either damaged
    makes the shard damaged). Reads every file once."""
    store_dir = Path(store_dir)
    algorithm = manifest.get("checksum", CHECKSUM)
    files = {shard: [(shard_path(store_dir, int(layer), shard), "shard", n_rows,
                      entry.get("checksums", {}).get("layers", {}).get(layer))
                     for layer, n_rows in entry["rows"].items()]
             for shard, entry in manifest["shards"].items()}
    if rollout_part is not None:
        for shard, entry in manifest["shards"].items():
            files[shard].insert(0, (rollout_part(shard), "rollout part", None, entry.get("checksums", {}).get("rollouts")))
    digests = _checksums([path for listed in files.values() for path, _, _, expected in listed if expected], algorithm)
    damaged = {}
    for shard in sorted(files):
        try:
            for path, what, n_rows, expected in files[shard]:
                _check_file(path, expected, digests, algorithm=algorithm, what=what)
                if n_rows is not None:
                    open_shard(path, n_rows)
        except StoreError as err:
            damaged[shard] = str(err)
    return damaged


def verify_store(store_dir: str | Path, layers: Iterable[int] | None = None) -> dict:
    """Refuse a store whose Arrow files (of `layers`, default all) are missing or do not match the
    checksums its manifest records, naming the first such shard; returns the manifest. The trainers
    (`qsae train`) and the analysis call it once, before they read rows: their reads then trust the
    files, and a process that checked a file already (a capture rerun) does not read it again."""
    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir)
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"the activation store at {store_dir} is of format {manifest.get('format')!r}, this qsae "
                         f"reads format {STORE_FORMAT} (whose manifest records every file's checksum); "
                         "capture again into a new --out")
    algorithm = manifest.get("checksum", CHECKSUM)
    layers = manifest["layers"] if layers is None else list(layers)
    files = [(shard_path(store_dir, layer, shard), entry.get("checksums", {}).get("layers", {}).get(str(layer)))
             for shard, entry in sorted(manifest["shards"].items()) for layer in layers]
    digests = _checksums([path for path, expected in files if expected], algorithm)
    for path, expected in files:
        try:
            _check_file(path, expected, digests, algorithm=algorithm, what="shard")
        except StoreError as err:
            raise StoreError(f"{err}; rerun capture with the same --out to capture it again") from None
    return manifest


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
