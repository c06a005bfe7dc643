"""ReleaseFacts: what the release's writers (the model card, the feature browser's front page, the
SAEBench and Neuronpedia files) say about a run, gathered once by qsae.release from the run
directory. Its nested tables are JSON-shaped, as final_summary.json holds them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ReleaseFacts:
    model_id: str
    model_revision: str | None
    layers: list[int]
    d_model: int
    n_features: int
    k: int
    architecture: str  # "topk" | "batchtopk" | "matryoshka-batchtopk"
    hook: str  # the hook convention, in words
    questions: dict  # source, seed, thinking, max_new_tokens
    outcomes: dict  # n, correct, wrong, truncated, no_answer, unscored_rollouts, finish_reason_length
    tokens: dict  # total_response_tokens, per_layer_train, per_layer_heldout
    rows: dict  # the row selection's counts, max_norm_multiple, max_tokens_per_layer
    split: dict  # holdout_fraction, seed, heldout_rollouts
    recipe: dict  # the training settings as the card's recipe table shows them
    statistics: dict  # bootstrap, permutations
    per_layer: dict  # str(layer) -> the layer's summary (analysis)
    fidelity: dict | None  # str(layer) -> its fidelity entry, None where not computed
    files: list[str]
    charts: list[str]
    wall_clock: dict  # stage -> seconds
    engine: str
    qsae_version: str
    causal: dict | None = None  # causal.json, None where the check was not run
    model_dtype: str = "float32"  # the model's dtype in rollouts and capture
    exclude_special_tokens: bool = True
    frontier: dict | None = None  # str(layer) -> its SAEs' frontier points (frontier.json), None without a sweep
    autointerp: dict | None = None  # autointerp.json, None where the stage was not run

    @classmethod
    def from_dict(cls, data: dict) -> ReleaseFacts:
        """From a mapping with one entry per field, naming the fields it lacks or does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"release facts: missing keys {missing}, unknown keys {unknown}")
        return cls(**data)
