"""autointerp: its statistics against a computation by hand, its prompts and example split, and the
stage on a small run of the tiny model, whose explanations mean nothing and must score like the null."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qsae.autointerp import (FeatureCase, Window, assess, choose_features, decoy_marks, detection_prompt,
                             explain_prompt, fuzzing_prompt, highlight, null_partners, plan_jobs, report,
                             scoring_items, split_heldout, summarize)

# ---------------------------------------------------------------------------------------------
# (a) The statistics, against an independent computation


def test_assess_matches_balanced_accuracy_and_wilson_by_hand():
    # 6 positives (4 said yes) and 6 negatives (5 said no): TPR 4/6, TNR 5/6, 9 of 12 right.
    truth = [1] * 6 + [0] * 6
    predicted = [1, 1, 0, 1, 0, 1] + [0, 0, 1, 0, 0, 0]
    score = assess(truth, predicted)
    assert score["tpr"] == pytest.approx(4 / 6) and score["tnr"] == pytest.approx(5 / 6)
    assert score["balanced_accuracy"] == pytest.approx((4 / 6 + 5 / 6) / 2)
    # Wilson's interval of 9 / 12 written out: (p + z^2/2n +- z sqrt(p q / n + z^2 / 4n^2)) / (1 + z^2 / n)
    z, n, p = 1.959963984540054, 12, 9 / 12
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert score["ci"] == pytest.approx([(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)])
    assert score["ci"][0] == pytest.approx(0.4677, abs=1e-4) and score["ci"][1] == pytest.approx(0.9111, abs=1e-4)
    assert (score["n_positive"], score["n_negative"]) == (6, 6)


def test_assess_at_chance_always_yes_and_refuses_unequal_classes():
    always_yes = assess([1, 1, 0, 0], [1, 1, 1, 1])
    assert always_yes["balanced_accuracy"] == 0.5 and always_yes["tpr"] == 1 and always_yes["tnr"] == 0
    assert always_yes["one_answer"] and not assess([1, 0], [1, 0])["one_answer"]
    assert assess([], [])["balanced_accuracy"] is None
    with pytest.raises(ValueError, match="as many positives as negatives"):
        assess([1, 1, 0], [1, 0, 0])


def test_summarize_means_and_t_intervals_by_hand():
    scores, null = [0.9, 0.7, 0.8, None], [0.5, 0.6, 0.4, 0.5]
    s = summarize(scores, null)
    assert s["n_features"] == 3 and s["mean"] == pytest.approx(0.8) and s["null_mean"] == pytest.approx(0.5)
    # t(0.975, 2) = 4.302653; both samples have sd 0.1 over 3 values
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert s["ci"] == pytest.approx([0.8 - half, 0.8 + half], abs=1e-6)
    assert s["null_ci"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-6)
    diffs = np.array([0.4, 0.1, 0.4])
    dhalf = 4.302653 * diffs.std(ddof=1) / math.sqrt(3)
    assert s["difference"] == pytest.approx(0.3) and s["difference_ci"] == pytest.approx([0.3 - dhalf, 0.3 + dhalf], abs=1e-6)
    assert summarize([0.6], [0.5])["ci"] is None


def window(text: str, acts: list[float], rollout: int = 0, position: int = 0) -> Window:
    return Window(tuple(text.split("|")), tuple(acts), rollout, position)


def case_of(feature: int, n: int) -> FeatureCase:
    pos = [window(f"a|b{i}|c", [0, 1.0, 0], 1, i) for i in range(n)]
    neg = [window(f"x|y{i}|z", [0, 0, 0], 2, i) for i in range(n)]
    shown = [window("p|q|r", [0, 2.0, 0], 3, 0)]
    return FeatureCase(7, feature, "auroc", shown, pos, neg, [[True, False, False]] * n)


def test_report_scores_each_method_and_its_null_from_the_predictions():
    jobs = plan_jobs([case_of(1, 2), case_of(2, 2)], seed=0)
    results = [{"explanation": "b tokens",
                "detection": {"truth": [True, True, False, False], "predicted": [True, True, False, False]},
                "fuzzing": {"truth": [True, False, True, False], "predicted": [True, True, True, True]},
                "null_detection": {"truth": [True, True, False, False], "predicted": [True, False, True, False]},
                "null_fuzzing": {"truth": [True, False, True, False], "predicted": [False, False, False, False]}},
               {"explanation": "", "detection": {"truth": [True, False], "predicted": [False, True]}}]
    out = report(jobs, results, explainer="x")
    f1 = out["layers"]["7"]["features"]["1"]
    assert f1["detection"]["balanced_accuracy"] == 1.0 and f1["fuzzing"]["balanced_accuracy"] == 0.5
    assert f1["null_detection"]["balanced_accuracy"] == 0.5 and f1["null_examples_of"] == {"layer": 7, "feature": 2}
    f2 = out["layers"]["7"]["features"]["2"]
    assert f2["detection"]["balanced_accuracy"] == 0.0 and f2["fuzzing"]["balanced_accuracy"] is None
    # Only features scored both ways count: feature 2's null has no predictions.
    assert out["summary"]["detection"]["mean"] == 1.0 and out["summary"]["detection"]["n_features"] == 1
    assert out["summary"]["fuzzing"]["n_one_answer"] == 1 and out["summary"]["detection"]["n_one_answer"] == 0
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# (b) Prompts, the split, the choice


def test_highlight_wraps_runs_of_marked_tokens():
    assert highlight(["The", " cat", " sat", " on"], [False, True, True, False]) == "The<< cat sat>> on"
    assert highlight(["a", "b"], [True, False]) == "<<a>>b" and highlight(["a", "b"], [False, True]) == "a<<b>>"
    assert highlight(["a", "b"], [False, False]) == "ab"


def test_prompts_show_the_marks_and_the_explanation():
    w = window("The| cat| sat", [0, 1.5, 0])
    assert "The<< cat>> sat" in explain_prompt([w])
    d = detection_prompt("cats", w)
    assert '"cats"' in d and "The cat sat" in d and "<<" not in d and "1 for yes or 0 for no" in d
    assert "<<The>> cat sat" in fuzzing_prompt("cats", w, [True, False, False])


def test_scoring_items_are_balanced_and_decoys_mark_as_many_idle_tokens():
    rng = np.random.default_rng(0)
    active = [False, True, True, False, False, False]
    decoy = decoy_marks(active, rng)
    assert sum(decoy) == 2 and not any(d and a for d, a in zip(decoy, active))
    assert decoy_marks([True, True], rng) is None
    case = case_of(1, 3)
    case.decoys = [[False, False, True], None, [True, False, False]]
    items = scoring_items("e", case)
    for method, pairs in items.items():
        truths = [t for _, t in pairs]
        assert truths.count(True) == truths.count(False) > 0, method
    assert len(items["detection"]) == 6 and len(items["fuzzing"]) == 4  # the example without a decoy left out


def test_heldout_examples_are_never_shown_and_the_split_is_seeded():
    activation = np.arange(30, dtype=np.float64)[::-1].copy()
    shown, held = split_heldout(activation, shown=10, heldout=10, rng=np.random.default_rng(3))
    assert len(held) == 10 and len(shown) == 10 and not set(shown) & set(held)
    assert list(activation[shown]) == sorted(activation[shown], reverse=True)  # strongest first
    again = split_heldout(activation, shown=10, heldout=10, rng=np.random.default_rng(3))
    assert (again[0] == shown).all() and (again[1] == held).all()
    few_shown, few_held = split_heldout(np.ones(3), shown=10, heldout=10, rng=np.random.default_rng(0))
    assert len(few_held) == 1 and len(few_shown) == 2  # at most half held out


def test_choose_features_by_distance_then_random_live_ones():
    fire = np.array([5, 0, 3, 9, 1, 2])
    distance = np.array([0.1, 0.9, -0.4, 0.05, 0.3, 0.0])
    chosen, drawn, by = choose_features(distance, fire, top=2, random=3, rng=np.random.default_rng(0))
    assert chosen == [2, 4] and by == "auroc"  # feature 1 is dead
    assert len(drawn) == 3 and set(drawn) <= {0, 3, 5}
    assert choose_features(None, fire, top=2, random=0, rng=np.random.default_rng(0))[:1] == ([3, 0],)


def test_null_partners_never_pair_a_feature_with_itself():
    for n in (2, 3, 10):
        partners = null_partners(n, seed=5)
        assert sorted(partners) == list(range(n)) and all(p != i for i, p in enumerate(partners))
    assert null_partners(1, 0) == [None]


# ---------------------------------------------------------------------------------------------
# (c) The stage on a small run of the tiny model, and what the release shows of it

SMALL = ["rollout.num_questions=12", "train.epochs=2", "train.n_features=64", "train.k=4", "release.bootstrap=20",
         "release.permutations=50", "release.probe_permutations=0", "causal.enabled=false",
         "autointerp.features=3", "autointerp.random_features=3", "autointerp.examples=4",
         "autointerp.heldout_examples=4", "autointerp.max_new_tokens=16"]


@pytest.fixture(scope="module")
def small_run(tiny_path, tmp_path_factory):
    from small_run import build_run

    return build_run(tmp_path_factory.mktemp("autointerp") / "run", SMALL)


@pytest.mark.slow  # builds a small run (about two minutes on 2 cores)
def test_the_tiny_models_explanations_score_like_the_null(small_run):
    result = json.loads(small_run.autointerp.read_text())
    features = [f for layer in result["layers"].values() for f in layer["features"].values()]
    assert len(features) == 3 * 6 and all(isinstance(f["explanation"], str) for f in features)
    assert any(f["explanation"] for f in features)
    scored = [f for f in features if f["detection"]["balanced_accuracy"] is not None]
    assert len(scored) >= 6
    for f in scored:
        d = f["detection"]
        assert d["n_positive"] == d["n_negative"] <= 4 and 0 <= d["ci"][0] <= d["balanced_accuracy"] <= d["ci"][1] <= 1
    for method in ("detection", "fuzzing"):
        s = result["summary"][method]
        assert s["n_features"] >= 2
        # Meaningless explanations: the score's interval meets the null's, or the score is near chance.
        overlap = s["ci"] is not None and s["null_ci"] is not None and \
            s["ci"][0] <= s["null_ci"][1] and s["null_ci"][0] <= s["ci"][1]
        assert overlap or abs(s["mean"] - 0.5) <= 0.15, (method, s)


@pytest.mark.slow  # builds a small run (about two minutes on 2 cores)
def test_heldout_examples_of_the_run_are_never_shown_and_negatives_are_silent(small_run):
    from qsae import autointerp
    from qsae.config import load_config
    from qsae.models import load_tokenizer, resolve_model_path
    from qsae.release import token_texts

    cfg = load_config(None, SMALL)
    tokenizer = load_tokenizer(resolve_model_path("tiny"), None)
    cases = autointerp.plan_cases(small_run, [3, 7, 11], cfg.autointerp, token_texts(tokenizer))
    explained = json.loads(small_run.autointerp.read_text())["layers"]
    for case in cases:
        assert {(w.rollout, w.position) for w in case.shown}.isdisjoint((w.rollout, w.position) for w in case.positives)
        assert len(case.positives) == len(case.negatives) == explained[str(case.layer)]["features"][str(case.feature)]["n_heldout"]
        assert all(any(a > 0 for a in w.acts) for w in case.positives + case.shown)
        assert all(not any(a > 0 for a in w.acts) for w in case.negatives)


@pytest.mark.slow  # builds a small run (about two minutes on 2 cores)
def test_release_shows_the_explanations(small_run):
    release = small_run.release
    result = json.loads((release / "autointerp.json").read_text())
    layer, feature = next((layer, f) for layer, entry in result["layers"].items() for f in entry["features"])
    pages = "".join(p.read_text() for p in (release / "browser" / "data").glob(f"layer_{layer}_block_*.js"))
    assert json.dumps(result["layers"][layer]["features"][feature]["explanation"], ensure_ascii=False) in pages
    lines = [json.loads(line) for path in (release / "neuronpedia").rglob("explanations.jsonl")
             for line in path.read_text().splitlines()]
    assert len(lines) == sum(len(entry["features"]) for entry in result["layers"].values())
    assert {"modelId", "layer", "index", "description", "explanationModelName", "scores"} <= set(lines[0])
    card = (release / "README.md").read_text()
    assert "## Explanations" in card and "null" in card


@pytest.mark.slow
def test_ray_tasks_explain_and_score_every_job_in_order(local_ray, tiny_path):
    """The stage's Ray path: the jobs dealt over capture.num_actors tasks, each loading the explainer,
    the results back in the jobs' order."""
    from qsae.autointerp import ScoreSettings
    from qsae.config import load_config
    from qsae.distributed.model_tasks import RayModelTasks
    from qsae.pipeline import resolve

    spec = resolve(load_config(None, ["capture.num_actors=2"])).spec
    cases = [case_of(f, 2) for f in range(3)]
    jobs = plan_jobs(cases, seed=1)
    results = RayModelTasks(spec).explain_and_score("", jobs, ScoreSettings(max_new_tokens=4, batch_size=4))
    assert len(results) == 3 and all(isinstance(r["explanation"], str) for r in results)
    for (case, partner), result in zip(jobs, results):
        assert len(result["detection"]["truth"]) == 4 and len(result["fuzzing"]["truth"]) == 4
        assert len(result["null_detection"]["truth"]) == 4 and partner.feature != case.feature


def test_answers_do_not_depend_on_what_shares_their_batch(tiny):
    """Left padding in a batch leaves each prompt's answer margin as it is alone."""
    from qsae.autointerp import answer_margins

    model, tokenizer = tiny
    w = window("Option| D| matches| the| key| idea", [0, 1.0, 0, 0, 0, 0])
    prompts = [detection_prompt("letters", w), fuzzing_prompt("the word Option", w, w.active),
               detection_prompt("a much longer explanation of what this unit might be doing here", w)]
    alone = [answer_margins(model, tokenizer, [p], batch_size=1)[0] for p in prompts]
    together = answer_margins(model, tokenizer, prompts, batch_size=3)
    assert together == pytest.approx(alone, abs=1e-4)
