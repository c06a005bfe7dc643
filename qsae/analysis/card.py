"""The release's model card (README.md): YAML front matter, then Markdown built only from `info`.

Every number in the card comes from `info` (ReleaseFacts, gathered by qsae.release), except the definition constants
imported from the analysis modules. Every statistic is printed with what it is and how sure it is:
an interval, a null beside it, or the reason it could not be computed. The sentences that interpret
the numbers are computed from them. Formats: fractions to 3 decimals, CE and KL to 4, counts with
thousands separators, fire rates as percentages.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import PurePosixPath

from qsae.analysis.facts import ReleaseFacts
from qsae.analysis.features import CHANCE_AUROC, DENSITY_THRESHOLDS, HEALTHY_RANGE
from qsae.analysis.fidelity import DEFAULT_ALPHA, NOMINAL_BELOW_CLUSTERS

LAYER_KEYS = (
    "variance_explained", "ve_ci", "l0", "heldout_questions", "dead", "healthy", "dense", "rare", "revived",
    "share_above_1pct", "share_above_10pct", "dead_over_tokens", "max_decoder_cosine", "token_level",
    "rollout_level",
)
TAGS = ("sparse-autoencoder", "topk-sae", "interpretability", "residual-stream")
ARCHITECTURE_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka-batchtopk": "Matryoshka BatchTopK"}
RECIPE_LABELS = {
    "recipe": "recipe (original | modern)",
    "optimizer": "optimizer",
    "lr": "learning rate",
    "lr_decay_fraction": "learning rate falls linearly to 0 over the last (share of steps)",
    "encoder_matmul": "encoder matmul precision",
    "batch_size": "batch size (tokens)",
    "epochs": "epochs",
    "revive_every_epochs": "dead-feature revival every (epochs)",
    "dead_after_steps": "dead after (steps without firing)",
    "matryoshka_prefixes": "Matryoshka prefixes (nested widths, each trained to reconstruct)",
}
NA = "n/a"
COVERAGE = f"{1 - DEFAULT_ALPHA:.0%}"


def _check(info: ReleaseFacts) -> dict[str, dict]:
    """Validate info; return per_layer keyed by str(layer) (JSON turns int keys into strings)."""
    if info.architecture not in ARCHITECTURE_NAMES:
        raise ValueError(f"model card info names an unknown architecture {info.architecture!r}")
    per_layer = {str(layer): stats for layer, stats in info.per_layer.items()}
    for layer in info.layers:
        if str(layer) not in per_layer:
            raise ValueError(f"model card info has no per_layer entry for layer {layer}")
        lacking = [key for key in LAYER_KEYS if key not in per_layer[str(layer)]]
        if lacking:
            raise ValueError(f"per_layer[{layer!r}] is missing keys: {lacking}")
    return per_layer


def _num(value, spec: str = ".3f") -> str:
    return NA if value is None else format(value, spec)


def _ci(interval, spec: str = ".3f") -> str:
    return "not computable" if interval is None else f"[{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # A "|" inside a cell would end it early.
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _front_matter(info: ReleaseFacts) -> str:
    # JSON strings are valid YAML scalars, so ids with ':' or '/' need no further escaping.
    return "\n".join([
        "---",
        "library_name: qsae",
        "license: apache-2.0",
        f"base_model: {json.dumps(info.model_id)}",
        f"tags: [{', '.join(tag.replace('topk', info.architecture) for tag in TAGS)}]",
        f"datasets: [{json.dumps(info.questions['source'])}]",
        "---",
    ])


def _weights_name(info: ReleaseFacts, layer: int, suffix: str) -> str:
    return f"sae_L{layer}_n{info.n_features}_k{info.k}.{suffix}"


def _batchtopk(info: ReleaseFacts) -> bool:
    """Whether it encodes with BatchTopK's threshold (a Matryoshka BatchTopK SAE does too)."""
    return info.architecture in ("batchtopk", "matryoshka-batchtopk")


def _prefixes(info: ReleaseFacts) -> list[int] | None:
    """A Matryoshka SAE's prefix widths, as the recipe records them."""
    return info.recipe.get("matryoshka_prefixes") if info.architecture == "matryoshka-batchtopk" else None


def _architecture(info: ReleaseFacts, per_layer: dict[str, dict]) -> str:
    expansion = info.n_features / info.d_model
    size = f"{info.n_features:,} features ({expansion:.2f}× d_model {info.d_model:,})"
    if not _batchtopk(info):
        return f"TopK SAE, {size}, k = {info.k} active per token"
    thresholds = " / ".join(f"L{layer} {_num(per_layer[str(layer)].get('threshold'), '.4f')}" for layer in info.layers)
    nested = (f"; trained so that each of its nested prefixes (the first {', '.join(map(str, prefixes))} features) "
              "reconstructs on its own" if (prefixes := _prefixes(info)) else "")
    return (f"{ARCHITECTURE_NAMES[info.architecture]} SAE, {size}, k = {info.k} active per token on average in "
            f"training (the top k × batch of each batch){nested}; at inference every feature above the learned "
            f"threshold θ ({thresholds})")


def _fidelity(info: ReleaseFacts, layer) -> dict | None:
    return None if info.fidelity is None else info.fidelity.get(str(layer))


