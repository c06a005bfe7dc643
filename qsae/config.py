"""Dataclass configs for the whole pipeline: loaded from TOML, overridden by `section.key=value`."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qsae.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.toml"


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" (built-in Qwen3.5 hybrid) / "tiny-dense" (built-in Qwen3), a local dir or a hub id
    revision: str | None = None  # hub revision (commit or tag) for reproducible loads
    dtype: str = "float32"  # model weights during rollouts and capture: float32 | bfloat16 | float16
    device: str = "auto"  # "auto" = cuda when available, else cpu


@dataclass
class RolloutConfig:
    engine: str = "transformers"  # rollout engine: transformers | vllm
    questions: str = "bundled"  # "bundled" or a SuperGPQA JSONL/Parquet file
    num_questions: int | None = None  # sample this many questions (None = all)
    seed: int = 100  # question sampling seed (the original release used 100)
    thinking: bool = False  # chat template with reasoning on
    max_new_tokens: int = 256  # generation budget per question
    batch_size: int = 16  # prompts generated together (transformers engine; vLLM schedules its own batches)
    tensor_parallel_size: int = 1  # vLLM: GPUs one replica spans (set capture.gpus_per_actor to match)
    gpu_memory_utilization: float = 0.9  # vLLM: share of GPU memory it may take (of host RAM on CPU: use ~0.1)
    enforce_eager: bool = True  # vLLM: no compiled graphs; capture's hooks need it
    max_model_len: int | None = None  # vLLM: context length to reserve (None = the model's)


@dataclass
class CaptureConfig:
    layers: list[int] | str = field(default_factory=lambda: [3, 7, 11])  # decoder layers captured, or "all" of them
    dtype: str = "float32"  # store dtype: float32 | float16 (float16 overflow is refused, never stored as inf)
    num_actors: int = 2  # model replicas in the capture actor pool
    cpus_per_actor: float = 1.0  # Ray CPUs reserved per replica
    gpus_per_actor: float = 0.0  # Ray GPUs per replica (1 for the 27B model in bf16 on a 96 GB GPU)
    questions_per_shard: int = 8  # unit of work and of exactly-once bookkeeping
    batch_size: int = 8  # sequences per teacher-forced forward pass
    max_tokens_per_layer: int | None = None  # seeded random cap on rows per layer (the original: 200,000)
    exclude_special_tokens: bool = True  # leave special/chat-template tokens out of training and statistics
    max_norm_multiple: float = 10.0  # leave out tokens whose residual norm exceeds this x the layer median (0 = keep)


@dataclass
class TrainStageConfig(TrainConfig):
    holdout_fraction: float = 0.1  # share of questions held out (all their rollouts) for the held-out statistics
    split_seed: int = 0  # seeds the held-out questions and the row cap; fixed once trained (split.json)
    cpus_per_layer: float = 1.0  # Ray CPUs per layer, split over its workers
    gpus_per_layer: float = 0.0  # Ray GPUs per layer: a fraction shares one GPU; N > 1 needs N workers
    workers_per_layer: int = 1  # data-parallel workers (DDP) per layer; each reads its share of every batch
    report_every_steps: int = 50  # steps between metric reports to Ray Train (each waits on its controller)
    checkpoint_every_steps: int = 500  # steps between checkpoints (the last step always checkpoints)
    max_failures: int = 3  # restarts of a layer's workers after a crash, each from the last checkpoint

    def resources_per_worker(self) -> dict[str, float]:
        """Ray resources of one worker: the layer's share split evenly over its workers."""
        gpus = self.gpus_per_layer / self.workers_per_layer
        return {"CPU": self.cpus_per_layer / self.workers_per_layer, **({"GPU": gpus} if gpus else {})}


@dataclass
class ReleaseConfig:
    export_activations: bool = True  # write activations.safetensors (the training sample); off for large runs
    top_contexts: int = 10  # top-activating tokens kept per live feature
    quantile_examples: int = 5  # tokens shown from each of a feature's 5 activation quantile bins
    context_tokens: int = 12  # tokens of context shown either side of each
    bootstrap: int = 200  # bootstrap resamples for confidence intervals (over questions)
    permutations: int = 1000  # label permutations for the rollout-level p-values and chance band
    unscored_rollouts: str = "exclude"  # truncated / unparsable rollouts: "exclude" from correctness statistics, or count as "wrong"
    fidelity_rollouts: int | None = None  # held-out rollouts the model-loss fidelity runs on (seeded sample; None = all)


