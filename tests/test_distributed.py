"""The Ray layer on a real local cluster: the capture actor pool and the per-layer Ray Train trainers."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import small_run
import torch
from planted import planted_rows

from qsae.capture import plan_shards, special_token_ids
from qsae.config import load_config
from qsae.distributed.capture_pool import run_capture
from qsae.distributed.encode_pool import run_encode
from qsae.encode import encode_settings, encoded_layer, encoding_identity
from qsae.models import load_tokenizer
from qsae.distributed.trainers import (
    CHECKPOINT_FILE,
    LayerJob,
    final_state,
    layer_trainer,
    train_layers,
    train_run_name,
)
from qsae.pipeline import prepare, resolve
from qsae.rollout import Rollout, read_rollouts, write_rollouts
from qsae.rundir import RunDir
from qsae.sample import RowRules, plan_split, training_rows
from qsae.store import (
    DiskSpaceError,
    ShardRows,
    damaged_shards,
    new_manifest,
    read_layer_table,
    read_manifest,
    residual_matrix,
    shard_path,
    write_manifest,
    write_shard,
)
from qsae.streaming import StoreSource
from qsae.training.loop import train_sae
from qsae.training.trained import load_trained

pytestmark = pytest.mark.slow  # Ray, subprocesses or whole runs: `make test` runs it, `make test-fast` not

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


def capture(cfg, questions, run_dir: Path) -> dict:
    """The capture stage of cfg's run, for `questions`, into run_dir."""
    return run_capture(resolve(cfg).spec, questions, RunDir(run_dir))


def train(cfg, run_dir: Path) -> dict[int, tuple]:
    """The train stage of cfg's run in run_dir: {layer: (sae, history)}."""
    trained = train_layers(cfg.train, RowRules.from_config(cfg), list(cfg.capture.layers), RunDir(run_dir))
    return {layer: (t.sae, t.history) for layer, t in trained.items()}


def trainer(cfg, run_dir: Path):
    """Layer 0's Ray Train trainer, named as the train stage names it."""
    job = LayerJob(0, tuple(cfg.capture.layers), cfg.train, RunDir(run_dir))
    return layer_trainer(job, train_run_name(job, RowRules.from_config(cfg)))


@pytest.fixture(scope="module")
def captured(local_ray, tiny_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, SMALL + [f"out={json.dumps(str(run_dir))}"])
    questions = prepare(cfg).questions
    manifest = capture(cfg, questions, run_dir)
    return cfg, run_dir, questions, manifest


def store_keys(run_dir, layer):
    table = read_layer_table(run_dir / "activations", layer)
    return list(zip(table.column("rollout_id").to_pylist(), table.column("position").to_pylist()))


def test_every_rollout_is_captured_exactly_once(captured):
    cfg, run_dir, questions, manifest = captured
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
    # Every file a shard owns is listed with its checksum, and matches it.
    for entry in manifest["shards"].values():
        assert sorted(entry["checksums"]["layers"]) == sorted(map(str, cfg.capture.layers))
        assert len(entry["checksums"]["rollouts"]) == 64  # sha256, hex
    assert damaged_shards(run_dir / "activations", manifest, RunDir(run_dir).rollout_part) == {}


def test_rerun_captures_only_shards_missing_from_the_manifest(captured):
    cfg, run_dir, questions, manifest = captured
    before = {layer: store_keys(run_dir, layer) for layer in cfg.capture.layers}
    kept = shard_path(run_dir / "activations", 3, "shard-00000")
    kept_mtime = kept.stat().st_mtime_ns
    # As if the driver died after shard-00001's files were written but before it was listed.
    lost = shard_path(run_dir / "activations", 3, "shard-00001")
    lost.write_bytes(b"half-written")
    partial = read_manifest(run_dir / "activations")
    del partial["shards"]["shard-00001"]
    write_manifest(run_dir / "activations", partial)

    capture(cfg, questions, run_dir)
    assert kept.stat().st_mtime_ns == kept_mtime, "a listed shard was captured again"
    for layer in cfg.capture.layers:
        assert store_keys(run_dir, layer) == before[layer]
    again = read_manifest(run_dir / "activations")["shards"]
    assert sorted(again) == sorted(manifest["shards"])
    for shard, entry in manifest["shards"].items():  # the checksums are the new files'
        assert {k: v for k, v in again[shard].items() if k != "checksums"} == \
            {k: v for k, v in entry.items() if k != "checksums"}
    assert damaged_shards(run_dir / "activations", read_manifest(run_dir / "activations"), RunDir(run_dir).rollout_part) == {}