def _summary(info: ReleaseFacts, per_layer: dict[str, dict]) -> str:
    o, tokens = info.outcomes, info.tokens
    layers = ", ".join(f"L{layer}" for layer in info.layers)
    ve = " / ".join(f"L{layer} {per_layer[str(layer)]['variance_explained']:.3f} "
                    f"{_ci(per_layer[str(layer)]['ve_ci'])}" for layer in info.layers)
    delta = " / ".join(f"L{layer} {_num((_fidelity(info, layer) or {}).get('delta_ce'), '.4f')} "
                       f"{_ci((_fidelity(info, layer) or {}).get('delta_ce_ci'), '.4f')}" for layer in info.layers)
    return _table(["property", "value"], [
        ["base model", f"`{info.model_id}` (revision `{info.model_revision}`)"],
        ["layers", layers],
        ["hook", info.hook],
        ["architecture", _architecture(info, per_layer)],
        ["training tokens", f"{tokens['per_layer_train']:,} response tokens per layer "
                            f"({tokens['per_layer_heldout']:,} held out, from {info.split['heldout_rollouts']:,} "
                            "held-out rollouts)"],
        [f"variance explained (held-out, {COVERAGE} CI)", ve],
        [f"ΔCE with the SAE spliced in (nats/token, {COVERAGE} CI)", delta],
        ["rollouts", f"{o['n']:,}: {o['correct']:,} correct, {o['wrong']:,} wrong, {o['truncated']:,} truncated, "
                     f"{o['no_answer']:,} without an answer"],
        ["rollout engine", info.engine],
        ["qsae version", info.qsae_version],
    ])


def _subfolders(files: list[str], top: str) -> list[str]:
    """Folders under `top` that hold release files, e.g. "sparsify/layers.11"."""
    return sorted({str(PurePosixPath(f).parent) for f in files if len(PurePosixPath(f).parts) > 2
                   and PurePosixPath(f).parts[0] == top})


def _usage(info: ReleaseFacts) -> str:
    layer = info.layers[0]
    parts = [
        "```python",
        "from qsae.sae_files import load_sae",
        "",
        f'sae = load_sae("{_weights_name(info, layer, "pt")}")  # or the .safetensors file',
        "values, indices = sae.encode_topk(residuals)  # residuals: [tokens, d_model] float32",
        "x_hat = sae.decode_topk(values, indices)",
        "```",
    ]
    if _batchtopk(info):
        extra = ("a fifth and a sixth tensor, `threshold` and `prefixes` (the nested widths, used in training only), "
                 "and load as a `MatryoshkaBatchTopKSAE`, which encodes as a BatchTopK SAE"
                 if _prefixes(info) is not None else "a fifth tensor, `threshold`, and load as a `BatchTopKSAE`")
        parts += ["", f"The files hold {extra}: `sae.encode(residuals)` "
                  "gives the dense codes, every feature whose pre-activation exceeds the threshold; `encode_topk` the "
                  f"same codes as the top min(n, 4k) = {min(info.n_features, 4 * info.k)} (value, index) pairs per "
                  "token, zero-padded, cut short on a token with more active features than that (dense `encode` "
                  "and `sae(residuals)` never are). SAELens loads it as a JumpReLU SAE with that threshold for "
                  "every feature" + (" (the widths in its metadata's `matryoshka_widths`)" if _prefixes(info) else "")
                  + "; EleutherAI sparsify has no thresholded architecture, so there is no sparsify copy."]
    saelens, sparsify = _subfolders(info.files, "saelens"), _subfolders(info.files, "sparsify")
    if saelens or sparsify:
        intro = ("The same weights load in " + " and ".join(["SAELens"] * bool(saelens) + ["EleutherAI sparsify"] * bool(sparsify))
                 + ", one folder per layer:")
        parts += ["", intro, "", "```python"]
        if saelens:
            parts += ["from sae_lens import SAE", f'sae = SAE.load_from_disk("{saelens[0]}")']
        if sparsify:
            parts += ["from sparsify import Sae", f'sae = Sae.load_from_disk("{sparsify[0]}")']
        parts.append("```")
    return "\n".join(parts)


def _hook(info: ReleaseFacts) -> str:
    return (
        f"Hook point: **{info.hook}**.\n\nActivations were captured with one teacher-forced forward pass "
        "over prompt + response per rollout, and only response-token rows were kept: encode residuals "
        "taken at the same point, from the same model revision, on response text."
    )


def _rollouts_per_question(q: dict, n_rollouts: int) -> str:
    """How the rollouts were drawn: one greedy each, or several seeded samples per question."""
    drawn = f"from `{q['source']}` (sampling seed {q['seed']})"
    samples = q.get("samples_per_question", 1)
    if not q.get("temperature"):
        return f"{n_rollouts:,} {drawn}, one greedy rollout each"
    limits = ((f", top_p {q['top_p']:g}" if q.get("top_p", 1) != 1 else "")
              + (f", top_k {q['top_k']}" if q.get("top_k", 0) else ""))
    return (f"{q.get('n_questions', n_rollouts // samples):,} {drawn}, {samples} rollouts each ({n_rollouts:,} in all) "
            f"sampled at temperature {q['temperature']:g}{limits}, seeded per rollout from {q['sampling_seed']}")


