"""Greedy generation with vLLM, and capture of the residual stream from inside vLLM's own model.

Capture (the choice, and why): forward hooks on vLLM's decoder layers, registered inside vLLM's
worker processes (with vLLM v1 the model lives there, not in the caller), during a prefill of
prompt+response with max_tokens=1.
- Exact: the rows come from the very weights and kernels that generated the response.
- One copy of the weights: a transformers re-prefill (qsae.capture.capture_residuals) would need a
  second 27B model beside vLLM's (54 GB in bf16 on a 96 GB GPU that vLLM already fills with KV cache),
  or vLLM put to sleep and the checkpoint reloaded for every shard.
- Tensor parallelism: vLLM's row-parallel projections all-reduce their outputs, so every TP rank
  holds the whole residual; TP rank 0 of each pipeline stage sends the layers that stage owns.
- vLLM 0.32's own "extract_hidden_states" speculative method hands hidden states to a KV connector
  that writes files per request; it is built for EAGLE3 training data, not for this.
The hooks live in `ResidualCapture`, mixed into vLLM's worker class with `worker_extension_cls`, so
the engine calls them by name through `LLM.collective_rpc`: no pickled callables (and so no
VLLM_ALLOW_INSECURE_SERIALIZATION). Rows travel back as raw bytes in the model's dtype.

Pitfalls:
- A vLLM decoder layer returns `(hidden_states, residual)` and leaves the last residual add to the
  next layer's fused add-norm: the residual stream after layer L is their SUM, which is
  transformers' hidden_states[L + 1] for every layer but the last (whose entry is final-normed).
- Hooks need eager PyTorch: under torch.compile vLLM runs one compiled graph of the whole model, and
  hooks registered afterwards never fire; so compilation is off (mode NONE). Decode steps may still
  replay full CUDA graphs (`cudagraph_mode = FULL_DECODE_ONLY`, rollout.decode_cuda_graphs): a prefill
  is never a decode batch, except a prefill whose last chunk is one token, which vLLM cannot tell
  from a decode step; capture adds a token to such a sequence (without_one_token_chunk).
- Prefix caching is off, or positions already cached (the rollout has just computed the same prompt)
  are never recomputed and their rows never seen.
- vLLM lays the tokens of all scheduled requests side by side in one flat batch, so capture submits
  sequences one at a time and checks that the rows it saw are positions 0..n-1, once each, in order
  (chunked prefill spreads them over several forward calls; padding after a chunk is dropped). A
  prefill is already a large batch, so little throughput is lost.
- Sequence parallelism (MoE models' reduce-scatter) splits a layer's rows across TP ranks: refused.
- The prefill samples one token after the whole sequence, so max_model_len must exceed the longest
  prompt plus max_new_tokens.
- The hooked prefill can ask for prompt logprobs: the rank of each generated token under the
  prefill's own prediction, which greedy_reproduction counts (the first shard's self-check).
- vLLM's CPU build reads `gpu_memory_utilization` as the share of host RAM to reserve, and vLLM starts
  its engine in a new process: scripts that use this engine need an `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import inspect
from dataclasses import fields

import numpy as np
import torch
from torch import nn

from qsae.engines import GREEDY, Generation, Sampling, stop_token_ids, strip_after_stop
from qsae.models import load_config

EXTENSION = "qsae.engines.vllm_engine.ResidualCapture"


class CaptureError(RuntimeError):
    """vLLM computed other rows than one sequence's positions 0..n-1, once each."""


