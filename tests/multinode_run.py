"""A whole run on a Ray cluster of a head and two worker nodes on this machine (Ray's own multi-node
test cluster, `ray.cluster_utils.Cluster`: a raylet and an object store per node), one worker node
lost while its capture replica holds a shard, its shard captured again on the other, and only then a
fresh node joining in its place; then an
uninterrupted capture of the same questions on the same cluster, to compare with.

tests/test_multinode.py runs this as a process of its own: its driver joins the cluster it starts,
which a pytest process already connected to a local Ray (tests/conftest.py) cannot. It writes what it
saw of the cluster to DIR/observed.json; the test reads that and the two run directories.

    python tests/multinode_run.py DIR
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from qsae import console
from qsae.config import load_config
from qsae.distributed.capture_pool import run_capture
from qsae.pipeline import resolve, run_pipeline
from qsae.rundir import RunDir
from qsae.store import read_manifest

ROOT = Path(__file__).resolve().parent.parent
# Two sampled rollouts per question: the shard retried on the new node must sample the tokens it sampled
# on the lost one, and the uninterrupted capture too.
RUN = ["rollout.num_questions=12", "rollout.samples_per_question=2", "rollout.temperature=0.8",
       "rollout.max_new_tokens=128", "capture.num_actors=2", "capture.cpus_per_actor=1",
       "train.n_features=32", "train.k=4", "train.epochs=3", "train.batch_size=64", "release.bootstrap=20",
       "release.permutations=50", "causal.features=1", "causal.questions=2", "autointerp.enabled=false"]
# One question per shard: each replica takes several shards, so one can be caught between its first
# finished shard and its last.
LOST_NODE_RUN = ["capture.questions_per_shard=1"]
REPLICA_TASK = "CaptureWorker.process"
# A node that stops answering is declared dead after 3 missed health checks 0.5 s apart (Ray's
# defaults: 5 of 3 s), so the run does not wait out the default before the lost shard is retried.
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster() -> tuple[Cluster, list]:
    """A head that runs the driver alone (no CPUs for work, so every replica lands on a worker node)
    and two worker nodes of one logical CPU each: one replica (capture.cpus_per_actor = 1) per node.
    No shutdown hooks: they would set a SIGTERM handler, which only the main thread may, and end a
    node's processes with the thread that started them, while the replacement node is started from
    the watching thread. The test ends whatever is left by the process group."""
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
                                      "_system_config": FAST_NODE_DEATH})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    return cluster, workers


def job_runtime_env() -> dict:
    """What `ray job submit --runtime-env cluster/runtime_env.yaml` gives a job: its environment variables
    (the working directory is this checkout already)."""
    return {"env_vars": yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["env_vars"]}


def replica_tasks() -> list:
    return list_tasks(filters=[("func_or_class_name", "=", REPLICA_TASK)], limit=1000)


def process_title(pid: int) -> str:
    """Ray titles a worker process by the actor method it runs while it runs one."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def frozen_mid_shard(pid: int) -> bool:
    """Stop the replica's process; True, leaving it stopped, where it is in the middle of a shard (it
    can then neither finish the shard nor start another before its node goes)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:  # a replica the pool has ended
        return False
    if process_title(pid) == f"ray::{REPLICA_TASK}":
        return True
    os.kill(pid, signal.SIGCONT)
    return False


class NodeLoss:
    """Watches the capture replicas; once a shard has finished on each worker node, removes a worker
    node whose replica holds a shard, then adds a fresh node of the same shape, as the autoscaler does
    for the cluster files' worker groups (their minimum is their size: min_workers, minReplicas)."""

    def __init__(self, cluster: Cluster, workers: list, store: Path):
        self.cluster, self.workers, self.store = cluster, workers, store
        self.observed: dict = {}
        self.said: list[str] = []  # the driver's own console lines, as the pool reports a death
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        try:
            self.remove_one_busy_node()
        except Exception as err:  # noqa: BLE001 (a thread's error would be lost; the test shows it)
            self.observed = {"watch_error": repr(err)}

    def remove_one_busy_node(self) -> None:
        while not self.done.is_set():
            tasks = replica_tasks()
            finished = Counter(t.node_id for t in tasks if t.state == "FINISHED")
            if all(finished[node.node_id] for node in self.workers):
                for task in tasks:
                    node = next((n for n in self.workers if n.node_id == task.node_id), None)
                    if task.state == "RUNNING" and node and task.worker_pid and frozen_mid_shard(task.worker_pid):
                        self.remove(node, task.worker_pid, dict(finished))
                        return
            time.sleep(0.2)

    def remove(self, node, pid: int, finished: dict) -> None:
        listed = listed_shards(self.store)
        self.cluster.remove_node(node, allow_graceful=False)
        os.kill(pid, signal.SIGKILL)  # a lost machine takes its processes with it; a stopped one would wait
        # The fresh node joins only once the surviving replica has captured the lost shard (back at the
        # front of the queue once the pool sees the replica dead): the run must not wait for the node.
        while not self.done.is_set():
            lost = [m.group(1) for line in self.said if (m := re.search(r"replica died during (shard-\d+)", line))]
            if lost and lost[0] in listed_shards(self.store):
                break
            time.sleep(0.2)
        before_replacement = listed_shards(self.store)
        # The survivor waits (stopped) while the fresh node starts its replica, so that shards are left
        # for it however long a node takes to start on this machine.
        survivor = next((a.pid for a in capture_replicas() if a.node_id != node.node_id and a.pid), None)
        if survivor:
            os.kill(survivor, signal.SIGSTOP)
        try:
            replacement = self.cluster.add_node(num_cpus=1)
            deadline = time.time() + 120
            while (time.time() < deadline and not self.done.is_set()
                   and not any(a.node_id == replacement.node_id for a in capture_replicas())):
                time.sleep(0.2)
        finally:
            if survivor:
                os.kill(survivor, signal.SIGCONT)
        self.observed = {"removed_node": node.node_id, "finished_by_node_at_removal": finished,
                         "listed_at_removal": listed, "listed_before_replacement": before_replacement,
                         "replacement_node": replacement.node_id}


