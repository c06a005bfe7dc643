"""Capture stage: greedy rollouts of a shard of questions, then one teacher-forced forward pass over
prompt+response with hooks on chosen layers, written to the activation store.

"Residual at layer L" is the output of decoder layer L (a Qwen3.5 decoder layer returns the residual
stream tensor itself); for every layer but the last that is transformers' hidden_states[L + 1] (the
last one transformers returns after the final norm). Only response-token rows are kept: every one, or a
seeded sample of each rollout's (capture.keep_per_rollout or keep_fraction; the manifest records the rule).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsae import console
from qsae.config import CaptureConfig, ModelConfig, RolloutConfig
from qsae.engines import Engine, Sampling
from qsae.engines.hf_engine import HFEngine
from qsae.models import decoder_layers, load_model, load_tokenizer, weights_identity
from qsae.questions import Question, question_digest
from qsae.rollout import Draws, Rollout, run_rollout_parts, write_rollouts
from qsae.rundir import RunDir
from qsae.store import (MANIFEST, KeptPositions, ShardRows, StoreError, beyond_float16, check_compatible, new_manifest,
                        read_manifest, shard_checksums, shard_path, write_shard)
from qsae.tiny import TINY_DENSE_MODEL, TINY_MODEL

# (sequences, starts, layer_ids) -> {layer: [rows of sequence i from position starts[i]]}
ResidualFn = Callable[[list[list[int]], list[int], list[int]], dict[int, list[np.ndarray]]]


@dataclass
class QuestionShard:
    name: str
    first_id: int  # its first question's position in the sampled question list (qsae.rollout: rollout ids)
    questions: list[Question]


def plan_shards(questions: list[Question], per_shard: int) -> list[QuestionShard]:
    return [
        QuestionShard(f"shard-{i // per_shard:05d}", i, questions[i : i + per_shard])
        for i in range(0, len(questions), per_shard)
    ]


@dataclass(frozen=True)
class ReplicaSpec:
    """What a model replica loads and how it rolls out and captures: its config sections, with the
    model's path and the captured layers resolved (qsae.pipeline.resolve)."""

    model_path: str
    d_model: int
    layers: tuple[int, ...]
    model: ModelConfig
    rollout: RolloutConfig
    capture: CaptureConfig


def kept_positions(capture: CaptureConfig) -> KeptPositions:
    """The bounded store's rule (capture.keep_*): every response position when neither is set."""
    return KeptPositions(capture.keep_per_rollout, capture.keep_fraction, capture.keep_seed)


def store_manifest(spec: ReplicaSpec) -> dict:
    """The empty manifest of this run's store: the model, how its rollouts were made, what is kept."""
    model = spec.model
    # The tiny models have no hub revision; their cache directory name carries the build recipe's hash.
    revision = model.revision or (Path(spec.model_path).name if model.name in (TINY_MODEL, TINY_DENSE_MODEL) else None)
    rollout = spec.rollout
    generated_with = {"model_dtype": model.dtype, "engine": rollout.engine, "thinking": rollout.thinking,
                      "max_new_tokens": rollout.max_new_tokens, "samples_per_question": rollout.samples_per_question,
                      "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
                      "sampling_seed": rollout.sampling_seed}
    return new_manifest(model.name, revision, list(spec.layers), spec.d_model, dtype=spec.capture.dtype,
                        generated_with=generated_with, weights=weights_identity(spec.model_path),
                        kept=kept_positions(spec.capture))


def store_to_extend(spec: ReplicaSpec, questions: list[Question], run: RunDir) -> tuple[dict, list[QuestionShard]]:
    """(the manifest capture extends: the run directory's store, else a new one; this run's shards),
    refusing a store captured differently or from other questions. Reads files only, so it runs
    before Ray starts as well as in capture."""
    manifest = store_manifest(spec)
    if (run.store / MANIFEST).exists():
        existing = read_manifest(run.store)
        check_compatible(existing, manifest)
        manifest = existing
    shards = plan_shards(questions, spec.capture.questions_per_shard)
    check_same_questions(manifest, shards)
    return manifest, shards


