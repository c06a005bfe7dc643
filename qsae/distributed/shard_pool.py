"""A pool of model replicas (Ray actors) over shards: capture's and the encode pass's.

Shards go only to a replica that has started (placed on a node and constructed), one group at a time
(backpressure): `group` shards, fewer when that would leave replicas idle, handed over together so
the replica can roll them out in one engine call, then processed one by one in order. A replica Ray
cannot place yet (its node lost, no room until the cluster grows) holds no work while the others
finish the queue. The shards a dead replica held go back to the front of the queue and a fresh
replica starts in its place; the caller's `done` records a shard only from its own result, after all
of its files are in place, so nothing is recorded twice or lost.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import ray

from qsae import console
from qsae.config import CaptureConfig
from qsae.distributed import get_or_raise_cause, replica_options
from qsae.distributed.resources import WaitNotes, next_ready, replica_request

MAX_SHARD_ATTEMPTS = 3  # also the failed starts in a row one replica slot may have


class ShardPool:
    """Replicas of `worker` (constructed with `args`; `worker.process(shard)` does a shard's work and
    returns its result, `worker.process(shard, ahead)` also learns the shards handed over behind it,
    `worker.close()` lets go of the engine) placed as capture.* asks."""

    def __init__(self, worker: type, args: tuple, capture: CaptureConfig, what: str, *, group: int = 1):
        self.actor_class = ray.remote(worker).options(**replica_options(capture))
        self.args, self.capture, self.what, self.group = args, capture, what, group
        self.actors: list = []
        self.starting: dict[ray.ObjectRef, int] = {}  # a replica's start, by its slot
        self.started: set[int] = set()
        self.failed_starts: dict[int, int] = {}
        self.in_flight: dict[ray.ObjectRef, tuple[int, object]] = {}  # in the order each replica runs them
        self.failures: dict[str, int] = {}

    def run(self, pending: list, done: Callable[[object, dict], dict | None]) -> None:
        """Every shard of `pending` (each with a .name) through a replica; `done(shard, result)` after
        each, in the driver, returning a progress-bar postfix or None."""
        self.actors = [None] * min(self.capture.num_actors, len(pending))
        for slot in range(len(self.actors)):
            self.start(slot)
        queue = list(pending)
        notes = WaitNotes(self.what, replica_request(self.capture))
        try:
            with console.progress(total=len(pending), desc=self.what, unit="shard") as bar:
                while queue or self.in_flight:
                    self.submit(queue)
                    ref = next_ready([*self.in_flight, *self.starting], notes)
                    if ref in self.starting:
                        self.check_started(ref)
                        continue
                    shard = self.in_flight[ref][1]
                    result = self.result_or_retry(ref, queue)
                    if result is None:
                        continue
                    postfix = done(shard, result)
                    if postfix:
                        bar.set_postfix(**postfix)
                    bar.update(1)
        finally:
            self.close()

    def start(self, slot: int) -> None:
        """A fresh replica in `slot`; it takes shards once Ray has placed and constructed it."""
        self.actors[slot] = self.actor_class.remote(*self.args)
        self.started.discard(slot)
        self.starting[self.actors[slot].__ray_ready__.remote()] = slot

    def check_started(self, ref: ray.ObjectRef) -> None:
        slot = self.starting.pop(ref)
        try:
            get_or_raise_cause(ref)
        except ray.exceptions.RayActorError as err:  # its node went while it started
            self.failed_starts[slot] = self.failed_starts.get(slot, 0) + 1
            if self.failed_starts[slot] >= MAX_SHARD_ATTEMPTS:
                raise RuntimeError(f"a {self.what} replica failed to start {self.failed_starts[slot]} times; "
                                   f"last error: {err}") from err
            ray.kill(self.actors[slot])
            self.start(slot)
            return
        self.failed_starts.pop(slot, None)
        self.started.add(slot)

    def submit(self, queue: list) -> None:
        """A group of shards to every started, idle replica while shards wait."""
        busy = {slot for slot, _ in self.in_flight.values()}
        idle = sorted(self.started - busy)
        for slot in idle:
            if not queue:
                return
            size = min(self.group, -(-len(queue) // len(self.actors)))  # no replica left idle for want of a shard
            group, queue[:] = queue[:size], queue[size:]
            for i, shard in enumerate(group):
                ahead = (tuple(group[1:]),) if i == 0 and len(group) > 1 else ()
                self.in_flight[self.actors[slot].process.remote(shard, *ahead)] = (slot, shard)

    def result_or_retry(self, ref: ray.ObjectRef, queue: list) -> dict | None:
        """The shard's result, or None when its replica died: then every shard that replica held goes
        back to the front of the queue, in order, and a fresh replica takes the slot."""
        slot = self.in_flight[ref][0]
        try:
            result = get_or_raise_cause(ref)
        except ray.exceptions.RayActorError as err:
            refs = [r for r, (other, _) in self.in_flight.items() if other == slot]
            held = [self.in_flight.pop(r)[1] for r in refs]
            running = held[0]  # a replica runs its shards in the order handed over: the first was under way
            self.failures[running.name] = self.failures.get(running.name, 0) + 1
            if self.failures[running.name] >= MAX_SHARD_ATTEMPTS:
                raise RuntimeError(f"{running.name} failed {self.failures[running.name]} times; last error: {err}") from err
            # The retry overwrites the shard's half-written files (it was never recorded).
            console.say(f"[qsae] replica died during {running.name}; retrying it on another replica")
            ray.kill(self.actors[slot])
            self.start(slot)
            queue[:0] = held
            return None
        del self.in_flight[ref]
        return result

    def close(self) -> None:
        """Close the idle replicas' engines, end every replica, and let killed writers go."""
        busy = {slot for slot, _ in self.in_flight.values()}
        idle = [actor for slot, actor in enumerate(self.actors) if slot in self.started and slot not in busy]
        try:
            ray.get([actor.close.remote() for actor in idle], timeout=120)
        except ray.exceptions.RayError:  # timeouts included
            pass  # a replica that cannot close is killed below all the same
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor)
        if self.in_flight:
            ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=30)


def timed(started: float, done: float, unit: str) -> dict:
    """A progress postfix: `done` units per second since `started`."""
    return {f"{unit}_per_s": f"{done / max(time.time() - started, 1e-9):.0f}"}
