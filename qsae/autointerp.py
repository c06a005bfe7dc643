"""Automated interpretability without an API key: a local model explains chosen features in words, and
the explanations are scored by how well they let the same model tell where a feature fires.

Per layer, the top `features` live features by rollout-level |AUROC - null centre| (the most frequent
live ones when the rollout-level AUROC is undefined) and `random_features` other live features drawn
at random (a calibration set that was not chosen for anything). For each:

- its activating examples are the analysis's windows (feature_data.Examples: top activations and the
  quantile-bin samples), one per (rollout, token); a seeded draw of up to `heldout_examples` of them
  (at most half) is held out for scoring and never shown; the explainer sees up to `examples` of the
  rest, strongest first, the tokens where the feature fires marked <<like this>>;
- its non-activating examples are windows of the same width around sampled tokens drawn at random
  (seeded) in which the feature fires at no token (its activation read from the layer's sample as the
  SAE encodes it; tokens outside the sample, such as prompt tokens, count as silent, as they do in the
  activating windows' marks), as many as there are held-out activating ones;
- the explainer writes a short explanation (greedy), which is scored by two methods after EleutherAI's
  delphi: detection (explanation + one example's text: does the feature fire in it?) and fuzzing
  (explanation + one activating example with tokens marked: are the marked tokens the ones where it
  fires? each held-out example once with its truly active tokens marked, once with as many other
  tokens marked at random). The answer is read from the next-token distribution: yes when
  P("1") > P("0"), no text parsed. Positives and negatives are equal in number, so the balanced
  accuracy, mean(TPR, TNR), is the accuracy over all of them; its interval is Wilson's over them.
- the null: each explanation scored in the same way on another chosen feature's examples (a seeded
  cyclic pairing over all the run's features, never a feature with itself). An explanation that says
  nothing specific scores near the null; the summary compares the mean score over features with the
  mean null score, each with Student's t interval, and their paired difference.

Prompt building, the split and the statistics are pure functions (tested on their own); the model's
part (explain_and_score) is a plain function of a loaded model that the Ray layer runs in a task.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from qsae.analysis.feature_data import Examples, SampleCodes, TokenTable, build_examples
from qsae.analysis.results import EXAMPLE_FIELDS, LayerAnalysis
from qsae.config import AutointerpConfig

ANSWERS = ("1", "0")  # yes, no: each must be one token of the explainer's tokenizer
METHODS = ("detection", "fuzzing")
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Window:
    """One example as text: its tokens' texts and the feature's activation at each (0 where it does
    not fire), and where it comes from."""

    pieces: tuple[str, ...]
    acts: tuple[float, ...]
    rollout: int
    position: int

    @property
    def active(self) -> list[bool]:
        return [a > 0 for a in self.acts]


@dataclass
class FeatureCase:
    """What a feature's explanation is written from and scored on."""

    layer: int
    feature: int
    chosen_by: str  # "auroc" | "fire_count" | "random"
    shown: list[Window]
    positives: list[Window]  # held out, activating
    negatives: list[Window]  # non-activating, as many as positives
    decoys: list[list[bool] | None] = field(default_factory=list)  # per positive: fuzzing's wrong marks (None: none possible)
    note: str | None = None


# ------------------------------------------------------------------------------------------------
# Choosing features and examples (pure)


def choose_features(distance: np.ndarray | None, fire_count: np.ndarray, *, top: int, random: int,
                    rng: np.random.Generator) -> tuple[list[int], list[int], str]:
    """(chosen, random, what chose them): the `top` live features farthest from the null by rollout-level
    AUROC (`distance`, None when undefined: then the most frequent), and `random` other live features
    drawn uniformly."""
    live = np.flatnonzero(fire_count > 0)
    if distance is None:
        key, by = -fire_count.astype(np.float64), "fire_count"
    else:
        key, by = -np.nan_to_num(np.abs(distance), nan=-1.0), "auroc"
    chosen = sorted(live.tolist(), key=lambda f: (key[f], f))[:top]
    rest = np.setdiff1d(live, chosen)
    drawn = rng.choice(rest, min(random, len(rest)), replace=False) if len(rest) else rest
    return chosen, sorted(int(f) for f in drawn), by


