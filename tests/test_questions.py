import json
import re
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qsae.questions import (
    BUNDLED_QUESTIONS,
    LETTERS,
    Question,
    QuestionFormatError,
    format_prompt,
    is_correct,
    load_questions,
    parse_answer,
    sample_questions,
)


@pytest.fixture(scope="module")
def bundled() -> list[Question]:
    return load_questions(BUNDLED_QUESTIONS)


def as_row(q: Question) -> dict:
    return {**asdict(q), "options": list(q.options)}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_bundled_sample_is_broad_and_consistent(bundled):
    assert len(bundled) >= 40
    assert len({q.discipline for q in bundled}) >= 6
    option_counts = {len(q.options) for q in bundled}
    assert {4, 10} <= option_counts and option_counts & {5, 6}
    assert len({q.answer_letter for q in bundled}) >= 6
    assert len({q.uuid for q in bundled}) == len(bundled)
    for q in bundled:
        assert q.options[LETTERS.index(q.answer_letter)] == q.answer
        assert len(set(q.options)) == len(q.options), q.uuid
        assert isinstance(q.options, tuple)


def test_jsonl_round_trip_keeps_every_field(bundled, tmp_path):
    path = write_jsonl(tmp_path / "copy.jsonl", [as_row(q) for q in bundled])
    assert load_questions(path) == bundled
    assert load_questions(str(path)) == bundled


def test_json_extension_reads_lines_and_skips_blank_ones(bundled, tmp_path):
    path = tmp_path / "copy.json"
    path.write_text("\n".join(json.dumps(as_row(q)) + "\n" for q in bundled[:3]), encoding="utf-8")
    assert load_questions(path) == bundled[:3]


def test_parquet_round_trip_ignores_extra_columns(bundled, tmp_path):
    rows = [{**as_row(q), "is_calculation": i % 2 == 0} for i, q in enumerate(bundled)]
    path = tmp_path / "copy.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_questions(path) == bundled


def good_rows(bundled: list[Question]) -> list[dict]:
    return [as_row(q) for q in bundled[:4]]


def set_field(name, value):
    return lambda row: {**row, name: value}


def drop_field(name):
    return lambda row: {k: v for k, v in row.items() if k != name}


MALFORMED = [
    ("missing question", drop_field("question"), "question", "missing"),
    ("null answer", set_field("answer", None), "answer", "missing"),
    ("numeric field", set_field("subfield", 3), "subfield", "string"),
    ("options not a list", set_field("options", "A B C D"), "options", "list of strings"),
    ("non-string option", set_field("options", ["a", "b", "c", 4]), "options", "list of strings"),
    ("too few options", set_field("options", ["a", "b"]), "options", "4 to 10 entries, got 2"),
    ("too many options", set_field("options", [str(i) for i in range(11)]), "options", "got 11"),
    ("letter past the options", lambda r: {**r, "options": r["options"][:4], "answer_letter": "E"},
     "answer_letter", "A-D"),
    ("lowercase letter", lambda r: {**r, "answer_letter": r["answer_letter"].lower()}, "answer_letter", "A-"),
    ("answer text mismatch", set_field("answer", "not an option"), "answer", "not an option"),
    ("unknown difficulty", set_field("difficulty", "medium"), "difficulty", "medium"),
    ("empty uuid", set_field("uuid", ""), "uuid", "empty"),
]


def cases(table: list[tuple]) -> dict:
    """pytest.mark.parametrize arguments for a table whose first column names each case."""
    return {"argvalues": [row[1:] for row in table], "ids": [row[0] for row in table]}


@pytest.mark.parametrize("mutate, field, detail", **cases(MALFORMED))
def test_malformed_jsonl_row_names_file_line_and_field(bundled, tmp_path, mutate, field, detail):
    rows = good_rows(bundled)
    rows[2] = mutate(rows[2])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(QuestionFormatError) as err:
        load_questions(path)
    message = str(err.value)
    assert "bad.jsonl line 3:" in message
    assert f"field '{field}'" in message
    assert detail in message


PARQUET_MALFORMED = [MALFORMED[0], MALFORMED[1], MALFORMED[5]]  # a column holds one Arrow type, so no type errors


@pytest.mark.parametrize("mutate, field, detail", **cases(PARQUET_MALFORMED))
def test_malformed_parquet_row_names_zero_based_row(bundled, tmp_path, mutate, field, detail):
    rows = good_rows(bundled)
    rows[1] = mutate(rows[1])
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(QuestionFormatError, match=rf"bad\.parquet row 1 \(0-based\): field '{field}'.*{detail}"):
        load_questions(path)


def test_duplicate_uuid_names_both_rows(bundled, tmp_path):
    rows = good_rows(bundled)
    rows[3]["uuid"] = rows[0]["uuid"]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(QuestionFormatError, match=r"dup\.jsonl line 4: field 'uuid' repeats .* from line 1"):
        load_questions(path)


