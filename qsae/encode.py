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
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qsae.analysis.feature_data import (
    RESERVOIR,
    Entries,
    FeatureStream,
    RowLookup,
    SampleCodes,
    TokenTable,
    build_examples,
)
from qsae.analysis.rollout_stats import RolloutPool, pool_by_rollout
from qsae.rollout import Rollout
from qsae.sae import TopKSAE

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
