"""Dataclass configs for the whole pipeline: loaded from TOML, overridden by `section.key=value`."""
from __future__ import annotations

import dataclasses
import math
import re
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
    """A config file or override names an unknown key or holds a value that cannot work."""


MODEL_DTYPES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def at_least(section: object, prefix: str, minimum: float, *names: str, optional: bool = False) -> None:
    """Each named field is >= minimum (or None, when optional)."""
    for name in names:
        value = getattr(section, name)
        if optional and value is None:
            continue
        unset = " (or unset)" if optional else ""
        require(value >= minimum, f"{prefix}.{name} must be >= {minimum:g}{unset}, got {value}")


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" (built-in Qwen3.5 hybrid) / "tiny-dense" (built-in Qwen3), a local dir or a hub id
    revision: str | None = None  # hub revision (commit or tag) for reproducible loads
    dtype: str = "float32"  # model weights during rollouts and capture: float32 | bfloat16 | float16
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def check(self) -> None:
        require(bool(self.name.strip()), "model.name is empty")
        require(self.dtype in MODEL_DTYPES, f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.dtype!r}")
        require(DEVICE_PATTERN.fullmatch(self.device) is not None,
                f"model.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


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

    def check(self) -> None:
        require(self.engine in ("transformers", "vllm"),
                f"unknown rollout.engine {self.engine!r}; available: transformers, vllm")
        require(self.engine != "vllm" or self.enforce_eager,
                "rollout.enforce_eager must be true with vllm: capture hooks do not run in compiled graphs")
        require(bool(self.questions.strip()), 'rollout.questions is empty; "bundled" or a question file')
        at_least(self, "rollout", 1, "num_questions", "max_model_len", optional=True)
        at_least(self, "rollout", 1, "max_new_tokens", "batch_size", "tensor_parallel_size")
        at_least(self, "rollout", 0, "seed")
        require(0 < self.gpu_memory_utilization <= 1,
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization:g}")
        if self.max_model_len is not None:
            require(self.max_new_tokens < self.max_model_len,
                    f"rollout.max_new_tokens = {self.max_new_tokens} leaves no room for a prompt in "
                    f"rollout.max_model_len = {self.max_model_len}")


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

    def check(self) -> None:
        if isinstance(self.layers, str):
            require(self.layers == "all", f'capture.layers must be a list of layer indices or "all", got {self.layers!r}')
        else:
            require(bool(self.layers), "capture.layers is empty")
            require(min(self.layers) >= 0, f"capture.layers must be layer indices >= 0, got {self.layers}")
            require(len(set(self.layers)) == len(self.layers), f"capture.layers repeats a layer: {self.layers}")
        require(self.dtype in ("float16", "float32"), f"capture.dtype must be float16 or float32, got {self.dtype!r}")
        at_least(self, "capture", 1, "num_actors", "questions_per_shard", "batch_size")
        at_least(self, "capture", 1, "max_tokens_per_layer", optional=True)
        at_least(self, "capture", 0, "cpus_per_actor", "gpus_per_actor")
        require(self.max_norm_multiple == 0 or self.max_norm_multiple > 1,
                f"capture.max_norm_multiple must be 0 (off) or above 1, got {self.max_norm_multiple:g}")


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

    def check_stage(self) -> None:
        """The training settings (TrainConfig.check) and how the stage places and splits them."""
        try:
            self.check()
        except ValueError as err:
            raise ConfigError(f"train: {err}") from None
        require(0 < self.holdout_fraction < 1, f"train.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        at_least(self, "train", 0, "split_seed", "gpus_per_layer", "max_failures")
        at_least(self, "train", 1, "workers_per_layer", "report_every_steps", "checkpoint_every_steps")
        require(self.cpus_per_layer > 0, f"train.cpus_per_layer must be > 0, got {self.cpus_per_layer:g}")
        require(DEVICE_PATTERN.fullmatch(self.device) is not None,
                f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        gpus, workers = self.gpus_per_layer, self.workers_per_layer
        require(not (workers > 1 and gpus and gpus != workers),
                f"train.gpus_per_layer = {gpus:g} with {workers} data-parallel workers: NCCL needs one whole GPU per "
                f"worker; set train.gpus_per_layer = {workers}, or one worker to share a GPU")
        require(gpus <= workers,
                f"train.gpus_per_layer = {gpus:g} with {workers} worker(s): a worker drives one GPU at most; set "
                f"train.workers_per_layer = {math.ceil(gpus)} to train on several GPUs (DDP)")

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

    def check(self) -> None:
        at_least(self, "release", 1, "bootstrap", "permutations", "top_contexts", "quantile_examples")
        at_least(self, "release", 0, "context_tokens")
        at_least(self, "release", 1, "fidelity_rollouts", optional=True)
        require(self.unscored_rollouts in ("exclude", "wrong"),
                f"release.unscored_rollouts must be exclude or wrong, got {self.unscored_rollouts!r}")


@dataclass
class CausalConfig:
    enabled: bool = True  # run the causal check (qsae.causal) as part of the release
    layers: list[int] | None = None  # layers checked (one not captured is skipped, and causal.json says so); None = every captured layer
    features: int = 2  # m: features per layer, the top by rollout-level |AUROC - 0.5| on the training questions
    steer_multiples: list[float] = field(default_factory=lambda: [4.0])  # steering strengths, x the typical activation, both signs
    questions: int | None = None  # held-out rollouts rerun per arm (a seeded sample); None = all

    def check(self) -> None:
        at_least(self, "causal", 1, "features")
        at_least(self, "causal", 1, "questions", optional=True)
        require(bool(self.steer_multiples) and all(s > 0 for s in self.steer_multiples),
                f"causal.steer_multiples must be positive numbers (both signs are run), got {self.steer_multiples}")
        require(self.layers is None or bool(self.layers), "causal.layers is empty; leave it unset for every captured layer")


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

    def validate(self) -> None:
        """Every field, alone and with the others: all that the config can show before any Ray work."""
        for section in (self.model, self.rollout, self.capture, self.release, self.causal):
            section.check()
        self.train.check_stage()
        require(bool(self.out and self.out.strip()), "out is empty; give a run directory")
        if self.ray_address not in (None, "auto", "local"):
            ray_host_port(self.ray_address)


def ray_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address of the form host:port or ray://host:port."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not of the form host:port, ray://host:port or auto")
    return host, int(port)


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
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); TOML files must be UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    cfg = apply_mapping(PipelineConfig(), data)
    for text in overrides:
        apply_mapping(cfg, parse_override(text))
    cfg.validate()
    return cfg
