"""The train stage on a cluster: one Ray Train TorchTrainer per layer, as many at once as the cluster
holds, each with one worker or several data-parallel ones streaming the layer's rows from the store.

The work is qsae.training's train_sae; this module names each layer's run so that a rerun resumes
exactly the same training, reports and checkpoints through Ray Train, and salvages what a killed
driver left behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch

from qsae import console
from qsae.config import TrainStageConfig
from qsae.distributed import get_or_raise_cause, use_threads
from qsae.distributed.resources import WaitNotes, next_ready, trainer_request
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sample import RowRules, plan_split
from qsae.store import read_manifest
from qsae.training.state import check_training_memory, load_training_state, run_key
from qsae.training.trained import TrainedSAE, recipe_settings, save_trained

CHECKPOINT_FILE = "train_state.pt"
# GPU workers get a process group with a CPU backend beside NCCL (Ray Train's default for GPUs is NCCL
# alone, which refuses any collective on a host tensor); CPU-only torch builds have no NCCL at all.
GPU_PROCESS_GROUP = "cpu:gloo,cuda:nccl"
CPU_PROCESS_GROUP = "gloo"


@dataclass(frozen=True)
class LayerJob:
    """One layer's training, as its Ray Train workers receive it."""

    layer: int
    layers: tuple[int, ...]  # every captured layer: a token masked at any layer is masked at all
    train: TrainStageConfig
    run: RunDir
    salvaged_checkpoint: str | None = None  # where Ray Train's own record was lost (salvage_checkpoint)


def quiet_ray_train_logs() -> None:
    """Ray Train's INFO lines (one per report, with every metric in it) drown the progress bars. Some
    of its modules name their logger by file path (logging.getLogger(__file__)), out of reach of the
    "ray.train" logger and of RunConfig's LoggingConfig, so those are quieted by name."""
    for name in ["ray.train", *logging.root.manager.loggerDict]:
        if name == "ray.train" or "/ray/train/" in name.replace("\\", "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_layer_worker(config: dict) -> None:
    """Ray Train worker loop for one layer: stream its training rows from the store, resume from the
    run's last checkpoint if there is one, report metrics every report_every_steps steps and a
    checkpoint every checkpoint_every_steps steps (and at the end)."""
    import ray.train
    import ray.train.torch

    from qsae.sample import training_rows
    from qsae.streaming import StoreSource
    from qsae.training.loop import UnusableRowsError, train_saes

    quiet_ray_train_logs()
    job: LayerJob = config["job"]
    use_threads(job.train.resources_per_worker()["CPU"])
    device = str(ray.train.torch.get_device()) if job.train.device == "auto" else job.train.device
    trainers = [dataclasses.replace(t, device=device) for t in job.train.trainers()]  # this worker's GPU under use_gpu
    rows = training_rows(job.run, list(job.layers))
    is_rank_zero = ray.train.get_context().get_world_rank() == 0
    try:
        train_saes(StoreSource(job.run.store, job.layer, rows), trainers, on_step=reporter(job.train, is_rank_zero),
                   resume=resume_state(job))
    except UnusableRowsError as err:  # the same on every retry: end the run with it instead of retrying
        if is_rank_zero:
            note = job.run.unusable_rows_note(job.layer)
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(str(err))


def resume_state(job: LayerJob) -> dict | None:
    """The checkpoint Ray Train hands a restarted worker, else the salvaged one, else None."""
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            return load_training_state(Path(directory) / CHECKPOINT_FILE)
    if job.salvaged_checkpoint:
        return load_training_state(Path(job.salvaged_checkpoint) / CHECKPOINT_FILE)
    return None


def reporter(train: TrainStageConfig, is_rank_zero: bool):
    """train_sae's on_step: metrics to Ray Train every report_every_steps steps, and a checkpoint
    every checkpoint_every_steps steps and at the end (written by rank 0: the weights are identical)."""

    def on_step(progress) -> None:
        # Every worker reports at the same steps: reports are barriers, metrics() a collective.
        save = progress.done or progress.step % train.checkpoint_every_steps == 0
        if not (save or progress.step % train.report_every_steps == 0):
            return
        metrics = progress.metrics()
        if not save:
            ray.train.report(metrics)
            return
        state = progress.checkpoint()
        with tempfile.TemporaryDirectory() as directory:
            if is_rank_zero:
                torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if is_rank_zero else None)

    return on_step


