"""Capture stage: one teacher-forced forward pass over prompt+response with hooks on chosen layers.

"Residual at layer L" is the output of decoder layer L, i.e. transformers' hidden_states[L + 1]
(a Qwen3.5 decoder layer returns the residual stream tensor itself). Only response-token rows are kept.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from qsae.engines import Engine
from qsae.models import decoder_layers
from qsae.questions import Question
from qsae.rollout import Rollout, run_rollouts, write_rollouts
from qsae.store import shard_path, write_shard

if TYPE_CHECKING:
    from qsae.config import PipelineConfig


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


def capture_shard(
    model: nn.Module, rollouts: list[Rollout], layer_ids: list[int], store_dir: Path, shard: str, dtype: str, batch_size: int
) -> dict[str, int]:
    """Capture the response-token residuals of `rollouts` (at least one) and write a shard per layer."""
    sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
    starts = [r.n_prompt_tokens for r in rollouts]
    residuals = capture_residuals(model, sequences, starts, layer_ids, batch_size)
    lengths = [r.n_response_tokens for r in rollouts]
    rollout_id = np.repeat([r.rollout_id for r in rollouts], lengths)
    position = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    token_id = np.concatenate([np.asarray(r.response_token_ids, dtype=np.int64) for r in rollouts])
    correct = np.repeat([r.correct for r in rollouts], lengths)
    return {
        str(layer): write_shard(
            store_dir, layer, shard, rollout_id, position, token_id, correct, np.concatenate(residuals[layer]), dtype
        )
        for layer in layer_ids
    }


def capture_question_shard(
    model: nn.Module, tokenizer, engine: Engine, shard: str, questions: list[Question], first_id: int,
    cfg: PipelineConfig, run_dir: Path,
) -> dict:
    """Roll out one shard of questions, then capture it. Every file is written atomically; the caller
    lists the shard in the manifest only after this returns."""
    rollouts = run_rollouts(engine, tokenizer, questions, first_id, cfg.rollout.thinking, cfg.rollout.seed)
    rollout_part = Path(run_dir) / "rollouts" / f"{shard}.parquet"
    write_rollouts(rollouts, rollout_part)
    store_dir = Path(run_dir) / "activations"
    rows = capture_shard(model, rollouts, cfg.capture.layers, store_dir, shard, cfg.capture.dtype, cfg.capture.batch_size)
    written = [rollout_part] + [shard_path(store_dir, layer, shard) for layer in cfg.capture.layers]
    return {
        "shard": shard,
        "rollouts": len(rollouts),
        "rows": rows,
        "response_tokens": sum(r.n_response_tokens for r in rollouts),
        "correct": sum(r.correct for r in rollouts),
        "bytes": sum(path.stat().st_size for path in written),
    }