@pytest.mark.parametrize("change, field", [("capture.layers=[3, 7]", "layers"),
                                           ("rollout.max_new_tokens=25", "generated_with"),
                                           ("model.dtype=bfloat16", "generated_with"),
                                           ("capture.keep_per_rollout=5", "kept_positions")])
def test_a_store_captured_differently_is_not_extended(captured, change, field):
    cfg, run_dir, questions, _ = captured
    before = (run_dir / "activations" / "manifest.json").read_text()
    other = load_config(None, SMALL + [f"out={json.dumps(str(run_dir))}", change])
    with pytest.raises(ValueError, match=f"captured differently \\({field}: store has"):
        capture(other, questions, run_dir)
    assert (run_dir / "activations" / "manifest.json").read_text() == before


def test_a_store_of_another_question_sample_is_not_extended(captured, tmp_path):
    cfg, run_dir, _, _ = captured
    other = load_config(None, SMALL + [f"out={json.dumps(str(run_dir))}", "rollout.seed=7"])
    with pytest.raises(ValueError, match="other questions than this run"):
        prepare(other)  # before Ray starts
    elsewhere = load_config(None, SMALL + [f"out={json.dumps(str(tmp_path))}", "rollout.seed=7"])
    questions = prepare(elsewhere).questions
    with pytest.raises(ValueError, match="other questions than this run"):
        capture(other, questions, run_dir)