def split_heldout(activation: np.ndarray, *, shown: int, heldout: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(shown, held out) positions into a feature's activating examples: a uniform draw of up to
    `heldout` (at most half of them, so something is left to show) held out, and up to `shown` of the
    others, strongest first. The two never overlap."""
    n = len(activation)
    held = np.sort(rng.choice(n, min(heldout, n // 2), replace=False)) if n else np.empty(0, np.int64)
    rest = np.setdiff1d(np.arange(n), held)
    rest = rest[np.argsort(-activation[rest], kind="stable")]
    return rest[:shown], held


def decoy_marks(active: list[bool], rng: np.random.Generator) -> list[bool] | None:
    """Fuzzing's wrongly marked copy of an example: as many tokens as truly fire, drawn among those that
    do not (fewer if there are not enough); None when every token fires."""
    idle = [i for i, a in enumerate(active) if not a]
    if not idle:
        return None
    picked = set(rng.choice(idle, min(sum(active), len(idle)), replace=False).tolist())
    return [i in picked for i in range(len(active))]


SILENT_DRAWS = 20  # sampled tokens tried per non-activating example wanted (a dense feature leaves few)


def windows_of(ex: Examples, positions: np.ndarray, token_text) -> list[Window]:
    """Example windows as text (tokens outside the rollout's text dropped)."""
    out = []
    for e in np.asarray(positions, dtype=np.int64).tolist():
        keep = ex.token_ids[e] >= 0
        out.append(Window(tuple(token_text(t) for t in ex.token_ids[e][keep].tolist()),
                          tuple(ex.acts[e][keep].astype(np.float64).tolist()), int(ex.rollout_id[e]),
                          int(ex.position[e])))
    return out


def distinct(positions: np.ndarray, rollout: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The first of the examples at each (rollout, token): a top example may also be a quantile sample."""
    if len(positions) == 0:
        return positions
    _, first = np.unique(np.stack([rollout[positions], position[positions]], axis=1), axis=0, return_index=True)
    return positions[np.sort(first)]


SilentWindows = Callable[[int, int, np.random.Generator], Examples]  # (feature, how many, rng) -> windows


def silent_windows(codes: SampleCodes, tokens: TokenTable, width: int) -> SilentWindows:
    """Non-activating windows of a feature: around sampled tokens drawn at random, those in whose window
    the feature fires at no sampled token (up to SILENT_DRAWS draws per window wanted)."""
    def draw(feature: int, n: int, rng: np.random.Generator) -> Examples:
        rows = rng.permutation(len(codes.values))[:n * SILENT_DRAWS]
        ex = build_examples(np.full(len(rows), feature), rows, np.zeros(len(rows), np.int64), codes=codes,
                            tokens=tokens, width=width)
        keep = np.flatnonzero(~(ex.acts > 0).any(axis=1))[:n]
        return Examples(*(getattr(ex, name)[keep] for name in EXAMPLE_FIELDS))
    return draw


def layer_cases(analysis: LayerAnalysis, cfg: AutointerpConfig, token_text, silent: SilentWindows) -> list[FeatureCase]:
    """The chosen and random features of one layer with their shown, held-out and non-activating examples."""
    data, layer = analysis.features, analysis.layer
    ex = data.examples
    band = analysis.rollout_auroc_and_band
    rng = np.random.default_rng([cfg.seed, layer])
    chosen, drawn, by = choose_features(None if band is None else band[0], data.fire_count, top=cfg.features,
                                        random=cfg.random_features, rng=rng)
    cases = []
    for feature, chosen_by in [(f, by) for f in chosen] + [(f, "random") for f in drawn]:
        mine = distinct(data.by_feature[feature], ex.rollout_id, ex.position)
        shown, held = split_heldout(ex.acts[mine, (ex.acts.shape[1] - 1) // 2], shown=cfg.examples,
                                    heldout=cfg.heldout_examples, rng=rng)
        quiet = silent(feature, len(held), rng)
        n = min(len(held), len(quiet.feature))
        note = None if n else ("too few activating examples to hold any out" if len(held) == 0 else
                               "no sampled window where the feature is silent")
        case = FeatureCase(layer, feature, chosen_by, windows_of(ex, mine[shown], token_text),
                           windows_of(ex, mine[held[:n]], token_text), windows_of(quiet, np.arange(n), token_text),
                           note=note)
        case.decoys = [decoy_marks(w.active, rng) for w in case.positives]
        cases.append(case)
    return cases


def null_partners(n: int, seed: int) -> list[int]:
    """Each case's partner for the null: a cyclic shift by a seeded offset in 1..n-1, so never itself
    (none when there is one case)."""
    if n < 2:
        return [None] * n
    offset = int(np.random.default_rng(seed).integers(1, n))
    return [(i + offset) % n for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Prompts (pure)


def highlight(pieces, marks) -> str:
    """The text of the tokens, each run of marked tokens inside << >>."""
    out, inside = [], False
    for piece, marked in zip(pieces, marks):
        if marked and not inside:
            out.append("<<")
        if not marked and inside:
            out.append(">>")
        inside = marked
        out.append(piece)
    return "".join(out) + (">>" if inside else "")


def plain(window: Window) -> str:
    return "".join(window.pieces)


def explain_prompt(shown: list[Window]) -> str:
    """Asks for one short phrase for what the marked tokens of the shown examples share."""
    lines = [f"Passage {i + 1}: {highlight(w.pieces, w.active)}" for i, w in enumerate(shown)]
    return ("I study a hidden unit of a language model. In each passage below, the tokens where the unit is "
            "active are wrapped in << and >>.\n\n" + "\n".join(lines) +
            "\n\nIn a few words, say what the wrapped tokens have in common (a pattern, a topic or a role in "
            "the text). Reply with that description only.")


def detection_prompt(explanation: str, window: Window) -> str:
    return (f'A hidden unit of a language model is described as: "{explanation}".\n\n'
            f"Passage: {plain(window)}\n\n"
            "Does the unit become active anywhere in this passage? Reply 1 for yes or 0 for no.")


def fuzzing_prompt(explanation: str, window: Window, marks: list[bool]) -> str:
    return (f'A hidden unit of a language model is described as: "{explanation}".\n\n'
            f"Passage, with some tokens wrapped in << and >>: {highlight(window.pieces, marks)}\n\n"
            "Are the wrapped tokens exactly the ones where the unit is active? Reply 1 for yes or 0 for no.")


def scoring_items(explanation: str, case: FeatureCase) -> dict[str, list[tuple[str, bool]]]:
    """(prompt, truth) per method for an explanation on a case's held-out examples: detection on its
    positives and negatives; fuzzing on each positive marked truly and, where possible, wrongly."""
    detection = [(detection_prompt(explanation, w), True) for w in case.positives] + \
                [(detection_prompt(explanation, w), False) for w in case.negatives]
    fuzzing = []
    for w, decoy in zip(case.positives, case.decoys):
        if decoy is not None:  # a pair or nothing: positives and negatives stay equal in number
            fuzzing += [(fuzzing_prompt(explanation, w, w.active), True), (fuzzing_prompt(explanation, w, decoy), False)]
    return {"detection": detection, "fuzzing": fuzzing}


# ------------------------------------------------------------------------------------------------
# Statistics (pure)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion k / n."""
    p, scale = k / n, z * z / n
    centre = (p + scale / 2) / (1 + scale)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + scale)
    return max(0.0, centre - half), min(1.0, centre + half)


def assess(truth, predicted) -> dict:
    """One score from per-example truths and 1/0 predictions (as many positives as negatives): balanced
    accuracy = (TPR + TNR) / 2, which with equal classes is the accuracy over all examples, and Wilson's
    95% interval of that accuracy (examples taken as independent)."""
    truth, predicted = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives != negatives:
        raise ValueError(f"a score needs as many positives as negatives, got {positives} and {negatives}")
    if positives == 0:
        return {"balanced_accuracy": None, "ci": None, "tpr": None, "tnr": None, "n_positive": 0, "n_negative": 0,
                "one_answer": None}
    tpr, tnr = float(predicted[truth].mean()), float((~predicted[~truth]).mean())
    correct = int((predicted == truth).sum())
    return {"balanced_accuracy": (tpr + tnr) / 2, "ci": list(wilson(correct, len(truth))), "tpr": tpr, "tnr": tnr,
            "n_positive": positives, "n_negative": negatives,
            "one_answer": bool(predicted.all() or not predicted.any())}  # 0.5 whatever the explanation says


def t_interval(values: list[float]) -> list[float] | None:
    """Student's t 95% interval of a mean; None below 2 values."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    a = np.asarray(values, dtype=np.float64)
    half = float(t.ppf(0.975, len(a) - 1)) * float(a.std(ddof=1)) / math.sqrt(len(a))
    return [float(a.mean() - half), float(a.mean() + half)]


def summarize(scores: list[float | None], null: list[float | None]) -> dict:
    """Mean score over the features scored both ways, against the mean null score, each with its t
    interval, and their paired difference."""
    pairs = [(s, z) for s, z in zip(scores, null) if s is not None and z is not None]
    mine, nulls = [s for s, _ in pairs], [z for _, z in pairs]
    diff = [s - z for s, z in pairs]
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"mean": mean(mine), "ci": t_interval(mine), "null_mean": mean(nulls), "null_ci": t_interval(nulls),
            "difference": mean(diff), "difference_ci": t_interval(diff), "n_features": len(pairs)}


# ------------------------------------------------------------------------------------------------
# The model's part


@dataclass(frozen=True)
class ScoreSettings:
    """What the explainer's task takes from the config."""

    max_new_tokens: int
    batch_size: int


def answer_ids(tokenizer) -> list[int]:
    """The token ids of "1" and "0"; each must be one token, as the answer is read from one step."""
    ids = [tokenizer.encode(a, add_special_tokens=False) for a in ANSWERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f'the explainer\'s tokenizer does not spell "1" and "0" as one token each ({ids}); '
                         "autointerp reads its answers from one next-token step")
    return [i[0] for i in ids]


def as_chat(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text as one user turn of the explainer's chat template (reasoning off), or as it is where the
    tokenizer has none (a base model)."""
    from qsae.questions import chat_prompt
    from qsae.rollout import tokenize_prompts

    if getattr(tokenizer, "chat_template", None):
        texts = [chat_prompt(tokenizer, t, thinking=False) for t in texts]
    return tokenize_prompts(tokenizer, texts)


def explain(model, tokenizer, cases: list[FeatureCase], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Each case's explanation, greedily: the first line of the reply."""
    from qsae.engines.hf_engine import HFEngine

    engine = HFEngine(model, tokenizer, max_new_tokens, batch_size)
    replies = engine.generate(as_chat(tokenizer, [explain_prompt(c.shown) for c in cases]))
    texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in replies]
    return [(t.splitlines() or [""])[0].strip() for t in texts]


@torch.no_grad()
def answer_margins(model, tokenizer, prompts: list[str], *, batch_size: int) -> list[float]:
    """For each prompt, log P("1") - log P("0") of the next token (one generation step, left padded in
    batches as the rollout engine pads; one softmax, so the logits' difference)."""
    yes, no = answer_ids(tokenizer)
    ids, device, pad = as_chat(tokenizer, prompts), model.device, tokenizer.pad_token_id
    out = []
    for first in range(0, len(ids), batch_size):
        batch = ids[first:first + batch_size]
        width = max(len(i) for i in batch)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in batch], device=device)
        step = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
        logits = step.logits[0].float()
        out += (logits[:, yes] - logits[:, no]).tolist()
    return out


