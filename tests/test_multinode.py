"""A whole run on a real multi-node Ray cluster: a head and two worker nodes on this machine, each with a
raylet of its own (Ray's `ray.cluster_utils.Cluster`). Capture replicas on both worker nodes write one
store; one worker node is removed while its replica holds a shard, the other replica captures that shard
again, and only then a fresh node joins; the run goes on to train and release, and its store holds
exactly the rows of an uninterrupted capture.

The cluster and its driver live in tests/multinode_run.py, run as a process of its own (a pytest
process may hold the local Ray of tests/conftest.py already); these tests read what it left.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qsae.rollout import read_rollouts
from qsae.store import read_layer_table, residual_matrix, verify_store

pytestmark = pytest.mark.slow  # Ray, subprocesses or whole runs: `make test` runs it, `make test-fast` not

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [3, 7, 11]  # the embedded default's
SHARDS = 12  # one question per shard (multinode_run.LOST_NODE_RUN)


@pytest.fixture(scope="module")
def lost_node_run(tiny_path, tmp_path_factory) -> tuple[Path, dict, str]:
    """(directory with run/ and reference/, what the driver saw of the cluster, the driver's console)."""
    out = tmp_path_factory.mktemp("multinode")
    # A Ray temp directory of its own: the cluster's address file stays out of /tmp/ray, where any
    # ray.init() without an address (the other tests' drivers) would find it. Short: Ray's sockets live there.
    ray_tmp = tempfile.mkdtemp(prefix="qsae-ray-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    # The driver and every node's workers import this checkout, as `--working-dir .` gives a cluster job.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    driver = subprocess.Popen([sys.executable, "tests/multinode_run.py", str(out)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        console, _ = driver.communicate(timeout=480)
    finally:
        try:  # whatever of the cluster outlived its driver (a failed or timed-out run)
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 0, console[-4000:]
    observed = json.loads((out / "observed.json").read_text())
    assert "removed_node" in observed, f"no worker node was removed while its replica held a shard: {observed}"
    return out, observed, console


def test_replicas_on_both_worker_nodes_write_one_store(lost_node_run):
    out, observed, _ = lost_node_run
    first, second = observed["workers"]
    # Shards finished on each worker node before one was removed (Ray's task records: the node each ran on).
    finished = observed["finished_by_node_at_removal"]
    assert finished.get(first, 0) >= 1 and finished.get(second, 0) >= 1, finished
    replicas = Counter(replica["node_id"] for replica in observed["replicas"])
    assert replicas == {first: 1, second: 1, observed["replacement_node"]: 1}  # the head holds none
    manifest = verify_store(out / "run" / "activations")
    assert sorted(manifest["shards"]) == [f"shard-{i:05d}" for i in range(SHARDS)]


def test_the_lost_shard_is_captured_again_without_waiting_for_a_new_node(lost_node_run):
    """The replica of the lost node cannot be replaced until a node joins; the surviving replica takes
    the lost shard meanwhile, and the fresh node, once it joins, takes shards too."""
    _, observed, console = lost_node_run
    removed, replacement = observed["removed_node"], observed["replacement_node"]
    assert removed in observed["workers"] and replacement not in observed["workers"]
    tasks = Counter((task["node_id"], task["state"]) for task in observed["tasks"])
    assert {key: n for key, n in tasks.items() if key[1] != "FINISHED"} == {(removed, "FAILED"): 1}
    assert sum(n for (_, state), n in tasks.items() if state == "FINISHED") == SHARDS  # each shard once
    lost = re.findall(r"replica died during (shard-\d+)", console)
    assert len(lost) == 1
    assert lost[0] not in observed["listed_at_removal"] and lost[0] in observed["listed_before_replacement"]
    assert tasks[(replacement, "FINISHED")] >= 1


def keyed_rows(store: Path, layer: int) -> dict[tuple[int, int], np.ndarray]:
    """{(rollout id, position): residual} of one layer, refusing a key stored twice."""
    table = read_layer_table(store, layer)
    keys = list(zip(table.column("rollout_id").to_pylist(), table.column("position").to_pylist()))
    assert len(set(keys)) == len(keys), f"layer {layer}: {len(keys) - len(set(keys))} rows stored twice"
    return dict(zip(keys, residual_matrix(table)))


def test_the_store_holds_exactly_the_rows_of_an_uninterrupted_capture(lost_node_run):
    out, *_ = lost_node_run
    run, reference = out / "run", out / "reference"
    assert [(r.rollout_id, r.response_token_ids) for r in read_rollouts(run / "rollouts.parquet")] == \
        [(r.rollout_id, r.response_token_ids) for r in read_rollouts(reference / "rollouts.parquet")]
    for layer in LAYERS:
        found, expected = keyed_rows(run / "activations", layer), keyed_rows(reference / "activations", layer)
        assert found.keys() == expected.keys()
        for key, row in expected.items():
            np.testing.assert_allclose(found[key], row, rtol=1e-5, atol=1e-5)
    assert not list(run.rglob("*.tmp"))


def test_the_run_trains_every_layer_on_the_whole_store_and_writes_the_release(lost_node_run):
    out, observed, _ = lost_node_run
    release = Path(observed["release"])
    assert release == out / "run" / "release" and (release / "README.md").exists()
    split = json.loads((out / "run" / "saes" / "split.json").read_text())
    assert split["rows"]["stored"] == len(keyed_rows(out / "reference" / "activations", LAYERS[0]))
    summary = json.loads((release / "final_summary.json").read_text())["layers"]
    assert sorted(map(int, summary)) == LAYERS
    for layer in LAYERS:
        assert (release / f"sae_L{layer}_n32_k4.safetensors").exists()
        assert summary[str(layer)]["train_rows"] > 0 and summary[str(layer)]["heldout_rows"] > 0


def test_each_question_has_two_sampled_rollouts_on_one_side_of_the_split(lost_node_run):
    out, observed, _ = lost_node_run
    run = out / "run"
    rollouts = read_rollouts(run / "rollouts.parquet")
    by_question: dict[str, list] = {}
    for r in rollouts:
        by_question.setdefault(r.question_id, []).append(r)
    assert len(by_question) == 12 and all(sorted(r.sample for r in rs) == [0, 1] for rs in by_question.values())
    assert len({r.generation_seed for r in rollouts}) == len(rollouts)
    # Sampled, not greedy: some question's two responses differ.
    assert any(rs[0].response_token_ids != rs[1].response_token_ids for rs in by_question.values())
    split = json.loads((run / "saes" / "split.json").read_text())
    held = set(split["heldout_rollout_ids"])
    for rs in by_question.values():
        assert len({r.rollout_id in held for r in rs}) == 1, "a question's samples fell on both sides of the split"
    # 128 new tokens: the tiny model answers some questions right and some wrong, so every layer's
    # correctness statistics are computed, with labels permuted within questions.
    levels = json.loads((Path(observed["release"]) / "final_summary.json").read_text())["layers"]
    for layer in LAYERS:
        level = levels[str(layer)]["rollout_level"]
        assert level["reason"] is None and level["permuted_within_questions"] is True, level