def test_each_layer_trains_under_ray_train(captured):
    cfg, run_dir, *_ = captured
    trained = train(cfg, run_dir)
    assert sorted(trained) == sorted(cfg.capture.layers)
    for layer, (sae, history) in trained.items():
        assert (sae.n_features, sae.k) == (32, 4)
        assert len(history["fvu"]) == 3 and history["fvu"][-1] < history["fvu"][0]
        checkpoints = list((run_dir / "checkpoints").glob(f"layer={layer}-*/checkpoint_*"))
        assert checkpoints, "Ray Train kept no checkpoint"
        assert (run_dir / "saes" / f"layer={layer}" / "history.json").exists()
        norms = np.linalg.norm(sae.W_dec.detach().numpy(), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def ray_workers_titled(prefix: str) -> list[int]:
    """PIDs of Ray worker processes whose title starts with prefix: Ray titles a worker by its actor
    class, and by the method it runs while it runs one."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith(prefix):
            pids.append(int(proc.name))
    return pids


def busy_capture_workers() -> list[int]:
    """PIDs of capture replicas in the middle of a shard."""
    return ray_workers_titled("ray::CaptureWorker.process")


def captured_rows(run_dir: Path, layers: list[int]) -> dict[int, dict[tuple[int, int], np.ndarray]]:
    """{layer: {(rollout id, position): residual}}, refusing a key stored twice."""
    rows = {}
    for layer in layers:
        table = read_layer_table(run_dir / "activations", layer)
        keys = list(zip(table.column("rollout_id").to_pylist(), table.column("position").to_pylist()))
        assert len(set(keys)) == len(keys), f"layer {layer}: {len(keys) - len(set(keys))} rows stored twice"
        rows[layer] = dict(zip(keys, residual_matrix(table)))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replicas_killed_at_random_points_lose_and_duplicate_nothing(captured, tmp_path, capsys, seed):
    """Replicas SIGKILLed at seeded random moments while they hold a shard; the store then holds
    exactly the rows of the uninterrupted capture (`captured`, same questions), each once, equal.
    With seed 2 each replica is handed two shards at a time, rolled out in one engine call."""
    reference_cfg, reference_dir, questions, _ = captured
    grouped = ["rollout.prompts_in_flight=4"] if seed == 2 else []
    cfg = load_config(None, SMALL + [f"out={json.dumps(str(tmp_path))}", "capture.questions_per_shard=2", *grouped])
    rng = np.random.default_rng(seed)
    errors, kills = [], []

    def capture_in_thread():
        try:
            capture(cfg, questions, tmp_path)
        except BaseException as err:  # surfaced below
            errors.append(err)

    worker = threading.Thread(target=capture_in_thread)
    worker.start()
    deadline = time.time() + 300
    while len(kills) < 2 and worker.is_alive() and time.time() < deadline:
        time.sleep(rng.uniform(0.5, 3.0))
        if busy := busy_capture_workers():
            victim = int(rng.choice(busy))
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
    worker.join(timeout=600)
    assert not errors, errors
    assert kills, "no replica was caught in the middle of a shard"
    assert capsys.readouterr().out.count("replica died during shard-") >= 1

    expected, found = captured_rows(reference_dir, cfg.capture.layers), captured_rows(tmp_path, cfg.capture.layers)
    for layer in cfg.capture.layers:
        assert found[layer].keys() == expected[layer].keys()
        for key, row in expected[layer].items():
            np.testing.assert_allclose(found[layer][key], row, rtol=1e-5, atol=1e-5)
    print(f"seed {seed}: {len(kills)} kills survived; rows expected {sum(map(len, expected.values()))}, "
          f"found {sum(map(len, found.values()))}, duplicates 0")
    assert not list(tmp_path.rglob("*.tmp"))


def trained_copy(captured, root: Path) -> tuple:
    """The captured run copied to root, with each layer's SAE trained there (in this process)."""
    cfg, run_dir, *_ = captured
    shutil.copytree(run_dir, root)
    cfg = load_config(None, SMALL + [f"out={json.dumps(str(root))}"])
    plan = resolve(cfg)
    small_run.train(cfg, plan, RunDir(root))
    return cfg, plan


def test_a_killed_encode_replica_loses_nothing(captured, tmp_path, capsys):
    """The encode pass over the captured store on the replica pool, one replica SIGKILLed while it
    holds a shard: the shard is encoded again and the merged encoding equals an uninterrupted pass's."""
    cfg, plan = trained_copy(captured, tmp_path / "reference")
    settings = encode_settings(RunDir(tmp_path / "reference"), cfg.release, special_token_ids(
        load_tokenizer(plan.spec.model_path, None)))
    run_encode(plan.spec, RunDir(tmp_path / "reference"), settings)
    shutil.copytree(tmp_path / "reference", tmp_path / "killed", ignore=shutil.ignore_patterns("encoded"))
    killed = RunDir(tmp_path / "killed")
    spec = resolve(load_config(None, SMALL + [f"out={json.dumps(str(killed.root))}"])).spec
    errors, kills = [], []

    def encode_in_thread():
        try:
            run_encode(spec, killed, settings)
        except BaseException as err:  # surfaced below
            errors.append(err)

    worker = threading.Thread(target=encode_in_thread)
    worker.start()
    deadline = time.time() + 300
    while not kills and worker.is_alive() and time.time() < deadline:
        if busy := ray_workers_titled("ray::EncodeWorker.process"):
            os.kill(busy[0], signal.SIGKILL)
            kills.append(busy[0])
        time.sleep(0.05)
    worker.join(timeout=600)
    assert not errors, errors
    assert kills, "no encode replica was caught in the middle of a shard"
    assert capsys.readouterr().out.count("replica died during shard-") == 1
    layers = list(plan.layers)
    reference = RunDir(tmp_path / "reference")
    identity = encoding_identity(reference, layers, settings)
    assert encoding_identity(killed, layers, settings) == identity
    for layer in layers:
        mine, theirs = encoded_layer(killed, layer, identity), encoded_layer(reference, layer, identity)
        for name in ("rollout_ids", "n_tokens", "max", "mean", "fire_fraction"):
            np.testing.assert_array_equal(getattr(mine.pool, name), getattr(theirs.pool, name))
        for a, b in ((mine.stream.top, theirs.stream.top), (mine.stream.sample, theirs.stream.sample)):
            for x, y in zip(a.astuple(), b.astuple()):
                np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(mine.stream.counts, theirs.stream.counts)
        np.testing.assert_array_equal(mine.window_acts, theirs.window_acts)
        assert len(mine.pool.rollout_ids) == 12  # every rollout, each once
    assert not list(killed.root.rglob("*.tmp"))


def test_a_model_that_will_not_load_fails_capture_once_with_its_reason(local_ray, tiny_path, tmp_path, capsys):
    """Weights whose headers read (so the checks before Ray pass) but whose shapes do not fit the
    model: the first shard fails with the loader's reason in one line, and no replica is retried."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    tensors = load_file(model / "model.safetensors")
    name = next(n for n in tensors if n.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(None, SMALL + [f"out={json.dumps(str(tmp_path / 'run'))}", f"model.name={json.dumps(str(model))}"])
    questions = prepare(cfg).questions
    started = time.time()
    with pytest.raises(ValueError, match="could not load the weights of model") as err:
        capture(cfg, questions, tmp_path / "run")
    assert "\n" not in str(err.value) and not isinstance(err.value, ray.exceptions.RayError)
    assert time.time() - started < 120
    assert not (tmp_path / "run" / "activations" / "manifest.json").exists()  # no shard was listed
    assert "replica died" not in capsys.readouterr().out  # failed once: no replica was replaced


def zero_fill(path: Path, size: int = 8192) -> None:
    """`size` bytes of zeros written into the middle of a file, its length unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - size // 2
    data[start:start + size] = bytes(size)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["shard truncated", "shard zeroed", "rollout part truncated", "rollout part deleted"])