def train_run_name(job: LayerJob, rules: RowRules) -> str:
    """Ray Train resumes a run of the same name from its last checkpoint. Name it by everything that
    shapes the result, so a rerun resumes only the very same training and never a stale one."""
    manifest = read_manifest(job.run.store)
    rows = sum(shard["rows"][str(job.layer)] for shard in manifest["shards"].values())
    key = json.dumps([[run_key(t) for t in job.train.trainers()], asdict(rules), list(job.layers), rows], sort_keys=True)
    return f"layer={job.layer}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def checkpoint_damage(directory: Path) -> str | None:
    """Why a checkpoint's train_state.pt would not load (missing, truncated, bytes changed), or None.
    Checked as the zip archive torch.save writes, its directory and every record's CRC-32, read in
    blocks: nothing is loaded, so checking a run's checkpoints on every rerun costs one read of them."""
    path = directory / CHECKPOINT_FILE
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as err:
        return f"{path} is unreadable ({err})"
    return None if failed is None else f"{path} is damaged (its record {failed} fails its CRC)"


def salvage_checkpoint(experiment_dir: Path) -> str | None:
    """Ray Train rewrites its run snapshot in place, so a run killed while writing it can leave it
    empty, or naming a checkpoint it had just deleted, and the next run's controller then fails to
    start. A checkpoint the snapshot names may not load either (a train_state.pt truncated by a full
    disk or a bad copy), and Ray Train would hand it to the restarted workers on every try. Such a
    snapshot is removed, with the checkpoints that do not load, and the path of the furthest
    checkpoint that loads returned, for the workers to resume from; None where the snapshot and the
    checkpoints it names are sound (or there is no snapshot)."""
    snapshot = experiment_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    try:
        named = [entry["checkpoint_dir_name"] for entry in json.loads(snapshot.read_text())["checkpoint_results"]]
        sound = all((experiment_dir / name).is_dir() for name in named)
    except (ValueError, KeyError, TypeError):
        sound = False
    if sound:
        damaged = {name: reason for name in named if (reason := checkpoint_damage(experiment_dir / name))}
        if not damaged:
            return None
        for name in damaged:
            shutil.rmtree(experiment_dir / name)
        what = (f"{'; '.join(damaged.values())}: removed {'that checkpoint' if len(damaged) == 1 else 'those checkpoints'} "
                f"and {snapshot.name}")
    else:
        what = f"{snapshot} was damaged by an interrupted run; removed"
    snapshot.unlink()
    steps = {}
    for directory in experiment_dir.glob("checkpoint_*"):
        try:
            steps[directory] = load_training_state(directory / CHECKPOINT_FILE)["history"]["steps"]
        except (ValueError, KeyError):
            continue  # a checkpoint the kill left half-written
    console.say(f"[qsae] {what}, resuming from the furthest checkpoint that loads "
                f"({max(steps.values()) if steps else 0} steps)")
    return str(max(steps, key=steps.get)) if steps else None


def layer_trainer(job: LayerJob, name: str):
    """One layer's TorchTrainer: workers_per_layer workers (gloo on CPU; on GPU nccl, and gloo for
    host tensors) sharing the layer's resources, checkpoints under <run>/checkpoints, restarts from
    the last one on a crash."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = job.train
    use_gpu = train.gpus_per_layer > 0
    return TorchTrainer(
        train_layer_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend=GPU_PROCESS_GROUP if use_gpu else CPU_PROCESS_GROUP),
        scaling_config=ScalingConfig(num_workers=train.workers_per_layer, use_gpu=use_gpu,
                                     resources_per_worker=train.resources_per_worker()),
        run_config=RunConfig(name=name, storage_path=str(job.run.checkpoints),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=train.max_failures)),
    )


def final_state(result) -> dict:
    """The training state in a Ray Train result's last checkpoint."""
    with result.checkpoint.as_directory() as directory:
        return load_training_state(Path(directory) / CHECKPOINT_FILE)


