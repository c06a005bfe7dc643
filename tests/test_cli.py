"""`qsae train` and `qsae export` run as real subprocesses on planted sparse datasets: outputs,
the quality gate from the command line, kill and resume, an Arrow store as input, and bad input."""
from __future__ import annotations

import json
import os
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
from planted import (
    GATE_ACTIVE,
    GATE_ATOMS,
    GATE_BATCH,
    best_cosine,
    learnable,
    planted_rows,
    power_law_rows,
    variance_explained,
)
from safetensors.torch import load_file

from qsae.config import TrainConfig
from qsae.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from qsae.sae_files import load_sae
from qsae.store import ShardRows, new_manifest, shard_checksums, write_manifest, write_shard
from qsae.training.recipes import native_bf16

pytestmark = pytest.mark.slow  # Ray, subprocesses or whole runs: `make test` runs it, `make test-fast` not

REPO = Path(__file__).resolve().parent.parent
D, N_ATOMS, ACTIVE = 32, 64, 3
N_FEATURES, K = 64, 4
STEM = f"sae_L0_n{N_FEATURES}_k{K}"
HOOK = "blocks.0.hook_resid_post"
RELEASE_FILES = (f"{STEM}.pt", f"{STEM}.safetensors", "metrics.json",
                 f"saelens/{HOOK}/cfg.json", f"saelens/{HOOK}/sae_weights.safetensors",
                 "sparsify/layers.0/cfg.json", "sparsify/layers.0/sae.safetensors")


def qsae_command(*args) -> dict:
    """Keyword arguments for subprocess.run or Popen that run `python -m qsae ARGS`."""
    # One intra-op thread: the matrices are tiny, and on a shared CPU OpenMP spin-waits slow them down.
    return {"args": [sys.executable, "-m", "qsae", *map(str, args)], "cwd": REPO,
            "env": {**os.environ, "OMP_NUM_THREADS": "1"}, "text": True}


def qsae(*args) -> subprocess.CompletedProcess:
    return subprocess.run(**qsae_command(*args), capture_output=True, timeout=300)


