"""Dataclass configs for the whole pipeline: loaded from TOML, overridden by `section.key=value`.

Every field carries its one-line documentation (`setting`), which `qsae train`'s flags and the
README's config table are made from. Configs are frozen: what a run works out from them (the model's
layers, devices) lives in separate resolved objects, never written back into the config. Parsing a
config imports no torch.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



def config_dir() -> Path:
    """configs/: inside the installed package (pyproject ships it as qsae/configs, so the embedded
    default runs from a plain install, from any directory), else beside it in a source checkout."""
    installed = Path(__file__).parent / "configs"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "configs"


CONFIG_DIR = config_dir()
DEFAULT_CONFIG = CONFIG_DIR / "tiny.toml"

MODEL_DTYPES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
RECIPES = ("original", "modern")
ARCHITECTURES = ("topk", "batchtopk", "matryoshka-batchtopk")
MATRYOSHKA = "matryoshka-batchtopk"


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value that cannot work."""


def setting(default, doc: str):
    """A config field with its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


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


def check_device(value: str, where: str) -> None:
    require(DEVICE_PATTERN.fullmatch(value) is not None, f"{where} must be auto, cpu, cuda or cuda:N, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("tiny", '"tiny" (built-in Qwen3.5 hybrid), "tiny-dense" (built-in Qwen3), a local dir or a hub id')
    revision: str | None = setting(None, "hub revision (commit or tag) for reproducible loads")
    dtype: str = setting("float32", "model weights during rollouts and capture: float32 | bfloat16 | float16")
    device: str = setting("auto", '"auto" = cuda when available, else cpu')

    def check(self) -> None:
        require(bool(self.name.strip()), "model.name is empty")
        require(self.dtype in MODEL_DTYPES, f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.dtype!r}")
        check_device(self.device, "model.device")


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = setting("transformers", "rollout engine: transformers | vllm")
    questions: str = setting("bundled", '"bundled" or a SuperGPQA JSONL/Parquet file')
    num_questions: int | None = setting(None, "sample this many questions (unset = all)")
    seed: int = setting(100, "question sampling seed (the original release used 100)")
    thinking: bool = setting(False, "chat template with reasoning on")
    max_new_tokens: int = setting(256, "generation budget per rollout")
    samples_per_question: int = setting(1, "rollouts per question (more than 1 needs temperature > 0)")
    temperature: float = setting(0.0, "0 = greedy; above 0, tokens are sampled (seeded per rollout)")
    top_p: float = setting(1.0, "sampling: nucleus cut (1 = none)")
    top_k: int = setting(0, "sampling: keep the k likeliest tokens (0 = no cut)")
    sampling_seed: int = setting(0, "sampling: each rollout's seed derives from it and the rollout id")
    batch_size: int = setting(16, "prompts generated together (transformers engine; vLLM schedules its own batches)")
    prompts_in_flight: int | None = setting(None, "a replica rolls out whole shards together, up to this many prompts in one engine call (unset = 256 with vLLM, one shard with transformers)")
    tensor_parallel_size: int = setting(1, "vLLM: GPUs one replica spans (set capture.gpus_per_actor to match)")
    gpu_memory_utilization: float = setting(0.9, "vLLM: share of GPU memory it may take (of host RAM on CPU: use ~0.1)")
    decode_cuda_graphs: bool = setting(True, "vLLM on CUDA: decode steps replay CUDA graphs; prefills (and so capture) run eager either way (false = every step eager, the safe setting)")
    max_model_len: int | None = setting(None, "vLLM: context length to reserve (unset = the model's)")
    vllm: dict = setting({}, "vLLM: more engine arguments, passed to vllm.LLM as they are (a [rollout.vllm] table, e.g. max_num_seqs)")

    def check(self) -> None:
        require(self.engine in ("transformers", "vllm"),
                f"unknown rollout.engine {self.engine!r}; available: transformers, vllm")
        require(self.engine == "vllm" or not self.vllm,
                f"rollout.vllm sets {', '.join(sorted(self.vllm))} but rollout.engine = {self.engine}: it is for vLLM only")
        require(bool(self.questions.strip()), 'rollout.questions is empty; "bundled" or a question file')
        # The split holds out whole questions: at least one on each side.
        at_least(self, "rollout", 2, "num_questions", optional=True)
        at_least(self, "rollout", 1, "max_model_len", "prompts_in_flight", optional=True)
        at_least(self, "rollout", 1, "max_new_tokens", "batch_size", "tensor_parallel_size")
        at_least(self, "rollout", 0, "seed", "sampling_seed", "top_k")
        at_least(self, "rollout", 1, "samples_per_question")
        require(math.isfinite(self.temperature) and self.temperature >= 0,
                f"rollout.temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0:
            require(self.samples_per_question == 1,
                    f"rollout.samples_per_question = {self.samples_per_question} with rollout.temperature = 0 (greedy) "
                    "would give identical rollouts of each question; set a temperature > 0 (e.g. 0.6)")
            require(self.top_p == 1 and self.top_k == 0,
                    "rollout.top_p / rollout.top_k shape sampling, but rollout.temperature = 0 is greedy; set a "
                    "temperature > 0 or leave them at 1 / 0")
        require(0 < self.gpu_memory_utilization <= 1,
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization:g}")
        if self.max_model_len is not None:
            require(self.max_new_tokens < self.max_model_len,
                    f"rollout.max_new_tokens = {self.max_new_tokens} leaves no room for a prompt in "
                    f"rollout.max_model_len = {self.max_model_len}")


@dataclass(frozen=True)
class CaptureConfig:
    layers: list[int] | str = setting([3, 7, 11], 'decoder layers captured, or "all" of them')
    dtype: str = setting("float32", "store dtype: float32 | float16 (tokens beyond float16's range are left out, counted)")
    num_actors: int = setting(2, "model replicas in the capture actor pool")
    cpus_per_actor: float = setting(1.0, "Ray CPUs reserved per replica")
    gpus_per_actor: float = setting(0.0, "Ray GPUs per replica (1 for the 27B model in bf16 on a 96 GB GPU)")
    questions_per_shard: int = setting(8, "unit of work and of exactly-once bookkeeping")
    batch_size: int = setting(8, "sequences per teacher-forced forward pass")
    keep_per_rollout: int | None = setting(None, "bounded store: keep a seeded sample of this many response positions of each rollout (unset = all)")
    keep_fraction: float | None = setting(None, "bounded store: keep this share of each rollout's response positions, rounded up (unset = all)")
    keep_seed: int = setting(0, "seeds the bounded store's choice of positions (per rollout id: retries and reruns keep the same)")
    max_tokens_per_layer: int | None = setting(None, "seeded random cap on rows per layer (the original: 200,000)")
    exclude_special_tokens: bool = setting(True, "leave special/chat-template tokens out of training and statistics")
    max_norm_multiple: float = setting(10.0, "leave out tokens whose residual norm exceeds this x the layer median (0 = keep)")

    def check(self) -> None:
        if isinstance(self.layers, str):
            require(self.layers == "all", f'capture.layers must be a list of layer indices or "all", got {self.layers!r}')
        else:
            require(bool(self.layers), "capture.layers is empty")
            require(min(self.layers) >= 0, f"capture.layers must be layer indices >= 0, got {self.layers}")
            require(len(set(self.layers)) == len(self.layers), f"capture.layers repeats a layer: {self.layers}")
        require(self.dtype in ("float16", "float32"), f"capture.dtype must be float16 or float32, got {self.dtype!r}")
        at_least(self, "capture", 1, "num_actors", "questions_per_shard", "batch_size")
        # One training row and two held-out ones (an interval needs two) at the least.
        at_least(self, "capture", 3, "max_tokens_per_layer", optional=True)
        at_least(self, "capture", 0, "cpus_per_actor", "gpus_per_actor", "keep_seed")
        require(self.keep_per_rollout is None or self.keep_fraction is None,
                "capture.keep_per_rollout and capture.keep_fraction both set: keep a count or a share of each "
                "rollout's positions, not both")
        require(self.keep_per_rollout is None or self.keep_per_rollout >= 1,
                f"capture.keep_per_rollout = {self.keep_per_rollout} keeps no position of any rollout; >= 1, or unset to keep all")
        require(self.keep_fraction is None or 0 < self.keep_fraction <= 1,
                f"capture.keep_fraction = {self.keep_fraction} must be in (0, 1] (0 keeps nothing); unset keeps all")
        require(self.max_norm_multiple == 0 or self.max_norm_multiple > 1,
                f"capture.max_norm_multiple must be 0 (off) or above 1, got {self.max_norm_multiple:g}")


@dataclass(frozen=True)
class RecipeDefaults:
    """What a recipe sets when the config leaves it unset."""

    lr: float  # Adam learning rate at REFERENCE_LATENTS latents
    lr_scales_with_n: bool  # lr x 1 / sqrt(n / REFERENCE_LATENTS)
    lr_decay_fraction: float
    revive_every_epochs: int


REFERENCE_LATENTS = 2048
RECIPE_DEFAULTS = {
    # The original card: Adam 3e-4, constant, revival every 5 epochs.
    "original": RecipeDefaults(lr=3e-4, lr_scales_with_n=False, lr_decay_fraction=0.0, revive_every_epochs=5),
    # sparsify's 1 / sqrt(n) scaling at about 5 times its level, the last fifth of the steps decaying to 0
    # (docs/training.md has the measurements behind these numbers).
    "modern": RecipeDefaults(lr=3e-3, lr_scales_with_n=True, lr_decay_fraction=0.2, revive_every_epochs=0),
}


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = setting("modern", '"original" (the release\'s recipe, bit for bit) | "modern"')
    architecture: str = setting("topk", '"topk" | "batchtopk" (top k x batch in training, a learned threshold after; modern only) | "matryoshka-batchtopk" (BatchTopK, each nested prefix trained to reconstruct)')
    matryoshka_prefixes: list[int] = setting([], "matryoshka-batchtopk: the nested prefix widths, strictly increasing, n_features appended if missing; empty = n/16, n/8, n/4, n/2, n")
    n_features: int = setting(4096, "dictionary size n (latents per SAE)")
    k: int = setting(32, "active latents per token")
    epochs: int = setting(20, "full passes over the training rows")
    batch_size: int = setting(4096, "rows per optimiser step")
    lr: float | None = setting(None, "Adam learning rate; unset = the recipe's: 3e-4, or 3e-3 / sqrt(n / 2048) (modern)")
    lr_decay_fraction: float | None = setting(None, "last share of the steps over which lr falls linearly to 0; unset = 0 | 0.2 (modern)")
    revive_every_epochs: int | None = setting(None, "revive dead features every R epochs, 0 = never; unset = 5 | 0 (modern)")
    dead_after_steps: int = setting(500, "a feature silent for at least this many steps is dead (revival, AuxK)")
    autocast_bf16: bool | None = setting(None, "modern only: encoder matmul under bf16 autocast; unset = where the device has native bf16")
    seed: int = setting(0, "seeds the initial weights, the per-epoch shuffles and the revival vectors")
    shuffle_buffer_rows: int = setting(65536, "rows shuffled together; memory holds about three such buffers")
    device: str = setting("cpu", 'torch device the SAE and each batch live on ("auto" = the worker\'s GPU, else cpu)')

    @property
    def defaults(self) -> RecipeDefaults:
        return RECIPE_DEFAULTS[self.recipe]

    def learning_rate(self) -> float:
        """`lr`, or the recipe's default when it is unset."""
        if self.lr is not None:
            return self.lr
        scale = math.sqrt(self.n_features / REFERENCE_LATENTS) if self.defaults.lr_scales_with_n else 1.0
        return self.defaults.lr / scale

    def decay_fraction(self) -> float:
        """`lr_decay_fraction`, or the recipe's default when it is unset."""
        return self.defaults.lr_decay_fraction if self.lr_decay_fraction is None else self.lr_decay_fraction

    def revival_period(self) -> int:
        """`revive_every_epochs`, or the recipe's default when it is unset; 0 = never."""
        return self.defaults.revive_every_epochs if self.revive_every_epochs is None else self.revive_every_epochs

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimiser step `step` (from 0) of `total_steps`: constant, then linear
        to 0 over the last decay_fraction() of the steps."""
        decay_steps = self.decay_fraction() * total_steps
        return self.learning_rate() * min(1.0, (total_steps - step) / decay_steps) if decay_steps else self.learning_rate()

    def prefixes(self) -> list[int]:
        """matryoshka-batchtopk: the prefix widths it trains (matryoshka_prefixes resolved)."""
        return matryoshka_prefixes(self.matryoshka_prefixes, self.n_features)

    def encoder_precision(self) -> str:
        """The encoder matmul's precision as the config sets it (an unset autocast_bf16 is decided by
        each trainer's device)."""
        if self.recipe == "original" or self.autocast_bf16 is False:
            return "fp32"
        return "bf16 (autocast)" if self.autocast_bf16 else "bf16 where the training device has native bf16, else fp32"

    def check(self) -> None:
        """Every setting on its own and together: what can be checked before the data is seen. Raises
        ValueError without a section prefix (the stage adds it)."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPES)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.architecture != "topk" and self.recipe == "original":
            raise ValueError(f"architecture {self.architecture!r} needs the modern recipe: the original recipe is TopK")
        if self.matryoshka_prefixes and self.architecture != MATRYOSHKA:
            raise ValueError(f"matryoshka_prefixes belongs to architecture {MATRYOSHKA!r}, not {self.architecture!r}")
        positive = {"n_features": self.n_features, "k": self.k, "epochs": self.epochs, "batch_size": self.batch_size,
                    "dead_after_steps": self.dead_after_steps, "shuffle_buffer_rows": self.shuffle_buffer_rows}
        if self.n_features > 0:  # the default lr scales with n
            positive["lr"] = self.learning_rate()
        bad = [f"{name}={value}" for name, value in positive.items() if not value > 0]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if not 0 <= self.decay_fraction() <= 1:
            raise ValueError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.revival_period() < 0:
            raise ValueError(f"revive_every_epochs must be >= 0 (0 = never), got {self.revive_every_epochs}")
        if self.k > self.n_features:
            raise ValueError(f"k={self.k} exceeds n_features={self.n_features}")
        if self.architecture == MATRYOSHKA:
            matryoshka_prefixes(self.matryoshka_prefixes, self.n_features)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.autocast_bf16 and self.recipe == "original":
            raise ValueError("autocast_bf16 belongs to the modern recipe; the original trains in fp32")
        if not math.isfinite(self.learning_rate()):
            raise ValueError(f"lr must be a finite number, got {self.lr}")
        if DEVICE_PATTERN.fullmatch(self.device) is None:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class TrainStageConfig(TrainConfig):
    holdout_fraction: float = setting(0.1, "share of questions held out (all their rollouts) for the held-out statistics")
    split_seed: int = setting(0, "seeds the held-out questions and the row cap; fixed once trained (split.json)")
    cpus_per_layer: float = setting(1.0, "Ray CPUs per layer, split over its workers")
    gpus_per_layer: float = setting(0.0, "Ray GPUs per layer: a fraction shares one GPU; N > 1 needs N workers")
    workers_per_layer: int = setting(1, "data-parallel workers (DDP) per layer; each reads its share of every batch")
    report_every_steps: int = setting(50, "steps between metric reports to Ray Train (each waits on its controller)")
    checkpoint_every_steps: int = setting(500, "steps between checkpoints (the last step always checkpoints)")
    max_failures: int = setting(3, "restarts of a layer's workers after a crash, each from the last checkpoint")
    sweep: dict | None = setting(None, "more SAEs per layer, trained in the same pass over its rows: a [train.sweep] table of n_features and k lists (every pair) or pairs = [[n, k], ...]")

    def trainer(self) -> TrainConfig:
        """The settings of the SAE training itself, without the stage's placement."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def trainers(self) -> list[TrainConfig]:
        """Every SAE a layer trains: the configured one (n_features, k) first, then the sweep's others."""
        primary = self.trainer()
        pairs = sweep_pairs(self.sweep, self.n_features, self.k) if self.sweep is not None else []
        others = [pair for pair in pairs if pair != (self.n_features, self.k)]
        return [primary] + [dataclasses.replace(primary, n_features=n, k=k) for n, k in others]

    def check_stage(self) -> None:
        """The training settings (TrainConfig.check) and how the stage places and splits them."""
        check_device(self.device, "train.device")
        try:
            self.check()
        except ValueError as err:
            raise ConfigError(f"train: {err}") from None
        require(0 < self.holdout_fraction < 1, f"train.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        at_least(self, "train", 0, "split_seed", "gpus_per_layer", "max_failures")
        at_least(self, "train", 1, "workers_per_layer", "report_every_steps", "checkpoint_every_steps")
        require(self.cpus_per_layer > 0, f"train.cpus_per_layer must be > 0, got {self.cpus_per_layer:g}")
        gpus, workers = self.gpus_per_layer, self.workers_per_layer
        require(not (workers > 1 and gpus and gpus != workers),
                f"train.gpus_per_layer = {gpus:g} with {workers} data-parallel workers: NCCL needs one whole GPU per "
                f"worker; set train.gpus_per_layer = {workers}, or one worker to share a GPU")
        if self.sweep is not None:
            for trainer in self.trainers()[1:]:
                try:
                    trainer.check()
                except ValueError as err:
                    raise ConfigError(f"train.sweep: the SAE of n_features = {trainer.n_features}, k = {trainer.k}: {err}") from None
        require(gpus <= workers,
                f"train.gpus_per_layer = {gpus:g} with {workers} worker(s): a worker drives one GPU at most; set "
                f"train.workers_per_layer = {math.ceil(gpus)} to train on several GPUs (DDP)")

    def resources_per_worker(self) -> dict[str, float]:
        """Ray resources of one worker: the layer's share split evenly over its workers."""
        gpus = self.gpus_per_layer / self.workers_per_layer
        return {"CPU": self.cpus_per_layer / self.workers_per_layer, **({"GPU": gpus} if gpus else {})}


@dataclass(frozen=True)
class ReleaseConfig:
    export_activations: bool = setting(True, "write activations.safetensors (the training sample); off for large runs")
    top_contexts: int = setting(10, "top-activating tokens kept per live feature")
    quantile_examples: int = setting(5, "tokens shown from each of a feature's 5 activation quantile bins")
    context_tokens: int = setting(12, "tokens of context shown either side of each")
    bootstrap: int = setting(200, "bootstrap resamples for confidence intervals (over questions)")
    permutations: int = setting(1000, "label permutations for the rollout-level p-values and chance band")
    probe_permutations: int = setting(100, "label permutations, each refitting the probe, for its null (0 = none)")
    unscored_rollouts: str = setting("exclude", 'truncated / unparsable rollouts: "exclude" from correctness statistics, or count as "wrong"')
    fidelity_rollouts: int | None = setting(None, "held-out rollouts the model-loss fidelity runs on (seeded sample; unset = all)")
    every_token: bool = setting(True, "encode pass: rollout pools and feature data over every response token "
                                      "(false: over the training sample, faster on huge runs)")

    def check(self) -> None:
        at_least(self, "release", 1, "bootstrap", "permutations", "top_contexts", "quantile_examples")
        at_least(self, "release", 0, "context_tokens", "probe_permutations")
        at_least(self, "release", 1, "fidelity_rollouts", optional=True)
        require(self.unscored_rollouts in ("exclude", "wrong"),
                f"release.unscored_rollouts must be exclude or wrong, got {self.unscored_rollouts!r}")


@dataclass(frozen=True)
class CausalConfig:
    enabled: bool = setting(True, "run the causal check as part of the release")
    layers: list[int] | None = setting(None, "layers checked (one not captured is skipped, and causal.json says so); unset = every captured layer")
    features: int = setting(2, "m: features per layer, the top by rollout-level |AUROC - 0.5| on the training questions")
    steer_multiples: list[float] = setting([4.0], "steering strengths, x the typical activation, both signs")
    questions: int | None = setting(None, "held-out rollouts rerun per arm (a seeded sample); unset = all")

    def check(self) -> None:
        at_least(self, "causal", 1, "features")
        at_least(self, "causal", 1, "questions", optional=True)
        require(bool(self.steer_multiples) and all(s > 0 for s in self.steer_multiples),
                f"causal.steer_multiples must be positive numbers (both signs are run), got {self.steer_multiples}")
        require(self.layers is None or bool(self.layers), "causal.layers is empty; leave it unset for every captured layer")


@dataclass(frozen=True)
class AutointerpConfig:
    enabled: bool = setting(True, "explain chosen features in words and score the explanations (detection, fuzzing)")
    features: int = setting(8, "features explained per layer: the top by rollout-level |AUROC - null centre|")
    random_features: int = setting(8, "more live features per layer drawn at random (seeded), for calibration")
    explainer: str = setting("", '"" = the subject model; else a local checkpoint directory that writes and scores the explanations')
    examples: int = setting(10, "activating examples shown to the explainer per feature (top activations first)")
    heldout_examples: int = setting(10, "activating examples held out per feature and scored, with as many non-activating ones")
    max_new_tokens: int = setting(40, "generation budget of an explanation")
    batch_size: int = setting(16, "prompts run together in the explainer")
    seed: int = setting(0, "seeds the random features, the held-out split, the fuzzing marks and the null's pairing")

    def check(self) -> None:
        at_least(self, "autointerp", 0, "features", "random_features", "seed")
        at_least(self, "autointerp", 1, "examples", "heldout_examples", "max_new_tokens", "batch_size")
        require(self.features + self.random_features >= 1,
                "autointerp.features and autointerp.random_features are both 0: no feature to explain; "
                "set autointerp.enabled = false to skip the stage")
        require(self.explainer == self.explainer.strip(),
                f"autointerp.explainer has spaces around it: {self.explainer!r}")


SECTIONS = {"model": ModelConfig, "rollout": RolloutConfig, "capture": CaptureConfig, "train": TrainStageConfig,
            "release": ReleaseConfig, "causal": CausalConfig, "autointerp": AutointerpConfig}


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    autointerp: AutointerpConfig = field(default_factory=AutointerpConfig)
    out: str = setting("runs/tiny", "run directory: rollouts, activation store, checkpoints, release/")
    ray_address: str | None = setting(None, "unset = connect to RAY_ADDRESS if set, else start a local Ray")

    def validate(self) -> None:
        """Every field, alone and with the others: all that the config can show before any Ray work."""
        for section in (self.model, self.rollout, self.capture, self.release, self.causal, self.autointerp):
            section.check()
        self.train.check_stage()
        require(bool(self.out and self.out.strip()), "out is empty; give a run directory")
        # Ray shows a task or actor only the GPUs it asks for: a CUDA device needs a GPU in its request.
        require(not (self.model.device.startswith("cuda") and self.capture.gpus_per_actor == 0),
                f"model.device = {self.model.device} needs capture.gpus_per_actor > 0: Ray shows a replica "
                "only the GPUs it reserves (use model.device = auto to run where the replica is)")
        require(not (self.train.device.startswith("cuda") and self.train.gpus_per_layer == 0),
                f"train.device = {self.train.device} needs train.gpus_per_layer > 0: Ray shows a trainer only "
                "the GPUs it reserves (use train.device = auto to run where the trainer is)")
        if self.ray_address not in (None, "auto", "local"):
            ray_host_port(self.ray_address)


def matryoshka_prefixes(asked: list[int], n_features: int) -> list[int]:
    """The nested prefix widths of a Matryoshka SAE of n_features latents: `asked` (strictly
    increasing, positive, at most n_features) with n_features appended where it is not the last;
    empty asks for the doubling n/16, n/8, n/4, n/2, n (those of them at least 1). Raises ValueError
    naming the setting."""
    if not asked:
        return sorted({n_features // 2**i for i in range(5)} - {0})
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in asked):
        raise ValueError(f"matryoshka_prefixes must be positive integers, got {asked}")
    if any(b <= a for a, b in zip(asked, asked[1:])):
        raise ValueError(f"matryoshka_prefixes must be strictly increasing, got {asked}")
    if asked[-1] > n_features:
        raise ValueError(f"matryoshka_prefixes {asked} go beyond n_features={n_features}")
    return list(asked) if asked[-1] == n_features else [*asked, n_features]


SWEEP_KEYS = ("n_features", "k", "pairs")


def sweep_pairs(sweep: dict, n_features: int, k: int) -> list[tuple[int, int]]:
    """The (n_features, k) pairs a [train.sweep] table asks for, in order, each once: every pair of its
    n_features and k lists (a list left out stands for the configured value), then its explicit pairs."""
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    require(not unknown, f"unknown train.sweep key(s) {', '.join(unknown)}; valid: {', '.join(SWEEP_KEYS)}")
    require(any(sweep.get(key) for key in SWEEP_KEYS),
            "train.sweep is empty: give n_features and/or k lists, or pairs = [[n_features, k], ...]")
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    for key in ("n_features", "k"):
        values = sweep.get(key, [])
        require(isinstance(values, list) and all(is_count(v) for v in values),
                f"train.sweep.{key} must be a list of positive integers, got {values!r}")
    pairs = sweep.get("pairs", [])
    require(isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and all(map(is_count, p)) for p in pairs),
            f"train.sweep.pairs must be a list of [n_features, k] pairs of positive integers, got {pairs!r}")
    grid = [(n, kk) for n in sweep.get("n_features") or [n_features] for kk in sweep.get("k") or [k]]
    return list(dict.fromkeys([*grid, *map(tuple, pairs)]))


def ray_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address of the form host:port or ray://host:port."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not of the form host:port, ray://host:port or auto")
    return host, int(port)


def coerce(where: str, value, annotation: str):
    """A TOML value as the field's declared type, or a ConfigError saying what was expected."""
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[int]": list, "list[float]": list,
             "dict": dict}
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


