"""What the run asks Ray for, against what the cluster has: a request no node can hold would wait
forever (Ray only logs the autoscaler's lines), so it is refused with the setting that asks for it,
unless an autoscaler may still add a node that holds it (a cluster joined rather than started here,
whose nodes have the node types of an autoscaling config): then the run says what it waits for. A request that waits says so, every so often."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import ray

from qsae import console
from qsae.config import CaptureConfig, TrainStageConfig

WAIT_NOTE_S = 120.0  # seconds without a result before a "still waiting" line
WAIT_POLL_S = 5.0


@dataclass(frozen=True)
class Request:
    """`count` bundles of resources Ray must place at once, and the settings that ask for them."""

    what: str  # e.g. "a capture replica"
    settings: str  # e.g. "capture.cpus_per_actor = 4, capture.gpus_per_actor = 0"
    bundle: dict[str, float]
    count: int = 1


def replica_request(capture: CaptureConfig) -> Request:
    """A model replica: a capture actor, or an evaluation or causal task placed like one."""
    return Request("a model replica", f"capture.cpus_per_actor = {capture.cpus_per_actor:g}, capture.gpus_per_actor = "
                   f"{capture.gpus_per_actor:g}", {"CPU": capture.cpus_per_actor, "GPU": capture.gpus_per_actor})


def trainer_request(train: TrainStageConfig) -> Request:
    """One layer's trainer: its data-parallel workers, placed together."""
    return Request(f"one layer's {train.workers_per_layer} trainer worker(s)",
                   f"train.cpus_per_layer = {train.cpus_per_layer:g}, train.gpus_per_layer = {train.gpus_per_layer:g}, "
                   f"train.workers_per_layer = {train.workers_per_layer}", train.resources_per_worker(),
                   train.workers_per_layer)


def bundles_that_fit(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many copies of `bundle` one node's resources hold."""
    needed = {name: amount for name, amount in bundle.items() if amount > 0}
    if not needed:
        return 1 << 30
    return min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in needed.items())


def describe(resources: dict[str, float]) -> str:
    shown = {name: amount for name, amount in resources.items() if name in ("CPU", "GPU") and amount > 0}
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(shown.items())) or "nothing"


def infeasible(request: Request, nodes: list[dict[str, float]]) -> str | None:
    """Why no placement of the request exists on these nodes' total resources; None where one does."""
    fits = sum(bundles_that_fit(request.bundle, node) for node in nodes)
    if fits >= request.count:
        return None
    largest = "; ".join(describe(node) for node in nodes) or "no node"
    each = f"{request.count} x " if request.count > 1 else ""
    return (f"{request.settings} asks for {each}{describe(request.bundle)} for {request.what}, which the Ray cluster "
            f"cannot hold (its nodes: {largest})")


def alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def configured_node_types(type_names: list[str], node_ids: list[str]) -> bool:
    """Whether nodes carry node type names of an autoscaling config (the cluster launcher's and
    KubeRay's groups), rather than the name Ray gives a node nobody configured: node_<its id>."""
    return any(name and name != f"node_{node_id}" for name, node_id in zip(type_names, node_ids))


def may_grow() -> bool:
    """Whether an autoscaler may add nodes to this cluster; where Ray cannot say, assume it may."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # a semi-public API: an answer it cannot give is no reason to refuse
        return True
    nodes = status.active_nodes + status.idle_nodes + status.pending_nodes
    return configured_node_types([n.ray_node_type_name for n in nodes], [n.node_id for n in nodes])


def check_schedulable(requests: list[Request], *, joined: bool) -> None:
    """Refuse a request the cluster cannot hold (ValueError); on a joined cluster an autoscaler may
    grow, say instead that the run waits for a node that can."""
    nodes = alive_nodes()
    can_grow = joined and may_grow()
    for request in requests:
        reason = infeasible(request, nodes)
        if reason is None:
            continue
        if not can_grow:
            raise ValueError(f"{reason}; lower the setting or give the cluster the resources")
        console.warn(f"{reason} now; the run waits until a node that can joins the cluster")


class WaitNotes:
    """A line every WAIT_NOTE_S seconds while nothing comes back: what waits, what it needs, and what
    Ray has free (all of it busy: the work waits for resources; some free: it is only slow)."""

    def __init__(self, what: str, request: Request):
        self.what, self.request, self.since = what, request, time.time()

    def progress(self) -> None:
        self.since = time.time()

    def idle(self) -> None:
        waited = time.time() - self.since
        if waited >= WAIT_NOTE_S:
            console.say(f"[qsae] {self.what}: nothing finished in {waited:.0f} s; {self.request.what} needs "
                        f"{describe(self.request.bundle)} each, the cluster has {describe(ray.available_resources())} "
                        f"free of {describe(ray.cluster_resources())}")
            self.since = time.time()


def next_ready(refs: list, notes: WaitNotes):
    """The first of `refs` to finish, with a note every WAIT_NOTE_S seconds while none does."""
    while True:
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_POLL_S)
        if ready:
            notes.progress()
            return ready[0]
        notes.idle()


def all_ready(refs: list, notes: WaitNotes) -> None:
    """Until every one of `refs` has finished, with notes as next_ready's."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_POLL_S)
        notes.progress() if ready else notes.idle()
