"""Causal check: do the features most associated with correctness change the model's answers when
intervened on?

Per layer, the top m live features by rollout-level |AUROC - null centre| on the training questions'
rollouts (each feature's pooled max activation against its correctness; rollout_stats.permutation_test)
are intervened on while the model answers the held-out questions again, greedily, from the same prompt
tokens:
- ablated: the feature's contribution a_f(h) d_f subtracted from the layer's output h at every
  position (a_f as the SAE encodes h; d_f its unit decoder row);
- steered: s c_f d_f added at every position, for each multiple s in `steer_multiples` with both
  signs, c_f the feature's typical activation (its mean where it fires in the sample).
Controls: for each chosen feature a random live feature matched on fire rate (drawn among the
MATCH_POOL live features nearest in log fire rate), ablated and steered at the chosen one's c_f; and the
difference-of-means direction u between the mean residuals of correct and wrong training rollouts
at that layer, ablated (h - (h . u) u / ||u||^2) and steered at matched norm (s times the chosen
features' mean c_f along u / ||u||). The un-intervened arm runs too: greedy decoding is deterministic,
so it reproduces the original rollouts' answers, and every arm is compared with it question by
question, unscored answers treated as release.unscored_rollouts says: the change in accuracy with
Newcombe's paired interval, McNemar's exact p (Holm-adjusted over all arms), the share of answers
whose letter changed, and the mean change in response length with its t interval; and what the
question count could detect at all (detectable).

The stage reads the analysis from the run directory (plan_study), reruns the held-out prompts under
every arm (generate_arms, a plain function of a loaded model that the Ray layer runs in tasks placed
like capture replicas, on the transformers engine, whose hooks run at every position), grades the
answers as the rollout stage does (grade), and compares each arm with the baseline (assess).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from qsae.analysis.features import UndefinedAUROCError
from qsae.analysis.results import LayerAnalysis
from qsae.analysis.rollout_stats import permutation_test
from qsae.config import CausalConfig
from qsae.engines import Generation
from qsae.engines.hf_engine import HFEngine
from qsae.models import decoder_layers
from qsae.questions import SCORED, Question
from qsae.rollout import Rollout, make_rollout, read_rollouts
from qsae.rundir import RunDir
from qsae.sample import load_selection

MATCH_POOL = 5  # random controls are drawn among this many live features nearest in fire rate
LENGTH_NOMINAL_BELOW = 100  # questions below which the length change's t interval covers too little
BASELINE = "baseline"


@dataclass(frozen=True)
class Arm:
    """One intervention (or none) on one layer."""

    name: str  # unique, e.g. "L7 f12 steer -4x"
    layer: int | None  # None for the baseline
    group: str  # "baseline" | "feature" | "random" | "dom"
    kind: str  # "none" | "ablate" | "steer"
    feature: int | None = None  # the SAE feature (feature and random groups)
    scale: float = 0.0  # steer: the length added along the unit direction (signed)
    direction: list[float] | None = None  # dom: the difference-of-means direction


@dataclass
class LayerPlan:
    """What a layer's causal check runs and why; `skipped` says why not, when it does not."""

    layer: int
    arms: list[Arm] = field(default_factory=list)
    selected: list[dict] = field(default_factory=list)  # feature, its training AUROC, null centre, p, ...
    controls: list[dict] = field(default_factory=list)  # feature, fire_rate, ..., matched_to, steered_at
    skipped: str | None = None
    note: str | None = None


def matched_controls(fire_rate: np.ndarray, chosen: list[int], rng: np.random.Generator) -> list[int]:
    """For each chosen feature, a live feature not chosen (nor already drawn), drawn uniformly among
    the MATCH_POOL nearest to it in log fire rate."""
    taken, controls = set(chosen), []
    log_rate = np.log(np.where(fire_rate > 0, fire_rate, np.nan))
    for f in chosen:
        candidates = [g for g in np.flatnonzero(fire_rate > 0).tolist() if g not in taken]
        if not candidates:
            break
        nearest = sorted(candidates, key=lambda g: (abs(log_rate[g] - log_rate[f]), g))[:MATCH_POOL]
        pick = int(rng.choice(nearest))
        controls.append(pick)
        taken.add(pick)
    return controls


