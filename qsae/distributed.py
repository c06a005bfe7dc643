"""The thin Ray layer: a capture actor pool over question shards, and one Ray Train trainer per layer.

The work itself lives in plain functions (capture.capture_question_shard, train.train_sae); this module
only places them on a cluster, keeps the store's exactly-once bookkeeping, and reports progress.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from qsae.capture import QuestionShard, capture_question_shard, load_replica, store_to_extend
from qsae.config import PipelineConfig, TrainStageConfig
from qsae.engines import Generation
from qsae.models import check_fits, memory_budget, parameter_count
from qsae.questions import Question
from qsae.sae import TopKSAE
from qsae.rollout import read_rollouts, write_rollouts
from qsae.store import (
    DiskSpaceError,
    damaged_shards,
    free_bytes,
    read_manifest,
    remove_stale_temporaries,
    row_bytes,
    write_manifest,
)

MAX_SHARD_ATTEMPTS = 3


def get_or_raise_cause(refs, timeout: float | None = None):
    """ray.get, but a task's error that says the input is wrong (ValueError, OSError) is raised as
    itself, so it reaches the user as one line, not as a remote traceback."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (ValueError, OSError)):
            raise err.cause from None
        raise


class CaptureWorker:
    """One model replica: loads the model on its first shard (so that a model which will not load
    fails that task once, rather than killing replica after replica), then captures whole shards."""

    def __init__(self, model_path: str, cfg: PipelineConfig, run_dir: str):
        torch.set_num_threads(max(1, int(cfg.capture.cpus_per_actor)))
        self.model_path, self.cfg, self.run_dir = model_path, cfg, Path(run_dir)
        self.replica = None

    def process(self, shard: QuestionShard) -> dict:
        self.replica = self.replica or load_replica(self.model_path, self.cfg)
        return capture_question_shard(self.replica, shard.name, shard.questions, shard.first_id, self.cfg, self.run_dir)

    def close(self) -> None:
        """Stop the engine's own processes (vLLM's engine core holds the GPU), so that the trainers
        after capture find the GPU free rather than waiting on a killed actor's orphans."""
        if self.replica is not None and hasattr(self.replica.engine, "close"):
            self.replica.engine.close()


def run_capture(cfg: PipelineConfig, model_path: str, d_model: int, questions: list[Question], run_dir: Path) -> dict:
    """Capture every shard not yet listed in the manifest; returns the final manifest."""
    store_dir = run_dir / "activations"
    remove_stale_temporaries(run_dir)
    manifest, shards = store_to_extend(cfg, model_path, d_model, questions, run_dir)
    if manifest["shards"]:
        for shard, reason in damaged_shards(store_dir, manifest).items():
            tqdm.write(f"[qsae] {reason}: {shard} will be captured again")
            del manifest["shards"][shard]
        write_manifest(store_dir, manifest)
    pending = [s for s in shards if s.name not in manifest["shards"]]
    if not pending:
        print(f"[qsae] capture: all {len(shards)} shards are in the store already; nothing to capture", flush=True)
    else:
        check_replica_fits(cfg, model_path)
        warn_if_disk_may_not_fit(cfg, d_model, sum(len(s.questions) for s in pending), run_dir)
        run_actor_pool(cfg, model_path, pending, manifest, store_dir, run_dir)
    rollout_parts = [run_dir / "rollouts" / f"{s.name}.parquet" for s in shards]
    write_rollouts(read_rollouts(*rollout_parts), run_dir / "rollouts.parquet")
    return manifest


def check_replica_fits(cfg: PipelineConfig, model_path: str) -> None:
    """Before starting replicas: do the weights fit the memory of one replica's resources? Checked in a
    task placed like a replica (it sees that replica's GPUs), so a misconfiguration fails once, clearly."""

    def probe() -> None:
        check_fits(cfg.model.name, parameter_count(model_path), cfg.model.dtype, memory_budget(cfg.model.device))

    task = ray.remote(probe).options(num_cpus=cfg.capture.cpus_per_actor, num_gpus=cfg.capture.gpus_per_actor)
    get_or_raise_cause(task.remote())


def warn_if_disk_may_not_fit(cfg: PipelineConfig, d_model: int, n_questions: int, run_dir: Path) -> None:
    """Before the run: the worst case (every response at max_new_tokens) against free space. Only a
    warning, since responses are usually shorter; the measured rate is checked after every shard."""
    worst = n_questions * cfg.rollout.max_new_tokens * len(cfg.capture.layers) * row_bytes(d_model, cfg.capture.dtype)
    free = free_bytes(run_dir)
    print(f"[qsae] store estimate: at most {worst / 1e9:.2f} GB for {n_questions} questions; {free / 1e9:.2f} GB free")
    if worst > free:
        print("[qsae] warning: the worst case does not fit; capture stops cleanly if the measured rate will not fit")


