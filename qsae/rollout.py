"""Rollout stage: answers to questions (one greedy rollout each, or several sampled ones), parsed and
graded, saved as rollouts.parquet.

Rollout ids: the q-th question of the sampled list has rollouts q x S .. q x S + S - 1 for S samples per
question (with one sample, the id is the question's position). A sampled rollout's tokens are drawn
with generation_seed(rollout.sampling_seed, rollout id), so a rerun draws the same.

A rollout's outcome (questions.grade) is "correct", "wrong", "truncated" (it hit max_new_tokens) or
"no_answer" (no letter to parse). With thinking on, only the text after the closing </think> is
parsed: a letter inside the reasoning is a step of the thought, not the answer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qsae.engines import Engine, Generation, generation_seed
from qsae.questions import Question, chat_prompt, format_prompt, grade, parse_answer_detail
from qsae.files import atomic_write, first_line


@dataclass
class Rollout:
    rollout_id: int
    question_id: str
    prompt: str
    response: str
    predicted_letter: str | None
    letter_from_final_line: bool  # the letter was on the answer's last line, not found earlier in it
    answer_letter: str
    finish_reason: str  # "stop" (end-of-turn token) or "length" (hit max_new_tokens)
    outcome: str  # "correct", "wrong", "truncated" or "no_answer" (questions.grade)
    correct: bool  # outcome == "correct"
    n_prompt_tokens: int
    n_response_tokens: int
    engine: str
    seed: int  # the question sample's seed (rollout.seed)
    sample: int  # which of its question's rollouts this is (0 .. samples_per_question - 1)
    generation_seed: int | None  # the seed its tokens were sampled with; None when greedy
    prompt_token_ids: list[int]
    response_token_ids: list[int]


ROLLOUT_SCHEMA = pa.schema(
    [
        ("rollout_id", pa.int64()),
        ("question_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("predicted_letter", pa.string()),
        ("letter_from_final_line", pa.bool_()),
        ("answer_letter", pa.string()),
        ("finish_reason", pa.string()),
        ("outcome", pa.string()),
        ("correct", pa.bool_()),
        ("n_prompt_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("engine", pa.string()),
        ("seed", pa.int64()),
        ("sample", pa.int32()),
        ("generation_seed", pa.int64()),
        # The exact token ids, so capture teacher-forces what was generated, not a re-tokenisation.
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.int32())),
    ]
)


THINK_END = "</think>"


def final_answer_ids(tokenizer, response_ids: list[int], thinking: bool) -> list[int] | None:
    """The response tokens that hold the final answer: all of them with thinking off; with thinking
    on, those after the last </think>, or None when the thought never closed."""
    if not thinking:
        return response_ids
    think_end = tokenizer.convert_tokens_to_ids(THINK_END)
    if think_end is None or think_end == tokenizer.unk_token_id:
        raise ValueError(f"thinking is on but the tokenizer has no {THINK_END} token to find the answer after")
    ends = [i for i, token in enumerate(response_ids) if token == think_end]
    return response_ids[ends[-1] + 1:] if ends else None


def tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The token ids the engines are given: the chat prompt as it is, no special tokens added."""
    return tokenizer(prompts, add_special_tokens=False).input_ids if prompts else []


def check_tokenizer(tokenizer, questions: list[Question], *, thinking: bool, model: str) -> None:
    """The tokenizer a run would use renders the chat template and gives back a prompt's text from its
    token ids: a model directory without its tokenizer files loads a stand-in that cannot (every
    prompt one token, every response empty)."""
    if not questions:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of model {model} has no chat template (chat_template.jinja or "
                         "tokenizer_config.json's chat_template)")
    try:
        prompt = chat_prompt(tokenizer, format_prompt(questions[0]), thinking)
    except Exception as err:  # jinja2 raises its own TemplateError kinds
        raise ValueError(f"the chat template of model {model} does not render: {first_line(err)}") from None
    ids = tokenize_prompts(tokenizer, [prompt])[0]
    if " ".join(tokenizer.decode(ids).split()) != " ".join(prompt.split()):
        raise ValueError(f"the tokenizer of model {model} does not give back a prompt's text from its {len(ids)} "
                         f"token ids ({len(tokenizer)} tokens in its vocabulary): are its tokenizer files missing?")