def plan_layer(layer: int, *, m: int, steer_multiples: list[float], fire_rate: np.ndarray, typical: np.ndarray,
               pooled_max: np.ndarray, labels: np.ndarray, questions: np.ndarray, direction: np.ndarray | None,
               permutations: int, seed: int) -> LayerPlan:
    """The arms of one layer (module docstring) from its training rollouts: pooled_max [R, n], labels
    bool [R] (correct) and their questions [R], and their difference_of_means direction (None: no dom
    control); fire_rate and typical [n] over the sample. The chosen features are those farthest from
    their permutation null's centre on the training rollouts (rollout_stats.permutation_test), and
    carry that test's p and Westfall-Young p."""
    plan = LayerPlan(layer)
    live = np.flatnonzero(fire_rate > 0)
    if len(live) == 0:
        plan.skipped = "the SAE has no live feature at this layer"
        return plan
    try:
        test = permutation_test(pooled_max, labels, questions, permutations, seed=seed)
    except UndefinedAUROCError:
        plan.skipped = (f"the {len(labels)} labelled training rollouts are not of both outcomes: "
                        "no feature can be chosen by AUROC")
        return plan
    distance = np.abs(test.auroc - test.null_centre)
    chosen = sorted(live.tolist(), key=lambda f: (-distance[f], f))[:m]
    if len(chosen) < m:
        plan.note = f"{m} features asked for, {len(chosen)} live: all of them are used"
    controls = matched_controls(fire_rate, chosen, np.random.default_rng([seed, layer]))
    plan.selected = [{"feature": f, "train_auroc": float(test.auroc[f]), "train_null_centre": float(test.null_centre[f]),
                      "train_p": float(test.p[f]), "train_westfall_young_p": float(test.westfall_young_p[f]),
                      "fire_rate": float(fire_rate[f]), "typical_activation": float(typical[f])} for f in chosen]
    # A control is steered as hard as the feature it is matched to (decoder rows are unit vectors, so
    # the added vectors have the same norm): chosen and control arms differ only in direction.
    strength = {f: float(typical[f]) for f in chosen} | {g: float(typical[f]) for g, f in zip(controls, chosen)}
    plan.controls = [{"feature": g, "fire_rate": float(fire_rate[g]), "typical_activation": float(typical[g]),
                      "matched_to": f, "steered_at": strength[g]} for g, f in zip(controls, chosen)]
    for group, features in (("feature", chosen), ("random", controls)):
        for f in features:
            plan.arms.append(Arm(f"L{layer} {group} f{f} ablate", layer, group, "ablate", f))
            plan.arms += [Arm(f"L{layer} {group} f{f} steer {sign * s:+g}x", layer, group, "steer", f,
                              sign * s * strength[f]) for s in steer_multiples for sign in (1, -1)]
    if direction is not None and np.linalg.norm(direction) > 0:
        size = float(np.mean([typical[f] for f in chosen]))
        unit = (direction / np.linalg.norm(direction)).tolist()
        plan.arms.append(Arm(f"L{layer} dom ablate", layer, "dom", "ablate", direction=unit))
        plan.arms += [Arm(f"L{layer} dom steer {sign * s:+g}x", layer, "dom", "steer", scale=sign * s * size,
                          direction=unit) for s in steer_multiples for sign in (1, -1)]
    return plan


# ------------------------------------------------------------------------------------------------
# The intervention itself


