"""`qsae evaluate`: another SAE (SAELens's or sparsify's layout, or a qsae release file) set beside a
run's own SAE of a layer, on the same rows: the statistics the release computes for its own SAE
(qsae.analyze.sae_statistics: reconstruction, feature health, token- and rollout-level correctness
over the run's sampled rows) and, with the model, its fidelity in the model's loss on the held-out
rollouts (qsae.evaluate), by the same code. Written in the release's shapes (final_summary.json,
feature_stats.json) under <run>/evaluations/layer=<L>/<name>/, or another folder.

Everything that can be checked without reading a row (the files, the SAE's width and hook against
the run) is checked first: a bad SAE is refused before the store is read or the model loaded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qsae.analysis.layer import LayerInputs
from qsae.analysis.results import LayerAnalysis
from qsae.analyze import sae_statistics, statistics_inputs
from qsae.capture import ReplicaSpec
from qsae.config import PipelineConfig
from qsae.evaluate import EvaluationInputs, evaluate_fidelity, evaluation_inputs
from qsae.files import atomic_write_json, check_can_create_dir
from qsae.models import load_model
from qsae.pipeline import check_replays_store, resolve
from qsae.release import VE_FORMULA, feature_stats_file, layer_summary
from qsae.rollout import read_rollouts
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sae_files import SAELENS_CFG, hook_layer, hook_name, load_sae, recorded_hook
from qsae.sample import load_selection, load_split
from qsae.store import read_manifest, verify_store

SUMMARY, FEATURE_STATS = "final_summary.json", "feature_stats.json"


@dataclass(frozen=True)
class OtherSAE:
    """An SAE to evaluate at one of the run's layers, with the file it came from and the hook it names."""

    path: Path
    layer: int
    sae: TopKSAE
    hook: str | None  # None where its files name no hook

    def describe(self) -> dict:
        sae = self.sae
        return {"path": str(self.path), "hook": self.hook, "layer": self.layer, "architecture": sae.architecture,
                "d_in": sae.d_in, "n_features": sae.n_features, "k": sae.k}


def load_other_sae(path: str | Path, layer: int, k: int | None, manifest: dict) -> OtherSAE:
    """The SAE at `path` (any layout load_sae reads; `k` where its files record none), checked
    against the run's store (check_fits_run)."""
    path = Path(path)
    path = path.parent if path.name == SAELENS_CFG else path
    sae = load_sae(path, k=k)
    hook = recorded_hook(path)
    check_fits_run(sae, hook, layer, manifest, path)
    return OtherSAE(path, layer, sae, hook)


def check_fits_run(sae: TopKSAE, hook: str | None, layer: int, manifest: dict, where: Path) -> None:
    """The SAE reads the rows the run holds at `layer`: d_in the store's d_model, a hook (where its files
    name one) on the residual stream after that layer's block, and the layer one the run captured."""
    if sae.d_in != manifest["d_model"]:
        raise ValueError(f"{where}: the SAE's d_in is {sae.d_in}, but the run's residuals have d_model "
                         f"{manifest['d_model']}")
    if hook is not None:
        at = hook_layer(hook)
        if at is None:
            raise ValueError(f"{where}: hook {hook!r} is not the residual stream after a block, which the run holds "
                             f"(e.g. {hook_name(layer)!r} or 'model.layers.{layer}')")
        if at != layer:
            raise ValueError(f"{where}: hook {hook!r} is layer {at}'s residual stream, not --layer {layer}'s")
    if layer not in manifest["layers"]:
        raise ValueError(f"{where}: layer {layer} is not a captured layer of the run (it captured "
                         f"{', '.join(map(str, manifest['layers']))})")


def evaluation_name(path: Path) -> str:
    """A folder name for the SAE at `path`: its own name, and a digest of its full path, so two SAEs
    whose folders share a name (SAELens names them by hook) do not overwrite each other."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.stem if path.is_file() else path.name}-{digest}"


@dataclass(frozen=True)
class EvaluationPlan:
    """A checked evaluation: the SAE, the run's rows and, for the fidelity, its held-out rollouts and
    the model that captured them (both None: no fidelity)."""

    run: RunDir
    other: OtherSAE
    inputs: LayerInputs
    fidelity: EvaluationInputs | None
    model: ReplicaSpec | None
    out: Path


def plan_evaluation(cfg: PipelineConfig, sae_path: str | Path, layer: int, *, k: int | None = None,
                    fidelity: bool = True, out: str | Path | None = None) -> EvaluationPlan:
    """Everything checked and read that needs no row and no model: the SAE against the run (cfg.out),
    the run's sampled rows and rollouts, and for the fidelity the config's model against the one that
    captured the store. Statistics resample with the run's split seed, as its analysis did."""
    run = RunDir(cfg.out)
    if out is not None:
        check_can_create_dir(out, "--out")
    other = load_other_sae(sae_path, layer, k, read_manifest(run.store))
    seed = load_split(run).rules.seed
    rollouts = {r.rollout_id: r for r in read_rollouts(run.rollouts)}
    inputs = statistics_inputs(load_selection(run.selection), rollouts, cfg.release, seed)
    spec, fidelity_inputs = None, None
    if fidelity:
        spec = resolve(cfg).spec
        check_replays_store(spec, run)
        fidelity_inputs = evaluation_inputs(run, {layer: other.sae}, limit=cfg.release.fidelity_rollouts,
                                            n_boot=cfg.release.bootstrap, seed=seed)
    out = Path(out) if out is not None else run.evaluation(layer, evaluation_name(other.path))
    return EvaluationPlan(run, other, inputs, fidelity_inputs, spec, out)


def run_evaluation(plan: EvaluationPlan) -> list[Path]:
    """The statistics of the other SAE over the run's rows (the rollout-level ones pooled over the
    sampled tokens: the encode pass ran with the run's own SAEs only; `revived` unknown), its fidelity
    with the model loaded here, written (write_evaluation); returns the files."""
    other = plan.other
    verify_store(plan.run.store, [other.layer])
    analysis, _ = sae_statistics(plan.run, other.layer, other.sae, plan.inputs, revived=None)
    fidelity = None
    if plan.fidelity is not None:
        spec = plan.model
        model, _ = load_model(spec.model_path, spec.model.revision, spec.model.dtype, spec.model.device)
        fidelity = (evaluate_fidelity(model, plan.fidelity) or {}).get(other.layer)
    return write_evaluation(plan.out, other, analysis, fidelity)


def write_evaluation(out: Path, other: OtherSAE, analysis: LayerAnalysis, fidelity: dict | None) -> list[Path]:
    """final_summary.json and feature_stats.json as the release writes them, for the one layer, with
    the SAE described; returns their paths."""
    summary = {"sae": other.describe(), "layers": {str(other.layer): layer_summary(analysis, fidelity)},
               "variance_explained_formula": VE_FORMULA}
    atomic_write_json(out / SUMMARY, summary)
    atomic_write_json(out / FEATURE_STATS, feature_stats_file({other.layer: analysis}))
    return [out / SUMMARY, out / FEATURE_STATS]