def check_prompts_fit(questions: list[Question], tokenizer, *, thinking: bool, max_new_tokens: int,
                      context: int | None, source: str) -> None:
    """Every prompt, with its generation budget, fits the model's context: before any replica starts,
    since a longer one would only fail there, minutes in."""
    if context is None or not questions:
        return
    prompts = [chat_prompt(tokenizer, format_prompt(q), thinking) for q in questions]
    lengths = np.array([len(ids) for ids in tokenize_prompts(tokenizer, prompts)])
    over = lengths + max_new_tokens > context
    if over.any():
        worst = int(lengths.argmax())
        raise ValueError(f"{source}: question {questions[worst].uuid!r} has a prompt of {lengths[worst]} tokens, which "
                         f"with rollout.max_new_tokens = {max_new_tokens} exceeds the model's context of {context} "
                         f"tokens ({int(over.sum())} question(s) do); shorten or leave them out")


@dataclass(frozen=True)
class Draws:
    """How many rollouts each question gets, and the seed their sampled tokens derive from (the engine's
    Sampling says whether they are sampled)."""

    samples_per_question: int = 1
    sampling_seed: int = 0


def run_rollouts(engine: Engine, tokenizer, questions: list[Question], first_question: int, *, thinking: bool,
                 seed: int, draws: Draws = Draws()) -> list[Rollout]:
    """The rollouts of `questions`, the first of which is question number `first_question` of the
    sample: draws.samples_per_question each, ids as the module says, in id order."""
    return run_rollout_parts(engine, tokenizer, [(first_question, questions)], thinking=thinking, seed=seed,
                             draws=draws)[0]


def run_rollout_parts(engine: Engine, tokenizer, parts: list[tuple[int, list[Question]]], *, thinking: bool,
                      seed: int, draws: Draws = Draws()) -> list[list[Rollout]]:
    """run_rollouts of each (first question, questions) part, all in one engine call: a vLLM engine
    given several shards' prompts at once keeps its batch full while the longest responses finish."""
    n = draws.samples_per_question
    questions = [q for _, part in parts for q in part]
    prompts = [chat_prompt(tokenizer, format_prompt(q), thinking) for q in questions]
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    ids = [(first + i) * n + s for first, part in parts for i in range(len(part)) for s in range(n)]
    seeds = None if engine.sampling.greedy else [generation_seed(draws.sampling_seed, r) for r in ids]
    generations = engine.generate([p for p in prompt_ids for _ in range(n)], seeds)
    rollouts = [make_rollout(r, questions[j // n], prompts[j // n], prompt_ids[j // n], generation=g,
                             tokenizer=tokenizer, thinking=thinking, engine=engine.name, seed=seed, sample=j % n,
                             generation_seed=None if seeds is None else seeds[j])
                for j, (r, g) in enumerate(zip(ids, generations))]
    ends = np.cumsum([len(part) * n for _, part in parts])
    return [rollouts[end - len(part) * n:end] for end, (_, part) in zip(ends, parts)]


def make_rollout(rollout_id: int, q: Question, prompt: str, prompt_ids: list[int], *, generation: Generation,
                 tokenizer, thinking: bool, engine: str, seed: int, sample: int = 0,
                 generation_seed: int | None = None) -> Rollout:
    """One generation, parsed and graded."""
    answer_ids = final_answer_ids(tokenizer, generation.token_ids, thinking)
    parsed = parse_answer_detail(tokenizer.decode(answer_ids, skip_special_tokens=True) if answer_ids else "",
                                 len(q.options))
    outcome = grade(parsed.letter, q.answer_letter, generation.finish_reason)
    return Rollout(
        rollout_id=rollout_id,
        question_id=q.uuid,
        prompt=prompt,
        response=tokenizer.decode(generation.token_ids, skip_special_tokens=True),
        predicted_letter=parsed.letter,
        letter_from_final_line=parsed.from_final_line,
        answer_letter=q.answer_letter,
        finish_reason=generation.finish_reason,
        outcome=outcome,
        correct=outcome == "correct",
        n_prompt_tokens=len(prompt_ids),
        n_response_tokens=len(generation.token_ids),
        engine=engine,
        seed=seed,
        sample=sample,
        generation_seed=generation_seed,
        prompt_token_ids=prompt_ids,
        response_token_ids=generation.token_ids,
    )


def write_rollouts(rollouts: list[Rollout], path: str | Path) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in rollouts], schema=ROLLOUT_SCHEMA)
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


def read_rollouts(*paths: str | Path) -> list[Rollout]:
    names = [f.name for f in fields(Rollout)]
    rows = []
    for path in paths:
        table = pq.read_table(path)
        missing = [name for name in names if name not in table.column_names]
        if missing:
            raise ValueError(f"{path} lacks the columns {', '.join(missing)}: it was written by an older qsae; "
                             "capture again into a new --out")
        rows += table.select(names).to_pylist()
    return sorted((Rollout(**row) for row in rows), key=lambda r: r.rollout_id)