def _data(info: ReleaseFacts) -> str:
    q, o, rows, split = info.questions, info.outcomes, info.rows, info.split
    unscored = o["truncated"] + o["no_answer"]
    use = ("left out of every correctness statistic" if o["unscored_rollouts"] == "exclude"
           else "counted as wrong in every correctness statistic")
    thinking = ("on: only the text after the closing `</think>` is parsed, and a rollout whose thought never "
                "closed has no answer" if q["thinking"] else "off: the whole response is parsed")
    high = ", ".join(f"L{layer} {rows['high_norm'][str(layer)]:,} above {_num(rows['norm_threshold'][str(layer)], '.1f')} "
                     f"(median {rows['median_norm'][str(layer)]:.1f})" for layer in info.layers)
    norm_rule = (f"{rows['high_norm_any_layer']:,} tokens whose residual norm exceeds {rows['max_norm_multiple']:g}× the "
                 f"layer's median at some captured layer ({high}): left out"
                 if rows["max_norm_multiple"] else "no norm limit (max_norm_multiple = 0)")
    special = (f"{rows['special']:,} special or chat-template tokens (the tokenizer's added tokens, e.g. `</think>`): "
               + ("left out" if rows["special_excluded"] else "kept"))
    cap = (f"a seeded sample of {rows['max_tokens_per_layer']:,}" if rows["max_tokens_per_layer"] else "all")
    return "\n".join([
        f"- Questions: {_rollouts_per_question(q, o['n'])} with `{info.engine}`, at most {q['max_new_tokens']:,} "
        f"new tokens, thinking {thinking}.",
        f"- Outcomes: {o['correct']:,} correct, {o['wrong']:,} wrong, {o['truncated']:,} truncated (hit the token "
        f"limit), {o['no_answer']:,} without a parsable answer letter. The {unscored:,} truncated or unanswered "
        f"rollouts are neither right nor wrong: they are {use}.",
        f"- Rows: {rows['stored']:,} response tokens stored per layer ({rows['stored_positions']})"
        + (f"; {rows['beyond_float16']:,} more were left out at capture, their residual beyond float16's range "
           "(massive activations)" if rows.get("beyond_float16") else "") + ".",
        f"  - {special}.",
        f"  - {norm_rule}.",
        f"  - {rows['excluded']:,} tokens left out in all, the same at every layer; of the rest, {cap} were used: "
        f"{rows['train']:,} for training, {rows['heldout']:,} held out.",
        f"- Split: by question, seeded ({split['seed']}): {split['holdout_fraction']:.0%} of the questions, "
        f"{split['heldout_rollouts']:,} rollouts, are held out with all their stored tokens (`split.json` lists them). "
        "No held-out token has a neighbour from its own rollout in training.",
        f"- {_pooled_over(info)}",
    ])


def _every_token(info: ReleaseFacts) -> bool:
    levels = [stats["rollout_level"] for stats in info.per_layer.values()]
    return all(level.get("pooled_over") == "every response token" for level in levels)


def _pooled_over(info: ReleaseFacts) -> str:
    """Where the rollout pools and the feature data come from: every token, or the stored sample."""
    if _every_token(info):
        return ("Rollout pools and feature data (top contexts, quantile samples, histograms): over every response "
                "token of every rollout that the row rules keep, the model run again over each rollout (the encode "
                "pass), not only the stored rows.")
    return ("Rollout pools and feature data (top contexts, quantile samples, histograms): over the stored sample of "
            "tokens above, the rows used (the encode pass was off, `release.every_token = false`), so a rollout's "
            "max is over its sampled tokens only.")


# The Definitions section, one bullet per quantity the card reports.


_VARIANCE_EXPLAINED = (
    "- **Variance explained** (held-out tokens, pooled over tokens and dimensions, accumulated in float64): "
    "`1 − Σᵢ ‖xᵢ − x̂ᵢ‖² / Σᵢ ‖xᵢ − x̄‖²`, x̄ the mean held-out row."
)


def _intervals_definition(stats: dict) -> str:
    """How every interval resamples, and how close to nominal its coverage is."""
    return (
        f"- **Intervals** ({COVERAGE}, {stats['bootstrap']:,} bootstrap replicates) resample whole questions or "
        "rollouts, never single tokens (tokens of one rollout are not independent); each says its unit. Variance "
        "explained: a studentized bootstrap (bootstrap-t) over held-out questions, each replicate's standard error "
        "the jackknife over its questions; with fewer than "
        f"{NOMINAL_BELOW_CLUSTERS} held-out questions it is nominal (in the test suite's coverage simulation it covers "
        "about 92% at 10 questions and 93.5% at 100). ΔCE, CE loss recovered and KL: the same over the held-out "
        "questions scored (92% at 10, 95% at 100 in the simulation). Length and probe AUROC: AUROC ± Student's t "
        "(G − 1 degrees of freedom) times its jackknife standard error over the G labelled questions, each left out "
        "with all its rollouts (95% at 33 and at 100 questions in the simulation); the probe's out-of-fold "
        "predictions are held fixed, so its interval leaves out the refit's variance and is nominal (its p comes "
        "from refitting it on permuted labels). Causal check: Newcombe's interval for paired proportions and "
        "Student's t (see there). With fewer than two questions (three for an AUROC) no interval is computable."
    )


def _l0_definition(info: ReleaseFacts) -> str:
    """What L0 counts: at most k, or every feature above BatchTopK's threshold."""
    return (
        "- **L0**: mean number of features with a positive activation per held-out token "
        + ("(above the threshold; counted in the sparse view of at most min(n, 4k) per token)." if _batchtopk(info)
           else "(at most k).")
    )


def _fire_rate_definition(info: ReleaseFacts) -> str:
    """Fire rate and the health bands built on it."""
    low, high = HEALTHY_RANGE
    return (
        "- **Fire rate** of a feature: the share of sampled tokens (the rows of `activations.safetensors`) on which "
        + ("it is active (above the threshold, in the sparse view)" if _batchtopk(info)
           else "it is among the top k with a positive activation")
        + f". **Dead**: never fires over those tokens; rare: below "
        f"{low:.1%}; **healthy**: in [{low:.1%}, {high:.0%}] (the original release's band); dense: above {high:.0%}. "
        f"Density shares: features firing on more than {DENSITY_THRESHOLDS[0]:.0%} and {DENSITY_THRESHOLDS[1]:.0%} "
        "of tokens."
    )