def answers_yes(model, tokenizer, prompts: list[str], *, batch_size: int) -> list[bool]:
    """Whether the explainer's next token is likelier "1" than "0", per prompt."""
    return [m > 0 for m in answer_margins(model, tokenizer, prompts, batch_size=batch_size)]


def explain_and_score(model, tokenizer, jobs: list[tuple[FeatureCase, FeatureCase | None]], *, max_new_tokens: int,
                      batch_size: int) -> list[dict]:
    """Each job (a case, and its null partner) explained, then scored on its own examples and on its
    partner's: per job {"explanation", and per method and null_<method> {"truth", "predicted"}}."""
    explanations = explain(model, tokenizer, [case for case, _ in jobs], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    items = []  # (job, key, prompt, truth)
    for j, ((case, partner), text) in enumerate(zip(jobs, explanations)):
        for prefix, target in (("", case), ("null_", partner)):
            if target is None:
                continue
            for method, pairs in scoring_items(text, target).items():
                items += [(j, prefix + method, prompt, truth) for prompt, truth in pairs]
    predicted = answers_yes(model, tokenizer, [prompt for _, _, prompt, _ in items], batch_size=batch_size)
    results = [{"explanation": text} for text in explanations]
    for (j, key, _, truth), guess in zip(items, predicted):
        entry = results[j].setdefault(key, {"truth": [], "predicted": []})
        entry["truth"].append(bool(truth))
        entry["predicted"].append(bool(guess))
    return results


# ------------------------------------------------------------------------------------------------
# The stage's plan and its result file


def plan_cases(run, layers: list[int], cfg: AutointerpConfig, token_text) -> list[FeatureCase]:
    """Every layer's cases, from its analysis in the run directory and its sample encoded again by its
    SAE (the non-activating windows' activations; one layer's codes in memory at a time)."""
    from qsae.analysis.layer import encode_sample
    from qsae.rollout import read_rollouts
    from qsae.sample import load_selection
    from qsae.streaming import StoreSource
    from qsae.training.trained import load_trained

    selection = load_selection(run.selection)
    tokens = TokenTable({r.rollout_id: r.prompt_token_ids + r.response_token_ids for r in read_rollouts(run.rollouts)})
    cases = []
    for layer in layers:
        analysis = LayerAnalysis.load(run.layer_analysis(layer))
        sample = encode_sample(load_trained(run, layer).sae, StoreSource(run.store, layer, selection.rows), selection)
        codes = SampleCodes(sample.values, sample.indices, selection.rollout_id, sample.position)
        width = (analysis.features.examples.token_ids.shape[1] - 1) // 2
        cases += layer_cases(analysis, cfg, token_text, silent_windows(codes, tokens, width))
    return cases


def explainer_name(explainer: str, model_name: str) -> str:
    """The explainer as autointerp.json names it: the subject model's name, or the checkpoint's."""
    return explainer or model_name


def check_explainer(cfg: AutointerpConfig, model_path: str, revision: str | None) -> None:
    """Before Ray starts: the explainer's checkpoint is there with weights, and its tokenizer spells the
    answers as one token each."""
    from qsae.models import check_weights, load_tokenizer, resolve_model_path

    if not cfg.enabled:
        return
    try:
        if cfg.explainer:
            model_path, revision = resolve_model_path(cfg.explainer), None
            check_weights(model_path)
        answer_ids(load_tokenizer(model_path, revision))
    except ValueError as err:  # which model: the explainer may be the subject model or another one
        raise ValueError(f"autointerp.explainer = {cfg.explainer!r}: {err}") from None


def plan_jobs(cases: list[FeatureCase], seed: int) -> list[tuple[FeatureCase, FeatureCase | None]]:
    """Each case with its null partner among the cases that have held-out examples."""
    scored = [c for c in cases if c.positives]
    partner_of = dict(zip(map(id, scored), null_partners(len(scored), seed)))
    return [(c, scored[partner_of[id(c)]] if partner_of.get(id(c)) is not None else None) for c in cases]


def report(jobs: list[tuple[FeatureCase, FeatureCase | None]], results: list[dict], *, explainer: str,
           subject: bool = True) -> dict:
    """autointerp.json: per layer and feature its explanation and scores, and the summaries."""
    layers: dict[str, dict] = {}
    collected = {m: ([], []) for m in METHODS}
    for (case, partner), result in zip(jobs, results):
        scores = {}
        for key in [*METHODS, *(f"null_{m}" for m in METHODS)]:
            entry = result.get(key, {"truth": [], "predicted": []})
            scores[key] = assess(entry["truth"], entry["predicted"])
        for m in METHODS:
            collected[m][0].append(scores[m]["balanced_accuracy"])
            collected[m][1].append(scores[f"null_{m}"]["balanced_accuracy"])
        layer = layers.setdefault(str(case.layer), {"features": {}})
        layer["features"][str(case.feature)] = {
            "chosen_by": case.chosen_by, "explanation": result["explanation"], **scores,
            "n_shown": len(case.shown), "n_heldout": len(case.positives),
            "null_examples_of": None if partner is None else {"layer": partner.layer, "feature": partner.feature},
            "note": case.note}
    for name, layer in layers.items():
        features = layer["features"].values()
        layer["summary"] = {m: summarize([f[m]["balanced_accuracy"] for f in features],
                                         [f[f"null_{m}"]["balanced_accuracy"] for f in features]) for m in METHODS}
    everyone = [f for layer in layers.values() for f in layer["features"].values()]
    summary = {m: {**summarize(*collected[m]), "n_one_answer": sum(bool(f[m]["one_answer"]) for f in everyone)}
               for m in METHODS}
    return {"definition": DEFINITION, "explainer": explainer, "explainer_is_subject_model": subject, "layers": layers,
            "summary": summary}


DEFINITION = {
    "selection": "per layer, the top live features by rollout-level |AUROC - null centre| (chosen_by auroc; the "
                 "most frequent when that AUROC is undefined: fire_count), and live features drawn at random "
                 "(chosen_by random) for calibration",
    "examples": "activating: the analysis's top-activation and quantile-bin windows, a seeded draw held out for "
                "scoring (never shown to the explainer), up to `examples` of the rest shown strongest first; "
                "non-activating: windows around randomly drawn sampled tokens in which the feature fires at no "
                "sampled token, as many as the held-out activating ones",
    "detection": "explanation + one example's text: does the feature fire in it? balanced accuracy over the held-"
                 "out activating and as many non-activating examples",
    "fuzzing": "explanation + one held-out activating example with tokens marked: are they where it fires? each "
               "example once with its firing tokens marked (yes), once with as many others marked at random (no)",
    "answer": 'the explainer\'s next token: yes when P("1") > P("0"); no text is parsed',
    "balanced_accuracy": "(true positive rate + true negative rate) / 2; with equal classes the accuracy, whose "
                         "95% interval is Wilson's over the examples (taken as independent)",
    "one_answer": "the explainer gave the same answer to every example of the score: its balanced accuracy is 0.5 "
                  "whatever the explanation says (n_one_answer: how many features' scores were so)",
    "null": "the same explanation scored on another chosen feature's examples (a seeded cyclic pairing over all "
            "features, never itself): what an explanation scores without describing the feature",
    "summary": "mean over features of the score and of the null score, each with Student's t 95% interval, "
               "and their paired difference (score - null) with its t interval",
}
