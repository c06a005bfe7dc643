"""Multiple-choice questions in the SuperGPQA schema: loading, sampling, prompting, answer parsing."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

LETTERS = "ABCDEFGHIJ"
BUNDLED_QUESTIONS: Path = Path(__file__).parent / "data" / "questions.jsonl"

MIN_OPTIONS, MAX_OPTIONS = 4, len(LETTERS)
DIFFICULTIES = ("easy", "middle", "hard")


@dataclass(frozen=True)
class Question:
    """One SuperGPQA row; `answer` is the text of `options[LETTERS.index(answer_letter)]`."""

    uuid: str
    question: str
    options: tuple[str, ...]
    answer: str
    answer_letter: str
    discipline: str
    field: str
    subfield: str
    difficulty: str


FIELDS = tuple(f.name for f in fields(Question))


class QuestionFormatError(ValueError):
    """A question file that does not follow the schema; the message names file, row and field."""


def load_questions(path: str | Path) -> list[Question]:
    """Load and validate questions from JSON lines (`.jsonl`/`.json`) or Parquet (`.parquet`).

    Errors name JSONL rows by their 1-based line number and Parquet rows by 0-based index.
    Columns outside the schema (SuperGPQA has e.g. `is_calculation`) are ignored.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"unsupported question file {path}: expected .jsonl, .json or .parquet")
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    rows = _parquet_rows(path) if suffix == ".parquet" else _jsonl_rows(path)
    questions: list[Question] = []
    first_row_of: dict[str, str] = {}
    for where, row in rows:
        question = _to_question(row, path, where)
        if question.uuid in first_row_of:
            earlier = first_row_of[question.uuid]
            problem = f"field 'uuid' repeats {question.uuid!r} from {earlier}"
            raise QuestionFormatError(f"{path} {where}: {problem}")
        first_row_of[question.uuid] = where
        questions.append(question)
    if not questions:
        raise QuestionFormatError(f"{path}: contains no questions")
    return questions


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise QuestionFormatError(f"{path} line {line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise QuestionFormatError(f"{path} line {number}: invalid JSON ({err.msg})") from err


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa  # only Parquet inputs need pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise QuestionFormatError(f"{path}: not a readable Parquet file ({err})") from None
    for index, row in enumerate(rows):
        yield f"row {index} (0-based)", row


def _to_question(row: Any, path: Path, where: str) -> Question:
    if not isinstance(row, dict):
        raise QuestionFormatError(f"{path} {where}: expected an object with fields {', '.join(FIELDS)}")

    def fail(field: str, problem: str) -> QuestionFormatError:
        return QuestionFormatError(f"{path} {where}: field {field!r} {problem}")

    for name in FIELDS:
        if row.get(name) is None:
            raise fail(name, "is missing")
        if name != "options" and not isinstance(row[name], str):
            raise fail(name, f"must be a string, got {type(row[name]).__name__}")
    options = row["options"]
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        raise fail("options", "must be a list of strings")
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise fail("options", f"must have {MIN_OPTIONS} to {MAX_OPTIONS} entries, got {len(options)}")
    letter = row["answer_letter"]
    if len(letter) != 1 or letter not in LETTERS[: len(options)]:
        raise fail("answer_letter", f"must be one of {_letter_range(len(options))}, got {letter!r}")
    keyed = options[LETTERS.index(letter)]
    if keyed != row["answer"]:
        raise fail("answer", f"is {row['answer']!r} but option {letter} is {keyed!r}")
    for name in ("question", "uuid"):
        if not row[name].strip():
            raise fail(name, "is empty")
    if empty := [LETTERS[i] for i, option in enumerate(options) if not option.strip()]:
        raise fail("options", f"has empty option(s) {', '.join(empty)}")
    if twins := [LETTERS[i] for i, option in enumerate(options) if option == keyed and LETTERS[i] != letter]:
        raise fail("options", f"repeat the answer's text at {', '.join(twins)}: a letter cannot tell them apart")
    if row["difficulty"] not in DIFFICULTIES:
        raise fail("difficulty", f"must be one of {', '.join(DIFFICULTIES)}, got {row['difficulty']!r}")
    return Question(**{name: row[name] for name in FIELDS if name != "options"}, options=tuple(options))


def sample_questions(questions: Sequence[Question], n: int | None, seed: int) -> list[Question]:
    """`n` questions drawn without replacement with `default_rng(seed)`, kept in their original order.

    `n=None` returns every question in the original order.
    """
    if n is None:
        return list(questions)
    if not 0 <= n <= len(questions):
        raise ValueError(f"cannot sample {n} questions: {len(questions)} exist")
    chosen = np.random.default_rng(seed).choice(len(questions), size=n, replace=False)
    return [questions[i] for i in sorted(chosen)]


def _letter_range(n_options: int) -> str:
    return f"A-{LETTERS[n_options - 1]}"


def format_prompt(q: Question) -> str:
    """Zero-shot user message; like SuperGPQA's it ends with the literal answer template."""
    options = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, q.options))
    return (
        "Choose the one correct option for the question below. Reason it through step by step, "
        "then end your reply with a final line of the form 'Answer: $LETTER', where LETTER is one "
        f"of {_letter_range(len(q.options))}.\n\n"
        f"{q.question}\n\n{options}\n\nAnswer: $LETTER"
    )


