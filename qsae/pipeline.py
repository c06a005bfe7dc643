"""The pipeline as its stages, in order:

    prepare -> capture -> train -> encode -> analyze -> evaluate -> causal -> autointerp -> release

prepare checks everything the config and the files can show before Ray starts; capture and train run
on Ray (qsae.distributed); the encode pass (release.every_token) replays every rollout through the
model and the SAEs on capture's replica pool; analyze reads the trained run from disk; evaluate, the
causal check and autointerp need a model again (Ray tasks placed like capture replicas); the release is
written from the run directory alone. Stages talk only through the run directory (qsae.rundir) and
the resolved RunPlan. `qsae analyze` is the same sequence from encode on.
"""
from __future__ import annotations

import importlib.util
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qsae import autointerp, causal, console
from qsae.analyze import analyze_run, check_trained_saes, check_trained_split
from qsae.capture import ReplicaSpec, special_token_ids, store_manifest, store_to_extend
from qsae.config import PipelineConfig
from qsae.distributed import deal
from qsae.distributed.connect import check_ray_address
from qsae.encode import EncodeSettings, encode_settings
from qsae.engines import Generation
from qsae.evaluate import Evaluation, EvaluationInputs, evaluation_inputs, save_evaluation
from qsae.files import atomic_write_json, check_can_create_dir
from qsae.models import (check_weights, context_length, expand_layers, has_linear_attention, load_config,
                         load_tokenizer, model_dims, resolve_model_path)
from qsae.questions import BUNDLED_QUESTIONS, Question, load_questions, sample_questions
from qsae.release import ReleaseSettings, build_release, token_texts
from qsae.rollout import check_prompts_fit, check_tokenizer
from qsae.rundir import RunDir
from qsae.sample import RowRules
from qsae.store import check_compatible, read_manifest
from qsae.training.trained import load_trained


@dataclass(frozen=True)
class RunPlan:
    """What a run works out from its config before any stage runs: the questions, and the model's path,
    width and layers (capture.layers resolved) in the replica spec every model-loading stage receives."""

    questions: list[Question]
    spec: ReplicaSpec

    @property
    def layers(self) -> list[int]:
        return list(self.spec.layers)


def questions_path(cfg: PipelineConfig) -> Path:
    return BUNDLED_QUESTIONS if cfg.rollout.questions == "bundled" else Path(cfg.rollout.questions)


def resolve(cfg: PipelineConfig) -> RunPlan:
    """The questions sampled, the model located (the tiny one built if asked) and its layers and width
    read from its config: files only, no weights loaded."""
    questions = sample_questions(load_questions(questions_path(cfg)), cfg.rollout.num_questions, cfg.rollout.seed)
    model_path = resolve_model_path(cfg.model.name)
    n_layers, d_model = model_dims(model_path, cfg.model.revision)
    layers = tuple(expand_layers(cfg.capture.layers, n_layers))
    return RunPlan(questions, ReplicaSpec(model_path, d_model, layers, cfg.model, cfg.rollout, cfg.capture))


def prepare(cfg: PipelineConfig) -> RunPlan:
    """Everything that can be checked before Ray starts, beyond the config itself: the questions, the
    model and its weights, the layers against it, every prompt against the context, the run directory
    and the store a rerun would extend."""
    plan = resolve(cfg)
    model_path, revision = plan.spec.model_path, cfg.model.revision
    check_weights(model_path)
    check_engine(cfg, model_path)
    tokenizer = load_tokenizer(model_path, revision)
    check_tokenizer(tokenizer, plan.questions, thinking=cfg.rollout.thinking, model=model_path)
    context = cfg.rollout.max_model_len or context_length(model_path, revision)
    check_prompts_fit(plan.questions, tokenizer, thinking=cfg.rollout.thinking,
                      max_new_tokens=cfg.rollout.max_new_tokens, context=context, source=str(questions_path(cfg)))
    autointerp.check_explainer(cfg.autointerp, model_path, revision)
    check_can_create_dir(cfg.out, "run directory (out)")
    store_to_extend(plan.spec, plan.questions, RunDir(cfg.out))  # a rerun's store must be this run's
    check_ray_address(cfg.ray_address)
    return plan


def check_engine(cfg: PipelineConfig, model_path: str) -> None:
    """vLLM on replicas without a GPU is vLLM's CPU build, which has no kernels for linear-attention
    (Gated DeltaNet) layers: such a model would fail in every replica. Nor can it sample with a seed
    per request once a prompt's prefill is split over steps (its CPU generators cannot rewind).
    rollout.vllm's keys are checked against the vLLM this driver has (a cluster's replicas may have it
    where the driver does not: then they are checked where the engine starts)."""
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm and importlib.util.find_spec("vllm") is not None:
        from qsae.engines.vllm_engine import check_options

        check_options(cfg.rollout.vllm)
    if cfg.rollout.engine == "vllm" and cfg.capture.gpus_per_actor == 0 and cfg.rollout.temperature > 0:
        raise ValueError("rollout.temperature > 0 with rollout.engine = vllm on replicas without a GPU: vLLM's CPU "
                         "build cannot reproduce seeded sampling of long prompts; use rollout.engine = transformers "
                         "on CPU (vLLM samples with seeds on GPUs)")
    if cfg.rollout.engine == "vllm" and cfg.capture.gpus_per_actor == 0 and \
            has_linear_attention(load_config(model_path, cfg.model.revision)):
        raise ValueError(f"rollout.engine = vllm on replicas without a GPU (capture.gpus_per_actor = 0) is vLLM's CPU "
                         f"build, which cannot run the linear-attention layers of {cfg.model.name}; use "
                         "rollout.engine = transformers, or a model without them (e.g. model.name = tiny-dense)")