_MAX_DECODER_COSINE = (
    "- **Max decoder cosine**: the largest cosine similarity between the decoder rows of two different features."
)


_TOKEN_AUROC = (
    "- **Token-level AUROC** (as the original release reported it): a feature's activation on each labelled "
    "token (0 where it does not fire) as a score for its rollout's label; P(a correct-rollout token outscores a "
    "wrong-rollout one), ties one half. Tokens of a rollout share its label, so it has no valid null here and "
    "is shown for comparison only."
)


def _rollout_auroc_definition(info: ReleaseFacts) -> str:
    """The rollout-level test: pooling, null centre, p, q, Westfall-Young p, chance band."""
    stats = info.statistics
    return (
        "- **Rollout-level AUROC**: each feature's activation pooled per rollout (the max over its "
        + ("response tokens" if _every_token(info) else "sampled response tokens")
        + "; the mean and the firing fraction, with their own p and q, are in `feature_stats.json`), as a score "
        "for the rollout's label. **Null centre** c: the AUROC a feature has on average when the labels are "
        "permuted within questions (each question keeps its count of correct rollouts, so difficulty stays out "
        "of the null) when a question has several rollouts, else across rollouts (then c = 0.5). Every rollout "
        "statistic below measures |AUROC − c|. **p**: two-sided, from the normal approximation with the "
        "permutation null's exact mean and variance (a stratified Mann–Whitney test with ties), so it is "
        "continuous; the permutation p `(1 + #{|AUROC* − c| ≥ |AUROC − c|}) / (1 + P)` over "
        f"P = {stats['permutations']:,} permutations is released beside it (`rollout_p_permutation`). **q**: "
        "Benjamini–Hochberg adjusted p over the layer's features (from the continuous p, so not floored at "
        "1 / (1 + P)). **Westfall–Young p**: the permutation count against each permutation's largest "
        "|AUROC* − c| over all features (family-wise). **Chance band**: the 95th percentile of that largest "
        "distance: how far from its centre the best feature gets by chance alone. The headline feature is the one "
        "farthest from its centre in either direction (`correct↑` above, `wrong↑` below). **Length-adjusted**: the "
        "same test with response-length deciles as the strata, so a feature that only tracks length sits at its "
        "centre there (length within a decile is not controlled)."
    )


def _baselines_definition(stats: dict) -> str:
    """Response length and the mean-residual probe, with the probe's refitted null."""
    return (
        "- **Baselines**: the AUROC of response length alone, and of a logistic-regression probe (standardised "
        "features, L2) on each rollout's mean residual, scored out of fold with questions as groups; the probe's p "
        f"counts how often the probe refitted on permuted labels ({stats.get('probe_permutations', 0):,} "
        "permutations, within questions where they share them) reaches its AUROC. Out-of-fold AUROC sits below 0.5 "
        "on noise, so the null's mean is shown beside it."
    )


_LOSS_FIDELITY = (
    "- **Fidelity in the model's loss** (`fidelity.json`): on held-out rollouts, the next-token cross-entropy "
    "(nats per token) at every response position but the last, with the layer's output left as is (clean), "
    "replaced by the SAE's reconstruction (spliced), by zeros, or by the training rows' mean, at every response "
    "position whose token passes the masks above. `ΔCE = CE_spliced − CE_clean`; `CE loss recovered = "
    "(CE_zero − CE_spliced) / (CE_zero − CE_clean)`; KL = mean over those tokens of KL(p_clean ‖ p_spliced). "
    "Intervals: over held-out questions (see Intervals)."
)


def _definitions(info: ReleaseFacts) -> str:
    return "\n".join([
        _VARIANCE_EXPLAINED,
        _intervals_definition(info.statistics),
        _l0_definition(info),
        _fire_rate_definition(info),
        _MAX_DECODER_COSINE,
        _TOKEN_AUROC,
        _rollout_auroc_definition(info),
        _baselines_definition(info.statistics),
        _LOSS_FIDELITY,
    ])


def _fidelity_cells(f: dict | None) -> list[str]:
    """CE clean, CE spliced, ΔCE [CI], CE loss recovered, KL [CI], CE zero, CE mean, tokens / rollouts."""
    if f is None:
        return [NA] * 8
    return [f"{f['ce_clean']:.4f}", f"{f['ce_spliced']:.4f}", f"{f['delta_ce']:.4f} {_ci(f['delta_ce_ci'], '.4f')}",
            f"{_num(f['ce_loss_recovered'])} {_ci(f.get('ce_loss_recovered_ci'))}", f"{f['kl']:.4f} {_ci(f['kl_ci'], '.4f')}",
            f"{f['ce_zero']:.4f}",
            f"{f['ce_mean']:.4f}", f"{f['n_tokens']:,} / {f['n_rollouts']:,}"]