def test_a_damaged_shard_is_captured_again(captured, capsys, damage):
    """A shard whose Arrow file or rollout part is truncated (a full disk, a bad copy), deleted, or
    has a region zeroed with its length unchanged (which the Arrow reader and the row count pass) is
    captured again whole on a rerun, with a line saying so; the other shards are kept."""
    cfg, run_dir, questions, _ = captured
    run = RunDir(run_dir)
    before = {layer: store_keys(run_dir, layer) for layer in cfg.capture.layers}
    rollouts = read_rollouts(run.rollouts)
    kept = shard_path(run.store, 7, "shard-00000")
    kept_mtime = kept.stat().st_mtime_ns
    if damage.startswith("shard"):
        damaged = shard_path(run.store, 7, "shard-00002")
        size = damaged.stat().st_size
        if damage == "shard truncated":
            damaged.write_bytes(damaged.read_bytes()[:100])
            with pytest.raises(ValueError, match="shard-00002"):
                read_layer_table(run.store, 7)
        else:
            assert size > 3 * 8192
            zero_fill(damaged)
            table = read_layer_table(run.store, 7)  # the reader and the row count pass: only the checksum tells
            assert (np.abs(residual_matrix(table)).sum(axis=1) == 0).any()
    else:
        damaged = run.rollout_part("shard-00002")
        if damage == "rollout part truncated":
            damaged.write_bytes(damaged.read_bytes()[:100])
        else:
            damaged.unlink()
    capture(cfg, questions, run_dir)
    out = capsys.readouterr().out
    assert f"{damaged}" in out and "shard-00002 will be captured again" in out
    assert "will be captured again" not in out.replace("shard-00002 will be captured again", "")
    assert kept.stat().st_mtime_ns == kept_mtime, "an intact shard was captured again"
    for layer in cfg.capture.layers:
        assert store_keys(run_dir, layer) == before[layer]
    assert [r.rollout_id for r in read_rollouts(run.rollouts)] == [r.rollout_id for r in rollouts]
    assert damaged_shards(run.store, read_manifest(run.store), run.rollout_part) == {}


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (tmpfs) to run out of; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    yield mount_point
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_disk_too_small_stops_capture_and_keeps_what_was_captured(captured, small_disk):
    cfg, run_dir, questions, manifest = captured
    store_bytes = sum(p.stat().st_size for p in run_dir.glob("activations/layer=*/*.arrow"))
    store_bytes += sum(p.stat().st_size for p in run_dir.glob("rollouts/*.parquet"))
    # Room for the first shard (and its manifest) but not for the rest at the measured rate.
    size = int(store_bytes / len(manifest["shards"]) * 1.6) + 64 * 1024
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small_disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    one_actor = load_config(None, SMALL + [f"out={json.dumps(str(small_disk))}", "capture.num_actors=1"])
    with pytest.raises(DiskSpaceError, match="MB are free") as err:
        capture(one_actor, questions, small_disk)
    assert "rerun with the same --out" in str(err.value)
    kept = read_manifest(small_disk / "activations")["shards"]
    assert kept and set(kept) < set(manifest["shards"])
    for shard in kept:
        assert kept[shard]["rows"] == manifest["shards"][shard]["rows"]
    assert not list(small_disk.rglob("*.tmp"))


# --- Training from a planted store: data parallel, per-step metrics, kill and resume -----------------

