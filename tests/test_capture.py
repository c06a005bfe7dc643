"""Capture: the stored rows are the residual stream, by both definitions a user would check."""
from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch

from qsae.capture import CaptureCheckError, capture_residuals, capture_shard, check_residuals, special_token_ids
from qsae.engines.hf_engine import HFEngine
from qsae.models import decoder_layers
from qsae.questions import BUNDLED_QUESTIONS, chat_prompt, format_prompt, load_questions
from qsae.rollout import run_rollouts
from qsae.store import (
    KeptPositions,
    new_manifest,
    read_layer_table,
    residual_matrix,
    shard_path,
    write_manifest,
)

LAYERS = [3, 7, 11]


@pytest.fixture(scope="module")
def rollouts(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:5]
    engine = HFEngine(model, tokenizer, max_new_tokens=40, batch_size=5)
    return run_rollouts(engine, tokenizer, questions, 0, thinking=False, seed=0)


def test_rows_equal_hidden_states_of_the_next_index(tiny, rollouts):
    model, _ = tiny
    sequences = [r.prompt_token_ids + r.response_token_ids for r in rollouts]
    starts = [r.n_prompt_tokens for r in rollouts]
    rows = capture_residuals(model, sequences, starts, LAYERS, batch_size=3)  # ragged batches, right padding
    for i, seq in enumerate(sequences):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        for layer in LAYERS[:-1]:  # transformers' last hidden_states entry is after the final norm
            expected = hidden[layer + 1][0, starts[i] :].numpy()
            np.testing.assert_allclose(rows[layer][i], expected, rtol=1e-5, atol=1e-5)
        assert rows[LAYERS[0]][i].shape == (len(seq) - starts[i], model.config.text_config.hidden_size)


def test_rows_equal_what_a_hook_sees_during_generation(tiny):
    """The original captured h[:, -1] at each generation step; teacher forcing must give the same rows."""
    model, tokenizer = tiny
    question = load_questions(BUNDLED_QUESTIONS)[7]
    prompt_ids = tokenizer(chat_prompt(tokenizer, format_prompt(question), False), add_special_tokens=False).input_ids
    seen = {layer: [] for layer in LAYERS}
    layers = decoder_layers(model)
    handles = [
        layers[layer].register_forward_hook(lambda m, i, out, layer=layer: seen[layer].append(out[:, -1].clone()))
        for layer in LAYERS
    ]
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=30, do_sample=False, min_new_tokens=30)
    finally:
        for handle in handles:
            handle.remove()
    response = out[0, len(prompt_ids) :].tolist()
    rows = capture_residuals(model, [prompt_ids + response], [len(prompt_ids)], LAYERS, batch_size=1)
    for layer in LAYERS:
        # Step 0 is the prompt's prefill; step s feeds response token s-1, whose row is rows[s-1].
        during_generation = torch.cat(seen[layer][1:]).numpy()
        np.testing.assert_allclose(rows[layer][0][: len(response) - 1], during_generation, rtol=1e-4, atol=1e-4)


