"""A sweep on the embedded default (two widths, two k, one layer), built in this process
(tests/small_run.py): every SAE of the layer released in every format with its SAEBench core file, and
the frontier (frontier.json, its chart, the card's table) recomputed here from the released rows."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from by_hand import question_bootstrap_ve
from safetensors.numpy import load_file
from small_run import build_run

from qsae.sae_files import load_sae

LAYER = 7
SWEEP = ["rollout.num_questions=24", "train.epochs=6", "train.n_features=128", "train.k=8", "release.bootstrap=50",
         "release.permutations=100", "causal.enabled=false", "autointerp.enabled=false", f"capture.layers=[{LAYER}]",
         "train.sweep.n_features=[128, 256]", "train.sweep.k=[8, 16]"]
SHAPES = [(128, 8), (128, 16), (256, 8), (256, 16)]


@pytest.fixture(scope="module")
def release(tiny_path, tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("sweep") / "run", SWEEP).release


def sae_file(release, n: int, k: int, suffix: str):
    folder = release if (n, k) == (128, 8) else release / "sweep" / f"n={n}-k={k}"
    return folder / f"sae_L{LAYER}_n{n}_k{k}.{suffix}"


def test_every_sae_of_the_sweep_is_released_in_every_format_with_its_saebench_file(release):
    names = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    for n, k in SHAPES:
        assert sae_file(release, n, k, "pt").exists() and sae_file(release, n, k, "safetensors").exists()
        prefix = "" if (n, k) == (128, 8) else f"sweep/n={n}-k={k}/"
        assert f"{prefix}saelens/blocks.{LAYER}.hook_resid_post/cfg.json" in names
        assert f"{prefix}sparsify/layers.{LAYER}/sae.safetensors" in names
        saebench = "saebench/" if (n, k) == (128, 8) else f"saebench/sweep/n={n}-k={k}/"
        [core] = [name for name in names if name.startswith(saebench) and name.count("/") == saebench.count("/")
                  and name.endswith("_eval_results.json")]
        core = json.loads((release / core).read_text())
        assert core["sae_cfg_dict"]["d_sae"] == n and len(core["eval_result_details"]) == n
    assert (release / f"07_frontier_layer{LAYER}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_frontier_is_that_of_the_released_rows_and_weights(release):
    """Each SAE's L0 and FVU (with its interval over held-out questions) recomputed from the released
    residuals and weights; its delta CE and KL those of the fidelity file, the SAEBench file agreeing."""
    frontier = json.loads((release / "frontier.json").read_text())
    points = {(p["n_features"], p["k"]): p for p in frontier["layers"][str(LAYER)]}
    assert sorted(points) == SHAPES and [p["selected"] for p in frontier["layers"][str(LAYER)]].count(True) == 1
    assert points[(128, 8)]["selected"]
    acts = load_file(str(release / "activations.safetensors"))
    rollouts = {r["rollout_id"]: r for r in pq.read_table(release.parent / "rollouts.parquet").to_pylist()}
    heldout = acts["heldout"].astype(bool)
    x = acts[f"L{LAYER}"].astype(np.float32)[heldout]
    questions = np.array([rollouts[r]["question_id"] for r in acts["rollout_id"][heldout].tolist()])
    fidelity = json.loads((release / "fidelity.json").read_text())
    fvus = {}
    for (n, k), point in points.items():
        sae = load_sae(sae_file(release, n, k, "pt"))
        with torch.no_grad():
            values, indices = sae.encode_topk(torch.from_numpy(x))
            x_hat = sae.decode_topk(values, indices).numpy().astype(np.float64)
        error, spread = np.square(x - x_hat).sum(), np.square(x - x.astype(np.float64).mean(0)).sum()
        fvus[(n, k)] = error / spread
        assert point["fvu"] == pytest.approx(error / spread, abs=1e-5)
        low, high = question_bootstrap_ve(x, x_hat, questions, 50, 0)
        assert point["fvu_ci"] == pytest.approx([1 - high, 1 - low], abs=1e-5)
        assert point["l0"] == pytest.approx((values > 0).sum(dim=1).double().mean().item())
        entry = fidelity["layers"][str(LAYER)] if point["selected"] else fidelity["sweep"][str(LAYER)][f"n={n}-k={k}"]
        assert (point["delta_ce"], point["kl"], point["delta_ce_ci"], point["kl_ci"]) == (
            entry["delta_ce"], entry["kl"], entry["delta_ce_ci"], entry["kl_ci"])
        assert entry["ce_zero"] == fidelity["layers"][str(LAYER)]["ce_zero"]  # one ablation for all
        saebench = release / "saebench" if point["selected"] else release / "saebench" / "sweep" / f"n={n}-k={k}"
        [core] = saebench.glob("*_eval_results.json")
        metrics = json.loads(core.read_text())["eval_result_metrics"]
        assert metrics["model_performance_preservation"]["ce_loss_with_sae"] == entry["ce_spliced"]
        assert metrics["sparsity"]["l0"] == pytest.approx(point["l0"])
    # more latents per token reconstruct better at either width
    assert fvus[(128, 16)] < fvus[(128, 8)] and fvus[(256, 16)] < fvus[(256, 8)]


def test_the_card_shows_the_frontier_and_which_sae_the_statistics_use(release):
    card = (release / "README.md").read_text()
    section = card.split("## The sweep: reconstruction and fidelity against L0")[1].split("\n## ")[0]
    frontier = json.loads((release / "frontier.json").read_text())["layers"][str(LAYER)]
    assert "n_features = 128, k = 8" in section and "n=128-k=8 (selected)" in section
    for point in frontier:
        assert f"{point['fvu']:.3f} [{point['fvu_ci'][0]:.3f}, {point['fvu_ci'][1]:.3f}]" in section
        assert f"{point['delta_ce']:.4f}" in section
    assert f"07_frontier_layer{LAYER}.png" in card


def test_the_browser_front_page_shows_each_layers_saes(release, chromium):
    frontier = json.loads((release / "frontier.json").read_text())["layers"][str(LAYER)]
    page = chromium.open((release / "browser" / "index.html").as_uri())
    page.wait_for("document.body.dataset.ready === '1' && !!document.querySelector('#front-page table.frontier')")
    rows = page.evaluate(f"[...document.querySelectorAll('table.frontier[data-layer=\"{LAYER}\"] tbody tr')]"
                         ".map(r => [...r.cells].map(c => c.textContent))")
    assert [row[0] for row in rows] == [p["sae"] + (" (selected)" if p["selected"] else "") for p in frontier]
    for row, point in zip(rows, frontier):
        assert row[2] == f"{point['fvu']:.3f} [{point['fvu_ci'][0]:.3f}, {point['fvu_ci'][1]:.3f}]"
        assert row[3].startswith(f"{point['delta_ce']:.4f} [")
    assert page.console_errors == [] and page.requests == []