def check_disk_projection(done_bytes: int, done_questions: int, remaining_questions: int, run_dir: Path) -> None:
    """After a shard: will the remaining questions fit at the rate measured so far (with 5% to spare)?"""
    needed = done_bytes / done_questions * remaining_questions * 1.05
    free = free_bytes(run_dir)
    if needed > free:
        raise DiskSpaceError(
            f"the activation store needs about {needed / 1e6:.1f} MB more for {remaining_questions} questions "
            f"but only {free / 1e6:.1f} MB are free at {run_dir}; the shards captured so far are kept: "
            "free some space and rerun with the same --out to continue"
        )


def run_actor_pool(
    cfg: PipelineConfig, model_path: str, pending: list[QuestionShard], manifest: dict, store_dir: Path, run_dir: Path
) -> None:
    """Feed shards to a pool of replicas, one shard in flight per replica (backpressure). A shard whose
    replica dies goes back on the queue and a new replica takes its place; the manifest lists a shard only
    after all of its files are in place, so nothing is counted twice or lost."""
    actor_cls = ray.remote(CaptureWorker).options(
        num_cpus=cfg.capture.cpus_per_actor, num_gpus=cfg.capture.gpus_per_actor
    )

    def new_replica():
        return actor_cls.remote(model_path, cfg, str(run_dir))

    actors = [new_replica() for _ in range(min(cfg.capture.num_actors, len(pending)))]
    queue = list(pending)
    attempts = {shard.name: 0 for shard in pending}
    remaining = sum(len(shard.questions) for shard in pending)
    in_flight: dict[ray.ObjectRef, tuple[int, QuestionShard]] = {}
    tokens, done_bytes, done_questions, started = 0, 0, 0, time.time()
    try:
        with tqdm(total=len(pending), desc="capture", unit="shard") as bar:
            while queue or in_flight:
                busy = {slot for slot, _ in in_flight.values()}
                for slot, actor in enumerate(actors):
                    if queue and slot not in busy:
                        shard = queue.pop(0)
                        attempts[shard.name] += 1
                        in_flight[actor.process.remote(shard)] = (slot, shard)
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                slot, shard = in_flight.pop(ref)
                try:
                    result = get_or_raise_cause(ref)
                except ray.exceptions.RayActorError as err:
                    if attempts[shard.name] >= MAX_SHARD_ATTEMPTS:
                        raise RuntimeError(f"{shard.name} failed {attempts[shard.name]} times; last error: {err}") from err
                    # A fresh replica in the dead one's place; the shard goes back on the queue, and
                    # its half-written files are overwritten by the retry (it was never listed).
                    tqdm.write(f"[qsae] replica died during {shard.name}; retrying it on a new replica")
                    ray.kill(actors[slot])
                    actors[slot] = new_replica()
                    queue.append(shard)
                    continue
                manifest["shards"][shard.name] = {
                    "questions": [q.uuid for q in shard.questions],
                    "rollouts": result["rollouts"],
                    "rows": result["rows"],
                }
                write_manifest(store_dir, manifest)
                tokens += result["response_tokens"]
                done_bytes += result["bytes"]
                done_questions += result["rollouts"]
                remaining -= result["rollouts"]
                bar.set_postfix(tokens_per_s=f"{tokens / (time.time() - started):.0f}")
                bar.update(1)
                if remaining:
                    check_disk_projection(done_bytes, done_questions, remaining, run_dir)
    finally:
        idle = [actor for slot, actor in enumerate(actors) if slot not in {s for s, _ in in_flight.values()}]
        try:
            ray.get([actor.close.remote() for actor in idle], timeout=120)
        except ray.exceptions.RayError:  # timeouts included
            pass  # a replica that cannot close is killed below all the same
        for actor in actors:
            ray.kill(actor)
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight), timeout=30)  # let killed writers go
        remove_stale_temporaries(run_dir)


# ----------------------------------------------------------------------------------------------
# Training: one Ray Train TorchTrainer per layer, all launched at once, each with one worker or
# several data-parallel ones, streaming its rows from the store.