def planted(n_rows: int, seed: int) -> np.ndarray:
    """The same N_ATOMS atoms for every seed: rows from another seed are held-out data."""
    return planted_rows(n_rows, D, N_ATOMS, ACTIVE, seed, atom_seed=1234)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `qsae train` run on 8k planted rows: (completed process, training .npy, output dir)."""
    root = tmp_path_factory.mktemp("cli")
    acts = root / "acts.npy"
    np.save(acts, planted(8000, seed=1))
    out = root / "release"
    proc = qsae("train", "--activations", acts, "--layer", 0, "--n-features", N_FEATURES, "--k", K,
                "--epochs", 8, "--batch-size", 256, "--lr", 3e-3, "--out", out)
    return proc, acts, out


def test_train_exits_zero_and_writes_the_release_files(trained):
    proc, _, out = trained
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 4 files to {out}" in proc.stdout
    for rel in RELEASE_FILES:
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("*.tmp"))
    assert not (out / "checkpoint.pt").exists()


def test_train_metrics_record_the_run(trained):
    proc, acts, out = trained
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 8000 and metrics["d_in"] == D
    assert metrics["config"]["n_features"] == N_FEATURES and metrics["config"]["k"] == K
    assert metrics["config"]["epochs"] == 8 and metrics["config"]["batch_size"] == 256
    assert metrics["config"]["lr"] == pytest.approx(3e-3)
    defaults = TrainConfig()  # flags left out mean the trainer's defaults
    assert metrics["config"]["shuffle_buffer_rows"] == defaults.shuffle_buffer_rows
    assert metrics["config"]["dead_after_steps"] == defaults.dead_after_steps
    assert metrics["config"]["autocast_bf16"] is native_bf16("cpu")  # resolved: the modern recipe's default
    assert metrics["config"]["lr_decay_fraction"] == 0.2
    assert len(metrics["fvu"]) == 8
    torch.manual_seed(0)
    untrained = 1.0 - variance_explained(TopKSAE(D, N_FEATURES, K), np.load(acts))
    assert metrics["fvu"][-1] < 0.5 * untrained
    assert metrics["fvu"][-1] < metrics["fvu"][0]


def test_trained_sae_reconstructs_held_out_rows(trained):
    proc, _, out = trained
    assert proc.returncode == 0, proc.stderr
    sae = load_sae(out / f"{STEM}.pt")
    assert (sae.d_in, sae.n_features, sae.k) == (D, N_FEATURES, K)
    # Measured 0.82-0.86 over data and init seeds; 0.7 leaves a wide margin.
    assert variance_explained(sae, planted(2000, seed=2)) > 0.7


def test_export_writes_the_same_tensors(trained, tmp_path):
    proc, _, out = trained
    assert proc.returncode == 0, proc.stderr
    exported = tmp_path / "exported"
    result = qsae("export", "--sae", out / f"{STEM}.pt", "--layer", 0, "--out", exported)
    assert result.returncode == 0, result.stderr
    original = torch.load(out / f"{STEM}.pt", weights_only=True)
    again = torch.load(exported / f"{STEM}.pt", weights_only=True)
    assert set(again) == {"W_enc", "b_enc", "W_dec", "b_dec"} == set(original)
    for name in original:
        assert torch.equal(again[name], original[name]), name
    for rel in (f"{STEM}.safetensors", f"saelens/{HOOK}/sae_weights.safetensors", "sparsify/layers.0/sae.safetensors"):
        want, got = load_file(out / rel), load_file(exported / rel)
        assert set(got) == set(want), rel
        for name in want:
            assert torch.equal(got[name], want[name]), (rel, name)
    for rel in (f"saelens/{HOOK}/cfg.json", "sparsify/layers.0/cfg.json"):
        assert json.loads((exported / rel).read_text()) == json.loads((out / rel).read_text())
    assert not (exported / "metrics.json").exists()


def test_train_and_export_a_batchtopk_sae(trained, tmp_path):
    _, acts, _ = trained
    out = tmp_path / "batchtopk"
    proc = qsae("train", "--activations", acts, "--layer", 0, "--n-features", N_FEATURES, "--k", K, "--epochs", 8,
                "--batch-size", 256, "--lr", 3e-3, "--architecture", "batchtopk", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["architecture"] == "batchtopk"
    for rel in RELEASE_FILES:  # every format but sparsify's, which has no thresholded architecture
        assert (out / rel).is_file() == (not rel.startswith("sparsify/")), rel
    sae = load_sae(out / f"{STEM}.pt")
    assert type(sae) is BatchTopKSAE and sae.threshold > 0
    assert variance_explained(sae, planted(2000, seed=2)) > 0.7
    # Exported again from the SAELens folder (k from its metadata): the same tensors.
    exported = tmp_path / "exported"
    result = qsae("export", "--sae", out / "saelens" / HOOK, "--layer", 0, "--out", exported)
    assert result.returncode == 0, result.stderr
    original = torch.load(out / f"{STEM}.pt", weights_only=True)
    again = torch.load(exported / f"{STEM}.pt", weights_only=True)
    assert set(again) == set(original) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name in original:
        assert torch.equal(again[name], original[name]), name
    assert not (exported / "sparsify").exists()


def test_train_and_export_a_matryoshka_sae(trained, tmp_path):
    _, acts, _ = trained
    out = tmp_path / "matryoshka"
    proc = qsae("train", "--activations", acts, "--layer", 0, "--n-features", N_FEATURES, "--k", K, "--epochs", 8,
                "--batch-size", 256, "--lr", 3e-3, "--architecture", "matryoshka-batchtopk",
                "--matryoshka-prefixes", f"{N_FEATURES // 4},{N_FEATURES // 2}", "--out", out)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "metrics.json").read_text())["config"]
    prefixes = [N_FEATURES // 4, N_FEATURES // 2, N_FEATURES]
    assert (config["architecture"], config["matryoshka_prefixes"]) == ("matryoshka-batchtopk", prefixes)
    for rel in RELEASE_FILES:  # every format but sparsify's, which has no thresholded architecture
        assert (out / rel).is_file() == (not rel.startswith("sparsify/")), rel
    sae = load_sae(out / f"{STEM}.pt")
    assert type(sae) is MatryoshkaBatchTopKSAE and sae.threshold > 0 and sae.prefixes.tolist() == prefixes
    assert variance_explained(sae, planted(2000, seed=2)) > 0.6
    # Exported again from the SAELens folder (k and the prefixes from its metadata): the same tensors.
    exported = tmp_path / "exported"
    result = qsae("export", "--sae", out / "saelens" / HOOK, "--layer", 0, "--out", exported)
    assert result.returncode == 0, result.stderr
    original = torch.load(out / f"{STEM}.pt", weights_only=True)
    again = torch.load(exported / f"{STEM}.pt", weights_only=True)
    assert set(again) == set(original) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "prefixes"}
    for name in original:
        assert torch.equal(again[name], original[name]), name


def assert_one_error_line(proc: subprocess.CompletedProcess, problem: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qsae: error:")
    assert problem in lines[0]



def write_store(store_dir: Path, shards: dict[str, np.ndarray]) -> int:
    """An Arrow activation store of layer 0 holding the given rows per shard, as capture writes it;
    returns its row count."""
    manifest = new_manifest("test/model", None, [0], D, dtype="float32")
    for shard, rows in shards.items():
        n = len(rows)
        written = write_shard(store_dir, 0, shard, ShardRows(np.zeros(n, np.int64), np.arange(n), np.zeros(n, np.int32), np.ones(n, bool), rows), dtype="float32")
        manifest["shards"][shard] = {"rollouts": 1, "rows": {"0": written},
                                     "checksums": shard_checksums(store_dir, shard, [0])}
    write_manifest(store_dir, manifest)
    return sum(entry["rows"]["0"] for entry in manifest["shards"].values())


# ---------------------------------------------------------------------------------------------
# Quality gate from the command line: the same data and settings as test_quality's modern run.


def test_train_command_passes_the_quality_gate(tmp_path):
    rows, atoms, occurrences = power_law_rows()
    np.save(tmp_path / "gate.npy", rows)
    out = tmp_path / "gate"
    proc = qsae("train", "--activations", tmp_path / "gate.npy", "--layer", 0, "--recipe", "modern",
                "--n-features", 2 * GATE_ATOMS, "--k", GATE_ACTIVE, "--epochs", 40, "--batch-size", GATE_BATCH,
                "--dead-after-steps", 100, "--out", out)
    assert proc.returncode == 0, proc.stderr
    sae = load_sae(out / f"sae_L0_n{2 * GATE_ATOMS}_k{GATE_ACTIVE}.pt")
    cosine = best_cosine(atoms, sae)[learnable(occurrences)].mean()
    assert cosine >= 0.9, f"mean best cosine {cosine:.3f}"


# ---------------------------------------------------------------------------------------------
# Checkpoints: kill a run, resume it, refuse checkpoints of other runs.

# 125 steps an epoch, 1250 in all: long enough that the run is still going when its first
# checkpoint (step 40, mid-epoch) appears.
CHECKPOINTED = ("--layer", 0, "--n-features", N_FEATURES, "--k", K, "--epochs", 10, "--batch-size", 64,
                "--lr", 3e-3, "--checkpoint-every", 40)


def train_until_checkpoint(acts: Path, out: Path) -> None:
    """Start `qsae train`, SIGKILL it as soon as its first checkpoint exists."""
    proc = subprocess.Popen(**qsae_command("train", "--activations", acts, *CHECKPOINTED, "--out", out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr}"
    assert (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


@pytest.fixture(scope="module")
def interrupted(trained, tmp_path_factory):
    """(training .npy, output dir of a run killed after a checkpoint), and the same run uninterrupted."""
    _, acts, _ = trained
    root = tmp_path_factory.mktemp("checkpoints")
    train_until_checkpoint(acts, root / "killed")
    whole = qsae("train", "--activations", acts, *CHECKPOINTED, "--out", root / "whole")
    assert whole.returncode == 0, whole.stderr
    return acts, root / "killed", root / "whole"


def test_killed_run_resumes_to_the_uninterrupted_result(interrupted, tmp_path):
    acts, killed, whole = interrupted
    out = tmp_path / "resumed"
    shutil.copytree(killed, out)
    proc = qsae("train", "--activations", acts, *CHECKPOINTED, "--out", out)
    assert proc.returncode == 0, proc.stderr
    resumed_at = re.search(r"resuming from step (\d+)", proc.stdout)
    assert resumed_at, proc.stdout
    assert 0 < int(resumed_at[1]) < 1250 and int(resumed_at[1]) % 40 == 0
    assert not (out / "checkpoint.pt").exists() and not list(out.rglob("*.tmp"))
    for rel in RELEASE_FILES:
        assert (out / rel).is_file(), rel

    want, got = (json.loads((d / "metrics.json").read_text()) for d in (whole, out))
    assert abs(got["fvu"][-1] - want["fvu"][-1]) <= 1e-3
    assert got["steps"] == want["steps"] == 1250
    expected = torch.load(whole / f"{STEM}.pt", weights_only=True)
    resumed = torch.load(out / f"{STEM}.pt", weights_only=True)
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


def test_restart_discards_the_checkpoint(interrupted, tmp_path):
    """With --restart a checkpoint of another config is no obstacle: the run starts afresh."""
    acts, killed, _ = interrupted
    out = tmp_path / "restarted"
    shutil.copytree(killed, out)
    other = list(CHECKPOINTED)
    other[other.index("--k") + 1] = K + 1
    proc = qsae("train", "--activations", acts, *other, "--epochs", 1, "--restart", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" not in proc.stdout
    assert not (out / "checkpoint.pt").exists()
    assert json.loads((out / "metrics.json").read_text())["config"]["k"] == K + 1


def refused_checkpoint(kind: str, acts: Path, out: Path) -> tuple[list, str]:
    """(train arguments, text the error must contain) for a rerun that must not resume out's checkpoint."""
    args = list(CHECKPOINTED)
    if kind == "other_config":
        args[args.index("--k") + 1] = K + 1
        return ["--activations", acts, *args], f"another training config (k {K} -> {K + 1})"
    if kind == "other_width":
        np.save(out.parent / "wide.npy", np.concatenate([np.load(acts)] * 2, axis=1))
        return ["--activations", out.parent / "wide.npy", *args], f"d_in {D} but the activations have {2 * D}"
    if kind == "other_rows":
        np.save(out.parent / "fewer.npy", np.load(acts)[:5000])
        return ["--activations", out.parent / "fewer.npy", *args], "trained on 8000 rows, these activations have 5000"
    if kind == "corrupted":
        checkpoint = out / "checkpoint.pt"
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
        return ["--activations", acts, *args], "is unreadable"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["other_config", "other_width", "other_rows", "corrupted"])
