"""Rollouts through the transformers engine: batched greedy generation is the same as one at a time;
several sampled rollouts per question reproduce on rerun."""
from __future__ import annotations

from qsae.engines import Generation, Sampling, generation_seed, strip_after_stop
from qsae.engines.hf_engine import HFEngine
from qsae.questions import BUNDLED_QUESTIONS, load_questions, parse_answer
from qsae.rollout import Draws, make_rollout, read_rollouts, run_rollouts, write_rollouts


def test_batched_left_padded_generation_matches_single_prompts(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:6]  # prompts of different lengths
    batched = run_rollouts(HFEngine(model, tokenizer, 48, batch_size=6), tokenizer, questions, 0, thinking=False, seed=0)
    single = run_rollouts(HFEngine(model, tokenizer, 48, batch_size=1), tokenizer, questions, 0, thinking=False, seed=0)
    assert len({r.n_prompt_tokens for r in batched}) > 1
    for b, s in zip(batched, single):
        assert b.response_token_ids == s.response_token_ids


def test_generation_respects_budget_and_stops_at_end_of_turn(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:8]
    rollouts = run_rollouts(HFEngine(model, tokenizer, 400, batch_size=8), tokenizer, questions, 10, thinking=False, seed=3)
    assert [r.rollout_id for r in rollouts] == list(range(10, 18))
    stopped = [r for r in rollouts if r.n_response_tokens < 400]
    assert stopped, "the tiny model should finish some answers before the budget"
    for r in rollouts:
        assert tokenizer.eos_token_id not in r.response_token_ids and tokenizer.pad_token_id not in r.response_token_ids
        assert r.predicted_letter == parse_answer(r.response, len(questions[r.rollout_id - 10].options))
        assert r.correct == (r.predicted_letter == r.answer_letter and r.finish_reason == "stop")
    short = run_rollouts(HFEngine(model, tokenizer, 5, batch_size=8), tokenizer, questions, 0, thinking=False, seed=3)
    assert all(r.n_response_tokens == 5 for r in short)


def test_rollouts_parquet_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:3]
    rollouts = run_rollouts(HFEngine(model, tokenizer, 20, batch_size=3), tokenizer, questions, 0, thinking=True, seed=7)
    write_rollouts(rollouts, tmp_path / "rollouts.parquet")
    assert read_rollouts(tmp_path / "rollouts.parquet") == rollouts


# --- labels: the rules for thinking, truncation and where the letter came from ----------------------

def graded(tokenizer, question, response_text: str, finish_reason: str, thinking: bool):
    """A rollout made from a response written here, tokenized as the model would have produced it."""
    ids = tokenizer(response_text, add_special_tokens=False).input_ids
    return make_rollout(0, question, "prompt", [1, 2], generation=Generation(ids, finish_reason), tokenizer=tokenizer,
                        thinking=thinking, engine="test", seed=0)


def test_label_rules(tiny):
    _, tokenizer = tiny
    q = load_questions(BUNDLED_QUESTIONS)[0]
    right = q.answer_letter
    wrong = next(letter for letter in "ABCD" if letter != right)
    # thinking on: a letter inside the thought is not the answer; only the text after </think> counts
    r = graded(tokenizer, q, f"<think>\nMaybe Answer: {wrong}\n</think>\n\nSo.\nAnswer: {right}", "stop", True)
    assert (r.predicted_letter, r.letter_from_final_line, r.outcome, r.correct) == (right, True, "correct", True)
    r = graded(tokenizer, q, f"<think>\nAnswer: {right}\n</think>\n\nAnswer: {wrong}", "stop", True)
    assert (r.predicted_letter, r.outcome, r.correct) == (wrong, "wrong", False)
    # a thought that never closed has no answer, whatever letters it mentions
    r = graded(tokenizer, q, f"<think>\nThe answer is {right}.\nAnswer: {right}", "stop", True)
    assert (r.predicted_letter, r.outcome, r.correct) == (None, "no_answer", False)
    # cut off by the token budget: neither right nor wrong, even with a letter already written
    r = graded(tokenizer, q, f"<think>\nx\n</think>\nAnswer: {right}\nand furthermore", "length", True)
    assert (r.predicted_letter, r.finish_reason, r.outcome, r.correct) == (right, "length", "truncated", False)
    # thinking off: the whole response; a letter found before a chatty last line is not the final line's
    r = graded(tokenizer, q, f"Reasoning.\nAnswer: {wrong}\nHope this helps!", "stop", False)
    assert (r.predicted_letter, r.letter_from_final_line, r.outcome) == (wrong, False, "wrong")
    r = graded(tokenizer, q, "I do not know.", "stop", False)
    assert (r.predicted_letter, r.outcome) == (None, "no_answer")


def test_finish_reason_of_the_transformers_engine(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:8]
    rollouts = run_rollouts(HFEngine(model, tokenizer, 400, batch_size=8), tokenizer, questions, 0, thinking=False, seed=3)
    assert {r.finish_reason for r in rollouts if r.n_response_tokens < 400} == {"stop"}
    short = run_rollouts(HFEngine(model, tokenizer, 5, batch_size=8), tokenizer, questions, 0, thinking=False, seed=3)
    assert {(r.finish_reason, r.outcome) for r in short} == {("length", "truncated")}


def test_strip_after_stop():
    assert strip_after_stop([5, 6, 2, 7], {2}) == Generation([5, 6], "stop")
    assert strip_after_stop([5, 6, 7], {2}) == Generation([5, 6, 7], "length")


def test_sampled_rollouts_are_numbered_per_question_and_reproduce_in_any_batch(tiny):
    model, tokenizer = tiny
    questions = load_questions(BUNDLED_QUESTIONS)[:4]
    draws = Draws(samples_per_question=3, sampling_seed=5)

    def roll(sampling: Sampling, draws: Draws = draws, batch_size: int = 5):
        engine = HFEngine(model, tokenizer, 24, batch_size=batch_size, sampling=sampling)
        return run_rollouts(engine, tokenizer, questions, 2, thinking=False, seed=0, draws=draws)

    hot = Sampling(temperature=1.0)
    first, again = roll(hot), roll(hot)
    assert [r.rollout_id for r in first] == list(range(6, 18))  # question 2 of the sample is the first here
    assert [(r.question_id, r.sample) for r in first] == [(q.uuid, s) for q in questions for s in range(3)]
    assert [r.generation_seed for r in first] == [generation_seed(5, r) for r in range(6, 18)]
    assert [r.response_token_ids for r in again] == [r.response_token_ids for r in first]
    # A rollout's tokens depend on its own seed, not on the prompts that share its batch.
    regrouped = roll(hot, batch_size=2)
    assert [r.response_token_ids for r in regrouped] == [r.response_token_ids for r in first]
    alone = roll(hot, batch_size=1)
    assert [r.response_token_ids for r in alone] == [r.response_token_ids for r in first]
    by_question = [{tuple(r.response_token_ids) for r in first[i:i + 3]} for i in range(0, 12, 3)]
    assert any(len(samples) > 1 for samples in by_question), "samples of a question should differ at temperature 1"
    other_seed = roll(hot, Draws(samples_per_question=3, sampling_seed=6))
    assert [r.response_token_ids for r in other_seed] != [r.response_token_ids for r in first]
    # Only the likeliest token left to sample (top_k = 1): sampling passes its settings and is greedy.
    greedy = roll(Sampling(), Draws())
    assert all(r.generation_seed is None for r in greedy)
    narrow = roll(Sampling(temperature=1.0, top_k=1))
    assert [r.response_token_ids for r in narrow[::3]] == [r.response_token_ids for r in greedy]