PLANTED_D, PLANTED_ATOMS = 16, 48


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A run directory whose store holds planted rows for layer 0 in three shards, and a config that
    trains on them in a few dozen steps, reporting every 5 and checkpointing every 10."""
    run_dir = tmp_path_factory.mktemp("planted")
    store_dir = run_dir / "activations"
    manifest = new_manifest("planted", None, [0], PLANTED_D, dtype="float32")
    for i, n_rows in enumerate((2000, 1500, 1700)):
        rows = planted_rows(n_rows, PLANTED_D, PLANTED_ATOMS, 3, seed=10 + i, atom_seed=0)
        written = write_shard(store_dir, 0, f"shard-{i:05d}", ShardRows(np.full(n_rows, i), np.arange(n_rows), np.zeros(n_rows), np.zeros(n_rows, bool), rows), dtype="float32")
        manifest["shards"][f"shard-{i:05d}"] = {"questions": [], "rollouts": 1, "rows": {"0": written}}
    write_manifest(store_dir, manifest)
    write_rollouts([planted_rollout(i) for i in range(3)], run_dir / "rollouts.parquet")
    overrides = [f"out={json.dumps(str(run_dir))}", "capture.layers=[0]", "train.n_features=64", "train.k=3",
                 "train.epochs=4", "train.batch_size=256", "train.shuffle_buffer_rows=2048", "train.dead_after_steps=8",
                 "train.report_every_steps=5", "train.checkpoint_every_steps=10", "train.cpus_per_layer=1",
                 "capture.max_norm_multiple=0"]  # every planted row trains, but the held-out rollout's
    return run_dir, overrides


def planted_rollout(rollout_id: int) -> Rollout:
    """A rollout record for the planted rows of one shard: a question of its own, no tokens."""
    return Rollout(rollout_id=rollout_id, question_id=f"q{rollout_id}", prompt="", response="", predicted_letter=None,
                   letter_from_final_line=False, answer_letter="A", finish_reason="stop", outcome="no_answer",
                   correct=False, n_prompt_tokens=0, n_response_tokens=0, engine="planted", seed=0,
                   sample=0, generation_seed=None, prompt_token_ids=[], response_token_ids=[])


def linked_run(run_dir: Path, cfg, tmp_path: Path) -> Path:
    """A run directory at tmp_path sharing the planted store and rollouts, with the split planned."""
    (tmp_path / "activations").symlink_to(run_dir / "activations")
    (tmp_path / "rollouts.parquet").symlink_to(run_dir / "rollouts.parquet")
    plan_split(RunDir(tmp_path), cfg.capture.layers, RowRules.from_config(cfg))
    return tmp_path


@pytest.mark.parametrize("damage", ["emptied", "names_a_deleted_checkpoint", "train_state_truncated"])
def test_a_run_snapshot_damaged_by_a_kill_is_salvaged_and_training_resumes(local_ray, planted_run, tmp_path, capsys,
                                                                           damage):
    """Ray Train rewrites checkpoint_manager_snapshot.json in place: a driver killed mid-write left it
    empty in a real run, and the rerun's controller could not start. A checkpoint whose train_state.pt
    was truncated (a full disk, a bad copy) was handed to every restarted worker: four failures, then a
    traceback. The rerun now resumes from the furthest checkpoint that loads, to the same final state."""
    run_dir, overrides = planted_run
    cfg = load_config(None, overrides + [f"out={json.dumps(str(tmp_path))}", "train.epochs=2"])
    linked_run(run_dir, cfg, tmp_path)
    first = train(cfg, tmp_path)[0][1]
    [snapshot] = (tmp_path / "checkpoints").glob("layer=0-*/checkpoint_manager_snapshot.json")
    checkpoints = sorted(p for p in snapshot.parent.glob("checkpoint_*") if p.is_dir())
    if damage == "train_state_truncated":  # the snapshot is sound; the checkpoint it resumes from is not
        state = checkpoints[-1] / CHECKPOINT_FILE
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    else:
        shutil.rmtree(checkpoints[-1])  # the snapshot names a checkpoint the kill deleted; an earlier one stays
    if damage == "emptied":
        snapshot.write_text("")
    capsys.readouterr()
    again = train(cfg, tmp_path)[0][1]
    assert again["resumed_at_steps"] and again["steps"] == first["steps"]
    assert again["fvu"][-1] == pytest.approx(first["fvu"][-1], abs=1e-3)
    said = capsys.readouterr().out
    assert "resuming from the furthest checkpoint that loads" in said
    if damage == "train_state_truncated":
        assert f"{checkpoints[-1] / CHECKPOINT_FILE} is unreadable" in said and not checkpoints[-1].exists()


def test_rows_no_retry_can_fix_end_training_at_once_with_one_line(local_ray, tmp_path):
    """Rows that do not vary: the workers see it in their first pass and the run ends with that
    reason, not after train.max_failures restarts of the same failure."""
    store_dir = tmp_path / "activations"
    manifest = new_manifest("planted", None, [0], PLANTED_D, dtype="float32")
    for i in range(3):
        rows = np.ones((300, PLANTED_D), np.float32)
        written = write_shard(store_dir, 0, f"shard-{i:05d}", ShardRows(np.full(300, i), np.arange(300), np.zeros(300), np.zeros(300, bool), rows), dtype="float32")
        manifest["shards"][f"shard-{i:05d}"] = {"questions": [], "rollouts": 1, "rows": {"0": written}}
    write_manifest(store_dir, manifest)
    write_rollouts([planted_rollout(i) for i in range(3)], tmp_path / "rollouts.parquet")
    cfg = load_config(None, [f"out={json.dumps(str(tmp_path))}", "capture.layers=[0]", "train.n_features=8",
                             "train.k=2", "train.max_failures=3", "capture.max_norm_multiple=0"])
    with pytest.raises(ValueError) as err:
        train(cfg, tmp_path)
    assert not isinstance(err.value, ray.exceptions.RayError)
    assert str(err.value).startswith("layer 0: the 600 training row(s) do not vary")


def uninterrupted(cfg, run_dir: Path) -> tuple:
    """The same training in this process, without Ray and with the threads a worker has: (sae, history)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.train.resources_per_worker()["CPU"])))
    try:
        return train_sae(StoreSource(run_dir / "activations", 0, training_rows(RunDir(run_dir), cfg.capture.layers)),
                         cfg.train.trainer())
    finally:
        torch.set_num_threads(threads)


