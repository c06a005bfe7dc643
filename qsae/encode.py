"""Encode pass: every response token of every rollout through the trained SAEs.

A bounded store (capture.keep_per_rollout) keeps a sample of each response's positions, but the
rollout-level pools and the feature data are about whole responses. This pass replays each rollout
as capture does (prompt + response teacher-forced, no generation) and encodes every response token
that the statistics use (not special or chat-template tokens, not above a layer's norm limit, when
the run leaves those out), keeping per layer:

- RolloutPool: per rollout, each feature's max, mean and firing fraction over those tokens;
- a FeatureStream over them whose rows are token keys (rollout id << 32 | position): top
  activations, a reservoir for the quantile samples, exact log-binned counts;
- for every entry the stream keeps, the feature's activations over the window of `width` tokens
  either side (its rollout's codes are all at hand here, and nowhere later).

Each piece merges exactly (merge_encodings): a rollout lies in one shard, so pools concatenate, the
streams merge (FeatureStream.merge), and every globally kept entry was kept by its own shard, so its
window is there. Memory is the pools' R x n plus the streams' bounded state.

As a stage (the capture shards, through capture's replica pool: qsae.distributed.encode_pool) each
shard's encoding is written per layer (encoded/layer=<L>/<shard>.safetensors) and only then listed in
encoded/manifest.json, under the identity of the SAEs and settings it was made with: a rerun encodes
only the shards not listed, and starts over when the SAEs or settings changed.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from qsae.analysis.feature_data import (
    RESERVOIR,
    Entries,
    Examples,
    FeatureStream,
    LayerFeatures,
    RowLookup,
    SampleCodes,
    TokenTable,
    build_examples,
    features_of_stream,
)
from qsae.analysis.rollout_stats import RolloutPool, pool_by_rollout
from qsae.config import ReleaseConfig
from qsae.files import atomic_write, atomic_write_json
from qsae.rollout import Rollout, read_rollouts
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sample import load_split
from qsae.store import StoreError, file_checksum, read_manifest

POSITION_BITS = 32  # token key = rollout id << 32 | position

ResidualFn = Callable[[list[list[int]], list[int], list[int]], dict[int, list[np.ndarray]]]


def token_keys(rollout_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    return (np.asarray(rollout_id, dtype=np.int64) << POSITION_BITS) | np.asarray(position, dtype=np.int64)


def key_rollout(key: np.ndarray) -> np.ndarray:
    return np.asarray(key, dtype=np.int64) >> POSITION_BITS


def key_position(key: np.ndarray) -> np.ndarray:
    return np.asarray(key, dtype=np.int64) & ((1 << POSITION_BITS) - 1)


@dataclass(frozen=True)
class EncodeSettings:
    """What the pass keeps and which tokens it leaves out (as the run's row rules do)."""

    top: int  # top activations kept per feature
    width: int  # window tokens either side of an example
    seed: int  # the reservoir's keys
    special_ids: frozenset[int] = frozenset()  # token ids left out (empty: none)
    norm_limits: dict[int, float] | None = None  # layer -> residual norm above which a token is left out
    reservoir: int = RESERVOIR
    store_dtype: str = "float32"  # rows are rounded to it first, as training and the store saw them

    def to_json(self) -> dict:
        data = asdict(self)
        data["special_ids"] = sorted(self.special_ids)
        data["norm_limits"] = None if self.norm_limits is None else {str(k): v for k, v in self.norm_limits.items()}
        return data


@dataclass
class LayerEncoding:
    """One layer's every-token results over a set of rollouts."""

    pool: RolloutPool  # rollouts with at least one encoded token, by id
    stream: FeatureStream
    window_feature: np.ndarray  # [E] the kept entries whose windows are below
    window_row: np.ndarray  # [E] their token keys
    window_acts: np.ndarray  # [E, 2 width + 1] float32 the feature's activation at each window token

    def windows(self, feature: np.ndarray, row: np.ndarray) -> np.ndarray:
        """The window activations of entries (feature, token key) the stream keeps."""
        at = pair_index(self.window_feature, self.window_row, feature, row)
        if (at < 0).any():
            raise KeyError(f"{int((at < 0).sum())} entries have no window: not kept by this encoding")
        return self.window_acts[at]


def pair_index(table_a: np.ndarray, table_b: np.ndarray, query_a: np.ndarray, query_b: np.ndarray) -> np.ndarray:
    """Where each (query_a, query_b) pair sits among the distinct (table_a, table_b) pairs, -1 if absent
    (a token key takes all 64 bits, so the pair cannot be packed into one integer)."""
    pairs = np.stack([np.concatenate([table_a, query_a]), np.concatenate([table_b, query_b])]).astype(np.int64)
    _, inverse = np.unique(pairs, axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    where = np.full(inverse.max(initial=-1) + 1, -1, dtype=np.int64)
    where[inverse[:len(table_a)]] = np.arange(len(table_a))
    return where[inverse[len(table_a):]]


def kept_tokens(rollout: Rollout, residuals: dict[int, np.ndarray], settings: EncodeSettings) -> np.ndarray:
    """bool [response tokens]: the tokens the statistics use (every layer keeps the same ones)."""
    keep = ~np.isin(np.asarray(rollout.response_token_ids, dtype=np.int64), list(settings.special_ids))
    for layer, limit in (settings.norm_limits or {}).items():
        keep &= np.linalg.norm(residuals[layer], axis=1) <= limit
    return keep


@torch.no_grad()
def encode_rollouts(residuals_of: ResidualFn, saes: dict[int, TopKSAE], rollouts: list[Rollout],
                    settings: EncodeSettings) -> dict[int, LayerEncoding]:
    """Replay `rollouts` (residuals_of: capture's teacher-forced pass) and encode every kept response
    token with each layer's SAE, on the SAE's device."""
    layers = sorted(saes)
    rows = residuals_of([r.prompt_token_ids + r.response_token_ids for r in rollouts],
                        [r.n_prompt_tokens for r in rollouts], layers)
    keep = [kept_tokens(r, {layer: rows[layer][i] for layer in layers}, settings) for i, r in enumerate(rollouts)]
    rollout_id = np.concatenate([np.full(int(k.sum()), r.rollout_id, np.int64) for r, k in zip(rollouts, keep)]
                                + [np.zeros(0, np.int64)])
    position = np.concatenate([r.n_prompt_tokens + np.flatnonzero(k) for r, k in zip(rollouts, keep)]
                              + [np.zeros(0, np.int64)])
    tokens = TokenTable({r.rollout_id: r.prompt_token_ids + r.response_token_ids for r in rollouts})
    out = {}
    for layer in layers:
        sae = saes[layer]
        x = np.concatenate([rows[layer][i][k] for i, k in enumerate(keep)] + [np.zeros((0, sae.d_in), np.float32)])
        x = x.astype(settings.store_dtype).astype(np.float32, copy=False)
        device = sae.W_enc.device
        values, indices = sae.encode_topk(torch.from_numpy(x).to(device=device, dtype=sae.W_enc.dtype))
        codes = SampleCodes(values.float().cpu().numpy(), indices.cpu().numpy().astype(np.int32), rollout_id, position)
        out[layer] = layer_encoding(codes, tokens, sae.n_features, settings)
    return out


def layer_encoding(codes: SampleCodes, tokens: TokenTable, n_features: int, settings: EncodeSettings) -> LayerEncoding:
    """Pools, stream and windows of one layer's codes of whole rollouts."""
    stream = FeatureStream(n_features, settings.top, settings.reservoir, seed=settings.seed)
    stream.add(codes.values, codes.indices, token_keys(codes.rollout_id, codes.position))
    kept = kept_entries(stream)
    local_row = RowLookup(codes.rollout_id, codes.position)(key_rollout(kept.row), key_position(kept.row))
    examples = build_examples(kept.feature, local_row, np.zeros(len(kept.row), np.int64), codes=codes,
                              tokens=tokens, width=settings.width)
    return LayerEncoding(pool_by_rollout(codes.values, codes.indices, codes.rollout_id, n_features), stream,
                         kept.feature, kept.row, examples.acts)


def encoded_features(W_dec: torch.Tensor, encoding: LayerEncoding, tokens: TokenTable, *, per_bin: int,
                     width: int) -> LayerFeatures:
    """The feature data of every encoded token: the stream's top rows and quantile samples, their
    windows as the encode pass kept them (`width` must be the pass's)."""
    def examples_of(feature: np.ndarray, row: np.ndarray, group: np.ndarray) -> Examples:
        rollout_id, position = key_rollout(row), key_position(row)
        _, token_ids = tokens.window(rollout_id, position, width)
        return Examples(feature, row, group, rollout_id, position, token_ids, encoding.windows(feature, row))

    return features_of_stream(W_dec, encoding.stream, per_bin, examples_of)


def kept_entries(stream: FeatureStream) -> Entries:
    """The distinct (feature, row) entries of the stream's top rows and reservoir."""
    both = Entries(*(np.concatenate([a, b]) for a, b in zip(stream.top.astuple(), stream.sample.astuple())))
    _, first = np.unique(np.stack([both.feature, both.row]), axis=1, return_index=True)
    return both.select(np.sort(first))


def merge_encodings(parts: list[LayerEncoding]) -> LayerEncoding:
    """One layer's encodings of disjoint sets of rollouts as one: exactly the encoding of them all."""
    first = parts[0]
    stream = FeatureStream(first.stream.n_features, first.stream.top_limit, first.stream.reservoir_limit,
                           seed=first.stream.seed)
    for part in parts:
        stream.merge(part.stream)
    pools = [part.pool for part in parts]
    ids = np.concatenate([p.rollout_ids for p in pools])
    order = np.argsort(ids, kind="stable")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("a rollout appears in two encodings: they must cover disjoint rollouts")
    pool = RolloutPool(rollout_ids=ids[order], **{name: np.concatenate([getattr(p, name) for p in pools])[order]
                                                 for name in ("max", "mean", "fire_fraction", "n_tokens")})
    kept = kept_entries(stream)
    width = first.window_acts.shape[1]
    all_feature = np.concatenate([p.window_feature for p in parts])
    all_row = np.concatenate([p.window_row for p in parts])
    all_acts = np.concatenate([p.window_acts for p in parts]).reshape(-1, width)
    at = pair_index(all_feature, all_row, kept.feature, kept.row)
    return LayerEncoding(pool, stream, kept.feature, kept.row, all_acts[at])


# ------------------------------------------------------------------------------------------------
# The stage: per-shard files, their listing, and the merge


ENCODED_FORMAT = 1
POOL_FIELDS = ("rollout_ids", "n_tokens", "max", "mean", "fire_fraction")
ENTRY_FIELDS = ("feature", "row", "activation", "key")


@dataclass(frozen=True)
class StoredShard:
    """A shard of the store, named as in its manifest: the encode pass's unit of work."""

    name: str


def save_encoding(path: Path, encoding: LayerEncoding) -> None:
    """One layer's encoding of a shard as a safetensors file (no pickle), written atomically."""
    stream = encoding.stream
    counts = stream.counts.reshape(-1)
    used = np.flatnonzero(counts)
    arrays = {**{f"pool.{name}": np.ascontiguousarray(getattr(encoding.pool, name)) for name in POOL_FIELDS},
              **{f"top.{name}": getattr(stream.top, name) for name in ENTRY_FIELDS},
              **{f"sample.{name}": getattr(stream.sample, name) for name in ENTRY_FIELDS},
              "counts.at": used.astype(np.int64), "counts.n": counts[used],
              "fire_count": stream.fire_count, "activation_sum": stream.activation_sum,
              "max_activation": stream.max_activation, "window.feature": encoding.window_feature,
              "window.row": encoding.window_row, "window.acts": encoding.window_acts}
    meta = {"format": ENCODED_FORMAT, "n_features": stream.n_features, "top": stream.top_limit,
            "reservoir": stream.reservoir_limit, "seed": stream.seed, "rows": stream.rows}
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp,
                                             metadata={"encoding": json.dumps(meta)}))