def generation_eos(model_path: str, revision: str | None = None) -> int | list[int] | None:
    """The checkpoint's end-of-turn id(s), read as transformers' generate reads them, without
    loading the transformers model."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, revision=revision).eos_token_id
    except OSError:  # no generation_config.json: transformers derives one from the model config
        return load_config(model_path, revision).get_text_config().eos_token_id


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tokenizer,
        max_new_tokens: int,
        *,
        revision: str | None = None,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        decode_cuda_graphs: bool = False,
        seed: int = 0,
        max_model_len: int | None = None,
        sampling: Sampling = GREEDY,
        **vllm_kwargs,
    ):
        """`gpu_memory_utilization`: the share of GPU memory vLLM may take (of host RAM with the CPU
        build); `decode_cuda_graphs`: decode steps replay CUDA graphs (prefills, and so capture, run
        eager either way); `max_model_len`: default the model's; `vllm_kwargs` go to vllm.LLM as
        they are (rollout.vllm: e.g. max_num_batched_tokens)."""
        from vllm import LLM

        check_options(vllm_kwargs)
        self.stop_ids = stop_token_ids(tokenizer, generation_eos(model_path, revision))
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.llm = LLM(
            model=model_path,
            revision=revision,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            **engine_settings(decode_cuda_graphs),
            **vllm_kwargs,
        )

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None) -> list[Generation]:
        """Greedy, or sampled with vLLM's per-request seed (a request's tokens do not depend on what
        else is in the batch)."""
        from vllm import SamplingParams, TokensPrompt

        common = {"max_tokens": self.max_new_tokens, "stop_token_ids": sorted(self.stop_ids), "detokenize": False}
        if self.sampling.greedy:
            params = SamplingParams(temperature=0.0, **common)
        else:
            if seeds is None or len(seeds) != len(prompt_ids):
                raise ValueError("sampled generation needs one seed per prompt")
            sampling = self.sampling
            params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                     seed=seed, **common) for seed in seeds]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # vLLM keeps the stop token it stopped on in token_ids; HFEngine's rule removes it, and vLLM's
        # own finish_reason says whether the budget ran out.
        return [Generation(strip_after_stop(list(out.outputs[0].token_ids), self.stop_ids).token_ids,
                           out.outputs[0].finish_reason) for out in outputs]

    def close(self) -> None:
        """Stop vLLM's engine process (and its workers) now rather than at garbage collection."""
        self.llm.llm_engine.engine_core.shutdown()


# What qsae sets itself, so rollout.vllm may not: capture depends on each of them.
RESERVED_OPTIONS = ("model", "revision", "dtype", "tensor_parallel_size", "gpu_memory_utilization", "seed",
                    "max_model_len", "enforce_eager", "compilation_config", "enable_prefix_caching",
                    "worker_extension_cls", "language_model_only")


def engine_settings(decode_cuda_graphs: bool) -> dict:
    """The vllm.LLM settings capture needs: no torch.compile (hooks do not fire in compiled graphs),
    CUDA graphs for decode steps only or none, no prefix caching (every position must be computed),
    the hooks' worker extension, and no vision tower (qsae gives token ids only; ignored by text
    models)."""
    return {
        "enforce_eager": not decode_cuda_graphs,
        "compilation_config": {"mode": "NONE", "cudagraph_mode": "FULL_DECODE_ONLY" if decode_cuda_graphs else "NONE"},
        "enable_prefix_caching": False,
        "worker_extension_cls": EXTENSION,
        "language_model_only": True,
    }