def section_values(cls, name: str, values: dict) -> dict:
    """A table's values, each checked against its field's type."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{name}.{key}'; valid keys in [{name}]: {', '.join(known)}")
    return {key: coerce(f"{name}.{key}", value, str(known[key].type)) for key, value in values.items()}


def merge(data: dict, more: dict) -> dict:
    """`more` over `data`, table by table (nested tables too); what is not a known table is checked when
    the config is built."""
    merged = dict(data)
    for key, value in more.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if both_tables else value
    return merged


def from_mapping(data: dict) -> PipelineConfig:
    """The config a TOML mapping (with overrides merged in) describes."""
    kwargs = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            kwargs[key] = SECTIONS[key](**section_values(SECTIONS[key], key, value))
        elif key in ("out", "ray_address"):
            kwargs[key] = coerce(key, value, "str | None")
        else:
            raise ConfigError(f"unknown config key '{key}'; valid: {', '.join(SECTIONS)}, out, ray_address")
    return PipelineConfig(**kwargs)


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


def read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); TOML files must be UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Defaults <- TOML file (default: the embedded tiny.toml) <- `section.key=value` overrides, validated."""
    data = read_toml(Path(path) if path else DEFAULT_CONFIG)
    for text in overrides:
        data = merge(data, parse_override(text))
    cfg = from_mapping(data)
    cfg.validate()
    return cfg