CHECKPOINT_FILE = "train_state.pt"
# GPU workers get a process group with a CPU backend beside NCCL (Ray Train's default for GPUs is NCCL
# alone, which refuses any collective on a host tensor); CPU-only torch builds have no NCCL at all.
GPU_PROCESS_GROUP = "cpu:gloo,cuda:nccl"
CPU_PROCESS_GROUP = "gloo"


def unusable_rows_note(run_dir: Path, layer: int) -> Path:
    """Where a worker leaves the reason its rows cannot train, instead of failing in a way Ray Train
    would retry (the run directory is on storage every node mounts)."""
    return run_dir / "checkpoints" / f"layer={layer}.unusable.txt"


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
    from qsae.store import StoreSource
    from qsae.train import UnusableRowsError, load_training_state, train_sae

    quiet_ray_train_logs()
    cfg = TrainStageConfig(**config["train"])
    torch.set_num_threads(max(1, int(cfg.resources_per_worker()["CPU"])))
    if cfg.device == "auto":
        cfg.device = str(ray.train.torch.get_device())  # this worker's GPU under use_gpu, else the CPU
    run_dir, layer = Path(config["run_dir"]), config["layer"]
    rows = training_rows(run_dir, config["layers"])
    resume = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            resume = load_training_state(Path(directory) / CHECKPOINT_FILE)
    elif config["salvaged_checkpoint"]:
        resume = load_training_state(Path(config["salvaged_checkpoint"]) / CHECKPOINT_FILE)
    is_rank_zero = ray.train.get_context().get_world_rank() == 0

    def on_step(progress) -> None:
        # Every worker reports at the same steps: reports are barriers, metrics() a collective.
        save = progress.done or progress.step % cfg.checkpoint_every_steps == 0
        if not (save or progress.step % cfg.report_every_steps == 0):
            return
        metrics = progress.metrics()
        if not save:
            ray.train.report(metrics)
            return
        state = progress.checkpoint()
        with tempfile.TemporaryDirectory() as directory:
            if is_rank_zero:  # one copy of the (identical) weights
                torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if is_rank_zero else None)

    try:
        train_sae(StoreSource(run_dir / "activations", layer, rows), cfg, on_step=on_step, resume=resume)
    except UnusableRowsError as err:  # the same on every retry: end the run with it instead of retrying
        if is_rank_zero:
            note = unusable_rows_note(run_dir, layer)
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(str(err))


def train_run_name(layer: int, cfg: PipelineConfig, run_dir: str) -> str:
    """Ray Train resumes a run of the same name from its last checkpoint. Name it by everything that
    shapes the result, so a rerun resumes only the very same training and never a stale one."""
    from qsae.sample import RowRules
    from qsae.train import run_key

    manifest = read_manifest(Path(run_dir) / "activations")
    rows = sum(shard["rows"][str(layer)] for shard in manifest["shards"].values())
    key = json.dumps([run_key(cfg.train), asdict(RowRules.from_config(cfg)), cfg.capture.layers, rows],
                     sort_keys=True)
    return f"layer={layer}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def checkpoint_storage(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def salvage_checkpoint(experiment_dir: Path) -> str | None:
    """Ray Train rewrites its run snapshot in place, so a run killed while writing it can leave it
    empty, or naming a checkpoint it had just deleted, and the next run's controller then fails to
    start. Such a snapshot is removed, and the path of the furthest checkpoint that loads returned,
    for the workers to resume from; None where the snapshot is sound (or absent)."""
    from qsae.train import load_training_state

    snapshot = experiment_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    try:
        named = [entry["checkpoint_dir_name"] for entry in json.loads(snapshot.read_text())["checkpoint_results"]]
        if all((experiment_dir / name).is_dir() for name in named):
            return None
    except (ValueError, KeyError, TypeError):
        pass
    snapshot.unlink()
    steps = {}
    for directory in experiment_dir.glob("checkpoint_*"):
        try:
            steps[directory] = load_training_state(directory / CHECKPOINT_FILE)["history"]["steps"]
        except (ValueError, KeyError):
            continue  # a checkpoint the kill left half-written
    tqdm.write(f"[qsae] {snapshot} was damaged by an interrupted run; removed, resuming from the furthest "
               f"checkpoint that loads ({max(steps.values()) if steps else 0} steps)")
    return str(max(steps, key=steps.get)) if steps else None


