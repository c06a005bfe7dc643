"""The thin Ray layer: each module places plain stage functions on a cluster and does nothing else.

- shard_pool: a pool of model replicas (actors) over shards, a dead replica's shard retried;
- capture_pool: capture on it over question shards (qsae.capture), with the store's exactly-once
  bookkeeping;
- encode_pool: the encode pass on it over the store's shards (qsae.encode);
- trainers: one Ray Train TorchTrainer per layer (qsae.training);
- model_tasks: the evaluation (qsae.evaluate) and the causal check's reruns (qsae.causal), as tasks
  placed like a capture replica;
- resources: what the run asks Ray for against what the cluster has, and what pending work waits for;
- connect: joining or starting Ray.
"""
from __future__ import annotations

import ray
import torch

from qsae.config import CaptureConfig


def get_or_raise_cause(refs, timeout: float | None = None):
    """ray.get, but a task's error that says the input is wrong (ValueError, OSError) is raised as
    itself, so it reaches the user as one line, not as a remote traceback."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (ValueError, OSError)):
            raise err.cause from None
        raise


def replica_options(capture: CaptureConfig) -> dict:
    """Ray placement of anything that loads the model: what one capture replica is given (on a
    cluster the driver's node may have no GPU, or too little memory)."""
    return {"num_cpus": capture.cpus_per_actor, "num_gpus": capture.gpus_per_actor}


def deal(items: list, hands: int) -> list[list]:
    """Items dealt round-robin into at most `hands` non-empty groups (one per task)."""
    return [items[i::hands] for i in range(min(hands, len(items)))]


def use_threads(cpus: float) -> None:
    """As many torch threads as the Ray CPUs this process was given (at least one)."""
    torch.set_num_threads(max(1, int(cpus)))