def capture_replicas() -> list:
    """The capture replicas Ray has constructed and still runs."""
    return list_actors(filters=[("class_name", "=", "CaptureWorker"), ("state", "=", "ALIVE")], limit=1000)


def listed_shards(store: Path) -> list[str]:
    """The shards the store's manifest lists (none before the first is written)."""
    return sorted(read_manifest(store)["shards"]) if (store / "manifest.json").exists() else []


def capture_record(timeout_s: float = 15.0) -> dict:
    """The run's capture replicas (the actor table: every one, dead or alive) and their shard tasks, once
    every task's end has reached the state API (Ray reports task states every second or so)."""
    deadline = time.time() + timeout_s
    tasks = replica_tasks()
    while any(t.state not in ("FINISHED", "FAILED") for t in tasks) and time.time() < deadline:
        time.sleep(0.2)
        tasks = replica_tasks()
    actors = list_actors(filters=[("class_name", "=", "CaptureWorker")], limit=1000)
    return {"replicas": [{"actor_id": a.actor_id, "node_id": a.node_id, "state": a.state} for a in actors],
            "tasks": [{"node_id": t.node_id, "state": t.state, "actor_id": t.actor_id} for t in tasks]}


def main(out: Path) -> None:
    cluster, workers = start_cluster()
    try:
        ray.init(address=cluster.address, runtime_env=job_runtime_env(), log_to_driver=False)
        cfg = load_config(None, [*RUN, *LOST_NODE_RUN, f"out={json.dumps(str(out / 'run'))}",
                                 f"ray_address={json.dumps(cluster.address)}"])
        loss = NodeLoss(cluster, workers, RunDir(cfg.out).store)
        say = console.say
        console.say = lambda text: (loss.said.append(text), say(text))[-1]
        loss.thread.start()
        try:
            release = run_pipeline(cfg)
        finally:
            loss.done.set()
            loss.thread.join()
        observed = {"workers": [node.node_id for node in workers], "release": str(release), **loss.observed,
                    **capture_record()}
        reference = load_config(None, [*RUN, f"out={json.dumps(str(out / 'reference'))}"])
        plan = resolve(reference)
        run_capture(plan.spec, plan.questions, RunDir(reference.out))
        (out / "observed.json").write_text(json.dumps(observed, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
