"""The Ray layer on a real local cluster: the capture actor pool and the per-layer Ray Train trainers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qsae.config import load_config
from qsae.distributed import plan_shards, run_capture, train_layers
from qsae.pipeline import prepare
from qsae.rollout import read_rollouts
from qsae.store import DiskSpaceError, read_layer_table, read_manifest, shard_path, write_manifest

SMALL = [
    "rollout.num_questions=12",
    "rollout.max_new_tokens=48",
    "capture.questions_per_shard=4",
    "capture.num_actors=2",
    "train.n_features=32",
    "train.k=4",
    "train.epochs=3",
    "train.batch_size=64",
]


@pytest.fixture(scope="module")
def captured(local_ray, tiny_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, SMALL + [f"out={json.dumps(str(run_dir))}"])
    questions, model_path, d_model = prepare(cfg)
    manifest = run_capture(cfg, model_path, d_model, questions, run_dir)
    return cfg, run_dir, questions, model_path, d_model, manifest


def store_keys(run_dir, layer):
    table = read_layer_table(run_dir / "activations", layer)
    return list(zip(table.column("rollout_id").to_pylist(), table.column("position").to_pylist()))


def test_every_rollout_is_captured_exactly_once(captured):
    cfg, run_dir, questions, *_ , manifest = captured
    assert sorted(manifest["shards"]) == [s.name for s in plan_shards(questions, 4)]
    rollouts = read_rollouts(run_dir / "rollouts.parquet")
    assert [r.rollout_id for r in rollouts] == list(range(12))
    assert [r.question_id for r in rollouts] == [q.uuid for q in questions]
    expected = [(r.rollout_id, r.n_prompt_tokens + i) for r in rollouts for i in range(r.n_response_tokens)]
    for layer in cfg.capture.layers:
        keys = store_keys(run_dir, layer)
        assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
        assert sum(s["rows"][str(layer)] for s in manifest["shards"].values()) == len(expected)
    assert not list(run_dir.rglob("*.tmp"))


def test_rerun_captures_only_shards_missing_from_the_manifest(captured):
    cfg, run_dir, questions, model_path, d_model, manifest = captured
    before = {layer: store_keys(run_dir, layer) for layer in cfg.capture.layers}
    kept = shard_path(run_dir / "activations", 3, "shard-00000")
    kept_mtime = kept.stat().st_mtime_ns
    # As if the driver died after shard-00001's files were written but before it was listed.
    lost = shard_path(run_dir / "activations", 3, "shard-00001")
    lost.write_bytes(b"half-written")
    partial = read_manifest(run_dir / "activations")
    del partial["shards"]["shard-00001"]
    write_manifest(run_dir / "activations", partial)

    run_capture(cfg, model_path, d_model, questions, run_dir)
    assert kept.stat().st_mtime_ns == kept_mtime, "a listed shard was captured again"
    for layer in cfg.capture.layers:
        assert store_keys(run_dir, layer) == before[layer]
    assert read_manifest(run_dir / "activations")["shards"] == manifest["shards"]


def test_a_store_of_another_model_is_not_extended(captured):
    cfg, run_dir, questions, model_path, d_model, _ = captured
    other = load_config(None, SMALL + [f"out={json.dumps(str(run_dir))}", "capture.layers=[3, 7]"])
    with pytest.raises(ValueError, match="does not match this run"):
        run_capture(other, model_path, d_model, questions, run_dir)


def test_a_store_of_another_question_sample_is_not_extended(captured):
    cfg, run_dir, _, model_path, d_model, _ = captured
    other = load_config(None, SMALL + [f"out={json.dumps(str(run_dir))}", "rollout.seed=7"])
    questions, _, _ = prepare(other)
    with pytest.raises(ValueError, match="other questions than this run"):
        run_capture(other, model_path, d_model, questions, run_dir)


def test_each_layer_trains_under_ray_train(captured):
    cfg, run_dir, *_ = captured
    trained = train_layers(cfg, run_dir)
    assert sorted(trained) == sorted(cfg.capture.layers)
    for layer, (sae, history) in trained.items():
        assert (sae.n_features, sae.k) == (32, 4)
        assert len(history["fvu"]) == 3 and history["fvu"][-1] < history["fvu"][0]
        checkpoints = list((run_dir / "checkpoints").glob(f"layer={layer}-*/checkpoint_*"))
        assert checkpoints, "Ray Train kept no checkpoint"
        assert (run_dir / "saes" / f"layer={layer}" / "history.json").exists()
        norms = np.linalg.norm(sae.W_dec.detach().numpy(), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def busy_capture_workers() -> list[int]:
    """PIDs of capture replicas in the middle of a shard: Ray titles a worker process by the method it runs."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith("ray::CaptureWorker.process"):
            pids.append(int(proc.name))
    return pids


