"""The driver, end to end: `python jobs/release.py` on a small embedded default, its console, reruns and kills."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from qsae.analysis.fidelity import variance_explained
from qsae.cli import main
from qsae.models import model_dims, resolve_model_path
from qsae.rundir import RunDir
from qsae.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from qsae.sae_files import load_sae
from qsae.store import read_layer_table, read_manifest, residual_matrix, verify_store, write_manifest
from qsae.training.trained import TrainedSAE, load_trained, save_trained

pytestmark = pytest.mark.slow  # Ray, subprocesses or whole runs: `make test` runs it, `make test-fast` not

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["rollout.num_questions=24", "train.epochs=6", "train.n_features=128", "train.k=8", "release.bootstrap=50",
         "release.permutations=200", "causal.features=1", "causal.questions=4"]
NO_CAUSAL = ["causal.enabled=false", "autointerp.enabled=false"]  # tested on the release fixture's run


def run_driver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/release.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def release_run(tiny_path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("run")
    done = run_driver("--out", str(out), *SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"release written to {out / 'release'}" in done.stdout
    return out / "release", done


@pytest.fixture(scope="module")
def release(release_run) -> Path:
    return release_run[0]


QSAE_BAR = re.compile(r"(capture|train|encode|analyze): +\d+%\|")  # qsae's own progress bars (tqdm)


def test_the_console_shows_qsae_lines_and_the_log_the_rest(release_run):
    """Every line of the run's console is qsae's own (a stage line, a warning, a progress bar); Ray's
    and transformers' lines, the workers' included, are in <run>/run.log, whose path the console names."""
    release, done = release_run
    lines = [part for line in (done.stdout + done.stderr).splitlines() for part in line.split("\r") if part.strip()]
    foreign = [line for line in lines if not (line.startswith("[qsae] ") or QSAE_BAR.match(line))]
    assert not foreign, foreign[:5]
    log = release.parent / "run.log"
    assert f"[qsae] other libraries' output goes to {log}" in done.stdout
    logged = log.read_text()
    assert "pid=" in logged and "TrainController" in logged  # Ray's copies of its workers' output


def released_rows(release):
    acts = load_file(str(release / "activations.safetensors"))
    return acts, np.load(release / "labels.npy")


def test_analyze_rebuilds_the_release_from_the_trained_run(release):
    before = json.loads((release / "final_summary.json").read_text())["layers"]
    (release / "README.md").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "qsae", "analyze", "--out", str(release.parent), *SMALL, *NO_CAUSAL],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (release / "README.md").exists()
    after = json.loads((release / "final_summary.json").read_text())["layers"]
    for layer in before:
        assert after[layer]["variance_explained"] == pytest.approx(before[layer]["variance_explained"], abs=1e-6)


BATCHTOPK = [*SMALL, *NO_CAUSAL, "train.architecture=batchtopk", "train.epochs=40", "train.checkpoint_every_steps=5"]


def copy_capture(release: Path, run: Path, drop_shards: int = 0) -> None:
    """The `release` run's rollouts and store (so capture has nothing to do), less its last
    `drop_shards` shards (which capture then has to do again)."""
    shutil.copytree(release.parent, run, ignore=shutil.ignore_patterns("checkpoints", "saes", "release"))
    manifest = read_manifest(run / "activations")
    for shard in sorted(manifest["shards"])[len(manifest["shards"]) - drop_shards:]:
        del manifest["shards"][shard]
        for path in [*(run / "activations").glob(f"layer=*/{shard}.arrow"), run / "rollouts" / f"{shard}.parquet"]:
            path.unlink()
    (run / "rollouts.parquet").unlink()
    write_manifest(run / "activations", manifest)


@pytest.fixture(scope="module")
def batchtopk_reference(release, tmp_path_factory):
    """A longer BatchTopK training on the `release` run's store, uninterrupted."""
    run = tmp_path_factory.mktemp("batchtopk") / "run"
    copy_capture(release, run)
    done = run_driver("--out", str(run), *BATCHTOPK)
    assert done.returncode == 0, done.stderr[-3000:]
    return run / "release"


# One replica: the two shards left are captured one after the other, so a kill lands between them.
ONE_REPLICA = "capture.num_actors=1"