def test_train_refuses_a_checkpoint_of_another_run(interrupted, tmp_path, kind):
    acts, killed, _ = interrupted
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    args, problem = refused_checkpoint(kind, acts, out)
    proc = qsae("train", *args, "--out", out)
    assert_one_error_line(proc, problem)
    assert "--restart" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["checkpoint.pt"]  # no release files


# ---------------------------------------------------------------------------------------------
# An Arrow store as input


def test_train_streams_from_an_arrow_store(tmp_path):
    rows = planted(3000, seed=4)
    n_rows = write_store(tmp_path / "run" / "activations",
                         {"shard_00000": rows[:1100], "shard_00001": rows[1100:1900], "shard_00002": rows[1900:]})
    out = tmp_path / "release"
    proc = qsae("train", "--activations", tmp_path / "run", "--layer", 0, "--n-features", N_FEATURES, "--k", K,
                "--epochs", 8, "--batch-size", 64, "--lr", 3e-3, "--shuffle-buffer-rows", 1024, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for rel in RELEASE_FILES:
        assert (out / rel).is_file(), rel
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == n_rows == 3000 and metrics["d_in"] == D
    assert metrics["config"]["shuffle_buffer_rows"] == 1024
    assert metrics["tokens_seen"] == 8 * 3000
    assert metrics["fvu"][-1] < 0.5 * metrics["fvu"][0]
    # Trained on the store's rows: it reconstructs held-out rows of the same dictionary.
    assert variance_explained(load_sae(out / f"{STEM}.pt"), planted(2000, seed=2)) > 0.7  # measured 0.80


def test_analyze_refuses_a_trained_sae_other_than_the_config_asks_for(tmp_path, capsys, tiny_path):
    """Before Ray starts: the layer's recorded SAE against train.architecture, n_features and k."""
    from qsae.cli import main
    from qsae.rundir import RunDir
    from qsae.training.trained import TrainedSAE, save_trained

    for layer in (3, 7, 11):
        save_trained(RunDir(tmp_path), layer, TrainedSAE(TopKSAE(64, 32, 4), {"revived": 0}, {}))
    write_manifest(tmp_path / "activations", new_manifest("tiny", None, [3, 7, 11], 64, dtype="float32"))
    assert main(["analyze", "--out", str(tmp_path), "train.n_features=64", "train.k=4"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qsae: error: layer 3: the trained SAE is topk with n_features=32, k=4, but the config asks for topk with "
        "n_features=64, k=4; analyze with the config it was trained with, or train again"]


def test_doctor_reports_what_a_run_would_use_and_fails_on_what_would_stop_it(tmp_path):
    """`qsae doctor` loads no weights and starts no Ray: on the embedded default every finding is ok;
    with an SAE no trainer here can hold, or the vLLM CPU build with a hybrid model, it says which
    check fails and exits 1 (and leaves the run directory uncreated)."""
    out = f"out={json.dumps(str(tmp_path / 'run'))}"
    done = qsae("doctor", out)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    found = {line.split()[2]: line.split()[1] for line in lines}
    for what in ("torch", "ray", "transformers", "model.device", "train.device", "before", "replica", "trainer", "store"):
        assert found.get(what) == "ok", (what, done.stdout)
    assert "d_model 64" in done.stdout and torch.__version__ in done.stdout and not (tmp_path / "run").exists()
    for override, what in (("train.n_features=4000000000", "trainer memory"),
                           ("rollout.engine=vllm", "before Ray")):
        done = qsae("doctor", out, override)
        assert done.returncode == 1
        failed = [line for line in done.stdout.splitlines() if line.startswith("[qsae] fail")]
        assert len(failed) == 1 and what in failed[0]
        assert done.stderr.strip() == f"qsae: doctor: this config would fail here ({what})"
