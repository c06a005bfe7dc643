"""Captured response tokens per second: qsae against the original release's way, in one run.

    python benchmarks/bench_capture.py [--questions 48] [--max-new-tokens 256] [--model tiny]

Baseline ("original"): transformers `generate`, one question at a time, a forward hook on each chosen
layer keeping h[:, -1] at every generation step (so the rows are collected while generating).
qsae: batched greedy generation with left padding, then one batched teacher-forced forward pass
over prompt + response with hooks (the capture stage), as each replica of the actor pool runs it.
Both on the same model, questions and layers; the script prints tokens/s of each and the ratio.
With --vllm it then times the vLLM engine (rollouts, then capture hooked inside vLLM's model)
against the transformers engine on the tiny dense Qwen3 (vLLM's CPU build cannot load Qwen3.5), and
how a vLLM replica is fed: one shard's prompts per generate call (--shard questions), captured before
the next, against every shard's prompts in one call (what a replica handed a group of shards does),
and that against generation alone (what capture costs over plain serving).
"""
from __future__ import annotations

import argparse
import time

import torch

from qsae.capture import capture_residuals
from qsae.engines.hf_engine import HFEngine
from qsae.models import decoder_layers, load_model, resolve_model_path
from qsae.questions import BUNDLED_QUESTIONS, chat_prompt, format_prompt, load_questions


def prompt_ids(tokenizer, questions) -> list[list[int]]:
    return [tokenizer(chat_prompt(tokenizer, format_prompt(q), False), add_special_tokens=False).input_ids for q in questions]


@torch.no_grad()
def original_way(model, tokenizer, prompts, layers, max_new_tokens) -> int:
    """One question at a time; hooks collect the last position's residual at every step."""
    rows = {layer: [] for layer in layers}
    blocks = decoder_layers(model)
    handles = [
        blocks[layer].register_forward_hook(lambda m, i, out, layer=layer: rows[layer].append(out[:, -1].cpu()))
        for layer in layers
    ]
    try:
        for ids in prompts:
            model.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        for handle in handles:
            handle.remove()
    return len(rows[layers[0]])  # rows stored per layer: one per generation step


def qsae_way(model, tokenizer, prompts, layers, max_new_tokens, batch_size) -> int:
    responses = HFEngine(model, tokenizer, max_new_tokens, batch_size).generate(prompts)
    sequences = [p + g.token_ids for p, g in zip(prompts, responses)]
    captured = capture_residuals(model, sequences, [len(p) for p in prompts], layers, batch_size=batch_size)
    return sum(len(rows) for rows in captured[layers[0]])


def vllm_way(engine, prompts, layers) -> int:
    from qsae.engines.vllm_engine import capture_residuals_vllm

    responses = engine.generate(prompts)
    captured = capture_residuals_vllm(engine, [p + g.token_ids for p, g in zip(prompts, responses)],
                                      [len(p) for p in prompts], layers)
    return sum(len(rows) for rows in captured[layers[0]])


def compare_feeding(engine, prompts, layers, per_shard) -> None:
    """Generated tokens/s: one shard per generate call vs every shard in one call, and generation alone."""
    from qsae.engines.vllm_engine import capture_residuals_vllm

    def capture(shard, responses):
        capture_residuals_vllm(engine, [p + g.token_ids for p, g in zip(shard, responses)], [len(p) for p in shard],
                               layers)

    def shard_per_call():
        tokens = 0
        for first in range(0, len(prompts), per_shard):
            shard = prompts[first:first + per_shard]
            responses = engine.generate(shard)
            capture(shard, responses)
            tokens += sum(len(g.token_ids) for g in responses)
        return tokens

    def one_call():
        responses = engine.generate(prompts)
        for first in range(0, len(prompts), per_shard):
            capture(prompts[first:first + per_shard], responses[first:first + per_shard])
        return sum(len(g.token_ids) for g in responses)

    def generation_alone():
        return sum(len(g.token_ids) for g in engine.generate(prompts))

    per_shard_tokens, per_shard_s = timed(shard_per_call)
    grouped_tokens, grouped_s = timed(one_call)
    alone_tokens, alone_s = timed(generation_alone)
    print(f"\nvLLM feeding, {len(prompts)} prompts, shards of {per_shard}, layers {layers}")
    print(f"{'way':<40} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    rows = [("one shard per generate call + capture", per_shard_tokens, per_shard_s),
            ("all shards in one call + capture", grouped_tokens, grouped_s),
            ("generation alone (one call)", alone_tokens, alone_s)]
    for name, tokens, seconds in rows:
        print(f"{name:<40} {tokens:>8} {seconds:>8.1f} {tokens / seconds:>9.1f}")
    print(f"gain of one call over one shard per call: {(grouped_tokens / grouped_s) / (per_shard_tokens / per_shard_s):.2f}x")
    print(f"capture's cost over generation alone: {grouped_s / alone_s - 1:+.0%} of the time")