def test_ray_train_reports_per_step_metrics_and_checkpoints_every_n_steps(local_ray, planted_run, tmp_path):
    run_dir, overrides = planted_run
    cfg = load_config(None, overrides + [f"out={json.dumps(str(tmp_path))}"])
    linked_run(run_dir, cfg, tmp_path)
    result = trainer(cfg, tmp_path).fit()
    state = final_state(result)
    history = state["history"]
    total = history["steps"]
    held = json.loads((tmp_path / "saes" / "split.json").read_text())["heldout_rollout_ids"]
    assert len(held) == 1  # one of the three planted rollouts (shards) is held out: round(0.2 x 3)
    assert total == cfg.train.epochs * -(-(5200 - (2000, 1500, 1700)[held[0]]) // 256)
    assert len(history["step_fvu"]) == total  # one FVU per step
    # The last report carries the steps since the one before it, at report_every_steps spacing.
    assert result.metrics["step"] == total
    assert len(result.metrics["step_fvu"]) == total - (total - 1) // 5 * 5
    assert result.metrics["step_fvu"] == history["step_fvu"][-len(result.metrics["step_fvu"]):]
    kept = sorted(p for p in (tmp_path / "checkpoints").glob("layer=0-*/checkpoint_*") if p.is_dir())
    assert len(kept) == 2  # num_to_keep
    steps = sorted(torch.load(p / CHECKPOINT_FILE, weights_only=False)["history"]["steps"] for p in kept)
    assert steps[-1] == total and steps[0] == (total - 1) // 10 * 10
    sae, reference = uninterrupted(cfg, tmp_path)
    assert history["fvu"] == reference["fvu"]  # Ray Train runs the very same training


def test_data_parallel_workers_train_one_layer_like_one_worker(local_ray, planted_run, tmp_path):
    run_dir, overrides = planted_run
    # fp32: a bf16 matmul over half the batch may round otherwise than over all of it (AMX, oneDNN blocking)
    cfg = load_config(None, overrides + [f"out={json.dumps(str(tmp_path))}", "train.workers_per_layer=2",
                                         "train.autocast_bf16=false"])
    linked_run(run_dir, cfg, tmp_path)
    state = final_state(trainer(cfg, tmp_path).fit())
    sae, reference = uninterrupted(cfg, tmp_path)
    history = state["history"]
    assert history["steps"] == reference["steps"] and history["tokens_seen"] == reference["tokens_seen"]
    # The same batches, gradients averaged over two halves: equal up to floating-point order, step by
    # step at first; a TopK pick that a last bit flips makes the weights drift apart over epochs (seen:
    # entries 0.012 apart after 4), while every dictionary row keeps its direction.
    np.testing.assert_allclose(history["step_fvu"][:10], reference["step_fvu"][:10], rtol=1e-4)
    assert abs(history["fvu"][-1] - reference["fvu"][-1]) < 1e-3
    data_parallel, alone = state["sae_state"]["W_dec"].numpy(), sae.W_dec.detach().numpy()
    cosines = (data_parallel * alone).sum(1) / np.linalg.norm(data_parallel, axis=1) / np.linalg.norm(alone, axis=1)
    assert cosines.min() > 0.999, cosines.min()


def test_gpu_trainers_get_a_process_group_that_takes_host_and_device_tensors(local_ray, planted_run, tmp_path):
    """Ray Train gives GPU workers NCCL alone by default, which refuses every collective on a host
    tensor ("No backend type associated with device type cpu"). CI has no GPU to start NCCL, so this
    reads the process group a GPU layer's trainer asks for, as torch itself parses it."""
    from torch.distributed.distributed_c10d import BackendConfig

    run_dir, overrides = planted_run
    for gpus, workers in ((2, 2), (0.5, 1)):
        cfg = load_config(None, overrides + [f"out={json.dumps(str(tmp_path))}", f"train.gpus_per_layer={gpus}",
                                             f"train.workers_per_layer={workers}"])
        gpu_trainer = trainer(cfg, run_dir)
        assert gpu_trainer.scaling_config.use_gpu
        backends = BackendConfig(gpu_trainer.backend_config.backend).get_device_backend_map()
        assert backends == {"cpu": "gloo", "cuda": "nccl"}


def train_workers() -> list[int]:
    """PIDs of Ray Train worker processes."""
    return ray_workers_titled("ray::RayTrainWorker")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_trainer_resumes_from_its_last_checkpoint(local_ray, planted_run, tmp_path, workers):
    run_dir, overrides = planted_run
    # fp32: bf16 matmuls over a worker's share may round otherwise than over the whole batch
    cfg = load_config(None, overrides + [f"out={json.dumps(str(tmp_path))}", "train.epochs=8",
                                         f"train.workers_per_layer={workers}", "train.autocast_bf16=false"])
    (tmp_path / "activations").symlink_to(run_dir / "activations")
    (tmp_path / "rollouts.parquet").symlink_to(run_dir / "rollouts.parquet")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(train(cfg, tmp_path)))
    thread.start()
    deadline, killed = time.time() + 240, []
    while not killed and time.time() < deadline and thread.is_alive():
        # The controller writes its snapshot once it has registered a checkpoint: kill only after that.
        if list((tmp_path / "checkpoints").glob("layer=0-*/checkpoint_manager_snapshot.json")) and (pids := train_workers()):
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed = pids
        time.sleep(0.2)
    thread.join(timeout=300)
    assert killed, "training ended before a checkpoint could be interrupted"
    sae, history = outcome[0]
    assert history["resumed_at_steps"], "the restarted worker did not resume from a checkpoint"
    assert all(step % 10 == 0 for step in history["resumed_at_steps"])
    reference_sae, reference = uninterrupted(cfg, tmp_path)
    # Every epoch's pooled FVU, including the one the kill interrupted, as in the uninterrupted run; two
    # workers' gradient sums round otherwise than one's, which TopK picks amplify over 8 epochs (seen:
    # 1.2e-3 by the last), while a resume that lost its state would repeat an earlier epoch (>= 0.01 higher).
    np.testing.assert_allclose(history["fvu"], reference["fvu"], atol=1e-3 if workers == 1 else 5e-3)
    assert len(history["step_fvu"]) == reference["steps"]


