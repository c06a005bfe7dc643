"""`qsae train` and `qsae export` run as real subprocesses on a planted sparse dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from planted import planted_rows, variance_explained
from qsae.sae import TopKSAE

REPO = Path(__file__).resolve().parent.parent
D, N_ATOMS, ACTIVE = 32, 64, 3
N_FEATURES, K = 64, 4
STEM = f"sae_L0_n{N_FEATURES}_k{K}"
HOOK = "blocks.0.hook_resid_post"


def qsae(*args: str) -> subprocess.CompletedProcess:
    # One intra-op thread: the matrices are tiny, and on a shared CPU OpenMP spin-waits slow them down.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qsae", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


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
    for rel in (f"{STEM}.pt", f"{STEM}.safetensors", "metrics.json",
                f"saelens/{HOOK}/cfg.json", f"saelens/{HOOK}/sae_weights.safetensors",
                "sparsify/layers.0/cfg.json", "sparsify/layers.0/sae.safetensors"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("*.tmp"))


def test_train_metrics_record_the_run(trained):
    proc, acts, out = trained
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 8000 and metrics["d_in"] == D
    assert metrics["config"]["n_features"] == N_FEATURES and metrics["config"]["k"] == K
    assert metrics["config"]["epochs"] == 8 and metrics["config"]["batch_size"] == 256
    assert metrics["config"]["lr"] == pytest.approx(3e-3)
    assert len(metrics["fvu"]) == 8
    torch.manual_seed(0)
    untrained = 1.0 - variance_explained(TopKSAE(D, N_FEATURES, K), np.load(acts))
    assert metrics["fvu"][-1] < 0.5 * untrained
    assert metrics["fvu"][-1] < metrics["fvu"][0]


def test_trained_sae_reconstructs_held_out_rows(trained):
    proc, _, out = trained
    assert proc.returncode == 0, proc.stderr
    sae = TopKSAE.load(out / f"{STEM}.pt")
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


def make_bad_input(kind: str, root: Path) -> tuple[list, str]:
    """(train arguments, text the error must contain) for one kind of bad input."""
    good = root / "good.npy"
    np.save(good, planted(64, seed=3))
    if kind == "missing":
        return ["--activations", root / "absent.npy", "--n-features", 8, "--k", 2], "absent.npy"
    if kind == "one_dimensional":
        np.save(root / "flat.npy", np.zeros(100, dtype=np.float32))
        return ["--activations", root / "flat.npy", "--n-features", 8, "--k", 2], "2-D"
    if kind == "k_above_n":
        return ["--activations", good, "--n-features", 4, "--k", 5], "k=5 exceeds n_features=4"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "one_dimensional", "k_above_n"])
def test_train_bad_input_fails_cleanly(tmp_path, kind):
    args, problem = make_bad_input(kind, tmp_path)
    out = tmp_path / "out"
    proc = qsae("train", *args, "--layer", 0, "--epochs", 1, "--out", out)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qsae: error:")
    assert problem in lines[0]
    assert not out.exists()