@lru_cache(maxsize=None)
def _answer_patterns(n_options: int) -> tuple[re.Pattern[str], tuple[re.Pattern[str], ...]]:
    """(keyword pattern, last-line-only patterns) matching only the letters valid for `n_options`.

    The letter must be upper case and not start a word, so "the answer is a bit" never counts.
    """
    letter = f"([{LETTERS[:n_options]}])(?![A-Za-z])"
    # "Answer: B", "**Answer:** B", "answer: (B)", "The answer is B", "final answer is: **B**"
    gap = r"[ \t]*"  # stay on one line: "the answer\nA) ..." is an option list, not an answer
    keyword = re.compile(
        rf"\b(?i:answer)(?:{gap}(?i:is))?{gap}[*_]*[:：]?{gap}[*_]*{gap}[(\[]?{gap}{letter}"
    )
    last_line_only = (
        re.compile(rf"\\boxed\{{\s*{letter}\s*\}}"),
        re.compile(rf"\(\s*{letter}\s*\)"),
        re.compile(rf"^[\s*_(\[]*{letter}[\s*_)\].:]*$"),  # a line that is just the letter
    )
    return keyword, last_line_only


@dataclass(frozen=True)
class ParsedAnswer:
    letter: str | None
    from_final_line: bool  # found on the last non-empty line (the final answer), not earlier in the text


def parse_answer_detail(text: str, n_options: int) -> ParsedAnswer:
    """The answer letter a response commits to, and whether its last line gave it.

    The last non-empty line decides first ("Answer: X" and its variants, "\\boxed{X}", "(X)", a bare
    letter); failing that, the last "Answer: X" anywhere. Letters outside A..LETTERS[n_options-1]
    never count.
    """
    if not 1 <= n_options <= MAX_OPTIONS:
        raise ValueError(f"n_options must be 1 to {MAX_OPTIONS}, got {n_options}")
    keyword, last_line_only = _answer_patterns(n_options)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        for pattern in (keyword, *last_line_only):
            matches = pattern.findall(lines[-1])
            if matches:
                return ParsedAnswer(matches[-1], True)
    matches = keyword.findall(text)
    return ParsedAnswer(matches[-1] if matches else None, False)


def parse_answer(text: str, n_options: int) -> str | None:
    """The answer letter a response commits to, or None (see parse_answer_detail)."""
    return parse_answer_detail(text, n_options).letter


def is_correct(predicted: str | None, q: Question) -> bool:
    """Whether a parsed letter is the question's answer; no answer counts as wrong."""
    return predicted is not None and predicted == q.answer_letter


# A rollout's outcome. Only "correct" and "wrong" are labels; a response cut off by the token budget,
# or one without a parsable letter, says nothing about what the model knew.
OUTCOMES = ("correct", "wrong", "truncated", "no_answer")
SCORED = ("correct", "wrong")


def grade(letter: str | None, answer_letter: str, finish_reason: str) -> str:
    """The outcome of a rollout: "truncated" when it hit the token limit (whatever it said before),
    "no_answer" when no letter could be parsed, else "correct" or "wrong"."""
    if finish_reason == "length":
        return "truncated"
    if letter is None:
        return "no_answer"
    return "correct" if letter == answer_letter else "wrong"


def question_digest(q: Question) -> str:
    """What decides a question's label, as a short hash: its text, options and answer."""
    text = json.dumps([q.question, list(q.options), q.answer_letter], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chat_prompt(tokenizer, user_text: str, thinking: bool) -> str:
    """The model's chat template around one user turn, with reasoning on or off."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