def test_as_many_layers_train_at_once_as_the_cluster_holds():
    from qsae.config import TrainStageConfig
    from qsae.distributed.trainers import concurrent_layers

    assert concurrent_layers(TrainStageConfig(cpus_per_layer=0.5), {"CPU": 2.0}) == 4
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    assert concurrent_layers(TrainStageConfig(cpus_per_layer=2, gpus_per_layer=0.33), one_gpu) == 3
    assert concurrent_layers(TrainStageConfig(cpus_per_layer=2, gpus_per_layer=1), {"CPU": 64.0, "GPU": 16.0}) == 16
    assert concurrent_layers(TrainStageConfig(cpus_per_layer=8, gpus_per_layer=1), {"CPU": 64.0, "GPU": 16.0}) == 8
    assert concurrent_layers(TrainStageConfig(cpus_per_layer=1, gpus_per_layer=1), {"CPU": 4.0}) == 1  # Ray says why


def test_work_that_waits_for_resources_says_what_it_waits_for(local_ray, monkeypatch, capsys):
    """Every CPU held by another actor: a task placed like a replica waits, and the wait says what it
    needs and what the cluster has free, until the CPUs come back and the task finishes."""
    from qsae.config import CaptureConfig
    from qsae.distributed import resources

    monkeypatch.setattr(resources, "WAIT_NOTE_S", 0.5)
    monkeypatch.setattr(resources, "WAIT_POLL_S", 0.2)

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(num_cpus=ray.cluster_resources()["CPU"]).remote()
    ray.get(holder.ready.remote())
    request = resources.replica_request(CaptureConfig(cpus_per_actor=1))
    task = ray.remote(lambda: "done").options(num_cpus=1).remote()
    threading.Timer(3.0, lambda: ray.kill(holder)).start()
    ref = resources.next_ready([task], resources.WaitNotes("capture", request))
    assert ray.get(ref) == "done"
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[qsae] capture: nothing finished")]
    assert notes and "a model replica needs 1 CPU each, the cluster has nothing free of 4 CPU" in notes[0]


def test_a_local_ray_is_not_taken_for_a_cluster_that_may_grow(local_ray):
    from qsae.distributed.resources import may_grow

    assert may_grow() is False  # its one node has no node type of an autoscaling config