def intervention(arm: Arm, sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """h [..., d] -> the intervened output of arm's layer (the SAE of that layer for feature arms)."""
    if arm.kind == "none":
        return lambda h: h
    if arm.direction is not None:
        unit = torch.tensor(arm.direction)
        if arm.kind == "ablate":
            return lambda h: h - (h @ unit.to(h))[..., None] * unit.to(h)
        return lambda h: h + arm.scale * unit.to(h)
    row = sae.W_dec[arm.feature].detach()
    if arm.kind == "ablate":
        def ablate(h: torch.Tensor) -> torch.Tensor:
            values, indices = sae.encode_topk(h.to(row.dtype))
            activation = (values * (indices == arm.feature)).sum(dim=-1)
            return h - (activation[..., None] * row).to(h.dtype)
        return ablate
    return lambda h: h + (arm.scale * row).to(h)


@contextmanager
def intervened(layers: nn.ModuleList, arm: Arm, sae):
    """Within the block, every forward pass of the model has arm's intervention at its layer."""
    if arm.layer is None:
        yield
        return
    change = intervention(arm, sae)

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = change(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[arm.layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Answers:
    """One arm's answers to the held-out questions, in the same question order for every arm."""

    correct: np.ndarray  # bool [Q]
    letter: list[str | None]  # [Q]
    length: np.ndarray  # response tokens [Q]
    responses: list[list[int]]  # [Q] response token ids
    scored: np.ndarray  # bool [Q]: answered with a parsable letter within the token limit


def mcnemar_p(baseline: np.ndarray, arm: np.ndarray) -> float:
    """Exact two-sided McNemar p: the discordant pairs as a binomial(b + c, 1/2); 1 without any."""
    b, c = int((baseline & ~arm).sum()), int((~baseline & arm).sum())
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilson_interval(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion k / n."""
    p, scale = k / n, z * z / n
    centre = (p + scale / 2) / (1 + scale)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + scale)
    return centre - half, centre + half


def paired_difference_interval(base: np.ndarray, arm: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Newcombe's interval (1998, method 10) of arm accuracy - base accuracy over the same questions:
    each accuracy's Wilson interval, combined with the pairs' correlation (phi, continuity-corrected).
    It stays wide when few answers change, where a bootstrap of the pairs collapses to [0, 0]."""
    from scipy.stats import norm

    n = len(base)
    both, only_base = int((base & arm).sum()), int((base & ~arm).sum())
    only_arm, neither = int((~base & arm).sum()), int((~base & ~arm).sum())
    z = float(norm.ppf(1 - alpha / 2))
    p1, p2 = (both + only_base) / n, (both + only_arm) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_base, n, z), wilson_interval(both + only_arm, n, z)
    denominator = (both + only_base) * (only_arm + neither) * (both + only_arm) * (only_base + neither)
    if denominator == 0:
        phi = 0.0
    else:
        cross = both * neither - only_base * only_arm
        phi = (max(cross - n / 2, 0) if cross > 0 else cross) / math.sqrt(denominator)
    difference = p2 - p1
    low = difference - math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    high = difference + math.sqrt(max((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2, 0.0))
    return max(low, -1.0), min(high, 1.0)


def mean_interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float] | None:
    """Student's t interval of a mean (n - 1 degrees of freedom); None below 2 values."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    half = float(t.ppf(1 - alpha / 2, len(values) - 1)) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise over the list), in the list's order."""
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate([min(1.0, (len(p) - rank) * p[i]) for rank, i in enumerate(order)])
    out = np.empty(len(p))
    out[order] = adjusted
    return out.tolist()


def flips_needed(level: float) -> int:
    """The fewest discordant pairs, all one way, whose McNemar p is below `level`: p = 2 x 0.5^k."""
    return math.ceil(math.log2(2 / level) + 1e-12)


def detectable(base: Answers, n_arms: int, alpha: float = 0.05) -> dict:
    """What the held-out questions can show at all: the smallest McNemar p an arm could reach (every
    correct answer turned wrong, or every wrong one right), and the smallest accuracy change that can
    reach p < alpha, alone and after Holm over the arms (None where there are too few answers to flip)."""
    correct, wrong = int(base.correct.sum()), int((~base.correct).sum())
    n = len(base.correct)

    def smallest(flips: int, room: int) -> float | None:
        return flips / n if flips <= room else None

    alone, adjusted = flips_needed(alpha), flips_needed(alpha / max(n_arms, 1))
    return {"smallest_p_drop": min(1.0, 2 * 0.5 ** correct), "smallest_p_rise": min(1.0, 2 * 0.5 ** wrong),
            "smallest_drop_at_p_0_05": smallest(alone, correct), "smallest_rise_at_p_0_05": smallest(alone, wrong),
            "smallest_drop_after_holm": smallest(adjusted, correct), "smallest_rise_after_holm": smallest(adjusted, wrong),
            "n_arms": n_arms}


def arm_statistics(baseline: Answers, arm: Answers, *, unscored: str) -> dict:
    """Paired effects of an arm against the baseline over the same questions; with unscored = "exclude"
    only the questions both answered with a parsable letter in time count (release.unscored_rollouts)."""
    pairs = baseline.scored & arm.scored if unscored == "exclude" else np.ones(len(arm.correct), bool)
    base, mine = baseline.correct[pairs], arm.correct[pairs]
    lengths = (arm.length - baseline.length)[pairs].astype(np.float64)
    paired = len(base) >= 2  # one question is no interval
    return {
        "accuracy": float(mine.mean()) if len(mine) else None,
        "accuracy_change": float(mine.mean() - base.mean()) if len(mine) else None,
        "accuracy_change_ci": list(paired_difference_interval(base, mine)) if paired else None,
        "mcnemar_p": mcnemar_p(base, mine),
        "answers_changed": float(np.mean([a != b for a, b in zip(baseline.letter, arm.letter)])),
        "length_change": float(lengths.mean()) if len(lengths) else None,
        "length_change_ci": list(mean_interval(lengths)) if paired else None,
        "n_questions": int(pairs.sum()),
        "correct": arm.correct.astype(int).tolist(),  # per question, in baseline["rollout_ids"] order
        "scored": arm.scored.astype(int).tolist(),
        "letters": list(arm.letter),
    }


@dataclass
class CausalStudy:
    """What the causal check runs: every layer's plan, and the held-out rollouts whose prompts it reruns."""

    plans: dict[int, LayerPlan]
    heldout: list[Rollout]

    @property
    def arms(self) -> list[Arm]:
        return [Arm(BASELINE, None, BASELINE, "none")] + [arm for plan in self.plans.values() for arm in plan.arms]

    @property
    def skipped(self) -> str | None:
        return None if self.heldout else "there are no held-out rollouts to rerun"


def plan_study(run: RunDir, cfg: CausalConfig, layers: list[int], *, permutations: int, seed: int) -> CausalStudy:
    """The layers' plans from their analysis (the training rollouts' pooled max activations, labels and
    difference-of-means direction; fire rates and typical activations over the sample), and a seeded
    sample of cfg.questions held-out questions (one rollout each)."""
    selection = load_selection(run.selection)
    heldout_ids = sorted(selection.heldout_positions)
    rollouts = {r.rollout_id: r for r in read_rollouts(run.rollouts)}
    plans = {}
    for layer in cfg.layers or layers:
        if layer not in layers:
            plans[layer] = LayerPlan(layer, skipped=f"layer {layer} is not captured (capture.layers = {list(layers)})")
            continue
        analysis = LayerAnalysis.load(run.layer_analysis(layer))
        train = ~np.isin(analysis.rollout_ids, heldout_ids)
        plans[layer] = plan_layer(layer, m=cfg.features, steer_multiples=cfg.steer_multiples,
                                  fire_rate=analysis.fire_rate, typical=analysis.features.mean_activation,
                                  pooled_max=analysis.rollout_max[train], labels=analysis.rollout_labels[train] == 1,
                                  questions=np.array([rollouts[r].question_id for r in analysis.rollout_ids[train]]),
                                  direction=analysis.dom_direction, permutations=permutations, seed=seed)
    # One rollout per held-out question: the arms rerun its prompt greedily, the same for each of its samples.
    first_of = {}
    for r in heldout_ids:
        first_of.setdefault(rollouts[r].question_id, r)
    ids = sorted(first_of.values())
    if cfg.questions is not None and cfg.questions < len(ids):
        ids = sorted(np.random.default_rng(seed).choice(ids, cfg.questions, replace=False).tolist())
    return CausalStudy(plans, [rollouts[r] for r in ids])


@torch.no_grad()
def generate_arms(model: nn.Module, tokenizer, saes: dict, arms: list[Arm], *, prompts: list[list[int]],
                  max_new_tokens: int, batch_size: int) -> dict[str, list[Generation]]:
    """Every prompt answered again, greedily, under each arm's intervention."""
    engine = HFEngine(model, tokenizer, max_new_tokens, batch_size)
    layers, device = decoder_layers(model), model.get_input_embeddings().weight.device
    saes = {layer: sae.to(device) for layer, sae in saes.items()}
    out = {}
    for arm in arms:
        with intervened(layers, arm, saes.get(arm.layer)):
            out[arm.name] = engine.generate(prompts)
    return out


def grade(study: CausalStudy, generations: dict[str, list[Generation]], *, questions: list[Question], tokenizer,
          thinking: bool, seed: int) -> dict[str, Answers]:
    """Each arm's answers graded as the rollout stage grades them (qsae.rollout.make_rollout)."""
    question_of = {q.uuid: q for q in questions}
    answers = {}
    for name, outputs in generations.items():
        graded = [make_rollout(r.rollout_id, question_of[r.question_id], r.prompt, r.prompt_token_ids, generation=g,
                               tokenizer=tokenizer, thinking=thinking, engine="transformers", seed=seed)
                  for r, g in zip(study.heldout, outputs)]
        answers[name] = Answers(np.array([g.correct for g in graded], dtype=bool), [g.predicted_letter for g in graded],
                                np.array([g.n_response_tokens for g in graded]), [g.response_token_ids for g in graded],
                                np.array([g.outcome in SCORED for g in graded], dtype=bool))
    return answers


def assess(study: CausalStudy, answers: dict[str, Answers], *, unscored: str) -> dict:
    """causal.json: every arm compared with the baseline over the same held-out questions, McNemar p
    Holm-adjusted over all arms, and what the question count could detect."""
    if study.skipped:
        return {"definition": DEFINITION, "skipped": study.skipped, "layers": {}}
    base, heldout = answers[BASELINE], study.heldout
    layers = {}
    for layer, plan in study.plans.items():
        layers[str(layer)] = {"selected": plan.selected, "controls": plan.controls, "skipped": plan.skipped,
                              "note": plan.note,
                              "arms": [{**arm_json(arm), **arm_statistics(base, answers[arm.name], unscored=unscored)}
                                       for arm in plan.arms]}
    arms = [arm for entry in layers.values() for arm in entry["arms"]]
    for arm, adjusted in zip(arms, holm([arm["mcnemar_p"] for arm in arms])):
        arm["mcnemar_p_holm"] = adjusted
    return {
        "definition": DEFINITION,
        "skipped": None,
        "unscored": unscored,
        "detectable": detectable(base, len(arms)),
        "length_change_nominal_below": LENGTH_NOMINAL_BELOW,
        "baseline": {"accuracy": float(base.correct.mean()), "n_questions": len(heldout),
                     "correct": base.correct.astype(int).tolist(), "scored": base.scored.astype(int).tolist(),
                     "letters": list(base.letter),
                     "rollout_ids": [r.rollout_id for r in heldout],
                     "reproduces_original_responses": float(np.mean([a == r.response_token_ids
                                                                     for a, r in zip(base.responses, heldout)])),
                     "reproduces_original_letters": float(np.mean([a == r.predicted_letter
                                                                   for a, r in zip(base.letter, heldout)]))},
        "layers": layers,
    }


def arm_json(arm: Arm) -> dict:
    """An arm as causal.json lists it (without the direction's coordinates)."""
    return {key: value for key, value in asdict(arm).items() if key != "direction"}


DEFINITION = {
    "selection": "per layer, the top m live features by |AUROC - null centre| of their rollout-level max "
                 "activation for correctness over the training questions' labelled rollouts",
    "ablate": "feature: its contribution a_f(h) d_f subtracted from the layer output h at every position; "
              "dom: h - (h . u) u with u the unit difference-of-means direction",
    "steer": "s c d added at every position: d the unit decoder row (feature) or u (dom), c the feature's mean "
             "activation where it fires (dom: the chosen features' mean of it), s the multiple (both signs)",
    "random": "for each chosen feature a random live feature among the 5 nearest in log fire rate, steered at "
              "the chosen feature's strength (the same norm of the added vector)",
    "dom": "mean residual of correct minus wrong training rollouts at the layer",
    "accuracy_change": "arm accuracy - baseline accuracy on the same held-out questions; with unscored = "
                       "exclude only the questions both answered with a parsable letter in time count (as in the "
                       "statistics), with wrong an unscored answer is not correct; interval: Newcombe's 95% interval "
                       "for paired proportions (Wilson intervals combined with the pairs' correlation)",
    "mcnemar_p": "exact two-sided McNemar test of the paired correctness; mcnemar_p_holm: Holm-adjusted over "
                 "every arm of the check",
    "answers_changed": "share of questions whose parsed letter differs from the baseline's",
    "length_change": "mean over questions of the response length change in tokens; interval: Student's t, 95%",
    "detectable": "the smallest McNemar p any arm could reach with these questions (all correct answers turned "
                  "wrong, or all wrong ones right), and the smallest accuracy change that can reach p < 0.05, alone "
                  "and after Holm over the arms (null: too few answers to flip)",
    "train_p": "the chosen feature's rollout-level p on the training rollouts, and its Westfall-Young p over all "
               "features (selection makes the chosen ones the most extreme: only the latter allows for that)",
}