def start_driver(run: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/release.py", "--out", str(run), *BATCHTOPK, ONE_REPLICA], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop_when(driver: subprocess.Popen, ready, how: signal.Signals, what: str) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and not ready():
        time.sleep(0.2)
    assert driver.poll() is None, f"the job ended before it was {what}"
    driver.send_signal(how)
    driver.wait(timeout=120)


@pytest.fixture(scope="module")
def killed_at_each_stage(release, tmp_path_factory):
    """The BatchTopK job of `batchtopk_reference` with two shards left to capture, its driver stopped
    in each stage in turn, each time rerun with the same command: SIGKILL once capture has listed a
    shard, Ctrl-C (SIGINT) once every layer has a training checkpoint, SIGKILL while the release is
    assembled; then the same command to the end. Returns (run directory, {stage: driver log})."""
    run = tmp_path_factory.mktemp("killed") / "run"
    copy_capture(release, run, drop_shards=2)
    listed = len(read_manifest(run / "activations")["shards"])
    logs = {stage: run.parent / f"{stage}.log" for stage in ("capture", "train", "analyze", "final")}

    def shards_listed() -> int:
        return len(read_manifest(run / "activations")["shards"])

    stop_when(start_driver(run, logs["capture"]), lambda: shards_listed() > listed, signal.SIGKILL, "killed in capture")
    assert shards_listed() == listed + 1  # the other shard is captured again by the rerun
    driver = start_driver(run, logs["train"])
    stop_when(driver, lambda: all(list((run / "checkpoints").glob(f"layer={layer}-*/checkpoint_*"))
                                  for layer in (3, 7, 11)), signal.SIGINT, "interrupted in training")
    # Ctrl-C: the shell's status for SIGINT and a line saying so (Ray's own log lines may follow it)
    assert driver.returncode == 130 and "qsae: interrupted; what is finished is kept" in logs["train"].read_text()
    stop_when(start_driver(run, logs["analyze"]), lambda: any(run.glob(".release-*")), signal.SIGKILL,
              "killed while assembling the release")
    assert not (run / "release").exists()
    done = subprocess.run([sys.executable, "jobs/release.py", "--out", str(run), *BATCHTOPK, ONE_REPLICA], cwd=ROOT,
                          stdout=logs["final"].open("w"), stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, logs["final"].read_text()[-3000:]
    return run, {stage: log.read_text() for stage, log in logs.items()}


@pytest.fixture(scope="module")
def batchtopk_release(killed_at_each_stage):
    return killed_at_each_stage[0] / "release"


def test_a_driver_killed_at_each_stage_reruns_to_the_release_of_an_uninterrupted_run(killed_at_each_stage,
                                                                                     batchtopk_reference, release):
    run, logs = killed_at_each_stage
    reference = batchtopk_reference.parent
    # Capture: every rollout once, each stored row that of the uninterrupted capture.
    for layer in (3, 7, 11):
        found, expected = read_layer_table(run / "activations", layer), read_layer_table(reference / "activations", layer)
        assert found.select(["rollout_id", "position"]).equals(expected.select(["rollout_id", "position"]))
        np.testing.assert_allclose(residual_matrix(found), residual_matrix(expected), atol=1e-5)
    assert "nothing to capture" in logs["analyze"] and "nothing to capture" in logs["final"]
    # Training resumed from its checkpoints, to the weights of the uninterrupted training.
    for layer in (3, 7, 11):
        history = json.loads((run / "saes" / f"layer={layer}" / "history.json").read_text())
        assert history["resumed_at_steps"] and all(step % 5 == 0 for step in history["resumed_at_steps"])
        assert len(history["fvu"]) == 40 and len(history["step_fvu"]) == history["steps"]
        name = f"sae_L{layer}_n128_k8.safetensors"
        got, want = load_file(run / "release" / name), load_file(batchtopk_reference / name)
        for tensor in want:
            np.testing.assert_allclose(got[tensor], want[tensor], atol=1e-5, err_msg=f"{name} {tensor}")
    # The release: the same statistics, and nothing left of the killed attempts.
    for name in ("feature_stats.json", "feature_characterization.json", "split.json"):
        assert_same_json(json.loads((run / "release" / name).read_text()),
                         json.loads((batchtopk_reference / name).read_text()), name)
    assert not list(run.glob(".release-*")) and not list(run.rglob("*.tmp"))


def assert_same_json(got, want, where: str) -> None:
    """Equal structure and values, numbers to within float32 rounding."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_json(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_json(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6, nan_ok=True), where
    else:
        assert got == want, where


def test_batchtopk_runs_end_to_end(batchtopk_release, release):
    names = {p.relative_to(batchtopk_release).as_posix() for p in batchtopk_release.rglob("*") if p.is_file()}
    summary = json.loads((batchtopk_release / "final_summary.json").read_text())["layers"]
    stats = json.loads((batchtopk_release / "feature_stats.json").read_text())["layers"]
    acts, _ = released_rows(batchtopk_release)
    heldout = acts["heldout"].astype(bool)
    for layer in ("3", "7", "11"):
        assert {f"sae_L{layer}_n128_k8.pt", f"saelens/blocks.{layer}.hook_resid_post/cfg.json"} <= names
        assert not any(name.startswith("sparsify/") for name in names)
        sae = load_sae(batchtopk_release / f"sae_L{layer}_n128_k8.safetensors")
        assert type(sae) is BatchTopKSAE
        assert type(load_sae(release / f"sae_L{layer}_n128_k8.safetensors")) is TopKSAE  # the default run's
        row = summary[layer]
        assert row["architecture"] == "batchtopk" and row["threshold"] == pytest.approx(sae.threshold.item())
        assert row["threshold"] > 0
        x = torch.from_numpy(acts[f"L{layer}"].astype(np.float32))
        with torch.no_grad():
            values, indices = sae.encode_topk(x)
            x_hat = sae.decode_topk(values, indices).numpy()
            active = (sae.encode(x) > 0).sum(dim=1).numpy()
        assert row["variance_explained"] == pytest.approx(variance_explained(x.numpy()[heldout], x_hat[heldout]),
                                                          abs=1e-5)
        assert 0.3 < row["variance_explained"] <= 1.0
        fired = np.bincount(indices.numpy()[values.numpy() > 0], minlength=128)
        np.testing.assert_allclose(stats[layer]["fire_rate"], fired / len(x), atol=1e-12)
        assert row["tokens_at_sparse_width"] == int((active >= sae.sparse_width).sum())
        if row["tokens_at_sparse_width"] == 0:  # the statistics' sparse view then holds every active latent
            assert row["l0"] == pytest.approx(active[heldout].mean())
        assert 4 <= active.mean() <= 16  # the learnt threshold keeps about k = 8 a token (7.9-8.2 seen)
    card = (batchtopk_release / "README.md").read_text()
    assert "# BatchTopK sparse autoencoders" in card and "batchtopk-sae" in card
    assert "Sae.load_from_disk" not in card and "no sparsify copy" in card


def test_a_matryoshka_sweep_runs_end_to_end(tmp_path):
    """Matryoshka BatchTopK through Ray Train, a sweep member of another width taking its own default
    prefixes, and the release: summary, card, browser front page and SAELens metadata name them."""
    done = run_driver("--out", str(tmp_path), *SMALL, *NO_CAUSAL, "capture.layers=[3]",
                      "train.architecture=matryoshka-batchtopk", "train.sweep.n_features=[64]")
    assert done.returncode == 0, done.stderr[-3000:]
    release = tmp_path / "release"
    for folder, prefixes in ((release, [8, 16, 32, 64, 128]), (release / "sweep" / "n=64-k=8", [4, 8, 16, 32, 64])):
        n = prefixes[-1]
        sae = load_sae(folder / f"sae_L3_n{n}_k8.safetensors")
        assert type(sae) is MatryoshkaBatchTopKSAE and sae.prefixes.tolist() == prefixes and sae.threshold > 0
        theirs = load_sae(folder / "saelens" / "blocks.3.hook_resid_post")
        assert type(theirs) is MatryoshkaBatchTopKSAE and theirs.prefixes.tolist() == prefixes
        cfg = json.loads((folder / "saelens" / "blocks.3.hook_resid_post" / "cfg.json").read_text())
        assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"] == prefixes
    row = json.loads((release / "final_summary.json").read_text())["layers"]["3"]
    assert (row["architecture"], row["prefixes"]) == ("matryoshka-batchtopk", [8, 16, 32, 64, 128])
    assert 0.3 < row["variance_explained"] <= 1.0
    card = (release / "README.md").read_text()
    assert "# Matryoshka BatchTopK sparse autoencoders" in card and "(the first 8, 16, 32, 64, 128 features)" in card
    front = (release / "browser" / "data" / "release.js").read_text()
    assert '"architecture_name":"Matryoshka BatchTopK","matryoshka_prefixes":[8,16,32,64,128]' in front


def test_every_decoder_layer_in_one_pass_trained_over_the_resources_given(tmp_path):
    # The tiny dense model: half the hybrid's layers, so half the trainers to start on two cores.
    n_layers = model_dims(resolve_model_path("tiny-dense"))[0]
    done = run_driver("--out", str(tmp_path), "model.name=tiny-dense", "capture.layers=all", "rollout.num_questions=8",
                      "rollout.max_new_tokens=24", "train.epochs=2", "train.n_features=32", "train.k=4",
                      "train.holdout_fraction=0.25", "release.bootstrap=20", "release.permutations=50", *NO_CAUSAL)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "activations")
    assert manifest["layers"] == list(range(n_layers))
    # One forward pass per rollout: every layer holds the same tokens.
    keys = {layer: read_layer_table(tmp_path / "activations", layer).select(["rollout_id", "position"]).to_pylist()
            for layer in range(n_layers)}
    assert all(keys[layer] == keys[0] for layer in keys) and keys[0]
    summary = json.loads((tmp_path / "release" / "final_summary.json").read_text())
    assert sorted(summary["layers"], key=int) == [str(layer) for layer in range(n_layers)]
    for layer in range(n_layers):
        sae = load_sae(tmp_path / "release" / f"sae_L{layer}_n32_k4.safetensors")
        assert sae.d_in == manifest["d_model"]


def test_analyze_refuses_an_sae_of_another_width_than_the_store(release, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(release.parent, run, ignore=shutil.ignore_patterns("checkpoints"))
    trained = load_trained(RunDir(run), 7)
    sae = trained.sae
    save_trained(RunDir(run), 7, TrainedSAE(TopKSAE(sae.d_in + 1, sae.n_features, sae.k), trained.history,
                                            trained.settings))
    kept = {p.name: p.read_bytes() for p in (run / "release").iterdir() if p.is_file()}
    assert main(["analyze", "--out", str(run), *SMALL]) == 2  # in this process: it fails before Ray starts
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qsae: error: layer 7: the trained SAE has d_in {sae.d_in + 1} but the store's residuals have "
        f"d_model {sae.d_in}; train the layer again on this store"]
    # The earlier release stands untouched, and no staging directory is left behind.
    assert {p.name: p.read_bytes() for p in (run / "release").iterdir() if p.is_file()} == kept
    assert not list(run.glob(".release-*"))


def test_analyze_refuses_a_config_that_would_change_the_split(release, tmp_path, capsys):
    """Every field that decides the split is checked (tests/test_sample.py); here the command's answer."""
    change = "train.split_seed=1"
    run = tmp_path / "run"
    shutil.copytree(release.parent, run, ignore=shutil.ignore_patterns("checkpoints"))
    kept = {p.name: p.read_bytes() for p in (run / "release").iterdir() if p.is_file()}
    assert main(["analyze", "--out", str(run), *SMALL, change]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qsae: error: the config would change the train/held-out split") and "train.split_seed" in line
    assert {p.name: p.read_bytes() for p in (run / "release").iterdir() if p.is_file()} == kept
    assert not list(run.glob(".release-*"))


@pytest.mark.parametrize("ask, setting", [("capture.cpus_per_actor=64", "capture.cpus_per_actor = 64"),
                                          ("capture.gpus_per_actor=1", "capture.gpus_per_actor = 1"),
                                          ("train.cpus_per_layer=64", "train.cpus_per_layer = 64"),
                                          ("train.n_features=4000000000", "n_features = 4,000,000,000")])
def test_a_request_no_node_can_hold_is_refused_instead_of_waiting(tmp_path, ask, setting):
    """A local Ray cannot grow: a replica or trainer it cannot hold would wait forever, and an SAE larger
    than a trainer's memory would fail in every retry. Refused once Ray is up, before capture, in
    seconds (the timeout fails the test instead of hanging it), with the setting named."""
    started = time.time()
    done = subprocess.run([sys.executable, "jobs/release.py", "--out", str(tmp_path / "run"), ask], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("qsae: error: ") and setting in lines[-1]
    assert "Traceback" not in done.stderr and [line for line in lines if line.startswith("qsae: error")] == lines[-1:]
    assert not (tmp_path / "run" / "activations").exists() and time.time() - started < 120


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """SIGTERM while Ray runs (Ray's own handler would abort the driver with a stack dump, exit 134):
    exit 143, one qsae line last, every listed shard whole, the run directory unlocked."""
    run = tmp_path / "run"
    log = tmp_path / "driver.log"
    driver = subprocess.Popen([sys.executable, "jobs/release.py", "--out", str(run), *SMALL], cwd=ROOT,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    stop_when(driver, lambda: (run / "rollouts").is_dir(), signal.SIGTERM, "terminated in capture")
    text = log.read_text()
    assert driver.returncode == 143, text[-2000:]
    assert text.strip().splitlines()[-1] == "qsae: terminated; what is finished is kept, and the same command resumes"
    assert "Traceback" not in text and not (run / ".qsae.lock").exists()
    if read_manifest(run / "activations")["shards"] if (run / "activations" / "manifest.json").exists() else None:
        verify_store(run / "activations", [3, 7, 11])  # every listed shard whole, its checksums as recorded


def test_capture_alone_writes_the_store_and_the_stage_timings(tmp_path):
    """`qsae capture` stops after the store: its rollouts, every question's shard listed, and
    timings.json with the stages it ran (a user sizing a run reads them, as benchmarks/bench_scale.py does)."""
    done = subprocess.run([sys.executable, "-m", "qsae", "capture", "--out", str(tmp_path), "rollout.num_questions=4",
                           "rollout.max_new_tokens=16", "capture.questions_per_shard=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = verify_store(tmp_path / "activations")
    assert sorted(manifest["shards"]) == ["shard-00000", "shard-00001"]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert [name.split(" (")[0] for name in timings] == ["prepare", "capture"]
    assert "4 questions" in list(timings)[1] and all(seconds > 0 for seconds in timings.values())
    assert not (tmp_path / "saes").exists()