def test_capture_shard_writes_the_store_schema(tiny, rollouts, tmp_path):
    model, _ = tiny
    residuals_of = partial(capture_residuals, model, batch_size=4)
    _, tokenizer = tiny
    # one rollout whose response holds template markup, as a thinking response does
    marked = tokenizer("<think>\nhm\n</think>\n\nAnswer: A", add_special_tokens=False).input_ids
    rollouts = rollouts + [dataclasses.replace(rollouts[0], rollout_id=99, response_token_ids=marked,
                                               n_response_tokens=len(marked))]
    counts = capture_shard(residuals_of, rollouts, LAYERS, tmp_path, shard="shard-00000", dtype="float32",
                           special_ids=special_token_ids(tokenizer))
    n_rows = sum(r.n_response_tokens for r in rollouts)
    assert counts == {str(layer): n_rows for layer in LAYERS}
    manifest = new_manifest("tiny", None, LAYERS, 64, dtype="float32")
    manifest["shards"]["shard-00000"] = {"rollouts": len(rollouts), "rows": counts}
    write_manifest(tmp_path, manifest)
    table = read_layer_table(tmp_path, 7)
    assert table.schema.field("act").type == pa.list_(pa.float32(), 64)
    assert table.schema.names == ["rollout_id", "position", "token_id", "correct", "special", "norm", "act"]
    first = rollouts[0]
    n = first.n_response_tokens
    assert table.column("position").to_pylist()[:n] == list(range(first.n_prompt_tokens, first.n_prompt_tokens + n))
    assert table.column("token_id").to_pylist()[:n] == first.response_token_ids
    assert set(table.column("rollout_id").to_pylist()) == {r.rollout_id for r in rollouts}
    expected = capture_residuals(model, [first.prompt_token_ids + first.response_token_ids], [first.n_prompt_tokens], [7],
                                 batch_size=1)
    np.testing.assert_allclose(residual_matrix(table)[:n], expected[7][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(table.column("norm").to_numpy()[:n], np.linalg.norm(expected[7][0], axis=1), rtol=1e-5)
    # special: exactly the tokens the tokenizer adds to its vocabulary (<|im_end|>, </think>, ...)
    added = {tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    token_ids = table.column("token_id").to_numpy()
    special = table.column("special").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(special, np.isin(token_ids, list(added)))
    assert special.sum() == 2  # <think> and </think> of the marked rollout
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"
    assert shard_path(tmp_path, 11, "shard-00000").exists()


def test_a_token_beyond_float16_is_left_out_at_every_layer_not_the_run(tiny, rollouts, tmp_path):
    """Massive activations: one token's residual at one layer beyond float16's range. A float16 store
    leaves that token out at every layer and keeps every other token, equal to a float32 capture."""
    model, _ = tiny
    plain = partial(capture_residuals, model, batch_size=4)
    huge = (rollouts[1].rollout_id, 3)  # the rollout's response token 3, at layer 7 only

    def massive(sequences, starts, layer_ids):
        residuals = plain(sequences, starts, layer_ids)
        residuals[7][1] = residuals[7][1].copy()
        residuals[7][1][3, 5] = 1e6
        return residuals

    counts = capture_shard(massive, rollouts, LAYERS, tmp_path / "f16", shard="s", dtype="float16")
    capture_shard(plain, rollouts, LAYERS, tmp_path / "f32", shard="s", dtype="float32")
    n_rows = sum(r.n_response_tokens for r in rollouts)
    assert counts == {str(layer): n_rows - 1 for layer in LAYERS}
    for layer in LAYERS:
        half, full = (pa.ipc.open_file(str(shard_path(tmp_path / d, layer, "s"))).read_all() for d in ("f16", "f32"))
        keys = list(zip(full.column("rollout_id").to_pylist(),
                        (np.array(full.column("position").to_pylist()) - np.repeat(
                            [r.n_prompt_tokens for r in rollouts], [r.n_response_tokens for r in rollouts])).tolist()))
        kept = [key != huge for key in keys]
        assert half.column("rollout_id").to_pylist() == [k[0] for k, keep in zip(keys, kept) if keep]
        np.testing.assert_allclose(residual_matrix(half), residual_matrix(full)[np.array(kept)], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kept", [KeptPositions(per_rollout=7, seed=3), KeptPositions(fraction=0.3, seed=3)])
def test_a_bounded_store_keeps_the_rows_its_rule_gives_and_the_same_on_rerun(tiny, rollouts, tmp_path, kept):
    """The kept rows are the full capture's rows at the chosen positions, as many per rollout as the rule
    says (counted here from the rule's definition), chosen alike on a rerun and differently per rollout."""
    model, _ = tiny
    residuals_of = partial(capture_residuals, model, batch_size=4)
    full_dir, bounded, again = tmp_path / "full", tmp_path / "bounded", tmp_path / "again"
    capture_shard(residuals_of, rollouts, LAYERS, full_dir, shard="s", dtype="float32")
    for store in (bounded, again):
        capture_shard(residuals_of, rollouts, LAYERS, store, shard="s", dtype="float32", kept=kept)
    expected_count = {r.rollout_id: min(r.n_response_tokens, kept.per_rollout) if kept.per_rollout else
                      min(r.n_response_tokens, -(-r.n_response_tokens * 3 // 10)) for r in rollouts}
    read = lambda store: pa.ipc.open_file(str(shard_path(store, 7, "s"))).read_all()  # noqa: E731
    full, table = read(full_dir), read(bounded)
    ids = table.column("rollout_id").to_numpy()
    assert {r: int((ids == r).sum()) for r in expected_count} == expected_count
    assert any(0 < expected_count[r.rollout_id] < r.n_response_tokens for r in rollouts)  # a real sample
    full_rows = {(r, p): i for i, (r, p) in enumerate(zip(full.column("rollout_id").to_pylist(),
                                                          full.column("position").to_pylist()))}
    at = [full_rows[key] for key in zip(ids.tolist(), table.column("position").to_pylist())]
    np.testing.assert_array_equal(residual_matrix(table), residual_matrix(full)[at])
    assert table.column("token_id").to_pylist() == [full.column("token_id")[i].as_py() for i in at]
    assert read(again).equals(table)
    offsets = [table.column("position").to_numpy()[ids == r.rollout_id] - r.n_prompt_tokens for r in rollouts]
    assert len({tuple(o[:3]) for o in offsets if len(o) >= 3}) > 1  # each rollout draws its own positions


@pytest.mark.parametrize("break_hook, problem", [
    (lambda rows: np.zeros_like(rows), "rows are all zeros"),
    (lambda rows: np.repeat(rows[:1], len(rows), axis=0), "rows repeat the position before them"),
    (lambda rows: np.where(np.arange(len(rows))[:, None] == 2, np.nan, rows), "not finite"),
])
def test_the_first_shard_self_check_stops_a_broken_hook_naming_layer_and_engine(tiny, rollouts, tmp_path,
                                                                                  break_hook, problem):
    """A hook at layer 7 broken three ways; the check runs before anything is written, and an intact
    capture passes it with each layer's median norm (computed here) in the log line."""
    model, _ = tiny
    plain = partial(capture_residuals, model, batch_size=4)

    def broken(sequences, starts, layer_ids):
        residuals = plain(sequences, starts, layer_ids)
        residuals[7] = [break_hook(rows) for rows in residuals[7]]
        return residuals

    with pytest.raises(CaptureCheckError, match=f"capture self-check, layer 7 \\(transformers engine\\): .*{problem}"):
        capture_shard(broken, rollouts, LAYERS, tmp_path, shard="s", dtype="float32", check="transformers")
    assert not list(tmp_path.rglob("*.arrow"))
    rows = plain([r.prompt_token_ids + r.response_token_ids for r in rollouts], [r.n_prompt_tokens for r in rollouts],
                 LAYERS)
    ids = np.repeat([r.rollout_id for r in rollouts], [r.n_response_tokens for r in rollouts])
    norms = check_residuals({layer: np.concatenate(rows[layer]) for layer in LAYERS}, ids, "transformers")
    for layer in LAYERS:
        assert norms[str(layer)] == pytest.approx(np.median(np.linalg.norm(np.concatenate(rows[layer]), axis=1)))