def _reconstruction(info: ReleaseFacts, per_layer: dict[str, dict]) -> str:
    rows = []
    for layer in info.layers:
        s = per_layer[str(layer)]
        rows.append([f"L{layer}", f"{s['variance_explained']:.3f}", _ci(s["ve_ci"]), f"{s['l0']:.1f}",
                     *_fidelity_cells(_fidelity(info, layer))])
    header = ["layer", "variance explained", f"{COVERAGE} CI", "L0", "CE clean", "CE spliced", f"ΔCE [{COVERAGE} CI]",
              f"CE loss recovered [{COVERAGE} CI]", f"KL [{COVERAGE} CI]", "CE zero-ablated", "CE mean-ablated",
              "tokens / rollouts"]
    parts = [_table(header, rows)]
    few = [f"L{layer} {per_layer[str(layer)]['heldout_questions']:,}" for layer in info.layers
           if per_layer[str(layer)].get("heldout_questions", NOMINAL_BELOW_CLUSTERS) < NOMINAL_BELOW_CLUSTERS]
    if few:
        parts.append(f"The intervals over held-out questions rest on few of them ({', '.join(few)}; fewer than "
                     f"{NOMINAL_BELOW_CLUSTERS}), so they are nominal: expect them to cover somewhat less than "
                     f"{COVERAGE}.")
    if info.fidelity is None:
        parts.append("The fidelity in the model's loss was not computed for this release.")
    elif ceiling := _at_ceiling(info):
        parts.append(f"CE loss recovered sits at its ceiling here ({ceiling}): zero-ablating the layer costs far more "
                     "than any reconstruction error, so the ratio cannot tell SAEs apart; ΔCE and KL carry the "
                     "information.")
    return "\n\n".join(parts)


def _frontier(info: ReleaseFacts) -> str:
    """Each layer's SAEs of the sweep against their L0 (frontier.json), and which one the rest of the card uses."""
    parts = [f"Each layer's SAEs were trained together on the same batches (train.sweep) and measured on the same "
             f"held-out rows and rollouts. The statistics above and below, the feature browser and the top-level "
             f"weight files are those of the selected SAE, the configured n_features = {info.n_features:,}, "
             f"k = {info.k} (train.n_features, train.k); the others are under `sweep/n=<n>-k=<k>/` in every format, "
             f"with their SAEBench core files under `saebench/sweep/`. FVU is 1 - variance explained."]
    header = ["SAE", "n", "k", "L0", f"FVU [{COVERAGE} CI]", f"ΔCE [{COVERAGE} CI]", f"KL [{COVERAGE} CI]",
              "CE loss recovered"]
    for layer in info.layers:
        points = (info.frontier or {}).get(str(layer))
        if not points:
            continue
        rows = [[p["sae"] + (" (selected)" if p["selected"] else ""), f"{p['n_features']:,}", p["k"], f"{p['l0']:.1f}",
                 f"{p['fvu']:.3f} {_ci(p['fvu_ci'])}",
                 NA if p["delta_ce"] is None else f"{p['delta_ce']:.4f} {_ci(p['delta_ce_ci'], '.4f')}",
                 NA if p["kl"] is None else f"{p['kl']:.4f} {_ci(p['kl_ci'], '.4f')}", _num(p["ce_loss_recovered"])]
                for p in points]
        parts += [f"Layer {layer}:", _table(header, rows)]
    return "\n\n".join(parts)


CEILING_RECOVERED = 0.99  # CE loss recovered above this no longer separates reconstructions


def _at_ceiling(info: ReleaseFacts) -> str:
    """The layers whose CE loss recovered is above CEILING_RECOVERED, as "L7 0.999 (CE zero 9.1 vs clean 0.07)"."""
    high = []
    for layer in info.layers:
        f = _fidelity(info, layer)
        if f and f.get("ce_loss_recovered") is not None and f["ce_loss_recovered"] > CEILING_RECOVERED:
            high.append(f"L{layer} {f['ce_loss_recovered']:.3f}: CE zero-ablated {f['ce_zero']:.2f} against clean "
                        f"{f['ce_clean']:.2f} nats")
    return "; ".join(high)


def _health(info: ReleaseFacts, per_layer: dict[str, dict]) -> str:
    low, high = HEALTHY_RANGE
    rows = []
    for layer in info.layers:
        s = per_layer[str(layer)]
        rows.append([f"L{layer}", f"{s['dead']:,} (over {s['dead_over_tokens']:,} tokens)", f"{s['rare']:,}",
                     f"{s['healthy']:,}", f"{s['dense']:,}", f"{s['share_above_1pct']:.1%}",
                     f"{s['share_above_10pct']:.1%}", f"{s['max_decoder_cosine']:.3f}", f"{s['revived']:,}"])
    header = ["layer", "dead", "rare", f"healthy [{low:.1%}, {high:.0%}]", "dense", "> 1% density", "> 10% density",
              "max decoder cosine", "revived in training"]
    return _table(header, rows)


def _features_pass(n: int) -> str:
    return f"{n:,} feature{'s' if n != 1 else ''} pass{'' if n != 1 else 'es'}"