def layer_trainer(layer: int, cfg: PipelineConfig, run_dir: str, salvaged: str | None = None):
    """One layer's TorchTrainer: workers_per_layer workers (gloo on CPU; on GPU nccl, and gloo for
    host tensors) sharing the layer's resources, checkpoints under <run>/checkpoints, restarts from
    the last one on a crash."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.train.gpus_per_layer > 0
    name, storage = train_run_name(layer, cfg, run_dir), checkpoint_storage(run_dir)
    return TorchTrainer(
        train_layer_worker,
        train_loop_config={
            "layer": layer,
            "layers": list(cfg.capture.layers),  # a token masked at any layer is masked at all
            "run_dir": str(Path(run_dir).resolve()),
            "train": asdict(cfg.train),
            "salvaged_checkpoint": salvaged,  # where Ray Train's own record was lost (salvage_checkpoint)
        },
        torch_config=TorchConfig(backend=GPU_PROCESS_GROUP if use_gpu else CPU_PROCESS_GROUP),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers_per_layer,
            use_gpu=use_gpu,
            resources_per_worker=cfg.train.resources_per_worker(),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def final_state(result) -> dict:
    """The training state in a Ray Train result's last checkpoint."""
    from qsae.train import load_training_state

    with result.checkpoint.as_directory() as directory:
        return load_training_state(Path(directory) / CHECKPOINT_FILE)


@ray.remote(num_cpus=0)
def fit_layer(layer: int, cfg: PipelineConfig, run_dir: str) -> dict:
    """Train one layer (a task, so that every layer's trainer runs at once); its final state."""
    from qsae.train import load_training_state

    note = unusable_rows_note(Path(run_dir), layer)
    note.unlink(missing_ok=True)
    salvaged = salvage_checkpoint(checkpoint_storage(run_dir) / train_run_name(layer, cfg, run_dir))
    result = layer_trainer(layer, cfg, run_dir, salvaged).fit()
    if note.exists():
        raise ValueError(f"layer {layer}: {note.read_text()}")
    if result.checkpoint is None and salvaged:  # the salvaged checkpoint was the last step: nothing new reported
        return load_training_state(Path(salvaged) / CHECKPOINT_FILE)
    return final_state(result)


def concurrent_layers(train: TrainStageConfig, cluster: dict[str, float]) -> int:
    """How many layers' trainers the cluster's CPUs and GPUs hold at once (at least one: Ray says
    what a layer lacks if the cluster cannot hold it). More would only wait, each with a driver
    task and a Ray Train controller of its own (64 of them for every layer of a 27B model)."""
    fits = [cluster.get("CPU", 0.0) / train.cpus_per_layer]
    if train.gpus_per_layer > 0:
        fits.append(cluster.get("GPU", 0.0) / train.gpus_per_layer)
    return max(1, math.floor(min(fits) + 1e-9))


def train_layers(cfg: PipelineConfig, run_dir: Path) -> dict[int, tuple]:
    """Split the rollouts by question (saved as <run>/saes/split.json), then train every layer's SAE
    on its training rows, as many layers at once as the cluster's resources hold (concurrent_layers),
    the next starting when one ends; returns {layer: (TopKSAE, history)}."""
    from qsae.sample import RowRules, plan_split
    from qsae.train import save_trained

    plan_split(run_dir, cfg.capture.layers, RowRules.from_config(cfg))

    waiting = list(cfg.capture.layers)
    at_once = concurrent_layers(cfg.train, ray.cluster_resources())
    trained, pending = {}, {}
    with tqdm(total=len(waiting), desc="train", unit="layer") as bar:
        while waiting or pending:
            while waiting and len(pending) < at_once:
                layer = waiting.pop(0)
                pending[fit_layer.remote(layer, cfg, str(run_dir))] = layer
            [ref], _ = ray.wait(list(pending), num_returns=1)
            layer = pending.pop(ref)
            state = get_or_raise_cause(ref)
            sae = TopKSAE.from_tensors(state["sae_state"], cfg.train.k, cfg.train.architecture)
            trained[layer] = (sae, state["history"])
            save_trained(run_dir, layer, sae, state["history"])
            bar.set_postfix(layer=layer, fvu=f"{state['history']['fvu'][-1]:.3f}")
            bar.update(1)
    return trained


# ----------------------------------------------------------------------------------------------
# What needs the model itself after training: the fidelity in its loss, with each layer's SAE spliced
# in, and the tokens each decoder direction promotes. In a task placed like a capture replica (on a
# cluster the driver's node may have no GPU, or too little memory), the model loaded once for both.


