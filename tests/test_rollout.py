"""Rollouts through the transformers engine: batched greedy generation is the same as one at a time."""
from __future__ import annotations


from qsae.engines.hf_engine import HFEngine
from qsae.questions import BUNDLED_QUESTIONS, load_questions, parse_answer
from qsae.rollout import read_rollouts, run_rollouts, write_rollouts


def test_batched_left_padded_generation_matches_single_prompts(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:6]  # prompts of different lengths
    batched = run_rollouts(HFEngine(model, tokenizer, 48, batch_size=6), tokenizer, questions, 0, False, 0)
    single = run_rollouts(HFEngine(model, tokenizer, 48, batch_size=1), tokenizer, questions, 0, False, 0)
    assert len({r.n_prompt_tokens for r in batched}) > 1
    for b, s in zip(batched, single):
        assert b.response_token_ids == s.response_token_ids


def test_generation_respects_budget_and_stops_at_end_of_turn(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:8]
    rollouts = run_rollouts(HFEngine(model, tokenizer, 400, batch_size=8), tokenizer, questions, 10, False, 3)
    assert [r.rollout_id for r in rollouts] == list(range(10, 18))
    stopped = [r for r in rollouts if r.n_response_tokens < 400]
    assert stopped, "the tiny model should finish some answers before the budget"
    for r in rollouts:
        assert tokenizer.eos_token_id not in r.response_token_ids and tokenizer.pad_token_id not in r.response_token_ids
        assert r.predicted_letter == parse_answer(r.response, len(questions[r.rollout_id - 10].options))
        assert r.correct == (r.predicted_letter == r.answer_letter)
    short = run_rollouts(HFEngine(model, tokenizer, 5, batch_size=8), tokenizer, questions, 0, False, 3)
    assert all(r.n_response_tokens == 5 for r in short)


def test_rollouts_parquet_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:3]
    rollouts = run_rollouts(HFEngine(model, tokenizer, 20, batch_size=3), tokenizer, questions, 0, True, 7)
    write_rollouts(rollouts, tmp_path / "rollouts.parquet")
    assert read_rollouts(tmp_path / "rollouts.parquet") == rollouts
