"""What each live feature of a layer looks like, for the feature browser and the Neuronpedia export:
top-activating contexts, samples from the quantiles of its activations, an activation histogram,
and the tokens its decoder direction promotes and suppresses.

`FeatureStream` takes a layer's top-k codes one chunk of rows at a time and keeps, per feature, only
its `top` strongest rows, a uniform sample of `reservoir` of its firing rows (the rows with the
smallest of a random key drawn per firing: a bottom-k sample, which merges chunk by chunk), and
exact counts in fixed log-spaced activation bins. Its state is n_features x (top + reservoir)
entries and n_features x LOG_BINS counts, however many rows stream through.

A firing's random key is a hash of (seed, feature, row), not a draw from a generator, so streams over
disjoint rows merge (FeatureStream.merge) into exactly the stream over all of them, in any order:
the encode pass streams each shard of rollouts on its own, with token keys as rows.

The quantile samples come from the reservoir: its activations split at their 20/40/60/80%
quantiles (QUANTILE_BINS), and the first `per_bin` of each bin by random key, i.e. a uniform
sample of the bin. An example's window is `width` tokens either side of its row's token in the
rollout's text; a window token's activation is the feature's at that token where the token is a
sampled row, else 0 (tokens outside the sample were not encoded).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from qsae.analysis.features import firing_entries, nearest_decoder_directions
from qsae.capture import text_model

LOG_BIN_WIDTH = 0.05  # decades per fine histogram bin
LOG_LOW, LOG_HIGH = -8.0, 8.0  # activations outside 1e-8 .. 1e8 are counted in the end bins
LOG_BINS = round((LOG_HIGH - LOG_LOW) / LOG_BIN_WIDTH)
HISTOGRAM_BARS = 40  # at most, per feature: adjacent fine bins merged over the feature's range
QUANTILE_BINS = 5
RESERVOIR = 200  # firing rows sampled per feature for the quantile bins
LOGIT_TOKENS = 10  # promoted and suppressed tokens per feature
LOGIT_HISTOGRAM_BINS = 50  # bins of a feature's logits over the vocabulary (SAEDashboard's)
SIMILAR_FEATURES = 5


def firing_keys(seed: int, feature: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) key per firing that depends on (seed, feature, row) alone (splitmix64's mixer)."""
    with np.errstate(over="ignore"):
        x = (np.asarray(row, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.asarray(feature, dtype=np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64(seed % 2**64) * np.uint64(0x165667B19E3779F9))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def keep_best(feature: np.ndarray, score: np.ndarray, row: np.ndarray, limit: int) -> np.ndarray:
    """Positions of the entries that are among the `limit` largest scores of their feature (ties to
    the smaller row), grouped by feature ascending, each group by score descending."""
    order = np.lexsort((row, -score, feature))
    grouped = feature[order]
    rank = np.arange(len(grouped)) - np.searchsorted(grouped, grouped, side="left")
    return order[rank < limit]


@dataclass
class Entries:
    """Firing entries (feature, row, activation, key), a feature's together."""

    feature: np.ndarray
    row: np.ndarray
    activation: np.ndarray
    key: np.ndarray

    @classmethod
    def empty(cls) -> Entries:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0))

    def merged(self, other: Entries, score: Callable[[Entries], np.ndarray], limit: int, n_features: int) -> Entries:
        """The `limit` best-scoring entries per feature of self (a keep_best result) and other (later
        rows, or any other rows). Where a feature already has `limit`, only other's entries that reach
        its worst kept score can enter (a tie goes to the smaller row, wherever it came from), so after
        the first chunks the sort is of what is kept plus a few newcomers."""
        counts = np.bincount(self.feature, minlength=n_features)
        full = counts >= limit
        worst = np.full(n_features, -np.inf)
        worst[full] = score(self)[(np.cumsum(counts) - 1)[full]]
        other = other.select(score(other) >= worst[other.feature])
        both = Entries(*(np.concatenate([a, b]) for a, b in zip(self.astuple(), other.astuple())))
        return both.select(keep_best(both.feature, score(both), both.row, limit))

    def select(self, which: np.ndarray) -> Entries:
        return Entries(*(a[which] for a in self.astuple()))

    def astuple(self) -> tuple[np.ndarray, ...]:
        return self.feature, self.row, self.activation, self.key

    @functools.cached_property
    def bounds(self) -> list[int]:
        """Where each feature's entries start, up to the largest feature's end (entries are never
        changed in place: select and merged build new ones)."""
        return np.searchsorted(self.feature, np.arange(self.feature.max(initial=-1) + 2)).tolist()

    def of(self, feature: int) -> slice:
        """This feature's entries (the arrays are grouped by feature ascending)."""
        if feature + 1 >= len(self.bounds):
            return slice(len(self.feature), len(self.feature))
        return slice(self.bounds[feature], self.bounds[feature + 1])