def joins_cluster(cfg: PipelineConfig) -> bool:
    """Whether the run joins a running Ray cluster (which may grow) rather than starting its own."""
    from qsae.distributed.connect import ray_address

    return ray_address(cfg.ray_address) not in (None, "local")


class Stages:
    """Each stage's line on the console and its wall-clock time, kept in the run directory."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.run: RunDir | None = None

    @contextmanager
    def stage(self, name: str):
        console.say(f"[qsae] {name} ...")
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 1)
        console.say(f"[qsae] {name} done in {self.timings[name]:.1f} s")
        if self.run is not None:
            atomic_write_json(self.run.timings, self.timings)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage; returns the release directory."""
    from qsae.distributed.connect import ray_session
    from qsae.distributed.resources import check_schedulable, replica_request, trainer_request
    from qsae.distributed.trainers import check_trainer_memory

    stages, run = Stages(), RunDir(cfg.out)
    with stages.stage("prepare (questions, model, layers)"):
        plan = prepare(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    stages.run = run
    with run.driver_lock(), console.lines_to_log(run.log), ExitStack() as session:
        with stages.stage("start ray"):
            session.enter_context(ray_session(cfg.ray_address))
            check_schedulable([replica_request(cfg.capture), trainer_request(cfg.train)], joined=joins_cluster(cfg))
            check_trainer_memory(cfg.train, plan.spec.d_model)  # before capture: a run that cannot train stops
        return capture_to_release(cfg, plan, run, stages)


def capture_to_release(cfg: PipelineConfig, plan: RunPlan, run: RunDir, stages: Stages) -> Path:
    from qsae.distributed.trainers import train_layers

    capture(plan, run, stages)
    with stages.stage(f"train ({len(plan.layers)} SAEs, n={cfg.train.n_features}, k={cfg.train.k})"):
        train_layers(cfg.train, RowRules.from_config(cfg), plan.layers, run)
    analyze(cfg, plan, run, stages, every_token=encode(cfg, plan, run, stages))
    return after_analysis(cfg, plan, run, stages)


def capture(plan: RunPlan, run: RunDir, stages: Stages) -> dict:
    """Rollouts and their residuals into the store; returns its manifest."""
    from qsae.distributed.capture_pool import run_capture

    with stages.stage(f"capture ({len(plan.questions)} questions, layers {plan.layers})"):
        return run_capture(plan.spec, plan.questions, run)


def analyze_from_disk(cfg: PipelineConfig) -> Path:
    """`qsae analyze`: the stages after training, from a trained run directory."""
    from qsae.distributed.connect import ray_session
    from qsae.distributed.resources import check_schedulable, replica_request

    stages, run = Stages(), RunDir(cfg.out)
    stages.run = run if run.root.is_dir() else None
    plan = resolve(cfg)
    check_ray_address(cfg.ray_address)
    with ExitStack() as session:
        if run.root.is_dir():
            session.enter_context(run.driver_lock())
        check_trained_run(cfg, plan, run)  # its refusals come before Ray starts
        session.enter_context(console.lines_to_log(run.log))
        session.enter_context(ray_session(cfg.ray_address))
        check_schedulable([replica_request(cfg.capture)], joined=joins_cluster(cfg))
        analyze(cfg, plan, run, stages, every_token=encode(cfg, plan, run, stages))
        return after_analysis(cfg, plan, run, stages)


def encode(cfg: PipelineConfig, plan: RunPlan, run: RunDir, stages: Stages) -> EncodeSettings | None:
    """The encode pass over every store shard not yet encoded with these SAEs (release.every_token);
    returns its settings, or None when the statistics are to come from the training sample."""
    if not cfg.release.every_token:
        return None
    from qsae.distributed.encode_pool import run_encode

    with stages.stage(f"encode (every response token, {len(plan.layers)} SAEs)"):
        check_trained_run(cfg, plan, run)
        tokenizer = load_tokenizer(plan.spec.model_path, cfg.model.revision)
        settings = encode_settings(run, cfg.release, special_token_ids(tokenizer))
        run_encode(plan.spec, run, settings)
    return settings


def check_trained_run(cfg: PipelineConfig, plan: RunPlan, run: RunDir) -> None:
    """What analyze (and the encode pass before it) would refuse: the SAEs, the model the encode pass
    would replay the rollouts with, the store and the split."""
    check_trained_saes(run, plan.layers, cfg.train)
    if cfg.release.every_token:
        check_replays_store(plan.spec, run)
    check_trained_split(run, plan.layers, RowRules.from_config(cfg))


def check_replays_store(spec: ReplicaSpec, run: RunDir) -> None:
    """The encode pass replays the store's rollouts: with the model and settings that captured them."""
    check_compatible(read_manifest(run.store), store_manifest(spec),
                     "the encode pass would replay its rollouts through another model or other settings: "
                     "use the config it was captured with")


def analyze(cfg: PipelineConfig, plan: RunPlan, run: RunDir, stages: Stages, *,
            every_token: EncodeSettings | None) -> None:
    with stages.stage(f"analyze ({len(plan.layers)} layers)"):
        analyze_run(run, plan.layers, train=cfg.train, rules=RowRules.from_config(cfg), release=cfg.release,
                    every_token=every_token)


class ModelTasks(Protocol):
    """Where the stages that need the model run: Ray tasks placed like capture replicas
    (qsae.distributed.model_tasks), or one process with the model loaded."""

    def evaluate(self, groups: list[EvaluationInputs]) -> list[Evaluation]: ...

    def rerun(self, saes: dict, arms: list[causal.Arm], prompts: list[list[int]]) -> dict[str, list[Generation]]: ...

    def explain_and_score(self, explainer: str, jobs: list, settings: autointerp.ScoreSettings) -> list[dict]: ...


def after_analysis(cfg: PipelineConfig, plan: RunPlan, run: RunDir, stages: Stages, *,
                   tasks: ModelTasks | None = None) -> Path:
    """evaluate -> causal -> autointerp -> release, the model's work done by `tasks` (default: Ray tasks)."""
    if tasks is None:
        from qsae.distributed.model_tasks import RayModelTasks

        tasks = RayModelTasks(plan.spec)
    tokenizer = load_tokenizer(plan.spec.model_path, cfg.model.revision)
    with stages.stage("evaluate (fidelity in the model's loss, logit tables)"):
        evaluate(cfg, plan, run, tasks)
    if cfg.causal.enabled:
        with stages.stage("causal check"):
            causal_check(cfg, plan, run, tasks=tasks, tokenizer=tokenizer)
    run.autointerp.unlink(missing_ok=True)  # an earlier run's explanations are not this one's
    if cfg.autointerp.enabled:
        with stages.stage("autointerp (explanations, detection and fuzzing scores)"):
            explain_features(cfg, plan, run, tasks=tasks, tokenizer=tokenizer)
    with stages.stage("release"):
        settings = ReleaseSettings(cfg.release, cfg.rollout.questions, cfg.rollout.seed)
        return build_release(run, settings, token_texts(tokenizer))


def evaluate(cfg: PipelineConfig, plan: RunPlan, run: RunDir, tasks: ModelTasks) -> None:
    """Each group of layers (one per capture replica at most) evaluated by a task of its own, a sweep's
    SAEs with their layer."""
    trained = {layer: load_trained(run, layer) for layer in plan.layers}
    inputs = [evaluation_inputs(run, {layer: trained[layer].sae for layer in group},
                                limit=cfg.release.fidelity_rollouts, n_boot=cfg.release.bootstrap,
                                seed=cfg.train.split_seed,
                                sweep={layer: {m.shape_name: m.sae for m in trained[layer].sweep}
                                       for layer in group if trained[layer].sweep})
              for group in deal(plan.layers, cfg.capture.num_actors)]
    save_evaluation(run, tasks.evaluate(inputs))


def causal_check(cfg: PipelineConfig, plan: RunPlan, run: RunDir, *, tasks: ModelTasks, tokenizer) -> None:
    """The causal check's plans, the held-out prompts rerun under every arm, graded and compared."""
    seed = cfg.train.split_seed
    study = causal.plan_study(run, cfg.causal, plan.layers, permutations=cfg.release.permutations, seed=seed)
    answers = {}
    if not study.skipped:
        layers = sorted({arm.layer for arm in study.arms if arm.layer is not None})
        saes = {layer: load_trained(run, layer).sae for layer in layers}
        generations = tasks.rerun(saes, study.arms, [r.prompt_token_ids for r in study.heldout])
        answers = causal.grade(study, generations, questions=plan.questions, tokenizer=tokenizer,
                               thinking=cfg.rollout.thinking, seed=cfg.rollout.seed)
    atomic_write_json(run.causal, causal.assess(study, answers, unscored=cfg.release.unscored_rollouts))


def explain_features(cfg: PipelineConfig, plan: RunPlan, run: RunDir, *, tasks: ModelTasks, tokenizer) -> None:
    """The chosen features' examples as text (the subject model's tokens), explained and scored by the
    explainer, each explanation also on its null partner's examples."""
    settings = cfg.autointerp
    jobs = autointerp.plan_jobs(autointerp.plan_cases(run, plan.layers, settings, token_texts(tokenizer)), settings.seed)
    results = tasks.explain_and_score(settings.explainer, jobs,
                                      autointerp.ScoreSettings(settings.max_new_tokens, settings.batch_size))
    atomic_write_json(run.autointerp, autointerp.report(
        jobs, results, explainer=autointerp.explainer_name(settings.explainer, cfg.model.name),
        subject=not settings.explainer))