def check_options(options: dict) -> None:
    """rollout.vllm's keys are vllm.LLM's engine arguments, and none that capture depends on."""
    from vllm.engine.arg_utils import EngineArgs

    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    if reserved:
        raise ValueError(f"rollout.vllm sets {', '.join(reserved)}, which qsae sets itself (see the rollout.* "
                         "settings; compilation stays off and prefix caching off so that capture sees every position)")
    known = {f.name for f in fields(EngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"rollout.vllm sets {', '.join(unknown)}, which vLLM {vllm_version()} does not know as an "
                         "engine argument (vllm.engine.arg_utils.EngineArgs)")


def vllm_version() -> str:
    from vllm import __version__

    return __version__


def prefill_chunk(engine: VLLMEngine) -> int:
    """How many tokens of a lone request's prefill vLLM computes per step."""
    scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
    threshold = scheduler.long_prefill_token_threshold or 0
    return min(scheduler.max_num_batched_tokens, threshold) if threshold > 0 else scheduler.max_num_batched_tokens


def without_one_token_chunk(sequence: list[int], chunk: int) -> list[int]:
    """The sequence as capture prefills it. A prefill whose last chunk is a single token is, to vLLM,
    a decode step, which may replay a CUDA graph (where hooks do not fire): a copy of the last token
    appended makes that chunk two tokens and changes no earlier position (the model is causal)."""
    return sequence + sequence[-1:] if len(sequence) > chunk and len(sequence) % chunk == 1 else sequence


def capture_residuals_vllm(
    engine: VLLMEngine, sequences: list[list[int]], starts: list[int], layer_ids: list[int]
) -> dict[int, list[np.ndarray]]:
    """For each sequence, the residual rows of positions starts[i]: at each layer, as float32
    [n_i, d_model]: the contract of qsae.capture.capture_residuals, computed by vLLM's model."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.config import CompilationMode

    if engine.llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise CaptureError("capture with vLLM needs compilation off (mode NONE): hooks do not fire in compiled graphs")
    prefill_only = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    chunk = prefill_chunk(engine)
    rows: dict[int, list[np.ndarray]] = {layer: [] for layer in layer_ids}
    engine.llm.collective_rpc("qsae_start_capture", args=(list(layer_ids),))
    try:
        for seq, start in zip(sequences, starts):
            prefilled = without_one_token_chunk(list(seq), chunk)
            engine.llm.generate([TokensPrompt(prompt_token_ids=prefilled)], prefill_only, use_tqdm=False)
            found = take_rows(engine, len(prefilled), start)
            for layer in layer_ids:
                if layer not in found:
                    raise CaptureError(f"no vLLM worker captured layer {layer}")
                rows[layer].append(found[layer][: len(seq) - start])
    finally:
        engine.llm.collective_rpc("qsae_stop_capture")
    return rows


def greedy_reproduction(engine: VLLMEngine, sequences: list[list[int]], starts: list[int]) -> tuple[int, int]:
    """(positions whose token the prefill ranks first, positions) over positions starts[i].. of each
    sequence: of greedy rollouts, the share of their tokens the hooked prefill reproduces. vLLM's
    prompt logprobs give each prompt token's rank under the prediction from the positions before it;
    the sequences go one at a time, so those full-vocabulary logprobs stay one prefill chunk's."""
    from vllm import SamplingParams, TokensPrompt

    with_ranks = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    hits = total = 0
    for seq, start in zip(sequences, starts):
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=list(seq))], with_ranks, use_tqdm=False)[0]
        ranks = [out.prompt_logprobs[pos][token].rank for pos, token in enumerate(seq) if pos >= start]
        hits += sum(rank == 1 for rank in ranks)
        total += len(ranks)
    return hits, total


def take_rows(engine: VLLMEngine, n_tokens: int, start: int) -> dict[int, np.ndarray]:
    """Rows start..n_tokens-1 of the sequence just prefilled, from whichever workers hold each layer."""
    try:
        replies = engine.llm.collective_rpc("qsae_take_rows", args=(n_tokens, start))
    except Exception as err:  # vLLM re-raises a worker's error as a bare Exception with its message
        raise CaptureError(str(err)) from err
    return {int(layer): unpack_rows(packed) for reply in replies for layer, packed in reply.items()}


def unpack_rows(packed: list) -> np.ndarray:
    dtype, shape, data = packed
    flat = torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)) if data else torch.empty(0)
    return flat.reshape(shape).float().numpy()


def pack_rows(rows: torch.Tensor) -> list:
    """[dtype name, shape, bytes]: plain types that vLLM's RPC encoder passes without pickle."""
    rows = rows.detach().cpu().contiguous()
    return [str(rows.dtype).removeprefix("torch."), list(rows.shape), rows.view(torch.uint8).numpy().tobytes()]


