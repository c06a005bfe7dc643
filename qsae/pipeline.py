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

from qsae.capture import store_to_extend
from qsae.config import PipelineConfig, ray_host_port
from qsae.files import check_can_create_dir
from qsae.models import check_weights, context_length, expand_layers, load_tokenizer, model_dims, resolve_model_path
from qsae.questions import BUNDLED_QUESTIONS, Question, load_questions, sample_questions
from qsae.rollout import check_prompts_fit


def questions_path(cfg: PipelineConfig) -> Path:
    return BUNDLED_QUESTIONS if cfg.rollout.questions == "bundled" else Path(cfg.rollout.questions)


def prepare(cfg: PipelineConfig) -> tuple[list[Question], str, int]:
    """Everything that can be checked before Ray starts, beyond the config itself: the questions, the
    model (building the tiny one if asked) and its weights, the layers against it ("all" becomes every
    decoder layer, in cfg), every prompt against the context, the run directory and the store a rerun
    would extend. Returns (questions, model_path, d_model)."""
    source = questions_path(cfg)
    questions = sample_questions(load_questions(source), cfg.rollout.num_questions, cfg.rollout.seed)
    model_path = resolve_model_path(cfg.model.name)
    check_weights(model_path)
    n_layers, d_model = model_dims(model_path, cfg.model.revision)
    cfg.capture.layers = expand_layers(cfg.capture.layers, n_layers)
    context = cfg.rollout.max_model_len or context_length(model_path, cfg.model.revision)
    check_prompts_fit(questions, load_tokenizer(model_path, cfg.model.revision), cfg.rollout.thinking,
                      cfg.rollout.max_new_tokens, context, str(source))
    check_can_create_dir(cfg.out, "run directory (out)")
    store_to_extend(cfg, model_path, d_model, questions, Path(cfg.out))  # a rerun's store must be this run's
    return questions, model_path, d_model


@contextmanager
def stage(name: str, timings: dict):
    print(f"[qsae] {name} ...", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"[qsae] {name} done in {timings[name]:.1f} s", flush=True)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with a clear message, instead of Ray's endless retries, when nothing listens at
    the address or what does is not Ray: Ray's GCS and client server speak gRPC, so they answer an
    HTTP/2 preface with a SETTINGS frame (frame type 4). Clusters with TLS on are not probed."""
    try:
        with socket.create_connection(ray_host_port(address), timeout=timeout_s) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            connection.settimeout(timeout_s)
            connection.sendall(HTTP2_PREFACE)
            reply = connection.recv(9)
    except socket.timeout:
        reply = b""
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}") from err
    if len(reply) < 4 or reply[3] != 4:
        raise ConnectionError(f"something answers at {address}, but it is not a Ray cluster (no gRPC reply); "
                              "give the head's GCS port (6379 unless set otherwise) or ray://host:10001")


# Ray Train's controller takes a worker's report once per poll (every 2 s by default), and the worker's
# next report waits until it has: polling faster keeps per-step metric reports from stalling training.
# A local Ray gets it here; cluster jobs get it from cluster/runtime_env.yaml.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}


def connect_ray(address: str | None) -> None:
    """Join the cluster in `address` or RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        check_reachable(address)
    if ray.is_initialized():
        return
    runtime_env = LOCAL_RUNTIME_ENV if address is None else None
    ray.init(address=address, log_to_driver=True, configure_logging=False, runtime_env=runtime_env)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage; returns the release directory."""
    from qsae.distributed import causal_in_ray, model_side_in_ray, run_capture, train_layers
    from qsae.release import build_release

    timings: dict[str, float] = {}
    run_dir = Path(cfg.out).resolve()
    with stage("prepare (questions, model, layers)", timings):
        questions, model_path, d_model = prepare(cfg)
    with stage("start ray", timings):
        connect_ray(cfg.ray_address)
    run_dir.mkdir(parents=True, exist_ok=True)
    with stage(f"capture ({len(questions)} questions, layers {cfg.capture.layers})", timings):
        run_capture(cfg, model_path, d_model, questions, run_dir)
    with stage(f"train ({len(cfg.capture.layers)} SAEs, n={cfg.train.n_features}, k={cfg.train.k})", timings):
        trained = train_layers(cfg, run_dir)
    with stage("analyze, fidelity in the model's loss, causal check, release", timings):
        release_dir = build_release(cfg, run_dir, trained, load_tokenizer(model_path, cfg.model.revision), timings,
                                    model_side_of=model_side_in_ray(cfg, model_path, trained),
                                    causal_of=causal_in_ray(cfg, model_path, trained, questions))
    return release_dir