def test_invalid_json_line_and_non_object_row(bundled, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(as_row(bundled[0])) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(QuestionFormatError, match=r"broken\.jsonl line 2: invalid JSON"):
        load_questions(path)
    write_jsonl(path, [as_row(bundled[0]), ["a", "list"]])
    with pytest.raises(QuestionFormatError, match=r"broken\.jsonl line 2: expected an object"):
        load_questions(path)


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_questions(tmp_path / "nowhere.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(QuestionFormatError, match="empty.jsonl: contains no questions"):
        load_questions(empty)
    csv = tmp_path / "questions.csv"
    csv.write_text("uuid,question\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported question file .*questions\.csv"):
        load_questions(csv)


def test_sampling_is_seeded_ordered_and_bounded(bundled):
    first = sample_questions(bundled, 10, seed=100)
    assert first == sample_questions(bundled, 10, seed=100)
    assert len({q.uuid for q in first}) == 10
    assert {q.uuid for q in first} != {q.uuid for q in sample_questions(bundled, 10, seed=101)}
    positions = [bundled.index(q) for q in first]
    assert positions == sorted(positions)
    assert sample_questions(bundled, None, seed=5) == bundled
    assert sample_questions(bundled, len(bundled), seed=5) == bundled
    assert sample_questions(bundled, 0, seed=5) == []
    with pytest.raises(ValueError, match=f"{len(bundled)} exist"):
        sample_questions(bundled, len(bundled) + 1, seed=0)
    with pytest.raises(ValueError):
        sample_questions(bundled, -1, seed=0)


def test_prompt_lists_every_option_and_ends_with_template(bundled):
    for q in bundled:
        prompt = format_prompt(q)
        assert prompt.endswith("Answer: $LETTER")
        assert q.question in prompt
        for letter, option in zip(LETTERS, q.options):
            assert f"\n{letter}) {option}\n" in prompt
        assert f"A-{LETTERS[len(q.options) - 1]}" in prompt
        assert len(re.findall(r"^[A-J]\) ", prompt, flags=re.M)) == len(q.options)


PARSE_CASES = [
    ("plain final line", "Iron has 26 protons.\nAnswer: H", 10, "H"),
    ("bold markdown", "Reasoning...\n\n**Answer:** C", 4, "C"),
    ("bold around both", "Reasoning...\n**Answer: B**", 4, "B"),
    ("answer is", "So the mitral valve is right. The answer is D.", 4, "D"),
    ("final answer is bold", "Putting it together, the final answer is: **A**", 5, "A"),
    ("lowercase keyword", "thinking out loud\nanswer: b\nanswer: E", 6, "E"),
    ("parenthesised on last line", "Only one option survives.\n(C)", 4, "C"),
    ("parenthesised after keyword", "Answer: (J)", 10, "J"),
    ("boxed", "Compute 1/(1-0.8) = 5.\n$\\boxed{E}$", 10, "E"),
    ("bare letter line", "Step 1 ... step 3.\n\nB.", 4, "B"),
    ("trailing whitespace lines", "Answer: A\n\n   \n", 4, "A"),
    ("mid-text then different final",
     "At first the answer is B, since...\nAnswer: B?\nNo, wait.\nAnswer: D", 4, "D"),
    ("mid-text only, chatty last line", "Weighing it up, Answer: C\nHope this helps!", 4, "C"),
    ("letter out of range", "The best fit is option F.\nAnswer: F", 4, None),
    ("out of range falls back to earlier valid", "Answer: B\nAnswer: G", 5, "B"),
    ("no answer at all", "I am not sure which option is correct.", 4, None),
    ("empty response", "", 4, None),
    ("echoed template", "Answer: $LETTER", 4, None),
    ("lowercase word is not a letter", "The answer is a matter of definition.", 4, None),
    ("option list after the word answer", "To find the answer\nA) is wrong and so is the rest", 4, None),
    ("letter starting a word", "Answer: Because the wall fell in 1989", 10, None),
]


@pytest.mark.parametrize("text, n_options, expected", **cases(PARSE_CASES))
def test_parse_answer(text, n_options, expected):
    assert parse_answer(text, n_options) == expected


def test_parse_answer_rejects_impossible_option_counts():
    with pytest.raises(ValueError, match="n_options"):
        parse_answer("Answer: A", 11)
    with pytest.raises(ValueError, match="n_options"):
        parse_answer("Answer: A", 0)


def test_is_correct(bundled):
    q = bundled[0]
    wrong = next(letter for letter in LETTERS[: len(q.options)] if letter != q.answer_letter)
    assert is_correct(q.answer_letter, q)
    assert not is_correct(wrong, q)
    assert not is_correct(None, q)
    assert is_correct(parse_answer(f"Reasoning.\nAnswer: {q.answer_letter}", len(q.options)), q)