def sequence_rows(calls: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """Rows 0..n-1 of the one sequence prefilled since the last take, from the (positions, rows) of
    each forward call: each call holds the next chunk of positions, maybe followed by padding rows."""
    pieces, expected = [], 0
    for positions, residual in calls:
        if len(residual) != len(positions):
            raise CaptureError(
                f"a layer returned {len(residual)} rows for {len(positions)} tokens: its output is split "
                "across tensor-parallel ranks (sequence parallelism), which capture does not gather"
            )
        width = min(n - expected, len(positions))
        wanted = torch.arange(expected, expected + width, device=positions.device)
        matches = positions[:width] == wanted
        chunk = width if bool(matches.all()) else int(torch.argmin(matches.int()))
        if chunk == 0 and len(positions):
            raise CaptureError(
                f"vLLM computed positions {positions[:8].tolist()}... where {expected} came next: prefix caching "
                "on, another request in flight, or a preempted request"
            )
        pieces.append(residual[:chunk])
        expected += chunk
    if expected != n:
        raise CaptureError(f"vLLM computed {expected} of the sequence's {n} positions")
    return torch.cat(pieces)


def find_decoder_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The language model's decoder layers inside a vLLM model: the one ModuleList named `layers`
    with one entry per decoder layer (vision towers and MTP heads have layer lists of their own)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.rsplit(".", 1)[-1] == "layers"
        and len(module) == n_layers
        and not any(part in name for part in ("visual", "vision", "mtp"))
    ]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise CaptureError(f"expected one list of {n_layers} decoder layers in {type(model).__name__}, found {names}")
    return found[0][1]


def residual_stream(output) -> torch.Tensor:
    """vLLM layers return (hidden_states, residual) and leave the add to the next layer's fused
    add-norm; their sum is the residual stream (what the next layer adds and normalises)."""
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1]
        return hidden.clone() if residual is None else hidden + residual
    return output.clone()


class ResidualCapture:
    """Methods mixed into vLLM's worker class (`worker_extension_cls`) and called by name through
    `collective_rpc`, in the process that holds the model. Names carry a prefix: vLLM refuses an
    extension whose attributes clash with the worker's."""

    def qsae_start_capture(self, layer_ids: list[int]) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import PPMissingLayer

        self.qsae_stop_capture()
        self._qsae_calls = {}
        self._qsae_handles = []
        if get_tensor_model_parallel_rank() != 0:
            return  # every TP rank holds the same full residual after the all-reduce: rank 0 reports
        n_layers = self.vllm_config.model_config.hf_text_config.num_hidden_layers
        layers = find_decoder_layers(self.get_model(), n_layers)
        for layer in layer_ids:
            if isinstance(layers[layer], PPMissingLayer):
                continue  # another pipeline stage owns this layer and reports it
            self._qsae_calls[layer] = []
            hook = self._qsae_hook(layer, layers[layer].forward)
            self._qsae_handles.append(layers[layer].register_forward_hook(hook, with_kwargs=True))

    def _qsae_hook(self, layer: int, forward):
        signature = inspect.signature(forward)  # Qwen3 passes positions first, Qwen3.5 by keyword

        def hook(module, args, kwargs, output):
            positions = signature.bind_partial(*args, **kwargs).arguments["positions"]
            if positions.ndim == 2:  # M-RoPE: [3, tokens], equal rows for text
                positions = positions[0]
            self._qsae_calls[layer].append((positions.clone(), residual_stream(output)))

        return hook

    def qsae_take_rows(self, n_tokens: int, start: int) -> dict[str, list]:
        """The captured rows start..n_tokens-1 of the one sequence prefilled since the last take."""
        taken = {}
        for layer, calls in getattr(self, "_qsae_calls", {}).items():
            taken[str(layer)] = pack_rows(sequence_rows(calls, n_tokens)[start:])
            calls.clear()
        return taken

    def qsae_stop_capture(self) -> None:
        for handle in getattr(self, "_qsae_handles", []):
            handle.remove()
        self._qsae_handles = []
        self._qsae_calls = {}
