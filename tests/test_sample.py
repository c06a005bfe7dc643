"""Which rows a run trains on: masks (special tokens, very high norms), the cap, the split by question."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qsae.rundir import RunDir
from qsae.sample import (
    RowRules,
    SplitMismatchError,
    check_same_split,
    load_split,
    plan_split,
    save_split,
    select_rows,
    split_by_question,
    training_rows,
)
from qsae.store import ShardRows, new_manifest, write_manifest, write_shard
from qsae.streaming import StoreSource, shuffled_batches

LAYERS = [2, 5]
D = 6
SENTINEL = 0.0  # coordinate 0 of a row that must never reach training (never exactly 0 in a normal draw)


def questions_of(n_questions: int, rollouts_per_question) -> dict[int, str]:
    """rollout id -> question id, with a varying number of rollouts per question."""
    question_of, rid = {}, 0
    for q in range(n_questions):
        for _ in range(rollouts_per_question(q)):
            question_of[rid] = f"q{q:03d}"
            rid += 1
    return question_of


@pytest.mark.parametrize("seed", range(5))
def test_no_question_falls_on_both_sides(seed):
    question_of = questions_of(40, lambda q: 1 + q % 4)
    split = split_by_question(question_of, RowRules(holdout_fraction=0.25, seed=seed))
    held, train = set(split.heldout_rollout_ids), set(split.train_rollout_ids)
    assert held.isdisjoint(train) and held | train == set(question_of)
    held_questions = {question_of[r] for r in held}
    assert held_questions.isdisjoint({question_of[r] for r in train})
    assert held_questions == set(split.heldout_questions) and len(held_questions) == 10  # 25% of 40
    # every rollout of a held-out question is held out
    assert held == {r for r, q in question_of.items() if q in held_questions}
    assert split == split_by_question(question_of, RowRules(holdout_fraction=0.25, seed=seed))  # seeded


def test_split_needs_two_questions_and_keeps_one_on_each_side():
    with pytest.raises(ValueError, match="at least 2 questions"):
        split_by_question({0: "a", 1: "a"}, RowRules())
    tiny = split_by_question({0: "a", 1: "b"}, RowRules(holdout_fraction=0.01))
    assert len(tiny.heldout_rollout_ids) == 1 and len(tiny.train_rollout_ids) == 1
    most = split_by_question({i: str(i) for i in range(5)}, RowRules(holdout_fraction=0.99))
    assert len(most.train_rollout_ids) == 1


def write_marked_store(store_dir, tokens_per_rollout: int = 30, n_rollouts: int = 12, seed: int = 0) -> dict:
    """Rows of n_rollouts rollouts in two shards at two layers; some rows are special tokens, some
    have a norm 50x the typical one at ONE layer only. Such rows carry SENTINEL in coordinate 0 at
    every layer. Returns the truth, computed here from how the rows were made."""
    rng = np.random.default_rng(seed)
    n = tokens_per_rollout * n_rollouts
    rollout_id = np.repeat(np.arange(n_rollouts), tokens_per_rollout)
    position = np.tile(np.arange(tokens_per_rollout), n_rollouts) + 5
    special = rng.random(n) < 0.1
    sink = (rng.random(n) < 0.05) & ~special
    sink_layer = rng.choice(LAYERS, n)
    residuals = {layer: rng.standard_normal((n, D)).astype(np.float32) for layer in LAYERS}
    for layer in LAYERS:
        residuals[layer][sink & (sink_layer == layer)] *= 50
        residuals[layer][special | sink, 0] = SENTINEL
    manifest = new_manifest("test/model", None, LAYERS, D, dtype="float32")
    halves = np.array_split(np.arange(n), [n // 2 + 7])  # a shard boundary inside a rollout
    for i, rows in enumerate(halves):
        shard = f"shard-{i:05d}"
        written = {str(layer): write_shard(store_dir, layer, shard, ShardRows(rollout_id[rows], position[rows], np.zeros(len(rows), np.int32), np.zeros(len(rows), bool), residuals[layer][rows], special=special[rows]), dtype="float32")
                   for layer in LAYERS}
        manifest["shards"][shard] = {"questions": [], "rollouts": 0, "rows": written, "beyond_float16": 2 + i}
    write_manifest(store_dir, manifest)
    return {"rollout_id": rollout_id, "position": position, "special": special, "sink": sink, "n": n,
            "residuals": residuals, "beyond_float16": 2 + 3}


def test_select_rows_leaves_out_special_and_high_norm_tokens_at_every_layer(tmp_path):
    truth = write_marked_store(tmp_path / "activations")
    question_of = {r: f"q{r // 2}" for r in range(12)}  # two rollouts per question
    split = split_by_question(question_of, RowRules(holdout_fraction=0.34, seed=1))
    selection = select_rows(tmp_path / "activations", LAYERS, split)
    excluded = truth["special"] | truth["sink"]
    np.testing.assert_array_equal(selection.rows, np.flatnonzero(~excluded))
    held = np.isin(truth["rollout_id"], split.heldout_rollout_ids)
    np.testing.assert_array_equal(selection.heldout, held[~excluded])
    counts = selection.counts
    assert counts["stored"] == truth["n"] and counts["special"] == truth["special"].sum()
    assert counts["beyond_float16"] == truth["beyond_float16"]  # left out at capture, never stored
    assert counts["high_norm_any_layer"] == truth["sink"].sum() and counts["excluded"] == excluded.sum()
    assert counts["train"] == (~excluded & ~held).sum() and counts["heldout"] == (~excluded & held).sum()
    assert sum(counts["high_norm"].values()) == truth["sink"].sum()  # each sink is high at exactly one layer
    for rid, positions in selection.heldout_positions.items():
        np.testing.assert_array_equal(positions, truth["position"][(truth["rollout_id"] == rid) & ~excluded])
    assert set(selection.heldout_positions) == set(split.heldout_rollout_ids)


def test_masks_can_be_switched_off_as_the_original_release(tmp_path):
    truth = write_marked_store(tmp_path / "activations")
    rules = RowRules(exclude_special=False, max_norm_multiple=0.0, holdout_fraction=0.2, seed=0)
    split = split_by_question({r: f"q{r}" for r in range(12)}, rules)
    selection = select_rows(tmp_path / "activations", LAYERS, split)
    np.testing.assert_array_equal(selection.rows, np.arange(truth["n"]))
    assert selection.counts["excluded"] == 0


def test_cap_samples_only_rows_that_pass_the_masks(tmp_path):
    truth = write_marked_store(tmp_path / "activations")
    rules = RowRules(max_rows=100, holdout_fraction=0.2, seed=3)
    selection = select_rows(tmp_path / "activations", LAYERS, split_by_question({r: f"q{r}" for r in range(12)}, rules))
    assert len(selection.rows) == 100 and len(np.unique(selection.rows)) == 100
    assert not (truth["special"] | truth["sink"])[selection.rows].any()


def test_masked_and_heldout_tokens_never_reach_training(tmp_path):
    """What the trainers stream: every epoch's batches hold exactly the training rows, none masked."""
    truth = write_marked_store(tmp_path / "activations")
    question_of = {r: f"q{r // 3}" for r in range(12)}
    split = split_by_question(question_of, RowRules(holdout_fraction=0.25, seed=2))
    save_split(RunDir(tmp_path), split)
    rows = training_rows(RunDir(tmp_path), LAYERS)
    held = np.isin(truth["rollout_id"], split.heldout_rollout_ids)
    expected = np.flatnonzero(~truth["special"] & ~truth["sink"] & ~held)
    for layer in LAYERS:
        source = StoreSource(tmp_path / "activations", layer, rows)
        streamed = np.concatenate(list(shuffled_batches(source, 16, 64, seed=0, epoch=1)))
        assert len(streamed) == len(expected)
        assert not (streamed[:, 0] == SENTINEL).any()
        np.testing.assert_array_equal(np.sort(streamed[:, 1]), np.sort(truth["residuals"][layer][expected, 1]))