def load_encoding(path: Path) -> LayerEncoding:
    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()["encoding"])
        arrays = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") != ENCODED_FORMAT:
        raise StoreError(f"{path} is not an encoding this qsae writes (format {meta.get('format')})")
    stream = FeatureStream(meta["n_features"], meta["top"], meta["reservoir"], seed=meta["seed"])
    stream.rows = meta["rows"]
    stream.counts.reshape(-1)[arrays["counts.at"]] = arrays["counts.n"]
    stream.fire_count, stream.activation_sum = arrays["fire_count"], arrays["activation_sum"]
    stream.max_activation = arrays["max_activation"]
    stream.top = Entries(*(arrays[f"top.{name}"] for name in ENTRY_FIELDS))
    stream.sample = Entries(*(arrays[f"sample.{name}"] for name in ENTRY_FIELDS))
    pool = RolloutPool(**{name: arrays[f"pool.{name}"] for name in POOL_FIELDS})
    return LayerEncoding(pool, stream, arrays["window.feature"], arrays["window.row"], arrays["window.acts"])


def encode_shard(residuals_of: ResidualFn, saes: dict[int, TopKSAE], shard: StoredShard, run: RunDir,
                 settings: EncodeSettings) -> dict:
    """Encode one store shard's rollouts and write each layer's file; the caller lists the shard (its
    files' checksums in the result) only once this returns."""
    rollouts = read_rollouts(run.rollout_part(shard.name))
    encodings = encode_rollouts(residuals_of, saes, rollouts, settings)
    checksums = {}
    for layer, encoding in encodings.items():
        path = run.encoded_part(layer, shard.name)
        save_encoding(path, encoding)
        checksums[str(layer)] = file_checksum(path)
    return {"shard": shard.name, "checksums": checksums,
            "tokens": int(sum(e.stream.rows for e in encodings.values()) // max(len(encodings), 1))}


def encode_settings(run: RunDir, release: ReleaseConfig, special_ids: set[int]) -> EncodeSettings:
    """The pass's settings: the release's context sizes, and the row rules of the run's saved split (the
    same special tokens and norm limits the sample was drawn under)."""
    split = load_split(run)
    rules = split.rules
    thresholds = split.rows.get("norm_threshold") or {}
    limits = ({int(layer): float(t) for layer, t in thresholds.items() if t is not None}
              if rules.max_norm_multiple else None)
    return EncodeSettings(top=release.top_contexts, width=release.context_tokens, seed=rules.seed,
                          special_ids=frozenset(special_ids) if rules.exclude_special else frozenset(),
                          norm_limits=limits, store_dtype=read_manifest(run.store)["dtype"])


def encoding_identity(run: RunDir, layers: list[int], settings: EncodeSettings) -> dict:
    """What a listed shard's files were made from: each layer's SAE file and the settings."""
    saes = {}
    for layer in layers:
        record = json.loads((run.trained(layer) / "trained.json").read_text())
        saes[str(layer)] = file_checksum(run.trained(layer) / record["weights"])
    return {"format": ENCODED_FORMAT, "saes": saes, "settings": settings.to_json()}


def shards_to_encode(run: RunDir, layers: list[int], settings: EncodeSettings) -> tuple[dict, list[StoredShard]]:
    """(the encoded manifest to extend, the store's shards not in it). A manifest of other SAEs or
    settings is dropped with its files: those encodings describe other SAEs."""
    identity = encoding_identity(run, layers, settings)
    manifest = read_encoded_manifest(run)
    if manifest is None or manifest["identity"] != identity:
        shutil.rmtree(run.encoded, ignore_errors=True)
        manifest = {"identity": identity, "shards": {}}
    stored = sorted(read_manifest(run.store)["shards"])
    return manifest, [StoredShard(name) for name in stored if name not in manifest["shards"]]


def read_encoded_manifest(run: RunDir) -> dict | None:
    try:
        manifest = json.loads(run.encoded_manifest.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and {"identity", "shards"} <= set(manifest) else None


def list_encoded(run: RunDir, manifest: dict, result: dict) -> None:
    manifest["shards"][result["shard"]] = {"checksums": result["checksums"]}
    atomic_write_json(run.encoded_manifest, manifest)


def encoded_layer(run: RunDir, layer: int, identity: dict) -> LayerEncoding | None:
    """The layer's encoding of every store shard, merged, shard by shard into bounded memory; None when
    the encode pass has not covered every shard with these SAEs and settings."""
    manifest = read_encoded_manifest(run)
    stored = sorted(read_manifest(run.store)["shards"])
    if manifest is None or manifest["identity"] != identity or sorted(manifest["shards"]) != stored:
        return None
    merged = None
    for shard in stored:
        path = run.encoded_part(layer, shard)
        if file_checksum(path) != manifest["shards"][shard]["checksums"][str(layer)]:
            raise StoreError(f"{path} does not match the checksum encoded/manifest.json lists; remove "
                             f"{run.encoded} and run again to encode afresh")
        part = load_encoding(path)
        merged = part if merged is None else merge_encodings([merged, part])
    return merged
