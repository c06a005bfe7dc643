"""The release's writers on a small run directory built once, in this process (tests/small_run.py):
every released number recomputed from the released arrays, the browser in a real headless Chromium,
the SAEBench, Neuronpedia and causal files, and the model card."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score

from by_hand import question_bootstrap_ve
from small_run import build_run

from qsae.analysis.fidelity import variance_explained
from qsae.rundir import RunDir
from qsae.sae_files import load_sae
from qsae.training.trained import load_trained

# The end-to-end tests' small config (tests/test_pipeline.py), here built without Ray.
SMALL = ["rollout.num_questions=24", "train.epochs=6", "train.n_features=128", "train.k=8", "release.bootstrap=50",
         "release.permutations=200", "causal.features=1", "causal.questions=4",
         "autointerp.enabled=false"]  # tests/test_autointerp.py builds a run of its own


@pytest.fixture(scope="module")
def release(tiny_path, tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("small") / "run", SMALL).release


def test_release_directory_holds_every_artifact(release):
    names = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    for layer in (3, 7, 11):
        assert {f"sae_L{layer}_n128_k8.pt", f"sae_L{layer}_n128_k8.safetensors"} <= names
        assert f"saelens/blocks.{layer}.hook_resid_post/cfg.json" in names
        assert f"sparsify/layers.{layer}/sae.safetensors" in names
    assert {"README.md", "labels.npy", "feature_stats.json", "feature_characterization.json",
            "final_summary.json", "activations.safetensors", "split.json", "fidelity.json",
            "rollout_features.safetensors"} <= names
    charts = sorted(n for n in names if n.endswith(".png"))
    assert len(charts) >= 3
    for chart in charts:
        assert (release / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in release.parent.iterdir() if n.name.startswith(".release-")]


def released_rows(release):
    acts = load_file(str(release / "activations.safetensors"))
    return acts, np.load(release / "labels.npy")


def test_released_labels_are_those_of_rollouts_parquet(release):
    """labels.npy against rollouts.parquet through each row's rollout id: an inverted or shifted label
    anywhere fails here."""
    acts, labels = released_rows(release)
    rollouts = {r["rollout_id"]: r for r in pq.read_table(release.parent / "rollouts.parquet").to_pylist()}
    expected = [1 if rollouts[r]["outcome"] == "correct" else 0 if rollouts[r]["outcome"] == "wrong" else -1
                for r in acts["rollout_id"].tolist()]
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.int8 and {0, 1} <= set(labels.tolist())
    # outcomes from the responses: correct is the parsed letter of a finished response
    for r in rollouts.values():
        assert r["correct"] == (r["outcome"] == "correct")
        assert r["outcome"] == ("truncated" if r["finish_reason"] == "length" else "no_answer"
                                if r["predicted_letter"] is None else
                                "correct" if r["predicted_letter"] == r["answer_letter"] else "wrong")
    summary = json.loads((release / "final_summary.json").read_text())["rollouts"]
    for outcome in ("correct", "wrong", "truncated", "no_answer"):
        assert summary[outcome] == sum(r["outcome"] == outcome for r in rollouts.values())


def test_no_heldout_question_leaks_into_training(release):
    acts, _ = released_rows(release)
    split = json.loads((release / "split.json").read_text())
    rollouts = {r["rollout_id"]: r for r in pq.read_table(release.parent / "rollouts.parquet").to_pylist()}
    held, train = set(split["heldout_rollout_ids"]), set(split["train_rollout_ids"])
    assert held and train and not held & train and held | train == set(rollouts)
    held_questions = {rollouts[r]["question_id"] for r in held}
    assert held_questions == set(split["heldout_questions"])
    assert not held_questions & {rollouts[r]["question_id"] for r in train}
    heldout = acts["heldout"].astype(bool)
    np.testing.assert_array_equal(heldout, np.isin(acts["rollout_id"], sorted(held)))
    n_train, n_held = int((~heldout).sum()), int(heldout.sum())
    summary = json.loads((release / "final_summary.json").read_text())
    for layer in ("3", "7", "11"):
        row = summary["layers"][layer]
        assert (row["train_rows"], row["heldout_rows"]) == (n_train, n_held)
        history = load_trained(RunDir(release.parent), int(layer)).history
        assert history["tokens_seen"] == 6 * n_train  # train.epochs=6 passes over exactly the training rows


def test_statistics_are_those_of_the_released_rows(release):
    summary = json.loads((release / "final_summary.json").read_text())
    stats = json.loads((release / "feature_stats.json").read_text())
    acts, labels = released_rows(release)
    pooled_file = load_file(str(release / "rollout_features.safetensors"))
    rollouts = {r["rollout_id"]: r for r in pq.read_table(release.parent / "rollouts.parquet").to_pylist()}
    heldout = acts["heldout"].astype(bool)
    questions = np.array([rollouts[r]["question_id"] for r in acts["rollout_id"].tolist()])
    labelled = labels >= 0
    for layer in ("3", "7", "11"):
        x = acts[f"L{layer}"].astype(np.float32)
        assert x.shape == (len(labels), 64)
        sae = load_sae(release / f"sae_L{layer}_n128_k8.pt")
        with torch.no_grad():
            values, indices = sae.encode_topk(torch.from_numpy(x))
            x_hat = sae.decode_topk(values, indices).numpy()
            codes = sae.encode(torch.from_numpy(x)).numpy()
        ve = variance_explained(x[heldout], x_hat[heldout])
        row = summary["layers"][layer]
        assert row["variance_explained"] == pytest.approx(ve, abs=1e-5)
        assert row["ve_ci"] == pytest.approx(question_bootstrap_ve(x[heldout], x_hat[heldout], questions[heldout],
                                                                   50, 0), abs=1e-5)
        assert row["ve_ci"][0] <= ve <= row["ve_ci"][1] and 0.3 < ve <= 1.0
        np.testing.assert_allclose(stats["layers"][layer]["fire_rate"], (codes > 0).mean(axis=0), atol=1e-12)
        fired = np.flatnonzero((codes > 0).any(axis=0))[:10]
        for f in fired:
            assert stats["layers"][layer]["token_auroc"][f] == pytest.approx(
                roc_auc_score(labels[labelled], codes[labelled, f]), abs=1e-9)
        # rollout level: max-pooled over each labelled rollout's rows, recomputed here
        ids = np.unique(acts["rollout_id"][labelled])
        np.testing.assert_array_equal(pooled_file["rollout_id"], ids)
        pooled = np.stack([codes[acts["rollout_id"] == r].max(axis=0) for r in ids])
        np.testing.assert_allclose(pooled_file[f"L{layer}"], pooled, atol=1e-6)
        label = np.array([rollouts[r]["outcome"] == "correct" for r in ids.tolist()])
        np.testing.assert_array_equal(pooled_file["label"], label.astype(np.uint8))
        for f in np.flatnonzero(pooled.any(axis=0))[:10]:
            assert stats["layers"][layer]["rollout_auroc"][f] == pytest.approx(roc_auc_score(label, pooled[:, f]),
                                                                               abs=1e-9)
        best = int(np.argmax(np.abs(np.array(stats["layers"][layer]["rollout_auroc"]) - 0.5)))
        level = row["rollout_level"]
        assert level["feature"] == best and level["n_rollouts_labelled"] == len(ids)
        assert level["length_auroc"] == pytest.approx(
            roc_auc_score(label, [rollouts[r]["n_response_tokens"] for r in ids.tolist()]), abs=1e-9)
        assert all(0 < p <= 1 for p in stats["layers"][layer]["rollout_p"])
        health = summary["layers"][layer]
        assert health["dead"] + health["rare"] + health["healthy"] + health["dense"] == 128


def test_fidelity_in_the_model_loss_is_released(release):
    fidelity = json.loads((release / "fidelity.json").read_text())
    split = json.loads((release / "split.json").read_text())
    rollouts = {r["rollout_id"]: r for r in pq.read_table(release.parent / "rollouts.parquet").to_pylist()}
    scored = [rollouts[r]["n_response_tokens"] - 1 for r in split["heldout_rollout_ids"]
              if rollouts[r]["n_response_tokens"] > 1]  # every response position but the last
    for layer in ("3", "7", "11"):
        entry = fidelity["layers"][layer]
        assert (entry["n_rollouts"], entry["n_tokens"]) == (len(scored), sum(scored))
        assert entry["ce_clean"] < entry["ce_zero"]
        assert entry["delta_ce"] == pytest.approx(entry["ce_spliced"] - entry["ce_clean"])
        assert entry["delta_ce_ci"][0] <= entry["delta_ce"] <= entry["delta_ce_ci"][1]
        assert entry["kl"] >= 0
        recovered = (entry["ce_zero"] - entry["ce_spliced"]) / (entry["ce_zero"] - entry["ce_clean"])
        assert entry["ce_loss_recovered"] == pytest.approx(recovered)


def shown_as(token: str) -> str:
    """A token's text as the browser shows it: line breaks and tabs as visible symbols."""
    return token.replace("\n", "↵").replace("\r", "␍").replace("\t", "→")