def compare_engines(args) -> None:
    from qsae.engines.vllm_engine import VLLMEngine
    from qsae.tiny import TINY_DENSE_MODEL

    path = resolve_model_path(TINY_DENSE_MODEL)
    model, tokenizer = load_model(path, dtype="float32", device="auto")
    prompts = prompt_ids(tokenizer, load_questions(BUNDLED_QUESTIONS)[: args.questions])
    layers = [1, 3, 5]
    engine = VLLMEngine(path, tokenizer, args.max_new_tokens, dtype="float32", gpu_memory_utilization=0.1 if model.device.type == "cpu" else 0.5)
    try:
        vllm_way(engine, prompts[:2], layers)  # warm-up
        hf_tokens, hf_s = timed(qsae_way, model, tokenizer, prompts, layers, args.max_new_tokens, args.batch_size)
        vllm_tokens, vllm_s = timed(vllm_way, engine, prompts, layers)
        compare_feeding(engine, prompts, layers, args.shard)
    finally:
        engine.close()
    print(f"\nmodel {TINY_DENSE_MODEL}, {len(prompts)} questions, layers {layers}, device {model.device}")
    print(f"{'engine':<34} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'transformers (rollout + capture)':<34} {hf_tokens:>8} {hf_s:>8.1f} {hf_tokens / hf_s:>9.1f}")
    print(f"{'vllm (rollout + capture)':<34} {vllm_tokens:>8} {vllm_s:>8.1f} {vllm_tokens / vllm_s:>9.1f}")
    print(f"ratio vllm / transformers: {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x")


def timed(fn, *args) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 7, 11])
    parser.add_argument("--vllm", action="store_true", help="also compare the vLLM and transformers engines, and how vLLM is fed")
    parser.add_argument("--shard", type=int, default=8, help="--vllm: questions per shard (capture.questions_per_shard)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model_path(args.model), dtype="float32", device="auto")
    prompts = prompt_ids(tokenizer, load_questions(BUNDLED_QUESTIONS)[: args.questions])
    qsae_way(model, tokenizer, prompts[:2], args.layers, 8, 2)  # warm-up
    base_tokens, base_s = timed(original_way, model, tokenizer, prompts, args.layers, args.max_new_tokens)
    qsae_tokens, qsae_s = timed(qsae_way, model, tokenizer, prompts, args.layers, args.max_new_tokens, args.batch_size)
    print(f"model {args.model}, {len(prompts)} questions, layers {args.layers}, device {model.device}")
    print(f"{'method':<34} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'original (per question, step hooks)':<34} {base_tokens:>8} {base_s:>8.1f} {base_tokens / base_s:>9.1f}")
    print(f"{'qsae (batched, teacher-forced)':<34} {qsae_tokens:>8} {qsae_s:>8.1f} {qsae_tokens / qsae_s:>9.1f}")
    print(f"ratio qsae / original: {(qsae_tokens / qsae_s) / (base_tokens / base_s):.2f}x")
    if args.vllm:
        compare_engines(args)


if __name__ == "__main__":
    main()
