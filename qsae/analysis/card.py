"""The release's model card (README.md): YAML front matter, then Markdown built only from `info`.

Every number in the card comes from `info`, except the definition constants imported from
features.py and fidelity.py. Formats: variance explained, its interval and AUROC to 3 decimals,
L0 to 1 decimal, counts with thousands separators, fire rates as percentages to 2 decimals.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import PurePosixPath

from qsae.analysis.features import CHANCE_AUROC, HEALTHY_RANGE
from qsae.analysis.fidelity import DEFAULT_ALPHA

REQUIRED_KEYS = (
    "model_id", "model_revision", "layers", "d_model", "n_features", "k", "hook", "questions", "tokens",
    "recipe", "per_layer", "auroc_defined", "files", "charts", "wall_clock", "engine", "qsae_version",
)
LAYER_KEYS = (
    "variance_explained", "ve_ci", "l0", "dead", "healthy", "dense", "rare", "revived",
    "max_auroc", "max_auroc_feature", "max_auroc_fire_rate", "max_auroc_direction",
)
TAGS = ("sparse-autoencoder", "topk-sae", "interpretability", "residual-stream")
RECIPE_LABELS = {
    "recipe": "recipe (original | modern)",
    "optimizer": "optimizer",
    "lr": "learning rate",
    "batch_size": "batch size (tokens)",
    "epochs": "epochs",
    "revive_every_epochs": "dead-feature revival every (epochs)",
    "dead_after_steps": "dead after (steps without firing)",
}


def _check(info: dict) -> dict[str, dict]:
    """Validate info; return per_layer keyed by str(layer) (JSON turns int keys into strings)."""
    missing = [key for key in REQUIRED_KEYS if key not in info]
    if missing:
        raise ValueError(f"model card info is missing keys: {missing}")
    per_layer = {str(layer): stats for layer, stats in info["per_layer"].items()}
    for layer in info["layers"]:
        if str(layer) not in per_layer:
            raise ValueError(f"model card info has no per_layer entry for layer {layer}")
        lacking = [key for key in LAYER_KEYS if key not in per_layer[str(layer)]]
        if lacking:
            raise ValueError(f"per_layer[{layer!r}] is missing keys: {lacking}")
    return per_layer


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # A "|" inside a cell would end it early.
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _front_matter(info: dict) -> str:
    # JSON strings are valid YAML scalars, so ids with ':' or '/' need no further escaping.
    return "\n".join([
        "---",
        "library_name: qsae",
        "license: apache-2.0",
        f"base_model: {json.dumps(info['model_id'])}",
        f"tags: [{', '.join(TAGS)}]",
        f"datasets: [{json.dumps(info['questions']['source'])}]",
        "---",
    ])


def _weights_name(info: dict, layer: int, suffix: str) -> str:
    return f"sae_L{layer}_n{info['n_features']}_k{info['k']}.{suffix}"


def _summary(info: dict, per_layer: dict[str, dict]) -> str:
    q, tokens = info["questions"], info["tokens"]
    layers = ", ".join(f"L{layer}" for layer in info["layers"])
    ve = " / ".join(f"L{layer} {per_layer[str(layer)]['variance_explained']:.3f}" for layer in info["layers"])
    expansion = info["n_features"] / info["d_model"]
    return _table(["property", "value"], [
        ["base model", f"`{info['model_id']}` (revision `{info['model_revision']}`)"],
        ["layers", layers],
        ["hook", info["hook"]],
        ["architecture", f"TopK SAE, {info['n_features']:,} features ({expansion:.2f}× d_model {info['d_model']:,}), "
                         f"k = {info['k']} active per token"],
        ["training tokens", f"{tokens['per_layer_train']:,} response tokens per layer "
                            f"({tokens['per_layer_heldout']:,} held out)"],
        ["variance explained (held-out, pooled)", ve],
        ["rollouts", f"{q['n']:,} questions, {q['n_correct']:,} correct / {q['n_wrong']:,} wrong"],
        ["rollout engine", info["engine"]],
        ["qsae version", info["qsae_version"]],
    ])


def _subfolders(files: list[str], top: str) -> list[str]:
    """Folders under `top` that hold release files, e.g. "sparsify/layers.11"."""
    return sorted({str(PurePosixPath(f).parent) for f in files if len(PurePosixPath(f).parts) > 2
                   and PurePosixPath(f).parts[0] == top})


def _usage(info: dict) -> str:
    layer = info["layers"][0]
    parts = [
        "```python",
        "from qsae.sae import TopKSAE",
        "",
        f'sae = TopKSAE.load("{_weights_name(info, layer, "pt")}")  # or the .safetensors file',
        "values, indices = sae.encode_topk(residuals)  # residuals: [tokens, d_model] float32",
        "x_hat = sae.decode_topk(values, indices)",
        "```",
    ]
    saelens, sparsify = _subfolders(info["files"], "saelens"), _subfolders(info["files"], "sparsify")
    if saelens or sparsify:
        intro = "The same weights load in SAELens and EleutherAI sparsify, one folder per layer:"
        parts += ["", intro, "", "```python"]
        if saelens:
            parts += ["from sae_lens import SAE", f'sae = SAE.load_from_disk("{saelens[0]}")']
        if sparsify:
            parts += ["from sparsify import Sae", f'sae = Sae.load_from_disk("{sparsify[0]}")']
        parts.append("```")
    return "\n".join(parts)


def _hook(info: dict) -> str:
    return (
        f"Hook point: **{info['hook']}**.\n\nActivations were captured with one teacher-forced forward pass "
        "over prompt + response per rollout, and only response-token rows were kept: encode residuals "
        "taken at the same point, from the same model revision, on response text."
    )


def _formulas() -> str:
    low, high = HEALTHY_RANGE
    return "\n".join([
        "- **Variance explained** (pooled over held-out tokens and dimensions): "
        "`1 − Σᵢ ‖xᵢ − x̂ᵢ‖² / Σᵢ ‖xᵢ − x̄‖²`, x̄ the mean held-out row. "
        f"Intervals: percentile bootstrap over rows, {1 - DEFAULT_ALPHA:.0%} coverage.",
        "- **L0**: mean number of features with a positive activation per token (at most k).",
        "- **Fire rate** of a feature: the fraction of tokens on which it is among the top k with a positive "
        "activation, over every sampled token (the rows of `activations.safetensors` / `labels.npy`); "
        "AUROC uses the same rows.",
        f"- **Feature health**: dead = never fires; rare = fire rate below {low:.1%}; "
        f"healthy = fire rate in [{low:.1%}, {high:.0%}]; dense = above {high:.0%}.",
        "- **AUROC** of a feature: tokens are scored by its activation (0 where it does not fire) and labelled "
        "by whether their rollout answered correctly; AUROC is the probability that a token of a correct "
        "rollout outscores one of a wrong rollout, ties counting one half (Mann–Whitney U / (n_correct · n_wrong)). "
        f"Direction: `correct↑` when AUROC > {CHANCE_AUROC}, `wrong↑` when below, `none` at exactly {CHANCE_AUROC}. "
        "Max AUROC is the largest AUROC among a layer's features.",
    ])


def _metrics(info: dict, per_layer: dict[str, dict]) -> str:
    rows = []
    for layer in info["layers"]:
        s = per_layer[str(layer)]
        low, high = s["ve_ci"]
        rows.append([f"L{layer}", f"{s['variance_explained']:.3f}", f"[{low:.3f}, {high:.3f}]", f"{s['l0']:.1f}",
                     f"{s['dead']:,}", f"{s['rare']:,}", f"{s['healthy']:,}", f"{s['dense']:,}", f"{s['revived']:,}"])
    header = ["layer", "variance explained", f"{1 - DEFAULT_ALPHA:.0%} CI", "L0",
              "dead", "rare", "healthy", "dense", "revived in training"]
    return _table(header, rows)


def _correctness(info: dict, per_layer: dict[str, dict]) -> str:
    q = info["questions"]
    counts = f"{q['n_correct']:,} correct, {q['n_wrong']:,} wrong"
    if not info["auroc_defined"]:
        return (
            f"Correctness statistics are undefined for this release: every rollout fell in one class ({counts}), "
            "so a feature's AUROC against correctness has no meaning and none is reported."
        )
    rows = []
    for layer in info["layers"]:
        s = per_layer[str(layer)]
        if s["max_auroc"] is None:
            rows.append([f"L{layer}", "undefined", "", "", ""])
        else:
            rows.append([f"L{layer}", f"{s['max_auroc']:.3f}", f"f{s['max_auroc_feature']}",
                         f"{s['max_auroc_fire_rate']:.2%}", s["max_auroc_direction"]])
    rate = q["n_correct"] / q["n"]
    return "\n\n".join([
        f"Rollouts: {counts} ({rate:.1%} correct). Every response token carries its rollout's label.",
        _table(["layer", "max AUROC", "feature", "fire rate", "direction"], rows),
    ])


def _recipe(info: dict) -> str:
    recipe = info["recipe"]
    keys = [key for key in RECIPE_LABELS if key in recipe] + [key for key in recipe if key not in RECIPE_LABELS]
    return "\n\n".join([
        _table(["parameter", "value"], [[RECIPE_LABELS.get(key, key), recipe[key]] for key in keys]),
        "Decoder rows are renormalised to unit norm after every step. A revived feature gets a random unit "
        "decoder row, the same vector as its encoder column, a zero encoder bias and fresh optimizer state.",
    ] + ([
        "Modern recipe: encoder initialised as the decoder's transpose, the gradient component parallel to each "
        "decoder row removed before each step, an AuxK loss (k_aux = d_in / 2, weight 1/32) on latents that have "
        "not fired for the dead-after window, and b_dec started at the geometric median of the training rows."
    ] if recipe.get("recipe") == "modern" else []))


def _data(info: dict) -> str:
    q, tokens = info["questions"], info["tokens"]
    return "\n".join([
        f"- Questions: {q['n']:,} from `{q['source']}` (sampling seed {q['seed']}), one greedy rollout each "
        f"with `{info['engine']}`.",
        f"- Rollouts: {q['n_correct']:,} correct, {q['n_wrong']:,} wrong (answer letter parsed from the response).",
        f"- Response tokens: {tokens['total_response_tokens']:,} in total; per layer "
        f"{tokens['per_layer_train']:,} for training and {tokens['per_layer_heldout']:,} held out.",
    ])


def _files(info: dict) -> str:
    lines = [f"- `{name}`" for name in info["files"]]
    charts = "\n\n".join(f"![{name}]({name})" for name in info["charts"])
    timing = [[stage, f"{seconds:,.0f}"] for stage, seconds in info["wall_clock"].items()]
    return "\n\n".join(["\n".join(lines), "Charts:", charts, "Wall clock:", _table(["stage", "seconds"], timing)])


def _limitations(info: dict) -> str:
    q, tokens = info["questions"], info["tokens"]
    return "\n".join([
        f"- Sample size: {tokens['per_layer_train']:,} training tokens per layer from {q['n']:,} rollouts; "
        "features and correctness statistics may change with more data.",
        "- Labels belong to rollouts, not tokens: tokens of one rollout are correlated, so per-token AUROC "
        "and row-bootstrap intervals overstate the effective sample size.",
        "- AUROC measures correlation with correctness, not cause; no ablation or steering was run.",
        f"- One domain: multiple-choice questions from `{info['questions']['source']}`; behaviour on other text "
        "(code, open-ended writing) is untested.",
        "- Only greedy responses were captured; prompt tokens and sampled text are outside the training data.",
    ])


def render_model_card(info: dict) -> str:
    """Markdown model card of a release, with YAML front matter, from the pipeline's `info` dict."""
    per_layer = _check(info)
    layers = ", ".join(f"L{layer}" for layer in info["layers"])
    sections = [
        _front_matter(info),
        f"# TopK sparse autoencoders for {info['model_id']} ({layers})",
        _summary(info, per_layer),
        "## How to load\n\n" + _usage(info),
        "## Hook convention\n\n" + _hook(info),
        "## Definitions\n\n" + _formulas(),
        "## Per-layer metrics\n\n" + _metrics(info, per_layer),
        "## Correctness statistics\n\n" + _correctness(info, per_layer),
        "## Training recipe\n\n" + _recipe(info),
        "## Data\n\n" + _data(info),
        "## Files\n\n" + _files(info),
        "## Limitations\n\n" + _limitations(info),
    ]
    return "\n\n".join(sections) + "\n"
