"""`qsae evaluate` on a small run built in this process (tests/small_run.py): the run's own SAE of a
layer, exported by `qsae export` and read back from SAELens's and sparsify's layouts, is evaluated
beside the run and must give back what the run's release reported for the same weights, read from the
release's own files. (Its bad input: tests/test_bad_input.py.)"""
from __future__ import annotations

import json

import pytest
from small_run import build_run

from qsae.cli import main
from qsae.sae_files import hook_layer, hook_name

# A small run whose rollout-level statistics pool the sampled tokens (release.every_token = false), as
# an evaluated SAE's do: the encode pass runs only the run's own SAEs.
SMALL = ["rollout.num_questions=12", "capture.keep_per_rollout=6", "train.epochs=2", "train.n_features=64",
         "train.k=4", "release.bootstrap=20", "release.permutations=50", "release.probe_permutations=10",
         "release.top_contexts=4", "release.context_tokens=3", "release.every_token=false", "causal.enabled=false",
         "autointerp.enabled=false"]
LAYER = 7


@pytest.fixture(scope="module")
def run(tiny_path, tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("evaluate") / "run", SMALL)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run's own layer SAE in every release layout, as `qsae export` writes it."""
    out = tmp_path_factory.mktemp("exported")
    trained = run.trained(LAYER) / f"sae_L{LAYER}_n64_k4.pt"
    assert main(["export", "--sae", str(trained), "--layer", str(LAYER), "--out", str(out)]) == 0
    return out


def released(run, name: str) -> dict:
    return json.loads((run.release / name).read_text())["layers"][str(LAYER)]


def test_the_runs_own_sae_as_saelens_gives_the_releases_statistics_and_fidelity(run, exported):
    assert main(["evaluate", "--sae", str(exported / "saelens" / hook_name(LAYER)), "--layer", str(LAYER),
                 "--run", str(run.root), *SMALL]) == 0
    [out] = (run.root / "evaluations" / f"layer={LAYER}").iterdir()
    summary = json.loads((out / "final_summary.json").read_text())
    assert summary["sae"]["hook"] == hook_name(LAYER) and summary["sae"]["n_features"] == 64
    evaluated, release = summary["layers"][str(LAYER)], released(run, "final_summary.json")
    assert evaluated.pop("revived") is None  # training's count, unknown for an SAE trained elsewhere
    release.pop("revived")
    assert release["fidelity"] is not None and release["token_level"]["max_auroc"] is not None
    assert evaluated == release
    assert json.loads((out / "feature_stats.json").read_text())["layers"][str(LAYER)] == \
        released(run, "feature_stats.json")


def test_the_sparsify_layout_without_fidelity_gives_the_same_statistics(run, exported, tmp_path):
    out = tmp_path / "beside"
    assert main(["evaluate", "--sae", str(exported / "sparsify" / f"layers.{LAYER}"), "--layer", str(LAYER),
                 "--run", str(run.root), "--out", str(out), "--no-fidelity", *SMALL]) == 0
    evaluated = json.loads((out / "final_summary.json").read_text())["layers"][str(LAYER)]
    release = released(run, "final_summary.json")
    assert evaluated.pop("fidelity") is None and evaluated.pop("revived") is None
    assert evaluated == {key: value for key, value in release.items() if key not in ("fidelity", "revived")}


@pytest.mark.parametrize("hook, layer", [("blocks.7.hook_resid_post", 7), ("blocks.8.hook_resid_pre", 7),
                                         ("model.layers.7", 7), ("layers.7", 7), ("blocks.0.hook_resid_pre", None),
                                         ("blocks.7.hook_mlp_out", None), ("model.layers.7.mlp", None)])
def test_a_hook_names_the_residual_stream_after_a_block_or_nothing(hook, layer):
    assert hook_layer(hook) == layer


def test_every_layout_qsae_writes_names_its_hook(tmp_path):
    from qsae.sae import TopKSAE
    from qsae.sae_files import recorded_hook, save_sae

    paths = save_sae(TopKSAE(16, 32, 4), tmp_path, LAYER, hook_name(LAYER))
    assert {name: hook_layer(recorded_hook(path)) for name, path in paths.items()} == dict.fromkeys(paths, LAYER)
    assert recorded_hook(paths["saelens"] / "cfg.json") == hook_name(LAYER)
    assert recorded_hook(tmp_path / "odd_name.pt") is None
