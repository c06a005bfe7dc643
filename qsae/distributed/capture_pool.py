"""The capture stage on a cluster: a pool of model replicas (Ray actors) over question shards.

The work is qsae.capture's; this module feeds shards to replicas, one in flight per replica,
replaces a replica that dies (its shard goes back on the queue), and lists a shard in the store's
manifest only after all of its files are in place, so each rollout is captured exactly once.
"""
from __future__ import annotations

import time

import ray

from qsae import console
from qsae.capture import (QuestionShard, ReplicaSpec, capture_question_shard, kept_positions, list_shard,
                          load_replica, store_to_extend)
from qsae.distributed import get_or_raise_cause, replica_options, use_threads
from qsae.distributed.resources import WaitNotes, next_ready, replica_request
from qsae.models import check_fits, memory_budget, parameter_count
from qsae.questions import Question
from qsae.rollout import read_rollouts, write_rollouts
from qsae.rundir import RunDir
from qsae.store import DiskSpaceError, damaged_shards, free_bytes, remove_stale_temporaries, row_bytes, write_manifest

MAX_SHARD_ATTEMPTS = 3


class CaptureWorker:
    """One model replica: loads the model on its first shard (so that a model which will not load
    fails that task once, rather than killing replica after replica), then captures whole shards."""

    def __init__(self, spec: ReplicaSpec, run: RunDir):
        use_threads(spec.capture.cpus_per_actor)
        self.spec, self.run = spec, run
        self.replica = None

    def process(self, shard: QuestionShard) -> dict:
        self.replica = self.replica or load_replica(self.spec)
        return capture_question_shard(self.replica, shard, self.spec, self.run)

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
        ShardPool(spec, run, manifest).capture(pending)
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


class ShardPool:
    """Replicas fed one shard each at a time (backpressure). A shard whose replica dies goes back on
    the queue and a new replica takes its place; the manifest lists a shard only after all of its
    files are in place, so nothing is counted twice or lost."""

    def __init__(self, spec: ReplicaSpec, run: RunDir, manifest: dict):
        self.spec, self.run, self.manifest = spec, run, manifest
        self.actor_class = ray.remote(CaptureWorker).options(**replica_options(spec.capture))
        self.actors: list = []
        self.in_flight: dict[ray.ObjectRef, tuple[int, QuestionShard]] = {}
        self.attempts: dict[str, int] = {}
        self.tokens = self.done_bytes = self.done_questions = 0

    def capture(self, pending: list[QuestionShard]) -> None:
        self.actors = [self.actor_class.remote(self.spec, self.run)
                       for _ in range(min(self.spec.capture.num_actors, len(pending)))]
        queue, remaining = list(pending), sum(len(shard.questions) for shard in pending)
        started, notes = time.time(), WaitNotes("capture", replica_request(self.spec.capture))
        try:
            with console.progress(total=len(pending), desc="capture", unit="shard") as bar:
                while queue or self.in_flight:
                    self.submit(queue)
                    ref = next_ready(list(self.in_flight), notes)
                    questions = self.finish(ref, queue)
                    if questions is None:
                        continue
                    remaining -= questions
                    bar.set_postfix(tokens_per_s=f"{self.tokens / (time.time() - started):.0f}")
                    bar.update(1)
                    if remaining:
                        check_disk_projection(self.done_bytes, self.done_questions, remaining, self.run)
        finally:
            self.close()

    def submit(self, queue: list[QuestionShard]) -> None:
        """A shard to every idle replica while shards wait."""
        busy = {slot for slot, _ in self.in_flight.values()}
        for slot, actor in enumerate(self.actors):
            if queue and slot not in busy:
                shard = queue.pop(0)
                self.attempts[shard.name] = self.attempts.get(shard.name, 0) + 1
                self.in_flight[actor.process.remote(shard)] = (slot, shard)

    def finish(self, ref: ray.ObjectRef, queue: list[QuestionShard]) -> int | None:
        """List a finished shard in the manifest (its question count returned), or put the shard of a dead
        replica back on the queue (None returned)."""
        slot, shard = self.in_flight.pop(ref)
        try:
            result = get_or_raise_cause(ref)
        except ray.exceptions.RayActorError as err:
            if self.attempts[shard.name] >= MAX_SHARD_ATTEMPTS:
                raise RuntimeError(f"{shard.name} failed {self.attempts[shard.name]} times; last error: {err}") from err
            # A fresh replica in the dead one's place; the shard goes back on the queue, and its
            # half-written files are overwritten by the retry (it was never listed).
            console.say(f"[qsae] replica died during {shard.name}; retrying it on a new replica")
            ray.kill(self.actors[slot])
            self.actors[slot] = self.actor_class.remote(self.spec, self.run)
            queue.append(shard)
            return None
        list_shard(self.manifest, result)
        write_manifest(self.run.store, self.manifest)
        self.tokens += result["response_tokens"]
        self.done_bytes += result["bytes"]
        self.done_questions += len(result["questions"])
        return len(result["questions"])

    def close(self) -> None:
        """Close the idle replicas' engines, end every replica, and let killed writers go."""
        busy = {slot for slot, _ in self.in_flight.values()}
        try:
            ray.get([actor.close.remote() for slot, actor in enumerate(self.actors) if slot not in busy], timeout=120)
        except ray.exceptions.RayError:  # timeouts included
            pass  # a replica that cannot close is killed below all the same
        for actor in self.actors:
            ray.kill(actor)
        if self.in_flight:
            ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=30)
        remove_stale_temporaries(self.run.root)