def test_feature_browser_works_offline_and_shows_every_live_feature(release, tiny, chromium, tmp_path):
    """The browser in a real headless Chromium from file://: front page, a layer's table (every live
    feature, sorting, the token filter), a feature page (its contexts and logit tables); no console
    error, no network request. Screenshots under tmp_path."""
    layer = "7"
    rates = json.loads((release / "feature_stats.json").read_text())["layers"][layer]["fire_rate"]
    live = [f for f, rate in enumerate(rates) if rate > 0]
    contexts = json.loads((release / "feature_characterization.json").read_text())["layers"][layer]
    assert sorted(map(int, contexts)) == live
    page = chromium.open((release / "browser" / "index.html").as_uri())
    ready = "document.body.dataset.ready === '1' && !!document.querySelector({!r})"
    page.wait_for(ready.format("#front-page"))
    charts = page.evaluate("[...document.querySelectorAll('#front-page img')].map(i => i.complete && i.naturalWidth)")
    assert len(charts) >= 3 and all(charts)
    page.screenshot(tmp_path / "front.png")

    page.goto(f"#/layer/{layer}")
    page.wait_for(ready.format(f'#layer-page[data-layer="{layer}"]'))
    shown = "[...document.querySelectorAll('#feature-table tbody tr:not([hidden])')].map(r => +r.dataset.feature)"
    assert sorted(page.evaluate(shown)) == live
    page.evaluate("document.querySelector('th[data-sort=\"fire_rate\"]').click()")
    order = page.evaluate(shown)
    assert [rates[f] for f in order] in (sorted(rates[f] for f in live), sorted((rates[f] for f in live), reverse=True))
    busiest = max(live, key=lambda f: rates[f])
    token = contexts[str(busiest)][0]["tokens"][contexts[str(busiest)][0]["at"]].strip()
    expected = sorted(int(f) for f, examples in contexts.items()
                      if any(token.lower() in e["tokens"][e["at"]].lower() for e in examples))
    page.evaluate(f"(f => {{ f.value = {json.dumps(token)}; f.dispatchEvent(new Event('input')); }})"
                  f"(document.querySelector('#filter'))")
    page.wait_for(f"{shown}.length === {len(expected)}")
    assert sorted(page.evaluate(shown)) == expected and busiest in expected
    page.screenshot(tmp_path / "layer.png")

    page.goto(f"#/layer/{layer}/feature/{busiest}")
    page.wait_for(ready.format(f'#feature-page[data-layer="{layer}"][data-feature="{busiest}"]'))
    fired = page.evaluate("[...document.querySelectorAll('#top-contexts .context')]"
                          ".map(c => c.querySelector('.token.fire').textContent)")
    assert len(fired) == len(contexts[str(busiest)]) > 0
    assert fired == [shown_as(e["tokens"][e["at"]]) for e in contexts[str(busiest)]]
    # the logit table against the model: the final norm of the decoder direction (the norm's gain times
    # the direction, up to a positive scale) through the output embedding, ranked
    model, tokenizer = tiny
    sae = load_sae(release / f"sae_L{layer}_n128_k8.safetensors")
    with torch.no_grad():
        final_norm = model.model.language_model.norm  # Qwen3.5: the text model inside the multimodal one
        logits = model.get_output_embeddings()(final_norm(sae.W_dec[busiest][None]))[0]
    for table, largest in (("promoted", True), ("suppressed", False)):
        cells = page.evaluate(f"[...document.querySelectorAll('#logits-{table} tbody tr')]"
                              ".map(r => r.cells[0].textContent)")
        ids = logits.topk(10, largest=largest).indices.tolist()
        assert len(cells) == 10
        assert cells[:5] == [shown_as(tokenizer.decode([i])) for i in ids[:5]]
    page.screenshot(tmp_path / "feature.png", full_page=True)
    assert page.console_errors == [] and page.requests == []