def test_split_file_round_trip_and_refusals(tmp_path):
    question_of = {r: f"q{r}" for r in range(10)}
    rules = RowRules(holdout_fraction=0.3, seed=4)
    split = split_by_question(question_of, rules)
    save_split(RunDir(tmp_path), split)
    saved = json.loads((tmp_path / "saes" / "split.json").read_text())
    assert saved["unit"] == "question" and saved["heldout_rollout_ids"] == split.heldout_rollout_ids
    assert load_split(RunDir(tmp_path)) == split
    check_same_split(load_split(RunDir(tmp_path)), rules, question_of)
    with pytest.raises(SplitMismatchError, match="train.split_seed: saved 4, config 5"):
        check_same_split(load_split(RunDir(tmp_path)), RowRules(holdout_fraction=0.3, seed=5), question_of)
    with pytest.raises(SplitMismatchError, match="capture.max_norm_multiple: saved 10.0, config 20"):
        check_same_split(load_split(RunDir(tmp_path)), RowRules(holdout_fraction=0.3, seed=4, max_norm_multiple=20),
                         question_of)
    with pytest.raises(SplitMismatchError, match="train.holdout_fraction: saved 0.3, config 0.5"):
        check_same_split(load_split(RunDir(tmp_path)), RowRules(holdout_fraction=0.5, seed=4), question_of)
    with pytest.raises(SplitMismatchError, match="capture.max_tokens_per_layer: saved None, config 100"):
        check_same_split(load_split(RunDir(tmp_path)), RowRules(holdout_fraction=0.3, seed=4, max_rows=100), question_of)
    with pytest.raises(SplitMismatchError, match="rollouts"):
        check_same_split(load_split(RunDir(tmp_path)), rules, {**question_of, 99: "q99"})
    (tmp_path / "saes" / "split.json").write_text("{}")
    with pytest.raises(ValueError, match="split.json is not a qsae split file"):
        load_split(RunDir(tmp_path))


def test_a_cap_that_leaves_too_few_rows_is_named_as_the_reason(tmp_path):
    from qsae.rollout import Rollout, write_rollouts

    write_marked_store(tmp_path / "activations")
    write_rollouts([Rollout(rollout_id=r, question_id=f"q{r // 2}", prompt="", response="", predicted_letter=None,
                            letter_from_final_line=False, answer_letter="A", finish_reason="stop", outcome="no_answer",
                            correct=False, n_prompt_tokens=0, n_response_tokens=0, engine="test", seed=0,
                            sample=0, generation_seed=None, prompt_token_ids=[], response_token_ids=[]) for r in range(12)],
                   tmp_path / "rollouts.parquet")
    rules = RowRules(max_norm_multiple=0, max_rows=3, holdout_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match=r"raise capture.max_tokens_per_layer \(capture.max_tokens_per_layer = 3 "
                                         r"keeps 3 of them\)"):
        plan_split(RunDir(tmp_path), LAYERS, rules)
    assert plan_split(RunDir(tmp_path), LAYERS, RowRules(max_norm_multiple=0, holdout_fraction=0.2)).rows["heldout"] >= 2
