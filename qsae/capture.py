"""Capture stage: one teacher-forced forward pass over prompt+response with hooks on chosen layers.

"Residual at layer L" is the output of decoder layer L, i.e. transformers' hidden_states[L + 1]
(a Qwen3.5 decoder layer returns the residual stream tensor itself). Only response-token rows are kept.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from qsae.engines import Engine
from qsae.engines.hf_engine import HFEngine
from qsae.models import TINY_DENSE_MODEL, TINY_MODEL, decoder_layers, load_model, load_tokenizer
from qsae.questions import Question
from qsae.rollout import Rollout, run_rollouts, write_rollouts
from qsae.store import MANIFEST, StoreError, check_compatible, new_manifest, read_manifest, shard_path, write_shard

if TYPE_CHECKING:
    from qsae.config import PipelineConfig

# (sequences, starts, layer_ids) -> {layer: [rows of sequence i from position starts[i]]}
ResidualFn = Callable[[list[list[int]], list[int], list[int]], dict[int, list[np.ndarray]]]


@dataclass
class QuestionShard:
    name: str
    first_id: int  # rollout id of its first question: ids are positions in the sampled question list
    questions: list[Question]


def plan_shards(questions: list[Question], per_shard: int) -> list[QuestionShard]:
    return [
        QuestionShard(f"shard-{i // per_shard:05d}", i, questions[i : i + per_shard])
        for i in range(0, len(questions), per_shard)
    ]


def store_manifest(cfg: PipelineConfig, model_path: str, d_model: int) -> dict:
    """The empty manifest of this run's store: the model, how its rollouts were made, what is kept."""
    # The tiny models have no hub revision; their cache directory name carries the build recipe's hash.
    revision = cfg.model.revision or (Path(model_path).name if cfg.model.name in (TINY_MODEL, TINY_DENSE_MODEL) else None)
    generated_with = {"model_dtype": cfg.model.dtype, "engine": cfg.rollout.engine, "thinking": cfg.rollout.thinking,
                      "max_new_tokens": cfg.rollout.max_new_tokens}
    return new_manifest(cfg.model.name, revision, cfg.capture.layers, d_model, cfg.capture.dtype,
                        generated_with=generated_with)


def store_to_extend(cfg: PipelineConfig, model_path: str, d_model: int, questions: list[Question],
                    run_dir: Path) -> tuple[dict, list[QuestionShard]]:
    """(the manifest capture extends: the run directory's store, else a new one; this run's shards),
    refusing a store captured differently or from other questions. Reads files only, so it runs
    before Ray starts as well as in capture."""
    manifest = store_manifest(cfg, model_path, d_model)
    store_dir = Path(run_dir) / "activations"
    if (store_dir / MANIFEST).exists():
        existing = read_manifest(store_dir)
        check_compatible(existing, manifest)
        manifest = existing
    shards = plan_shards(questions, cfg.capture.questions_per_shard)
    check_same_questions(manifest, shards)
    return manifest, shards


def check_same_questions(manifest: dict, shards: list[QuestionShard]) -> None:
    """A listed shard is skipped on rerun, so it must hold the very questions this run would give it."""
    planned = {shard.name: [q.uuid for q in shard.questions] for shard in shards}
    for name, entry in manifest["shards"].items():
        if planned.get(name) != entry["questions"]:
            raise StoreError(
                f"the activation store's {name} holds other questions than this run's sample "
                "(changed questions, num_questions, seed or questions_per_shard?); use a new --out"
            )


class _StopForward(Exception):
    """Raised by the deepest hook: layers after it cannot change what was captured."""


