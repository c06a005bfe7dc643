"""The feature browser's data pass at release scale: seconds and peak memory of one layer's
`layer_features` over synthetic top-k codes.

    python benchmarks/bench_feature_data.py [--rows 1000000] [--features 4096] [--k 32]

Codes: each row fires k distinct features drawn with Zipf-like weights (feature i with weight
1 / (i + 10)) at log-normal activations; rows belong to rollouts of --rollout-tokens tokens. Reported:
the codes' own size, the wall seconds of the pass (stream, examples, decoder neighbours) and of
rendering every live feature's page (LayerFeatures.record), and the peak of the memory the pass
allocated beyond the codes (tracemalloc, which numpy's allocations report to).
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from qsae.analysis.feature_data import SampleCodes, TokenTable, layer_features


def synthetic_codes(rows: int, features: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(features) + 10)
    cdf = np.cumsum(weights / weights.sum())
    indices = np.empty((rows, k), dtype=np.int32)
    for first in range(0, rows, 65536):  # k distinct ids per row: draw extra, keep the first k distinct
        n = min(65536, rows - first)
        draws = np.minimum(np.searchsorted(cdf, rng.random((n, 4 * k))), features - 1)
        for i, row in enumerate(draws):
            _, at = np.unique(row, return_index=True)
            picked = row[np.sort(at)][:k]
            if len(picked) < k:  # rare: fill from the features not drawn
                picked = np.concatenate([picked, np.setdiff1d(np.arange(features), picked)[: k - len(picked)]])
            indices[first + i] = picked
    values = rng.lognormal(0.0, 0.5, (rows, k)).astype(np.float32)
    return values, indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--rollout-tokens", type=int, default=1000)
    args = parser.parse_args()

    values, indices = synthetic_codes(args.rows, args.features, args.k, seed=0)
    rollout = np.arange(args.rows) // args.rollout_tokens
    position = np.arange(args.rows) % args.rollout_tokens + 50
    tokens = TokenTable({r: list(range(args.rollout_tokens + 50)) for r in np.unique(rollout).tolist()})
    W_dec = torch.nn.functional.normalize(torch.randn(args.features, args.d_model), dim=1)
    tracemalloc.start()
    started = time.perf_counter()
    data = layer_features(W_dec, SampleCodes(values, indices, rollout, position), tokens, top=10, width=12, per_bin=5,
                          seed=0)
    pass_s = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    started = time.perf_counter()
    stats = {"token_auroc": None, "rollout_auroc": None, "rollout_p": None, "rollout_q": None}
    pages = sum(len(data.record(int(f), stats, token_text=str, outcome_of=lambda r: "correct", logits=None)["top"]) > 0 for f in data.live)
    render_s = time.perf_counter() - started
    codes_mib = (values.nbytes + indices.nbytes) / 2**20
    print(f"{args.rows:,} rows x k {args.k}, {args.features} features ({len(data.live)} live, {pages} pages): "
          f"codes {codes_mib:.0f} MiB; pass {pass_s:.1f} s, rendering every page {render_s:.1f} s; "
          f"peak memory allocated by the pass {peak:.0f} MiB")


if __name__ == "__main__":
    main()
