"""A small run directory built in this process, with the stages' own functions and no Ray: capture by
one replica, training without Ray Train, the encode pass shard by shard, then analyze -> evaluate ->
causal -> release exactly as the pipeline runs them, the model's work done here. What the writers are
tested on, in seconds."""
from __future__ import annotations

import json
from pathlib import Path

from qsae import autointerp
from qsae.capture import Replica, capture_question_shard, list_shard, load_replica, special_token_ids, store_to_extend
from qsae.causal import Arm, generate_arms
from qsae.config import PipelineConfig, load_config
from qsae.encode import EncodeSettings, encode_settings, encode_shard, list_encoded, shards_to_encode
from qsae.engines import Generation
from qsae.evaluate import Evaluation, EvaluationInputs, evaluate_layers
from qsae.pipeline import RunPlan, Stages, after_analysis, analyze, prepare
from qsae.rollout import read_rollouts, write_rollouts
from qsae.rundir import RunDir
from qsae.sample import RowRules, plan_split, training_rows
from qsae.store import write_manifest
from qsae.streaming import StoreSource
from qsae.training.loop import train_saes
from qsae.training.trained import TrainedSAE, load_trained, recipe_settings, save_trained


class LocalModelTasks:
    """The pipeline's ModelTasks in this process, with the replica's model."""

    def __init__(self, replica: Replica, cfg: PipelineConfig):
        self.replica, self.rollout = replica, cfg.rollout

    def evaluate(self, groups: list[EvaluationInputs]) -> list[Evaluation]:
        return [evaluate_layers(self.replica.engine.model, group) for group in groups]

    def rerun(self, saes: dict, arms: list[Arm], prompts: list[list[int]]) -> dict[str, list[Generation]]:
        return generate_arms(self.replica.engine.model, self.replica.tokenizer, saes, arms, prompts=prompts,
                             max_new_tokens=self.rollout.max_new_tokens, batch_size=self.rollout.batch_size)

    def explain_and_score(self, explainer: str, jobs: list, settings: autointerp.ScoreSettings) -> list[dict]:
        assert not explainer, "the local tasks explain with the subject model"
        return autointerp.explain_and_score(self.replica.engine.model, self.replica.tokenizer, jobs,
                                            max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)


def build_run(root: Path, overrides: list[str]) -> RunDir:
    """Every stage of the embedded default with `overrides`, in this process, into root."""
    cfg = load_config(None, [*overrides, f"out={json.dumps(str(root))}"])
    plan, run, stages = prepare(cfg), RunDir(root), Stages()
    replica = load_replica(plan.spec)
    capture(plan, run, replica)
    train(cfg, plan, run)
    analyze(cfg, plan, run, stages, every_token=encode(cfg, plan, run, replica))
    after_analysis(cfg, plan, run, stages, tasks=LocalModelTasks(replica, cfg))
    return run


def capture(plan: RunPlan, run: RunDir, replica: Replica) -> None:
    manifest, shards = store_to_extend(plan.spec, plan.questions, run)
    for shard in shards:
        list_shard(manifest, capture_question_shard(replica, shard, plan.spec, run))
    write_manifest(run.store, manifest)
    write_rollouts(read_rollouts(*[run.rollout_part(s.name) for s in shards]), run.rollouts)


def encode(cfg: PipelineConfig, plan: RunPlan, run: RunDir, replica: Replica) -> EncodeSettings | None:
    """The encode pass shard by shard with the replica's model, as each replica of the pool runs it."""
    if not cfg.release.every_token:
        return None
    settings = encode_settings(run, cfg.release, special_token_ids(replica.tokenizer))
    saes = {layer: load_trained(run, layer).sae for layer in plan.layers}
    manifest, pending = shards_to_encode(run, plan.layers, settings)
    for shard in pending:
        list_encoded(run, manifest, encode_shard(replica.residuals_of, saes, shard, run, settings))
    return settings


def train(cfg: PipelineConfig, plan: RunPlan, run: RunDir) -> None:
    plan_split(run, plan.layers, RowRules.from_config(cfg))
    rows = training_rows(run, plan.layers)
    trainers = cfg.train.trainers()  # the configured SAE, then a sweep's others
    for layer in plan.layers:
        (sae, history), *others = train_saes(StoreSource(run.store, layer, rows), trainers)
        sweep = [TrainedSAE(s, h, recipe_settings(t)) for (s, h), t in zip(others, trainers[1:])]
        save_trained(run, layer, TrainedSAE(sae, history, recipe_settings(trainers[0]), sweep=sweep))