def model_side_task(model_path: str, cfg: PipelineConfig, saes: dict[int, TopKSAE], means: dict[int, np.ndarray],
                    rollouts: list) -> tuple[dict[int, dict] | None, dict[int, dict]]:
    """(fidelity per layer, None without rollouts to run it on; decoder logit tables per layer)."""
    from qsae.analysis.feature_data import decoder_logits
    from qsae.analysis.model_loss import fidelity_of_layers
    from qsae.models import load_model

    torch.set_num_threads(max(1, int(cfg.capture.cpus_per_actor)))
    model, _ = load_model(model_path, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    logits = decoder_logits(model, {layer: sae.W_dec for layer, sae in saes.items()})
    if not rollouts:
        return None, logits
    return fidelity_of_layers(model, saes, means, rollouts, n_boot=cfg.release.bootstrap,
                              seed=cfg.train.split_seed), logits


def model_side_in_ray(cfg: PipelineConfig, model_path: str, trained: dict[int, tuple]):
    """The release's model_side_of: runs model_side_task on the cluster, with a replica's resources."""
    task = ray.remote(model_side_task).options(num_cpus=cfg.capture.cpus_per_actor,
                                               num_gpus=cfg.capture.gpus_per_actor)

    def model_side_of(rollouts: list, means: dict[int, np.ndarray]) -> tuple[dict | None, dict]:
        saes = {layer: sae for layer, (sae, _) in trained.items()}
        return get_or_raise_cause(task.remote(model_path, cfg, saes, means, rollouts))

    return model_side_of


# The causal check's reruns: the held-out prompts once per arm, the arms spread over tasks placed
# like capture replicas, on the transformers engine (its forward hooks see every position).


def causal_task(model_path: str, cfg: PipelineConfig, saes: dict[int, TopKSAE], arms: list,
                prompts: list[list[int]]) -> dict[str, list[tuple[list[int], str]]]:
    """{arm name: [(response token ids, finish reason)] per prompt} for each arm."""
    from qsae.causal import intervened
    from qsae.engines.hf_engine import HFEngine
    from qsae.models import decoder_layers, load_model

    torch.set_num_threads(max(1, int(cfg.capture.cpus_per_actor)))
    model, tokenizer = load_model(model_path, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    engine = HFEngine(model, tokenizer, cfg.rollout.max_new_tokens, cfg.rollout.batch_size)
    layers, device = decoder_layers(model), model.get_input_embeddings().weight.device
    saes = {layer: sae.to(device) for layer, sae in saes.items()}
    out = {}
    for arm in arms:
        with intervened(layers, arm, saes.get(arm.layer)):
            out[arm.name] = [(g.token_ids, g.finish_reason) for g in engine.generate(prompts)]
    return out


def causal_in_ray(cfg: PipelineConfig, model_path: str, trained: dict[int, tuple], questions: list[Question]):
    """The release's causal_of: runs the arms in up to capture.num_actors causal_tasks, then grades
    every answer as the rollout stage does (qsae.rollout.make_rollout)."""
    from qsae.causal import Answers
    from qsae.models import load_tokenizer
    from qsae.rollout import make_rollout

    task = ray.remote(causal_task).options(num_cpus=cfg.capture.cpus_per_actor, num_gpus=cfg.capture.gpus_per_actor)
    question_of = {q.uuid: q for q in questions}

    def causal_of(arms: list, heldout: list) -> dict:
        saes = {layer: sae for layer, (sae, _) in trained.items() if any(arm.layer == layer for arm in arms)}
        prompts = [r.prompt_token_ids for r in heldout]
        groups = [arms[i::cfg.capture.num_actors] for i in range(min(cfg.capture.num_actors, len(arms)))]
        generations = {}
        for part in get_or_raise_cause([task.remote(model_path, cfg, saes, group, prompts) for group in groups]):
            generations.update(part)
        tokenizer = load_tokenizer(model_path, cfg.model.revision)
        answers = {}
        for name, outputs in generations.items():
            graded = [make_rollout(r.rollout_id, question_of[r.question_id], r.prompt, r.prompt_token_ids,
                                   Generation(tokens, finish), tokenizer=tokenizer, thinking=cfg.rollout.thinking,
                                   engine="transformers", seed=cfg.rollout.seed)
                      for r, (tokens, finish) in zip(heldout, outputs)]
            answers[name] = Answers(np.array([g.correct for g in graded], dtype=bool),
                                    [g.predicted_letter for g in graded],
                                    np.array([g.n_response_tokens for g in graded]),
                                    [g.response_token_ids for g in graded])
        return answers

    return causal_of
