"""The encode pass on a cluster: capture's replica pool (qsae.distributed.shard_pool) over the store's
shards, each replica replaying its shards' rollouts through the model and the trained SAEs
(qsae.encode); a shard is listed in encoded/manifest.json only after its files are in place."""
from __future__ import annotations

import time

import torch

from qsae import console
from qsae.capture import ReplicaSpec, load_replica
from qsae.distributed import use_threads
from qsae.distributed.shard_pool import ShardPool, timed
from qsae.encode import EncodeSettings, StoredShard, encode_shard, list_encoded, shards_to_encode
from qsae.rundir import RunDir
from qsae.store import remove_stale_temporaries
from qsae.training.trained import load_trained


class EncodeWorker:
    """One model replica with the layers' SAEs on its device, both loaded on its first shard."""

    def __init__(self, spec: ReplicaSpec, run: RunDir, settings: EncodeSettings):
        use_threads(spec.capture.cpus_per_actor)
        self.spec, self.run, self.settings = spec, run, settings
        self.replica = self.saes = None

    def process(self, shard: StoredShard) -> dict:
        if self.replica is None:
            self.replica = load_replica(self.spec)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.saes = {layer: load_trained(self.run, layer).sae.to(device) for layer in self.spec.layers}
        return encode_shard(self.replica.residuals_of, self.saes, shard, self.run, self.settings)

    def close(self) -> None:
        if self.replica is not None and hasattr(self.replica.engine, "close"):
            self.replica.engine.close()


def run_encode(spec: ReplicaSpec, run: RunDir, settings: EncodeSettings) -> None:
    """Encode every store shard not yet encoded with these SAEs and settings."""
    manifest, pending = shards_to_encode(run, list(spec.layers), settings)
    if not pending:
        console.say(f"[qsae] encode: all {len(manifest['shards'])} shards are encoded already")
        return
    started, tokens = time.time(), [0]

    def done(shard: StoredShard, result: dict) -> dict:
        list_encoded(run, manifest, result)
        tokens[0] += result["tokens"]
        return timed(started, tokens[0], "tokens")

    try:
        ShardPool(EncodeWorker, (spec, run, settings), spec.capture, "encode").run(pending, done)
    finally:
        remove_stale_temporaries(run.root)