SAEBENCH_GROUPS = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                     "average_max_decoder_cosine_sim", "frac_alive"},
}
SAEBENCH_FEATURE_KEYS = {"index", "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
                         "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim"}
NEURONPEDIA_FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
    "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
    "activations"}
NEURONPEDIA_ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}


def test_saebench_and_neuronpedia_files_hold_the_releases_numbers(release):
    """SAEBench's core layout (every required group and field) with qsae's fidelity and metrics
    recomputed here from the released rows; Neuronpedia batches (SAEDashboard's runner layout) listing
    exactly the live features, each feature's top context reaching its largest activation on the sample."""
    acts, _ = released_rows(release)
    fidelity = json.loads((release / "fidelity.json").read_text())["layers"]
    stats = json.loads((release / "feature_stats.json").read_text())["layers"]
    for layer in ("3", "7", "11"):
        core = json.loads((release / "saebench" / f"qsae-topk-128_blocks.{layer}.hook_resid_post_eval_results.json").read_text())
        assert core["eval_type_id"] == "core" and core["sae_lens_id"] == f"blocks.{layer}.hook_resid_post"
        metrics = core["eval_result_metrics"]
        assert {group: set(fields) for group, fields in metrics.items()} == SAEBENCH_GROUPS
        f = fidelity[layer]
        assert metrics["model_performance_preservation"] == {
            "ce_loss_score": f["ce_loss_recovered"], "ce_loss_with_ablation": f["ce_zero"],
            "ce_loss_with_sae": f["ce_spliced"], "ce_loss_without_sae": f["ce_clean"]}
        assert metrics["model_behavior_preservation"]["kl_div_with_sae"] == f["kl"]
        assert metrics["model_behavior_preservation"]["kl_div_with_ablation"] == f["kl_zero"] > f["kl"]
        sae = load_sae(release / f"sae_L{layer}_n128_k8.safetensors")
        x = acts[f"L{layer}"][acts["heldout"] == 1].astype(np.float64)
        with torch.no_grad():
            x_hat = sae(torch.from_numpy(x).float()).double().numpy()
        per_token = 1 - np.square(x - x_hat).sum(1) / np.square(x - x.mean(0)).sum(1)
        quality = metrics["reconstruction_quality"]
        assert quality["explained_variance"] == pytest.approx(per_token.mean(), rel=1e-4)
        assert quality["mse"] == pytest.approx(np.square(x - x_hat).mean(), rel=1e-4)
        rates = np.array(stats[layer]["fire_rate"])
        assert metrics["misc_metrics"]["frac_alive"] == pytest.approx((rates > 0).mean())
        assert metrics["token_stats"]["total_tokens_eval_sparsity_variance"] == len(x)
        details = core["eval_result_details"]
        assert [d["index"] for d in details] == list(range(128)) and set(details[0]) == SAEBENCH_FEATURE_KEYS
        np.testing.assert_allclose([d["feature_density"] for d in details], rates)
        np.testing.assert_allclose([d["encoder_bias"] for d in details], sae.b_enc.detach().numpy(), rtol=1e-6)

        folder = release / "neuronpedia" / f"tiny_qsae-topk-128_blocks.{layer}.hook_resid_post_128"
        batches = [json.loads(p.read_text()) for p in sorted(folder.glob("batch-*.json"))]
        features = [feature for batch in batches for feature in batch["features"]]
        assert all({"model_id", "layer", "sae_set", "sae_id_suffix", "features"} <= set(b) for b in batches)
        assert [feature["feature_index"] for feature in features] == np.flatnonzero(rates > 0).tolist()
        skipped = json.loads((folder / "skipped_indexes.json").read_text())["skipped_indexes"]
        assert skipped == np.flatnonzero(rates == 0).tolist()
        with torch.no_grad():
            sample_max = sae.encode(torch.from_numpy(acts[f"L{layer}"]).float()).max(dim=0).values.numpy()
        for feature in features:
            assert set(feature) == NEURONPEDIA_FEATURE_KEYS
            assert feature["frac_nonzero"] == pytest.approx(rates[feature["feature_index"]])
            assert len(feature["pos_str"]) == len(feature["neg_str"]) == 10
            top = feature["activations"][0]
            assert set(top) == NEURONPEDIA_ACTIVATION_KEYS and len(top["tokens"]) == len(top["values"])
            assert top["values"][top["qualifying_token_index"]] == pytest.approx(
                sample_max[feature["feature_index"]], abs=1e-4)


