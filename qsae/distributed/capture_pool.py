"""The capture stage on a cluster: a pool of model replicas (Ray actors, qsae.distributed.shard_pool)
over question shards.

The work is qsae.capture's; this module lists a shard in the store's manifest only after all of its
files are in place, so each rollout is captured exactly once, and stops cleanly before the disk fills.
"""
from __future__ import annotations

import time

import ray

from qsae import console
from qsae.capture import (QuestionShard, ReplicaSpec, capture_question_shard, kept_positions, list_shard,
                          load_replica, roll_out_shards, shards_per_call, store_to_extend)
from qsae.distributed import get_or_raise_cause, replica_options, use_threads
from qsae.distributed.shard_pool import ShardPool, timed
from qsae.models import check_fits, memory_budget, parameter_count
from qsae.questions import Question
from qsae.rollout import read_rollouts, write_rollouts
from qsae.rundir import RunDir
from qsae.store import DiskSpaceError, damaged_shards, free_bytes, remove_stale_temporaries, row_bytes, write_manifest

class CaptureWorker:
    """One model replica: loads the model on its first shard (so that a model which will not load
    fails that task once, rather than killing replica after replica), then captures whole shards. A
    shard handed over with the shards queued behind it (`ahead`) rolls them all out in one engine call;
    their rollouts wait here for their own turn."""

    def __init__(self, spec: ReplicaSpec, run: RunDir):
        use_threads(spec.capture.cpus_per_actor)
        self.spec, self.run = spec, run
        self.replica = None
        self.rolled_out: dict[str, list] = {}

    def process(self, shard: QuestionShard, ahead: tuple[QuestionShard, ...] = ()) -> dict:
        first = self.replica is None
        self.replica = self.replica or load_replica(self.spec)
        if shard.name not in self.rolled_out:
            self.rolled_out.update(roll_out_shards(self.replica, [shard, *ahead], self.spec))
        return capture_question_shard(self.replica, shard, self.spec, self.run, rollouts=self.rolled_out.pop(shard.name),
                                      check=first)

    def close(self) -> None:
        """Stop the engine's own processes (vLLM's engine core holds the GPU), so that the trainers
        after capture find the GPU free rather than waiting on a killed actor's orphans."""
        if self.replica is not None and hasattr(self.replica.engine, "close"):
            self.replica.engine.close()


def run_capture(spec: ReplicaSpec, questions: list[Question], run: RunDir) -> dict:
    """Capture every shard not yet listed in the manifest, then gather the rollouts; returns the
    final manifest. A listed shard one of whose files (an Arrow file or its rollout part) is missing,
    unreadable or does not match its checksum is dropped from the manifest and captured again whole."""
    remove_stale_temporaries(run.root)
    manifest, shards = store_to_extend(spec, questions, run)
    if manifest["shards"]:
        for shard, reason in damaged_shards(run.store, manifest, run.rollout_part).items():
            console.say(f"[qsae] {reason}: {shard} will be captured again")
            del manifest["shards"][shard]
        write_manifest(run.store, manifest)
    pending = [s for s in shards if s.name not in manifest["shards"]]
    if not pending:
        console.say(f"[qsae] capture: all {len(shards)} shards are in the store already; nothing to capture")
    else:
        check_replica_fits(spec)
        warn_if_disk_may_not_fit(spec, sum(len(s.questions) for s in pending), run)
        try:
            ShardPool(CaptureWorker, (spec, run), spec.capture, "capture", group=shards_per_call(spec)).run(
                pending, CaptureBook(run, manifest, pending).done)
        finally:
            remove_stale_temporaries(run.root)  # what killed writers left
    write_rollouts(read_rollouts(*[run.rollout_part(s.name) for s in shards]), run.rollouts)
    return manifest


def check_replica_fits(spec: ReplicaSpec) -> None:
    """Before starting replicas: do the weights fit the memory of one replica's resources? Checked in a
    task placed like a replica (it sees that replica's GPUs), so a misconfiguration fails once, clearly."""
    model = spec.model

    def probe() -> None:
        check_fits(model.name, parameter_count(spec.model_path), model.dtype, memory_budget(model.device))

    get_or_raise_cause(ray.remote(probe).options(**replica_options(spec.capture)).remote())


def warn_if_disk_may_not_fit(spec: ReplicaSpec, n_questions: int, run: RunDir) -> None:
    """Before the run: the worst case (every response at max_new_tokens) against free space. Only a
    warning, since responses are usually shorter; the measured rate is checked after every shard."""
    per_token = len(spec.layers) * row_bytes(spec.d_model, spec.capture.dtype)
    per_rollout = kept_positions(spec.capture).count(spec.rollout.max_new_tokens)
    worst = n_questions * spec.rollout.samples_per_question * per_rollout * per_token
    free = free_bytes(run.root)
    console.say(f"[qsae] store estimate: at most {worst / 1e9:.2f} GB for {n_questions} questions; {free / 1e9:.2f} GB free")
    if worst > free:
        console.warn("the worst case does not fit; capture stops cleanly if the measured rate will not fit")


def check_disk_projection(done_bytes: int, done_questions: int, remaining_questions: int, run: RunDir) -> None:
    """After a shard: will the remaining questions fit at the rate measured so far (with 5% to spare)?"""
    needed = done_bytes / done_questions * remaining_questions * 1.05
    free = free_bytes(run.root)
    if needed > free:
        raise DiskSpaceError(
            f"the activation store needs about {needed / 1e6:.1f} MB more for {remaining_questions} questions "
            f"but only {free / 1e6:.1f} MB are free at {run.root}; the shards captured so far are kept: "
            "free some space and rerun with the same --out to continue"
        )


class CaptureBook:
    """The driver's side of capture: lists each finished shard in the manifest, watches the disk."""

    def __init__(self, run: RunDir, manifest: dict, pending: list[QuestionShard]):
        self.run, self.manifest = run, manifest
        self.remaining = sum(len(shard.questions) for shard in pending)
        self.tokens = self.done_bytes = self.done_questions = 0
        self.started = time.time()

    def done(self, shard: QuestionShard, result: dict) -> dict:
        list_shard(self.manifest, result)
        write_manifest(self.run.store, self.manifest)
        if result["beyond_float16"]:
            console.warn(f"{shard.name}: {result['beyond_float16']:,} token(s) whose residual exceeds float16's range "
                         "were left out of the store at every layer (capture.dtype = float32 keeps them)")
        self.tokens += result["response_tokens"]
        self.done_bytes += result["bytes"]
        self.done_questions += len(result["questions"])
        self.remaining -= len(result["questions"])
        if self.remaining:
            check_disk_projection(self.done_bytes, self.done_questions, self.remaining, self.run)
        return timed(self.started, self.tokens, "tokens")
