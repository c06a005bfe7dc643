"""The causal check's parts: the interventions (against the SAE's dense codes and the model's own hidden
states), the choice of features and controls (against sklearn), and the paired statistics (against scipy)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from qsae.causal import (
    Answers,
    Arm,
    CausalStudy,
    arm_statistics,
    assess,
    intervened,
    intervention,
    mcnemar_p,
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
                      labels=labels, direction=rng.normal(size=8), seed=0)
    distance = {f: abs(roc_auc_score(labels, pooled[:, f]) - 0.5) for f in range(n) if fire_rate[f] > 0}
    expected = sorted(distance, key=lambda f: (-distance[f], f))[:2]
    assert [s["feature"] for s in plan.selected] == expected and set(expected) == {7, 12}
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
    assert len({a.name for a in plan.arms}) == len(plan.arms)


def test_plan_layer_says_why_it_cannot_run():
    n = 6
    fire_rate = np.array([0.1, 0.0, 0.2, 0.0, 0.0, 0.0])
    pooled = np.random.default_rng(1).random((10, n)) * (fire_rate > 0)
    labels = np.arange(10) % 2 == 0
    kwargs = dict(steer_multiples=[4.0], typical=np.ones(n), pooled_max=pooled, direction=None, seed=0)
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


def test_arm_statistics_are_paired_over_questions():
    base = Answers(np.array([1, 1, 0, 0, 1, 0], bool), ["A", "B", "C", "D", "A", None], np.array([10, 20, 30, 40, 50, 60]),
                   [[]] * 6)
    arm = Answers(np.array([1, 0, 0, 1, 1, 1], bool), ["A", "C", "C", "D", "B", "A"], np.array([12, 20, 25, 40, 50, 61]),
                  [[]] * 6)
    got = arm_statistics(base, arm, n_boot=300, seed=0)
    assert got["accuracy_change"] == pytest.approx(4 / 6 - 3 / 6)
    assert got["answers_changed"] == pytest.approx(3 / 6)
    assert got["length_change"] == pytest.approx(np.mean([2, 0, -5, 0, 0, 1]))
    low, high = got["accuracy_change_ci"]
    assert low <= got["accuracy_change"] <= high and high - low > 0
    # resampling pairs: replicates of the difference, never of the two accuracies apart
    rng = np.random.default_rng(0)
    replicates = [np.mean(arm.correct[i]) - np.mean(base.correct[i]) for i in (rng.integers(0, 6, 6) for _ in range(300))]
    assert (low, high) == pytest.approx(tuple(np.quantile(replicates, [0.025, 0.975])))


def test_a_run_without_heldout_rollouts_skips_the_check_and_says_why():
    got = assess(CausalStudy({}, []), {}, n_boot=10, seed=0)
    assert got["skipped"] == "there are no held-out rollouts to rerun" and got["layers"] == {}