def test_causal_check_reruns_the_heldout_questions_with_the_chosen_features_intervened(release):
    """causal.json: the un-intervened rerun reproduces the original rollouts (greedy), the chosen feature
    is the training rollouts' top |AUROC - 0.5| (sklearn on max activations from the released rows; one
    rollout per question, so the null's centre is 0.5),
    and each arm's statistics follow from its answers (McNemar against scipy)."""
    from scipy.stats import binomtest

    check = json.loads((release / "causal.json").read_text())
    rollouts = {r["rollout_id"]: r for r in pq.read_table(release.parent / "rollouts.parquet").to_pylist()}
    base = check["baseline"]
    assert base["reproduces_original_responses"] == 1.0
    assert base["letters"] == [rollouts[r]["predicted_letter"] for r in base["rollout_ids"]]
    assert base["correct"] == [int(rollouts[r]["outcome"] == "correct") for r in base["rollout_ids"]]
    split = json.loads((release / "split.json").read_text())
    assert set(base["rollout_ids"]) <= set(split["heldout_rollout_ids"])

    layer = "7"  # configs/tiny.toml's causal.layers
    acts, _ = released_rows(release)
    sae = load_sae(release / f"sae_L{layer}_n128_k8.safetensors")
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(acts[f"L{layer}"]).float()).numpy()
    train = [r for r in np.unique(acts["rollout_id"]).tolist()
             if r not in set(split["heldout_rollout_ids"]) and rollouts[r]["outcome"] in ("correct", "wrong")]
    pooled = np.stack([codes[acts["rollout_id"] == r].max(axis=0) for r in train])
    labels = [rollouts[r]["outcome"] == "correct" for r in train]
    live = np.flatnonzero((codes > 0).any(axis=0))
    distance = {f: abs(roc_auc_score(labels, pooled[:, f]) - 0.5) for f in live.tolist()}
    entry = check["layers"][layer]
    chosen = entry["selected"][0]["feature"]
    assert distance[chosen] == pytest.approx(max(distance.values()))
    assert [c["matched_to"] for c in entry["controls"]] == [chosen] and entry["controls"][0]["feature"] != chosen
    groups = {arm["group"] for arm in entry["arms"]}
    assert groups == {"feature", "random", "dom"} and len(entry["arms"]) == 3 + 3 + 3
    assert check["unscored"] == "exclude" and base["scored"] == [
        int(rollouts[r]["outcome"] in ("correct", "wrong")) for r in base["rollout_ids"]]
    for arm in entry["arms"]:
        # Only the questions both answered (release.unscored_rollouts = exclude), as in the statistics.
        both = np.array(arm["scored"], bool) & np.array(base["scored"], bool)
        mine, theirs = np.array(arm["correct"], bool)[both], np.array(base["correct"], bool)[both]
        assert arm["n_questions"] == both.sum()
        if both.any():
            assert arm["accuracy_change"] == pytest.approx(mine.mean() - theirs.mean())
        b, c = int((theirs & ~mine).sum()), int((~theirs & mine).sum())
        assert arm["mcnemar_p"] == pytest.approx(1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue)
        assert arm["mcnemar_p"] <= arm["mcnemar_p_holm"] <= 1.0
        changed = np.mean([x != y for x, y in zip(arm["letters"], base["letters"])])
        assert arm["answers_changed"] == pytest.approx(changed)
    # steering hard enough changes answers somewhere: the interventions reach the generation
    assert max(arm["answers_changed"] for arm in entry["arms"]) > 0
    assert (release / "06_causal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Causal check" in (release / "README.md").read_text()


def test_model_card_reports_the_run(release):
    card = (release / "README.md").read_text()
    summary = json.loads((release / "final_summary.json").read_text())
    assert card.startswith("---\n")
    for layer, row in summary["layers"].items():
        assert f"{row['variance_explained']:.3f}" in card
        assert f"L{layer}" in card
    contexts = json.loads((release / "feature_characterization.json").read_text())
    assert all(contexts["layers"][layer] for layer in ("3", "7", "11"))