def test_a_model_task_runs_each_call_in_a_fresh_worker(local_ray):
    """The evaluation and causal tasks load the model: each call's worker exits after it, so nothing it
    held (a GPU's cached memory) outlives the call, whereas a plain task's worker is reused."""
    from qsae.distributed.model_tasks import model_task

    def worker_pid() -> int:  # defined here: Ray ships it by value (this module is not importable there)
        return os.getpid()

    options = {"num_cpus": 1, "num_gpus": 0}
    fresh = [ray.get(model_task(worker_pid).options(**options).remote()) for _ in range(3)]
    reused = [ray.get(ray.remote(worker_pid).options(**options).remote()) for _ in range(3)]
    assert len(set(fresh)) == 3 and len(set(reused)) < 3


def test_a_replica_handed_several_shards_dies_and_none_is_lost_or_run_twice(local_ray, tmp_path, capsys):
    """The pool hands each replica a group of shards (so an engine can roll them out in one call): 8
    shards, 2 replicas, groups of up to 3. The replica that starts shard-00003 (the head of the second
    group) dies on it the first time; the shards it held, started or not, go back to the queue, each is
    then done once, and only the one under way counts a failure."""
    from qsae.capture import QuestionShard
    from qsae.config import CaptureConfig
    from qsae.distributed.shard_pool import ShardPool

    class Recorder:  # defined here: Ray ships it by value (this module is not importable there)
        def __init__(self, log: Path):
            self.log = log

        def process(self, shard, ahead=()):
            (self.log / f"{shard.name}.{os.getpid()}.{time.time_ns()}").write_text(",".join(s.name for s in ahead))
            if shard.name == "shard-00003" and not (self.log / "died").exists():
                (self.log / "died").touch()
                os._exit(1)
            time.sleep(0.2)
            return {"pid": os.getpid(), "ahead": [s.name for s in ahead]}

        def close(self):
            pass

    shards = [QuestionShard(f"shard-{i:05d}", i, []) for i in range(8)]
    done = []
    ShardPool(Recorder, (tmp_path,), CaptureConfig(num_actors=2, cpus_per_actor=1), "test", group=3).run(
        shards, lambda shard, result: done.append((shard.name, result)))
    assert sorted(name for name, _ in done) == [s.name for s in shards]  # each once
    starts = {s.name: len(list(tmp_path.glob(f"{s.name}.*"))) for s in shards}
    assert starts == {s.name: 2 if s.name == "shard-00003" else 1 for s in shards}
    heads = {name: result["ahead"] for name, result in done if result["ahead"]}
    assert heads["shard-00000"] == ["shard-00001", "shard-00002"]  # groups of 3 while 2 replicas have 8 to share
    assert all(len(ahead) <= 2 for ahead in heads.values())
    out = capsys.readouterr().out
    assert out.count("replica died during") == 1 and "replica died during shard-00003" in out


def test_a_sweep_trains_every_shape_of_a_layer_in_its_one_ray_train_run(local_ray, planted_run, tmp_path):
    """train.sweep: the layer's one Ray Train run trains the configured SAE and the sweep's others on
    the same batches; each is kept in the run directory and equals that shape trained alone here."""
    run_dir, overrides = planted_run
    cfg = load_config(None, overrides + [f"out={json.dumps(str(tmp_path))}", "train.sweep.n_features=[32, 64]",
                                         "train.sweep.k=[3, 6]"])
    linked_run(run_dir, cfg, tmp_path)
    trained = train_layers(cfg.train, RowRules.from_config(cfg), [0], RunDir(tmp_path))[0]
    kept = load_trained(RunDir(tmp_path), 0)
    shapes = [(t.sae.n_features, t.sae.k) for t in kept.sweep]
    assert (kept.sae.n_features, kept.sae.k) == (64, 3) and sorted(shapes) == [(32, 3), (32, 6), (64, 6)]
    assert sorted(p.name for p in (tmp_path / "saes" / "layer=0" / "sweep").iterdir()) == [
        "n=32-k=3", "n=32-k=6", "n=64-k=6"]
    for member in [kept, *kept.sweep]:
        alone_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, n_features=member.sae.n_features,
                                                                       k=member.sae.k, sweep=None))
        sae, history = uninterrupted(alone_cfg, tmp_path)
        assert member.history["fvu"] == history["fvu"], (member.sae.n_features, member.sae.k)
        np.testing.assert_array_equal(member.sae.W_dec.detach().numpy(), sae.W_dec.detach().numpy())
    assert [(m.sae.n_features, m.sae.k) for m in trained.sweep] == [(32, 3), (32, 6), (64, 6)]  # the sweep's order