def by_activation(entries: Entries) -> np.ndarray:
    return entries.activation


def by_key(entries: Entries) -> np.ndarray:
    return -entries.key  # the smallest keys are kept: a bottom-k sample


class FeatureStream:
    """Per-feature top rows, reservoir sample, fire counts and log-binned activation counts over a
    stream of top-k code chunks (module docstring)."""

    def __init__(self, n_features: int, top: int, reservoir: int = RESERVOIR, seed: int = 0):
        if top < 1 or reservoir < 1:
            raise ValueError(f"top and reservoir must be >= 1, got {top} and {reservoir}")
        self.n_features, self.top_limit, self.reservoir_limit = n_features, top, reservoir
        self.top, self.sample = Entries.empty(), Entries.empty()
        self.counts = np.zeros((n_features, LOG_BINS), dtype=np.int64)
        self.fire_count = np.zeros(n_features, dtype=np.int64)
        self.activation_sum = np.zeros(n_features)
        self.max_activation = np.zeros(n_features, dtype=np.float32)
        self.rows = 0
        self.seed = seed

    def add(self, values: np.ndarray, indices: np.ndarray, row_ids: np.ndarray | None = None) -> None:
        """The next chunk of codes, values [c, k] and indices [c, k]; its rows are `row_ids` [c] (unique
        over the stream), else numbered on from the last chunk's."""
        rows, features, activations = firing_entries(indices, values, self.n_features)
        rows = rows + self.rows if row_ids is None else np.asarray(row_ids, dtype=np.int64)[rows]
        self.rows += len(values)
        fine = np.clip(((np.log10(np.maximum(activations, 1e-30)) - LOG_LOW) / LOG_BIN_WIDTH).astype(np.int64),
                       0, LOG_BINS - 1)
        self.counts += np.bincount(features * LOG_BINS + fine,
                                   minlength=self.n_features * LOG_BINS).reshape(self.counts.shape)
        self.fire_count += np.bincount(features, minlength=self.n_features)
        self.activation_sum += np.bincount(features, weights=activations, minlength=self.n_features)
        np.maximum.at(self.max_activation, features, activations)
        new = Entries(features, rows, activations.astype(np.float32), firing_keys(self.seed, features, rows))
        self.top = self.top.merged(new, by_activation, self.top_limit, self.n_features)
        self.sample = self.sample.merged(new, by_key, self.reservoir_limit, self.n_features)

    def merge(self, other: FeatureStream) -> None:
        """Take in a stream over other rows (same features, limits and seed): the result is the stream
        over both sets of rows, exactly (the activation sums up to float64 rounding)."""
        if (other.n_features, other.top_limit, other.reservoir_limit, other.seed) != \
                (self.n_features, self.top_limit, self.reservoir_limit, self.seed):
            raise ValueError("only streams of the same features, limits and seed merge")
        self.counts += other.counts
        self.fire_count += other.fire_count
        self.activation_sum += other.activation_sum
        np.maximum(self.max_activation, other.max_activation, out=self.max_activation)
        self.rows += other.rows
        self.top = self.top.merged(other.top, by_activation, self.top_limit, self.n_features)
        self.sample = self.sample.merged(other.sample, by_key, self.reservoir_limit, self.n_features)

    def histogram(self, feature: int) -> dict:
        """The feature's activation counts over its own range: fine bins merged into at most
        HISTOGRAM_BARS bars; edges are activations (log-spaced)."""
        counts = self.counts[feature]
        used = np.nonzero(counts)[0]
        if len(used) == 0:
            return {"edges": [], "counts": []}
        lo, hi = int(used[0]), int(used[-1]) + 1
        merge = -(-(hi - lo) // HISTOGRAM_BARS)
        hi = lo + merge * -(-(hi - lo) // merge)
        padded = np.zeros(hi - lo, dtype=np.int64)
        padded[: min(hi, LOG_BINS) - lo] = counts[lo:min(hi, LOG_BINS)]
        edges = 10 ** (LOG_LOW + LOG_BIN_WIDTH * np.arange(lo, hi + 1, merge))
        return {"edges": [float(f"{e:.4g}") for e in edges], "counts": padded.reshape(-1, merge).sum(axis=1).tolist()}

    def quantile_samples(self, feature: int, per_bin: int) -> list[dict]:
        """QUANTILE_BINS bins of the feature's sampled activations, split at their quantiles, each with
        the rows of up to per_bin of them (uniform within the bin): [{"label", "low", "high", "rows"}]."""
        part = self.sample.of(feature)
        activation, row, key = self.sample.activation[part], self.sample.row[part], self.sample.key[part]
        if len(activation) == 0:
            return []
        cuts = np.quantile(activation, np.linspace(0, 1, QUANTILE_BINS + 1))
        which = np.clip(np.searchsorted(cuts, activation, side="right") - 1, 0, QUANTILE_BINS - 1)
        bins = []
        for b in range(QUANTILE_BINS):
            members = np.nonzero(which == b)[0]
            members = members[np.argsort(key[members], kind="stable")][:per_bin]
            step = 100 // QUANTILE_BINS
            bins.append({"label": f"{b * step}-{(b + 1) * step}%", "low": float(cuts[b]), "high": float(cuts[b + 1]),
                         "rows": row[members[np.argsort(-activation[members], kind="stable")]].tolist()})
        return bins


def stream_codes(values: np.ndarray, indices: np.ndarray, n_features: int, *, top: int, seed: int,
                 chunk_rows: int = 65536) -> FeatureStream:
    """A FeatureStream over codes already in memory, a chunk of rows at a time (each chunk's merge
    sorts the kept entries again, so larger chunks sort less in all)."""
    stream = FeatureStream(n_features, top, seed=seed)
    for first in range(0, len(values), chunk_rows):
        stream.add(values[first:first + chunk_rows], indices[first:first + chunk_rows])
    return stream


# ------------------------------------------------------------------------------------------------
# Examples: the token windows around chosen rows


class TokenTable:
    """Every rollout's token ids (prompt + response) in one flat array, addressed by rollout id."""

    def __init__(self, token_ids: dict[int, list[int]]):
        ids = sorted(token_ids)
        self.rollout_ids = np.array(ids, dtype=np.int64)
        lengths = np.array([len(token_ids[r]) for r in ids], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.length = lengths
        self.flat = np.array([t for r in ids for t in token_ids[r]], dtype=np.int64)

    def window(self, rollout_id: np.ndarray, position: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Token positions [E, 2 width + 1] around each (rollout, position) and their ids, -1 outside
        the rollout's text."""
        which = np.searchsorted(self.rollout_ids, rollout_id)
        positions = position[:, None] + np.arange(-width, width + 1)
        inside = (positions >= 0) & (positions < self.length[which][:, None])
        ids = np.where(inside, self.flat[np.where(inside, self.start[which][:, None] + positions, 0)], -1)
        return positions, ids


class RowLookup:
    """Sample row of a (rollout, position), or -1 where that token is not in the sample."""

    def __init__(self, rollout_id: np.ndarray, position: np.ndarray):
        keys = self._keys(rollout_id, position)
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]

    @staticmethod
    def _keys(rollout_id, position) -> np.ndarray:
        return np.asarray(rollout_id, dtype=np.int64) * (1 << 32) + np.asarray(position, dtype=np.int64)

    def __call__(self, rollout_id: np.ndarray, position: np.ndarray) -> np.ndarray:
        keys = self._keys(rollout_id, position)
        at = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        return np.where(self.sorted[at] == keys, self.order[at], -1)


@dataclass
class Examples:
    """Chosen (feature, sample row) pairs with their windows: flat arrays over E examples."""

    feature: np.ndarray  # [E]
    row: np.ndarray  # [E] sample rows
    group: np.ndarray  # [E] -1 = a top-activating context, b >= 0 = quantile bin b
    rollout_id: np.ndarray  # [E]
    position: np.ndarray  # [E]
    token_ids: np.ndarray  # [E, 2 width + 1], -1 outside the text
    acts: np.ndarray  # [E, 2 width + 1] the feature's activation at each window token (float32)


@dataclass
class SampleCodes:
    """A layer's sample as the SAE encodes it, and where each sample row sits."""

    values: np.ndarray  # [N, k] top-k activations
    indices: np.ndarray  # [N, k] their feature ids
    rollout_id: np.ndarray  # [N]
    position: np.ndarray  # [N] token position in prompt + response


def build_examples(feature: np.ndarray, row: np.ndarray, group: np.ndarray, *, codes: SampleCodes,
                   tokens: TokenTable, width: int, block: int = 4096) -> Examples:
    """The windows of examples (feature, row, group): token ids from the rollout's text, and the
    feature's activation at each window token that is a sample row (0 elsewhere)."""
    values, indices = codes.values, codes.indices
    rollout_id, position = codes.rollout_id[row].astype(np.int64), codes.position[row].astype(np.int64)
    positions, token_ids = tokens.window(rollout_id, position, width)
    lookup = RowLookup(codes.rollout_id, codes.position)
    acts = np.zeros(token_ids.shape, dtype=np.float32)
    for first in range(0, len(row), block):  # [block, window, k] temporaries
        part = slice(first, first + block)
        rows = lookup(np.broadcast_to(rollout_id[part, None], positions[part].shape), positions[part])
        safe = np.maximum(rows, 0)
        hit = (indices[safe] == feature[part, None, None]) & (rows >= 0)[..., None]
        acts[part] = (values[safe] * hit).sum(axis=-1)
    return Examples(feature, row, group, rollout_id, position, token_ids, acts)


def choose_examples(stream: FeatureStream, live: np.ndarray, per_bin: int) -> tuple[np.ndarray, ...]:
    """(feature, row, group) of every live feature's top rows (group -1) and quantile samples
    (group = bin), with each feature's quantile bins [{"label", "low", "high"}]."""
    top = stream.top
    features, rows, groups = [top.feature], [top.row], [np.full(len(top.row), -1)]
    bins = {}
    for f in live.tolist():
        bins[f] = stream.quantile_samples(f, per_bin)
        for b, entry in enumerate(bins[f]):
            features.append(np.full(len(entry["rows"]), f))
            rows.append(np.asarray(entry["rows"], dtype=np.int64))
            groups.append(np.full(len(entry["rows"]), b))
    return np.concatenate(features), np.concatenate(rows), np.concatenate(groups), bins


@dataclass
class LayerFeatures:
    """One layer's feature data, compact (arrays and ids, no text) until `record` renders a feature."""

    n_rows: int
    live: np.ndarray  # feature ids that fire on some sample row, ascending
    fire_count: np.ndarray  # [n]
    mean_activation: np.ndarray  # [n] over the rows where it fires
    max_activation: np.ndarray  # [n]
    histograms: dict[int, dict]  # live feature -> {"edges", "counts"}
    bins: dict[int, list[dict]]  # live feature -> its quantile bins {"label", "low", "high", "rows"}
    examples: Examples
    similar: tuple[np.ndarray, np.ndarray]  # nearest_decoder_directions
    by_feature: dict[int, np.ndarray]  # live feature -> its examples' positions in `examples`

    def record(self, feature: int, stats: dict, *, token_text: Callable[[int], str],
               outcome_of: Callable[[int], str], logits: dict | None) -> dict:
        """The feature's page as JSON-ready data (qsae/browser's contract): statistics, histogram,
        top and quantile examples, logit table, similar features. `stats` holds the layer's
        per-feature lists (feature_stats.json), `logits` the layer's logit_tables as lists or None."""
        ex = self.examples
        mine = self.by_feature[feature]

        def example(e: int) -> dict:
            keep = ex.token_ids[e] >= 0
            first = int(np.argmax(keep)) if keep.any() else 0
            centre = (ex.token_ids.shape[1] - 1) // 2
            return {"tokens": [token_text(t) for t in ex.token_ids[e][keep].tolist()],
                    "acts": [a or 0 for a in np.round(ex.acts[e][keep].astype(np.float64), 4).tolist()],
                    "at": centre - first,
                    "activation": round(float(ex.acts[e][centre]), 4), "rollout": int(ex.rollout_id[e]),
                    "position": int(ex.position[e]), "outcome": outcome_of(int(ex.rollout_id[e]))}

        top = [example(e) for e in mine[ex.group[mine] < 0]]
        quantiles = [{"label": b["label"], "low": b["low"], "high": b["high"],
                      "examples": [example(e) for e in mine[ex.group[mine] == i]]}
                     for i, b in enumerate(self.bins[feature])]
        ids, cosines = self.similar

        def value(name: str):
            column = stats.get(name)
            return None if column is None else column[feature]

        return {
            "feature": feature, "fire_rate": self.fire_count[feature] / self.n_rows,
            "fire_count": int(self.fire_count[feature]), "max_activation": float(self.max_activation[feature]),
            "mean_activation": float(self.mean_activation[feature]),
            "token_auroc": value("token_auroc"), "rollout_auroc": value("rollout_auroc"),
            "rollout_p": value("rollout_p"), "rollout_q": value("rollout_q"),
            "histogram": self.histograms[feature], "top": top, "quantiles": quantiles,
            "logits": None if logits is None else {
                "promoted": [[token_text(t), round(v, 4)] for t, v in zip(logits["promoted_ids"][feature],
                                                                          logits["promoted_values"][feature])],
                "suppressed": [[token_text(t), round(v, 4)] for t, v in zip(logits["suppressed_ids"][feature],
                                                                            logits["suppressed_values"][feature])]},
            "similar": [[int(i), round(float(c), 4)] for i, c in zip(ids[feature], cosines[feature])],
        }


def layer_features(W_dec: torch.Tensor, codes: SampleCodes, tokens: TokenTable, *, top: int, width: int,
                   per_bin: int, seed: int) -> LayerFeatures:
    """A layer's LayerFeatures from its sample's codes: one FeatureStream pass over them, then the
    windows of the chosen examples."""
    stream = stream_codes(codes.values, codes.indices, len(W_dec), top=top, seed=seed)
    return features_of_stream(W_dec, stream, per_bin, partial(build_examples, codes=codes, tokens=tokens, width=width))


ExamplesOf = Callable[[np.ndarray, np.ndarray, np.ndarray], Examples]  # (feature, row, group) -> their windows


def features_of_stream(W_dec: torch.Tensor, stream: FeatureStream, per_bin: int, examples_of: ExamplesOf) -> LayerFeatures:
    """LayerFeatures from a finished stream; `examples_of` gives the windows of the chosen examples."""
    live = np.flatnonzero(stream.fire_count)
    feature, row, group, bins = choose_examples(stream, live, per_bin)
    examples = examples_of(feature, row, group)
    return LayerFeatures(
        n_rows=stream.rows, live=live, fire_count=stream.fire_count,
        mean_activation=stream.activation_sum / np.maximum(stream.fire_count, 1),
        max_activation=stream.max_activation,
        histograms={int(f): stream.histogram(int(f)) for f in live}, bins=bins, examples=examples,
        similar=nearest_decoder_directions(W_dec, SIMILAR_FEATURES),
        by_feature=examples_by_feature(examples.feature, live),
    )


def examples_by_feature(example_feature: np.ndarray, live: np.ndarray) -> dict[int, np.ndarray]:
    """Each live feature's examples: their positions in the flat example arrays, in order."""
    order = np.argsort(example_feature, kind="stable")
    starts = np.searchsorted(example_feature[order], live)
    ends = np.searchsorted(example_feature[order], live, side="right")
    return {int(f): order[lo:hi] for f, lo, hi in zip(live, starts, ends)}


# ------------------------------------------------------------------------------------------------
# Decoder directions through the unembedding


@torch.no_grad()
def final_norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The elementwise gain of an RMS-style final norm, read off by normalising a vector of ones (RMS
    1): whatever the norm's parametrisation (weight, or 1 + weight), up to a factor 1/sqrt(1 + eps)
    that is the same for every token and so changes no ranking."""
    weight = next(norm.parameters(), None)
    probe = torch.ones(1, d_model, dtype=weight.dtype if weight is not None else torch.float32,
                       device=weight.device if weight is not None else "cpu")
    return norm(probe)[0].float()


@torch.no_grad()
def logit_tables(W_dec: torch.Tensor, gain: torch.Tensor, head: nn.Module, *, top: int = LOGIT_TOKENS,
                 block: int = 256, bins: int = LOGIT_HISTOGRAM_BINS) -> dict[str, torch.Tensor]:
    """Per feature, the `top` output tokens its decoder direction raises most and lowers most, and a
    histogram of its logits over the whole vocabulary: logits = head(gain * W_dec[f]) (the
    unembedding of the direction after the final norm's gain). Returns, on the CPU,
    promoted_ids / promoted_values / suppressed_ids / suppressed_values [n, top] and
    histogram_heights / histogram_values [n, bins] (counts in equal bins from the smallest logit to
    the largest, and the bins' centres); `block` features at a time, so memory holds block x vocab."""
    weight = next(head.parameters())
    parts = []
    for first in range(0, len(W_dec), block):
        directions = (W_dec[first:first + block].float().to(gain.device) * gain).to(weight.dtype)
        logits = head(directions.to(weight.device)).float()
        up, down = logits.topk(top, dim=-1), logits.topk(top, dim=-1, largest=False)
        low, high = logits.min(dim=-1, keepdim=True).values, logits.max(dim=-1, keepdim=True).values
        width = ((high - low) / bins).clamp_min(torch.finfo(torch.float32).tiny)
        which = ((logits - low) / width).long().clamp(0, bins - 1)
        heights = torch.zeros(len(logits), bins, device=logits.device).scatter_add_(1, which, torch.ones_like(logits))
        centres = low + width * (torch.arange(bins, device=logits.device) + 0.5)
        parts.append((up.indices, up.values, down.indices, down.values, heights.long(), centres))
    names = ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values", "histogram_heights",
             "histogram_values")
    return {name: torch.cat([part[i].cpu() for part in parts]) for i, name in enumerate(names)}


@torch.no_grad()
def decoder_logits(model: nn.Module, W_decs: dict[int, torch.Tensor], top: int = LOGIT_TOKENS) -> dict[int, dict]:
    """logit_tables of each layer's decoder through the model's final norm and output embedding,
    {layer: {name: tensor [n, ...]}}."""
    runner, head = text_model(model), model.get_output_embeddings()
    out = {}
    for layer, W_dec in W_decs.items():
        gain = final_norm_gain(runner.norm, W_dec.shape[1])
        out[layer] = logit_tables(W_dec.detach(), gain, head, top=top)
    return out