@dataclass
class CausalConfig:
    enabled: bool = True  # run the causal check (qsae.causal) as part of the release
    layers: list[int] | None = None  # layers checked (one not captured is skipped, and causal.json says so); None = every captured layer
    features: int = 2  # m: features per layer, the top by rollout-level |AUROC - 0.5| on the training questions
    steer_multiples: list[float] = field(default_factory=lambda: [4.0])  # steering strengths, x the typical activation, both signs
    questions: int | None = None  # held-out rollouts rerun per arm (a seeded sample); None = all


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    out: str = "runs/tiny"  # run directory: rollouts, activation store, checkpoints, release/
    ray_address: str | None = None  # None = connect to RAY_ADDRESS if set, else start a local Ray

    def validate_causal(self) -> None:
        causal = self.causal
        if causal.features < 1:
            raise ConfigError(f"causal.features must be >= 1, got {causal.features}")
        if causal.questions is not None and causal.questions < 1:
            raise ConfigError(f"causal.questions must be >= 1 (or unset for every held-out rollout), got {causal.questions}")
        if not causal.steer_multiples or any(not s > 0 for s in causal.steer_multiples):
            raise ConfigError(f"causal.steer_multiples must be positive numbers (both signs are run), "
                              f"got {causal.steer_multiples}")
        if causal.layers is not None and not causal.layers:
            raise ConfigError("causal.layers is empty; leave it unset for every captured layer")

    def validate(self) -> None:
        try:
            self.train.check_choices()  # recipe and architecture, before any Ray work
        except ValueError as err:
            raise ConfigError(f"train: {err}") from None
        if self.train.k > self.train.n_features:
            raise ConfigError(f"train.k = {self.train.k} exceeds train.n_features = {self.train.n_features}")
        if not self.capture.layers:
            raise ConfigError("capture.layers is empty")
        if isinstance(self.capture.layers, str) and self.capture.layers != "all":
            raise ConfigError(f'capture.layers must be a list of layer indices or "all", got {self.capture.layers!r}')
        if self.capture.dtype not in ("float16", "float32"):
            raise ConfigError(f"capture.dtype must be float16 or float32, got {self.capture.dtype!r}")
        if self.rollout.engine not in ("transformers", "vllm"):
            raise ConfigError(f"unknown rollout.engine {self.rollout.engine!r}; available: transformers, vllm")
        if self.rollout.engine == "vllm" and not self.rollout.enforce_eager:
            raise ConfigError("rollout.enforce_eager must be true with vllm: capture hooks do not run in compiled graphs")
        if self.release.unscored_rollouts not in ("exclude", "wrong"):
            raise ConfigError(f"release.unscored_rollouts must be exclude or wrong, got {self.release.unscored_rollouts!r}")
        if self.capture.max_norm_multiple < 0 or 0 < self.capture.max_norm_multiple <= 1:
            raise ConfigError(f"capture.max_norm_multiple must be 0 (off) or above 1, got {self.capture.max_norm_multiple:g}")
        for name in ("bootstrap", "permutations", "top_contexts", "quantile_examples"):
            if getattr(self.release, name) < 1:
                raise ConfigError(f"release.{name} must be >= 1")
        self.validate_causal()
        if self.release.context_tokens < 0:
            raise ConfigError(f"release.context_tokens must be >= 0, got {self.release.context_tokens}")
        if self.release.fidelity_rollouts is not None and self.release.fidelity_rollouts < 1:
            raise ConfigError("release.fidelity_rollouts must be >= 1 (or unset for all held-out rollouts)")
        if not 0 < self.train.holdout_fraction < 1:
            raise ConfigError(f"train.holdout_fraction must be in (0, 1), got {self.train.holdout_fraction}")
        for name in ("num_actors", "questions_per_shard", "batch_size"):
            if getattr(self.capture, name) < 1:
                raise ConfigError(f"capture.{name} must be >= 1")
        for name in ("workers_per_layer", "report_every_steps", "checkpoint_every_steps"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        gpus, workers = self.train.gpus_per_layer, self.train.workers_per_layer
        if gpus < 0 or self.train.cpus_per_layer <= 0 or self.train.max_failures < 0:
            raise ConfigError("train.gpus_per_layer and train.max_failures must be >= 0, train.cpus_per_layer > 0")
        if workers > 1 and gpus and gpus != workers:
            raise ConfigError(f"train.gpus_per_layer = {gpus:g} with {workers} data-parallel workers: NCCL needs one "
                              f"whole GPU per worker; set train.gpus_per_layer = {workers}, or one worker to share a GPU")
        if gpus > workers:
            raise ConfigError(f"train.gpus_per_layer = {gpus:g} with {workers} worker(s): a worker drives one GPU at "
                              f"most; set train.workers_per_layer = {math.ceil(gpus)} to train on several GPUs (DDP)")


def _check_type(where: str, value, annotation: str):
    """Coerce TOML values to the field's declared type, or say what was expected."""
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[int]": list, "list[float]": list}
    base = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return None
    if base == "list[int] | str":  # a list of indices, or a word standing for one ("all")
        base = "str" if isinstance(value, str) else "list[int]"
    expected = kinds.get(base)
    ok = expected is not None and isinstance(value, expected) and not (base in ("int", "float") and isinstance(value, bool))
    if base == "list[int]" and ok:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if base == "list[float]" and ok:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"{where} expects {annotation}, got {value!r}")
    if base == "list[float]":
        return [float(v) for v in value]
    return float(value) if base == "float" else value


def _apply(section_obj, section: str, values: dict) -> None:
    known = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{section}.{key}'; valid keys in [{section}]: {', '.join(known)}")
        setattr(section_obj, key, _check_type(f"{section}.{key}", value, str(known[key].type)))


def apply_mapping(cfg: PipelineConfig, data: dict) -> PipelineConfig:
    for key, value in data.items():
        target = getattr(cfg, key, None)
        if dataclasses.is_dataclass(target):
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            _apply(target, key, value)
        elif key in ("out", "ray_address"):
            setattr(cfg, key, _check_type(key, value, "str | None"))
        else:
            raise ConfigError(f"unknown config key '{key}'; valid: model, rollout, capture, train, release, causal, out, "
                              "ray_address")
    return cfg


def parse_override(text: str) -> dict:
    """`train.epochs=2` -> {"train": {"epochs": 2}}; values are TOML literals, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *path, last = key.strip().split(".")
    out: dict = {}
    node = out
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Defaults <- TOML file (default: configs/tiny.toml) <- `section.key=value` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    cfg = apply_mapping(PipelineConfig(), data)
    for text in overrides:
        apply_mapping(cfg, parse_override(text))
    cfg.validate()
    return cfg