def list_shard(manifest: dict, captured: dict) -> None:
    """Enter a captured shard (capture_question_shard's result) in the manifest, with the checksums of
    its files; the caller writes it."""
    keys = ("questions", "question_digests", "rollouts", "rows", "checksums", "beyond_float16")
    manifest["shards"][captured["shard"]] = {key: captured[key] for key in keys if key in captured}


def check_same_questions(manifest: dict, shards: list[QuestionShard]) -> None:
    """A listed shard is skipped on rerun, so it must hold the very questions this run would give it:
    the same uuids, and each with the same text, options and answer (its labels come from them)."""
    planned = {shard.name: shard.questions for shard in shards}
    for name, entry in manifest["shards"].items():
        questions = planned.get(name, [])
        if [q.uuid for q in questions] != entry["questions"]:
            raise StoreError(
                f"the activation store's {name} holds other questions than this run's sample "
                "(changed questions, num_questions, seed or questions_per_shard?); use a new --out"
            )
        recorded = entry.get("question_digests") or [None] * len(questions)
        changed = [q.uuid for q, digest in zip(questions, recorded) if question_digest(q) != digest]
        if changed:
            raise StoreError(
                f"the question file gives question {changed[0]!r} ({len(changed)} of {name}'s) other text, options or "
                f"answer than when {name} was captured, so its rollouts' labels would be stale; use a new --out, "
                "or the question file it was captured with")


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
def capture_residuals(model: nn.Module, sequences: list[list[int]], starts: list[int], layer_ids: list[int], *,
                      batch_size: int) -> dict[int, list[np.ndarray]]:
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


class CaptureCheckError(ValueError):
    """The first shard's rows show that the hooks capture something other than the residual stream."""


def check_residuals(matrices: dict[int, np.ndarray], rollout_id: np.ndarray, engine: str) -> dict[str, float]:
    """A replica's first rows, before anything is stored: at every layer finite, no row all zeros (a
    hook that saw nothing), and no two neighbouring positions of a rollout equal (a hook that keeps
    one position for all); returns each layer's median row norm, for the log. A failure names the
    layer and the engine."""
    norms = {}
    same_rollout = rollout_id[1:] == rollout_id[:-1]
    for layer, rows in matrices.items():
        where = f"capture self-check, layer {layer} ({engine} engine)"
        if not np.isfinite(rows).all():
            raise CaptureCheckError(f"{where}: residuals are not finite; capture with model.dtype float32")
        row_norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        if (row_norms == 0).any():
            raise CaptureCheckError(f"{where}: {int((row_norms == 0).sum()):,} of {len(rows):,} rows are all zeros: "
                                    "the hook did not see the layer's output")
        repeated = same_rollout & (rows[1:] == rows[:-1]).all(axis=1)
        if repeated.any():
            raise CaptureCheckError(f"{where}: {int(repeated.sum()):,} rows repeat the position before them: the "
                                    "hook does not see each position")
        norms[str(layer)] = float(np.median(row_norms)) if len(rows) else 0.0
    return norms