def test_a_replica_killed_mid_shard_loses_and_duplicates_nothing(local_ray, tiny_path, tmp_path, capsys):
    cfg = load_config(None, SMALL + [f"out={json.dumps(str(tmp_path))}", "rollout.max_new_tokens=128"])
    questions, model_path, d_model = prepare(cfg)
    errors = []

    def capture():
        try:
            run_capture(cfg, model_path, d_model, questions, tmp_path)
        except BaseException as err:  # surfaced below
            errors.append(err)

    worker = threading.Thread(target=capture)
    worker.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and worker.is_alive() and time.time() < deadline:
        manifest_path = tmp_path / "activations" / "manifest.json"
        if manifest_path.exists() and read_manifest(tmp_path / "activations")["shards"]:
            busy = busy_capture_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed = busy[0]
        time.sleep(0.05)
    worker.join(timeout=600)
    assert not errors, errors
    assert killed is not None, "no replica was caught in the middle of a shard"
    assert "replica died during shard-" in capsys.readouterr().out

    rollouts = read_rollouts(tmp_path / "rollouts.parquet")
    assert [r.rollout_id for r in rollouts] == list(range(len(questions)))
    expected = sorted((r.rollout_id, r.n_prompt_tokens + i) for r in rollouts for i in range(r.n_response_tokens))
    for layer in cfg.capture.layers:
        assert sorted(store_keys(tmp_path, layer)) == expected
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_damaged_shard_is_captured_again(captured, capsys):
    cfg, run_dir, questions, model_path, d_model, _ = captured
    before = store_keys(run_dir, 7)
    damaged = shard_path(run_dir / "activations", 7, "shard-00002")
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a full disk or a bad copy
    with pytest.raises(ValueError, match="shard-00002"):
        read_layer_table(run_dir / "activations", 7)
    run_capture(cfg, model_path, d_model, questions, run_dir)
    assert "shard-00002 will be captured again" in capsys.readouterr().out
    assert store_keys(run_dir, 7) == before


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (tmpfs) to run out of; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    yield mount_point
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_disk_too_small_stops_capture_and_keeps_what_was_captured(captured, small_disk):
    cfg, run_dir, questions, model_path, d_model, manifest = captured
    store_bytes = sum(p.stat().st_size for p in run_dir.glob("activations/layer=*/*.arrow"))
    store_bytes += sum(p.stat().st_size for p in run_dir.glob("rollouts/*.parquet"))
    # Room for the first shard (and its manifest) but not for the rest at the measured rate.
    size = int(store_bytes / len(manifest["shards"]) * 1.6) + 64 * 1024
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small_disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    one_actor = load_config(None, SMALL + [f"out={json.dumps(str(small_disk))}", "capture.num_actors=1"])
    with pytest.raises(DiskSpaceError, match="MB are free") as err:
        run_capture(one_actor, model_path, d_model, questions, small_disk)
    assert "rerun with the same --out" in str(err.value)
    kept = read_manifest(small_disk / "activations")["shards"]
    assert kept and set(kept) < set(manifest["shards"])
    for shard in kept:
        assert kept[shard]["rows"] == manifest["shards"][shard]["rows"]
    assert not list(small_disk.rglob("*.tmp"))