def _rollout_sentence(layer, r: dict) -> str:
    """What a layer's rollout-level numbers say, computed from them."""
    if r.get("reason"):
        return f"L{layer}: not computable ({r['reason']})."
    inside = r["max_abs_auroc"] <= r["chance_band_95"]
    best = f"{r['auroc']:.3f}" if r.get("auroc") is not None else ""
    verdict = (f"inside its chance band ({r['chance_band_95']:.3f}): no feature is distinguishable from chance"
               if inside else f"beyond its chance band ({r['chance_band_95']:.3f})")
    n_q = r["n_q_below_0_05"]
    fdr = f"{_features_pass(n_q)} FDR 5% (q < 0.05)"
    if r.get("n_q_below_0_05_mean") is not None:
        fdr += (f" ({r['n_q_below_0_05_mean']:,} pooled by mean, {r['n_q_below_0_05_fire_fraction']:,} by firing "
                "fraction)")
    if r.get("length_adjusted_p") is not None:
        fdr += (f"; within response-length deciles f{r['feature']}'s centre is {r['length_adjusted_null_centre']:.3f} "
                f"and its p {r['length_adjusted_p']:.3g}, and {_features_pass(r['n_q_below_0_05_length_adjusted'])} "
                "FDR 5% there")
    probe = r["probe_auroc"]
    if probe is None:
        compare = "the probe on mean residuals was not computable"
    elif probe <= CHANCE_AUROC:
        compare = (f"the probe on mean residuals reaches AUROC {probe:.3f} out of fold: it learns its own "
                   "direction, so below 0.5 it predicts nothing")
    else:
        # The probe's AUROC is signed (it learns which way is correct); the feature's, oriented its own way.
        oriented = max(r["auroc"], 1 - r["auroc"])
        compare = (f"the probe on mean residuals reaches AUROC {probe:.3f} out of fold, "
                   + ("above" if probe > oriented else "not above")
                   + f" the best single feature's {oriented:.3f} (oriented its way; picked after the fact, so favoured)")
    if probe is not None and r.get("probe_p") is not None and r.get("probe_null_mean") is not None:
        compare += (f", with p {r['probe_p']:.3g} against the probe refitted on permuted labels (whose AUROC "
                    f"averages {r['probe_null_mean']:.3f})")
    length = f"response length alone gives {_num(r['length_auroc'])}"
    return (f"L{layer}: the largest |AUROC − null centre| is {r['max_abs_auroc']:.3f} (f{r['feature']}, AUROC {best}, "
            f"centre {_num(r.get('null_centre'))}, {r['direction']}), {verdict} (Westfall–Young p = {r['westfall_young_p']:.3g}); {fdr}; {compare}; "
            f"{length}.")


def _correctness(info: ReleaseFacts, per_layer: dict[str, dict]) -> str:
    o = info.outcomes
    rows = []
    for layer in info.layers:
        r = per_layer[str(layer)]["rollout_level"]
        if r.get("reason"):
            rows.append([f"L{layer}", f"{r['n_rollouts_labelled']:,}", f"not computable: {r['reason']}"] + [""] * 6)
            continue
        rows.append([f"L{layer}", f"{r['n_rollouts_labelled']:,}",
                     f"{r['max_abs_auroc']:.3f} (AUROC {_num(r.get('auroc'))}, centre {_num(r.get('null_centre'))})",
                     f"f{r['feature']} {r['direction']}",
                     f"{r['chance_band_95']:.3f}", f"{r['westfall_young_p']:.3g}", f"{r['n_q_below_0_05']:,}",
                     f"{_num(r['length_auroc'])} {_ci(r.get('length_auroc_ci'))}",
                     _num(r["probe_auroc"]) + (f" {_ci(r.get('probe_auroc_ci'))}" if r["probe_auroc"] is not None
                                               else f" ({r.get('probe_reason') or 'not computable'})")
                     + (f", p {r['probe_p']:.3g} (null mean {r['probe_null_mean']:.3f})"
                        if r.get("probe_p") is not None and r.get("probe_null_mean") is not None else "")])
    header = ["layer", "labelled rollouts", "largest \\|AUROC − null centre\\|", "feature", "chance band (95%)",
              "Westfall–Young p", "features with q < 0.05", f"length AUROC [{COVERAGE} CI]",
              f"probe AUROC [{COVERAGE} CI]"]
    token_rows = []
    for layer in info.layers:
        t = per_layer[str(layer)]["token_level"]
        token_rows.append([f"L{layer}", _num(t["max_auroc"]), NA if t["feature"] is None else f"f{t['feature']}",
                           NA if t["fire_rate"] is None else f"{t['fire_rate']:.2%}", t["direction"] or NA])
    return "\n\n".join([
        f"Labels: {o['correct']:,} correct and {o['wrong']:,} wrong rollouts"
        + (f" ({o['truncated'] + o['no_answer']:,} unscored rollouts counted as wrong)" if o["unscored_rollouts"] == "wrong"
           else f" ({o['truncated'] + o['no_answer']:,} unscored rollouts left out)") + ".",
        "**Rollout level** (the statistics to cite):",
        _table(header, rows),
        "\n".join(f"- {_rollout_sentence(layer, per_layer[str(layer)]['rollout_level'])}" for layer in info.layers),
        "**Token level**, as the original release reported it (largest AUROC only, no null: for comparison):",
        _table(["layer", "max token-level AUROC", "feature", "fire rate", "direction"], token_rows),
    ])


def _recipe(info: ReleaseFacts) -> str:
    recipe = info.recipe
    keys = [key for key in RECIPE_LABELS if key in recipe] + [key for key in recipe if key not in RECIPE_LABELS]
    return "\n\n".join([
        _table(["parameter", "value"], [[RECIPE_LABELS.get(key, key), recipe[key]] for key in keys]),
        "Decoder rows are renormalised to unit norm after every step. A revived feature gets a random unit "
        "decoder row, the same vector as its encoder column, a zero encoder bias and fresh optimizer state.",
    ] + ([
        "Modern recipe: encoder initialised as the decoder's transpose, the gradient component parallel to each "
        "decoder row removed before each step, an AuxK loss (k_aux = d_in / 2, weight 1/32) on latents that have "
        "not fired for the dead-after window, and b_dec started at the geometric median of the training rows."
    ] if recipe.get("recipe") == "modern" else []) + ([
        "BatchTopK: each training step kept the k × B largest ReLU'd pre-activations of its batch of B tokens "
        "(so a token may use more or fewer than k features); the inference threshold θ is a moving average of the "
        "smallest activation each step kept (θ ← θ + 0.01 (m − θ), θ = m after the first step), so that encoding "
        "with θ keeps about k features per token on average."
    ] if _batchtopk(info) else []) + ([
        "Matryoshka: the reconstruction term of the loss is the mean, over the nested prefixes of the dictionary, "
        "of each prefix's reconstruction error with only its own features (those the step kept among them), so the "
        "first features learn the most general directions; the whole dictionary's error is the reported FVU, and "
        "AuxK reconstructs it."
    ] if _prefixes(info) is not None else []))


