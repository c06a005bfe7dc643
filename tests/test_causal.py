"""The causal check's parts: the interventions (against the SAE's dense codes and the model's own hidden
states), the choice of features and controls (against sklearn), and the paired statistics (against scipy)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from scipy.stats import t as t_dist
from sklearn.metrics import roc_auc_score

from qsae.causal import (
    LENGTH_NOMINAL_BELOW,
    Answers,
    Arm,
    CausalStudy,
    arm_statistics,
    assess,
    detectable,
    flips_needed,
    holm,
    intervened,
    intervention,
    mcnemar_p,
    mean_interval,
    paired_difference_interval,
    plan_layer,
)
from qsae.models import decoder_layers
from qsae.sae import TopKSAE


@pytest.fixture
def sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(16, 40, 4)


def test_ablating_a_feature_removes_its_contribution_and_steering_adds_along_its_decoder_row(sae):
    h = torch.randn(3, 5, 16) * 3
    with torch.no_grad():
        dense = sae.encode(h)  # the dense codes: independent of encode_topk's gather
        fired = int(dense[..., :].gt(0).sum(dim=(0, 1)).argmax())
        ablated = intervention(Arm("a", 0, "feature", "ablate", fired), sae)(h)
        steered = intervention(Arm("s", 0, "feature", "steer", fired, scale=-2.5), sae)(h)
    expected = h - dense[..., fired, None] * sae.W_dec[fired].detach()
    torch.testing.assert_close(ablated, expected)
    assert (dense[..., fired] > 0).any() and not torch.equal(ablated, h)
    torch.testing.assert_close(steered, h - 2.5 * sae.W_dec[fired].detach())


def test_the_direction_arms_project_out_and_add_along_the_unit_direction(sae):
    h = torch.randn(4, 16)
    unit = torch.nn.functional.normalize(torch.randn(16), dim=0)
    ablated = intervention(Arm("d", 0, "dom", "ablate", direction=unit.tolist()), sae)(h)
    torch.testing.assert_close(ablated @ unit, torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(ablated + (h @ unit)[:, None] * unit, h)
    steered = intervention(Arm("d", 0, "dom", "steer", scale=3.0, direction=unit.tolist()), sae)(h)
    torch.testing.assert_close(steered, h + 3.0 * unit)


def test_the_hook_changes_the_layer_output_by_exactly_the_intervention(tiny):
    """On the tiny model: with the hook, what the next layer receives is the clean output of the layer
    (hidden_states[L + 1]; the layers before it are untouched) minus a_f d_f; with a zero steer the
    logits are the clean ones."""
    model, tokenizer = tiny
    layer, layers = 3, decoder_layers(model)
    ids = torch.tensor([tokenizer("Option A does not fit the question.").input_ids])
    torch.manual_seed(1)
    sae = TopKSAE(model.config.get_text_config().hidden_size, 64, 4)
    received = {}

    def record(module, args, kwargs):
        received["input"] = args[0] if args else kwargs["hidden_states"]

    with torch.no_grad():
        clean = model(input_ids=ids, output_hidden_states=True)
        residual = clean.hidden_states[layer + 1]
        feature = int(sae.encode(residual)[0].gt(0).sum(dim=0).argmax())
        expected = residual - sae.encode(residual)[..., feature, None] * sae.W_dec[feature]
        handle = layers[layer + 1].register_forward_pre_hook(record, with_kwargs=True)
        with intervened(layers, Arm("a", layer, "feature", "ablate", feature), sae):
            ablated = model(input_ids=ids)
        handle.remove()
        with intervened(layers, Arm("s", layer, "feature", "steer", feature, scale=0.0), sae):
            zero = model(input_ids=ids)
    assert not torch.equal(expected, residual)
    torch.testing.assert_close(received["input"], expected)
    assert not torch.allclose(ablated.logits, clean.logits)
    torch.testing.assert_close(zero.logits, clean.logits)
    with torch.no_grad():  # outside the block the model is itself again
        torch.testing.assert_close(model(input_ids=ids).logits, clean.logits)


def test_plan_layer_chooses_by_training_auroc_and_matches_controls_on_fire_rate():
    rng = np.random.default_rng(0)
    n, rollouts = 30, 40
    labels = rng.random(rollouts) < 0.5
    pooled = rng.exponential(size=(rollouts, n)) * (rng.random((rollouts, n)) < 0.6)
    pooled[:, 7] += 2.0 * labels  # a feature higher on correct rollouts
    pooled[:, 12] += 2.0 * ~labels  # one higher on wrong ones
    fire_rate = rng.uniform(0.001, 0.2, n)
    fire_rate[[3, 4]] = 0  # dead: never chosen, never a control
    pooled[:, [3, 4]] = 0
    typical = rng.uniform(0.5, 2, n)
    plan = plan_layer(5, m=2, steer_multiples=[2.0, 4.0], fire_rate=fire_rate, typical=typical, pooled_max=pooled,
                      labels=labels, questions=np.arange(rollouts), direction=rng.normal(size=8), permutations=200,
                      seed=0)
    # One rollout per question: the null centres on 0.5.
    distance = {f: abs(roc_auc_score(labels, pooled[:, f]) - 0.5) for f in range(n) if fire_rate[f] > 0}
    expected = sorted(distance, key=lambda f: (-distance[f], f))[:2]
    assert [s["feature"] for s in plan.selected] == expected and set(expected) == {7, 12}
    for chosen in plan.selected:  # each carries its null: clearly beyond chance, also family-wise
        assert chosen["train_null_centre"] == pytest.approx(0.5) and chosen["train_p"] < 1e-4
        assert chosen["train_westfall_young_p"] == 1 / 201
    log_rate = np.log(fire_rate[fire_rate > 0])
    for control in plan.controls:
        g, f = control["feature"], control["matched_to"]
        assert fire_rate[g] > 0 and g not in expected
        # among the 5 live features nearest in log fire rate (the chosen ones left out)
        others = sorted(abs(np.log(fire_rate[h]) - np.log(fire_rate[f])) for h in range(n)
                        if fire_rate[h] > 0 and h not in expected)
        assert abs(np.log(fire_rate[g]) - np.log(fire_rate[f])) <= others[4]
    assert len(log_rate) > 5
    # per feature and control: ablate + 2 multiples x 2 signs; dom: the same without a feature
    assert len(plan.arms) == 2 * 2 * 5 + 5
    steer = [a for a in plan.arms if a.feature == 7 and a.kind == "steer"]
    assert sorted(a.scale for a in steer) == pytest.approx(sorted(s * typical[7] for s in (2, -2, 4, -4)))
    for control in plan.controls:  # steered as hard as the feature it is matched to, not at its own strength
        scales = sorted(a.scale for a in plan.arms if a.feature == control["feature"] and a.kind == "steer")
        matched = typical[control["matched_to"]]
        assert scales == pytest.approx(sorted(s * matched for s in (2, -2, 4, -4)))
        assert control["steered_at"] == matched != control["typical_activation"]
    assert len({a.name for a in plan.arms}) == len(plan.arms)


def test_plan_layer_says_why_it_cannot_run():
    n = 6
    fire_rate = np.array([0.1, 0.0, 0.2, 0.0, 0.0, 0.0])
    pooled = np.random.default_rng(1).random((10, n)) * (fire_rate > 0)
    labels = np.arange(10) % 2 == 0
    kwargs = dict(steer_multiples=[4.0], typical=np.ones(n), pooled_max=pooled, questions=np.arange(10),
                  direction=None, permutations=50, seed=0)
    wide = plan_layer(1, m=5, fire_rate=fire_rate, labels=labels, **kwargs)
    assert wide.note == "5 features asked for, 2 live: all of them are used" and len(wide.selected) == 2
    assert {a.group for a in wide.arms} == {"feature"}  # no live feature left for a control, no direction
    dead = plan_layer(1, m=2, fire_rate=np.zeros(n), labels=labels, **kwargs)
    assert dead.skipped == "the SAE has no live feature at this layer" and not dead.arms
    one_class = plan_layer(1, m=2, fire_rate=fire_rate, labels=np.ones(10, bool), **kwargs)
    assert "not of both outcomes" in one_class.skipped and not one_class.arms


def test_mcnemar_p_is_the_exact_binomial_test_of_the_discordant_pairs():
    rng = np.random.default_rng(2)
    for _ in range(20):
        base, arm = rng.random(25) < 0.5, rng.random(25) < 0.5
        b, c = int((base & ~arm).sum()), int((~base & arm).sum())
        assert mcnemar_p(base, arm) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    assert mcnemar_p(base, base) == 1.0


def answers(correct, letters, lengths, scored=None) -> Answers:
    correct = np.array(correct, bool)
    return Answers(correct, letters, np.array(lengths), [[]] * len(correct),
                   np.ones(len(correct), bool) if scored is None else np.array(scored, bool))


def test_arm_statistics_are_paired_over_questions():
    base = answers([1, 1, 0, 0, 1, 0], ["A", "B", "C", "D", "A", None], [10, 20, 30, 40, 50, 60], [1, 1, 1, 1, 1, 0])
    arm = answers([1, 0, 0, 1, 1, 1], ["A", "C", "C", "D", "B", "A"], [12, 20, 25, 40, 50, 61])
    counted = arm_statistics(base, arm, unscored="wrong")
    assert counted["accuracy_change"] == pytest.approx(4 / 6 - 3 / 6) and counted["n_questions"] == 6
    assert counted["answers_changed"] == pytest.approx(3 / 6)
    assert counted["length_change"] == pytest.approx(np.mean([2, 0, -5, 0, 0, 1]))
    low, high = counted["accuracy_change_ci"]
    assert low <= counted["accuracy_change"] <= high and high - low > 0
    differences = np.array([2, 0, -5, 0, 0, 1.0])  # Student's t over the paired differences
    half = t_dist.ppf(0.975, 5) * differences.std(ddof=1) / np.sqrt(6)
    assert counted["length_change_ci"] == pytest.approx([differences.mean() - half, differences.mean() + half])
    # Left out where the baseline gave no parsable answer (question 6), as the statistics leave it out.
    left_out = arm_statistics(base, arm, unscored="exclude")
    assert left_out["n_questions"] == 5 and left_out["accuracy_change"] == pytest.approx(3 / 5 - 3 / 5)
    assert left_out["length_change"] == pytest.approx(np.mean([2, 0, -5, 0, 0]))


def test_the_paired_accuracy_interval_covers_and_never_collapses():
    """Newcombe's interval: at least 95% coverage of the true change in a simulation of paired answers
    at the sizes a causal check has (95-98% from 30 questions), and wide even when no answer changed
    (a bootstrap of the pairs gives [0, 0])."""
    rng = np.random.default_rng(3)
    for n, p_base, p_flip_down, p_flip_up in ((8, 0.3, 0.1, 0.1), (30, 0.5, 0.15, 0.05), (100, 0.4, 0.05, 0.1)):
        truth = (1 - p_base) * p_flip_up - p_base * p_flip_down
        covered = 0
        for _ in range(2000):
            base = rng.random(n) < p_base
            flip = np.where(base, rng.random(n) < p_flip_down, rng.random(n) < p_flip_up)
            low, high = paired_difference_interval(base, base ^ flip)
            covered += low <= truth <= high
        # At 8 questions few outcomes are possible: the interval errs on the wide side, as exact ones do.
        assert 0.93 <= covered / 2000 <= (1.0 if n < 30 else 0.985), (n, covered / 2000)
    low, high = paired_difference_interval(np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), np.array([1, 1, 0, 0, 0, 0, 0, 0], bool))
    assert low < -0.2 and high > 0.2


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm from its definition: the i-th smallest p times (m - i + 1), made monotone, capped at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def test_holm_and_what_the_question_count_can_detect():
    p = [0.01, 0.04, 0.03, 0.5, 0.005]
    assert holm(p) == pytest.approx(holm_by_hand(p))
    # 8 questions, 2 answered right (the audit's case): no drop can reach p < 0.5.
    base = answers([1, 1, 0, 0, 0, 0, 0, 0], ["A"] * 8, [10] * 8)
    d = detectable(base, n_arms=15)
    assert d["smallest_p_drop"] == pytest.approx(binomtest(2, 2, 0.5).pvalue) == 0.5
    assert d["smallest_p_rise"] == pytest.approx(binomtest(0, 6, 0.5).pvalue)
    assert d["smallest_drop_at_p_0_05"] is None and d["smallest_rise_at_p_0_05"] == pytest.approx(6 / 8)
    assert d["smallest_drop_after_holm"] is None and d["smallest_rise_after_holm"] is None  # needs 10 flips
    # the fewest one-way flips that reach p < level, against scipy
    for level in (0.05, 0.05 / 15):
        k = flips_needed(level)
        assert binomtest(0, k, 0.5).pvalue < level <= binomtest(0, k - 1, 0.5).pvalue


def test_a_run_without_heldout_rollouts_skips_the_check_and_says_why():
    got = assess(CausalStudy({}, []), {}, unscored="exclude")
    assert got["skipped"] == "there are no held-out rollouts to rerun" and got["layers"] == {}


def test_the_length_change_interval_is_nominal_at_few_questions():
    """Student's t for the mean length change, on a skewed population (most answers unchanged, the rest
    gamma-distributed): near 95% at 100 questions, well below at the few questions a causal check has,
    which is why the card calls it nominal below LENGTH_NOMINAL_BELOW questions."""
    rng = np.random.default_rng(9)
    truth = 0.4 * (1.5 * 40 - 40)

    def coverage(n: int) -> float:
        covered = 0
        for _ in range(2000):
            changes = np.where(rng.random(n) < 0.4, rng.gamma(1.5, 40, n) - 40, 0.0)
            low, high = mean_interval(changes)
            covered += low <= truth <= high
        return covered / 2000

    assert coverage(8) < 0.9 and coverage(LENGTH_NOMINAL_BELOW) >= 0.92