@ray.remote(num_cpus=0)
def fit_layer(job: LayerJob, name: str) -> dict:
    """Train one layer (a task, so that every layer's trainer runs at once); its final state."""
    note = job.run.unusable_rows_note(job.layer)
    note.unlink(missing_ok=True)
    result = layer_trainer(job, name).fit()
    if note.exists():
        raise ValueError(f"layer {job.layer}: {note.read_text()}")
    if result.checkpoint is None and job.salvaged_checkpoint:  # the salvaged one was the last step: nothing new
        return load_training_state(Path(job.salvaged_checkpoint) / CHECKPOINT_FILE)
    return final_state(result)


def concurrent_layers(train: TrainStageConfig, cluster: dict[str, float]) -> int:
    """How many layers' trainers the cluster's CPUs and GPUs hold at once (at least one: Ray says
    what a layer lacks if the cluster cannot hold it). More would only wait, each with a driver
    task and a Ray Train controller of its own (64 of them for every layer of a 27B model)."""
    fits = [cluster.get("CPU", 0.0) / train.cpus_per_layer]
    if train.gpus_per_layer > 0:
        fits.append(cluster.get("GPU", 0.0) / train.gpus_per_layer)
    return max(1, math.floor(min(fits) + 1e-9))


def check_trainer_memory(train: TrainStageConfig, d_in: int) -> None:
    """Before any trainer allocates: an SAE of this size trains within the memory a worker is given,
    checked in a task placed like one (it sees that worker's GPUs, or its node's host memory)."""
    trainers, share = train.trainers(), train.gpus_per_layer / train.workers_per_layer

    def probe() -> None:
        from qsae.models import memory_budget

        device = trainers[0].device if trainers[0].device != "auto" else ("cuda" if share else "cpu")
        capacity, described = memory_budget(device)
        if device.startswith("cuda") and share < 1:  # a fraction of one GPU
            capacity, described = int(capacity * share), f"{share:g} of {described}"
        check_training_memory(trainers, d_in, (capacity, described))

    resources = train.resources_per_worker()
    get_or_raise_cause(ray.remote(probe).options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0)).remote())


def trained_from_state(state: dict, trainers: list) -> TrainedSAE:
    """A layer's SAEs from its final checkpoint: the configured one, the sweep's others beside it."""
    primary, *others = [(state, trainers[0])] + list(zip(state.get("sweep", []), trainers[1:]))

    def one(member: dict, cfg) -> TrainedSAE:
        sae = TopKSAE.from_tensors(member["sae_state"], cfg.k, cfg.architecture)
        return TrainedSAE(sae, member["history"], recipe_settings(cfg))

    return dataclasses.replace(one(*primary), sweep=[one(*member) for member in others])


def train_layers(train: TrainStageConfig, rules: RowRules, layers: list[int], run: RunDir) -> dict[int, TrainedSAE]:
    """Split the rollouts by question (saes/split.json), then train every layer's SAE on its training
    rows, as many layers at once as the cluster holds (concurrent_layers), the next starting when one
    ends; each is kept in the run directory as it finishes."""
    plan_split(run, layers, rules)
    waiting, pending, trained = list(layers), {}, {}
    at_once = concurrent_layers(train, ray.cluster_resources())
    notes = WaitNotes("train", trainer_request(train))
    with console.progress(total=len(waiting), desc="train", unit="layer") as bar:
        while waiting or pending:
            while waiting and len(pending) < at_once:
                layer = waiting.pop(0)
                job = LayerJob(layer, tuple(layers), train, run)
                name = train_run_name(job, rules)
                job = dataclasses.replace(job, salvaged_checkpoint=salvage_checkpoint(run.checkpoints / name))
                pending[fit_layer.remote(job, name)] = layer
            ref = next_ready(list(pending), notes)
            layer = pending.pop(ref)
            state = get_or_raise_cause(ref)
            trained[layer] = trained_from_state(state, train.trainers())
            save_trained(run, layer, trained[layer])
            bar.set_postfix(layer=layer, fvu=f"{state['history']['fvu'][-1]:.3f}")
            bar.update(1)
    return trained