def _files(info: ReleaseFacts) -> str:
    lines = [f"- `{name}`" for name in info.files if not name.startswith(("browser/", "neuronpedia/"))]
    if any(name.startswith("browser/") for name in info.files):
        lines.append("- `browser/`: the feature browser. Open `browser/index.html` in a web browser: it works from "
                     "the file system, with no server and no network, so the folder can be zipped or uploaded as it "
                     "is. Per layer, a table of the live features (sortable, filterable by a token of their "
                     "contexts); per feature, its top-activating contexts, samples from five quantile bins of its "
                     "activations, an activation histogram, AUROCs, the output tokens its decoder direction "
                     "promotes and suppresses, and its nearest features by decoder cosine.")
    if any(name.startswith("neuronpedia/") for name in info.files):
        lines.append("- `neuronpedia/`: the same feature data in the layout of SAEDashboard's Neuronpedia runner "
                     "(`batch-N.json` per 128 features, per layer), ready for Neuronpedia's importer; `saebench/` "
                     "holds each layer's evaluation numbers in SAEBench's core evaluation layout.")
    charts = "\n\n".join(f"![{name}]({name})" for name in info.charts)
    timing = [[stage, f"{seconds:,.0f}"] for stage, seconds in info.wall_clock.items()]
    return "\n\n".join(["\n".join(lines), "Charts:", charts, "Wall clock:", _table(["stage", "seconds"], timing)])


def _causal(info: ReleaseFacts) -> str:
    check = info.causal
    if check is None:
        return "No causal check was run for this release (`causal.enabled = false`)."
    if check["skipped"]:
        return f"The causal check was skipped: {check['skipped']}."
    base = check["baseline"]
    unscored = ("only the questions both answered with a parsable letter in time count, as in the statistics"
                if check.get("unscored") == "exclude" else "an unscored answer counts as not correct")
    parts = [
        "Features chosen on the training questions (the top by rollout-level |AUROC − null centre|) were ablated "
        "(their contribution subtracted from the layer output at every position) and steered (a multiple of their "
        "typical activation added along their decoder direction, both signs) while the model answered the "
        f"{base['n_questions']} held-out questions again, greedily. Controls: a random live feature matched on fire "
        "rate for each, steered at the chosen feature's strength (the same norm of the added vector), and the "
        "difference-of-means direction between correct and wrong training rollouts (ablated, and steered at the "
        "chosen features' typical activation). Each arm is compared with the un-intervened rerun, whose accuracy is "
        f"{base['accuracy']:.3f} and which reproduces {base['reproduces_original_responses']:.0%} of the original "
        f"responses token for token; {unscored}. Δ accuracy has Newcombe's {COVERAGE} interval for paired "
        "proportions, p is McNemar's exact test, Holm p adjusts it over every arm, and Δ length has Student's t "
        "interval" + (f", nominal at fewer than {nominal} questions (length changes are skewed: the test suite's "
                      "simulation covers 78% at 8 questions)" if base["n_questions"] < (nominal := check.get(
                          "length_change_nominal_below", 0)) else "") + ". Full results: `causal.json`.",
        _detectable(check["detectable"], base["n_questions"]),
    ]
    for layer, entry in check["layers"].items():
        if entry["skipped"]:
            parts.append(f"L{layer}: skipped: {entry['skipped']}.")
            continue
        chosen = ", ".join(f"f{s['feature']} (training AUROC {s['train_auroc']:.3f}, centre {s['train_null_centre']:.3f}, "
                           f"p {s['train_p']:.3g}, Westfall–Young p {s['train_westfall_young_p']:.3g})"
                           for s in entry["selected"])
        parts.append(f"L{layer}: chosen {chosen}." + (f" {entry['note']}." if entry["note"] else ""))
        parts.append(_table(["arm", "Δ accuracy", f"{COVERAGE} CI", "McNemar p", "Holm p", "answers changed",
                             f"Δ length (tokens) [{COVERAGE} CI]"], [
            [arm["name"], _num(arm["accuracy_change"], "+.3f"), _ci(arm["accuracy_change_ci"]),
             f"{arm['mcnemar_p']:.3g}", f"{arm['mcnemar_p_holm']:.3g}", f"{arm['answers_changed']:.0%}",
             f"{_num(arm['length_change'], '+.1f')} {_ci(arm.get('length_change_ci'), '+.1f')}"]
            for arm in entry["arms"]]))
    return "\n\n".join(parts)