def capture_shard(residuals_of: ResidualFn, rollouts: list[Rollout], layer_ids: list[int], store_dir: Path, *,
                  shard: str, dtype: str, special_ids: set[int] = frozenset(),
                  kept: KeptPositions = KeptPositions(), check: str | None = None) -> dict[str, int]:
    """Capture the response-token residuals of `rollouts` (at least one) and write a shard per layer,
    keeping the positions `kept` chooses; rows whose token is in `special_ids` are marked special.
    In a float16 store, a token whose residual exceeds float16's range at any layer is left out at
    every layer (the layers keep the same tokens): one token of massive activations must not end a
    run, and the row rules would leave it out of training anyway (its norm is far above the median).
    `check` (the engine's name) first runs check_residuals on the rows, as a replica's first shard does."""
    sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
    starts = [r.n_prompt_tokens for r in rollouts]
    residuals = residuals_of(sequences, starts, layer_ids)
    offsets = [kept.choose(r.rollout_id, r.n_response_tokens) for r in rollouts]  # into each response
    rollout_id = np.repeat([r.rollout_id for r in rollouts], [len(o) for o in offsets])
    position = np.concatenate([start + o for start, o in zip(starts, offsets)])
    token_id = np.concatenate([np.asarray(r.response_token_ids, dtype=np.int64)[o] for r, o in zip(rollouts, offsets)])
    correct = np.repeat([r.correct for r in rollouts], [len(o) for o in offsets])
    matrices = {layer: np.concatenate([rows[o] for rows, o in zip(residuals[layer], offsets)]) for layer in layer_ids}
    if check is not None:
        norms = check_residuals(matrices, rollout_id, check)
        console.say(f"[qsae] {shard}: capture self-check passed; median residual norm per layer: "
                    + ", ".join(f"L{layer} {norm:.3g}" for layer, norm in norms.items()))
    keep = np.ones(len(rollout_id), dtype=bool)
    if dtype == "float16":
        for matrix in matrices.values():
            keep &= ~beyond_float16(matrix)
    special = np.isin(token_id[keep], sorted(special_ids))
    return {
        str(layer): write_shard(store_dir, layer, shard, ShardRows(
            rollout_id[keep], position[keep], token_id[keep], correct[keep], matrices[layer][keep], special), dtype=dtype)
        for layer in layer_ids
    }


@dataclass
class Replica:
    """What one capture replica holds: a tokenizer, a rollout engine, the function that gives the
    residual rows of whole sequences with the same model the engine runs, and (vLLM) the one that
    counts how many generated tokens that same prefill predicts (its greedy_reproduction)."""

    tokenizer: object
    engine: Engine
    residuals_of: ResidualFn
    reproduction: Callable[[list[list[int]], list[int]], tuple[int, int]] | None = None


# The vLLM self-check: of a replica's first greedy rollouts, the share of generated tokens the hooked
# prefill must predict. bf16 decode and prefill kernels differ in rounding, which flips a near-tie now
# and then; a prefill of other weights, positions or tokens than generation's misses most of them.
REPRODUCED_AT_LEAST = 0.99
REPRODUCTION_ROLLOUTS, REPRODUCTION_TOKENS = 2, 256


def check_reproduction(replica: Replica, rollouts: list[Rollout], engine: str) -> None:
    """Greedy rollouts only: the first REPRODUCTION_TOKENS response tokens of the rollouts with the
    shortest prompts (vLLM holds full-vocabulary logprobs of every position of a prefill chunk at
    once), as the replica's prefill predicts them; too few stops the run, naming the engine."""
    if replica.reproduction is None or not replica.engine.sampling.greedy:
        return
    sample = sorted((r for r in rollouts if r.n_response_tokens), key=lambda r: r.n_prompt_tokens)[:REPRODUCTION_ROLLOUTS]
    hits, total = replica.reproduction([r.prompt_token_ids + r.response_token_ids[:REPRODUCTION_TOKENS] for r in sample],
                                       [r.n_prompt_tokens for r in sample])
    if total and hits < REPRODUCED_AT_LEAST * total:
        raise CaptureCheckError(
            f"capture self-check ({engine} engine): the hooked prefill predicts only {hits:,} of {total:,} tokens its "
            f"greedy generation chose (at least {REPRODUCED_AT_LEAST:.0%} expected): capture would not see the "
            "computation that generated the rollouts")
    console.say(f"[qsae] capture self-check: the prefill reproduces {hits:,} of {total:,} greedy tokens")


def sampling_of(rollout: RolloutConfig) -> Sampling:
    return Sampling(rollout.temperature, rollout.top_p, rollout.top_k)