@contextmanager
def residual_hooks(layers: nn.ModuleList, layer_ids: list[int]):
    """Yield a dict that fills with {layer: output tensor} on each forward pass."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layer_ids)

    def hook_for(layer: int):
        def hook(module, inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [layers[layer].register_forward_hook(hook_for(layer)) for layer in layer_ids]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def text_model(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers: running it alone skips the LM head's logits."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


@torch.no_grad()
def capture_residuals(
    model: nn.Module, sequences: list[list[int]], starts: list[int], layer_ids: list[int], batch_size: int
) -> dict[int, list[np.ndarray]]:
    """For each sequence, the rows of positions starts[i]: at each layer, as float32 [n_i, d_model]."""
    layers = decoder_layers(model)
    runner = text_model(model)
    device = next(model.parameters()).device
    rows: dict[int, list[np.ndarray]] = {layer: [] for layer in layer_ids}
    with residual_hooks(layers, layer_ids) as captured:
        for first in range(0, len(sequences), batch_size):
            batch = sequences[first : first + batch_size]
            width = max(len(seq) for seq in batch)
            # Right padding: causal attention and the DeltaNet recurrence never see later positions,
            # so every real position gets exactly the residual of its unpadded sequence.
            input_ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in batch], device=device)
            lengths = torch.tensor([len(seq) for seq in batch], device=device)
            attention_mask = (torch.arange(width, device=device) < lengths[:, None]).long()
            try:
                runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
            for layer in layer_ids:
                hidden = captured[layer].float().cpu().numpy()
                for j, seq in enumerate(batch):
                    rows[layer].append(hidden[j, starts[first + j] : len(seq)])
    return rows


def special_token_ids(tokenizer) -> set[int]:
    """Ids of special and chat-template tokens: the tokenizer's special tokens and every token added to
    its learned vocabulary (<|im_start|>, <think>, </think>, tool-call tags...), markup rather than text."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def capture_shard(
    residuals_of: ResidualFn, rollouts: list[Rollout], layer_ids: list[int], store_dir: Path, shard: str, dtype: str,
    *, special_ids: set[int] = frozenset(),
) -> dict[str, int]:
    """Capture the response-token residuals of `rollouts` (at least one) and write a shard per layer;
    rows whose token is in `special_ids` are marked special."""
    sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
    starts = [r.n_prompt_tokens for r in rollouts]
    residuals = residuals_of(sequences, starts, layer_ids)
    lengths = [r.n_response_tokens for r in rollouts]
    rollout_id = np.repeat([r.rollout_id for r in rollouts], lengths)
    position = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    token_id = np.concatenate([np.asarray(r.response_token_ids, dtype=np.int64) for r in rollouts])
    correct = np.repeat([r.correct for r in rollouts], lengths)
    special = np.isin(token_id, sorted(special_ids))
    return {
        str(layer): write_shard(store_dir, layer, shard, rollout_id, position, token_id, correct,
                                np.concatenate(residuals[layer]), dtype, special=special)
        for layer in layer_ids
    }


@dataclass
class Replica:
    """What one capture replica holds: a tokenizer, a rollout engine, and the function that gives the
    residual rows of whole sequences with the same model the engine runs."""

    tokenizer: object
    engine: Engine
    residuals_of: ResidualFn


def load_replica(model_path: str, cfg: PipelineConfig) -> Replica:
    """Load the model once, for the configured engine."""
    if cfg.rollout.engine == "vllm":
        from qsae.engines.vllm_engine import VLLMEngine, capture_residuals_vllm

        tokenizer = load_tokenizer(model_path, cfg.model.revision)
        engine = VLLMEngine(
            model_path, tokenizer, cfg.rollout.max_new_tokens, cfg.model.revision, cfg.model.dtype,
            cfg.rollout.tensor_parallel_size, cfg.rollout.gpu_memory_utilization, cfg.rollout.enforce_eager,
            cfg.rollout.seed, cfg.rollout.max_model_len,
        )
        return Replica(tokenizer, engine, partial(capture_residuals_vllm, engine))
    model, tokenizer = load_model(model_path, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    engine = HFEngine(model, tokenizer, cfg.rollout.max_new_tokens, cfg.rollout.batch_size)
    return Replica(tokenizer, engine, partial(capture_residuals, model, batch_size=cfg.capture.batch_size))


def capture_question_shard(
    replica: Replica, shard: str, questions: list[Question], first_id: int, cfg: PipelineConfig, run_dir: Path
) -> dict:
    """Roll out one shard of questions, then capture it. Every file is written atomically; the caller
    lists the shard in the manifest only after this returns."""
    rollouts = run_rollouts(replica.engine, replica.tokenizer, questions, first_id, cfg.rollout.thinking, cfg.rollout.seed)
    rollout_part = Path(run_dir) / "rollouts" / f"{shard}.parquet"
    write_rollouts(rollouts, rollout_part)
    store_dir = Path(run_dir) / "activations"
    rows = capture_shard(replica.residuals_of, rollouts, cfg.capture.layers, store_dir, shard, cfg.capture.dtype,
                         special_ids=special_token_ids(replica.tokenizer))
    written = [rollout_part] + [shard_path(store_dir, layer, shard) for layer in cfg.capture.layers]
    return {
        "shard": shard,
        "rollouts": len(rollouts),
        "rows": rows,
        "response_tokens": sum(r.n_response_tokens for r in rollouts),
        "correct": sum(r.correct for r in rollouts),
        "bytes": sum(path.stat().st_size for path in written),
    }