def _autointerp(info: ReleaseFacts) -> str:
    result = info.autointerp
    if result is None:
        return "No explanations were written for this release (`autointerp.enabled = false`)."
    parts = [
        ("The subject model" if result.get("explainer_is_subject_model", True) else "A local model") +
        f" (`{result['explainer']}`) wrote a short explanation of chosen features (per layer the top by "
        "rollout-level |AUROC − null centre|, and live features drawn at random) from their top-activating "
        "examples, and each explanation was scored on held-out examples by the same model, after EleutherAI's "
        "delphi: detection (does the feature fire in this text?) and fuzzing (are the marked tokens where it "
        "fires?), the answer read as P(\"1\") > P(\"0\") of the next token. A score is the balanced accuracy over "
        "as many positive as negative examples (0.5 is chance); the null is the same explanation scored on another "
        f"feature's examples. Means over features with Student's t {COVERAGE} intervals; Δ is score − null, paired "
        "by feature. Per feature: `autointerp.json` and the feature browser.",
    ]
    rows = []
    for scope, summary in [("all", result["summary"]), *[(f"L{layer}", entry["summary"])
                                                          for layer, entry in result["layers"].items()]]:
        for method in ("detection", "fuzzing"):
            s = summary[method]
            rows.append([scope, method, s["n_features"], f"{_num(s['mean'])} {_ci(s['ci'])}",
                         f"{_num(s['null_mean'])} {_ci(s['null_ci'])}",
                         f"{_num(s['difference'], '+.3f')} {_ci(s['difference_ci'], '+.3f')}"])
    parts.append(_table(["layers", "method", "features", f"mean score [{COVERAGE} CI]", f"null [{COVERAGE} CI]",
                         f"Δ [{COVERAGE} CI]"], rows))
    parts.append(" ".join(_autointerp_sentence(method, result["summary"][method]) for method in ("detection", "fuzzing")))
    stuck = {m: result["summary"][m].get("n_one_answer", 0) for m in ("detection", "fuzzing")}
    if any(stuck.values()):
        parts.append(f"The explainer gave the same answer to every example in {stuck['detection']} detection and "
                     f"{stuck['fuzzing']} fuzzing scores (of {len(_explained(result))} features): those are 0.5 "
                     "whatever the explanation says.")
    return "\n\n".join(parts)


def _explained(result: dict) -> list[dict]:
    return [f for layer in result["layers"].values() for f in layer["features"].values()]


def _autointerp_sentence(method: str, s: dict) -> str:
    """What a method's summary shows, from its numbers alone."""
    interval = s["difference_ci"]
    if interval is None:
        return f"{method.capitalize()}: too few features scored against the null for an interval."
    if interval[0] > 0:
        return f"{method.capitalize()}: the explanations score above the null (Δ's interval lies above 0)."
    return (f"{method.capitalize()}: the explanations do not score above the null (Δ's interval reaches 0 or below): "
            "these scores give no evidence that they describe the features.")


def _detectable(d: dict, n_questions: int) -> str:
    """What the held-out question count lets the causal check see at all."""
    def change(value, way: str) -> str:
        return f"a {way} of {value:.3f} in accuracy" if value is not None else f"no {way} (too few answers to flip)"

    return (f"What {n_questions} questions can show: the smallest McNemar p any arm could reach is "
            f"{d['smallest_p_drop']:.3g} for a drop in accuracy and {d['smallest_p_rise']:.3g} for a rise; p < 0.05 "
            f"needs at least {change(d['smallest_drop_at_p_0_05'], 'drop')} or {change(d['smallest_rise_at_p_0_05'], 'rise')}, "
            f"and after Holm over the {d['n_arms']} arms {change(d['smallest_drop_after_holm'], 'drop')} or "
            f"{change(d['smallest_rise_after_holm'], 'rise')}.")


def _limitations(info: ReleaseFacts, per_layer: dict[str, dict]) -> str:
    o, tokens = info.outcomes, info.tokens
    return "\n".join([
        f"- Sample size: {tokens['per_layer_train']:,} training tokens per layer from {o['n']:,} rollouts; "
        "held-out statistics rest on the held-out questions only, and their intervals say how much that is.",
        "- AUROC measures association with correctness, not cause; "
        + ("the causal check (above) intervenes on a few features only, over the held-out questions, whose number "
           "bounds what it can detect." if info.causal and not info.causal["skipped"] else
           "no ablation or steering of features was run."),
        f"- One domain: multiple-choice questions from `{info.questions['source']}`; behaviour on other text "
        "(code, open-ended writing) is untested.",
        ("- Only sampled responses at the temperature above were captured" if info.questions.get("temperature")
         else "- Only greedy responses were captured") + "; prompt tokens are outside the training data.",
    ] + ([
        "- The statistics read each token's codes from a sparse view of at most min(n, 4k) features; tokens that "
        "fill it (" + ", ".join(f"L{layer} {per_layer[str(layer)].get('tokens_at_sparse_width', 0):,}"
                                for layer in info.layers)
        + ") may have had further active features left out of them (never of `encode` or of the fidelity in the "
        "model's loss, which use the dense codes).",
    ] if _batchtopk(info) else []))


def render_model_card(info: ReleaseFacts) -> str:
    """Markdown model card of a release, with YAML front matter, from the pipeline's `info` dict."""
    per_layer = _check(info)
    layers = ", ".join(f"L{layer}" for layer in info.layers)
    sections = [
        _front_matter(info),
        f"# {ARCHITECTURE_NAMES[info.architecture]} sparse autoencoders for {info.model_id} ({layers})",
        _summary(info, per_layer),
        "## How to load\n\n" + _usage(info),
        "## Hook convention\n\n" + _hook(info),
        "## Data, labels and rows\n\n" + _data(info),
        "## Definitions\n\n" + _definitions(info),
        "## Reconstruction and fidelity in the model's loss\n\n" + _reconstruction(info, per_layer),
        *(["## The sweep: reconstruction and fidelity against L0\n\n" + _frontier(info)] if info.frontier else []),
        "## Feature health\n\n" + _health(info, per_layer),
        "## Correctness statistics\n\n" + _correctness(info, per_layer),
        "## Causal check\n\n" + _causal(info),
        "## Explanations\n\n" + _autointerp(info),
        "## Training recipe\n\n" + _recipe(info),
        "## Files\n\n" + _files(info),
        "## Limitations\n\n" + _limitations(info, per_layer),
    ]
    return "\n\n".join(sections) + "\n"