def load_replica(spec: ReplicaSpec) -> Replica:
    """Load the model once, for the configured engine."""
    model, rollout = spec.model, spec.rollout
    if rollout.engine == "vllm":
        from qsae.engines.vllm_engine import VLLMEngine, capture_residuals_vllm, greedy_reproduction

        tokenizer = load_tokenizer(spec.model_path, model.revision)
        engine = VLLMEngine(spec.model_path, tokenizer, rollout.max_new_tokens, revision=model.revision, dtype=model.dtype,
                            tensor_parallel_size=rollout.tensor_parallel_size,
                            gpu_memory_utilization=rollout.gpu_memory_utilization,
                            decode_cuda_graphs=rollout.decode_cuda_graphs, seed=rollout.seed,
                            max_model_len=rollout.max_model_len, sampling=sampling_of(rollout), **rollout.vllm)
        return Replica(tokenizer, engine, partial(capture_residuals_vllm, engine), partial(greedy_reproduction, engine))
    hf_model, tokenizer = load_model(spec.model_path, model.revision, model.dtype, model.device)
    engine = HFEngine(hf_model, tokenizer, rollout.max_new_tokens, rollout.batch_size, sampling_of(rollout))
    return Replica(tokenizer, engine, partial(capture_residuals, hf_model, batch_size=spec.capture.batch_size))


VLLM_PROMPTS_IN_FLIGHT = 256  # decoding is memory-bound: a step costs about the same for 10 prompts as for 256


def shards_per_call(spec: ReplicaSpec) -> int:
    """How many shards a replica rolls out in one engine call (rollout.prompts_in_flight), whole shards."""
    per_shard = spec.capture.questions_per_shard * spec.rollout.samples_per_question
    in_flight = spec.rollout.prompts_in_flight or (VLLM_PROMPTS_IN_FLIGHT if spec.rollout.engine == "vllm" else per_shard)
    return max(1, in_flight // per_shard)


def roll_out_shards(replica: Replica, shards: list[QuestionShard], spec: ReplicaSpec) -> dict[str, list[Rollout]]:
    """The rollouts of several shards (rollout.samples_per_question per question) from one engine call."""
    parts = run_rollout_parts(replica.engine, replica.tokenizer, [(s.first_id, s.questions) for s in shards],
                              thinking=spec.rollout.thinking, seed=spec.rollout.seed,
                              draws=Draws(spec.rollout.samples_per_question, spec.rollout.sampling_seed))
    return {shard.name: rollouts for shard, rollouts in zip(shards, parts)}


def capture_question_shard(replica: Replica, shard: QuestionShard, spec: ReplicaSpec, run: RunDir, *,
                           rollouts: list[Rollout] | None = None, check: bool = False) -> dict:
    """Capture one shard of questions from its rollouts (rolled out here when not given; see
    roll_out_shards), with check_residuals first where `check`: a replica's first shard. Every file
    is written atomically; the caller lists the shard in the manifest only after this returns, with
    the checksums of its files (read back from disk once written)."""
    if rollouts is None:
        rollouts = roll_out_shards(replica, [shard], spec)[shard.name]
    if check:
        check_reproduction(replica, rollouts, spec.rollout.engine)
    rollout_part = run.rollout_part(shard.name)
    write_rollouts(rollouts, rollout_part)
    rows = capture_shard(replica.residuals_of, rollouts, list(spec.layers), run.store, shard=shard.name,
                         dtype=spec.capture.dtype, special_ids=special_token_ids(replica.tokenizer),
                         kept=kept_positions(spec.capture), check=spec.rollout.engine if check else None)
    written = [rollout_part] + [shard_path(run.store, layer, shard.name) for layer in spec.layers]
    chosen = sum(kept_positions(spec.capture).count(r.n_response_tokens) for r in rollouts)
    return {
        "shard": shard.name,
        "beyond_float16": chosen - rows[str(spec.layers[0])],  # tokens left out (capture_shard)
        "questions": [q.uuid for q in shard.questions],
        "question_digests": [question_digest(q) for q in shard.questions],
        "rollouts": len(rollouts),
        "rows": rows,
        "response_tokens": sum(r.n_response_tokens for r in rollouts),
        "correct": sum(r.correct for r in rollouts),
        "bytes": sum(path.stat().st_size for path in written),
        "checksums": shard_checksums(run.store, shard.name, spec.layers, rollout_part),
    }
