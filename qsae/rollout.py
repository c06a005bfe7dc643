"""Rollout stage: greedy answers to questions, parsed and scored, saved as rollouts.parquet."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qsae.engines import Engine
from qsae.models import chat_prompt
from qsae.questions import Question, format_prompt, is_correct, parse_answer
from qsae.files import atomic_write


@dataclass
class Rollout:
    rollout_id: int
    question_id: str
    prompt: str
    response: str
    predicted_letter: str | None
    answer_letter: str
    correct: bool
    n_prompt_tokens: int
    n_response_tokens: int
    engine: str
    seed: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]


ROLLOUT_SCHEMA = pa.schema(
    [
        ("rollout_id", pa.int64()),
        ("question_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("predicted_letter", pa.string()),
        ("answer_letter", pa.string()),
        ("correct", pa.bool_()),
        ("n_prompt_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("engine", pa.string()),
        ("seed", pa.int64()),
        # The exact token ids, so capture teacher-forces what was generated, not a re-tokenisation.
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.int32())),
    ]
)


def run_rollouts(
    engine: Engine, tokenizer, questions: list[Question], first_id: int, thinking: bool, seed: int
) -> list[Rollout]:
    """Greedy rollouts of `questions`; rollout ids are first_id, first_id + 1, ... in question order."""
    prompts = [chat_prompt(tokenizer, format_prompt(q), thinking) for q in questions]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    response_ids = engine.generate(prompt_ids)
    rollouts = []
    for i, (q, prompt, p_ids, r_ids) in enumerate(zip(questions, prompts, prompt_ids, response_ids)):
        response = tokenizer.decode(r_ids, skip_special_tokens=True)
        predicted = parse_answer(response, len(q.options))
        rollouts.append(
            Rollout(
                rollout_id=first_id + i,
                question_id=q.uuid,
                prompt=prompt,
                response=response,
                predicted_letter=predicted,
                answer_letter=q.answer_letter,
                correct=is_correct(predicted, q),
                n_prompt_tokens=len(p_ids),
                n_response_tokens=len(r_ids),
                engine=engine.name,
                seed=seed,
                prompt_token_ids=p_ids,
                response_token_ids=r_ids,
            )
        )
    return rollouts


def write_rollouts(rollouts: list[Rollout], path: str | Path) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in rollouts], schema=ROLLOUT_SCHEMA)
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


def read_rollouts(*paths: str | Path) -> list[Rollout]:
    names = [f.name for f in fields(Rollout)]
    rows = [row for path in paths for row in pq.read_table(path).select(names).to_pylist()]
    return sorted((Rollout(**row) for row in rows), key=lambda r: r.rollout_id)
