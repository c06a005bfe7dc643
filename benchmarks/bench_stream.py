"""Peak memory of training from the activation store at two store sizes: streaming through the shuffle
buffer, whose memory should follow the buffer, vs. loading the whole layer first, whose memory follows the store.

    python benchmarks/bench_stream.py [--size-mib 256] [--scale 4] [--d-model 1024] [--shard-rows 8192]
                                      [--n-features 1024] [--k 32] [--batch-size 4096]
                                      [--buffer-rows 65536] [--threads N] [--dir PARENT]

Data: two synthetic float16 Arrow stores of one layer, written with qsae's own shard writer: --size-mib
MiB of activations (1x) and --scale times as much (4x: 256 MiB and 1 GiB by default), Gaussian rows of
width --d-model in shards of --shard-rows rows. They go to a fresh temporary directory (inside --dir
when given), one at a time, removed at the end; the free disk space is checked first.

Methods, each one epoch of train_sae (modern recipe, a small SAE) in a fresh subprocess, so that the
peak resident memory is that run's alone:
- "stream": train_sae(StoreSource(store, layer)): shards memory-mapped a chunk at a time, rows drawn
  through the seeded shuffle buffer of --buffer-rows rows while the next buffer is read in the background,
  and freed memory handed back to the system once per buffer (qsae calls glibc's malloc_trim).
- "stream, eager free": the same child with glibc's mmap threshold fixed at 128 KiB
  (MALLOC_MMAP_THRESHOLD_=131072). By default glibc raises that threshold after a large block is freed
  (up to 32 MiB), and from then on batch-sized blocks come from heaps whose freed space stays resident
  until trimmed; fixed, every block is returned when freed (the peak is the memory actually in use),
  at the cost of fresh page faults for every batch.
- "load all" (the way before streaming): residual_matrix(read_layer_table(store, layer)), the whole
  layer as one float32 array, then train_sae on that array.
- "imports only": a child that imports qsae and torch and trains nothing: the floor under both.

Reported per run: peak RSS (the child's high-water mark: heap plus the file pages it had mapped),
training tokens/s (rows / the seconds train_sae reports: the epoch, the variance scan and the b_dec
initialisation) and the child's seconds from start to finish, loading included. Then RSS(4x) / RSS(1x)
for each method, and the same above the imports-only floor: near 1 when memory follows the buffer,
near the scale when it follows the store.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qsae.store import (
    ShardRows,
    free_bytes,
    new_manifest,
    read_layer_table,
    residual_matrix,
    row_bytes,
    write_manifest,
    write_shard,
)

LAYER = 0
DTYPE = "float16"
# method -> (what the child does, environment it runs with)
METHODS = {"stream": ("stream", {}),
           "stream, eager free": ("stream", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
           "load all": ("load all", {})}
MIB = 2**20


def write_synthetic_store(store_dir: Path, n_rows: int, d_model: int, shard_rows: int, seed: int) -> None:
    """n_rows Gaussian rows in shards of shard_rows, then the manifest listing them."""
    rng = np.random.default_rng(seed)
    manifest = new_manifest("synthetic/bench", None, [LAYER], d_model, dtype=DTYPE)
    for number, first in enumerate(range(0, n_rows, shard_rows)):
        n = min(shard_rows, n_rows - first)
        shard = f"shard_{number:05d}"
        written = write_shard(store_dir, LAYER, shard, ShardRows(rollout_id=np.full(n, number, np.int64), position=np.arange(n, dtype=np.int32), token_id=np.zeros(n, np.int32), correct=np.zeros(n, bool), residuals=rng.standard_normal((n, d_model), dtype=np.float32)), dtype=DTYPE)
        manifest["shards"][shard] = {"rollouts": 1, "rows": {str(LAYER): written}}
    write_manifest(store_dir, manifest)


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def run_child(args: argparse.Namespace) -> dict:
    """One measured run, inside the child process: prints its result as one JSON line."""
    import torch

    from qsae.config import TrainConfig
    from qsae.streaming import StoreSource
    from qsae.training.loop import train_sae

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"rows": 0, "tokens_per_s": float("nan")}
    if args.child != "imports only":
        rows = StoreSource(args.store, LAYER) if args.child == "stream" else \
            residual_matrix(read_layer_table(args.store, LAYER))
        cfg = TrainConfig(n_features=args.n_features, k=args.k, epochs=1, batch_size=args.batch_size,
                          shuffle_buffer_rows=args.buffer_rows)
        _, history = train_sae(rows, cfg)
        result = {"rows": history["tokens_seen"], "tokens_per_s": history["tokens_seen"] / history["seconds"]}
    return {**result, "peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - started}


def measure(method: str, store_dir: Path | None, args: argparse.Namespace) -> dict:
    """Run one method in a fresh interpreter and return what it measured."""
    mode, env = METHODS.get(method, (method, {}))
    command = [sys.executable, __file__, "--child", mode, "--store", str(store_dir or ""),
               "--n-features", str(args.n_features), "--k", str(args.k), "--batch-size", str(args.batch_size),
               "--buffer-rows", str(args.buffer_rows), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"bench_stream: the {method!r} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], scale: int) -> None:
    print(f"\n{'method':<20}{'store':>10}{'rows':>9}{'peak RSS MiB':>14}{'tokens/s':>10}{'child s':>9}")
    for r in results:
        trained = r["rows"] > 0
        store, speed, seconds = (f"{r['store_mib']:.0f} MiB", f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.1f}") \
            if trained else ("-", "-", "-")
        print(f"{r['method']:<20}{store:>10}{r['rows']:>9}{r['peak_rss_mib']:>14.0f}{speed:>10}{seconds:>9}")
    floor = next(r["peak_rss_mib"] for r in results if r["method"] == "imports only")
    for method in METHODS:
        small, large = (next(r["peak_rss_mib"] for r in results if r["method"] == method and r["scale"] == s)
                        for s in (1, scale))
        print(f"{method}: RSS({scale}x) / RSS(1x) = {large / small:.2f}; "
              f"above the imports-only floor: {(large - floor) / (small - floor):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=256, help="activations in the 1x store")
    parser.add_argument("--scale", type=int, default=4, help="the larger store holds this many times as much")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--shard-rows", type=int, default=8192)
    parser.add_argument("--n-features", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--buffer-rows", type=int, default=65536, help="TrainConfig.shuffle_buffer_rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    parser.add_argument("--dir", help="parent of the temporary store directory (default: the system's temp dir)")
    parser.add_argument("--child", choices=("stream", "load all", "imports only"), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.scale < 2 or args.size_mib <= 0:
        parser.error("--scale must be >= 2 and --size-mib positive")

    rows_1x = int(args.size_mib * MIB) // (args.d_model * 2)
    sizes = {1: rows_1x, args.scale: rows_1x * args.scale}
    # One store on disk at a time: the larger one, plus room for Arrow headers.
    needed = max(sizes.values()) * row_bytes(args.d_model, DTYPE) + 64 * MIB
    parent = Path(args.dir or tempfile.gettempdir())
    free = free_bytes(parent)
    if free < needed:
        raise SystemExit(f"bench_stream: the {args.scale}x store needs {needed / MIB:.0f} MiB but {parent} has "
                         f"{free / MIB:.0f} MiB free; pass --dir on a larger disk or a smaller --size-mib")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qsae-bench-stream-", dir=parent))
    try:
        results = [{**measure("imports only", None, args), "method": "imports only", "scale": 0, "store_mib": 0}]
        for scale, n_rows in sizes.items():
            store_dir = work / f"store_{scale}x"
            print(f"writing the {scale}x store: {n_rows} rows x {args.d_model} {DTYPE} ...", file=sys.stderr)
            write_synthetic_store(store_dir, n_rows, args.d_model, args.shard_rows, seed=scale)
            store_mib = n_rows * args.d_model * 2 / MIB
            for method in METHODS:
                print(f"  {method} ...", file=sys.stderr)
                results.append({**measure(method, store_dir, args), "method": method, "scale": scale,
                                "store_mib": store_mib})
            shutil.rmtree(store_dir)  # the next store gets the disk space
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, args.scale)


if __name__ == "__main__":
    main()
