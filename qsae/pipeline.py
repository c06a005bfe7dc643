"""The whole pipeline as one function: questions -> capture (actor pool) -> train (Ray Train) -> release.

Inputs are checked before any Ray work starts, so bad input fails fast with a clear message.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from qsae.config import PipelineConfig
from qsae.models import expand_layers, model_dims, resolve_model_path
from qsae.questions import BUNDLED_QUESTIONS, Question, load_questions, sample_questions


def questions_path(cfg: PipelineConfig) -> Path:
    return BUNDLED_QUESTIONS if cfg.rollout.questions == "bundled" else Path(cfg.rollout.questions)


def prepare(cfg: PipelineConfig) -> tuple[list[Question], str, int]:
    """Load and sample the questions, resolve the model (building the tiny one if asked) and check the
    layers against it ("all" becomes the list of every decoder layer, in cfg). Returns (questions,
    model_path, d_model)."""
    questions = sample_questions(load_questions(questions_path(cfg)), cfg.rollout.num_questions, cfg.rollout.seed)
    model_path = resolve_model_path(cfg.model.name)
    n_layers, d_model = model_dims(model_path, cfg.model.revision)
    cfg.capture.layers = expand_layers(cfg.capture.layers, n_layers)
    return questions, model_path, d_model


@contextmanager
def stage(name: str, timings: dict):
    print(f"[qsae] {name} ...", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"[qsae] {name} done in {timings[name]:.1f} s", flush=True)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with a clear message, instead of Ray's long retry loop, when nothing listens."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not of the form host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}") from err


# Ray Train's controller takes a worker's report once per poll (every 2 s by default), and the worker's
# next report waits until it has: polling faster keeps per-step metric reports from stalling training.
# A local Ray gets it here; cluster jobs get it from cluster/runtime_env.yaml.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}


def connect_ray(address: str | None) -> None:
    """Join the cluster in `address` or RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        check_reachable(address)
    runtime_env = LOCAL_RUNTIME_ENV if address is None else None
    ray.init(address=address, log_to_driver=True, configure_logging=False, runtime_env=runtime_env)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage; returns the release directory."""
    from qsae.distributed import causal_in_ray, model_side_in_ray, run_capture, train_layers
    from qsae.models import load_tokenizer
    from qsae.release import build_release

    timings: dict[str, float] = {}
    run_dir = Path(cfg.out).resolve()
    with stage("prepare (questions, model, layers)", timings):
        questions, model_path, d_model = prepare(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with stage("start ray", timings):
        connect_ray(cfg.ray_address)
    with stage(f"capture ({len(questions)} questions, layers {cfg.capture.layers})", timings):
        run_capture(cfg, model_path, d_model, questions, run_dir)
    with stage(f"train ({len(cfg.capture.layers)} SAEs, n={cfg.train.n_features}, k={cfg.train.k})", timings):
        trained = train_layers(cfg, run_dir)
    with stage("analyze, fidelity in the model's loss, causal check, release", timings):
        release_dir = build_release(cfg, run_dir, trained, load_tokenizer(model_path, cfg.model.revision), timings,
                                    model_side_of=model_side_in_ray(cfg, model_path, trained),
                                    causal_of=causal_in_ray(cfg, model_path, trained, questions))
    return release_dir
