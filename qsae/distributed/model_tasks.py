"""The stages that need the model after training, as Ray tasks placed like a capture replica (on a
cluster the driver's node may have no GPU, or too little memory): the evaluation (qsae.evaluate), one
task per group of layers, the causal check's reruns (qsae.causal), the arms spread over tasks, and
autointerp's explanations and scores (qsae.autointerp), the features spread over tasks.
Each task loads the model once and calls the stage's plain function; RayModelTasks is what the
pipeline hands those stages."""
from __future__ import annotations

import ray

from qsae import autointerp
from qsae.capture import ReplicaSpec
from qsae.causal import Arm, generate_arms
from qsae.distributed import deal, get_or_raise_cause, replica_options, use_threads
from qsae.distributed.resources import WaitNotes, all_ready, replica_request
from qsae.engines import Generation
from qsae.evaluate import Evaluation, EvaluationInputs, evaluate_layers
from qsae.models import load_model, resolve_model_path
from qsae.sae import TopKSAE


def model_task(function):
    """`function` as a Ray task whose worker process exits after one call, so the model it loaded (on a
    GPU, the CUDA memory torch keeps cached) goes with it before the next task loads another copy. Ray
    does this itself only for tasks declared with GPUs, not for GPUs given through .options(), and
    max_calls can only be declared, not given through .options()."""
    return ray.remote(max_calls=1)(function)


def evaluate_task(spec: ReplicaSpec, inputs: EvaluationInputs) -> Evaluation:
    use_threads(spec.capture.cpus_per_actor)
    model, _ = load_model(spec.model_path, spec.model.revision, spec.model.dtype, spec.model.device)
    return evaluate_layers(model, inputs)


def evaluate_in_ray(spec: ReplicaSpec, inputs: list[EvaluationInputs]) -> list[Evaluation]:
    """Each group of layers' evaluation in a task of its own, all at once."""
    task = model_task(evaluate_task).options(**replica_options(spec.capture))
    refs = [task.remote(spec, group) for group in inputs]
    all_ready(refs, WaitNotes("evaluate", replica_request(spec.capture)))
    return get_or_raise_cause(refs)


def rerun_task(spec: ReplicaSpec, saes: dict[int, TopKSAE], arms: list[Arm],
               prompts: list[list[int]]) -> dict[str, list[Generation]]:
    use_threads(spec.capture.cpus_per_actor)
    model, tokenizer = load_model(spec.model_path, spec.model.revision, spec.model.dtype, spec.model.device)
    return generate_arms(model, tokenizer, saes, arms, prompts=prompts, max_new_tokens=spec.rollout.max_new_tokens,
                         batch_size=spec.rollout.batch_size)


def rerun_in_ray(spec: ReplicaSpec, saes: dict[int, TopKSAE], arms: list[Arm],
                 prompts: list[list[int]]) -> dict[str, list[Generation]]:
    """The causal check's arms spread over up to capture.num_actors tasks; every arm's generations."""
    task = model_task(rerun_task).options(**replica_options(spec.capture))
    refs = [task.remote(spec, saes, group, prompts) for group in deal(arms, spec.capture.num_actors)]
    all_ready(refs, WaitNotes("causal check", replica_request(spec.capture)))
    generations = {}
    for part in get_or_raise_cause(refs):
        generations.update(part)
    return generations


def load_explainer(spec: ReplicaSpec, explainer: str):
    """(model, tokenizer) of autointerp's explainer: the subject model ("") or a local checkpoint, in
    the subject model's dtype and device."""
    path, revision = (spec.model_path, spec.model.revision) if not explainer else (resolve_model_path(explainer), None)
    return load_model(path, revision, spec.model.dtype, spec.model.device)


def autointerp_task(spec: ReplicaSpec, explainer: str, jobs: list, settings: autointerp.ScoreSettings) -> list[dict]:
    use_threads(spec.capture.cpus_per_actor)
    model, tokenizer = load_explainer(spec, explainer)
    return autointerp.explain_and_score(model, tokenizer, jobs, max_new_tokens=settings.max_new_tokens,
                                        batch_size=settings.batch_size)


def autointerp_in_ray(spec: ReplicaSpec, explainer: str, jobs: list,
                      settings: autointerp.ScoreSettings) -> list[dict]:
    """The features (each with its null partner's examples) spread over up to capture.num_actors tasks;
    the results in the jobs' order."""
    task = model_task(autointerp_task).options(**replica_options(spec.capture))
    shares = deal(list(range(len(jobs))), spec.capture.num_actors)
    refs = [task.remote(spec, explainer, [jobs[i] for i in share], settings) for share in shares]
    all_ready(refs, WaitNotes("autointerp", replica_request(spec.capture)))
    results: list = [None] * len(jobs)
    for share, part in zip(shares, get_or_raise_cause(refs)):
        for i, result in zip(share, part):
            results[i] = result
    return results


class RayModelTasks:
    """The pipeline's ModelTasks on Ray: each group and each share of the arms in a task of its own."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec

    def evaluate(self, groups: list[EvaluationInputs]) -> list[Evaluation]:
        return evaluate_in_ray(self.spec, groups)

    def rerun(self, saes: dict[int, TopKSAE], arms: list[Arm], prompts: list[list[int]]) -> dict[str, list[Generation]]:
        return rerun_in_ray(self.spec, saes, arms, prompts)

    def explain_and_score(self, explainer: str, jobs: list, settings: autointerp.ScoreSettings) -> list[dict]:
        return autointerp_in_ray(self.spec, explainer, jobs, settings)
